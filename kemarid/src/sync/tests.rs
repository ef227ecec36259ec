//! End-to-end tests of the engine: sender and receiver over a real loopback TCP connection,
//! both hosts in memory, a guest writer thread dirtying pages while the sender works.

use std::collections::BTreeMap;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use hypervisor::hvm_save::{self, HvmContextBuilder};
use hypervisor::mem::{DomainConfig, GuestError, MemXen};
use hypervisor::{DomId, DomainControl, Errno, GuestMemory, Method, PAGE_SIZE};
use kemari_stream::checkpoint::{self, Checkpoint, EpochReason, NackReason, Reply};
use kemari_stream::Limits;

use super::commit::{CommitHook, TriggerTap};
use super::disk_apply::ReplicaDisk;
use super::hash::{mem_hash, MemHash};
use super::image;
use super::receiver::{
    read_staged, ReceiveError, ReceiveFailure, Receiver, ReceiverOptions, Session,
};
use super::replica::MemReplicaBuilder;
use super::sender::{
    AckInfo, AfterAck, CheckpointHook, CountHook, DeviceError, DeviceState, Release, SendError,
    Sender, SenderOptions, SAVED_HVM_PARAMS,
};
use super::trigger::{Reasons, Triggers};

const PAGES: u64 = 2100;
const HOLES: [u64; 3] = [100, 101, 1500];

fn spool_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "kemari-sync-test-{}-{tag}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn cpu_context(vcpus: u32, marker: u64) -> Vec<u8> {
    let mut b = HvmContextBuilder::new();
    let mut header = vec![0u8; 24];
    header[..4].copy_from_slice(&hvm_save::HVM_FILE_MAGIC.to_le_bytes());
    b.push(hvm_save::HVM_SAVE_HEADER, 0, &header).unwrap();
    for v in 0..vcpus {
        let mut body = vec![0u8; 1032];
        body[512..520].copy_from_slice(&marker.to_le_bytes());
        body[520..524].copy_from_slice(&v.to_le_bytes());
        b.push(hvm_save::HVM_SAVE_CPU, v as u16, &body).unwrap();
    }
    b.finish()
}

/// A guest that keeps writing pseudo-random bytes to pseudo-random pages while it runs.
struct Writer {
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    handle: Option<JoinHandle<()>>,
}

impl Writer {
    fn start(xen: &MemXen, dom: DomId, seed: u64) -> Writer {
        let g = xen.guest(dom);
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(0));
        let (s, w) = (stop.clone(), writes.clone());
        let handle = std::thread::spawn(move || {
            let mut x = seed | 1;
            while !s.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let pfn = x % PAGES;
                if HOLES.contains(&pfn) {
                    continue;
                }
                let r = if x % 7 == 0 {
                    g.fill_page(pfn, (x >> 8) as u8)
                } else {
                    g.write(pfn, ((x >> 16) % 4000) as usize, &x.to_le_bytes())
                };
                match r {
                    Ok(()) => {
                        w.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(GuestError::NotRunning { .. }) => std::thread::yield_now(),
                    Err(e) => panic!("guest write: {e}"),
                }
            }
        });
        Writer {
            stop,
            writes,
            handle: Some(handle),
        }
    }

    fn stop(&mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.join().unwrap();
        }
        self.writes.load(Ordering::Relaxed)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The page the fake device model writes when it is stopped.
const DMA_PFN: u64 = 3;

/// Device state that changes with every save. Like QEMU, it writes guest memory until it is
/// stopped (an emulated transfer completing after the vCPUs were paused): a checkpoint that
/// harvests dirty pages before stopping it misses that write. And it must run again before
/// the vCPUs do (a stopped QEMU drops the guest's port I/O): `resumed` fails if the guest
/// was unpaused first.
struct FakeDevice {
    saves: Arc<AtomicU64>,
    resumes: Arc<AtomicU64>,
    host: Option<(MemXen, DomId)>,
    /// Every `track_writes` call, in order.
    tracking: Arc<Mutex<Vec<bool>>>,
}

impl DeviceState for FakeDevice {
    fn save(&mut self) -> Result<Vec<u8>, DeviceError> {
        let n = self.saves.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some((xen, dom)) = &self.host {
            xen.guest(*dom)
                .dm_write(DMA_PFN, 0, &n.to_le_bytes())
                .unwrap();
        }
        Ok(format!("qemu-state-{n}").into_bytes())
    }

    fn resumed(&mut self) -> Result<(), DeviceError> {
        if let Some((xen, dom)) = &self.host {
            if xen.pause_count(*dom) == Some(0) {
                return Err("the guest's vCPUs ran before the device model did".into());
            }
        }
        self.resumes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn track_writes(&mut self, enable: bool) -> Result<(), DeviceError> {
        self.tracking.lock().unwrap().push(enable);
        Ok(())
    }
}

struct Primary {
    xen: MemXen,
    dom: DomId,
}

fn primary(pvh: bool, vcpus: u32) -> Primary {
    let xen = MemXen::new();
    let base = if pvh {
        DomainConfig::pvh(PAGES)
    } else {
        DomainConfig::hvm(PAGES)
    };
    let mut cfg = base.with_vcpus(vcpus).with_holes(&HOLES);
    cfg.hvm_context = Some(cpu_context(vcpus, 0));
    let dom = xen.create_domain(cfg).unwrap();
    let g = xen.guest(dom);
    for pfn in (0..PAGES).filter(|p| !HOLES.contains(p)) {
        g.fill_page(pfn, (pfn % 251) as u8).unwrap();
    }
    xen.set_hvm_param(dom, 1, 0xfeffc).unwrap();
    Primary { xen, dom }
}

/// The secondary: a receiver on a loopback port, serving one connection in a thread.
struct Secondary {
    xen: MemXen,
    addr: std::net::SocketAddr,
    spool: PathBuf,
    handle: JoinHandle<Result<Session, ReceiveFailure>>,
}

fn secondary(tag: &str, limits: Limits) -> Secondary {
    secondary_with(tag, limits, Vec::new())
}

/// As [`secondary`], the receiver also applying disk write logs to `disks`.
fn secondary_with(tag: &str, limits: Limits, disks: Vec<ReplicaDisk>) -> Secondary {
    let xen = MemXen::new();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let spool = spool_dir(tag);
    let (x, s) = (xen.clone(), spool.clone());
    // The PVH runs take the replica's name from the image.
    let name = (!tag.starts_with("pvh")).then(|| String::from("replica"));
    let handle = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let builder = MemReplicaBuilder::new(x.clone());
        let rx = Receiver::new(
            &x,
            &builder,
            ReceiverOptions {
                spool_dir: s,
                name,
                limits,
                idle_timeout: Some(Duration::from_secs(60)),
            },
        )
        .with_disks(disks);
        rx.serve(stream)
    });
    Secondary {
        xen,
        addr,
        spool,
        handle,
    }
}

fn hash_of(xen: &MemXen, dom: DomId) -> MemHash {
    let max = xen.maximum_gpfn(dom).unwrap();
    let mut h = mem_hash(xen, dom, max, false).unwrap();
    h.holes = 0; // the replica ends at its last page with data; compare populated pages only
    h
}

fn opts() -> SenderOptions {
    SenderOptions {
        max_live_rounds: 4,
        live_dirty_target: 8,
        ack_timeout: Duration::from_secs(20),
        initial_ack_timeout: Duration::from_secs(20),
        limits: Limits::default(),
        min_run: Duration::ZERO,
    }
}

/// A hook recording, for every ACKed checkpoint, the primary's memory while the guest is still
/// paused (every checkpoint is released only after its ACK), changing the CPU context and a
/// parameter after each ACK, and running `extra` (fault installation) after the ACK of `at`.
struct Recorder<'a> {
    p: &'a Primary,
    hashes: BTreeMap<u64, MemHash>,
    contexts: BTreeMap<u64, Vec<u8>>,
    stop_at: u64,
    hold: bool,
    at: u64,
    extra: Option<Box<dyn FnMut() + 'a>>,
    infos: Vec<AckInfo>,
}

impl<'a> Recorder<'a> {
    fn new(p: &'a Primary, stop_at: u64) -> Self {
        Recorder {
            p,
            hashes: BTreeMap::new(),
            contexts: BTreeMap::new(),
            stop_at,
            hold: true,
            at: 0,
            extra: None,
            infos: Vec::new(),
        }
    }
}

impl CheckpointHook for Recorder<'_> {
    fn release(&mut self, _seq: u64, _reasons: Reasons) -> Release {
        Release::AfterAck
    }

    fn acked(&mut self, info: &AckInfo) -> AfterAck {
        assert!(info.paused);
        self.infos.push(*info);
        self.hashes
            .insert(info.seq, hash_of(&self.p.xen, self.p.dom));
        self.contexts
            .insert(info.seq, self.p.xen.hvm_context(self.p.dom).unwrap());
        if info.seq == self.at {
            if let Some(f) = self.extra.as_mut() {
                f();
            }
        }
        if info.seq >= self.stop_at {
            return if self.hold {
                AfterAck::StopPaused
            } else {
                AfterAck::Stop
            };
        }
        // The "CPU" moves on: the next checkpoint must carry the new context.
        let vcpus = self.p.xen.domain_info(self.p.dom).unwrap().max_vcpu_id + 1;
        self.p
            .xen
            .set_hvm_context(self.p.dom, &cpu_context(vcpus, info.seq + 1))
            .unwrap();
        self.p
            .xen
            .set_hvm_param(self.p.dom, 17, info.seq + 1)
            .unwrap();
        AfterAck::Continue
    }
}

fn config(pvh: bool) -> Vec<u8> {
    format!(
        r#"{{"c_info":{{"type":"{}","name":"guest"}}}}"#,
        if pvh { "pvh" } else { "hvm" }
    )
    .into_bytes()
}

fn full_run(pvh: bool, vcpus: u32, with_device: bool) {
    let p = primary(pvh, vcpus);
    let sec = secondary(if pvh { "pvh" } else { "hvm" }, Limits::default());
    let mut writer = Writer::start(&p.xen, p.dom, 0x9e37_79b9_7f4a_7c15);
    let saves = Arc::new(AtomicU64::new(0));
    let resumes = Arc::new(AtomicU64::new(0));
    let tracking = Arc::new(Mutex::new(Vec::new()));
    let device: Option<Box<dyn DeviceState>> = with_device.then(|| {
        Box::new(FakeDevice {
            saves: saves.clone(),
            resumes: resumes.clone(),
            host: Some((p.xen.clone(), p.dom)),
            tracking: tracking.clone(),
        }) as Box<dyn DeviceState>
    });
    let stream = TcpStream::connect(sec.addr).unwrap();
    let mut tx = Sender::new(&p.xen, p.dom, stream, opts(), device).unwrap();
    let progress = Mutex::new(Vec::new());
    let init = tx
        .initial_sync(&config(pvh), &mut |pr| progress.lock().unwrap().push(*pr))
        .unwrap();
    let progress = progress.into_inner().unwrap();
    assert_eq!(progress.first().unwrap().round, 1);
    assert_eq!(progress.first().unwrap().holes, HOLES.len() as u64);
    assert!(progress.last().unwrap().last);
    assert!(init.live_pages >= PAGES - HOLES.len() as u64);

    let triggers = Triggers::new(Duration::from_millis(2));
    let mut hook = CountHook {
        limit: Some(12),
        hold: true,
    };
    let out = tx.protect(&triggers, &mut hook).unwrap();
    assert_eq!(out.last_seq, 12);
    assert!(out.held_paused);
    assert_eq!(out.stats.checkpoints, 12);
    drop(tx);
    let writes = writer.stop();
    assert!(writes > 0, "the guest wrote nothing");
    // Held: paused exactly once by us, log-dirty off.
    assert_eq!(p.xen.pause_count(p.dom), Some(1));
    assert_eq!(p.xen.log_dirty_enabled(p.dom), Some(false));

    let session = sec.handle.join().unwrap().unwrap();
    assert_eq!(session.acked, Some(12));
    assert_eq!(session.checkpoints, 12);
    let replica = session.replica.unwrap();
    assert_eq!(
        sec.xen.pause_count(replica),
        Some(1),
        "replica stays paused"
    );
    assert_eq!(hash_of(&p.xen, p.dom), hash_of(&sec.xen, replica));
    let staged = session.staged.unwrap();
    assert_eq!(staged.seq, 12);
    assert_eq!(staged.hvm_context, p.xen.hvm_context(p.dom).unwrap());
    let params: Vec<(u32, u64)> = SAVED_HVM_PARAMS
        .iter()
        .map(|i| (*i, p.xen.hvm_param(p.dom, *i).unwrap()))
        .collect();
    assert_eq!(staged.hvm_params, params);
    if with_device {
        let n = saves.load(Ordering::SeqCst);
        assert_eq!(
            staged.emulator_state,
            Some(format!("qemu-state-{n}").into_bytes())
        );
        // Resumed after every save but the held last one.
        assert_eq!(resumes.load(Ordering::SeqCst), n - 1);
        // The device model's last write, made while the vCPUs were already paused, is in
        // the replica: it was stopped before the harvest.
        let page = sec.xen.guest(replica).read_page(DMA_PFN).unwrap();
        assert_eq!(page[..8], n.to_le_bytes());
        // The device model reported its writes while log-dirty was on, and only then.
        assert_eq!(*tracking.lock().unwrap(), [true, false]);
    } else {
        assert_eq!(staged.emulator_state, None);
    }
    // The staged file says the same.
    let from_file = read_staged(&sec.spool.join(super::receiver::STAGED_FILE)).unwrap();
    assert_eq!(from_file, staged);
    let _ = std::fs::remove_dir_all(&sec.spool);
}

#[test]
fn hvm_with_device_state_replica_identical_after_held_checkpoints() {
    full_run(false, 2, true);
}

#[test]
fn pvh_replica_identical_after_held_checkpoints() {
    full_run(true, 1, false);
}

/// Each checkpoint ACKed with the primary held paused: the replica must equal the primary at
/// every ACK, and the staged context must follow the context changes.
#[test]
fn replica_equals_primary_at_every_ack() {
    let p = primary(false, 1);
    let sec = secondary("every", Limits::default());
    let mut writer = Writer::start(&p.xen, p.dom, 77);
    let stream = TcpStream::connect(sec.addr).unwrap();
    // A device model that must run again before the vCPUs, also when they were held paused
    // until the ACK.
    let resumes = Arc::new(AtomicU64::new(0));
    let device = Box::new(FakeDevice {
        saves: Arc::new(AtomicU64::new(0)),
        resumes: resumes.clone(),
        host: Some((p.xen.clone(), p.dom)),
        tracking: Arc::new(Mutex::new(Vec::new())),
    });
    let mut tx = Sender::new(&p.xen, p.dom, stream, opts(), Some(device)).unwrap();
    tx.initial_sync(&config(false), &mut |_| {}).unwrap();
    let live_snapshots = p.xen.unpaused_snapshots(p.dom).unwrap();
    let mut rec = Recorder::new(&p, 6);
    let out = tx
        .protect(&Triggers::new(Duration::from_millis(1)), &mut rec)
        .unwrap();
    assert!(out.held_paused);
    // The initial sync's and checkpoints 1-5's saves were followed by a resume; 6 is held.
    assert_eq!(resumes.load(Ordering::SeqCst), 6);
    drop(tx);
    writer.stop();
    let session = sec.handle.join().unwrap().unwrap();
    let replica = session.replica.unwrap();
    assert_eq!(&hash_of(&sec.xen, replica), rec.hashes.get(&6).unwrap());
    assert_eq!(
        session.staged.unwrap().hvm_context,
        *rec.contexts.get(&6).unwrap()
    );
    assert_eq!(rec.contexts.get(&6).unwrap(), &cpu_context(1, 6));
    // After the live rounds, nothing was copied from the running guest.
    assert_eq!(p.xen.unpaused_snapshots(p.dom), Some(live_snapshots));
    let _ = std::fs::remove_dir_all(&sec.spool);
}

/// With a minimum run time, a guest whose triggers are always pending (every ACK fires the
/// next one, as output that is always held does) still runs that long between checkpoints,
/// measured from outside the sender: the times at which the hook saw each ACK.
#[test]
fn minimum_run_time_spaces_back_to_back_checkpoints() {
    struct Always {
        t: Triggers,
        at: Vec<std::time::Instant>,
    }
    impl CheckpointHook for Always {
        fn acked(&mut self, info: &AckInfo) -> AfterAck {
            self.at.push(std::time::Instant::now());
            if info.seq >= 5 {
                AfterAck::Stop
            } else {
                self.t.fire(Reasons::IO);
                AfterAck::Continue
            }
        }
    }
    let run = |min_run: Duration| {
        let p = primary(true, 1);
        let sec = secondary("minrun", Limits::default());
        let stream = TcpStream::connect(sec.addr).unwrap();
        let o = SenderOptions { min_run, ..opts() };
        let mut tx = Sender::new(&p.xen, p.dom, stream, o, None).unwrap();
        tx.initial_sync(&config(true), &mut |_| {}).unwrap();
        let t = Triggers::new(Duration::from_secs(3600));
        t.fire(Reasons::IO);
        let mut hook = Always {
            t: t.clone(),
            at: Vec::new(),
        };
        let out = tx.protect(&t, &mut hook).unwrap();
        assert_eq!(out.last_seq, 5);
        drop(tx);
        assert_eq!(sec.handle.join().unwrap().unwrap().acked, Some(5));
        let _ = std::fs::remove_dir_all(&sec.spool);
        hook.at
    };
    let spaced = run(Duration::from_millis(60));
    assert_eq!(spaced.len(), 5);
    for w in spaced.windows(2) {
        let gap = w[1] - w[0];
        assert!(
            gap >= Duration::from_millis(60),
            "checkpoints {gap:?} apart"
        );
    }
    // Without it, the same triggers follow each other at once (the interval is an hour, so
    // only the pending trigger can have started each checkpoint).
    let back_to_back = run(Duration::ZERO);
    assert_eq!(back_to_back.len(), 5);
}

/// Triggers fired while a checkpoint is in progress become exactly one more checkpoint.
#[test]
fn triggers_during_a_checkpoint_coalesce_into_the_next() {
    struct Fire {
        t: Triggers,
        infos: Vec<AckInfo>,
    }
    impl CheckpointHook for Fire {
        fn acked(&mut self, info: &AckInfo) -> AfterAck {
            self.infos.push(*info);
            if info.seq == 1 {
                self.t.fire(Reasons::IO);
                self.t.fire(Reasons::IO);
                self.t.fire(Reasons::REQUEST);
                AfterAck::Continue
            } else {
                AfterAck::Stop
            }
        }
    }
    let p = primary(true, 1);
    let sec = secondary("coalesce", Limits::default());
    let stream = TcpStream::connect(sec.addr).unwrap();
    let mut tx = Sender::new(&p.xen, p.dom, stream, opts(), None).unwrap();
    tx.initial_sync(&config(true), &mut |_| {}).unwrap();
    let t = Triggers::new(Duration::from_secs(3600));
    t.fire(Reasons::REQUEST);
    let mut hook = Fire {
        t: t.clone(),
        infos: Vec::new(),
    };
    let out = tx.protect(&t, &mut hook).unwrap();
    assert_eq!(out.last_seq, 2);
    assert_eq!(hook.infos.len(), 2);
    assert_eq!(hook.infos[0].reasons, Reasons::REQUEST);
    assert_eq!(hook.infos[1].reasons, Reasons::IO.union(Reasons::REQUEST));
    assert_eq!(hook.infos[1].coalesced, 2);
    assert_eq!(out.stats.coalesced, 2);
    assert!(!out.held_paused);
    assert_eq!(p.xen.pause_count(p.dom), Some(0));
    drop(tx);
    assert_eq!(sec.handle.join().unwrap().unwrap().acked, Some(2));
    let _ = std::fs::remove_dir_all(&sec.spool);
}

/// A primary-side failure at any step of checkpoint 3 ends protection with an error, the guest
/// running and log-dirty off; the secondary stays at checkpoint 2.
#[test]
fn sender_faults_at_every_step_leave_guest_running_and_replica_at_last_ack() {
    for method in [
        Method::Pause,
        Method::LogDirtyClean,
        Method::ReadPages,
        Method::HvmContext,
        Method::HvmParam,
    ] {
        let p = primary(false, 1);
        let sec = secondary(method.name(), Limits::default());
        let mut writer = Writer::start(&p.xen, p.dom, 5);
        let stream = TcpStream::connect(sec.addr).unwrap();
        let mut tx = Sender::new(&p.xen, p.dom, stream, opts(), None).unwrap();
        tx.initial_sync(&config(false), &mut |_| {}).unwrap();
        let mut rec = Recorder::new(&p, 100);
        rec.at = 2;
        let faults = p.xen.faults();
        rec.extra = Some(Box::new(move || {
            faults.fail_next(method, Errno::EIO);
        }));
        let mut rec = DirtyAll {
            inner: rec,
            g: p.xen.guest(p.dom),
        };
        let err = tx
            .protect(&Triggers::new(Duration::from_millis(1)), &mut rec)
            .unwrap_err();
        assert!(matches!(err, SendError::Xen { .. }), "{method:?}: {err}");
        assert!(
            !err.peer_lost(),
            "{method:?}: a Xen failure is not a lost secondary: {err}"
        );
        assert_eq!(
            p.xen.pause_count(p.dom),
            Some(0),
            "{method:?}: guest left paused"
        );
        assert_eq!(p.xen.log_dirty_enabled(p.dom), Some(false), "{method:?}");
        drop(tx);
        writer.stop();
        let session = sec.handle.join().unwrap().unwrap();
        assert_eq!(session.acked, Some(2), "{method:?}");
        let replica = session.replica.unwrap();
        assert_eq!(
            &hash_of(&sec.xen, replica),
            rec.inner.hashes.get(&2).unwrap(),
            "{method:?}"
        );
        assert_eq!(
            session.staged.unwrap().hvm_context,
            *rec.inner.contexts.get(&2).unwrap()
        );
        let _ = std::fs::remove_dir_all(&sec.spool);
    }
}

/// A secondary-side failure while applying checkpoint 3 (reading the pages to overwrite,
/// writing the new ones): NACK, the replica rolled back to checkpoint 2, the sender fails with
/// the guest running.
#[test]
fn receiver_faults_roll_back_to_the_last_ack() {
    for (method, nth) in [
        (Method::ReadPages, 1),
        (Method::WritePages, 1),
        (Method::WritePages, 2),
    ] {
        let p = primary(false, 1);
        let sec = secondary(&format!("rx-{}-{nth}", method.name()), Limits::default());
        let stream = TcpStream::connect(sec.addr).unwrap();
        let mut tx = Sender::new(&p.xen, p.dom, stream, opts(), None).unwrap();
        tx.initial_sync(&config(false), &mut |_| {}).unwrap();
        let mut rec = Recorder::new(&p, 100);
        rec.at = 2;
        // Checkpoint 3 dirties more than one write batch, so nth=2 fails after a batch was written.
        let g = p.xen.guest(p.dom);
        let sfaults = sec.xen.faults();
        rec.extra = Some(Box::new(move || {
            sfaults.fail_on(method, nth, Errno::EIO);
        }));
        let mut tx_hook = DirtyAll { inner: rec, g };
        let err = tx
            .protect(&Triggers::new(Duration::from_millis(1)), &mut tx_hook)
            .unwrap_err();
        assert!(
            matches!(err, SendError::Nack { seq: 3, .. }),
            "{method:?}/{nth}: {err}"
        );
        assert!(err.peer_lost(), "{err}");
        assert_eq!(p.xen.pause_count(p.dom), Some(0));
        drop(tx);
        let fail = sec.handle.join().unwrap().unwrap_err();
        assert!(
            matches!(fail.error, ReceiveError::Apply { seq: 3, .. }),
            "{method:?}/{nth}: {}",
            fail.error
        );
        assert_eq!(fail.session.acked, Some(2));
        let replica = fail.session.replica.unwrap();
        assert_eq!(sec.xen.pause_count(replica), Some(1));
        assert_eq!(
            &hash_of(&sec.xen, replica),
            tx_hook.inner.hashes.get(&2).unwrap(),
            "{method:?}/{nth}: replica not at checkpoint 2"
        );
        let staged = read_staged(&sec.spool.join(super::receiver::STAGED_FILE)).unwrap();
        assert_eq!(staged.seq, 2);
        assert_eq!(staged.hvm_context, *tx_hook.inner.contexts.get(&2).unwrap());
        let _ = std::fs::remove_dir_all(&sec.spool);
    }
}

/// Wraps a [`Recorder`]; right before checkpoint 3 is taken (the guest runs), dirties every
/// page, so checkpoint 3 spans several read/write batches.
struct DirtyAll<'a> {
    inner: Recorder<'a>,
    g: hypervisor::mem::MemGuest,
}

impl CheckpointHook for DirtyAll<'_> {
    fn release(&mut self, seq: u64, reasons: Reasons) -> Release {
        if seq == 3 {
            // Before checkpoint 3 is taken the guest runs: dirty every page.
            for pfn in (0..PAGES).filter(|p| !HOLES.contains(p)) {
                self.g.fill_page(pfn, 0xEE).unwrap();
            }
        }
        self.inner.release(seq, reasons)
    }

    fn acked(&mut self, info: &AckInfo) -> AfterAck {
        self.inner.acked(info)
    }
}

/// The replica builder fails at a step of loading the image: no replica, the sender gets no
/// ACK of the image and fails with log-dirty off.
#[test]
fn replica_build_failure_fails_the_initial_sync() {
    for method in [
        Method::WritePages,
        Method::SetHvmContext,
        Method::SetHvmParam,
    ] {
        let p = primary(false, 1);
        let sec = secondary(&format!("build-{}", method.name()), Limits::default());
        sec.xen.faults().fail_next(method, Errno::EIO);
        let stream = TcpStream::connect(sec.addr).unwrap();
        let mut tx = Sender::new(&p.xen, p.dom, stream, opts(), None).unwrap();
        let err = tx.initial_sync(&config(false), &mut |_| {}).unwrap_err();
        assert!(
            matches!(err, SendError::Stream { seq: 0, .. }),
            "{method:?}: {err}"
        );
        assert!(err.peer_lost(), "{err}");
        assert_eq!(p.xen.log_dirty_enabled(p.dom), Some(false));
        assert_eq!(p.xen.pause_count(p.dom), Some(0));
        let fail = sec.handle.join().unwrap().unwrap_err();
        assert!(fail.session.replica.is_none());
        assert!(
            matches!(fail.error, ReceiveError::Replica(_)),
            "{}",
            fail.error
        );
        // Only dom0 is left on the secondary.
        assert_eq!(sec.xen.list_domains().unwrap().len(), 1, "{method:?}");
        let _ = std::fs::remove_dir_all(&sec.spool);
    }
}

/// The peer dies in the middle of a checkpoint: the sender fails (no ACK / broken stream) with
/// the guest running and log-dirty off.
#[test]
fn peer_death_mid_checkpoint_fails_the_sender_cleanly() {
    let p = primary(false, 1);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let peer = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut r = std::io::BufReader::new(s.try_clone().unwrap());
        image::read_image(&mut r, &Limits::default(), &mut |_, _| Ok(())).unwrap();
        Reply::Ack(checkpoint::Ack { seq: 0 })
            .write(&mut s)
            .unwrap();
        let mut some = [0u8; 100];
        std::io::Read::read_exact(&mut r, &mut some).unwrap();
        // Dies: both directions closed without an ACK.
    });
    let mut writer = Writer::start(&p.xen, p.dom, 11);
    let stream = TcpStream::connect(addr).unwrap();
    let mut tx = Sender::new(&p.xen, p.dom, stream, opts(), None).unwrap();
    tx.initial_sync(&config(false), &mut |_| {}).unwrap();
    let mut hook = CountHook {
        limit: Some(5),
        hold: true,
    };
    let err = tx
        .protect(&Triggers::new(Duration::from_millis(1)), &mut hook)
        .unwrap_err();
    assert!(
        matches!(err, SendError::Stream { seq: 1, .. } | SendError::Io { .. }),
        "{err}"
    );
    assert!(err.peer_lost(), "{err}");
    peer.join().unwrap();
    assert_eq!(p.xen.pause_count(p.dom), Some(0));
    assert_eq!(p.xen.log_dirty_enabled(p.dom), Some(false));
    assert!(writer.stop() > 0);
}

/// A hand-driven primary for receiver tests: sends a real image of `p`, then frames it makes.
struct RawPrimary {
    s: TcpStream,
}

impl RawPrimary {
    fn connect(sec: &Secondary, p: &Primary) -> RawPrimary {
        let mut s = TcpStream::connect(sec.addr).unwrap();
        let limits = Limits::default();
        let mut img = Vec::new();
        image::write_prologue(&mut img, &config(false), &limits).unwrap();
        let pfns: Vec<u64> = (0..PAGES).filter(|x| !HOLES.contains(x)).collect();
        let mut buf = vec![0u8; pfns.len() * PAGE_SIZE];
        p.xen.read_pages(p.dom, &pfns, &mut buf).unwrap();
        let pages: Vec<(u64, &[u8; PAGE_SIZE])> = pfns
            .iter()
            .zip(buf.chunks_exact(PAGE_SIZE))
            .map(|(p, c)| (*p, c.try_into().unwrap()))
            .collect();
        image::write_pages(&mut img, &pages, &limits).unwrap();
        image::write_epilogue(
            &mut img,
            &p.xen.hvm_context(p.dom).unwrap(),
            &[(1, 5)],
            None,
            &limits,
        )
        .unwrap();
        std::io::Write::write_all(&mut s, &img).unwrap();
        assert_eq!(
            Reply::read(&mut s).unwrap(),
            Reply::Ack(checkpoint::Ack { seq: 0 })
        );
        RawPrimary { s }
    }

    fn frame(seq: u64, byte: u8) -> Vec<u8> {
        let cp = Checkpoint {
            seq,
            reason: EpochReason::Interval,
            pages: (0..40u64)
                .map(|pfn| {
                    let mut pg = checkpoint::zero_page();
                    pg.fill(byte);
                    (pfn, pg)
                })
                .collect(),
            hvm_context: cpu_context(1, seq),
            hvm_params: vec![(1, seq)],
            emulator_state: None,
            extra: Vec::new(),
        };
        checkpoint::encode_checkpoint(&cp, &Limits::default()).unwrap()
    }

    fn send(&mut self, bytes: &[u8]) {
        std::io::Write::write_all(&mut self.s, bytes).unwrap();
    }
}

fn bad_frame_case(tag: &str, limits: Limits, bad: impl FnOnce(&mut RawPrimary)) -> ReceiveFailure {
    let p = primary(false, 1);
    p.xen.pause(p.dom).unwrap();
    let sec = secondary(tag, limits);
    let mut raw = RawPrimary::connect(&sec, &p);
    raw.send(&RawPrimary::frame(1, 0xA1));
    assert_eq!(
        Reply::read(&mut raw.s).unwrap(),
        Reply::Ack(checkpoint::Ack { seq: 1 })
    );
    bad(&mut raw);
    let fail = sec.handle.join().unwrap().unwrap_err();
    assert_eq!(fail.session.acked, Some(1));
    let replica = fail.session.replica.unwrap();
    // The replica holds checkpoint 1: pages 0..40 = 0xA1, the rest as in the image.
    let g = sec.xen.guest(replica);
    for pfn in (0..PAGES).filter(|x| !HOLES.contains(x)) {
        let want = if pfn < 40 { 0xA1 } else { (pfn % 251) as u8 };
        assert_eq!(g.read_page(pfn).unwrap()[7], want, "{tag}: pfn {pfn}");
    }
    assert_eq!(sec.xen.pause_count(replica), Some(1));
    let staged = read_staged(&sec.spool.join(super::receiver::STAGED_FILE)).unwrap();
    assert_eq!(
        (staged.seq, staged.hvm_context.clone()),
        (1, cpu_context(1, 1))
    );
    let _ = std::fs::remove_dir_all(&sec.spool);
    fail
}

#[test]
fn truncated_checkpoint_is_discarded_whole() {
    let fail = bad_frame_case("trunc", Limits::default(), |raw| {
        let f = RawPrimary::frame(2, 0xB2);
        raw.send(&f[..f.len() - 30]);
        raw.s.shutdown(std::net::Shutdown::Write).unwrap();
    });
    assert!(
        matches!(fail.error, ReceiveError::Checkpoint { seq: 2, .. }),
        "{}",
        fail.error
    );
}

#[test]
fn corrupt_checkpoint_is_discarded_whole_and_nacked() {
    let fail = bad_frame_case("corrupt", Limits::default(), |raw| {
        let mut f = RawPrimary::frame(2, 0xB2);
        let mid = f.len() / 2;
        f[mid] ^= 0x40;
        raw.send(&f);
        match Reply::read(&mut raw.s).unwrap() {
            Reply::Nack(n) => assert_eq!(n.seq, 2),
            other => panic!("{other:?}"),
        }
    });
    assert!(
        matches!(fail.error, ReceiveError::Checkpoint { seq: 2, .. }),
        "{}",
        fail.error
    );
}

#[test]
fn reordered_checkpoint_is_discarded_whole() {
    let fail = bad_frame_case("reorder", Limits::default(), |raw| {
        // The receiver refuses frame 3 and may close before the rest of it or frame 2 arrives
        // (EPIPE/ECONNRESET): only the receiver's verdict matters.
        let _ = std::io::Write::write_all(&mut raw.s, &RawPrimary::frame(3, 0xB3));
        let _ = std::io::Write::write_all(&mut raw.s, &RawPrimary::frame(2, 0xB2));
    });
    assert!(
        matches!(
            fail.error,
            ReceiveError::Checkpoint {
                seq: 2,
                source: kemari_stream::checkpoint::CheckpointError::OutOfOrder { .. }
            }
        ),
        "{}",
        fail.error
    );
}

#[test]
fn oversized_checkpoint_is_discarded_whole() {
    let limits = Limits {
        max_checkpoint_bytes: 60 * PAGE_SIZE as u64,
        ..Limits::default()
    };
    let fail = bad_frame_case("oversize", limits, |raw| {
        let cp = Checkpoint {
            seq: 2,
            reason: EpochReason::Interval,
            pages: (0..80u64)
                .map(|pfn| (pfn, checkpoint::zero_page()))
                .collect(),
            hvm_context: cpu_context(1, 2),
            hvm_params: vec![],
            emulator_state: None,
            extra: Vec::new(),
        };
        let f = checkpoint::encode_checkpoint(&cp, &Limits::default()).unwrap();
        // The receiver may stop reading and close before all of it is sent.
        let _ = std::io::Write::write_all(&mut raw.s, &f);
    });
    assert!(
        matches!(fail.error, ReceiveError::Checkpoint { seq: 2, .. }),
        "{}",
        fail.error
    );
}

#[test]
fn checkpoint_with_pfn_beyond_the_replica_is_refused_before_writing() {
    let fail = bad_frame_case("range", Limits::default(), |raw| {
        let cp = Checkpoint {
            seq: 2,
            reason: EpochReason::Interval,
            pages: vec![
                (3, checkpoint::zero_page()),
                (PAGES + 10, checkpoint::zero_page()),
            ],
            hvm_context: cpu_context(1, 2),
            hvm_params: vec![],
            emulator_state: None,
            extra: Vec::new(),
        };
        raw.send(&checkpoint::encode_checkpoint(&cp, &Limits::default()).unwrap());
    });
    assert!(
        matches!(fail.error, ReceiveError::Apply { seq: 2, .. }),
        "{}",
        fail.error
    );
}

#[test]
fn pv_guests_are_refused() {
    let xen = MemXen::new();
    let mut cfg = DomainConfig::hvm(8);
    cfg.guest_type = hypervisor::GuestType::Pv;
    let dom = xen.create_domain(cfg).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let mut tx = Sender::new(&xen, dom, stream, opts(), None).unwrap();
    let err = tx.initial_sync(b"{}", &mut |_| {}).unwrap_err();
    assert!(matches!(err, SendError::NotProtectable { .. }), "{err}");
    assert!(!err.peer_lost(), "{err}");
    assert_eq!(xen.log_dirty_enabled(dom), Some(false));
}

/// A secondary that reads everything but never ACKs a checkpoint: the sender gives up after
/// its ACK timeout with the guest running and log-dirty off.
#[test]
fn missing_ack_times_out_with_the_guest_running() {
    let p = primary(true, 1);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let peer = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut r = std::io::BufReader::new(s.try_clone().unwrap());
        image::read_image(&mut r, &Limits::default(), &mut |_, _| Ok(())).unwrap();
        Reply::Ack(checkpoint::Ack { seq: 0 })
            .write(&mut s)
            .unwrap();
        // Read checkpoint 1 whole, then stay silent until the test is done.
        checkpoint::CheckpointReader::new(Limits::default())
            .read(&mut r, 1)
            .unwrap();
        let _ = done_rx.recv();
    });
    let stream = TcpStream::connect(addr).unwrap();
    let o = SenderOptions {
        ack_timeout: Duration::from_millis(300),
        ..opts()
    };
    let mut tx = Sender::new(&p.xen, p.dom, stream, o, None).unwrap();
    tx.initial_sync(&config(true), &mut |_| {}).unwrap();
    let mut hook = CountHook {
        limit: Some(3),
        hold: false,
    };
    let err = tx
        .protect(&Triggers::new(Duration::from_millis(1)), &mut hook)
        .unwrap_err();
    assert!(matches!(err, SendError::AckTimeout { seq: 1, .. }), "{err}");
    assert!(err.peer_lost(), "{err}");
    assert_eq!(p.xen.pause_count(p.dom), Some(0));
    assert_eq!(p.xen.log_dirty_enabled(p.dom), Some(false));
    done_tx.send(()).unwrap();
    peer.join().unwrap();
}

/// Device state that fails on its `n`th save.
struct FailingDevice {
    n: u64,
    saves: u64,
    resumes: Arc<AtomicU64>,
}

impl DeviceState for FailingDevice {
    fn save(&mut self) -> Result<Vec<u8>, DeviceError> {
        self.saves += 1;
        if self.saves == self.n {
            return Err("QMP socket closed".into());
        }
        Ok(vec![self.saves as u8])
    }

    fn resumed(&mut self) -> Result<(), DeviceError> {
        self.resumes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// The device model failing during checkpoint 2 ends protection with the guest running; the
/// secondary stays at checkpoint 1 with checkpoint 1's device state.
#[test]
fn device_state_failure_ends_protection_with_the_guest_running() {
    let p = primary(false, 1);
    let sec = secondary("device", Limits::default());
    let stream = TcpStream::connect(sec.addr).unwrap();
    let resumes = Arc::new(AtomicU64::new(0));
    let device: Box<dyn DeviceState> = Box::new(FailingDevice {
        n: 3,
        saves: 0,
        resumes: resumes.clone(),
    });
    let mut tx = Sender::new(&p.xen, p.dom, stream, opts(), Some(device)).unwrap();
    tx.initial_sync(&config(false), &mut |_| {}).unwrap();
    let mut hook = CountHook {
        limit: Some(5),
        hold: false,
    };
    let err = tx
        .protect(&Triggers::new(Duration::from_millis(1)), &mut hook)
        .unwrap_err();
    assert!(matches!(err, SendError::Device { .. }), "{err}");
    assert!(!err.peer_lost(), "{err}");
    assert!(err.to_string().contains("QMP socket closed"), "{err}");
    // Resumed after the image, after checkpoint 1, and after the failed save of checkpoint 2.
    assert_eq!(resumes.load(Ordering::SeqCst), 3);
    assert_eq!(p.xen.pause_count(p.dom), Some(0));
    assert_eq!(p.xen.log_dirty_enabled(p.dom), Some(false));
    drop(tx);
    let session = sec.handle.join().unwrap().unwrap();
    assert_eq!(session.acked, Some(1));
    assert_eq!(session.staged.unwrap().emulator_state, Some(vec![2]));
    let _ = std::fs::remove_dir_all(&sec.spool);
}

/// Pages Xen writes through its own mappings (vcpu_info: event delivery, also while the guest
/// is paused) are never in an ordinary dirty harvest; every paused harvest of the sender is a
/// final one, so they reach the replica.
#[test]
fn pages_written_by_xen_reach_the_replica() {
    struct XenWrites<'a> {
        p: &'a Primary,
    }
    impl CheckpointHook for XenWrites<'_> {
        fn release(&mut self, seq: u64, _reasons: Reasons) -> Release {
            // Event delivery into the guest's vcpu_info page before each checkpoint.
            self.p
                .xen
                .guest(self.p.dom)
                .xen_write(42, 64, &seq.to_le_bytes())
                .unwrap();
            Release::AfterStaging
        }
        fn acked(&mut self, info: &AckInfo) -> AfterAck {
            if info.seq == 4 {
                AfterAck::StopPaused
            } else {
                AfterAck::Continue
            }
        }
    }
    let p = primary(false, 1);
    let sec = secondary("xenmapped", Limits::default());
    let stream = TcpStream::connect(sec.addr).unwrap();
    let mut tx = Sender::new(&p.xen, p.dom, stream, opts(), None).unwrap();
    tx.initial_sync(&config(false), &mut |_| {}).unwrap();
    let out = tx
        .protect(
            &Triggers::new(Duration::from_millis(1)),
            &mut XenWrites { p: &p },
        )
        .unwrap();
    assert_eq!(out.last_seq, 4);
    drop(tx);
    let session = sec.handle.join().unwrap().unwrap();
    let replica = session.replica.unwrap();
    let page = sec.xen.guest(replica).read_page(42).unwrap();
    assert_eq!(page[64..72], 4u64.to_le_bytes());
    assert_eq!(hash_of(&p.xen, p.dom), hash_of(&sec.xen, replica));
    let _ = std::fs::remove_dir_all(&sec.spool);
}

// ---- output commit and the disk write log ----

const DISK_BYTES: u64 = 256 * 1024;
const XVDA: u32 = 51712;

/// A disk image with a recognisable pattern, and a copy of it for the secondary.
fn disk_pair(tag: &str) -> (PathBuf, PathBuf) {
    let dir = spool_dir(&format!("{tag}-disks"));
    std::fs::create_dir_all(&dir).unwrap();
    let (primary, copy) = (dir.join("primary.img"), dir.join("copy.img"));
    let data: Vec<u8> = (0..DISK_BYTES).map(|i| (i % 253) as u8).collect();
    std::fs::write(&primary, &data).unwrap();
    std::fs::write(&copy, &data).unwrap();
    (primary, copy)
}

/// What the fake backend saw for one released write.
#[derive(Debug, Clone, Copy)]
struct Released {
    epoch: u64,
    acked: u64,
}

/// A backend stand-in: takes writes from an imaginary ring (holding and logging them through
/// the gate, kicking the tap) and executes each on the primary's disk only when the gate
/// releases its epoch, as blkback does.
fn fake_backend(
    gate: Arc<xenbus_backend::commit::OutputGate>,
    disk: PathBuf,
    stop: Arc<AtomicBool>,
) -> JoinHandle<(Vec<Released>, usize)> {
    std::thread::spawn(move || {
        use std::os::unix::fs::FileExt;
        use xenbus_backend::commit::LoggedOp;
        let file = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        let mut held: std::collections::VecDeque<(u64, u64, Arc<[u8]>)> = Default::default();
        let mut released = Vec::new();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let release = |held: &mut std::collections::VecDeque<(u64, u64, Arc<[u8]>)>,
                       released: &mut Vec<Released>| {
            while let Some((epoch, sector, data)) = held.front().cloned() {
                if !gate.is_released(epoch) {
                    break;
                }
                released.push(Released {
                    epoch,
                    acked: gate.released(),
                });
                file.write_all_at(&data, sector * 512).unwrap();
                held.pop_front();
            }
        };
        while !stop.load(Ordering::SeqCst) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let sectors = 1 + (x % 8);
            let sector = (x >> 8) % (DISK_BYTES / 512 - sectors);
            let data: Arc<[u8]> = Arc::from(vec![(x >> 40) as u8; sectors as usize * 512]);
            if let Some(epoch) = gate.hold_logged(XVDA, sector, LoggedOp::Write(data.clone())) {
                held.push_back((epoch, sector, data));
                gate.kick();
            }
            release(&mut held, &mut released);
            std::thread::sleep(Duration::from_micros(300));
        }
        release(&mut held, &mut released);
        (released, held.len())
    })
}

/// Writes travel inside the checkpoint whose ACK releases them: at the end (primary held
/// paused at the last ACK) the secondary's copy of the disk equals the primary's disk, every
/// write was executed only after an ACK of at least its epoch, and the kicks were the
/// checkpoints' triggers.
#[test]
fn disk_writes_reach_the_secondary_with_their_checkpoint_and_are_released_after_its_ack() {
    let p = primary(true, 1);
    let (pdisk, sdisk) = disk_pair("pvh-commit");
    let sec = secondary_with(
        "pvh-commit",
        Limits::default(),
        vec![ReplicaDisk {
            devid: XVDA,
            path: sdisk.clone(),
        }],
    );
    // a long maximum epoch: the checkpoints are the tap's
    let triggers = Triggers::new(Duration::from_secs(3600));
    let gate = xenbus_backend::commit::OutputGate::new(1, Box::new(TriggerTap(triggers.clone())));
    let stop = Arc::new(AtomicBool::new(false));
    let backend = fake_backend(gate.clone(), pdisk.clone(), stop.clone());
    let stream = TcpStream::connect(sec.addr).unwrap();
    let mut tx = Sender::new(&p.xen, p.dom, stream, opts(), None).unwrap();
    tx.initial_sync(&config(true), &mut |_| {}).unwrap();
    let mut hook = CommitHook::new(
        CountHook {
            limit: Some(25),
            hold: true,
        },
        gate.clone(),
    );
    let out = tx.protect(&triggers, &mut hook).unwrap();
    assert_eq!(out.last_seq, 25);
    assert!(out.held_paused);
    // the backend has seen ACK 25; what it took after checkpoint 25's pause stays held
    stop.store(true, Ordering::SeqCst);
    let (released, still_held) = backend.join().unwrap();
    drop(tx);
    let session = sec.handle.join().unwrap().unwrap();
    assert_eq!(session.acked, Some(25));
    assert!(released.len() > 25, "{} writes released", released.len());
    for r in &released {
        assert!(
            r.epoch >= 1 && r.epoch <= r.acked && r.acked <= 25,
            "released before its ACK: {r:?}"
        );
    }
    assert_eq!(
        session.disk_entries,
        released.len() as u64,
        "{still_held} still held"
    );
    assert_eq!(session.disk_entries, hook.shipped_entries);
    assert!(
        std::fs::read(&pdisk).unwrap() == std::fs::read(&sdisk).unwrap(),
        "the secondary's disk differs from the primary's at the last ACK"
    );
    // the last applied log is kept, checksummed; replaying it (idempotent) changes nothing
    let (seq, entries) =
        super::receiver::read_disk_log(&sec.spool.join(super::receiver::DISK_LOG_FILE)).unwrap();
    assert_eq!(seq, 25);
    let copy = [ReplicaDisk {
        devid: XVDA,
        path: sdisk.clone(),
    }];
    let replay = super::disk_apply::DiskApply::prepare(&copy, &entries).unwrap();
    replay.write(&entries).unwrap();
    assert!(std::fs::read(&pdisk).unwrap() == std::fs::read(&sdisk).unwrap());
    gate.end();
    let _ = std::fs::remove_dir_all(&sec.spool);
}

fn frame_with_log(seq: u64, byte: u8, extra: Vec<(u32, Vec<u8>)>) -> Vec<u8> {
    let cp = Checkpoint {
        seq,
        reason: EpochReason::Io {
            device: String::new(),
        },
        pages: (0..40u64)
            .map(|pfn| {
                let mut pg = checkpoint::zero_page();
                pg.fill(byte);
                (pfn, pg)
            })
            .collect(),
        hvm_context: cpu_context(1, seq),
        hvm_params: vec![(1, seq)],
        emulator_state: None,
        extra,
    };
    checkpoint::encode_checkpoint(&cp, &Limits::default()).unwrap()
}

fn log_of(entries: &[(u64, u32, u64, Vec<u8>)]) -> Vec<(u32, Vec<u8>)> {
    let e: Vec<_> = entries
        .iter()
        .map(
            |(seq, devid, sector, data)| kemari_stream::disklog::DiskLogEntry {
                seq: *seq,
                devid: *devid,
                sector: *sector,
                op: kemari_stream::disklog::DiskOp::Write(data.clone()),
            },
        )
        .collect();
    kemari_stream::disklog::encode(&e).unwrap()
}

/// A checkpoint whose disk log is corrupt, out of sequence, beyond the disk, for a disk the
/// receiver lacks, or whose pages fail to apply after the disk was written, is refused whole:
/// NACK, the replica's memory AND disk stay at the previous checkpoint.
#[test]
fn bad_disk_logs_and_late_failures_leave_memory_and_disk_at_the_last_ack() {
    type Bad = Box<dyn Fn(&Secondary) -> Vec<(u32, Vec<u8>)>>;
    let good = |seq| log_of(&[(seq, XVDA, 8, vec![0xC2; 1024])]);
    let cases: Vec<(&str, Bad, NackReason)> = vec![
        (
            "gap",
            Box::new(|_| log_of(&[(3, XVDA, 8, vec![0xC2; 512])])),
            NackReason::Corrupt,
        ),
        (
            "beyond",
            Box::new(|_| log_of(&[(2, XVDA, DISK_BYTES / 512 - 1, vec![0xC2; 1024])])),
            NackReason::ApplyFailed,
        ),
        (
            "nodisk",
            Box::new(|_| log_of(&[(2, 51728, 0, vec![0xC2; 512])])),
            NackReason::ApplyFailed,
        ),
        (
            "corrupt",
            Box::new(move |_| {
                let mut l = good(2);
                l[0].1[0] = 9; // version
                l
            }),
            NackReason::Corrupt,
        ),
        (
            "kind",
            Box::new(move |_| {
                let mut l = good(2);
                l.push((77, vec![1, 2, 3]));
                l
            }),
            NackReason::Corrupt,
        ),
        (
            "pages",
            Box::new(move |sec| {
                sec.xen.faults().fail_on(Method::WritePages, 1, Errno::EIO);
                good(2)
            }),
            NackReason::ApplyFailed,
        ),
    ];
    for (tag, bad, reason) in cases {
        let p = primary(false, 1);
        p.xen.pause(p.dom).unwrap();
        let (_, sdisk) = disk_pair(&format!("badlog-{tag}"));
        let sec = secondary_with(
            &format!("badlog-{tag}"),
            Limits::default(),
            vec![ReplicaDisk {
                devid: XVDA,
                path: sdisk.clone(),
            }],
        );
        let mut raw = RawPrimary::connect(&sec, &p);
        raw.send(&frame_with_log(
            1,
            0xA1,
            log_of(&[(1, XVDA, 0, vec![0xA1; 512])]),
        ));
        assert_eq!(
            Reply::read(&mut raw.s).unwrap(),
            Reply::Ack(checkpoint::Ack { seq: 1 })
        );
        let at_1 = std::fs::read(&sdisk).unwrap();
        assert!(at_1[..512].iter().all(|b| *b == 0xA1));
        let extra = bad(&sec);
        raw.send(&frame_with_log(2, 0xB2, extra));
        assert_eq!(
            Reply::read(&mut raw.s).unwrap(),
            Reply::Nack(checkpoint::Nack { seq: 2, reason }),
            "{tag}"
        );
        let fail = sec.handle.join().unwrap().unwrap_err();
        assert_eq!(fail.session.acked, Some(1), "{tag}");
        assert!(
            std::fs::read(&sdisk).unwrap() == at_1,
            "{tag}: disk changed"
        );
        let g = sec.xen.guest(fail.session.replica.unwrap());
        for pfn in 0..40 {
            assert_eq!(g.read_page(pfn).unwrap()[7], 0xA1, "{tag}: pfn {pfn}");
        }
        assert!(!sec.spool.join("disklog.kemari.tmp").exists(), "{tag}");
        let _ = std::fs::remove_dir_all(&sec.spool);
    }
}

/// A page at a pfn the replica does not have (a hole when the image was taken, e.g. a
/// grant-table frame the guest mapped later) is left out and counted; the rest is applied.
#[test]
fn pages_at_pfns_the_replica_lacks_are_left_out() {
    let p = primary(false, 1);
    p.xen.pause(p.dom).unwrap();
    let sec = secondary("holes", Limits::default());
    let mut raw = RawPrimary::connect(&sec, &p);
    let mut cp = Checkpoint {
        seq: 1,
        reason: EpochReason::Interval,
        pages: Vec::new(),
        hvm_context: cpu_context(1, 1),
        hvm_params: vec![(1, 1)],
        emulator_state: None,
        extra: Vec::new(),
    };
    for pfn in [3u64, HOLES[0], 7, HOLES[2]] {
        let mut pg = checkpoint::zero_page();
        pg.fill(0xD4);
        cp.pages.push((pfn, pg));
    }
    raw.send(&checkpoint::encode_checkpoint(&cp, &Limits::default()).unwrap());
    assert_eq!(
        Reply::read(&mut raw.s).unwrap(),
        Reply::Ack(checkpoint::Ack { seq: 1 })
    );
    raw.s.shutdown(std::net::Shutdown::Write).unwrap();
    let session = sec.handle.join().unwrap().unwrap();
    assert_eq!((session.pages, session.skipped_pages), (2, 2));
    let g = sec.xen.guest(session.replica.unwrap());
    assert_eq!(g.read_page(3).unwrap()[9], 0xD4);
    assert_eq!(g.read_page(7).unwrap()[9], 0xD4);
    assert!(g.read_page(HOLES[0]).is_err());
    let _ = std::fs::remove_dir_all(&sec.spool);
}

/// A hook that cannot provide its checkpoint's extra records (e.g. a disk log over the limits)
/// ends protection with the guest running and log-dirty off; the replica stays at the last ACK.
#[test]
fn failing_extra_records_end_protection_with_the_guest_running() {
    struct FailAt(u64);
    impl CheckpointHook for FailAt {
        fn acked(&mut self, _info: &AckInfo) -> AfterAck {
            AfterAck::Continue
        }
        fn extra(&mut self, seq: u64) -> Result<Vec<(u32, Vec<u8>)>, DeviceError> {
            if seq == self.0 {
                Err("disk log too large".into())
            } else {
                Ok(Vec::new())
            }
        }
    }
    let p = primary(true, 1);
    let sec = secondary("pvh-extra", Limits::default());
    let stream = TcpStream::connect(sec.addr).unwrap();
    let mut tx = Sender::new(&p.xen, p.dom, stream, opts(), None).unwrap();
    tx.initial_sync(&config(true), &mut |_| {}).unwrap();
    let err = tx
        .protect(&Triggers::new(Duration::from_millis(1)), &mut FailAt(3))
        .unwrap_err();
    assert!(matches!(err, SendError::Extra { seq: 3, .. }), "{err}");
    assert!(!err.peer_lost(), "{err}");
    assert_eq!(p.xen.pause_count(p.dom), Some(0));
    assert_eq!(p.xen.log_dirty_enabled(p.dom), Some(false));
    drop(tx);
    let session = sec.handle.join().unwrap().unwrap();
    assert_eq!(session.acked, Some(2));
    let _ = std::fs::remove_dir_all(&sec.spool);
}
