//! The primary's session: what `kemari replicate` (and `kemari protect`) does with one guest.
//! It connects to the secondary's `kemari receive`, copies the guest live (the initial sync),
//! then takes checkpoints until it is told to stop, with the guest's disk and NIC under
//! output commit ([`super::outputs`], [`super::hook`]), a heartbeat to the secondary, and a
//! fence guard ([`super::fence`]) that fences the guest if this process dies while
//! protection is on. A loss (the secondary, or a failure on this host) is reported
//! ([`LossKind`]) and the guest keeps running unprotected.
//!
//! [`replicate`] is driven by [`PrimaryOptions`] and hands what is to be printed to its
//! caller as it happens ([`PrimaryReport`]): the stats line comes before the devices'
//! counters, which are only known once the guest is gone.

use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hypervisor::xen::XenOpenError;
use hypervisor::{DomId, GuestType, Hypervisor, HypervisorError};
use nix::sys::signal::{SigSet, Signal};

use super::fence::{DisarmOnReturn, FenceStartError, SharedGuard};
use super::outputs::{self, vdev_name, Device, Outputs, OutputsConfig, OutputsError, Started};
use super::{error_chain, HeartbeatTiming, Signals};
use crate::api::GuestState;
use crate::daemon::report::{DaemonSignal, ReportError, StatusWriter};
use crate::debug::DebugError;
use crate::domconfig::DomConfigError;
use crate::failover::fence::FenceError;
use crate::failover::heartbeat::{
    DeathCause, Heartbeat, HeartbeatError, PeerState, Role, SystemClock,
};
use crate::sync::sender::{
    CountHook, DeviceState, ProtectOutcome, Quiesce, SendError, Sender, SenderOptions,
};
use crate::sync::stats::InitialStats;
use crate::sync::trigger::{Reasons, Triggers};

/// What `kemari replicate` is asked to do (its arguments).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PrimaryOptions {
    /// Domain id or name.
    pub domain: String,
    /// The secondary's `kemari receive` address.
    pub target: String,
    /// Stop after this many checkpoints.
    pub checkpoints: Option<u64>,
    /// Maximum epoch interval (ms).
    pub interval_ms: u64,
    /// Minimum run time between two checkpoints (ms; 0: none).
    pub min_run_ms: u64,
    /// Leave the guest paused right after the last checkpoint's ACK.
    pub hold: bool,
    /// Seconds to wait for each checkpoint's ACK.
    pub ack_timeout_s: u64,
    /// Most live rounds after the first full copy.
    pub max_live_rounds: u32,
    /// Name of the replica in the image's configuration (default: the guest's name).
    pub replica_name: Option<String>,
    /// Checkpoints at a cooperative suspend point instead of a toolstack pause.
    pub suspend: bool,
    /// Seconds the guest may take to suspend for one checkpoint.
    pub suspend_timeout_s: u64,
    /// UDP port of the secondary's heartbeat, on the target's host.
    pub heartbeat_port: Option<u16>,
    /// Heartbeat timing.
    pub heartbeat: HeartbeatTiming,
    /// Do not start the fence guard.
    pub no_fence: bool,
    /// Worker of kemarid: the status file to rewrite (SIGUSR2 then asks for a checkpoint).
    pub status_file: Option<PathBuf>,
    /// Output commit: the guest's disk and NIC to serve here (`None`: neither).
    pub outputs: Option<OutputsConfig>,
    /// Unpause the guest once the initial sync is ACKed.
    pub unpause: bool,
    /// Where the guest's libxl configuration is read from (`None`:
    /// [`crate::domconfig::XEN_LIB_DIR`]; not an argument of `kemari replicate`).
    #[serde(default)]
    pub config_dir: Option<PathBuf>,
}

impl PrimaryOptions {
    /// The sender's options.
    pub fn sender_options(&self) -> SenderOptions {
        SenderOptions {
            max_live_rounds: self.max_live_rounds,
            ack_timeout: Duration::from_secs(self.ack_timeout_s),
            min_run: Duration::from_millis(self.min_run_ms),
            ..SenderOptions::default()
        }
    }

    /// The maximum epoch interval (at least 1 ms).
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms.max(1))
    }

    /// Whether the fence guard is started (a heartbeat and no `--no-fence`).
    pub fn fenced(&self) -> bool {
        self.heartbeat_port.is_some() && !self.no_fence
    }

    /// Whether the guest's disk is served here.
    fn has_disk(&self) -> bool {
        self.outputs.as_ref().is_some_and(|o| o.disk.is_some())
    }
}

/// Errors of the primary's session.
#[derive(Debug, thiserror::Error)]
pub enum PrimaryError {
    /// A signal could not be blocked.
    #[error("blocking {signals}")]
    BlockSignals {
        /// Which, and why.
        signals: &'static str,
        /// The OS error.
        #[source]
        source: nix::Error,
    },
    /// A signal's thread could not be started.
    #[error("starting the {name} thread")]
    SignalThread {
        /// The thread's name.
        name: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The status file (kemarid's worker) or its signal.
    #[error(transparent)]
    Report(#[from] ReportError),
    /// This host's Xen could not be opened.
    #[error("cannot open this host's Xen (run in a Xen 4.17 dom0, as root)")]
    OpenXen(#[source] XenOpenError),
    /// The domain is not known.
    #[error(transparent)]
    Domain(#[from] DebugError),
    /// A call to Xen about the guest failed.
    #[error("domain {domid}: {step}")]
    Xen {
        /// The guest.
        domid: DomId,
        /// What was done.
        step: &'static str,
        /// The failed call.
        #[source]
        source: HypervisorError,
    },
    /// `--suspend` for a guest that cannot suspend.
    #[error(
        "domain {domid} is an HVM guest without PV drivers (no event-channel callback \
         registered): it cannot suspend for a checkpoint; protect it without --suspend \
         (pause checkpoints are complete for such a guest), or wait until its PV \
         drivers are up if it has them"
    )]
    NoPvDrivers {
        /// The guest.
        domid: DomId,
    },
    /// The guest's configuration could not be read.
    #[error("reading domain {domid}'s configuration")]
    Config {
        /// The guest.
        domid: DomId,
        /// Why.
        #[source]
        source: DomConfigError,
    },
    /// The secondary could not be reached.
    #[error("connecting to the secondary at {target}")]
    Connect {
        /// The address.
        target: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The lab's kill window is misconfigured.
    #[cfg(feature = "failpoints")]
    #[error(transparent)]
    FailPoint(#[from] crate::failover::failpoint::FailPointError),
    /// A kill window asked for from a build without them.
    #[error(
        "KEMARI_DEBUG_FAILPOINT is set, but this kemari was built without the failpoints \
         feature (the lab's build: cargo build --release -p kemarid --features failpoints)"
    )]
    NoFailPoints,
    /// The fence guard could not be started.
    #[error(transparent)]
    FenceStart(#[from] FenceStartError),
    /// The fence guard could not be armed.
    #[error("arming the fence guard")]
    FenceArm(#[source] FenceError),
    /// The heartbeat could not be set up.
    #[error("{step}")]
    HeartbeatSetup {
        /// What was done.
        step: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The heartbeat could not be started.
    #[error("starting the heartbeat to {peer}")]
    Heartbeat {
        /// The secondary's heartbeat address.
        peer: std::net::SocketAddr,
        /// Why.
        #[source]
        source: HeartbeatError,
    },
    /// The guest's disk or NIC (starting, unpausing, serving).
    #[error(transparent)]
    Outputs(#[from] OutputsError),
    /// The sender could not be set up.
    #[error("sending domain {domid} to {target}")]
    Sender {
        /// The guest.
        domid: DomId,
        /// The secondary.
        target: String,
        /// Why.
        #[source]
        source: Box<SendError>,
    },
    /// Protection was lost (reported on stderr and in the status file as [`LossKind`] says).
    #[error("protection of domain {domid} lost {what}")]
    Lost {
        /// The guest.
        domid: DomId,
        /// `during the initial sync` or `during protection`.
        what: &'static str,
        /// Why.
        #[source]
        source: Box<SendError>,
    },
}

/// What a protection that ended in order did (the final stats line).
#[derive(Debug, Clone, PartialEq)]
pub struct Replicated {
    /// The guest.
    pub domid: DomId,
    /// The initial sync.
    pub initial: InitialStats,
    /// The checkpoints.
    pub outcome: ProtectOutcome,
    /// Checkpoints per second of protection.
    pub checkpoints_per_s: f64,
    /// Seconds of protection (after the initial sync).
    pub protect_s: f64,
    /// Seconds since the start of the initial sync.
    pub total_s: f64,
}

impl Replicated {
    /// The `--json` line.
    pub fn json(&self) -> serde_json::Value {
        let (s, out) = (&self.outcome.stats, &self.outcome);
        serde_json::json!({
            "domid": self.domid,
            "initial": self.initial,
            "checkpoints": s,
            "checkpoints_per_s": self.checkpoints_per_s,
            "protect_s": self.protect_s,
            "last_seq": out.last_seq,
            "held_paused": out.held_paused,
            "total_s": self.total_s,
        })
    }

    /// The text line.
    pub fn line(&self) -> String {
        let (s, out) = (&self.outcome.stats, &self.outcome);
        format!(
            "replicated domain {}: checkpoints={} per_s={:.2} pause_mean_ms={:.2} pause_p99_ms={:.2} pause_max_ms={:.2} pages_mean={:.1} pages_max={} bytes={} ack_wait_mean_ms={:.2} coalesced={} last_seq={} held_paused={}",
            self.domid,
            s.checkpoints,
            self.checkpoints_per_s,
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
        )
    }
}

/// What is printed on stdout, in this order, as it happens.
#[derive(Debug)]
pub enum PrimaryReport<'a> {
    /// Protection ended in order.
    Replicated(&'a Replicated),
    /// A served device ended (once the guest is gone, after protection).
    Device(Device, &'a outputs::Report),
}

/// How [`replicate`] ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrimaryEnd {
    /// Protection ran and ended in order ([`PrimaryReport::Replicated`]).
    Replicated,
    /// Stopped (signal) right after the initial sync: the guest runs unprotected.
    StoppedAfterInitialSync,
}

/// Which kind of loss ended protection: the primary tells the operator and kemarid
/// (status file) which, since only a lost secondary is one the guest was protected against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LossKind {
    /// The heartbeat declared the secondary dead.
    HeartbeatDead(DeathCause),
    /// The stream to the secondary failed (the secondary's side, or the link).
    StreamLost,
    /// A failure on this host, not of the secondary (the secondary still answers).
    LocalFailure,
}

impl LossKind {
    /// The kind of a loss from the heartbeat's state (if there is one) and whether the
    /// sender's error is the secondary's ([`SendError::peer_lost`]).
    pub fn classify(heartbeat: Option<PeerState>, peer_lost: bool) -> LossKind {
        match heartbeat {
            Some(PeerState::Dead(c)) => LossKind::HeartbeatDead(c),
            _ if peer_lost => LossKind::StreamLost,
            _ => LossKind::LocalFailure,
        }
    }

    /// The heartbeat declared the secondary dead (a goodbye would not be heard).
    pub fn heartbeat_dead(&self) -> bool {
        matches!(self, LossKind::HeartbeatDead(_))
    }

    /// The error of the status file: `secondary lost WHAT: CAUSE` or `protection failed on
    /// this host WHAT: ERROR`.
    pub fn status_error(&self, what: &str, e: &dyn std::fmt::Display) -> String {
        match self {
            LossKind::LocalFailure => format!("protection failed on this host {what}: {e}"),
            _ => format!("secondary lost {what}: {}", self.cause(e)),
        }
    }

    /// The line on stderr; `guest` is what became of the guest (for a local failure).
    pub fn stderr_line(
        &self,
        what: &str,
        e: &dyn std::fmt::Display,
        domid: DomId,
        guest: &str,
    ) -> String {
        match self {
            LossKind::LocalFailure => format!(
                "kemari replicate: PROTECTION FAILED on this host {what} ({e}): guest {domid} {guest}; the secondary was told not to fail over"
            ),
            _ => format!(
                "kemari replicate: SECONDARY LOST {what} ({}): guest {domid} keeps running UNPROTECTED",
                self.cause(e)
            ),
        }
    }

    fn cause(&self, e: &dyn std::fmt::Display) -> String {
        match self {
            LossKind::HeartbeatDead(c) => format!("heartbeat: {c:?}"),
            _ => format!("stream: {e}"),
        }
    }
}

/// What became of the guest after a failure on this host.
fn guest_fate(hv: &dyn Hypervisor, domid: DomId) -> String {
    match hv.domain_info(domid) {
        Ok(i) if i.shutdown.is_none() => "keeps running UNPROTECTED".to_string(),
        Ok(i) => format!("has shut down ({:?})", i.shutdown),
        Err(_) => "is gone".to_string(),
    }
}

/// Stands for `crate::failover::failpoint::FailPoint` in a build without the `failpoints`
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
        _inner: Box<dyn crate::sync::sender::CheckpointHook + 'a>,
    ) -> Box<dyn crate::sync::sender::CheckpointHook + 'a> {
        match self {}
    }
}

/// Without the `failpoints` feature a kill window asked for is refused, not silently ignored.
#[cfg(not(feature = "failpoints"))]
fn no_failpoints() -> Result<Option<NoFailPoint>, PrimaryError> {
    if std::env::var_os("KEMARI_DEBUG_FAILPOINT").is_some() {
        return Err(PrimaryError::NoFailPoints);
    }
    Ok(None)
}

/// Blocks SIGUSR1 in the calling thread and every thread it starts later (call first).
fn block_usr1() -> Result<(), PrimaryError> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGUSR1);
    set.thread_block()
        .map_err(|source| PrimaryError::BlockSignals {
            signals: "SIGUSR1",
            source,
        })
}

/// Waits for SIGUSR1 (blocked by [`block_usr1`]): sets `flag` and requests a checkpoint.
fn hold_on_usr1(flag: Arc<AtomicBool>, triggers: Triggers) -> Result<(), PrimaryError> {
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
        .map(|_| ())
        .map_err(|source| PrimaryError::SignalThread {
            name: "SIGUSR1",
            source,
        })
}

/// Ctrl-C / SIGTERM end protection cleanly (guest running, log-dirty off, device model
/// resumed) instead of killing the process between a pause and its unpause: the signals are
/// blocked here (and in every thread started later) and a watcher thread turns them into
/// `Triggers::stop`, acted on after the initial sync or the checkpoint in progress.
fn stop_on_sigterm(triggers: &Triggers) -> Result<(), PrimaryError> {
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals
        .thread_block()
        .map_err(|source| PrimaryError::BlockSignals {
            signals: "SIGINT/SIGTERM for a clean stop",
            source,
        })?;
    let triggers = triggers.clone();
    std::thread::spawn(move || {
        if let Ok(sig) = signals.wait() {
            eprintln!("kemari replicate: {sig} received, stopping after the step in progress");
            triggers.stop();
        }
    });
    Ok(())
}

/// Creates the disk and/or NIC of `domid` (before the guest runs) behind gates whose taps
/// fire `triggers`, serves each in a thread and says so. `None` without any.
fn start_outputs(
    domid: DomId,
    config: Option<&OutputsConfig>,
    triggers: &Triggers,
    usr1: &Arc<AtomicBool>,
) -> Result<Option<Outputs>, OutputsError> {
    let Some(config) = config else {
        return Ok(None);
    };
    let outputs = Outputs::start(domid, config.clone(), triggers, usr1, &mut |s| match s {
        Started::Disk {
            devid,
            image,
            backend,
        } => eprintln!(
            "kemari replicate: domain {domid} {} served from {} at {backend} under output commit",
            vdev_name(devid),
            image.display()
        ),
        Started::Vif { description } => {
            eprintln!("kemari replicate: domain {domid} {description} under output commit")
        }
    })?;
    Ok(Some(outputs))
}

/// [`Outputs::finish`], reporting each device's counters (the disk first); the first
/// device's error is returned, each is printed.
fn finish_outputs(
    outputs: Outputs,
    held: bool,
    triggers: &Triggers,
    report: &mut dyn FnMut(PrimaryReport<'_>),
) -> Result<(), OutputsError> {
    let ended = outputs.finish(held, triggers, |domid| {
        eprintln!(
            "kemari replicate: protection over: domain {domid} runs unprotected, its devices are served until it is gone or SIGTERM/SIGUSR1"
        )
    });
    let mut first_err = None;
    for (device, r) in ended {
        match r {
            Ok(r) => report(PrimaryReport::Device(device, &r)),
            Err(e) => {
                eprintln!("kemari replicate: {device}: {}", error_chain(&e));
                first_err.get_or_insert(e);
            }
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// Starts the primary's heartbeat to `target`'s host on `port`; when the secondary is
/// declared dead, the data stream is shut down so that protection ends at once (the guest
/// keeps running) instead of waiting for an ACK timeout.
fn start_pinger(
    target: &str,
    port: u16,
    hb: HeartbeatTiming,
    stream: &TcpStream,
    fence: Option<SharedGuard>,
) -> Result<Heartbeat, PrimaryError> {
    let setup = |step: String| move |source| PrimaryError::HeartbeatSetup { step, source };
    let mut peer = stream
        .peer_addr()
        .map_err(setup(format!("address of the secondary {target}")))?;
    peer.set_port(port);
    let socket = std::net::UdpSocket::bind(if peer.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })
    .map_err(setup("binding the heartbeat socket".into()))?;
    let data = stream
        .try_clone()
        .map_err(setup("cloning the connection for the heartbeat".into()))?;
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
    )
    .map_err(|source| PrimaryError::Heartbeat { peer, source })?;
    eprintln!(
        "kemari replicate: heartbeat to {peer} every {} ms, dead after {} misses ({} ms)",
        hb.period_ms,
        hb.misses,
        cfg.detection_time().as_millis()
    );
    Ok(heartbeat)
}

/// Protects the guest `opts.domain` on the host `open_host` opens (this host's Xen for
/// `kemari`), until `opts.checkpoints` are ACKed, a stop (SIGINT/SIGTERM, SIGUSR1 for a held
/// stop, with [`Signals::Process`]) or a loss. What is printed goes to `report`, in order;
/// progress lines go to stderr.
pub fn replicate<H: Hypervisor>(
    opts: &PrimaryOptions,
    signals: Signals,
    open_host: impl FnOnce() -> Result<H, XenOpenError>,
    report: &mut dyn FnMut(PrimaryReport<'_>),
) -> Result<PrimaryEnd, PrimaryError> {
    let process_signals = signals == Signals::Process;
    // before any thread starts: SIGUSR1 asks for a held stop
    if process_signals {
        block_usr1()?;
    }
    let usr1 = Arc::new(AtomicBool::new(false));
    // as kemarid's worker: SIGUSR2 (checkpoint now) blocked before any thread starts
    let daemon_signal = match (&opts.status_file, process_signals) {
        (Some(_), true) => Some(DaemonSignal::block()?),
        _ => None,
    };
    let status = StatusWriter::new(opts.status_file.as_deref(), crate::api::Role::Primary)?;
    let host = open_host().map_err(PrimaryError::OpenXen)?;
    let hv: &dyn Hypervisor = &host;
    let domid = crate::debug::resolve_domain(hv, &opts.domain)?;
    let xen = |step, source| PrimaryError::Xen {
        domid,
        step,
        source,
    };
    status.domid(u32::from(domid));
    let info = hv
        .domain_info(domid)
        .map_err(|e| xen("reading its information", e))?;
    // A running HVM guest without PV drivers never registered an event-channel callback: it
    // cannot answer a suspend request, so every --suspend checkpoint would time out. Such a
    // guest keeps no state inside Xen that a pause checkpoint misses (docs/failover.md §3).
    if opts.suspend && !info.paused {
        let nopv = crate::xlsave::hvm_without_pv_drivers(hv, domid, &info)
            .map_err(|e| xen("reading HVM_PARAM_CALLBACK_IRQ", e))?;
        if nopv {
            return Err(PrimaryError::NoPvDrivers { domid });
        }
    }
    let xs = hv.open_xenstore().map_err(|e| xen("opening xenstore", e))?;
    let config = match &opts.config_dir {
        None => crate::domconfig::domain_config_json(
            domid,
            Some(xs.as_ref()),
            opts.replica_name.as_deref(),
        ),
        Some(dir) => crate::domconfig::read_domain_config(dir, domid, Some(xs.as_ref())).map(|c| {
            crate::domconfig::to_image_bytes(&crate::domconfig::for_image(
                c,
                opts.replica_name.as_deref(),
            ))
        }),
    }
    .map_err(|source| PrimaryError::Config { domid, source })?;
    let device: Option<Box<dyn DeviceState>> = match info.guest_type {
        GuestType::Hvm => Some(Box::new(
            crate::sync::device_qmp::QmpDeviceState::for_domain(
                domid,
                hv.open_xenstore()
                    .map_err(|e| xen("opening xenstore for the device model", e))?,
            ),
        )),
        _ => None,
    };
    let stream = TcpStream::connect(&opts.target).map_err(|source| PrimaryError::Connect {
        target: opts.target.clone(),
        source,
    })?;
    let triggers = Triggers::new(opts.interval());
    if process_signals {
        stop_on_sigterm(&triggers)?;
    }
    // lab kill windows (KEMARI_DEBUG_FAILPOINT, crate::failover::failpoint); off by default,
    // and only in a build with the `failpoints` feature (the lab's)
    #[cfg(feature = "failpoints")]
    let mut failpoint = crate::failover::failpoint::FailPoint::from_env()?;
    #[cfg(not(feature = "failpoints"))]
    let mut failpoint = no_failpoints()?;
    let fence = match opts.fenced() {
        true => Some(super::fence::start(domid, &opts.heartbeat.config())?),
        false => None,
    };
    let fence = DisarmOnReturn(fence);
    let heartbeat = match opts.heartbeat_port {
        None => None,
        Some(port) => Some(start_pinger(
            &opts.target,
            port,
            opts.heartbeat,
            &stream,
            fence.0.clone(),
        )?),
    };
    let disk = start_outputs(domid, opts.outputs.as_ref(), &triggers, &usr1)?;
    if let Some(sig) = daemon_signal {
        let t = triggers.clone();
        sig.on_signal(move || t.fire(Reasons::REQUEST))?;
    }
    if heartbeat.is_some() {
        status.heartbeat(opts.heartbeat.period_ms, opts.heartbeat.misses, "alive");
    }
    if process_signals {
        hold_on_usr1(usr1.clone(), triggers.clone())?;
    }
    let end_disk = |disk: Option<Outputs>, report: &mut dyn FnMut(PrimaryReport<'_>)| {
        if let Some(d) = disk {
            if let Err(e) = finish_outputs(d, false, &triggers, report) {
                eprintln!("kemari replicate: disk: {}", error_chain(&e));
            }
        }
    };
    let mut tx =
        Sender::new(hv, domid, stream, opts.sender_options(), device).map_err(|source| {
            PrimaryError::Sender {
                domid,
                target: opts.target.clone(),
                source: Box::new(source),
            }
        })?;
    tx.set_observer(status.observer());
    // A guest created paused and unpaused after the initial sync (--unpause) has not run yet:
    // it cannot answer a suspend request, and a paused copy of it is already a clean state to
    // start from. Its initial image is taken paused; checkpoints are at suspend points.
    let suspend_after_unpause = opts.suspend && opts.unpause && info.paused;
    if opts.suspend && !suspend_after_unpause {
        tx.set_quiesce(Quiesce::Suspend {
            xenstore: hv
                .open_xenstore()
                .map_err(|e| xen("opening xenstore to suspend it", e))?,
            timeout: Duration::from_secs(opts.suspend_timeout_s),
        });
    }
    let start = Instant::now();
    let lost = |what: &'static str, e: SendError, hb: Option<Heartbeat>| {
        let kind = LossKind::classify(hb.as_ref().map(Heartbeat::state), e.peer_lost());
        let dead = kind.heartbeat_dead();
        // The guest keeps running here: no fencing; a secondary that still answers is told
        // goodbye, or it would resume a second copy once this process is gone.
        fence.disarm();
        if let Some(hb) = hb {
            hb.stop(!dead);
        }
        let message = kind.status_error(what, &e);
        if kind == LossKind::LocalFailure {
            // a failure here, not of the secondary: the operator is told what happened to
            // the guest
            let guest = guest_fate(hv, domid);
            log::error!("{message}");
            status.finish(GuestState::Failed, Some(message));
            eprintln!("{}", kind.stderr_line(what, &e, domid, &guest));
        } else {
            log::error!("{message}");
            if dead {
                status.heartbeat(opts.heartbeat.period_ms, opts.heartbeat.misses, "dead");
            }
            status.finish(GuestState::Failed, Some(message));
            eprintln!("{}", kind.stderr_line(what, &e, domid, ""));
        }
        PrimaryError::Lost {
            domid,
            what,
            source: Box::new(e),
        }
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
            let err = lost("during the initial sync", e, heartbeat);
            end_disk(disk, report);
            return Err(err);
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
        end_disk(disk, report);
        return Ok(PrimaryEnd::StoppedAfterInitialSync);
    }
    if let Some(g) = &fence.0 {
        g.arm().map_err(PrimaryError::FenceArm)?;
        eprintln!("kemari replicate: fence guard armed");
    }
    if opts.unpause {
        outputs::unpause(hv, domid)?;
        eprintln!("kemari replicate: domain {domid} unpaused");
    }
    if suspend_after_unpause {
        eprintln!("kemari replicate: the initial image of paused domain {domid} was taken paused; checkpoints at suspend points from now on");
        tx.set_quiesce(Quiesce::Suspend {
            xenstore: hv
                .open_xenstore()
                .map_err(|e| xen("opening xenstore to suspend it", e))?,
            timeout: Duration::from_secs(opts.suspend_timeout_s),
        });
    }
    let mut hook = super::hook::hook(
        CountHook {
            limit: opts.checkpoints,
            hold: opts.hold,
        },
        usr1,
        disk.as_ref(),
        opts.suspend,
    );
    if opts.suspend && opts.has_disk() {
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
            let err = lost("during protection", e, heartbeat);
            drop(hook);
            end_disk(disk, report);
            return Err(err);
        }
    };
    let secs = protect_start.elapsed().as_secs_f64();
    status.finish(GuestState::Stopped, None);
    drop(tx);
    fence.disarm();
    if let Some(hb) = heartbeat {
        // Protection ended on purpose: tell the secondary not to fail over.
        hb.stop(true);
    }
    let rate = if secs > 0.0 {
        out.stats.checkpoints as f64 / secs
    } else {
        0.0
    };
    let held = out.held_paused;
    let done = Replicated {
        domid,
        initial: init,
        outcome: out,
        checkpoints_per_s: rate,
        protect_s: secs,
        total_s: start.elapsed().as_secs_f64(),
    };
    report(PrimaryReport::Replicated(&done));
    drop(hook);
    if let Some(d) = disk {
        finish_outputs(d, held, &triggers, report)?;
    }
    Ok(PrimaryEnd::Replicated)
}

#[cfg(test)]
mod tests;
