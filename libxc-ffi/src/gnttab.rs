//! libxengnttab: map pages a guest granted to us.
//!
//! [`XenGnttab`] is `Send + Sync`: the handle is an fd to the gntdev driver plus immutable
//! data, and each map/unmap is a self-contained ioctl/mmap pair serialised by the kernel.
//! A [`GrantMapping`] keeps the handle (and the library) alive, unmaps on drop, and is `Send`
//! but not `Sync`; it gives access to the guest's memory only through [`GuestMemory`].

use core::ffi::c_void;
use core::ptr::NonNull;
use std::sync::Arc;

use crate::errno::{clear_errno, Errno};
use crate::loader::{self, LibraryPaths, LoadError};
use crate::logger::logger_ptr;
use crate::mem::{impl_guest_memory, Region};
use crate::sys::types as t;
use crate::sys::xengnttab::XenGnttabLib;

/// Size of a grant-mapped page.
pub const PAGE_SIZE: usize = 4096;

/// Errors of the libxengnttab wrappers.
#[derive(Debug, thiserror::Error)]
pub enum GnttabError {
    /// libxengnttab could not be loaded.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// `xengnttab_open` failed.
    #[error("xengnttab_open failed: {errno} (needs a Xen dom0 with /dev/xen/gntdev)")]
    Open {
        /// errno after the call.
        errno: Errno,
    },
    /// Mapping grant references failed (no page was mapped).
    #[error(
        "{op} of {count} grant ref(s) from domain {domid} (first ref {first_ref}) failed: {errno}"
    )]
    Map {
        /// The libxengnttab function.
        op: &'static str,
        /// The granting domain (the first one, for multi-domain maps).
        domid: u32,
        /// First grant reference asked for.
        first_ref: u32,
        /// Number of references.
        count: usize,
        /// errno after the call.
        errno: Errno,
    },
    /// Bad arguments, refused before calling the library.
    #[error("{op}: {reason}")]
    Invalid {
        /// The operation.
        op: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// Another call failed.
    #[error("{op} failed: {errno}")]
    Call {
        /// The libxengnttab function.
        op: &'static str,
        /// errno after the call.
        errno: Errno,
    },
}

struct GnttabInner {
    lib: XenGnttabLib,
    h: NonNull<t::xengnttab_handle>,
}

// SAFETY: the handle is an fd plus immutable data; see the module documentation.
unsafe impl Send for GnttabInner {}
// SAFETY: concurrent map/unmap calls are independent ioctls on the fd; see the module docs.
unsafe impl Sync for GnttabInner {}

impl Drop for GnttabInner {
    fn drop(&mut self) {
        // SAFETY: h came from xengnttab_open and is closed once, after every mapping (each
        // holds an Arc of this) has been unmapped.
        unsafe { (self.lib.xengnttab_close)(self.h.as_ptr()) };
    }
}

/// An open grant-table device handle (`xengnttab_handle *`), closed when it and all its
/// mappings are dropped.
#[derive(Clone)]
pub struct XenGnttab {
    inner: Arc<GnttabInner>,
}

impl core::fmt::Debug for XenGnttab {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("XenGnttab").finish_non_exhaustive()
    }
}

fn prot(writable: bool) -> i32 {
    if writable {
        libc::PROT_READ | libc::PROT_WRITE
    } else {
        libc::PROT_READ
    }
}

impl XenGnttab {
    /// Loads libxengnttab.so.1 and opens a handle.
    pub fn open() -> Result<Self, GnttabError> {
        Self::open_with(&LibraryPaths::default())
    }

    /// Like [`XenGnttab::open`], with the library taken from `paths.xengnttab`.
    pub fn open_with(paths: &LibraryPaths) -> Result<Self, GnttabError> {
        let lib = loader::load(
            &paths.xengnttab,
            &paths.search_dirs,
            XenGnttabLib::from_library::<libloading::Library>,
        )?;
        clear_errno();
        // SAFETY: the static logger outlives the handle; flags 0.
        let raw = unsafe { (lib.xengnttab_open)(logger_ptr(), 0) };
        let Some(h) = NonNull::new(raw) else {
            return Err(GnttabError::Open {
                errno: Errno::last(),
            });
        };
        Ok(Self {
            inner: Arc::new(GnttabInner { lib, h }),
        })
    }

    /// `xengnttab_set_max_grants`: how many grants this handle may map at once (call before
    /// the first map).
    pub fn set_max_grants(&self, count: u32) -> Result<(), GnttabError> {
        // SAFETY: plain call on a valid handle.
        let rc = unsafe { (self.inner.lib.xengnttab_set_max_grants)(self.inner.h.as_ptr(), count) };
        if rc != 0 {
            return Err(GnttabError::Call {
                op: "xengnttab_set_max_grants",
                errno: Errno::last(),
            });
        }
        Ok(())
    }

    fn finish(
        &self,
        p: *mut c_void,
        pages: usize,
        writable: bool,
        op: &'static str,
        domid: u32,
        first_ref: u32,
    ) -> Result<GrantMapping, GnttabError> {
        let Some(ptr) = NonNull::new(p.cast::<u8>()) else {
            return Err(GnttabError::Map {
                op,
                domid,
                first_ref,
                count: pages,
                errno: Errno::last(),
            });
        };
        // SAFETY: libxengnttab mapped `pages` pages at ptr with the requested protection;
        // they stay mapped until GrantMapping::drop unmaps them after dropping the Region
        // (field order), and we never create references into them.
        let region = unsafe { Region::new(ptr, pages * PAGE_SIZE, writable) };
        Ok(GrantMapping {
            region,
            pages,
            domid,
            gnttab: Arc::clone(&self.inner),
        })
    }

    /// Maps one grant reference `gref` of `domid`.
    pub fn map_grant_ref(
        &self,
        domid: u32,
        gref: u32,
        writable: bool,
    ) -> Result<GrantMapping, GnttabError> {
        clear_errno();
        // SAFETY: plain call on a valid handle; the result is checked by `finish`.
        let p = unsafe {
            (self.inner.lib.xengnttab_map_grant_ref)(
                self.inner.h.as_ptr(),
                domid,
                gref,
                prot(writable),
            )
        };
        self.finish(p, 1, writable, "xengnttab_map_grant_ref", domid, gref)
    }

    /// Maps several grant references of one domain into one contiguous range (page `i` of
    /// the mapping is `refs[i]`).  All or nothing.
    pub fn map_grant_refs(
        &self,
        domid: u32,
        refs: &[u32],
        writable: bool,
    ) -> Result<GrantMapping, GnttabError> {
        let op = "xengnttab_map_domain_grant_refs";
        let count = check_count(op, refs.len())?;
        let mut refs_copy = refs.to_vec();
        clear_errno();
        // SAFETY: refs_copy holds `count` references (the prototype is non-const; the library
        // only reads it).
        let p = unsafe {
            (self.inner.lib.xengnttab_map_domain_grant_refs)(
                self.inner.h.as_ptr(),
                count,
                domid,
                refs_copy.as_mut_ptr(),
                prot(writable),
            )
        };
        self.finish(p, refs.len(), writable, op, domid, refs[0])
    }

    /// Maps grant references from possibly different domains (`(domid, gref)` pairs) into
    /// one contiguous range.  All or nothing.
    pub fn map_grant_refs_multi(
        &self,
        grants: &[(u32, u32)],
        writable: bool,
    ) -> Result<GrantMapping, GnttabError> {
        let op = "xengnttab_map_grant_refs";
        let count = check_count(op, grants.len())?;
        let mut domids: Vec<u32> = grants.iter().map(|g| g.0).collect();
        let mut refs: Vec<u32> = grants.iter().map(|g| g.1).collect();
        clear_errno();
        // SAFETY: both arrays hold `count` entries; the library only reads them.
        let p = unsafe {
            (self.inner.lib.xengnttab_map_grant_refs)(
                self.inner.h.as_ptr(),
                count,
                domids.as_mut_ptr(),
                refs.as_mut_ptr(),
                prot(writable),
            )
        };
        self.finish(p, grants.len(), writable, op, grants[0].0, grants[0].1)
    }
}

fn check_count(op: &'static str, n: usize) -> Result<u32, GnttabError> {
    if n == 0 {
        return Err(GnttabError::Invalid {
            op,
            reason: "no grant references given".into(),
        });
    }
    u32::try_from(n).map_err(|_| GnttabError::Invalid {
        op,
        reason: format!("{n} grant references is too many"),
    })
}

/// Pages mapped from grant references; unmapped on drop.  Access through [`GuestMemory`](crate::GuestMemory)
/// (`use libxc_ffi::GuestMemory;`).
pub struct GrantMapping {
    // Only a pointer and a length: Drop::drop unmaps and nothing uses it afterwards.
    region: Region,
    pages: usize,
    domid: u32,
    gnttab: Arc<GnttabInner>,
}

// SAFETY: the mapping is process memory plus a Send + Sync handle; moving it between threads
// is fine.  Not Sync: concurrent Rust writers through `&self` are not allowed.
unsafe impl Send for GrantMapping {}

impl GrantMapping {
    fn region(&self) -> &Region {
        &self.region
    }

    /// Number of pages mapped.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// The granting domain (for [`XenGnttab::map_grant_refs_multi`], the first pair's).
    pub fn domid(&self) -> u32 {
        self.domid
    }
}

impl_guest_memory!(GrantMapping);

impl core::fmt::Debug for GrantMapping {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("GrantMapping")
            .field("domid", &self.domid)
            .field("pages", &self.pages)
            .field("region", &self.region)
            .finish()
    }
}

impl Drop for GrantMapping {
    fn drop(&mut self) {
        // SAFETY: region.as_ptr() is the start of `pages` pages mapped by this handle and not
        // yet unmapped; nothing accesses them after this (we are being dropped).
        let rc = unsafe {
            (self.gnttab.lib.xengnttab_unmap)(
                self.gnttab.h.as_ptr(),
                self.region.as_ptr().cast::<c_void>(),
                self.pages as u32,
            )
        };
        if rc != 0 {
            log::warn!(
                "xengnttab_unmap of {} page(s) failed: {}",
                self.pages,
                Errno::last()
            );
        }
    }
}
