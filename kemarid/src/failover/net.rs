//! The guest's NIC on the new primary after a failover.
//!
//! A guest protected with `kemari replicate --vif` has no vif in its xl configuration: the
//! primary's process served its NIC with Kemari's netback, under output commit. The domain `xl
//! restore` builds on the secondary therefore has no `device/vif/<devid>` nodes, and a resuming
//! netfront needs them to find a backend. The guest is restored paused; [`create_paused`] makes
//! a tap on this host (up, in the bridge), creates the vif with the guest's MAC on it (backend
//! in `InitWait`); the caller unpauses the guest, whose netfront reconnects through the normal
//! handshake, and serves the vif.
//!
//! The guest's MAC is now behind another port of another bridge: the [`Announcer`] writes
//! RARP frames from that MAC into the tap ([`xenbus_backend::netback::announce_frame`], as QEMU
//! does after a migration), so that bridges learn where it is at once instead of after their
//! entries age out. A guest with `net.ipv4.conf.all.arp_notify = 1` sends a gratuitous ARP
//! itself when netfront reconnects (Linux's `netdev_notify_peers`).

use std::time::Duration;

use hypervisor::{DomId, Hypervisor, HypervisorError};
use xenbus_backend::netback::announce_frame;
use xenbus_backend::tap::{Tap, TapError, VnetHdr};
use xenbus_backend::{Vif, VifConfig, VifError};

/// Announcement rounds after the unpause, as QEMU's `announce_self` defaults: 5 frames, the
/// first at once, then 50 ms more between each two (QEMU's initial 50 ms and step 100 ms,
/// compressed: the guest's own gratuitous ARP follows its reconnect anyway).
pub const ANNOUNCE_ROUNDS: u32 = 5;

/// What to serve on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSpec {
    /// The vif: handle and the guest's MAC (the one it had on the old primary).
    pub vif: VifConfig,
    /// The tap's name (`kvif<domid>.<devid>` if `None`).
    pub tap_name: Option<String>,
    /// The bridge to put the tap in.
    pub bridge: Option<String>,
    /// Offer scatter-gather and TCPv4 GSO (the tap carries virtio-net headers).
    pub gso: bool,
}

/// Errors bringing the NIC up after a failover.
#[derive(Debug, thiserror::Error)]
pub enum FailoverNetError {
    /// The restored domain is not paused: it may already run without its NIC.
    #[error("domain {domid} is not paused: its vif must exist before it runs")]
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
    /// The tap could not be made, brought up or bridged.
    #[error("domain {domid}: tap {tap}: {source}")]
    Tap {
        /// The restored guest.
        domid: DomId,
        /// The tap's name.
        tap: String,
        /// Why.
        #[source]
        source: TapError,
    },
    /// The vif could not be created.
    #[error("domain {domid}: vif {devid} (mac {mac}): {source}")]
    Device {
        /// The restored guest.
        domid: DomId,
        /// The handle.
        devid: u32,
        /// The guest's MAC.
        mac: String,
        /// Why.
        #[source]
        source: VifError,
    },
    /// Writing an announcement to the tap failed.
    #[error("announcing {mac} on tap {tap}: {source}")]
    Announce {
        /// The guest's MAC.
        mac: String,
        /// The tap's name.
        tap: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Sends the guest's MAC announcements into its tap.
#[derive(Debug)]
pub struct Announcer {
    tap: Tap,
    mac: [u8; 6],
    sent: u32,
}

impl Announcer {
    /// Announcements of `mac` through `tap` (a clone of the vif's).
    pub fn new(tap: Tap, mac: [u8; 6]) -> Announcer {
        Announcer { tap, mac, sent: 0 }
    }

    /// Writes one RARP announcement (after a zero virtio-net header if the tap has them).
    pub fn announce(&mut self) -> Result<(), FailoverNetError> {
        let frame = announce_frame(&self.mac);
        let mut buf = Vec::with_capacity(70);
        if self.tap.vnet_hdr() {
            buf.extend_from_slice(&VnetHdr::default().to_bytes());
        }
        buf.extend_from_slice(&frame);
        self.tap
            .send(&buf)
            .map_err(|source| FailoverNetError::Announce {
                mac: xenbus_backend::netback::format_mac(&self.mac),
                tap: self.tap.name().to_owned(),
                source,
            })?;
        self.sent += 1;
        Ok(())
    }

    /// Announcements written so far.
    pub fn sent(&self) -> u32 {
        self.sent
    }

    /// [`ANNOUNCE_ROUNDS`] announcements, 0, 50, 100, ... ms apart (blocking; run it in a
    /// thread). A failed one is logged and the rest still go.
    pub fn run(&mut self) {
        for round in 0..ANNOUNCE_ROUNDS {
            std::thread::sleep(Duration::from_millis(50 * u64::from(round)));
            if let Err(e) = self.announce() {
                log::warn!("{e}");
            }
        }
        log::info!(
            "announced {} on {} {} times",
            xenbus_backend::netback::format_mac(&self.mac),
            self.tap.name(),
            self.sent
        );
    }
}

/// Creates the tap of `spec` (up, in its bridge) and the vif for the paused, restored guest
/// `domid` on it. The guest stays paused (the caller unpauses it); on failure nothing is left.
pub fn create_paused<'h>(
    hv: &'h dyn Hypervisor,
    domid: DomId,
    spec: &NetSpec,
) -> Result<(Vif<'h>, Announcer), FailoverNetError> {
    check_paused(hv, domid)?;
    let mut config = spec.vif.clone();
    config.domid = domid;
    let name = spec.tap_name.clone().unwrap_or_else(|| config.tap_name());
    let tap_err = |source| FailoverNetError::Tap {
        domid,
        tap: name.clone(),
        source,
    };
    let tap = Tap::create(&name, spec.gso).map_err(tap_err)?;
    tap.link_up(spec.bridge.as_deref()).map_err(tap_err)?;
    create_on_tap(hv, domid, &config, tap)
}

fn check_paused(hv: &dyn Hypervisor, domid: DomId) -> Result<(), FailoverNetError> {
    super::require_paused(
        hv,
        domid,
        |step, source| FailoverNetError::Xen {
            domid,
            step,
            source,
        },
        FailoverNetError::NotPaused { domid },
    )
}

/// [`create_paused`] on a given tap (any frame-per-write descriptor: tests).
pub fn create_on_tap<'h>(
    hv: &'h dyn Hypervisor,
    domid: DomId,
    config: &VifConfig,
    tap: Tap,
) -> Result<(Vif<'h>, Announcer), FailoverNetError> {
    check_paused(hv, domid)?;
    let mac = config.mac;
    let dev_err = |source| FailoverNetError::Device {
        domid,
        devid: config.devid,
        mac: config.mac_string(),
        source,
    };
    let clone = tap.try_clone().map_err(|source| FailoverNetError::Tap {
        domid,
        tap: tap.name().to_owned(),
        source,
    })?;
    let xen = |step, source| FailoverNetError::Xen {
        domid,
        step,
        source,
    };
    let xs = hv.open_xenstore().map_err(|e| xen("opening xenstore", e))?;
    let ev = hv
        .open_event_channels()
        .map_err(|e| xen("opening event channels", e))?;
    let vif = Vif::create(hv, xs, ev, config, tap).map_err(dev_err)?;
    Ok((vif, Announcer::new(clone, mac)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hypervisor::mem::{DomainConfig, MemXen};
    use hypervisor::{DomainControl, Tx, XenStore};
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixDatagram;
    use xenbus_backend::state::{BackendState, XenbusState};

    fn read(xs: &dyn XenStore, path: &str) -> Option<String> {
        xs.read(Tx::NONE, path)
            .ok()
            .map(|v| String::from_utf8(v).unwrap())
    }

    fn tap(vnet: bool) -> (Tap, UnixDatagram) {
        let (a, b) = UnixDatagram::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        (Tap::from_fd(OwnedFd::from(a), "fo-tap", vnet).unwrap(), b)
    }

    const MAC: [u8; 6] = [0x00, 0x16, 0x3e, 0x77, 0x00, 0x96];

    /// The restored guest gets a vif with its old MAC while paused, and the announcements go
    /// into the tap as RARP frames from that MAC.
    #[test]
    fn restored_guest_gets_its_vif_with_its_mac_and_is_announced() {
        let xen = MemXen::new();
        let d = xen.create_domain(DomainConfig::pvh(64)).unwrap();
        xen.pause(d).unwrap();
        let gxs = xen.guest(d).xenstore().unwrap();
        let front = format!("/local/domain/{d}/device/vif/0");
        assert_eq!(read(&gxs, &format!("{front}/backend")), None);
        let mut config = VifConfig::new(7, 0); // the old primary's domid
        config.mac = MAC;
        config.domid = d;
        let (t, peer) = tap(true);
        let (mut vif, mut ann) = create_on_tap(&xen, d, &config, t).unwrap();
        assert!(xen.domain_info(d).unwrap().paused, "the caller unpauses");
        let back = read(&gxs, &format!("{front}/backend")).unwrap();
        assert_eq!(back, format!("/local/domain/0/backend/kemari-vif/{d}/0"));
        assert_eq!(
            read(&gxs, &format!("{front}/mac")).as_deref(),
            Some("00:16:3e:77:00:96")
        );
        assert_eq!(
            vif.state(),
            BackendState::Xenbus(XenbusState::InitWait),
            "waiting for the resuming netfront"
        );
        ann.announce().unwrap();
        ann.announce().unwrap();
        assert_eq!(ann.sent(), 2);
        let mut buf = [0u8; 128];
        for _ in 0..2 {
            let n = peer.recv(&mut buf).unwrap();
            assert_eq!(n, 10 + 60, "virtio-net header, then the frame");
            assert_eq!(&buf[..10], &[0u8; 10]);
            assert_eq!(&buf[10..70], &announce_frame(&MAC)[..]);
        }
        assert!(peer.recv(&mut buf).is_err(), "nothing more");
        vif.shutdown().unwrap();
        assert_eq!(read(&gxs, &format!("{front}/backend")), None);
    }

    #[test]
    fn without_a_vnet_header_the_frame_goes_alone() {
        let (t, peer) = tap(false);
        let mut ann = Announcer::new(t, MAC);
        ann.announce().unwrap();
        let mut buf = [0u8; 128];
        assert_eq!(peer.recv(&mut buf).unwrap(), 60);
        assert_eq!(&buf[..60], &announce_frame(&MAC)[..]);
        // the tap is gone: a clear error
        drop(peer);
        let e = ann.announce().unwrap_err().to_string();
        assert!(
            e.contains("00:16:3e:77:00:96") && e.contains("fo-tap"),
            "{e}"
        );
    }

    #[test]
    fn a_running_guest_is_refused_and_nothing_is_created() {
        let xen = MemXen::new();
        let d = xen.create_domain(DomainConfig::pvh(64)).unwrap();
        let (t, _peer) = tap(false);
        let e = create_on_tap(&xen, d, &VifConfig::new(d, 0), t)
            .map(|_| ())
            .unwrap_err();
        assert!(matches!(e, FailoverNetError::NotPaused { .. }), "{e}");
        let gxs = xen.guest(d).xenstore().unwrap();
        assert_eq!(
            read(&gxs, &format!("/local/domain/{d}/device/vif/0/backend")),
            None
        );
        // a vif that already exists: refused, the first one untouched
        xen.pause(d).unwrap();
        let (t1, _p1) = tap(false);
        let (_v, _) = create_on_tap(&xen, d, &VifConfig::new(d, 0), t1).unwrap();
        let (t2, _p2) = tap(false);
        let e = create_on_tap(&xen, d, &VifConfig::new(d, 0), t2)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(e.contains("vif 0"), "{e}");
        assert!(read(&gxs, &format!("/local/domain/{d}/device/vif/0/backend")).is_some());
    }
}
