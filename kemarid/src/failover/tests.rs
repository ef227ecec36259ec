//! Cooperative (suspend) checkpoints end to end over loopback TCP, both hosts in memory: the
//! guest answers each `control/shutdown` = `suspend` by shutting down for suspend, the sender
//! copies it while suspended and resumes it fast; the replica equals the primary at every ACK,
//! and the failover image made from the replica holds exactly the last ACKed state.

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hypervisor::hvm_save::{self, HvmContextBuilder};
use hypervisor::mem::{DomainConfig, GuestError, MemXen};
use hypervisor::{DomId, DomainControl, GuestMemory, Hypervisor, ShutdownReason, Tx, PAGE_SIZE};
use kemari_stream::Limits;

use super::resume::write_image;
use crate::sync::image::read_image;
use crate::sync::receiver::{
    read_staged, ReceiveFailure, Receiver, ReceiverOptions, Session, STAGED_FILE,
};
use crate::sync::replica::MemReplicaBuilder;
use crate::sync::sender::{
    AckInfo, AfterAck, CheckpointHook, Quiesce, Release, Sender, SenderOptions,
};
use crate::sync::trigger::{Reasons, Triggers};

const PAGES: u64 = 300;

fn context(marker: u8) -> Vec<u8> {
    let mut b = HvmContextBuilder::new();
    let mut header = vec![0u8; 24];
    header[..4].copy_from_slice(&hvm_save::HVM_FILE_MAGIC.to_le_bytes());
    b.push(hvm_save::HVM_SAVE_HEADER, 0, &header).unwrap();
    b.push(hvm_save::HVM_SAVE_CPU, 0, &vec![marker; 1032])
        .unwrap();
    b.finish()
}

fn pages_of(xen: &MemXen, d: DomId) -> Vec<u8> {
    let pfns: Vec<u64> = (0..PAGES).collect();
    let mut buf = vec![0u8; PAGES as usize * PAGE_SIZE];
    xen.read_pages(d, &pfns, &mut buf).unwrap();
    buf
}

/// The guest: writes pages while it runs, and suspends when asked through xenstore (the
/// suspend count is how many times it did).
fn guest(xen: &MemXen, d: DomId, stop: Arc<AtomicBool>, suspends: Arc<AtomicU64>) {
    let g = xen.guest(d);
    let xs = xen.open_xenstore().unwrap();
    let node = format!("/local/domain/{d}/control/shutdown");
    let mut x = 0x2545_f491_4f6c_dd1du64;
    while !stop.load(Ordering::Relaxed) {
        if xs.read(Tx::NONE, &node).ok().as_deref() == Some(&b"suspend"[..]) {
            xs.write(Tx::NONE, &node, b"").unwrap();
            // As Linux: the CPU context at the suspend point is the one to resume from.
            let n = suspends.fetch_add(1, Ordering::SeqCst) + 1;
            xen.set_hvm_context(d, &context(n as u8)).unwrap();
            g.shutdown(ShutdownReason::Suspend).unwrap();
            continue;
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        match g.write(x % PAGES, ((x >> 16) % 4000) as usize, &x.to_le_bytes()) {
            Ok(()) | Err(GuestError::NotRunning { .. }) => std::thread::yield_now(),
            Err(e) => panic!("guest write: {e}"),
        }
    }
}

struct Check<'a> {
    primary: &'a MemXen,
    dom: DomId,
    secondary: &'a MemXen,
    stop_at: u64,
    compared: u64,
}

impl CheckpointHook for Check<'_> {
    fn release(&mut self, _seq: u64, _reasons: Reasons) -> Release {
        Release::AfterAck
    }

    fn acked(&mut self, info: &AckInfo) -> AfterAck {
        // Still suspended: the ACKed state is the primary's current one.
        let i = self.primary.domain_info(self.dom).unwrap();
        assert_eq!(
            i.shutdown,
            Some(ShutdownReason::Suspend),
            "seq {}",
            info.seq
        );
        let replica = self
            .secondary
            .list_domains()
            .unwrap()
            .into_iter()
            .map(|d| d.domid)
            .find(|d| *d != 0)
            .unwrap();
        assert!(
            pages_of(self.primary, self.dom) == pages_of(self.secondary, replica),
            "replica differs from the primary at checkpoint {}",
            info.seq
        );
        self.compared += 1;
        if info.seq >= self.stop_at {
            AfterAck::Stop
        } else {
            AfterAck::Continue
        }
    }
}

/// Both ends of an end-to-end test: a primary with a PVH guest of [`PAGES`] pages that writes
/// and suspends when asked ([`guest`], in a thread), and a receiver on the secondary (in a
/// thread) spooling into a fresh folder named after `tag`.
struct Pair {
    primary: MemXen,
    dom: DomId,
    secondary: MemXen,
    addr: std::net::SocketAddr,
    spool: std::path::PathBuf,
    rx: std::thread::JoinHandle<Result<Session, ReceiveFailure>>,
    stop: Arc<AtomicBool>,
    suspends: Arc<AtomicU64>,
    guest: std::thread::JoinHandle<()>,
}

fn pair(tag: &str) -> Pair {
    let primary = MemXen::new();
    let mut cfg = DomainConfig::pvh(PAGES);
    cfg.hvm_context = Some(context(0));
    let dom = primary.create_domain(cfg).unwrap();
    let secondary = MemXen::new();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let spool = std::env::temp_dir().join(format!("kemari-failover-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&spool);
    let (sx, sp) = (secondary.clone(), spool.clone());
    let rx = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let builder = MemReplicaBuilder::new(sx.clone());
        // a local, dropped before `builder` (a temporary at the block's end would outlive it)
        let receiver = Receiver::new(
            &sx,
            &builder,
            ReceiverOptions {
                spool_dir: sp,
                name: None,
                limits: Limits::default(),
                idle_timeout: Some(Duration::from_secs(60)),
            },
        );
        receiver.serve(stream)
    });
    let stop = Arc::new(AtomicBool::new(false));
    let suspends = Arc::new(AtomicU64::new(0));
    let guest = {
        let (x, s, n) = (primary.clone(), stop.clone(), suspends.clone());
        std::thread::spawn(move || guest(&x, dom, s, n))
    };
    Pair {
        primary,
        dom,
        secondary,
        addr,
        spool,
        rx,
        stop,
        suspends,
        guest,
    }
}

/// The libxl configuration the tests' senders put in the image's xl header.
const CONFIG_JSON: &[u8] = br#"{"c_info":{"type":"pvh","name":"g"}}"#;

/// A sender of `dom` on `primary` over `stream` whose checkpoints ask the guest to suspend
/// (through xenstore) and wait `timeout` for it.
fn suspending_sender<'a>(
    primary: &'a MemXen,
    dom: DomId,
    stream: TcpStream,
    opts: SenderOptions,
    timeout: Duration,
) -> Sender<'a> {
    let mut tx = Sender::new(primary, dom, stream, opts, None).unwrap();
    tx.set_quiesce(Quiesce::Suspend {
        xenstore: primary.open_xenstore().unwrap(),
        timeout,
    });
    tx
}

/// A fresh primary with a running 16-page PVH guest that runs no code of its own, and a
/// connection to a listener nobody accepts (keep the listener: the connection waits in its
/// backlog).
fn idle_guest() -> (MemXen, DomId, TcpListener, TcpStream) {
    let primary = MemXen::new();
    let dom = primary.create_domain(DomainConfig::pvh(16)).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    (primary, dom, listener, stream)
}

#[test]
fn suspend_checkpoints_and_failover_image() {
    let Pair {
        primary,
        dom,
        secondary,
        addr,
        spool,
        rx,
        stop,
        suspends,
        guest: g,
    } = pair("test");
    let opts = SenderOptions {
        ack_timeout: Duration::from_secs(20),
        initial_ack_timeout: Duration::from_secs(20),
        ..SenderOptions::default()
    };
    let stream = TcpStream::connect(addr).unwrap();
    let mut tx = suspending_sender(&primary, dom, stream, opts, Duration::from_secs(10));
    tx.initial_sync(CONFIG_JSON, &mut |_| {}).unwrap();
    let mut hook = Check {
        primary: &primary,
        dom,
        secondary: &secondary,
        stop_at: 6,
        compared: 0,
    };
    let out = tx
        .protect(&Triggers::new(Duration::from_millis(2)), &mut hook)
        .unwrap();
    drop(tx);
    assert_eq!((out.last_seq, hook.compared), (6, 6));
    // The final round of the initial sync and each checkpoint: one suspend, one fast resume.
    assert_eq!(suspends.load(Ordering::SeqCst), 7);
    assert_eq!(primary.resume_counts(dom), Some((7, 7)));
    assert!(primary.domain_info(dom).unwrap().running);
    stop.store(true, Ordering::Relaxed);
    g.join().unwrap();
    drop(TcpStream::connect(addr).ok());
    let session = rx.join().unwrap().unwrap();
    assert_eq!(session.acked, Some(6));

    // The staged state is the context of the 7th suspend (checkpoint 6), and the failover
    // image made from the replica holds the replica's memory and that context.
    let replica = session.replica.unwrap();
    let staged = read_staged(&spool.join(STAGED_FILE)).unwrap();
    assert_eq!((staged.seq, &staged.hvm_context), (6, &context(7)));
    let mut img = Vec::new();
    write_image(
        &secondary,
        replica,
        &staged,
        b"{\"c_info\":{}}\0",
        None,
        &mut img,
    )
    .unwrap();
    let want = pages_of(&secondary, replica);
    let mut got = vec![0u8; want.len()];
    let summary = read_image(&mut &img[..], &Limits::default(), &mut |pfn, page| {
        let at = pfn as usize * PAGE_SIZE;
        got[at..at + PAGE_SIZE].copy_from_slice(page);
        Ok(())
    })
    .unwrap();
    assert_eq!(summary.pages, PAGES);
    assert!(got == want);
    assert_eq!(summary.hvm_context, context(7));
    std::fs::remove_dir_all(&spool).unwrap();
}

#[test]
fn a_guest_that_does_not_suspend_ends_protection_running() {
    let (primary, dom, _listener, stream) = idle_guest();
    let opts = SenderOptions::default();
    let mut tx = suspending_sender(&primary, dom, stream, opts, Duration::from_millis(50));
    let err = tx.initial_sync(CONFIG_JSON, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("did not suspend"), "{err}");
    drop(tx);
    let i = primary.domain_info(dom).unwrap();
    assert!(i.running && i.shutdown.is_none());
    assert_eq!(primary.log_dirty_enabled(dom), Some(false));
    // The request was withdrawn.
    let xs = primary.open_xenstore().unwrap();
    assert_eq!(
        xs.read(Tx::NONE, &format!("/local/domain/{dom}/control/shutdown"))
            .unwrap(),
        b""
    );
}

/// `--hold` with suspend checkpoints: the guest ends paused exactly at the last ACK, resumed
/// from its suspend (not shut down), so a later unpause lets it run on.
#[test]
fn held_suspend_checkpoint_leaves_the_guest_paused_not_suspended() {
    use crate::sync::sender::CountHook;
    let Pair {
        primary,
        dom,
        secondary,
        addr,
        spool,
        rx,
        stop,
        guest: g,
        ..
    } = pair("hold");
    let stream = TcpStream::connect(addr).unwrap();
    let opts = SenderOptions::default();
    let mut tx = suspending_sender(&primary, dom, stream, opts, Duration::from_secs(10));
    tx.initial_sync(CONFIG_JSON, &mut |_| {}).unwrap();
    let mut hook = CountHook {
        limit: Some(3),
        hold: true,
    };
    let out = tx
        .protect(&Triggers::new(Duration::from_millis(2)), &mut hook)
        .unwrap();
    assert!(out.held_paused);
    drop(tx);
    let i = primary.domain_info(dom).unwrap();
    assert_eq!((i.shutdown, i.paused), (None, true));
    assert_eq!(primary.pause_count(dom), Some(1));
    assert_eq!(primary.resume_counts(dom), Some((4, 4)));
    stop.store(true, Ordering::Relaxed);
    g.join().unwrap();
    let session = rx.join().unwrap().unwrap();
    assert_eq!(session.acked, Some(3));
    let replica = session.replica.unwrap();
    assert!(pages_of(&primary, dom) == pages_of(&secondary, replica));
    primary.unpause(dom).unwrap();
    assert!(primary.domain_info(dom).unwrap().running);
    std::fs::remove_dir_all(&spool).unwrap();
}

/// A guest that takes the suspend request but suspends only after the timeout: protection ends
/// with an error, and the late suspend is resumed (fast) instead of leaving the guest stopped.
#[test]
fn a_late_suspend_is_resumed() {
    let (primary, dom, _listener, stream) = idle_guest();
    let slow = {
        let x = primary.clone();
        std::thread::spawn(move || {
            let xs = x.open_xenstore().unwrap();
            let node = format!("/local/domain/{dom}/control/shutdown");
            while xs.read(Tx::NONE, &node).ok().as_deref() != Some(&b"suspend"[..]) {
                std::thread::sleep(Duration::from_millis(1));
            }
            xs.write(Tx::NONE, &node, b"").unwrap();
            std::thread::sleep(Duration::from_millis(250));
            x.guest(dom).shutdown(ShutdownReason::Suspend).unwrap();
        })
    };
    let opts = SenderOptions::default();
    let mut tx = suspending_sender(&primary, dom, stream, opts, Duration::from_millis(150));
    let err = tx.initial_sync(CONFIG_JSON, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("acknowledged"), "{err}");
    slow.join().unwrap();
    drop(tx);
    let i = primary.domain_info(dom).unwrap();
    assert!(i.running && i.shutdown.is_none(), "{i:?}");
    assert_eq!(primary.resume_counts(dom), Some((1, 1)));
}
