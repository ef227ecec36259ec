//! Userspace PV backends for Kemari's protected guests.
//!
//! A protected guest's disks and NICs are served by this crate's backends instead of the dom0 kernel's
//! `xen-blkback`/`xen-netback`: owning the backend end of each ring's event channel is how the daemon
//! learns that the guest is about to make I/O visible (see `docs/design.md`, "The tap").
//!
//! * [`state`]: the xenbus state machine shared by every backend, including the project-defined
//!   `Attached` state used by failover;
//! * [`device`]: the frontend/backend xenstore directories of one device;
//! * [`driver`]: the device lifecycle both backends share (frontend watch, state transitions,
//!   the reaction to the frontend, poll dispatch, run/shutdown, the failure path) and the one
//!   rate-limited path for refused guest requests; each backend implements its
//!   `Backend` trait for what differs (connect, serve, disconnect, errors);
//! * [`ring`]: the backend end of a Xen shared ring over a grant mapping, with hostile-index checks;
//! * [`blkif`]: the block ring's wire format and request validation;
//! * [`disk`]: raw image / block device backing store;
//! * [`journal`]: the in-flight request journal that makes a takeover after a crash safe;
//! * [`blkback`]: the block backend ([`Vbd`]);
//! * [`commit`]: the event tap and output commit ([`commit::OutputGate`]) shared with the
//!   synchronization engine;
//! * [`netif`]: the network rings' wire format, TX chain validation, checksum completion;
//! * [`tap`]: the dom0 tap device a vif's frames go through;
//! * [`netback`]: the network backend ([`Vif`]).
//!
//! See `docs/backends.md` for the xenstore layout, how a guest gets these backends, and the
//! validation rules.

pub mod blkback;
pub mod blkif;
pub mod commit;
pub mod device;
pub mod disk;
pub mod driver;
pub mod journal;
pub mod netback;
pub mod netif;
pub mod ring;
pub mod state;
pub mod tap;

pub use blkback::{Vbd, VbdConfig, VbdError, VbdStats, VbdStatus};
pub use netback::{TxSink, Vif, VifConfig, VifError, VifStats, VifStatus};

pub use state::{react, BackendState, Reaction, StateError, XenbusState, KEMARI_STATE_NODE};
