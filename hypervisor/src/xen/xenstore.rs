//! [`XenStore`] over `libxc_ffi::XenStore` (one `xs_open` connection).

use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

use libxc_ffi::{Access, LibraryPaths, Permission};

use super::errors;
use crate::{
    DomId, Errno, HypervisorError, Method, Result, Tx, WatchEvent, XenStore, XsPerm, XsPermKind,
};

/// A connection to xenstored, from
/// [`Hypervisor::open_xenstore`](crate::Hypervisor::open_xenstore).
///
/// Transactions are xenstored's own ids: [`Tx`] carries the `xs_transaction_t` returned by
/// `xs_transaction_start` ([`Tx::NONE`] is `XBT_NULL`), so a transaction left open is
/// abandoned by xenstored when the connection closes. Watch events queue in libxenstore;
/// [`as_fd`](XenStore::as_fd) is its watch pipe.
#[derive(Debug)]
pub struct XenStoreConnection {
    xs: libxc_ffi::XenStore,
}

/// Converts a permission entry of the trait into libxenstore's.
pub(crate) fn perm_to_ffi(p: &XsPerm) -> Permission {
    Permission {
        domid: u32::from(p.domid),
        access: match p.kind {
            XsPermKind::None => Access::None,
            XsPermKind::Read => Access::Read,
            XsPermKind::Write => Access::Write,
            XsPermKind::Both => Access::ReadWrite,
        },
    }
}

/// Converts libxenstore's permission entry; `None` for a domain id beyond `domid_t`.
pub(crate) fn perm_from_ffi(p: &Permission) -> Option<XsPerm> {
    let kind = match p.access {
        Access::None => XsPermKind::None,
        Access::Read => XsPermKind::Read,
        Access::Write => XsPermKind::Write,
        Access::ReadWrite => XsPermKind::Both,
    };
    Some(XsPerm::new(DomId::try_from(p.domid).ok()?, kind))
}

impl XenStoreConnection {
    /// Connects with the library named by `paths.xenstore` (`xs_open(0)`: xenstored's
    /// socket, else the xenbus device).
    pub fn open(paths: &LibraryPaths) -> Result<XenStoreConnection> {
        let xs = libxc_ffi::XenStore::open_with(paths).map_err(|e| {
            log::warn!(
                "cannot open libxenstore ({}): {e}",
                paths.xenstore.to_string_lossy()
            );
            errors::xs(Method::XsOpen, "", e)
        })?;
        Ok(XenStoreConnection { xs })
    }
}

impl XenStore for XenStoreConnection {
    fn read(&self, tx: Tx, path: &str) -> Result<Vec<u8>> {
        self.xs
            .read_tx(tx.0, path)
            .map_err(|e| errors::xs(Method::XsRead, path, e))
    }

    fn write(&self, tx: Tx, path: &str, value: &[u8]) -> Result<()> {
        self.xs
            .write_tx(tx.0, path, value)
            .map_err(|e| errors::xs(Method::XsWrite, path, e))
    }

    fn mkdir(&self, tx: Tx, path: &str) -> Result<()> {
        self.xs
            .mkdir_tx(tx.0, path)
            .map_err(|e| errors::xs(Method::XsMkdir, path, e))
    }

    fn rm(&self, tx: Tx, path: &str) -> Result<()> {
        self.xs
            .rm_tx(tx.0, path)
            .map_err(|e| errors::xs(Method::XsRm, path, e))
    }

    fn directory(&self, tx: Tx, path: &str) -> Result<Vec<String>> {
        // xenstored lists children in creation order; the trait promises sorted names.
        let mut names = self
            .xs
            .directory_tx(tx.0, path)
            .map_err(|e| errors::xs(Method::XsDirectory, path, e))?;
        names.sort();
        Ok(names)
    }

    fn get_permissions(&self, tx: Tx, path: &str) -> Result<Vec<XsPerm>> {
        let op = Method::XsGetPermissions;
        let perms = self
            .xs
            .get_permissions_tx(tx.0, path)
            .map_err(|e| errors::xs(op, path, e))?;
        perms
            .iter()
            .map(|p| {
                perm_from_ffi(p).ok_or_else(|| {
                    log::warn!(
                        "xenstore {op} of {path:?}: domain id {} out of range",
                        p.domid
                    );
                    HypervisorError::XenStore {
                        op,
                        path: path.to_owned(),
                        errno: Errno::EINVAL,
                    }
                })
            })
            .collect()
    }

    fn set_permissions(&self, tx: Tx, path: &str, perms: &[XsPerm]) -> Result<()> {
        let perms: Vec<Permission> = perms.iter().map(perm_to_ffi).collect();
        self.xs
            .set_permissions_tx(tx.0, path, &perms)
            .map_err(|e| errors::xs(Method::XsSetPermissions, path, e))
    }

    fn transaction_start(&self) -> Result<Tx> {
        self.xs
            .transaction_start_raw()
            .map(Tx)
            .map_err(|e| errors::xs(Method::XsTransactionStart, "", e))
    }

    fn transaction_end(&self, tx: Tx, abort: bool) -> Result<()> {
        self.xs
            .transaction_end(tx.0, abort)
            .map_err(|e| errors::xs(Method::XsTransactionEnd, "", e))
    }

    fn watch(&self, path: &str, token: &str) -> Result<()> {
        self.xs
            .watch(path, token)
            .map_err(|e| errors::xs(Method::XsWatch, path, e))
    }

    fn unwatch(&self, path: &str, token: &str) -> Result<()> {
        self.xs
            .unwatch(path, token)
            .map_err(|e| errors::xs(Method::XsUnwatch, path, e))
    }

    fn read_watch(&self, timeout: Option<Duration>) -> Result<Option<WatchEvent>> {
        let r = if timeout == Some(Duration::ZERO) {
            self.xs.check_watch()
        } else {
            self.xs.wait_watch(timeout)
        };
        r.map(|ev| {
            ev.map(|ev| WatchEvent {
                path: ev.path,
                token: ev.token,
            })
        })
        .map_err(|e| errors::xs(Method::XsReadWatch, "", e))
    }

    fn as_fd(&self) -> BorrowedFd<'_> {
        self.xs.as_fd()
    }

    fn get_domain_path(&self, domid: DomId) -> Result<String> {
        let op = Method::XsGetDomainPath;
        self.xs
            .get_domain_path(u32::from(domid))
            .map_err(|e| match e.errno() {
                Some(errno) => HypervisorError::Domain {
                    op,
                    domid,
                    errno: errors::errno(errno),
                },
                None => errors::xs(op, "", e),
            })
    }
}
