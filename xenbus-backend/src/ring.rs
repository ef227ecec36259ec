//! The backend side of a Xen shared ring (`xen/include/public/io/ring.h`), over a grant
//! mapping.
//!
//! The shared page starts with a 64-byte header - `req_prod`, `req_event`, `rsp_prod`,
//! `rsp_event` (`u32` each), then padding - followed by a power-of-two number of entries. The
//! frontend produces requests (`req_prod`) and consumes responses; the backend consumes
//! requests and produces responses (`rsp_prod`). Indexes are free-running `u32`s, taken modulo
//! the ring size.
//!
//! Everything in the page belongs to the guest and may change at any time: every index is read
//! once per check with a volatile access, requests are copied out whole before they are
//! decoded, and a producer index that claims more outstanding requests than the ring holds is
//! a protocol error ([`RingError::Overflow`]) that ends the device. No Rust reference into the
//! page is ever formed; all accesses go through [`GrantMapping`]'s bounds-checked accessors, so
//! this module needs no `unsafe`.

use std::sync::atomic::{fence, Ordering};

use hypervisor::{GrantMapping, HypervisorError};

/// Size of the shared ring header (`struct *_sring` up to `ring[]`).
pub const RING_HEADER_SIZE: usize = 64;
const REQ_PROD: usize = 0;
const REQ_EVENT: usize = 4;
const RSP_PROD: usize = 8;
const RSP_EVENT: usize = 12;

/// Errors of a shared ring.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// The mapping cannot hold a single entry after the header.
    #[error("ring mapping of {len} bytes holds no {entry_size}-byte entry after the header")]
    TooSmall {
        /// Bytes mapped.
        len: usize,
        /// Entry size.
        entry_size: usize,
    },
    /// The frontend's producer index claims more unanswered requests than the ring holds.
    #[error("frontend req_prod {req_prod} is {outstanding} entries ahead of rsp_prod {rsp_prod}, ring holds {size}")]
    Overflow {
        /// The producer index read.
        req_prod: u32,
        /// Our response producer.
        rsp_prod: u32,
        /// `req_prod - rsp_prod` (wrapping).
        outstanding: u32,
        /// Entries in the ring.
        size: u32,
    },
    /// An access to the mapping failed.
    #[error("shared ring access: {0}")]
    Access(#[from] HypervisorError),
}

/// `__RING_SIZE`: entries of `entry_size` bytes fitting in `bytes` after the header, rounded
/// down to a power of two (0 if none fits).
pub fn ring_size(bytes: usize, entry_size: usize) -> u32 {
    if entry_size == 0 || bytes <= RING_HEADER_SIZE {
        return 0;
    }
    let n = (bytes - RING_HEADER_SIZE) / entry_size;
    if n == 0 {
        return 0;
    }
    let p = 1usize << (usize::BITS - 1 - n.leading_zeros());
    u32::try_from(p).unwrap_or(1 << 31)
}

/// Whether a frontend's `req_prod` is plausible: at most `size` requests unanswered
/// (`RING_REQUEST_PROD_OVERFLOW` is the negation).
pub fn req_prod_valid(req_prod: u32, rsp_prod_pvt: u32, size: u32) -> bool {
    req_prod.wrapping_sub(rsp_prod_pvt) <= size
}

/// Whether the frontend wants an event for responses up to `new` when the previous push was
/// `old` (`RING_PUSH_RESPONSES_AND_CHECK_NOTIFY`).
pub fn needs_notify(old: u32, new: u32, event: u32) -> bool {
    new.wrapping_sub(event) < new.wrapping_sub(old)
}

/// The backend end of one shared ring.
#[derive(Debug)]
pub struct BackRing {
    mapping: Box<dyn GrantMapping>,
    entry_size: usize,
    size: u32,
    req_cons: u32,
    rsp_prod_pvt: u32,
    /// The `rsp_prod` we last published (kept here, not re-read from the guest's page).
    rsp_pushed: u32,
}

impl BackRing {
    /// A ring the frontend has just initialised (`SHARED_RING_INIT`: all indexes 0 - read from
    /// the page's `rsp_prod`, which the frontend zeroed, so a reconnecting frontend that kept
    /// its indexes also works).
    pub fn new(mapping: Box<dyn GrantMapping>, entry_size: usize) -> Result<BackRing, RingError> {
        BackRing::attach(mapping, entry_size)
    }

    /// Attaches to a live ring at its current state (Kemari's `Attached`): responses published
    /// so far are taken as done, requests between `rsp_prod` and `req_prod` are still to be
    /// served.
    pub fn attach(
        mapping: Box<dyn GrantMapping>,
        entry_size: usize,
    ) -> Result<BackRing, RingError> {
        let size = ring_size(mapping.len(), entry_size);
        if size == 0 {
            return Err(RingError::TooSmall {
                len: mapping.len(),
                entry_size,
            });
        }
        let rsp_prod = mapping.read_u32(RSP_PROD)?;
        Ok(BackRing {
            mapping,
            entry_size,
            size,
            req_cons: rsp_prod,
            rsp_prod_pvt: rsp_prod,
            rsp_pushed: rsp_prod,
        })
    }

    /// Entries in the ring.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// Our request consumer index.
    pub fn req_cons(&self) -> u32 {
        self.req_cons
    }

    /// Our (private) response producer index.
    pub fn rsp_prod_pvt(&self) -> u32 {
        self.rsp_prod_pvt
    }

    /// Requests ready to consume, after validating the frontend's `req_prod`.
    pub fn unconsumed(&self) -> Result<u32, RingError> {
        let req_prod = self.mapping.read_u32(REQ_PROD)?;
        // rmb(): see the producer index before the requests it covers
        fence(Ordering::Acquire);
        if !req_prod_valid(req_prod, self.rsp_prod_pvt, self.size) {
            return Err(RingError::Overflow {
                req_prod,
                rsp_prod: self.rsp_prod_pvt,
                outstanding: req_prod.wrapping_sub(self.rsp_prod_pvt),
                size: self.size,
            });
        }
        Ok(req_prod.wrapping_sub(self.req_cons))
    }

    fn entry_offset(&self, index: u32) -> usize {
        RING_HEADER_SIZE + (index & (self.size - 1)) as usize * self.entry_size
    }

    /// Copies the next request into `buf` (`entry_size` bytes) and consumes it. The caller has
    /// seen [`unconsumed`](Self::unconsumed) > 0.
    pub fn take_request(&mut self, buf: &mut [u8]) -> Result<(), RingError> {
        let n = buf.len().min(self.entry_size);
        let offset = self.entry_offset(self.req_cons);
        self.mapping.read(offset, &mut buf[..n])?;
        self.req_cons = self.req_cons.wrapping_add(1);
        Ok(())
    }

    /// Writes the next response (at most `entry_size` bytes) into its slot (not yet visible).
    pub fn put_response(&mut self, rsp: &[u8]) -> Result<(), RingError> {
        let n = rsp.len().min(self.entry_size);
        let offset = self.entry_offset(self.rsp_prod_pvt);
        self.mapping.write(offset, &rsp[..n])?;
        self.rsp_prod_pvt = self.rsp_prod_pvt.wrapping_add(1);
        Ok(())
    }

    /// Publishes the responses written so far; true if the frontend asked for an event.
    pub fn push_responses(&mut self) -> Result<bool, RingError> {
        let old = self.rsp_pushed;
        let new = self.rsp_prod_pvt;
        if old == new {
            return Ok(false);
        }
        // wmb(): responses before the index that publishes them
        fence(Ordering::Release);
        self.mapping.write_u32(RSP_PROD, new)?;
        self.rsp_pushed = new;
        // mb(): publish rsp_prod before reading rsp_event
        fence(Ordering::SeqCst);
        let event = self.mapping.read_u32(RSP_EVENT)?;
        Ok(needs_notify(old, new, event))
    }

    /// `RING_FINAL_CHECK_FOR_REQUESTS`: if no request is waiting, asks for an event at the next
    /// one (`req_event = req_cons + 1`) and checks again, closing the race with a frontend that
    /// produced meanwhile. True if requests are waiting.
    pub fn final_check(&mut self) -> Result<bool, RingError> {
        if self.unconsumed()? > 0 {
            return Ok(true);
        }
        self.mapping
            .write_u32(REQ_EVENT, self.req_cons.wrapping_add(1))?;
        fence(Ordering::SeqCst);
        Ok(self.unconsumed()? > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sizes_follow_ring_h() {
        assert_eq!(ring_size(4096, 112), 32);
        assert_eq!(ring_size(8192, 112), 64);
        assert_eq!(ring_size(4096, 16), 128);
        assert_eq!(ring_size(64, 112), 0);
        assert_eq!(ring_size(100, 112), 0);
        assert_eq!(ring_size(4096, 0), 0);
    }

    #[test]
    fn notify_rule() {
        // frontend waits for the first response after 10
        assert!(needs_notify(10, 11, 11));
        assert!(needs_notify(10, 12, 11));
        assert!(!needs_notify(10, 12, 13));
        // wrap-around
        assert!(needs_notify(u32::MAX, 1, 0));
        assert!(!needs_notify(u32::MAX - 1, u32::MAX, 5));
    }

    #[test]
    fn overflow_rule() {
        assert!(req_prod_valid(5, 5, 32));
        assert!(req_prod_valid(37, 5, 32));
        assert!(!req_prod_valid(38, 5, 32));
        assert!(
            !req_prod_valid(4, 5, 32),
            "behind the consumer is a huge distance"
        );
        assert!(req_prod_valid(3, u32::MAX - 28, 32));
    }

    proptest! {
        /// Whatever req_prod the guest writes, a valid one never makes us consume more than
        /// the ring holds, and every slot offset stays inside the ring.
        #[test]
        fn valid_indexes_stay_in_ring(rsp in any::<u32>(), req in any::<u32>(), pages in 1usize..=4) {
            let size = ring_size(pages * 4096, 112);
            if req_prod_valid(req, rsp, size) {
                prop_assert!(req.wrapping_sub(rsp) <= size);
            }
            for i in [rsp, req, rsp.wrapping_add(size)] {
                let off = RING_HEADER_SIZE + (i & (size - 1)) as usize * 112;
                prop_assert!(off + 112 <= pages * 4096);
            }
        }

        #[test]
        fn notify_exactly_when_event_crossed(old in any::<u32>(), d in 1u32..64, e in 0u32..128) {
            let new = old.wrapping_add(d);
            let event = old.wrapping_add(e);
            // the frontend wants an event once rsp_prod passes event - 1
            prop_assert_eq!(needs_notify(old, new, event), e >= 1 && e <= d);
        }
    }
}
