//! The PV state of a guest that Xen keeps outside its memory, read from dom0 on stock Xen 4.17
//! (see `docs/failover.md`, transparent failover): the event-channel port table
//! (`EVTCHNOP_status`), the callback parameter, the `shared_info` frame, and where the guest
//! registered its per-vCPU `vcpu_info` and its FIFO event-channel control blocks and event
//! array pages.
//!
//! No Xen interface reports those guest frames. They are found by their contents in guest RAM
//! (the guest paused), with signatures Linux and Xen together make certain:
//! - a FIFO **event array page** is initialised by Linux with every word `MASKED` (0x40000000),
//!   so all but the few bound ports' words are exactly that value;
//! - a FIFO **control block** is a page Linux cleared: `ready`, `head[16]` in its first 72
//!   bytes, zeros after; `head[0]` (priority 0, Linux's timer priority) holds the vCPU's
//!   `VIRQ_TIMER` port (Xen writes the port there each time the timer event finds the queue
//!   empty);
//! - a registered **`vcpu_info`** has `vcpu_time_info` at +32 that Xen rewrites at every
//!   schedule: an even `version`, zero padding, a host system time (ns) and a non-zero
//!   `tsc_to_system_mul`.
//!
//! [`capture`] reads it all; [`scan_page`] is the pure part, tested below.

use std::collections::{BTreeMap, HashSet};

use hypervisor::{DomId, EvtchnState, Hypervisor, HypervisorError, Pfn, Port, PAGE_SIZE};
use serde::{Deserialize, Serialize};

/// Version of the [`PvState`] JSON.
pub const PV_STATE_VERSION: u32 = 1;
/// `HVM_PARAM_CALLBACK_IRQ`.
pub const HVM_PARAM_CALLBACK_IRQ: u32 = 0;
/// `HVM_PARAM_STORE_PFN`.
pub const HVM_PARAM_STORE_PFN: u32 = 1;
/// `HVM_PARAM_CONSOLE_PFN`.
pub const HVM_PARAM_CONSOLE_PFN: u32 = 17;
/// `VIRQ_TIMER`.
pub const VIRQ_TIMER: u32 = 0;
/// FIFO event word bits (`EVTCHN_FIFO_*`).
pub const FIFO_PENDING: u32 = 1 << 31;
/// Masked.
pub const FIFO_MASKED: u32 = 1 << 30;
/// Linked into a queue.
pub const FIFO_LINKED: u32 = 1 << 29;
/// Busy (Xen is updating the word).
pub const FIFO_BUSY: u32 = 1 << 28;
/// The link field.
pub const FIFO_LINK_MASK: u32 = (1 << 17) - 1;
/// Event words per array page.
pub const WORDS_PER_PAGE: usize = PAGE_SIZE / 4;
/// Highest port scanned by [`read_ports`].
pub const MAX_PORT_SCAN: Port = 4095;
/// Pages read per call while scanning.
const SCAN_BATCH: usize = 512;

/// Errors of reading a guest's PV state.
#[derive(Debug, thiserror::Error)]
pub enum PvStateError {
    /// A call to Xen failed.
    #[error("domain {domid}: {step}: {source}")]
    Xen {
        /// The guest.
        domid: DomId,
        /// Which step.
        step: &'static str,
        /// The failed call.
        #[source]
        source: HypervisorError,
    },
    /// The guest's memory does not show what a transparent failover needs.
    #[error("domain {domid}: {why}")]
    NotFound {
        /// The guest.
        domid: DomId,
        /// What is missing, with what was found.
        why: String,
    },
    /// A PV state file is malformed or of another version.
    #[error("PV state: {0}")]
    Format(String),
}

/// How a port is bound (`EVTCHNOP_status`), without the closed ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PortKind {
    /// Connected to another domain's port.
    Interdomain {
        /// Remote domain.
        remote_dom: DomId,
        /// Remote port.
        remote_port: Port,
    },
    /// Allocated for `remote_dom` to bind.
    Unbound {
        /// The domain allowed to bind it.
        remote_dom: DomId,
    },
    /// A virtual IRQ.
    Virq {
        /// Which (`VIRQ_*`).
        virq: u32,
    },
    /// An inter-processor interrupt.
    Ipi,
    /// A physical IRQ (cannot be rebuilt: refused at failover).
    Pirq {
        /// Which.
        pirq: u32,
    },
}

/// One bound port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortEntry {
    /// Port number.
    pub port: Port,
    /// vCPU notified.
    pub vcpu: u32,
    /// Binding.
    #[serde(flatten)]
    pub kind: PortKind,
}

/// A guest frame and an offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrameOffset {
    /// Guest frame.
    pub gfn: Pfn,
    /// Byte offset in it.
    pub offset: u32,
}

/// What dom0 can read of a guest's PV state (one version of the `kemari debug pv-capture`
/// JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PvState {
    /// [`PV_STATE_VERSION`].
    pub version: u32,
    /// The guest's domain id where it was read.
    pub domid: DomId,
    /// vCPUs.
    pub vcpus: u32,
    /// Bound ports, ascending.
    pub ports: Vec<PortEntry>,
    /// `HVM_PARAM_CALLBACK_IRQ` (0 or 1: the guest uses per-vCPU upcall vectors, see
    /// `transparent::uses_percpu_vector`).
    pub callback_irq: u64,
    /// Where the guest mapped `shared_info`.
    pub shared_info_gfn: Pfn,
    /// Per vCPU (index = vCPU id), the registered `vcpu_info`.
    pub vcpu_info: Vec<FrameOffset>,
    /// Per vCPU, the FIFO control block (empty: 2-level event channels).
    pub fifo_control: Vec<FrameOffset>,
    /// FIFO event array pages, in order.
    pub fifo_array: Vec<Pfn>,
}

impl PvState {
    /// Parses a [`PvState`] JSON text, checking its version and shape.
    pub fn from_json(text: &str) -> Result<PvState, PvStateError> {
        let s: PvState =
            serde_json::from_str(text).map_err(|e| PvStateError::Format(e.to_string()))?;
        if s.version != PV_STATE_VERSION {
            return Err(PvStateError::Format(format!(
                "version {} (this kemari reads {PV_STATE_VERSION})",
                s.version
            )));
        }
        let n = s.vcpus as usize;
        if s.vcpu_info.len() != n || !(s.fifo_control.is_empty() || s.fifo_control.len() == n) {
            return Err(PvStateError::Format(format!(
                "{} vCPUs but {} vcpu_info and {} FIFO control blocks",
                n,
                s.vcpu_info.len(),
                s.fifo_control.len()
            )));
        }
        if s.ports.windows(2).any(|w| w[0].port >= w[1].port) {
            return Err(PvStateError::Format("ports not strictly ascending".into()));
        }
        Ok(s)
    }

    /// The `VIRQ_TIMER` port of `vcpu`.
    pub fn timer_port(&self, vcpu: u32) -> Option<Port> {
        self.ports
            .iter()
            .find(|p| p.vcpu == vcpu && p.kind == PortKind::Virq { virq: VIRQ_TIMER })
            .map(|p| p.port)
    }

    /// The guest frames Xen writes without log-dirty (copied at every checkpoint).
    pub fn xen_written_frames(&self) -> Vec<Pfn> {
        let mut v: Vec<Pfn> = self
            .vcpu_info
            .iter()
            .chain(&self.fifo_control)
            .map(|f| f.gfn)
            .chain(self.fifo_array.iter().copied())
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// Reads the bound ports of `domid` (1 up to the first port Xen calls invalid).
pub fn read_ports(hv: &dyn Hypervisor, domid: DomId) -> Result<Vec<PortEntry>, PvStateError> {
    let mut ports = Vec::new();
    for port in 1..=MAX_PORT_SCAN {
        let st = match hv.evtchn_status(domid, port) {
            Ok(st) => st,
            // EINVAL: beyond the domain's valid ports; EACCES: a Xen-consumed port (ioreq).
            Err(HypervisorError::Domain { errno, .. }) if errno == hypervisor::Errno::EINVAL => {
                break
            }
            Err(source) => {
                return Err(PvStateError::Xen {
                    domid,
                    step: "event channel status",
                    source,
                })
            }
        };
        let kind = match st.state {
            EvtchnState::Closed => continue,
            EvtchnState::Interdomain {
                remote_domid,
                remote_port,
            } => PortKind::Interdomain {
                remote_dom: remote_domid,
                remote_port,
            },
            EvtchnState::Unbound { remote_domid } => PortKind::Unbound {
                remote_dom: remote_domid,
            },
            EvtchnState::Virq(virq) => PortKind::Virq { virq },
            EvtchnState::Ipi => PortKind::Ipi,
            EvtchnState::Pirq(pirq) => PortKind::Pirq { pirq },
        };
        ports.push(PortEntry {
            port,
            vcpu: st.vcpu,
            kind,
        });
    }
    Ok(ports)
}

/// What [`scan_page`] recognised in one page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// A FIFO event array page.
    EventArray,
    /// A FIFO control block whose `head[0]` is this port.
    ControlBlock {
        /// `head[0]`.
        head0: Port,
    },
    /// A registered `vcpu_info` at this offset.
    VcpuInfo {
        /// Offset in the page.
        offset: u32,
    },
}

fn u32_at(page: &[u8], off: usize) -> u32 {
    page.get(off..off + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .unwrap_or(0)
}

fn u64_at(page: &[u8], off: usize) -> u64 {
    page.get(off..off + 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0)
}

/// Recognises the structures of the module documentation in one page. `bound` are the
/// guest's bound ports; `stime` is the window of Xen system times (ns) a `vcpu_info` written
/// at the guest's last schedule may hold (the guest ran moments before it was paused).
///
/// `scale` is the `(tsc_to_system_mul, tsc_shift)` Xen wrote into `shared_info`'s own
/// `vcpu_info[0]` before the guest registered its own: a registered one carries the same
/// shift and a multiplier within 1/64 of it (Xen recalibrates it a little every second).
pub fn scan_page(
    page: &[u8],
    bound: &[Port],
    stime: (u64, u64),
    scale: Option<(u32, i8)>,
) -> Vec<Found> {
    let mut found = Vec::new();
    if page.len() != PAGE_SIZE {
        return found;
    }
    // Event array: all words MASKED but at most the bound ports (+ slack).
    let masked = (0..WORDS_PER_PAGE)
        .filter(|i| u32_at(page, i * 4) == FIFO_MASKED)
        .count();
    if masked >= WORDS_PER_PAGE - bound.len().max(1) - 8 && masked < WORDS_PER_PAGE {
        found.push(Found::EventArray);
        return found;
    }
    // Control block: zeros after byte 72 and in _rsvd, head[0] a bound port, head[1..7] and
    // head[8..16] zero (Linux uses priorities 0 and 7 only).
    let head = |q: usize| u32_at(page, 8 + 4 * q);
    let tail_zero = page.get(72..).is_some_and(|t| t.iter().all(|b| *b == 0));
    if tail_zero
        && u32_at(page, 4) == 0
        && bound.contains(&head(0))
        && (1..7).chain(8..16).all(|q| head(q) == 0)
        && (head(7) == 0 || bound.contains(&head(7)))
    {
        found.push(Found::ControlBlock { head0: head(0) });
        return found;
    }
    // vcpu_info: 64-byte slots (Linux's per-CPU xen_vcpu_info is cache-line aligned).
    for off in (0..=PAGE_SIZE - 64).step_by(64) {
        let s = &page[off..off + 64];
        if s[0] > 1 || s[1] > 1 || s[2..8].iter().any(|b| *b != 0) {
            continue;
        }
        let version = u32_at(s, 32);
        let pad0 = u32_at(s, 36);
        let tsc_timestamp = u64_at(s, 40);
        let system_time = u64_at(s, 48);
        let mul = u32_at(s, 56);
        let shift = s[60] as i8;
        let flags = s[61];
        if version % 2 == 0
            && version != 0
            && pad0 == 0
            && tsc_timestamp != 0
            && system_time >= stime.0
            && system_time <= stime.1
            && mul != 0
            && (-8..=8).contains(&shift)
            && scale.map_or(true, |(m, sh)| sh == shift && mul.abs_diff(m) <= m / 64)
            && flags & !0x3 == 0
            && s[62] == 0
            && s[63] == 0
        {
            found.push(Found::VcpuInfo { offset: off as u32 });
        }
    }
    found
}

/// Reads the PV state of the paused guest `domid`: ports, callback parameter, and the frames
/// found by scanning its RAM (`shared_info_gfn` from the caller: `getdomaininfo`). `stime` is
/// the window of system times a registered `vcpu_info` may hold (see [`scan_page`]).
pub fn capture(
    hv: &dyn Hypervisor,
    domid: DomId,
    shared_info_gfn: Pfn,
    stime: (u64, u64),
) -> Result<PvState, PvStateError> {
    let xen = |step, source| PvStateError::Xen {
        domid,
        step,
        source,
    };
    let info = hv.domain_info(domid).map_err(|e| xen("domain info", e))?;
    if !info.paused {
        return Err(PvStateError::NotFound {
            domid,
            why: "the guest must be paused to read its PV state".into(),
        });
    }
    let vcpus = info.max_vcpu_id + 1;
    let ports = read_ports(hv, domid)?;
    let bound: Vec<Port> = ports.iter().map(|p| p.port).collect();
    let callback_irq = hv
        .hvm_param(domid, HVM_PARAM_CALLBACK_IRQ)
        .map_err(|e| xen("HVM_PARAM_CALLBACK_IRQ", e))?;
    let max_gpfn = hv.maximum_gpfn(domid).map_err(|e| xen("maximum gpfn", e))?;
    let mut shared = [0u8; PAGE_SIZE];
    hv.read_page(domid, shared_info_gfn, &mut shared)
        .map_err(|e| xen("reading shared_info", e))?;
    let scale = Some((u32_at(&shared, 56), shared[60] as i8)).filter(|(m, _)| *m != 0);
    log::info!("domain {domid}: shared_info's time scale {scale:?}");

    let mut arrays = Vec::new();
    let mut controls: Vec<(Pfn, Port)> = Vec::new();
    let mut infos: Vec<FrameOffset> = Vec::new();
    let mut buf = vec![0u8; SCAN_BATCH * PAGE_SIZE];
    let mut start: Pfn = 0;
    while start <= max_gpfn {
        let end = start.saturating_add(SCAN_BATCH as u64 - 1).min(max_gpfn);
        let pfns: Vec<Pfn> = (start..=end).collect();
        let bytes = buf.get_mut(..pfns.len() * PAGE_SIZE).unwrap_or_default();
        let failed: std::collections::HashSet<Pfn> = match hv.read_pages(domid, &pfns, bytes) {
            Ok(()) => Default::default(),
            Err(HypervisorError::Pages { failures, .. }) => {
                failures.into_iter().map(|(pfn, _)| pfn).collect()
            }
            Err(e) => return Err(xen("reading guest pages", e)),
        };
        for (pfn, page) in pfns.iter().zip(bytes.chunks_exact(PAGE_SIZE)) {
            if failed.contains(pfn) || *pfn == shared_info_gfn {
                continue;
            }
            for f in scan_page(page, &bound, stime, scale) {
                match f {
                    Found::EventArray => arrays.push(*pfn),
                    Found::ControlBlock { head0 } => controls.push((*pfn, head0)),
                    Found::VcpuInfo { offset } => infos.push(FrameOffset { gfn: *pfn, offset }),
                }
            }
        }
        if end == max_gpfn {
            break;
        }
        start = end + 1;
    }

    let mut state = PvState {
        version: PV_STATE_VERSION,
        domid,
        vcpus,
        ports,
        callback_irq,
        shared_info_gfn,
        vcpu_info: Vec::new(),
        fifo_control: Vec::new(),
        fifo_array: Vec::new(),
    };
    // vcpu_info: one per vCPU; Linux's per-CPU areas ascend with the CPU number.
    infos.sort_by_key(|f| (f.gfn, f.offset));
    if infos.len() != vcpus as usize {
        return Err(PvStateError::NotFound {
            domid,
            why: format!(
                "{vcpus} vCPUs but {} registered vcpu_info candidates: {:?}",
                infos.len(),
                infos.iter().map(|f| (f.gfn, f.offset)).collect::<Vec<_>>()
            ),
        });
    }
    state.vcpu_info = infos;
    if !arrays.is_empty() || !controls.is_empty() {
        // FIFO: each vCPU's control block is the one whose head[0] is its timer port.
        let mut by_port: BTreeMap<Port, Vec<Pfn>> = BTreeMap::new();
        for (gfn, head0) in &controls {
            by_port.entry(*head0).or_default().push(*gfn);
        }
        let mut per_vcpu = Vec::new();
        for v in 0..vcpus {
            let tp = state.timer_port(v);
            let gfns = tp
                .and_then(|tp| by_port.get(&tp))
                .cloned()
                .unwrap_or_default();
            match gfns.as_slice() {
                [gfn] => per_vcpu.push(FrameOffset {
                    gfn: *gfn,
                    offset: 0,
                }),
                other => {
                    return Err(PvStateError::NotFound {
                        domid,
                        why: format!(
                            "vCPU {v} (timer port {tp:?}): {} FIFO control block candidates {other:?} (all: {controls:?})",
                            other.len()
                        ),
                    })
                }
            }
        }
        let max_port = bound.last().copied().unwrap_or(0) as usize;
        let need = max_port / WORDS_PER_PAGE + 1;
        if arrays.len() != need {
            return Err(PvStateError::NotFound {
                domid,
                why: format!(
                    "ports up to {max_port} need {need} FIFO event array pages, found {arrays:?}"
                ),
            });
        }
        state.fifo_control = per_vcpu;
        state.fifo_array = arrays;
    }
    Ok(state)
}

/// The guest's per-port pending bit state is rebuilt by marking every bound port pending:
/// each handler then checks its ring or timer, and a spurious event costs a scan. Returns the
/// canonicalised event array page: LINKED and the link cleared in every word (Xen refuses to
/// allocate a port whose word is still LINKED, and the queues are rebuilt by unmasking),
/// PENDING set on `bound` ports, MASKED kept. `first_port` is the page's first port.
pub fn canonical_event_array(page: &[u8], first_port: Port, bound: &[Port]) -> Vec<u8> {
    let mut out = page.to_vec();
    let pending: HashSet<usize> = bound
        .iter()
        .filter(|p| **p >= first_port && ((**p - first_port) as usize) < WORDS_PER_PAGE)
        .map(|p| (*p - first_port) as usize)
        .collect();
    for (i, w) in out.chunks_exact_mut(4).enumerate() {
        let mut word = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
        word &= !(FIFO_LINKED | FIFO_LINK_MASK | FIFO_BUSY);
        if pending.contains(&i) {
            word |= FIFO_PENDING;
        }
        w.copy_from_slice(&word.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const ANY: (u64, u64) = (0, u64::MAX);

    fn put32(p: &mut [u8], off: usize, v: u32) {
        p[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn array_page(bound: &[(Port, u32)]) -> Vec<u8> {
        let mut p = vec![0u8; PAGE_SIZE];
        for i in 0..WORDS_PER_PAGE {
            put32(&mut p, i * 4, FIFO_MASKED);
        }
        for (port, w) in bound {
            put32(&mut p, *port as usize * 4, *w);
        }
        p
    }

    fn vcpu_info_slot(p: &mut [u8], off: usize, stime: u64) {
        p[off] = 1;
        put32(p, off + 32, 1234);
        p[off + 40] = 7; // tsc_timestamp
        p[off + 48..off + 56].copy_from_slice(&stime.to_le_bytes());
        put32(p, off + 56, 0x8000_0000);
        p[off + 60] = 0xff; // shift -1
        p[off + 61] = 1;
    }

    #[test]
    fn recognises_linux_fifo_structures() {
        let bound = [1, 2, 3, 4, 5];
        let a = array_page(&[
            (1, 0),
            (2, 0),
            (3, FIFO_PENDING | FIFO_LINKED),
            (4, 0),
            (5, 0),
        ]);
        assert_eq!(scan_page(&a, &bound, ANY, None), vec![Found::EventArray]);

        let mut cb = vec![0u8; PAGE_SIZE];
        put32(&mut cb, 0, 1);
        put32(&mut cb, 8, 3);
        put32(&mut cb, 8 + 28, 2);
        assert_eq!(
            scan_page(&cb, &bound, ANY, None),
            vec![Found::ControlBlock { head0: 3 }]
        );

        let mut pc = vec![0x5au8; PAGE_SIZE];
        pc[0x3c0..0x400].fill(0);
        vcpu_info_slot(&mut pc, 0x3c0, 40_000_000_000);
        assert_eq!(
            scan_page(
                &pc,
                &bound,
                (30_000_000_000, 100_000_000_000),
                Some((0x8000_0100, -1))
            ),
            vec![Found::VcpuInfo { offset: 0x3c0 }]
        );
        // a system time outside the window is no vcpu_info, nor a slot off the 64-byte grid
        assert!(scan_page(&pc, &bound, (0, 1_000), None).is_empty());
        // another clock scale: not Xen's
        assert!(scan_page(&pc, &bound, ANY, Some((0x4000_0000, -1))).is_empty());
        assert!(scan_page(&pc, &bound, ANY, Some((0x8000_0000, 0))).is_empty());
        assert!(scan_page(&pc, &bound, (50_000_000_000, u64::MAX), None).is_empty());
        let mut off = vec![0u8; PAGE_SIZE];
        vcpu_info_slot(&mut off, 0x3c8, 40_000_000_000);
        assert!(scan_page(&off, &bound, ANY, None).is_empty());
    }

    #[test]
    fn ordinary_pages_are_nothing() {
        let bound = [1, 2, 3];
        assert!(scan_page(&vec![0u8; PAGE_SIZE], &bound, ANY, None).is_empty());
        assert!(scan_page(&vec![0xffu8; PAGE_SIZE], &bound, ANY, None).is_empty());
        // a cleared page with head[0] = an unbound port is no control block
        let mut cb = vec![0u8; PAGE_SIZE];
        put32(&mut cb, 8, 77);
        assert!(scan_page(&cb, &bound, ANY, None).is_empty());
        // a control-block-shaped page with data after byte 72 is not one
        put32(&mut cb, 8, 3);
        cb[100] = 1;
        assert!(scan_page(&cb, &bound, ANY, None).is_empty());
        // an all-MASKED page has no bound port: not the array of a guest with ports
        let a = array_page(&[]);
        assert!(scan_page(&a, &bound, ANY, None).is_empty());
    }

    #[test]
    fn canonical_array_clears_links_and_marks_bound_pending() {
        let a = array_page(&[
            (1, FIFO_LINKED | 3),
            (3, FIFO_PENDING | FIFO_LINKED),
            (4, FIFO_MASKED | FIFO_LINKED),
        ]);
        let c = canonical_event_array(&a, 0, &[1, 3, 4]);
        let w = |i: usize| u32::from_le_bytes(c[i * 4..i * 4 + 4].try_into().unwrap());
        assert_eq!(w(1), FIFO_PENDING);
        assert_eq!(w(3), FIFO_PENDING);
        assert_eq!(w(4), FIFO_PENDING | FIFO_MASKED);
        assert_eq!(w(2), FIFO_MASKED);
        assert_eq!(w(0), FIFO_MASKED);
    }

    #[test]
    fn pv_state_json_round_trip_and_checks() {
        let s = PvState {
            version: PV_STATE_VERSION,
            domid: 3,
            vcpus: 1,
            ports: vec![
                PortEntry {
                    port: 1,
                    vcpu: 0,
                    kind: PortKind::Interdomain {
                        remote_dom: 0,
                        remote_port: 40,
                    },
                },
                PortEntry {
                    port: 3,
                    vcpu: 0,
                    kind: PortKind::Virq { virq: VIRQ_TIMER },
                },
                PortEntry {
                    port: 4,
                    vcpu: 0,
                    kind: PortKind::Ipi,
                },
            ],
            callback_irq: 0,
            shared_info_gfn: 0x1000,
            vcpu_info: vec![FrameOffset {
                gfn: 0x7a31,
                offset: 0x3c0,
            }],
            fifo_control: vec![FrameOffset {
                gfn: 0x51b3,
                offset: 0,
            }],
            fifo_array: vec![0x520f],
        };
        let text = serde_json::to_string(&s).unwrap();
        assert_eq!(PvState::from_json(&text).unwrap(), s);
        assert_eq!(s.timer_port(0), Some(3));
        assert_eq!(s.xen_written_frames(), vec![0x51b3, 0x520f, 0x7a31]);
        let mut bad = s.clone();
        bad.version = 9;
        let e = PvState::from_json(&serde_json::to_string(&bad).unwrap()).unwrap_err();
        assert!(matches!(e, PvStateError::Format(_)), "{e}");
        let mut bad = s.clone();
        bad.vcpus = 2;
        assert!(PvState::from_json(&serde_json::to_string(&bad).unwrap()).is_err());
        let mut bad = s;
        bad.ports.swap(0, 1);
        assert!(PvState::from_json(&serde_json::to_string(&bad).unwrap()).is_err());
    }
}
