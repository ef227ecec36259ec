//! The real implementation of the traits of this crate: one Xen 4.17 host, through the
//! `libxc-ffi` crate's safe wrappers of Xen's dom0 libraries.
//!
//! ```no_run
//! use hypervisor::{DomainControl, Hypervisor};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let host = hypervisor::xen::XenHost::open()?; // root in a Xen 4.17 dom0
//! for d in host.list_domains()? {
//!     println!("{} {:?}", d.domid, d.guest_type);
//! }
//! let xs = host.open_xenstore()?;
//! # Ok(())
//! # }
//! ```
//!
//! | what | library | opened |
//! |---|---|---|
//! | [`DomainControl`], [`LogDirty`], [`EventChannelControl`] | libxenctrl.so.4.17 (version-gated) | by [`XenHost::open`] |
//! | [`GuestMemory`] | libxenforeignmemory.so.1 | by [`XenHost::open`] |
//! | [`GrantTables`] | libxengnttab.so.1 | at the first [`map_grant_refs`](GrantTables::map_grant_refs) (only backends need it; a dom0 without `xen-gntdev` can still checkpoint) |
//! | [`EventChannels`] | libxenevtchn.so.1 | per [`open_event_channels`](Hypervisor::open_event_channels) |
//! | [`XenStore`] | libxenstore.so.4 | per [`open_xenstore`](Hypervisor::open_xenstore) |
//!
//! There is no `unsafe` here: every C call and every access to guest memory happens inside
//! `libxc-ffi`. Guest pages are copied in and out ([`GuestMemory`]); grant mappings are
//! accessed with bounds-checked copies and volatile scalars ([`XenGrantMapping`]).

#![forbid(unsafe_code)]

mod errors;
mod evtchn;
mod gnttab;
mod xenstore;

#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};

use libxc_ffi::sys::types::{XEN_X86_EMU_IOAPIC, XEN_X86_EMU_LAPIC, XEN_X86_EMU_VPCI};
use libxc_ffi::{DirtyBitmapBuffer, XenCtrl, XenForeignMemory, XenGnttab};

pub use errors::{OpenErrorKind, XenOpenError};
pub use evtchn::XenEventChannels;
pub use gnttab::XenGrantMapping;
pub use libxc_ffi::LibraryPaths;
pub use xenstore::XenStoreConnection;

use crate::{
    DirtyBitmap, DomId, DomainControl, DomainInfo, Errno, EventChannelControl, EventChannels,
    EvtchnState, EvtchnStatus, GrantMapping, GrantRef, GrantTables, GuestMemory, GuestType,
    Hypervisor, HypervisorError, LogDirty, LogDirtyStats, Method, Pfn, Port, Result,
    ShutdownReason, XenStore, PAGE_SIZE,
};

/// One Xen 4.17 host, seen from its dom0: implements [`Hypervisor`] (and so every trait of
/// this crate) over `libxc-ffi`.
///
/// `Send + Sync`: libxenctrl and libxenforeignmemory handles are thread-safe (see
/// `libxc-ffi`); the per-domain log-dirty buffers and the lazily opened grant-table handle
/// are behind mutexes, never held across a hypercall.
pub struct XenHost {
    paths: LibraryPaths,
    xc: XenCtrl,
    fmem: XenForeignMemory,
    /// Opened at the first grant map (see the module documentation).
    gnttab: Mutex<Option<XenGnttab>>,
    /// Whether a failure to open the grant-table device was already logged at `warn`.
    gnttab_failure_logged: Mutex<bool>,
    /// Hypercall-safe bitmap buffers, reused across log-dirty rounds, per domain. A buffer is
    /// taken out of the map for the duration of a call.
    dirty_buffers: Mutex<HashMap<DomId, DirtyBitmapBuffer>>,
    /// Domains this host turned log-dirty on for (and not off since): a second enable of
    /// one of them fails with `EINVAL` as the trait says, instead of being taken for QEMU's
    /// VRAM tracking (see [`LogDirty::log_dirty_enable`]).
    logdirty_enabled: Mutex<HashSet<DomId>>,
}

impl std::fmt::Debug for XenHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XenHost")
            .field("xen", &self.xc.version())
            .field("paths", &self.paths)
            .finish_non_exhaustive()
    }
}

/// Locks a mutex, recovering the data if another thread panicked while holding it (every
/// critical section here leaves the data consistent).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Classifies a domain the way Xen's `emulation_flags_ok()` (xen/arch/x86/domain.c) constrains
/// them: a non-HVM domain is PV; an HVM domU is PVH when its emulation flags are exactly
/// `XEN_X86_EMU_LAPIC` (libxl's PVH) and HVM otherwise (`XEN_X86_EMU_ALL & ~XEN_X86_EMU_VPCI`);
/// a PVH hardware domain has `LAPIC | IOAPIC | VPCI`.
pub fn classify_guest(hvm: bool, emulation_flags: u32) -> GuestType {
    const PVH_DOM0: u32 = XEN_X86_EMU_LAPIC | XEN_X86_EMU_IOAPIC | XEN_X86_EMU_VPCI;
    if !hvm {
        GuestType::Pv
    } else if emulation_flags == XEN_X86_EMU_LAPIC || emulation_flags == PVH_DOM0 {
        GuestType::Pvh
    } else {
        GuestType::Hvm
    }
}

/// Converts `libxc-ffi`'s decoded domain information (a pure function, unit-tested).
impl XenHost {
    /// The guest frame at which `domid` sees its `shared_info` page (`getdomaininfo`'s
    /// `shared_info_frame`: Xen translates it through the M2P, so for an HVM/PVH guest it is
    /// the gfn the guest mapped it at with `XENMAPSPACE_shared_info`).
    pub fn shared_info_frame(&self, domid: DomId) -> Result<Pfn> {
        let op = Method::SharedInfoFrame;
        self.xc
            .domain_info(u32::from(domid))
            .map(|d| d.shared_info_frame)
            .map_err(|e| errors::xc_domain(op, domid, e))
    }

    /// `XENMEM_add_to_physmap` for `domid`: maps Xen's frame `idx` of `space`
    /// (`libxc_ffi::consts::XENMAPSPACE_*`) at guest frame `gfn`, replacing what was there.
    pub fn add_to_physmap(&self, domid: DomId, space: u32, idx: u64, gfn: Pfn) -> Result<()> {
        self.xc
            .add_to_physmap(u32::from(domid), space, idx, gfn)
            .map_err(|e| errors::xc_domain(Method::AddToPhysmap, domid, e))
    }
}

pub(crate) fn domain_info_from(d: &libxc_ffi::DomainInfo) -> Option<DomainInfo> {
    let domid = DomId::try_from(d.domid).ok()?;
    let shutdown = d.shutdown.map(|r| match r {
        libxc_ffi::ShutdownReason::Poweroff => ShutdownReason::Poweroff,
        libxc_ffi::ShutdownReason::Reboot => ShutdownReason::Reboot,
        libxc_ffi::ShutdownReason::Suspend => ShutdownReason::Suspend,
        libxc_ffi::ShutdownReason::Crash => ShutdownReason::Crash,
        libxc_ffi::ShutdownReason::Watchdog => ShutdownReason::Watchdog,
        libxc_ffi::ShutdownReason::SoftReset => ShutdownReason::SoftReset,
        libxc_ffi::ShutdownReason::Other(code) => ShutdownReason::Other(u32::from(code)),
    });
    Some(DomainInfo {
        domid,
        paused: d.paused,
        running: d.running,
        blocked: d.blocked,
        dying: d.dying,
        shutdown,
        guest_type: classify_guest(d.hvm, d.emulation_flags),
        // A domain without vCPUs: `max_vcpu_id + 1` wraps to 0 vCPUs.
        max_vcpu_id: d.max_vcpu_id.unwrap_or(u32::MAX),
        tot_pages: d.nr_pages,
        max_pages: d.max_pages,
    })
}

/// Converts `libxc-ffi`'s event channel status; `None` for a status Xen 4.17 does not have.
pub(crate) fn evtchn_status_from(s: &libxc_ffi::EvtchnStatus) -> Option<EvtchnStatus> {
    let state = match s.state {
        libxc_ffi::EvtchnState::Closed => EvtchnState::Closed,
        libxc_ffi::EvtchnState::Unbound { remote_domid } => EvtchnState::Unbound { remote_domid },
        libxc_ffi::EvtchnState::Interdomain {
            remote_domid,
            remote_port,
        } => EvtchnState::Interdomain {
            remote_domid,
            remote_port,
        },
        libxc_ffi::EvtchnState::Pirq(p) => EvtchnState::Pirq(p),
        libxc_ffi::EvtchnState::Virq(v) => EvtchnState::Virq(v),
        libxc_ffi::EvtchnState::Ipi => EvtchnState::Ipi,
        libxc_ffi::EvtchnState::Unknown(_) => return None,
    };
    Some(EvtchnStatus {
        vcpu: s.vcpu,
        state,
    })
}

/// Whether a failed log-dirty enable should be answered with `OFF` + `ENABLE` (see
/// [`LogDirty::log_dirty_enable`] for [`XenHost`]): only `EINVAL`, and only for a domain this
/// host has not enabled itself.
pub(crate) fn retry_enable_after_off(err: &HypervisorError, enabled_by_us: bool) -> bool {
    err.errno() == Some(Errno::EINVAL) && !enabled_by_us
}

/// `BufferSize` unless `len` is exactly `pages * PAGE_SIZE`.
fn check_batch(op: Method, pages: usize, len: usize) -> Result<()> {
    let expected = pages.saturating_mul(PAGE_SIZE);
    if expected == len {
        Ok(())
    } else {
        Err(HypervisorError::BufferSize {
            op,
            expected,
            actual: len,
        })
    }
}

impl XenHost {
    /// Opens this host's Xen with the Xen 4.17 library names ([`LibraryPaths::default`]):
    /// libxenctrl (refusing any hypervisor other than 4.17) and libxenforeignmemory. Needs
    /// root in a Xen dom0. The error names the library that failed and why, e.g.
    /// "libxenctrl.so.4.17 not found: is this a Xen 4.17 dom0?".
    pub fn open() -> std::result::Result<XenHost, XenOpenError> {
        XenHost::open_with(&LibraryPaths::default())
    }

    /// As [`open`](Self::open), with the libraries named by `paths` (other locations, or
    /// fake libraries for tests). Libraries opened later (xenevtchn, xengnttab, xenstore)
    /// are taken from `paths` too.
    pub fn open_with(paths: &LibraryPaths) -> std::result::Result<XenHost, XenOpenError> {
        let xc = XenCtrl::open_with(paths).map_err(|error| XenOpenError::XenCtrl {
            library: paths.xenctrl.to_string_lossy().into_owned(),
            error,
        })?;
        let fmem =
            XenForeignMemory::open_with(paths).map_err(|error| XenOpenError::ForeignMemory {
                library: paths.xenforeignmemory.to_string_lossy().into_owned(),
                error,
            })?;
        log::debug!("opened Xen {} through libxc-ffi", xc.version());
        Ok(XenHost {
            paths: paths.clone(),
            xc,
            fmem,
            gnttab: Mutex::new(None),
            gnttab_failure_logged: Mutex::new(false),
            dirty_buffers: Mutex::new(HashMap::new()),
            logdirty_enabled: Mutex::new(HashSet::new()),
        })
    }

    /// The library names this host was opened with.
    pub fn library_paths(&self) -> &LibraryPaths {
        &self.paths
    }

    /// The underlying libxenctrl handle, for calls the traits do not cover.
    pub fn xenctrl(&self) -> &XenCtrl {
        &self.xc
    }

    /// The grant-table handle, opened on first use.
    fn gnttab(&self, domid: DomId, refs: &[GrantRef]) -> Result<XenGnttab> {
        let mut slot = lock(&self.gnttab);
        if let Some(g) = slot.as_ref() {
            return Ok(g.clone());
        }
        match XenGnttab::open_with(&self.paths) {
            Ok(g) => {
                *slot = Some(g.clone());
                Ok(g)
            }
            Err(e) => {
                let mut logged = lock(&self.gnttab_failure_logged);
                let msg = format!(
                    "cannot open libxengnttab ({}): {e}",
                    self.paths.xengnttab.to_string_lossy()
                );
                if *logged {
                    log::debug!("{msg}");
                } else {
                    log::warn!("{msg}");
                    *logged = true;
                }
                Err(errors::gnttab(Method::GnttabMap, domid, refs, e))
            }
        }
    }

    /// Runs a log-dirty CLEAN or PEEK into `bitmap` through this domain's cached
    /// hypercall buffer (reallocated when the bitmap size changes).
    fn harvest(
        &self,
        op: Method,
        domid: DomId,
        bitmap: &mut DirtyBitmap,
        final_round: bool,
    ) -> Result<LogDirtyStats> {
        let pages = bitmap.nr_pages();
        let cached = lock(&self.dirty_buffers).remove(&domid);
        let mut buf = match cached {
            Some(b) if b.pages() == pages => b,
            _ => self
                .xc
                .dirty_bitmap_buffer(pages)
                .map_err(|e| errors::xc_domain(op, domid, e))?,
        };
        let r = if op == Method::LogDirtyClean {
            self.xc
                .logdirty_clean(u32::from(domid), &mut buf, final_round)
        } else {
            self.xc.logdirty_peek(u32::from(domid), &mut buf)
        };
        let stats = match r {
            Ok(stats) => stats,
            Err(e) => {
                // Log-dirty is probably off: do not keep a buffer for it.
                return Err(errors::xc_domain(op, domid, e));
            }
        };
        bitmap.clear();
        buf.copy_to_words(bitmap.words_mut());
        bitmap.trim();
        lock(&self.dirty_buffers).insert(domid, buf);
        Ok(LogDirtyStats {
            fault_count: stats.fault_count,
            dirty_count: stats.dirty_count,
        })
    }
}

impl DomainControl for XenHost {
    fn list_domains(&self) -> Result<Vec<DomainInfo>> {
        let all = self
            .xc
            .domain_list()
            .map_err(|e| errors::xc_call(Method::ListDomains, e))?;
        Ok(all.iter().filter_map(domain_info_from).collect())
    }

    fn domain_info(&self, domid: DomId) -> Result<DomainInfo> {
        let op = Method::DomainInfo;
        let info = self
            .xc
            .domain_info(u32::from(domid))
            .map_err(|e| errors::xc_domain(op, domid, e))?;
        domain_info_from(&info).ok_or(HypervisorError::Domain {
            op,
            domid,
            errno: Errno::ESRCH,
        })
    }

    fn pause(&self, domid: DomId) -> Result<()> {
        self.xc
            .pause(u32::from(domid))
            .map_err(|e| errors::xc_domain(Method::Pause, domid, e))
    }

    fn resume(&self, domid: DomId, fast: bool) -> Result<()> {
        self.xc
            .domain_resume(u32::from(domid), fast)
            .map_err(|e| errors::xc_domain(Method::Resume, domid, e))
    }

    fn unpause(&self, domid: DomId) -> Result<()> {
        self.xc
            .unpause(u32::from(domid))
            .map_err(|e| errors::xc_domain(Method::Unpause, domid, e))
    }

    fn hvm_context(&self, domid: DomId) -> Result<Vec<u8>> {
        self.xc
            .hvm_getcontext(u32::from(domid))
            .map_err(|e| errors::xc_domain(Method::HvmContext, domid, e))
    }

    fn set_hvm_context(&self, domid: DomId, context: &[u8]) -> Result<()> {
        self.xc
            .hvm_setcontext(u32::from(domid), context)
            .map_err(|e| errors::xc_domain(Method::SetHvmContext, domid, e))
    }

    fn hvm_context_partial(&self, domid: DomId, typecode: u16, instance: u16) -> Result<Vec<u8>> {
        // The record's size depends on its type, so take the whole context and find the
        // record in it (what xc_domain_hvm_getcontext_partial returns, without needing the
        // size up front).
        let op = Method::HvmContextPartial;
        let blob = self
            .xc
            .hvm_getcontext(u32::from(domid))
            .map_err(|e| errors::xc_domain(op, domid, e))?;
        match crate::hvm_save::find(&blob, typecode, instance) {
            Ok(Some(body)) => Ok(body.to_vec()),
            Ok(None) => Err(HypervisorError::Domain {
                op,
                domid,
                errno: Errno::ENOENT,
            }),
            Err(e) => {
                log::warn!("{op} of domain {domid}: Xen returned a malformed context: {e}");
                Err(HypervisorError::Domain {
                    op,
                    domid,
                    errno: Errno::EINVAL,
                })
            }
        }
    }

    fn vcpu_context(&self, domid: DomId, vcpu: u32) -> Result<Vec<u8>> {
        self.xc
            .vcpu_getcontext(u32::from(domid), vcpu)
            .map(|c| c.as_bytes().to_vec())
            .map_err(|e| errors::xc_domain(Method::VcpuContext, domid, e))
    }

    fn hvm_param(&self, domid: DomId, param: u32) -> Result<u64> {
        self.xc
            .hvm_param_get(u32::from(domid), param)
            .map_err(|e| errors::xc_domain(Method::HvmParam, domid, e))
    }

    fn set_hvm_param(&self, domid: DomId, param: u32, value: u64) -> Result<()> {
        self.xc
            .hvm_param_set(u32::from(domid), param, value)
            .map_err(|e| errors::xc_domain(Method::SetHvmParam, domid, e))
    }

    fn maximum_gpfn(&self, domid: DomId) -> Result<Pfn> {
        self.xc
            .maximum_gpfn(u32::from(domid))
            .map_err(|e| errors::xc_domain(Method::MaximumGpfn, domid, e))
    }
}

impl GuestMemory for XenHost {
    fn read_pages(&self, domid: DomId, pfns: &[Pfn], buf: &mut [u8]) -> Result<()> {
        let op = Method::ReadPages;
        check_batch(op, pfns.len(), buf.len())?;
        if pfns.is_empty() {
            return Ok(());
        }
        let failed = self
            .fmem
            .read_pages(u32::from(domid), pfns, buf)
            .map_err(|e| errors::foreign(op, domid, e))?;
        if failed.is_empty() {
            Ok(())
        } else {
            Err(errors::page_failures(op, domid, &failed))
        }
    }

    fn write_pages(&self, domid: DomId, pfns: &[Pfn], data: &[u8]) -> Result<()> {
        let op = Method::WritePages;
        check_batch(op, pfns.len(), data.len())?;
        if pfns.is_empty() {
            return Ok(());
        }
        let failed = self
            .fmem
            .write_pages(u32::from(domid), pfns, data)
            .map_err(|e| errors::foreign(op, domid, e))?;
        if failed.is_empty() {
            Ok(())
        } else {
            Err(errors::page_failures(op, domid, &failed))
        }
    }
}

impl LogDirty for XenHost {
    /// `XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY`. Xen refuses it with `EINVAL` while log-dirty
    /// mode is on for any reason, and an HVM guest's QEMU turns it on to track its VGA
    /// memory (`xc_hvm_track_dirty_vram`). So, like libxc's own save code
    /// (`enable_logdirty` in `xc_sr_save.c`), an `EINVAL` for a domain this host did not
    /// enable is answered with `OFF` and one more `ENABLE`; VRAM tracking keeps working
    /// under global log-dirty. A second enable by this host still fails with `EINVAL`.
    fn log_dirty_enable(&self, domid: DomId) -> Result<()> {
        let op = Method::LogDirtyEnable;
        let dom = u32::from(domid);
        let err = match self.xc.logdirty_enable(dom) {
            Ok(()) => {
                lock(&self.logdirty_enabled).insert(domid);
                return Ok(());
            }
            Err(e) => errors::xc_domain(op, domid, e),
        };
        if !retry_enable_after_off(&err, lock(&self.logdirty_enabled).contains(&domid)) {
            return Err(err);
        }
        log::info!(
            "domain {domid}: log-dirty already on (VRAM tracking?): turning it off and on again"
        );
        self.xc
            .logdirty_off(dom)
            .and_then(|()| self.xc.logdirty_enable(dom))
            .map_err(|e| errors::xc_domain(op, domid, e))?;
        lock(&self.logdirty_enabled).insert(domid);
        Ok(())
    }

    fn log_dirty_clean(&self, domid: DomId, bitmap: &mut DirtyBitmap) -> Result<LogDirtyStats> {
        self.harvest(Method::LogDirtyClean, domid, bitmap, false)
    }

    /// `XEN_DOMCTL_SHADOW_OP_CLEAN` with `XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL`.
    fn log_dirty_clean_final(
        &self,
        domid: DomId,
        bitmap: &mut DirtyBitmap,
    ) -> Result<LogDirtyStats> {
        self.harvest(Method::LogDirtyClean, domid, bitmap, true)
    }

    fn log_dirty_peek(&self, domid: DomId, bitmap: &mut DirtyBitmap) -> Result<LogDirtyStats> {
        self.harvest(Method::LogDirtyPeek, domid, bitmap, false)
    }

    fn log_dirty_disable(&self, domid: DomId) -> Result<()> {
        let r = self
            .xc
            .logdirty_off(u32::from(domid))
            .map_err(|e| errors::xc_domain(Method::LogDirtyDisable, domid, e));
        lock(&self.dirty_buffers).remove(&domid);
        if r.is_ok() {
            lock(&self.logdirty_enabled).remove(&domid);
        }
        r
    }
}

impl EventChannelControl for XenHost {
    fn evtchn_alloc_unbound(&self, domid: DomId, remote_domid: DomId) -> Result<Port> {
        self.xc
            .evtchn_alloc_unbound(u32::from(domid), u32::from(remote_domid))
            .map_err(|e| errors::xc_domain(Method::EvtchnAllocUnbound, domid, e))
    }

    fn evtchn_status(&self, domid: DomId, port: Port) -> Result<EvtchnStatus> {
        let op = Method::EvtchnStatus;
        let raw = self
            .xc
            .evtchn_status(u32::from(domid), port)
            .map_err(|e| errors::xc_domain(op, domid, e))?;
        evtchn_status_from(&raw).ok_or_else(|| {
            log::warn!(
                "{op} of domain {domid} port {port}: unknown state {:?}",
                raw.state
            );
            HypervisorError::Domain {
                op,
                domid,
                errno: Errno::EINVAL,
            }
        })
    }
}

impl GrantTables for XenHost {
    fn map_grant_refs(
        &self,
        domid: DomId,
        refs: &[GrantRef],
        writable: bool,
    ) -> Result<Box<dyn GrantMapping>> {
        let op = Method::GnttabMap;
        if refs.is_empty() {
            return Err(HypervisorError::Domain {
                op,
                domid,
                errno: Errno::EINVAL,
            });
        }
        let g = self.gnttab(domid, refs)?;
        let mapping = g
            .map_grant_refs(u32::from(domid), refs, writable)
            .map_err(|e| errors::gnttab(op, domid, refs, e))?;
        Ok(Box::new(XenGrantMapping::new(
            domid, refs, writable, mapping,
        )))
    }
}

impl Hypervisor for XenHost {
    fn open_event_channels(&self) -> Result<Box<dyn EventChannels>> {
        Ok(Box::new(XenEventChannels::open(&self.paths)?))
    }

    fn open_xenstore(&self) -> Result<Box<dyn XenStore>> {
        Ok(Box::new(XenStoreConnection::open(&self.paths)?))
    }
}
