//! The in-memory mode (`kemarid --mem`): guests in a [`MemXen`], workers are threads of the
//! daemon running the real sync engine ([`Sender`] / [`Receiver`]) over loopback TCP between
//! two daemons. What it lacks (docs/api.md): worker processes and so re-adoption, heartbeats
//! (a lost stream counts as a dead primary), `xl restore` (a failover resumes the replica in
//! place), disks and NICs.

use std::collections::BTreeMap;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hypervisor::mem::{DomainConfig, GuestError, MemXen};
use hypervisor::DomainControl;

use super::report::StatusWriter;
use super::worker::{Ask, Backend, GuestRecord, Worker, WorkerSpec};
use crate::api::{ApiError, ErrorCode, GuestState, Role};
use crate::sync::receiver::{read_staged, Receiver, ReceiverOptions};
use crate::sync::replica::MemReplicaBuilder;
use crate::sync::sender::{CountHook, Sender, SenderOptions};
use crate::sync::trigger::{Reasons, Triggers};

/// Pages of a `--mem-guest` without a size.
pub const DEFAULT_PAGES: u64 = 1024;

struct GuestWriter {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Drop for GuestWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The in-memory host.
pub struct MemBackend {
    xen: MemXen,
    names: Mutex<BTreeMap<String, hypervisor::DomId>>,
    writers: Mutex<Vec<GuestWriter>>,
}

impl std::fmt::Debug for MemBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemBackend").finish_non_exhaustive()
    }
}

/// A `NAME[:PAGES]` argument.
pub fn parse_guest(arg: &str) -> Result<(String, u64), String> {
    let (name, pages) = match arg.split_once(':') {
        Some((n, p)) => (
            n,
            p.parse::<u64>()
                .map_err(|e| format!("--mem-guest {arg:?}: {p:?} is not a page count: {e}"))?,
        ),
        None => (arg, DEFAULT_PAGES),
    };
    if name.is_empty() || name.parse::<u32>().is_ok() {
        return Err(format!(
            "--mem-guest {arg:?}: the name must be non-empty and not a number"
        ));
    }
    if !(16..=1 << 20).contains(&pages) {
        return Err(format!(
            "--mem-guest {arg:?}: {pages} pages (16 to 1048576)"
        ));
    }
    Ok((name.to_string(), pages))
}

impl MemBackend {
    /// A host running `guests` (name, pages): HVM guests whose memory a thread each keeps
    /// writing.
    pub fn new(guests: &[(String, u64)]) -> Result<MemBackend, GuestError> {
        let xen = MemXen::new();
        let mut names = BTreeMap::new();
        let mut writers = Vec::new();
        for (name, pages) in guests {
            let dom = xen.create_domain(DomainConfig::hvm(*pages).with_name(name))?;
            let g = xen.guest(dom);
            for pfn in 0..*pages {
                g.fill_page(pfn, (pfn % 251) as u8)?;
            }
            names.insert(name.clone(), dom);
            let stop = Arc::new(AtomicBool::new(false));
            let s = stop.clone();
            let pages = *pages;
            let handle = std::thread::Builder::new()
                .name(format!("mem-guest-{name}"))
                .spawn(move || {
                    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ u64::from(dom);
                    while !s.load(Ordering::Relaxed) {
                        for _ in 0..64 {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            // a guest that is paused or gone just waits
                            let _ =
                                g.write(x % pages, ((x >> 16) % 4000) as usize, &x.to_le_bytes());
                        }
                        std::thread::sleep(Duration::from_millis(2));
                    }
                })
                .map_err(|_| GuestError::NotRunning {
                    domid: dom,
                    why: "its writer thread could not be started",
                })?;
            writers.push(GuestWriter {
                stop,
                handle: Some(handle),
            });
        }
        Ok(MemBackend {
            xen,
            names: Mutex::new(names),
            writers: Mutex::new(writers),
        })
    }

    /// The in-memory Xen (tests).
    pub fn xen(&self) -> &MemXen {
        &self.xen
    }
}

impl Drop for MemBackend {
    fn drop(&mut self) {
        self.writers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

/// A worker thread.
struct MemWorker {
    handle: Option<JoinHandle<bool>>,
    triggers: Option<Triggers>,
    failover: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    stream: Arc<Mutex<Option<TcpStream>>>,
}

impl Worker for MemWorker {
    fn pid(&self) -> Option<u32> {
        None
    }

    fn ask(&self, what: Ask) -> Result<(), String> {
        let shutdown = || {
            if let Some(s) = self
                .stream
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_ref()
            {
                let _ = s.shutdown(Shutdown::Both);
            }
        };
        match (what, &self.triggers) {
            (Ask::Checkpoint, Some(t)) => t.fire(Reasons::REQUEST),
            (Ask::Stop, Some(t)) => t.stop(),
            (Ask::Failover, None) => {
                self.failover.store(true, Ordering::SeqCst);
                shutdown();
            }
            (Ask::Stop, None) => {
                self.stop.store(true, Ordering::SeqCst);
                shutdown();
            }
            (what, _) => return Err(format!("{what:?} does not apply to this worker")),
        }
        Ok(())
    }

    fn try_exit(&mut self) -> Option<Option<i32>> {
        if self.handle.as_ref().is_some_and(|h| !h.is_finished()) {
            return None;
        }
        match self.handle.take() {
            Some(h) => Some(Some(match h.join() {
                Ok(true) => 0,
                _ => 1,
            })),
            None => Some(Some(0)),
        }
    }
}

fn internal(dom: &str, what: impl std::fmt::Display) -> ApiError {
    ApiError::bare(ErrorCode::Internal, format!("guest {dom}: {what}"))
}

impl Backend for MemBackend {
    fn mode(&self) -> &'static str {
        "mem"
    }

    fn resolve(&self, dom: &str) -> Result<(u32, String), ApiError> {
        let names = self.names.lock().unwrap_or_else(PoisonError::into_inner);
        let found = match dom.parse::<u32>() {
            Ok(id) => names.iter().find(|(_, d)| u32::from(**d) == id),
            Err(_) => names.iter().find(|(n, _)| n.as_str() == dom),
        };
        match found {
            Some((n, d)) if self.xen.domain_info(*d).is_ok() => Ok((u32::from(*d), n.clone())),
            _ => Err(ApiError::new(
                ErrorCode::UnknownDomain,
                format!(
                    "no domain {dom:?} on this host (in-memory guests: {})",
                    names.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
                "check the name (kemarid --mem --mem-guest NAME)",
            )),
        }
    }

    fn start_primary(&self, spec: &WorkerSpec) -> Result<Box<dyn Worker>, ApiError> {
        let status = StatusWriter::new(Some(&spec.status_file()), Role::Primary)
            .map_err(|e| internal(&spec.dom, e))?;
        let domid = spec
            .domid
            .ok_or_else(|| internal(&spec.dom, "no domain id"))?;
        status.domid(domid);
        let target = spec.target.clone().unwrap_or_default();
        let triggers = Triggers::new(Duration::from_millis(spec.opts.interval_ms.max(1)));
        let min_run = Duration::from_millis(spec.opts.min_run_ms);
        let xen = self.xen.clone();
        let t = triggers.clone();
        let name = spec.dom.clone();
        let stream_slot = Arc::new(Mutex::new(None));
        let slot = stream_slot.clone();
        let handle = std::thread::Builder::new()
            .name(format!("worker-{name}"))
            .spawn(move || {
                let r = run_primary(&xen, domid, &name, &target, &t, min_run, &status, &slot);
                match r {
                    Ok(()) => {
                        status.finish(GuestState::Stopped, None);
                        true
                    }
                    Err(e) => {
                        log::warn!("guest {name}: protection lost: {e}");
                        status.finish(GuestState::Failed, Some(e));
                        false
                    }
                }
            })
            .map_err(|e| internal(&spec.dom, e))?;
        Ok(Box::new(MemWorker {
            handle: Some(handle),
            triggers: Some(triggers),
            failover: Arc::new(AtomicBool::new(false)),
            stop: Arc::new(AtomicBool::new(false)),
            stream: stream_slot,
        }))
    }

    fn start_secondary(&self, spec: &WorkerSpec) -> Result<(Box<dyn Worker>, u16), ApiError> {
        let status = StatusWriter::new(Some(&spec.status_file()), Role::Secondary)
            .map_err(|e| internal(&spec.dom, e))?;
        let listen = spec.listen.clone().unwrap_or_default();
        let listener = TcpListener::bind(&listen)
            .map_err(|e| internal(&spec.dom, format!("listening on {listen}: {e}")))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| internal(&spec.dom, e))?;
        let port = listener
            .local_addr()
            .map_err(|e| internal(&spec.dom, e))?
            .port();
        let spool = spec
            .spool
            .clone()
            .ok_or_else(|| internal(&spec.dom, "no spool folder"))?;
        let xen = self.xen.clone();
        let name = spec.dom.clone();
        let failover = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let stream_slot = Arc::new(Mutex::new(None));
        let (f, s, slot) = (failover.clone(), stop.clone(), stream_slot.clone());
        let handle = std::thread::Builder::new()
            .name(format!("worker-{name}"))
            .spawn(move || {
                let r = run_secondary(&xen, &name, listener, &spool, &status, &f, &s, &slot);
                match r {
                    Ok(state) => {
                        if state != GuestState::FailedOver {
                            status.finish(state, None);
                        }
                        true
                    }
                    Err(e) => {
                        log::warn!("guest {name}: receiving failed: {e}");
                        status.finish(GuestState::Failed, Some(e));
                        false
                    }
                }
            })
            .map_err(|e| internal(&spec.dom, e))?;
        Ok((
            Box::new(MemWorker {
                handle: Some(handle),
                triggers: None,
                failover,
                stop,
                stream: stream_slot,
            }),
            port,
        ))
    }

    fn adopt(&self, _rec: &GuestRecord, _dir: &Path) -> Option<Box<dyn Worker>> {
        // the workers were threads of the previous daemon: gone with it
        None
    }

    fn destroy_replica(&self, domid: u32) -> Result<(), String> {
        let d = hypervisor::DomId::try_from(domid)
            .map_err(|_| format!("domain id {domid} out of range"))?;
        self.xen
            .destroy_domain(d)
            .map_err(|e| format!("destroying replica {domid}: {e}"))
    }
}

#[allow(clippy::too_many_arguments)]
fn run_primary(
    xen: &MemXen,
    domid: u32,
    name: &str,
    target: &str,
    triggers: &Triggers,
    min_run: Duration,
    status: &StatusWriter,
    slot: &Mutex<Option<TcpStream>>,
) -> Result<(), String> {
    let stream = TcpStream::connect(target)
        .map_err(|e| format!("connecting to the secondary at {target}: {e}"))?;
    if let Ok(c) = stream.try_clone() {
        *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(c);
    }
    let opts = SenderOptions {
        max_live_rounds: 4,
        live_dirty_target: 64,
        ack_timeout: Duration::from_secs(20),
        min_run,
        ..SenderOptions::default()
    };
    let domid = hypervisor::DomId::try_from(domid)
        .map_err(|_| format!("domain id {domid} out of range"))?;
    let mut tx = Sender::new(xen, domid, stream, opts, None).map_err(|e| e.to_string())?;
    let obs = status.clone();
    tx.set_observer(Box::new(move |s| obs.checkpoint(s)));
    let config = serde_json::json!({"c_info": {"type": "hvm", "name": name}}).to_string();
    let mut guest_pages = 0u64;
    status.state(GuestState::InitialSync);
    tx.initial_sync(config.as_bytes(), &mut |p| {
        if p.round == 1 {
            guest_pages = p.round_pages;
        }
        status.initial_progress(p.total_pages, guest_pages, p.round);
    })
    .map_err(|e| format!("initial sync: {e}"))?;
    status.initial_done();
    if triggers.stopped() {
        return Ok(());
    }
    let mut hook = CountHook {
        limit: None,
        hold: false,
    };
    tx.protect(triggers, &mut hook)
        .map(|_| ())
        .map_err(|e| format!("checkpoint failed: {e}"))
}

#[allow(clippy::too_many_arguments)]
fn run_secondary(
    xen: &MemXen,
    name: &str,
    listener: TcpListener,
    spool: &Path,
    status: &StatusWriter,
    failover: &AtomicBool,
    stop: &AtomicBool,
    slot: &Mutex<Option<TcpStream>>,
) -> Result<GuestState, String> {
    let started = Instant::now();
    let stream = loop {
        if stop.load(Ordering::SeqCst) {
            return Ok(GuestState::Stopped);
        }
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if started.elapsed() > Duration::from_secs(600) {
                    return Err("the primary did not connect within 600 s".into());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(format!("accepting the primary: {e}")),
        }
    };
    stream.set_nonblocking(false).map_err(|e| e.to_string())?;
    if let Ok(c) = stream.try_clone() {
        *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(c);
    }
    status.state(GuestState::InitialSync);
    let builder = MemReplicaBuilder::new(xen.clone());
    let obs = status.clone();
    let rx = Receiver::new(
        xen,
        &builder,
        ReceiverOptions {
            spool_dir: spool.to_path_buf(),
            name: Some(name.to_string()),
            limits: kemari_stream::Limits::default(),
            idle_timeout: Some(Duration::from_secs(60)),
        },
    )
    .with_observer(Box::new(move |s| {
        if let Some(d) = s.replica {
            obs.domid(u32::from(d));
        }
        obs.applied(s.checkpoints, s.acked, s.pages);
    }));
    let (session, error) = match rx.serve(stream) {
        Ok(s) => (s, None),
        Err(f) => (*f.session, Some(f.error.to_string())),
    };
    let forced = failover.load(Ordering::SeqCst);
    let stopped = stop.load(Ordering::SeqCst);
    match (session.replica, session.acked) {
        // a clean end, or our own stop: protection over, the replica is dropped by the daemon
        (_, _) if stopped => Ok(GuestState::Stopped),
        (_, _) if error.is_none() && !forced => Ok(GuestState::Stopped),
        (Some(replica), Some(seq)) => {
            // no heartbeat in memory: a lost stream is a dead primary
            status.state(GuestState::FailingOver);
            let staged = read_staged(&rx.staged_path())
                .map_err(|e| format!("reading the staged state: {e}"))?;
            crate::failover::resume::resume_in_place(xen, replica, &staged)
                .map_err(|e| format!("failover of replica {replica} at checkpoint {seq}: {e}"))?;
            log::warn!("guest {name} runs here as domain {replica} from checkpoint {seq}");
            status.failed_over(Some(u32::from(replica)), Some(staged.seq));
            Ok(GuestState::FailedOver)
        }
        _ => Err(format!(
            "the stream ended before the initial sync completed ({}): no replica to fail over to",
            error.unwrap_or_else(|| "failover asked".into())
        )),
    }
}
