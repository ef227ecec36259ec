//! The session layer (issue 12): the code that runs one protected guest, as opposed to the
//! engine it drives ([`crate::sync`], [`crate::failover`]) and to the CLI that parses its
//! arguments and prints what happened (`bin/kemari`).
//!
//! This is its start: the output commit of `kemari replicate --disk/--vif` and `kemari
//! receive --failover --vif`.
//!
//! * [`hook`]: the checkpoint hook of a protected guest, the composition of a held stop on
//!   request with the output commit of its disk's and NIC's gates; the order of the wrappers
//!   is what makes output commit correct (see the module).
//! * [`outputs`]: the guest's disk and NIC served in this process by Kemari's blkback and
//!   netback, each in its own thread and behind its own output gate, and the NIC served
//!   after a failover.
//!
//! `replicate()`, `receive()` and the failover sequence are still in `bin/kemari/sync_cmd.rs`.

pub mod hook;
pub mod outputs;
