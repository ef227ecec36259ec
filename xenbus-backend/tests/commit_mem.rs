//! Output commit on blkback against the in-memory Xen: a protected device holds writes,
//! flushes and discards until the gate releases their epoch, logs them for the checkpoint, and
//! serves reads at once unless held output is ahead of them. (The test frontend is shared with
//! `blkback_mem.rs`: `tests/common`.)

#![allow(clippy::unwrap_used, dead_code)]

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hypervisor::mem::{DomainConfig, MemXen};
use hypervisor::{Hypervisor, PAGE_SIZE};
use xenbus_backend::blkif::*;
use xenbus_backend::commit::{LoggedOp, OutputGate, Tap};
use xenbus_backend::{Vbd, VbdConfig};

mod common;
use common::*;

struct Kicks(Arc<AtomicU64>);
impl Tap for Kicks {
    fn kick(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);
impl Write for Lines {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn sector_of(img: &std::path::Path, sector: u64) -> Vec<u8> {
    let d = std::fs::read(img).unwrap();
    d[sector as usize * 512..sector as usize * 512 + 512].to_vec()
}

/// The guest's xvda served from `img`.
fn xvda<'h>(host: &'h MemXen, domid: hypervisor::DomId, img: &std::path::Path) -> Vbd<'h> {
    Vbd::create(
        host,
        host.open_xenstore().unwrap(),
        host.open_event_channels().unwrap(),
        &VbdConfig::xvda(domid, img.to_path_buf()),
    )
    .unwrap()
}

#[test]
fn writes_are_held_until_their_checkpoint_is_acked_and_logged_for_it() {
    let host = MemXen::new();
    let domid = host.create_domain(DomainConfig::pvh(1024)).unwrap();
    let img = image("held.img");
    let mut v = xvda(&host, domid, &img);
    let kicks = Arc::new(AtomicU64::new(0));
    let gate = OutputGate::new(1, Box::new(Kicks(kicks.clone())));
    let lines = Lines::default();
    gate.set_commit_log(Box::new(lines.clone()));
    v.protect(gate.clone()).unwrap();
    let mut f = Front::connect(&host, domid, 51712, None);
    v.poll(Some(Duration::ZERO)).unwrap();
    f.set_state(4);
    v.poll(Some(Duration::ZERO)).unwrap();

    // nothing held: a read is served at once, and nothing kicks the tap
    let rd = f.grant(DATA_PFN + 5, false);
    f.push(&rw(BLKIF_OP_READ, 0x1, 0, &[(rd, 0, 0)]));
    f.kick();
    v.poll(Some(Duration::ZERO)).unwrap();
    assert_eq!(f.responses().len(), 1);
    assert_eq!(kicks.load(Ordering::SeqCst), 0);

    // a write of one sector at sector 4: held, logged, the tap kicked; the disk unchanged
    f.g.write_page(DATA_PFN, &pattern(7)).unwrap();
    let wg = f.grant(DATA_PFN, true);
    f.push(&rw(BLKIF_OP_WRITE, 0x2, 4, &[(wg, 0, 0)]));
    // a read of the same sector queued behind it
    f.push(&rw(BLKIF_OP_READ, 0x3, 4, &[(rd, 1, 1)]));
    f.kick();
    v.poll(Some(Duration::ZERO)).unwrap();
    assert!(f.responses().is_empty(), "answered before the ACK");
    assert_eq!(v.held(), 2);
    assert_eq!(kicks.load(Ordering::SeqCst), 1);
    assert_eq!(sector_of(&img, 4), vec![0u8; 512], "written before the ACK");

    // checkpoint 1 is taken (guest paused): its log holds the write
    let log = gate.take_log(1);
    assert_eq!(log.len(), 1);
    assert_eq!((log[0].seq, log[0].devid, log[0].sector), (1, 51712, 4));
    assert_eq!(log[0].op, LoggedOp::Write(Arc::from(&pattern(7)[..512])));
    // a write taken after that belongs to checkpoint 2
    f.g.write_page(DATA_PFN + 1, &pattern(9)).unwrap();
    let wg2 = f.grant(DATA_PFN + 1, true);
    f.push(&rw(BLKIF_OP_WRITE, 0x4, 6, &[(wg2, 0, 0)]));
    f.push(&rw(BLKIF_OP_FLUSH_DISKCACHE, 0x5, 0, &[]));
    f.kick();
    v.poll(Some(Duration::ZERO)).unwrap();
    assert!(f.responses().is_empty());

    // ACK 1: the first write and the read behind it go out, in order; the second write waits
    gate.acked(1);
    v.poll(Some(Duration::from_millis(100))).unwrap();
    let rsp = f.responses();
    assert_eq!(
        rsp.iter()
            .map(|r| (r.id.get(), r.status.get()))
            .collect::<Vec<_>>(),
        vec![(0x2, 0), (0x3, 0)]
    );
    assert_eq!(sector_of(&img, 4), pattern(7)[..512].to_vec());
    let mut page = [0u8; PAGE_SIZE];
    f.g.read(DATA_PFN + 5, 0, &mut page).unwrap();
    assert_eq!(
        &page[512..1024],
        &pattern(7)[..512],
        "the read saw the released write"
    );
    assert_eq!(sector_of(&img, 6), vec![0u8; 512]);
    assert_eq!(v.held(), 2);

    // checkpoint 2 carries the second write; its ACK releases it and the flush
    let log = gate.take_log(2);
    assert_eq!(log.iter().map(|w| w.seq).collect::<Vec<_>>(), vec![2]);
    gate.acked(2);
    v.poll(Some(Duration::from_millis(100))).unwrap();
    assert_eq!(
        f.responses().iter().map(|r| r.id.get()).collect::<Vec<_>>(),
        vec![0x4, 0x5]
    );
    assert_eq!(sector_of(&img, 6), pattern(9)[..512].to_vec());

    // protection ends with a write held: it goes out at once, and later ones are not held
    f.push(&rw(BLKIF_OP_WRITE, 0x6, 8, &[(wg, 0, 0)]));
    f.kick();
    v.poll(Some(Duration::ZERO)).unwrap();
    assert!(f.responses().is_empty());
    gate.end();
    v.poll(Some(Duration::from_millis(100))).unwrap();
    assert_eq!(f.responses().len(), 1);
    f.push(&rw(BLKIF_OP_WRITE, 0x7, 9, &[(wg, 0, 0)]));
    f.kick();
    v.poll(Some(Duration::ZERO)).unwrap();
    assert_eq!(f.responses().len(), 1);
    assert_eq!(v.stats().held, 5);
    assert_eq!(v.stats().errors, 0);

    // the commit log: every release after an ACK of at least its epoch (or the end)
    let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
    let mut acked = 0u64;
    let mut released = 0;
    for l in text.lines() {
        let kv = |k: &str| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{k}=")).map(str::to_string))
        };
        match l.split_whitespace().nth(1) {
            Some("ack") => acked = kv("seq").unwrap().parse().unwrap(),
            Some("release") => {
                released += 1;
                let epoch: u64 = kv("epoch").unwrap().parse().unwrap();
                match kv("acked").unwrap().as_str() {
                    "end" => assert_eq!(kv("id").unwrap(), "0x6"),
                    a => {
                        assert!(epoch <= acked && a.parse::<u64>().unwrap() == acked, "{l}");
                    }
                }
            }
            _ => {}
        }
    }
    assert_eq!(released, 5, "{text}");
}

#[test]
fn a_device_without_a_gate_serves_writes_at_once() {
    let host = MemXen::new();
    let domid = host.create_domain(DomainConfig::pvh(1024)).unwrap();
    let img = image("open.img");
    let mut v = xvda(&host, domid, &img);
    let mut f = Front::connect(&host, domid, 51712, None);
    v.poll(Some(Duration::ZERO)).unwrap();
    f.set_state(4);
    v.poll(Some(Duration::ZERO)).unwrap();
    f.g.write_page(DATA_PFN, &pattern(3)).unwrap();
    let wg = f.grant(DATA_PFN, true);
    f.push(&rw(BLKIF_OP_WRITE, 0x2, 4, &[(wg, 0, 0)]));
    f.kick();
    v.poll(Some(Duration::ZERO)).unwrap();
    assert_eq!(f.responses().len(), 1);
    assert_eq!(sector_of(&img, 4), pattern(3)[..512].to_vec());
    assert_eq!(v.stats().held, 0);
}
