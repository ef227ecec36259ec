//! Event channels: the backend ends of a guest's rings' doorbells.

use std::os::fd::BorrowedFd;
use std::time::Duration;

use crate::{DomId, Port, Result};

/// State of an event channel port (`EVTCHNSTAT_*` of `xc_evtchn_status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EvtchnState {
    /// Free (`EVTCHNSTAT_closed`).
    Closed,
    /// Allocated, waiting for `remote_domid` to bind (`EVTCHNSTAT_unbound`).
    Unbound {
        /// The domain allowed to bind it.
        remote_domid: DomId,
    },
    /// Connected to `remote_port` of `remote_domid` (`EVTCHNSTAT_interdomain`).
    Interdomain {
        /// The other end's domain.
        remote_domid: DomId,
        /// The other end's port.
        remote_port: Port,
    },
    /// Bound to a physical IRQ (`EVTCHNSTAT_pirq`).
    Pirq(u32),
    /// Bound to a virtual IRQ (`EVTCHNSTAT_virq`).
    Virq(u32),
    /// An inter-processor interrupt (`EVTCHNSTAT_ipi`).
    Ipi,
}

/// What `xc_evtchn_status` says about one port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EvtchnStatus {
    /// The vCPU notified.
    pub vcpu: u32,
    /// The binding.
    pub state: EvtchnState,
}

/// The toolstack's event channel calls (libxenctrl): allocate a port in some domain for another
/// domain to bind, and inspect a port.
pub trait EventChannelControl: Send + Sync {
    /// Allocates an unbound port in `domid` that `remote_domid` may bind
    /// (`xc_evtchn_alloc_unbound`).
    fn evtchn_alloc_unbound(&self, domid: DomId, remote_domid: DomId) -> Result<Port>;

    /// The state of `port` in `domid` (`xc_evtchn_status`).
    fn evtchn_status(&self, domid: DomId, port: Port) -> Result<EvtchnStatus>;
}

/// One event channel handle of this process (`xenevtchn_handle`): the ports bound through it,
/// and a file descriptor that is readable while one of them has a pending event.
///
/// Delivery follows Linux's evtchn device: when an event is delivered to
/// [`pending`](Self::pending) the port is masked; further notifications are latched and
/// delivered once after [`unmask`](Self::unmask). So the loop is: wait, take the port, handle
/// the ring, unmask, re-check the ring.
pub trait EventChannels: Send + Sync + std::fmt::Debug {
    /// Binds a local port to `remote_port` of `remote_domid`, which must be unbound and
    /// allocated for this domain (`xenevtchn_bind_interdomain`). Returns the local port.
    fn bind_interdomain(&self, remote_domid: DomId, remote_port: Port) -> Result<Port>;

    /// Unbinds a local port bound through this handle (`xenevtchn_unbind`).
    fn unbind(&self, port: Port) -> Result<()>;

    /// Signals the other end of a local port (`xenevtchn_notify`).
    fn notify(&self, port: Port) -> Result<()>;

    /// The next port with a pending event, without blocking (`xenevtchn_pending` on a readable
    /// fd); `None` if there is none.
    fn pending(&self) -> Result<Option<Port>>;

    /// Blocks until a port has a pending event or `timeout` passes (`None`: forever), then as
    /// [`pending`](Self::pending).
    fn wait(&self, timeout: Option<Duration>) -> Result<Option<Port>>;

    /// Re-enables delivery on a port after its event was taken (`xenevtchn_unmask`).
    fn unmask(&self, port: Port) -> Result<()>;

    /// A file descriptor that polls readable while [`pending`](Self::pending) would return a
    /// port (`xenevtchn_fd`), for a `poll` loop over several sources. Do not read it.
    fn as_fd(&self) -> BorrowedFd<'_>;
}
