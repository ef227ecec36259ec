//! Failover: detecting the loss of the peer ([`heartbeat`]). See `docs/failover.md`.

pub mod heartbeat;
