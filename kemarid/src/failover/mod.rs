//! Failover: detecting the loss of the peer ([`heartbeat`]), resuming the guest on the
//! secondary from the last ACKed checkpoint ([`resume`], [`disk`]), fencing a primary whose
//! `kemari replicate` died on a live host ([`fence`]), the guest's network after a failover
//! ([`net`]) and the lab's kill windows (`failpoint`, with the `failpoints` feature only). See `docs/failover.md`.

use hypervisor::{DomId, Hypervisor, HypervisorError};

pub mod disk;
#[cfg(feature = "failpoints")]
pub mod failpoint;
pub mod fence;
pub mod heartbeat;
pub mod net;
pub mod pvstate;
pub mod resume;
pub mod transparent;

#[cfg(test)]
mod tests;

/// The check [`disk`] and [`net`] make before they create a device for the restored guest
/// `domid`: it must still be paused (a guest that already runs would have resumed without the
/// device). A failed `domain_info` becomes `xen("domain info", error)`, a running guest
/// `not_paused`: each module's own error.
pub(crate) fn require_paused<E>(
    hv: &dyn Hypervisor,
    domid: DomId,
    xen: impl FnOnce(&'static str, HypervisorError) -> E,
    not_paused: E,
) -> Result<(), E> {
    let info = hv.domain_info(domid).map_err(|e| xen("domain info", e))?;
    if info.paused {
        Ok(())
    } else {
        Err(not_paused)
    }
}
