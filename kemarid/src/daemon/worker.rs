//! Workers: what protects one guest. On a dom0 a worker is a `kemari replicate` (primary) or
//! `kemari receive` (secondary) process the daemon starts and supervises ([`XenBackend`]); in
//! the in-memory mode a thread of the daemon ([`super::mem`]). Both report through the same
//! status file ([`super::report`]).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use super::config::Resolved;
use super::report::{ReportError, WorkerReport};
use crate::api::{ApiError, ErrorCode, Role};

/// Requests a worker takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    /// Primary: take a checkpoint now (SIGUSR2).
    Checkpoint,
    /// Secondary: fail over now (SIGUSR2).
    Failover,
    /// End protection (SIGTERM).
    Stop,
}

/// One running worker.
pub trait Worker: Send {
    /// Its process id (none for the in-memory threads).
    fn pid(&self) -> Option<u32>;
    /// Passes a request on.
    fn ask(&self, what: Ask) -> Result<(), String>;
    /// `Some(exit status)` once it ended (the inner `None`: killed by a signal or unknown).
    fn try_exit(&mut self) -> Option<Option<i32>>;
}

/// What a worker is started with.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    /// Guest name.
    pub dom: String,
    /// Domain id (primary).
    pub domid: Option<u32>,
    /// The guest's state folder (status file, log).
    pub dir: PathBuf,
    /// Options.
    pub opts: Resolved,
    /// Primary: the receiving worker's data address (`HOST:PORT`).
    pub target: Option<String>,
    /// Heartbeat UDP port (primary: the peer's; secondary: ours).
    pub heartbeat_port: u16,
    /// Secondary: the address to listen on (`ADDR:PORT`).
    pub listen: Option<String>,
    /// Secondary: the spool folder.
    pub spool: Option<PathBuf>,
}

impl WorkerSpec {
    /// The status file.
    pub fn status_file(&self) -> PathBuf {
        self.dir.join(STATUS_FILE)
    }
}

/// The worker's status file in the guest's folder.
pub const STATUS_FILE: &str = "status.json";
/// The daemon's record of the guest.
pub const RECORD_FILE: &str = "guest.json";
/// The worker's output.
pub const LOG_FILE: &str = "worker.log";

/// The daemon's record of one guest (`guest.json`), what a restarted daemon adopts from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestRecord {
    /// Guest name.
    pub dom: String,
    /// Role of this host.
    pub role: Role,
    /// The other host.
    pub peer: String,
    /// The peer's kemarid (`HOST:PORT`), primary only.
    pub peer_daemon: Option<String>,
    /// Options.
    pub opts: Resolved,
    /// The worker's pid (none: in-memory).
    pub pid: Option<u32>,
    /// Domain id when started.
    pub domid: Option<u32>,
    /// Secondary: the data/heartbeat port.
    pub data_port: Option<u16>,
    /// When protection was started (Unix s).
    pub started: f64,
}

impl GuestRecord {
    /// Writes `dir/guest.json` (atomically).
    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        let path = dir.join(RECORD_FILE);
        let tmp = dir.join(format!("{RECORD_FILE}.tmp"));
        let data = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, data)?;
        std::fs::rename(&tmp, path)
    }

    /// Reads `dir/guest.json`.
    pub fn load(dir: &Path) -> Result<GuestRecord, ReportError> {
        let path = dir.join(RECORD_FILE);
        let data = std::fs::read(&path).map_err(|source| ReportError::Read {
            path: path.clone(),
            source,
        })?;
        serde_json::from_slice(&data).map_err(|source| ReportError::Malformed { path, source })
    }
}

/// How guests are found and workers started: the real Xen or the in-memory one.
pub trait Backend: Send + Sync {
    /// `xen` or `mem`.
    fn mode(&self) -> &'static str;
    /// Resolves a domain of this host by name or id: `(domid, name)`.
    fn resolve(&self, dom: &str) -> Result<(u32, String), ApiError>;
    /// Starts the replicating worker.
    fn start_primary(&self, spec: &WorkerSpec) -> Result<Box<dyn Worker>, ApiError>;
    /// Starts the receiving worker; also returns the port it listens on (TCP data and UDP
    /// heartbeat).
    fn start_secondary(&self, spec: &WorkerSpec) -> Result<(Box<dyn Worker>, u16), ApiError>;
    /// A worker of a previous daemon, if it still runs.
    fn adopt(&self, rec: &GuestRecord, dir: &Path) -> Option<Box<dyn Worker>>;
    /// Destroys a replica the secondary no longer needs.
    fn destroy_replica(&self, domid: u32) -> Result<(), String>;
}

/// A worker process.
pub struct ProcessWorker {
    pid: u32,
    /// Our child (none for an adopted worker: its exit status is not ours to collect).
    child: Option<Child>,
    /// Adopted: the status file that identifies the process as this guest's worker.
    marker: Option<String>,
}

impl ProcessWorker {
    /// The worker of a previous daemon: process `pid`, recognised while its command line holds
    /// `status_file` (so a recycled pid is not mistaken for it); `None` if it is not running.
    pub fn adopt(pid: u32, status_file: &Path) -> Option<ProcessWorker> {
        let w = ProcessWorker {
            pid,
            child: None,
            marker: Some(status_file.display().to_string()),
        };
        w.alive_adopted().then_some(w)
    }

    fn alive_adopted(&self) -> bool {
        // /proc/PID/cmdline still names this guest's status file: the same worker (not a
        // recycled pid)
        let Some(marker) = &self.marker else {
            return false;
        };
        std::fs::read(format!("/proc/{}/cmdline", self.pid))
            .map(|c| {
                String::from_utf8_lossy(&c)
                    .split('\0')
                    .any(|a| a == marker.as_str())
            })
            .unwrap_or(false)
    }
}

impl Worker for ProcessWorker {
    fn pid(&self) -> Option<u32> {
        Some(self.pid)
    }

    fn ask(&self, what: Ask) -> Result<(), String> {
        let sig = match what {
            Ask::Checkpoint | Ask::Failover => Signal::SIGUSR2,
            Ask::Stop => Signal::SIGTERM,
        };
        let pid = i32::try_from(self.pid).map_err(|_| format!("pid {} out of range", self.pid))?;
        kill(Pid::from_raw(pid), sig).map_err(|e| format!("signalling worker {}: {e}", self.pid))
    }

    fn try_exit(&mut self) -> Option<Option<i32>> {
        match &mut self.child {
            Some(c) => match c.try_wait() {
                Ok(Some(status)) => Some(status.code()),
                Ok(None) => None,
                Err(e) => {
                    log::warn!("waiting for worker {}: {e}", self.pid);
                    Some(None)
                }
            },
            None => (!self.alive_adopted()).then_some(None),
        }
    }
}

/// The dom0 backend: domains through libxenctrl/xenstore, workers are `kemari` processes.
pub struct XenBackend {
    host: hypervisor::xen::XenHost,
    kemari: PathBuf,
}

impl XenBackend {
    /// Opens this host's Xen; `kemari` is the binary the workers run.
    pub fn open(kemari: PathBuf) -> Result<XenBackend, hypervisor::xen::XenOpenError> {
        let host = hypervisor::xen::XenHost::open()?;
        Ok(XenBackend { host, kemari })
    }

    fn spawn(&self, spec: &WorkerSpec, args: Vec<String>) -> Result<Box<dyn Worker>, ApiError> {
        let internal = |what: String| {
            ApiError::new(
                ErrorCode::Internal,
                format!("guest {}: {what}", spec.dom),
                format!("see {}", spec.dir.join(LOG_FILE).display()),
            )
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(spec.dir.join(LOG_FILE))
            .map_err(|e| internal(format!("cannot open the worker log: {e}")))?;
        let log2 = log
            .try_clone()
            .map_err(|e| internal(format!("cannot clone the worker log: {e}")))?;
        let mut cmd = Command::new(&self.kemari);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            );
        // its own process group: a Ctrl-C at kemarid's terminal or the end of kemarid's
        // session does not reach it
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut line = std::fs::OpenOptions::new()
            .append(true)
            .open(spec.dir.join(LOG_FILE))
            .ok();
        if let Some(l) = line.as_mut() {
            let _ = writeln!(l, "kemarid: {} {}", self.kemari.display(), args.join(" "));
        }
        let child = cmd.spawn().map_err(|e| {
            internal(format!(
                "cannot start the worker {}: {e}",
                self.kemari.display()
            ))
        })?;
        Ok(Box::new(ProcessWorker {
            pid: child.id(),
            child: Some(child),
            marker: None,
        }))
    }
}

fn common_args(spec: &WorkerSpec) -> Vec<String> {
    vec![
        "--heartbeat-ms".into(),
        spec.opts.heartbeat_ms.to_string(),
        "--heartbeat-misses".into(),
        spec.opts.heartbeat_misses.to_string(),
        "--status-file".into(),
        spec.status_file().display().to_string(),
    ]
}

/// The `kemari replicate` arguments of a primary worker.
pub fn primary_args(spec: &WorkerSpec) -> Vec<String> {
    let mut a = vec![
        "--json".into(),
        "replicate".into(),
        spec.domid
            .map_or_else(|| spec.dom.clone(), |d| d.to_string()),
        spec.target.clone().unwrap_or_default(),
        "--interval-ms".into(),
        spec.opts.interval_ms.to_string(),
        "--heartbeat-port".into(),
        spec.heartbeat_port.to_string(),
    ];
    if spec.opts.min_run_ms > 0 {
        a.extend(["--min-run-ms".into(), spec.opts.min_run_ms.to_string()]);
    }
    if spec.opts.suspend {
        a.push("--suspend".into());
        a.extend([
            "--suspend-timeout-s".into(),
            spec.opts.suspend_timeout_s.to_string(),
        ]);
    }
    if let Some(d) = &spec.opts.disk {
        a.extend(["--disk".into(), d.display().to_string()]);
        a.extend(["--vdev".into(), spec.opts.vdev.clone()]);
    }
    if spec.opts.unpause {
        a.push("--unpause".into());
    }
    a.extend(common_args(spec));
    a
}

/// The `kemari receive` arguments of a secondary worker.
pub fn secondary_args(spec: &WorkerSpec) -> Vec<String> {
    let listen = spec.listen.clone().unwrap_or_default();
    let host = listen
        .rsplit_once(':')
        .map_or(listen.as_str(), |(h, _)| h)
        .to_string();
    let mut a = vec![
        "--json".into(),
        "receive".into(),
        "--listen".into(),
        listen,
        "--spool-dir".into(),
        spec.spool
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        "--once".into(),
        "--name".into(),
        spec.dom.clone(),
        "--heartbeat-listen".into(),
        format!("{host}:{}", spec.heartbeat_port),
        "--failover".into(),
    ];
    if let Some(d) = &spec.opts.disk_copy {
        a.extend(["--disk".into(), d.display().to_string()]);
        a.extend(["--vdev".into(), spec.opts.vdev.clone()]);
    }
    if let Some(v) = &spec.opts.vif {
        a.extend(["--vif".into(), v.clone()]);
    }
    a.extend(common_args(spec));
    a
}

impl Backend for XenBackend {
    fn mode(&self) -> &'static str {
        "xen"
    }

    fn resolve(&self, dom: &str) -> Result<(u32, String), ApiError> {
        use hypervisor::Hypervisor;
        let hv: &dyn Hypervisor = &self.host;
        let domid = crate::debug::resolve_domain(hv, dom).map_err(|e| {
            ApiError::new(
                ErrorCode::UnknownDomain,
                format!("no domain {dom:?} on this host: {e}"),
                "check the name or id with `xl list`",
            )
        })?;
        if domid == 0 {
            return Err(ApiError::new(
                ErrorCode::UnknownDomain,
                "domain 0 (dom0) cannot be protected",
                "give a guest's name or id (`xl list`)",
            ));
        }
        let name = hv
            .open_xenstore()
            .ok()
            .and_then(|xs| {
                xs.read(hypervisor::Tx::NONE, &format!("/local/domain/{domid}/name"))
                    .ok()
            })
            .map(|v| String::from_utf8_lossy(&v).trim().to_string())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| dom.to_string());
        Ok((u32::from(domid), name))
    }

    fn start_primary(&self, spec: &WorkerSpec) -> Result<Box<dyn Worker>, ApiError> {
        self.spawn(spec, primary_args(spec))
    }

    fn start_secondary(&self, spec: &WorkerSpec) -> Result<(Box<dyn Worker>, u16), ApiError> {
        let mut w = self.spawn(spec, secondary_args(spec))?;
        // the primary's worker connects as soon as we answer: wait until this one listens
        // (lab run 20261201-041807: "Connection refused" otherwise)
        let port = spec.heartbeat_port;
        let t0 = std::time::Instant::now();
        while !tcp_listening(port) {
            if let Some(code) = w.try_exit() {
                return Err(ApiError::new(
                    ErrorCode::Internal,
                    format!(
                        "guest {}: the receiving worker ended before it listened on port {port} ({})",
                        spec.dom,
                        code.map_or("killed".into(), |c| format!("status {c}"))
                    ),
                    format!("see {}", spec.dir.join(LOG_FILE).display()),
                ));
            }
            if t0.elapsed() > std::time::Duration::from_secs(30) {
                let _ = w.ask(Ask::Stop);
                return Err(ApiError::new(
                    ErrorCode::Internal,
                    format!(
                        "guest {}: the receiving worker does not listen on port {port} after 30 s",
                        spec.dom
                    ),
                    format!("see {}", spec.dir.join(LOG_FILE).display()),
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Ok((w, port))
    }

    fn adopt(&self, rec: &GuestRecord, dir: &Path) -> Option<Box<dyn Worker>> {
        ProcessWorker::adopt(rec.pid?, &dir.join(STATUS_FILE))
            .map(|w| Box::new(w) as Box<dyn Worker>)
    }

    fn destroy_replica(&self, domid: u32) -> Result<(), String> {
        let d = hypervisor::DomId::try_from(domid)
            .map_err(|_| format!("domain id {domid} out of range"))?;
        crate::xltool::XlTool::default()
            .destroy(d)
            .map_err(|e| format!("xl destroy {domid}: {e}"))
    }
}

/// Whether something on this host listens on TCP `port` (any address), from /proc/net/tcp and
/// tcp6 (state 0A = LISTEN), without connecting (a `receive --once` worker serves one
/// connection).
pub fn tcp_listening(port: u16) -> bool {
    let want = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
        std::fs::read_to_string(f).is_ok_and(|t| {
            t.lines().skip(1).any(|l| {
                let mut cols = l.split_whitespace();
                let local = cols.nth(1).unwrap_or("");
                let state = cols.nth(1).unwrap_or("");
                local.ends_with(&want) && state == "0A"
            })
        })
    })
}

/// The status a worker last wrote, if readable.
pub fn read_report(dir: &Path) -> Option<WorkerReport> {
    match WorkerReport::read(&dir.join(STATUS_FILE)) {
        Ok(r) => r,
        Err(e) => {
            log::debug!("{e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> WorkerSpec {
        WorkerSpec {
            dom: "web1".into(),
            domid: Some(7),
            dir: PathBuf::from("/run/kemari/guests/web1"),
            opts: Resolved {
                interval_ms: 50,
                min_run_ms: 30,
                suspend: true,
                suspend_timeout_s: 120,
                disk: Some("/srv/web1.img".into()),
                disk_copy: Some("/srv/web1-copy.img".into()),
                vdev: "xvda".into(),
                vif: Some("mac=00:16:3e:00:00:01".into()),
                unpause: true,
                heartbeat_ms: 100,
                heartbeat_misses: 5,
            },
            target: Some("host2:7210".into()),
            heartbeat_port: 7210,
            listen: Some("0.0.0.0:7210".into()),
            spool: Some("/var/lib/kemari/spool/web1".into()),
        }
    }

    #[test]
    fn worker_command_lines() {
        let a = primary_args(&spec()).join(" ");
        assert_eq!(
            a,
            "--json replicate 7 host2:7210 --interval-ms 50 --heartbeat-port 7210 --min-run-ms 30 --suspend --suspend-timeout-s 120 --disk /srv/web1.img --vdev xvda --unpause --heartbeat-ms 100 --heartbeat-misses 5 --status-file /run/kemari/guests/web1/status.json"
        );
        let a = secondary_args(&spec()).join(" ");
        assert_eq!(
            a,
            "--json receive --listen 0.0.0.0:7210 --spool-dir /var/lib/kemari/spool/web1 --once --name web1 --heartbeat-listen 0.0.0.0:7210 --failover --disk /srv/web1-copy.img --vdev xvda --vif mac=00:16:3e:00:00:01 --heartbeat-ms 100 --heartbeat-misses 5 --status-file /run/kemari/guests/web1/status.json"
        );
    }

    #[test]
    fn listening_ports_are_seen_without_connecting() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(tcp_listening(port));
        drop(l);
        assert!(!tcp_listening(port));
    }

    #[test]
    fn record_round_trips() {
        let dir = std::env::temp_dir().join(format!("kemari-rec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let rec = GuestRecord {
            dom: "g".into(),
            role: Role::Secondary,
            peer: "host1".into(),
            peer_daemon: None,
            opts: spec().opts,
            pid: Some(1),
            domid: None,
            data_port: Some(7210),
            started: 3.0,
        };
        rec.save(&dir).unwrap();
        assert_eq!(GuestRecord::load(&dir).unwrap(), rec);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn adopted_worker_is_recognised_by_its_command_line() {
        // this test process is not a worker of guest "x": not adopted
        let w = ProcessWorker {
            pid: std::process::id(),
            child: None,
            marker: Some("/run/kemari/guests/x/status.json".into()),
        };
        assert!(!w.alive_adopted());
        // a process whose command line holds the marker is, until it ends
        let marker = "/tmp/kemari-test-marker/status.json";
        let mut c = Command::new("sh")
            .args(["-c", "sleep 30; true", marker])
            .spawn()
            .unwrap();
        let mut w = ProcessWorker {
            pid: c.id(),
            child: None,
            marker: Some(marker.into()),
        };
        // between fork and exec the child still shows the test's command line
        let t0 = std::time::Instant::now();
        while w.try_exit().is_some() {
            assert!(t0.elapsed() < std::time::Duration::from_secs(5));
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        c.kill().unwrap();
        c.wait().unwrap();
        assert_eq!(w.try_exit(), Some(None));
    }
}
