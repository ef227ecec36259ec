//! Failover: detecting the loss of the peer ([`heartbeat`]), resuming the guest on the
//! secondary from the last ACKed checkpoint ([`resume`], [`disk`]), fencing a primary whose
//! `kemari replicate` died on a live host ([`fence`]), the guest's network after a failover
//! ([`net`]) and the lab's kill windows ([`failpoint`]). See `docs/failover.md`.

pub mod disk;
pub mod failpoint;
pub mod fence;
pub mod heartbeat;
pub mod net;
pub mod resume;

#[cfg(test)]
mod tests;
