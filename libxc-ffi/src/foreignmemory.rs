//! libxenforeignmemory: map a guest's pages by frame number, and map guest resources
//! (e.g. its grant-table frames) with `xenforeignmemory_map_resource`.
//!
//! [`XenForeignMemory`] is `Send + Sync` (an fd to privcmd plus immutable data; each map is a
//! self-contained mmap + ioctl).  [`ForeignMapping`] and [`ResourceMapping`] keep the handle
//! alive, unmap on drop, are `Send` but not `Sync`, and expose memory only via
//! [`GuestMemory`](crate::GuestMemory).

use core::ffi::c_void;
use core::ptr::NonNull;
use std::sync::Arc;

use crate::errno::{clear_errno, Errno};
use crate::loader::{self, LibraryPaths, LoadError};
use crate::logger::logger_ptr;
use crate::mem::{impl_guest_memory, Region};
use crate::sys::types as t;
use crate::sys::xenforeignmemory::XenForeignMemoryLib;

/// Size of a guest page.
pub const PAGE_SIZE: usize = 4096;

/// Pages mapped at a time by [`XenForeignMemory::read_pages`] / `write_pages` (4 MiB).
pub const COPY_BATCH: usize = 1024;

/// A page of a batch that could not be mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PageError {
    /// Index of the page in the request.
    pub index: usize,
    /// The guest frame.
    pub pfn: u64,
    /// Why (from the per-page error array).
    pub errno: Errno,
}

/// Errors of the libxenforeignmemory wrappers.
#[derive(Debug, thiserror::Error)]
pub enum ForeignMemoryError {
    /// libxenforeignmemory could not be loaded.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// `xenforeignmemory_open` failed.
    #[error(
        "xenforeignmemory_open failed: {errno} (needs root in a Xen dom0 with /dev/xen/privcmd)"
    )]
    Open {
        /// errno after the call.
        errno: Errno,
    },
    /// The whole map call failed.
    #[error("{op} of {count} page(s) of domain {domid} failed: {errno}")]
    Map {
        /// The libxenforeignmemory function.
        op: &'static str,
        /// The guest.
        domid: u32,
        /// Pages (or frames) asked for.
        count: usize,
        /// errno after the call.
        errno: Errno,
    },
    /// One page of a multi-page map failed; the rest was unmapped again.
    #[error("xenforeignmemory_map of domain {domid}: page {index} (pfn {pfn:#x}) failed: {errno}")]
    Page {
        /// The guest.
        domid: u32,
        /// Index of the page in the request.
        index: usize,
        /// The guest frame that could not be mapped.
        pfn: u64,
        /// The per-page error.
        errno: Errno,
    },
    /// Bad arguments, refused before calling the library.
    #[error("{op} for domain {domid}: {reason}")]
    Invalid {
        /// The operation.
        op: &'static str,
        /// The guest.
        domid: u32,
        /// What was wrong.
        reason: String,
    },
    /// A copy into or out of the mapping was refused (cannot happen for whole pages).
    #[error(transparent)]
    Mem(#[from] crate::mem::MemError),
    /// `xenforeignmemory_resource_size` failed.
    #[error(
        "xenforeignmemory_resource_size(type {kind}, id {id}) of domain {domid} failed: {errno}"
    )]
    ResourceSize {
        /// The guest.
        domid: u32,
        /// XENMEM_resource_* type.
        kind: u32,
        /// Type-specific id.
        id: u32,
        /// errno after the call.
        errno: Errno,
    },
}

struct FmemInner {
    lib: XenForeignMemoryLib,
    h: NonNull<t::xenforeignmemory_handle>,
}

// SAFETY: an fd plus immutable data; see the module documentation.
unsafe impl Send for FmemInner {}
// SAFETY: concurrent map/unmap calls are independent mmap/ioctl calls on the fd.
unsafe impl Sync for FmemInner {}

impl Drop for FmemInner {
    fn drop(&mut self) {
        // SAFETY: h came from xenforeignmemory_open and is closed once, after every mapping
        // (each holds an Arc of this) has been unmapped.
        unsafe { (self.lib.xenforeignmemory_close)(self.h.as_ptr()) };
    }
}

/// An open foreign-memory handle (`xenforeignmemory_handle *`), closed when it and all its
/// mappings are dropped.
#[derive(Clone)]
pub struct XenForeignMemory {
    inner: Arc<FmemInner>,
}

impl core::fmt::Debug for XenForeignMemory {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("XenForeignMemory").finish_non_exhaustive()
    }
}

fn prot(writable: bool) -> i32 {
    if writable {
        libc::PROT_READ | libc::PROT_WRITE
    } else {
        libc::PROT_READ
    }
}

/// The first failed page of a per-page error array, if any: `(index, pfn, errno)`.
pub fn first_page_error(pfns: &[u64], errs: &[i32]) -> Option<(usize, u64, Errno)> {
    errs.iter()
        .zip(pfns)
        .enumerate()
        .find(|(_, (&e, _))| e != 0)
        // The array holds errno values, positive or negated depending on the path.
        .map(|(i, (&e, &pfn))| (i, pfn, Errno(e.abs())))
}

impl XenForeignMemory {
    /// Loads libxenforeignmemory.so.1 and opens a handle.
    pub fn open() -> Result<Self, ForeignMemoryError> {
        Self::open_with(&LibraryPaths::default())
    }

    /// Like [`XenForeignMemory::open`], with the library from `paths.xenforeignmemory`.
    pub fn open_with(paths: &LibraryPaths) -> Result<Self, ForeignMemoryError> {
        let lib = loader::load(
            &paths.xenforeignmemory,
            &paths.search_dirs,
            XenForeignMemoryLib::from_library::<libloading::Library>,
        )?;
        clear_errno();
        // SAFETY: the static logger outlives the handle; flags 0.
        let raw = unsafe { (lib.xenforeignmemory_open)(logger_ptr(), 0) };
        let Some(h) = NonNull::new(raw) else {
            return Err(ForeignMemoryError::Open {
                errno: Errno::last(),
            });
        };
        Ok(Self {
            inner: Arc::new(FmemInner { lib, h }),
        })
    }

    /// Maps `pfns` and returns the mapping together with the per-page error array (0 = ok,
    /// else an errno, possibly negated).  Private: pages that failed are not mapped and must
    /// never be touched, so such a mapping never leaves this module.
    fn map_with_errors(
        &self,
        domid: u32,
        pfns: &[u64],
        writable: bool,
    ) -> Result<(ForeignMapping, Vec<i32>), ForeignMemoryError> {
        let op = "xenforeignmemory_map";
        if pfns.is_empty() {
            return Err(ForeignMemoryError::Invalid {
                op,
                domid,
                reason: "no pages given".into(),
            });
        }
        let arr: Vec<t::xen_pfn_t> = pfns.to_vec();
        let mut errs = vec![0i32; pfns.len()];
        clear_errno();
        // SAFETY: arr and errs both hold pfns.len() entries.
        let p = unsafe {
            (self.inner.lib.xenforeignmemory_map)(
                self.inner.h.as_ptr(),
                domid,
                prot(writable),
                pfns.len(),
                arr.as_ptr(),
                errs.as_mut_ptr(),
            )
        };
        let Some(ptr) = NonNull::new(p.cast::<u8>()) else {
            return Err(ForeignMemoryError::Map {
                op,
                domid,
                count: pfns.len(),
                errno: Errno::last(),
            });
        };
        // SAFETY: the library reserved pfns.len() pages at ptr with the requested protection
        // (the ones whose err entry is 0 are mapped); they stay reserved until
        // ForeignMapping::drop, and no references are made into them.
        let region = unsafe { Region::new(ptr, pfns.len() * PAGE_SIZE, writable) };
        let mapping = ForeignMapping {
            region,
            pages: pfns.len(),
            domid,
            fmem: Arc::clone(&self.inner),
        };
        Ok((mapping, errs))
    }

    /// Maps guest frames `pfns` of `domid` into one contiguous range (page `i` is `pfns[i]`).
    /// If any page fails, everything is unmapped and the error names the first failed pfn.
    pub fn map(
        &self,
        domid: u32,
        pfns: &[u64],
        writable: bool,
    ) -> Result<ForeignMapping, ForeignMemoryError> {
        let (mapping, errs) = self.map_with_errors(domid, pfns, writable)?;
        if let Some((index, pfn, errno)) = first_page_error(pfns, &errs) {
            drop(mapping); // unmaps the partial mapping
            return Err(ForeignMemoryError::Page {
                domid,
                index,
                pfn,
                errno,
            });
        }
        Ok(mapping)
    }

    fn check_buffer(
        op: &'static str,
        domid: u32,
        pfns: &[u64],
        len: usize,
    ) -> Result<(), ForeignMemoryError> {
        if pfns.len().checked_mul(PAGE_SIZE) == Some(len) {
            Ok(())
        } else {
            Err(ForeignMemoryError::Invalid {
                op,
                domid,
                reason: format!(
                    "buffer of {len} bytes for {} page(s) (need {} bytes)",
                    pfns.len(),
                    pfns.len().saturating_mul(PAGE_SIZE)
                ),
            })
        }
    }

    /// Copies guest pages `pfns` (any order, duplicates allowed) into `buf`, page `i` at
    /// `buf[i * PAGE_SIZE..]`; `buf.len()` must be `pfns.len() * PAGE_SIZE`.  Pages that
    /// cannot be mapped do not stop the batch: their slots are zero-filled and they are
    /// returned (empty = every page copied).  Maps at most [`COPY_BATCH`] pages at a time.
    pub fn read_pages(
        &self,
        domid: u32,
        pfns: &[u64],
        buf: &mut [u8],
    ) -> Result<Vec<PageError>, ForeignMemoryError> {
        Self::check_buffer("read_pages", domid, pfns, buf.len())?;
        let mut failed = Vec::new();
        for (c, chunk) in pfns.chunks(COPY_BATCH).enumerate() {
            let base = c * COPY_BATCH;
            let (mapping, errs) = self.map_with_errors(domid, chunk, false)?;
            for (i, (&pfn, &err)) in chunk.iter().zip(&errs).enumerate() {
                let slot = &mut buf[(base + i) * PAGE_SIZE..][..PAGE_SIZE];
                if err != 0 {
                    slot.fill(0);
                    failed.push(PageError {
                        index: base + i,
                        pfn,
                        errno: Errno(err.abs()),
                    });
                } else {
                    // In bounds by construction; only mapped pages are touched.
                    mapping.region.read_into_checked(i * PAGE_SIZE, slot)?;
                }
            }
        }
        Ok(failed)
    }

    /// Copies `data` (`pfns.len() * PAGE_SIZE` bytes) into guest pages `pfns`.  Pages that
    /// cannot be mapped are skipped and returned; every other page is written.
    pub fn write_pages(
        &self,
        domid: u32,
        pfns: &[u64],
        data: &[u8],
    ) -> Result<Vec<PageError>, ForeignMemoryError> {
        Self::check_buffer("write_pages", domid, pfns, data.len())?;
        let mut failed = Vec::new();
        for (c, chunk) in pfns.chunks(COPY_BATCH).enumerate() {
            let base = c * COPY_BATCH;
            let (mapping, errs) = self.map_with_errors(domid, chunk, true)?;
            for (i, (&pfn, &err)) in chunk.iter().zip(&errs).enumerate() {
                if err != 0 {
                    failed.push(PageError {
                        index: base + i,
                        pfn,
                        errno: Errno(err.abs()),
                    });
                } else {
                    let src = &data[(base + i) * PAGE_SIZE..][..PAGE_SIZE];
                    mapping.region.write_from_checked(i * PAGE_SIZE, src)?;
                }
            }
        }
        Ok(failed)
    }

    /// Maps one guest frame.
    pub fn map_page(
        &self,
        domid: u32,
        pfn: u64,
        writable: bool,
    ) -> Result<ForeignMapping, ForeignMemoryError> {
        self.map(domid, &[pfn], writable)
    }

    /// `xenforeignmemory_map_resource`: frames `frame..frame+nr_frames` of resource
    /// (`kind` = `XENMEM_resource_*`, `id`) of `domid`, e.g. the grant table with
    /// [`crate::consts::XENMEM_resource_grant_table`] and
    /// [`crate::consts::XENMEM_resource_grant_table_id_shared`].
    pub fn map_resource(
        &self,
        domid: u32,
        kind: u32,
        id: u32,
        frame: u64,
        nr_frames: u64,
        writable: bool,
    ) -> Result<ResourceMapping, ForeignMemoryError> {
        let op = "xenforeignmemory_map_resource";
        let dom = u16::try_from(domid).map_err(|_| ForeignMemoryError::Invalid {
            op,
            domid,
            reason: "domain id does not fit domid_t".into(),
        })?;
        let len = usize::try_from(nr_frames)
            .ok()
            .filter(|&n| n > 0)
            .and_then(|n| n.checked_mul(PAGE_SIZE))
            .ok_or_else(|| ForeignMemoryError::Invalid {
                op,
                domid,
                reason: format!("cannot map {nr_frames} frames"),
            })?;
        let mut addr: *mut c_void = core::ptr::null_mut();
        clear_errno();
        // SAFETY: addr is a valid in/out pointer (NULL = no placement hint); flags 0.
        let fres = unsafe {
            (self.inner.lib.xenforeignmemory_map_resource)(
                self.inner.h.as_ptr(),
                dom,
                kind,
                id,
                frame,
                nr_frames,
                &mut addr,
                prot(writable),
                0,
            )
        };
        let (Some(fres), Some(ptr)) = (NonNull::new(fres), NonNull::new(addr.cast::<u8>())) else {
            return Err(ForeignMemoryError::Map {
                op,
                domid,
                count: len / PAGE_SIZE,
                errno: Errno::last(),
            });
        };
        // SAFETY: the library mapped nr_frames frames at addr; they stay mapped until
        // ResourceMapping::drop releases fres, and no references are made into them.
        let region = unsafe { Region::new(ptr, len, writable) };
        Ok(ResourceMapping {
            region,
            domid,
            fres,
            fmem: Arc::clone(&self.inner),
        })
    }

    /// `xenforeignmemory_resource_size`: size in bytes of resource (`kind`, `id`).
    pub fn resource_size(
        &self,
        domid: u32,
        kind: u32,
        id: u32,
    ) -> Result<usize, ForeignMemoryError> {
        let dom = u16::try_from(domid).map_err(|_| ForeignMemoryError::Invalid {
            op: "xenforeignmemory_resource_size",
            domid,
            reason: "domain id does not fit domid_t".into(),
        })?;
        let mut size = 0usize;
        // SAFETY: size is a valid out-pointer.
        let rc = unsafe {
            (self.inner.lib.xenforeignmemory_resource_size)(
                self.inner.h.as_ptr(),
                dom,
                kind,
                id,
                &mut size,
            )
        };
        if rc != 0 {
            return Err(ForeignMemoryError::ResourceSize {
                domid,
                kind,
                id,
                errno: Errno::last(),
            });
        }
        Ok(size)
    }
}

/// Guest pages mapped by frame number; unmapped on drop.  Access through [`GuestMemory`](crate::GuestMemory).
pub struct ForeignMapping {
    region: Region,
    pages: usize,
    domid: u32,
    fmem: Arc<FmemInner>,
}

// SAFETY: process memory plus a Send + Sync handle.  Not Sync (no concurrent Rust writers).
unsafe impl Send for ForeignMapping {}

impl ForeignMapping {
    fn region(&self) -> &Region {
        &self.region
    }

    /// Number of pages mapped.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// The guest the pages belong to.
    pub fn domid(&self) -> u32 {
        self.domid
    }
}

impl_guest_memory!(ForeignMapping);

impl core::fmt::Debug for ForeignMapping {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ForeignMapping")
            .field("domid", &self.domid)
            .field("pages", &self.pages)
            .finish()
    }
}

impl Drop for ForeignMapping {
    fn drop(&mut self) {
        // SAFETY: the range was mapped by xenforeignmemory_map on this handle and is unmapped
        // once; nothing accesses it afterwards.
        let rc = unsafe {
            (self.fmem.lib.xenforeignmemory_unmap)(
                self.fmem.h.as_ptr(),
                self.region.as_ptr().cast::<c_void>(),
                self.pages,
            )
        };
        if rc != 0 {
            log::warn!(
                "xenforeignmemory_unmap of {} page(s) of domain {} failed: {}",
                self.pages,
                self.domid,
                Errno::last()
            );
        }
    }
}

/// A mapped guest resource; released on drop.  Access through [`GuestMemory`](crate::GuestMemory).
pub struct ResourceMapping {
    region: Region,
    domid: u32,
    fres: NonNull<t::xenforeignmemory_resource_handle>,
    fmem: Arc<FmemInner>,
}

// SAFETY: process memory, an owned resource handle and a Send + Sync library handle.
unsafe impl Send for ResourceMapping {}

impl ResourceMapping {
    fn region(&self) -> &Region {
        &self.region
    }

    /// The domain whose resource this is.
    pub fn domid(&self) -> u32 {
        self.domid
    }
}

impl_guest_memory!(ResourceMapping);

impl core::fmt::Debug for ResourceMapping {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ResourceMapping")
            .field("region", &self.region)
            .finish()
    }
}

impl Drop for ResourceMapping {
    fn drop(&mut self) {
        // SAFETY: fres came from xenforeignmemory_map_resource on this handle and is released
        // once; nothing accesses the range afterwards.
        let rc = unsafe {
            (self.fmem.lib.xenforeignmemory_unmap_resource)(
                self.fmem.h.as_ptr(),
                self.fres.as_ptr(),
            )
        };
        if rc != 0 {
            log::warn!("xenforeignmemory_unmap_resource failed: {}", Errno::last());
        }
    }
}
