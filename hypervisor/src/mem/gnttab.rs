//! Grant mappings of the in-memory host.

use std::sync::Arc;

use super::{lock, Page, Shared, Target};
use crate::{
    DomId, Errno, GrantMapping, GrantRef, HypervisorError, Method, Pfn, Result, PAGE_SIZE,
};

/// Dom0's mapping of pages a guest granted it, on a [`MemXen`](super::MemXen).
///
/// It shares the guest's pages: what the guest writes through [`MemGuest`](super::MemGuest)
/// shows here and back. Dropping it unmaps: the grants' map counts drop and, for a writable
/// mapping of a domain in log-dirty mode, the pages are marked dirty (as Xen does on unmap).
#[derive(Debug)]
pub struct MemGrantMapping {
    shared: Arc<Shared>,
    domid: DomId,
    refs: Vec<GrantRef>,
    pfns: Vec<Pfn>,
    pages: Vec<Arc<Page>>,
    writable: bool,
}

/// Maps `refs` of `domid` for dom0, all or nothing.
pub(crate) fn map(
    shared: &Arc<Shared>,
    domid: DomId,
    refs: &[GrantRef],
    writable: bool,
) -> Result<MemGrantMapping> {
    let op = Method::GnttabMap;
    let first = refs.first().copied().unwrap_or(0);
    shared
        .fault(op, Target::Grant(domid, first))
        .map_err(|errno| HypervisorError::Grant {
            op,
            domid,
            gref: first,
            errno,
        })?;
    if refs.is_empty() {
        return Err(HypervisorError::Domain {
            op,
            domid,
            errno: Errno::EINVAL,
        });
    }
    let mut host = lock(&shared.host);
    let dom = host.domain(op, domid)?;
    let mut pfns = Vec::with_capacity(refs.len());
    for gref in refs {
        let errno = match dom.grants.get(gref) {
            None => Some(Errno::EINVAL),
            Some(g) if g.grantee != 0 => Some(Errno::EINVAL),
            Some(g) if g.readonly && writable => Some(Errno::EACCES),
            Some(g) => {
                pfns.push(g.pfn);
                None
            }
        };
        if let Some(errno) = errno {
            return Err(HypervisorError::Grant {
                op,
                domid,
                gref: *gref,
                errno,
            });
        }
    }
    let mut pages = Vec::with_capacity(pfns.len());
    for (gref, pfn) in refs.iter().zip(&pfns) {
        match dom.page(*pfn) {
            Some(page) => pages.push(page),
            None => {
                return Err(HypervisorError::Grant {
                    op,
                    domid,
                    gref: *gref,
                    errno: Errno::EINVAL,
                })
            }
        }
    }
    for gref in refs {
        if let Some(g) = dom.grants.get_mut(gref) {
            g.map_count += 1;
        }
    }
    Ok(MemGrantMapping {
        shared: shared.clone(),
        domid,
        refs: refs.to_vec(),
        pfns,
        pages,
        writable,
    })
}

impl MemGrantMapping {
    /// The grant references mapped, in order.
    pub fn refs(&self) -> &[GrantRef] {
        &self.refs
    }

    fn check(&self, offset: usize, len: usize, align: usize) -> Result<()> {
        let op = Method::GrantAccess;
        let size = self.len();
        if !matches!(offset.checked_add(len), Some(end) if end <= size) {
            return Err(HypervisorError::OutOfBounds {
                op,
                offset,
                len,
                size,
            });
        }
        if offset % align != 0 {
            return Err(HypervisorError::Misaligned { op, offset, len });
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(HypervisorError::Grant {
                op: Method::GrantAccess,
                domid: self.domid,
                gref: self.refs.first().copied().unwrap_or(0),
                errno: Errno::EACCES,
            })
        }
    }

    /// Calls `f(page, offset in page, range in the caller's buffer)` for each page piece of
    /// `offset..offset + len` (already bounds-checked).
    fn pieces(
        &self,
        offset: usize,
        len: usize,
        mut f: impl FnMut(&Page, usize, std::ops::Range<usize>),
    ) {
        let mut done = 0;
        while done < len {
            let at = offset + done;
            let (index, in_page) = (at / PAGE_SIZE, at % PAGE_SIZE);
            let n = (PAGE_SIZE - in_page).min(len - done);
            if let Some(page) = self.pages.get(index) {
                f(page, in_page, done..done + n);
            }
            done += n;
        }
    }

    fn load<const N: usize>(&self, offset: usize) -> Result<[u8; N]> {
        self.check(offset, N, N)?;
        let mut out = [0u8; N];
        self.pieces(offset, N, |page, at, range| {
            out[range.clone()].copy_from_slice(&lock(page)[at..at + range.len()]);
        });
        Ok(out)
    }

    fn store<const N: usize>(&self, offset: usize, bytes: [u8; N]) -> Result<()> {
        self.check(offset, N, N)?;
        self.check_writable()?;
        self.pieces(offset, N, |page, at, range| {
            lock(page)[at..at + range.len()].copy_from_slice(&bytes[range]);
        });
        Ok(())
    }
}

impl GrantMapping for MemGrantMapping {
    fn domid(&self) -> DomId {
        self.domid
    }

    fn len(&self) -> usize {
        self.pages.len() * PAGE_SIZE
    }

    fn writable(&self) -> bool {
        self.writable
    }

    fn read(&self, offset: usize, buf: &mut [u8]) -> Result<()> {
        self.check(offset, buf.len(), 1)?;
        self.pieces(offset, buf.len(), |page, at, range| {
            let n = range.len();
            buf[range].copy_from_slice(&lock(page)[at..at + n]);
        });
        Ok(())
    }

    fn write(&self, offset: usize, data: &[u8]) -> Result<()> {
        self.check(offset, data.len(), 1)?;
        self.check_writable()?;
        self.pieces(offset, data.len(), |page, at, range| {
            let n = range.len();
            lock(page)[at..at + n].copy_from_slice(&data[range]);
        });
        Ok(())
    }

    fn read_u8(&self, offset: usize) -> Result<u8> {
        self.load::<1>(offset).map(|[b]| b)
    }

    fn read_u16(&self, offset: usize) -> Result<u16> {
        self.load::<2>(offset).map(u16::from_le_bytes)
    }

    fn read_u32(&self, offset: usize) -> Result<u32> {
        self.load::<4>(offset).map(u32::from_le_bytes)
    }

    fn read_u64(&self, offset: usize) -> Result<u64> {
        self.load::<8>(offset).map(u64::from_le_bytes)
    }

    fn write_u8(&self, offset: usize, value: u8) -> Result<()> {
        self.store(offset, [value])
    }

    fn write_u16(&self, offset: usize, value: u16) -> Result<()> {
        self.store(offset, value.to_le_bytes())
    }

    fn write_u32(&self, offset: usize, value: u32) -> Result<()> {
        self.store(offset, value.to_le_bytes())
    }

    fn write_u64(&self, offset: usize, value: u64) -> Result<()> {
        self.store(offset, value.to_le_bytes())
    }
}

impl Drop for MemGrantMapping {
    fn drop(&mut self) {
        let mut host = lock(&self.shared.host);
        let Some(dom) = host.domains.get_mut(&self.domid) else {
            return;
        };
        for gref in &self.refs {
            if let Some(g) = dom.grants.get_mut(gref) {
                g.map_count = g.map_count.saturating_sub(1);
            }
        }
        if self.writable {
            for pfn in &self.pfns {
                dom.mark_dirty(*pfn);
            }
        }
    }
}
