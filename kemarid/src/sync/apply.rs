//! Two-phase application of a checkpoint's pages to the replica's memory.
//!
//! Phase 1 ([`PageApply::prepare`]) checks every pfn against the replica's size and copies
//! the current contents of every page the checkpoint will overwrite into an undo buffer;
//! nothing is written yet, so a failure here leaves the replica untouched. Phase 2
//! ([`PageApply::write`]) writes the new contents batch by batch; if any batch fails (a whole
//! call, or single pages of it), every batch written so far, the failed one included, is
//! written back from the undo buffer, so the replica is again exactly at the previous
//! checkpoint. Only if that rollback itself fails is the replica left between two
//! checkpoints, and the error says so ([`ApplyError::RollbackFailed`]): the caller must then
//! consider the replica lost.

use hypervisor::{DomId, GuestMemory, HypervisorError, Pfn, PAGE_SIZE};

/// Pages per read/write call (the batch size of Xen's own saver).
pub const APPLY_BATCH: usize = 1024;

/// A page of a checkpoint: pfn and contents.
pub type PageRef<'a> = (u64, &'a [u8; PAGE_SIZE]);

/// Errors of the two-phase apply.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A pfn of the checkpoint lies beyond the replica's memory.
    #[error("checkpoint page pfn {pfn:#x} is beyond replica domain {domid}'s last pfn {max_pfn:#x}: nothing applied")]
    PfnOutOfRange {
        /// The replica.
        domid: DomId,
        /// The offending pfn.
        pfn: Pfn,
        /// The replica's highest pfn.
        max_pfn: Pfn,
    },
    /// Phase 1 failed: the replica was not changed.
    #[error("reading the {pages} pages to be overwritten in replica domain {domid} failed, nothing applied: {source}")]
    Prepare {
        /// The replica.
        domid: DomId,
        /// Pages of the checkpoint.
        pages: usize,
        /// The failed call.
        #[source]
        source: HypervisorError,
    },
    /// Phase 2 failed and was rolled back: the replica is at the previous checkpoint.
    #[error("writing pages {first}..{end} of {pages} into replica domain {domid} failed, rolled back to the previous checkpoint: {source}")]
    RolledBack {
        /// The replica.
        domid: DomId,
        /// Index of the first page of the failed batch.
        first: usize,
        /// One past its last page.
        end: usize,
        /// Pages of the checkpoint.
        pages: usize,
        /// The failed call.
        #[source]
        source: HypervisorError,
    },
    /// Phase 2 failed and the rollback failed too: the replica holds parts of two checkpoints.
    #[error("writing into replica domain {domid} failed ({write}) and restoring its previous pages failed too: the replica is lost: {source}")]
    RollbackFailed {
        /// The replica.
        domid: DomId,
        /// The write failure that started the rollback.
        write: HypervisorError,
        /// The rollback failure.
        #[source]
        source: HypervisorError,
    },
}

/// A checkpoint's pages, prepared for a two-phase write to one replica.
#[derive(Debug)]
pub struct PageApply {
    domid: DomId,
    pfns: Vec<Pfn>,
    undo: Vec<u8>,
}

impl PageApply {
    /// Phase 1: validates `pfns` against the replica's last pfn `max_pfn` and copies the pages
    /// they will overwrite.
    pub fn prepare(
        mem: &dyn GuestMemory,
        domid: DomId,
        max_pfn: Pfn,
        pfns: &[Pfn],
    ) -> Result<PageApply, ApplyError> {
        if let Some(pfn) = pfns.iter().copied().find(|p| *p > max_pfn) {
            return Err(ApplyError::PfnOutOfRange {
                domid,
                pfn,
                max_pfn,
            });
        }
        let mut undo = vec![0u8; pfns.len() * PAGE_SIZE];
        for (batch, buf) in pfns
            .chunks(APPLY_BATCH)
            .zip(undo.chunks_mut(APPLY_BATCH * PAGE_SIZE))
        {
            mem.read_pages(domid, batch, buf)
                .map_err(|source| ApplyError::Prepare {
                    domid,
                    pages: pfns.len(),
                    source,
                })?;
        }
        Ok(PageApply {
            domid,
            pfns: pfns.to_vec(),
            undo,
        })
    }

    /// Number of pages.
    pub fn len(&self) -> usize {
        self.pfns.len()
    }

    /// True if there is nothing to apply.
    pub fn is_empty(&self) -> bool {
        self.pfns.is_empty()
    }

    /// Phase 2: writes `pages` (in the order of the pfns given to [`prepare`](Self::prepare):
    /// `pages[i]` is the new contents of `pfns[i]`). On failure, rolls back. After a success
    /// the undo buffer is kept, so a later step of the same checkpoint that fails can still
    /// [`undo`](Self::undo) it.
    pub fn write(
        &self,
        mem: &dyn GuestMemory,
        pages: &[&[u8; PAGE_SIZE]],
    ) -> Result<(), ApplyError> {
        let mut batch_buf = Vec::with_capacity(APPLY_BATCH.min(pages.len()) * PAGE_SIZE);
        let mut done = 0usize;
        for (batch, contents) in self.pfns.chunks(APPLY_BATCH).zip(pages.chunks(APPLY_BATCH)) {
            batch_buf.clear();
            for page in contents {
                batch_buf.extend_from_slice(&page[..]);
            }
            if let Err(write) = mem.write_pages(self.domid, batch, &batch_buf) {
                let end = done + batch.len();
                return Err(match self.undo_range(mem, end) {
                    Ok(()) => ApplyError::RolledBack {
                        domid: self.domid,
                        first: done,
                        end,
                        pages: self.pfns.len(),
                        source: write,
                    },
                    Err(source) => ApplyError::RollbackFailed {
                        domid: self.domid,
                        write,
                        source,
                    },
                });
            }
            done += batch.len();
        }
        Ok(())
    }

    /// Writes back the previous contents of every page (after a successful
    /// [`write`](Self::write) whose checkpoint must still be abandoned).
    pub fn undo(&self, mem: &dyn GuestMemory) -> Result<(), HypervisorError> {
        self.undo_range(mem, self.pfns.len())
    }

    /// Writes back the previous contents of pages `0..end`, last batch first (so a pfn that
    /// appears twice ends with its oldest contents).
    fn undo_range(&self, mem: &dyn GuestMemory, end: usize) -> Result<(), HypervisorError> {
        let end = end.min(self.pfns.len());
        let batches: Vec<(usize, usize)> = (0..end)
            .step_by(APPLY_BATCH)
            .map(|s| (s, (s + APPLY_BATCH).min(end)))
            .collect();
        for (s, e) in batches.into_iter().rev() {
            let (Some(pfns), Some(data)) = (
                self.pfns.get(s..e),
                self.undo.get(s * PAGE_SIZE..e * PAGE_SIZE),
            ) else {
                continue;
            };
            mem.write_pages(self.domid, pfns, data)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hypervisor::mem::{DomainConfig, MemXen, Trigger};
    use hypervisor::{DomainControl, Errno, Method};

    fn setup(pages: u64) -> (MemXen, DomId) {
        let xen = MemXen::new();
        let dom = xen.create_domain(DomainConfig::hvm(pages)).unwrap();
        let g = xen.guest(dom);
        for pfn in 0..pages {
            g.fill_page(pfn, 0x11).unwrap();
        }
        xen.pause(dom).unwrap();
        (xen, dom)
    }

    fn contents(xen: &MemXen, dom: DomId, pages: u64) -> Vec<u8> {
        let g = xen.guest(dom);
        (0..pages).map(|p| g.read_page(p).unwrap()[0]).collect()
    }

    #[test]
    fn applies_all_pages() {
        let (xen, dom) = setup(3000);
        let pfns: Vec<Pfn> = (0..2100).collect();
        let page = Box::new([0x22u8; PAGE_SIZE]);
        let refs: Vec<&[u8; PAGE_SIZE]> = pfns.iter().map(|_| &*page).collect();
        let a = PageApply::prepare(&xen, dom, 2999, &pfns).unwrap();
        a.write(&xen, &refs).unwrap();
        let c = contents(&xen, dom, 3000);
        assert!(c[..2100].iter().all(|b| *b == 0x22));
        assert!(c[2100..].iter().all(|b| *b == 0x11));
        a.undo(&xen).unwrap();
        assert!(contents(&xen, dom, 3000).iter().all(|b| *b == 0x11));
    }

    #[test]
    fn failure_in_the_middle_rolls_back_every_written_batch() {
        let (xen, dom) = setup(3000);
        let pfns: Vec<Pfn> = (0..2500).collect();
        let page = Box::new([0x33u8; PAGE_SIZE]);
        let refs: Vec<&[u8; PAGE_SIZE]> = pfns.iter().map(|_| &*page).collect();
        let a = PageApply::prepare(&xen, dom, 2999, &pfns).unwrap();
        // The third write batch fails; the two written before must be restored.
        xen.faults().fail_on(Method::WritePages, 3, Errno::EIO);
        let err = a.write(&xen, &refs).unwrap_err();
        assert!(
            matches!(err, ApplyError::RolledBack { first: 2048, .. }),
            "{err}"
        );
        assert!(contents(&xen, dom, 3000).iter().all(|b| *b == 0x11));
    }

    #[test]
    fn per_page_failure_rolls_back_the_partial_batch() {
        let xen = MemXen::new();
        let dom = xen
            .create_domain(DomainConfig::hvm(16).with_holes(&[9]))
            .unwrap();
        let g = xen.guest(dom);
        for pfn in (0..16).filter(|p| *p != 9) {
            g.fill_page(pfn, 0x11).unwrap();
        }
        xen.pause(dom).unwrap();
        // Reading pfn 9 (a hole) fails in phase 1 already: nothing is written.
        let page = Box::new([0x44u8; PAGE_SIZE]);
        let refs: Vec<&[u8; PAGE_SIZE]> = (0..12).map(|_| &*page).collect();
        let pfns: Vec<Pfn> = (0..12).collect();
        let err = PageApply::prepare(&xen, dom, 15, &pfns).unwrap_err();
        assert!(matches!(err, ApplyError::Prepare { .. }), "{err}");
        // A failure that appears only at write time (here: every page of the batch) rolls back.
        let pfns: Vec<Pfn> = (0..8).collect();
        let a = PageApply::prepare(&xen, dom, 15, &pfns).unwrap();
        xen.faults()
            .fail(Method::WritePages, Trigger::Nth(1), Errno::EFAULT);
        assert!(matches!(
            a.write(&xen, &refs[..8]).unwrap_err(),
            ApplyError::RolledBack { .. }
        ));
        assert!((0..16)
            .filter(|p| *p != 9)
            .all(|p| g.read_page(p).unwrap()[0] == 0x11));
    }

    #[test]
    fn failing_rollback_is_reported_as_lost() {
        let (xen, dom) = setup(2100);
        let pfns: Vec<Pfn> = (0..2100).collect();
        let page = Box::new([0x55u8; PAGE_SIZE]);
        let refs: Vec<&[u8; PAGE_SIZE]> = pfns.iter().map(|_| &*page).collect();
        let a = PageApply::prepare(&xen, dom, 2099, &pfns).unwrap();
        xen.faults().fail_after(Method::WritePages, 1, Errno::EIO);
        assert!(matches!(
            a.write(&xen, &refs).unwrap_err(),
            ApplyError::RollbackFailed { .. }
        ));
    }

    #[test]
    fn out_of_range_pfn_is_refused_before_anything_is_read() {
        let (xen, dom) = setup(8);
        let reads = xen.faults().calls(Method::ReadPages);
        let err = PageApply::prepare(&xen, dom, 7, &[1, 8]).unwrap_err();
        assert!(matches!(err, ApplyError::PfnOutOfRange { pfn: 8, .. }));
        assert_eq!(xen.faults().calls(Method::ReadPages), reads);
    }
}
