//! Log-dirty tracking: which guest pages were written since the last harvest.

use crate::{DomId, Pfn, Result};

/// Counters Xen returns with a log-dirty `CLEAN`/`PEEK` (`xen_domctl_shadow_op_stats`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogDirtyStats {
    /// Write faults taken since the last clean.
    pub fault_count: u32,
    /// Pages marked dirty since the last clean.
    pub dirty_count: u32,
}

/// A dirty bitmap covering pfns `0..nr_pages`, one bit per page, in Xen's layout (64-bit
/// little-endian words, bit `pfn % 64` of word `pfn / 64`) so the real implementation can copy
/// the hypercall buffer into [`words_mut`](Self::words_mut) as is.
#[derive(Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    nr_pages: u64,
}

impl DirtyBitmap {
    /// An all-clean bitmap for `nr_pages` pages (usually `maximum_gpfn + 1`).
    pub fn new(nr_pages: u64) -> DirtyBitmap {
        let words = nr_pages.div_ceil(64);
        DirtyBitmap {
            words: vec![0; usize::try_from(words).unwrap_or(usize::MAX)],
            nr_pages,
        }
    }

    /// Number of pages covered.
    pub fn nr_pages(&self) -> u64 {
        self.nr_pages
    }

    /// The raw words.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// The raw words, to fill from Xen's buffer. Callers must leave bits at or beyond
    /// `nr_pages` clear (use [`trim`](Self::trim) after a raw copy).
    pub fn words_mut(&mut self) -> &mut [u64] {
        &mut self.words
    }

    /// Clears any bits at or beyond `nr_pages` (after a raw copy into [`words_mut`](Self::words_mut)).
    pub fn trim(&mut self) {
        let tail = self.nr_pages % 64;
        if tail != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << tail) - 1;
            }
        }
    }

    /// Marks `pfn` dirty; pfns outside the bitmap are ignored and reported as `false`.
    pub fn set(&mut self, pfn: Pfn) -> bool {
        if pfn >= self.nr_pages {
            return false;
        }
        match self.words.get_mut((pfn / 64) as usize) {
            Some(word) => {
                *word |= 1u64 << (pfn % 64);
                true
            }
            None => false,
        }
    }

    /// Whether `pfn` is dirty (`false` outside the bitmap).
    pub fn is_dirty(&self, pfn: Pfn) -> bool {
        pfn < self.nr_pages
            && self
                .words
                .get((pfn / 64) as usize)
                .is_some_and(|w| w & (1u64 << (pfn % 64)) != 0)
    }

    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// True if no page is dirty.
    pub fn is_clean(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }

    /// Marks every page clean.
    pub fn clear(&mut self) {
        self.words.fill(0);
    }

    /// Adds the dirty pages of `other` (bits beyond `self.nr_pages()` are dropped).
    pub fn union_with(&mut self, other: &DirtyBitmap) {
        for (mine, theirs) in self.words.iter_mut().zip(&other.words) {
            *mine |= theirs;
        }
        self.trim();
    }

    /// The dirty pfns, ascending.
    pub fn iter(&self) -> DirtyPfns<'_> {
        DirtyPfns {
            words: &self.words,
            index: 0,
            current: self.words.first().copied().unwrap_or(0),
        }
    }
}

impl std::fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyBitmap")
            .field("nr_pages", &self.nr_pages)
            .field("dirty", &self.count())
            .finish()
    }
}

impl<'a> IntoIterator for &'a DirtyBitmap {
    type Item = Pfn;
    type IntoIter = DirtyPfns<'a>;

    fn into_iter(self) -> DirtyPfns<'a> {
        self.iter()
    }
}

/// Iterator over the dirty pfns of a [`DirtyBitmap`], ascending.
#[derive(Debug, Clone)]
pub struct DirtyPfns<'a> {
    words: &'a [u64],
    index: usize,
    current: u64,
}

impl Iterator for DirtyPfns<'_> {
    type Item = Pfn;

    fn next(&mut self) -> Option<Pfn> {
        loop {
            if self.current != 0 {
                let bit = self.current.trailing_zeros();
                self.current &= self.current - 1;
                return Some(self.index as u64 * 64 + u64::from(bit));
            }
            self.index += 1;
            self.current = *self.words.get(self.index)?;
        }
    }
}

/// Log-dirty mode of a domain (`xc_logdirty_control`). Works for HVM and PVH guests (HAP).
///
/// The bitmap starts clean when enabled; a checkpoint is `pause` → [`log_dirty_clean`]
/// (harvest and reset) → copy the dirty pages → `unpause`.
///
/// [`log_dirty_clean`]: Self::log_dirty_clean
pub trait LogDirty: Send + Sync {
    /// Turns log-dirty mode on (`XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY`). `EINVAL` if it is
    /// already on (as Xen's `paging_log_dirty_enable`).
    fn log_dirty_enable(&self, domid: DomId) -> Result<()>;

    /// Copies the dirty bits of pfns `0..bitmap.nr_pages()` into `bitmap` (overwriting it) and
    /// resets them in Xen (`XEN_DOMCTL_SHADOW_OP_CLEAN`). Size the bitmap with
    /// `maximum_gpfn + 1`; dirty pages beyond it stay dirty in Xen. `EINVAL` if log-dirty is off.
    fn log_dirty_clean(&self, domid: DomId, bitmap: &mut DirtyBitmap) -> Result<LogDirtyStats>;

    /// As [`log_dirty_clean`](Self::log_dirty_clean), for a round taken with the domain paused
    /// (`XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL`, as libxc's last save round): Xen first marks dirty
    /// every guest page it keeps mapped writably itself (`vcpu_info`, runstate areas, FIFO
    /// event-channel arrays: `hvm_mapped_guest_frames_mark_dirty`). Xen writes those pages
    /// without logging them, even while the domain is paused (event delivery), so a checkpoint
    /// harvested without this flag misses them.
    fn log_dirty_clean_final(
        &self,
        domid: DomId,
        bitmap: &mut DirtyBitmap,
    ) -> Result<LogDirtyStats>;

    /// As [`log_dirty_clean`](Self::log_dirty_clean) without resetting
    /// (`XEN_DOMCTL_SHADOW_OP_PEEK`).
    fn log_dirty_peek(&self, domid: DomId, bitmap: &mut DirtyBitmap) -> Result<LogDirtyStats>;

    /// Turns log-dirty mode off (`XEN_DOMCTL_SHADOW_OP_OFF`); a no-op if it is off.
    fn log_dirty_disable(&self, domid: DomId) -> Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_set_iter_count() {
        let mut b = DirtyBitmap::new(200);
        assert!(b.is_clean());
        for pfn in [0, 63, 64, 130, 199] {
            assert!(b.set(pfn));
        }
        assert!(!b.set(200), "outside the bitmap");
        assert_eq!(b.count(), 5);
        assert_eq!(b.iter().collect::<Vec<_>>(), vec![0, 63, 64, 130, 199]);
        assert!(b.is_dirty(130) && !b.is_dirty(131) && !b.is_dirty(10_000));
        assert_eq!(b.words().len(), 4);
        b.clear();
        assert_eq!(b.count(), 0);
        assert_eq!(b.iter().next(), None);
    }

    #[test]
    fn bitmap_trim_and_union() {
        let mut a = DirtyBitmap::new(70);
        a.words_mut()[1] = u64::MAX;
        a.trim();
        assert_eq!(a.count(), 6, "only pfns 64..70 survive the trim");
        let mut b = DirtyBitmap::new(70);
        b.set(3);
        b.union_with(&a);
        assert_eq!(
            b.iter().collect::<Vec<_>>(),
            vec![3, 64, 65, 66, 67, 68, 69]
        );
        let empty = DirtyBitmap::new(0);
        assert_eq!(empty.iter().count(), 0);
    }
}
