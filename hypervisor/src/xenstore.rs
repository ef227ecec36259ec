//! Xenstore: the backend/frontend handshake tree, with permissions, transactions and watches.

use std::fmt;
use std::os::fd::BorrowedFd;
use std::time::Duration;

use crate::{DomId, HypervisorError, Result};

/// Longest absolute path xenstored accepts (`XENSTORE_ABS_PATH_MAX`).
pub const XS_MAX_PATH: usize = 3072;
/// Largest value xenstored accepts by default (`XENSTORE_PAYLOAD_MAX`).
pub const XS_MAX_VALUE: usize = 4096;

/// A xenstore transaction id (`xs_transaction_t`); [`Tx::NONE`] (`XBT_NULL`) for operations
/// outside any transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tx(pub u32);

impl Tx {
    /// No transaction (`XBT_NULL`).
    pub const NONE: Tx = Tx(0);
}

impl fmt::Display for Tx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tx{}", self.0)
    }
}

/// An access right in a node's permission list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum XsPermKind {
    /// `n`: no access.
    None,
    /// `r`: read.
    Read,
    /// `w`: write.
    Write,
    /// `b`: read and write.
    Both,
}

impl XsPermKind {
    /// Allows reading.
    pub fn can_read(self) -> bool {
        matches!(self, XsPermKind::Read | XsPermKind::Both)
    }

    /// Allows writing.
    pub fn can_write(self) -> bool {
        matches!(self, XsPermKind::Write | XsPermKind::Both)
    }

    /// The letter of xenstored's text form.
    pub fn letter(self) -> char {
        match self {
            XsPermKind::None => 'n',
            XsPermKind::Read => 'r',
            XsPermKind::Write => 'w',
            XsPermKind::Both => 'b',
        }
    }
}

/// One entry of a node's permission list (`struct xs_permissions`).
///
/// The first entry names the owner (who has every right) and the rights of every domain not
/// listed; later entries give specific domains their rights. Dom0 bypasses permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct XsPerm {
    /// The domain.
    pub domid: DomId,
    /// Its rights.
    pub kind: XsPermKind,
}

impl XsPerm {
    /// `domid` with `kind`.
    pub fn new(domid: DomId, kind: XsPermKind) -> XsPerm {
        XsPerm { domid, kind }
    }
}

impl fmt::Display for XsPerm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.kind.letter(), self.domid)
    }
}

/// A fired watch: `path` changed (or is the watched path itself, for the event every watch
/// fires once when registered), `token` is the one given to [`XenStore::watch`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WatchEvent {
    /// The path that changed (the watched path or a descendant).
    pub path: String,
    /// The watch's token.
    pub token: String,
}

/// A connection to xenstored (`struct xs_handle`).
///
/// Paths are absolute (`/local/domain/5/device/vbd/768/state`). Values are bytes. Every call
/// takes the transaction to run in ([`Tx::NONE`] for none). Inside a transaction, reads see the
/// transaction's own writes, other connections see nothing until commit, and the commit fails
/// with `EAGAIN` ([`HypervisorError::is_transaction_conflict`]) if a node the transaction
/// touched changed meanwhile: redo the whole transaction, e.g. with [`with_transaction`].
///
/// Watches follow xenstored: a watch on `P` fires for changes of `P` and of any node below it,
/// once right at registration (with `path = P`), and for the nodes a removal deletes. Events
/// queue per connection; [`as_fd`](Self::as_fd) polls readable while some are queued.
pub trait XenStore: Send + Sync + std::fmt::Debug {
    /// A node's value (`ENOENT` if absent).
    fn read(&self, tx: Tx, path: &str) -> Result<Vec<u8>>;

    /// Sets a node's value, creating it and missing parents.
    fn write(&self, tx: Tx, path: &str, value: &[u8]) -> Result<()>;

    /// Creates a node with an empty value (and missing parents); a no-op if it exists.
    fn mkdir(&self, tx: Tx, path: &str) -> Result<()>;

    /// Removes a node and everything below it; a no-op if the node is absent but its parent
    /// exists (`ENOENT` otherwise).
    fn rm(&self, tx: Tx, path: &str) -> Result<()>;

    /// The names (not paths) of a node's children, sorted.
    fn directory(&self, tx: Tx, path: &str) -> Result<Vec<String>>;

    /// A node's permission list.
    fn get_permissions(&self, tx: Tx, path: &str) -> Result<Vec<XsPerm>>;

    /// Replaces a node's permission list (`EINVAL` if empty).
    fn set_permissions(&self, tx: Tx, path: &str, perms: &[XsPerm]) -> Result<()>;

    /// Starts a transaction.
    fn transaction_start(&self) -> Result<Tx>;

    /// Commits (`abort == false`) or abandons a transaction. A commit that conflicts fails with
    /// `EAGAIN` and changes nothing.
    fn transaction_end(&self, tx: Tx, abort: bool) -> Result<()>;

    /// Registers a watch on `path` (and below) with `token`; fires once immediately.
    fn watch(&self, path: &str, token: &str) -> Result<()>;

    /// Removes the watch registered with exactly `path` and `token` (`ENOENT` if none).
    fn unwatch(&self, path: &str, token: &str) -> Result<()>;

    /// The next watch event: waits up to `timeout` (`None`: forever, `Some(ZERO)`: poll) and
    /// returns `None` if none came.
    fn read_watch(&self, timeout: Option<Duration>) -> Result<Option<WatchEvent>>;

    /// A file descriptor that polls readable while watch events are queued (`xs_fileno`).
    /// Do not read it.
    fn as_fd(&self) -> BorrowedFd<'_>;

    /// The home path of a domain (`/local/domain/<domid>`).
    fn get_domain_path(&self, domid: DomId) -> Result<String>;
}

/// Runs `body` in a transaction and commits it, redoing both (with a fresh transaction) when
/// the commit conflicts, at most `max_attempts` times.
///
/// If `body` fails, the transaction is aborted and its error returned (no retry). If every
/// commit conflicts, returns [`HypervisorError::TransactionRetriesExhausted`].
pub fn with_transaction<S, T, F>(xs: &S, max_attempts: u32, mut body: F) -> Result<T>
where
    S: XenStore + ?Sized,
    F: FnMut(Tx) -> Result<T>,
{
    for attempt in 1..=max_attempts {
        let tx = xs.transaction_start()?;
        let value = match body(tx) {
            Ok(value) => value,
            Err(err) => {
                if let Err(abort_err) = xs.transaction_end(tx, true) {
                    log::debug!("aborting xenstore {tx} after a failed body: {abort_err}");
                }
                return Err(err);
            }
        };
        match xs.transaction_end(tx, false) {
            Ok(()) => return Ok(value),
            Err(err) if err.is_transaction_conflict() => {
                log::debug!("xenstore {tx} conflicted (attempt {attempt}/{max_attempts})");
            }
            Err(err) => return Err(err),
        }
    }
    Err(HypervisorError::TransactionRetriesExhausted {
        attempts: max_attempts,
    })
}
