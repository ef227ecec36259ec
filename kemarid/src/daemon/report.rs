//! What a worker tells the daemon: a status snapshot ([`WorkerReport`]) that the worker rewrites
//! atomically (`status.json` in the guest's state folder, at most 5 times a second) and the
//! daemon reads. Counters are cumulative since the worker started, so a restarted daemon loses
//! nothing and several readers agree.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::api::{GuestState, Quantiles, Role};
use crate::sync::sender::CheckpointSample;

/// Upper bounds (ms) of the histogram buckets of pause time, checkpoint latency and ACK wait
/// (a last bucket, +Inf, is implicit).
pub const BUCKETS_MS: [f64; 14] = [
    0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0,
];

/// Samples kept for the quantiles in the status.
const RECENT: usize = 1024;

/// How often a changed report is written at most.
const WRITE_EVERY: Duration = Duration::from_millis(200);

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// Writing the status file failed.
    #[error("writing worker status {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Reading the status file failed.
    #[error("reading worker status {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// SIGUSR2 could not be set up.
    #[error("setting up SIGUSR2 (the daemon's requests): {0}")]
    Signal(String),
    /// The status file is not a report.
    #[error("worker status {path} is malformed: {source}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
}

/// Now as Unix time (s).
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// A histogram with the [`BUCKETS_MS`] bounds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    /// Observations per bucket (not cumulative), `BUCKETS_MS.len() + 1` entries (the last is
    /// +Inf).
    pub counts: Vec<u64>,
    /// Sum of the observations (ms).
    pub sum_ms: f64,
    /// Number of observations.
    pub count: u64,
}

impl Histogram {
    /// Adds one observation.
    pub fn observe(&mut self, ms: f64) {
        if self.counts.len() != BUCKETS_MS.len() + 1 {
            self.counts.resize(BUCKETS_MS.len() + 1, 0);
        }
        let i = BUCKETS_MS
            .iter()
            .position(|b| ms <= *b)
            .unwrap_or(BUCKETS_MS.len());
        if let Some(c) = self.counts.get_mut(i) {
            *c += 1;
        }
        self.sum_ms += ms;
        self.count += 1;
    }

    /// Cumulative counts per bucket bound (`le`), +Inf last, as Prometheus wants them.
    pub fn cumulative(&self) -> Vec<(Option<f64>, u64)> {
        let mut acc = 0;
        (0..=BUCKETS_MS.len())
            .map(|i| {
                acc += self.counts.get(i).copied().unwrap_or(0);
                (BUCKETS_MS.get(i).copied(), acc)
            })
            .collect()
    }
}

/// Initial copy progress.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InitialReport {
    /// Pages sent (all rounds).
    pub pages: u64,
    /// Pages of the guest.
    pub total: u64,
    /// Live round.
    pub round: u32,
    /// Pages per second.
    pub rate_pages_per_s: f64,
    /// When the copy started (Unix s).
    pub started: f64,
    /// The image was acknowledged.
    pub done: bool,
}

/// The heartbeat as the worker sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatReport {
    /// Period (ms).
    pub period_ms: u64,
    /// Misses before the peer is dead.
    pub misses_allowed: u32,
    /// `alive`, `dead` or `unknown`.
    pub peer: String,
}

/// Where a failover put the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverReport {
    /// The running guest's domain id.
    pub domid: Option<u32>,
    /// The checkpoint it resumed from.
    pub seq: Option<u64>,
}

/// A worker's status snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerReport {
    /// The worker's process id.
    pub pid: u32,
    /// Its role.
    pub role: Role,
    /// Where protection stands.
    pub state: GuestState,
    /// When this snapshot was taken (Unix s).
    pub updated: f64,
    /// The guest's (primary) or replica's (secondary) domain id.
    pub domid: Option<u32>,
    /// The initial copy.
    pub initial: Option<InitialReport>,
    /// Checkpoints acknowledged / applied.
    pub checkpoints: u64,
    /// Last acknowledged sequence number.
    pub last_acked_seq: Option<u64>,
    /// When it was acknowledged (Unix s).
    pub last_ack: Option<f64>,
    /// Checkpoint bytes sent.
    pub bytes: u64,
    /// Dirty pages carried by all checkpoints.
    pub pages: u64,
    /// Guest pause per checkpoint.
    pub pause: Histogram,
    /// Start of a checkpoint to its ACK.
    pub latency: Histogram,
    /// Last byte sent to the ACK.
    pub ack_wait: Histogram,
    /// Quantiles of the pause over the last 1024 checkpoints.
    pub pause_q: Quantiles,
    /// Quantiles of the latency over the last 1024 checkpoints.
    pub latency_q: Quantiles,
    /// The heartbeat, when on.
    pub heartbeat: Option<HeartbeatReport>,
    /// Times the peer was declared dead by the heartbeat.
    pub heartbeat_deaths: u64,
    /// The failover, once done.
    pub failover: Option<FailoverReport>,
    /// Why protection failed.
    pub error: Option<String>,
}

impl WorkerReport {
    /// A fresh report.
    pub fn new(pid: u32, role: Role) -> WorkerReport {
        WorkerReport {
            pid,
            role,
            state: GuestState::Starting,
            updated: unix_now(),
            domid: None,
            initial: None,
            checkpoints: 0,
            last_acked_seq: None,
            last_ack: None,
            bytes: 0,
            pages: 0,
            pause: Histogram::default(),
            latency: Histogram::default(),
            ack_wait: Histogram::default(),
            pause_q: Quantiles::default(),
            latency_q: Quantiles::default(),
            heartbeat: None,
            heartbeat_deaths: 0,
            failover: None,
            error: None,
        }
    }

    /// Reads a report file; `None` if it does not exist (yet).
    pub fn read(path: &Path) -> Result<Option<WorkerReport>, ReportError> {
        let data = match std::fs::read(path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(ReportError::Read {
                    path: path.into(),
                    source,
                })
            }
        };
        serde_json::from_slice(&data)
            .map(Some)
            .map_err(|source| ReportError::Malformed {
                path: path.into(),
                source,
            })
    }
}

fn quantiles(samples: &std::collections::VecDeque<f64>) -> Quantiles {
    if samples.is_empty() {
        return Quantiles::default();
    }
    let mut v: Vec<f64> = samples.iter().copied().collect();
    v.sort_by(f64::total_cmp);
    let at = |p: f64| {
        let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
        v.get(rank.clamp(1, v.len()) - 1).copied().unwrap_or(0.0)
    };
    Quantiles {
        p50: at(50.0),
        p99: at(99.0),
        max: v.last().copied().unwrap_or(0.0),
    }
}

struct Inner {
    path: Option<PathBuf>,
    report: WorkerReport,
    recent_pause: std::collections::VecDeque<f64>,
    recent_latency: std::collections::VecDeque<f64>,
    dirty: bool,
    last_write: Option<Instant>,
    write_failed: bool,
}

impl Inner {
    fn flush(&mut self) {
        let Some(path) = &self.path else {
            self.dirty = false;
            return;
        };
        self.report.updated = unix_now();
        match write_atomic(path, &self.report) {
            Ok(()) => {
                self.dirty = false;
                self.write_failed = false;
            }
            Err(e) => {
                // once per failure streak, not at every checkpoint
                if !self.write_failed {
                    log::warn!("{e}");
                }
                self.write_failed = true;
            }
        }
        self.last_write = Some(Instant::now());
    }
}

fn write_atomic(path: &Path, report: &WorkerReport) -> Result<(), ReportError> {
    let err = |source| ReportError::Write {
        path: path.into(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let data = serde_json::to_vec(report).map_err(|e| err(std::io::Error::other(e)))?;
    std::fs::write(&tmp, data).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// The worker's side: keeps the report and writes it (a no-op writer without a path). Cheap to
/// clone; every clone updates the same report. A background thread writes changes that the
/// rate limit held back.
#[derive(Clone)]
pub struct StatusWriter {
    inner: Arc<Mutex<Inner>>,
}

impl std::fmt::Debug for StatusWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusWriter").finish_non_exhaustive()
    }
}

impl StatusWriter {
    /// A writer for `path` (none: updates are kept in memory only), writing the first report at
    /// once.
    pub fn new(path: Option<&Path>, role: Role) -> Result<StatusWriter, ReportError> {
        let mut inner = Inner {
            path: path.map(Path::to_path_buf),
            report: WorkerReport::new(std::process::id(), role),
            recent_pause: Default::default(),
            recent_latency: Default::default(),
            dirty: true,
            last_write: None,
            write_failed: false,
        };
        if let Some(p) = path {
            inner.report.updated = unix_now();
            write_atomic(p, &inner.report)?;
            inner.dirty = false;
        }
        let w = StatusWriter {
            inner: Arc::new(Mutex::new(inner)),
        };
        if path.is_some() {
            let weak: Weak<Mutex<Inner>> = Arc::downgrade(&w.inner);
            std::thread::Builder::new()
                .name("status".into())
                .spawn(move || loop {
                    std::thread::sleep(WRITE_EVERY);
                    let Some(inner) = weak.upgrade() else { break };
                    let mut g = inner.lock().unwrap_or_else(PoisonError::into_inner);
                    if g.dirty {
                        g.flush();
                    }
                })
                .map_err(|source| ReportError::Write {
                    path: path.map(Path::to_path_buf).unwrap_or_default(),
                    source,
                })?;
        }
        Ok(w)
    }

    /// Changes the report; written now if the last write is older than 200 ms (or `now`).
    fn update(&self, now: bool, f: impl FnOnce(&mut WorkerReport)) {
        let mut g = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut g.report);
        g.dirty = true;
        if now || g.last_write.map_or(true, |t| t.elapsed() >= WRITE_EVERY) {
            g.flush();
        }
    }

    /// A copy of the current report.
    pub fn snapshot(&self) -> WorkerReport {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .report
            .clone()
    }

    /// The guest's (or replica's) domain id.
    pub fn domid(&self, domid: u32) {
        self.update(false, |r| r.domid = Some(domid));
    }

    /// A state change (written at once).
    pub fn state(&self, state: GuestState) {
        self.update(true, |r| r.state = state);
    }

    /// The end: final state and, for a failure, why (written at once).
    pub fn finish(&self, state: GuestState, error: Option<String>) {
        self.update(true, |r| {
            r.state = state;
            if error.is_some() {
                r.error = error;
            }
        });
    }

    /// Initial copy progress: pages sent so far, the guest's pages, the live round.
    pub fn initial_progress(&self, pages: u64, total: u64, round: u32) {
        self.update(false, |r| {
            let now = unix_now();
            r.state = GuestState::InitialSync;
            let i = r.initial.get_or_insert_with(|| InitialReport {
                started: now,
                ..InitialReport::default()
            });
            i.pages = pages;
            i.total = total.max(i.total);
            i.round = round;
            let secs = now - i.started;
            i.rate_pages_per_s = if secs > 0.0 { pages as f64 / secs } else { 0.0 };
        });
    }

    /// The initial image was acknowledged (checkpoint 0): protected from now on.
    pub fn initial_done(&self) {
        self.update(true, |r| {
            let now = unix_now();
            let i = r.initial.get_or_insert_with(|| InitialReport {
                started: now,
                ..InitialReport::default()
            });
            i.done = true;
            r.state = GuestState::Protected;
            r.last_acked_seq = Some(0);
            r.last_ack = Some(now);
        });
    }

    /// One acknowledged checkpoint (primary).
    pub fn checkpoint(&self, s: &CheckpointSample) {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let mut g = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let (pause, latency) = (ms(s.pause), ms(s.latency));
        let inner = &mut *g;
        for (q, v) in [
            (&mut inner.recent_pause, pause),
            (&mut inner.recent_latency, latency),
        ] {
            if q.len() == RECENT {
                q.pop_front();
            }
            q.push_back(v);
        }
        let (pq, lq) = (quantiles(&g.recent_pause), quantiles(&g.recent_latency));
        drop(g);
        self.update(false, |r| {
            r.checkpoints += 1;
            r.last_acked_seq = Some(s.seq);
            r.last_ack = Some(unix_now());
            r.bytes += s.bytes;
            r.pages += s.pages;
            r.pause.observe(pause);
            r.latency.observe(latency);
            r.ack_wait.observe(ms(s.ack_wait));
            r.pause_q = pq;
            r.latency_q = lq;
        });
    }

    /// Checkpoints applied so far (secondary): the receiver's counters.
    pub fn applied(&self, checkpoints: u64, last_acked_seq: Option<u64>, pages: u64) {
        self.update(false, |r| {
            if r.last_acked_seq != last_acked_seq {
                r.last_ack = Some(unix_now());
            }
            r.checkpoints = checkpoints;
            r.last_acked_seq = last_acked_seq;
            r.pages = pages;
            if last_acked_seq.is_some() && r.state == GuestState::InitialSync {
                r.state = GuestState::Protected;
                if let Some(i) = r.initial.as_mut() {
                    i.done = true;
                }
            }
        });
    }

    /// The heartbeat's configuration and the peer's state (`alive`, `dead`, `unknown`).
    pub fn heartbeat(&self, period_ms: u64, misses_allowed: u32, peer: &str) {
        self.update(true, |r| {
            if peer == "dead" && r.heartbeat.as_ref().map(|h| h.peer.as_str()) != Some("dead") {
                r.heartbeat_deaths += 1;
            }
            r.heartbeat = Some(HeartbeatReport {
                period_ms,
                misses_allowed,
                peer: peer.into(),
            });
        });
    }

    /// A failover put the guest on this host.
    pub fn failed_over(&self, domid: Option<u32>, seq: Option<u64>) {
        self.update(true, |r| {
            r.state = GuestState::FailedOver;
            r.failover = Some(FailoverReport { domid, seq });
            if let Some(d) = domid {
                r.domid = Some(d);
            }
        });
    }
}

impl StatusWriter {
    /// Initial copy progress from the sender's callback (`round_pages` of round 1 is the
    /// guest's size; `total_pages` is the pages sent so far).
    pub fn initial_round(&self, round: u32, round_pages: u64, total_pages: u64) {
        let total = if round == 1 {
            round_pages
        } else {
            self.snapshot().initial.map_or(round_pages, |i| i.total)
        };
        self.initial_progress(total_pages, total, round);
    }

    /// The sender's per-checkpoint observer feeding this writer.
    pub fn observer(&self) -> crate::sync::sender::CheckpointObserver<'static> {
        let w = self.clone();
        Box::new(move |s| w.checkpoint(s))
    }

    /// The receiver's session observer feeding this writer.
    pub fn session_observer(&self) -> crate::sync::receiver::SessionObserver<'static> {
        let w = self.clone();
        Box::new(move |s| {
            if let Some(d) = s.replica {
                w.domid(u32::from(d));
            }
            w.applied(s.checkpoints, s.acked, s.pages);
        })
    }
}

/// A worker that fails before it could say why marks its report failed with the error (no-op
/// when the report is missing or already final).
pub fn mark_failed(path: &Path, error: &str) {
    if let Ok(Some(mut r)) = WorkerReport::read(path) {
        if !r.state.is_final() {
            r.state = GuestState::Failed;
            r.error = Some(error.to_string());
            r.updated = unix_now();
            if let Err(e) = write_atomic(path, &r) {
                log::warn!("{e}");
            }
        }
    }
}

/// SIGUSR2, the daemon's request to a worker (primary: checkpoint now; secondary: fail over
/// now), blocked in the calling thread by [`DaemonSignal::block`] (call it before any thread
/// starts, so that every thread inherits the mask) and taken by one thread.
#[derive(Debug)]
pub struct DaemonSignal {
    set: nix::sys::signal::SigSet,
}

impl DaemonSignal {
    /// Blocks SIGUSR2 in this thread (and the threads it starts later).
    pub fn block() -> Result<DaemonSignal, ReportError> {
        let mut set = nix::sys::signal::SigSet::empty();
        set.add(nix::sys::signal::Signal::SIGUSR2);
        set.thread_block()
            .map_err(|e| ReportError::Signal(e.to_string()))?;
        Ok(DaemonSignal { set })
    }

    /// Calls `f` for every SIGUSR2, from a thread of its own.
    pub fn on_signal(self, f: impl Fn() + Send + 'static) -> Result<(), ReportError> {
        std::thread::Builder::new()
            .name("sigusr2".into())
            .spawn(move || {
                while self.set.wait().is_ok() {
                    f();
                }
            })
            .map(|_| ())
            .map_err(|e| ReportError::Signal(e.to_string()))
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if self.dirty {
            self.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_and_cumulative_counts() {
        let mut h = Histogram::default();
        for ms in [0.1, 0.5, 0.7, 3.0, 20000.0] {
            h.observe(ms);
        }
        assert_eq!(h.count, 5);
        let c = h.cumulative();
        assert_eq!(c.len(), BUCKETS_MS.len() + 1);
        assert_eq!(c[0], (Some(0.5), 2)); // 0.1 and 0.5 (le)
        assert_eq!(c[1], (Some(1.0), 3));
        assert_eq!(c[3], (Some(5.0), 4));
        assert_eq!(c[BUCKETS_MS.len()], (None, 5));
        assert!((h.sum_ms - 20004.3).abs() < 1e-6);
    }

    #[test]
    fn writer_writes_atomically_and_counts() {
        let dir = std::env::temp_dir().join(format!("kemari-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("status.json");
        let w = StatusWriter::new(Some(&path), Role::Primary).unwrap();
        let r = WorkerReport::read(&path).unwrap().unwrap();
        assert_eq!(r.state, GuestState::Starting);
        assert_eq!(r.pid, std::process::id());
        w.initial_progress(50, 100, 1);
        w.initial_done();
        for seq in 1..=100u64 {
            w.checkpoint(&CheckpointSample {
                seq,
                pause: Duration::from_millis(seq),
                latency: Duration::from_millis(2 * seq),
                ack_wait: Duration::from_millis(1),
                pages: 10,
                bytes: 1000,
            });
        }
        w.heartbeat(100, 5, "alive");
        w.heartbeat(100, 5, "dead");
        w.heartbeat(100, 5, "dead");
        w.finish(GuestState::Failed, Some("secondary lost".into()));
        let r = WorkerReport::read(&path).unwrap().unwrap();
        assert_eq!(r.state, GuestState::Failed);
        assert_eq!(r.checkpoints, 100);
        assert_eq!(r.last_acked_seq, Some(100));
        assert_eq!(r.bytes, 100_000);
        assert_eq!(r.pages, 1000);
        assert_eq!(r.pause.count, 100);
        assert_eq!(r.pause_q.p50, 50.0);
        assert_eq!(r.pause_q.p99, 99.0);
        assert_eq!(r.latency_q.max, 200.0);
        assert_eq!(r.heartbeat_deaths, 1);
        assert!(r.initial.unwrap().done);
        assert_eq!(r.error.as_deref(), Some("secondary lost"));
        assert!(!dir.join("status.json.tmp").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn malformed_report_is_an_error_and_missing_is_none() {
        let dir = std::env::temp_dir().join(format!("kemari-report-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("status.json");
        assert!(WorkerReport::read(&path).unwrap().is_none());
        std::fs::write(&path, b"{\"pid\":").unwrap();
        assert!(matches!(
            WorkerReport::read(&path),
            Err(ReportError::Malformed { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
