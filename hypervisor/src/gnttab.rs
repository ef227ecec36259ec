//! Grant tables: mapping the pages a guest shared with us (ring pages, I/O buffers).

use crate::{DomId, GrantRef, Result};

/// Maps pages a domain granted to this one (`xengnttab_map_domain_grant_refs`).
pub trait GrantTables: Send + Sync {
    /// Maps the grant references `refs` of `domid`, in order, as one contiguous mapping of
    /// `refs.len()` pages. A reference the domain did not grant to us, or a read-only grant
    /// mapped `writable`, fails with
    /// [`HypervisorError::Grant`](crate::HypervisorError::Grant) and nothing stays mapped.
    /// Dropping the mapping unmaps it.
    fn map_grant_refs(
        &self,
        domid: DomId,
        refs: &[GrantRef],
        writable: bool,
    ) -> Result<Box<dyn GrantMapping>>;
}

/// A live mapping of granted pages (`xengnttab_unmap` on drop).
///
/// The guest writes these pages concurrently, so there is no slice access: bulk data is
/// copied in and out, and shared ring fields are read and written with single volatile
/// accesses at aligned, bounds-checked offsets. Ordering between accesses is the caller's job
/// (`std::sync::atomic::fence`, as the ring protocol's `rmb`/`wmb`/`mb`). Out-of-range and
/// misaligned accesses fail without touching memory; writes through a read-only mapping fail
/// with `EACCES`.
///
/// A mapping is `Send`, not necessarily `Sync` (like `libxc_ffi::GrantMapping`): one thread
/// owns a ring; share it behind a `Mutex` if you must.
pub trait GrantMapping: Send + std::fmt::Debug {
    /// The granting domain.
    fn domid(&self) -> DomId;

    /// Size in bytes (`pages * PAGE_SIZE`).
    fn len(&self) -> usize;

    /// True for a mapping of zero pages (never returned by `map_grant_refs`).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the mapping is writable.
    fn writable(&self) -> bool;

    /// Copies `buf.len()` bytes at `offset` out of the mapping.
    fn read(&self, offset: usize, buf: &mut [u8]) -> Result<()>;

    /// Copies `data` into the mapping at `offset`.
    fn write(&self, offset: usize, data: &[u8]) -> Result<()>;

    /// One volatile `u8` read.
    fn read_u8(&self, offset: usize) -> Result<u8>;

    /// One volatile, 2-aligned little-endian `u16` read.
    fn read_u16(&self, offset: usize) -> Result<u16>;

    /// One volatile, 4-aligned `u32` read (ring indices are `u32`).
    fn read_u32(&self, offset: usize) -> Result<u32>;

    /// One volatile, 8-aligned `u64` read.
    fn read_u64(&self, offset: usize) -> Result<u64>;

    /// One volatile `u8` write.
    fn write_u8(&self, offset: usize, value: u8) -> Result<()>;

    /// One volatile, 2-aligned `u16` write.
    fn write_u16(&self, offset: usize, value: u16) -> Result<()>;

    /// One volatile, 4-aligned `u32` write.
    fn write_u32(&self, offset: usize, value: u32) -> Result<()>;

    /// One volatile, 8-aligned `u64` write.
    fn write_u64(&self, offset: usize, value: u64) -> Result<()>;
}
