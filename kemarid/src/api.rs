//! The control API of `kemarid`, protocol version 1 (docs/api.md).
//!
//! Transport: a unix stream socket (`/run/kemari/kemarid.sock`, mode 0600, owned by root) for
//! local clients, and a TCP port between the daemons of a primary and a secondary (trusted
//! replication network). Both carry newline-delimited JSON: one request line, one response
//! line; after an `events` request the daemon sends one event line per event until the client
//! hangs up.
//!
//! Every line carries the protocol version `v`. A request with a version this daemon does not
//! speak is refused with [`ErrorCode::UnsupportedVersion`] before anything else is looked at.
//!
//! This module holds the serde types (requests, replies, errors, events, status), the helpers
//! the daemon uses to read and write lines, and a small blocking [`Client`].

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Where `kemarid` listens for local clients unless configured otherwise.
pub const DEFAULT_SOCKET: &str = "/run/kemari/kemarid.sock";

/// The TCP port on which daemons talk to each other unless configured otherwise.
pub const DEFAULT_PEER_PORT: u16 = 7200;

/// Longest request or response line accepted (bytes).
pub const MAX_LINE: usize = 1 << 20;

/// Errors of this module: what went wrong talking to a daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon's socket could not be reached.
    #[error("cannot connect to kemarid at {path}: {source} (is kemarid running? start it with `systemctl start kemarid` or run `kemarid` as root)")]
    Connect {
        /// Socket path or address.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Reading or writing the connection failed.
    #[error("talking to kemarid at {path}: {source}")]
    Io {
        /// Socket path or address.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The daemon answered something that is not protocol version 1.
    #[error("kemarid at {path} sent an invalid line ({detail}): {line:.200}")]
    Protocol {
        /// Socket path or address.
        path: String,
        /// What is wrong with it.
        detail: String,
        /// The line (shortened in the message).
        line: String,
    },
    /// The daemon closed the connection before answering.
    #[error("kemarid at {path} closed the connection without an answer")]
    Closed {
        /// Socket path or address.
        path: String,
    },
    /// The daemon refused the request.
    #[error(transparent)]
    Api(#[from] ApiError),
}

/// An error the daemon returns: a stable code, a message for humans naming the guest, the host
/// and the cause, and (where there is one) a suggested fix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}{}", .fix.as_ref().map(|f| format!(" ({f})")).unwrap_or_default())]
pub struct ApiError {
    /// Machine-readable code.
    pub code: ErrorCode,
    /// What failed, with which guest/host/values.
    pub message: String,
    /// What the operator can do about it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl ApiError {
    /// An error with a fix.
    pub fn new(code: ErrorCode, message: impl Into<String>, fix: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
            fix: Some(fix.into()),
        }
    }

    /// An error without a fix.
    pub fn bare(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
            fix: None,
        }
    }
}

/// The error codes of protocol version 1 (docs/api.md has the full table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    /// No such domain on this host (or no such protected guest).
    UnknownDomain,
    /// The peer host's kemarid cannot be reached.
    UnreachableHost,
    /// The guest is already protected (or replicated to this host).
    AlreadyProtected,
    /// The guest is not protected by this daemon.
    NotProtected,
    /// The request needs the secondary (e.g. `failover` on the primary).
    NotSecondary,
    /// The request needs the primary (e.g. `checkpoint` on the secondary).
    NotPrimary,
    /// The guest's protection is in a state that does not allow the request (e.g. a
    /// checkpoint before the initial sync completed).
    WrongState,
    /// The peer daemon refused the request (its error is in the message).
    PeerRefused,
    /// The request is malformed (not JSON, unknown op, missing or bad field).
    BadRequest,
    /// The request's protocol version is not spoken by this daemon.
    UnsupportedVersion,
    /// The request is not allowed on this transport (local requests on the peer port).
    Forbidden,
    /// The daemon is shutting down.
    ShuttingDown,
    /// Something failed inside the daemon (the message says what).
    Internal,
    /// A code from a newer daemon that this build does not know.
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::UnknownDomain => "unknown-domain",
            ErrorCode::UnreachableHost => "unreachable-host",
            ErrorCode::AlreadyProtected => "already-protected",
            ErrorCode::NotProtected => "not-protected",
            ErrorCode::NotSecondary => "not-secondary",
            ErrorCode::NotPrimary => "not-primary",
            ErrorCode::WrongState => "wrong-state",
            ErrorCode::PeerRefused => "peer-refused",
            ErrorCode::BadRequest => "bad-request",
            ErrorCode::UnsupportedVersion => "unsupported-version",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::ShuttingDown => "shutting-down",
            ErrorCode::Internal => "internal",
            ErrorCode::Unknown => "unknown",
        }
    }
}

/// Per-guest protection options; every field left out takes the daemon's configured default
/// (`[defaults]` and `[guest.NAME]` of kemarid.conf, docs/api.md).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartOptions {
    /// Maximum epoch interval (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u64>,
    /// Minimum guest run time between two checkpoints (ms; 0: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_run_ms: Option<u64>,
    /// Checkpoints at cooperative suspend points (true) or by toolstack pause (false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspend: Option<bool>,
    /// The guest's disk image, served by the primary's worker (output commit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<PathBuf>,
    /// The secondary's copy of the disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_copy: Option<PathBuf>,
    /// Virtual device name of the disk (`xvda`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vdev: Option<String>,
    /// The guest's NIC on the secondary after a failover (`kemari receive --vif` syntax).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vif: Option<String>,
    /// Unpause the guest after the initial sync (a guest created paused, `xl create -p`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unpause: Option<bool>,
    /// Heartbeat period (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_ms: Option<u64>,
    /// Missed heartbeats before the peer is dead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_misses: Option<u32>,
}

/// A request (the `op` field selects the variant).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Who is there: daemon version, protocol versions, host, mode.
    Hello,
    /// Status of one protected guest (`dom`) or of all.
    Status {
        /// Guest name or domain id; all guests if absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dom: Option<String>,
    },
    /// Protect `dom` (a domain of this host) with a replica on `host` (its kemarid).
    Start {
        /// Guest name or domain id.
        dom: String,
        /// The secondary: host name or address of its kemarid (`HOST` or `HOST:PORT`).
        host: String,
        /// Options; the configuration's defaults otherwise.
        #[serde(default)]
        options: StartOptions,
    },
    /// End protection of `dom` (the guest runs on unprotected; the secondary drops its replica).
    Stop {
        /// Guest name.
        dom: String,
    },
    /// On the secondary: run the guest here from the last acknowledged checkpoint now.
    Failover {
        /// Guest name.
        dom: String,
        /// Fail over even though the primary still answers its heartbeat (two copies of the
        /// guest would run: only when the primary's guest is known to be stopped).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        force: bool,
    },
    /// On the primary: take a checkpoint now; answers once one is acknowledged.
    Checkpoint {
        /// Guest name.
        dom: String,
        /// How long to wait for the acknowledgement (ms, default 10000).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        wait_ms: Option<u64>,
    },
    /// Follow events (of `dom`, or of all guests) until the connection is closed.
    Events {
        /// Guest name; all guests if absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dom: Option<String>,
    },
    /// Daemon to daemon (peer port): prepare to receive `dom` from `primary`.
    PeerReceive {
        /// Guest name (as the primary names it).
        dom: String,
        /// The primary's host name (for status and messages).
        primary: String,
        /// The options the primary resolved.
        #[serde(default)]
        options: StartOptions,
    },
    /// Daemon to daemon: the primary ended protection of `dom` on purpose; drop the replica.
    PeerStop {
        /// Guest name.
        dom: String,
    },
}

impl Request {
    /// The op's wire name (for logs).
    pub fn op(&self) -> &'static str {
        match self {
            Request::Hello => "hello",
            Request::Status { .. } => "status",
            Request::Start { .. } => "start",
            Request::Stop { .. } => "stop",
            Request::Failover { .. } => "failover",
            Request::Checkpoint { .. } => "checkpoint",
            Request::Events { .. } => "events",
            Request::PeerReceive { .. } => "peer-receive",
            Request::PeerStop { .. } => "peer-stop",
        }
    }

    /// Whether a daemon accepts it on its peer (TCP) port.
    pub fn allowed_from_peer(&self) -> bool {
        matches!(
            self,
            Request::Hello | Request::PeerReceive { .. } | Request::PeerStop { .. }
        )
    }
}

/// One request line: version, optional client-chosen id (echoed), the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestLine {
    /// Protocol version.
    pub v: u32,
    /// Echoed in the response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    /// The request.
    #[serde(flatten)]
    pub req: Request,
}

/// A successful reply (the `type` field selects the variant).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Reply {
    /// Answer to `hello`.
    Hello(HelloInfo),
    /// Answer to `status`.
    Status(StatusReply),
    /// Answer to `start`, `stop`, `failover`: the guest's status afterwards.
    Guest(Box<GuestStatus>),
    /// Answer to `checkpoint`.
    Checkpoint(CheckpointReply),
    /// Answer to `events`: event lines follow.
    Subscribed {
        /// The guest followed, or all.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dom: Option<String>,
    },
    /// Answer to `peer-receive`: where the primary's worker connects.
    PeerReady(PeerReady),
    /// Answer to `peer-stop`.
    PeerStopped {
        /// Guest name.
        dom: String,
    },
}

/// Answer to `hello`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloInfo {
    /// kemarid's version.
    pub daemon: String,
    /// Protocol versions spoken.
    pub protocols: Vec<u32>,
    /// This host's name.
    pub host: String,
    /// `xen` (a real dom0) or `mem` (the in-memory test mode).
    pub mode: String,
    /// Process id of the daemon.
    pub pid: u32,
    /// The address of its peer port (absent when off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_listen: Option<String>,
    /// The address of its metrics endpoint (absent when off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<String>,
}

/// Answer to `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReply {
    /// This host's name.
    pub host: String,
    /// The guests this daemon protects or replicates, by name.
    pub guests: Vec<GuestStatus>,
}

/// Answer to `checkpoint`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointReply {
    /// Guest name.
    pub dom: String,
    /// Sequence number acknowledged after the request (at least the forced checkpoint's).
    pub acked_seq: u64,
}

/// Answer to `peer-receive`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerReady {
    /// Guest name.
    pub dom: String,
    /// TCP port of the receiving worker's data stream.
    pub data_port: u16,
    /// UDP port of its heartbeat.
    pub heartbeat_port: u16,
}

/// A guest's role on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// The guest runs here; a replica is kept on the peer.
    Primary,
    /// The replica is kept here.
    Secondary,
}

impl Role {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Secondary => "secondary",
        }
    }
}

/// Where a guest's protection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GuestState {
    /// The worker is starting (primary: connecting; secondary: waiting for the primary).
    Starting,
    /// The initial copy is under way.
    InitialSync,
    /// Checkpoints are being taken and acknowledged.
    Protected,
    /// `stop` was asked; the worker is finishing the checkpoint in progress.
    Stopping,
    /// Protection ended on purpose; the guest runs unprotected on the primary.
    Stopped,
    /// Protection was lost (peer dead, stream error, worker died): primary: the guest runs
    /// unprotected; secondary: no failover happened (the replica was dropped or kept paused).
    Failed,
    /// Secondary: the failover is under way.
    FailingOver,
    /// Secondary: the guest runs here now, unprotected.
    FailedOver,
}

impl GuestState {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            GuestState::Starting => "starting",
            GuestState::InitialSync => "initial-sync",
            GuestState::Protected => "protected",
            GuestState::Stopping => "stopping",
            GuestState::Stopped => "stopped",
            GuestState::Failed => "failed",
            GuestState::FailingOver => "failing-over",
            GuestState::FailedOver => "failed-over",
        }
    }

    /// States after which the worker is gone.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            GuestState::Stopped | GuestState::Failed | GuestState::FailedOver
        )
    }
}

/// Three quantiles of a time (ms).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Quantiles {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Maximum.
    pub max: f64,
}

/// Heartbeat as seen by this side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatStatus {
    /// Period (ms).
    pub period_ms: u64,
    /// Missed heartbeats before the peer is declared dead.
    pub misses_allowed: u32,
    /// `alive`, `dead`, or `unknown` (not started yet).
    pub peer: String,
    /// Milliseconds since the peer was last heard (absent before the first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heard_ms: Option<f64>,
    /// Heartbeat periods that passed without an answer, in total.
    pub misses: u64,
}

/// Progress of the initial copy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InitialSync {
    /// Pages sent so far (all rounds).
    pub pages: u64,
    /// Pages of the guest (populated frames of the first round).
    pub total: u64,
    /// Pages per second over the copy so far.
    pub rate_pages_per_s: f64,
    /// Live rounds done.
    pub round: u32,
    /// Estimated seconds left in the first round (absent once done or unknown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_s: Option<f64>,
    /// The secondary acknowledged the complete image.
    pub done: bool,
}

/// The status of one guest on this host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestStatus {
    /// Guest name.
    pub dom: String,
    /// Its domain id here (primary: the guest; secondary: the replica or, after a failover,
    /// the running guest); absent when none exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domid: Option<u32>,
    /// Role of this host.
    pub role: Role,
    /// The other host.
    pub peer: String,
    /// Where protection stands.
    pub state: GuestState,
    /// When the guest entered this state (Unix time, s).
    pub since: f64,
    /// Process id of the worker (absent when none runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_pid: Option<u32>,
    /// Checkpoints acknowledged (primary) or applied (secondary).
    pub checkpoints: u64,
    /// Checkpoints per second over the last 10 s.
    pub checkpoints_per_s: f64,
    /// Sequence number of the last acknowledged checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_acked_seq: Option<u64>,
    /// Time the guest was paused per checkpoint (ms; primary).
    pub pause_ms: Quantiles,
    /// Time from the start of a checkpoint to its acknowledgement (ms; primary).
    pub checkpoint_ms: Quantiles,
    /// Mean dirty pages per checkpoint over the last 10 s.
    pub dirty_pages_per_checkpoint: f64,
    /// Age of the state the secondary holds: milliseconds since the last acknowledgement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication_lag_ms: Option<f64>,
    /// Checkpoint bytes per second over the last 10 s.
    pub link_bytes_per_s: f64,
    /// Checkpoint bytes in total (sent or received).
    pub bytes: u64,
    /// The heartbeat (absent when off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat: Option<HeartbeatStatus>,
    /// The initial copy (absent before it starts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_sync: Option<InitialSync>,
    /// Why protection failed or the last error (absent when none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// When (Unix time, s).
    pub time: f64,
    /// Guest name.
    pub dom: String,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
}

/// What happened (the `kind` field selects the variant).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum EventKind {
    /// The guest's protection changed state.
    State {
        /// Previous state (absent for a new guest).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<GuestState>,
        /// New state.
        to: GuestState,
        /// Why, for humans.
        reason: String,
    },
    /// Initial copy progress (at most one a second).
    InitialSync {
        /// Pages sent so far.
        pages: u64,
        /// Pages of the guest.
        total: u64,
        /// Pages per second.
        rate_pages_per_s: f64,
    },
    /// Checkpoints were acknowledged since the last such event (at most one a second).
    Checkpoints {
        /// The last acknowledged sequence number.
        last_acked_seq: u64,
        /// Checkpoints in total.
        checkpoints: u64,
        /// Checkpoints per second.
        per_s: f64,
    },
    /// The peer's heartbeat changed (`alive` / `dead`).
    Heartbeat {
        /// The peer's state.
        peer: String,
    },
    /// The guest now runs on this host (secondary after a failover).
    FailedOver {
        /// Its domain id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        domid: Option<u32>,
        /// The checkpoint it resumed from.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
    },
    /// A worker process ended.
    WorkerExit {
        /// Its pid.
        pid: u32,
        /// Exit status (absent when killed by a signal).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<i32>,
    },
    /// A restarted daemon found this guest's worker running and adopted it.
    Adopted {
        /// The worker's pid.
        pid: u32,
    },
}

/// One event line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventLine {
    /// Protocol version.
    pub v: u32,
    /// The event.
    pub event: Event,
}

/// One response line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseLine {
    /// Protocol version.
    pub v: u32,
    /// The request's id, echoed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    /// Whether the request succeeded.
    pub ok: bool,
    /// The reply (ok).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Reply>,
    /// The error (not ok).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiError>,
}

impl ResponseLine {
    /// A success.
    pub fn ok(id: Option<u64>, reply: Reply) -> ResponseLine {
        ResponseLine {
            v: PROTOCOL_VERSION,
            id,
            ok: true,
            result: Some(reply),
            error: None,
        }
    }

    /// A failure.
    pub fn err(id: Option<u64>, error: ApiError) -> ResponseLine {
        ResponseLine {
            v: PROTOCOL_VERSION,
            id,
            ok: false,
            result: None,
            error: Some(error),
        }
    }

    /// The reply, or the error.
    pub fn into_result(self) -> Result<Reply, ApiError> {
        match (self.ok, self.result, self.error) {
            (true, Some(r), _) => Ok(r),
            (false, _, Some(e)) => Err(e),
            (ok, _, _) => Err(ApiError::bare(
                ErrorCode::Internal,
                format!("response with ok={ok} lacks its result or error"),
            )),
        }
    }
}

/// Parses one request line, checking the version first: a line whose `v` is not
/// [`PROTOCOL_VERSION`] is refused as `unsupported-version` whatever else it holds. The error
/// carries the line's `id` if it had one.
pub fn parse_request(line: &str) -> Result<RequestLine, (Option<u64>, ApiError)> {
    let value: serde_json::Value = serde_json::from_str(line).map_err(|e| {
        (
            None,
            ApiError::new(
                ErrorCode::BadRequest,
                format!("the request is not JSON: {e}"),
                "send one JSON object per line, e.g. {\"v\":1,\"op\":\"hello\"}",
            ),
        )
    })?;
    let id = value.get("id").and_then(serde_json::Value::as_u64);
    match value.get("v").map(|v| (v, v.as_u64())) {
        None => {
            return Err((
                id,
                ApiError::new(
                    ErrorCode::UnsupportedVersion,
                    "the request has no protocol version (field \"v\")",
                    format!("add \"v\":{PROTOCOL_VERSION}"),
                ),
            ))
        }
        Some((_, Some(v))) if v == u64::from(PROTOCOL_VERSION) => {}
        Some((v, _)) => {
            return Err((
                id,
                ApiError::new(
                    ErrorCode::UnsupportedVersion,
                    format!("protocol version {v} is not supported by this kemarid (it speaks {PROTOCOL_VERSION})"),
                    "use a kemari client of the same release as kemarid",
                ),
            ))
        }
    }
    serde_json::from_value::<RequestLine>(value).map_err(|e| {
        (
            id,
            ApiError::new(
                ErrorCode::BadRequest,
                format!("bad request: {e}"),
                "see docs/api.md for the ops and their fields",
            ),
        )
    })
}

/// One line of JSON with its newline.
pub fn to_line<T: Serialize>(v: &T) -> String {
    // Serializing these types cannot fail (no maps with non-string keys, no failing Serialize
    // impls); a failure would still produce a valid error line rather than a panic.
    match serde_json::to_string(v) {
        Ok(mut s) => {
            s.push('\n');
            s
        }
        Err(e) => format!(
            "{{\"v\":{PROTOCOL_VERSION},\"ok\":false,\"error\":{{\"code\":\"internal\",\"message\":\"cannot serialize: {}\"}}}}\n",
            e.to_string().replace('"', "'")
        ),
    }
}

/// Reads one line of at most [`MAX_LINE`] bytes; `None` at end of stream.
pub fn read_line(r: &mut impl BufRead) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    let n = std::io::Read::take(&mut *r, MAX_LINE as u64 + 1).read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') && n > MAX_LINE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("line longer than {MAX_LINE} bytes"),
        ));
    }
    while matches!(buf.last(), Some(b'\n' | b'\r')) {
        buf.pop();
    }
    String::from_utf8(buf)
        .map(Some)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

trait Conn: std::io::Read + Write + Send {}
impl<T: std::io::Read + Write + Send> Conn for T {}

/// A blocking client of one daemon connection.
pub struct Client {
    reader: BufReader<Box<dyn Conn>>,
    path: String,
    next_id: u64,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("path", &self.path).finish()
    }
}

impl Client {
    /// Connects to a daemon's unix socket.
    pub fn connect(path: impl AsRef<Path>) -> Result<Client, ClientError> {
        let p = path.as_ref().display().to_string();
        let s = UnixStream::connect(path.as_ref()).map_err(|source| ClientError::Connect {
            path: p.clone(),
            source,
        })?;
        Ok(Client::from_conn(Box::new(s), p))
    }

    /// Connects to a daemon's peer (TCP) port, waiting at most `timeout` for the connection.
    pub fn connect_tcp(addr: &str, timeout: Duration) -> Result<Client, ClientError> {
        let err = |source| ClientError::Connect {
            path: addr.to_string(),
            source,
        };
        let mut last = None;
        for a in addr.to_socket_addrs().map_err(err)? {
            match TcpStream::connect_timeout(&a, timeout) {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    return Ok(Client::from_conn(Box::new(s), addr.to_string()));
                }
                Err(e) => last = Some(e),
            }
        }
        Err(err(last.unwrap_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, "no address")
        })))
    }

    fn from_conn(c: Box<dyn Conn>, path: String) -> Client {
        Client {
            reader: BufReader::new(c),
            path,
            next_id: 1,
        }
    }

    fn io(&self) -> impl Fn(std::io::Error) -> ClientError + '_ {
        |source| ClientError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn read_response(&mut self) -> Result<ResponseLine, ClientError> {
        let line = read_line(&mut self.reader)
            .map_err(self.io())?
            .ok_or_else(|| ClientError::Closed {
                path: self.path.clone(),
            })?;
        let resp: ResponseLine =
            serde_json::from_str(&line).map_err(|e| ClientError::Protocol {
                path: self.path.clone(),
                detail: e.to_string(),
                line: line.clone(),
            })?;
        if resp.v != PROTOCOL_VERSION {
            return Err(ClientError::Protocol {
                path: self.path.clone(),
                detail: format!("protocol version {} (expected {PROTOCOL_VERSION})", resp.v),
                line,
            });
        }
        Ok(resp)
    }

    /// Sends one request and returns the daemon's reply (or its error as
    /// [`ClientError::Api`]).
    pub fn call(&mut self, req: &Request) -> Result<Reply, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let line = to_line(&RequestLine {
            v: PROTOCOL_VERSION,
            id: Some(id),
            req: req.clone(),
        });
        self.reader
            .get_mut()
            .write_all(line.as_bytes())
            .map_err(self.io())?;
        let resp = self.read_response()?;
        Ok(resp.into_result()?)
    }

    /// `status` of one guest or all.
    pub fn status(&mut self, dom: Option<&str>) -> Result<StatusReply, ClientError> {
        match self.call(&Request::Status {
            dom: dom.map(str::to_string),
        })? {
            Reply::Status(s) => Ok(s),
            other => Err(self.unexpected("status", &other)),
        }
    }

    fn unexpected(&self, op: &str, reply: &Reply) -> ClientError {
        ClientError::Protocol {
            path: self.path.clone(),
            detail: format!("unexpected reply to {op}"),
            line: to_line(reply),
        }
    }

    /// Subscribes to events (of `dom` or all) and turns this connection into their stream.
    pub fn events(mut self, dom: Option<&str>) -> Result<Events, ClientError> {
        match self.call(&Request::Events {
            dom: dom.map(str::to_string),
        })? {
            Reply::Subscribed { .. } => Ok(Events { client: self }),
            other => Err(self.unexpected("events", &other)),
        }
    }
}

/// The event stream of a subscribed connection: an iterator that ends when the daemon closes
/// the connection.
#[derive(Debug)]
pub struct Events {
    client: Client,
}

impl Iterator for Events {
    type Item = Result<Event, ClientError>;

    fn next(&mut self) -> Option<Self::Item> {
        let path = self.client.path.clone();
        let line = match read_line(&mut self.client.reader) {
            Ok(None) => return None,
            Ok(Some(l)) => l,
            Err(source) => return Some(Err(ClientError::Io { path, source })),
        };
        Some(
            serde_json::from_str::<EventLine>(&line)
                .map_err(|e| ClientError::Protocol {
                    path: path.clone(),
                    detail: e.to_string(),
                    line: line.clone(),
                })
                .and_then(|l| {
                    if l.v == PROTOCOL_VERSION {
                        Ok(l.event)
                    } else {
                        Err(ClientError::Protocol {
                            path,
                            detail: format!("event of protocol version {}", l.v),
                            line,
                        })
                    }
                }),
        )
    }
}

#[cfg(test)]
mod tests;
