//! The seam between the Kemari daemon and Xen.
//!
//! Everything `kemarid` needs from Xen is a trait of this crate, in the style of Cloud
//! Hypervisor's `hypervisor` crate: the daemon is written against the traits, and two
//! implementations stand behind them:
//!
//! * [`mem`]: an in-memory model of one Xen host (domains with guest pages, log-dirty, pause
//!   refcounts, HVM contexts, event channels, grant tables, xenstore with watches and
//!   transactions) plus a [`FaultPlan`](mem::FaultPlan) that can fail any call at any step.
//!   **For unit tests and fault injection only**: it runs no guest and talks to no hypervisor.
//! * [`xen`]: the real one, over the `libxc-ffi` crate ([`xen::XenHost::open`] in a Xen 4.17
//!   dom0). The traits map 1:1 onto the libraries it wraps, so that implementation is thin:
//!
//! | trait | Xen library calls |
//! |---|---|
//! | [`DomainControl`] | `xc_domain_getinfolist`, `xc_domain_pause/unpause`, `xc_domain_hvm_getcontext(_partial)/setcontext`, `xc_vcpu_getcontext`, `xc_hvm_param_get/set`, `xc_domain_maximum_gpfn` |
//! | [`GuestMemory`] | `xenforeignmemory_map` (+ copy, + unmap) |
//! | [`LogDirty`] | `xc_logdirty_control` (`ENABLE_LOGDIRTY`, `CLEAN`, `PEEK`, `OFF`) |
//! | [`EventChannelControl`] | `xc_evtchn_alloc_unbound`, `xc_evtchn_status` |
//! | [`EventChannels`] | `xenevtchn_open`, `bind_interdomain`, `unbind`, `notify`, `pending`, `unmask`, `fd` |
//! | [`GrantTables`], [`GrantMapping`] | `xengnttab_map_domain_grant_refs`, `xengnttab_unmap` |
//! | [`XenStore`] | `xs_open`, `xs_read/write/mkdir/rm/directory`, `xs_get/set_permissions`, `xs_transaction_start/end`, `xs_watch/unwatch/read_watch`, `xs_fileno`, `xs_get_domain_path` |
//!
//! [`Hypervisor`] bundles them for code that wants "one Xen host" as a single `&dyn`.
//! [`PauseGuard`] holds a pause reference so that no error path leaves a guest paused.
//!
//! Notes for the real implementation (semantics the in-memory one already follows):
//! * [`EventChannels::pending`] never blocks (`xenevtchn` `wait_pending(Some(0))`);
//!   [`EventChannels::wait`] polls the fd, then reads the port.
//! * [`LogDirty::log_dirty_clean`]/`peek` fill a caller-sized [`DirtyBitmap`]: clean/peek
//!   into a hypercall buffer of `bitmap.nr_pages()` pages, copy it into
//!   [`DirtyBitmap::words_mut`], then [`DirtyBitmap::trim`]. Enabling answers Xen's
//!   `EINVAL` for a mode QEMU turned on (VRAM tracking) with `OFF` + `ENABLE`, as libxc's
//!   save code does.
//! * [`GuestMemory::read_pages`] maps the batch read-only with `xenforeignmemory_map` and its
//!   per-page error array; pages that failed become [`HypervisorError::Pages`] entries, the
//!   others are copied.
//! * [`XenStore::read_watch`] with `Some(ZERO)` is `check_watch`, otherwise `wait_watch`
//!   (poll the watch pipe, up to the timeout or forever, then `check_watch`); never the
//!   blocking `xs_read_watch`, which cannot time out; [`XenStore::transaction_end`] maps
//!   a conflicting commit to `EAGAIN` so [`with_transaction`] retries it.
//! * Errors: `std::io::Error`s become [`Errno`] via [`Errno::from_io`], wrapped in the
//!   [`HypervisorError`] variant that names the object (domain, port, grant, path).
//!
//! Rules every implementation keeps:
//! * guest memory is never handed out as a Rust slice: the guest changes it under us, so it is
//!   copied in and out ([`GuestMemory`]) or accessed with volatile, bounds-checked accessors
//!   ([`GrantMapping`]);
//! * failures are [`HypervisorError`]s carrying the [`Method`], the object (domain, port,
//!   grant reference, path) and the errno.

#![warn(missing_docs)]

mod domain;
mod error;
mod evtchn;
mod gnttab;
pub mod hvm_save;
mod logdirty;

pub mod mem;
mod memory;
pub mod xen;
mod xenstore;

pub use domain::{DomainControl, DomainInfo, GuestType, PauseGuard, ShutdownReason};
pub use error::{Errno, HypervisorError, Method, Result, UnknownMethod};
pub use evtchn::{EventChannelControl, EventChannels, EvtchnState, EvtchnStatus};
pub use gnttab::{GrantMapping, GrantTables};
pub use logdirty::{DirtyBitmap, DirtyPfns, LogDirty, LogDirtyStats};
pub use memory::GuestMemory;
pub use xenstore::{
    with_transaction, Tx, WatchEvent, XenStore, XsPerm, XsPermKind, XS_MAX_PATH, XS_MAX_VALUE,
};

/// A Xen domain id (`domid_t`).
pub type DomId = u16;
/// A guest page frame number (guest physical address >> 12).
pub type Pfn = u64;
/// An event channel port (`evtchn_port_t`).
pub type Port = u32;
/// A grant reference (`grant_ref_t`).
pub type GrantRef = u32;

/// Size of a guest page (x86: 4 KiB).
pub const PAGE_SIZE: usize = 4096;
/// `log2(PAGE_SIZE)`.
pub const PAGE_SHIFT: u32 = 12;
/// `DOMID_SELF`: "the calling domain" in Xen calls.
pub const DOMID_SELF: DomId = 0x7FF0;

/// One Xen host: everything the daemon needs, as one object.
///
/// `open_*` return per-connection handles, like `xenevtchn_open` and `xs_open` do: each has its
/// own bound ports / watches and its own pollable file descriptor.
pub trait Hypervisor:
    DomainControl + GuestMemory + LogDirty + EventChannelControl + GrantTables
{
    /// Opens an event channel handle (`xenevtchn_open`).
    fn open_event_channels(&self) -> Result<Box<dyn EventChannels>>;

    /// Opens a xenstore connection (`xs_open`).
    fn open_xenstore(&self) -> Result<Box<dyn XenStore>>;
}
