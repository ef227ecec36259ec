//! The protected guest's outputs: its disk and NIC served by Kemari's blkback and netback in
//! the same process as the sender, each behind an output gate (see `xenbus_backend::commit`
//! and [`crate::sync::commit`]).
//!
//! The guest is created paused with no disk at that vdev and no vif at that handle (as for
//! `kemari attach`). Each backend runs in its own thread with its own handle on Xen; its gate
//! connects it to the sender: a kick with output to hold (a disk write, a frame the guest
//! sends) fires an I/O trigger, the checkpoint taken with the guest paused closes the epoch
//! (and carries that epoch's disk writes), and its ACK releases them ([`super::hook`]).
//!
//! Also here: the guest's NIC served after a failover ([`serve_failover_vif`]), the replay of
//! a shipped disk log onto a copy ([`replay_disk_log`]) and the names of virtual disks
//! ([`vdev_to_devid`], [`vdev_name`]).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hypervisor::xen::{XenHost, XenOpenError};
use hypervisor::{DomId, Hypervisor, HypervisorError};
use kemari_stream::disklog::DiskLogEntry;
use xenbus_backend::commit::OutputGate;
use xenbus_backend::tap::{Tap, TapError};
use xenbus_backend::{
    Vbd, VbdConfig, VbdError, VbdStats, VbdStatus, Vif, VifConfig, VifError, VifStats, VifStatus,
};

use crate::sync::commit::TriggerTap;
use crate::sync::disk_apply::{DiskApply, DiskApplyError, ReplicaDisk};
use crate::sync::trigger::Triggers;

/// Errors of the served outputs.
#[derive(Debug, thiserror::Error)]
pub enum OutputsError {
    /// A virtual disk name out of `xvda..xvdp`.
    #[error("--vdev {vdev:?}: expected xvda..xvdp")]
    Vdev {
        /// The name given.
        vdev: String,
    },
    /// The commit log could not be opened for appending.
    #[error("opening the commit log {}", path.display())]
    CommitLog {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A device thread could not open this host's Xen.
    #[error("opening this host's Xen for the {device} thread")]
    OpenXen {
        /// Which device's thread.
        device: Device,
        /// Why.
        #[source]
        source: XenOpenError,
    },
    /// Xenstore or the event channels could not be opened for the disk.
    #[error("{action} {vdev} for domain {domid}")]
    DiskXen {
        /// `creating` or `taking over`.
        action: &'static str,
        /// The disk in the guest.
        vdev: String,
        /// The guest.
        domid: DomId,
        /// The failed call.
        #[source]
        source: HypervisorError,
    },
    /// The disk could not be created or taken over.
    #[error("{action} {vdev} for domain {domid}")]
    Disk {
        /// `creating` or `taking over`.
        action: &'static str,
        /// The disk in the guest.
        vdev: String,
        /// The guest.
        domid: DomId,
        /// Why.
        #[source]
        source: VbdError,
    },
    /// The disk could not be put under output commit (the error names the device).
    #[error(transparent)]
    ProtectDisk(VbdError),
    /// Serving the disk failed.
    #[error("serving the disk")]
    ServeDisk(#[source] VbdError),
    /// The NIC's tap could not be made or brought up.
    #[error("{step}")]
    Tap {
        /// `creating the tap` or `bringing the tap up`.
        step: &'static str,
        /// The tap's name.
        tap: String,
        /// Why.
        #[source]
        source: TapError,
    },
    /// Xenstore or the event channels could not be opened for the NIC.
    #[error("{step}")]
    VifXen {
        /// `opening xenstore` or `opening event channels`.
        step: &'static str,
        /// The guest.
        domid: DomId,
        /// The failed call.
        #[source]
        source: HypervisorError,
    },
    /// The vif could not be created.
    #[error("creating vif {devid} for domain {domid}")]
    Vif {
        /// The vif's handle.
        devid: u32,
        /// The guest.
        domid: DomId,
        /// Why.
        #[source]
        source: VifError,
    },
    /// The NIC could not be put under output commit (the error names the device).
    #[error(transparent)]
    ProtectVif(VifError),
    /// Serving the NIC failed.
    #[error("serving the vif")]
    ServeVif(#[source] VifError),
    /// Serving the NIC after a failover failed.
    #[error("serving the vif after the failover")]
    ServeFailoverVif(#[source] VifError),
    /// A device thread could not be started.
    #[error("starting the {name} thread")]
    Spawn {
        /// The thread's name.
        name: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A device thread ended (or panicked) without saying whether its device exists.
    #[error("the {name} thread ended before the device existed")]
    NotStarted {
        /// The thread's name.
        name: &'static str,
    },
    /// A device thread panicked while serving.
    #[error("the {device} thread panicked")]
    Panicked {
        /// Which device's thread.
        device: Device,
    },
    /// The guest could not be unpaused.
    #[error("unpausing domain {domid}")]
    Unpause {
        /// The guest.
        domid: DomId,
        /// The failed call.
        #[source]
        source: HypervisorError,
    },
    /// A disk log could not be applied to a copy.
    #[error("replaying {} onto {}", file.display(), copy.display())]
    Replay {
        /// The disk log.
        file: PathBuf,
        /// The copy.
        copy: PathBuf,
        /// Why.
        #[source]
        source: DiskApplyError,
    },
}

/// `xvdX` -> `virtual-device` (major 202, 16 minors per disk).
pub fn vdev_to_devid(vdev: &str) -> Result<u32, OutputsError> {
    let letter = vdev
        .strip_prefix("xvd")
        .filter(|s| s.len() == 1)
        .and_then(|s| s.bytes().next())
        .filter(|b| (b'a'..=b'p').contains(b))
        .ok_or_else(|| OutputsError::Vdev {
            vdev: vdev.to_owned(),
        })?;
    Ok((202 << 8) | (u32::from(letter - b'a') << 4))
}

/// `virtual-device` -> `xvdX` (the inverse of [`vdev_to_devid`]).
pub fn vdev_name(devid: u32) -> String {
    let letter = char::from(b'a' + ((devid >> 4) & 0xf) as u8);
    format!("xvd{letter}")
}

/// The guest's disk to serve.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskSpec {
    /// The raw image (or block device).
    pub image: PathBuf,
    /// Its `virtual-device` in the guest ([`vdev_to_devid`]).
    pub devid: u32,
    /// Take the device over from the process serving it now (Kemari's `Attached` state: its
    /// live ring and in-flight journal, no handshake) instead of creating it.
    pub takeover: bool,
}

/// The guest's NIC to serve (`--vif` settings).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VifSpec {
    /// The guest's MAC (Xen's default for the handle if `None`).
    pub mac: Option<[u8; 6]>,
    /// The bridge to put the tap in.
    pub bridge: Option<String>,
    /// The vif's handle.
    pub devid: u32,
    /// The tap's name (`kvif<domid>.<devid>` if `None`).
    pub ifname: Option<String>,
    /// Offer scatter-gather and TCPv4 GSO (the tap segments).
    pub gso: bool,
}

impl Default for VifSpec {
    fn default() -> Self {
        VifSpec {
            mac: None,
            bridge: None,
            devid: 0,
            ifname: None,
            gso: true,
        }
    }
}

/// Creates the vif of `spec` for `domid` (tap first, up and bridged, then the xenstore nodes).
pub fn create_vif<'h>(
    hv: &'h dyn Hypervisor,
    domid: DomId,
    spec: &VifSpec,
) -> Result<Vif<'h>, OutputsError> {
    let mut config = VifConfig::new(domid, spec.devid);
    if let Some(mac) = spec.mac {
        config.mac = mac;
    }
    let ifname = spec.ifname.clone().unwrap_or_else(|| config.tap_name());
    let tap_err = |step| {
        let tap = ifname.clone();
        move |source| OutputsError::Tap { step, tap, source }
    };
    let tap = Tap::create(&ifname, spec.gso).map_err(tap_err("creating the tap"))?;
    tap.link_up(spec.bridge.as_deref())
        .map_err(tap_err("bringing the tap up"))?;
    let xen_err = |step| {
        move |source| OutputsError::VifXen {
            step,
            domid,
            source,
        }
    };
    let xs = hv.open_xenstore().map_err(xen_err("opening xenstore"))?;
    let evtchn = hv
        .open_event_channels()
        .map_err(xen_err("opening event channels"))?;
    Vif::create(hv, xs, evtchn, &config, tap).map_err(|source| OutputsError::Vif {
        devid: spec.devid,
        domid,
        source,
    })
}

/// `vif DEVID (mac MAC) on tap TAP[ in bridge BRIDGE][, GSO] at BACKEND`: how `kemari attach`
/// and `kemari replicate` name a vif they serve (`with_gso`: say ", GSO" when the tap offers it).
pub fn describe_vif(vif: &Vif<'_>, spec: &VifSpec, with_gso: bool) -> String {
    format!(
        "vif {} (mac {}) on tap {}{}{} at {}",
        vif.config().devid,
        vif.config().mac_string(),
        vif.tap_name(),
        spec.bridge
            .as_deref()
            .map(|b| format!(" in bridge {b}"))
            .unwrap_or_default(),
        if with_gso && spec.gso { ", GSO" } else { "" },
        vif.paths().backend
    )
}

/// The guest (created paused for its served devices) runs.
pub fn unpause(hv: &dyn Hypervisor, domid: DomId) -> Result<(), OutputsError> {
    hv.unpause(domid)
        .map_err(|source| OutputsError::Unpause { domid, source })
}

/// What to serve and where to log the gates' commit lines.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OutputsConfig {
    /// The guest's disk.
    pub disk: Option<DiskSpec>,
    /// The guest's NIC.
    pub vif: Option<VifSpec>,
    /// Append each gate's commit log here (opened for appending), each line ending in
    /// ` gate=disk` or ` gate=net`.
    pub commit_log: Option<PathBuf>,
}

/// One of the served devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// The disk (blkback).
    Disk,
    /// The NIC (netback).
    Vif,
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Device::Disk => "disk",
            Device::Vif => "vif",
        })
    }
}

/// A device that now exists (for the caller to say so).
#[derive(Debug, Clone, Copy)]
pub enum Started<'a> {
    /// The disk: its `virtual-device`, the image it is served from, its backend path.
    Disk {
        /// `virtual-device` ([`vdev_name`] names it).
        devid: u32,
        /// The image.
        image: &'a Path,
        /// Its xenstore backend directory.
        backend: &'a str,
    },
    /// The NIC, as [`describe_vif`] names it.
    Vif {
        /// `vif DEVID (mac MAC) on tap TAP[ in bridge BRIDGE] at BACKEND`.
        description: &'a str,
    },
}

/// One line of a gate's commit log at a time into a file shared by the gates, each line
/// ending in ` gate=TAG`.
pub(super) struct SharedLog {
    file: Arc<Mutex<std::io::BufWriter<std::fs::File>>>,
    tag: &'static str,
    line: Vec<u8>,
}

impl SharedLog {
    /// The gate tagged `tag`'s lines into `file`.
    pub(super) fn new(
        file: Arc<Mutex<std::io::BufWriter<std::fs::File>>>,
        tag: &'static str,
    ) -> SharedLog {
        SharedLog {
            file,
            tag,
            line: Vec::new(),
        }
    }
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

/// What a device reports when it ends: its counters as JSON and as a line.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// `{"device": .., "status": .., counters.., "last_ack": .., "seconds": ..}`.
    pub json: serde_json::Value,
    /// The line to print.
    pub text: String,
}

/// The device thread's way to say that its device exists.
struct Ready {
    tx: mpsc::Sender<Result<String, OutputsError>>,
    sent: bool,
}

impl Ready {
    /// The device exists: `text` describes it.
    fn send(&mut self, text: String) {
        let _ = self.tx.send(Ok(text));
        self.sent = true;
    }
}

/// One protected device, served in its own thread.
struct Served {
    gate: Arc<OutputGate>,
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Result<Report, OutputsError>>,
}

impl Served {
    /// Runs `body` in a thread named `name`; it reports through its [`Ready`] once the device
    /// exists (with a text describing it), or fails before. Returns once the device exists,
    /// or with the error that kept it from existing.
    fn spawn<F>(
        name: &'static str,
        gate: Arc<OutputGate>,
        body: F,
    ) -> Result<(Served, String), OutputsError>
    where
        F: FnOnce(Arc<OutputGate>, &AtomicBool, &mut Ready) -> Result<Report, OutputsError>
            + Send
            + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let (g, s) = (gate.clone(), stop.clone());
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let mut ready = Ready { tx, sent: false };
                match body(g, &s, &mut ready) {
                    // the device never existed: the error is spawn's
                    Err(e) if !ready.sent => {
                        let _ = ready.tx.send(Err(e));
                        Err(OutputsError::NotStarted { name })
                    }
                    r => r,
                }
            })
            .map_err(|source| OutputsError::Spawn { name, source })?;
        let text = rx.recv().map_err(|_| OutputsError::NotStarted { name })??;
        Ok((Served { gate, stop, handle }, text))
    }

    /// Stops serving and waits for the thread.
    fn stop_and_join(self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.handle.join();
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
    /// Creates the disk and/or NIC of `config` for `domid` (before the guest runs) behind
    /// gates whose taps fire `triggers`, and serves each in a thread; `started` is told about
    /// each once it exists, the disk first. If the NIC fails, the disk is stopped again.
    /// `usr1` is the held-stop request that also ends serving an unprotected guest
    /// ([`finish`](Self::finish)).
    pub fn start(
        domid: DomId,
        config: OutputsConfig,
        triggers: &Triggers,
        usr1: &Arc<AtomicBool>,
        started: &mut dyn FnMut(Started<'_>),
    ) -> Result<Outputs, OutputsError> {
        let log = match &config.commit_log {
            None => None,
            Some(path) => Some(Arc::new(Mutex::new(std::io::BufWriter::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| OutputsError::CommitLog {
                        path: path.clone(),
                        source,
                    })?,
            )))),
        };
        let new_gate = |tag: &'static str| {
            let gate = OutputGate::new(1, Box::new(TriggerTap(triggers.clone())));
            if let Some(file) = &log {
                gate.set_commit_log(Box::new(SharedLog::new(file.clone(), tag)));
            }
            gate
        };
        let disk = match config.disk {
            None => None,
            Some(spec) => {
                let (devid, image) = (spec.devid, spec.image.clone());
                let (served, backend) = start_disk(domid, spec, new_gate("disk"))?;
                started(Started::Disk {
                    devid,
                    image: &image,
                    backend: &backend,
                });
                Some(served)
            }
        };
        let vif = match config.vif {
            None => None,
            Some(spec) => match start_vif(domid, spec, new_gate("net")) {
                Ok((served, description)) => {
                    started(Started::Vif {
                        description: &description,
                    });
                    Some(served)
                }
                Err(e) => {
                    if let Some(d) = disk {
                        d.stop_and_join();
                    }
                    return Err(e);
                }
            },
        };
        Ok(Outputs {
            disk,
            vif,
            domid,
            started: Instant::now(),
            usr1: usr1.clone(),
        })
    }

    /// The disk's gate, if the disk is served.
    pub fn disk_gate(&self) -> Option<&Arc<OutputGate>> {
        self.disk.as_ref().map(|s| &s.gate)
    }

    /// The NIC's gate, if the NIC is served.
    pub fn net_gate(&self) -> Option<&Arc<OutputGate>> {
        self.vif.as_ref().map(|s| &s.gate)
    }

    fn served(&self) -> impl Iterator<Item = &Served> {
        self.disk.iter().chain(self.vif.iter())
    }

    /// After protection: with the guest `held` paused, serve what the last ACK released and
    /// stop (disk requests of the next epoch are dropped unanswered, its frames dropped: the
    /// guest is kept at the ACKed state). Otherwise the guest runs on UNPROTECTED: held output
    /// is released, `unprotected` is told, and the devices are served until the guest is gone
    /// (a device's thread ends) or `triggers.stop` (SIGINT/SIGTERM) or the held-stop request
    /// (SIGUSR1); at once if none is served. Then each device
    /// is stopped; the returned iterator waits for each in turn, the disk first, and yields
    /// its report (with `seconds` since the devices started in its JSON).
    pub fn finish(self, held: bool, triggers: &Triggers, unprotected: impl FnOnce(DomId)) -> Ended {
        if !held {
            for s in self.served() {
                s.gate.end();
            }
            unprotected(self.domid);
            while self.served().next().is_some()
                && !triggers.stopped()
                && !self.usr1.load(Ordering::SeqCst)
                && !self.served().any(|s| s.handle.is_finished())
            {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        for s in self.served() {
            s.stop.store(true, Ordering::SeqCst);
        }
        Ended {
            seconds: self.started.elapsed().as_secs_f64(),
            devices: [
                self.disk.map(|s| (Device::Disk, s)),
                self.vif.map(|s| (Device::Vif, s)),
            ]
            .into_iter(),
        }
    }
}

/// The devices of [`Outputs::finish`], stopped: each `next` waits for one (its commit log
/// flushed before and after) and yields its report or why it failed.
pub struct Ended {
    seconds: f64,
    devices: std::array::IntoIter<Option<(Device, Served)>, 2>,
}

impl Iterator for Ended {
    type Item = (Device, Result<Report, OutputsError>);

    fn next(&mut self) -> Option<Self::Item> {
        let (device, s) = self.devices.by_ref().flatten().next()?;
        s.gate.flush_commit_log();
        let r = s
            .handle
            .join()
            .map_err(|_| OutputsError::Panicked { device })
            .and_then(|r| r);
        s.gate.flush_commit_log();
        let r = r.map(|mut r| {
            r.json["seconds"] = serde_json::json!(self.seconds);
            r
        });
        Some((device, r))
    }
}

/// The disk under `gate`, served by blkback in a thread with its own handle on Xen. Returns
/// once it exists, with its backend path.
fn start_disk(
    domid: DomId,
    spec: DiskSpec,
    gate: Arc<OutputGate>,
) -> Result<(Served, String), OutputsError> {
    let DiskSpec {
        image,
        devid,
        takeover,
    } = spec;
    let vdev = vdev_name(devid);
    Served::spawn("blkback", gate, move |g, stop, ready| {
        let host = XenHost::open().map_err(|source| OutputsError::OpenXen {
            device: Device::Disk,
            source,
        })?;
        let config = VbdConfig {
            domid,
            devid,
            backend_domid: 0,
            image,
            readonly: false,
            journal_dir: Some(PathBuf::from("/run/kemari")),
        };
        let hv: &dyn Hypervisor = &host;
        let action = if takeover { "taking over" } else { "creating" };
        let xen_err = |source| OutputsError::DiskXen {
            action,
            vdev: vdev.clone(),
            domid,
            source,
        };
        let xs = hv.open_xenstore().map_err(xen_err)?;
        let ev = hv.open_event_channels().map_err(xen_err)?;
        let mut vbd = if takeover {
            Vbd::attach(hv, xs, ev, &config)
        } else {
            Vbd::create(hv, xs, ev, &config)
        }
        .map_err(|source| OutputsError::Disk {
            action,
            vdev: vdev.clone(),
            domid,
            source,
        })?;
        vbd.protect(g.clone()).map_err(OutputsError::ProtectDisk)?;
        ready.send(vbd.paths().backend.clone());
        let status = vbd.run(stop).map_err(OutputsError::ServeDisk)?;
        Ok(disk_report(&vdev, &status, vbd.stats(), g.released()))
    })
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
/// own handle on Xen. Returns once it exists, with its [`describe_vif`].
fn start_vif(
    domid: DomId,
    spec: VifSpec,
    gate: Arc<OutputGate>,
) -> Result<(Served, String), OutputsError> {
    Served::spawn("netback", gate, move |g, stop, ready| {
        let host = XenHost::open().map_err(|source| OutputsError::OpenXen {
            device: Device::Vif,
            source,
        })?;
        let mut vif = create_vif(&host, domid, &spec)?;
        vif.protect(g.clone()).map_err(OutputsError::ProtectVif)?;
        ready.send(describe_vif(&vif, &spec, false));
        let status = vif.run(stop).map_err(OutputsError::ServeVif)?;
        Ok(vif_report(
            vif.config().devid,
            &status,
            vif.stats(),
            Some(g.released()),
        ))
    })
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

/// After a failover: serves the guest's NIC until the guest is gone or `stop`; its report
/// has `seconds` (of serving) and `domid` in its JSON.
pub fn serve_failover_vif(mut vif: Vif<'_>, stop: &AtomicBool) -> Result<Report, OutputsError> {
    let domid = vif.paths().domid;
    let start = Instant::now();
    let status = vif.run(stop).map_err(OutputsError::ServeFailoverVif)?;
    let mut r = vif_report(vif.config().devid, &status, vif.stats(), None);
    r.json["seconds"] = serde_json::json!(start.elapsed().as_secs_f64());
    r.json["domid"] = serde_json::json!(domid);
    Ok(r)
}

/// Applies the disk log `entries` read from `file` to `copy` of the disk `devid`, all or
/// nothing, as the secondary does with a checkpoint.
pub fn replay_disk_log(
    file: &Path,
    entries: &[DiskLogEntry<Vec<u8>>],
    copy: &Path,
    devid: u32,
) -> Result<(), OutputsError> {
    let disks = [ReplicaDisk {
        devid,
        path: copy.to_owned(),
    }];
    let err = |source| OutputsError::Replay {
        file: file.to_owned(),
        copy: copy.to_owned(),
        source,
    };
    DiskApply::prepare(&disks, entries)
        .map_err(err)?
        .write(entries)
        .map_err(err)
}

#[cfg(test)]
mod tests;
