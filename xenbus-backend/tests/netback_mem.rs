//! netback against the in-memory Xen: a test frontend plays `xen-netfront` inside a guest
//! (MemGuest: its pages, grants, event channel and xenstore connection as the guest); the
//! "tap" is one end of a datagram socket pair, the test holds the other.

#![allow(clippy::unwrap_used)]

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use hypervisor::mem::{DomainConfig, MemGuest, MemXen};
use hypervisor::{DomId, Errno, GrantRef, Hypervisor, Pfn, Port, Tx, XenStore, PAGE_SIZE};
use proptest::prelude::*;
use xenbus_backend::netif::*;
use xenbus_backend::state::{BackendState, XenbusState};
use xenbus_backend::tap::Tap;
use xenbus_backend::{TxSink, Vif, VifConfig, VifStatus};
use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, IntoBytes};

const TX_PFN: Pfn = 10;
const RX_PFN: Pfn = 11;
const DATA_PFN: Pfn = 32;
const RING: u32 = 256;

/// A minimal netfront: TX ring at TX_PFN, RX ring at RX_PFN, one event channel.
struct Front {
    g: MemGuest,
    xs: Box<dyn XenStore>,
    dir: String,
    back: String,
    port: Port,
    tx_prod: u32,
    tx_cons: u32,
    rx_prod: u32,
    rx_cons: u32,
}

impl Front {
    /// As netfront's talk_to_netback + xennet_connect: rings, event channel, settings, then
    /// Connected (netfront never publishes Initialised).
    fn connect(host: &MemXen, domid: DomId, devid: u32) -> Front {
        Front::connect_with(host, domid, devid, &[])
    }

    fn connect_with(host: &MemXen, domid: DomId, devid: u32, extra: &[(&str, &str)]) -> Front {
        let g = host.guest(domid);
        let xs: Box<dyn XenStore> = Box::new(g.xenstore().unwrap());
        let dir = format!("/local/domain/{domid}/device/vif/{devid}");
        let back =
            String::from_utf8(xs.read(Tx::NONE, &format!("{dir}/backend")).unwrap()).unwrap();
        assert_eq!(xs.read(Tx::NONE, &format!("{back}/state")).unwrap(), b"2");
        assert_eq!(
            xs.read(Tx::NONE, &format!("{back}/feature-rx-copy"))
                .unwrap(),
            b"1"
        );
        let mut refs = Vec::new();
        for pfn in [TX_PFN, RX_PFN] {
            g.fill_page(pfn, 0).unwrap();
            // SHARED_RING_INIT: req_event = rsp_event = 1
            g.write(pfn, 4, &1u32.to_le_bytes()).unwrap();
            g.write(pfn, 12, &1u32.to_le_bytes()).unwrap();
            refs.push(g.grant_access(0, pfn, false).unwrap());
        }
        let port = g.evtchn_alloc_unbound(0).unwrap();
        let w = |k: &str, v: &str| {
            xs.write(Tx::NONE, &format!("{dir}/{k}"), v.as_bytes())
                .unwrap()
        };
        w("tx-ring-ref", &refs[0].to_string());
        w("rx-ring-ref", &refs[1].to_string());
        w("event-channel", &port.to_string());
        w("request-rx-copy", "1");
        w("feature-rx-notify", "1");
        w("feature-sg", "1");
        w("feature-gso-tcpv4", "1");
        for (k, v) in extra {
            w(k, v);
        }
        w("state", "4");
        Front {
            g,
            xs,
            dir,
            back,
            port,
            tx_prod: 0,
            tx_cons: 0,
            rx_prod: 0,
            rx_cons: 0,
        }
    }

    /// A node's value, `None` if it cannot be read.
    fn node(&self, path: &str) -> Option<String> {
        let v = self.xs.read(Tx::NONE, path).ok()?;
        Some(String::from_utf8(v).unwrap())
    }

    fn back_node(&self, node: &str) -> String {
        self.node(&format!("{}/{node}", self.back))
            .unwrap_or_default()
    }

    fn front_node(&self, node: &str) -> String {
        self.node(&format!("{}/{node}", self.dir)).unwrap()
    }

    /// Writes a request into the next slot of the ring at `pfn` (TX or RX).
    fn push(&mut self, pfn: Pfn, req: &[u8]) {
        let (prod, size) = if pfn == TX_PFN {
            (&mut self.tx_prod, TX_ENTRY_SIZE)
        } else {
            (&mut self.rx_prod, RX_ENTRY_SIZE)
        };
        let slot = (*prod % RING) as usize;
        *prod = prod.wrapping_add(1);
        self.g.write(pfn, 64 + slot * size, req).unwrap();
    }

    /// Publishes `req_prod` of the ring at `pfn` and kicks the backend.
    fn publish(&mut self, pfn: Pfn, req_prod: u32) {
        self.g.write(pfn, 0, &req_prod.to_le_bytes()).unwrap();
        self.g.evtchn_notify(self.port).unwrap();
    }

    fn tx_push(&mut self, req: &[u8; TX_ENTRY_SIZE]) {
        self.push(TX_PFN, req);
    }

    fn kick_tx(&mut self) {
        self.set_tx_req_prod(self.tx_prod);
    }

    fn set_tx_req_prod(&mut self, v: u32) {
        self.publish(TX_PFN, v);
    }

    fn rx_post(&mut self, id: u16, gref: GrantRef) {
        let r = RxRequest {
            id: U16::new(id),
            pad: U16::new(0),
            gref: U32::new(gref),
        };
        self.push(RX_PFN, r.as_bytes());
    }

    fn kick_rx(&mut self) {
        self.publish(RX_PFN, self.rx_prod);
    }

    fn rsp_prod(&self, pfn: Pfn) -> u32 {
        let mut b = [0u8; 4];
        self.g.read(pfn, 8, &mut b).unwrap();
        u32::from_le_bytes(b)
    }

    /// Takes the responses published on the ring at `pfn` (the first `len` bytes of each
    /// slot) and asks for an event at the next one (`rsp_event`).
    fn take_responses(&mut self, pfn: Pfn, len: usize) -> Vec<Vec<u8>> {
        let prod = self.rsp_prod(pfn);
        let (cons, size) = if pfn == TX_PFN {
            (&mut self.tx_cons, TX_ENTRY_SIZE)
        } else {
            (&mut self.rx_cons, RX_ENTRY_SIZE)
        };
        let mut out = Vec::new();
        while *cons != prod {
            let slot = (*cons % RING) as usize;
            let mut e = vec![0u8; len];
            self.g.read(pfn, 64 + slot * size, &mut e).unwrap();
            out.push(e);
            *cons = cons.wrapping_add(1);
        }
        let next = cons.wrapping_add(1);
        self.g.write(pfn, 12, &next.to_le_bytes()).unwrap();
        out
    }

    fn tx_responses(&mut self) -> Vec<TxResponse> {
        self.take_responses(TX_PFN, 4)
            .iter()
            .map(|e| TxResponse::read_from_bytes(e).unwrap())
            .collect()
    }

    fn rx_responses(&mut self) -> Vec<RxResponse> {
        self.take_responses(RX_PFN, RX_ENTRY_SIZE)
            .iter()
            .map(|e| RxResponse::read_from_bytes(e).unwrap())
            .collect()
    }

    fn grant(&self, pfn: Pfn, readonly: bool) -> GrantRef {
        self.g.grant_access(0, pfn, readonly).unwrap()
    }
}

fn tx(gref: u32, offset: u16, flags: u16, id: u16, size: u16) -> [u8; TX_ENTRY_SIZE] {
    let r = TxRequest {
        gref: U32::new(gref),
        offset: U16::new(offset),
        flags: U16::new(flags),
        id: U16::new(id),
        size: U16::new(size),
    };
    let mut e = [0u8; TX_ENTRY_SIZE];
    e.copy_from_slice(r.as_bytes());
    e
}

struct Setup {
    host: MemXen,
    domid: DomId,
}

fn setup() -> Setup {
    let host = MemXen::new();
    let domid = host.create_domain(DomainConfig::pvh(1024)).unwrap();
    Setup { host, domid }
}

fn vif<'a>(s: &'a Setup, devid: u32) -> (Vif<'a>, UnixDatagram) {
    vif_of(s, s.domid, devid)
}

fn vif_of(s: &Setup, domid: DomId, devid: u32) -> (Vif<'_>, UnixDatagram) {
    vif_tap(s, domid, devid, false)
}

/// `vnet`: the "tap" carries virtio-net headers (as a real one from `Tap::create`).
fn vif_tap(s: &Setup, domid: DomId, devid: u32, vnet: bool) -> (Vif<'_>, UnixDatagram) {
    let (a, b) = UnixDatagram::pair().unwrap();
    b.set_nonblocking(true).unwrap();
    let tap = Tap::from_fd(OwnedFd::from(a), "test-tap", vnet).unwrap();
    let v = Vif::create(
        &s.host,
        s.host.open_xenstore().unwrap(),
        s.host.open_event_channels().unwrap(),
        &VifConfig::new(domid, devid),
        tap,
    )
    .unwrap();
    (v, b)
}

fn poll(v: &mut Vif<'_>) -> VifStatus {
    v.poll(Some(Duration::ZERO)).unwrap()
}

const CONNECTED: VifStatus = VifStatus::Active(BackendState::Xenbus(XenbusState::Connected));

fn connected(s: &Setup) -> (Vif<'_>, UnixDatagram, Front) {
    let (mut v, peer) = vif(s, 0);
    let f = Front::connect(&s.host, s.domid, 0);
    assert_eq!(poll(&mut v), CONNECTED);
    (v, peer, f)
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

fn recv_all(peer: &UnixDatagram) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = [0u8; 70000];
    while let Ok(n) = peer.recv(&mut buf) {
        out.push(buf[..n].to_vec());
    }
    out
}

#[test]
fn nodes_follow_the_xl_layout_and_the_handshake_connects() {
    let s = setup();
    let (mut v, _peer) = vif(&s, 0);
    let p = v.paths().clone();
    assert_eq!(
        p.frontend,
        format!("/local/domain/{}/device/vif/0", s.domid)
    );
    assert_eq!(
        p.backend,
        format!("/local/domain/0/backend/kemari-vif/{}/0", s.domid)
    );
    let gxs = s.host.guest(s.domid).xenstore().unwrap();
    let r = |path: &str| String::from_utf8(gxs.read(Tx::NONE, path).unwrap()).unwrap();
    let mac = VifConfig::new(s.domid, 0).mac_string();
    assert_eq!(r(&format!("{}/mac", p.frontend)), mac);
    assert_eq!(r(&format!("{}/handle", p.frontend)), "0");
    assert_eq!(r(&format!("{}/backend-id", p.frontend)), "0");
    assert_eq!(r(&format!("{}/mac", p.backend)), mac);
    assert_eq!(r(&format!("{}/feature-rx-copy", p.backend)), "1");
    assert_eq!(r(&format!("{}/state", p.backend)), "2");
    // nothing netfront would use beyond the plain path is offered
    for absent in [
        "feature-sg",
        "feature-gso-tcpv4",
        "multi-queue-max-queues",
        "feature-split-event-channels",
    ] {
        assert!(gxs
            .read(Tx::NONE, &format!("{}/{absent}", p.backend))
            .is_err());
    }
    let e = gxs
        .write(Tx::NONE, &format!("{}/state", p.backend), b"4")
        .unwrap_err();
    assert_eq!(e.errno(), Some(Errno::EACCES));
    let f = Front::connect(&s.host, s.domid, 0);
    assert_eq!(poll(&mut v), CONNECTED);
    assert_eq!(f.back_node("state"), "4");
    assert_eq!(f.front_node("state"), "4");
    assert_eq!(v.stats().connects, 1);
    // a second vif with the same handle is refused
    let (a, _b) = UnixDatagram::pair().unwrap();
    let e = Vif::create(
        &s.host,
        s.host.open_xenstore().unwrap(),
        s.host.open_event_channels().unwrap(),
        &VifConfig::new(s.domid, 0),
        Tap::from_fd(OwnedFd::from(a), "t", false).unwrap(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("already has device"), "{e}");
}

#[test]
fn tx_single_and_multi_slot_packets_reach_the_tap() {
    let s = setup();
    let (mut v, peer, mut f) = connected(&s);
    let a = frame(60, 1);
    f.g.write(DATA_PFN, 100, &a).unwrap();
    let g0 = f.grant(DATA_PFN, true);
    f.tx_push(&tx(g0, 100, 0, 7, 60));
    // 1514 bytes: 1000 at the end of one page, 514 at the start of the next
    let b = frame(1514, 2);
    f.g.write(DATA_PFN + 1, PAGE_SIZE - 1000, &b[..1000])
        .unwrap();
    f.g.write(DATA_PFN + 2, 0, &b[1000..]).unwrap();
    let g1 = f.grant(DATA_PFN + 1, true);
    let g2 = f.grant(DATA_PFN + 2, true);
    f.tx_push(&tx(
        g1,
        (PAGE_SIZE - 1000) as u16,
        NETTXF_MORE_DATA,
        8,
        1514,
    ));
    f.tx_push(&tx(g2, 0, 0, 9, 514));
    f.kick_tx();
    poll(&mut v);
    assert!(f.g.take_events().contains(&f.port), "frontend notified");
    let rsp = f.tx_responses();
    let got: Vec<_> = rsp.iter().map(|r| (r.id.get(), r.status.get())).collect();
    assert_eq!(got, vec![(7, 0), (8, 0), (9, 0)]);
    assert_eq!(recv_all(&peer), vec![a, b]);
    // the grants are no longer mapped: netfront can revoke them
    for g in [g0, g1, g2] {
        f.g.end_access(g).unwrap();
    }
    assert_eq!(v.stats().tx_packets, 2);
    assert_eq!(v.stats().tx_bytes, 1574);
}

/// An IPv4 TCP segment as netfront sends it with NETTXF_csum_blank: the pseudo-header sum in
/// the checksum field.
fn tcp_partial(payload: &[u8]) -> (Vec<u8>, usize) {
    let mut f = vec![0u8; 14 + 20 + 20];
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = 14;
    f[ip] = 0x45;
    let tot = (20 + 20 + payload.len()) as u16;
    f[ip + 2..ip + 4].copy_from_slice(&tot.to_be_bytes());
    f[ip + 8] = 64;
    f[ip + 9] = 6;
    f[ip + 12..ip + 16].copy_from_slice(&[10, 77, 0, 1]);
    f[ip + 16..ip + 20].copy_from_slice(&[10, 77, 0, 105]);
    let tcp = ip + 20;
    f[tcp..tcp + 2].copy_from_slice(&7000u16.to_be_bytes());
    f[tcp + 2..tcp + 4].copy_from_slice(&40000u16.to_be_bytes());
    f[tcp + 12] = 5 << 4;
    f.extend_from_slice(payload);
    // pseudo header: src, dst, proto, tcp length
    let mut sum: u32 = 0;
    for w in f[ip + 12..ip + 20].chunks(2) {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    sum += 6 + u32::from(tot - 20);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    f[tcp + 16..tcp + 18].copy_from_slice(&(sum as u16).to_be_bytes());
    (f, tcp)
}

/// Verifies a full TCP checksum independently: the sum over pseudo header and segment is
/// 0xffff.
fn tcp_checksum_ok(f: &[u8], tcp: usize) -> bool {
    let ip = 14;
    let mut sum: u64 = 0;
    for w in f[ip + 12..ip + 20].chunks(2) {
        sum += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    sum += 6 + (f.len() - tcp) as u64;
    let seg = &f[tcp..];
    for (i, b) in seg.iter().enumerate() {
        sum += if i % 2 == 0 {
            u64::from(*b) << 8
        } else {
            u64::from(*b)
        };
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum == 0xffff
}

#[test]
fn tx_blank_checksums_are_completed() {
    let s = setup();
    let (mut v, peer, mut f) = connected(&s);
    let (pkt, tcp) = tcp_partial(b"kemari-count 1\nhello\n");
    assert!(!tcp_checksum_ok(&pkt, tcp));
    f.g.write(DATA_PFN, 0, &pkt).unwrap();
    let g = f.grant(DATA_PFN, true);
    f.tx_push(&tx(g, 0, NETTXF_CSUM_BLANK, 1, pkt.len() as u16));
    // a blank checksum on something that is not TCP/UDP: dropped, answered OKAY (as Linux)
    let arp = frame(60, 3);
    f.g.write(DATA_PFN + 1, 0, &arp).unwrap();
    let g2 = f.grant(DATA_PFN + 1, true);
    f.tx_push(&tx(g2, 0, NETTXF_CSUM_BLANK, 2, 60));
    f.kick_tx();
    poll(&mut v);
    let got = recv_all(&peer);
    assert_eq!(got.len(), 1);
    assert!(tcp_checksum_ok(&got[0], tcp), "checksum completed");
    assert_eq!(&got[0][..tcp + 16], &pkt[..tcp + 16]);
    assert_eq!(&got[0][tcp + 18..], &pkt[tcp + 18..]);
    let st: Vec<_> = f.tx_responses().iter().map(|r| r.status.get()).collect();
    assert_eq!(st, vec![NETIF_RSP_OKAY, NETIF_RSP_OKAY]);
    assert_eq!(v.stats().tx_dropped, 1);
}

#[test]
fn rx_frames_fill_posted_buffers_in_order_and_wait_for_more() {
    let s = setup();
    let (mut v, peer, mut f) = connected(&s);
    // frames before any buffer: they stay in the tap
    let frames: Vec<_> = (0..3).map(|i| frame(60 + 500 * i, i as u8)).collect();
    for fr in &frames {
        peer.send(fr).unwrap();
    }
    poll(&mut v);
    assert!(f.rx_responses().is_empty());
    // two buffers: two frames delivered; the third waits for the next buffer
    let g: Vec<_> = (0..3).map(|i| f.grant(DATA_PFN + i, false)).collect();
    f.rx_post(40, g[0]);
    f.rx_post(41, g[1]);
    f.kick_rx();
    poll(&mut v);
    assert!(f.g.take_events().contains(&f.port));
    let rsp = f.rx_responses();
    let got: Vec<_> = rsp
        .iter()
        .map(|r| (r.id.get(), r.offset.get(), r.status.get()))
        .collect();
    assert_eq!(got, vec![(40, 0, 60), (41, 0, 560)]);
    for (i, fr) in frames[..2].iter().enumerate() {
        let mut b = vec![0u8; fr.len()];
        f.g.read(DATA_PFN + i as u64, 0, &mut b).unwrap();
        assert_eq!(&b, fr);
        f.g.end_access(g[i]).unwrap();
    }
    // the backend asked for a kick at the next buffer
    let mut ev = [0u8; 4];
    f.g.read(RX_PFN, 4, &mut ev).unwrap();
    assert_eq!(u32::from_le_bytes(ev), 3);
    f.rx_post(42, g[2]);
    f.kick_rx();
    poll(&mut v);
    let rsp = f.rx_responses();
    assert_eq!((rsp[0].id.get(), rsp[0].status.get()), (42, 1060));
    // a buffer posted with nothing to receive: the tap wakes the backend
    let g3 = f.grant(DATA_PFN + 3, false);
    f.rx_post(43, g3);
    f.kick_rx();
    poll(&mut v);
    assert!(f.rx_responses().is_empty());
    peer.send(&frames[0]).unwrap();
    v.poll(Some(Duration::from_millis(500))).unwrap();
    assert_eq!(f.rx_responses()[0].status.get(), 60);
    assert_eq!(v.stats().rx_packets, 4);
}

#[test]
fn hostile_tx_requests_are_answered_with_errors_and_the_vif_goes_on() {
    let s = setup();
    let (mut v, peer, mut f) = connected(&s);
    let page = f.grant(DATA_PFN, true);
    let cases = [
        tx(page, 4000, 0, 1, 200),    // leaves the page
        tx(page, 0, 0, 2, 10),        // shorter than an Ethernet header
        tx(9999, 0, 0, 3, 60),        // grant that does not exist
        tx(page + 1000, 0, 0, 4, 60), // grant number the guest never issued
        tx(page, 0, NETTXF_MORE_DATA, 5, 100),
        tx(page, 0, 0, 6, 200), // later slots larger than the packet
    ];
    for c in &cases {
        f.tx_push(c);
    }
    f.tx_push(&tx(page, 0, 0, 7, 60));
    f.kick_tx();
    assert_eq!(poll(&mut v), CONNECTED);
    let got: Vec<_> = f
        .tx_responses()
        .iter()
        .map(|r| (r.id.get(), r.status.get()))
        .collect();
    let e = NETIF_RSP_ERROR;
    assert_eq!(
        got,
        vec![(1, e), (2, e), (3, e), (4, e), (5, e), (6, e), (7, 0)]
    );
    assert_eq!(recv_all(&peer).len(), 1);
    assert_eq!(v.stats().tx_errors, 5, "ids 5 and 6 are one packet");
    // extra info (GSO) was not offered: the chain is consumed and dropped
    f.tx_push(&tx(page, 0, NETTXF_EXTRA_INFO, 8, 60));
    let mut gso = [0u8; TX_ENTRY_SIZE];
    gso[0] = NETIF_EXTRA_TYPE_GSO;
    f.tx_push(&gso);
    f.kick_tx();
    poll(&mut v);
    let got: Vec<_> = f
        .tx_responses()
        .iter()
        .map(|r| (r.id.get(), r.status.get()))
        .collect();
    assert_eq!(got, vec![(8, e), (8, NETIF_RSP_NULL)]);
    assert_eq!(poll(&mut v), CONNECTED);
}

#[test]
fn hostile_rx_buffers_lose_their_frame_only() {
    let s = setup();
    let (mut v, peer, mut f) = connected(&s);
    let ro = f.grant(DATA_PFN, true); // read-only: cannot receive into it
    let ok = f.grant(DATA_PFN + 1, false);
    f.rx_post(1, ro);
    f.rx_post(2, 7777);
    f.rx_post(3, ok);
    f.kick_rx();
    for i in 0..3 {
        peer.send(&frame(100, i)).unwrap();
    }
    peer.send(&vec![0u8; PAGE_SIZE + 1]).unwrap(); // larger than a page: dropped
    v.poll(Some(Duration::from_millis(200))).unwrap();
    let got: Vec<_> = f
        .rx_responses()
        .iter()
        .map(|r| (r.id.get(), r.status.get()))
        .collect();
    assert_eq!(
        got,
        vec![(1, NETIF_RSP_ERROR), (2, NETIF_RSP_ERROR), (3, 100)]
    );
    assert_eq!(v.stats().rx_errors, 2);
    assert_eq!(poll(&mut v), CONNECTED);
    f.rx_post(4, ok);
    f.kick_rx();
    poll(&mut v);
    assert_eq!(v.stats().rx_dropped, 1);
}

#[test]
fn ring_overflow_or_undelimited_chain_ends_only_that_vif() {
    let s = setup();
    let guest2 = s.host.create_domain(DomainConfig::pvh(1024)).unwrap();
    let (mut v, _peer, mut f) = connected(&s);
    let (mut v2, peer2) = vif_of(&s, guest2, 0);
    let mut f2 = Front::connect(&s.host, guest2, 0);
    assert_eq!(poll(&mut v2), CONNECTED);
    // req_prod claims more requests than the ring holds
    f.set_tx_req_prod(RING + 5);
    let st = poll(&mut v);
    let VifStatus::Failed(why) = st else {
        panic!("{st:?}")
    };
    assert!(why.contains("req_prod"), "{why}");
    assert_eq!(f.back_node("state"), "6");
    assert!(f.back_node("kemari-error").contains("ring"));
    // the ring pages are unmapped: the guest can take them back
    s.host.guest(s.domid).end_access(1).ok();
    // the other guest's vif still works
    let g = f2.grant(DATA_PFN, true);
    f2.g.write(DATA_PFN, 0, &frame(60, 9)).unwrap();
    f2.tx_push(&tx(g, 0, 0, 1, 60));
    f2.kick_tx();
    assert_eq!(poll(&mut v2), CONNECTED);
    assert_eq!(f2.tx_responses()[0].status.get(), 0);
    assert_eq!(recv_all(&peer2).len(), 1);
    // a chain that runs past req_prod (netfront pushes whole packets) ends that vif too
    f2.tx_push(&tx(g, 0, NETTXF_MORE_DATA, 2, 100));
    f2.kick_tx();
    assert!(matches!(poll(&mut v2), VifStatus::Failed(_)));
    let _ = f.tx_responses();
}

#[test]
fn unsupported_frontend_settings_fail_the_connect() {
    let s = setup();
    let (mut v, _peer) = vif(&s, 0);
    let f = Front::connect_with(&s.host, s.domid, 0, &[("request-rx-copy", "0")]);
    assert!(matches!(poll(&mut v), VifStatus::Failed(w) if w.contains("request-rx-copy")));
    assert_eq!(f.back_node("state"), "6");
}

#[test]
fn frontend_close_and_guest_destruction() {
    let s = setup();
    let (mut v, _peer, f) = connected(&s);
    let port = v.local_port().unwrap();
    f.xs.write(Tx::NONE, &format!("{}/state", f.dir), b"5")
        .unwrap();
    poll(&mut v);
    assert_eq!(f.back_node("state"), "5");
    assert_eq!(v.local_port(), None);
    f.xs.write(Tx::NONE, &format!("{}/state", f.dir), b"6")
        .unwrap();
    poll(&mut v);
    assert_eq!(f.back_node("state"), "6");
    let _ = port;
    drop(f);
    s.host.destroy_domain(s.domid).unwrap();
    assert_eq!(poll(&mut v), VifStatus::Gone);
    let paths = v.paths().clone();
    v.shutdown().unwrap();
    let xs = s.host.open_xenstore().unwrap();
    assert!(xs.read(Tx::NONE, &paths.backend).is_err());
}

#[test]
fn with_vnet_headers_gso_packets_go_to_the_tap_whole_for_the_kernel_to_segment() {
    use xenbus_backend::tap::{VnetHdr, VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4, VNET_HDR_LEN};
    let s = setup();
    let (mut v, peer) = vif_tap(&s, s.domid, 0, true);
    let mut f = Front::connect(&s.host, s.domid, 0);
    assert_eq!(poll(&mut v), CONNECTED);
    assert_eq!(f.back_node("feature-sg"), "1");
    assert_eq!(f.back_node("feature-gso-tcpv4"), "1");
    // a 6,000-byte TCP segment over two pages and a bit, GSO extra (size 1448, TCPv4)
    let (pkt, tcp) = tcp_partial(&frame(6000 - 54, 5));
    assert_eq!(pkt.len(), 6000);
    f.g.write(DATA_PFN, 0, &pkt[..4096]).unwrap();
    f.g.write(DATA_PFN + 1, 0, &pkt[4096..]).unwrap();
    let g0 = f.grant(DATA_PFN, true);
    let g1 = f.grant(DATA_PFN + 1, true);
    f.tx_push(&tx(
        g0,
        0,
        NETTXF_CSUM_BLANK | NETTXF_EXTRA_INFO | NETTXF_MORE_DATA,
        1,
        6000,
    ));
    let mut gso = [0u8; TX_ENTRY_SIZE];
    gso[0] = NETIF_EXTRA_TYPE_GSO;
    gso[2..4].copy_from_slice(&1448u16.to_le_bytes());
    gso[4] = NETIF_GSO_TYPE_TCPV4;
    f.tx_push(&gso);
    f.tx_push(&tx(g1, 0, 0, 2, 6000 - 4096));
    // a plain packet with a blank checksum: completed here, empty header
    let (small, stcp) = tcp_partial(b"hi");
    f.g.write(DATA_PFN + 2, 0, &small).unwrap();
    let g2 = f.grant(DATA_PFN + 2, true);
    f.tx_push(&tx(g2, 0, NETTXF_CSUM_BLANK, 3, small.len() as u16));
    // GSO of a type that is not TCPv4: dropped (answered OKAY, as the chain was well formed)
    f.tx_push(&tx(
        g2,
        0,
        NETTXF_CSUM_BLANK | NETTXF_EXTRA_INFO,
        4,
        small.len() as u16,
    ));
    let mut bad = gso;
    bad[4] = 9;
    f.tx_push(&bad);
    f.kick_tx();
    assert_eq!(poll(&mut v), CONNECTED);
    let got: Vec<_> = f
        .tx_responses()
        .iter()
        .map(|r| (r.id.get(), r.status.get()))
        .collect();
    assert_eq!(
        got,
        vec![
            (1, 0),
            (1, NETIF_RSP_NULL),
            (2, 0),
            (3, 0),
            (4, 0),
            (4, NETIF_RSP_NULL)
        ]
    );
    let out = recv_all(&peer);
    assert_eq!(out.len(), 2);
    let hdr = VnetHdr::from_bytes(out[0][..VNET_HDR_LEN].try_into().unwrap());
    assert_eq!(
        hdr,
        VnetHdr {
            flags: VNET_F_NEEDS_CSUM,
            gso_type: VNET_GSO_TCPV4,
            hdr_len: (tcp + 20) as u16,
            gso_size: 1448,
            csum_start: tcp as u16,
            csum_offset: 16,
        }
    );
    assert_eq!(
        &out[0][VNET_HDR_LEN..],
        &pkt[..],
        "left for the kernel as it came"
    );
    assert_eq!(out[1][..VNET_HDR_LEN], [0u8; VNET_HDR_LEN]);
    assert!(tcp_checksum_ok(&out[1][VNET_HDR_LEN..], stcp));
    assert_eq!(v.stats().tx_dropped, 1);
    // frames from the tap lose their header on the way to the guest
    let g3 = f.grant(DATA_PFN + 3, false);
    f.rx_post(7, g3);
    f.kick_rx();
    let mut msg = VnetHdr::default().to_bytes().to_vec();
    msg.extend_from_slice(&frame(90, 6));
    peer.send(&msg).unwrap();
    v.poll(Some(Duration::from_millis(500))).unwrap();
    let rsp = f.rx_responses();
    assert_eq!((rsp[0].id.get(), rsp[0].status.get()), (7, 90));
    let mut b = vec![0u8; 90];
    f.g.read(DATA_PFN + 3, 0, &mut b).unwrap();
    assert_eq!(b, frame(90, 6));
}

/// A sink that keeps frames (as output commit will, until a checkpoint is acknowledged).
struct Held(std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

impl TxSink for Held {
    fn deliver(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.0.lock().unwrap().push(frame.to_vec());
        Ok(())
    }
}

#[test]
fn a_replaced_sink_receives_the_guests_frames() {
    let s = setup();
    let (mut v, peer, mut f) = connected(&s);
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    v.set_tx_sink(Box::new(Held(held.clone())));
    let g = f.grant(DATA_PFN, true);
    f.g.write(DATA_PFN, 0, &frame(80, 4)).unwrap();
    f.tx_push(&tx(g, 0, 0, 1, 80));
    f.kick_tx();
    poll(&mut v);
    assert_eq!(f.tx_responses()[0].status.get(), 0);
    assert!(recv_all(&peer).is_empty());
    assert_eq!(held.lock().unwrap().as_slice(), &[frame(80, 4)]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Any TX and RX ring contents and producer indexes: the backend never panics, and either
    /// answers every request it consumed or ends the device.
    #[test]
    fn any_ring_contents_are_handled(
        tx_entries in proptest::collection::vec(proptest::array::uniform12(any::<u8>()), 1..40),
        rx_entries in proptest::collection::vec(any::<u64>(), 0..20),
        tx_prod in prop_oneof![Just(None), any::<u32>().prop_map(Some)],
    ) {
        let s = setup();
        let (mut v, peer, mut f) = connected(&s);
        for i in 0..4 {
            f.grant(DATA_PFN + i, i % 2 == 0);
        }
        for e in &tx_entries {
            f.tx_push(e);
        }
        for e in &rx_entries {
            let b = e.to_le_bytes();
            f.rx_post(u16::from_le_bytes([b[0], b[1]]), u32::from(b[2] & 7));
        }
        peer.send(&frame(64, 1)).unwrap();
        match tx_prod {
            Some(p) => f.set_tx_req_prod(p),
            None => f.kick_tx(),
        }
        f.kick_rx();
        let st = v.poll(Some(Duration::from_millis(50))).unwrap();
        match st {
            VifStatus::Failed(_) => {}
            VifStatus::Active(_) => {
                let n = f.tx_responses().len();
                prop_assert_eq!(n, tx_entries.len());
                prop_assert!(f.rx_responses().len() <= rx_entries.len().min(1));
            }
            VifStatus::Gone => prop_assert!(false, "gone"),
        }
    }
}

struct CountKicks(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl xenbus_backend::commit::Tap for CountKicks {
    fn kick(&self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Output commit: a protected vif answers the guest's TX requests at once but hands each
/// frame to the tap only after the checkpoint of the epoch it was sent in is ACKed; each held
/// frame kicks the tap (a checkpoint trigger); after protection ends frames pass through.
#[test]
fn protected_vif_holds_guest_frames_until_their_checkpoint_is_acked() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use xenbus_backend::commit::OutputGate;
    let s = setup();
    let (mut v, peer, mut f) = connected(&s);
    let kicks = std::sync::Arc::new(AtomicU64::new(0));
    let gate = OutputGate::new(1, Box::new(CountKicks(kicks.clone())));
    v.protect(gate.clone()).unwrap();
    let send = |f: &mut Front, v: &mut Vif<'_>, id: u16, seed: u8| {
        let pfn = DATA_PFN + u64::from(id);
        f.g.write(pfn, 0, &frame(80, seed)).unwrap();
        let g = f.grant(pfn, true);
        f.tx_push(&tx(g, 0, 0, id, 80));
        f.kick_tx();
        poll(v);
        let rsp = f.tx_responses();
        assert_eq!(rsp.len(), 1);
        assert_eq!(
            (rsp[0].id.get(), rsp[0].status.get()),
            (id, 0),
            "answered at once"
        );
    };
    // epoch 1
    send(&mut f, &mut v, 1, 1);
    assert!(
        recv_all(&peer).is_empty(),
        "held until checkpoint 1 is ACKed"
    );
    assert_eq!(kicks.load(Ordering::SeqCst), 1);
    assert_eq!(v.held_frames(), 1);
    // checkpoint 1 is taken (guest paused): what follows is epoch 2
    gate.take_log(1);
    send(&mut f, &mut v, 2, 2);
    poll(&mut v);
    assert!(recv_all(&peer).is_empty());
    gate.acked(1);
    poll(&mut v);
    assert_eq!(recv_all(&peer), vec![frame(80, 1)], "only epoch 1's frame");
    assert_eq!(v.held_frames(), 1);
    gate.take_log(2);
    gate.acked(2);
    poll(&mut v);
    assert_eq!(recv_all(&peer), vec![frame(80, 2)]);
    assert_eq!(v.stats().tx_held, 2);
    assert_eq!(v.stats().tx_packets, 2);
    // held again, then protection ends: released without an ACK, later frames pass through
    send(&mut f, &mut v, 3, 3);
    assert!(recv_all(&peer).is_empty());
    gate.end();
    poll(&mut v);
    assert_eq!(recv_all(&peer), vec![frame(80, 3)]);
    send(&mut f, &mut v, 4, 4);
    assert_eq!(recv_all(&peer), vec![frame(80, 4)]);
    assert_eq!(
        kicks.load(Ordering::SeqCst),
        3,
        "no kick once protection ended"
    );
    assert_eq!(v.held_frames(), 0);
}

/// Frames of a checkpoint that was never ACKed are not sent when the vif shuts down.
#[test]
fn unacked_frames_are_dropped_at_shutdown() {
    use std::sync::atomic::AtomicU64;
    use xenbus_backend::commit::OutputGate;
    let s = setup();
    let (mut v, peer, mut f) = connected(&s);
    let gate = OutputGate::new(
        1,
        Box::new(CountKicks(std::sync::Arc::new(AtomicU64::new(0)))),
    );
    v.protect(gate.clone()).unwrap();
    f.g.write(DATA_PFN, 0, &frame(70, 9)).unwrap();
    let g = f.grant(DATA_PFN, true);
    f.tx_push(&tx(g, 0, 0, 1, 70));
    f.kick_tx();
    poll(&mut v);
    assert_eq!(v.held_frames(), 1);
    v.shutdown().unwrap();
    assert!(recv_all(&peer).is_empty());
}
