//! Domain control: the `xc_domain_*` calls a checkpoint needs.

use crate::{DomId, Pfn, Result};

/// Why a domain shut down (`SHUTDOWN_*` of `xen/sched.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShutdownReason {
    /// `SHUTDOWN_poweroff` (0).
    Poweroff,
    /// `SHUTDOWN_reboot` (1).
    Reboot,
    /// `SHUTDOWN_suspend` (2): what Remus-style checkpoints wait for.
    Suspend,
    /// `SHUTDOWN_crash` (3).
    Crash,
    /// `SHUTDOWN_watchdog` (4).
    Watchdog,
    /// `SHUTDOWN_soft_reset` (5).
    SoftReset,
    /// Any other code.
    Other(u32),
}

impl ShutdownReason {
    /// From Xen's code (`XEN_DOMINF_shutdownshift` bits of the info flags).
    pub fn from_code(code: u32) -> ShutdownReason {
        match code {
            0 => ShutdownReason::Poweroff,
            1 => ShutdownReason::Reboot,
            2 => ShutdownReason::Suspend,
            3 => ShutdownReason::Crash,
            4 => ShutdownReason::Watchdog,
            5 => ShutdownReason::SoftReset,
            other => ShutdownReason::Other(other),
        }
    }

    /// Xen's code.
    pub fn code(self) -> u32 {
        match self {
            ShutdownReason::Poweroff => 0,
            ShutdownReason::Reboot => 1,
            ShutdownReason::Suspend => 2,
            ShutdownReason::Crash => 3,
            ShutdownReason::Watchdog => 4,
            ShutdownReason::SoftReset => 5,
            ShutdownReason::Other(code) => code,
        }
    }
}

/// The kind of guest.
///
/// Only [`Hvm`](GuestType::Hvm) and [`Pvh`](GuestType::Pvh) guests can be protected: Debian's
/// Xen has no shadow paging, so classic PV guests have no log-dirty (design notes §1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GuestType {
    /// Classic paravirtualised (dom0 is usually one).
    Pv,
    /// Fully virtualised, with emulated devices (`XEN_DOMINF_hvm_guest` and a device model).
    Hvm,
    /// HVM container without emulated devices.
    Pvh,
}

/// What `xc_domain_getinfolist` says about a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainInfo {
    /// The domain.
    pub domid: DomId,
    /// Paused by the toolstack (`XEN_DOMINF_paused`: the controller pause count is non-zero).
    pub paused: bool,
    /// A vCPU is running right now (`XEN_DOMINF_running`).
    pub running: bool,
    /// All vCPUs are blocked (`XEN_DOMINF_blocked`).
    pub blocked: bool,
    /// Being destroyed (`XEN_DOMINF_dying`).
    pub dying: bool,
    /// Shut down, and why (`XEN_DOMINF_shutdown` + reason).
    pub shutdown: Option<ShutdownReason>,
    /// Kind of guest.
    pub guest_type: GuestType,
    /// Highest vCPU id (`max_vcpu_id`; the domain has `max_vcpu_id + 1` vCPUs).
    pub max_vcpu_id: u32,
    /// Pages currently allocated to the domain (`tot_pages`).
    pub tot_pages: u64,
    /// Allocation limit in pages (`max_pages`).
    pub max_pages: u64,
}

/// Domain-level control (`xc_domain_*`, `xc_hvm_param_*`, `xc_vcpu_getcontext`).
///
/// Pausing is a reference count in Xen (`controller_pause_count`): every successful
/// [`pause`](Self::pause) needs one [`unpause`](Self::unpause); unpausing a domain the
/// toolstack did not pause fails with `EINVAL`. A domain that does not exist fails with `ESRCH`.
pub trait DomainControl: Send + Sync {
    /// All domains, by ascending id (`xc_domain_getinfolist`).
    fn list_domains(&self) -> Result<Vec<DomainInfo>>;

    /// One domain.
    fn domain_info(&self, domid: DomId) -> Result<DomainInfo>;

    /// Takes one toolstack pause reference; the domain's vCPUs stop before this returns.
    fn pause(&self, domid: DomId) -> Result<()>;

    /// Drops one toolstack pause reference; the domain runs again when the count reaches zero.
    fn unpause(&self, domid: DomId) -> Result<()>;

    /// Lets a domain that shut down for suspend run again (`xc_domain_resume`). With `fast`
    /// (Remus' checkpoints), the guest's suspend hypercall returns 1, "cancelled", and the
    /// guest goes on with all its Xen-side state; without it, the guest resumes as in a new
    /// domain. A domain not shut down for suspend fails with `EINVAL`.
    fn resume(&self, domid: DomId, fast: bool) -> Result<()>;

    /// The whole HVM context in Xen's save format (a sequence of records, see
    /// [`hvm_save`](crate::hvm_save)): opaque bytes to carry to the secondary.
    fn hvm_context(&self, domid: DomId) -> Result<Vec<u8>>;

    /// Loads a whole HVM context (as returned by [`hvm_context`](Self::hvm_context)).
    /// A malformed blob fails with `EINVAL`.
    fn set_hvm_context(&self, domid: DomId, context: &[u8]) -> Result<()>;

    /// The body (without its descriptor) of one record of the HVM context, as
    /// `xc_domain_hvm_getcontext_partial` returns it; `ENOENT` if there is none.
    fn hvm_context_partial(&self, domid: DomId, typecode: u16, instance: u16) -> Result<Vec<u8>>;

    /// One vCPU's context (`vcpu_guest_context_any_t` bytes, opaque).
    fn vcpu_context(&self, domid: DomId, vcpu: u32) -> Result<Vec<u8>>;

    /// An HVM parameter (`HVM_PARAM_*`).
    fn hvm_param(&self, domid: DomId, param: u32) -> Result<u64>;

    /// Sets an HVM parameter.
    fn set_hvm_param(&self, domid: DomId, param: u32, value: u64) -> Result<()>;

    /// The highest guest frame number the domain has ever had populated
    /// (`xc_domain_maximum_gpfn`): a dirty bitmap covers `maximum_gpfn + 1` pages.
    fn maximum_gpfn(&self, domid: DomId) -> Result<Pfn>;
}

/// A toolstack pause reference held on a domain: [`pause`](PauseGuard::pause) takes it, and
/// it is given back exactly once, by [`unpause`](PauseGuard::unpause) (which reports a
/// failure) or, on any early return, when the guard is dropped (which can only log one).
/// Checkpoint code that holds one cannot leave a guest paused on an error path.
#[must_use = "dropping the guard unpauses the domain at once"]
pub struct PauseGuard<'a, D: DomainControl + ?Sized> {
    control: &'a D,
    domid: DomId,
    held: bool,
}

impl<'a, D: DomainControl + ?Sized> PauseGuard<'a, D> {
    /// Pauses `domid` (one reference).
    pub fn pause(control: &'a D, domid: DomId) -> Result<PauseGuard<'a, D>> {
        control.pause(domid)?;
        Ok(PauseGuard {
            control,
            domid,
            held: true,
        })
    }

    /// The paused domain.
    pub fn domid(&self) -> DomId {
        self.domid
    }

    /// Gives the reference back, reporting a failure (the reference is considered gone either
    /// way: Xen's unpause has no partial effect to retry).
    pub fn unpause(mut self) -> Result<()> {
        self.held = false;
        self.control.unpause(self.domid)
    }
}

impl<D: DomainControl + ?Sized> Drop for PauseGuard<'_, D> {
    fn drop(&mut self) {
        if self.held {
            if let Err(err) = self.control.unpause(self.domid) {
                log::error!(
                    "cannot unpause domain {} after an early exit: {err}",
                    self.domid
                );
            }
        }
    }
}

impl<D: DomainControl + ?Sized> std::fmt::Debug for PauseGuard<'_, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PauseGuard")
            .field("domid", &self.domid)
            .field("held", &self.held)
            .finish()
    }
}
