//! libxenstore: read/write/mkdir/rm/directory, permissions, transactions and watches.
//!
//! [`XenStore`] is `Send + Sync`: libxenstore serialises requests on one connection with its
//! own mutexes (it is built with pthreads) and delivers watch events through a pipe that
//! [`XenStore::fileno`] (or `as_fd()`) returns for polling: when it polls readable, call
//! [`XenStore::check_watch`] until it returns `None`.  A [`Transaction`] borrows its `XenStore` and is
//! aborted on drop unless committed.

use core::ffi::{c_char, c_uint, c_void, CStr};
use core::ptr::NonNull;
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::time::Duration;

use crate::errno::{clear_errno, Errno};
use crate::loader::{self, LibraryPaths, LoadError};
use crate::sys::types as t;
use crate::sys::xenstore::XenStoreLib;

/// The "no transaction" id (`XBT_NULL`) for the `*_tx` methods.
pub const XBT_NULL: u32 = t::XBT_NULL;

/// How many times [`XenStore::transaction`] retries a transaction that ended with `EAGAIN`.
pub const TRANSACTION_RETRIES: u32 = 16;

/// Errors of the libxenstore wrappers.
#[derive(Debug, thiserror::Error)]
pub enum XsError {
    /// libxenstore could not be loaded.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// `xs_open` failed.
    #[error("xs_open failed: {errno} (is xenstored running, and are we root in dom0?)")]
    Open {
        /// errno after the call.
        errno: Errno,
    },
    /// An operation on a path failed.
    #[error("{op} {path:?} failed: {errno}")]
    Path {
        /// The libxenstore function.
        op: &'static str,
        /// The xenstore path (or watch path).
        path: String,
        /// errno after the call.
        errno: Errno,
    },
    /// An operation about a domain failed.
    #[error("{op} failed for domain {domid}: {errno}")]
    Domain {
        /// The libxenstore function.
        op: &'static str,
        /// The domain.
        domid: u32,
        /// errno after the call.
        errno: Errno,
    },
    /// Another call failed.
    #[error("{op} failed: {errno}")]
    Call {
        /// The libxenstore function.
        op: &'static str,
        /// errno after the call.
        errno: Errno,
    },
    /// A transaction kept conflicting (`EAGAIN`) and was given up.
    #[error("xenstore transaction still conflicting (EAGAIN) after {attempts} attempts")]
    TransactionRetries {
        /// Attempts made.
        attempts: u32,
    },
    /// Bad argument (e.g. a NUL byte in a path), refused before calling the library.
    #[error("{op}: {reason}")]
    Invalid {
        /// The operation.
        op: &'static str,
        /// What was wrong.
        reason: String,
    },
}

impl XsError {
    /// The errno of a failed call, if the error carries one.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            Self::Open { errno }
            | Self::Path { errno, .. }
            | Self::Domain { errno, .. }
            | Self::Call { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    /// Whether the error is "no such node" (`ENOENT`).
    pub fn is_not_found(&self) -> bool {
        self.errno() == Some(Errno(libc::ENOENT))
    }

    /// Whether the error is a transaction conflict (`EAGAIN`): retry the transaction.
    pub fn is_again(&self) -> bool {
        self.errno() == Some(Errno(libc::EAGAIN))
    }
}

/// Access granted by a xenstore permission entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// XS_PERM_NONE
    None,
    /// XS_PERM_READ
    Read,
    /// XS_PERM_WRITE
    Write,
    /// XS_PERM_READ | XS_PERM_WRITE
    ReadWrite,
}

/// One entry of a node's permission list.  The first entry names the owner (who has full
/// access) and the access of every domain not listed; later entries grant `access` to
/// `domid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Permission {
    /// The domain.
    pub domid: u32,
    /// Its access.
    pub access: Access,
}

impl Permission {
    /// Decodes a raw `xs_permissions` (internal bits such as XS_PERM_OWNER are ignored).
    pub fn from_raw(raw: &t::xs_permissions) -> Self {
        let r = raw.perms & t::XS_PERM_READ != 0;
        let w = raw.perms & t::XS_PERM_WRITE != 0;
        let access = match (r, w) {
            (false, false) => Access::None,
            (true, false) => Access::Read,
            (false, true) => Access::Write,
            (true, true) => Access::ReadWrite,
        };
        Self {
            domid: raw.id,
            access,
        }
    }

    /// Encodes as a raw `xs_permissions`.
    pub fn to_raw(self) -> t::xs_permissions {
        let perms = match self.access {
            Access::None => t::XS_PERM_NONE,
            Access::Read => t::XS_PERM_READ,
            Access::Write => t::XS_PERM_WRITE,
            Access::ReadWrite => t::XS_PERM_READ | t::XS_PERM_WRITE,
        };
        t::xs_permissions {
            id: self.domid,
            perms,
        }
    }
}

/// A fired watch: the path that changed and the token given to [`XenStore::watch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    /// The node that changed (or the watched path itself, for the initial event).
    pub path: String,
    /// The token registered with the watch.
    pub token: String,
}

/// Decodes the `char *[]` vector xs_read_watch/xs_check_watch return (path, token, ...).
///
/// # Safety
/// `vec` must point to at least `num` valid NUL-terminated strings.
unsafe fn watch_event_from(vec: *mut *mut c_char, num: usize) -> Option<WatchEvent> {
    if num < 2 {
        return None;
    }
    // SAFETY: the caller guarantees vec[0] and vec[1] are valid C strings.
    let (path, token) = unsafe {
        (
            CStr::from_ptr(*vec.add(t::xs_watch_type_XS_WATCH_PATH as usize)),
            CStr::from_ptr(*vec.add(t::xs_watch_type_XS_WATCH_TOKEN as usize)),
        )
    };
    Some(WatchEvent {
        path: path.to_string_lossy().into_owned(),
        token: token.to_string_lossy().into_owned(),
    })
}

/// An open xenstore connection (`struct xs_handle *`), closed on drop.
pub struct XenStore {
    lib: XenStoreLib,
    h: NonNull<t::xs_handle>,
    watch_fd: RawFd,
}

// SAFETY: libxenstore protects a handle's request/reply/watch state with its own mutexes.
unsafe impl Send for XenStore {}
// SAFETY: as above; concurrent requests on one handle are serialised by the library.
unsafe impl Sync for XenStore {}

impl core::fmt::Debug for XenStore {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("XenStore").finish_non_exhaustive()
    }
}

fn cstr(op: &'static str, s: &str) -> Result<CString, XsError> {
    CString::new(s).map_err(|_| XsError::Invalid {
        op,
        reason: format!("{s:?} contains a NUL byte"),
    })
}

/// Frees memory returned by libxenstore.
fn free<T>(p: *mut T) {
    // SAFETY: p is NULL or a single allocation libxenstore made with malloc and handed to
    // us; it is freed exactly once, here.
    unsafe { libc::free(p.cast::<c_void>()) };
}

impl XenStore {
    /// Loads libxenstore.so.4 and connects (`xs_open(0)`: xenstored's socket, else xenbus).
    pub fn open() -> Result<Self, XsError> {
        Self::open_with(&LibraryPaths::default())
    }

    /// Like [`XenStore::open`], with the library taken from `paths.xenstore`.
    pub fn open_with(paths: &LibraryPaths) -> Result<Self, XsError> {
        let lib = loader::load(
            &paths.xenstore,
            &paths.search_dirs,
            XenStoreLib::from_library::<libloading::Library>,
        )?;
        clear_errno();
        // SAFETY: plain call; flags 0.
        let raw = unsafe { (lib.xs_open)(0) };
        let Some(h) = NonNull::new(raw) else {
            return Err(XsError::Open {
                errno: Errno::last(),
            });
        };
        // xs_fileno creates the watch pipe on first use; do it now so that the pollable fd
        // is always there (AsFd) and a failure shows up here, not later.
        // SAFETY: plain call on a valid handle.
        let watch_fd = unsafe { (lib.xs_fileno)(h.as_ptr()) };
        let xs = Self { lib, h, watch_fd };
        if watch_fd < 0 {
            return Err(XsError::Call {
                op: "xs_fileno",
                errno: Errno::last(),
            });
        }
        Ok(xs)
    }

    fn h(&self) -> *mut t::xs_handle {
        self.h.as_ptr()
    }

    fn path_err(op: &'static str, path: &str) -> XsError {
        XsError::Path {
            op,
            path: path.to_owned(),
            errno: Errno::last(),
        }
    }

    // Operations by transaction id: used by the plain calls (XBT_NULL) and by Transaction,
    // and public for callers that track transaction ids themselves.

    /// [`XenStore::read`] in transaction `tx` ([`XBT_NULL`] for none).
    pub fn read_tx(&self, tx: u32, path: &str) -> Result<Vec<u8>, XsError> {
        let p = cstr("xs_read", path)?;
        let mut len: c_uint = 0;
        // SAFETY: p is a valid C string and len a valid out-pointer.
        let data = unsafe { (self.lib.xs_read)(self.h(), tx, p.as_ptr(), &mut len) };
        if data.is_null() {
            return Err(Self::path_err("xs_read", path));
        }
        // SAFETY: on success data holds `len` bytes (plus a NUL we do not copy).
        let v = unsafe { core::slice::from_raw_parts(data.cast::<u8>(), len as usize) }.to_vec();
        free(data);
        Ok(v)
    }

    /// [`XenStore::write`] in transaction `tx` ([`XBT_NULL`] for none).
    pub fn write_tx(&self, tx: u32, path: &str, value: &[u8]) -> Result<(), XsError> {
        let p = cstr("xs_write", path)?;
        let len = c_uint::try_from(value.len()).map_err(|_| XsError::Invalid {
            op: "xs_write",
            reason: format!("value of {} bytes is too large", value.len()),
        })?;
        // SAFETY: p is a valid C string, value holds len bytes.
        let ok = unsafe {
            (self.lib.xs_write)(
                self.h(),
                tx,
                p.as_ptr(),
                value.as_ptr().cast::<c_void>(),
                len,
            )
        };
        if !ok {
            return Err(Self::path_err("xs_write", path));
        }
        Ok(())
    }

    /// [`XenStore::mkdir`] in transaction `tx` ([`XBT_NULL`] for none).
    pub fn mkdir_tx(&self, tx: u32, path: &str) -> Result<(), XsError> {
        let p = cstr("xs_mkdir", path)?;
        // SAFETY: p is a valid C string.
        if !unsafe { (self.lib.xs_mkdir)(self.h(), tx, p.as_ptr()) } {
            return Err(Self::path_err("xs_mkdir", path));
        }
        Ok(())
    }

    /// [`XenStore::rm`] in transaction `tx` ([`XBT_NULL`] for none).
    pub fn rm_tx(&self, tx: u32, path: &str) -> Result<(), XsError> {
        let p = cstr("xs_rm", path)?;
        // SAFETY: p is a valid C string.
        if !unsafe { (self.lib.xs_rm)(self.h(), tx, p.as_ptr()) } {
            return Err(Self::path_err("xs_rm", path));
        }
        Ok(())
    }

    /// [`XenStore::directory`] in transaction `tx` ([`XBT_NULL`] for none).
    pub fn directory_tx(&self, tx: u32, path: &str) -> Result<Vec<String>, XsError> {
        let p = cstr("xs_directory", path)?;
        let mut num: c_uint = 0;
        // SAFETY: p is a valid C string, num a valid out-pointer.
        let vec = unsafe { (self.lib.xs_directory)(self.h(), tx, p.as_ptr(), &mut num) };
        if vec.is_null() {
            return Err(Self::path_err("xs_directory", path));
        }
        let names = (0..num as usize)
            .map(|i| {
                // SAFETY: on success vec holds `num` valid C strings (in the same block).
                unsafe { CStr::from_ptr(*vec.add(i)) }
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        free(vec);
        Ok(names)
    }

    /// [`XenStore::get_permissions`] in transaction `tx` ([`XBT_NULL`] for none).
    pub fn get_permissions_tx(&self, tx: u32, path: &str) -> Result<Vec<Permission>, XsError> {
        let p = cstr("xs_get_permissions", path)?;
        let mut num: c_uint = 0;
        // SAFETY: p is a valid C string, num a valid out-pointer.
        let arr = unsafe { (self.lib.xs_get_permissions)(self.h(), tx, p.as_ptr(), &mut num) };
        if arr.is_null() {
            return Err(Self::path_err("xs_get_permissions", path));
        }
        // SAFETY: on success arr holds `num` entries.
        let perms = unsafe { core::slice::from_raw_parts(arr, num as usize) }
            .iter()
            .map(Permission::from_raw)
            .collect();
        free(arr);
        Ok(perms)
    }

    /// [`XenStore::set_permissions`] in transaction `tx` ([`XBT_NULL`] for none).
    pub fn set_permissions_tx(
        &self,
        tx: u32,
        path: &str,
        perms: &[Permission],
    ) -> Result<(), XsError> {
        let op = "xs_set_permissions";
        let p = cstr(op, path)?;
        if perms.is_empty() {
            return Err(XsError::Invalid {
                op,
                reason: "empty permission list (the first entry names the owner)".into(),
            });
        }
        let mut raw: Vec<t::xs_permissions> = perms.iter().map(|p| p.to_raw()).collect();
        let n = c_uint::try_from(raw.len()).unwrap_or(c_uint::MAX);
        // SAFETY: p is a valid C string; raw holds n entries (only read by the library).
        if !unsafe { (self.lib.xs_set_permissions)(self.h(), tx, p.as_ptr(), raw.as_mut_ptr(), n) }
        {
            return Err(Self::path_err(op, path));
        }
        Ok(())
    }

    /// Reads a node's value.
    pub fn read(&self, path: &str) -> Result<Vec<u8>, XsError> {
        self.read_tx(t::XBT_NULL, path)
    }

    /// Reads a node's value as UTF-8 (lossy).
    pub fn read_string(&self, path: &str) -> Result<String, XsError> {
        self.read(path)
            .map(|v| String::from_utf8_lossy(&v).into_owned())
    }

    /// Reads a node's value, `None` if it does not exist.
    pub fn read_opt(&self, path: &str) -> Result<Option<Vec<u8>>, XsError> {
        match self.read(path) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes a node (creating it and missing parents).
    pub fn write(&self, path: &str, value: &[u8]) -> Result<(), XsError> {
        self.write_tx(t::XBT_NULL, path, value)
    }

    /// Creates a node with an empty value.
    pub fn mkdir(&self, path: &str) -> Result<(), XsError> {
        self.mkdir_tx(t::XBT_NULL, path)
    }

    /// Removes a node and its children.
    pub fn rm(&self, path: &str) -> Result<(), XsError> {
        self.rm_tx(t::XBT_NULL, path)
    }

    /// Names of a node's children.
    pub fn directory(&self, path: &str) -> Result<Vec<String>, XsError> {
        self.directory_tx(t::XBT_NULL, path)
    }

    /// A node's permission list.
    pub fn get_permissions(&self, path: &str) -> Result<Vec<Permission>, XsError> {
        self.get_permissions_tx(t::XBT_NULL, path)
    }

    /// Sets a node's permission list (first entry = owner and default access).
    pub fn set_permissions(&self, path: &str, perms: &[Permission]) -> Result<(), XsError> {
        self.set_permissions_tx(t::XBT_NULL, path, perms)
    }

    /// `xs_get_domain_path`: the home path of `domid` (`/local/domain/<domid>`).
    pub fn get_domain_path(&self, domid: u32) -> Result<String, XsError> {
        // SAFETY: plain call on a valid handle.
        let p = unsafe { (self.lib.xs_get_domain_path)(self.h(), domid) };
        if p.is_null() {
            return Err(XsError::Domain {
                op: "xs_get_domain_path",
                domid,
                errno: Errno::last(),
            });
        }
        // SAFETY: on success p is a malloc'd C string.
        let s = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
        free(p);
        Ok(s)
    }

    // Transactions

    /// Starts a transaction; prefer [`XenStore::transaction`], which retries conflicts.
    pub fn transaction_start(&self) -> Result<Transaction<'_>, XsError> {
        let id = self.transaction_start_raw()?;
        Ok(Transaction {
            xs: self,
            id,
            done: false,
        })
    }

    /// `xs_transaction_start` returning the bare id, for callers that track transactions
    /// themselves (use the `*_tx` methods, then [`XenStore::transaction_end`]).  Prefer
    /// [`XenStore::transaction_start`], whose [`Transaction`] aborts when dropped.
    pub fn transaction_start_raw(&self) -> Result<u32, XsError> {
        // SAFETY: plain call on a valid handle.
        let id = unsafe { (self.lib.xs_transaction_start)(self.h()) };
        if id == t::XBT_NULL {
            return Err(XsError::Call {
                op: "xs_transaction_start",
                errno: Errno::last(),
            });
        }
        Ok(id)
    }

    /// `xs_transaction_end`: commits (`abort == false`) or abandons transaction `tx`.  A
    /// commit failing with [`XsError::is_again`] conflicted: redo the whole transaction.
    pub fn transaction_end(&self, tx: u32, abort: bool) -> Result<(), XsError> {
        // SAFETY: plain call on a valid handle; an unknown id is reported by the library.
        if !unsafe { (self.lib.xs_transaction_end)(self.h(), tx, abort) } {
            return Err(XsError::Call {
                op: if abort {
                    "xs_transaction_end(abort)"
                } else {
                    "xs_transaction_end(commit)"
                },
                errno: Errno::last(),
            });
        }
        Ok(())
    }

    /// Runs `f` in a transaction and commits it, retrying the whole transaction (up to
    /// [`TRANSACTION_RETRIES`] attempts) when it conflicts with another writer (`EAGAIN`).
    /// If `f` fails with anything else, the transaction is aborted and the error returned.
    pub fn transaction<T, F>(&self, mut f: F) -> Result<T, XsError>
    where
        F: FnMut(&Transaction<'_>) -> Result<T, XsError>,
    {
        for _ in 0..TRANSACTION_RETRIES {
            let tx = self.transaction_start()?;
            match f(&tx) {
                Ok(v) => match tx.commit() {
                    Ok(()) => return Ok(v),
                    Err(e) if e.is_again() => continue,
                    Err(e) => return Err(e),
                },
                Err(e) => {
                    // Aborting cannot fix anything; the original error is what matters.
                    let _ = tx.abort();
                    if e.is_again() {
                        continue;
                    }
                    return Err(e);
                }
            }
        }
        Err(XsError::TransactionRetries {
            attempts: TRANSACTION_RETRIES,
        })
    }

    // Watches

    /// Registers a watch on `path` (and its children).  Xen fires it once right away.
    pub fn watch(&self, path: &str, token: &str) -> Result<(), XsError> {
        let p = cstr("xs_watch", path)?;
        let tk = cstr("xs_watch", token)?;
        // SAFETY: both are valid C strings.
        if !unsafe { (self.lib.xs_watch)(self.h(), p.as_ptr(), tk.as_ptr()) } {
            return Err(Self::path_err("xs_watch", path));
        }
        Ok(())
    }

    /// Removes a watch registered with the same `path` and `token`.
    pub fn unwatch(&self, path: &str, token: &str) -> Result<(), XsError> {
        let p = cstr("xs_unwatch", path)?;
        let tk = cstr("xs_unwatch", token)?;
        // SAFETY: both are valid C strings.
        if !unsafe { (self.lib.xs_unwatch)(self.h(), p.as_ptr(), tk.as_ptr()) } {
            return Err(Self::path_err("xs_unwatch", path));
        }
        Ok(())
    }

    /// Waits for the next watch event (blocks).
    pub fn read_watch(&self) -> Result<WatchEvent, XsError> {
        let mut num: c_uint = 0;
        // SAFETY: num is a valid out-pointer.
        let vec = unsafe { (self.lib.xs_read_watch)(self.h(), &mut num) };
        if vec.is_null() {
            return Err(XsError::Call {
                op: "xs_read_watch",
                errno: Errno::last(),
            });
        }
        // SAFETY: on success vec holds `num` valid C strings.
        let ev = unsafe { watch_event_from(vec, num as usize) };
        free(vec);
        ev.ok_or(XsError::Invalid {
            op: "xs_read_watch",
            reason: format!("event with {num} fields"),
        })
    }

    /// The next pending watch event without blocking, `None` if there is none.  After
    /// [`XenStore::fileno`] polls readable, call this until it returns `None`.
    pub fn check_watch(&self) -> Result<Option<WatchEvent>, XsError> {
        clear_errno();
        // SAFETY: plain call on a valid handle.
        let vec = unsafe { (self.lib.xs_check_watch)(self.h()) };
        if vec.is_null() {
            let errno = Errno::last();
            if errno == Errno(libc::EAGAIN) {
                return Ok(None);
            }
            return Err(XsError::Call {
                op: "xs_check_watch",
                errno,
            });
        }
        // SAFETY: on success vec[0] (path) and vec[1] (token) are valid C strings.
        let ev = unsafe { watch_event_from(vec, 2) };
        free(vec);
        Ok(ev)
    }

    /// Waits up to `timeout` (`None`: forever, `Some(Duration::ZERO)`: just check) for a
    /// watch event.  Unlike [`XenStore::read_watch`] it never blocks past the timeout.
    pub fn wait_watch(&self, timeout: Option<Duration>) -> Result<Option<WatchEvent>, XsError> {
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        loop {
            // Events may be queued without the pipe being readable (see xs_check_watch).
            if let Some(ev) = self.check_watch()? {
                return Ok(Some(ev));
            }
            let left = deadline.map(|d| d.saturating_duration_since(std::time::Instant::now()));
            let ready =
                crate::poll::wait_readable(self.watch_fd, left).map_err(|errno| XsError::Call {
                    op: "poll(xs_fileno)",
                    errno,
                })?;
            if !ready {
                return Ok(None);
            }
        }
    }

    /// The fd that polls readable when a watch event is pending (libxenstore's watch pipe,
    /// owned by the handle: do not close or read it).
    pub fn fileno(&self) -> RawFd {
        self.watch_fd
    }
}

impl AsRawFd for XenStore {
    fn as_raw_fd(&self) -> RawFd {
        self.watch_fd
    }
}

impl AsFd for XenStore {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the watch pipe stays open until xs_close in Drop (needs `&mut self`).
        unsafe { BorrowedFd::borrow_raw(self.watch_fd) }
    }
}

impl Drop for XenStore {
    fn drop(&mut self) {
        // SAFETY: h came from xs_open and is closed exactly once; transactions borrow self,
        // so none is alive.
        unsafe { (self.lib.xs_close)(self.h()) };
    }
}

/// An open xenstore transaction; aborted on drop unless [`Transaction::commit`]ted.
pub struct Transaction<'a> {
    xs: &'a XenStore,
    id: u32,
    done: bool,
}

impl core::fmt::Debug for Transaction<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Transaction").field("id", &self.id).finish()
    }
}

impl Transaction<'_> {
    /// The transaction id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// [`XenStore::read`] inside the transaction.
    pub fn read(&self, path: &str) -> Result<Vec<u8>, XsError> {
        self.xs.read_tx(self.id, path)
    }

    /// [`XenStore::read_string`] inside the transaction.
    pub fn read_string(&self, path: &str) -> Result<String, XsError> {
        self.read(path)
            .map(|v| String::from_utf8_lossy(&v).into_owned())
    }

    /// [`XenStore::read_opt`] inside the transaction.
    pub fn read_opt(&self, path: &str) -> Result<Option<Vec<u8>>, XsError> {
        match self.read(path) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// [`XenStore::write`] inside the transaction.
    pub fn write(&self, path: &str, value: &[u8]) -> Result<(), XsError> {
        self.xs.write_tx(self.id, path, value)
    }

    /// [`XenStore::mkdir`] inside the transaction.
    pub fn mkdir(&self, path: &str) -> Result<(), XsError> {
        self.xs.mkdir_tx(self.id, path)
    }

    /// [`XenStore::rm`] inside the transaction.
    pub fn rm(&self, path: &str) -> Result<(), XsError> {
        self.xs.rm_tx(self.id, path)
    }

    /// [`XenStore::directory`] inside the transaction.
    pub fn directory(&self, path: &str) -> Result<Vec<String>, XsError> {
        self.xs.directory_tx(self.id, path)
    }

    /// [`XenStore::get_permissions`] inside the transaction.
    pub fn get_permissions(&self, path: &str) -> Result<Vec<Permission>, XsError> {
        self.xs.get_permissions_tx(self.id, path)
    }

    /// [`XenStore::set_permissions`] inside the transaction.
    pub fn set_permissions(&self, path: &str, perms: &[Permission]) -> Result<(), XsError> {
        self.xs.set_permissions_tx(self.id, path, perms)
    }

    fn end(&mut self, abort: bool) -> Result<(), XsError> {
        self.done = true;
        self.xs.transaction_end(self.id, abort)
    }

    /// Commits.  An error with [`XsError::is_again`] means another writer interfered: run
    /// the whole transaction again.
    pub fn commit(mut self) -> Result<(), XsError> {
        self.end(false)
    }

    /// Aborts, discarding every change.
    pub fn abort(mut self) -> Result<(), XsError> {
        self.end(true)
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        if !self.done {
            if let Err(e) = self.end(true) {
                log::debug!("aborting dropped xenstore transaction {}: {e}", self.id);
            }
        }
    }
}
