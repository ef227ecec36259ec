//! A small client for QEMU's machine protocol (QMP), as Xen's device model serves it.
//!
//! libxl starts one QEMU per HVM guest and gives it a QMP server socket at
//! `/var/run/xen/qmp-libxl-<domid>` ([`domain_socket_path`]). Kemari needs four commands from it:
//! `xen-save-devices-state` / `xen-load-devices-state` (the device state of a checkpoint),
//! `query-status`, and `stop` / `cont`.
//!
//! The protocol is one JSON object per line. On connect QEMU sends a greeting
//! (`{"QMP": {...}}`); the client must answer `qmp_capabilities` before anything else.
//! Every command is answered by `{"return": ...}` or `{"error": {"class", "desc"}}` carrying the
//! command's `id`; asynchronous events (`{"event": ...}`) may arrive at any time and are skipped.
//!
//! QEMU runs the guest's devices, so its replies are treated as untrusted: every line is bounded
//! ([`MAX_LINE`]), every wait has a deadline, and malformed JSON is an error, not a panic.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hypervisor::DomId;
use serde_json::{json, Map, Value};
use thiserror::Error;

/// The longest line accepted from QEMU (replies to the commands used here are small; this leaves
/// room for `query-*` commands with long answers).
pub const MAX_LINE: usize = 1 << 20;

/// Events skipped while waiting for one reply before giving up (a guest that makes QEMU emit
/// events without end must not keep a command waiting forever).
pub const MAX_SKIPPED_EVENTS: usize = 1024;

/// Default deadline of one command (device-state save of a small guest takes well under a second
/// on hardware; the lab's emulated hosts are 5-50x slower).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Directory of libxl's QMP sockets (`libxl__run_dir_path()`).
pub const XEN_RUN_DIR: &str = "/var/run/xen";

/// The QMP socket libxl creates for the device model of `domid`.
pub fn domain_socket_path(domid: DomId) -> PathBuf {
    Path::new(XEN_RUN_DIR).join(format!("qmp-libxl-{domid}"))
}

/// Errors of the QMP client. `peer` names the socket (or test stream) in every message.
#[derive(Debug, Error)]
pub enum QmpError {
    /// The socket could not be connected.
    #[error("cannot connect to QMP socket {peer}: {source}")]
    Connect {
        /// The socket path.
        peer: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("QMP {peer}: {op} failed: {source}")]
    Io {
        /// The socket.
        peer: String,
        /// What was being done.
        op: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// QEMU did not answer in time.
    #[error("QMP {peer}: no complete reply to {what} within {timeout:?}")]
    Timeout {
        /// The socket.
        peer: String,
        /// What was awaited (`greeting` or the command name).
        what: String,
        /// The deadline.
        timeout: Duration,
    },
    /// QEMU closed the connection.
    #[error("QMP {peer}: connection closed while waiting for {what}")]
    Closed {
        /// The socket.
        peer: String,
        /// What was awaited.
        what: String,
    },
    /// A line longer than [`MAX_LINE`].
    #[error("QMP {peer}: reply line longer than {limit} bytes while waiting for {what}")]
    LineTooLong {
        /// The socket.
        peer: String,
        /// What was awaited.
        what: String,
        /// The limit.
        limit: usize,
    },
    /// A line that is not a JSON object.
    #[error("QMP {peer}: malformed reply while waiting for {what}: {detail}")]
    BadReply {
        /// The socket.
        peer: String,
        /// What was awaited.
        what: String,
        /// What was wrong (with the start of the line).
        detail: String,
    },
    /// Too many events arrived before the reply.
    #[error("QMP {peer}: more than {limit} events before the reply to {what}")]
    TooManyEvents {
        /// The socket.
        peer: String,
        /// What was awaited.
        what: String,
        /// The limit.
        limit: usize,
    },
    /// QEMU answered the command with an error.
    #[error("QMP {peer}: {command} failed: {class}: {desc}")]
    Command {
        /// The socket.
        peer: String,
        /// The command.
        command: String,
        /// QEMU's error class (`GenericError`, `CommandNotFound`, ...).
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// A device-state file could not be handled.
    #[error("device state file {path}: {op} failed: {source}")]
    StateFile {
        /// The file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A device-state file larger than the limit.
    #[error("device state file {path} has {len} bytes, more than the limit of {limit}")]
    StateTooLarge {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// The limit.
        limit: u64,
    },
}

/// The guest's run state as `query-status` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpStatus {
    /// `running` is true while vCPUs may run (from QEMU's point of view).
    pub running: bool,
    /// QEMU's run state (`running`, `paused`, `inmigrate`, `postmigrate`, ...).
    pub status: String,
}

/// A connected, capability-negotiated QMP session.
#[derive(Debug)]
pub struct QmpClient {
    stream: UnixStream,
    peer: String,
    timeout: Duration,
    /// Bytes received but not yet consumed (at most one partial line plus what followed it).
    pending: Vec<u8>,
    next_id: u64,
    /// QEMU's version from the greeting (`major.minor.micro`), if it sent one.
    version: Option<String>,
}

impl QmpClient {
    /// Connects to the QMP socket at `path`, reads the greeting and negotiates capabilities.
    pub fn connect(path: &Path, timeout: Duration) -> Result<QmpClient, QmpError> {
        let peer = path.display().to_string();
        let stream = UnixStream::connect(path).map_err(|source| QmpError::Connect {
            peer: peer.clone(),
            source,
        })?;
        QmpClient::handshake(stream, peer, timeout)
    }

    /// Connects to the device model of `domid` ([`domain_socket_path`]).
    pub fn connect_domain(domid: DomId, timeout: Duration) -> Result<QmpClient, QmpError> {
        QmpClient::connect(&domain_socket_path(domid), timeout)
    }

    /// Runs the handshake on an already connected stream; `peer` names it in errors.
    pub fn handshake(
        stream: UnixStream,
        peer: String,
        timeout: Duration,
    ) -> Result<QmpClient, QmpError> {
        let mut client = QmpClient {
            stream,
            peer,
            timeout,
            pending: Vec::new(),
            next_id: 1,
            version: None,
        };
        let deadline = Instant::now() + timeout;
        let greeting = client.read_message("greeting", deadline)?;
        let Some(qmp) = greeting.get("QMP") else {
            return Err(
                client.bad_reply("greeting", format!("not a greeting: {}", brief(&greeting)))
            );
        };
        client.version = qmp
            .get("version")
            .and_then(|v| v.get("qemu"))
            .and_then(|q| {
                Some(format!(
                    "{}.{}.{}",
                    q.get("major")?.as_u64()?,
                    q.get("minor")?.as_u64()?,
                    q.get("micro")?.as_u64()?
                ))
            });
        client.execute("qmp_capabilities", None)?;
        Ok(client)
    }

    /// QEMU's version as the greeting gave it.
    pub fn version(&self) -> Option<&str> {
        self.version.as_deref()
    }

    /// Runs `command` with optional `arguments` (a JSON object) and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = Map::new();
        request.insert("execute".into(), Value::String(command.into()));
        if let Some(arguments) = arguments {
            request.insert("arguments".into(), arguments);
        }
        request.insert("id".into(), json!(id));
        let mut line = Value::Object(request).to_string();
        line.push('\n');
        let deadline = Instant::now() + self.timeout;
        self.set_timeout(command, deadline, true)?;
        self.stream
            .write_all(line.as_bytes())
            .map_err(|source| self.io_or_timeout("write", command, source))?;

        let mut events = 0usize;
        loop {
            let msg = self.read_message(command, deadline)?;
            if msg.get("event").is_some() {
                events += 1;
                if events > MAX_SKIPPED_EVENTS {
                    return Err(QmpError::TooManyEvents {
                        peer: self.peer.clone(),
                        what: command.into(),
                        limit: MAX_SKIPPED_EVENTS,
                    });
                }
                log::debug!("QMP {}: skipping event {}", self.peer, brief(&msg));
                continue;
            }
            match msg.get("id") {
                Some(got) if *got == json!(id) => {}
                other => {
                    return Err(self.bad_reply(
                        command,
                        format!(
                            "reply id {} where {id} was expected: {}",
                            other.map_or_else(|| "missing".into(), |v| v.to_string()),
                            brief(&msg)
                        ),
                    ))
                }
            }
            if let Some(ret) = msg.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = msg.get("error") {
                let class = err.get("class").and_then(Value::as_str).unwrap_or("?");
                let desc = err.get("desc").and_then(Value::as_str).unwrap_or("?");
                return Err(QmpError::Command {
                    peer: self.peer.clone(),
                    command: command.into(),
                    class: class.into(),
                    desc: desc.into(),
                });
            }
            return Err(self.bad_reply(
                command,
                format!("neither return nor error: {}", brief(&msg)),
            ));
        }
    }

    /// `query-status`.
    pub fn query_status(&mut self) -> Result<QmpStatus, QmpError> {
        let ret = self.execute("query-status", None)?;
        let running = ret.get("running").and_then(Value::as_bool);
        let status = ret.get("status").and_then(Value::as_str);
        match (running, status) {
            (Some(running), Some(status)) => Ok(QmpStatus {
                running,
                status: status.into(),
            }),
            _ => Err(self.bad_reply("query-status", format!("unexpected return {}", brief(&ret)))),
        }
    }

    /// `stop`: QEMU stops its vCPU-related processing (Xen's vCPUs are paused separately).
    pub fn stop(&mut self) -> Result<(), QmpError> {
        self.execute("stop", None).map(drop)
    }

    /// `cont`.
    pub fn cont(&mut self) -> Result<(), QmpError> {
        self.execute("cont", None).map(drop)
    }

    /// `xen-set-global-dirty-log`: whether QEMU reports its own writes to guest memory (an
    /// emulated device's DMA) to Xen's log-dirty bitmap (`xendevicemodel_modified_memory`).
    /// libxl turns it on for the whole of a live save; without it those writes are invisible
    /// to a log-dirty harvest.
    pub fn set_global_dirty_log(&mut self, enable: bool) -> Result<(), QmpError> {
        self.execute(
            "xen-set-global-dirty-log",
            Some(json!({ "enable": enable })),
        )
        .map(drop)
    }

    /// `xen-save-devices-state` into `file` (a path QEMU opens; QEMU runs in dom0), non-live:
    /// the caller has the guest paused.
    pub fn save_devices_state(&mut self, file: &Path) -> Result<(), QmpError> {
        let filename = file.to_string_lossy().into_owned();
        self.execute(
            "xen-save-devices-state",
            Some(json!({ "filename": filename, "live": false })),
        )
        .map(drop)
    }

    /// `xen-load-devices-state` from `file`.
    pub fn load_devices_state(&mut self, file: &Path) -> Result<(), QmpError> {
        let filename = file.to_string_lossy().into_owned();
        self.execute(
            "xen-load-devices-state",
            Some(json!({ "filename": filename })),
        )
        .map(drop)
    }

    fn bad_reply(&self, what: &str, detail: String) -> QmpError {
        QmpError::BadReply {
            peer: self.peer.clone(),
            what: what.into(),
            detail,
        }
    }

    fn io_or_timeout(&self, op: &'static str, what: &str, source: std::io::Error) -> QmpError {
        if matches!(source.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
            QmpError::Timeout {
                peer: self.peer.clone(),
                what: what.into(),
                timeout: self.timeout,
            }
        } else {
            QmpError::Io {
                peer: self.peer.clone(),
                op,
                source,
            }
        }
    }

    /// Sets the socket's read (or write) timeout to what is left until `deadline`.
    fn set_timeout(&self, what: &str, deadline: Instant, write: bool) -> Result<(), QmpError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(QmpError::Timeout {
                peer: self.peer.clone(),
                what: what.into(),
                timeout: self.timeout,
            });
        }
        let r = if write {
            self.stream.set_write_timeout(Some(left))
        } else {
            self.stream.set_read_timeout(Some(left))
        };
        r.map_err(|source| QmpError::Io {
            peer: self.peer.clone(),
            op: "set timeout",
            source,
        })
    }

    /// Reads the next non-empty line and parses it as a JSON object.
    fn read_message(&mut self, what: &str, deadline: Instant) -> Result<Value, QmpError> {
        loop {
            let line = self.read_line(what, deadline)?;
            let text = String::from_utf8_lossy(&line);
            let text = text.trim();
            if text.is_empty() {
                continue;
            }
            let value: Value = serde_json::from_str(text).map_err(|err| {
                self.bad_reply(what, format!("{err} in {:?}", truncate(text, 120)))
            })?;
            if !value.is_object() {
                return Err(self.bad_reply(what, format!("not an object: {}", truncate(text, 120))));
            }
            return Ok(value);
        }
    }

    /// Reads up to and excluding the next `\n`, at most [`MAX_LINE`] bytes, before `deadline`.
    fn read_line(&mut self, what: &str, deadline: Instant) -> Result<Vec<u8>, QmpError> {
        let mut scanned = 0usize;
        loop {
            if let Some(pos) = self.pending[scanned..].iter().position(|&b| b == b'\n') {
                let end = scanned + pos;
                let line = self.pending[..end].to_vec();
                self.pending.drain(..=end);
                return Ok(line);
            }
            scanned = self.pending.len();
            if scanned > MAX_LINE {
                return Err(QmpError::LineTooLong {
                    peer: self.peer.clone(),
                    what: what.into(),
                    limit: MAX_LINE,
                });
            }
            self.set_timeout(what, deadline, false)?;
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    return Err(QmpError::Closed {
                        peer: self.peer.clone(),
                        what: what.into(),
                    })
                }
                Ok(n) => self.pending.extend_from_slice(&chunk[..n]),
                Err(err) if err.kind() == ErrorKind::Interrupted => {}
                Err(err) => return Err(self.io_or_timeout("read", what, err)),
            }
        }
    }
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

fn brief(value: &Value) -> String {
    truncate(&value.to_string(), 120)
}

/// The largest device-state file [`QmpDeviceModel::save`] reads back (an HVM guest's QEMU state
/// is tens of KiB; video RAM is not part of it, it lives in guest memory).
pub const MAX_DEVICE_STATE: u64 = 64 << 20;

/// Default dom0 directory for device-state files (libxl keeps its own `qemu-save.<domid>` there).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/xen";

/// The device model (QEMU) of one HVM guest, reached over QMP: saves and loads its device state
/// as bytes, through a temporary file in a dom0 directory (QEMU writes and reads files only).
#[derive(Debug, Clone)]
pub struct QmpDeviceModel {
    socket: PathBuf,
    state_dir: PathBuf,
    timeout: Duration,
    label: String,
}

impl QmpDeviceModel {
    /// The device model of `domid` at libxl's socket, with files in [`DEFAULT_STATE_DIR`].
    pub fn for_domain(domid: DomId) -> QmpDeviceModel {
        QmpDeviceModel {
            socket: domain_socket_path(domid),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            timeout: DEFAULT_TIMEOUT,
            label: format!("d{domid}"),
        }
    }

    /// A device model at an explicit socket, with state files in `state_dir`.
    pub fn new(socket: PathBuf, state_dir: PathBuf, timeout: Duration) -> QmpDeviceModel {
        let label = socket
            .file_name()
            .map_or_else(|| "qmp".into(), |n| n.to_string_lossy().into_owned());
        QmpDeviceModel {
            socket,
            state_dir,
            timeout,
            label,
        }
    }

    /// Connects a fresh session (QEMU's socket serves one client at a time, and libxl also uses
    /// it: sessions are kept short).
    pub fn connect(&self) -> Result<QmpClient, QmpError> {
        QmpClient::connect(&self.socket, self.timeout)
    }

    fn temp_path(&self, what: &str) -> PathBuf {
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        self.state_dir.join(format!(
            "kemari-qemu-{what}.{}.{}.{n}",
            self.label,
            std::process::id()
        ))
    }

    /// Saves the device state (`xen-save-devices-state`, non-live; the guest must be paused)
    /// and returns it. The temporary file is removed on every path.
    pub fn save(&self) -> Result<Vec<u8>, QmpError> {
        let mut client = self.connect()?;
        self.save_on(&mut client)
    }

    /// [`QmpClient::set_global_dirty_log`] in a session of its own.
    pub fn set_global_dirty_log(&self, enable: bool) -> Result<(), QmpError> {
        self.connect()?.set_global_dirty_log(enable)
    }

    /// `stop`, then [`save`](Self::save) in one session, in the same way as libxl's
    /// `libxl__qmp_suspend_save` (the device model stays stopped; `cont` lets it run again).
    pub fn stop_and_save(&self) -> Result<Vec<u8>, QmpError> {
        let mut client = self.connect()?;
        client.stop()?;
        self.save_on(&mut client)
    }

    fn save_on(&self, client: &mut QmpClient) -> Result<Vec<u8>, QmpError> {
        let path = self.temp_path("save");
        let _cleanup = RemoveOnDrop(&path);
        client.save_devices_state(&path)?;
        let file = std::fs::File::open(&path).map_err(|source| QmpError::StateFile {
            path: path.clone(),
            op: "open",
            source,
        })?;
        let mut data = Vec::new();
        file.take(MAX_DEVICE_STATE + 1)
            .read_to_end(&mut data)
            .map_err(|source| QmpError::StateFile {
                path: path.clone(),
                op: "read",
                source,
            })?;
        if data.len() as u64 > MAX_DEVICE_STATE {
            return Err(QmpError::StateTooLarge {
                path: path.clone(),
                len: data.len() as u64,
                limit: MAX_DEVICE_STATE,
            });
        }
        Ok(data)
    }

    /// Loads `state` into the device model (`xen-load-devices-state`). The temporary file is
    /// removed on every path.
    ///
    /// Caution, found in the lab: Debian bookworm's QEMU 7.2 (`qemu-system-xen`) aborts
    /// (`yank_unregister_instance: Assertion 'entry' failed`) when this command runs on a QEMU
    /// that was not started for an incoming migration: its cleanup unregisters a migration
    /// yank instance that only an incoming migration registers. Only use it on a device model
    /// started to receive state (as COLO's secondary is).
    pub fn load(&self, state: &[u8]) -> Result<(), QmpError> {
        let path = self.temp_path("load");
        let _cleanup = RemoveOnDrop(&path);
        std::fs::write(&path, state).map_err(|source| QmpError::StateFile {
            path: path.clone(),
            op: "write",
            source,
        })?;
        let mut client = self.connect()?;
        client.load_devices_state(&path)
    }

    /// `query-status` in a short session.
    pub fn status(&self) -> Result<QmpStatus, QmpError> {
        self.connect()?.query_status()
    }
}

/// Removes a file when dropped (missing file is fine).
struct RemoveOnDrop<'a>(&'a Path);

impl Drop for RemoveOnDrop<'_> {
    fn drop(&mut self) {
        if let Err(err) = std::fs::remove_file(self.0) {
            if err.kind() != ErrorKind::NotFound {
                log::warn!("cannot remove {}: {err}", self.0.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixListener;
    use std::thread;

    /// A fake QEMU: sends `greeting`, then for each request line calls `reply(request)` and
    /// writes the returned raw text. Returns the requests it saw.
    fn fake_server(
        stream: UnixStream,
        greeting: &'static str,
        reply: impl Fn(&Value) -> String + Send + 'static,
    ) -> thread::JoinHandle<Vec<Value>> {
        thread::spawn(move || {
            let mut seen = Vec::new();
            let mut writer = stream.try_clone().unwrap();
            if writer.write_all(greeting.as_bytes()).is_err() {
                return seen;
            }
            let reader = BufReader::new(stream);
            for line in reader.lines() {
                let Ok(line) = line else { break };
                let req: Value = serde_json::from_str(&line).unwrap();
                let out = reply(&req);
                seen.push(req);
                if writer.write_all(out.as_bytes()).is_err() {
                    break;
                }
            }
            seen
        })
    }

    fn ok_reply(req: &Value, ret: Value) -> String {
        format!("{}\n", json!({"return": ret, "id": req["id"]}))
    }

    fn pair_client(
        greeting: &'static str,
        reply: impl Fn(&Value) -> String + Send + 'static,
        timeout: Duration,
    ) -> (Result<QmpClient, QmpError>, thread::JoinHandle<Vec<Value>>) {
        let (a, b) = UnixStream::pair().unwrap();
        let server = fake_server(b, greeting, reply);
        (QmpClient::handshake(a, "test".into(), timeout), server)
    }

    fn greeting_nl() -> &'static str {
        concat!(
            r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "Debian"}, "capabilities": []}}"#,
            "\n"
        )
    }

    #[test]
    fn handshake_and_commands() {
        let (client, server) = pair_client(
            greeting_nl(),
            |req| match req["execute"].as_str().unwrap() {
                "qmp_capabilities" => ok_reply(req, json!({})),
                "query-status" => format!(
                    "{}\n{}\n",
                    json!({"event": "RESUME", "timestamp": {"seconds": 1, "microseconds": 2}}),
                    json!({"return": {"running": false, "singlestep": false, "status": "paused"}, "id": req["id"]})
                ),
                "xen-save-devices-state" => ok_reply(req, json!({})),
                other => format!(
                    "{}\n",
                    json!({"error": {"class": "CommandNotFound", "desc": format!("The command {other} has not been found")}, "id": req["id"]})
                ),
            },
            Duration::from_secs(5),
        );
        let mut client = client.unwrap();
        assert_eq!(client.version(), Some("7.2.0"));
        let status = client.query_status().unwrap();
        assert_eq!(
            status,
            QmpStatus {
                running: false,
                status: "paused".into()
            }
        );
        client
            .save_devices_state(Path::new("/var/lib/xen/x"))
            .unwrap();
        let err = client.execute("bogus", None).unwrap_err();
        match &err {
            QmpError::Command {
                class,
                desc,
                command,
                ..
            } => {
                assert_eq!(class, "CommandNotFound");
                assert_eq!(command, "bogus");
                assert!(desc.contains("bogus"));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.to_string().contains("CommandNotFound"), "{err}");
        drop(client);
        let seen = server.join().unwrap();
        assert_eq!(seen[0]["execute"], "qmp_capabilities");
        assert_eq!(seen[2]["execute"], "xen-save-devices-state");
        assert_eq!(
            seen[2]["arguments"],
            json!({"filename": "/var/lib/xen/x", "live": false})
        );
        // ids are distinct and increasing
        let ids: Vec<u64> = seen.iter().map(|r| r["id"].as_u64().unwrap()).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    }

    #[test]
    fn rejects_a_non_greeting() {
        let (client, _server) = pair_client(
            "{\"return\": {}}\n",
            |req| ok_reply(req, json!({})),
            Duration::from_secs(5),
        );
        let err = client.unwrap_err();
        assert!(matches!(err, QmpError::BadReply { .. }), "{err:?}");
        assert!(err.to_string().contains("greeting"), "{err}");
    }

    #[test]
    fn bad_json_is_an_error() {
        let (client, _server) = pair_client(
            greeting_nl(),
            |req| match req["execute"].as_str().unwrap() {
                "qmp_capabilities" => ok_reply(req, json!({})),
                _ => "{\"return\": {\"running\": tru\n".into(),
            },
            Duration::from_secs(5),
        );
        let err = client.unwrap().query_status().unwrap_err();
        assert!(matches!(err, QmpError::BadReply { .. }), "{err:?}");
        assert!(err.to_string().contains("query-status"), "{err}");
    }

    #[test]
    fn non_object_and_wrong_id_are_errors() {
        let (client, _server) = pair_client(
            greeting_nl(),
            |req| match req["execute"].as_str().unwrap() {
                "qmp_capabilities" => ok_reply(req, json!({})),
                "stop" => "[1, 2]\n".into(),
                _ => format!("{}\n", json!({"return": {}, "id": 999})),
            },
            Duration::from_secs(5),
        );
        let mut client = client.unwrap();
        let err = client.stop().unwrap_err();
        assert!(err.to_string().contains("not an object"), "{err}");
        let err = client.cont().unwrap_err();
        assert!(err.to_string().contains("999"), "{err}");
    }

    #[test]
    fn huge_line_is_refused_without_growing_forever() {
        let (a, b) = UnixStream::pair().unwrap();
        let server = thread::spawn(move || {
            let mut b = b;
            let chunk = vec![b'x'; 64 * 1024];
            // Writes until the client hangs up: an endless line.
            while b.write_all(&chunk).is_ok() {}
        });
        let err = QmpClient::handshake(a, "test".into(), Duration::from_secs(20)).unwrap_err();
        assert!(
            matches!(err, QmpError::LineTooLong { limit, .. } if limit == MAX_LINE),
            "{err:?}"
        );
        server.join().unwrap();
    }

    #[test]
    fn silent_peer_times_out() {
        let (a, b) = UnixStream::pair().unwrap();
        let start = Instant::now();
        let err = QmpClient::handshake(a, "test".into(), Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err, QmpError::Timeout { .. }), "{err:?}");
        assert!(start.elapsed() < Duration::from_secs(10));
        drop(b);
    }

    #[test]
    fn slow_drip_times_out_at_the_deadline() {
        let (a, b) = UnixStream::pair().unwrap();
        let server = thread::spawn(move || {
            let mut b = b;
            // One byte every 50 ms, never a newline: per-read timeouts alone would never fire.
            for _ in 0..200 {
                if b.write_all(b" ").is_err() {
                    break;
                }
                thread::sleep(Duration::from_millis(50));
            }
        });
        let start = Instant::now();
        let err = QmpClient::handshake(a, "test".into(), Duration::from_millis(300)).unwrap_err();
        assert!(matches!(err, QmpError::Timeout { .. }), "{err:?}");
        assert!(start.elapsed() < Duration::from_secs(5));
        server.join().unwrap();
    }

    #[test]
    fn closed_connection_is_reported() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        let err = QmpClient::handshake(a, "test".into(), Duration::from_secs(5)).unwrap_err();
        assert!(matches!(err, QmpError::Closed { .. }), "{err:?}");
    }

    #[test]
    fn event_flood_is_bounded() {
        let (client, _server) = pair_client(
            greeting_nl(),
            |req| match req["execute"].as_str().unwrap() {
                "qmp_capabilities" => ok_reply(req, json!({})),
                _ => {
                    let ev = format!("{}\n", json!({"event": "X"}));
                    ev.repeat(MAX_SKIPPED_EVENTS + 1)
                }
            },
            Duration::from_secs(5),
        );
        let err = client.unwrap().cont().unwrap_err();
        assert!(matches!(err, QmpError::TooManyEvents { .. }), "{err:?}");
    }

    /// A temporary directory removed at the end of the test.
    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!("kemari-qmp-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A fake QEMU on a socket path that saves/loads device state like QEMU: it writes or
    /// reads the named file. Serves `sessions` connections.
    fn fake_qemu_socket(
        socket: PathBuf,
        sessions: usize,
        loaded: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    ) -> thread::JoinHandle<()> {
        let listener = UnixListener::bind(&socket).unwrap();
        thread::spawn(move || {
            for _ in 0..sessions {
                let (stream, _) = listener.accept().unwrap();
                let loaded = loaded.clone();
                let server = fake_server(stream, greeting_nl(), move |req| {
                    let file = req["arguments"]["filename"].as_str().map(PathBuf::from);
                    match req["execute"].as_str().unwrap() {
                        "xen-save-devices-state" => {
                            std::fs::write(file.unwrap(), b"QEVM\0\0\0\x03device-state").unwrap();
                            ok_reply(req, json!({}))
                        }
                        "xen-load-devices-state" => {
                            *loaded.lock().unwrap() = std::fs::read(file.unwrap()).unwrap();
                            ok_reply(req, json!({}))
                        }
                        _ => ok_reply(req, json!({})),
                    }
                });
                server.join().unwrap();
            }
        })
    }

    #[test]
    fn device_model_save_and_load_through_files() {
        let dir = TempDir::new("dm");
        let socket = dir.0.join("qmp-libxl-7");
        let loaded = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let server = fake_qemu_socket(socket.clone(), 2, loaded.clone());
        let dm = QmpDeviceModel::new(socket, dir.0.clone(), Duration::from_secs(5));
        let state = dm.save().unwrap();
        assert_eq!(state, b"QEVM\0\0\0\x03device-state");
        dm.load(b"other state").unwrap();
        server.join().unwrap();
        assert_eq!(&*loaded.lock().unwrap(), b"other state");
        // Only the socket is left: temporary files were removed.
        let left: Vec<_> = std::fs::read_dir(&dir.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, vec!["qmp-libxl-7".to_string()]);
    }

    #[test]
    fn device_model_save_failure_names_the_command_and_removes_nothing_left() {
        let dir = TempDir::new("dmfail");
        let socket = dir.0.join("qmp");
        let listener = UnixListener::bind(&socket).unwrap();
        let server = thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            fake_server(stream, greeting_nl(), |req| {
                match req["execute"].as_str().unwrap() {
                    "qmp_capabilities" => ok_reply(req, json!({})),
                    _ => format!(
                        "{}\n",
                        json!({"error": {"class": "GenericError", "desc": "disk full"}, "id": req["id"]})
                    ),
                }
            })
            .join()
            .unwrap();
        });
        let dm = QmpDeviceModel::new(socket, dir.0.clone(), Duration::from_secs(5));
        let err = dm.save().unwrap_err();
        assert!(
            err.to_string()
                .contains("xen-save-devices-state failed: GenericError: disk full"),
            "{err}"
        );
        server.join().unwrap();
        assert_eq!(std::fs::read_dir(&dir.0).unwrap().count(), 1);
    }

    #[test]
    fn missing_socket_names_the_path() {
        let dm = QmpDeviceModel::new(
            PathBuf::from("/nonexistent/qmp-libxl-3"),
            std::env::temp_dir(),
            Duration::from_secs(1),
        );
        let err = dm.save().unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/qmp-libxl-3"),
            "{err}"
        );
    }

    #[test]
    fn socket_path_of_a_domain() {
        assert_eq!(
            domain_socket_path(12),
            PathBuf::from("/var/run/xen/qmp-libxl-12")
        );
    }
}
