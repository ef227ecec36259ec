//! Failover: detecting the loss of the peer ([`heartbeat`]) and resuming the guest on the
//! secondary from the last ACKed checkpoint ([`resume`]). See `docs/failover.md`.

pub mod disk;
pub mod heartbeat;
pub mod resume;

#[cfg(test)]
mod tests;
