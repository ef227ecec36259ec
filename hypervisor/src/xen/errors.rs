//! Mapping `libxc-ffi`'s per-library errors into [`HypervisorError`], and the error of
//! opening a [`XenHost`](super::XenHost).
//!
//! Every function here is pure: it takes the failed operation ([`Method`]) and the object the
//! call was about (domain, port, grant reference, path) from the caller, and the FFI error,
//! and keeps the errno. Failures the FFI reports without an errno (a malformed answer, a bad
//! argument refused before the call) become `EINVAL`/`EIO` and their text is logged, since
//! [`HypervisorError`] carries no free text.

use libxc_ffi::{
    EvtchnError, ForeignMemoryError, GnttabError, LoadError, MemError, PageError, XcError, XsError,
};

use crate::{DomId, Errno, GrantRef, HypervisorError, Method, Port};

/// Converts an FFI errno. A failing call that left `errno` at 0 is reported as `EIO`, never as
/// "errno 0 (Success)".
pub(crate) fn errno(e: libxc_ffi::Errno) -> Errno {
    match e.raw() {
        0 => Errno::EIO,
        n => Errno(n.abs()),
    }
}

/// A libxenctrl error of an operation about domain `domid`.
pub(crate) fn xc_domain(op: Method, domid: DomId, err: XcError) -> HypervisorError {
    let errno = match err {
        XcError::Domain { errno: e, .. } | XcError::Call { errno: e, .. } => errno(e),
        XcError::Open { errno: e } => errno(e),
        XcError::NoSuchDomain { .. } => Errno::ESRCH,
        XcError::Invalid { ref reason, .. } => {
            log::warn!("{op} of domain {domid}: {reason}");
            Errno::EINVAL
        }
        XcError::Load(_) | XcError::WrongXenVersion { .. } => {
            log::warn!("{op} of domain {domid}: {err}");
            Errno::EIO
        }
    };
    HypervisorError::Domain { op, domid, errno }
}

/// A libxenctrl error of an operation not about one domain (listing domains).
pub(crate) fn xc_call(op: Method, err: XcError) -> HypervisorError {
    let errno = match err {
        XcError::Domain { errno: e, .. }
        | XcError::Call { errno: e, .. }
        | XcError::Open { errno: e } => errno(e),
        XcError::NoSuchDomain { .. } => Errno::ESRCH,
        XcError::Invalid { .. } | XcError::Load(_) | XcError::WrongXenVersion { .. } => {
            log::warn!("{op}: {err}");
            Errno::EINVAL
        }
    };
    HypervisorError::Call { op, errno }
}

/// Per-page failures of a foreign-memory batch (`(pfn, errno)` in request order).
pub(crate) fn page_failures(op: Method, domid: DomId, failed: &[PageError]) -> HypervisorError {
    HypervisorError::Pages {
        op,
        domid,
        failures: failed.iter().map(|p| (p.pfn, errno(p.errno))).collect(),
    }
}

/// A libxenforeignmemory error that stopped a whole batch (the map call itself failed).
pub(crate) fn foreign(op: Method, domid: DomId, err: ForeignMemoryError) -> HypervisorError {
    match err {
        ForeignMemoryError::Map { errno: e, .. }
        | ForeignMemoryError::Open { errno: e }
        | ForeignMemoryError::ResourceSize { errno: e, .. } => HypervisorError::Domain {
            op,
            domid,
            errno: errno(e),
        },
        ForeignMemoryError::Page { pfn, errno: e, .. } => HypervisorError::Pages {
            op,
            domid,
            failures: vec![(pfn, errno(e))],
        },
        ForeignMemoryError::Invalid { ref reason, .. } => {
            log::warn!("{op} of domain {domid}: {reason}");
            HypervisorError::Domain {
                op,
                domid,
                errno: Errno::EINVAL,
            }
        }
        ForeignMemoryError::Mem(ref e) => {
            log::warn!("{op} of domain {domid}: {e}");
            HypervisorError::Domain {
                op,
                domid,
                errno: Errno::EFAULT,
            }
        }
        ForeignMemoryError::Load(ref e) => {
            log::warn!("{op} of domain {domid}: {e}");
            HypervisorError::Domain {
                op,
                domid,
                errno: Errno::EIO,
            }
        }
    }
}

/// A libxenevtchn error of `op`. `port` is the local port for unbind/notify/unmask; for a
/// bind, the error names the remote domain.
pub(crate) fn evtchn(op: Method, port: Option<Port>, err: EvtchnError) -> HypervisorError {
    match err {
        EvtchnError::Domain {
            domid, errno: e, ..
        } => match DomId::try_from(domid) {
            Ok(domid) => HypervisorError::Domain {
                op,
                domid,
                errno: errno(e),
            },
            Err(_) => HypervisorError::Call {
                op,
                errno: errno(e),
            },
        },
        EvtchnError::Port { port, errno: e, .. } => HypervisorError::Port {
            op,
            port,
            errno: errno(e),
        },
        EvtchnError::Open { errno: e } | EvtchnError::Call { errno: e, .. } => match port {
            Some(port) => HypervisorError::Port {
                op,
                port,
                errno: errno(e),
            },
            None => HypervisorError::Call {
                op,
                errno: errno(e),
            },
        },
        EvtchnError::Load(ref e) => {
            log::warn!("{op}: {e}");
            HypervisorError::Call {
                op,
                errno: load_errno(e),
            }
        }
    }
}

/// A libxengnttab error of mapping `refs` of `domid`.
pub(crate) fn gnttab(
    op: Method,
    domid: DomId,
    refs: &[GrantRef],
    err: GnttabError,
) -> HypervisorError {
    let first = refs.first().copied().unwrap_or(0);
    let errno = match err {
        GnttabError::Map {
            first_ref,
            errno: e,
            ..
        } => {
            return HypervisorError::Grant {
                op,
                domid,
                gref: first_ref,
                errno: errno(e),
            }
        }
        GnttabError::Open { errno: e } | GnttabError::Call { errno: e, .. } => errno(e),
        GnttabError::Invalid { ref reason, .. } => {
            log::warn!("{op} of domain {domid}: {reason}");
            Errno::EINVAL
        }
        GnttabError::Load(ref e) => load_errno(e),
    };
    HypervisorError::Grant {
        op,
        domid,
        gref: first,
        errno,
    }
}

/// A refused access to a grant mapping of `domid` whose first reference is `gref`.
pub(crate) fn grant_access(domid: DomId, gref: GrantRef, err: MemError) -> HypervisorError {
    let op = Method::GrantAccess;
    match err {
        MemError::OutOfBounds { offset, len, size } => HypervisorError::OutOfBounds {
            op,
            offset,
            len,
            size,
        },
        MemError::Misaligned { offset, width } => HypervisorError::Misaligned {
            op,
            offset,
            len: width,
        },
        MemError::ReadOnly { .. } => HypervisorError::Grant {
            op,
            domid,
            gref,
            errno: Errno::EACCES,
        },
    }
}

/// A libxenstore error of `op` on `path` (empty for operations without one).
pub(crate) fn xs(op: Method, path: &str, err: XsError) -> HypervisorError {
    let errno = match err {
        XsError::Path { errno: e, .. }
        | XsError::Domain { errno: e, .. }
        | XsError::Call { errno: e, .. }
        | XsError::Open { errno: e } => errno(e),
        XsError::TransactionRetries { attempts } => {
            return HypervisorError::TransactionRetriesExhausted { attempts }
        }
        XsError::Invalid { ref reason, .. } => {
            log::debug!("xenstore {op} of {path:?}: {reason}");
            Errno::EINVAL
        }
        XsError::Load(ref e) => {
            log::warn!("xenstore {op}: {e}");
            load_errno(e)
        }
    };
    HypervisorError::XenStore {
        op,
        path: path.to_owned(),
        errno,
    }
}

/// The errno standing for a library that could not be loaded (`ELIBACC`: "can not access a
/// needed shared library").
fn load_errno(_: &LoadError) -> Errno {
    Errno(libc::ELIBACC)
}

/// What kind of failure stopped [`XenHost::open`](super::XenHost::open).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpenErrorKind {
    /// A Xen library is not installed (or not under the name asked for).
    LibraryNotFound,
    /// A library loaded but lacks a function (not Xen 4.17's).
    MissingSymbol,
    /// The library loaded but opening its interface failed (no `/dev/xen/privcmd`: not a
    /// Xen dom0, or not root).
    InterfaceOpenFailed,
    /// The running hypervisor is not Xen 4.17.
    WrongXenVersion,
}

/// Opening a [`XenHost`](super::XenHost) failed: which library, and why.
///
/// The message includes the library's own error (so it is deliberately not also reported as
/// [`source`](std::error::Error::source): `{:#}` chains would print it twice).
#[derive(Debug, thiserror::Error)]
pub enum XenOpenError {
    /// libxenctrl could not be loaded or opened.
    #[error("cannot open libxenctrl ({library}): {error}")]
    XenCtrl {
        /// The name or path loaded (`libxenctrl.so.4.17` unless overridden).
        library: String,
        /// Why.
        error: XcError,
    },
    /// libxenforeignmemory could not be loaded or opened.
    #[error("cannot open libxenforeignmemory ({library}): {error}")]
    ForeignMemory {
        /// The name or path loaded.
        library: String,
        /// Why.
        error: ForeignMemoryError,
    },
}

impl XenOpenError {
    /// The kind of failure, for callers that react to it (and tests).
    pub fn kind(&self) -> OpenErrorKind {
        let load = |e: &LoadError| match e {
            LoadError::NotFound { .. } => OpenErrorKind::LibraryNotFound,
            LoadError::MissingSymbol { .. } => OpenErrorKind::MissingSymbol,
        };
        match self {
            XenOpenError::XenCtrl { error, .. } => match error {
                XcError::Load(e) => load(e),
                XcError::WrongXenVersion { .. } => OpenErrorKind::WrongXenVersion,
                _ => OpenErrorKind::InterfaceOpenFailed,
            },
            XenOpenError::ForeignMemory { error, .. } => match error {
                ForeignMemoryError::Load(e) => load(e),
                _ => OpenErrorKind::InterfaceOpenFailed,
            },
        }
    }

    /// The library that failed, as it was asked for (soname or path).
    pub fn library(&self) -> &str {
        match self {
            XenOpenError::XenCtrl { library, .. } | XenOpenError::ForeignMemory { library, .. } => {
                library
            }
        }
    }
}
