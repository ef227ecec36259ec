//! libxc-ffi: the only place in the workspace that talks C to Xen's libraries.
//!
//! Safe, RAII wrappers over the Xen 4.17 dom0 libraries, loaded at run time (`dlopen` of the
//! exact sonames, see [`LibraryPaths`]), so the workspace builds and its tests run on machines
//! without Xen.  See `docs/ffi.md` for the decisions and the safety rules.
//!
//! | Library | Handle | Thread safety |
//! |---|---|---|
//! | libxenctrl.so.4.17 | [`XenCtrl`] (version-gated to Xen 4.17) | `Send + Sync` |
//! | libxenevtchn.so.1 | [`XenEvtchn`] | `Send + Sync` |
//! | libxengnttab.so.1 | [`XenGnttab`] → [`GrantMapping`] | `Send + Sync` / `Send` |
//! | libxenforeignmemory.so.1 | [`XenForeignMemory`] → [`ForeignMapping`], [`ResourceMapping`] | `Send + Sync` / `Send` |
//! | libxenstore.so.4 | [`XenStore`], [`Transaction`] | `Send + Sync` / `Send` |
//!
//! Guest memory is reached only through [`GuestMemory`] (copies and volatile scalars).

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
compile_error!("libxc-ffi's bindings are generated for x86-64 Linux dom0s only");

pub mod consts;
mod errno;
mod evtchn;
mod foreignmemory;
mod gnttab;
mod layout;
mod loader;
mod logger;
mod mem;
mod poll;
pub mod sys;
mod xenctrl;
mod xenstore;

pub use errno::Errno;
pub use evtchn::{EvtchnError, XenEvtchn};
pub use foreignmemory::{
    first_page_error, ForeignMapping, ForeignMemoryError, PageError, ResourceMapping,
    XenForeignMemory, COPY_BATCH,
};
pub use gnttab::{GnttabError, GrantMapping, XenGnttab};
pub use loader::{
    find_other_versions, LibraryPaths, LoadError, SONAME_XENCTRL, SONAME_XENEVTCHN,
    SONAME_XENFOREIGNMEMORY, SONAME_XENGNTTAB, SONAME_XENSTORE,
};
pub use mem::{GuestMemory, HeapMemory, MemError};
pub use xenctrl::{
    bitmap_bytes, check_version, find_hvm_record, DirtyBitmap, DirtyBitmapBuffer, DomainInfo,
    EvtchnState, EvtchnStatus, GuestType, LogDirtyStats, ShutdownReason, VcpuContext, XcError,
    XenCtrl, XenVersion, SUPPORTED_XEN,
};
pub use xenstore::{
    Access, Permission, Transaction, WatchEvent, XenStore, XsError, TRANSACTION_RETRIES, XBT_NULL,
};

/// Size of a guest page (x86).
pub const PAGE_SIZE: usize = 4096;

#[cfg(test)]
mod tests {
    use super::*;

    fn send<T: Send>() {}
    fn sync<T: Sync>() {}

    #[test]
    fn thread_safety_markers() {
        send::<XenCtrl>();
        sync::<XenCtrl>();
        send::<DirtyBitmapBuffer>();
        send::<XenEvtchn>();
        sync::<XenEvtchn>();
        send::<XenGnttab>();
        sync::<XenGnttab>();
        send::<GrantMapping>();
        send::<XenForeignMemory>();
        sync::<XenForeignMemory>();
        send::<ForeignMapping>();
        send::<ResourceMapping>();
        send::<XenStore>();
        sync::<XenStore>();
        send::<Transaction<'static>>();
        send::<HeapMemory>();
    }
}
