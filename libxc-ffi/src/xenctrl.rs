//! libxenctrl: domains, pause/unpause, log-dirty, HVM and vCPU context, HVM params, event
//! channel status, physmap, version.
//!
//! [`XenCtrl`] is `Send + Sync`: libxenctrl is reentrant unless opened with
//! `XC_OPENFLAG_NON_REENTRANT` (which we never pass); its per-call error state is thread-local
//! and its hypercall-buffer cache is mutex-protected.

use core::ffi::c_void;
use core::ptr::NonNull;
use std::sync::Arc;

use crate::errno::{clear_errno, Errno};
use crate::loader::{self, LibraryPaths, LoadError};
use crate::logger::logger_ptr;
use crate::sys::types as t;
use crate::sys::xenctrl::XenCtrlLib;
use crate::sys::xenguest::XenGuestLib;

/// The only hypervisor version libxc-ffi accepts.
pub const SUPPORTED_XEN: XenVersion = XenVersion {
    major: 4,
    minor: 17,
};

/// Errors of the libxenctrl wrappers.
#[derive(Debug, thiserror::Error)]
pub enum XcError {
    /// libxenctrl could not be loaded.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// `xc_interface_open` failed.
    #[error("xc_interface_open failed: {errno} (needs root in a Xen dom0 with /dev/xen/privcmd)")]
    Open {
        /// errno after the call.
        errno: Errno,
    },
    /// The running hypervisor is not Xen 4.17.
    #[error(
        "the running hypervisor is Xen {found_major}.{found_minor}, but libxc-ffi supports \
         Xen 4.17 only (its domctl/libxenctrl ABI changes between releases)"
    )]
    WrongXenVersion {
        /// Major version reported by `xc_version(XENVER_version)`.
        found_major: u32,
        /// Minor version reported by `xc_version(XENVER_version)`.
        found_minor: u32,
    },
    /// A call about one domain failed.
    #[error("{op} failed for domain {domid}: {errno}")]
    Domain {
        /// The libxenctrl function (and operation).
        op: &'static str,
        /// The domain.
        domid: u32,
        /// errno after the call.
        errno: Errno,
    },
    /// A call not about one domain failed.
    #[error("{op} failed: {errno}")]
    Call {
        /// The libxenctrl function.
        op: &'static str,
        /// errno after the call.
        errno: Errno,
    },
    /// The domain does not exist.
    #[error("domain {domid} does not exist")]
    NoSuchDomain {
        /// The domain asked for.
        domid: u32,
    },
    /// A call returned something we cannot accept (size mismatch, bad argument, ...).
    #[error("{op} for domain {domid}: {reason}")]
    Invalid {
        /// The operation.
        op: &'static str,
        /// The domain.
        domid: u32,
        /// What was wrong, with the values.
        reason: String,
    },
}

/// A Xen version as reported by `xc_version(XENVER_version)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct XenVersion {
    /// Major version (4 for 4.17).
    pub major: u32,
    /// Minor version (17 for 4.17).
    pub minor: u32,
}

impl XenVersion {
    /// Decodes the raw `xc_version(XENVER_version)` value, `major << 16 | minor`.
    pub fn from_raw(raw: u32) -> Self {
        Self {
            major: raw >> 16,
            minor: raw & 0xffff,
        }
    }
}

impl core::fmt::Display for XenVersion {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// The version gate: accepts the raw `xc_version(XENVER_version)` value of Xen 4.17 only.
pub fn check_version(raw: u32) -> Result<XenVersion, XcError> {
    let v = XenVersion::from_raw(raw);
    if v == SUPPORTED_XEN {
        Ok(v)
    } else {
        Err(XcError::WrongXenVersion {
            found_major: v.major,
            found_minor: v.minor,
        })
    }
}

pub(crate) struct XcInner {
    lib: XenCtrlLib,
    xch: NonNull<t::xc_interface>,
    /// libxenguest, loaded on first use (only `xc_domain_resume` is needed from it). Declared
    /// after `lib`, so it is unloaded after the handle is closed; it links libxenctrl itself,
    /// so the `xc_interface` it is given is of its own library's kind.
    guest: std::sync::OnceLock<XenGuestLib>,
}

// SAFETY: the xc_interface handle may be used from any thread (libxenctrl is reentrant when
// not opened with XC_OPENFLAG_NON_REENTRANT, which this crate never passes: its last-error
// state is thread-local and its buffer cache is locked); the function table is plain data.
unsafe impl Send for XcInner {}
// SAFETY: as above: concurrent calls on one handle are supported by libxenctrl.
unsafe impl Sync for XcInner {}

impl Drop for XcInner {
    fn drop(&mut self) {
        // SAFETY: xch came from xc_interface_open and is closed exactly once, here; every
        // object using it (hypercall buffers) holds an Arc<XcInner> and is already gone.
        let rc = unsafe { (self.lib.xc_interface_close)(self.xch.as_ptr()) };
        if rc != 0 {
            log::warn!("xc_interface_close failed: {}", Errno::last());
        }
    }
}

/// An open libxenctrl interface (`xc_interface *`), closed when the last clone (and every
/// [`DirtyBitmapBuffer`] allocated on it) is dropped.  Clones share the handle.
#[derive(Clone)]
pub struct XenCtrl {
    inner: Arc<XcInner>,
    version: XenVersion,
}

impl core::fmt::Debug for XenCtrl {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("XenCtrl")
            .field("version", &self.version)
            .finish()
    }
}

/// Domains asked for per `xc_domain_getinfolist` call.
const INFOLIST_BATCH: usize = 256;
/// First reserved domain id (DOMID_FIRST_RESERVED); real domains are below it.
const DOMID_FIRST_RESERVED: u32 = 0x7ff0;

impl XenCtrl {
    /// Loads libxenctrl.so.4.17, opens the interface and checks that the hypervisor is 4.17.
    pub fn open() -> Result<Self, XcError> {
        Self::open_with(&LibraryPaths::default())
    }

    /// Like [`XenCtrl::open`], with the library taken from `paths.xenctrl`.
    pub fn open_with(paths: &LibraryPaths) -> Result<Self, XcError> {
        let lib = loader::load(
            &paths.xenctrl,
            &paths.search_dirs,
            XenCtrlLib::from_library::<libloading::Library>,
        )?;
        clear_errno();
        // SAFETY: our static logger outlives the handle and is only read by the library;
        // flags 0 = normal reentrant handle.
        let raw = unsafe { (lib.xc_interface_open)(logger_ptr(), logger_ptr(), 0) };
        let Some(xch) = NonNull::new(raw) else {
            return Err(XcError::Open {
                errno: Errno::last(),
            });
        };
        let inner = Arc::new(XcInner {
            lib,
            xch,
            guest: std::sync::OnceLock::new(),
        });
        // SAFETY: XENVER_version takes no argument buffer (NULL) and returns the version.
        let rc = unsafe {
            (inner.lib.xc_version)(
                xch.as_ptr(),
                t::XENVER_version as i32,
                core::ptr::null_mut(),
            )
        };
        if rc < 0 {
            return Err(XcError::Call {
                op: "xc_version(XENVER_version)",
                errno: Errno::last(),
            });
        }
        let version = check_version(rc as u32)?;
        Ok(Self { inner, version })
    }

    fn xch(&self) -> *mut t::xc_interface {
        self.inner.xch.as_ptr()
    }

    fn lib(&self) -> &XenCtrlLib {
        &self.inner.lib
    }

    fn dom_err(op: &'static str, domid: u32) -> XcError {
        XcError::Domain {
            op,
            domid,
            errno: Errno::last(),
        }
    }

    /// The hypervisor version checked at open (always 4.17).
    pub fn version(&self) -> XenVersion {
        self.version
    }

    /// `xc_version(XENVER_extraversion)`, e.g. ".7" for 4.17.7.
    pub fn extraversion(&self) -> Result<String, XcError> {
        let mut buf: t::xen_extraversion_t = [0; 16];
        // SAFETY: XENVER_extraversion writes at most sizeof(xen_extraversion_t) bytes to arg.
        let rc = unsafe {
            (self.lib().xc_version)(
                self.xch(),
                t::XENVER_extraversion as i32,
                buf.as_mut_ptr().cast::<c_void>(),
            )
        };
        if rc < 0 {
            return Err(XcError::Call {
                op: "xc_version(XENVER_extraversion)",
                errno: Errno::last(),
            });
        }
        let bytes: Vec<u8> = buf
            .iter()
            .map(|&c| c as u8)
            .take_while(|&b| b != 0)
            .collect();
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    // ------------------------------------------------------------------------------------
    // Domains

    /// Raw `xc_domain_getinfolist`: up to `out.len()` domains with id >= `first_domid`.
    /// Returns how many entries were filled.
    pub fn getinfolist_raw(
        &self,
        first_domid: u32,
        out: &mut [t::xc_domaininfo_t],
    ) -> Result<usize, XcError> {
        let max = u32::try_from(out.len()).unwrap_or(u32::MAX);
        // SAFETY: out has room for `max` entries of the type the function fills.
        let n = unsafe {
            (self.lib().xc_domain_getinfolist)(self.xch(), first_domid, max, out.as_mut_ptr())
        };
        if n < 0 {
            return Err(Self::dom_err("xc_domain_getinfolist", first_domid));
        }
        Ok((n as usize).min(out.len()))
    }

    /// All domains (including dom0), in domain-id order.
    pub fn domain_list(&self) -> Result<Vec<DomainInfo>, XcError> {
        let mut buf = vec![zeroed_dominfo(); INFOLIST_BATCH];
        let mut all = Vec::new();
        let mut first = 0u32;
        while first < DOMID_FIRST_RESERVED {
            let n = self.getinfolist_raw(first, &mut buf)?;
            all.extend(buf[..n].iter().map(DomainInfo::from_raw));
            match buf[..n].last() {
                Some(last) if n == INFOLIST_BATCH => first = u32::from(last.domain) + 1,
                _ => break,
            }
        }
        Ok(all)
    }

    /// One domain's information; [`XcError::NoSuchDomain`] if it does not exist.
    pub fn domain_info(&self, domid: u32) -> Result<DomainInfo, XcError> {
        let mut buf = [zeroed_dominfo()];
        let n = self.getinfolist_raw(domid, &mut buf)?;
        if n == 1 && u32::from(buf[0].domain) == domid {
            Ok(DomainInfo::from_raw(&buf[0]))
        } else {
            Err(XcError::NoSuchDomain { domid })
        }
    }

    /// `xc_domain_pause`.
    pub fn pause(&self, domid: u32) -> Result<(), XcError> {
        // SAFETY: plain call on a valid handle.
        let rc = unsafe { (self.lib().xc_domain_pause)(self.xch(), domid) };
        if rc != 0 {
            return Err(Self::dom_err("xc_domain_pause", domid));
        }
        Ok(())
    }

    /// `xc_domain_unpause`.
    pub fn unpause(&self, domid: u32) -> Result<(), XcError> {
        // SAFETY: plain call on a valid handle.
        let rc = unsafe { (self.lib().xc_domain_unpause)(self.xch(), domid) };
        if rc != 0 {
            return Err(Self::dom_err("xc_domain_unpause", domid));
        }
        Ok(())
    }

    /// `xc_domain_resume` (libxenguest, loaded from [`loader::SONAME_XENGUEST`] on first
    /// use): lets a domain that shut down for suspend run again. `fast` (what Remus does after
    /// each checkpoint): the guest sees its suspend hypercall return 1, "cancelled", and goes on
    /// with its event channels, grant tables and xenstore connection as they were; without it,
    /// the guest is resumed as if in a new domain (libxc resets its state first).
    pub fn domain_resume(&self, domid: u32, fast: bool) -> Result<(), XcError> {
        let guest = match self.inner.guest.get() {
            Some(g) => g,
            None => {
                let lib = loader::load(
                    std::ffi::OsStr::new(loader::SONAME_XENGUEST),
                    &LibraryPaths::default().search_dirs,
                    XenGuestLib::from_library::<libloading::Library>,
                )?;
                // Another thread may have won the race: either copy is the same library.
                let _ = self.inner.guest.set(lib);
                match self.inner.guest.get() {
                    Some(g) => g,
                    None => {
                        return Err(XcError::Invalid {
                            op: "xc_domain_resume",
                            domid,
                            reason: "libxenguest loaded but not kept".into(),
                        })
                    }
                }
            }
        };
        clear_errno();
        // SAFETY: the handle is a valid xc_interface of libxenctrl 4.17, which libxenguest
        // 4.17 (linked against that same library) takes; plain integer arguments.
        let rc = unsafe { (guest.xc_domain_resume)(self.xch(), domid, i32::from(fast)) };
        if rc != 0 {
            return Err(Self::dom_err(
                if fast {
                    "xc_domain_resume(fast)"
                } else {
                    "xc_domain_resume"
                },
                domid,
            ));
        }
        Ok(())
    }

    /// `xc_domain_maximum_gpfn`: the highest guest frame number in use (the log-dirty
    /// bitmap covers `max_gpfn + 1` pages).
    pub fn maximum_gpfn(&self, domid: u32) -> Result<u64, XcError> {
        let mut gpfn: t::xen_pfn_t = 0;
        // SAFETY: gpfn is a valid out-pointer.
        let rc = unsafe { (self.lib().xc_domain_maximum_gpfn)(self.xch(), domid, &mut gpfn) };
        if rc < 0 {
            return Err(Self::dom_err("xc_domain_maximum_gpfn", domid));
        }
        Ok(gpfn)
    }

    /// `xc_domain_add_to_physmap(domid, space, idx, gpfn)`; `space` is a `XENMAPSPACE_*`
    /// (e.g. [`crate::consts::XENMAPSPACE_grant_table`]).
    pub fn add_to_physmap(
        &self,
        domid: u32,
        space: u32,
        idx: u64,
        gpfn: u64,
    ) -> Result<(), XcError> {
        // SAFETY: plain call on a valid handle.
        let rc =
            unsafe { (self.lib().xc_domain_add_to_physmap)(self.xch(), domid, space, idx, gpfn) };
        if rc != 0 {
            return Err(Self::dom_err("xc_domain_add_to_physmap", domid));
        }
        Ok(())
    }

    // ------------------------------------------------------------------------------------
    // Log-dirty

    fn logdirty(
        &self,
        op: &'static str,
        domid: u32,
        sop: u32,
        buf: Option<&mut DirtyBitmapBuffer>,
        mode: u32,
    ) -> Result<LogDirtyStats, XcError> {
        let mut stats = t::xc_shadow_op_stats_t {
            fault_count: 0,
            dirty_count: 0,
        };
        let (hdr, pages, buf_for_tail) = match buf {
            Some(b) => {
                if !Arc::ptr_eq(&b.xc, &self.inner) {
                    return Err(XcError::Invalid {
                        op,
                        domid,
                        reason: "bitmap buffer was allocated on another xc_interface".into(),
                    });
                }
                (
                    &mut *b.hdr as *mut t::xc_hypercall_buffer_t,
                    b.pages,
                    Some(b),
                )
            }
            None => (core::ptr::null_mut(), 0, None),
        };
        // SAFETY: hdr is NULL or a hypercall buffer header allocated on this xch whose hbuf
        // holds at least `pages` bits; stats is a valid out-pointer.
        let rc = unsafe {
            (self.lib().xc_logdirty_control)(
                self.xch(),
                domid,
                sop,
                hdr,
                pages as core::ffi::c_ulong,
                mode,
                &mut stats,
            )
        };
        if rc < 0 {
            return Err(Self::dom_err(op, domid));
        }
        if let Some(b) = buf_for_tail {
            if (rc as u64) < b.pages {
                b.clear_from(rc as u64);
            }
        }
        Ok(LogDirtyStats {
            pages: rc as u64,
            dirty_count: stats.dirty_count,
            fault_count: stats.fault_count,
        })
    }

    /// Turns log-dirty mode on (`XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY`).  HVM/PVH (HAP) only:
    /// Debian's Xen has no shadow paging, so PV guests fail here.
    pub fn logdirty_enable(&self, domid: u32) -> Result<(), XcError> {
        self.logdirty(
            "xc_logdirty_control(ENABLE_LOGDIRTY)",
            domid,
            t::XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY,
            None,
            0,
        )
        .map(|_| ())
    }

    /// Turns log-dirty mode off (`XEN_DOMCTL_SHADOW_OP_OFF`).
    pub fn logdirty_off(&self, domid: u32) -> Result<(), XcError> {
        self.logdirty(
            "xc_logdirty_control(OFF)",
            domid,
            t::XEN_DOMCTL_SHADOW_OP_OFF,
            None,
            0,
        )
        .map(|_| ())
    }

    /// Allocates a hypercall-safe bitmap buffer for `pages` guest pages (use
    /// `maximum_gpfn() + 1`).  Reuse it across rounds: allocation is not free.
    pub fn dirty_bitmap_buffer(&self, pages: u64) -> Result<DirtyBitmapBuffer, XcError> {
        DirtyBitmapBuffer::alloc(self, pages)
    }

    /// `XEN_DOMCTL_SHADOW_OP_CLEAN`: fills `buf` with the pages dirtied since the last clean
    /// and resets Xen's copy.  `final_round` adds `XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL` (include
    /// pages Xen itself maps writably; use it for the last round with the guest paused).
    pub fn logdirty_clean(
        &self,
        domid: u32,
        buf: &mut DirtyBitmapBuffer,
        final_round: bool,
    ) -> Result<LogDirtyStats, XcError> {
        let mode = if final_round {
            t::XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL
        } else {
            0
        };
        self.logdirty(
            "xc_logdirty_control(CLEAN)",
            domid,
            t::XEN_DOMCTL_SHADOW_OP_CLEAN,
            Some(buf),
            mode,
        )
    }

    /// `XEN_DOMCTL_SHADOW_OP_PEEK`: like clean, but leaves Xen's copy untouched.
    pub fn logdirty_peek(
        &self,
        domid: u32,
        buf: &mut DirtyBitmapBuffer,
    ) -> Result<LogDirtyStats, XcError> {
        self.logdirty(
            "xc_logdirty_control(PEEK)",
            domid,
            t::XEN_DOMCTL_SHADOW_OP_PEEK,
            Some(buf),
            0,
        )
    }

    /// One-shot clean for `pages` pages into a Rust-owned bitmap (allocates a buffer; prefer
    /// [`XenCtrl::logdirty_clean`] with a reused [`DirtyBitmapBuffer`] in a loop).
    pub fn logdirty_clean_copy(
        &self,
        domid: u32,
        pages: u64,
    ) -> Result<(DirtyBitmap, LogDirtyStats), XcError> {
        let mut buf = self.dirty_bitmap_buffer(pages)?;
        let stats = self.logdirty_clean(domid, &mut buf, false)?;
        Ok((buf.to_bitmap(), stats))
    }

    // ------------------------------------------------------------------------------------
    // HVM and vCPU context

    /// Size in bytes of the domain's whole HVM context (`xc_domain_hvm_getcontext` with a
    /// NULL buffer).
    pub fn hvm_context_size(&self, domid: u32) -> Result<usize, XcError> {
        // SAFETY: a NULL buffer of size 0 asks for the size only.
        let rc = unsafe {
            (self.lib().xc_domain_hvm_getcontext)(self.xch(), domid, core::ptr::null_mut(), 0)
        };
        if rc < 0 {
            return Err(Self::dom_err("xc_domain_hvm_getcontext(size)", domid));
        }
        Ok(rc as usize)
    }

    /// The domain's whole HVM context (sequence of `hvm_save_descriptor` + record).
    pub fn hvm_getcontext(&self, domid: u32) -> Result<Vec<u8>, XcError> {
        let mut v = Vec::new();
        self.hvm_getcontext_into(domid, &mut v)?;
        Ok(v)
    }

    /// Like [`XenCtrl::hvm_getcontext`], reusing `out`'s allocation.
    pub fn hvm_getcontext_into(&self, domid: u32, out: &mut Vec<u8>) -> Result<(), XcError> {
        let size = self.hvm_context_size(domid)?;
        out.clear();
        out.resize(size, 0);
        let len = u32::try_from(size).map_err(|_| XcError::Invalid {
            op: "xc_domain_hvm_getcontext",
            domid,
            reason: format!("context size {size} does not fit in 32 bits"),
        })?;
        // SAFETY: out holds `len` writable bytes.
        let rc = unsafe {
            (self.lib().xc_domain_hvm_getcontext)(self.xch(), domid, out.as_mut_ptr(), len)
        };
        if rc < 0 {
            return Err(Self::dom_err("xc_domain_hvm_getcontext", domid));
        }
        let got = rc as usize;
        if got > size {
            return Err(XcError::Invalid {
                op: "xc_domain_hvm_getcontext",
                domid,
                reason: format!("returned {got} bytes for a {size}-byte buffer"),
            });
        }
        out.truncate(got);
        Ok(())
    }

    /// `xc_domain_hvm_getcontext_partial`: one record (`typecode`, `instance`) into `buf`,
    /// which must be at least the record's size (e.g. `size_of::<hvm_hw_cpu>()`).
    pub fn hvm_getcontext_partial(
        &self,
        domid: u32,
        typecode: u16,
        instance: u16,
        buf: &mut [u8],
    ) -> Result<(), XcError> {
        let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
        // SAFETY: buf holds `len` writable bytes.
        let rc = unsafe {
            (self.lib().xc_domain_hvm_getcontext_partial)(
                self.xch(),
                domid,
                typecode,
                instance,
                buf.as_mut_ptr().cast::<c_void>(),
                len,
            )
        };
        if rc != 0 {
            return Err(Self::dom_err("xc_domain_hvm_getcontext_partial", domid));
        }
        Ok(())
    }

    /// One vCPU's `hvm_hw_cpu` save record (typecode [`crate::consts::HVM_SAVE_CODE_CPU`]).
    pub fn hvm_cpu_context(&self, domid: u32, vcpu: u16) -> Result<t::hvm_hw_cpu, XcError> {
        let mut ctx = core::mem::MaybeUninit::<t::hvm_hw_cpu>::zeroed();
        let len = core::mem::size_of::<t::hvm_hw_cpu>() as u32;
        // SAFETY: ctx is a writable hvm_hw_cpu of `len` bytes.
        let rc = unsafe {
            (self.lib().xc_domain_hvm_getcontext_partial)(
                self.xch(),
                domid,
                crate::consts::HVM_SAVE_CODE_CPU,
                vcpu,
                ctx.as_mut_ptr().cast::<c_void>(),
                len,
            )
        };
        if rc != 0 {
            return Err(Self::dom_err(
                "xc_domain_hvm_getcontext_partial(CPU)",
                domid,
            ));
        }
        // SAFETY: zero-initialised and then filled by Xen; hvm_hw_cpu is plain integers, so
        // every bit pattern is valid.
        Ok(unsafe { ctx.assume_init() })
    }

    /// One record of the domain's HVM context (its body, without the descriptor), found in
    /// the whole context by `typecode` and `instance` (e.g. [`crate::consts::HVM_SAVE_CODE_CPU`]
    /// and a vCPU number).  [`XcError::Invalid`] if there is no such record.
    pub fn hvm_record(&self, domid: u32, typecode: u16, instance: u16) -> Result<Vec<u8>, XcError> {
        let ctx = self.hvm_getcontext(domid)?;
        match find_hvm_record(&ctx, typecode, instance) {
            Ok(Some(body)) => Ok(body.to_vec()),
            Ok(None) => Err(XcError::Invalid {
                op: "hvm_record",
                domid,
                reason: format!("no record with typecode {typecode} instance {instance}"),
            }),
            Err(reason) => Err(XcError::Invalid {
                op: "hvm_record",
                domid,
                reason,
            }),
        }
    }

    /// `xc_domain_hvm_setcontext`: loads a whole HVM context (as produced by
    /// [`XenCtrl::hvm_getcontext`]) into the domain, which should be paused.
    pub fn hvm_setcontext(&self, domid: u32, ctx: &[u8]) -> Result<(), XcError> {
        let len = u32::try_from(ctx.len()).map_err(|_| XcError::Invalid {
            op: "xc_domain_hvm_setcontext",
            domid,
            reason: format!("context of {} bytes does not fit in 32 bits", ctx.len()),
        })?;
        // The C prototype takes a non-const pointer; give it a private copy.
        let mut copy = ctx.to_vec();
        // SAFETY: copy holds `len` bytes; libxenctrl only reads them.
        let rc = unsafe {
            (self.lib().xc_domain_hvm_setcontext)(self.xch(), domid, copy.as_mut_ptr(), len)
        };
        if rc != 0 {
            return Err(Self::dom_err("xc_domain_hvm_setcontext", domid));
        }
        Ok(())
    }

    /// `xc_vcpu_getcontext`.
    pub fn vcpu_getcontext(&self, domid: u32, vcpu: u32) -> Result<VcpuContext, XcError> {
        let mut ctx: Box<core::mem::MaybeUninit<t::vcpu_guest_context_any_t>> =
            Box::new(core::mem::MaybeUninit::zeroed());
        // SAFETY: ctx points to a writable vcpu_guest_context_any_t.
        let rc =
            unsafe { (self.lib().xc_vcpu_getcontext)(self.xch(), domid, vcpu, ctx.as_mut_ptr()) };
        if rc != 0 {
            return Err(Self::dom_err("xc_vcpu_getcontext", domid));
        }
        // SAFETY: zero-initialised, then filled by Xen; the union is plain integers.
        let ctx =
            unsafe { Box::from_raw(Box::into_raw(ctx).cast::<t::vcpu_guest_context_any_t>()) };
        Ok(VcpuContext(ctx))
    }

    // ------------------------------------------------------------------------------------
    // HVM params, event channels

    /// `xc_hvm_param_get`; `param` is an `HVM_PARAM_*` (see [`crate::consts`]).
    pub fn hvm_param_get(&self, domid: u32, param: u32) -> Result<u64, XcError> {
        let mut v = 0u64;
        // SAFETY: v is a valid out-pointer.
        let rc = unsafe { (self.lib().xc_hvm_param_get)(self.xch(), domid, param, &mut v) };
        if rc != 0 {
            return Err(Self::dom_err("xc_hvm_param_get", domid));
        }
        Ok(v)
    }

    /// `xc_hvm_param_set`.
    pub fn hvm_param_set(&self, domid: u32, param: u32, value: u64) -> Result<(), XcError> {
        // SAFETY: plain call on a valid handle.
        let rc = unsafe { (self.lib().xc_hvm_param_set)(self.xch(), domid, param, value) };
        if rc != 0 {
            return Err(Self::dom_err("xc_hvm_param_set", domid));
        }
        Ok(())
    }

    /// `xc_evtchn_status` of port `port` of domain `domid`.
    pub fn evtchn_status(&self, domid: u32, port: u32) -> Result<EvtchnStatus, XcError> {
        let dom = u16::try_from(domid).map_err(|_| XcError::Invalid {
            op: "xc_evtchn_status",
            domid,
            reason: "domain id does not fit domid_t".into(),
        })?;
        // SAFETY: evtchn_status is plain integers; all-zero is a valid value.
        let mut st: t::xc_evtchn_status_t = unsafe { core::mem::zeroed() };
        st.dom = dom;
        st.port = port;
        // SAFETY: st is a valid in/out structure.
        let rc = unsafe { (self.lib().xc_evtchn_status)(self.xch(), &mut st) };
        if rc != 0 {
            return Err(Self::dom_err("xc_evtchn_status", domid));
        }
        Ok(EvtchnStatus::from_raw(&st))
    }

    /// `xc_evtchn_alloc_unbound`: a new port in `domid` that `remote_domid` may bind.
    pub fn evtchn_alloc_unbound(&self, domid: u32, remote_domid: u32) -> Result<u32, XcError> {
        // SAFETY: plain call on a valid handle.
        let rc = unsafe { (self.lib().xc_evtchn_alloc_unbound)(self.xch(), domid, remote_domid) };
        if rc < 0 {
            return Err(Self::dom_err("xc_evtchn_alloc_unbound", domid));
        }
        Ok(rc as u32)
    }
}

/// Finds record (`typecode`, `instance`) in a whole HVM context (a sequence of
/// `hvm_save_descriptor { u16 typecode; u16 instance; u32 length }` + body, ending with the
/// END record) and returns its body.  `Err` describes a malformed context.
pub fn find_hvm_record(ctx: &[u8], typecode: u16, instance: u16) -> Result<Option<&[u8]>, String> {
    const DESC: usize = core::mem::size_of::<t::hvm_save_descriptor>();
    let mut off = 0usize;
    while off < ctx.len() {
        let Some(d) = ctx.get(off..off + DESC) else {
            return Err(format!(
                "truncated descriptor at offset {off} of {}",
                ctx.len()
            ));
        };
        let code = u16::from_le_bytes([d[0], d[1]]);
        let inst = u16::from_le_bytes([d[2], d[3]]);
        let len = u32::from_le_bytes([d[4], d[5], d[6], d[7]]) as usize;
        let body_at = off + DESC;
        let Some(body) = body_at
            .checked_add(len)
            .and_then(|end| ctx.get(body_at..end))
        else {
            return Err(format!(
                "record (typecode {code}, instance {inst}) at offset {off} claims {len} bytes, \
                 past the end ({})",
                ctx.len()
            ));
        };
        if code == typecode && inst == instance {
            return Ok(Some(body));
        }
        if code == crate::consts::HVM_SAVE_CODE_END {
            return Ok(None);
        }
        off = body_at + len;
    }
    Ok(None)
}

fn zeroed_dominfo() -> t::xc_domaininfo_t {
    // SAFETY: xen_domctl_getdomaininfo is plain integers and arrays; all-zero is valid.
    unsafe { core::mem::zeroed() }
}

// ----------------------------------------------------------------------------------------
// Domain information

/// Why a domain shut down (`SHUTDOWN_*`, from the guest or the toolstack).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShutdownReason {
    /// SHUTDOWN_poweroff
    Poweroff,
    /// SHUTDOWN_reboot
    Reboot,
    /// SHUTDOWN_suspend
    Suspend,
    /// SHUTDOWN_crash
    Crash,
    /// SHUTDOWN_watchdog
    Watchdog,
    /// SHUTDOWN_soft_reset
    SoftReset,
    /// A code this crate does not know.
    Other(u8),
}

impl ShutdownReason {
    /// Decodes a `SHUTDOWN_*` code.
    pub fn from_code(code: u8) -> Self {
        match u32::from(code) {
            t::SHUTDOWN_poweroff => Self::Poweroff,
            t::SHUTDOWN_reboot => Self::Reboot,
            t::SHUTDOWN_suspend => Self::Suspend,
            t::SHUTDOWN_crash => Self::Crash,
            t::SHUTDOWN_watchdog => Self::Watchdog,
            t::SHUTDOWN_soft_reset => Self::SoftReset,
            _ => Self::Other(code),
        }
    }
}

/// How a domain is virtualised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GuestType {
    /// Paravirtualised (no log-dirty on Debian's Xen: no shadow paging).
    Pv,
    /// HVM container without emulated devices (emulation flags = LAPIC only).
    Pvh,
    /// Fully virtualised, with emulated platform devices (PIT, RTC, ...).
    Hvm,
}

impl GuestType {
    /// Classifies from the XEN_DOMINF_hvm_guest flag and the x86 emulation flags, as Xen's
    /// domain-creation check does: HVM domUs get every emulated device (the PIT among
    /// them), PVH ones only the LAPIC.
    pub fn classify(hvm: bool, emulation_flags: u32) -> Self {
        if !hvm {
            Self::Pv
        } else if emulation_flags & t::XEN_X86_EMU_PIT != 0 {
            Self::Hvm
        } else {
            Self::Pvh
        }
    }
}

/// A domain's state, decoded from `xc_domaininfo_t` (`xen_domctl_getdomaininfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainInfo {
    /// Domain id.
    pub domid: u32,
    /// Scheduled to die (XEN_DOMINF_dying).
    pub dying: bool,
    /// HVM guest (XEN_DOMINF_hvm_guest); PVH guests are HVM guests too.
    pub hvm: bool,
    /// PV, PVH or HVM (from `hvm` and `emulation_flags`).
    pub guest_type: GuestType,
    /// The x86 emulation flags the domain was created with (XEN_X86_EMU_*).
    pub emulation_flags: u32,
    /// Shut down, with the reason (XEN_DOMINF_shutdown + shutdown code).
    pub shutdown: Option<ShutdownReason>,
    /// Paused by the toolstack (XEN_DOMINF_paused).
    pub paused: bool,
    /// Blocked waiting for an event (XEN_DOMINF_blocked).
    pub blocked: bool,
    /// Running on a CPU right now (XEN_DOMINF_running).
    pub running: bool,
    /// Being debugged (XEN_DOMINF_debugged).
    pub debugged: bool,
    /// A xenstore stub domain (XEN_DOMINF_xs_domain).
    pub xs_domain: bool,
    /// Uses hardware-assisted paging (XEN_DOMINF_hap): log-dirty works.
    pub hap: bool,
    /// Highest vCPU id, `None` if the domain has no vCPUs.
    pub max_vcpu_id: Option<u32>,
    /// vCPUs online.
    pub nr_online_vcpus: u32,
    /// Pages currently allocated (tot_pages).
    pub nr_pages: u64,
    /// Allocation limit in pages.
    pub max_pages: u64,
    /// Shared pages.
    pub shr_pages: u64,
    /// Paged-out pages.
    pub paged_pages: u64,
    /// GMFN of the shared_info page.
    pub shared_info_frame: u64,
    /// CPU time used, in nanoseconds.
    pub cpu_time: u64,
    /// Security id.
    pub ssidref: u32,
    /// The domain handle (the toolstack's UUID of the domain).
    pub handle: [u8; 16],
    /// CPU pool.
    pub cpupool: u32,
    /// The raw XEN_DOMINF_* flags word.
    pub flags: u32,
}

impl DomainInfo {
    /// Decodes a raw `xc_domaininfo_t`.
    pub fn from_raw(raw: &t::xc_domaininfo_t) -> Self {
        let f = raw.flags;
        let has = |bit: u32| f & bit != 0;
        let shutdown = has(t::XEN_DOMINF_shutdown).then(|| {
            let code = (f >> t::XEN_DOMINF_shutdownshift) & t::XEN_DOMINF_shutdownmask;
            ShutdownReason::from_code(code as u8)
        });
        Self {
            domid: u32::from(raw.domain),
            dying: has(t::XEN_DOMINF_dying),
            hvm: has(t::XEN_DOMINF_hvm_guest),
            guest_type: GuestType::classify(
                has(t::XEN_DOMINF_hvm_guest),
                raw.arch_config.emulation_flags,
            ),
            emulation_flags: raw.arch_config.emulation_flags,
            shutdown,
            paused: has(t::XEN_DOMINF_paused),
            blocked: has(t::XEN_DOMINF_blocked),
            running: has(t::XEN_DOMINF_running),
            debugged: has(t::XEN_DOMINF_debugged),
            xs_domain: has(t::XEN_DOMINF_xs_domain),
            hap: has(t::XEN_DOMINF_hap),
            max_vcpu_id: (raw.max_vcpu_id != t::XEN_INVALID_MAX_VCPU_ID as u32)
                .then_some(raw.max_vcpu_id),
            nr_online_vcpus: raw.nr_online_vcpus,
            nr_pages: raw.tot_pages,
            max_pages: raw.max_pages,
            shr_pages: raw.shr_pages,
            paged_pages: raw.paged_pages,
            shared_info_frame: raw.shared_info_frame,
            cpu_time: raw.cpu_time,
            ssidref: raw.ssidref,
            handle: raw.handle,
            cpupool: raw.cpupool,
            flags: f,
        }
    }

    /// The handle formatted as a UUID (`xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`).
    pub fn uuid(&self) -> String {
        let h = &self.handle;
        let hex = |r: core::ops::Range<usize>| -> String {
            h[r].iter().map(|b| format!("{b:02x}")).collect()
        };
        format!(
            "{}-{}-{}-{}-{}",
            hex(0..4),
            hex(4..6),
            hex(6..8),
            hex(8..10),
            hex(10..16)
        )
    }
}

// ----------------------------------------------------------------------------------------
// Log-dirty bitmaps

/// Result of a log-dirty CLEAN/PEEK.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogDirtyStats {
    /// Pages covered, as returned by Xen (normally the number asked for).
    pub pages: u64,
    /// Xen's count of pages dirtied since the last clean.
    pub dirty_count: u32,
    /// Xen's count of log-dirty faults since the last clean.
    pub fault_count: u32,
}

/// A hypercall-safe buffer (`xc__hypercall_buffer_alloc_pages`) for a log-dirty bitmap,
/// freed with `xc__hypercall_buffer_free_pages` on drop.  Xen writes it only during a
/// [`XenCtrl::logdirty_clean`] / [`XenCtrl::logdirty_peek`] call (which borrows it mutably),
/// so reading it between calls is an ordinary read of our own memory.
pub struct DirtyBitmapBuffer {
    xc: Arc<XcInner>,
    // Boxed: the header is what libxenctrl's HYPERCALL_BUFFER macros pass around.
    hdr: Box<t::xc_hypercall_buffer_t>,
    nr_pages: i32,
    pages: u64,
}

// SAFETY: the buffer is owned memory plus a handle that is Send + Sync (XcInner); Xen writes
// it only inside calls that take `&mut self`.
unsafe impl Send for DirtyBitmapBuffer {}
// SAFETY: `&self` methods only read the buffer, which nothing writes concurrently (see above).
unsafe impl Sync for DirtyBitmapBuffer {}

impl core::fmt::Debug for DirtyBitmapBuffer {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DirtyBitmapBuffer")
            .field("pages", &self.pages)
            .field("nr_pages", &self.nr_pages)
            .finish()
    }
}

const PAGE_SIZE: u64 = 4096;

/// Bytes of bitmap for `pages` guest pages, rounded up to whole u64 words.
pub fn bitmap_bytes(pages: u64) -> u64 {
    pages.div_ceil(64) * 8
}

impl DirtyBitmapBuffer {
    fn alloc(xc: &XenCtrl, pages: u64) -> Result<Self, XcError> {
        let op = "xc__hypercall_buffer_alloc_pages";
        let nr_pages =
            i32::try_from(bitmap_bytes(pages).div_ceil(PAGE_SIZE).max(1)).map_err(|_| {
                XcError::Invalid {
                    op,
                    domid: 0,
                    reason: format!("bitmap for {pages} pages is too large"),
                }
            })?;
        // DECLARE_HYPERCALL_BUFFER's initialiser: no bounce, ubuf = (void *)-1.
        let mut hdr = Box::new(t::xc_hypercall_buffer_t {
            hbuf: core::ptr::null_mut(),
            param_shadow: core::ptr::null_mut(),
            dir: 0,
            ubuf: usize::MAX as *mut c_void,
            sz: 0,
        });
        // SAFETY: hdr is a valid, initialised header; libxenctrl stores the allocation in
        // hdr.hbuf and returns it.
        let p =
            unsafe { (xc.lib().xc__hypercall_buffer_alloc_pages)(xc.xch(), &mut *hdr, nr_pages) };
        if p.is_null() {
            return Err(XcError::Call {
                op,
                errno: Errno::last(),
            });
        }
        // SAFETY: p is the fresh allocation of nr_pages pages; nothing else uses it yet.
        unsafe {
            core::ptr::write_bytes(p.cast::<u8>(), 0, nr_pages as usize * PAGE_SIZE as usize)
        };
        Ok(Self {
            xc: Arc::clone(&xc.inner),
            hdr,
            nr_pages,
            pages,
        })
    }

    /// Guest pages covered.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The bitmap bytes (bit `pfn % 8` of byte `pfn / 8`), as Xen last wrote them.
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: hbuf holds nr_pages * 4096 >= bitmap_bytes(pages) bytes that we own; Xen
        // writes them only while a `&mut self` call is running, so none happens now.
        unsafe {
            core::slice::from_raw_parts(
                self.hdr.hbuf.cast::<u8>(),
                bitmap_bytes(self.pages) as usize,
            )
        }
    }

    /// Copies the bitmap into a Rust-owned [`DirtyBitmap`].
    pub fn to_bitmap(&self) -> DirtyBitmap {
        DirtyBitmap::from_bytes(self.as_bytes(), self.pages)
    }

    /// Copies the bitmap into `out`, reusing its allocation.
    pub fn copy_into(&self, out: &mut DirtyBitmap) {
        out.assign_bytes(self.as_bytes(), self.pages);
    }

    /// Copies the bitmap into `out` as little-endian words (bit `pfn % 64` of word
    /// `pfn / 64`), for callers with their own bitmap type.  Copies
    /// `min(out.len(), words)` words; bits at or beyond [`DirtyBitmapBuffer::pages`] are 0.
    /// Returns the number of words copied.
    pub fn copy_to_words(&self, out: &mut [u64]) -> usize {
        let bytes = self.as_bytes();
        let n = out.len().min(bytes.len() / 8);
        for (w, chunk) in out.iter_mut().zip(bytes.chunks_exact(8)).take(n) {
            let mut le = [0u8; 8];
            le.copy_from_slice(chunk);
            *w = u64::from_le_bytes(le);
        }
        let tail = self.pages % 64;
        let last = (self.pages / 64) as usize;
        if tail != 0 && last < n {
            out[last] &= (1u64 << tail) - 1;
        }
        n
    }

    /// Clears the bits of pages `from..pages`: Xen writes only the pages it reports, so
    /// anything after them would be stale.
    fn clear_from(&mut self, from: u64) {
        let total = bitmap_bytes(self.pages) as usize;
        let first_full = from.div_ceil(8) as usize;
        // SAFETY: hbuf holds at least `total` bytes we own (see as_bytes); we have `&mut self`.
        let bytes = unsafe { core::slice::from_raw_parts_mut(self.hdr.hbuf.cast::<u8>(), total) };
        if from % 8 != 0 {
            if let Some(b) = bytes.get_mut((from / 8) as usize) {
                *b &= (1u8 << (from % 8)) - 1;
            }
        }
        if let Some(rest) = bytes.get_mut(first_full..) {
            rest.fill(0);
        }
    }
}

impl Drop for DirtyBitmapBuffer {
    fn drop(&mut self) {
        // SAFETY: hdr was filled by xc__hypercall_buffer_alloc_pages on this xch with
        // nr_pages pages and is freed exactly once; the Arc keeps the xch open.
        unsafe {
            (self.xc.lib.xc__hypercall_buffer_free_pages)(
                self.xc.xch.as_ptr(),
                &mut *self.hdr,
                self.nr_pages,
            )
        };
    }
}

/// A Rust-owned log-dirty bitmap: bit `pfn` set = page `pfn` was dirtied.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    pages: u64,
}

impl DirtyBitmap {
    /// All-clean bitmap for `pages` pages.
    pub fn new(pages: u64) -> Self {
        Self {
            words: vec![0; pages.div_ceil(64) as usize],
            pages,
        }
    }

    /// From Xen's byte layout (bit `pfn % 8` of byte `pfn / 8`).  Missing bytes count as
    /// clean; bits at or beyond `pages` are ignored.
    pub fn from_bytes(bytes: &[u8], pages: u64) -> Self {
        let mut b = Self::default();
        b.assign_bytes(bytes, pages);
        b
    }

    fn assign_bytes(&mut self, bytes: &[u8], pages: u64) {
        let nwords = pages.div_ceil(64) as usize;
        self.pages = pages;
        self.words.clear();
        self.words.resize(nwords, 0);
        for (w, chunk) in self.words.iter_mut().zip(bytes.chunks(8)) {
            let mut le = [0u8; 8];
            le[..chunk.len()].copy_from_slice(chunk);
            *w = u64::from_le_bytes(le);
        }
        let tail = pages % 64;
        if tail != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << tail) - 1;
            }
        }
    }

    /// Pages covered.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The words (bit `pfn % 64` of word `pfn / 64`).
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether page `pfn` is dirty (false beyond the end).
    pub fn is_dirty(&self, pfn: u64) -> bool {
        pfn < self.pages
            && self
                .words
                .get((pfn / 64) as usize)
                .is_some_and(|w| w & (1 << (pfn % 64)) != 0)
    }

    /// Marks page `pfn` dirty (ignored beyond the end).
    pub fn set(&mut self, pfn: u64) {
        if pfn < self.pages {
            if let Some(w) = self.words.get_mut((pfn / 64) as usize) {
                *w |= 1 << (pfn % 64);
            }
        }
    }

    /// Adds every page dirty in `other` (pages beyond `self`'s end are ignored).
    pub fn union_with(&mut self, other: &DirtyBitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
        let tail = self.pages % 64;
        if tail != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << tail) - 1;
            }
        }
    }

    /// Clears every bit.
    pub fn clear(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
    }

    /// The dirty page numbers, ascending.
    pub fn iter_dirty(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let base = i as u64 * 64;
            let mut rest = w;
            core::iter::from_fn(move || {
                if rest == 0 {
                    return None;
                }
                let bit = u64::from(rest.trailing_zeros());
                rest &= rest - 1;
                Some(base + bit)
            })
        })
    }
}

// ----------------------------------------------------------------------------------------
// vCPU context, event-channel status

/// A vCPU's `vcpu_guest_context_any_t` as returned by `xc_vcpu_getcontext`.
#[derive(Clone)]
pub struct VcpuContext(Box<t::vcpu_guest_context_any_t>);

impl VcpuContext {
    /// The 64-bit view (x86-64 guests, including HVM/PVH).
    pub fn x64(&self) -> &t::vcpu_guest_context_x86_64_t {
        // SAFETY: every member of the union is plain integers, so any bit pattern is a valid
        // value of the x64 member.
        unsafe { &self.0.x64 }
    }

    /// The raw bytes of the whole union.
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: the union is plain data of size_of::<vcpu_guest_context_any_t>() bytes,
        // all initialised (zeroed before Xen filled it).
        unsafe {
            core::slice::from_raw_parts(
                (&*self.0 as *const t::vcpu_guest_context_any_t).cast::<u8>(),
                core::mem::size_of::<t::vcpu_guest_context_any_t>(),
            )
        }
    }
}

impl core::fmt::Debug for VcpuContext {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let x = self.x64();
        f.debug_struct("VcpuContext")
            .field("flags", &x.flags)
            .field("ctrlreg", &x.ctrlreg)
            .finish_non_exhaustive()
    }
}

/// State of an event channel (`EVTCHNSTAT_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EvtchnState {
    /// Not in use.
    Closed,
    /// Waiting for `remote_domid` to bind.
    Unbound {
        /// Domain allowed to bind.
        remote_domid: u16,
    },
    /// Connected to `remote_port` in `remote_domid`.
    Interdomain {
        /// Remote domain.
        remote_domid: u16,
        /// Remote port.
        remote_port: u32,
    },
    /// Bound to a physical IRQ.
    Pirq(u32),
    /// Bound to a virtual IRQ.
    Virq(u32),
    /// An IPI channel.
    Ipi,
    /// A status code this crate does not know.
    Unknown(u32),
}

/// Result of `xc_evtchn_status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EvtchnStatus {
    /// Domain asked about.
    pub domid: u16,
    /// Port asked about.
    pub port: u32,
    /// vCPU notified by the channel.
    pub vcpu: u32,
    /// The channel's state.
    pub state: EvtchnState,
}

impl EvtchnStatus {
    /// Decodes a raw `evtchn_status`.
    pub fn from_raw(raw: &t::xc_evtchn_status_t) -> Self {
        // SAFETY (all union reads below): the union members are plain integers, so reading
        // any member is defined; `status` says which one Xen filled.
        let state = match raw.status {
            t::EVTCHNSTAT_closed => EvtchnState::Closed,
            t::EVTCHNSTAT_unbound => EvtchnState::Unbound {
                // SAFETY: see above.
                remote_domid: unsafe { raw.u.unbound.dom },
            },
            t::EVTCHNSTAT_interdomain => {
                // SAFETY: see above.
                let i = unsafe { raw.u.interdomain };
                EvtchnState::Interdomain {
                    remote_domid: i.dom,
                    remote_port: i.port,
                }
            }
            // SAFETY: see above.
            t::EVTCHNSTAT_pirq => EvtchnState::Pirq(unsafe { raw.u.pirq }),
            // SAFETY: see above.
            t::EVTCHNSTAT_virq => EvtchnState::Virq(unsafe { raw.u.virq }),
            t::EVTCHNSTAT_ipi => EvtchnState::Ipi,
            other => EvtchnState::Unknown(other),
        };
        Self {
            domid: raw.dom,
            port: raw.port,
            vcpu: raw.vcpu,
            state,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_gate_accepts_4_17_only() {
        assert_eq!(
            check_version((4 << 16) | 17).unwrap(),
            XenVersion {
                major: 4,
                minor: 17
            }
        );
        for (maj, min) in [(4u32, 16u32), (4, 18), (4, 170), (3, 17), (5, 0), (0, 0)] {
            match check_version((maj << 16) | min) {
                Err(XcError::WrongXenVersion {
                    found_major,
                    found_minor,
                }) => assert_eq!((found_major, found_minor), (maj, min)),
                other => panic!("{maj}.{min}: {other:?}"),
            }
        }
        let msg = check_version(0x4_0012).unwrap_err().to_string();
        assert_eq!(
            msg,
            "the running hypervisor is Xen 4.18, but libxc-ffi supports Xen 4.17 only \
             (its domctl/libxenctrl ABI changes between releases)"
        );
        assert_eq!(XenVersion::from_raw(0x4_0011).to_string(), "4.17");
    }

    fn raw_info(domid: u16, flags: u32) -> t::xc_domaininfo_t {
        let mut r = zeroed_dominfo();
        r.domain = domid;
        r.flags = flags;
        r.tot_pages = 262_144;
        r.max_pages = 262_400;
        r.shared_info_frame = 0xfefff;
        r.cpu_time = 5_000_000_000;
        r.nr_online_vcpus = 4;
        r.max_vcpu_id = 3;
        r.handle = [
            0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab,
            0xcd, 0xef,
        ];
        r
    }

    #[test]
    fn domain_info_decodes_every_flag() {
        let d = DomainInfo::from_raw(&raw_info(
            7,
            t::XEN_DOMINF_hvm_guest | t::XEN_DOMINF_hap | t::XEN_DOMINF_paused,
        ));
        assert_eq!(d.domid, 7);
        assert!(d.hvm && d.hap && d.paused);
        assert!(!d.running && !d.dying && !d.blocked && !d.debugged && !d.xs_domain);
        assert_eq!(d.shutdown, None);
        assert_eq!(d.nr_pages, 262_144);
        assert_eq!(d.max_pages, 262_400);
        assert_eq!(d.shared_info_frame, 0xfefff);
        assert_eq!(d.cpu_time, 5_000_000_000);
        assert_eq!(d.max_vcpu_id, Some(3));
        assert_eq!(d.nr_online_vcpus, 4);
        assert_eq!(d.uuid(), "12345678-9abc-def0-0123-456789abcdef");

        let all = t::XEN_DOMINF_dying
            | t::XEN_DOMINF_running
            | t::XEN_DOMINF_blocked
            | t::XEN_DOMINF_debugged
            | t::XEN_DOMINF_xs_domain;
        let d = DomainInfo::from_raw(&raw_info(1, all));
        assert!(d.dying && d.running && d.blocked && d.debugged && d.xs_domain);
        assert!(!d.hvm && !d.hap && !d.paused);
        assert_eq!(d.flags, all);
    }

    #[test]
    fn guest_type_follows_xens_emulation_flags() {
        let hvm_flags = t::XEN_X86_EMU_ALL & !t::XEN_X86_EMU_VPCI;
        let mut r = raw_info(4, t::XEN_DOMINF_hvm_guest | t::XEN_DOMINF_hap);
        r.arch_config.emulation_flags = hvm_flags;
        let d = DomainInfo::from_raw(&r);
        assert_eq!(
            (d.guest_type, d.emulation_flags),
            (GuestType::Hvm, hvm_flags)
        );
        r.arch_config.emulation_flags = t::XEN_X86_EMU_LAPIC;
        assert_eq!(DomainInfo::from_raw(&r).guest_type, GuestType::Pvh);
        r.flags = 0;
        r.arch_config.emulation_flags = 0;
        assert_eq!(DomainInfo::from_raw(&r).guest_type, GuestType::Pv);
    }

    #[test]
    fn shutdown_reason_is_decoded_only_when_shut_down() {
        let with_code = |code: u32| t::XEN_DOMINF_shutdown | (code << t::XEN_DOMINF_shutdownshift);
        let reason = |flags| DomainInfo::from_raw(&raw_info(2, flags)).shutdown;
        assert_eq!(
            reason(with_code(t::SHUTDOWN_poweroff)),
            Some(ShutdownReason::Poweroff)
        );
        assert_eq!(
            reason(with_code(t::SHUTDOWN_reboot)),
            Some(ShutdownReason::Reboot)
        );
        assert_eq!(
            reason(with_code(t::SHUTDOWN_suspend)),
            Some(ShutdownReason::Suspend)
        );
        assert_eq!(
            reason(with_code(t::SHUTDOWN_crash)),
            Some(ShutdownReason::Crash)
        );
        assert_eq!(
            reason(with_code(t::SHUTDOWN_watchdog)),
            Some(ShutdownReason::Watchdog)
        );
        assert_eq!(
            reason(with_code(t::SHUTDOWN_soft_reset)),
            Some(ShutdownReason::SoftReset)
        );
        assert_eq!(reason(with_code(200)), Some(ShutdownReason::Other(200)));
        // A code without the shutdown flag is not a shutdown.
        assert_eq!(
            reason(t::SHUTDOWN_crash << t::XEN_DOMINF_shutdownshift),
            None
        );
    }

    #[test]
    fn domain_without_vcpus_has_no_max_vcpu_id() {
        let mut r = raw_info(3, 0);
        r.max_vcpu_id = u32::MAX;
        assert_eq!(DomainInfo::from_raw(&r).max_vcpu_id, None);
    }

    #[test]
    fn dirty_bitmap_decodes_xen_byte_layout() {
        // pfn 0, 9, 63, 64 and 70 dirty; byte layout: bit pfn%8 of byte pfn/8.
        let mut bytes = vec![0u8; 16];
        for pfn in [0usize, 9, 63, 64, 70] {
            bytes[pfn / 8] |= 1 << (pfn % 8);
        }
        let b = DirtyBitmap::from_bytes(&bytes, 128);
        assert_eq!(b.pages(), 128);
        assert_eq!(b.count(), 5);
        assert!(b.iter_dirty().eq([0, 9, 63, 64, 70]));
        assert!(b.is_dirty(63) && b.is_dirty(64) && !b.is_dirty(65));
        assert_eq!(
            b.words(),
            &[(1 << 0) | (1 << 9) | (1 << 63), (1 << 0) | (1 << 6)]
        );
    }

    #[test]
    fn dirty_bitmap_ignores_bits_beyond_the_page_count() {
        // 70 pages: the junk in bits 70.. of the second word must not count.
        let b = DirtyBitmap::from_bytes(&[0xff; 16], 70);
        assert_eq!(b.count(), 70);
        assert!(b.is_dirty(69) && !b.is_dirty(70) && !b.is_dirty(10_000));
        // Short input: missing bytes are clean.
        let b = DirtyBitmap::from_bytes(&[0x01], 200);
        assert_eq!((b.count(), b.words().len()), (1, 4));
        assert_eq!(bitmap_bytes(0), 0);
        assert_eq!(bitmap_bytes(1), 8);
        assert_eq!(bitmap_bytes(64), 8);
        assert_eq!(bitmap_bytes(65), 16);
    }

    fn record(code: u16, inst: u16, body: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&code.to_le_bytes());
        v.extend_from_slice(&inst.to_le_bytes());
        v.extend_from_slice(&(body.len() as u32).to_le_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn hvm_records_are_found_by_typecode_and_instance() {
        let mut ctx = record(1, 0, &[0xaa; 24]);
        ctx.extend(record(2, 0, &[0; 8]));
        ctx.extend(record(2, 1, &[1, 2, 3]));
        ctx.extend(record(0, 0, &[]));
        ctx.extend(record(2, 2, &[9])); // after END: ignored
        assert_eq!(find_hvm_record(&ctx, 2, 1), Ok(Some(&[1u8, 2, 3][..])));
        assert_eq!(
            find_hvm_record(&ctx, 1, 0).unwrap().map(<[u8]>::len),
            Some(24)
        );
        assert_eq!(find_hvm_record(&ctx, 2, 2), Ok(None));
        assert_eq!(find_hvm_record(&ctx, 5, 0), Ok(None));
        assert_eq!(find_hvm_record(&[], 2, 0), Ok(None));
    }

    #[test]
    fn malformed_hvm_contexts_are_reported() {
        let mut ctx = record(2, 0, &[0; 8]);
        ctx.truncate(12);
        let err = find_hvm_record(&ctx, 3, 0).unwrap_err();
        assert!(err.contains("claims 8 bytes, past the end (12)"), "{err}");
        let err = find_hvm_record(&[1, 0, 0], 3, 0).unwrap_err();
        assert!(err.contains("truncated descriptor at offset 0"), "{err}");
        let mut huge = record(2, 0, &[]);
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(find_hvm_record(&huge, 3, 0).is_err());
    }

    #[test]
    fn dirty_bitmap_set_union_clear() {
        let mut a = DirtyBitmap::new(100);
        a.set(5);
        a.set(99);
        a.set(100); // beyond the end: ignored
        let mut b = DirtyBitmap::new(200);
        b.set(6);
        b.set(150);
        a.union_with(&b);
        assert!(a.iter_dirty().eq([5, 6, 99]));
        a.clear();
        assert_eq!(a.count(), 0);
    }

    fn raw_status(status: u32) -> t::xc_evtchn_status_t {
        // SAFETY: plain integers; all-zero is valid.
        let mut s: t::xc_evtchn_status_t = unsafe { core::mem::zeroed() };
        s.dom = 9;
        s.port = 12;
        s.vcpu = 2;
        s.status = status;
        s
    }

    #[test]
    fn evtchn_status_decodes_each_state() {
        let mut s = raw_status(t::EVTCHNSTAT_interdomain);
        s.u.interdomain.dom = 0;
        s.u.interdomain.port = 33;
        let d = EvtchnStatus::from_raw(&s);
        assert_eq!((d.domid, d.port, d.vcpu), (9, 12, 2));
        assert_eq!(
            d.state,
            EvtchnState::Interdomain {
                remote_domid: 0,
                remote_port: 33
            }
        );
        let mut s = raw_status(t::EVTCHNSTAT_unbound);
        s.u.unbound.dom = 4;
        assert_eq!(
            EvtchnStatus::from_raw(&s).state,
            EvtchnState::Unbound { remote_domid: 4 }
        );
        let mut s = raw_status(t::EVTCHNSTAT_pirq);
        s.u.pirq = 17;
        assert_eq!(EvtchnStatus::from_raw(&s).state, EvtchnState::Pirq(17));
        let mut s = raw_status(t::EVTCHNSTAT_virq);
        s.u.virq = 1;
        assert_eq!(EvtchnStatus::from_raw(&s).state, EvtchnState::Virq(1));
        assert_eq!(
            EvtchnStatus::from_raw(&raw_status(t::EVTCHNSTAT_ipi)).state,
            EvtchnState::Ipi
        );
        assert_eq!(
            EvtchnStatus::from_raw(&raw_status(t::EVTCHNSTAT_closed)).state,
            EvtchnState::Closed
        );
        assert_eq!(
            EvtchnStatus::from_raw(&raw_status(77)).state,
            EvtchnState::Unknown(77)
        );
    }

    #[test]
    fn opening_the_real_library_without_xen_fails_with_errno() {
        if std::path::Path::new("/dev/xen/privcmd").exists() {
            eprintln!("skipped: this machine runs Xen (see tests/dom0.rs)");
            return;
        }
        match XenCtrl::open() {
            // libxen-dev installed: the library loads, xc_interface_open fails (no privcmd).
            Err(XcError::Open { errno }) => {
                assert_ne!(errno.raw(), 0);
                let msg = XcError::Open { errno }.to_string();
                assert!(msg.starts_with("xc_interface_open failed: errno"), "{msg}");
            }
            // No Xen libraries at all.
            Err(XcError::Load(LoadError::NotFound { soname, .. })) => {
                assert_eq!(soname, "libxenctrl.so.4.17");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
