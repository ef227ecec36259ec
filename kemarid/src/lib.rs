//! Kemari for Xen: the daemon's library.
//!
//! Everything here talks to Xen only through the [`hypervisor`] traits, so it is unit-tested
//! against the in-memory implementation and proven against real Xen in the lab
//! (`scripts/lab test ffi`).

pub mod api;
pub mod attach;
pub mod counting;
pub mod ctl;
pub mod daemon;
pub mod debug;
pub mod debug_image;
pub mod domconfig;
pub mod failover;
pub mod host;
pub mod launch;
pub mod manpage;
pub mod qmp;
pub mod session;
pub mod streaminfo;
pub mod sync;
pub mod xlsave;
pub mod xltool;
