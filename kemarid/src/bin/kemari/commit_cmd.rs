//! Output commit for `kemari replicate --disk`: the protected guest's disk served by Kemari's
//! blkback in the same process as the sender, behind an output gate (see
//! `xenbus_backend::commit` and `kemarid::sync::commit`), and `kemari receive --disk`.
//!
//! The guest is created paused with no disk at that vdev (as for `kemari attach`). The blkback
//! runs in its own thread with its own handle on Xen; the gate connects it to the sender: a kick
//! with output to hold fires an I/O trigger, the checkpoint taken with the guest paused carries
//! that epoch's disk writes, and its ACK releases them. SIGUSR1 asks for a held stop: the next
//! checkpoint keeps the guest paused after its ACK and protection ends there (the guest stays
//! paused exactly at the state the secondary holds, as with --hold).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use hypervisor::{DomId, Hypervisor};
use kemarid::sync::commit::{CommitHook, TriggerTap};
use kemarid::sync::disk_apply::ReplicaDisk;
use kemarid::sync::sender::{AckInfo, AfterAck, CheckpointHook, DeviceError, Release};
use kemarid::sync::trigger::{Reasons, Triggers};
use nix::sys::signal::{SigSet, Signal};
use xenbus_backend::commit::OutputGate;
use xenbus_backend::{Vbd, VbdConfig, VbdStats, VbdStatus};

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
    /// Unpause the guest once the initial sync is ACKed (it is protected from its first
    /// instruction on; the initial copy is then of a paused guest).
    #[arg(long)]
    pub unpause: bool,
    /// Take the disk device over from the process serving it now instead of creating it
    /// (Kemari's `Attached` state: its live ring and in-flight journal, no handshake): set by
    /// `kemari protect` for a guest that a failover left running here.
    #[arg(skip)]
    pub takeover: bool,
    /// Append one line per ACK, shipped disk log and released request to FILE (`T ack seq=A`,
    /// `T ship seq=E entries=N first=F`, `T release dev=D id=I op=O epoch=E acked=A
    /// delay_us=U`).
    #[arg(long, requires = "disk")]
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

/// The hook of `kemari replicate`: `inner`, a held stop on SIGUSR1, and output commit through
/// the disk's gate if there is one.
pub fn hook<'a, H: CheckpointHook + 'a>(
    inner: H,
    usr1: Arc<AtomicBool>,
    disk: Option<&DiskService>,
) -> Box<dyn CheckpointHook + 'a> {
    let held = HoldOnRequest { inner, flag: usr1 };
    match disk {
        Some(d) => Box::new(CommitHook::new(held, d.gate.clone())),
        None => Box::new(held),
    }
}

/// The protected disk, served in its own thread.
pub struct DiskService {
    /// The gate shared with the sender.
    pub gate: Arc<OutputGate>,
    stop: Arc<AtomicBool>,
    handle: JoinHandle<anyhow::Result<(VbdStatus, VbdStats)>>,
    vdev: String,
    domid: DomId,
    started: Instant,
    usr1: Arc<AtomicBool>,
}

impl DiskService {
    /// Creates the disk device of `domid` (before the guest runs) behind a gate whose tap
    /// fires `triggers`, and serves it in a thread. `None` without `--disk`.
    pub fn start(
        domid: DomId,
        args: &CommitArgs,
        triggers: &Triggers,
        usr1: &Arc<AtomicBool>,
    ) -> anyhow::Result<Option<DiskService>> {
        let Some(image) = args.disk.clone() else {
            return Ok(None);
        };
        let devid = vdev_to_devid(&args.vdev)?;
        let gate = OutputGate::new(1, Box::new(TriggerTap(triggers.clone())));
        if let Some(path) = &args.commit_log {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening the commit log {}", path.display()))?;
            gate.set_commit_log(Box::new(std::io::BufWriter::new(f)));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<String>>();
        let (g, s, vdev) = (gate.clone(), stop.clone(), args.vdev.clone());
        let takeover = args.takeover;
        let handle = std::thread::Builder::new()
            .name("blkback".into())
            .spawn(move || -> anyhow::Result<(VbdStatus, VbdStats)> {
                let setup = || -> anyhow::Result<(hypervisor::xen::XenHost, VbdConfig)> {
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
                    Ok((host, config))
                };
                let (host, config) = match setup() {
                    Ok(x) => x,
                    Err(e) => {
                        let msg = format!("{e:#}");
                        let _ = ready_tx.send(Err(e));
                        anyhow::bail!(msg);
                    }
                };
                let hv: &dyn Hypervisor = &host;
                let created = hv
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
                    });
                let mut vbd = match created {
                    Ok(v) => v,
                    Err(e) => {
                        let msg = format!("{e:#}");
                        let _ = ready_tx.send(Err(e));
                        anyhow::bail!(msg);
                    }
                };
                if let Err(e) = vbd.protect(g) {
                    let msg = format!("{e:#}");
                    let _ = ready_tx.send(Err(e.into()));
                    anyhow::bail!(msg);
                }
                let _ = ready_tx.send(Ok(vbd.paths().backend.clone()));
                let status = vbd.run(&s).context("serving the disk")?;
                Ok((status, vbd.stats().clone()))
            })
            .context("starting the disk thread")?;
        let backend = ready_rx
            .recv()
            .context("the disk thread ended before the device existed")??;
        eprintln!(
            "kemari replicate: domain {domid} {} served from {} at {backend} under output commit",
            args.vdev,
            args.disk
                .as_deref()
                .unwrap_or(std::path::Path::new("?"))
                .display()
        );
        Ok(Some(DiskService {
            gate,
            stop,
            handle,
            vdev: args.vdev.clone(),
            domid,
            started: Instant::now(),
            usr1: usr1.clone(),
        }))
    }

    /// After protection: with the guest held paused, serve what the last ACK released and
    /// stop (requests of the next epoch are dropped unanswered: the guest is kept at the ACKed
    /// state). Otherwise the guest runs on UNPROTECTED: held output is released and the disk
    /// is served until the guest is gone or SIGINT/SIGTERM (`triggers.stop`) or SIGUSR1.
    pub fn finish(self, held: bool, triggers: &Triggers, json: bool) -> anyhow::Result<()> {
        if !held {
            self.gate.end();
            eprintln!(
                "kemari replicate: protection over: domain {} runs unprotected, its disk is served until it is gone or SIGTERM/SIGUSR1",
                self.domid
            );
            while !triggers.stopped()
                && !self.usr1.load(Ordering::SeqCst)
                && !self.handle.is_finished()
            {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        self.stop.store(true, Ordering::SeqCst);
        self.gate.flush_commit_log();
        let (status, s) = self
            .handle
            .join()
            .map_err(|_| anyhow::anyhow!("the disk thread panicked"))??;
        self.gate.flush_commit_log();
        let secs = self.started.elapsed().as_secs_f64();
        if json {
            let v = serde_json::json!({
                "device": self.vdev,
                "status": format!("{status:?}"),
                "seconds": secs,
                "requests": s.requests,
                "held": s.held,
                "held_dropped": s.held_dropped,
                "read_bytes": s.read_bytes,
                "write_bytes": s.write_bytes,
                "flushes": s.flushes,
                "discards": s.discards,
                "errors": s.errors,
                "last_ack": self.gate.released(),
            });
            println!("{v}");
        } else {
            println!(
                "kemari replicate: disk {}: {status:?}; {} requests answered, {} held for output commit, {} dropped unanswered, {} MiB read, {} MiB written, {} flushes, {} errors, last ACK {}",
                self.vdev,
                s.requests,
                s.held,
                s.held_dropped,
                s.read_bytes >> 20,
                s.write_bytes >> 20,
                s.flushes,
                s.errors,
                self.gate.released()
            );
        }
        Ok(())
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
