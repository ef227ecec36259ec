//! The secondary's session: what `kemari receive` does. It listens for the primary, keeps
//! the replica ([`crate::sync::receiver`]) connection after connection, answers the primary's
//! heartbeat, and with `failover` runs the guest here from the last ACKed checkpoint when the
//! primary is dead ([`fail_over`]): its NIC and disk are then served by this process until the
//! guest is gone or SIGTERM (SIGUSR1 hands the disk over to `kemari protect`).
//!
//! [`receive`] is driven by [`SecondaryOptions`] and hands what is to be printed to its
//! caller as it happens ([`SecondaryReport`]): one line per connection, then the failover
//! devices' counters.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hypervisor::xen::{XenHost, XenOpenError};
use hypervisor::{DomId, DomainControl, Hypervisor, HypervisorError};
use nix::sys::signal::{SigSet, Signal};
use xenbus_backend::{VbdStats, VifConfig};

use super::outputs::{self, OutputsError, VifSpec};
use super::{HeartbeatTiming, Signals};
use crate::api::GuestState;
use crate::daemon::report::{DaemonSignal, ReportError, StatusWriter};
use crate::failover::disk::{FailoverDiskError, ServeEnd};
use crate::failover::heartbeat::{
    DeathCause, Heartbeat, HeartbeatError, PeerState, Role, SystemClock,
};
use crate::failover::net::{FailoverNetError, NetSpec};
use crate::failover::resume::{FailoverError, FailoverReport};
use crate::sync::disk_apply::ReplicaDisk;
use crate::sync::receiver::{read_staged, ReceiveError, Receiver, ReceiverOptions, Session};
use crate::sync::replica::{ReplicaBuilder, ReplicaError};
use crate::sync::replica_xl::XlReplicaBuilder;
use crate::xltool::XlTool;

/// How the guest is resumed at failover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum FailoverMethod {
    /// xl save image from the replica + staged state, destroy the replica, xl restore.
    Restore,
    /// Load the staged HVM context into the replica and unpause it (experiment only).
    InPlace,
}

/// The guest's NIC to serve after a failover (`--vif SETTINGS`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FailoverVif {
    /// The settings as given (for messages).
    pub settings: String,
    /// The settings parsed; `mac` is required (the guest's MAC on the primary).
    pub spec: VifSpec,
}

impl FailoverVif {
    /// What [`crate::failover::net::create_paused`] serves.
    pub fn net_spec(&self) -> Result<NetSpec, SecondaryError> {
        let mac = self.spec.mac.ok_or_else(|| SecondaryError::VifMac {
            settings: self.settings.clone(),
        })?;
        let mut vif = VifConfig::new(0, self.spec.devid);
        vif.mac = mac;
        Ok(NetSpec {
            vif,
            tap_name: self.spec.ifname.clone(),
            bridge: self.spec.bridge.clone(),
            gso: self.spec.gso,
        })
    }
}

/// What `kemari receive` is asked to do (its arguments).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SecondaryOptions {
    /// Address to listen on.
    pub listen: String,
    /// Folder for the spooled image and the staged state.
    pub spool_dir: PathBuf,
    /// Serve one connection, then return.
    pub once: bool,
    /// Name of the replica domain (default: the name in the image).
    pub name: Option<String>,
    /// Give up when the primary is silent this long (s; 0: never).
    pub idle_timeout_s: u64,
    /// UDP address to answer the primary's heartbeat on.
    pub heartbeat_listen: Option<String>,
    /// Heartbeat timing.
    pub heartbeat: HeartbeatTiming,
    /// The secondary's copies of the guest's disks (at most one is served after a failover).
    pub disks: Vec<ReplicaDisk>,
    /// The virtual device of the disk (for messages).
    pub vdev: String,
    /// The guest's NIC after a failover.
    pub vif: Option<FailoverVif>,
    /// Worker of kemarid: the status file to rewrite (SIGUSR2 then asks for a failover).
    pub status_file: Option<PathBuf>,
    /// Run the guest here when the primary is dead after the initial sync.
    pub failover: bool,
    /// How the guest is resumed at failover.
    pub failover_method: FailoverMethod,
}

impl SecondaryOptions {
    /// Checks what can be checked before anything starts: `--vif` needs `--failover` and
    /// the guest's MAC.
    pub fn validate(&self) -> Result<(), SecondaryError> {
        if self.vif.is_some() && !self.failover {
            return Err(SecondaryError::VifWithoutFailover);
        }
        self.net_spec().map(|_| ())
    }

    fn net_spec(&self) -> Result<Option<NetSpec>, SecondaryError> {
        self.vif.as_ref().map(FailoverVif::net_spec).transpose()
    }

    /// The receiver's options.
    pub fn receiver_options(&self) -> ReceiverOptions {
        ReceiverOptions {
            spool_dir: self.spool_dir.clone(),
            name: self.name.clone(),
            limits: kemari_stream::Limits::default(),
            idle_timeout: (self.idle_timeout_s > 0)
                .then(|| Duration::from_secs(self.idle_timeout_s)),
        }
    }

    /// Whether this process serves the guest's devices after a failover.
    fn serves_after_failover(&self) -> bool {
        self.failover && (!self.disks.is_empty() || self.vif.is_some())
    }
}

/// Errors of the secondary's session.
#[derive(Debug, thiserror::Error)]
pub enum SecondaryError {
    /// `--vif` without `--failover`.
    #[error("--vif serves the guest's NIC after a failover: it needs --failover")]
    VifWithoutFailover,
    /// `--vif` without the guest's MAC.
    #[error("--vif {settings:?}: mac= is required (the guest's MAC on the primary)")]
    VifMac {
        /// The settings given.
        settings: String,
    },
    /// The status file (kemarid's worker) or its signal.
    #[error(transparent)]
    Report(#[from] ReportError),
    /// Signals could not be blocked.
    #[error("blocking SIGINT/SIGTERM/SIGUSR1 for the failover disk")]
    BlockSignals(#[source] nix::Error),
    /// A thread could not be started.
    #[error("starting the {name} thread")]
    Thread {
        /// The thread's name.
        name: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// This host's Xen could not be opened.
    #[error("cannot open this host's Xen (run in a Xen 4.17 dom0, as root)")]
    OpenXen(#[source] XenOpenError),
    /// A socket or connection could not be set up.
    #[error("{step}")]
    Net {
        /// What was done.
        step: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The heartbeat could not be started.
    #[error("starting the heartbeat for primary {peer}")]
    Heartbeat {
        /// The primary.
        peer: SocketAddr,
        /// Why.
        #[source]
        source: HeartbeatError,
    },
    /// The staged state of the last checkpoint could not be read.
    #[error("reading {}", path.display())]
    Staged {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: ReceiveError,
    },
    /// The replica's name could not be read from the image.
    #[error("reading the guest's name from {}", image.display())]
    ImageName {
        /// The image.
        image: PathBuf,
        /// Why.
        #[source]
        source: ReplicaError,
    },
    /// Resuming the guest failed.
    #[error("failover of replica {replica} at checkpoint {seq}")]
    Resume {
        /// The replica.
        replica: DomId,
        /// The staged checkpoint.
        seq: u64,
        /// Why.
        #[source]
        source: Box<FailoverError>,
    },
    /// The guest's NIC could not be brought up after the failover.
    #[error("bringing up vif {devid} (mac {mac}) for domain {domid} (left paused)")]
    Vif {
        /// The vif's handle.
        devid: u32,
        /// Its MAC.
        mac: String,
        /// The guest.
        domid: DomId,
        /// Why.
        #[source]
        source: Box<FailoverNetError>,
    },
    /// The guest's disk could not be brought up after the failover.
    #[error("bringing up {vdev} on {} for domain {domid} (left paused)", path.display())]
    Disk {
        /// The disk in the guest.
        vdev: String,
        /// The copy.
        path: PathBuf,
        /// The guest.
        domid: DomId,
        /// Why.
        #[source]
        source: Box<FailoverDiskError>,
    },
    /// The guest could not be unpaused after the failover.
    #[error("unpausing domain {domid} (left paused)")]
    Unpause {
        /// The guest.
        domid: DomId,
        /// Why.
        #[source]
        source: HypervisorError,
    },
    /// Serving the guest's disk after the failover failed.
    #[error(transparent)]
    ServeDisk(Box<FailoverDiskError>),
    /// Serving the guest's NIC after the failover failed.
    #[error(transparent)]
    ServeVif(Box<OutputsError>),
    /// The NIC's thread panicked.
    #[error("the vif thread panicked")]
    VifPanicked,
}

/// What a failover did.
#[derive(Debug, Clone)]
pub struct FailedOver {
    /// This host's name.
    pub host: String,
    /// The guest's name.
    pub name: String,
    /// The resume's report (the running guest's domain id, the checkpoint, timings).
    pub report: FailoverReport,
    /// How it was resumed.
    pub method: FailoverMethod,
    /// Time from the last heartbeat to the failover's start (ms).
    pub detection_ms: f64,
    /// Time from the last heartbeat to the guest running (ms).
    pub heartbeat_to_running_ms: f64,
    /// The disk served after it.
    pub disk: Option<FailoverDiskInfo>,
    /// The NIC served after it.
    pub vif: Option<FailoverVifInfo>,
}

/// The disk served after a failover.
#[derive(Debug, Clone)]
pub struct FailoverDiskInfo {
    /// The copy.
    pub path: PathBuf,
    /// Its virtual device.
    pub vdev: String,
    /// Time to create it (ms).
    pub ms: f64,
}

/// The NIC served after a failover.
#[derive(Debug, Clone)]
pub struct FailoverVifInfo {
    /// Its handle.
    pub devid: u32,
    /// Its MAC.
    pub mac: String,
    /// Its tap.
    pub tap: String,
    /// Time to create it (ms).
    pub ms: f64,
}

/// One connection of the primary, served.
#[derive(Debug)]
pub struct Received {
    /// The primary.
    pub peer: SocketAddr,
    /// What the receiver kept.
    pub session: Session,
    /// How the stream failed, if it did.
    pub error: Option<ReceiveError>,
    /// Seconds the connection lasted.
    pub seconds: f64,
    /// The staged state file.
    pub staged: PathBuf,
    /// The failover that followed, if any.
    pub failover: Option<FailedOver>,
}

/// The disk served after a failover, ended.
#[derive(Debug, Clone)]
pub struct DiskServed {
    /// Its virtual device.
    pub vdev: String,
    /// The guest.
    pub domid: DomId,
    /// How serving ended (`Gone`, `Stopped`, `HandedOver`).
    pub status: String,
    /// Seconds served.
    pub seconds: f64,
    /// Its counters.
    pub stats: VbdStats,
}

impl FailedOver {
    /// Its `failover` object in the `--json` line.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "host": self.host,
            "role": "primary, unprotected",
            "name": self.name,
            "report": self.report,
            "method": format!("{:?}", self.method),
            "detection_ms": self.detection_ms,
            "heartbeat_to_running_ms": self.heartbeat_to_running_ms,
            "disk": self.disk.as_ref().map(|d| serde_json::json!({
                "path": d.path, "vdev": d.vdev, "ms": d.ms,
            })),
            "vif": self.vif.as_ref().map(|v| serde_json::json!({
                "devid": v.devid, "mac": v.mac, "tap": v.tap, "ms": v.ms,
            })),
        })
    }
}

impl Received {
    /// The `--json` line.
    pub fn json(&self) -> serde_json::Value {
        let s = &self.session;
        serde_json::json!({
            "peer": self.peer.to_string(),
            "replica": s.replica,
            "acked": s.acked,
            "checkpoints": s.checkpoints,
            "pages": s.pages,
            "image_pages": s.image_pages,
            "image_bytes": s.image_bytes,
            "seconds": self.seconds,
            "error": self.error.as_ref().map(ToString::to_string),
            "staged": self.staged,
            "disk_entries": s.disk_entries,
            "skipped_pages": s.skipped_pages,
            "disk_bytes": s.disk_bytes,
            "failover": self.failover.as_ref().map(FailedOver::json),
        })
    }

    /// The text line.
    pub fn line(&self) -> String {
        let s = &self.session;
        format!(
            "received from {}: replica={} acked={} checkpoints={} pages={} image_pages={} image_bytes={} seconds={:.1}{}",
            self.peer,
            s.replica.map_or("-".into(), |d| d.to_string()),
            s.acked.map_or("-".into(), |s| s.to_string()),
            s.checkpoints,
            s.pages,
            s.image_pages,
            s.image_bytes,
            self.seconds,
            self.error.as_ref().map_or(String::new(), |e| format!(" error: {e}"))
        )
    }
}

impl DiskServed {
    /// The `--json` line.
    pub fn json(&self) -> serde_json::Value {
        let s = &self.stats;
        serde_json::json!({
            "disk": {
                "device": self.vdev,
                "domid": self.domid,
                "status": self.status,
                "seconds": self.seconds,
                "requests": s.requests,
                "read_bytes": s.read_bytes,
                "write_bytes": s.write_bytes,
                "flushes": s.flushes,
                "discards": s.discards,
                "errors": s.errors,
            }
        })
    }

    /// The text line.
    pub fn line(&self) -> String {
        let s = &self.stats;
        format!(
            "kemari receive: disk {} of domain {}: {}; {} requests answered in {:.1} s, {} MiB read, {} MiB written, {} flushes, {} errors",
            self.vdev,
            self.domid,
            self.status,
            s.requests,
            self.seconds,
            s.read_bytes >> 20,
            s.write_bytes >> 20,
            s.flushes,
            s.errors
        )
    }
}

/// What is printed on stdout, in this order, as it happens.
#[derive(Debug)]
pub enum SecondaryReport<'a> {
    /// A connection ended.
    Received(&'a Received),
    /// After a failover, the disk served ended.
    FailoverDisk(&'a DiskServed),
    /// After a failover, the NIC served ended (after the disk's).
    FailoverVif(&'a outputs::Report),
}

/// How [`receive`] ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecondaryEnd {
    /// The guest failed over to this host (and its devices were served until it was gone).
    FailedOver,
    /// `once`: the connection ended, with a failed stream or not.
    Served {
        /// The stream failed.
        failed: bool,
    },
}

/// This host's Xen and the `xl restore` replica builder over it.
pub fn this_host_xen() -> Result<(Arc<XenHost>, Box<dyn ReplicaBuilder>), XenOpenError> {
    let host = Arc::new(XenHost::open()?);
    let control: Arc<dyn DomainControl> = host.clone();
    Ok((
        host,
        Box::new(XlReplicaBuilder::new(XlTool::default(), Some(control))),
    ))
}

/// (serving the disk, stop asked, hand over asked)
type FailoverFlags = Arc<(AtomicBool, AtomicBool, AtomicBool)>;

/// `--failover --disk/--vif`: SIGINT/SIGTERM blocked in this thread (and the threads it
/// starts); a watcher sets the returned flags once the disk is served after a failover, and
/// ends the process (status 143) before that.
///
/// SIGUSR1 while the disk is served after a failover hands the disk over (`kemari protect`
/// takes it over, docs/failover.md): serving stops, the device's nodes, the guest's ring and
/// its connected frontend stay as they are; before that SIGUSR1 is ignored.
fn failover_signals() -> Result<FailoverFlags, SecondaryError> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGUSR1);
    set.thread_block().map_err(SecondaryError::BlockSignals)?;
    let flags: FailoverFlags = Arc::new((
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
        .map_err(|source| SecondaryError::Thread {
            name: "signal",
            source,
        })?;
    Ok(flags)
}

/// After a failover with a disk: serves the guest's disk until the guest is gone or
/// SIGINT/SIGTERM, then returns its counters.
fn serve_failover_disk(
    vbd: xenbus_backend::Vbd<'_>,
    flags: &FailoverFlags,
    vdev: &str,
) -> Result<DiskServed, SecondaryError> {
    flags.0.store(true, Ordering::SeqCst);
    let domid = vbd.paths().domid;
    eprintln!(
        "kemari receive: serving domain {domid}'s {vdev} at {} until the guest is gone or SIGTERM",
        vbd.paths().backend
    );
    let start = Instant::now();
    let (end, stats) = crate::failover::disk::serve(vbd, &flags.1, &flags.2)
        .map_err(|e| SecondaryError::ServeDisk(Box::new(e)))?;
    if end == ServeEnd::HandedOver {
        eprintln!(
            "kemari receive: domain {domid}'s {vdev} handed over: its device and ring are left for `kemari protect` to take over"
        );
    }
    Ok(DiskServed {
        vdev: vdev.to_string(),
        domid,
        status: format!("{end:?}"),
        seconds: start.elapsed().as_secs_f64(),
        stats,
    })
}

/// After a failover with a NIC: serves it until the guest is gone or `stop`.
fn serve_failover_vif(
    vif: xenbus_backend::Vif<'_>,
    stop: &AtomicBool,
) -> Result<outputs::Report, OutputsError> {
    eprintln!(
        "kemari receive: serving domain {}'s vif {} at {} until the guest is gone or SIGTERM",
        vif.paths().domid,
        vif.config().devid,
        vif.paths().backend
    );
    outputs::serve_failover_vif(vif, stop)
}

/// The failover itself: the guest runs on this host from the last ACKed checkpoint. With a
/// disk the guest is restored paused, its disk is created on the copy and served by the
/// returned device (the caller runs it), then it is unpaused.
#[allow(clippy::type_complexity)]
fn fail_over<'h>(
    opts: &SecondaryOptions,
    hv: &'h dyn Hypervisor,
    rx: &Receiver<'_>,
    replica: DomId,
    hb: &Heartbeat,
) -> Result<
    (
        FailedOver,
        Option<xenbus_backend::Vbd<'h>>,
        Option<xenbus_backend::Vif<'h>>,
    ),
    SecondaryError,
> {
    use crate::failover::resume;
    let t0 = Instant::now();
    let silent_at_start = hb.silent_for().unwrap_or_default();
    let staged_path = rx.staged_path();
    let staged = read_staged(&staged_path).map_err(|source| SecondaryError::Staged {
        path: staged_path.clone(),
        source,
    })?;
    let image = opts.spool_dir.join(crate::sync::receiver::IMAGE_FILE);
    let name = match &opts.name {
        Some(n) => n.clone(),
        None => {
            XlReplicaBuilder::image_name(&image).map_err(|source| SecondaryError::ImageName {
                image: image.clone(),
                source,
            })?
        }
    };
    let disk = opts.disks.first().cloned();
    let net = opts.net_spec()?;
    let keep_paused = disk.is_some() || net.is_some();
    let report = match opts.failover_method {
        FailoverMethod::Restore => resume::resume_by_restore_paused(
            hv,
            &XlTool::default(),
            replica,
            &staged,
            &image,
            &opts.spool_dir,
            &name,
            keep_paused,
        ),
        FailoverMethod::InPlace => {
            resume::resume_in_place_paused(hv, replica, &staged, keep_paused)
        }
    }
    .map_err(|source| SecondaryError::Resume {
        replica,
        seq: staged.seq,
        source: Box::new(source),
    })?;
    // the NIC first (the guest stays paused), then the disk, which unpauses
    let t_net = Instant::now();
    let vif = match &net {
        None => None,
        Some(spec) => Some(
            crate::failover::net::create_paused(hv, report.domid, spec).map_err(|source| {
                SecondaryError::Vif {
                    devid: spec.vif.devid,
                    mac: spec.vif.mac_string(),
                    domid: report.domid,
                    source: Box::new(source),
                }
            })?,
        ),
    };
    let net_ms = t_net.elapsed().as_secs_f64() * 1000.0;
    let t_disk = Instant::now();
    let vbd = disk.as_ref().map(|d| {
        crate::failover::disk::serve_and_unpause(
            hv,
            report.domid,
            d,
            Some(PathBuf::from("/run/kemari")),
        )
        .map_err(|source| SecondaryError::Disk {
            vdev: opts.vdev.clone(),
            path: d.path.clone(),
            domid: report.domid,
            source: Box::new(source),
        })
    });
    let disk_ms = t_disk.elapsed().as_secs_f64() * 1000.0;
    // the disk's creation unpaused the guest; with a NIC only, unpause it here
    let (vbd, unpaused) = match vbd {
        Some(Ok(v)) => (Some(v), Ok(())),
        Some(Err(e)) => (None, Err(e)),
        None if vif.is_some() => (
            None,
            hv.unpause(report.domid)
                .map_err(|source| SecondaryError::Unpause {
                    domid: report.domid,
                    source,
                }),
        ),
        None => (None, Ok(())),
    };
    if let Err(e) = unpaused {
        if let Some((mut v, _)) = vif {
            if let Err(rm) = v.shutdown() {
                log::warn!("removing the vif of domain {}: {rm}", report.domid);
            }
        }
        return Err(e);
    }
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
            opts.vdev,
            d.path.display(),
            v.paths().backend
        );
    }
    let total = silent_at_start + t0.elapsed();
    let host = crate::host::this_host();
    eprintln!(
        "failover: guest running on {host} as domain {} after {} ms (last heartbeat -> running; detection {} ms, image {:.0} ms, destroy {:.0} ms, restore {:.0} ms{}{}), last seq {}",
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
    let done = FailedOver {
        host,
        name,
        report,
        method: opts.failover_method,
        detection_ms: silent_at_start.as_secs_f64() * 1000.0,
        heartbeat_to_running_ms: total.as_secs_f64() * 1000.0,
        disk: disk.map(|d| FailoverDiskInfo {
            path: d.path,
            vdev: opts.vdev.clone(),
            ms: disk_ms,
        }),
        vif: vif.as_ref().map(|v| FailoverVifInfo {
            devid: v.config().devid,
            mac: v.config().mac_string(),
            tap: v.tap_name().to_string(),
            ms: net_ms,
        }),
    };
    Ok((done, vbd, vif))
}

/// What the end of a connection means for the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The primary is dead after a checkpoint was ACKed: fail over to the replica.
    FailOver {
        /// The replica.
        replica: DomId,
        /// How the primary died.
        cause: DeathCause,
        /// The last ACKed checkpoint.
        acked: u64,
    },
    /// The primary is dead before the initial sync completed: no consistent replica exists.
    Refused(DeathCause),
    /// The primary is not dead (or was not watched): no failover.
    NoFailover {
        /// The heartbeat's state.
        state: PeerState,
        /// The stream failed (the split-brain guard held).
        stream_failed: bool,
    },
}

impl Verdict {
    /// The verdict for the heartbeat's final `state` and what the receiver kept.
    pub fn new(
        state: PeerState,
        replica: Option<DomId>,
        acked: Option<u64>,
        stream_failed: bool,
    ) -> Verdict {
        match (state, replica, acked) {
            (PeerState::Dead(cause), Some(replica), Some(acked)) => Verdict::FailOver {
                replica,
                cause,
                acked,
            },
            (PeerState::Dead(cause), _, _) => Verdict::Refused(cause),
            (state, _, _) => Verdict::NoFailover {
                state,
                stream_failed,
            },
        }
    }

    /// The line on stderr, if any.
    pub fn stderr_line(&self) -> Option<String> {
        match self {
            Verdict::FailOver { cause, acked, .. } => Some(format!(
                "kemari receive: primary dead ({cause:?}) after checkpoint {acked}: failing over"
            )),
            Verdict::Refused(cause) => Some(format!("kemari receive: primary dead ({cause:?}) before the initial sync completed: REFUSING FAILOVER, no consistent replica exists on this host (the guest is lost with its host)")),
            Verdict::NoFailover {
                state,
                stream_failed: true,
            } => Some(format!("kemari receive: stream failed but the primary still answers ({state:?}): no failover (split-brain guard)")),
            Verdict::NoFailover { .. } => None,
        }
    }
}

/// Serves primaries on `opts.listen` with the host and replica builder `open_host` opens
/// ([`this_host_xen`] for `kemari`), connection after connection (one with `opts.once`),
/// until a failover ran the guest here and its devices ended. What is printed goes to
/// `report`, in order; progress lines go to stderr.
pub fn receive<H: Hypervisor + 'static>(
    opts: &SecondaryOptions,
    signals: Signals,
    open_host: impl FnOnce() -> Result<(Arc<H>, Box<dyn ReplicaBuilder>), XenOpenError>,
    report: &mut dyn FnMut(SecondaryReport<'_>),
) -> Result<SecondaryEnd, SecondaryError> {
    receive_on(opts, signals, open_host, |a| TcpListener::bind(a), report)
}

/// [`receive`] with the listening socket made by `listen` from `opts.listen` (when it is
/// needed: after the host is open), e.g. one bound beforehand.
pub fn receive_on<H: Hypervisor + 'static>(
    opts: &SecondaryOptions,
    signals: Signals,
    open_host: impl FnOnce() -> Result<(Arc<H>, Box<dyn ReplicaBuilder>), XenOpenError>,
    listen: impl FnOnce(&str) -> std::io::Result<TcpListener>,
    report: &mut dyn FnMut(SecondaryReport<'_>),
) -> Result<SecondaryEnd, SecondaryError> {
    let process_signals = signals == Signals::Process;
    // as kemarid's worker: SIGUSR2 (fail over now) blocked before any thread starts
    let daemon_signal = match (&opts.status_file, process_signals) {
        (Some(_), true) => Some(DaemonSignal::block()?),
        _ => None,
    };
    let status = StatusWriter::new(opts.status_file.as_deref(), crate::api::Role::Secondary)?;
    let forced = Arc::new(AtomicBool::new(false));
    let current: Arc<Mutex<Option<TcpStream>>> = Arc::default();
    if let Some(sig) = daemon_signal {
        let (f, c) = (forced.clone(), current.clone());
        sig.on_signal(move || {
            eprintln!("kemari receive: failover asked (SIGUSR2)");
            f.store(true, Ordering::SeqCst);
            let c = c.lock().unwrap_or_else(PoisonError::into_inner);
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
    opts.validate()?;
    let disk_stop = match (opts.serves_after_failover(), process_signals) {
        (true, true) => Some(failover_signals()?),
        (true, false) => Some(Arc::new((
            AtomicBool::new(false),
            AtomicBool::new(false),
            AtomicBool::new(false),
        ))),
        _ => None,
    };
    let (host, builder) = open_host().map_err(SecondaryError::OpenXen)?;
    let rx = Receiver::new(host.as_ref(), builder.as_ref(), opts.receiver_options())
        .with_disks(opts.disks.clone())
        .with_observer(status.session_observer());
    let net = |step: String| move |source| SecondaryError::Net { step, source };
    let listener = listen(&opts.listen).map_err(net(format!("listening on {}", opts.listen)))?;
    eprintln!("kemari receive: listening on {}", opts.listen);
    let hb_socket = match &opts.heartbeat_listen {
        None => None,
        Some(addr) => {
            let s = std::net::UdpSocket::bind(addr)
                .map_err(net(format!("binding the heartbeat socket {addr}")))?;
            eprintln!(
                "kemari receive: heartbeat on {addr}, every {} ms, dead after {} misses",
                opts.heartbeat.period_ms, opts.heartbeat.misses
            );
            Some(s)
        }
    };
    loop {
        let (stream, peer) = listener
            .accept()
            .map_err(net("accepting a connection".into()))?;
        eprintln!("kemari receive: primary {peer} connected");
        status.state(GuestState::InitialSync);
        if opts.heartbeat_listen.is_some() {
            status.heartbeat(opts.heartbeat.period_ms, opts.heartbeat.misses, "alive");
        }
        *current.lock().unwrap_or_else(PoisonError::into_inner) = stream.try_clone().ok();
        let heartbeat = match &hb_socket {
            None => None,
            Some(s) => {
                let data = stream
                    .try_clone()
                    .map_err(net("cloning the connection for the heartbeat".into()))?;
                Some(
                    Heartbeat::spawn(
                        s.try_clone()
                            .map_err(net("cloning the heartbeat socket".into()))?,
                        Role::Responder,
                        opts.heartbeat.config(),
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
                    )
                    .map_err(|source| SecondaryError::Heartbeat { peer, source })?,
                )
            }
        };
        let start = Instant::now();
        let (session, error) = match rx.serve(stream) {
            Ok(s) => (s, None),
            Err(f) => (*f.session, Some(f.error)),
        };
        let seconds = start.elapsed().as_secs_f64();
        let failover = match &heartbeat {
            Some(hb) if opts.failover => {
                let cfg = opts.heartbeat.config();
                let state = if forced.load(Ordering::SeqCst) {
                    // kemarid's `failover` (it checked the primary is silent, or was forced)
                    PeerState::Dead(DeathCause::Missed {
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
                let verdict = Verdict::new(state, session.replica, session.acked, error.is_some());
                if let Some(line) = verdict.stderr_line() {
                    eprintln!("{line}");
                }
                match verdict {
                    Verdict::FailOver { replica, .. } => {
                        Some(fail_over(opts, host.as_ref(), &rx, replica, hb)?)
                    }
                    Verdict::Refused(_) => {
                        log::error!("failover refused: the primary died during the initial sync");
                        None
                    }
                    Verdict::NoFailover { .. } => None,
                }
            }
            _ => None,
        };
        drop(heartbeat);
        match failover.as_ref().map(|f| &f.0) {
            Some(f) => {
                status.heartbeat(opts.heartbeat.period_ms, opts.heartbeat.misses, "dead");
                status.failed_over(Some(u32::from(f.report.domid)), Some(f.report.seq));
            }
            None => status.finish(
                if error.is_some() {
                    GuestState::Failed
                } else {
                    GuestState::Stopped
                },
                error.as_ref().map(ToString::to_string),
            ),
        }
        let (failed_over, devices) = match failover {
            Some((f, vbd, vif)) => (Some(f), Some((vbd, vif))),
            None => (None, None),
        };
        let failed = error.is_some();
        let received = Received {
            peer,
            session,
            error,
            seconds,
            staged: rx.staged_path(),
            failover: failed_over,
        };
        report(SecondaryReport::Received(&received));
        if let Some((vbd, vif)) = devices {
            // This host now runs the guest, unprotected.
            if let Some(stop) = &disk_stop {
                std::thread::scope(|scope| -> Result<(), SecondaryError> {
                    let net = vif.map(|v| scope.spawn(move || serve_failover_vif(v, &stop.1)));
                    let disk = match vbd {
                        Some(vbd) => serve_failover_disk(vbd, stop, &opts.vdev)
                            .map(|d| report(SecondaryReport::FailoverDisk(&d))),
                        None => {
                            stop.0.store(true, Ordering::SeqCst);
                            Ok(())
                        }
                    };
                    // the disk's line first (its counters end when the guest is gone, as
                    // the NIC's), then the NIC's
                    if let Some(n) = net {
                        let r = n
                            .join()
                            .map_err(|_| SecondaryError::VifPanicked)?
                            .map_err(|e| SecondaryError::ServeVif(Box::new(e)))?;
                        report(SecondaryReport::FailoverVif(&r));
                    }
                    disk
                })?;
            }
            return Ok(SecondaryEnd::FailedOver);
        }
        if opts.once {
            return Ok(SecondaryEnd::Served { failed });
        }
    }
}

#[cfg(test)]
mod tests;
