//! `kemari replicate`, `kemari receive` and the sync-related `kemari debug` commands.
//!
//! These run the sync engine in the foreground. They are the lab's handle on it until the
//! control API (issue 7) exists; the daemon will then run the same engine.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand};
use hypervisor::{DomainControl, GuestType, Hypervisor};
use kemarid::failover::heartbeat::{Heartbeat, HeartbeatConfig, PeerState, Role, SystemClock};
use kemarid::sync::hash::{cpu_hashes, mem_hash};
use kemarid::sync::receiver::{read_staged, Receiver, ReceiverOptions};
use kemarid::sync::replica_xl::XlReplicaBuilder;
use kemarid::sync::sender::{CountHook, DeviceState, Quiesce, Sender, SenderOptions};
use kemarid::sync::trigger::Triggers;
use kemarid::xltool::XlTool;
use nix::sys::signal::{SigSet, Signal};

/// Top-level commands of the sync engine.
#[derive(Subcommand, Debug)]
pub enum SyncCommand {
    /// Protect a guest by hand (foreground; the lab's handle until the control API exists):
    /// connect to `kemari receive` on the secondary, copy the guest live (progress lines), then
    /// take checkpoints at the maximum epoch interval until --checkpoints are ACKed (forever
    /// without it). With --hold the guest is left PAUSED right after the last ACK, exactly at
    /// the state the secondary holds. Prints a final stats line (--json: one JSON object).
    Replicate(ReplicateArgs),
    /// Serve one primary (foreground; the lab's handle until the control API exists): spool the
    /// initial image into --spool-dir, build the replica paused with `xl restore -p`, apply and
    /// ACK checkpoints until the stream ends. The replica is left paused; the staged CPU/device
    /// state of the last checkpoint is in DIR/staged.kemari (see `kemari debug staged-context`).
    Receive(ReceiveArgs),
    /// Protect again a guest that runs here after a failover (same options as replicate):
    /// with --disk, its disk device, still served by `kemari receive` after the failover, is
    /// taken over (Kemari's `Attached` state: the live ring and in-flight journal, no
    /// handshake) and put under output commit. Before it: `xl pause GUEST`, SIGUSR1 to that
    /// `kemari receive` (it hands the disk over), and the disk copied to the new secondary;
    /// give --unpause. A full initial sync follows (docs/failover.md, re-protection).
    Protect(ReplicateArgs),
    /// The fencing guardian `kemari replicate` starts (internal).
    #[command(hide = true)]
    FenceGuard(crate::fence_cmd::FenceGuardArgs),
}

/// Arguments of `kemari replicate`.
#[derive(Args, Debug)]
pub struct ReplicateArgs {
    /// Domain id or name (HVM or PVH).
    pub domain: String,
    /// The secondary's `kemari receive` address.
    pub target: String,
    /// Stop after this many checkpoints.
    #[arg(long)]
    pub checkpoints: Option<u64>,
    /// Maximum epoch interval: a checkpoint at least this often (ms).
    #[arg(long, default_value_t = 100)]
    pub interval_ms: u64,
    /// Minimum run time: the guest runs at least this long between two checkpoints, however
    /// many I/O triggers are pending (they coalesce into the next one). 0: none. Bounds the
    /// checkpoint rate of a guest whose output is always held (docs/sync.md).
    #[arg(long, default_value_t = 0)]
    pub min_run_ms: u64,
    /// Leave the guest paused right after the last checkpoint's ACK (needs --checkpoints).
    #[arg(long, requires = "checkpoints")]
    pub hold: bool,
    /// Seconds to wait for each checkpoint's ACK.
    #[arg(long, default_value_t = 30)]
    pub ack_timeout_s: u64,
    /// Most live rounds after the first full copy.
    #[arg(long, default_value_t = 8)]
    pub max_live_rounds: u32,
    /// Name of the replica in the image's configuration (default: the guest's name).
    #[arg(long)]
    pub replica_name: Option<String>,
    /// Checkpoints at a cooperative suspend point (as Remus: the guest suspends, is copied,
    /// and resumes with its suspend cancelled) instead of a toolstack pause: what lets the
    /// secondary resume a PV-aware guest (docs/failover.md).
    #[arg(long)]
    pub suspend: bool,
    /// Seconds the guest may take to suspend for one checkpoint (--suspend).
    #[arg(long, default_value_t = kemarid::daemon::config::DEFAULT_SUSPEND_TIMEOUT_S)]
    pub suspend_timeout_s: u64,
    /// UDP port of the secondary's heartbeat (`kemari receive --heartbeat-listen`), on the
    /// target's host: when the secondary stops answering, protection ends at once.
    #[arg(long)]
    pub heartbeat_port: Option<u16>,
    #[command(flatten)]
    pub heartbeat: HeartbeatArgs,
    /// Do not start the fence guard. With --heartbeat-port a guardian process pauses and
    /// destroys the guest if this process dies or hangs while protection is on, before the
    /// secondary (which then hears no heartbeat) resumes its copy (docs/failover.md).
    #[arg(long)]
    pub no_fence: bool,
    /// Worker of kemarid: rewrite this status file (JSON, docs/api.md) as protection goes; a
    /// SIGUSR2 then asks for a checkpoint now.
    #[arg(long)]
    pub status_file: Option<PathBuf>,
    /// Output commit: the guest's disk served here (--disk, --vdev, --unpause, --commit-log).
    #[command(flatten)]
    pub commit: crate::commit_cmd::CommitArgs,
}

/// Heartbeat timing (both ends should agree).
#[derive(Args, Debug, Clone, Copy)]
pub struct HeartbeatArgs {
    /// Heartbeat period (ms).
    #[arg(long, default_value_t = 100)]
    pub heartbeat_ms: u64,
    /// The peer is dead after this many missed heartbeats.
    #[arg(long, default_value_t = 5)]
    pub heartbeat_misses: u32,
}

impl HeartbeatArgs {
    fn config(&self) -> HeartbeatConfig {
        HeartbeatConfig {
            period: Duration::from_millis(self.heartbeat_ms),
            misses: self.heartbeat_misses,
            connect_timeout: None,
        }
    }
}

/// How `kemari receive --failover` resumes the guest.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailoverMethodArg {
    /// xl save image from the replica + staged state, destroy the replica, xl restore.
    Restore,
    /// Load the staged HVM context into the replica and unpause it (experiment only).
    InPlace,
}

/// Arguments of `kemari receive`.
#[derive(Args, Debug)]
pub struct ReceiveArgs {
    /// Address to listen on (`0.0.0.0:7100`).
    #[arg(long)]
    pub listen: String,
    /// Folder for the spooled image and the staged state.
    #[arg(long)]
    pub spool_dir: PathBuf,
    /// Serve one connection, then exit.
    #[arg(long)]
    pub once: bool,
    /// Name of the replica domain (default: the name in the image).
    #[arg(long)]
    pub name: Option<String>,
    /// Give up when the primary is silent this long (s; 0: never).
    #[arg(long, default_value_t = 600)]
    pub idle_timeout_s: u64,
    /// UDP address to answer the primary's heartbeat on (`0.0.0.0:7101`).
    #[arg(long)]
    pub heartbeat_listen: Option<String>,
    #[command(flatten)]
    pub heartbeat: HeartbeatArgs,
    /// The secondary's copy of the guest's disk (--disk, --vdev).
    #[command(flatten)]
    pub disk: crate::commit_cmd::ReceiveDiskArgs,
    /// The guest's NIC after a failover (--vif).
    #[command(flatten)]
    pub net: crate::commit_cmd::ReceiveNetArgs,
    /// Worker of kemarid: rewrite this status file (JSON, docs/api.md) as the replica is kept;
    /// a SIGUSR2 then asks for a failover now (treated as the primary's death).
    #[arg(long)]
    pub status_file: Option<PathBuf>,
    /// When the primary is dead (heartbeat) after the initial sync, run the guest here from
    /// the last ACKed checkpoint.
    #[arg(long, requires = "heartbeat_listen")]
    pub failover: bool,
    /// How the guest is resumed at failover.
    #[arg(long, value_enum, default_value = "restore")]
    pub failover_method: FailoverMethodArg,
}

/// Sync-related `kemari debug` commands.
#[derive(Subcommand, Debug)]
pub enum SyncDebug {
    /// Hash every populated page of a domain (pause it first for a meaningful result).
    MemHash {
        /// Domain id or name.
        domain: String,
        /// Also list each page's hash.
        #[arg(long)]
        per_page: bool,
    },
    /// List the guest pages Xen keeps mapped and writes itself (vcpu_info, runstate, FIFO event
    /// arrays): log-dirty on, one final-round harvest (XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL), off.
    /// Pause the domain first, or pages the guest writes meanwhile are listed too.
    XenMapped {
        /// Domain id or name.
        domain: String,
    },
    /// Print the non-zero 16-byte lines of one guest page in hex (to diff a page across hosts).
    PageDump {
        /// Domain id or name.
        domain: String,
        /// Guest page frame number (decimal or 0x-prefixed hex).
        pfn: String,
    },
    /// Fingerprint of each vCPU's HVM_SAVE_CPU record of a domain's current HVM context (the
    /// `tsc` field, which Xen recomputes at every save, is excluded from the hash and printed).
    CpuContext {
        /// Domain id or name.
        domain: String,
    },
    /// The same fingerprints for the staged state a `kemari receive` wrote (DIR/staged.kemari).
    StagedContext {
        /// The staged state file.
        file: PathBuf,
    },
    /// List the disk write log a `kemari receive --disk` kept (DIR/disklog.kemari: the last
    /// applied checkpoint's writes) or was applying when it died (DIR/disklog.kemari.tmp); with
    /// --replay, write its entries to the copy (idempotent: brings a copy left between two
    /// checkpoints by a receiver that died while applying to that checkpoint).
    DiskLog {
        /// The log file.
        file: PathBuf,
        /// The secondary's copy of the disk to write the entries to.
        #[arg(long)]
        replay: Option<PathBuf>,
        /// Virtual device the copy stands for.
        #[arg(long, default_value = "xvda")]
        vdev: String,
    },
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

fn open_host() -> anyhow::Result<hypervisor::xen::XenHost> {
    hypervisor::xen::XenHost::open()
        .context("cannot open this host's Xen (run in a Xen 4.17 dom0, as root)")
}

/// Runs a top-level sync command.
pub fn run(cmd: SyncCommand, json: bool) -> anyhow::Result<ExitCode> {
    match cmd {
        SyncCommand::Replicate(a) => {
            let status_file = a.status_file.clone();
            report_failure(status_file, replicate(a, json))
        }
        SyncCommand::Receive(a) => {
            let status_file = a.status_file.clone();
            report_failure(status_file, receive(a, json))
        }
        SyncCommand::FenceGuard(a) => crate::fence_cmd::run_guard(a),
        SyncCommand::Protect(mut a) => {
            if a.commit.disk.is_some() {
                let host = open_host()?;
                let domid = kemarid::debug::resolve_domain(&host, &a.domain)?;
                let info = host.domain_info(domid)?;
                anyhow::ensure!(
                    info.paused,
                    "kemari protect: domain {domid} runs: pause it (xl pause) before taking its disk over, so that the copy on the new secondary equals it"
                );
                a.commit.takeover = true;
            }
            replicate(a, json)
        }
    }
}

/// As kemarid's worker: an error that ends the command before it reported an end goes into
/// the status file.
fn report_failure(
    status_file: Option<PathBuf>,
    r: anyhow::Result<ExitCode>,
) -> anyhow::Result<ExitCode> {
    if let (Some(p), Err(e)) = (&status_file, &r) {
        kemarid::daemon::report::mark_failed(p, &format!("{e:#}"));
    }
    r
}
/// Stands for `kemarid::failover::failpoint::FailPoint` in a build without the `failpoints`
/// feature: there is none.
#[cfg(not(feature = "failpoints"))]
enum NoFailPoint {}

#[cfg(not(feature = "failpoints"))]
impl NoFailPoint {
    fn initial_progress(&mut self) -> bool {
        match *self {}
    }

    fn hook<'a>(
        self,
        _inner: Box<dyn kemarid::sync::sender::CheckpointHook + 'a>,
    ) -> Box<dyn kemarid::sync::sender::CheckpointHook + 'a> {
        match self {}
    }
}

/// Without the `failpoints` feature a kill window asked for is refused, not silently ignored.
#[cfg(not(feature = "failpoints"))]
fn no_failpoints() -> anyhow::Result<Option<NoFailPoint>> {
    if std::env::var_os("KEMARI_DEBUG_FAILPOINT").is_some() {
        anyhow::bail!(
            "KEMARI_DEBUG_FAILPOINT is set, but this kemari was built without the failpoints \
             feature (the lab's build: cargo build --release -p kemarid --features failpoints)"
        );
    }
    Ok(None)
}

fn replicate(a: ReplicateArgs, json: bool) -> anyhow::Result<ExitCode> {
    // before any thread starts: SIGUSR1 asks for a held stop (commit_cmd)
    let usr1 = crate::commit_cmd::block_usr1()?;
    // as kemarid's worker: SIGUSR2 (checkpoint now) blocked before any thread starts
    let daemon_signal = match a.status_file {
        Some(_) => Some(kemarid::daemon::report::DaemonSignal::block()?),
        None => None,
    };
    let status = kemarid::daemon::report::StatusWriter::new(
        a.status_file.as_deref(),
        kemarid::api::Role::Primary,
    )?;
    let host = open_host()?;
    let hv: &dyn Hypervisor = &host;
    let domid = kemarid::debug::resolve_domain(hv, &a.domain)?;
    status.domid(u32::from(domid));
    let info = hv.domain_info(domid)?;
    // A running HVM guest without PV drivers never registered an event-channel callback: it
    // cannot answer a suspend request, so every --suspend checkpoint would time out. Such a
    // guest keeps no state inside Xen that a pause checkpoint misses (docs/failover.md §3).
    if a.suspend && !info.paused {
        let nopv = kemarid::xlsave::hvm_without_pv_drivers(hv, domid, &info)
            .with_context(|| format!("reading domain {domid}'s HVM_PARAM_CALLBACK_IRQ"))?;
        if nopv {
            anyhow::bail!(
                "domain {domid} is an HVM guest without PV drivers (no event-channel callback \
                 registered): it cannot suspend for a checkpoint; protect it without --suspend \
                 (pause checkpoints are complete for such a guest), or wait until its PV \
                 drivers are up if it has them"
            );
        }
    }
    let xs = hv.open_xenstore()?;
    let config =
        kemarid::domconfig::domain_config_json(domid, Some(xs.as_ref()), a.replica_name.as_deref())
            .with_context(|| format!("reading domain {domid}'s configuration"))?;
    let device: Option<Box<dyn DeviceState>> = match info.guest_type {
        GuestType::Hvm => Some(Box::new(
            kemarid::sync::device_qmp::QmpDeviceState::for_domain(domid, hv.open_xenstore()?),
        )),
        _ => None,
    };
    let stream = TcpStream::connect(&a.target)
        .with_context(|| format!("connecting to the secondary at {}", a.target))?;
    let opts = SenderOptions {
        max_live_rounds: a.max_live_rounds,
        ack_timeout: Duration::from_secs(a.ack_timeout_s),
        min_run: Duration::from_millis(a.min_run_ms),
        ..SenderOptions::default()
    };
    // Ctrl-C / SIGTERM end protection cleanly (guest running, log-dirty off, device model
    // resumed) instead of killing the process between a pause and its unpause: the signals are
    // blocked here (and in every thread started later) and a watcher thread turns them into
    // `Triggers::stop`, acted on after the initial sync or the checkpoint in progress.
    let triggers = Triggers::new(Duration::from_millis(a.interval_ms.max(1)));
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals
        .thread_block()
        .context("blocking SIGINT/SIGTERM for a clean stop")?;
    {
        let triggers = triggers.clone();
        std::thread::spawn(move || {
            if let Ok(sig) = signals.wait() {
                eprintln!("kemari replicate: {sig} received, stopping after the step in progress");
                triggers.stop();
            }
        });
    }
    // lab kill windows (KEMARI_DEBUG_FAILPOINT, kemarid::failover::failpoint); off by default,
    // and only in a build with the `failpoints` feature (the lab's)
    #[cfg(feature = "failpoints")]
    let mut failpoint = kemarid::failover::failpoint::FailPoint::from_env()?;
    #[cfg(not(feature = "failpoints"))]
    let mut failpoint = no_failpoints()?;
    let fence = match (a.heartbeat_port, a.no_fence) {
        (Some(_), false) => Some(crate::fence_cmd::start(domid, &a.heartbeat.config())?),
        _ => None,
    };
    let fence = crate::fence_cmd::DisarmOnReturn(fence);
    let heartbeat = match a.heartbeat_port {
        None => None,
        Some(port) => Some(start_pinger(
            &a.target,
            port,
            a.heartbeat,
            &stream,
            fence.0.clone(),
        )?),
    };
    let disk = crate::commit_cmd::start_outputs(domid, &a.commit, &triggers, &usr1)?;
    if let Some(sig) = daemon_signal {
        let t = triggers.clone();
        sig.on_signal(move || t.fire(kemarid::sync::trigger::Reasons::REQUEST))?;
    }
    if heartbeat.is_some() {
        status.heartbeat(
            a.heartbeat.heartbeat_ms,
            a.heartbeat.heartbeat_misses,
            "alive",
        );
    }
    crate::commit_cmd::hold_on_usr1(usr1.clone(), triggers.clone())?;
    let end_disk = |disk: Option<kemarid::session::outputs::Outputs>| {
        if let Some(d) = disk {
            if let Err(e) = crate::commit_cmd::finish(d, false, &triggers, json) {
                eprintln!("kemari replicate: disk: {e:#}");
            }
        }
    };
    let mut tx = Sender::new(hv, domid, stream, opts, device)?;
    tx.set_observer(status.observer());
    // A guest created paused and unpaused after the initial sync (--unpause) has not run yet:
    // it cannot answer a suspend request, and a paused copy of it is already a clean state to
    // start from. Its initial image is taken paused; checkpoints are at suspend points.
    let suspend_after_unpause = a.suspend && a.commit.unpause && info.paused;
    if a.suspend && !suspend_after_unpause {
        tx.set_quiesce(Quiesce::Suspend {
            xenstore: hv.open_xenstore()?,
            timeout: Duration::from_secs(a.suspend_timeout_s),
        });
    }
    let start = Instant::now();
    let lost = |what: &str, e: &kemarid::sync::sender::SendError, hb: Option<Heartbeat>| {
        let (cause, dead) = match hb.as_ref().map(Heartbeat::state) {
            Some(PeerState::Dead(c)) => (format!("heartbeat: {c:?}"), true),
            _ => (format!("stream: {e}"), false),
        };
        // The guest keeps running here: no fencing; a secondary that still answers is told
        // goodbye, or it would resume a second copy once this process is gone.
        fence.disarm();
        if let Some(hb) = hb {
            hb.stop(!dead);
        }
        if !dead && !e.peer_lost() {
            // a failure here, not of the secondary: the operator is told what happened to
            // the guest
            let guest = match hv.domain_info(domid) {
                Ok(i) if i.shutdown.is_none() => "keeps running UNPROTECTED".to_string(),
                Ok(i) => format!("has shut down ({:?})", i.shutdown),
                Err(_) => "is gone".to_string(),
            };
            log::error!("protection failed on this host {what}: {e}");
            status.finish(
                kemarid::api::GuestState::Failed,
                Some(format!("protection failed on this host {what}: {e}")),
            );
            eprintln!(
                "kemari replicate: PROTECTION FAILED on this host {what} ({e}): guest {domid} {guest}; the secondary was told not to fail over"
            );
            return;
        }
        log::error!("secondary lost {what}: {cause}");
        if dead {
            status.heartbeat(
                a.heartbeat.heartbeat_ms,
                a.heartbeat.heartbeat_misses,
                "dead",
            );
        }
        status.finish(
            kemarid::api::GuestState::Failed,
            Some(format!("secondary lost {what}: {cause}")),
        );
        eprintln!(
            "kemari replicate: SECONDARY LOST {what} ({cause}): guest {domid} keeps running UNPROTECTED"
        );
    };
    let init = tx.initial_sync(&config, &mut |p| {
        status.initial_round(p.round, p.round_pages, p.total_pages);
        if let Some(fp) = failpoint.as_mut() {
            fp.initial_progress();
        }
        eprintln!(
            "initial sync: round {} sent {} pages (total {}, {} holes), {} dirty after it ({:.0} pages/s){}",
            p.round,
            p.round_pages,
            p.total_pages,
            p.holes,
            p.dirty_after,
            p.dirty_rate,
            if p.last { ", final round next" } else { "" }
        );
    });
    let init = match init {
        Ok(i) => i,
        Err(e) => {
            drop(tx);
            lost("during the initial sync", &e, heartbeat);
            end_disk(disk);
            return Err(e.into());
        }
    };
    eprintln!(
        "initial sync: {} live + {} final pages, {} bytes, paused {:.1} ms, ACKed after {:.0} ms",
        init.live_pages, init.final_pages, init.bytes, init.pause_ms, init.total_ms
    );
    status.initial_done();
    if triggers.stopped() {
        drop(tx);
        eprintln!(
            "kemari replicate: stopped after the initial sync; guest {domid} runs unprotected"
        );
        end_disk(disk);
        return Ok(ExitCode::FAILURE);
    }
    if let Some(g) = &fence.0 {
        g.arm().context("arming the fence guard")?;
        eprintln!("kemari replicate: fence guard armed");
    }
    crate::commit_cmd::unpause_if_asked(&a.commit, hv, domid)?;
    if suspend_after_unpause {
        eprintln!("kemari replicate: the initial image of paused domain {domid} was taken paused; checkpoints at suspend points from now on");
        tx.set_quiesce(Quiesce::Suspend {
            xenstore: hv.open_xenstore()?,
            timeout: Duration::from_secs(a.suspend_timeout_s),
        });
    }
    let mut hook = kemarid::session::hook::hook(
        CountHook {
            limit: a.checkpoints,
            hold: a.hold,
        },
        usr1,
        disk.as_ref(),
        a.suspend,
    );
    if a.suspend && a.commit.disk.is_some() {
        eprintln!("kemari replicate: --suspend with --disk: each epoch's disk writes are released when its checkpoint's suspend is requested, not after its ACK (the guest freezes its tasks to suspend; docs/failover.md)");
    }
    if let Some(fp) = failpoint.take() {
        hook = fp.hook(hook);
    }
    let protect_start = Instant::now();
    let out = match tx.protect(&triggers, &mut *hook) {
        Ok(o) => o,
        Err(e) => {
            let s = tx.stats();
            drop(tx);
            eprintln!(
                "kemari replicate: {} checkpoints ACKed before the loss (pause mean {:.1} ms, p99 {:.1} ms, {:.1} pages each)",
                s.checkpoints, s.pause_mean_ms, s.pause_p99_ms, s.pages_mean
            );
            lost("during protection", &e, heartbeat);
            drop(hook);
            end_disk(disk);
            return Err(e.into());
        }
    };
    let secs = protect_start.elapsed().as_secs_f64();
    status.finish(kemarid::api::GuestState::Stopped, None);
    drop(tx);
    fence.disarm();
    if let Some(hb) = heartbeat {
        // Protection ended on purpose: tell the secondary not to fail over.
        hb.stop(true);
    }
    let s = &out.stats;
    let rate = if secs > 0.0 {
        s.checkpoints as f64 / secs
    } else {
        0.0
    };
    if json {
        print_json(&serde_json::json!({
            "domid": domid,
            "initial": init,
            "checkpoints": s,
            "checkpoints_per_s": rate,
            "protect_s": secs,
            "last_seq": out.last_seq,
            "held_paused": out.held_paused,
            "total_s": start.elapsed().as_secs_f64(),
        }))?;
    } else {
        println!(
            "replicated domain {domid}: checkpoints={} per_s={rate:.2} pause_mean_ms={:.2} pause_p99_ms={:.2} pause_max_ms={:.2} pages_mean={:.1} pages_max={} bytes={} ack_wait_mean_ms={:.2} coalesced={} last_seq={} held_paused={}",
            s.checkpoints,
            s.pause_mean_ms,
            s.pause_p99_ms,
            s.pause_max_ms,
            s.pages_mean,
            s.pages_max,
            s.bytes,
            s.ack_wait_mean_ms,
            s.coalesced,
            out.last_seq,
            out.held_paused
        );
    }
    drop(hook);
    if let Some(d) = disk {
        crate::commit_cmd::finish(d, out.held_paused, &triggers, json)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Starts the primary's heartbeat to `target`'s host on `port`; when the secondary is
/// declared dead, the data stream is shut down so that protection ends at once (the guest
/// keeps running) instead of waiting for an ACK timeout.
fn start_pinger(
    target: &str,
    port: u16,
    hb: HeartbeatArgs,
    stream: &TcpStream,
    fence: Option<crate::fence_cmd::SharedGuard>,
) -> anyhow::Result<Heartbeat> {
    let mut peer = stream
        .peer_addr()
        .with_context(|| format!("address of the secondary {target}"))?;
    peer.set_port(port);
    let socket = std::net::UdpSocket::bind(if peer.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })
    .context("binding the heartbeat socket")?;
    let data = stream
        .try_clone()
        .context("cloning the connection for the heartbeat")?;
    let cfg = hb.config();
    let heartbeat = Heartbeat::spawn_with_ping_hook(
        socket,
        Role::Pinger { peer },
        cfg,
        Arc::new(SystemClock::new()),
        Box::new(move |state| {
            eprintln!("kemari replicate: heartbeat: secondary {peer} is dead ({state:?})");
            if let Err(e) = data.shutdown(std::net::Shutdown::Both) {
                log::warn!("shutting the data stream down: {e}");
            }
        }),
        // the fence guard hears this process exactly as long as the secondary does
        fence.map(|g| Box::new(move || g.tick()) as Box<dyn Fn() + Send>),
    )?;
    eprintln!(
        "kemari replicate: heartbeat to {peer} every {} ms, dead after {} misses ({} ms)",
        hb.heartbeat_ms,
        hb.heartbeat_misses,
        cfg.detection_time().as_millis()
    );
    Ok(heartbeat)
}

fn this_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "this host".into())
}

fn receive(a: ReceiveArgs, json: bool) -> anyhow::Result<ExitCode> {
    // as kemarid's worker: SIGUSR2 (fail over now) blocked before any thread starts
    let daemon_signal = match a.status_file {
        Some(_) => Some(kemarid::daemon::report::DaemonSignal::block()?),
        None => None,
    };
    let status = kemarid::daemon::report::StatusWriter::new(
        a.status_file.as_deref(),
        kemarid::api::Role::Secondary,
    )?;
    let forced = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let current: Arc<std::sync::Mutex<Option<TcpStream>>> = Arc::default();
    if let Some(sig) = daemon_signal {
        let (f, c) = (forced.clone(), current.clone());
        sig.on_signal(move || {
            eprintln!("kemari receive: failover asked (SIGUSR2)");
            f.store(true, std::sync::atomic::Ordering::SeqCst);
            let c = c.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(s) = c.as_ref() {
                // the receiver discards a checkpoint it has not read whole: the replica
                // stays at the last ACK
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        })?;
    }
    // With --failover --disk this process serves the guest's disk after a failover, until the
    // guest is gone or SIGINT/SIGTERM: blocked here, before any thread starts. Before the
    // failover a signal ends the process as it would without the handler.
    anyhow::ensure!(
        a.net.vif.is_none() || a.failover,
        "--vif serves the guest's NIC after a failover: it needs --failover"
    );
    a.net.spec()?;
    let disk_stop = match (a.failover, a.disk.disk.is_some() || a.net.vif.is_some()) {
        (true, true) => Some(failover_signals()?),
        _ => None,
    };
    let host = Arc::new(open_host()?);
    let control: Arc<dyn DomainControl> = host.clone();
    let builder = XlReplicaBuilder::new(XlTool::default(), Some(control));
    let rx = Receiver::new(
        host.as_ref(),
        &builder,
        ReceiverOptions {
            spool_dir: a.spool_dir.clone(),
            name: a.name.clone(),
            limits: kemari_stream::Limits::default(),
            idle_timeout: (a.idle_timeout_s > 0).then(|| Duration::from_secs(a.idle_timeout_s)),
        },
    )
    .with_disks(a.disk.disks()?)
    .with_observer(status.session_observer());
    let listener =
        TcpListener::bind(&a.listen).with_context(|| format!("listening on {}", a.listen))?;
    eprintln!("kemari receive: listening on {}", a.listen);
    let hb_socket = match &a.heartbeat_listen {
        None => None,
        Some(addr) => {
            let s = std::net::UdpSocket::bind(addr)
                .with_context(|| format!("binding the heartbeat socket {addr}"))?;
            eprintln!(
                "kemari receive: heartbeat on {addr}, every {} ms, dead after {} misses",
                a.heartbeat.heartbeat_ms, a.heartbeat.heartbeat_misses
            );
            Some(s)
        }
    };
    loop {
        let (stream, peer) = listener.accept().context("accepting a connection")?;
        eprintln!("kemari receive: primary {peer} connected");
        status.state(kemarid::api::GuestState::InitialSync);
        if a.heartbeat_listen.is_some() {
            status.heartbeat(
                a.heartbeat.heartbeat_ms,
                a.heartbeat.heartbeat_misses,
                "alive",
            );
        }
        *current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = stream.try_clone().ok();
        let heartbeat = match &hb_socket {
            None => None,
            Some(s) => {
                let data = stream
                    .try_clone()
                    .context("cloning the connection for the heartbeat")?;
                Some(Heartbeat::spawn(
                    s.try_clone().context("cloning the heartbeat socket")?,
                    Role::Responder,
                    a.heartbeat.config(),
                    Arc::new(SystemClock::new()),
                    Box::new(move |state| {
                        // unix time: the lab orders it against the primary's fence guard
                        let at = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map(|d| d.as_secs_f64())
                            .unwrap_or(0.0);
                        eprintln!("kemari receive: heartbeat: primary {peer} is dead ({state:?}) at {at:.3} (unix time)");
                        // Unblock the receiver: the replica stays at the last ACKed checkpoint.
                        if let Err(e) = data.shutdown(std::net::Shutdown::Both) {
                            log::warn!("shutting the data stream down: {e}");
                        }
                    }),
                )?)
            }
        };
        let start = Instant::now();
        let (session, error) = match rx.serve(stream) {
            Ok(s) => (s, None),
            Err(f) => (*f.session, Some(f.error)),
        };
        let secs = start.elapsed().as_secs_f64();
        let failover = match &heartbeat {
            Some(hb) if a.failover => {
                let cfg = a.heartbeat.config();
                let state = if forced.load(std::sync::atomic::Ordering::SeqCst) {
                    // kemarid's `failover` (it checked the primary is silent, or was forced)
                    PeerState::Dead(kemarid::failover::heartbeat::DeathCause::Missed {
                        missed: 0,
                        silent: hb.silent_for().unwrap_or_default(),
                        stream_lost: true,
                    })
                } else if error.is_some() {
                    // A stream error counts as a loss; the heartbeat must agree.
                    hb.stream_lost();
                    hb.wait_final(cfg.detection_time() + cfg.period)
                } else {
                    // A clean end between frames is a deliberate stop only if the primary
                    // says goodbye (right after closing the stream); a primary whose process
                    // died closes the stream too, and then falls silent: its guest was fenced
                    // there (docs/failover.md), so this is a failover.
                    hb.wait_final(cfg.detection_time() + cfg.period)
                };
                match (state, session.replica) {
                    (PeerState::Dead(cause), Some(replica)) if session.acked.is_some() => {
                        eprintln!(
                            "kemari receive: primary dead ({cause:?}) after checkpoint {}: failing over",
                            session.acked.unwrap_or(0)
                        );
                        Some(fail_over(&a, host.as_ref(), &rx, replica, hb)?)
                    }
                    (PeerState::Dead(cause), _) => {
                        eprintln!("kemari receive: primary dead ({cause:?}) before the initial sync completed: REFUSING FAILOVER, no consistent replica exists on this host (the guest is lost with its host)");
                        log::error!("failover refused: the primary died during the initial sync");
                        None
                    }
                    (state, _) => {
                        if error.is_some() {
                            eprintln!("kemari receive: stream failed but the primary still answers ({state:?}): no failover (split-brain guard)");
                        }
                        None
                    }
                }
            }
            _ => None,
        };
        drop(heartbeat);
        match failover.as_ref().map(|f| &f.0) {
            Some(v) => {
                status.heartbeat(
                    a.heartbeat.heartbeat_ms,
                    a.heartbeat.heartbeat_misses,
                    "dead",
                );
                status.failed_over(
                    v["report"]["domid"]
                        .as_u64()
                        .and_then(|d| u32::try_from(d).ok()),
                    v["report"]["seq"].as_u64(),
                );
            }
            None => status.finish(
                if error.is_some() {
                    kemarid::api::GuestState::Failed
                } else {
                    kemarid::api::GuestState::Stopped
                },
                error.as_ref().map(|e| format!("{e:#}")),
            ),
        }
        if json {
            print_json(&serde_json::json!({
                "peer": peer.to_string(),
                "replica": session.replica,
                "acked": session.acked,
                "checkpoints": session.checkpoints,
                "pages": session.pages,
                "image_pages": session.image_pages,
                "image_bytes": session.image_bytes,
                "seconds": secs,
                "error": error.as_ref().map(|e| format!("{e:#}")),
                "staged": rx.staged_path(),
                "disk_entries": session.disk_entries,
                "skipped_pages": session.skipped_pages,
                "disk_bytes": session.disk_bytes,
                "failover": failover.as_ref().map(|(v, _, _)| v),
            }))?;
        } else {
            println!(
                "received from {peer}: replica={} acked={} checkpoints={} pages={} image_pages={} image_bytes={} seconds={secs:.1}{}",
                session.replica.map_or("-".into(), |d| d.to_string()),
                session.acked.map_or("-".into(), |s| s.to_string()),
                session.checkpoints,
                session.pages,
                session.image_pages,
                session.image_bytes,
                error.as_ref().map_or(String::new(), |e| format!(" error: {e}"))
            );
        }
        if let Some((_, vbd, vif)) = failover {
            // This host now runs the guest, unprotected.
            if let Some(stop) = &disk_stop {
                std::thread::scope(|scope| -> anyhow::Result<()> {
                    let net = vif.map(|v| {
                        scope.spawn(move || crate::commit_cmd::serve_failover_vif(v, &stop.1, json))
                    });
                    let disk = match vbd {
                        Some(vbd) => serve_failover_disk(vbd, stop, &a.disk.vdev, json),
                        None => {
                            stop.0.store(true, std::sync::atomic::Ordering::SeqCst);
                            Ok(())
                        }
                    };
                    // the disk's line first (its counters end when the guest is gone, as
                    // the NIC's), then the NIC's
                    if let Some(n) = net {
                        let line = n
                            .join()
                            .map_err(|_| anyhow::anyhow!("the vif thread panicked"))??;
                        println!("{line}");
                    }
                    disk
                })?;
            }
            return Ok(ExitCode::SUCCESS);
        }
        if a.once {
            return Ok(if error.is_some() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            });
        }
    }
}

/// `--failover --disk`: SIGINT/SIGTERM blocked in this thread (and the threads it starts); a
/// watcher sets the returned flag once the disk is served after a failover, and ends the process
/// (status 143) before that.
///
/// SIGUSR1 while the disk is served after a failover hands the disk over (`kemari protect`
/// takes it over, docs/failover.md): serving stops, the device's nodes, the guest's ring and
/// its connected frontend stay as they are; before that SIGUSR1 is ignored.
fn failover_signals() -> anyhow::Result<
    Arc<(
        std::sync::atomic::AtomicBool,
        std::sync::atomic::AtomicBool,
        std::sync::atomic::AtomicBool,
    )>,
> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGUSR1);
    set.thread_block()
        .context("blocking SIGINT/SIGTERM/SIGUSR1 for the failover disk")?;
    // (serving the disk, stop asked, hand over asked)
    let flags = Arc::new((
        AtomicBool::new(false),
        AtomicBool::new(false),
        AtomicBool::new(false),
    ));
    let f = flags.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            while let Ok(sig) = set.wait() {
                let serving = f.0.load(Ordering::SeqCst);
                if sig == Signal::SIGUSR1 {
                    if serving {
                        eprintln!(
                            "kemari receive: SIGUSR1 received, handing the guest's disk over"
                        );
                        f.2.store(true, Ordering::SeqCst);
                        f.1.store(true, Ordering::SeqCst);
                    } else {
                        eprintln!("kemari receive: SIGUSR1 ignored: no disk is served yet");
                    }
                } else if serving {
                    eprintln!("kemari receive: {sig} received, closing the guest's disk");
                    f.1.store(true, Ordering::SeqCst);
                } else {
                    eprintln!("kemari receive: {sig} received");
                    std::process::exit(143);
                }
            }
        })
        .context("starting the signal thread")?;
    Ok(flags)
}

/// After a failover with `--disk`: serves the guest's disk until the guest is gone or
/// SIGINT/SIGTERM, then prints the disk's counters (with --json a second JSON line).
fn serve_failover_disk(
    vbd: xenbus_backend::Vbd<'_>,
    flags: &Arc<(
        std::sync::atomic::AtomicBool,
        std::sync::atomic::AtomicBool,
        std::sync::atomic::AtomicBool,
    )>,
    vdev: &str,
    json: bool,
) -> anyhow::Result<()> {
    use std::sync::atomic::Ordering;
    flags.0.store(true, Ordering::SeqCst);
    let domid = vbd.paths().domid;
    eprintln!(
        "kemari receive: serving domain {domid}'s {vdev} at {} until the guest is gone or SIGTERM",
        vbd.paths().backend
    );
    let start = Instant::now();
    let (end, s) = kemarid::failover::disk::serve(vbd, &flags.1, &flags.2)?;
    if end == kemarid::failover::disk::ServeEnd::HandedOver {
        eprintln!(
            "kemari receive: domain {domid}'s {vdev} handed over: its device and ring are left for `kemari protect` to take over"
        );
    }
    let status = format!("{end:?}");
    let secs = start.elapsed().as_secs_f64();
    if json {
        print_json(&serde_json::json!({
            "disk": {
                "device": vdev,
                "domid": domid,
                "status": status,
                "seconds": secs,
                "requests": s.requests,
                "read_bytes": s.read_bytes,
                "write_bytes": s.write_bytes,
                "flushes": s.flushes,
                "discards": s.discards,
                "errors": s.errors,
            }
        }))?;
    } else {
        println!(
            "kemari receive: disk {vdev} of domain {domid}: {status}; {} requests answered in {secs:.1} s, {} MiB read, {} MiB written, {} flushes, {} errors",
            s.requests,
            s.read_bytes >> 20,
            s.write_bytes >> 20,
            s.flushes,
            s.errors
        );
    }
    Ok(())
}

/// The failover itself: the guest runs on this host from the last ACKed checkpoint. With
/// `--disk` the guest is restored paused, its disk is created on the copy and served by the
/// returned device (the caller runs it), then it is unpaused.
fn fail_over<'h>(
    a: &ReceiveArgs,
    hv: &'h dyn Hypervisor,
    rx: &Receiver<'_>,
    replica: hypervisor::DomId,
    hb: &Heartbeat,
) -> anyhow::Result<(
    serde_json::Value,
    Option<xenbus_backend::Vbd<'h>>,
    Option<xenbus_backend::Vif<'h>>,
)> {
    use kemarid::failover::resume;
    let t0 = Instant::now();
    let silent_at_start = hb.silent_for().unwrap_or_default();
    let staged = read_staged(&rx.staged_path())
        .with_context(|| format!("reading {}", rx.staged_path().display()))?;
    let image = a.spool_dir.join(kemarid::sync::receiver::IMAGE_FILE);
    let name = match &a.name {
        Some(n) => n.clone(),
        None => XlReplicaBuilder::image_name(&image)?,
    };
    let disk = a.disk.disks()?.into_iter().next();
    let net = a.net.spec()?;
    let keep_paused = disk.is_some() || net.is_some();
    let report = match a.failover_method {
        FailoverMethodArg::Restore => resume::resume_by_restore_paused(
            hv,
            &XlTool::default(),
            replica,
            &staged,
            &image,
            &a.spool_dir,
            &name,
            keep_paused,
        ),
        FailoverMethodArg::InPlace => {
            resume::resume_in_place_paused(hv, replica, &staged, keep_paused)
        }
    }
    .with_context(|| format!("failover of replica {replica} at checkpoint {}", staged.seq))?;
    // the NIC first (the guest stays paused), then the disk, which unpauses
    let t_net = Instant::now();
    let vif = match &net {
        None => None,
        Some(spec) => Some(
            kemarid::failover::net::create_paused(hv, report.domid, spec).with_context(|| {
                format!(
                    "bringing up vif {} (mac {}) for domain {} (left paused)",
                    spec.vif.devid,
                    spec.vif.mac_string(),
                    report.domid
                )
            })?,
        ),
    };
    let net_ms = t_net.elapsed().as_secs_f64() * 1000.0;
    let t_disk = Instant::now();
    let vbd = disk.as_ref().map(|d| {
        kemarid::failover::disk::serve_and_unpause(
            hv,
            report.domid,
            d,
            Some(PathBuf::from("/run/kemari")),
        )
        .with_context(|| {
            format!(
                "bringing up {} on {} for domain {} (left paused)",
                a.disk.vdev,
                d.path.display(),
                report.domid
            )
        })
    });
    let disk_ms = t_disk.elapsed().as_secs_f64() * 1000.0;
    // the disk's creation unpaused the guest; with a NIC only, unpause it here
    let unpaused = match &vbd {
        Some(r) => r.as_ref().map(|_| ()).map_err(|e| anyhow::anyhow!("{e:#}")),
        None if vif.is_some() => hv
            .unpause(report.domid)
            .with_context(|| format!("unpausing domain {} (left paused)", report.domid)),
        None => Ok(()),
    };
    if let Err(e) = unpaused {
        if let Some((mut v, _)) = vif {
            if let Err(rm) = v.shutdown() {
                log::warn!("removing the vif of domain {}: {rm}", report.domid);
            }
        }
        return Err(e);
    }
    let vbd = vbd.transpose()?;
    let vif = vif.map(|(v, mut announcer)| {
        // the guest runs: tell the bridges where its MAC is now
        std::thread::spawn(move || announcer.run());
        eprintln!(
            "kemari receive: domain {} vif {} (mac {}) on tap {} at {} (created in {net_ms:.0} ms), announced",
            report.domid,
            v.config().devid,
            v.config().mac_string(),
            v.tap_name(),
            v.paths().backend
        );
        v
    });
    if let (Some(d), Some(v)) = (&disk, &vbd) {
        eprintln!(
            "kemari receive: domain {} {} served from {} at {} (created in {disk_ms:.0} ms), guest unpaused",
            report.domid,
            a.disk.vdev,
            d.path.display(),
            v.paths().backend
        );
    }
    let total = silent_at_start + t0.elapsed();
    eprintln!(
        "failover: guest running on {} as domain {} after {} ms (last heartbeat -> running; detection {} ms, image {:.0} ms, destroy {:.0} ms, restore {:.0} ms{}{}), last seq {}",
        this_host(),
        report.domid,
        total.as_millis(),
        silent_at_start.as_millis(),
        report.image_ms,
        report.destroy_ms,
        report.restore_ms,
        if disk.is_some() { format!(", disk {disk_ms:.0} ms") } else { String::new() },
        if vif.is_some() { format!(", vif {net_ms:.0} ms") } else { String::new() },
        report.seq
    );
    eprintln!("kemari receive: this host is now PRIMARY WITHOUT PROTECTION for {name}");
    log::warn!(
        "role: primary, unprotected: guest {name} runs here as domain {}; `kemari protect` protects it again",
        report.domid
    );
    Ok((
        serde_json::json!({
            "host": this_host(),
            "role": "primary, unprotected",
            "name": name,
            "report": report,
            "method": format!("{:?}", a.failover_method),
            "detection_ms": silent_at_start.as_secs_f64() * 1000.0,
            "heartbeat_to_running_ms": total.as_secs_f64() * 1000.0,
            "disk": disk.as_ref().map(|d| serde_json::json!({
                "path": d.path,
                "vdev": a.disk.vdev,
                "ms": disk_ms,
            })),
            "vif": vif.as_ref().map(|v| serde_json::json!({
                "devid": v.config().devid,
                "mac": v.config().mac_string(),
                "tap": v.tap_name(),
                "ms": net_ms,
            })),
        }),
        vbd,
        vif,
    ))
}

/// Runs a sync-related debug command.
pub fn run_debug(hv: &dyn Hypervisor, cmd: SyncDebug, json: bool) -> anyhow::Result<ExitCode> {
    match cmd {
        SyncDebug::MemHash { domain, per_page } => {
            let domid = kemarid::debug::resolve_domain(hv, &domain)?;
            let max = hv.maximum_gpfn(domid)?;
            let h = mem_hash(hv, domid, max, per_page)?;
            if json {
                print_json(&serde_json::json!({"domid": domid, "max_pfn": max, "mem": h}))?;
            } else {
                println!(
                    "domain {domid}: pages={} holes={} hash={}",
                    h.pages, h.holes, h.hash
                );
                for (pfn, ph) in h.per_page.unwrap_or_default() {
                    println!("{pfn:#x} {ph}");
                }
            }
        }
        SyncDebug::XenMapped { domain } => {
            let domid = kemarid::debug::resolve_domain(hv, &domain)?;
            let max = hv.maximum_gpfn(domid)?;
            let mut bitmap = hypervisor::DirtyBitmap::new(max + 1);
            hv.log_dirty_enable(domid)
                .with_context(|| format!("enabling log-dirty on domain {domid}"))?;
            let r = hv.log_dirty_clean_final(domid, &mut bitmap);
            if let Err(e) = hv.log_dirty_disable(domid) {
                eprintln!("kemari: turning log-dirty off on domain {domid}: {e}");
            }
            r.with_context(|| format!("final log-dirty harvest of domain {domid}"))?;
            let pfns: Vec<u64> = bitmap.iter().collect();
            if json {
                print_json(&serde_json::json!({"domid": domid, "pfns": pfns}))?;
            } else {
                let hex: Vec<String> = pfns.iter().map(|p| format!("{p:#x}")).collect();
                println!("domain {domid}: {} pages: {}", pfns.len(), hex.join(" "));
            }
        }
        SyncDebug::PageDump { domain, pfn } => {
            let domid = kemarid::debug::resolve_domain(hv, &domain)?;
            let pfn = match pfn.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => pfn.parse(),
            }
            .with_context(|| format!("pfn {pfn:?} is not a number"))?;
            let page = kemarid::debug::read_page(hv, domid, pfn)?;
            let mut out = std::io::stdout().lock();
            for (i, line) in page.chunks(16).enumerate() {
                if line.iter().any(|b| *b != 0) {
                    let hex: Vec<String> = line.iter().map(|b| format!("{b:02x}")).collect();
                    writeln!(out, "{:04x}: {}", i * 16, hex.join(" "))?;
                }
            }
        }
        SyncDebug::CpuContext { domain } => {
            let domid = kemarid::debug::resolve_domain(hv, &domain)?;
            let ctx = hv.hvm_context(domid)?;
            print_cpus(&format!("domain {domid}"), &ctx, None, None, json)?;
        }
        SyncDebug::DiskLog { file, replay, vdev } => {
            crate::commit_cmd::disk_log(&file, replay, &vdev, json)?;
        }
        SyncDebug::StagedContext { file } => {
            let staged = read_staged(&file)?;
            print_cpus(
                &file.display().to_string(),
                &staged.hvm_context,
                Some(staged.seq),
                Some(&staged.hvm_params),
                json,
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_cpus(
    what: &str,
    ctx: &[u8],
    seq: Option<u64>,
    params: Option<&[(u32, u64)]>,
    json: bool,
) -> anyhow::Result<()> {
    let cpus = cpu_hashes(ctx)?;
    if json {
        print_json(
            &serde_json::json!({"source": what, "seq": seq, "vcpus": cpus, "params": params}),
        )?;
    } else {
        for c in cpus {
            println!(
                "{what}{}: vcpu {} cpu-hash {} rip {:#x} tsc {}",
                seq.map_or(String::new(), |s| format!(" seq {s}")),
                c.vcpu,
                c.hash,
                c.rip,
                c.tsc
            );
        }
    }
    Ok(())
}
