//! `kemari-hostile blk DEVID` / `kemari-hostile vif DEVID`: a misbehaving Xen block or network
//! frontend, run in a lab guest's userspace (lab scenario `hostile`, docs/testing.md).
//!
//! The guest's own blkfront/netfront must not drive the device (the guest sets
//! `/sys/bus/xen/drivers_autoprobe` to 0). The program waits for `device/vbd/DEVID` (or
//! `device/vif/DEVID`) to appear (dom0 hot-plugs it with `kemari attach`), connects like the
//! kernel's frontend would (ring pages granted through `/dev/xen/gntalloc`, an unbound event
//! channel for dom0 through `/dev/xen/evtchn`, the frontend nodes through `/dev/xen/xenbus`),
//! then:
//!
//! 1. queues one batch of requests, most of them garbage (blk: unknown operations, segment
//!    counts out of range, sectors past the disk's end, grants it never gave or revoked, a read
//!    into a read-only grant, bad indirect requests and descriptors; vif: TX slots leaving their
//!    page, runts, slots longer than their packet, grants not given or revoked) between valid
//!    ones, and checks that every request gets exactly one response, garbage an error, valid
//!    ones OKAY (blk: a valid read returns what a valid write of the batch stored);
//! 2. kicks the backend 2,000 times with nothing queued, then checks a valid request still works;
//! 3. moves `req_prod` far beyond the ring and kicks: the backend must end the device (backend
//!    state Closed, `kemari-error` set) without answering anything more.
//!
//! Prints `kemari-hostile KIND ...` lines and a final `kemari-hostile KIND done ... result=ok`
//! (or `result=FAIL`); the exit status is 0 only for `ok`.

mod xen;

use std::process::ExitCode;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use xen::{Evtchn, GntAlloc, Grant, XenBus, PAGE_SIZE};
use Expect::{AnyError, Error, NotSupported, Okay};

// io/blkif.h, x86_64 ABI
const OP_READ: u8 = 0;
const OP_WRITE: u8 = 1;
const OP_FLUSH: u8 = 3;
const OP_DISCARD: u8 = 5;
const OP_INDIRECT: u8 = 6;
const RSP_OKAY: i16 = 0;
const RSP_ERROR: i16 = -1;
const RSP_EOPNOTSUPP: i16 = -2;
/// Bytes per blkif ring slot.
const ENTRY: usize = 112;
// io/netif.h: TX slots (request 12 bytes), RX slots (8)
const TX_ENTRY: usize = 12;
const RX_ENTRY: usize = 8;
/// The shared ring's header (indexes and padding) before the slots.
const HEADER: usize = 64;
// sring header offsets
const REQ_PROD: usize = 0;
const REQ_EVENT: usize = 4;
const RSP_PROD: usize = 8;
const RSP_EVENT: usize = 12;

const BACKEND_DOMID: u16 = 0;
/// A grant reference far beyond any grant table.
const BOGUS_GREF: u32 = 0xFFFF_FFF0;

/// What a request must get.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Okay,
    /// BLKIF_RSP_ERROR / NETIF_RSP_ERROR (-1).
    Error,
    /// BLKIF_RSP_EOPNOTSUPP.
    NotSupported,
    /// Either error status (the protocol allows both).
    AnyError,
}

impl Expect {
    fn accepts(self, status: i16) -> bool {
        match self {
            Expect::Okay => status == RSP_OKAY,
            Expect::Error => status == RSP_ERROR,
            Expect::NotSupported => status == RSP_EOPNOTSUPP,
            Expect::AnyError => status == RSP_ERROR || status == RSP_EOPNOTSUPP,
        }
    }
}

/// One ring slot to queue and what its response must be.
struct Req {
    what: &'static str,
    /// The id its response must carry.
    id: u64,
    entry: Vec<u8>,
    expect: Expect,
}

/// A block request (its id is in the entry).
fn req(expect: Expect, what: &'static str, entry: [u8; ENTRY]) -> Req {
    let mut id = [0u8; 8];
    id.copy_from_slice(&entry[8..16]);
    Req {
        what,
        id: u64::from_le_bytes(id),
        entry: entry.to_vec(),
        expect,
    }
}

/// `struct blkif_request`: op, nr_segments, handle, id, sector, segments (gref, first, last).
fn rw(op: u8, nr_segments: u8, id: u64, sector: u64, segs: &[(u32, u8, u8)]) -> [u8; ENTRY] {
    let mut e = [0u8; ENTRY];
    e[0] = op;
    e[1] = nr_segments;
    e[8..16].copy_from_slice(&id.to_le_bytes());
    e[16..24].copy_from_slice(&sector.to_le_bytes());
    for (i, (gref, first, last)) in segs.iter().enumerate().take(11) {
        let at = 24 + i * 8;
        e[at..at + 4].copy_from_slice(&gref.to_le_bytes());
        e[at + 4] = *first;
        e[at + 5] = *last;
    }
    e
}

/// `struct blkif_request_indirect`: op, indirect_op, nr_segments, id, sector, handle, grefs.
fn indirect(indirect_op: u8, nr_segments: u16, id: u64, sector: u64, grefs: &[u32]) -> [u8; ENTRY] {
    let mut e = [0u8; ENTRY];
    e[0] = OP_INDIRECT;
    e[1] = indirect_op;
    e[2..4].copy_from_slice(&nr_segments.to_le_bytes());
    e[8..16].copy_from_slice(&id.to_le_bytes());
    e[16..24].copy_from_slice(&sector.to_le_bytes());
    for (i, g) in grefs.iter().enumerate().take(8) {
        let at = 28 + i * 4;
        e[at..at + 4].copy_from_slice(&g.to_le_bytes());
    }
    e
}

/// `struct blkif_request_discard`.
fn discard(id: u64, sector: u64, nr_sectors: u64) -> [u8; ENTRY] {
    let mut e = [0u8; ENTRY];
    e[0] = OP_DISCARD;
    e[8..16].copy_from_slice(&id.to_le_bytes());
    e[16..24].copy_from_slice(&sector.to_le_bytes());
    e[24..32].copy_from_slice(&nr_sectors.to_le_bytes());
    e
}

fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if t0.elapsed() > timeout {
            bail!("timed out after {} s waiting for {what}", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Tallies of the responses.
#[derive(Default)]
struct Tally {
    requests: u32,
    okay: u32,
    error: u32,
    eopnotsupp: u32,
    wrong: u32,
}

impl Tally {
    fn count(&mut self, status: i16) {
        self.requests += 1;
        match status {
            RSP_OKAY => self.okay += 1,
            RSP_ERROR => self.error += 1,
            RSP_EOPNOTSUPP => self.eopnotsupp += 1,
            _ => {}
        }
    }
}

/// `__RING_SIZE` of a one-page ring: the slots after the header, rounded down to a power of two.
fn ring_slots(entry: usize) -> u32 {
    let fit = ((PAGE_SIZE - HEADER) / entry) as u32;
    1 << (31 - fit.leading_zeros())
}

/// The frontend end of a one-page shared ring.
struct Ring {
    mem: Grant,
    /// Bytes per slot.
    entry: usize,
    /// Slots (a power of two).
    size: u32,
    req_prod: u32,
    rsp_cons: u32,
    /// A response's (id, status).
    decode: fn(&[u8]) -> (u64, i16),
}

impl Ring {
    fn new(mem: Grant, entry: usize, decode: fn(&[u8]) -> (u64, i16)) -> Ring {
        let size = ring_slots(entry);
        for (off, v) in [(REQ_PROD, 0), (REQ_EVENT, 1), (RSP_PROD, 0), (RSP_EVENT, 1)] {
            mem.write_u32(off, v);
        }
        Ring {
            mem,
            entry,
            size,
            req_prod: 0,
            rsp_cons: 0,
            decode,
        }
    }

    fn push(&mut self, entry: &[u8]) {
        let slot = (self.req_prod % self.size) as usize;
        self.mem.write(HEADER + slot * self.entry, entry);
        self.req_prod = self.req_prod.wrapping_add(1);
    }

    /// Publishes `req_prod` (requests first: wmb).
    fn publish(&self, req_prod: u32) {
        fence(Ordering::SeqCst);
        self.mem.write_u32(REQ_PROD, req_prod);
        fence(Ordering::SeqCst);
    }

    fn rsp_prod(&self) -> u32 {
        self.mem.read_u32(RSP_PROD)
    }

    /// The next response's (id, status).
    fn take(&mut self) -> (u64, i16) {
        let slot = (self.rsp_cons % self.size) as usize;
        let mut rsp = vec![0u8; self.entry.min(16)];
        self.mem.read(HEADER + slot * self.entry, &mut rsp);
        self.rsp_cons = self.rsp_cons.wrapping_add(1);
        (self.decode)(&rsp)
    }
}

/// Connection to the backend: xenstore, the event channel, where the backend is.
struct Frontend {
    kind: &'static str,
    xs: XenBus,
    evtchn: Evtchn,
    port: u32,
    backend: String,
}

impl Frontend {
    /// Waits for the device's frontend directory `dev` and its backend in InitWait.
    fn find(kind: &'static str, dev: &str) -> anyhow::Result<(XenBus, String)> {
        let mut xs = XenBus::open()?;
        println!("kemari-hostile {kind}: waiting for {dev}");
        let backend = wait_for(&format!("{dev}/backend"), Duration::from_secs(900), || {
            xs.read(&format!("{dev}/backend"))
        })?;
        let bstate = format!("{backend}/state");
        wait_for("backend InitWait", Duration::from_secs(60), || {
            Ok(xs.read(&bstate)?.filter(|s| s == "2"))
        })?;
        Ok((xs, backend))
    }

    /// Writes the frontend's nodes (`state` last) and waits for the backend to connect.
    fn connect(&mut self, dev: &str, nodes: &[(&str, String)]) -> anyhow::Result<()> {
        for (k, v) in nodes {
            self.xs.write(&format!("{dev}/{k}"), v)?;
        }
        wait_for("backend Connected", Duration::from_secs(60), || {
            Ok(self.backend_state()?.filter(|s| s == "4"))
        })?;
        Ok(())
    }

    fn backend_state(&mut self) -> anyhow::Result<Option<String>> {
        let p = format!("{}/state", self.backend);
        self.xs.read(&p)
    }

    /// Queues `reqs` (at most a ring's worth), kicks, waits for all responses and checks them.
    fn batch(&mut self, ring: &mut Ring, reqs: &[Req], tally: &mut Tally) -> anyhow::Result<()> {
        if reqs.len() > ring.size as usize {
            bail!(
                "{} requests do not fit in a ring of {}",
                reqs.len(),
                ring.size
            );
        }
        for r in reqs {
            ring.push(&r.entry);
        }
        ring.publish(ring.req_prod);
        self.evtchn.notify(self.port)?;
        let want = ring.req_prod;
        wait_for("the responses", Duration::from_secs(60), || {
            Ok((ring.rsp_prod() == want).then_some(()))
        })?;
        fence(Ordering::SeqCst); // rmb
        let mut seen = vec![false; reqs.len()];
        while ring.rsp_cons != want {
            let (id, status) = ring.take();
            tally.count(status);
            let idx = (0..reqs.len()).find(|&i| reqs[i].id == id && !seen[i]);
            let (what, expect) = match idx {
                Some(i) => {
                    seen[i] = true;
                    (reqs[i].what, Some(reqs[i].expect))
                }
                None => ("response with an unknown or repeated id", None),
            };
            let ok = expect.is_some_and(|e| e.accepts(status));
            if !ok {
                tally.wrong += 1;
            }
            println!(
                "kemari-hostile {}   {what:<44} id={id:#x} status={status} expected={expect:?}{}",
                self.kind,
                if ok { "" } else { " WRONG" }
            );
        }
        Ok(())
    }

    /// Kicks `n` times with nothing queued.
    fn kicks(&self, n: u32) -> anyhow::Result<()> {
        println!(
            "kemari-hostile {}: {n} kicks with nothing queued",
            self.kind
        );
        for _ in 0..n {
            self.evtchn.notify(self.port)?;
        }
        Ok(())
    }

    /// Moves `req_prod` 1,000 slots beyond what `ring` holds and kicks: the backend must end
    /// the device. Returns the backend's state after, its `kemari-error`, and how many
    /// responses it published after the overflow.
    fn overflow(&mut self, ring: &Ring) -> anyhow::Result<(String, String, u32)> {
        let rsp_before = ring.rsp_prod();
        let bad = ring.req_prod.wrapping_add(1000);
        println!(
            "kemari-hostile {}: req_prod {} -> {bad} (ring of {}) and a kick",
            self.kind, ring.req_prod, ring.size
        );
        ring.publish(bad);
        self.evtchn.notify(self.port)?;
        let end_state = match wait_for("backend Closed", Duration::from_secs(60), || {
            Ok(self.backend_state()?.filter(|s| s == "6"))
        }) {
            Ok(s) => s,
            Err(e) => {
                println!("kemari-hostile {}: {e}", self.kind);
                self.backend_state()?.unwrap_or_else(|| "gone".into())
            }
        };
        let error = self
            .xs
            .read(&format!("{}/kemari-error", self.backend))?
            .unwrap_or_default();
        // nothing answered after the overflow; a late kick is ignored (the port is unbound)
        self.evtchn.notify(self.port)?;
        std::thread::sleep(Duration::from_millis(500));
        Ok((end_state, error, ring.rsp_prod().wrapping_sub(rsp_before)))
    }
}

/// `blkif_response`: id (u64), operation, status (i16 at byte 10).
fn blk_response(r: &[u8]) -> (u64, i16) {
    let mut id = [0u8; 8];
    id.copy_from_slice(&r[0..8]);
    (u64::from_le_bytes(id), i16::from_le_bytes([r[10], r[11]]))
}

/// `netif_tx_response`: id (u16), status (i16).
fn tx_response(r: &[u8]) -> (u64, i16) {
    (
        u64::from(u16::from_le_bytes([r[0], r[1]])),
        i16::from_le_bytes([r[2], r[3]]),
    )
}

/// Prints the final line; true if everything held.
fn verdict(
    kind: &str,
    tally: &Tally,
    checks: &[(&str, bool)],
    end: &(String, String, u32),
) -> bool {
    let (end_state, error, after) = end;
    let failed: Vec<&str> = checks.iter().filter(|c| !c.1).map(|c| c.0).collect();
    let ok = tally.wrong == 0
        && failed.is_empty()
        && end_state == "6"
        && !error.is_empty()
        && *after == 0;
    println!(
        "kemari-hostile {kind} done requests={} okay={} error={} eopnotsupp={} wrong={} failed_checks={} state_after_overflow={end_state} responses_after_overflow={after} result={} kemari-error: {error}",
        tally.requests,
        tally.okay,
        tally.error,
        tally.eopnotsupp,
        tally.wrong,
        if failed.is_empty() { "none".to_owned() } else { failed.join(",") },
        if ok { "ok" } else { "FAIL" }
    );
    ok
}

fn blk(devid: u32) -> anyhow::Result<bool> {
    let dev = format!("device/vbd/{devid}");
    let (mut xs, backend) = Frontend::find("blk", &dev)?;
    let sectors: u64 = xs
        .read(&format!("{backend}/sectors"))?
        .context("no sectors node")?
        .trim()
        .parse()
        .context("sectors node")?;
    println!("kemari-hostile blk: backend {backend} in InitWait, {sectors} sectors");

    let gnt = GntAlloc::open()?;
    let evtchn = Evtchn::open()?;
    let mut ring = Ring::new(gnt.alloc(BACKEND_DOMID, 1, true)?, ENTRY, blk_response);
    // data page written to disk, page read into, an indirect descriptor page
    let data = gnt.alloc(BACKEND_DOMID, 3, true)?;
    let readonly = gnt.alloc(BACKEND_DOMID, 1, false)?;
    let revoked = gnt.revoke(gnt.alloc(BACKEND_DOMID, 1, true)?)?[0];
    let port = evtchn.bind_unbound(u32::from(BACKEND_DOMID))?;
    let mut fe = Frontend {
        kind: "blk",
        xs,
        evtchn,
        port,
        backend,
    };
    fe.connect(
        &dev,
        &[
            ("ring-ref", ring.mem.refs[0].to_string()),
            ("event-channel", port.to_string()),
            ("protocol", "x86_64-abi".to_owned()),
            ("state", "3".to_owned()),
        ],
    )?;
    println!(
        "kemari-hostile blk: connected: ring-ref {} port {port}, data grants {:?}, read-only grant {}, revoked grant {revoked}",
        ring.mem.refs[0], data.refs, readonly.refs[0]
    );

    let (wpage, rpage, dpage) = (data.refs[0], data.refs[1], data.refs[2]);
    let pattern: Vec<u8> = (0..PAGE_SIZE).map(|i| (i * 7 + 3) as u8).collect();
    data.write(0, &pattern);
    // indirect descriptors: a bogus grant, then a sector range beyond the page
    let mut desc = [0u8; 16];
    desc[0..4].copy_from_slice(&BOGUS_GREF.to_le_bytes());
    desc[5] = 7;
    desc[8..12].copy_from_slice(&wpage.to_le_bytes());
    desc[12] = 2;
    desc[13] = 9;
    data.write(2 * PAGE_SIZE, &desc);

    let ro = readonly.refs[0];
    let mut id = 0x4b00u64;
    let mut next = || {
        id += 1;
        id
    };
    let full = (wpage, 0u8, 7u8);
    #[rustfmt::skip]
    let batch1 = vec![
        req(Okay, "valid write of a page at sector 8", rw(OP_WRITE, 1, next(), 8, &[full])),
        req(NotSupported, "unknown operation 0xee", rw(0xee, 1, next(), 0, &[full])),
        req(NotSupported, "reserved operation 4", rw(4, 1, next(), 0, &[full])),
        req(Error, "read with 0 segments", rw(OP_READ, 0, next(), 0, &[])),
        req(Error, "read with 12 segments", rw(OP_READ, 12, next(), 0, &[full; 11])),
        req(Error, "write with 255 segments", rw(OP_WRITE, 255, next(), 0, &[full; 11])),
        req(Error, "segment first_sect 7 > last_sect 3", rw(OP_READ, 1, next(), 0, &[(rpage, 7, 3)])),
        req(Error, "segment last_sect 8 (beyond the page)", rw(OP_READ, 1, next(), 0, &[(rpage, 0, 8)])),
        req(Error, "read at the disk's end", rw(OP_READ, 1, next(), sectors, &[(rpage, 0, 0)])),
        req(Error, "read at sector 2^64-4 (overflow)", rw(OP_READ, 1, next(), u64::MAX - 3, &[full])),
        req(Error, "write from grant 0xfffffff0 (not ours)", rw(OP_WRITE, 1, next(), 16, &[(BOGUS_GREF, 0, 7)])),
        req(Error, "write from a revoked grant", rw(OP_WRITE, 1, next(), 16, &[(revoked, 0, 7)])),
        req(Error, "read into a read-only grant", rw(OP_READ, 1, next(), 0, &[(ro, 0, 7)])),
        req(Error, "second segment from a bogus grant", rw(OP_WRITE, 2, next(), 16, &[full, (BOGUS_GREF, 0, 7)])),
        req(Error, "indirect with 0 segments", indirect(OP_READ, 0, next(), 0, &[dpage])),
        req(Error, "indirect with 9999 segments", indirect(OP_READ, 9999, next(), 0, &[dpage; 8])),
        req(AnyError, "indirect with inner operation 0xee", indirect(0xee, 1, next(), 0, &[dpage])),
        req(Error, "indirect descriptor page from a bogus grant", indirect(OP_WRITE, 1, next(), 0, &[BOGUS_GREF])),
        req(Error, "indirect descriptors: bogus grant", indirect(OP_WRITE, 1, next(), 0, &[dpage])),
        req(Error, "indirect descriptors: last_sect 9", indirect(OP_READ, 2, next(), 0, &[dpage])),
        req(AnyError, "discard past the disk's end", discard(next(), sectors - 1, 1 << 40)),
        req(AnyError, "discard at sector 2^64-1", discard(next(), u64::MAX, 8)),
        req(Okay, "flush (valid)", rw(OP_FLUSH, 0, next(), 0, &[])),
        req(Okay, "valid read of sector 8", rw(OP_READ, 1, next(), 8, &[(rpage, 0, 7)])),
    ];
    let mut tally = Tally::default();
    println!("kemari-hostile blk: batch of {} requests", batch1.len());
    fe.batch(&mut ring, &batch1, &mut tally)?;
    let mut back = vec![0u8; PAGE_SIZE];
    data.read(PAGE_SIZE, &mut back);
    let readback_ok = back == pattern;
    println!(
        "kemari-hostile blk: read-back of the valid write {}",
        if readback_ok { "matches" } else { "DIFFERS" }
    );

    fe.kicks(2000)?;
    data.write(PAGE_SIZE, &[0u8; PAGE_SIZE]);
    let batch2 = [req(
        Okay,
        "valid read of sector 8 after the kicks",
        rw(OP_READ, 1, next(), 8, &[(rpage, 0, 7)]),
    )];
    fe.batch(&mut ring, &batch2, &mut tally)?;
    data.read(PAGE_SIZE, &mut back);
    let readback2_ok = back == pattern;
    let state_before = fe.backend_state()?.unwrap_or_default();

    let end = fe.overflow(&ring)?;
    fe.xs.write(&format!("{dev}/state"), "6")?;
    Ok(verdict(
        "blk",
        &tally,
        &[
            ("readback", readback_ok),
            ("readback_after_kicks", readback2_ok),
            ("connected_after_batches", state_before == "4"),
        ],
        &end,
    ))
}

/// A TX request (`netif_tx_request`: gref, offset, flags, id, size).
fn tx(expect: Expect, what: &'static str, slot: (u32, u16, u16, u16, u16)) -> Req {
    let (gref, offset, flags, id, size) = slot;
    let mut e = vec![0u8; TX_ENTRY];
    e[0..4].copy_from_slice(&gref.to_le_bytes());
    e[4..6].copy_from_slice(&offset.to_le_bytes());
    e[6..8].copy_from_slice(&flags.to_le_bytes());
    e[8..10].copy_from_slice(&id.to_le_bytes());
    e[10..12].copy_from_slice(&size.to_le_bytes());
    Req {
        what,
        id: u64::from(id),
        entry: e,
        expect,
    }
}

fn vif(devid: u32) -> anyhow::Result<bool> {
    let dev = format!("device/vif/{devid}");
    let (xs, backend) = Frontend::find("vif", &dev)?;
    println!("kemari-hostile vif: backend {backend} in InitWait");
    let gnt = GntAlloc::open()?;
    let evtchn = Evtchn::open()?;
    let mut txr = Ring::new(gnt.alloc(BACKEND_DOMID, 1, true)?, TX_ENTRY, tx_response);
    let rxr = Ring::new(gnt.alloc(BACKEND_DOMID, 1, true)?, RX_ENTRY, tx_response);
    let data = gnt.alloc(BACKEND_DOMID, 1, true)?;
    let revoked = gnt.revoke(gnt.alloc(BACKEND_DOMID, 1, true)?)?[0];
    let port = evtchn.bind_unbound(u32::from(BACKEND_DOMID))?;
    let mut fe = Frontend {
        kind: "vif",
        xs,
        evtchn,
        port,
        backend,
    };
    fe.connect(
        &dev,
        &[
            ("tx-ring-ref", txr.mem.refs[0].to_string()),
            ("rx-ring-ref", rxr.mem.refs[0].to_string()),
            ("event-channel", port.to_string()),
            ("request-rx-copy", "1".to_owned()),
            ("feature-rx-notify", "1".to_owned()),
            ("state", "4".to_owned()),
        ],
    )?;
    println!(
        "kemari-hostile vif: connected: tx-ring-ref {} rx-ring-ref {} port {port}, data grant {}, revoked grant {revoked}",
        txr.mem.refs[0], rxr.mem.refs[0], data.refs[0]
    );
    // a broadcast frame of the local experimental EtherType 0x88b5 (nothing acts on it)
    let mut frame = vec![0u8; 60];
    frame[0..6].copy_from_slice(&[0xff; 6]);
    frame[6..12].copy_from_slice(&[0x02, 0, 0, 0x4b, 0x4d, 0x01]);
    frame[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
    data.write(0, &frame);
    let g = data.refs[0];
    const MORE: u16 = 4; // NETTXF_more_data
    #[rustfmt::skip]
    let batch1 = vec![
        tx(Okay, "valid 60-byte frame", (g, 0, 0, 1, 60)),
        tx(Error, "slot leaving its page (offset 4000, 200 bytes)", (g, 4000, 0, 2, 200)),
        tx(Error, "runt of 10 bytes", (g, 0, 0, 3, 10)),
        tx(Error, "frame from grant 0xfffffff0 (not ours)", (BOGUS_GREF, 0, 0, 4, 60)),
        tx(Error, "frame from a revoked grant", (revoked, 0, 0, 5, 60)),
        tx(Error, "packet of 100 bytes, slot 1 of 2", (g, 0, MORE, 6, 100)),
        tx(Error, "slot 2 of 2 (200 bytes: more than the packet)", (g, 0, 0, 7, 200)),
        tx(Okay, "valid frame after the garbage", (g, 0, 0, 8, 60)),
    ];
    let mut tally = Tally::default();
    println!("kemari-hostile vif: TX batch of {} slots", batch1.len());
    fe.batch(&mut txr, &batch1, &mut tally)?;
    fe.kicks(2000)?;
    let batch2 = [tx(Okay, "valid frame after the kicks", (g, 0, 0, 9, 60))];
    fe.batch(&mut txr, &batch2, &mut tally)?;
    let state_before = fe.backend_state()?.unwrap_or_default();
    let end = fe.overflow(&txr)?;
    fe.xs.write(&format!("{dev}/state"), "6")?;
    Ok(verdict(
        "vif",
        &tally,
        &[("connected_after_batches", state_before == "4")],
        &end,
    ))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let devid = args.get(2).map(|s| s.parse::<u32>());
    let (kind, result) = match (args.get(1).map(String::as_str), devid) {
        (Some("blk"), Some(Ok(d))) => ("blk", blk(d)),
        (Some("vif"), Some(Ok(d))) => ("vif", vif(d)),
        _ => (
            "?",
            Err(anyhow::anyhow!("usage: kemari-hostile blk|vif DEVID")),
        ),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            println!("kemari-hostile {kind} FAIL: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_sizes_match_xen() {
        // io/blkif.h: 32 requests per page; io/netif.h: NET_TX_RING_SIZE = NET_RX_RING_SIZE = 256
        assert_eq!(ring_slots(ENTRY), 32);
        assert_eq!(ring_slots(TX_ENTRY), 256);
        assert_eq!(ring_slots(RX_ENTRY), 256);
    }

    #[test]
    fn requests_carry_their_ids() {
        let r = req(Okay, "x", rw(OP_READ, 1, 0x1234_5678_9abc, 8, &[(5, 0, 7)]));
        assert_eq!(r.id, 0x1234_5678_9abc);
        assert_eq!(&r.entry[24..30], &[5, 0, 0, 0, 0, 7]);
        let t = tx(Error, "y", (9, 4000, 4, 0x77, 200));
        assert_eq!(t.id, 0x77);
        assert_eq!(tx_response(&[0x77, 0, 0xff, 0xff]), (0x77, -1));
        let mut b = [0u8; 16];
        b[0] = 3;
        b[10..12].copy_from_slice(&(-2i16).to_le_bytes());
        assert_eq!(blk_response(&b), (3, -2));
    }
}
