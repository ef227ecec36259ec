//! Copying guest pages in and out.

use crate::{DomId, Pfn, Result, PAGE_SIZE};

/// Foreign access to a guest's memory, by copy only (`xenforeignmemory_map` + copy + unmap).
///
/// There is deliberately no way to borrow guest memory as `&[u8]` / `&mut [u8]`: a running guest
/// changes it under any such reference. A consistent copy needs the domain paused (see
/// [`DomainControl::pause`](crate::DomainControl::pause)).
///
/// Writes through this trait are the toolstack's (restoring a checkpoint on the secondary).
/// Callers must not rely on them appearing in the domain's log-dirty bitmap (the in-memory
/// model never logs them; whether Xen does depends on how dom0 maps the page).
pub trait GuestMemory: Send + Sync {
    /// Copies the pages `pfns` (any order, duplicates allowed) into `buf`, page `i` at
    /// `buf[i * PAGE_SIZE..]`. `buf.len()` must be `pfns.len() * PAGE_SIZE`
    /// ([`HypervisorError::BufferSize`](crate::HypervisorError::BufferSize) otherwise, and nothing
    /// is copied).
    ///
    /// Pages that cannot be mapped (not populated, beyond the domain's memory) do not stop the
    /// batch: their slots are zero-filled, every other page is copied, and the call returns
    /// [`HypervisorError::Pages`](crate::HypervisorError::Pages) listing the failed ones, like
    /// `xenforeignmemory_map`'s per-page error array.
    fn read_pages(&self, domid: DomId, pfns: &[Pfn], buf: &mut [u8]) -> Result<()>;

    /// Copies `data` (`pfns.len() * PAGE_SIZE` bytes) into the pages `pfns`. Per-page failures
    /// as for [`read_pages`](Self::read_pages) (the other pages are written).
    fn write_pages(&self, domid: DomId, pfns: &[Pfn], data: &[u8]) -> Result<()>;

    /// Copies one page out: [`read_pages`](Self::read_pages) with one pfn.
    fn read_page(&self, domid: DomId, pfn: Pfn, buf: &mut [u8; PAGE_SIZE]) -> Result<()> {
        self.read_pages(domid, &[pfn], buf)
    }

    /// Copies one page in: [`write_pages`](Self::write_pages) with one pfn.
    fn write_page(&self, domid: DomId, pfn: Pfn, data: &[u8; PAGE_SIZE]) -> Result<()> {
        self.write_pages(domid, &[pfn], data)
    }
}
