//! Userspace PV backends for Kemari's protected guests.
//!
//! A protected guest's disks and NICs are served by this crate's backends instead of the dom0 kernel's
//! `xen-blkback`/`xen-netback`: owning the backend end of each ring's event channel is how the daemon
//! learns that the guest is about to make I/O visible (see `docs/design.md`, "The tap").
//!
//! This crate currently holds the xenbus state machine shared by every backend, including the
//! project-defined `Attached` state used by failover. The block and network backends build on it.

pub mod state;

pub use state::{react, BackendState, Reaction, StateError, XenbusState, KEMARI_STATE_NODE};
