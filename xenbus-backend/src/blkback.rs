//! A userspace blkif backend (blkback): serves a raw image file or block device to a guest's
//! `xen-blkfront` over the standard xenbus handshake.
//!
//! One [`Vbd`] serves one guest disk. [`Vbd::create`] writes the device's xenstore nodes
//! (see [`crate::device`]) and publishes `InitWait`; [`Vbd::poll`] (or [`Vbd::run`]) follows
//! the frontend's state: when it is `Initialised` the backend maps the ring, binds the event
//! channel and becomes `Connected`; requests are then served as the guest kicks; a closing
//! frontend is answered with `Closing`/`Closed`. [`Vbd::attach`] is Kemari's `Attached` path:
//! take over a ring the frontend already connected, from its current indexes.
//!
//! Offered to the frontend: read, write, flush (`feature-flush-cache`, also serving
//! `BLKIF_OP_WRITE_BARRIER` without advertising it), discard on regular files
//! (`feature-discard`), indirect descriptors up to [`MAX_INDIRECT_SEGMENTS`] segments
//! (`feature-max-indirect-segments`), multi-page rings up to 2^[`MAX_RING_PAGE_ORDER`] pages
//! (`max-ring-page-order`), and persistent grants (`feature-persistent`: pages the frontend
//! reuses stay mapped, up to [`MAX_PERSISTENT_GRANTS`], until the device disconnects). One
//! queue.
//!
//! Guest input is validated before use: a bad request (segment, sector range, grant the
//! guest does not own, unknown operation) gets an error response and the device goes on; a
//! ring index beyond the ring, or an unmappable ring, is a protocol error that ends the
//! device (state `Closed`, reason in the backend's `kemari-error` node), logged once. Nothing
//! a guest does can panic the backend or make it touch memory outside its mappings.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hypervisor::{
    DomId, EventChannels, GrantMapping, GrantRef, GrantTables, HypervisorError, Port, XenStore,
    PAGE_SIZE,
};
use zerocopy::IntoBytes;

use crate::blkif::{
    self, parse_indirect_segments, parse_request, BlkifResponse, Direction, DiskLimits, Request,
    Segment, BLKIF_OP_INDIRECT, BLKIF_RSP_ERROR, BLKIF_RSP_OKAY, ENTRY_SIZE, MAX_INDIRECT_SEGMENTS,
    SECTOR_SIZE, SEGMENT_SIZE, VDISK_READONLY,
};
use crate::commit::{self, LoggedOp, OutputGate, ReleaseRecord};
use crate::device::{self, DeviceError, DevicePaths};
use crate::disk::{Disk, DiskError};
use crate::driver::{Backend, Bus};
use crate::journal::{Journal, JournalError, RingIdentity};
use crate::ring::{BackRing, RingError};
use crate::state::{BackendState, XenbusState};

/// Backend type directory: `/local/domain/0/backend/kemari-vbd/<domid>/<devid>`.
pub const BACKEND_TYPE: &str = "kemari-vbd";
/// Frontend device class (`xen-blkfront` serves `device/vbd`).
pub const FRONTEND_CLASS: &str = "vbd";
/// Largest ring we accept: 2^order pages (`max-ring-page-order`).
pub const MAX_RING_PAGE_ORDER: u32 = 2;
/// The only ABI served (`protocol` node; absent means native, which is this).
pub const PROTOCOL_X86_64: &str = "x86_64-abi";
/// Node where the reason a device failed is published.
pub const ERROR_NODE: &str = crate::driver::ERROR_NODE;
/// Persistent grant mappings kept per device (as Linux's blkback `max_persistent_grants`); a
/// request whose pages do not fit is served with a one-off mapping.
pub const MAX_PERSISTENT_GRANTS: usize = 1056;

/// Errors of a virtual block device.
#[derive(Debug, thiserror::Error)]
pub enum VbdError {
    /// The image.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// xenstore handling.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// Mapping the ring, binding or using the event channel, polling.
    #[error("guest {domid} device {devid}: {what}: {source}")]
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
    /// The shared ring.
    #[error("guest {domid} device {devid}: {source}")]
    Ring {
        /// The guest.
        domid: DomId,
        /// The device.
        devid: u32,
        /// The cause.
        source: RingError,
    },
    /// A frontend detail we do not serve.
    #[error("guest {domid} device {devid}: frontend asks for {what}")]
    Unsupported {
        /// The guest.
        domid: DomId,
        /// The device.
        devid: u32,
        /// What it asked for.
        what: String,
    },
    /// `attach` found a device that is not connected.
    #[error("guest {domid} device {devid}: cannot attach, frontend state is {state:?}")]
    NotConnected {
        /// The guest.
        domid: DomId,
        /// The device.
        devid: u32,
        /// The frontend's state.
        state: Option<XenbusState>,
    },
    /// `poll` failed.
    #[error("polling xenstore and event channel fds: {0}")]
    Poll(nix::Error),
    /// The output gate's wake-up socket could not be made.
    #[error("guest {domid} device {devid}: output commit wake-up socket: {source}")]
    Waker {
        /// The guest.
        domid: DomId,
        /// The device.
        devid: u32,
        /// What failed.
        source: std::io::Error,
    },
    /// The in-flight journal could not be opened.
    #[error("guest {domid} device {devid}: {source}")]
    Journal {
        /// The guest.
        domid: DomId,
        /// The device.
        devid: u32,
        /// What failed.
        source: JournalError,
    },
}

/// What to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VbdConfig {
    /// The guest.
    pub domid: DomId,
    /// `virtual-device` (e.g. 51712 = xvda).
    pub devid: u32,
    /// The backend's domain (0).
    pub backend_domid: DomId,
    /// The raw image or block device.
    pub image: PathBuf,
    /// Serve read-only.
    pub readonly: bool,
    /// Folder of the in-flight request journals (normally on dom0's tmpfs, `/run/kemari`):
    /// what lets a backend that takes the ring over after a crash re-serve the requests the
    /// dead one had taken (see [`crate::journal`]). `None`: no journal.
    pub journal_dir: Option<PathBuf>,
}

impl VbdConfig {
    /// `xvda` of `domid` from dom0, read-write.
    pub fn xvda(domid: DomId, image: PathBuf) -> VbdConfig {
        VbdConfig {
            domid,
            devid: XVDA,
            backend_domid: 0,
            image,
            readonly: false,
            journal_dir: None,
        }
    }
}

/// `virtual-device` of `xvda` (major 202, minor 0).
pub const XVDA: u32 = 202 << 8;

/// Counters of a device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VbdStats {
    /// Requests answered (any status).
    pub requests: u64,
    /// Bytes read from the disk into the guest.
    pub read_bytes: u64,
    /// Bytes written from the guest to the disk.
    pub write_bytes: u64,
    /// `fdatasync`s done.
    pub flushes: u64,
    /// Discards done.
    pub discards: u64,
    /// Requests answered with an error.
    pub errors: u64,
    /// Events sent to the frontend.
    pub notifies: u64,
    /// Times the frontend connected (or we attached).
    pub connects: u64,
    /// Pages mapped once and kept (persistent grants), over the device's life.
    pub persistent_maps: u64,
    /// Requests served with a one-off mapping (no persistent grants, or the cache was full).
    pub oneoff_maps: u64,
    /// Requests taken from the in-flight journal instead of the ring after a takeover.
    pub replayed: u64,
    /// Requests held for output commit (answered only after their checkpoint's ACK).
    pub held: u64,
    /// Held requests dropped unanswered (the device closed, or the process stopped while the
    /// guest was held at a checkpoint).
    pub held_dropped: u64,
}

/// What a held request does when it is released.
enum HeldWork {
    /// Write data copied from the guest when the request was taken.
    Write {
        sector: u64,
        data: Arc<[u8]>,
        flush: bool,
    },
    Flush,
    Discard {
        sector: u64,
        nr_sectors: u64,
    },
    /// A read queued behind held output (served in ring order).
    Read(Request),
}

impl HeldWork {
    fn name(&self) -> &'static str {
        match self {
            HeldWork::Write { .. } => "write",
            HeldWork::Flush => "flush",
            HeldWork::Discard { .. } => "discard",
            HeldWork::Read(_) => "read",
        }
    }
}

/// A request taken from the ring and held until its epoch's checkpoint is ACKed.
struct Held {
    id: u64,
    op: u8,
    /// 0: not held by the gate (queued behind held requests only).
    epoch: u64,
    taken: Instant,
    work: HeldWork,
}

/// Where a device is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VbdStatus {
    /// Waiting for or serving the frontend.
    Active(BackendState),
    /// Ended by a protocol error; the reason (also once its guest is gone).
    Failed(String),
    /// The frontend's directory is gone (guest destroyed).
    Gone,
}

struct Conn {
    ring: BackRing,
    port: Port,
    journal: Option<Journal>,
    /// After a takeover: the first ring index the dead backend may have journaled.
    replay_base: Option<u32>,
}

/// One virtual block device of one guest.
pub struct Vbd<'h> {
    gnttab: &'h dyn GrantTables,
    /// The xenbus side: handles, paths, state, the lifecycle ([`Backend`]).
    bus: Bus,
    disk: Disk,
    limits: DiskLimits,
    conn: Option<Conn>,
    /// Frontend and backend agreed on persistent grants for the current connection.
    persistent: bool,
    /// Persistent grant -> its writable one-page mapping.
    pcache: HashMap<GrantRef, Box<dyn GrantMapping>>,
    stats: VbdStats,
    buf: Vec<u8>,
    journal_path: Option<PathBuf>,
    /// Output commit: the gate shared with the synchronization engine, its wake-up socket,
    /// and the requests held in ring order.
    gate: Option<Arc<OutputGate>>,
    waker: Option<UnixStream>,
    held: VecDeque<Held>,
}

impl std::fmt::Debug for Vbd<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vbd")
            .field("paths", &self.bus.paths)
            .field("state", &self.bus.state)
            .field("stats", &self.stats)
            .field("failure", &self.bus.failure)
            .finish_non_exhaustive()
    }
}

impl<'h> Vbd<'h> {
    fn open(
        gnttab: &'h dyn GrantTables,
        xs: Box<dyn XenStore>,
        evtchn: Box<dyn EventChannels>,
        config: &VbdConfig,
    ) -> Result<Vbd<'h>, VbdError> {
        let disk = Disk::open(&config.image, config.readonly)?;
        let paths = DevicePaths::new(
            xs.as_ref(),
            config.domid,
            config.devid,
            config.backend_domid,
            FRONTEND_CLASS,
            BACKEND_TYPE,
        )?;
        let limits = DiskLimits {
            sectors: disk.sectors(),
            readonly: disk.readonly(),
            discard: disk.can_discard(),
            indirect: true,
        };
        Ok(Vbd {
            gnttab,
            bus: Bus::new(xs, evtchn, paths, BACKEND_TYPE),
            disk,
            limits,
            conn: None,
            persistent: false,
            pcache: HashMap::new(),
            stats: VbdStats::default(),
            buf: Vec::new(),
            gate: None,
            waker: None,
            held: VecDeque::new(),
            journal_path: config.journal_dir.as_ref().map(|d| {
                d.join(format!(
                    "{BACKEND_TYPE}-{}-{}.journal",
                    config.domid, config.devid
                ))
            }),
        })
    }

    /// Creates the device for a guest (normally created paused, before its frontend probes):
    /// writes both xenstore directories, the disk's details and features, publishes
    /// `InitWait` and watches the frontend. Nothing is left in xenstore if this fails.
    pub fn create(
        gnttab: &'h dyn GrantTables,
        xs: Box<dyn XenStore>,
        evtchn: Box<dyn EventChannels>,
        config: &VbdConfig,
    ) -> Result<Vbd<'h>, VbdError> {
        let mut vbd = Vbd::open(gnttab, xs, evtchn, config)?;
        let front = [
            ("virtual-device", config.devid.to_string()),
            ("device-type", "disk".to_owned()),
        ];
        let back = vbd.feature_nodes();
        let back_refs: Vec<(&str, String)> = back.iter().map(|(k, v)| (*k, v.clone())).collect();
        device::create_nodes(vbd.bus.xs.as_ref(), &vbd.bus.paths, &front, &back_refs)?;
        vbd.bus.state = BackendState::Xenbus(XenbusState::Initialising);
        if let Err(e) = vbd
            .start_watch()
            .and_then(|()| vbd.set_state(BackendState::Xenbus(XenbusState::InitWait)))
        {
            if let Err(rm) = device::remove_nodes(vbd.bus.xs.as_ref(), &vbd.bus.paths) {
                log::warn!(
                    "{}: cleanup after a failed create: {rm}",
                    vbd.bus.paths.backend
                );
            }
            return Err(e);
        }
        log::info!(
            "{}: serving {} ({} sectors{}) to guest {} as {}",
            vbd.bus.paths.backend,
            vbd.disk.path().display(),
            vbd.disk.sectors(),
            if vbd.disk.readonly() {
                ", read-only"
            } else {
                ""
            },
            config.domid,
            vbd.bus.paths.frontend
        );
        Ok(vbd)
    }

    /// Kemari's `Attached`: takes over a device whose frontend is already `Connected` (its
    /// nodes and ring exist, e.g. after a failover), mapping the ring at its current indexes;
    /// requests produced but not yet answered are served.
    pub fn attach(
        gnttab: &'h dyn GrantTables,
        xs: Box<dyn XenStore>,
        evtchn: Box<dyn EventChannels>,
        config: &VbdConfig,
    ) -> Result<Vbd<'h>, VbdError> {
        let mut vbd = Vbd::open(gnttab, xs, evtchn, config)?;
        let front = device::frontend_state(vbd.bus.xs.as_ref(), &vbd.bus.paths)?;
        if front != Some(XenbusState::Connected) {
            return Err(VbdError::NotConnected {
                domid: config.domid,
                devid: config.devid,
                state: front,
            });
        }
        vbd.connect_ring(true)?;
        vbd.set_state(BackendState::Attached)?;
        if let Some(c) = &vbd.conn {
            log::info!(
                "{}: attached to the live ring at index {} (port {})",
                vbd.bus.paths.backend,
                c.ring.req_cons(),
                c.port
            );
        }
        vbd.start_watch()?;
        // serve whatever the guest queued meanwhile
        vbd.serve()?;
        Ok(vbd)
    }

    fn feature_nodes(&self) -> Vec<(&'static str, String)> {
        let mut v = vec![
            ("sectors", self.disk.sectors().to_string()),
            ("sector-size", SECTOR_SIZE.to_string()),
            ("physical-sector-size", SECTOR_SIZE.to_string()),
            (
                "info",
                if self.disk.readonly() {
                    VDISK_READONLY
                } else {
                    0
                }
                .to_string(),
            ),
            (
                "mode",
                if self.disk.readonly() { "r" } else { "w" }.to_owned(),
            ),
            ("params", self.disk.path().display().to_string()),
            ("type", "kemari".to_owned()),
            ("feature-flush-cache", "1".to_owned()),
            (
                "feature-max-indirect-segments",
                MAX_INDIRECT_SEGMENTS.to_string(),
            ),
            ("max-ring-page-order", MAX_RING_PAGE_ORDER.to_string()),
            ("feature-persistent", "1".to_owned()),
        ];
        if self.limits.discard {
            v.push(("feature-discard", "1".to_owned()));
            v.push(("discard-granularity", PAGE_SIZE.to_string()));
            v.push(("discard-alignment", "0".to_owned()));
            v.push(("discard-secure", "0".to_owned()));
        }
        v
    }

    /// The device's xenstore paths.
    pub fn paths(&self) -> &DevicePaths {
        &self.bus.paths
    }

    /// Counters.
    pub fn stats(&self) -> &VbdStats {
        &self.stats
    }

    /// The backend's state.
    pub fn state(&self) -> BackendState {
        self.bus.state
    }

    /// Where the device is.
    pub fn status(&self) -> VbdStatus {
        if let Some(f) = &self.bus.failure {
            VbdStatus::Failed(f.clone())
        } else if self.bus.gone {
            VbdStatus::Gone
        } else {
            VbdStatus::Active(self.bus.state)
        }
    }

    /// The local event channel port while connected.
    pub fn local_port(&self) -> Option<Port> {
        self.conn.as_ref().map(|c| c.port)
    }

    /// Waits up to `timeout` (`None`: forever) for a frontend state change or a kick, and
    /// handles everything pending. Errors are dom0-side failures (xenstore, event channel
    /// handle); guest misbehaviour shows in [`status`](Self::status) instead.
    pub fn poll(&mut self, timeout: Option<Duration>) -> Result<VbdStatus, VbdError> {
        self.poll_once(timeout)?;
        Ok(self.status())
    }

    /// Serves until the guest is gone or `stop` is set (checked every 200 ms); then closes the
    /// device and removes its nodes.
    pub fn run(&mut self, stop: &AtomicBool) -> Result<VbdStatus, VbdError> {
        self.run_until(stop)?;
        // output released just before the stop (the last ACK of a held checkpoint) goes out
        if !self.held.is_empty() {
            self.serve()?;
        }
        let status = self.status();
        self.shutdown()?;
        Ok(status)
    }

    /// Disconnects and removes the device's xenstore nodes.
    pub fn shutdown(&mut self) -> Result<(), VbdError> {
        self.remove()
    }

    /// Reads the frontend's ring references and event channel, maps the ring and binds the
    /// channel. `attach`: take the ring at its current indexes.
    fn connect_ring(&mut self, attach: bool) -> Result<(), VbdError> {
        let unsupported = |what: String| VbdError::Unsupported {
            domid: self.bus.paths.domid,
            devid: self.bus.paths.devid,
            what,
        };
        let xs = self.bus.xs.as_ref();
        if let Some(p) = device::read_front(xs, &self.bus.paths, "protocol")? {
            if p != PROTOCOL_X86_64 {
                return Err(unsupported(format!("protocol {p:?}")));
            }
        }
        let refs: Vec<GrantRef> = match device::read_front(xs, &self.bus.paths, "ring-page-order")?
        {
            None => vec![device::read_front_u32(xs, &self.bus.paths, "ring-ref")?],
            Some(_) => {
                let order = device::read_front_u32(xs, &self.bus.paths, "ring-page-order")?;
                if order > MAX_RING_PAGE_ORDER {
                    return Err(unsupported(format!(
                        "ring-page-order {order}, max-ring-page-order is {MAX_RING_PAGE_ORDER}"
                    )));
                }
                (0..1u32 << order)
                    .map(|i| device::read_front_u32(xs, &self.bus.paths, &format!("ring-ref{i}")))
                    .collect::<Result<_, _>>()?
            }
        };
        let remote_port = device::read_front_u32(xs, &self.bus.paths, "event-channel")?;
        // blkfront writes feature-persistent=1 when it will reuse its grants
        let persistent = device::read_front(xs, &self.bus.paths, "feature-persistent")?
            .is_some_and(|v| v.trim() == "1");
        let mapping = self
            .gnttab
            .map_grant_refs(self.bus.paths.domid, &refs, true)
            .map_err(|e| {
                Self::hv_err(&self.bus.paths, format!("mapping ring grants {refs:?}"), e)
            })?;
        let ring = if attach {
            BackRing::attach(mapping, ENTRY_SIZE)
        } else {
            BackRing::new(mapping, ENTRY_SIZE)
        }
        .map_err(|source| VbdError::Ring {
            domid: self.bus.paths.domid,
            devid: self.bus.paths.devid,
            source,
        })?;
        let journal = match &self.journal_path {
            None => None,
            Some(path) => {
                let id = RingIdentity {
                    domid: u32::from(self.bus.paths.domid),
                    first_ref: refs.first().copied().unwrap_or_default(),
                    remote_port,
                };
                // a takeover keeps the dead backend's journal of this very ring
                Some(
                    Journal::open(path, id, ring.size(), ENTRY_SIZE, attach).map_err(|source| {
                        VbdError::Journal {
                            domid: self.bus.paths.domid,
                            devid: self.bus.paths.devid,
                            source,
                        }
                    })?,
                )
            }
        };
        let replay_base = (attach && journal.is_some()).then(|| ring.req_cons());
        let port = self
            .bus
            .evtchn
            .bind_interdomain(self.bus.paths.domid, remote_port)
            .map_err(|e| {
                Self::hv_err(
                    &self.bus.paths,
                    format!("binding event channel {remote_port}"),
                    e,
                )
            })?;
        self.persistent = persistent;
        self.conn = Some(Conn {
            ring,
            port,
            journal,
            replay_base,
        });
        self.stats.connects += 1;
        Ok(())
    }

    fn disconnect_ring(&mut self) {
        if !self.held.is_empty() {
            log::info!(
                "{}: {} requests held for output commit dropped unanswered (device closed)",
                self.bus.paths.backend,
                self.held.len()
            );
            self.stats.held_dropped += self.held.len() as u64;
            self.held.clear();
        }
        // persistent mappings end with the connection (dropping them unmaps)
        self.pcache.clear();
        self.persistent = false;
        if let Some(conn) = self.conn.take() {
            if let Err(e) = self.bus.evtchn.unbind(conn.port) {
                log::warn!(
                    "{}: unbinding port {}: {e}",
                    self.bus.paths.backend,
                    conn.port
                );
            }
            // the device ended cleanly: nothing is left to take over
            if let Some(j) = conn.journal {
                if let Err(e) = j.remove() {
                    log::warn!("{}: {e}", self.bus.paths.backend);
                }
            }
            // dropping the ring unmaps it
        }
    }

    /// Serves every queued request, publishes the responses, notifies the frontend if it
    /// asked, and re-arms `req_event` (RING_FINAL_CHECK_FOR_REQUESTS).
    fn serve_rings(&mut self) -> Result<(), VbdError> {
        let Some(mut conn) = self.conn.take() else {
            return Ok(());
        };
        let result = self.serve_conn(&mut conn);
        match result {
            Ok(()) => {
                self.conn = Some(conn);
                Ok(())
            }
            Err(VbdError::Ring {
                source: source @ (RingError::Overflow { .. } | RingError::Access(_)),
                ..
            }) => {
                self.conn = Some(conn);
                self.fail(source.to_string());
                Ok(())
            }
            Err(e) => {
                self.conn = Some(conn);
                Err(e)
            }
        }
    }

    fn serve_conn(&mut self, conn: &mut Conn) -> Result<(), VbdError> {
        let (domid, devid) = (self.bus.paths.domid, self.bus.paths.devid);
        let ring_err = move |source| VbdError::Ring {
            domid,
            devid,
            source,
        };
        loop {
            let n = conn.ring.unconsumed().map_err(ring_err)?;
            let mut newly_held = false;
            for _ in 0..n {
                let mut entry = [0u8; ENTRY_SIZE];
                let index = conn.ring.req_cons();
                conn.ring.take_request(&mut entry).map_err(ring_err)?;
                self.journal_request(conn, index, &mut entry);
                match self.admit(&entry) {
                    Some(rsp) => {
                        conn.ring.put_response(rsp.as_bytes()).map_err(ring_err)?;
                        self.stats.requests += 1;
                    }
                    None => newly_held = true,
                }
            }
            if newly_held {
                if let Some(g) = &self.gate {
                    g.kick();
                }
            }
            self.release_held(conn).map_err(ring_err)?;
            if conn.ring.push_responses().map_err(ring_err)? {
                self.bus.evtchn.notify(conn.port).map_err(|e| {
                    Self::hv_err(&self.bus.paths, format!("notifying port {}", conn.port), e)
                })?;
                self.stats.notifies += 1;
            }
            if !conn.ring.final_check().map_err(ring_err)? {
                return Ok(());
            }
        }
    }

    /// After a takeover, a request the dead backend had taken is read from the journal (its
    /// ring slot may already hold the unpublished response); every request is journaled before
    /// it is acted on.
    fn journal_request(&mut self, conn: &mut Conn, index: u32, entry: &mut [u8; ENTRY_SIZE]) {
        let Some(journal) = &conn.journal else {
            return;
        };
        if let Some(base) = conn.replay_base {
            if index.wrapping_sub(base) < conn.ring.size() {
                if let Some(copy) = journal.lookup(index) {
                    if copy.len() == ENTRY_SIZE && copy[..] != entry[..] {
                        self.stats.replayed += 1;
                        entry.copy_from_slice(&copy);
                    }
                }
            } else {
                conn.replay_base = None;
            }
        }
        if let Err(e) = journal.record(index, entry) {
            // dom0's tmpfs is full or gone: serving goes on, a takeover would lose this guarantee
            log::warn!(
                "{}: in-flight journal disabled for this connection: {e}",
                self.bus.paths.backend
            );
            conn.journal = None;
        }
    }

    /// Puts the device under output commit: from now on writes, flushes and discards taken
    /// from the ring are held until `gate` releases their epoch (writes and discards are also
    /// appended to its disk write log), each pass that holds something kicks the gate's tap,
    /// and reads are served at once unless held requests are ahead of them. See
    /// [`crate::commit`].
    pub fn protect(&mut self, gate: Arc<OutputGate>) -> Result<(), VbdError> {
        let waker = gate.waker().map_err(|source| VbdError::Waker {
            domid: self.bus.paths.domid,
            devid: self.bus.paths.devid,
            source,
        })?;
        self.gate = Some(gate);
        self.waker = Some(waker);
        Ok(())
    }

    /// Requests taken from the ring and not yet answered (held for output commit).
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Takes one request: `Some(response)` if it was served (or refused) at once, `None` if
    /// it is held for output commit.
    fn admit(&mut self, entry: &[u8; ENTRY_SIZE]) -> Option<BlkifResponse> {
        let gate = match &self.gate {
            Some(g) if !self.limits.readonly && (!self.held.is_empty() || g.protecting()) => {
                g.clone()
            }
            _ => return Some(self.handle(entry)),
        };
        let raw_id = u64::from_le_bytes([
            entry[8], entry[9], entry[10], entry[11], entry[12], entry[13], entry[14], entry[15],
        ]);
        let req = match parse_request(entry, &self.limits) {
            Ok(r) => r,
            Err(e) => return Some(self.refused(entry, raw_id, &e)),
        };
        let (id, op) = (req.id(), req.operation());
        let taken = Instant::now();
        let devid = self.bus.paths.devid;
        let held = |epoch: Option<u64>, work: HeldWork| Held {
            id,
            op,
            // None: protection ended meanwhile; queued behind the held ones, released at once
            epoch: epoch.unwrap_or(0),
            taken,
            work,
        };
        let h = match req {
            Request::Rw {
                dir: Direction::Read,
                ..
            }
            | Request::Indirect {
                dir: Direction::Read,
                ..
            } => {
                if self.held.is_empty() {
                    let status = self.execute_logged(id, op, req);
                    return Some(BlkifResponse::new(id, op, status));
                }
                held(None, HeldWork::Read(req))
            }
            Request::Flush { .. } => held(gate.hold(), HeldWork::Flush),
            Request::Discard {
                sector, nr_sectors, ..
            } => {
                let epoch = gate.hold_logged(
                    devid,
                    sector,
                    LoggedOp::Discard {
                        bytes: nr_sectors * SECTOR_SIZE,
                    },
                );
                held(epoch, HeldWork::Discard { sector, nr_sectors })
            }
            Request::Rw {
                dir: Direction::Write,
                sector,
                segments,
                flush,
                ..
            } => match self.gather(&segments) {
                Ok(data) => {
                    let data: Arc<[u8]> = Arc::from(data);
                    let epoch = gate.hold_logged(devid, sector, LoggedOp::Write(data.clone()));
                    held(
                        epoch,
                        HeldWork::Write {
                            sector,
                            data,
                            flush,
                        },
                    )
                }
                Err(e) => return Some(self.failed(id, op, e)),
            },
            Request::Indirect {
                id,
                dir: Direction::Write,
                sector,
                nr_segments,
                indirect_grefs,
                ..
            } => {
                let data = self
                    .indirect_segments(id, sector, nr_segments, &indirect_grefs)
                    .and_then(|segments| self.gather(&segments));
                match data {
                    Ok(data) => {
                        let data: Arc<[u8]> = Arc::from(data);
                        let epoch = gate.hold_logged(devid, sector, LoggedOp::Write(data.clone()));
                        held(
                            epoch,
                            HeldWork::Write {
                                sector,
                                data,
                                flush: false,
                            },
                        )
                    }
                    Err(e) => return Some(self.failed(id, op, e)),
                }
            }
        };
        self.stats.held += 1;
        self.held.push_back(h);
        None
    }

    fn failed(&mut self, id: u64, op: u8, e: RequestError) -> BlkifResponse {
        self.bad_request(format_args!("request {id:#x} (op {op}) failed: {e}"));
        BlkifResponse::new(id, op, BLKIF_RSP_ERROR)
    }

    fn execute_logged(&mut self, id: u64, op: u8, req: Request) -> i16 {
        match self.execute(req) {
            Ok(()) => BLKIF_RSP_OKAY,
            Err(e) => self.failed(id, op, e).status.get(),
        }
    }

    /// Executes and answers, in ring order, the held requests whose epoch the gate released.
    fn release_held(&mut self, conn: &mut Conn) -> Result<(), RingError> {
        let Some(gate) = self.gate.clone() else {
            return Ok(());
        };
        while let Some(h) = self.held.front() {
            if !gate.is_released(h.epoch) {
                break;
            }
            let Some(h) = self.held.pop_front() else {
                break;
            };
            let name = h.work.name();
            let result = match h.work {
                HeldWork::Write {
                    sector,
                    data,
                    flush,
                } => self.write_held(sector, &data, flush),
                HeldWork::Flush => self.disk.flush().map_err(RequestError::from).map(|()| {
                    self.stats.flushes += 1;
                }),
                HeldWork::Discard { sector, nr_sectors } => self
                    .disk
                    .discard(sector * SECTOR_SIZE, nr_sectors * SECTOR_SIZE)
                    .map_err(RequestError::from)
                    .map(|()| {
                        self.stats.discards += 1;
                    }),
                HeldWork::Read(req) => self.execute(req),
            };
            let status = match result {
                Ok(()) => BLKIF_RSP_OKAY,
                Err(e) => self.failed(h.id, h.op, e).status.get(),
            };
            let acked = gate.released();
            gate.record_release(&ReleaseRecord {
                devid: self.bus.paths.devid,
                id: h.id,
                op: name,
                epoch: h.epoch,
                acked: (h.epoch <= acked).then_some(acked),
                taken: h.taken,
            });
            conn.ring
                .put_response(BlkifResponse::new(h.id, h.op, status).as_bytes())?;
            self.stats.requests += 1;
        }
        Ok(())
    }

    fn write_held(&mut self, sector: u64, data: &[u8], flush: bool) -> Result<(), RequestError> {
        self.disk.write_at(sector * SECTOR_SIZE, data)?;
        self.stats.write_bytes += data.len() as u64;
        if flush {
            self.disk.flush()?;
            self.stats.flushes += 1;
        }
        Ok(())
    }

    /// Copies the data of validated write segments out of the guest's pages.
    fn gather(&mut self, segments: &[Segment]) -> Result<Vec<u8>, RequestError> {
        let refs: Vec<GrantRef> = segments.iter().map(|s| s.gref).collect();
        let batch: Option<Box<dyn GrantMapping>> = if self.cache_persistent(&refs) {
            None
        } else {
            self.stats.oneoff_maps += 1;
            Some(
                self.gnttab
                    .map_grant_refs(self.bus.paths.domid, &refs, false)?,
            )
        };
        let mut data = vec![0u8; blkif::total_sectors(segments) as usize * SECTOR_SIZE as usize];
        let mut pos = 0;
        for (i, s) in segments.iter().enumerate() {
            let (m, at) = match &batch {
                Some(m) => (m.as_ref(), i * PAGE_SIZE + s.page_offset()),
                None => (
                    self.pcache
                        .get(&s.gref)
                        .map(|m| m.as_ref())
                        .ok_or(RequestError::Internal("segment page not cached"))?,
                    s.page_offset(),
                ),
            };
            let chunk = data
                .get_mut(pos..pos + s.len())
                .ok_or(RequestError::Internal("segments longer than their total"))?;
            m.read(at, chunk)?;
            pos += s.len();
        }
        Ok(data)
    }

    fn bad_request(&mut self, msg: std::fmt::Arguments<'_>) {
        self.stats.errors += 1;
        self.bus.bad_request(Self::KIND, msg);
    }

    /// The one answer to a request that does not parse: logged (rate-limited), answered
    /// with the error's status.
    fn refused(
        &mut self,
        entry: &[u8; ENTRY_SIZE],
        raw_id: u64,
        e: &blkif::BlkifError,
    ) -> BlkifResponse {
        self.bad_request(format_args!("refused request: {e}"));
        // blkfront matches the response's operation against what it queued: for an
        // indirect request that is the inner operation
        let op = if entry[0] == BLKIF_OP_INDIRECT {
            entry[1]
        } else {
            entry[0]
        };
        BlkifResponse::new(raw_id, op, e.status())
    }

    /// Serves one request (a private copy of its ring entry) and builds its response.
    fn handle(&mut self, entry: &[u8; ENTRY_SIZE]) -> BlkifResponse {
        let raw_id = u64::from_le_bytes([
            entry[8], entry[9], entry[10], entry[11], entry[12], entry[13], entry[14], entry[15],
        ]);
        let req = match parse_request(entry, &self.limits) {
            Ok(r) => r,
            Err(e) => return self.refused(entry, raw_id, &e),
        };
        let (id, op) = (req.id(), req.operation());
        let status = match self.execute(req) {
            Ok(()) => BLKIF_RSP_OKAY,
            Err(e) => {
                self.bad_request(format_args!("request {id:#x} (op {op}) failed: {e}"));
                BLKIF_RSP_ERROR
            }
        };
        BlkifResponse::new(id, op, status)
    }

    fn execute(&mut self, req: Request) -> Result<(), RequestError> {
        match req {
            Request::Rw {
                dir,
                sector,
                segments,
                flush,
                ..
            } => {
                self.transfer(dir, sector, &segments)?;
                if flush {
                    self.disk.flush()?;
                    self.stats.flushes += 1;
                }
                Ok(())
            }
            Request::Flush { .. } => {
                self.disk.flush()?;
                self.stats.flushes += 1;
                Ok(())
            }
            Request::Discard {
                sector, nr_sectors, ..
            } => {
                self.disk
                    .discard(sector * SECTOR_SIZE, nr_sectors * SECTOR_SIZE)?;
                self.stats.discards += 1;
                Ok(())
            }
            Request::Indirect {
                id,
                dir,
                indirect_op: _,
                sector,
                nr_segments,
                indirect_grefs,
            } => {
                let segments = self.indirect_segments(id, sector, nr_segments, &indirect_grefs)?;
                self.transfer(dir, sector, &segments)
            }
        }
    }

    /// Reads and checks the segment descriptors of an indirect request.
    fn indirect_segments(
        &mut self,
        id: u64,
        sector: u64,
        nr_segments: usize,
        indirect_grefs: &[GrantRef],
    ) -> Result<Vec<Segment>, RequestError> {
        let mut desc = vec![0u8; nr_segments * SEGMENT_SIZE];
        if self.cache_persistent(indirect_grefs) {
            for (i, chunk) in desc.chunks_mut(PAGE_SIZE).enumerate() {
                let page = indirect_grefs
                    .get(i)
                    .and_then(|g| self.pcache.get(g))
                    .ok_or(RequestError::Internal("indirect page not cached"))?;
                page.read(0, chunk)?;
            }
        } else {
            let pages = self
                .gnttab
                .map_grant_refs(self.bus.paths.domid, indirect_grefs, false)?;
            pages.read(0, &mut desc)?;
        }
        Ok(parse_indirect_segments(
            id,
            sector,
            nr_segments,
            &desc,
            &self.limits,
        )?)
    }

    /// Moves the data of validated segments between the disk and the guest's pages, mapped
    /// in one batch (writable only for reads into the guest).
    fn transfer(
        &mut self,
        dir: Direction,
        sector: u64,
        segments: &[Segment],
    ) -> Result<(), RequestError> {
        let refs: Vec<GrantRef> = segments.iter().map(|s| s.gref).collect();
        // persistent grants: each page has its own cached mapping; otherwise one batch mapping
        // of all pages (writable only when data goes into the guest)
        let batch: Option<Box<dyn GrantMapping>> = if self.cache_persistent(&refs) {
            None
        } else {
            self.stats.oneoff_maps += 1;
            Some(
                self.gnttab
                    .map_grant_refs(self.bus.paths.domid, &refs, dir == Direction::Read)?,
            )
        };
        let pcache = &self.pcache;
        let page = |i: usize, s: &Segment| -> Result<(&dyn GrantMapping, usize), RequestError> {
            match &batch {
                Some(m) => Ok((m.as_ref(), i * PAGE_SIZE + s.page_offset())),
                None => pcache
                    .get(&s.gref)
                    .map(|m| (m.as_ref(), s.page_offset()))
                    .ok_or(RequestError::Internal("segment page not cached")),
            }
        };
        let total = blkif::total_sectors(segments) as usize * SECTOR_SIZE as usize;
        self.buf.resize(total, 0);
        let offset = sector * SECTOR_SIZE;
        match dir {
            Direction::Write => {
                let mut pos = 0;
                for (i, s) in segments.iter().enumerate() {
                    let (m, at) = page(i, s)?;
                    m.read(at, &mut self.buf[pos..pos + s.len()])?;
                    pos += s.len();
                }
                self.disk.write_at(offset, &self.buf[..total])?;
                self.stats.write_bytes += total as u64;
            }
            Direction::Read => {
                self.disk.read_at(offset, &mut self.buf[..total])?;
                let mut pos = 0;
                for (i, s) in segments.iter().enumerate() {
                    let (m, at) = page(i, s)?;
                    m.write(at, &self.buf[pos..pos + s.len()])?;
                    pos += s.len();
                }
                self.stats.read_bytes += total as u64;
            }
        }
        Ok(())
    }
}

impl Vbd<'_> {
    /// With persistent grants negotiated: makes sure every page of `refs` has a cached writable
    /// mapping, mapping the new ones one by one. False (nothing cached for the missing ones)
    /// when persistent grants are off, the cache would exceed [`MAX_PERSISTENT_GRANTS`], or a
    /// page cannot be mapped writable (e.g. a read-only grant): the caller maps one-off.
    fn cache_persistent(&mut self, refs: &[GrantRef]) -> bool {
        if !self.persistent {
            return false;
        }
        let mut missing: Vec<GrantRef> = refs
            .iter()
            .copied()
            .filter(|r| !self.pcache.contains_key(r))
            .collect();
        missing.sort_unstable();
        missing.dedup();
        if self.pcache.len() + missing.len() > MAX_PERSISTENT_GRANTS {
            return false;
        }
        for gref in missing {
            match self
                .gnttab
                .map_grant_refs(self.bus.paths.domid, &[gref], true)
            {
                Ok(m) => {
                    self.pcache.insert(gref, m);
                    self.stats.persistent_maps += 1;
                }
                Err(e) => {
                    log::debug!(
                        "{}: grant {gref} not mapped persistently: {e}",
                        self.bus.paths.backend
                    );
                    return false;
                }
            }
        }
        true
    }

    /// Persistent mappings held now.
    pub fn persistent_grants(&self) -> usize {
        self.pcache.len()
    }
}

impl Drop for Vbd<'_> {
    fn drop(&mut self) {
        self.disconnect();
    }
}

impl Backend for Vbd<'_> {
    type Error = VbdError;
    const KIND: &'static str = "device";

    fn bus(&self) -> &Bus {
        &self.bus
    }

    fn bus_mut(&mut self) -> &mut Bus {
        &mut self.bus
    }

    fn hv_err(paths: &DevicePaths, what: String, source: HypervisorError) -> VbdError {
        VbdError::Hypervisor {
            domid: paths.domid,
            devid: paths.devid,
            what,
            source,
        }
    }

    fn is_dom0_failure(e: &VbdError) -> bool {
        matches!(
            e,
            VbdError::Device(DeviceError::Xenstore { .. }) | VbdError::Poll(_)
        )
    }

    fn connect_frontend(&mut self) -> Result<(), VbdError> {
        self.connect_ring(false)
    }

    fn log_connected(&self) {
        log::info!(
            "{}: connected (ring of {} entries, port {:?})",
            self.bus.paths.backend,
            self.conn.as_ref().map(|c| c.ring.size()).unwrap_or(0),
            self.local_port()
        );
    }

    fn disconnect(&mut self) {
        self.disconnect_ring();
    }

    fn serve(&mut self) -> Result<(), VbdError> {
        self.serve_rings()
    }

    fn local_port(&self) -> Option<Port> {
        Vbd::local_port(self)
    }

    fn poll_once(&mut self, timeout: Option<Duration>) -> Result<(), VbdError> {
        let extra: Vec<BorrowedFd<'_>> = self.waker.iter().map(AsFd::as_fd).collect();
        self.bus.wait(&extra, timeout).map_err(VbdError::Poll)?;
        if let Some(w) = &self.waker {
            commit::drain_waker(w);
            if !self.held.is_empty() {
                self.serve()?;
            }
        }
        self.dispatch()?;
        Ok(())
    }
}

/// Why one request failed (answered with `BLKIF_RSP_ERROR`; the device goes on).
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error(transparent)]
    Request(#[from] blkif::BlkifError),
    #[error("guest memory: {0}")]
    Grant(#[from] HypervisorError),
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error("backend bug: {0}")]
    Internal(&'static str),
}
