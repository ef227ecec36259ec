//! The daemon: the guest table, request handling, worker supervision, events and metrics
//! behind the control API (docs/api.md). The listeners are in [`server`]; workers in
//! [`worker`] (processes on a dom0) and [`mem`] (threads in the in-memory mode).

pub mod config;
pub mod mem;
pub mod metrics;
pub mod notify;
pub mod report;
pub mod server;
pub mod worker;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::api::{
    ApiError, CheckpointReply, Client, ClientError, ErrorCode, Event, EventKind, GuestState,
    GuestStatus, HeartbeatStatus, HelloInfo, InitialSync, PeerReady, Quantiles, Reply, Request,
    Role, StartOptions, StatusReply, PROTOCOL_VERSION,
};
use config::Config;
use report::{unix_now, WorkerReport};
use worker::{Ask, Backend, GuestRecord, Worker, WorkerSpec};

/// Errors of the daemon's start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A folder could not be created or read.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A socket could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// Which socket.
        what: &'static str,
        /// The address.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Another daemon serves the socket.
    #[error("another kemarid is serving {0}: stop it first (systemctl stop kemarid)")]
    AlreadyRunning(PathBuf),
    /// The configuration is inconsistent.
    #[error("configuration: {0}")]
    Config(String),
}

/// Events a slow subscriber may be behind before it is dropped.
const SUBSCRIBER_QUEUE: usize = 1024;
/// The window of the rates in the status.
const RATE_WINDOW: f64 = 10.0;
/// How often the supervisor looks at the workers.
pub const POLL: Duration = Duration::from_millis(200);

struct Guest {
    rec: GuestRecord,
    dir: PathBuf,
    state: GuestState,
    since: f64,
    worker: Option<Box<dyn Worker>>,
    worker_pid: Option<u32>,
    report: Option<WorkerReport>,
    /// (time, checkpoints, bytes, pages)
    window: VecDeque<(f64, u64, u64, u64)>,
    error: Option<String>,
    stop_requested: bool,
    last_ckpt_event: (f64, Option<u64>),
    last_init_event: (f64, u64),
    hb_peer: Option<String>,
    replica_dropped: bool,
    counted_failover: bool,
}

impl Guest {
    fn window_rates(&self) -> (f64, f64, f64) {
        let (Some(first), Some(last)) = (self.window.front(), self.window.back()) else {
            return (0.0, 0.0, 0.0);
        };
        let dt = last.0 - first.0;
        let dc = last.1.saturating_sub(first.1);
        let per_s = |v: u64| if dt > 0.0 { v as f64 / dt } else { 0.0 };
        let pages = if dc > 0 {
            last.3.saturating_sub(first.3) as f64 / dc as f64
        } else {
            0.0
        };
        (per_s(dc), per_s(last.2.saturating_sub(first.2)), pages)
    }

    fn status(&self) -> GuestStatus {
        let r = self.report.as_ref();
        let (cps, bps, pages) = self.window_rates();
        let now = unix_now();
        GuestStatus {
            dom: self.rec.dom.clone(),
            domid: r.and_then(|r| r.domid).or(self.rec.domid),
            role: self.rec.role,
            peer: self.rec.peer.clone(),
            state: self.state,
            since: self.since,
            worker_pid: self.worker.as_ref().and(self.worker_pid),
            checkpoints: r.map_or(0, |r| r.checkpoints),
            checkpoints_per_s: cps,
            last_acked_seq: r.and_then(|r| r.last_acked_seq),
            pause_ms: r.map_or(Quantiles::default(), |r| r.pause_q),
            checkpoint_ms: r.map_or(Quantiles::default(), |r| r.latency_q),
            dirty_pages_per_checkpoint: pages,
            replication_lag_ms: r
                .filter(|_| self.state == GuestState::Protected)
                .and_then(|r| r.last_ack)
                .map(|t| ((now - t) * 1000.0).max(0.0)),
            link_bytes_per_s: bps,
            bytes: r.map_or(0, |r| r.bytes),
            heartbeat: r
                .and_then(|r| r.heartbeat.as_ref())
                .map(|h| HeartbeatStatus {
                    period_ms: h.period_ms,
                    misses_allowed: h.misses_allowed,
                    peer: h.peer.clone(),
                    last_heard_ms: None,
                    misses: r.map_or(0, |r| r.heartbeat_deaths),
                }),
            initial_sync: r.and_then(|r| r.initial.as_ref()).map(|i| {
                let left = i.total.saturating_sub(i.pages);
                InitialSync {
                    pages: i.pages,
                    total: i.total,
                    rate_pages_per_s: i.rate_pages_per_s,
                    round: i.round,
                    eta_s: (!i.done && i.rate_pages_per_s > 0.0 && left > 0)
                        .then(|| left as f64 / i.rate_pages_per_s),
                    done: i.done,
                }
            }),
            error: self
                .error
                .clone()
                .or_else(|| r.and_then(|r| r.error.clone())),
        }
    }
}

struct Bus {
    subs: Mutex<Vec<(Option<String>, SyncSender<Event>)>>,
}

impl Bus {
    fn publish(&self, ev: &Event) {
        let mut subs = self.subs.lock().unwrap_or_else(PoisonError::into_inner);
        subs.retain(|(filter, tx)| {
            if filter.as_ref().is_some_and(|f| *f != ev.dom) {
                return true;
            }
            match tx.try_send(ev.clone()) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    log::warn!(
                        "dropping an events subscriber more than {SUBSCRIBER_QUEUE} events behind"
                    );
                    false
                }
                Err(TrySendError::Disconnected(_)) => false,
            }
        });
    }
}

/// What the daemon runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The configuration.
    pub config: Config,
    /// This host's name.
    pub host: String,
    /// Where the guest folders go (`state_dir/guests`).
    pub guests_dir: PathBuf,
    /// Secondary spool folders.
    pub spool_dir: PathBuf,
    /// Receiving workers' ports (`None`: the OS picks, in-memory mode).
    pub data_ports: Option<std::ops::RangeInclusive<u16>>,
    /// Address receiving workers listen on.
    pub data_listen: String,
}

impl Settings {
    /// From the configuration: on a dom0 (`mem` false) the folders and ports it names; in the
    /// in-memory mode the receiving workers' ports are picked by the OS.
    pub fn from_config(config: Config, mem: bool) -> Result<Settings, DaemonError> {
        let host = if config.daemon.hostname.is_empty() {
            crate::host::kernel_hostname().unwrap_or_else(|| "localhost".into())
        } else {
            config.daemon.hostname.clone()
        };
        let data_ports = if mem {
            None
        } else {
            Some(config.data_ports().map_err(DaemonError::Config)?)
        };
        Ok(Settings {
            host,
            guests_dir: config.daemon.state_dir.join("guests"),
            spool_dir: config.daemon.spool_dir.clone(),
            data_ports,
            data_listen: config.daemon.data_listen.clone(),
            config,
        })
    }
}

/// The daemon.
pub struct Daemon {
    settings: Settings,
    backend: Box<dyn Backend>,
    guests: Mutex<BTreeMap<String, Guest>>,
    pending: Mutex<BTreeSet<String>>,
    bus: Bus,
    shutting_down: AtomicBool,
    failovers: AtomicU64,
    /// Bound addresses, filled in by the server.
    pub(crate) peer_addr: Mutex<Option<String>>,
    pub(crate) metrics_addr: Mutex<Option<String>>,
    started: Instant,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("host", &self.settings.host)
            .finish_non_exhaustive()
    }
}

fn unknown(dom: &str, host: &str) -> ApiError {
    ApiError::new(
        ErrorCode::UnknownDomain,
        format!("kemarid on {host} protects no guest {dom:?}"),
        "`kemari status` lists the guests this host protects or replicates",
    )
}

impl Daemon {
    /// A daemon over `backend`; adopts the workers a previous daemon left in the state folder.
    pub fn new(settings: Settings, backend: Box<dyn Backend>) -> Result<Arc<Daemon>, DaemonError> {
        for (what, p) in [
            ("creating the state folder", &settings.guests_dir),
            ("creating the spool folder", &settings.spool_dir),
        ] {
            std::fs::create_dir_all(p).map_err(|source| DaemonError::Io {
                what,
                path: p.clone(),
                source,
            })?;
        }
        let d = Arc::new(Daemon {
            settings,
            backend,
            guests: Mutex::new(BTreeMap::new()),
            pending: Mutex::new(BTreeSet::new()),
            bus: Bus {
                subs: Mutex::new(Vec::new()),
            },
            shutting_down: AtomicBool::new(false),
            failovers: AtomicU64::new(0),
            peer_addr: Mutex::new(None),
            metrics_addr: Mutex::new(None),
            started: Instant::now(),
        });
        d.adopt()?;
        Ok(d)
    }

    /// This host's name.
    pub fn host(&self) -> &str {
        &self.settings.host
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.settings.config
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Guest>> {
        self.guests.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn emit(&self, dom: &str, kind: EventKind) {
        self.bus.publish(&Event {
            time: unix_now(),
            dom: dom.to_string(),
            kind,
        });
    }

    /// Follows the events of `dom` (or all).
    pub fn subscribe(&self, dom: Option<String>) -> Receiver<Event> {
        let (tx, rx) = std::sync::mpsc::sync_channel(SUBSCRIBER_QUEUE);
        self.bus
            .subs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((dom, tx));
        rx
    }

    /// Marks the daemon as stopping: new requests are refused.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    fn adopt(&self) -> Result<(), DaemonError> {
        let dir = &self.settings.guests_dir;
        let entries = std::fs::read_dir(dir).map_err(|source| DaemonError::Io {
            what: "reading the state folder",
            path: dir.clone(),
            source,
        })?;
        let mut found = 0;
        for e in entries.flatten() {
            let gdir = e.path();
            let rec = match GuestRecord::load(&gdir) {
                Ok(r) => r,
                Err(err) => {
                    log::warn!("ignoring {}: {err}", gdir.display());
                    continue;
                }
            };
            found += 1;
            let report = worker::read_report(&gdir);
            let worker = self.backend.adopt(&rec, &gdir);
            let state = match (&worker, &report) {
                (Some(_), Some(r)) => r.state,
                (Some(_), None) => GuestState::Starting,
                (None, Some(r)) if r.state.is_final() => r.state,
                (None, _) => GuestState::Failed,
            };
            let ended = report.as_ref().is_some_and(|r| r.state.is_final());
            let error = (worker.is_none() && !ended).then(|| {
                format!(
                    "its worker (pid {}) was gone when kemarid started",
                    rec.pid.map_or("-".into(), |p| p.to_string())
                )
            });
            match (&worker, rec.pid) {
                (Some(_), Some(pid)) => log::info!(
                    "found guest {} ({} of {}, {}): worker pid {pid} still runs, adopted",
                    rec.dom,
                    rec.role.as_str(),
                    rec.peer,
                    state.as_str()
                ),
                _ => log::warn!(
                    "found guest {} ({} of {}): no worker runs; last state {}{}",
                    rec.dom,
                    rec.role.as_str(),
                    rec.peer,
                    report.as_ref().map_or("unknown", |r| r.state.as_str()),
                    if ended {
                        ""
                    } else {
                        ": protection is over (kemari start protects it again)"
                    }
                ),
            }
            let pid = worker.as_ref().and(rec.pid);
            let name = rec.dom.clone();
            let g = Guest {
                worker_pid: rec.pid,
                since: report.as_ref().map_or(rec.started, |r| r.updated),
                rec,
                dir: gdir,
                state: if error.is_some() {
                    GuestState::Failed
                } else {
                    state
                },
                worker,
                report,
                window: VecDeque::new(),
                error,
                stop_requested: false,
                last_ckpt_event: (0.0, None),
                last_init_event: (0.0, 0),
                hb_peer: None,
                replica_dropped: false,
                counted_failover: state == GuestState::FailedOver,
            };
            self.lock().insert(name.clone(), g);
            if let Some(pid) = pid {
                self.emit(&name, EventKind::Adopted { pid });
            }
        }
        if found == 0 {
            log::info!("no guests found in {}", dir.display());
        }
        Ok(())
    }

    /// Answers one request (all but `events`, which the server streams).
    pub fn handle(&self, req: Request) -> Result<Reply, ApiError> {
        if self.shutting_down.load(Ordering::SeqCst) && !matches!(req, Request::Hello) {
            return Err(ApiError::new(
                ErrorCode::ShuttingDown,
                format!("kemarid on {} is shutting down", self.host()),
                "retry once it is running again",
            ));
        }
        match req {
            Request::Hello => Ok(Reply::Hello(HelloInfo {
                daemon: env!("CARGO_PKG_VERSION").into(),
                protocols: vec![PROTOCOL_VERSION],
                host: self.host().into(),
                mode: self.backend.mode().into(),
                pid: std::process::id(),
                peer_listen: self
                    .peer_addr
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone(),
                metrics_listen: self
                    .metrics_addr
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone(),
            })),
            Request::Status { dom } => {
                let guests = self.lock();
                let list: Vec<GuestStatus> = match &dom {
                    None => guests.values().map(Guest::status).collect(),
                    Some(d) => vec![guests
                        .get(d)
                        .or_else(|| find_by_domid(&guests, d))
                        .ok_or_else(|| unknown(d, self.host()))?
                        .status()],
                };
                Ok(Reply::Status(StatusReply {
                    host: self.host().into(),
                    guests: list,
                }))
            }
            Request::Start { dom, host, options } => self
                .start(&dom, &host, &options)
                .map(|s| Reply::Guest(Box::new(s))),
            Request::Stop { dom } => self.stop(&dom).map(|s| Reply::Guest(Box::new(s))),
            Request::Failover { dom, force } => self
                .failover(&dom, force)
                .map(|s| Reply::Guest(Box::new(s))),
            Request::Checkpoint { dom, wait_ms } => self.checkpoint(&dom, wait_ms),
            Request::Events { .. } => Err(ApiError::bare(
                ErrorCode::Internal,
                "events are streamed by the connection handler",
            )),
            Request::PeerReceive {
                dom,
                primary,
                options,
            } => self.peer_receive(&dom, &primary, &options),
            Request::PeerStop { dom } => {
                self.stop_secondary_for_peer(&dom)?;
                Ok(Reply::PeerStopped { dom })
            }
        }
    }

    /// Reserves `name` for a start in progress; refuses a guest protected already.
    fn reserve(
        &self,
        name: &str,
        what: impl Fn(&GuestStatus) -> ApiError,
    ) -> Result<Reservation<'_>, ApiError> {
        let guests = self.lock();
        if let Some(g) = guests.get(name) {
            if !g.state.is_final() || g.worker.is_some() {
                return Err(what(&g.status()));
            }
        }
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        if !pending.insert(name.to_string()) {
            return Err(ApiError::new(
                ErrorCode::AlreadyProtected,
                format!(
                    "guest {name}: protection is being started on {} right now",
                    self.host()
                ),
                "wait for that start to finish (kemari status)",
            ));
        }
        Ok(Reservation {
            d: self,
            name: name.to_string(),
        })
    }

    fn new_guest_dir(&self, name: &str) -> Result<PathBuf, ApiError> {
        let dir = self.settings.guests_dir.join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| {
            ApiError::bare(
                ErrorCode::Internal,
                format!("guest {name}: creating {}: {e}", dir.display()),
            )
        })?;
        Ok(dir)
    }

    fn insert(&self, rec: GuestRecord, dir: PathBuf, worker: Box<dyn Worker>) -> GuestStatus {
        if let Err(e) = rec.save(&dir) {
            log::warn!("guest {}: cannot write its record in {}: {e} (a restarted kemarid will not find it)", rec.dom, dir.display());
        }
        let name = rec.dom.clone();
        let now = unix_now();
        let g = Guest {
            worker_pid: worker.pid(),
            report: worker::read_report(&dir),
            rec,
            dir,
            state: GuestState::Starting,
            since: now,
            worker: Some(worker),
            window: VecDeque::new(),
            error: None,
            stop_requested: false,
            last_ckpt_event: (0.0, None),
            last_init_event: (0.0, 0),
            hb_peer: None,
            replica_dropped: false,
            counted_failover: false,
        };
        let status = g.status();
        self.lock().insert(name.clone(), g);
        self.emit(
            &name,
            EventKind::State {
                from: None,
                to: GuestState::Starting,
                reason: format!("{} of {}", status.role.as_str(), status.peer),
            },
        );
        status
    }

    fn start(
        &self,
        dom: &str,
        host: &str,
        options: &StartOptions,
    ) -> Result<GuestStatus, ApiError> {
        let (domid, name) = self.backend.resolve(dom)?;
        let _r = self.reserve(&name, |s| {
            ApiError::new(
                ErrorCode::AlreadyProtected,
                format!(
                    "guest {name} is already protected: {} of {} ({})",
                    s.role.as_str(),
                    s.peer,
                    s.state.as_str()
                ),
                format!("`kemari stop {name}` first"),
            )
        })?;
        let opts = self.config().resolve(&name, options)?;
        let (peer_host, peer_daemon) = peer_address(host);
        let mut client = Client::connect_tcp(&peer_daemon, Duration::from_secs(5)).map_err(|e| {
            ApiError::new(
                ErrorCode::UnreachableHost,
                format!("cannot protect {name}: kemarid on {host} ({peer_daemon}) is unreachable: {}", inner_cause(&e)),
                format!("start kemarid on {host} and check that its peer_listen port is reachable from {}", self.host()),
            )
        })?;
        let ready = match client.call(&Request::PeerReceive {
            dom: name.clone(),
            primary: self.host().into(),
            options: opts.to_options(),
        }) {
            Ok(Reply::PeerReady(r)) => r,
            Ok(other) => {
                return Err(ApiError::bare(
                    ErrorCode::Internal,
                    format!("kemarid on {host} answered peer-receive with {other:?}"),
                ))
            }
            Err(ClientError::Api(e)) => {
                return Err(ApiError {
                    code: ErrorCode::PeerRefused,
                    message: format!(
                        "kemarid on {host} refused to receive {name}: [{}] {}",
                        e.code.as_str(),
                        e.message
                    ),
                    fix: e.fix,
                })
            }
            Err(e) => {
                return Err(ApiError::new(
                    ErrorCode::UnreachableHost,
                    format!("cannot protect {name}: kemarid on {host} ({peer_daemon}) failed: {e}"),
                    format!("check kemarid's log on {host}"),
                ))
            }
        };
        let dir = self.new_guest_dir(&name)?;
        let spec = WorkerSpec {
            dom: name.clone(),
            domid: Some(domid),
            dir: dir.clone(),
            opts: opts.clone(),
            target: Some(join_host_port(&peer_host, ready.data_port)),
            heartbeat_port: ready.heartbeat_port,
            listen: None,
            spool: None,
        };
        let worker = match self.backend.start_primary(&spec) {
            Ok(w) => w,
            Err(e) => {
                // the receiving worker waits for nobody: end it
                if let Err(pe) = client.call(&Request::PeerStop { dom: name.clone() }) {
                    log::warn!("guest {name}: telling {host} to drop its receiver: {pe}");
                }
                return Err(e);
            }
        };
        log::info!(
            "guest {name} (domain {domid}): protection started, secondary {host} (data port {})",
            ready.data_port
        );
        let rec = GuestRecord {
            dom: name,
            role: Role::Primary,
            peer: peer_host,
            peer_daemon: Some(peer_daemon),
            opts,
            pid: worker.pid(),
            domid: Some(domid),
            data_port: Some(ready.data_port),
            started: unix_now(),
        };
        Ok(self.insert(rec, dir, worker))
    }

    fn allocate_port(&self) -> Result<u16, ApiError> {
        let Some(range) = self.settings.data_ports.clone() else {
            return Ok(0);
        };
        let used: BTreeSet<u16> = self
            .lock()
            .values()
            .filter(|g| g.worker.is_some())
            .filter_map(|g| g.rec.data_port)
            .collect();
        let addr = &self.settings.data_listen;
        for p in range.clone() {
            if used.contains(&p) {
                continue;
            }
            let a = join_host_port(addr, p);
            if std::net::TcpListener::bind(&a).is_ok() && std::net::UdpSocket::bind(&a).is_ok() {
                return Ok(p);
            }
        }
        Err(ApiError::new(
            ErrorCode::Internal,
            format!(
                "no free port in data_ports {}-{} on {}",
                range.start(),
                range.end(),
                self.host()
            ),
            "widen data_ports in kemarid.conf",
        ))
    }

    fn peer_receive(
        &self,
        dom: &str,
        primary: &str,
        options: &StartOptions,
    ) -> Result<Reply, ApiError> {
        let name = dom.to_string();
        if name.is_empty() || name.contains(['/', '\0']) || name.starts_with('.') {
            return Err(ApiError::bare(
                ErrorCode::BadRequest,
                format!("{name:?} is not a guest name kemarid accepts"),
            ));
        }
        let _r = self.reserve(&name, |s| {
            ApiError::new(
                ErrorCode::AlreadyProtected,
                format!(
                    "{} already holds guest {name}: {} of {} ({})",
                    self.host(),
                    s.role.as_str(),
                    s.peer,
                    s.state.as_str()
                ),
                format!("`kemari stop {name}` on {} first", self.host()),
            )
        })?;
        let opts = self.config().resolve(&name, options)?;
        let port = self.allocate_port()?;
        let dir = self.new_guest_dir(&name)?;
        let spool = self.settings.spool_dir.join(&name);
        let spec = WorkerSpec {
            dom: name.clone(),
            domid: None,
            dir: dir.clone(),
            opts: opts.clone(),
            target: None,
            heartbeat_port: port,
            listen: Some(join_host_port(&self.settings.data_listen, port)),
            spool: Some(spool),
        };
        // the port the worker listens on (the in-memory worker lets the OS pick it)
        let (worker, data_port) = self.backend.start_secondary(&spec)?;
        log::info!("guest {name}: receiving from {primary} on port {data_port}");
        let rec = GuestRecord {
            dom: name.clone(),
            role: Role::Secondary,
            peer: primary.to_string(),
            peer_daemon: None,
            opts,
            pid: worker.pid(),
            domid: None,
            data_port: Some(data_port),
            started: unix_now(),
        };
        self.insert(rec, dir, worker);
        Ok(Reply::PeerReady(PeerReady {
            dom: name,
            data_port,
            heartbeat_port: data_port,
        }))
    }

    /// Waits (without holding the table) until `done` holds for the guest or `timeout`.
    fn wait_for(
        &self,
        name: &str,
        timeout: Duration,
        done: impl Fn(&Guest) -> bool,
    ) -> Option<GuestStatus> {
        let t0 = Instant::now();
        loop {
            self.poll_one(name);
            {
                let guests = self.lock();
                let g = guests.get(name)?;
                if done(g) || t0.elapsed() >= timeout {
                    return Some(g.status());
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&self, dom: &str) -> Result<GuestStatus, ApiError> {
        let (role, state, has_worker, peer_daemon) = {
            let mut guests = self.lock();
            let g = guests
                .get_mut(dom)
                .ok_or_else(|| unknown(dom, self.host()))?;
            if g.state.is_final() && g.worker.is_none() {
                // protection is over: forget the guest
                let s = g.status();
                let dir = g.dir.clone();
                guests.remove(dom);
                let _ = std::fs::remove_dir_all(dir);
                log::info!("guest {dom}: forgotten ({})", s.state.as_str());
                return Ok(s);
            }
            if g.rec.role == Role::Secondary && g.state == GuestState::FailedOver {
                return Err(ApiError::new(
                    ErrorCode::WrongState,
                    format!(
                        "guest {dom} runs on {} since its failover; its worker (pid {}) serves its devices",
                        self.host(),
                        g.worker_pid.map_or("-".into(), |p| p.to_string())
                    ),
                    format!("shut the guest down (xl shutdown {dom}); its worker then ends"),
                ));
            }
            (
                g.rec.role,
                g.state,
                g.worker.is_some(),
                g.rec.peer_daemon.clone(),
            )
        };
        match role {
            Role::Primary => {
                self.ask(dom, Ask::Stop)?;
                self.set_state(dom, GuestState::Stopping, "stop asked");
                let s = self
                    .wait_for(dom, Duration::from_secs(60), |g| g.worker.is_none())
                    .ok_or_else(|| unknown(dom, self.host()))?;
                if s.state != GuestState::Stopped || !has_worker {
                    // the worker did not say goodbye: tell the peer daemon directly
                    if let Some(pd) = peer_daemon {
                        self.tell_peer_stop(&pd, dom);
                    }
                }
                log::info!(
                    "guest {dom}: protection stopped ({} before)",
                    state.as_str()
                );
                Ok(s)
            }
            Role::Secondary => {
                self.stop_secondary(dom)?;
                self.wait_for(dom, Duration::from_secs(30), |g| g.worker.is_none())
                    .ok_or_else(|| unknown(dom, self.host()))
            }
        }
    }

    fn tell_peer_stop(&self, peer_daemon: &str, dom: &str) {
        match Client::connect_tcp(peer_daemon, Duration::from_secs(3))
            .and_then(|mut c| c.call(&Request::PeerStop { dom: dom.into() }))
        {
            Ok(_) => log::info!("guest {dom}: {peer_daemon} dropped its replica"),
            Err(e) => log::warn!("guest {dom}: telling {peer_daemon} to drop its replica: {e}"),
        }
    }

    fn stop_secondary(&self, dom: &str) -> Result<(), ApiError> {
        {
            let mut guests = self.lock();
            let g = guests
                .get_mut(dom)
                .ok_or_else(|| unknown(dom, self.host()))?;
            if g.rec.role != Role::Secondary {
                return Err(ApiError::new(
                    ErrorCode::NotSecondary,
                    format!("guest {dom} is the primary on {}", self.host()),
                    "peer-stop is for the secondary",
                ));
            }
            if matches!(g.state, GuestState::FailedOver | GuestState::FailingOver) {
                return Err(ApiError::new(
                    ErrorCode::WrongState,
                    format!(
                        "guest {dom} {} on {}",
                        if g.state == GuestState::FailedOver {
                            "runs"
                        } else {
                            "is failing over"
                        },
                        self.host()
                    ),
                    format!("the guest is no longer {}'s: nothing to stop", g.rec.peer),
                ));
            }
            g.stop_requested = true;
        }
        if self.has_worker(dom) {
            self.ask(dom, Ask::Stop)?;
        }
        Ok(())
    }

    fn stop_secondary_for_peer(&self, dom: &str) -> Result<(), ApiError> {
        self.stop_secondary(dom)?;
        self.wait_for(dom, Duration::from_secs(30), |g| g.worker.is_none());
        Ok(())
    }

    fn has_worker(&self, dom: &str) -> bool {
        self.lock().get(dom).is_some_and(|g| g.worker.is_some())
    }

    fn ask(&self, dom: &str, what: Ask) -> Result<(), ApiError> {
        let mut guests = self.lock();
        let g = guests
            .get_mut(dom)
            .ok_or_else(|| unknown(dom, self.host()))?;
        if what == Ask::Stop {
            g.stop_requested = true;
        }
        match &g.worker {
            None => Ok(()),
            Some(w) => w
                .ask(what)
                .map_err(|e| ApiError::bare(ErrorCode::Internal, format!("guest {dom}: {e}"))),
        }
    }

    fn failover(&self, dom: &str, force: bool) -> Result<GuestStatus, ApiError> {
        {
            let guests = self.lock();
            let g = guests.get(dom).ok_or_else(|| unknown(dom, self.host()))?;
            if g.rec.role != Role::Secondary {
                return Err(ApiError::new(
                    ErrorCode::NotSecondary,
                    format!(
                        "guest {dom} runs on {} (the primary); a failover is asked on its secondary {}",
                        self.host(),
                        g.rec.peer
                    ),
                    format!("run `kemari failover {dom}` on {}", g.rec.peer),
                ));
            }
            match g.state {
                GuestState::Protected => {}
                GuestState::FailedOver | GuestState::FailingOver => {
                    return Err(ApiError::new(
                        ErrorCode::WrongState,
                        format!(
                            "guest {dom} already {} on {}",
                            if g.state == GuestState::FailedOver {
                                "failed over and runs"
                            } else {
                                "is failing over"
                            },
                            self.host()
                        ),
                        "nothing to do: `kemari status` shows it",
                    ))
                }
                s if s.is_final() => {
                    return Err(ApiError::new(
                        ErrorCode::NotProtected,
                        format!(
                            "guest {dom}'s replica on {} is gone ({})",
                            self.host(),
                            s.as_str()
                        ),
                        format!("protect it again from {} (kemari start)", g.rec.peer),
                    ))
                }
                s => {
                    return Err(ApiError::new(
                        ErrorCode::WrongState,
                        format!(
                            "guest {dom} has no consistent replica on {} yet ({})",
                            self.host(),
                            s.as_str()
                        ),
                        "wait for the initial sync to complete (state protected)",
                    ))
                }
            }
            // the primary is alive while its checkpoints keep coming: the last one is more
            // recent than the heartbeat's detection time (period x misses)
            let alive = g.report.as_ref().is_some_and(|r| {
                let detect = r.heartbeat.as_ref().map_or(
                    g.rec.opts.heartbeat_ms * u64::from(g.rec.opts.heartbeat_misses),
                    |h| h.period_ms * u64::from(h.misses_allowed),
                );
                r.heartbeat.as_ref().is_some_and(|h| h.peer == "alive")
                    && r.last_ack
                        .is_some_and(|t| (unix_now() - t) * 1000.0 < detect as f64)
            });
            if alive && !force {
                return Err(ApiError::new(
                    ErrorCode::WrongState,
                    format!(
                        "the primary {} still answers guest {dom}'s heartbeat: a failover now would run two copies of {dom}",
                        g.rec.peer
                    ),
                    format!(
                        "stop protection on {} (`kemari stop {dom}` there), or make sure the guest there is stopped and use --force",
                        g.rec.peer
                    ),
                ));
            }
        }
        log::warn!(
            "guest {dom}: failover asked{}",
            if force { " (forced)" } else { "" }
        );
        self.ask(dom, Ask::Failover)?;
        let s = self
            .wait_for(dom, Duration::from_secs(120), |g| {
                g.state == GuestState::FailedOver || g.state.is_final()
            })
            .ok_or_else(|| unknown(dom, self.host()))?;
        if s.state == GuestState::FailedOver {
            Ok(s)
        } else {
            Err(ApiError::new(
                ErrorCode::Internal,
                format!(
                    "failover of guest {dom} on {} did not complete: {} ({})",
                    self.host(),
                    s.state.as_str(),
                    s.error.unwrap_or_else(|| "no error reported".into())
                ),
                "see the worker's log (state_dir/guests/DOM/worker.log)",
            ))
        }
    }

    fn checkpoint(&self, dom: &str, wait_ms: Option<u64>) -> Result<Reply, ApiError> {
        let (dir, before) = {
            let guests = self.lock();
            let g = guests.get(dom).ok_or_else(|| unknown(dom, self.host()))?;
            if g.rec.role != Role::Primary {
                return Err(ApiError::new(
                    ErrorCode::NotPrimary,
                    format!(
                        "guest {dom} is replicated on {}; checkpoints are taken by its primary {}",
                        self.host(),
                        g.rec.peer
                    ),
                    format!("run `kemari checkpoint {dom}` on {}", g.rec.peer),
                ));
            }
            if g.state.is_final() {
                return Err(ApiError::new(
                    ErrorCode::NotProtected,
                    format!("guest {dom} is not protected ({})", g.state.as_str()),
                    format!("`kemari start {dom} HOST` protects it"),
                ));
            }
            if g.state != GuestState::Protected {
                return Err(ApiError::new(
                    ErrorCode::WrongState,
                    format!(
                        "guest {dom}: no checkpoint before the initial sync completed ({})",
                        g.state.as_str()
                    ),
                    "wait for state protected",
                ));
            }
            (
                g.dir.clone(),
                g.report
                    .as_ref()
                    .and_then(|r| r.last_acked_seq)
                    .unwrap_or(0),
            )
        };
        let current = worker::read_report(&dir)
            .and_then(|r| r.last_acked_seq)
            .unwrap_or(before);
        self.ask(dom, Ask::Checkpoint)?;
        let wait = Duration::from_millis(wait_ms.unwrap_or(10_000));
        let t0 = Instant::now();
        loop {
            if let Some(seq) = worker::read_report(&dir).and_then(|r| r.last_acked_seq) {
                if seq > current {
                    return Ok(Reply::Checkpoint(CheckpointReply {
                        dom: dom.into(),
                        acked_seq: seq,
                    }));
                }
            }
            if t0.elapsed() >= wait {
                return Err(ApiError::new(
                    ErrorCode::Internal,
                    format!(
                        "guest {dom}: no checkpoint acknowledged within {} ms after the request (last acknowledged: {current})",
                        wait.as_millis()
                    ),
                    "see `kemari status` and the worker's log",
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn set_state(&self, dom: &str, to: GuestState, reason: &str) {
        let from = {
            let mut guests = self.lock();
            let Some(g) = guests.get_mut(dom) else { return };
            if g.state == to {
                return;
            }
            let from = g.state;
            g.state = to;
            g.since = unix_now();
            from
        };
        self.emit(
            dom,
            EventKind::State {
                from: Some(from),
                to,
                reason: reason.into(),
            },
        );
    }

    /// One supervision round over every guest.
    pub fn poll(&self) {
        let names: Vec<String> = self.lock().keys().cloned().collect();
        for n in names {
            self.poll_one(&n);
        }
    }

    fn poll_one(&self, name: &str) {
        let mut events = Vec::new();
        let mut drop_replica = None;
        {
            let mut guests = self.lock();
            let Some(g) = guests.get_mut(name) else {
                return;
            };
            if g.worker.is_none() && g.state.is_final() {
                return;
            }
            let now = unix_now();
            if let Some(r) = worker::read_report(&g.dir) {
                g.window.push_back((now, r.checkpoints, r.bytes, r.pages));
                while g.window.front().is_some_and(|w| now - w.0 > RATE_WINDOW) {
                    g.window.pop_front();
                }
                if let Some(h) = &r.heartbeat {
                    if g.hb_peer.as_deref() != Some(h.peer.as_str()) && h.peer != "unknown" {
                        events.push(EventKind::Heartbeat {
                            peer: h.peer.clone(),
                        });
                    }
                    g.hb_peer = Some(h.peer.clone());
                }
                if let Some(i) = &r.initial {
                    if !i.done && i.pages != g.last_init_event.1 && now - g.last_init_event.0 >= 1.0
                    {
                        g.last_init_event = (now, i.pages);
                        events.push(EventKind::InitialSync {
                            pages: i.pages,
                            total: i.total,
                            rate_pages_per_s: i.rate_pages_per_s,
                        });
                    }
                }
                if r.last_acked_seq != g.last_ckpt_event.1 && now - g.last_ckpt_event.0 >= 1.0 {
                    if let Some(seq) = r.last_acked_seq {
                        g.last_ckpt_event = (now, Some(seq));
                        events.push(EventKind::Checkpoints {
                            last_acked_seq: seq,
                            checkpoints: r.checkpoints,
                            per_s: g.window_rates().0,
                        });
                    }
                }
                g.report = Some(r);
            }
            let mut next = g.report.as_ref().map(|r| r.state);
            if g.stop_requested
                && g.rec.role == Role::Primary
                && next.is_some_and(|s| !s.is_final())
            {
                next = Some(GuestState::Stopping);
            }
            let mut reason = "worker report".to_string();
            if let Some(w) = g.worker.as_mut() {
                if let Some(code) = w.try_exit() {
                    let pid = g.worker_pid;
                    g.worker = None;
                    if let Some(pid) = pid {
                        events.push(EventKind::WorkerExit { pid, code });
                    }
                    let reported = g.report.as_ref().map(|r| r.state);
                    let fin = match reported {
                        Some(s) if s.is_final() => s,
                        _ if g.stop_requested => GuestState::Stopped,
                        _ => {
                            g.error = Some(format!(
                                "worker{} ended ({}) without reporting an end{}",
                                pid.map_or(String::new(), |p| format!(" pid {p}")),
                                code.map_or("killed by a signal".into(), |c| format!("status {c}")),
                                g.report
                                    .as_ref()
                                    .and_then(|r| r.error.clone())
                                    .map_or(String::new(), |e| format!(": {e}"))
                            ));
                            GuestState::Failed
                        }
                    };
                    reason = format!(
                        "worker ended{}",
                        code.map_or(String::new(), |c| format!(" with status {c}"))
                    );
                    next = Some(fin);
                    if g.rec.role == Role::Secondary
                        && fin != GuestState::FailedOver
                        && !g.replica_dropped
                    {
                        drop_replica = g.report.as_ref().and_then(|r| r.domid);
                        g.replica_dropped = true;
                    }
                }
            }
            if let Some(to) = next {
                if to != g.state {
                    if to == GuestState::FailedOver && !g.counted_failover {
                        g.counted_failover = true;
                        self.failovers.fetch_add(1, Ordering::Relaxed);
                        let f = g.report.as_ref().and_then(|r| r.failover.clone());
                        events.push(EventKind::FailedOver {
                            domid: f.as_ref().and_then(|f| f.domid),
                            seq: f.and_then(|f| f.seq),
                        });
                    }
                    events.push(EventKind::State {
                        from: Some(g.state),
                        to,
                        reason: if to == GuestState::Failed {
                            g.error
                                .clone()
                                .or_else(|| g.report.as_ref().and_then(|r| r.error.clone()))
                                .unwrap_or(reason)
                        } else {
                            reason
                        },
                    });
                    log::info!("guest {name}: {} -> {}", g.state.as_str(), to.as_str());
                    g.state = to;
                    g.since = now;
                }
            }
        }
        if let Some(domid) = drop_replica {
            match self.backend.destroy_replica(domid) {
                Ok(()) => log::info!("guest {name}: replica domain {domid} destroyed"),
                Err(e) => log::warn!("guest {name}: {e}"),
            }
        }
        for e in events {
            self.emit(name, e);
        }
    }

    /// The supervisor: polls the workers until the daemon stops.
    pub fn supervise(self: &Arc<Daemon>) -> std::io::Result<std::thread::JoinHandle<()>> {
        let d = self.clone();
        std::thread::Builder::new()
            .name("supervisor".into())
            .spawn(move || {
                while !d.shutting_down.load(Ordering::SeqCst) {
                    d.poll();
                    std::thread::sleep(POLL);
                }
            })
    }

    /// Seconds since the daemon started.
    pub fn uptime(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }
}

/// Guard of a name reserved while a start is under way.
struct Reservation<'a> {
    d: &'a Daemon,
    name: String,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.d
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.name);
    }
}

fn find_by_domid<'a>(guests: &'a BTreeMap<String, Guest>, d: &str) -> Option<&'a Guest> {
    let id = d.parse::<u32>().ok()?;
    guests
        .values()
        .find(|g| g.report.as_ref().and_then(|r| r.domid).or(g.rec.domid) == Some(id))
}

fn inner_cause(e: &ClientError) -> String {
    match e {
        ClientError::Connect { source, .. } => source.to_string(),
        other => other.to_string(),
    }
}

/// `HOST` or `HOST:PORT` (or `[V6]:PORT`) into (host, `host:port` of its kemarid).
pub fn peer_address(host: &str) -> (String, String) {
    if let Some(rest) = host.strip_prefix('[') {
        if let Some((h, p)) = rest.split_once("]:") {
            if p.parse::<u16>().is_ok() {
                return (h.to_string(), host.to_string());
            }
        }
        let h = rest.trim_end_matches(']');
        return (
            h.to_string(),
            join_host_port(h, crate::api::DEFAULT_PEER_PORT),
        );
    }
    match host.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.parse::<u16>().is_ok() => {
            (h.to_string(), host.to_string())
        }
        _ => (
            host.to_string(),
            join_host_port(host, crate::api::DEFAULT_PEER_PORT),
        ),
    }
}

/// `host:port`, bracketing IPv6 literals.
pub fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

#[cfg(test)]
mod tests;
