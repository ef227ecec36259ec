//! A userspace netif backend (netback): a guest's vif served to a stock Linux `xen-netfront`,
//! its packets exchanged with a tap device in dom0 ([`crate::tap`]).
//!
//! One [`Vif`] serves one guest NIC. [`Vif::create`] writes the device's xenstore nodes
//! (`device/vif/<devid>` with `mac` and `handle` in the guest, `backend/kemari-vif/<domid>/
//! <devid>` in dom0) and publishes `InitWait`; [`Vif::poll`] (or [`Vif::run`]) follows the
//! frontend: when it is `Connected` (netfront skips `Initialised`) the backend maps the TX and
//! RX rings, binds the event channel and becomes `Connected`.
//!
//! Offered: `feature-rx-copy` (the only receive mode netfront has), one queue, one event
//! channel, one-page rings; with a tap that carries virtio-net headers (`Tap::create(name, true)`) also `feature-sg` and `feature-gso-tcpv4`: the guest's TCP segments of up to 64 KiB
//! go to the tap whole, with a header asking the kernel to segment them and fill in the
//! checksums. No IPv6 checksum offload or GSO, split event channels or multi-queue (none
//! advertised). netfront leaves IPv4 TCP/UDP checksums of other packets to the backend
//! (`NETTXF_csum_blank`): they are completed before the frame leaves
//! ([`crate::netif::complete_checksum`]). The frontend must write `request-rx-copy=1` and
//! `feature-rx-notify=1` (as Linux's netback requires).
//!
//! TX (guest -> dom0): every chain of requests is delimited and validated
//! ([`crate::netif::parse_tx_packet`]), its pages are mapped read-only in one batch, copied
//! into one frame and unmapped, then each slot is answered (`NETIF_RSP_OKAY`, or
//! `NETIF_RSP_ERROR` for a malformed chain or a grant that cannot be mapped; extra-info slots
//! `NETIF_RSP_NULL`). The frame goes to the device's [`TxSink`] - the tap, or whatever holds
//! transmitted packets until a checkpoint is acknowledged (output commit): the guest's
//! requests are answered once the frame is copied, whatever the sink does with it.
//!
//! RX (dom0 -> guest): frames are read from the tap only while the guest has posted receive
//! buffers; each goes into the page of the next RX request (mapped writable, written at
//! offset 0, unmapped) and is answered with its size. A frame larger than a page is dropped
//! (the tap's MTU keeps frames far below). Without buffers the tap keeps its frames (its
//! queue drops when full) and the backend waits for the frontend's kick.
//!
//! A ring index beyond the ring, a chain that cannot be delimited, or an unmappable ring is a
//! protocol error that ends the device (`Closed`, reason in `kemari-error`), logged once; bad
//! requests are answered with errors and logged at most [`LOGGED_BAD_REQUESTS`] times at
//! `warn`.

use std::collections::VecDeque;
use std::ops::Range;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hypervisor::{
    DomId, EventChannels, GrantMapping, GrantRef, GrantTables, HypervisorError, Port, XenStore,
    PAGE_SIZE,
};
use zerocopy::little_endian::{I16, U16, U32};
use zerocopy::{FromBytes, IntoBytes};

use crate::commit::{self, OutputGate, ReleaseRecord};
use crate::device::{self, DeviceError, DevicePaths};
use crate::driver::{Backend, Bus};
use crate::netif::{
    checksum_location, complete_checksum, parse_tx_packet, RxRequest, RxResponse, TxChain,
    TxPacket, TxResponse, NETIF_EXTRA_TYPE_GSO, NETIF_GSO_TYPE_TCPV4, NETIF_RSP_ERROR,
    NETIF_RSP_NULL, NETIF_RSP_OKAY, RX_ENTRY_SIZE, TX_ENTRY_SIZE,
};
use crate::ring::{BackRing, RingError};
use crate::state::{BackendState, XenbusState};
use crate::tap::{Tap, TapError, VnetHdr, VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4, VNET_HDR_LEN};

/// Backend type directory: `/local/domain/0/backend/kemari-vif/<domid>/<devid>`.
pub const BACKEND_TYPE: &str = "kemari-vif";
/// Frontend device class (`xen-netfront` serves `device/vif`).
pub const FRONTEND_CLASS: &str = "vif";
/// Node where the reason a device failed is published.
pub const ERROR_NODE: &str = crate::driver::ERROR_NODE;
pub use crate::device::LOGGED_BAD_REQUESTS;
/// Largest frame read from the tap (longer ones are truncated there and dropped here).
const RX_BUF: usize = 65536;
/// Bytes of guest frames a protected vif holds at most while it waits for an ACK; frames
/// beyond are dropped (counted), as a full NIC queue would (TCP retransmits them).
pub const MAX_HELD_TX_BYTES: usize = 32 << 20;

/// Where the guest's transmitted frames go. The netback calls [`deliver`](Self::deliver)
/// once per packet, in ring order, with the frame as the vif's tap takes it: on a tap with
/// `IFF_VNET_HDR` a [`crate::tap::VnetHdr`] then the Ethernet
/// frame (a guest's GSO packet is one frame of up to 64 KiB whose header asks the kernel to
/// segment it and fill in the checksums), otherwise the Ethernet frame alone, checksums filled in.
/// The default sink is the vif's tap; output commit replaces it with one that holds frames
/// until the checkpoint that produced them is acknowledged.
pub trait TxSink: Send {
    /// Takes one frame. An error counts the frame as dropped (the guest's request was
    /// answered already).
    fn deliver(&mut self, frame: &[u8]) -> std::io::Result<()>;
}

impl TxSink for Tap {
    fn deliver(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.send(frame)
    }
}

/// Errors of a virtual network interface.
#[derive(Debug, thiserror::Error)]
pub enum VifError {
    /// The output-commit waker socket could not be made.
    #[error("guest {domid} vif {devid}: output-commit waker: {source}")]
    Waker {
        /// The guest.
        domid: DomId,
        /// The device.
        devid: u32,
        /// The OS error.
        source: std::io::Error,
    },
    /// xenstore handling.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The tap.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// Mapping a ring, binding or using the event channel.
    #[error("guest {domid} vif {devid}: {what}: {source}")]
    Hypervisor {
        /// The guest.
        domid: DomId,
        /// The device.
        devid: u32,
        /// What was being done.
        what: String,
        /// The cause.
        source: HypervisorError,
    },
    /// A shared ring.
    #[error("guest {domid} vif {devid}: {ring} ring: {source}")]
    Ring {
        /// The guest.
        domid: DomId,
        /// The device.
        devid: u32,
        /// `tx` or `rx`.
        ring: &'static str,
        /// The cause.
        source: RingError,
    },
    /// A frontend setting we do not serve.
    #[error("guest {domid} vif {devid}: frontend asks for {what}")]
    Unsupported {
        /// The guest.
        domid: DomId,
        /// The device.
        devid: u32,
        /// What it asked for.
        what: String,
    },
    /// A TX chain that cannot be delimited.
    #[error("guest {domid} vif {devid}: TX ring: {source}")]
    Chain {
        /// The guest.
        domid: DomId,
        /// The device.
        devid: u32,
        /// The cause.
        source: crate::netif::NetifError,
    },
    /// Reading the tap.
    #[error("vif {devid} of guest {domid}: reading tap {tap}: {source}")]
    TapIo {
        /// The guest.
        domid: DomId,
        /// The device.
        devid: u32,
        /// The tap's name.
        tap: String,
        /// The cause.
        source: std::io::Error,
    },
    /// `poll` failed.
    #[error("polling xenstore, event channel and tap fds: {0}")]
    Poll(nix::Error),
}

/// What to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VifConfig {
    /// The guest.
    pub domid: DomId,
    /// The device id (`handle`; vif0 is 0).
    pub devid: u32,
    /// The backend's domain (0).
    pub backend_domid: DomId,
    /// The guest's MAC address.
    pub mac: [u8; 6],
}

impl VifConfig {
    /// vif `devid` of `domid` from dom0, with a MAC in Xen's `00:16:3e` range derived from the
    /// guest and device ids.
    pub fn new(domid: DomId, devid: u32) -> VifConfig {
        let [d1, d0] = domid.to_be_bytes();
        VifConfig {
            domid,
            devid,
            backend_domid: 0,
            mac: [0x00, 0x16, 0x3e, d1 & 0x7f, d0, devid.to_le_bytes()[0]],
        }
    }

    /// The MAC as `xx:xx:xx:xx:xx:xx`.
    pub fn mac_string(&self) -> String {
        format_mac(&self.mac)
    }

    /// The default tap name, `kvif<domid>.<devid>` (as the kernel's `vif<domid>.<devid>`).
    pub fn tap_name(&self) -> String {
        format!("kvif{}.{}", self.domid, self.devid)
    }
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff`; a multicast address (low bit of the first byte) is refused.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return None;
        }
        *m = u8::from_str_radix(p, 16).ok()?;
    }
    (mac[0] & 1 == 0).then_some(mac)
}

/// EtherType of RARP.
pub const ETH_P_RARP: u16 = 0x8035;

/// The frame that announces a guest's MAC at a new place (after a failover or migration),
/// as QEMU's `announce_self` builds it: a broadcast RARP "request reverse" (opcode 3) with
/// `mac` as the sender and target hardware address, no protocol addresses, padded to the
/// 60-byte Ethernet minimum. Written to the guest's tap it enters the bridge from the guest's
/// port, so the bridge (and every switch it reaches) learns where the MAC is now; it names
/// no IP address, so no host's ARP cache changes.
pub fn announce_frame(mac: &[u8; 6]) -> [u8; 60] {
    let mut f = [0u8; 60];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(mac);
    f[12..14].copy_from_slice(&ETH_P_RARP.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    f[18] = 6; // hardware address length
    f[19] = 4; // protocol address length
    f[20..22].copy_from_slice(&3u16.to_be_bytes()); // RARP request reverse
    f[22..28].copy_from_slice(mac); // sender hardware address
    f[32..38].copy_from_slice(mac); // target hardware address
    f
}

/// Counters of a vif.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VifStats {
    /// Packets the guest sent that were handed to the sink.
    pub tx_packets: u64,
    /// Their bytes.
    pub tx_bytes: u64,
    /// TX packets answered with `NETIF_RSP_ERROR` (malformed, bad grant).
    pub tx_errors: u64,
    /// TX packets accepted but not delivered (checksum not completable, sink refused).
    pub tx_dropped: u64,
    /// Frames put into the guest's receive buffers.
    pub rx_packets: u64,
    /// Their bytes.
    pub rx_bytes: u64,
    /// RX requests answered with `NETIF_RSP_ERROR` (bad grant; the frame is lost).
    pub rx_errors: u64,
    /// Frames from the tap dropped (larger than a page).
    pub rx_dropped: u64,
    /// Events sent to the frontend.
    pub notifies: u64,
    /// Times the frontend connected.
    pub connects: u64,
    /// Guest frames held for output commit (over the vif's life).
    pub tx_held: u64,
    /// Held frames dropped because [`MAX_HELD_TX_BYTES`] were already waiting.
    pub tx_held_dropped: u64,
}

/// Output commit of the guest's frames: each is tagged with the gate's epoch when the guest's
/// request is taken and goes to the sink only once that checkpoint is ACKed.
struct HeldTx {
    gate: Arc<OutputGate>,
    waker: UnixStream,
    /// (epoch, frame with the tap's header if any, taken at, frame number)
    queue: VecDeque<(u64, Vec<u8>, Instant, u64)>,
    bytes: usize,
    next: u64,
}

/// Where a vif is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VifStatus {
    /// Waiting for or serving the frontend.
    Active(BackendState),
    /// Ended by a protocol error; the reason (also once its guest is gone).
    Failed(String),
    /// The frontend's directory is gone (guest destroyed).
    Gone,
}

struct Conn {
    tx: BackRing,
    rx: BackRing,
    port: Port,
}

/// One virtual network interface of one guest.
pub struct Vif<'h> {
    gnttab: &'h dyn GrantTables,
    /// The xenbus side: handles, paths, state, the lifecycle ([`Backend`]).
    bus: Bus,
    config: VifConfig,
    /// Frames to the guest are read here.
    tap: Tap,
    /// The guest's frames go here.
    sink: Box<dyn TxSink>,
    /// Frames carry a virtio-net header both ways: scatter-gather and TCPv4 GSO are offered.
    vnet: bool,
    conn: Option<Conn>,
    /// The guest has posted receive buffers we have not used (poll the tap).
    rx_ready: bool,
    stats: VifStats,
    frame: Vec<u8>,
    rx_buf: Vec<u8>,
    commit: Option<HeldTx>,
}

impl std::fmt::Debug for Vif<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vif")
            .field("paths", &self.bus.paths)
            .field("tap", &self.tap.name())
            .field("state", &self.bus.state)
            .field("stats", &self.stats)
            .field("failure", &self.bus.failure)
            .finish_non_exhaustive()
    }
}

impl<'h> Vif<'h> {
    /// Creates the vif for a guest (normally created paused, before netfront probes): writes
    /// both xenstore directories with the MAC and the features, publishes `InitWait` and
    /// watches the frontend. Frames go both ways through `tap` (its clone is the TX sink).
    /// Nothing is left in xenstore if this fails.
    pub fn create(
        gnttab: &'h dyn GrantTables,
        xs: Box<dyn XenStore>,
        evtchn: Box<dyn EventChannels>,
        config: &VifConfig,
        tap: Tap,
    ) -> Result<Vif<'h>, VifError> {
        let paths = DevicePaths::new(
            xs.as_ref(),
            config.domid,
            config.devid,
            config.backend_domid,
            FRONTEND_CLASS,
            BACKEND_TYPE,
        )?;
        let sink: Box<dyn TxSink> = Box::new(tap.try_clone()?);
        let mut vif = Vif {
            gnttab,
            bus: Bus::new(xs, evtchn, paths, BACKEND_TYPE),
            config: config.clone(),
            vnet: tap.vnet_hdr(),
            tap,
            sink,
            conn: None,
            rx_ready: false,
            stats: VifStats::default(),
            frame: Vec::with_capacity(RX_BUF),
            rx_buf: vec![0; RX_BUF],
            commit: None,
        };
        let mac = config.mac_string();
        let front = [("handle", config.devid.to_string()), ("mac", mac.clone())];
        let mut back = vec![
            ("handle", config.devid.to_string()),
            ("mac", mac.clone()),
            ("type", "kemari".to_owned()),
            ("kemari-tap", vif.tap.name().to_owned()),
            ("feature-rx-copy", "1".to_owned()),
            ("feature-rx-flip", "0".to_owned()),
        ];
        if vif.vnet {
            // the tap segments and checksums what the guest sends as one large frame
            back.push(("feature-sg", "1".to_owned()));
            back.push(("feature-gso-tcpv4", "1".to_owned()));
        }
        device::create_nodes(vif.bus.xs.as_ref(), &vif.bus.paths, &front, &back)?;
        vif.bus.state = BackendState::Xenbus(XenbusState::Initialising);
        if let Err(e) = vif
            .start_watch()
            .and_then(|()| vif.set_state(BackendState::Xenbus(XenbusState::InitWait)))
        {
            if let Err(rm) = device::remove_nodes(vif.bus.xs.as_ref(), &vif.bus.paths) {
                log::warn!(
                    "{}: cleanup after a failed create: {rm}",
                    vif.bus.paths.backend
                );
            }
            return Err(e);
        }
        log::info!(
            "{}: vif {} of guest {} (mac {mac}) on tap {}",
            vif.bus.paths.backend,
            config.devid,
            config.domid,
            vif.tap.name()
        );
        Ok(vif)
    }

    /// Replaces where the guest's frames go (e.g. a sink that holds them until a checkpoint
    /// is acknowledged); returns the previous sink.
    pub fn set_tx_sink(&mut self, sink: Box<dyn TxSink>) -> Box<dyn TxSink> {
        std::mem::replace(&mut self.sink, sink)
    }

    /// Puts the guest's frames under output commit: from now on each frame the guest sends
    /// is held until `gate` releases its epoch (the secondary ACKed the checkpoint that holds
    /// the guest state that sent it), and every held frame kicks the gate's tap. Frames for
    /// the guest are delivered at once (they become part of the next checkpoint).
    pub fn protect(&mut self, gate: Arc<OutputGate>) -> Result<(), VifError> {
        let waker = gate.waker().map_err(|source| VifError::Waker {
            domid: self.bus.paths.domid,
            devid: self.bus.paths.devid,
            source,
        })?;
        self.commit = Some(HeldTx {
            gate,
            waker,
            queue: VecDeque::new(),
            bytes: 0,
            next: 0,
        });
        Ok(())
    }

    /// Frames held for output commit, not yet released.
    pub fn held_frames(&self) -> usize {
        self.commit.as_ref().map_or(0, |c| c.queue.len())
    }

    /// Hands the held frames whose checkpoint was ACKed (all, once protection ended) to the
    /// sink, in the order the guest sent them.
    fn release_held(&mut self) {
        let Some(mut c) = self.commit.take() else {
            return;
        };
        commit::drain_waker(&c.waker);
        while let Some(&(epoch, _, _, _)) = c.queue.front() {
            if !c.gate.is_released(epoch) {
                break;
            }
            let Some((epoch, buf, taken, n)) = c.queue.pop_front() else {
                break;
            };
            c.bytes -= buf.len();
            c.gate.record_release(&ReleaseRecord {
                devid: self.bus.paths.devid,
                id: n,
                op: "tx",
                epoch,
                acked: c.gate.protecting().then(|| c.gate.released()),
                taken,
            });
            let len = buf.len() - if self.vnet { VNET_HDR_LEN } else { 0 };
            self.sink_frame(&buf, len as u64);
        }
        self.commit = Some(c);
    }

    /// The device's xenstore paths.
    pub fn paths(&self) -> &DevicePaths {
        &self.bus.paths
    }

    /// What is served.
    pub fn config(&self) -> &VifConfig {
        &self.config
    }

    /// The tap's interface name.
    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    /// Counters.
    pub fn stats(&self) -> &VifStats {
        &self.stats
    }

    /// The backend's state.
    pub fn state(&self) -> BackendState {
        self.bus.state
    }

    /// Where the device is.
    pub fn status(&self) -> VifStatus {
        if let Some(f) = &self.bus.failure {
            VifStatus::Failed(f.clone())
        } else if self.bus.gone {
            VifStatus::Gone
        } else {
            VifStatus::Active(self.bus.state)
        }
    }

    /// The local event channel port while connected.
    pub fn local_port(&self) -> Option<Port> {
        self.conn.as_ref().map(|c| c.port)
    }

    /// Waits up to `timeout` (`None`: forever) for a frontend state change, a kick, or a
    /// frame on the tap while the guest has receive buffers, and handles everything pending.
    /// Errors are dom0-side failures (xenstore, event channel handle, tap); guest
    /// misbehaviour shows in [`status`](Self::status) instead.
    pub fn poll(&mut self, timeout: Option<Duration>) -> Result<VifStatus, VifError> {
        self.poll_once(timeout)?;
        Ok(self.status())
    }

    /// Serves until the guest is gone or `stop` is set (checked every 200 ms); then closes the
    /// device and removes its nodes.
    pub fn run(&mut self, stop: &AtomicBool) -> Result<VifStatus, VifError> {
        self.run_until(stop)?;
        let status = self.status();
        self.shutdown()?;
        Ok(status)
    }

    /// Disconnects and removes the device's xenstore nodes.
    pub fn shutdown(&mut self) -> Result<(), VifError> {
        // what was ACKed (or everything, if protection ended) still goes out; frames of a
        // checkpoint never ACKed were never committed and are dropped
        self.release_held();
        self.remove()
    }

    /// Reads the frontend's ring references, event channel and settings, maps both rings and
    /// binds the channel.
    fn connect_rings(&mut self) -> Result<(), VifError> {
        let unsupported = |what: String| VifError::Unsupported {
            domid: self.bus.paths.domid,
            devid: self.bus.paths.devid,
            what,
        };
        let xs = self.bus.xs.as_ref();
        let read = |node: &str| device::read_front(xs, &self.bus.paths, node);
        if let Some(n) = read("multi-queue-num-queues")? {
            if n.trim() != "1" {
                return Err(unsupported(format!(
                    "multi-queue-num-queues {n:?} (no multi-queue-max-queues offered)"
                )));
            }
        }
        if read("event-channel-tx")?.is_some() || read("event-channel-rx")?.is_some() {
            return Err(unsupported(
                "split event channels (feature-split-event-channels not offered)".into(),
            ));
        }
        for node in ["request-rx-copy", "feature-rx-notify"] {
            let v = read(node)?;
            if v.as_deref().map(str::trim) != Some("1") {
                return Err(unsupported(format!(
                    "{node} = {:?} (only 1 is served)",
                    v.unwrap_or_else(|| "<missing>".into())
                )));
            }
        }
        let tx_ref = device::read_front_u32(xs, &self.bus.paths, "tx-ring-ref")?;
        let rx_ref = device::read_front_u32(xs, &self.bus.paths, "rx-ring-ref")?;
        let remote_port = device::read_front_u32(xs, &self.bus.paths, "event-channel")?;
        let (domid, devid) = (self.bus.paths.domid, self.bus.paths.devid);
        let map = |r: GrantRef, name: &'static str| -> Result<BackRing, VifError> {
            let m = self.gnttab.map_grant_refs(domid, &[r], true).map_err(|e| {
                Self::hv_err(&self.bus.paths, format!("mapping {name} ring grant {r}"), e)
            })?;
            let entry = if name == "tx" {
                TX_ENTRY_SIZE
            } else {
                RX_ENTRY_SIZE
            };
            BackRing::new(m, entry).map_err(|source| VifError::Ring {
                domid,
                devid,
                ring: name,
                source,
            })
        };
        let tx = map(tx_ref, "tx")?;
        let rx = map(rx_ref, "rx")?;
        let port = self
            .bus
            .evtchn
            .bind_interdomain(domid, remote_port)
            .map_err(|e| {
                Self::hv_err(
                    &self.bus.paths,
                    format!("binding event channel {remote_port}"),
                    e,
                )
            })?;
        self.conn = Some(Conn { tx, rx, port });
        self.rx_ready = false;
        self.stats.connects += 1;
        Ok(())
    }

    fn disconnect_rings(&mut self) {
        self.rx_ready = false;
        if let Some(conn) = self.conn.take() {
            if let Err(e) = self.bus.evtchn.unbind(conn.port) {
                log::warn!(
                    "{}: unbinding port {}: {e}",
                    self.bus.paths.backend,
                    conn.port
                );
            }
            // dropping the rings unmaps them
        }
    }

    fn bad_request(&mut self, msg: std::fmt::Arguments<'_>) {
        self.bus.bad_request(Self::KIND, msg);
    }

    /// Serves both rings (guest TX, then frames for the guest while it has buffers),
    /// publishes the responses and notifies the frontend if it asked. A protocol error ends
    /// the device; only dom0-side failures are returned.
    fn serve_rings(&mut self) -> Result<(), VifError> {
        let Some(mut conn) = self.conn.take() else {
            return Ok(());
        };
        let result = self.serve_conn(&mut conn);
        self.conn = Some(conn);
        match result {
            Ok(()) => Ok(()),
            Err(
                e @ (VifError::Ring {
                    source: RingError::Overflow { .. } | RingError::Access(_),
                    ..
                }
                | VifError::Chain { .. }),
            ) => {
                self.fail(e.to_string());
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn ring_err(&self, ring: &'static str) -> impl Fn(RingError) -> VifError {
        let (domid, devid) = (self.bus.paths.domid, self.bus.paths.devid);
        move |source| VifError::Ring {
            domid,
            devid,
            ring,
            source,
        }
    }

    fn serve_conn(&mut self, conn: &mut Conn) -> Result<(), VifError> {
        loop {
            let mut notify = self.serve_tx(conn)?;
            notify |= self.serve_rx(conn)?;
            if notify {
                self.bus.evtchn.notify(conn.port).map_err(|e| {
                    Self::hv_err(&self.bus.paths, format!("notifying port {}", conn.port), e)
                })?;
                self.stats.notifies += 1;
            }
            let tx_more = conn.tx.final_check().map_err(self.ring_err("tx"))?;
            // receive buffers waiting: keep reading the tap; none: ask for a kick when the
            // guest posts some
            let rx_more = if conn.rx.unconsumed().map_err(self.ring_err("rx"))? > 0 {
                self.rx_ready = true;
                false
            } else {
                self.rx_ready = false;
                conn.rx.final_check().map_err(self.ring_err("rx"))?
            };
            if !tx_more && !rx_more {
                return Ok(());
            }
        }
    }

    /// Takes every queued TX request, copies the packets out, answers them and hands the
    /// frames to the sink; true if the frontend wants an event.
    ///
    /// The data pages of every valid packet of the pass are mapped read-only in one batch
    /// (one mapping per packet if the batch fails, so a bad grant costs only its packet) and
    /// unmapped before any response is written: netfront revokes a grant once it sees the
    /// response, and a grant still mapped makes it declare the device broken.
    fn serve_tx(&mut self, conn: &mut Conn) -> Result<bool, VifError> {
        let err = self.ring_err("tx");
        let n = conn.tx.unconsumed().map_err(&err)?;
        if n == 0 {
            return Ok(false);
        }
        let mut slots = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let mut e = [0u8; TX_ENTRY_SIZE];
            conn.tx.take_request(&mut e).map_err(&err)?;
            slots.push(e);
        }
        let mut chains = Vec::new();
        let mut at = 0;
        while at < slots.len() {
            // nothing beyond what the guest produced: a chain running past req_prod is fatal
            let vnet = self.vnet;
            let chain = parse_tx_packet(&slots[at..], |kind| vnet && kind == NETIF_EXTRA_TYPE_GSO)
                .map_err(|source| VifError::Chain {
                    domid: self.bus.paths.domid,
                    devid: self.bus.paths.devid,
                    source,
                })?;
            at += chain.consumed.max(1);
            chains.push(chain);
        }
        let spans = self.copy_tx_packets(&chains);
        let mut frames = std::mem::take(&mut self.frame);
        for (chain, span) in chains.iter().zip(spans) {
            let status = match (&chain.packet, span) {
                (Err(e), _) => {
                    self.bad_request(format_args!("dropped TX packet: {e}"));
                    NETIF_RSP_ERROR
                }
                (Ok(_), None) => NETIF_RSP_ERROR,
                (Ok(p), Some(range)) => {
                    let frame = &mut frames[range];
                    self.deliver(frame, p);
                    NETIF_RSP_OKAY
                }
            };
            if status != NETIF_RSP_OKAY {
                self.stats.tx_errors += 1;
            }
            for &(id, extra) in &chain.ids {
                let rsp = TxResponse {
                    id: U16::new(id),
                    status: I16::new(if extra { NETIF_RSP_NULL } else { status }),
                };
                conn.tx.put_response(rsp.as_bytes()).map_err(&err)?;
            }
        }
        self.frame = frames;
        conn.tx.push_responses().map_err(&err)
    }

    /// Copies the valid packets of `chains` into `self.frame`, one after the other; per chain
    /// the range of its frame, or `None` (invalid packet, or its pages could not be mapped).
    /// Every mapping is gone when this returns.
    fn copy_tx_packets(&mut self, chains: &[TxChain]) -> Vec<Option<Range<usize>>> {
        let domid = self.bus.paths.domid;
        let refs: Vec<GrantRef> = chains
            .iter()
            .filter_map(|c| c.packet.as_ref().ok())
            .flat_map(|p| p.slots.iter().map(|s| s.gref))
            .collect();
        let batch = if refs.is_empty() {
            None
        } else {
            match self.gnttab.map_grant_refs(domid, &refs, false) {
                Ok(m) => Some(m),
                Err(e) => {
                    log::debug!(
                        "{}: TX batch of {} pages not mapped ({e}), one packet at a time",
                        self.bus.paths.backend,
                        refs.len()
                    );
                    None
                }
            }
        };
        self.frame.clear();
        let mut spans = Vec::with_capacity(chains.len());
        let mut first_page = 0;
        for chain in chains {
            let Ok(p) = &chain.packet else {
                spans.push(None);
                continue;
            };
            let start = self.frame.len();
            let hdr = if self.vnet { VNET_HDR_LEN } else { 0 };
            self.frame.resize(start + hdr + p.size, 0);
            let out = &mut self.frame[start + hdr..];
            let copied = match &batch {
                Some(m) => copy_slots(m.as_ref(), first_page, p, out),
                None => {
                    let own: Vec<GrantRef> = p.slots.iter().map(|s| s.gref).collect();
                    self.gnttab
                        .map_grant_refs(domid, &own, false)
                        .and_then(|m| copy_slots(m.as_ref(), 0, p, out))
                }
            };
            first_page += p.slots.len();
            match copied {
                Ok(true) => spans.push(Some(start..start + hdr + p.size)),
                Ok(false) => {
                    self.frame.truncate(start);
                    self.bad_request(format_args!(
                        "TX packet of {} bytes: slots do not add up to its size",
                        p.size
                    ));
                    spans.push(None);
                }
                Err(e) => {
                    self.frame.truncate(start);
                    self.bad_request(format_args!("TX packet of {} bytes: {e}", p.size));
                    spans.push(None);
                }
            }
        }
        spans
    }

    /// Completes the checksum the guest left blank or describes its GSO packet in the tap's
    /// header, and hands the frame (`buf`: room for the header, if the tap has one, then the
    /// Ethernet frame) to the sink - the single place a guest's packet leaves: output commit
    /// defers it there.
    fn deliver(&mut self, buf: &mut [u8], p: &TxPacket) {
        let hdr_len = if self.vnet { VNET_HDR_LEN } else { 0 };
        let (hdr, frame) = buf.split_at_mut(hdr_len.min(buf.len()));
        let vnet = match offload(frame, p) {
            Ok(h) => h,
            Err(e) => {
                self.stats.tx_dropped += 1;
                self.bad_request(format_args!("TX packet of {} bytes dropped: {e}", p.size));
                return;
            }
        };
        let frame_len = frame.len() as u64;
        if self.vnet {
            hdr.copy_from_slice(&vnet.to_bytes());
        }
        if let Some(c) = &mut self.commit {
            if let Some(epoch) = c.gate.hold() {
                if c.bytes + buf.len() > MAX_HELD_TX_BYTES {
                    let held = c.bytes;
                    self.stats.tx_held_dropped += 1;
                    self.stats.tx_dropped += 1;
                    self.bad_request(format_args!(
                        "TX frame dropped: {held} bytes already held for the next ACK"
                    ));
                    return;
                }
                c.queue
                    .push_back((epoch, buf.to_vec(), Instant::now(), c.next));
                c.next += 1;
                c.bytes += buf.len();
                self.stats.tx_held += 1;
                c.gate.kick();
                return;
            }
        }
        self.sink_frame(buf, frame_len);
    }

    /// Gives one frame (with the tap's header if any) to the sink and counts it.
    fn sink_frame(&mut self, buf: &[u8], frame_len: u64) {
        match self.sink.deliver(buf) {
            Ok(()) => {
                self.stats.tx_packets += 1;
                self.stats.tx_bytes += frame_len;
            }
            Err(e) => {
                self.stats.tx_dropped += 1;
                if self.stats.tx_dropped <= u64::from(LOGGED_BAD_REQUESTS) {
                    log::warn!(
                        "{}: frame to {} lost: {e}",
                        self.bus.paths.backend,
                        self.tap.name()
                    );
                } else {
                    log::debug!(
                        "{}: frame to {} lost: {e}",
                        self.bus.paths.backend,
                        self.tap.name()
                    );
                }
            }
        }
    }

    /// Moves frames from the tap into the guest's posted receive buffers (at most one frame
    /// per buffer, the buffers' pages mapped writable in one batch, one by one if the batch
    /// fails, unmapped before the responses); true if the frontend wants an event.
    fn serve_rx(&mut self, conn: &mut Conn) -> Result<bool, VifError> {
        let err = self.ring_err("rx");
        let avail = conn.rx.unconsumed().map_err(&err)? as usize;
        let mut lens = Vec::new();
        let mut frames = std::mem::take(&mut self.frame);
        frames.clear();
        while lens.len() < avail {
            let got = match self.tap.recv(&mut self.rx_buf) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(source) => {
                    self.frame = frames;
                    return Err(VifError::TapIo {
                        domid: self.bus.paths.domid,
                        devid: self.bus.paths.devid,
                        tap: self.tap.name().to_owned(),
                        source,
                    });
                }
            };
            let len = got.len;
            if len > PAGE_SIZE || len == 0 {
                self.stats.rx_dropped += 1;
                continue;
            }
            frames.extend_from_slice(&self.rx_buf[got.offset..got.offset + len]);
            lens.push(len);
        }
        let mut reqs = Vec::with_capacity(lens.len());
        for _ in 0..lens.len() {
            let mut e = [0u8; RX_ENTRY_SIZE];
            if let Err(e) = conn.rx.take_request(&mut e) {
                self.frame = frames;
                return Err(err(e));
            }
            // an 8-byte copy always decodes
            let req = RxRequest::read_from_bytes(&e[..]).unwrap_or(RxRequest {
                id: U16::new(0),
                pad: U16::new(0),
                gref: U32::new(u32::MAX),
            });
            reqs.push(req);
        }
        let statuses = self.fill_rx_buffers(&reqs, &lens, &frames);
        self.frame = frames;
        for (req, status) in reqs.iter().zip(statuses) {
            let rsp = RxResponse {
                id: req.id,
                offset: U16::new(0),
                flags: U16::new(0),
                status: I16::new(status),
            };
            conn.rx.put_response(rsp.as_bytes()).map_err(&err)?;
        }
        conn.rx.push_responses().map_err(&err)
    }

    /// Writes frame `i` (`lens[i]` bytes, one after the other in `frames`) into the page of
    /// `reqs[i]`; the status of each response (its size, or `NETIF_RSP_ERROR`).
    fn fill_rx_buffers(&mut self, reqs: &[RxRequest], lens: &[usize], frames: &[u8]) -> Vec<i16> {
        let domid = self.bus.paths.domid;
        let refs: Vec<GrantRef> = reqs.iter().map(|r| r.gref.get()).collect();
        let batch = if refs.is_empty() {
            None
        } else {
            self.gnttab.map_grant_refs(domid, &refs, true).ok()
        };
        let mut statuses = Vec::with_capacity(reqs.len());
        let mut pos = 0;
        for (i, (req, &len)) in reqs.iter().zip(lens).enumerate() {
            let data = &frames[pos..pos + len];
            pos += len;
            let written = match &batch {
                Some(m) => m.write(i * PAGE_SIZE, data),
                None => self
                    .gnttab
                    .map_grant_refs(domid, &[req.gref.get()], true)
                    .and_then(|m| m.write(0, data)),
            };
            statuses.push(match written {
                Ok(()) => {
                    self.stats.rx_packets += 1;
                    self.stats.rx_bytes += len as u64;
                    // lossless: len <= PAGE_SIZE
                    i16::try_from(len).unwrap_or(NETIF_RSP_ERROR)
                }
                Err(e) => {
                    self.stats.rx_errors += 1;
                    self.bad_request(format_args!(
                        "RX buffer {} (grant {}): {e}; frame of {len} bytes lost",
                        req.id.get(),
                        req.gref.get()
                    ));
                    NETIF_RSP_ERROR
                }
            });
        }
        statuses
    }
}

/// The tap header for a guest packet in `frame`: for a GSO packet (TCPv4 extra info) the
/// segmentation and checksum request; otherwise none, after completing a checksum the guest
/// left blank.
fn offload(frame: &mut [u8], p: &TxPacket) -> Result<VnetHdr, String> {
    let Some(gso) = p.extras.iter().find(|e| e.kind == NETIF_EXTRA_TYPE_GSO) else {
        if p.csum_blank {
            complete_checksum(frame).map_err(|e| e.to_string())?;
        }
        return Ok(VnetHdr::default());
    };
    let size = u16::from_le_bytes([gso.body[0], gso.body[1]]);
    let kind = gso.body[2];
    if kind != NETIF_GSO_TYPE_TCPV4 || size == 0 {
        return Err(format!(
            "GSO type {kind} size {size} (TCPv4 with a size only)"
        ));
    }
    let (start, field) = checksum_location(frame).map_err(|e| e.to_string())?;
    let doff = frame.get(start + 12).copied().unwrap_or(0) >> 4;
    let headers = start + usize::from(doff) * 4;
    if field != 16 || doff < 5 || headers > frame.len() {
        return Err("GSO packet without a whole TCP header".into());
    }
    let n16 = |v: usize| u16::try_from(v).map_err(|_| format!("header offset {v}"));
    Ok(VnetHdr {
        flags: VNET_F_NEEDS_CSUM,
        gso_type: VNET_GSO_TCPV4,
        hdr_len: n16(headers)?,
        gso_size: size,
        csum_start: n16(start)?,
        csum_offset: 16,
    })
}

/// Copies packet `p`'s slots out of `m`, whose pages from `first_page` on are the slots'
/// pages in order, into `out` (`p.size` bytes; validated packets' slots add up to it, so
/// `false`, slots not fitting `out`, does not happen).
fn copy_slots(
    m: &dyn GrantMapping,
    first_page: usize,
    p: &TxPacket,
    out: &mut [u8],
) -> Result<bool, HypervisorError> {
    let mut pos = 0;
    for (i, s) in p.slots.iter().enumerate() {
        let Some(dst) = out.get_mut(pos..pos + s.len) else {
            return Ok(false);
        };
        m.read((first_page + i) * PAGE_SIZE + s.offset, dst)?;
        pos += s.len;
    }
    Ok(pos == out.len())
}

impl Drop for Vif<'_> {
    fn drop(&mut self) {
        self.disconnect();
    }
}

impl Backend for Vif<'_> {
    type Error = VifError;
    const KIND: &'static str = "vif";

    fn bus(&self) -> &Bus {
        &self.bus
    }

    fn bus_mut(&mut self) -> &mut Bus {
        &mut self.bus
    }

    fn hv_err(paths: &DevicePaths, what: String, source: HypervisorError) -> VifError {
        VifError::Hypervisor {
            domid: paths.domid,
            devid: paths.devid,
            what,
            source,
        }
    }

    fn is_dom0_failure(e: &VifError) -> bool {
        matches!(
            e,
            VifError::Device(DeviceError::Xenstore { .. }) | VifError::Poll(_)
        )
    }

    fn connect_frontend(&mut self) -> Result<(), VifError> {
        self.connect_rings()
    }

    fn log_connected(&self) {
        log::info!(
            "{}: connected (port {:?}, tap {})",
            self.bus.paths.backend,
            self.local_port(),
            self.tap.name()
        );
    }

    fn disconnect(&mut self) {
        self.disconnect_rings();
    }

    fn serve(&mut self) -> Result<(), VifError> {
        self.serve_rings()
    }

    fn local_port(&self) -> Option<Port> {
        Vif::local_port(self)
    }

    fn poll_once(&mut self, timeout: Option<Duration>) -> Result<(), VifError> {
        let watch_tap = self.rx_ready && self.conn.is_some();
        let tap_ready = {
            let mut extra: Vec<BorrowedFd<'_>> = Vec::new();
            if watch_tap {
                extra.push(self.tap.as_fd());
            }
            if let Some(c) = &self.commit {
                extra.push(c.waker.as_fd());
            }
            let ready = self.bus.wait(&extra, timeout).map_err(VifError::Poll)?;
            watch_tap && ready.first().copied().unwrap_or(false)
        };
        self.release_held();
        let served = self.dispatch()?;
        if tap_ready && !served {
            self.serve()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs() {
        let c = VifConfig::new(0x1234, 3);
        assert_eq!(c.mac_string(), "00:16:3e:12:34:03");
        assert_eq!(parse_mac("00:16:3e:12:34:03"), Some(c.mac));
        assert_eq!(c.tap_name(), "kvif4660.3");
        for bad in [
            "",
            "00:16:3e:12:34",
            "00:16:3e:12:34:3",
            "01:00:5e:00:00:01",
            "zz:16:3e:12:34:03",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn announce_frame_is_qemus_rarp() {
        let mac = [0x00, 0x16, 0x3e, 0x77, 0x00, 0x96];
        let f = announce_frame(&mac);
        let mut want = Vec::new();
        want.extend_from_slice(&[0xff; 6]); // broadcast
        want.extend_from_slice(&mac); // from the guest
        want.extend_from_slice(&[0x80, 0x35]); // RARP
        want.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 3]); // Ethernet/IPv4, 6/4, reverse request
        want.extend_from_slice(&mac);
        want.extend_from_slice(&[0; 4]);
        want.extend_from_slice(&mac);
        want.extend_from_slice(&[0; 4]);
        want.resize(60, 0);
        assert_eq!(f.to_vec(), want);
        assert_ne!(announce_frame(&[0x00, 0x16, 0x3e, 0, 0, 1]), f);
    }
}
