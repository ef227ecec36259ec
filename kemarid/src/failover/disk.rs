//! The guest's disk on the new primary after a failover.
//!
//! A guest protected with `kemari replicate --disk` has no disk in its xl configuration: the
//! primary's process served it with Kemari's blkback. So the domain `xl restore` builds on the
//! secondary has no `device/vbd/<devid>` nodes at all, and a guest resuming without them
//! cannot reconnect its blkfront (its resume re-reads `backend` from those nodes). The domain is
//! therefore restored paused; [`serve_and_unpause`] creates the device for the secondary's copy
//! of the disk (which holds every write of every ACKed checkpoint: the receiver applied the
//! disk write logs with the checkpoints) and only then unpauses the guest. The guest's blkfront
//! resumes through the normal handshake (the backend waits in `InitWait`) and re-queues the
//! requests that were in flight at the checkpoint; writes are idempotent.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hypervisor::{DomId, Hypervisor, HypervisorError};
use xenbus_backend::{Vbd, VbdConfig, VbdError, VbdStats, VbdStatus};

use crate::sync::disk_apply::ReplicaDisk;

/// Errors bringing the disk up after a failover.
#[derive(Debug, thiserror::Error)]
pub enum FailoverDiskError {
    /// The restored domain is not paused: it may already run without its disk.
    #[error("domain {domid} is not paused: its disk must exist before it runs")]
    NotPaused {
        /// The restored guest.
        domid: DomId,
    },
    /// A call to Xen failed.
    #[error("domain {domid}: {step}: {source}")]
    Xen {
        /// The restored guest.
        domid: DomId,
        /// Which step.
        step: &'static str,
        /// The failed call.
        #[source]
        source: HypervisorError,
    },
    /// The block device could not be created.
    #[error("domain {domid}: serving {path} as device {devid}: {source}")]
    Device {
        /// The restored guest.
        domid: DomId,
        /// `virtual-device`.
        devid: u32,
        /// The secondary's copy.
        path: PathBuf,
        /// Why.
        #[source]
        source: VbdError,
    },
    /// Serving the device failed (a dom0-side error: xenstore, event channels).
    #[error("domain {domid}: serving its disk after the failover: {source}")]
    Serve {
        /// The guest.
        domid: DomId,
        /// Why.
        #[source]
        source: VbdError,
    },
}

/// How [`serve`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum ServeEnd {
    /// The guest is gone; the device was closed and its nodes removed.
    Gone,
    /// Stopped (SIGTERM); the device was closed and its nodes removed.
    Stopped,
    /// Handed over for a takeover (`kemari protect`): the device's nodes, the guest's ring and
    /// its connected frontend are left as they are; only this backend's port and ring mapping
    /// are gone. Every request taken had been answered (requests are served synchronously).
    HandedOver,
}

/// Serves the guest's disk after a failover until the guest is gone, `stop` is set, or
/// `handover` is set (checked every 200 ms); returns how it ended and the device's counters.
pub fn serve(
    mut vbd: Vbd<'_>,
    stop: &AtomicBool,
    handover: &AtomicBool,
) -> Result<(ServeEnd, VbdStats), FailoverDiskError> {
    let domid = vbd.paths().domid;
    let err = |source| FailoverDiskError::Serve { domid, source };
    let end = loop {
        if handover.load(Ordering::SeqCst) {
            break ServeEnd::HandedOver;
        }
        if stop.load(Ordering::SeqCst) {
            break ServeEnd::Stopped;
        }
        if vbd.poll(Some(Duration::from_millis(200))).map_err(err)? == VbdStatus::Gone {
            break ServeEnd::Gone;
        }
    };
    let stats = vbd.stats().clone();
    if end == ServeEnd::HandedOver {
        // nothing held (no output gate here) and nothing in flight: dropping the device only
        // unbinds its port, unmaps the ring and removes its (empty) journal
        drop(vbd);
    } else {
        vbd.shutdown().map_err(err)?;
    }
    Ok((end, stats))
}

/// Creates the block device of `disk` for the paused, restored guest `domid` (frontend and
/// backend nodes, backend in `InitWait`) and unpauses the guest. If anything fails the guest
/// stays paused and no device nodes are left behind.
pub fn serve_and_unpause<'h>(
    hv: &'h dyn Hypervisor,
    domid: DomId,
    disk: &ReplicaDisk,
    journal_dir: Option<PathBuf>,
) -> Result<Vbd<'h>, FailoverDiskError> {
    let xen = |step, source| FailoverDiskError::Xen {
        domid,
        step,
        source,
    };
    super::require_paused(hv, domid, xen, FailoverDiskError::NotPaused { domid })?;
    let config = VbdConfig {
        domid,
        devid: disk.devid,
        backend_domid: 0,
        image: disk.path.clone(),
        readonly: false,
        journal_dir,
    };
    let xs = hv.open_xenstore().map_err(|e| xen("opening xenstore", e))?;
    let ev = hv
        .open_event_channels()
        .map_err(|e| xen("opening event channels", e))?;
    let mut vbd = Vbd::create(hv, xs, ev, &config).map_err(|source| FailoverDiskError::Device {
        domid,
        devid: disk.devid,
        path: disk.path.clone(),
        source,
    })?;
    if let Err(e) = hv.unpause(domid) {
        if let Err(rm) = vbd.shutdown() {
            log::warn!("domain {domid}: removing device {}: {rm}", disk.devid);
        }
        return Err(xen("unpausing", e));
    }
    Ok(vbd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hypervisor::mem::{DomainConfig, MemXen};
    use hypervisor::{DomainControl, Tx, XenStore};
    use std::time::Duration;
    use xenbus_backend::state::{BackendState, XenbusState};
    use xenbus_backend::VbdStatus;

    fn copy(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kemari-fo-disk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::File::create(&p).unwrap().set_len(1 << 20).unwrap();
        p
    }

    fn read(xs: &dyn XenStore, path: &str) -> Option<String> {
        xs.read(Tx::NONE, path)
            .ok()
            .map(|v| String::from_utf8(v).unwrap())
    }

    /// A restored guest (paused, no disk nodes) gets its disk, runs, and its resuming blkfront
    /// connects through the normal handshake.
    #[test]
    fn restored_guest_gets_its_disk_before_it_runs() {
        let xen = MemXen::new();
        let d = xen.create_domain(DomainConfig::pvh(64)).unwrap();
        xen.pause(d).unwrap();
        let front = format!("/local/domain/{d}/device/vbd/51712");
        let gxs = xen.guest(d).xenstore().unwrap();
        // as after `xl restore` of a guest whose disk Kemari served: no frontend nodes
        assert_eq!(read(&gxs, &format!("{front}/backend")), None);
        let disk = ReplicaDisk {
            devid: 51712,
            path: copy("ok.img"),
        };
        let mut vbd = serve_and_unpause(&xen, d, &disk, None).unwrap();
        let info = xen.domain_info(d).unwrap();
        assert!(!info.paused, "the guest runs once its disk exists");
        let back = read(&gxs, &format!("{front}/backend")).unwrap();
        assert_eq!(
            back,
            format!("/local/domain/0/backend/kemari-vbd/{d}/51712")
        );
        assert_eq!(read(&gxs, &format!("{back}/state")).as_deref(), Some("2"));
        assert_eq!(
            read(&gxs, &format!("{back}/params")),
            Some(disk.path.display().to_string())
        );
        // blkfront_resume -> talk_to_blkback: a new ring, event channel, state Initialised
        connect_front(&xen, d, &front);
        let st = vbd.poll(Some(Duration::ZERO)).unwrap();
        assert_eq!(
            st,
            VbdStatus::Active(BackendState::Xenbus(XenbusState::Connected))
        );
        assert_eq!(read(&gxs, &format!("{back}/state")).as_deref(), Some("4"));
        vbd.shutdown().unwrap();
        assert_eq!(read(&gxs, &format!("{front}/backend")), None);
    }

    /// The frontend side of a resumed blkfront: a ring page, a channel, state Initialised.
    fn connect_front(xen: &MemXen, d: DomId, front: &str) {
        let gxs = xen.guest(d).xenstore().unwrap();
        let g = xen.guest(d);
        g.fill_page(10, 0).unwrap();
        let gref = g.grant_access(0, 10, false).unwrap();
        g.write(10, 4, &1u32.to_le_bytes()).unwrap();
        g.write(10, 12, &1u32.to_le_bytes()).unwrap();
        let port = g.evtchn_alloc_unbound(0).unwrap();
        for (k, v) in [
            ("ring-ref", gref.to_string()),
            ("event-channel", port.to_string()),
            ("protocol", "x86_64-abi".into()),
            ("state", "3".into()),
        ] {
            gxs.write(Tx::NONE, &format!("{front}/{k}"), v.as_bytes())
                .unwrap();
        }
    }

    /// A hand-over leaves the device's nodes and the connected frontend for a takeover (the
    /// `Attached` state), a stop removes them.
    #[test]
    fn handover_leaves_the_device_for_a_takeover_stop_removes_it() {
        let xen = MemXen::new();
        let d = xen.create_domain(DomainConfig::pvh(64)).unwrap();
        xen.pause(d).unwrap();
        let front = format!("/local/domain/{d}/device/vbd/51712");
        let gxs = xen.guest(d).xenstore().unwrap();
        let disk = ReplicaDisk {
            devid: 51712,
            path: copy("handover.img"),
        };
        let mut vbd = serve_and_unpause(&xen, d, &disk, None).unwrap();
        connect_front(&xen, d, &front);
        vbd.poll(Some(Duration::ZERO)).unwrap();
        let back = read(&gxs, &format!("{front}/backend")).unwrap();
        assert_eq!(read(&gxs, &format!("{back}/state")).as_deref(), Some("4"));
        let (no, yes) = (AtomicBool::new(false), AtomicBool::new(true));
        let (end, _) = serve(vbd, &no, &yes).unwrap();
        assert_eq!(end, ServeEnd::HandedOver);
        assert_eq!(read(&gxs, &format!("{front}/backend")), Some(back.clone()));
        assert_eq!(read(&gxs, &format!("{front}/state")).as_deref(), Some("3"));
        assert_eq!(read(&gxs, &format!("{back}/state")).as_deref(), Some("4"));
        // kemari protect takes it over
        let config = VbdConfig {
            domid: d,
            devid: 51712,
            backend_domid: 0,
            image: disk.path.clone(),
            readonly: false,
            journal_dir: None,
        };
        // the frontend's view of a connected device (it wrote Initialised, the backend Connected)
        gxs.write(Tx::NONE, &format!("{front}/state"), b"4")
            .unwrap();
        let xs = xen.open_xenstore().unwrap();
        let ev = xen.open_event_channels().unwrap();
        let taken = Vbd::attach(&xen, xs, ev, &config).unwrap();
        assert_eq!(taken.state(), BackendState::Attached);
        // a stop closes the device and removes its nodes
        let (end, _) = serve(taken, &yes, &no).unwrap();
        assert_eq!(end, ServeEnd::Stopped);
        assert_eq!(read(&gxs, &format!("{front}/backend")), None);
    }

    #[test]
    fn a_failure_leaves_the_guest_paused_and_no_nodes() {
        let xen = MemXen::new();
        let d = xen.create_domain(DomainConfig::pvh(64)).unwrap();
        let disk = ReplicaDisk {
            devid: 51712,
            path: copy("running.img"),
        };
        // not paused: refused before anything is created
        let e = serve_and_unpause(&xen, d, &disk, None)
            .map(|_| ())
            .unwrap_err();
        assert!(matches!(e, FailoverDiskError::NotPaused { .. }), "{e}");
        xen.pause(d).unwrap();
        let gone = ReplicaDisk {
            devid: 51712,
            path: copy("x.img").with_file_name("absent.img"),
        };
        let e = serve_and_unpause(&xen, d, &gone, None)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(e.contains("absent.img") && e.contains("51712"), "{e}");
        assert!(xen.domain_info(d).unwrap().paused);
        let gxs = xen.guest(d).xenstore().unwrap();
        assert_eq!(
            read(&gxs, &format!("/local/domain/{d}/device/vbd/51712/backend")),
            None
        );
        // unpause fails (a fault): the device is removed again, the guest stays paused
        xen.faults()
            .fail_after(hypervisor::Method::Unpause, 0, hypervisor::Errno::EPERM);
        let e = serve_and_unpause(&xen, d, &disk, None)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(e.contains("unpausing"), "{e}");
        assert!(xen.domain_info(d).unwrap().paused);
        assert_eq!(
            read(&gxs, &format!("/local/domain/{d}/device/vbd/51712/backend")),
            None
        );
    }
}
