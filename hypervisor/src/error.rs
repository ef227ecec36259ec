//! The error type shared by every trait of this crate, the errno wrapper it carries and the
//! compile-checked names of the operations ([`Method`]).
//!
//! Xen's libraries report failures as `errno` values; every error here keeps the errno, the
//! operation that failed and the object it failed on (domain, port, grant reference, xenstore
//! path), so a real implementation over `libxc-ffi` can map `std::io::Error::raw_os_error()`
//! straight into [`HypervisorError`] and the daemon can log one line that says everything.

use std::fmt;

use crate::{DomId, GrantRef, Pfn, Port};

/// An `errno` value as returned by Xen's libraries (`-ret` of a hypercall, or `errno` after a
/// library call). Linux values; the common ones have named constants.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Errno(pub i32);

impl Errno {
    /// Operation not permitted.
    pub const EPERM: Errno = Errno(libc::EPERM);
    /// No such file or directory (xenstore: no such node; HVM context: no such record).
    pub const ENOENT: Errno = Errno(libc::ENOENT);
    /// No such process (Xen: no such domain).
    pub const ESRCH: Errno = Errno(libc::ESRCH);
    /// Input/output error.
    pub const EIO: Errno = Errno(libc::EIO);
    /// Argument list too long (xenstore: value or path too long).
    pub const E2BIG: Errno = Errno(libc::E2BIG);
    /// Try again (xenstore: transaction conflict).
    pub const EAGAIN: Errno = Errno(libc::EAGAIN);
    /// Out of memory.
    pub const ENOMEM: Errno = Errno(libc::ENOMEM);
    /// Permission denied (xenstore permissions, read-only grant mapped writable).
    pub const EACCES: Errno = Errno(libc::EACCES);
    /// Bad address.
    pub const EFAULT: Errno = Errno(libc::EFAULT);
    /// Device or resource busy.
    pub const EBUSY: Errno = Errno(libc::EBUSY);
    /// File exists.
    pub const EEXIST: Errno = Errno(libc::EEXIST);
    /// Invalid argument.
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    /// No space left on device (xenstore quota).
    pub const ENOSPC: Errno = Errno(libc::ENOSPC);
    /// Value too large (Xen: pause count overflow).
    pub const EOVERFLOW: Errno = Errno(libc::EOVERFLOW);
    /// No buffer space available (HVM context buffer too small).
    pub const ENOBUFS: Errno = Errno(libc::ENOBUFS);
    /// Connection timed out.
    pub const ETIMEDOUT: Errno = Errno(libc::ETIMEDOUT);
    /// Transport endpoint is already connected (xenstore: transaction already ended).
    pub const EISCONN: Errno = Errno(libc::EISCONN);
    /// Function not implemented.
    pub const ENOSYS: Errno = Errno(libc::ENOSYS);
    /// Operation not supported.
    pub const EOPNOTSUPP: Errno = Errno(libc::EOPNOTSUPP);

    /// The symbolic name of the common values (`"EIO"`), `None` for the others.
    pub fn name(self) -> Option<&'static str> {
        const NAMES: &[(Errno, &str)] = &[
            (Errno::EPERM, "EPERM"),
            (Errno::ENOENT, "ENOENT"),
            (Errno::ESRCH, "ESRCH"),
            (Errno::EIO, "EIO"),
            (Errno::E2BIG, "E2BIG"),
            (Errno::EAGAIN, "EAGAIN"),
            (Errno::ENOMEM, "ENOMEM"),
            (Errno::EACCES, "EACCES"),
            (Errno::EFAULT, "EFAULT"),
            (Errno::EBUSY, "EBUSY"),
            (Errno::EEXIST, "EEXIST"),
            (Errno::EINVAL, "EINVAL"),
            (Errno::ENOSPC, "ENOSPC"),
            (Errno::EOVERFLOW, "EOVERFLOW"),
            (Errno::ENOBUFS, "ENOBUFS"),
            (Errno::ETIMEDOUT, "ETIMEDOUT"),
            (Errno::EISCONN, "EISCONN"),
            (Errno::ENOSYS, "ENOSYS"),
            (Errno::EOPNOTSUPP, "EOPNOTSUPP"),
        ];
        NAMES.iter().find(|(e, _)| *e == self).map(|(_, n)| *n)
    }

    /// Converts an `std::io::Error` (as produced by `libxc-ffi`), `EIO` if it carries no errno.
    pub fn from_io(err: &std::io::Error) -> Errno {
        Errno(err.raw_os_error().unwrap_or(libc::EIO))
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = std::io::Error::from_raw_os_error(self.0);
        match self.name() {
            Some(name) => write!(f, "{name} ({}: {text})", self.0),
            None => write!(f, "errno {}: {text}", self.0),
        }
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name}"),
            None => write!(f, "Errno({})", self.0),
        }
    }
}

macro_rules! methods {
    ($( $(#[$doc:meta])* $variant:ident => $name:literal, )*) => {
        /// Every operation of the traits of this crate, by a stable name.
        ///
        /// Errors carry the `Method` that failed, and the in-memory implementation's
        /// [`FaultPlan`](crate::mem::FaultPlan) is keyed by it: each trait method of
        /// [`mem`](crate::mem) consults the plan with its own `Method` before doing anything
        /// (so an injected failure has no side effect), which makes "fail the 3rd pause" a
        /// compile-checked `faults.fail_on(Method::Pause, 3, Errno::EIO)`.
        /// [`Method::name`] is the stable string form (`"pause"`, `"logdirty_clean"`, ...),
        /// accepted back by `str::parse`, for command lines and logs.
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
        pub enum Method {
            $( $(#[$doc])* $variant, )*
        }

        impl Method {
            /// All methods, in declaration order.
            pub const ALL: &'static [Method] = &[ $( Method::$variant, )* ];

            /// The stable name (`"pause"`).
            pub fn name(self) -> &'static str {
                match self {
                    $( Method::$variant => $name, )*
                }
            }
        }
    };
}

methods! {
    /// [`DomainControl::list_domains`](crate::DomainControl::list_domains) (`xc_domain_getinfolist`).
    ListDomains => "list_domains",
    /// [`DomainControl::domain_info`](crate::DomainControl::domain_info).
    DomainInfo => "domain_info",
    /// [`DomainControl::pause`](crate::DomainControl::pause) (`xc_domain_pause`).
    Pause => "pause",
    /// [`DomainControl::unpause`](crate::DomainControl::unpause) (`xc_domain_unpause`).
    Unpause => "unpause",
    /// [`DomainControl::resume`](crate::DomainControl::resume) (`xc_domain_resume`).
    Resume => "resume",
    /// [`DomainControl::hvm_context`](crate::DomainControl::hvm_context) (`xc_domain_hvm_getcontext`).
    HvmContext => "hvm_context",
    /// [`DomainControl::set_hvm_context`](crate::DomainControl::set_hvm_context) (`xc_domain_hvm_setcontext`).
    SetHvmContext => "set_hvm_context",
    /// [`DomainControl::hvm_context_partial`](crate::DomainControl::hvm_context_partial).
    HvmContextPartial => "hvm_context_partial",
    /// [`DomainControl::vcpu_context`](crate::DomainControl::vcpu_context) (`xc_vcpu_getcontext`).
    VcpuContext => "vcpu_context",
    /// [`DomainControl::hvm_param`](crate::DomainControl::hvm_param) (`xc_hvm_param_get`).
    HvmParam => "hvm_param",
    /// [`DomainControl::set_hvm_param`](crate::DomainControl::set_hvm_param) (`xc_hvm_param_set`).
    SetHvmParam => "set_hvm_param",
    /// [`DomainControl::maximum_gpfn`](crate::DomainControl::maximum_gpfn) (`xc_domain_maximum_gpfn`).
    MaximumGpfn => "maximum_gpfn",
    /// [`XenHost::shared_info_frame`](crate::xen::XenHost::shared_info_frame) (`xc_domain_getinfo`'s `shared_info_frame`).
    SharedInfoFrame => "shared_info_frame",
    /// [`XenHost::add_to_physmap`](crate::xen::XenHost::add_to_physmap) (`xc_domain_add_to_physmap`).
    AddToPhysmap => "add_to_physmap",
    /// [`GuestMemory::read_pages`](crate::GuestMemory::read_pages) (`xenforeignmemory_map` + copy).
    ReadPages => "read_pages",
    /// [`GuestMemory::write_pages`](crate::GuestMemory::write_pages).
    WritePages => "write_pages",
    /// [`LogDirty::log_dirty_enable`](crate::LogDirty::log_dirty_enable) (`XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY`).
    LogDirtyEnable => "logdirty_enable",
    /// [`LogDirty::log_dirty_clean`](crate::LogDirty::log_dirty_clean) (`XEN_DOMCTL_SHADOW_OP_CLEAN`).
    LogDirtyClean => "logdirty_clean",
    /// [`LogDirty::log_dirty_peek`](crate::LogDirty::log_dirty_peek) (`XEN_DOMCTL_SHADOW_OP_PEEK`).
    LogDirtyPeek => "logdirty_peek",
    /// [`LogDirty::log_dirty_disable`](crate::LogDirty::log_dirty_disable) (`XEN_DOMCTL_SHADOW_OP_OFF`).
    LogDirtyDisable => "logdirty_disable",
    /// [`Hypervisor::open_event_channels`](crate::Hypervisor::open_event_channels) (`xenevtchn_open`).
    EvtchnOpen => "evtchn_open",
    /// [`EventChannels::bind_interdomain`](crate::EventChannels::bind_interdomain).
    EvtchnBindInterdomain => "evtchn_bind_interdomain",
    /// [`EventChannels::unbind`](crate::EventChannels::unbind).
    EvtchnUnbind => "evtchn_unbind",
    /// [`EventChannels::notify`](crate::EventChannels::notify).
    EvtchnNotify => "evtchn_notify",
    /// [`EventChannels::pending`](crate::EventChannels::pending) and
    /// [`EventChannels::wait`](crate::EventChannels::wait).
    EvtchnPending => "evtchn_pending",
    /// [`EventChannels::unmask`](crate::EventChannels::unmask).
    EvtchnUnmask => "evtchn_unmask",
    /// [`EventChannelControl::evtchn_alloc_unbound`](crate::EventChannelControl::evtchn_alloc_unbound).
    EvtchnAllocUnbound => "evtchn_alloc_unbound",
    /// [`EventChannelControl::evtchn_status`](crate::EventChannelControl::evtchn_status).
    EvtchnStatus => "evtchn_status",
    /// [`GrantTables::map_grant_refs`](crate::GrantTables::map_grant_refs) (`xengnttab_map_domain_grant_refs`).
    GnttabMap => "gnttab_map",
    /// Accesses through a [`GrantMapping`](crate::GrantMapping) (bounds and permission errors
    /// only; never fault-injected: the real ones are plain memory accesses).
    GrantAccess => "grant_access",
    /// [`Hypervisor::open_xenstore`](crate::Hypervisor::open_xenstore) (`xs_open`).
    XsOpen => "xs_open",
    /// [`XenStore::read`](crate::XenStore::read).
    XsRead => "xs_read",
    /// [`XenStore::write`](crate::XenStore::write).
    XsWrite => "xs_write",
    /// [`XenStore::mkdir`](crate::XenStore::mkdir).
    XsMkdir => "xs_mkdir",
    /// [`XenStore::rm`](crate::XenStore::rm).
    XsRm => "xs_rm",
    /// [`XenStore::directory`](crate::XenStore::directory).
    XsDirectory => "xs_directory",
    /// [`XenStore::get_permissions`](crate::XenStore::get_permissions).
    XsGetPermissions => "xs_get_permissions",
    /// [`XenStore::set_permissions`](crate::XenStore::set_permissions).
    XsSetPermissions => "xs_set_permissions",
    /// [`XenStore::transaction_start`](crate::XenStore::transaction_start).
    XsTransactionStart => "xs_transaction_start",
    /// [`XenStore::transaction_end`](crate::XenStore::transaction_end) (commit or abort).
    XsTransactionEnd => "xs_transaction_end",
    /// [`XenStore::watch`](crate::XenStore::watch).
    XsWatch => "xs_watch",
    /// [`XenStore::unwatch`](crate::XenStore::unwatch).
    XsUnwatch => "xs_unwatch",
    /// [`XenStore::read_watch`](crate::XenStore::read_watch).
    XsReadWatch => "xs_read_watch",
    /// [`XenStore::get_domain_path`](crate::XenStore::get_domain_path).
    XsGetDomainPath => "xs_get_domain_path",
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A string that names no [`Method`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown hypervisor method name {0:?}")]
pub struct UnknownMethod(pub String);

impl std::str::FromStr for Method {
    type Err = UnknownMethod;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Method::ALL
            .iter()
            .copied()
            .find(|m| m.name() == s)
            .ok_or_else(|| UnknownMethod(s.to_owned()))
    }
}

/// Formats per-page failures as `pfn 0x10: EIO, pfn 0x11: ENOENT` (at most 8, then a count).
struct PageFailures<'a>(&'a [(Pfn, Errno)]);

impl fmt::Display for PageFailures<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (pfn, errno)) in self.0.iter().take(8).enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "pfn {pfn:#x}: {errno:?}")?;
        }
        if self.0.len() > 8 {
            write!(f, ", and {} more", self.0.len() - 8)?;
        }
        Ok(())
    }
}

/// Everything that can go wrong in a call through the traits of this crate.
///
/// Variants say which object the call was about; all carry the failing [`Method`] and, except
/// for caller mistakes caught before calling Xen ([`BufferSize`](Self::BufferSize),
/// [`OutOfBounds`](Self::OutOfBounds), [`Misaligned`](Self::Misaligned)), the errno.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HypervisorError {
    /// A call about one domain failed (`ESRCH`: no such domain).
    #[error("{op} failed for domain {domid}: {errno}")]
    Domain {
        /// The operation.
        op: Method,
        /// The domain it was about.
        domid: DomId,
        /// Why.
        errno: Errno,
    },
    /// A call that is not about one domain failed (opening a handle, listing domains).
    #[error("{op} failed: {errno}")]
    Call {
        /// The operation.
        op: Method,
        /// Why.
        errno: Errno,
    },
    /// Some pages of a batch could not be copied; the others were (see
    /// [`GuestMemory::read_pages`](crate::GuestMemory::read_pages)).
    #[error("{op} on domain {domid}: {} of the pages failed ({})", failures.len(), PageFailures(failures))]
    Pages {
        /// The operation.
        op: Method,
        /// The domain.
        domid: DomId,
        /// The pages that failed and why, in request order.
        failures: Vec<(Pfn, Errno)>,
    },
    /// Mapping a grant reference failed.
    #[error("{op} of grant ref {gref} of domain {domid} failed: {errno}")]
    Grant {
        /// The operation.
        op: Method,
        /// The granting domain.
        domid: DomId,
        /// The first reference that failed.
        gref: GrantRef,
        /// Why (`EINVAL` for a reference the domain did not grant, like Linux's gntdev).
        errno: Errno,
    },
    /// An event channel operation on a local port failed.
    #[error("{op} on event channel port {port} failed: {errno}")]
    Port {
        /// The operation.
        op: Method,
        /// The local port.
        port: Port,
        /// Why.
        errno: Errno,
    },
    /// A xenstore operation failed (`ENOENT`, `EACCES`, `EEXIST`, `EINVAL`, `EAGAIN` on commit).
    #[error("xenstore {op} of {path:?} failed: {errno}")]
    XenStore {
        /// The operation.
        op: Method,
        /// The path (empty for operations without one, like `transaction_end`).
        path: String,
        /// Why.
        errno: Errno,
    },
    /// [`with_transaction`](crate::with_transaction) gave up: every attempt conflicted.
    #[error("xenstore transaction still conflicting after {attempts} attempts")]
    TransactionRetriesExhausted {
        /// How many commits were tried.
        attempts: u32,
    },
    /// A caller buffer has the wrong size (nothing was done).
    #[error("{op}: buffer of {actual} bytes, expected {expected}")]
    BufferSize {
        /// The operation.
        op: Method,
        /// The size the call needs.
        expected: usize,
        /// The size given.
        actual: usize,
    },
    /// An access outside a mapping (nothing was done).
    #[error("{op}: {len} bytes at offset {offset} are outside the {size}-byte mapping")]
    OutOfBounds {
        /// The operation.
        op: Method,
        /// Offset of the access.
        offset: usize,
        /// Length of the access.
        len: usize,
        /// Size of the mapping.
        size: usize,
    },
    /// A volatile access at an offset that is not a multiple of its size (nothing was done).
    #[error("{op}: {len}-byte access at offset {offset} is not aligned")]
    Misaligned {
        /// The operation.
        op: Method,
        /// Offset of the access.
        offset: usize,
        /// Size of the access.
        len: usize,
    },
}

impl HypervisorError {
    /// The operation that failed.
    pub fn op(&self) -> Method {
        match self {
            HypervisorError::Domain { op, .. }
            | HypervisorError::Call { op, .. }
            | HypervisorError::Pages { op, .. }
            | HypervisorError::Grant { op, .. }
            | HypervisorError::Port { op, .. }
            | HypervisorError::XenStore { op, .. }
            | HypervisorError::BufferSize { op, .. }
            | HypervisorError::OutOfBounds { op, .. }
            | HypervisorError::Misaligned { op, .. } => *op,
            HypervisorError::TransactionRetriesExhausted { .. } => Method::XsTransactionEnd,
        }
    }

    /// The errno, if the failure came with one (for [`Pages`](Self::Pages): the first page's).
    pub fn errno(&self) -> Option<Errno> {
        match self {
            HypervisorError::Domain { errno, .. }
            | HypervisorError::Call { errno, .. }
            | HypervisorError::Grant { errno, .. }
            | HypervisorError::Port { errno, .. }
            | HypervisorError::XenStore { errno, .. } => Some(*errno),
            HypervisorError::Pages { failures, .. } => failures.first().map(|(_, e)| *e),
            HypervisorError::TransactionRetriesExhausted { .. } => Some(Errno::EAGAIN),
            HypervisorError::BufferSize { .. }
            | HypervisorError::OutOfBounds { .. }
            | HypervisorError::Misaligned { .. } => None,
        }
    }

    /// True for a xenstore transaction commit that lost a race (`EAGAIN` from
    /// `transaction_end`): the whole transaction should be retried.
    pub fn is_transaction_conflict(&self) -> bool {
        matches!(
            self,
            HypervisorError::XenStore { op: Method::XsTransactionEnd, errno, .. } if *errno == Errno::EAGAIN
        )
    }
}

/// Result alias of this crate.
pub type Result<T, E = HypervisorError> = std::result::Result<T, E>;
