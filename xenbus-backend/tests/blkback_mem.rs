//! blkback against the in-memory Xen: a test frontend plays `xen-blkfront` inside a guest
//! (MemGuest: its pages, grants, event channel and xenstore connection as the guest).

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::Duration;

use hypervisor::mem::{DomainConfig, FaultPlan, MemXen};
use hypervisor::{DomId, Errno, Hypervisor, Method, Tx, XenStore};
use xenbus_backend::blkif::*;
use xenbus_backend::state::{BackendState, XenbusState};
use xenbus_backend::{Vbd, VbdConfig, VbdStatus};
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromZeros, IntoBytes};

mod common;
use common::*;

struct Setup {
    host: MemXen,
    domid: DomId,
    img: PathBuf,
}

fn setup(name: &str) -> Setup {
    let host = MemXen::new();
    let domid = host.create_domain(DomainConfig::pvh(1024)).unwrap();
    Setup {
        host,
        domid,
        img: image(name),
    }
}

fn vbd<'a>(s: &'a Setup, img: &std::path::Path) -> Vbd<'a> {
    Vbd::create(
        &s.host,
        s.host.open_xenstore().unwrap(),
        s.host.open_event_channels().unwrap(),
        &VbdConfig::xvda(s.domid, img.to_owned()),
    )
    .unwrap()
}

fn poll(v: &mut Vbd<'_>) -> VbdStatus {
    v.poll(Some(Duration::ZERO)).unwrap()
}

const CONNECTED: VbdStatus = VbdStatus::Active(BackendState::Xenbus(XenbusState::Connected));

#[test]
fn nodes_and_permissions_follow_the_xl_layout() {
    let s = setup("layout.img");
    let v = vbd(&s, &s.img);
    let p = v.paths().clone();
    assert_eq!(
        p.frontend,
        format!("/local/domain/{}/device/vbd/51712", s.domid)
    );
    assert_eq!(
        p.backend,
        format!("/local/domain/0/backend/kemari-vbd/{}/51712", s.domid)
    );
    let gxs = s.host.guest(s.domid).xenstore().unwrap();
    let r = |path: &str| String::from_utf8(gxs.read(Tx::NONE, path).unwrap()).unwrap();
    // what blkfront reads
    assert_eq!(r(&format!("{}/backend", p.frontend)), p.backend);
    assert_eq!(r(&format!("{}/backend-id", p.frontend)), "0");
    assert_eq!(r(&format!("{}/virtual-device", p.frontend)), "51712");
    assert_eq!(r(&format!("{}/device-type", p.frontend)), "disk");
    assert_eq!(r(&format!("{}/state", p.backend)), "2");
    assert_eq!(
        r(&format!("{}/sectors", p.backend)),
        (DISK_BYTES / 512).to_string()
    );
    assert_eq!(r(&format!("{}/sector-size", p.backend)), "512");
    assert_eq!(r(&format!("{}/info", p.backend)), "0");
    assert_eq!(r(&format!("{}/feature-flush-cache", p.backend)), "1");
    assert_eq!(r(&format!("{}/max-ring-page-order", p.backend)), "2");
    assert_eq!(r(&format!("{}/kemari-state", p.backend)), "initwait");
    // the guest writes its own nodes, never the backend's
    gxs.write(Tx::NONE, &format!("{}/ring-ref", p.frontend), b"8")
        .unwrap();
    let e = gxs
        .write(Tx::NONE, &format!("{}/state", p.backend), b"4")
        .unwrap_err();
    assert_eq!(e.errno(), Some(Errno::EACCES));
    // another guest sees neither directory
    let other = s.host.create_domain(DomainConfig::pvh(16)).unwrap();
    let oxs = s.host.guest(other).xenstore().unwrap();
    assert!(oxs.read(Tx::NONE, &format!("{}/state", p.backend)).is_err());
    // a second device with the same id is refused, nothing changed
    let e = Vbd::create(
        &s.host,
        s.host.open_xenstore().unwrap(),
        s.host.open_event_channels().unwrap(),
        &VbdConfig::xvda(s.domid, s.img.clone()),
    )
    .unwrap_err();
    assert!(e.to_string().contains("already has device"), "{e}");
    assert_eq!(r(&format!("{}/state", p.backend)), "2");
}

#[test]
fn frontend_connects_writes_reads_back_and_flushes() {
    let s = setup("rw.img");
    let mut v = vbd(&s, &s.img);
    let mut f = Front::connect(&s.host, s.domid, 51712, None);
    assert_eq!(poll(&mut v), CONNECTED);
    assert_eq!(f.back_node("state"), "4");
    f.set_state(4);
    poll(&mut v);

    // write 3 pages (the middle one partially: sectors 2..=5) at sector 8
    for i in 0..3 {
        f.g.write_page(DATA_PFN + i, &pattern(i as u8)).unwrap();
    }
    let g: Vec<_> = (0..3).map(|i| f.grant(DATA_PFN + i, true)).collect();
    f.push(&rw(
        BLKIF_OP_WRITE,
        0x11,
        8,
        &[(g[0], 0, 7), (g[1], 2, 5), (g[2], 0, 7)],
    ));
    f.push(&rw(BLKIF_OP_FLUSH_DISKCACHE, 0x12, 0, &[]));
    f.kick();
    poll(&mut v);
    assert!(f.g.take_events().contains(&f.port), "frontend was notified");
    let rsp = f.responses();
    assert_eq!(rsp.len(), 2);
    assert_eq!(
        (rsp[0].id.get(), rsp[0].operation, rsp[0].status.get()),
        (0x11, BLKIF_OP_WRITE, 0)
    );
    assert_eq!(
        (rsp[1].id.get(), rsp[1].operation, rsp[1].status.get()),
        (0x12, 3, 0)
    );

    // the image holds exactly the segments' data, in order
    let disk = std::fs::read(&s.img).unwrap();
    let at = 8 * 512;
    assert_eq!(&disk[at..at + 4096], &pattern(0)[..]);
    assert_eq!(&disk[at + 4096..at + 4096 + 2048], &pattern(1)[1024..3072]);
    assert_eq!(&disk[at + 6144..at + 6144 + 4096], &pattern(2)[..]);
    assert!(disk[..at].iter().all(|b| *b == 0));

    // read it back into fresh pages, in one request with a FUA-style flush write after it
    let r: Vec<_> = (0..3).map(|i| f.grant(DATA_PFN + 10 + i, false)).collect();
    f.push(&rw(
        BLKIF_OP_READ,
        0x13,
        8,
        &[(r[0], 0, 7), (r[1], 0, 3), (r[2], 4, 7)],
    ));
    let w = f.grant(DATA_PFN, true);
    f.push(&rw(BLKIF_OP_FLUSH_DISKCACHE, 0x14, 100, &[(w, 0, 0)]));
    f.kick();
    poll(&mut v);
    let rsp = f.responses();
    assert_eq!(
        rsp.iter().map(|r| r.status.get()).collect::<Vec<_>>(),
        [0, 0]
    );
    assert_eq!(&f.g.read_page(DATA_PFN + 10).unwrap()[..], &pattern(0)[..]);
    let p11 = f.g.read_page(DATA_PFN + 11).unwrap();
    assert_eq!(&p11[..2048], &pattern(1)[1024..3072]);
    let p12 = f.g.read_page(DATA_PFN + 12).unwrap();
    assert_eq!(&p12[2048..], &pattern(2)[..2048]);
    assert_eq!(
        &std::fs::read(&s.img).unwrap()[100 * 512..101 * 512],
        &pattern(0)[..512]
    );

    let st = v.stats().clone();
    assert_eq!((st.requests, st.errors, st.flushes), (4, 0, 2));
    assert_eq!(st.write_bytes, 4096 + 2048 + 4096 + 512);
    assert_eq!(st.read_bytes, 4096 + 2048 + 2048);
    assert_eq!(
        s.host.grant_map_count(s.domid),
        1,
        "only the ring stays mapped"
    );

    // orderly close: Closing, then Closed, ring unmapped
    f.set_state(5);
    poll(&mut v);
    assert_eq!(f.back_node("state"), "5");
    f.set_state(6);
    poll(&mut v);
    assert_eq!(f.back_node("state"), "6");
    assert_eq!(f.back_node("kemari-state"), "closed");
    assert_eq!(s.host.grant_map_count(s.domid), 0);
    // a reloaded frontend starts again
    f.set_state(1);
    poll(&mut v);
    assert_eq!(f.back_node("state"), "2");
}

#[test]
fn multi_page_ring_and_indirect_descriptors() {
    let s = setup("indirect.img");
    let mut v = vbd(&s, &s.img);
    let mut f = Front::connect(&s.host, s.domid, 51712, Some(2));
    assert_eq!(poll(&mut v), CONNECTED);
    assert_eq!(f.size, 128);
    // more requests than a one-page ring holds, wrapping the slot index
    for i in 0..40u64 {
        let pfn = DATA_PFN + i;
        f.g.write_page(pfn, &pattern(i as u8)).unwrap();
        let g = f.grant(pfn, true);
        f.push(&rw(BLKIF_OP_WRITE, i, i * 8, &[(g, 0, 7)]));
    }
    f.kick();
    poll(&mut v);
    let rsp = f.responses();
    assert_eq!(rsp.len(), 40);
    assert!(rsp.iter().all(|r| r.status.get() == 0));

    // one indirect read of 20 pages (sectors 0..160) through one descriptor page
    let desc_pfn = DATA_PFN + 100;
    let mut desc = Vec::new();
    for i in 0..20u64 {
        let g = f.grant(DATA_PFN + 200 + i, false);
        desc.extend_from_slice(
            RawSegment {
                gref: U32::new(g),
                first_sect: 0,
                last_sect: 7,
                pad: [0; 2],
            }
            .as_bytes(),
        );
    }
    f.g.write(desc_pfn, 0, &desc).unwrap();
    let dg = f.grant(desc_pfn, true);
    let mut ind = RawIndirect::new_zeroed();
    ind.operation = BLKIF_OP_INDIRECT;
    ind.indirect_op = BLKIF_OP_READ;
    ind.nr_segments = U16::new(20);
    ind.id = U64::new(0x99);
    ind.indirect_grefs[0] = U32::new(dg);
    f.push(ind.as_bytes());
    f.kick();
    poll(&mut v);
    let rsp = f.responses();
    assert_eq!(
        (rsp[0].id.get(), rsp[0].operation, rsp[0].status.get()),
        (0x99, BLKIF_OP_READ, 0)
    );
    for i in 0..20u64 {
        assert!(
            f.g.read_page(DATA_PFN + 200 + i).unwrap()[..] == pattern(i as u8)[..],
            "page {i}"
        );
    }
    // a descriptor page with a bad segment: error, nothing read
    let bad = RawSegment {
        gref: U32::new(dg),
        first_sect: 7,
        last_sect: 0,
        pad: [0; 2],
    };
    f.g.write(desc_pfn, 8, bad.as_bytes()).unwrap();
    f.push(ind.as_bytes());
    f.kick();
    poll(&mut v);
    let rsp = f.responses();
    assert_eq!(
        (rsp[0].operation, rsp[0].status.get()),
        (BLKIF_OP_READ, BLKIF_RSP_ERROR)
    );
    // a refused indirect request also echoes its inner operation
    ind.nr_segments = U16::new(0);
    f.push(ind.as_bytes());
    f.kick();
    poll(&mut v);
    let rsp = f.responses();
    assert_eq!(
        (rsp[0].operation, rsp[0].status.get()),
        (BLKIF_OP_READ, BLKIF_RSP_ERROR)
    );
    assert_eq!(
        s.host.grant_map_count(s.domid),
        4,
        "only the 4 ring pages stay mapped"
    );
}

#[test]
fn persistent_grants_stay_mapped_until_disconnect() {
    let s = setup("persistent.img");
    let mut v = vbd(&s, &s.img);
    let mut f = Front::connect_with(&s.host, s.domid, 51712, None, true);
    assert_eq!(poll(&mut v), CONNECTED);
    assert_eq!(f.back_node("feature-persistent"), "1");
    // blkfront grants its persistent pages read-write and reuses them
    let g: Vec<_> = (0..4).map(|i| f.grant(DATA_PFN + i, false)).collect();
    for round in 0..3u8 {
        for i in 0..4u64 {
            f.g.write_page(DATA_PFN + i, &pattern(round * 4 + i as u8))
                .unwrap();
        }
        let segs: Vec<_> = g.iter().map(|r| (*r, 0, 7)).collect();
        f.push(&rw(
            BLKIF_OP_WRITE,
            u64::from(round),
            u64::from(round) * 32,
            &segs,
        ));
        f.kick();
        poll(&mut v);
        assert_eq!(f.responses()[0].status.get(), 0);
        // the same grants read back the first round's data
        f.push(&rw(BLKIF_OP_READ, 100, 0, &segs));
        f.kick();
        poll(&mut v);
        assert_eq!(f.responses()[0].status.get(), 0);
        for i in 0..4u64 {
            assert!(f.g.read_page(DATA_PFN + i).unwrap()[..] == pattern(i as u8)[..]);
        }
    }
    let st = v.stats();
    assert_eq!(
        (st.persistent_maps, st.oneoff_maps),
        (4, 0),
        "mapped once, reused"
    );
    assert_eq!(v.persistent_grants(), 4);
    assert_eq!(s.host.grant_map_count(s.domid), 1 + 4);
    // the guest cannot take a page back while we hold it
    assert!(f.g.end_access(g[0]).is_err());
    // a read-only grant cannot be cached writable: served with a one-off mapping
    let ro = f.grant(DATA_PFN + 9, true);
    f.push(&rw(BLKIF_OP_WRITE, 7, 0, &[(ro, 0, 7)]));
    f.kick();
    poll(&mut v);
    assert_eq!(f.responses()[0].status.get(), 0);
    assert_eq!(v.stats().oneoff_maps, 1);
    // disconnect unmaps everything
    f.set_state(5);
    poll(&mut v);
    assert_eq!(s.host.grant_map_count(s.domid), 0);
    assert_eq!(v.persistent_grants(), 0);
    f.g.end_access(g[0]).unwrap();
}

#[test]
fn hostile_requests_get_errors_and_the_device_goes_on() {
    let s = setup("hostile.img");
    let mut v = vbd(&s, &s.img);
    let mut f = Front::connect(&s.host, s.domid, 51712, None);
    poll(&mut v);
    let mine = f.grant(DATA_PFN, false);
    let other = s.host.create_domain(DomainConfig::pvh(64)).unwrap();
    // a grant to another domain than the backend's
    let to_other = f.g.grant_access(other, DATA_PFN + 1, false).unwrap();
    let ro = f.grant(DATA_PFN + 2, true);
    let sectors = DISK_BYTES / 512;
    let mut bad_count = rw(BLKIF_OP_READ, 6, 0, &[(mine, 0, 0)]);
    bad_count[1] = 200;
    let cases: Vec<(Vec<u8>, i16)> = vec![
        (rw(BLKIF_OP_READ, 1, 0, &[(mine, 5, 2)]), BLKIF_RSP_ERROR),
        (rw(BLKIF_OP_READ, 2, 0, &[(mine, 0, 8)]), BLKIF_RSP_ERROR),
        (rw(BLKIF_OP_READ, 3, 0, &[(9999, 0, 7)]), BLKIF_RSP_ERROR),
        (
            rw(BLKIF_OP_READ, 4, 0, &[(to_other, 0, 7)]),
            BLKIF_RSP_ERROR,
        ),
        (
            rw(BLKIF_OP_READ, 5, sectors - 7, &[(mine, 0, 7)]),
            BLKIF_RSP_ERROR,
        ),
        (bad_count, BLKIF_RSP_ERROR),
        (
            rw(BLKIF_OP_READ, 7, u64::MAX - 3, &[(mine, 0, 7)]),
            BLKIF_RSP_ERROR,
        ),
        // reading into a read-only grant: the mapping is refused
        (rw(BLKIF_OP_READ, 8, 0, &[(ro, 0, 7)]), BLKIF_RSP_ERROR),
        (rw(4, 9, 0, &[]), BLKIF_RSP_EOPNOTSUPP),
        (rw(200, 10, 0, &[]), BLKIF_RSP_EOPNOTSUPP),
        (
            rw(BLKIF_OP_READ, 11, sectors - 8, &[(mine, 0, 7)]),
            BLKIF_RSP_OKAY,
        ),
    ];
    for (e, _) in &cases {
        f.push(e);
    }
    f.kick();
    assert_eq!(poll(&mut v), CONNECTED);
    let rsp = f.responses();
    assert_eq!(rsp.len(), cases.len());
    for (r, (e, want)) in rsp.iter().zip(&cases) {
        assert_eq!(r.id.get(), u64::from_le_bytes(e[8..16].try_into().unwrap()));
        assert_eq!(r.status.get(), *want, "request {}", r.id.get());
    }
    assert_eq!(v.stats().errors, 10);
    assert_eq!(s.host.grant_map_count(s.domid), 1);
}

#[test]
fn ring_index_beyond_the_ring_closes_only_that_device() {
    let s = setup("overflow.img");
    let img2 = image("overflow2.img");
    let mut v = vbd(&s, &s.img);
    let mut f = Front::connect(&s.host, s.domid, 51712, None);
    poll(&mut v);
    // a second guest with its own disk
    let d2 = s.host.create_domain(DomainConfig::pvh(1024)).unwrap();
    let mut v2 = Vbd::create(
        &s.host,
        s.host.open_xenstore().unwrap(),
        s.host.open_event_channels().unwrap(),
        &VbdConfig::xvda(d2, img2),
    )
    .unwrap();
    let mut f2 = Front::connect(&s.host, d2, 51712, None);
    poll(&mut v2);

    // req_prod 33 ahead of rsp_prod on a 32-entry ring
    f.req_prod = 33;
    f.kick();
    let st = poll(&mut v);
    match st {
        VbdStatus::Failed(why) => assert!(why.contains("req_prod 33"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(f.back_node("state"), "6");
    assert!(f.back_node("kemari-error").contains("ring holds 32"));
    assert_eq!(s.host.grant_map_count(s.domid), 0, "ring unmapped");
    assert_eq!(v.local_port(), None);
    // further kicks are ignored (the port is gone), nothing answered
    assert!(f.g.evtchn_notify(f.port).is_ok());
    poll(&mut v);
    assert!(matches!(v.status(), VbdStatus::Failed(_)));
    // the frontend cannot revive it
    f.set_state(1);
    poll(&mut v);
    assert_eq!(f.back_node("state"), "6");

    // the other guest's disk still works
    f2.g.write_page(DATA_PFN, &pattern(7)).unwrap();
    let g = f2.grant(DATA_PFN, true);
    f2.push(&rw(BLKIF_OP_WRITE, 1, 0, &[(g, 0, 7)]));
    f2.kick();
    assert_eq!(poll(&mut v2), CONNECTED);
    assert_eq!(f2.responses()[0].status.get(), 0);

    // the failed device's guest is destroyed: run ends, and what it reports is the failure
    drop(f);
    s.host.destroy_domain(s.domid).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    match v.run(&stop).unwrap() {
        VbdStatus::Failed(why) => assert!(why.contains("req_prod 33"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn attach_takes_over_a_connected_ring_and_serves_queued_requests() {
    let s = setup("attach.img");
    let mut f;
    {
        let mut v = vbd(&s, &s.img);
        f = Front::connect(&s.host, s.domid, 51712, None);
        poll(&mut v);
        f.set_state(4);
        poll(&mut v);
        f.g.write_page(DATA_PFN, &pattern(3)).unwrap();
        let g = f.grant(DATA_PFN, true);
        f.push(&rw(BLKIF_OP_WRITE, 1, 0, &[(g, 0, 7)]));
        f.kick();
        poll(&mut v);
        assert_eq!(f.responses().len(), 1);
        // the old backend dies (its handles close) with one request queued, unanswered
        f.g.write_page(DATA_PFN + 1, &pattern(4)).unwrap();
        let g = f.grant(DATA_PFN + 1, true);
        f.push(&rw(BLKIF_OP_WRITE, 2, 8, &[(g, 0, 7)]));
        f.ring_write(0, &f.req_prod.to_le_bytes());
    }
    let v = Vbd::attach(
        &s.host,
        s.host.open_xenstore().unwrap(),
        s.host.open_event_channels().unwrap(),
        &VbdConfig::xvda(s.domid, s.img.clone()),
    )
    .unwrap();
    assert_eq!(v.state(), BackendState::Attached);
    assert_eq!(
        f.back_node("state"),
        "4",
        "the guest keeps seeing Connected"
    );
    assert_eq!(f.back_node("kemari-state"), "attached");
    let rsp = f.responses();
    assert_eq!(rsp.len(), 1);
    assert_eq!((rsp[0].id.get(), rsp[0].status.get()), (2, 0));
    assert_eq!(&std::fs::read(&s.img).unwrap()[4096..8192], &pattern(4)[..]);
    // and the new backend's port gets the guest's kicks
    let mut v = v;
    f.g.write_page(DATA_PFN + 2, &pattern(5)).unwrap();
    let g = f.grant(DATA_PFN + 2, true);
    f.push(&rw(BLKIF_OP_WRITE, 3, 16, &[(g, 0, 7)]));
    f.kick();
    poll(&mut v);
    assert_eq!(f.responses()[0].status.get(), 0);
    // attach refuses a device whose frontend is not connected
    let d2 = s.host.create_domain(DomainConfig::pvh(64)).unwrap();
    assert!(Vbd::attach(
        &s.host,
        s.host.open_xenstore().unwrap(),
        s.host.open_event_channels().unwrap(),
        &VbdConfig::xvda(d2, s.img.clone()),
    )
    .is_err());
}

#[test]
fn guest_destroyed_ends_the_device_and_run_cleans_up() {
    let s = setup("gone.img");
    let mut v = vbd(&s, &s.img);
    let _f = Front::connect(&s.host, s.domid, 51712, None);
    poll(&mut v);
    let back = v.paths().backend.clone();
    s.host.destroy_domain(s.domid).unwrap();
    assert_eq!(poll(&mut v), VbdStatus::Gone);
    let stop = std::sync::atomic::AtomicBool::new(false);
    assert_eq!(v.run(&stop).unwrap(), VbdStatus::Gone);
    let xs = s.host.open_xenstore().unwrap();
    assert!(
        xs.read(Tx::NONE, &back).is_err(),
        "backend directory removed"
    );
    assert!(
        xs.read(
            Tx::NONE,
            &format!("/local/domain/0/backend/kemari-vbd/{}", s.domid)
        )
        .is_err(),
        "and the guest's directory under kemari-vbd, now empty"
    );
}

#[test]
fn failing_grant_map_at_connect_fails_the_device_not_dom0() {
    let faults = FaultPlan::new();
    let host = MemXen::with_faults(faults.clone());
    let domid = host.create_domain(DomainConfig::pvh(1024)).unwrap();
    let img = image("fault.img");
    let mut v = Vbd::create(
        &host,
        host.open_xenstore().unwrap(),
        host.open_event_channels().unwrap(),
        &VbdConfig::xvda(domid, img),
    )
    .unwrap();
    faults.fail_next(Method::GnttabMap, Errno::EINVAL);
    let f = Front::connect(&host, domid, 51712, None);
    match v.poll(Some(Duration::ZERO)).unwrap() {
        VbdStatus::Failed(why) => assert!(why.contains("mapping ring grants"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(f.back_node("state"), "6");
    assert_eq!(host.grant_map_count(domid), 0);
    // a frontend naming a bad event channel: refused the same way
    let d2 = host.create_domain(DomainConfig::pvh(1024)).unwrap();
    let mut v2 = Vbd::create(
        &host,
        host.open_xenstore().unwrap(),
        host.open_event_channels().unwrap(),
        &VbdConfig::xvda(d2, image("fault2.img")),
    )
    .unwrap();
    let f2 = Front::connect(&host, d2, 51712, None);
    f2.xs
        .write(Tx::NONE, &format!("{}/event-channel", f2.dir), b"banana")
        .unwrap();
    f2.set_state(3);
    match v2.poll(Some(Duration::ZERO)).unwrap() {
        VbdStatus::Failed(why) => assert!(why.contains("event-channel"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(host.grant_map_count(d2), 0);
    let _ = f2.pages;
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// A guest writing arbitrary ring entries and arbitrary producer indexes: the backend
        /// never panics, answers exactly the requests it consumed while the index was sane,
        /// and ends the device (ring unmapped) once it is not; the disk stays its size.
        #[test]
        fn random_ring_contents_never_hurt_the_backend(
            rounds in proptest::collection::vec(
                (0u32..40, proptest::collection::vec(any::<u8>(), ENTRY_SIZE * 4)),
                1..6,
            ),
        ) {
            let s = setup("fuzz.img");
            let mut v = vbd(&s, &s.img);
            let mut f = Front::connect(&s.host, s.domid, 51712, None);
            poll(&mut v);
            // a few real grants the random entries may hit (refs are small numbers)
            for i in 0..4 {
                f.grant(DATA_PFN + i, i % 2 == 0);
            }
            let mut answered = 0u32;
            let mut failed = false;
            for (delta, bytes) in rounds {
                for chunk in bytes.chunks(ENTRY_SIZE) {
                    let slot = (f.req_prod & (f.size - 1)) as usize;
                    f.ring_write(64 + slot * ENTRY_SIZE, chunk);
                }
                let before = f.req_prod;
                f.req_prod = f.req_prod.wrapping_add(delta);
                f.kick();
                let st = poll(&mut v);
                let outstanding = f.req_prod.wrapping_sub(answered);
                if outstanding > f.size {
                    prop_assert!(matches!(st, VbdStatus::Failed(_)) || failed, "{st:?}");
                    failed = true;
                } else if !failed {
                    prop_assert_eq!(&st, &CONNECTED);
                    let n = f.responses().len() as u32;
                    prop_assert_eq!(n, f.req_prod.wrapping_sub(before));
                    answered = answered.wrapping_add(n);
                }
                if failed {
                    prop_assert_eq!(s.host.grant_map_count(s.domid), 0);
                } else {
                    prop_assert_eq!(s.host.grant_map_count(s.domid), 1);
                }
            }
            prop_assert_eq!(std::fs::metadata(&s.img).unwrap().len(), DISK_BYTES);
        }
    }
}

/// A backend killed after writing responses into the ring but before publishing them
/// (`rsp_prod`): the slots between `rsp_prod` and `req_prod` hold responses, not requests.
/// The backend that takes over must re-serve the original requests, from the journal.
#[test]
fn takeover_after_a_crash_between_response_and_publish_replays_from_the_journal() {
    for with_journal in [true, false] {
        let s = setup(&format!("journal-{with_journal}.img"));
        let jdir = std::env::temp_dir().join(format!(
            "kemari-blkback-journal-{}-{with_journal}",
            std::process::id()
        ));
        let config = VbdConfig {
            journal_dir: with_journal.then(|| jdir.clone()),
            ..VbdConfig::xvda(s.domid, s.img.clone())
        };
        let journal = jdir.join(format!("kemari-vbd-{}-51712.journal", s.domid));
        let mut f;
        {
            let mut v = Vbd::create(
                &s.host,
                s.host.open_xenstore().unwrap(),
                s.host.open_event_channels().unwrap(),
                &config,
            )
            .unwrap();
            f = Front::connect(&s.host, s.domid, 51712, None);
            poll(&mut v);
            f.set_state(4);
            poll(&mut v);
            assert_eq!(journal.exists(), with_journal);
            for (i, seed) in [(0u64, 3u8), (1, 4)] {
                f.g.write_page(DATA_PFN + i, &pattern(seed)).unwrap();
                let g = f.grant(DATA_PFN + i, true);
                f.push(&rw(BLKIF_OP_WRITE, i + 1, i * 8, &[(g, 0, 7)]));
            }
            f.kick();
            poll(&mut v);
            // the crash: responses written into slots 0 and 1, rsp_prod never published
            f.ring_write(8, &0u32.to_le_bytes());
            std::fs::write(&s.img, vec![0u8; DISK_BYTES as usize]).unwrap();
            // SIGKILL runs no cleanup: the journal survives the process
            let saved = with_journal.then(|| std::fs::read(&journal).unwrap());
            drop(v);
            if let Some(saved) = saved {
                std::fs::write(&journal, saved).unwrap();
            }
        }
        let v = Vbd::attach(
            &s.host,
            s.host.open_xenstore().unwrap(),
            s.host.open_event_channels().unwrap(),
            &config,
        )
        .unwrap();
        let rsp = f.responses();
        let got: Vec<(u64, i16)> = rsp.iter().map(|r| (r.id.get(), r.status.get())).collect();
        let img = std::fs::read(&s.img).unwrap();
        if with_journal {
            assert_eq!(
                got,
                [(1, 0), (2, 0)],
                "the original requests are served again"
            );
            assert_eq!(v.stats().replayed, 2);
            assert_eq!(&img[..4096], &pattern(3)[..]);
            assert_eq!(&img[4096..8192], &pattern(4)[..]);
        } else {
            // what the journal prevents: the responses are read back as requests (the first
            // one, "write, 0 segments", is refused, the second reads as a barrier) and the
            // writes are lost
            assert_eq!(got, [(1, -1), (1, 0)]);
            assert!(img[..8192].iter().all(|b| *b == 0));
        }
        drop(v);
        assert!(!journal.exists(), "a clean end removes the journal");
    }
}
