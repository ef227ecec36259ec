//! Output commit for `kemari replicate --disk/--vif`: the protected guest's disk and NIC served
//! by Kemari's blkback and netback in the same process as the sender, each behind an output
//! gate (see `xenbus_backend::commit` and `kemarid::sync::commit`), and `kemari receive
//! --disk/--vif`.
//!
//! The guest is created paused with no disk at that vdev and no vif at that handle (as for
//! `kemari attach`). Each backend runs in its own thread with its own handle on Xen; its gate
//! connects it to the sender: a kick with output to hold (a disk write, a frame the guest
//! sends) fires an I/O trigger, the checkpoint taken with the guest paused closes the epoch
//! (and carries that epoch's disk writes), and its ACK releases them. SIGUSR1 asks for a held stop: the next
//! checkpoint keeps the guest paused after its ACK and protection ends there (the guest stays
//! paused exactly at the state the secondary holds, as with --hold).

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use hypervisor::{DomId, Hypervisor};
use kemarid::failover::net::NetSpec;
use kemarid::sync::commit::{CommitHook, TriggerTap};
use kemarid::sync::disk_apply::ReplicaDisk;
use kemarid::sync::sender::{AckInfo, AfterAck, CheckpointHook, DeviceError, Release};
use kemarid::sync::trigger::{Reasons, Triggers};
use nix::sys::signal::{SigSet, Signal};
use xenbus_backend::commit::OutputGate;
use xenbus_backend::{Vbd, VbdConfig, VbdStats, VbdStatus, VifConfig, VifStats, VifStatus};

/// `kemari replicate` arguments of output commit.
#[derive(Args, Debug, Clone)]
pub struct CommitArgs {
    /// Serve the guest's disk from this raw image (or block device) with Kemari's blkback in
    /// this process, under output commit: writes reach the disk (and the guest sees them done)
    /// only after the secondary ACKed the checkpoint that carries them. The guest must have no
    /// disk of its own at --vdev (create it paused: `xl create -p`).
    #[arg(long)]
    pub disk: Option<PathBuf>,
    /// Virtual device of --disk in the guest: xvda..xvdp.
    #[arg(long, default_value = "xvda", requires = "disk")]
    pub vdev: String,
    /// Serve the guest's NIC with Kemari's netback in this process, under output commit: the
    /// frames the guest sends reach the tap only after the secondary ACKed a checkpoint at or
    /// after the one that holds the guest state that sent them (with --suspend too); frames for
    /// the guest are delivered at once. Settings as `kemari attach --vif`: mac=..,bridge=..,
    /// devid=N,ifname=NAME,gso=0. The guest must have no vif of its own at that handle.
    #[arg(long, num_args = 0..=1, default_missing_value = "", value_name = "SETTINGS")]
    pub vif: Option<String>,
    /// Unpause the guest once the initial sync is ACKed (it is protected from its first
    /// instruction on; the initial copy is then of a paused guest).
    #[arg(long)]
    pub unpause: bool,
    /// Take the disk device over from the process serving it now instead of creating it
    /// (Kemari's `Attached` state: its live ring and in-flight journal, no handshake): set by
    /// `kemari protect` for a guest that a failover left running here.
    #[arg(skip)]
    pub takeover: bool,
    /// Append one line per ACK, shipped disk log and released request or frame to FILE (`T
    /// ack seq=A`, `T ship seq=E entries=N first=F`, `T release dev=D id=I op=O epoch=E acked=A
    /// delay_us=U`, `op=tx` for a frame), each ending in `gate=disk` or `gate=net`: the disk and
    /// the NIC have a gate each (under --suspend the disk's is released at the suspend request,
    /// the NIC's only by the ACK). Needs --disk or --vif.
    #[arg(long)]
    pub commit_log: Option<PathBuf>,
}

/// `kemari receive` arguments of the disk write log.
#[derive(Args, Debug, Clone)]
pub struct ReceiveDiskArgs {
    /// The secondary's copy of the guest's disk (equal to the primary's when protection
    /// starts, e.g. copied while the guest is paused): every checkpoint's disk write log is
    /// applied to it with the checkpoint, all or nothing.
    #[arg(long = "disk")]
    pub disk: Option<PathBuf>,
    /// Virtual device the copy stands for: xvda..xvdp.
    #[arg(long = "vdev", default_value = "xvda")]
    pub vdev: String,
}

impl ReceiveDiskArgs {
    /// The copies for `Receiver::with_disks`.
    pub fn disks(&self) -> anyhow::Result<Vec<ReplicaDisk>> {
        Ok(match &self.disk {
            None => Vec::new(),
            Some(path) => vec![ReplicaDisk {
                devid: vdev_to_devid(&self.vdev)?,
                path: path.clone(),
            }],
        })
    }
}

/// `kemari receive` arguments of the guest's NIC after a failover.
#[derive(Args, Debug, Clone)]
pub struct ReceiveNetArgs {
    /// With --failover: serve the guest's NIC on this host with Kemari's netback (a tap in
    /// bridge=..), so that its netfront reconnects, and announce its MAC there. Settings as
    /// `kemari replicate --vif`; mac= is required and must be the guest's (the one it had on
    /// the primary).
    #[arg(long = "vif", value_name = "SETTINGS")]
    pub vif: Option<String>,
}

impl ReceiveNetArgs {
    /// What to serve after a failover, if anything.
    pub fn spec(&self) -> anyhow::Result<Option<NetSpec>> {
        let Some(s) = &self.vif else {
            return Ok(None);
        };
        let v = crate::attach_cmd::parse_vif_spec(s)?;
        let mac = v.mac.with_context(|| {
            format!("--vif {s:?}: mac= is required (the guest's MAC on the primary)")
        })?;
        let mut vif = VifConfig::new(0, v.devid);
        vif.mac = mac;
        Ok(Some(NetSpec {
            vif,
            tap_name: v.ifname,
            bridge: v.bridge,
            gso: v.gso,
        }))
    }
}

/// `xvdX` -> `virtual-device` (major 202, 16 minors per disk), as `kemari attach`.
fn vdev_to_devid(vdev: &str) -> anyhow::Result<u32> {
    let letter = vdev
        .strip_prefix("xvd")
        .filter(|s| s.len() == 1)
        .and_then(|s| s.bytes().next())
        .filter(|b| (b'a'..=b'p').contains(b))
        .with_context(|| format!("--vdev {vdev:?}: expected xvda..xvdp"))?;
    Ok((202 << 8) | (u32::from(letter - b'a') << 4))
}

/// `--unpause`: unpauses the guest (after the initial sync).
pub fn unpause_if_asked(
    args: &CommitArgs,
    hv: &dyn Hypervisor,
    domid: DomId,
) -> anyhow::Result<()> {
    if args.unpause {
        hv.unpause(domid)
            .with_context(|| format!("unpausing domain {domid}"))?;
        eprintln!("kemari replicate: domain {domid} unpaused");
    }
    Ok(())
}

/// Blocks SIGUSR1 in the calling thread and every thread it starts later (call first).
pub fn block_usr1() -> anyhow::Result<Arc<AtomicBool>> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGUSR1);
    set.thread_block().context("blocking SIGUSR1")?;
    Ok(Arc::new(AtomicBool::new(false)))
}

/// Waits for SIGUSR1 (blocked by [`block_usr1`]): sets `flag` and requests a checkpoint.
pub fn hold_on_usr1(flag: Arc<AtomicBool>, triggers: Triggers) -> anyhow::Result<()> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGUSR1);
    std::thread::Builder::new()
        .name("usr1".into())
        .spawn(move || {
            if set.wait().is_ok() {
                eprintln!("kemari replicate: SIGUSR1: holding the guest at the next checkpoint and stopping there");
                flag.store(true, Ordering::SeqCst);
                triggers.fire(Reasons::REQUEST);
            }
        })
        .context("starting the SIGUSR1 thread")?;
    Ok(())
}

/// A hook that, once `flag` is set, holds the next checkpoint and stops after its ACK.
pub struct HoldOnRequest<H> {
    inner: H,
    flag: Arc<AtomicBool>,
}

impl<H: CheckpointHook> CheckpointHook for HoldOnRequest<H> {
    fn release(&mut self, seq: u64, reasons: Reasons) -> Release {
        if self.flag.load(Ordering::SeqCst) {
            Release::AfterAck
        } else {
            self.inner.release(seq, reasons)
        }
    }

    fn acked(&mut self, info: &AckInfo) -> AfterAck {
        let inner = self.inner.acked(info);
        if info.paused && self.flag.load(Ordering::SeqCst) {
            AfterAck::StopPaused
        } else {
            inner
        }
    }

    fn extra(&mut self, seq: u64) -> Result<Vec<(u32, Vec<u8>)>, DeviceError> {
        self.inner.extra(seq)
    }
}

/// A boxed hook as a hook (to stack the wrappers below).
struct Boxed<'a>(Box<dyn CheckpointHook + 'a>);

impl CheckpointHook for Boxed<'_> {
    fn release(&mut self, seq: u64, reasons: Reasons) -> Release {
        self.0.release(seq, reasons)
    }

    fn acked(&mut self, info: &AckInfo) -> AfterAck {
        self.0.acked(info)
    }

    fn extra(&mut self, seq: u64) -> Result<Vec<(u32, Vec<u8>)>, DeviceError> {
        self.0.extra(seq)
    }
}

/// Output commit of the NIC's gate: the epoch is closed with the guest paused for checkpoint
/// `seq` (frames the netback takes from then on belong to `seq + 1`), and frames of epochs
/// `<= seq` are released by the ACK of `seq` - never earlier, with or without --suspend.
struct NetCommitHook<H> {
    inner: H,
    gate: Arc<OutputGate>,
}

impl<H: CheckpointHook> CheckpointHook for NetCommitHook<H> {
    fn release(&mut self, seq: u64, reasons: Reasons) -> Release {
        self.inner.release(seq, reasons)
    }

    fn acked(&mut self, info: &AckInfo) -> AfterAck {
        self.gate.acked(info.seq);
        self.inner.acked(info)
    }

    fn extra(&mut self, seq: u64) -> Result<Vec<(u32, Vec<u8>)>, DeviceError> {
        let extra = self.inner.extra(seq)?;
        // a NIC logs no disk writes: this only closes the epoch
        let _ = self.gate.take_log(seq);
        Ok(extra)
    }
}

/// `--suspend` with `--disk`: the disk writes of epoch `seq` are released when checkpoint
/// `seq` is about to ask the guest to suspend, instead of after its ACK. Linux's Xen suspend
/// freezes every task first, and a task waiting for a write held until the ACK of the very
/// checkpoint that waits for the suspend cannot be frozen: the suspend fails after 20 s
/// (lab run 20261130-231528). Released this way, the writes still reach the primary's disk
/// only after the guest issued them and travel in checkpoint `seq`'s disk log, applied on the
/// secondary with that checkpoint (Remus' disk semantics): if the primary dies before the ACK,
/// the secondary resumes the guest at the previous checkpoint, in a state in which those
/// writes have not completed, and the guest issues them again. What the guest made visible
/// outside because a write completed is the network's output commit to hold: the NIC has a
/// gate of its own, released only by ACKs. (Frames need no such release: the netback answers
/// a TX request once the frame is copied, so no guest task waits for a held frame and the
/// freezer is not blocked.)
struct ReleaseAtSuspend<H> {
    inner: H,
    gate: Arc<OutputGate>,
}

impl<H: CheckpointHook> CheckpointHook for ReleaseAtSuspend<H> {
    fn release(&mut self, seq: u64, reasons: Reasons) -> Release {
        self.gate.acked(seq);
        self.inner.release(seq, reasons)
    }

    fn acked(&mut self, info: &AckInfo) -> AfterAck {
        self.inner.acked(info)
    }

    fn extra(&mut self, seq: u64) -> Result<Vec<(u32, Vec<u8>)>, DeviceError> {
        self.inner.extra(seq)
    }
}

/// The hook of `kemari replicate`: `inner`, a held stop on SIGUSR1, output commit through the
/// disk's gate and the NIC's gate if there are; with `suspend`, the disk's writes are
/// released at the suspend request ([`ReleaseAtSuspend`]), the NIC's frames still by the ACK.
pub fn hook<'a, H: CheckpointHook + 'a>(
    inner: H,
    usr1: Arc<AtomicBool>,
    outputs: Option<&Outputs>,
    suspend: bool,
) -> Box<dyn CheckpointHook + 'a> {
    let disk = outputs
        .and_then(|o| o.disk.as_ref())
        .map(|d| d.gate.clone());
    let net = outputs.and_then(|o| o.vif.as_ref()).map(|d| d.gate.clone());
    chain(HoldOnRequest { inner, flag: usr1 }, disk, net, suspend)
}

fn chain<'a, H: CheckpointHook + 'a>(
    inner: H,
    disk: Option<Arc<OutputGate>>,
    net: Option<Arc<OutputGate>>,
    suspend: bool,
) -> Box<dyn CheckpointHook + 'a> {
    let mut h: Box<dyn CheckpointHook + 'a> = Box::new(inner);
    if let Some(g) = &disk {
        h = Box::new(CommitHook::new(Boxed(h), g.clone()));
    }
    if let Some(g) = net {
        h = Box::new(NetCommitHook {
            inner: Boxed(h),
            gate: g,
        });
    }
    if let (true, Some(g)) = (suspend, disk) {
        h = Box::new(ReleaseAtSuspend {
            inner: Boxed(h),
            gate: g,
        });
    }
    h
}

/// One line of a gate's commit log at a time into a file shared by the gates, each line
/// ending in ` gate=TAG`.
struct SharedLog {
    file: Arc<Mutex<std::io::BufWriter<std::fs::File>>>,
    tag: &'static str,
    line: Vec<u8>,
}

impl Write for SharedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(buf);
        while let Some(end) = self.line.iter().position(|b| *b == b'\n') {
            let rest = self.line.split_off(end + 1);
            let mut l = std::mem::replace(&mut self.line, rest);
            l.pop();
            l.extend_from_slice(b" gate=");
            l.extend_from_slice(self.tag.as_bytes());
            l.push(b'\n');
            self.file
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .write_all(&l)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .flush()
    }
}

/// What a device thread reports when it ends.
struct Report {
    json: serde_json::Value,
    text: String,
}

/// One protected device, served in its own thread.
struct Served {
    gate: Arc<OutputGate>,
    stop: Arc<AtomicBool>,
    handle: JoinHandle<anyhow::Result<Report>>,
}

impl Served {
    /// Runs `body` in a thread named `name`; it reports through `ready` once the device
    /// exists (the text is printed), or fails before. Returns once the device exists.
    fn spawn<F>(name: &str, gate: Arc<OutputGate>, body: F) -> anyhow::Result<(Served, String)>
    where
        F: FnOnce(
                Arc<OutputGate>,
                &AtomicBool,
                &std::sync::mpsc::Sender<anyhow::Result<String>>,
            ) -> anyhow::Result<Report>
            + Send
            + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<String>>();
        let (g, s) = (gate.clone(), stop.clone());
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let r = body(g, &s, &ready_tx);
                if let Err(e) = &r {
                    // only read if the device never became ready
                    let _ = ready_tx.send(Err(anyhow::anyhow!("{e:#}")));
                }
                r
            })
            .with_context(|| format!("starting the {name} thread"))?;
        let text = ready_rx
            .recv()
            .with_context(|| format!("the {name} thread ended before the device existed"))??;
        Ok((Served { gate, stop, handle }, text))
    }
}

/// The protected guest's devices served in this process, each behind its own gate.
pub struct Outputs {
    disk: Option<Served>,
    vif: Option<Served>,
    domid: DomId,
    started: Instant,
    usr1: Arc<AtomicBool>,
}

impl Outputs {
    /// Creates the disk and/or NIC of `domid` (before the guest runs) behind gates whose taps
    /// fire `triggers`, and serves each in a thread. `None` without `--disk` and `--vif`.
    pub fn start(
        domid: DomId,
        args: &CommitArgs,
        triggers: &Triggers,
        usr1: &Arc<AtomicBool>,
    ) -> anyhow::Result<Option<Outputs>> {
        if args.disk.is_none() && args.vif.is_none() {
            anyhow::ensure!(
                args.commit_log.is_none(),
                "--commit-log needs --disk or --vif"
            );
            return Ok(None);
        }
        let vif_spec = args
            .vif
            .as_deref()
            .map(crate::attach_cmd::parse_vif_spec)
            .transpose()?;
        let log = match &args.commit_log {
            None => None,
            Some(path) => Some(Arc::new(Mutex::new(std::io::BufWriter::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("opening the commit log {}", path.display()))?,
            )))),
        };
        let new_gate = |tag: &'static str| {
            let gate = OutputGate::new(1, Box::new(TriggerTap(triggers.clone())));
            if let Some(file) = &log {
                gate.set_commit_log(Box::new(SharedLog {
                    file: file.clone(),
                    tag,
                    line: Vec::new(),
                }));
            }
            gate
        };
        let disk = match args.disk.clone() {
            None => None,
            Some(image) => Some(start_disk(
                domid,
                image,
                &args.vdev,
                new_gate("disk"),
                args.takeover,
            )?),
        };
        let vif = match vif_spec {
            None => None,
            Some(spec) => match start_vif(domid, spec, new_gate("net")) {
                Ok(v) => Some(v),
                Err(e) => {
                    if let Some(d) = disk {
                        d.stop.store(true, Ordering::SeqCst);
                        let _ = d.handle.join();
                    }
                    return Err(e);
                }
            },
        };
        Ok(Some(Outputs {
            disk,
            vif,
            domid,
            started: Instant::now(),
            usr1: usr1.clone(),
        }))
    }

    fn served(&self) -> impl Iterator<Item = &Served> {
        self.disk.iter().chain(self.vif.iter())
    }

    /// After protection: with the guest held paused, serve what the last ACK released and
    /// stop (disk requests of the next epoch are dropped unanswered, its frames dropped: the
    /// guest is kept at the ACKed state). Otherwise the guest runs on UNPROTECTED: held output
    /// is released and the devices are served until the guest is gone or SIGINT/SIGTERM
    /// (`triggers.stop`) or SIGUSR1. Prints each device's counters (--json: a line each, the
    /// disk first).
    pub fn finish(self, held: bool, triggers: &Triggers, json: bool) -> anyhow::Result<()> {
        if !held {
            for s in self.served() {
                s.gate.end();
            }
            eprintln!(
                "kemari replicate: protection over: domain {} runs unprotected, its devices are served until it is gone or SIGTERM/SIGUSR1",
                self.domid
            );
            while !triggers.stopped()
                && !self.usr1.load(Ordering::SeqCst)
                && !self.served().any(|s| s.handle.is_finished())
            {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        for s in self.served() {
            s.stop.store(true, Ordering::SeqCst);
        }
        let secs = self.started.elapsed().as_secs_f64();
        let mut first_err = None;
        for (what, s) in [("disk", self.disk), ("vif", self.vif)] {
            let Some(s) = s else { continue };
            s.gate.flush_commit_log();
            let r = s
                .handle
                .join()
                .map_err(|_| anyhow::anyhow!("the {what} thread panicked"))
                .and_then(|r| r);
            s.gate.flush_commit_log();
            match r {
                Ok(mut r) => {
                    if json {
                        r.json["seconds"] = serde_json::json!(secs);
                        println!("{}", r.json);
                    } else if what == "vif" {
                        println!("kemari replicate: {}", r.text);
                    } else {
                        println!("{}", r.text);
                    }
                }
                Err(e) => {
                    eprintln!("kemari replicate: {what}: {e:#}");
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// The disk under `gate`, served by blkback in a thread with its own handle on Xen.
fn start_disk(
    domid: DomId,
    image: PathBuf,
    vdev: &str,
    gate: Arc<OutputGate>,
    takeover: bool,
) -> anyhow::Result<Served> {
    let devid = vdev_to_devid(vdev)?;
    let vdev = vdev.to_owned();
    let shown = image.display().to_string();
    let (served, backend) = Served::spawn("blkback", gate, move |g, stop, ready| {
        let host = hypervisor::xen::XenHost::open()
            .context("opening this host's Xen for the disk thread")?;
        let config = VbdConfig {
            domid,
            devid,
            backend_domid: 0,
            image,
            readonly: false,
            journal_dir: Some(PathBuf::from("/run/kemari")),
        };
        let hv: &dyn Hypervisor = &host;
        let mut vbd = hv
            .open_xenstore()
            .and_then(|xs| hv.open_event_channels().map(|ev| (xs, ev)))
            .map_err(anyhow::Error::from)
            .and_then(|(xs, ev)| {
                if takeover {
                    Vbd::attach(hv, xs, ev, &config)
                } else {
                    Vbd::create(hv, xs, ev, &config)
                }
                .map_err(anyhow::Error::from)
            })
            .with_context(|| {
                let what = if takeover { "taking over" } else { "creating" };
                format!("{what} {vdev} for domain {domid}")
            })?;
        vbd.protect(g.clone())?;
        let _ = ready.send(Ok(vbd.paths().backend.clone()));
        let status = vbd.run(stop).context("serving the disk")?;
        Ok(disk_report(&vdev, &status, vbd.stats(), g.released()))
    })?;
    eprintln!(
        "kemari replicate: domain {domid} {} served from {shown} at {backend} under output commit",
        vdev_name(devid)
    );
    Ok(served)
}

fn vdev_name(devid: u32) -> String {
    let letter = char::from(b'a' + ((devid >> 4) & 0xf) as u8);
    format!("xvd{letter}")
}

fn disk_report(vdev: &str, status: &VbdStatus, s: &VbdStats, last_ack: u64) -> Report {
    Report {
        json: serde_json::json!({
            "device": vdev,
            "status": format!("{status:?}"),
            "requests": s.requests,
            "held": s.held,
            "held_dropped": s.held_dropped,
            "read_bytes": s.read_bytes,
            "write_bytes": s.write_bytes,
            "flushes": s.flushes,
            "discards": s.discards,
            "errors": s.errors,
            "last_ack": last_ack,
        }),
        text: format!(
            "kemari replicate: disk {vdev}: {status:?}; {} requests answered, {} held for output commit, {} dropped unanswered, {} MiB read, {} MiB written, {} flushes, {} errors, last ACK {last_ack}",
            s.requests,
            s.held,
            s.held_dropped,
            s.read_bytes >> 20,
            s.write_bytes >> 20,
            s.flushes,
            s.errors
        ),
    }
}

/// The NIC under `gate`, served by netback (tap first, up and bridged) in a thread with its
/// own handle on Xen.
fn start_vif(
    domid: DomId,
    spec: crate::attach_cmd::VifSpec,
    gate: Arc<OutputGate>,
) -> anyhow::Result<Served> {
    let (served, desc) = Served::spawn("netback", gate, move |g, stop, ready| {
        let host = hypervisor::xen::XenHost::open()
            .context("opening this host's Xen for the vif thread")?;
        let mut vif = crate::attach_cmd::create_vif(&host, domid, &spec)?;
        vif.protect(g.clone())?;
        let _ = ready.send(Ok(crate::attach_cmd::describe_vif(&vif, &spec, false)));
        let status = vif.run(stop).context("serving the vif")?;
        Ok(vif_report(
            vif.config().devid,
            &status,
            vif.stats(),
            Some(g.released()),
        ))
    })?;
    eprintln!("kemari replicate: domain {domid} {desc} under output commit");
    Ok(served)
}

fn vif_report(devid: u32, status: &VifStatus, s: &VifStats, last_ack: Option<u64>) -> Report {
    Report {
        json: serde_json::json!({
            "device": "vif",
            "devid": devid,
            "status": format!("{status:?}"),
            "tx_packets": s.tx_packets,
            "tx_bytes": s.tx_bytes,
            "tx_held": s.tx_held,
            "tx_held_dropped": s.tx_held_dropped,
            "tx_errors": s.tx_errors,
            "tx_dropped": s.tx_dropped,
            "rx_packets": s.rx_packets,
            "rx_bytes": s.rx_bytes,
            "rx_errors": s.rx_errors,
            "rx_dropped": s.rx_dropped,
            "connects": s.connects,
            "last_ack": last_ack,
        }),
        text: format!(
            "vif {devid}: {status:?}; tx {} packets ({} bytes), {} held for output commit ({} dropped: queue full), rx {} packets ({} bytes), {} tx errors, {} tx dropped, {} rx errors, {} connects{}",
            s.tx_packets,
            s.tx_bytes,
            s.tx_held,
            s.tx_held_dropped,
            s.rx_packets,
            s.rx_bytes,
            s.tx_errors,
            s.tx_dropped,
            s.rx_errors,
            s.connects,
            last_ack.map_or(String::new(), |a| format!(", last ACK {a}"))
        ),
    }
}

/// `kemari debug disk-log FILE [--replay COPY] [--vdev xvda]`.
pub fn disk_log(
    file: &std::path::Path,
    replay: Option<PathBuf>,
    vdev: &str,
    json: bool,
) -> anyhow::Result<()> {
    use kemari_stream::disklog::DiskOp;
    let (seq, entries) = kemarid::sync::receiver::read_disk_log(file)?;
    let bytes: u64 = entries.iter().map(|e| e.len_bytes()).sum();
    if json {
        let list: Vec<serde_json::Value> = entries
            .iter()
            .map(|e| {
                serde_json::json!({
                    "seq": e.seq,
                    "devid": e.devid,
                    "sector": e.sector,
                    "op": match e.op { DiskOp::Write(_) => "write", DiskOp::Discard { .. } => "discard" },
                    "bytes": e.len_bytes(),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"checkpoint": seq, "bytes": bytes, "entries": list})
        );
    } else {
        println!(
            "{}: checkpoint {seq}, {} entries, {bytes} bytes",
            file.display(),
            entries.len()
        );
        for e in &entries {
            let op = match e.op {
                DiskOp::Write(_) => "write",
                DiskOp::Discard { .. } => "discard",
            };
            println!(
                "  {} dev {} {op} sector {} bytes {}",
                e.seq,
                e.devid,
                e.sector,
                e.len_bytes()
            );
        }
    }
    if let Some(path) = replay {
        let disks = [ReplicaDisk {
            devid: vdev_to_devid(vdev)?,
            path: path.clone(),
        }];
        let apply = kemarid::sync::disk_apply::DiskApply::prepare(&disks, &entries)
            .with_context(|| format!("replaying {} onto {}", file.display(), path.display()))?;
        apply
            .write(&entries)
            .with_context(|| format!("replaying {} onto {}", file.display(), path.display()))?;
        eprintln!(
            "replayed {} entries of checkpoint {seq} onto {}",
            entries.len(),
            path.display()
        );
    }
    Ok(())
}

/// After a failover with `--vif`: serves the guest's NIC until the guest is gone or `stop`;
/// returns the line to print with its counters (with --json `{"vif": {...}}`).
pub fn serve_failover_vif(
    mut vif: xenbus_backend::Vif<'_>,
    stop: &AtomicBool,
    json: bool,
) -> anyhow::Result<String> {
    let domid = vif.paths().domid;
    eprintln!(
        "kemari receive: serving domain {domid}'s vif {} at {} until the guest is gone or SIGTERM",
        vif.config().devid,
        vif.paths().backend
    );
    let start = Instant::now();
    let status = vif
        .run(stop)
        .context("serving the vif after the failover")?;
    let mut r = vif_report(vif.config().devid, &status, vif.stats(), None);
    Ok(if json {
        r.json["seconds"] = serde_json::json!(start.elapsed().as_secs_f64());
        r.json["domid"] = serde_json::json!(domid);
        serde_json::json!({ "vif": r.json }).to_string()
    } else {
        format!("kemari receive: {}", r.text)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use xenbus_backend::commit::{LoggedOp, Tap};

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
        let (disk, net) = gates();
        let mut h = chain(Inner, Some(disk.clone()), Some(net.clone()), true);
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
        let (disk, net) = gates();
        let mut h = chain(Inner, Some(disk.clone()), Some(net.clone()), false);
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
        let mut h = chain(Inner, None, Some(net.clone()), true);
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
        let mut a = SharedLog {
            file: file.clone(),
            tag: "disk",
            line: Vec::new(),
        };
        let mut b = SharedLog {
            file,
            tag: "net",
            line: Vec::new(),
        };
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
        let (disk, net) = gates();
        let path = path.with_extension("gates");
        let file = Arc::new(Mutex::new(std::io::BufWriter::new(
            std::fs::File::create(&path).unwrap(),
        )));
        for (g, tag) in [(&disk, "disk"), (&net, "net")] {
            g.set_commit_log(Box::new(SharedLog {
                file: file.clone(),
                tag,
                line: Vec::new(),
            }));
        }
        let mut h = chain(Inner, Some(disk.clone()), Some(net.clone()), true);
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

    #[test]
    fn receive_vif_needs_the_guests_mac() {
        let a = ReceiveNetArgs {
            vif: Some("bridge=xenbr0".into()),
        };
        let e = a.spec().unwrap_err().to_string();
        assert!(e.contains("mac= is required"), "{e}");
        let a = ReceiveNetArgs {
            vif: Some("mac=00:16:3e:77:00:96,bridge=xenbr0,gso=0,ifname=t1".into()),
        };
        let s = a.spec().unwrap().unwrap();
        assert_eq!(s.vif.mac_string(), "00:16:3e:77:00:96");
        assert_eq!(s.bridge.as_deref(), Some("xenbr0"));
        assert_eq!(s.tap_name.as_deref(), Some("t1"));
        assert!(!s.gso);
        assert!(ReceiveNetArgs { vif: None }.spec().unwrap().is_none());
    }
}
