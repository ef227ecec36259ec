//! `kemari attach`: serve a disk (userspace blkback) and/or a NIC (userspace netback) to a
//! guest in the foreground (docs/backends.md).
//!
//! The guest is normally created paused with no disk/vif in its xl config (`xl create -p`);
//! [`open_disk`] and [`crate::session::outputs::create_vif`] create the devices' xenstore nodes
//! (`device/vbd/<devid>` in the guest, `backend/kemari-vbd/<domid>/<devid>` in dom0;
//! `device/vif/<devid>` and `backend/kemari-vif/<domid>/<devid>` plus a tap device for a NIC),
//! and [`serve`] serves the rings until the guest is gone or [`stop_on_signals`]'s flag is set
//! (the disk in this thread, the NIC in a second one). The `kemari` binary parses the
//! arguments and prints the lines and reports of this module.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use hypervisor::{DomId, Hypervisor, HypervisorError};
use nix::sys::signal::{SigSet, Signal};
use xenbus_backend::netback::parse_mac;
use xenbus_backend::VifStatus;
use xenbus_backend::{Vbd, VbdConfig, VbdError, VbdStats, VbdStatus, Vif, VifError, VifStats};

use crate::session::outputs::VifSpec;

/// Errors of this module: a bad `--vif` setting (naming it and its value), or which step of
/// attaching and serving failed for which domain and device.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// A `--vif` item without `=`.
    #[error("--vif {item:?}: expected key=value")]
    VifItem {
        /// The item.
        item: String,
    },
    /// `--vif mac=` is not a unicast MAC.
    #[error("--vif mac={value:?}: expected a unicast aa:bb:cc:dd:ee:ff")]
    VifMac {
        /// The value as given.
        value: String,
    },
    /// `--vif devid=` is not a number.
    #[error("--vif devid={value:?}: expected a number")]
    VifDevid {
        /// The value as given.
        value: String,
        /// The parse error.
        source: std::num::ParseIntError,
    },
    /// `--vif gso=` is not 0/1/on/off.
    #[error("--vif gso={value:?}: expected 0/1/on/off")]
    VifGso {
        /// The value (trimmed).
        value: String,
    },
    /// An unknown `--vif` key.
    #[error("--vif: unknown setting {key:?} (mac, bridge, devid, ifname, gso)")]
    VifKey {
        /// The key (trimmed).
        key: String,
    },
    /// SIGTERM/SIGINT could not be blocked.
    #[error("blocking SIGTERM/SIGINT")]
    Signals {
        /// The cause.
        source: nix::Error,
    },
    /// The thread waiting for SIGTERM/SIGINT could not start.
    #[error("starting the signal thread")]
    SignalThread {
        /// The cause.
        source: std::io::Error,
    },
    /// Opening xenstore or the event channels for the disk failed.
    #[error("{step}")]
    Xen {
        /// `opening xenstore` or `opening event channels`.
        step: &'static str,
        /// The cause.
        source: HypervisorError,
    },
    /// The disk device could not be created or taken over.
    #[error("{} {vdev} {} domain {domid}", if *.takeover { "taking over" } else { "creating" }, if *.takeover { "of" } else { "for" })]
    Disk {
        /// The virtual device (`xvda`).
        vdev: String,
        /// The guest.
        domid: DomId,
        /// Whether it was a takeover.
        takeover: bool,
        /// The cause.
        source: VbdError,
    },
    /// The guest could not be unpaused.
    #[error("unpausing domain {domid}")]
    Unpause {
        /// The guest.
        domid: DomId,
        /// The cause.
        source: HypervisorError,
    },
    /// Serving the disk failed.
    #[error("serving the disk")]
    ServeDisk {
        /// The cause.
        source: VbdError,
    },
    /// Serving the vif failed.
    #[error("serving the vif")]
    ServeVif {
        /// The cause.
        source: VifError,
    },
    /// The vif's thread could not start.
    #[error("starting the vif thread: {source}")]
    VifThread {
        /// The cause.
        source: std::io::Error,
    },
    /// The vif's thread panicked.
    #[error("the vif thread panicked")]
    VifPanicked,
}

/// `--vif` settings: comma-separated `mac=`, `bridge=`, `devid=`, `ifname=`, `gso=` (empty:
/// the defaults).
pub fn parse_vif_spec(spec: &str) -> Result<VifSpec, AttachError> {
    let mut v = VifSpec::default();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (k, val) = item.split_once('=').ok_or_else(|| AttachError::VifItem {
            item: item.to_string(),
        })?;
        match k.trim() {
            "mac" => {
                v.mac = Some(parse_mac(val.trim()).ok_or_else(|| AttachError::VifMac {
                    value: val.to_string(),
                })?)
            }
            "bridge" => v.bridge = Some(val.trim().to_owned()),
            "devid" => {
                v.devid = val.trim().parse().map_err(|source| AttachError::VifDevid {
                    value: val.to_string(),
                    source,
                })?
            }
            "ifname" => v.ifname = Some(val.trim().to_owned()),
            "gso" => {
                v.gso = match val.trim() {
                    "1" | "on" => true,
                    "0" | "off" => false,
                    other => {
                        return Err(AttachError::VifGso {
                            value: other.to_string(),
                        })
                    }
                }
            }
            other => {
                return Err(AttachError::VifKey {
                    key: other.to_string(),
                })
            }
        }
    }
    Ok(v)
}

/// Blocks SIGINT/SIGTERM in this thread (inherited by threads spawned later) and returns a flag a
/// waiter thread sets when one arrives.
pub fn stop_on_signals() -> Result<Arc<AtomicBool>, AttachError> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.thread_block()
        .map_err(|source| AttachError::Signals { source })?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(sig) = set.wait() {
                log::info!("{sig:?}: closing the device");
            }
            flag.store(true, Ordering::Relaxed);
        })
        .map_err(|source| AttachError::SignalThread { source })?;
    Ok(stop)
}

/// The disk `kemari attach` serves.
#[derive(Debug, Clone)]
pub struct DiskArgs {
    /// The guest.
    pub domid: DomId,
    /// The virtual device (`xvda`).
    pub vdev: String,
    /// Its device id.
    pub devid: u32,
    /// The raw image (or block device).
    pub image: PathBuf,
    /// Serve it read-only.
    pub readonly: bool,
    /// Take over a connected device instead of creating one.
    pub takeover: bool,
}

/// Creates (or with `takeover`, takes over) the disk device.
pub fn open_disk<'h>(hv: &'h dyn Hypervisor, d: &DiskArgs) -> Result<Vbd<'h>, AttachError> {
    let config = VbdConfig {
        domid: d.domid,
        devid: d.devid,
        backend_domid: 0,
        image: d.image.clone(),
        readonly: d.readonly,
        // on dom0's tmpfs: survives this process (a takeover after a crash reads it), not a reboot
        journal_dir: Some(PathBuf::from("/run/kemari")),
    };
    let xen = |step| move |source| AttachError::Xen { step, source };
    let xs = hv.open_xenstore().map_err(xen("opening xenstore"))?;
    let evtchn = hv
        .open_event_channels()
        .map_err(xen("opening event channels"))?;
    let r = if d.takeover {
        Vbd::attach(hv, xs, evtchn, &config)
    } else {
        Vbd::create(hv, xs, evtchn, &config)
    };
    r.map_err(|source| AttachError::Disk {
        vdev: d.vdev.clone(),
        domid: d.domid,
        takeover: d.takeover,
        source,
    })
}

/// The line printed once the disk device exists.
pub fn disk_ready_line(d: &DiskArgs, vbd: &Vbd<'_>) -> String {
    format!(
        "kemari attach: domain {} {} ({}) served from {} at {}, state {}",
        d.domid,
        d.vdev,
        d.devid,
        d.image.display(),
        vbd.paths().backend,
        vbd.state()
    )
}

/// The guest runs.
pub fn unpause(hv: &dyn Hypervisor, domid: DomId) -> Result<(), AttachError> {
    hv.unpause(domid)
        .map_err(|source| AttachError::Unpause { domid, source })
}

/// How the vif's serving ended: its status, counters and device id.
#[derive(Debug)]
pub struct VifDone {
    /// How it ended.
    pub status: VifStatus,
    /// Its counters.
    pub stats: VifStats,
    /// Its device id.
    pub devid: u32,
}

/// How serving ended, for the devices served.
#[derive(Debug)]
pub struct Served {
    /// The disk's end (if one was served).
    pub disk: Option<Result<VbdStatus, AttachError>>,
    /// The vif's end (if one was served).
    pub vif: Option<Result<VifDone, AttachError>>,
}

/// Serves the disk (in this thread) and the vif (in a second one) until both end; either
/// failing sets `stop` so that the other ends too.
pub fn serve(vbd: Option<&mut Vbd<'_>>, vif: Option<Vif<'_>>, stop: &AtomicBool) -> Served {
    std::thread::scope(|scope| {
        let vif_thread = vif.map(|mut vif| {
            std::thread::Builder::new()
                .name("vif".into())
                .spawn_scoped(scope, move || {
                    let status = vif.run(stop);
                    if status.is_err() {
                        stop.store(true, Ordering::Relaxed);
                    }
                    (status, vif.stats().clone(), vif.config().devid)
                })
        });
        let disk = vbd.map(|vbd| {
            let r = vbd.run(stop);
            if r.is_err() {
                stop.store(true, Ordering::Relaxed);
            }
            r.map_err(|source| AttachError::ServeDisk { source })
        });
        let vif = vif_thread.map(|t| match t {
            Err(source) => Err(AttachError::VifThread { source }),
            Ok(h) => match h.join() {
                Err(_) => Err(AttachError::VifPanicked),
                Ok((status, stats, devid)) => status
                    .map(|status| VifDone {
                        status,
                        stats,
                        devid,
                    })
                    .map_err(|source| AttachError::ServeVif { source }),
            },
        });
        Served { disk, vif }
    })
}

/// The disk's report with `--json`.
pub fn disk_report_json(
    domid: DomId,
    devid: u32,
    status: &VbdStatus,
    secs: f64,
    s: &VbdStats,
) -> serde_json::Value {
    serde_json::json!({
        "domid": domid,
        "devid": devid,
        "status": format!("{status:?}"),
        "seconds": secs,
        "requests": s.requests,
        "read_bytes": s.read_bytes,
        "write_bytes": s.write_bytes,
        "flushes": s.flushes,
        "discards": s.discards,
        "errors": s.errors,
        "notifies": s.notifies,
        "connects": s.connects,
        "persistent_maps": s.persistent_maps,
        "oneoff_maps": s.oneoff_maps,
    })
}

/// The disk's report as text (without the newline).
pub fn disk_report_line(
    domid: DomId,
    vdev: &str,
    status: &VbdStatus,
    secs: f64,
    s: &VbdStats,
) -> String {
    format!(
        "kemari attach: domain {domid} {vdev}: {status:?} after {secs:.1} s; {} requests, {} MiB read, {} MiB written, {} flushes, {} discards, {} errors, {} connects, {} pages mapped persistently, {} one-off mappings",
        s.requests,
        s.read_bytes >> 20,
        s.write_bytes >> 20,
        s.flushes,
        s.discards,
        s.errors,
        s.connects,
        s.persistent_maps,
        s.oneoff_maps
    )
}

/// The vif's report with `--json`.
pub fn vif_report_json(domid: DomId, v: &VifDone, secs: f64) -> serde_json::Value {
    let s = &v.stats;
    serde_json::json!({
        "domid": domid,
        "device": "vif",
        "devid": v.devid,
        "status": format!("{:?}", v.status),
        "seconds": secs,
        "tx_packets": s.tx_packets,
        "tx_bytes": s.tx_bytes,
        "tx_errors": s.tx_errors,
        "tx_dropped": s.tx_dropped,
        "rx_packets": s.rx_packets,
        "rx_bytes": s.rx_bytes,
        "rx_errors": s.rx_errors,
        "rx_dropped": s.rx_dropped,
        "notifies": s.notifies,
        "connects": s.connects,
    })
}

/// The vif's report as text (without the newline).
pub fn vif_report_line(domid: DomId, v: &VifDone, secs: f64) -> String {
    let s = &v.stats;
    format!(
        "kemari attach: domain {domid} vif {}: {:?} after {secs:.1} s; tx {} packets ({} bytes), rx {} packets ({} bytes), {} tx errors, {} tx dropped, {} rx errors, {} rx dropped, {} connects",
        v.devid,
        v.status,
        s.tx_packets,
        s.tx_bytes,
        s.rx_packets,
        s.rx_bytes,
        s.tx_errors,
        s.tx_dropped,
        s.rx_errors,
        s.rx_dropped,
        s.connects
    )
}

#[cfg(test)]
mod tests;
