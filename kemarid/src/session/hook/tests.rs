use std::io::Write;
use std::sync::Mutex;

use xenbus_backend::commit::{LoggedOp, Tap};

use super::super::outputs::SharedLog;
use super::*;

struct NoTap;
impl Tap for NoTap {
    fn kick(&self) {}
}

struct Inner;
impl CheckpointHook for Inner {
    fn acked(&mut self, _: &AckInfo) -> AfterAck {
        AfterAck::Continue
    }
}

fn info(seq: u64) -> AckInfo {
    AckInfo {
        seq,
        reasons: Reasons::IO,
        coalesced: 0,
        pages: 1,
        paused: false,
    }
}

/// A held-stop flag never set.
fn no_request() -> Arc<AtomicBool> {
    Arc::new(AtomicBool::new(false))
}

/// [`chain`] around [`Inner`] with both gates, never held; the gates.
fn both_gates(suspend: bool) -> (Box<dyn CheckpointHook>, Arc<OutputGate>, Arc<OutputGate>) {
    let (disk, net) = gates();
    let h = chain(
        Inner,
        no_request(),
        Some(disk.clone()),
        Some(net.clone()),
        suspend,
    );
    (h, disk, net)
}

fn gates() -> (Arc<OutputGate>, Arc<OutputGate>) {
    (
        OutputGate::new(1, Box::new(NoTap)),
        OutputGate::new(1, Box::new(NoTap)),
    )
}

/// The sender's order for checkpoint `seq`: release decision, extra records with the
/// guest paused, (send), ACK. `between` runs after the extra records, before the ACK.
fn checkpoint(h: &mut dyn CheckpointHook, seq: u64, between: impl FnOnce()) {
    let _ = h.release(seq, Reasons::IO);
    h.extra(seq).unwrap();
    between();
    assert_eq!(h.acked(&info(seq)), AfterAck::Continue);
}

#[test]
fn frames_wait_for_the_ack_even_when_disk_writes_go_at_the_suspend() {
    let (mut h, disk, net) = both_gates(true);
    let data: Arc<[u8]> = Arc::from(vec![1u8; 512]);
    // epoch 1: a disk write and a frame
    assert_eq!(disk.hold_logged(51712, 0, LoggedOp::Write(data)), Some(1));
    assert_eq!(net.hold(), Some(1));
    let _ = h.release(1, Reasons::IO);
    // the suspend is requested: the write goes (Remus' disk semantics), the frame waits
    assert!(disk.is_released(1));
    assert!(!net.is_released(1));
    let extra = h.extra(1).unwrap();
    assert_eq!(extra.len(), 1, "checkpoint 1 carries the disk log");
    // a frame taken after the pause belongs to the next checkpoint
    assert_eq!(net.hold(), Some(2));
    assert!(!net.is_released(1), "not before the ACK");
    assert_eq!(h.acked(&info(1)), AfterAck::Continue);
    assert!(net.is_released(1) && !net.is_released(2));
    checkpoint(&mut *h, 2, || assert!(!net.is_released(2)));
    assert!(net.is_released(2) && !net.is_released(3));
}

#[test]
fn without_suspend_both_gates_wait_for_the_ack() {
    let (mut h, disk, net) = both_gates(false);
    assert_eq!(disk.hold(), Some(1));
    assert_eq!(net.hold(), Some(1));
    checkpoint(&mut *h, 1, || {
        assert!(!disk.is_released(1) && !net.is_released(1));
    });
    assert!(disk.is_released(1) && net.is_released(1));
}

#[test]
fn a_nic_alone_adds_no_records_and_is_released_by_acks() {
    let (_, net) = gates();
    let mut h = chain(Inner, no_request(), None, Some(net.clone()), true);
    assert_eq!(net.hold(), Some(1));
    let _ = h.release(1, Reasons::IO);
    assert!(!net.is_released(1), "--suspend does not release frames");
    assert!(h.extra(1).unwrap().is_empty(), "no disk log for a NIC");
    assert_eq!(net.hold(), Some(2));
    assert_eq!(h.acked(&info(1)), AfterAck::Continue);
    assert!(net.is_released(1) && !net.is_released(2));
}

#[test]
fn the_gates_share_one_commit_log_line_by_line() {
    let path = std::env::temp_dir().join(format!("kemari-commit-log-{}", std::process::id()));
    let file = Arc::new(Mutex::new(std::io::BufWriter::new(
        std::fs::File::create(&path).unwrap(),
    )));
    let mut a = SharedLog::new(file.clone(), "disk");
    let mut b = SharedLog::new(file, "net");
    a.write_all(b"1.0 ack ").unwrap();
    b.write_all(b"1.1 release dev=0 op=tx\n2.0 ack seq=1\n")
        .unwrap();
    a.write_all(b"seq=1\n").unwrap();
    b.write_all(b"3.0 partial").unwrap();
    a.flush().unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(
        text,
        "1.1 release dev=0 op=tx gate=net\n2.0 ack seq=1 gate=net\n1.0 ack seq=1 gate=disk\n"
    );
    // through real gates: the NIC's lines say which gate
    let (mut h, disk, net) = both_gates(true);
    let path = path.with_extension("gates");
    let file = Arc::new(Mutex::new(std::io::BufWriter::new(
        std::fs::File::create(&path).unwrap(),
    )));
    for (g, tag) in [(&disk, "disk"), (&net, "net")] {
        g.set_commit_log(Box::new(SharedLog::new(file.clone(), tag)));
    }
    checkpoint(&mut *h, 1, || {});
    net.flush_commit_log();
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let kinds: Vec<String> = text
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            format!("{} {}", f[1], f[f.len() - 1])
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "ack gate=disk",  // at the suspend request
            "ship gate=disk", // the disk log in checkpoint 1
            "ship gate=net",  // the NIC's epoch closed
            "ack gate=net",   // the real ACK
            "ack gate=disk",  // the disk's again (nothing left to release)
        ]
    );
}

/// One trace of everything the composition does: the gates' commit log lines (`disk ack
/// seq=1`) and the caller's hook's calls (`inner release 1`), in the order they happen.
type Trace = Arc<Mutex<Vec<String>>>;

/// A gate's commit log into the trace: `TAG KIND SEQ` for each line `T KIND seq=S ...`.
struct TraceLog {
    trace: Trace,
    tag: &'static str,
    line: String,
}

impl Write for TraceLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.line.push_str(std::str::from_utf8(buf).unwrap());
        while let Some(end) = self.line.find('\n') {
            let l: String = self.line.drain(..=end).collect();
            let f: Vec<&str> = l.split_whitespace().collect();
            self.trace
                .lock()
                .unwrap()
                .push(format!("{} {} {}", self.tag, f[1], f[2]));
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The caller's hook: records its calls with what the gates let out at that moment.
struct Recorder {
    trace: Trace,
    disk: Arc<OutputGate>,
    net: Arc<OutputGate>,
}

impl Recorder {
    fn push(&self, call: &str, seq: u64) {
        self.trace.lock().unwrap().push(format!(
            "inner {call} {seq} disk={} net={}",
            self.disk.released(),
            self.net.released()
        ));
    }
}

impl CheckpointHook for Recorder {
    fn release(&mut self, seq: u64, _: Reasons) -> Release {
        self.push("release", seq);
        Release::AfterStaging
    }

    fn acked(&mut self, info: &AckInfo) -> AfterAck {
        self.push("acked", info.seq);
        AfterAck::Continue
    }

    fn extra(&mut self, seq: u64) -> Result<Vec<(u32, Vec<u8>)>, DeviceError> {
        self.push("extra", seq);
        Ok(Vec::new())
    }
}

/// The composition of [`hook`] around a [`Recorder`] (both gates, `suspend`), its trace and
/// the held-stop flag.
fn traced(suspend: bool) -> (Box<dyn CheckpointHook>, Trace, Arc<AtomicBool>) {
    let trace = Trace::default();
    let (disk, net) = gates();
    for (g, tag) in [(&disk, "disk"), (&net, "net")] {
        g.set_commit_log(Box::new(TraceLog {
            trace: trace.clone(),
            tag,
            line: String::new(),
        }));
    }
    let flag = Arc::new(AtomicBool::new(false));
    let inner = Recorder {
        trace: trace.clone(),
        disk: disk.clone(),
        net: net.clone(),
    };
    let h = chain(inner, flag.clone(), Some(disk), Some(net), suspend);
    (h, trace, flag)
}

fn take(trace: &Trace) -> Vec<String> {
    std::mem::take(&mut *trace.lock().unwrap())
}

/// The order of the wrappers, step by step: the disk's writes go at the suspend request
/// before the caller's hook decides (release-at-suspend outermost), the disk log is taken
/// after the caller's extra records and before the NIC's epoch closes, and the ACK releases
/// the NIC's frames, then the disk's writes, before the caller's hook sees it.
#[test]
fn the_wrappers_act_in_their_order() {
    let (mut h, trace, _) = traced(true);
    assert_eq!(h.release(1, Reasons::IO), Release::AfterStaging);
    assert_eq!(
        take(&trace),
        ["disk ack seq=1", "inner release 1 disk=1 net=0"]
    );
    assert!(h.extra(1).unwrap().is_empty());
    assert_eq!(
        take(&trace),
        [
            "inner extra 1 disk=1 net=0",
            "disk ship seq=1",
            "net ship seq=1"
        ]
    );
    assert_eq!(h.acked(&info(1)), AfterAck::Continue);
    assert_eq!(
        take(&trace),
        [
            "net ack seq=1",
            "disk ack seq=1",
            "inner acked 1 disk=1 net=1"
        ]
    );
}

/// What [`the_wrappers_act_in_their_order`] shows for `extra(seq)`, the gates' released
/// checkpoints as given.
fn paused_steps(seq: u64, disk: u64, net: u64) -> Vec<String> {
    vec![
        format!("inner extra {seq} disk={disk} net={net}"),
        format!("disk ship seq={seq}"),
        format!("net ship seq={seq}"),
    ]
}

/// What [`the_wrappers_act_in_their_order`] shows for `acked(seq)`.
fn ack_steps(seq: u64) -> Vec<String> {
    vec![
        format!("net ack seq={seq}"),
        format!("disk ack seq={seq}"),
        format!("inner acked {seq} disk={seq} net={seq}"),
    ]
}

/// Without --suspend nothing is released before the ACK, in the same order otherwise.
#[test]
fn without_suspend_only_the_ack_releases() {
    let (mut h, trace, _) = traced(false);
    let _ = h.release(1, Reasons::IO);
    assert_eq!(take(&trace), ["inner release 1 disk=0 net=0"]);
    h.extra(1).unwrap();
    assert_eq!(take(&trace), paused_steps(1, 0, 0));
    let _ = h.acked(&info(1));
    assert_eq!(take(&trace), ack_steps(1));
}

/// A held stop (SIGUSR1) is innermost: it keeps the guest paused without asking the
/// caller's hook, but the disk's writes still go at the suspend request (a guest waiting for
/// them could not suspend), the checkpoint still carries the disk log and closes the NIC's
/// epoch, and its ACK still releases both gates before protection stops there, paused.
#[test]
fn a_held_stop_still_goes_through_the_gates() {
    let (mut h, trace, flag) = traced(true);
    checkpoint(&mut *h, 1, || {});
    take(&trace);
    flag.store(true, Ordering::SeqCst);
    assert_eq!(h.release(2, Reasons::REQUEST), Release::AfterAck);
    assert_eq!(
        take(&trace),
        ["disk ack seq=2"],
        "the caller's hook is not asked"
    );
    h.extra(2).unwrap();
    assert_eq!(take(&trace), paused_steps(2, 2, 1));
    let paused = AckInfo {
        paused: true,
        ..info(2)
    };
    assert_eq!(h.acked(&paused), AfterAck::StopPaused);
    assert_eq!(take(&trace), ack_steps(2));
}

/// A checkpoint that was not held (the request came after its release decision) does not
/// stop protection: only one whose guest is still paused at the ACK does.
#[test]
fn a_held_stop_needs_the_guest_paused_at_the_ack() {
    let (mut h, _, flag) = traced(false);
    let _ = h.release(1, Reasons::IO);
    h.extra(1).unwrap();
    flag.store(true, Ordering::SeqCst);
    assert_eq!(h.acked(&info(1)), AfterAck::Continue);
    assert_eq!(h.release(2, Reasons::REQUEST), Release::AfterAck);
}
