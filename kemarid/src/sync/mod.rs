//! The synchronization engine: the primary's [`sender`] and the secondary's [`receiver`].
//!
//! See `docs/sync.md` for the protocol. In short: the sender connects to the receiver over
//! TCP and writes an `xl save`-compatible initial image (live pre-copy rounds, then one paused
//! round) followed by one checkpoint frame per synchronization trigger ([`trigger`]); the
//! receiver builds a paused replica from the image ([`replica`]), applies every checkpoint to
//! it whole or not at all ([`apply`]) and answers each (the image counts as sequence 0) with an
//! ACK of its sequence number.
//!
//! Everything here talks to Xen only through the [`hypervisor`] traits.

pub mod apply;
pub mod commit;
pub mod device_qmp;
pub mod disk_apply;
pub mod hash;
pub mod image;
pub mod receiver;
pub mod replica;
pub mod replica_xl;
pub mod sender;
pub mod stats;
pub mod trigger;

#[cfg(test)]
mod tests;
