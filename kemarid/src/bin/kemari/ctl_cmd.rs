//! `kemari start/stop/status/failover/checkpoint/events`: the operator's verbs, over kemarid's
//! control socket (docs/api.md, docs/cli.md).
//!
//! Every verb sends one request to the daemon of this host and prints its answer, as text or
//! (with `--json`) as the reply's JSON. Failures print what failed for which guest and host,
//! why, and what to do about it, and exit with status 1 (xl's style; 2 is a usage error).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use kemarid::api::{
    self, ApiError, Client, ClientError, ErrorCode, Event, EventKind, GuestState, GuestStatus,
    Reply, Request, StartOptions, StatusReply,
};

/// The verbs that talk to kemarid.
#[derive(Subcommand, Debug)]
pub enum CtlCommand {
    /// Protect a guest of this host with a replica on HOST (whose kemarid receives it). Waits
    /// until the initial copy is acknowledged and checkpoints run (a progress bar on a
    /// terminal), unless --no-wait. Options left out take kemarid.conf's values.
    Start(StartArgs),
    /// End the protection of a guest: on the primary the guest runs on unprotected and the
    /// secondary drops its replica; on the secondary the replica is dropped.
    Stop(StopArgs),
    /// Show the guests this host's kemarid protects or replicates: role, peer, state,
    /// checkpoints/s, last ACKed sequence, pause time p50/p99, dirty pages per checkpoint,
    /// replication lag, link rate and heartbeat.
    Status(StatusArgs),
    /// On the secondary: run the guest here now from the last acknowledged checkpoint.
    Failover(FailoverArgs),
    /// On the primary: take a checkpoint now and wait for its acknowledgement.
    Checkpoint(CheckpointArgs),
    /// Follow kemarid's events (state changes, sync progress, checkpoints, heartbeat,
    /// failovers), one line each, until interrupted.
    Events(EventsArgs),
}

/// Where kemarid listens.
#[derive(Args, Debug, Clone)]
pub struct SocketArg {
    /// kemarid's control socket.
    #[arg(long, value_name = "PATH", default_value = api::DEFAULT_SOCKET)]
    pub socket: PathBuf,
}

/// Arguments of `kemari start`.
#[derive(Args, Debug)]
pub struct StartArgs {
    /// The guest: domain name or id on this host (HVM or PVH).
    pub dom: String,
    /// The secondary: host name or address of its kemarid (HOST or HOST:PORT, port 7200 by
    /// default).
    pub host: String,
    /// Maximum epoch: a checkpoint at least this often (ms).
    #[arg(long, value_name = "MS")]
    pub interval_ms: Option<u64>,
    /// Checkpoints at cooperative suspend points (what lets the secondary resume a PV-aware
    /// guest; kemarid's default).
    #[arg(long, conflicts_with = "no_suspend")]
    pub suspend: bool,
    /// Checkpoints by toolstack pause instead of suspend points.
    #[arg(long)]
    pub no_suspend: bool,
    /// The guest's disk image, served by the primary with output commit (the guest must be
    /// created without it, `xl create -p`).
    #[arg(long, value_name = "PATH")]
    pub disk: Option<PathBuf>,
    /// The secondary's copy of the disk (a path on HOST).
    #[arg(long, value_name = "PATH")]
    pub disk_copy: Option<PathBuf>,
    /// The disk's virtual device (xvda).
    #[arg(long, value_name = "VDEV")]
    pub vdev: Option<String>,
    /// The guest's NIC on the secondary after a failover (`kemari receive --vif` syntax).
    #[arg(long, value_name = "SPEC")]
    pub vif: Option<String>,
    /// Unpause the guest after the initial sync (a guest created paused).
    #[arg(long)]
    pub unpause: bool,
    /// Heartbeat period (ms).
    #[arg(long, value_name = "MS")]
    pub heartbeat_ms: Option<u64>,
    /// Missed heartbeats before the peer is declared dead.
    #[arg(long, value_name = "N")]
    pub heartbeat_misses: Option<u32>,
    /// Return as soon as kemarid has started the workers (state `starting`) instead of
    /// waiting for the initial sync.
    #[arg(long)]
    pub no_wait: bool,
    /// Give up waiting for the initial sync after this many seconds (0: wait as long as it
    /// takes). Protection goes on either way; `kemari status` follows it.
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    pub timeout: u64,
    #[command(flatten)]
    pub sock: SocketArg,
}

impl StartArgs {
    fn options(&self) -> StartOptions {
        StartOptions {
            interval_ms: self.interval_ms,
            suspend: match (self.suspend, self.no_suspend) {
                (_, true) => Some(false),
                (true, false) => Some(true),
                (false, false) => None,
            },
            disk: self.disk.clone(),
            disk_copy: self.disk_copy.clone(),
            vdev: self.vdev.clone(),
            vif: self.vif.clone(),
            unpause: self.unpause.then_some(true),
            heartbeat_ms: self.heartbeat_ms,
            heartbeat_misses: self.heartbeat_misses,
        }
    }
}

/// Arguments of `kemari stop`.
#[derive(Args, Debug)]
pub struct StopArgs {
    /// The protected guest's name.
    pub dom: String,
    /// Return at once instead of waiting for the checkpoint in progress to complete.
    #[arg(long)]
    pub no_wait: bool,
    #[command(flatten)]
    pub sock: SocketArg,
}

/// Arguments of `kemari status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Only this guest (default: all).
    pub dom: Option<String>,
    #[command(flatten)]
    pub sock: SocketArg,
}

/// Arguments of `kemari failover`.
#[derive(Args, Debug)]
pub struct FailoverArgs {
    /// The protected guest's name.
    pub dom: String,
    /// Fail over even though the primary still answers its heartbeat. Two copies of the guest
    /// would run: only when the primary's copy is known to be stopped.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub sock: SocketArg,
}

/// Arguments of `kemari checkpoint`.
#[derive(Args, Debug)]
pub struct CheckpointArgs {
    /// The protected guest's name.
    pub dom: String,
    /// How long to wait for the acknowledgement (ms; kemarid's default is 10000).
    #[arg(long, value_name = "MS")]
    pub wait_ms: Option<u64>,
    #[command(flatten)]
    pub sock: SocketArg,
}

/// Arguments of `kemari events`.
#[derive(Args, Debug)]
pub struct EventsArgs {
    /// Only this guest's events (default: all guests').
    pub dom: Option<String>,
    /// Exit after this many events (default: follow until interrupted).
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    #[command(flatten)]
    pub sock: SocketArg,
}

/// How often `start` and `stop` look at the guest's status while they wait.
const POLL: Duration = Duration::from_millis(200);

/// How long `stop` waits for the checkpoint in progress to complete.
const STOP_WAIT: Duration = Duration::from_secs(60);

/// A failed verb: what was being done (naming the guest and the host), the error code (the
/// daemon's, or one of the client's own), the cause and a suggested fix.
#[derive(Debug)]
struct Failure {
    what: String,
    code: &'static str,
    cause: String,
    fix: Option<String>,
}

impl Failure {
    fn new(what: &str, code: &'static str, cause: impl Into<String>, fix: Option<String>) -> Self {
        Failure {
            what: what.to_string(),
            code,
            cause: cause.into(),
            fix,
        }
    }

    /// Reports on stderr (and, with --json, as a JSON object on stdout); exit status 1.
    fn report(&self, json: bool) -> ExitCode {
        if json {
            let v = serde_json::json!({
                "ok": false,
                "error": {"code": self.code, "message": format!("{}: {}", self.what, self.cause), "fix": self.fix},
            });
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{v}");
        }
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "kemari: {}: {}", self.what, self.cause);
        if let Some(fix) = &self.fix {
            let _ = writeln!(err, "kemari: fix: {fix}");
        }
        ExitCode::FAILURE
    }
}

/// This host's name, for messages about the local daemon.
fn this_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "this host".to_string())
}

/// Turns a client error into a [`Failure`] of `what`, with the fix for the operator.
fn failure(what: &str, socket: &Path, e: ClientError) -> Failure {
    match e {
        ClientError::Api(ApiError { code, message, fix }) => {
            let code = code.as_str();
            Failure::new(what, code, message, fix)
        }
        ClientError::Connect { source, .. } => {
            let host = this_host();
            let (cause, fix) = match source.kind() {
                std::io::ErrorKind::PermissionDenied => (
                    format!(
                        "permission denied on kemarid's control socket {} on {host}",
                        socket.display()
                    ),
                    "the control socket is root's only: run kemari as root".to_string(),
                ),
                _ => (
                    format!(
                        "kemarid is not running on {host}: cannot connect to {} ({source})",
                        socket.display()
                    ),
                    format!(
                        "start it with `systemctl start kemarid` (or run `kemarid` as root); if it \
                         listens elsewhere, give its socket with --socket PATH (default {})",
                        api::DEFAULT_SOCKET
                    ),
                ),
            };
            Failure::new(what, "daemon-not-running", cause, Some(fix))
        }
        ClientError::Closed { .. } => Failure::new(
            what,
            "connection-closed",
            format!(
                "kemarid on {} closed the connection without an answer ({})",
                this_host(),
                socket.display()
            ),
            Some("kemarid may have stopped or crashed: see its log (journalctl -u kemarid)".into()),
        ),
        ClientError::Io { source, .. } => Failure::new(
            what,
            "connection-error",
            format!(
                "talking to kemarid on {} ({}): {source}",
                this_host(),
                socket.display()
            ),
            Some("kemarid may have stopped or crashed: see its log (journalctl -u kemarid)".into()),
        ),
        e @ ClientError::Protocol { .. } => Failure::new(
            what,
            "protocol-error",
            e.to_string(),
            Some("use a kemari of the same release as kemarid".into()),
        ),
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, v)?;
    writeln!(out)
}

/// Runs one verb; failures are reported here (stderr, and stdout with --json), exit status 1.
pub fn run(cmd: CtlCommand, json: bool) -> ExitCode {
    let r = match cmd {
        CtlCommand::Start(a) => start(&a, json),
        CtlCommand::Stop(a) => stop(&a, json),
        CtlCommand::Status(a) => status(&a, json),
        CtlCommand::Failover(a) => failover(&a, json),
        CtlCommand::Checkpoint(a) => checkpoint(&a, json),
        CtlCommand::Events(a) => events(&a, json),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        // `kemari events | head`: the reader went away; not our failure.
        Err(Outcome::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(Outcome::Output(e)) => {
            let _ = writeln!(std::io::stderr(), "kemari: writing the output: {e}");
            ExitCode::FAILURE
        }
        Err(Outcome::Failed(f)) => f.report(json),
    }
}

/// Why a verb did not succeed.
#[derive(Debug)]
enum Outcome {
    Failed(Failure),
    Output(std::io::Error),
}

impl From<Failure> for Outcome {
    fn from(f: Failure) -> Self {
        Outcome::Failed(f)
    }
}

impl From<std::io::Error> for Outcome {
    fn from(e: std::io::Error) -> Self {
        Outcome::Output(e)
    }
}

/// Connects and sends one request.
fn call(socket: &Path, what: &str, req: &Request) -> Result<Reply, Failure> {
    Client::connect(socket)
        .and_then(|mut c| c.call(req))
        .map_err(|e| failure(what, socket, e))
}

fn unexpected(what: &str, reply: &Reply) -> Failure {
    Failure::new(
        what,
        "protocol-error",
        format!(
            "kemarid answered with an unexpected reply: {}",
            api::to_line(reply).trim_end()
        ),
        Some("use a kemari of the same release as kemarid".into()),
    )
}

fn guest_reply(what: &str, reply: Reply) -> Result<GuestStatus, Failure> {
    match reply {
        Reply::Guest(g) => Ok(*g),
        other => Err(unexpected(what, &other)),
    }
}

/// One guest's status, polled while `start` or `stop` waits.
fn poll_guest(socket: &Path, what: &str, dom: &str) -> Result<GuestStatus, Failure> {
    let reply = call(
        socket,
        what,
        &Request::Status {
            dom: Some(dom.to_string()),
        },
    )?;
    match reply {
        Reply::Status(StatusReply { guests, .. }) => {
            guests.into_iter().find(|g| g.dom == dom).ok_or_else(|| {
                Failure::new(
                    what,
                    ErrorCode::UnknownDomain.as_str(),
                    format!("kemarid on {} no longer knows guest {dom}", this_host()),
                    Some("see `kemari status` and kemarid's log".into()),
                )
            })
        }
        other => Err(unexpected(what, &other)),
    }
}

fn start(a: &StartArgs, json: bool) -> Result<(), Outcome> {
    let what = format!(
        "cannot protect guest {} of {} with a replica on {}",
        a.dom,
        this_host(),
        a.host
    );
    let reply = call(
        &a.sock.socket,
        &what,
        &Request::Start {
            dom: a.dom.clone(),
            host: a.host.clone(),
            options: a.options(),
        },
    )?;
    let mut g = guest_reply(&what, reply)?;
    if !a.no_wait {
        g = wait_protected(a, &what, g, !json && std::io::stdout().is_terminal())?;
    }
    if json {
        print_json(&g)?;
    } else {
        let mut out = std::io::stdout().lock();
        match g.state {
            GuestState::Protected => writeln!(
                out,
                "{}: protected, replica on {} ({}{} checkpoints, last ACKed sequence {})",
                g.dom,
                g.peer,
                g.initial_sync
                    .as_ref()
                    .map(|s| format!(
                        "initial sync {} pages in {} rounds; ",
                        s.pages,
                        s.round + 1
                    ))
                    .unwrap_or_default(),
                g.checkpoints,
                opt(g.last_acked_seq)
            )?,
            s => writeln!(
                out,
                "{}: protection starting, replica on {} (state {}); follow it with `kemari status {}`",
                g.dom,
                g.peer,
                s.as_str(),
                g.dom
            )?,
        }
    }
    Ok(())
}

/// After `start`: polls the guest's status until it is protected (a progress bar of the
/// initial sync on a terminal), fails if protection ends first or the timeout passes.
fn wait_protected(
    a: &StartArgs,
    what: &str,
    mut g: GuestStatus,
    bar: bool,
) -> Result<GuestStatus, Failure> {
    let deadline = (a.timeout > 0).then(|| Instant::now() + Duration::from_secs(a.timeout));
    let mut progress = bar.then(SyncBar::new);
    loop {
        if let (Some(p), Some(s)) = (progress.as_mut(), g.initial_sync.as_ref()) {
            p.update(s);
        }
        match g.state {
            GuestState::Protected => {
                if let Some(p) = progress.take() {
                    p.clear();
                }
                return Ok(g);
            }
            s if s.is_final() => {
                if let Some(p) = progress.take() {
                    p.clear();
                }
                let cause = g.error.clone().unwrap_or_else(|| {
                    format!("protection ended in state {} before it began", s.as_str())
                });
                return Err(Failure::new(
                    what,
                    "protection-failed",
                    format!("{cause} (state {})", s.as_str()),
                    Some(format!(
                        "see kemarid's log on {} and on {}; `kemari stop {}` clears the guest's record before a new start",
                        this_host(),
                        a.host,
                        a.dom
                    )),
                ));
            }
            _ => {}
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            if let Some(p) = progress.take() {
                p.clear();
            }
            return Err(Failure::new(
                what,
                "timeout",
                format!(
                    "not protected after {} s (state {}); protection goes on in kemarid",
                    a.timeout,
                    g.state.as_str()
                ),
                Some(format!(
                    "follow it with `kemari status {}` or `kemari events {}`",
                    a.dom, a.dom
                )),
            ));
        }
        std::thread::sleep(POLL);
        g = poll_guest(&a.sock.socket, what, &a.dom)?;
    }
}

/// The initial sync's progress bar (indicatif, on stdout when it is a terminal): a spinner
/// until the guest's size is known, then pages of the first round, rate, live round and ETA.
/// It is cleared when the wait ends; `start`'s result line follows.
struct SyncBar {
    bar: indicatif::ProgressBar,
    sized: bool,
}

impl SyncBar {
    fn new() -> SyncBar {
        let bar = indicatif::ProgressBar::with_draw_target(
            None,
            indicatif::ProgressDrawTarget::stdout_with_hz(5),
        );
        if let Ok(style) = indicatif::ProgressStyle::with_template("{prefix} {spinner} {msg}") {
            bar.set_style(style);
        }
        bar.set_prefix("initial sync");
        bar.set_message("waiting for the secondary");
        bar.enable_steady_tick(Duration::from_millis(200));
        SyncBar { bar, sized: false }
    }

    fn update(&mut self, s: &api::InitialSync) {
        if !self.sized {
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{prefix} [{wide_bar}] {pos}/{len} pages, {msg}",
            ) {
                self.bar.set_style(style.progress_chars("=> "));
            }
            self.sized = true;
        }
        self.bar.set_length(s.total.max(1));
        // Pages of later live rounds count again: the bar shows the first round's copy.
        self.bar.set_position(s.pages.min(s.total));
        let eta = match s.eta_s {
            Some(e) => format!("ETA {}", fmt_secs(e)),
            None if s.done => "acknowledged".to_string(),
            None if s.round > 0 => "converging".to_string(),
            None => "ETA -".to_string(),
        };
        self.bar.set_message(format!(
            "{}/s, round {}, {eta}",
            fmt_count(s.rate_pages_per_s),
            s.round
        ));
    }

    fn clear(self) {
        self.bar.finish_and_clear();
    }
}

fn stop(a: &StopArgs, json: bool) -> Result<(), Outcome> {
    let what = format!(
        "cannot stop the protection of guest {} on {}",
        a.dom,
        this_host()
    );
    let reply = call(&a.sock.socket, &what, &Request::Stop { dom: a.dom.clone() })?;
    let mut g = guest_reply(&what, reply)?;
    if !a.no_wait {
        let deadline = Instant::now() + STOP_WAIT;
        while g.state == GuestState::Stopping && Instant::now() < deadline {
            std::thread::sleep(POLL);
            g = match poll_guest(&a.sock.socket, &what, &a.dom) {
                Ok(g) => g,
                // Cleared from the daemon's table: stopped.
                Err(f) if f.code == ErrorCode::UnknownDomain.as_str() => break,
                Err(f) => return Err(f.into()),
            };
        }
    }
    if json {
        print_json(&g)?;
    } else {
        let what_now = stop_text(g.role, g.state);
        writeln!(
            std::io::stdout().lock(),
            "{}: {what_now} (role {}, peer {}, state {})",
            g.dom,
            g.role.as_str(),
            g.peer,
            g.state.as_str()
        )?;
    }
    Ok(())
}

/// What `stop` did, by the guest's role and its state afterwards.
fn stop_text(role: api::Role, state: GuestState) -> &'static str {
    use api::Role::{Primary, Secondary};
    match (role, state) {
        (_, GuestState::Stopping) => "stopping (the checkpoint in progress completes)",
        (Primary, GuestState::Stopped) => "protection stopped; the guest runs on here unprotected",
        (Secondary, GuestState::Stopped) => "replica dropped",
        (_, GuestState::FailedOver) => {
            "record cleared; the guest runs here since its failover, unprotected"
        }
        (Primary, GuestState::Failed) => {
            "record cleared; protection had failed, the guest runs on here unprotected"
        }
        (Secondary, GuestState::Failed) => "record cleared; protection had failed",
        _ => "stop asked",
    }
}

fn status(a: &StatusArgs, json: bool) -> Result<(), Outcome> {
    let what = match &a.dom {
        Some(d) => format!("cannot get the status of guest {d} on {}", this_host()),
        None => format!(
            "cannot get the status of the protected guests on {}",
            this_host()
        ),
    };
    let reply = call(
        &a.sock.socket,
        &what,
        &Request::Status { dom: a.dom.clone() },
    )?;
    let st = match reply {
        Reply::Status(s) => s,
        other => return Err(unexpected(&what, &other).into()),
    };
    if json {
        print_json(&st)?;
    } else {
        std::io::stdout()
            .lock()
            .write_all(render_status(&st).as_bytes())?;
    }
    Ok(())
}

fn failover(a: &FailoverArgs, json: bool) -> Result<(), Outcome> {
    let what = format!("cannot fail guest {} over to {}", a.dom, this_host());
    let reply = call(
        &a.sock.socket,
        &what,
        &Request::Failover {
            dom: a.dom.clone(),
            force: a.force,
        },
    )?;
    let g = guest_reply(&what, reply)?;
    if json {
        print_json(&g)?;
    } else {
        writeln!(
            std::io::stdout().lock(),
            "{}: runs on {}{} from checkpoint {} (state {}); it is not protected now",
            g.dom,
            this_host(),
            g.domid
                .map(|d| format!(" as domain {d}"))
                .unwrap_or_default(),
            opt(g.last_acked_seq),
            g.state.as_str()
        )?;
    }
    Ok(())
}

fn checkpoint(a: &CheckpointArgs, json: bool) -> Result<(), Outcome> {
    let what = format!(
        "cannot take a checkpoint of guest {} on {}",
        a.dom,
        this_host()
    );
    let reply = call(
        &a.sock.socket,
        &what,
        &Request::Checkpoint {
            dom: a.dom.clone(),
            wait_ms: a.wait_ms,
        },
    )?;
    let c = match reply {
        Reply::Checkpoint(c) => c,
        other => return Err(unexpected(&what, &other).into()),
    };
    if json {
        print_json(&c)?;
    } else {
        writeln!(
            std::io::stdout().lock(),
            "{}: checkpoint acknowledged, sequence {}",
            c.dom,
            c.acked_seq
        )?;
    }
    Ok(())
}

fn events(a: &EventsArgs, json: bool) -> Result<(), Outcome> {
    let what = match &a.dom {
        Some(d) => format!("cannot follow the events of guest {d} on {}", this_host()),
        None => format!("cannot follow the events of kemarid on {}", this_host()),
    };
    let socket = &a.sock.socket;
    let stream = Client::connect(socket)
        .and_then(|c| c.events(a.dom.as_deref()))
        .map_err(|e| failure(&what, socket, e))?;
    if a.count == Some(0) {
        return Ok(());
    }
    for (i, ev) in stream.enumerate() {
        let ev = ev.map_err(|e| failure(&what, socket, e))?;
        let mut out = std::io::stdout().lock();
        if json {
            serde_json::to_writer(&mut out, &ev).map_err(std::io::Error::from)?;
            writeln!(out)?;
        } else {
            writeln!(out, "{}", render_event(&ev))?;
        }
        out.flush()?;
        if a.count.is_some_and(|n| i as u64 + 1 >= n) {
            return Ok(());
        }
    }
    Err(Failure::new(
        &what,
        "connection-closed",
        format!(
            "kemarid on {} closed the event stream ({})",
            this_host(),
            socket.display()
        ),
        Some("kemarid stopped or dropped a subscriber that read too slowly: see its log".into()),
    )
    .into())
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

/// 1234567 -> "1.2M", 4321 -> "4.3k", 12.5 -> "12.5", 3 -> "3".
fn fmt_count(v: f64) -> String {
    if v >= 1e9 {
        format!("{:.1}G", v / 1e9)
    } else if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else if v.fract() == 0.0 || v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// Bytes per second in binary units: "0 B/s", "512 B/s", "1.5 MiB/s".
fn fmt_rate(bytes_per_s: f64) -> String {
    const UNITS: [&str; 5] = ["B/s", "KiB/s", "MiB/s", "GiB/s", "TiB/s"];
    let mut v = bytes_per_s.max(0.0);
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{v:.0} {}", UNITS[i])
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// Milliseconds: "0.42ms", "12.3ms", "1.5s".
fn fmt_ms(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{:.1}s", ms / 1000.0)
    } else if ms >= 10.0 {
        format!("{ms:.1}ms")
    } else {
        format!("{ms:.2}ms")
    }
}

/// Seconds: "42s", "3m05s", "2h07m".
fn fmt_secs(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

fn heartbeat_cell(g: &GuestStatus) -> String {
    match &g.heartbeat {
        None => "off".to_string(),
        Some(h) => match h.last_heard_ms {
            Some(ms) => format!("{} ({} ago)", h.peer, fmt_ms(ms)),
            None => h.peer.clone(),
        },
    }
}

const COLUMNS: [&str; 12] = [
    "GUEST",
    "ROLE",
    "PEER",
    "STATE",
    "CKPT/S",
    "LAST-ACK",
    "PAUSE p50/p99",
    "DIRTY/CKPT",
    "LAG",
    "LINK",
    "HEARTBEAT",
    "DOMID",
];

fn status_row(g: &GuestStatus) -> [String; 12] {
    let primary = g.role == api::Role::Primary;
    [
        g.dom.clone(),
        g.role.as_str().to_string(),
        g.peer.clone(),
        g.state.as_str().to_string(),
        format!("{:.1}", g.checkpoints_per_s),
        opt(g.last_acked_seq),
        if primary && g.checkpoints > 0 {
            format!("{}/{}", fmt_ms(g.pause_ms.p50), fmt_ms(g.pause_ms.p99))
        } else {
            "-".to_string()
        },
        fmt_count(g.dirty_pages_per_checkpoint),
        g.replication_lag_ms.map_or_else(|| "-".to_string(), fmt_ms),
        fmt_rate(g.link_bytes_per_s),
        heartbeat_cell(g),
        opt(g.domid),
    ]
}

/// The status table (one row per guest, columns sized to their content) and, under it, a
/// line for each guest in its initial sync or with an error.
fn render_status(st: &StatusReply) -> String {
    if st.guests.is_empty() {
        return format!("kemarid on {}: no protected guests\n", st.host);
    }
    let rows: Vec<[String; 12]> = st.guests.iter().map(status_row).collect();
    let mut widths = COLUMNS.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r.iter()) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(widths.iter()).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    let mut out = line(&COLUMNS.map(str::to_string));
    for r in &rows {
        out.push_str(&line(r));
    }
    for g in &st.guests {
        if let Some(s) = g.initial_sync.as_ref().filter(|s| !s.done) {
            let pct = if s.total > 0 {
                100.0 * s.pages.min(s.total) as f64 / s.total as f64
            } else {
                0.0
            };
            out.push_str(&format!(
                "{}: initial sync {pct:.0}% ({} of {} pages, {} pages/s, round {}, ETA {})\n",
                g.dom,
                s.pages,
                s.total,
                fmt_count(s.rate_pages_per_s),
                s.round,
                s.eta_s.map_or_else(|| "-".to_string(), fmt_secs)
            ));
        }
        if let Some(e) = &g.error {
            out.push_str(&format!("{}: error: {e}\n", g.dom));
        }
    }
    out
}

/// Unix time -> "YYYY-MM-DDTHH:MM:SS.mmmZ" (UTC).
fn fmt_time(t: f64) -> String {
    let ms_total = (t.max(0.0) * 1000.0).round() as i64;
    let (secs, ms) = (ms_total.div_euclid(1000), ms_total.rem_euclid(1000));
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        sod / 3600,
        (sod % 3600) / 60,
        sod % 60
    )
}

/// One event as a line of text: time, guest, kind, details.
fn render_event(ev: &Event) -> String {
    let detail = match &ev.kind {
        EventKind::State { from, to, reason } => format!(
            "state {} -> {}: {reason}",
            from.map_or("(new)", |f| f.as_str()),
            to.as_str()
        ),
        EventKind::InitialSync {
            pages,
            total,
            rate_pages_per_s,
        } => format!(
            "initial-sync {pages}/{total} pages, {} pages/s",
            fmt_count(*rate_pages_per_s)
        ),
        EventKind::Checkpoints {
            last_acked_seq,
            checkpoints,
            per_s,
        } => format!(
            "checkpoints last ACKed sequence {last_acked_seq}, {checkpoints} in total, {per_s:.1}/s"
        ),
        EventKind::Heartbeat { peer } => format!("heartbeat peer {peer}"),
        EventKind::FailedOver { domid, seq } => format!(
            "failed-over runs here{} from checkpoint {}",
            domid.map(|d| format!(" as domain {d}")).unwrap_or_default(),
            opt(*seq)
        ),
        EventKind::WorkerExit { pid, code } => match code {
            Some(c) => format!("worker-exit pid {pid} exited with status {c}"),
            None => format!("worker-exit pid {pid} killed by a signal"),
        },
        EventKind::Adopted { pid } => format!("adopted worker pid {pid}"),
    };
    format!("{} {} {detail}", fmt_time(ev.time), ev.dom)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest(dom: &str) -> GuestStatus {
        GuestStatus {
            dom: dom.to_string(),
            domid: Some(7),
            role: api::Role::Primary,
            peer: "host2".to_string(),
            state: GuestState::Protected,
            since: 0.0,
            worker_pid: None,
            checkpoints: 120,
            checkpoints_per_s: 9.96,
            last_acked_seq: Some(121),
            pause_ms: api::Quantiles {
                p50: 0.42,
                p99: 12.34,
                max: 20.0,
            },
            checkpoint_ms: api::Quantiles::default(),
            dirty_pages_per_checkpoint: 53.5,
            replication_lag_ms: Some(40.0),
            link_bytes_per_s: 3.0 * 1024.0 * 1024.0,
            bytes: 1 << 30,
            heartbeat: Some(api::HeartbeatStatus {
                period_ms: 100,
                misses_allowed: 5,
                peer: "alive".to_string(),
                last_heard_ms: Some(35.0),
                misses: 0,
            }),
            initial_sync: None,
            error: None,
        }
    }

    #[test]
    fn status_table_has_every_figure_in_its_column() {
        let mut g2 = guest("db-with-a-long-name");
        g2.role = api::Role::Secondary;
        g2.peer = "host1".to_string();
        g2.state = GuestState::InitialSync;
        g2.heartbeat = None;
        g2.last_acked_seq = None;
        g2.checkpoints = 0;
        g2.initial_sync = Some(api::InitialSync {
            pages: 1024,
            total: 4096,
            rate_pages_per_s: 20_000.0,
            round: 0,
            eta_s: Some(125.0),
            done: false,
        });
        g2.error = Some("peer slow".to_string());
        let st = StatusReply {
            host: "host1".to_string(),
            guests: vec![guest("web1"), g2],
        };
        let text = render_status(&st);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        let hdr = lines[0];
        let col = |name: &str| hdr.find(name).unwrap();
        let row = lines[1];
        assert_eq!(&row[col("GUEST")..col("ROLE")].trim_end(), &"web1");
        assert_eq!(&row[col("ROLE")..col("PEER")].trim_end(), &"primary");
        assert_eq!(&row[col("STATE")..col("CKPT/S")].trim_end(), &"protected");
        assert_eq!(&row[col("CKPT/S")..col("LAST-ACK")].trim_end(), &"10.0");
        assert_eq!(&row[col("LAST-ACK")..col("PAUSE")].trim_end(), &"121");
        assert_eq!(
            &row[col("PAUSE")..col("DIRTY/CKPT")].trim_end(),
            &"0.42ms/12.3ms"
        );
        assert_eq!(&row[col("DIRTY/CKPT")..col("LAG")].trim_end(), &"53.5");
        assert_eq!(&row[col("LAG")..col("LINK")].trim_end(), &"40.0ms");
        assert_eq!(&row[col("LINK")..col("HEARTBEAT")].trim_end(), &"3.0 MiB/s");
        assert_eq!(
            &row[col("HEARTBEAT")..col("DOMID")].trim_end(),
            &"alive (35.0ms ago)"
        );
        let row2 = lines[2];
        assert!(
            row2.starts_with("db-with-a-long-name  secondary  host1"),
            "{row2}"
        );
        assert_eq!(&row2[col("LAST-ACK")..col("PAUSE")].trim_end(), &"-");
        assert_eq!(&row2[col("HEARTBEAT")..col("DOMID")].trim_end(), &"off");
        assert_eq!(
            lines[3],
            "db-with-a-long-name: initial sync 25% (1024 of 4096 pages, 20.0k pages/s, round 0, ETA 2m05s)"
        );
        assert_eq!(lines[4], "db-with-a-long-name: error: peer slow");
    }

    #[test]
    fn empty_status_says_so() {
        let st = StatusReply {
            host: "h".to_string(),
            guests: vec![],
        };
        assert_eq!(render_status(&st), "kemarid on h: no protected guests\n");
    }

    #[test]
    fn units() {
        assert_eq!(fmt_rate(0.0), "0 B/s");
        assert_eq!(fmt_rate(1023.0), "1023 B/s");
        assert_eq!(fmt_rate(1536.0), "1.5 KiB/s");
        assert_eq!(fmt_rate(5.0 * 1024.0 * 1024.0 * 1024.0), "5.0 GiB/s");
        assert_eq!(fmt_ms(0.123), "0.12ms");
        assert_eq!(fmt_ms(99.94), "99.9ms");
        assert_eq!(fmt_ms(1500.0), "1.5s");
        assert_eq!(fmt_secs(59.4), "59s");
        assert_eq!(fmt_secs(3599.0), "59m59s");
        assert_eq!(fmt_secs(7260.0), "2h01m");
        assert_eq!(fmt_count(3.0), "3");
        assert_eq!(fmt_count(12.25), "12.2");
        assert_eq!(fmt_count(4321.0), "4321");
        assert_eq!(fmt_count(43_210.0), "43.2k");
        assert_eq!(fmt_count(2_500_000.0), "2.5M");
    }

    #[test]
    fn event_lines() {
        let ev = Event {
            time: 1_764_558_000.25,
            dom: "web1".to_string(),
            kind: EventKind::State {
                from: Some(GuestState::InitialSync),
                to: GuestState::Protected,
                reason: "initial sync acknowledged".to_string(),
            },
        };
        assert_eq!(
            render_event(&ev),
            "2025-12-01T03:00:00.250Z web1 state initial-sync -> protected: initial sync acknowledged"
        );
        let ev = Event {
            time: 951_782_400.0, // 2000-02-29
            dom: "d".to_string(),
            kind: EventKind::WorkerExit { pid: 9, code: None },
        };
        assert_eq!(
            render_event(&ev),
            "2000-02-29T00:00:00.000Z d worker-exit pid 9 killed by a signal"
        );
        assert_eq!(fmt_time(0.0), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn start_options_map_the_flags() {
        use clap::Parser;
        #[derive(Parser)]
        struct T {
            #[command(subcommand)]
            c: CtlCommand,
        }
        let t = T::try_parse_from([
            "kemari",
            "start",
            "web1",
            "host2:7300",
            "--interval-ms",
            "50",
            "--no-suspend",
            "--unpause",
            "--heartbeat-misses",
            "3",
        ])
        .unwrap();
        let CtlCommand::Start(a) = t.c else {
            panic!("not start")
        };
        assert_eq!(
            a.options(),
            StartOptions {
                interval_ms: Some(50),
                suspend: Some(false),
                unpause: Some(true),
                heartbeat_misses: Some(3),
                ..StartOptions::default()
            }
        );
        assert_eq!(a.sock.socket, Path::new(api::DEFAULT_SOCKET));
        let t = T::try_parse_from(["kemari", "start", "web1", "h", "--suspend"]).unwrap();
        let CtlCommand::Start(a) = t.c else {
            panic!("not start")
        };
        assert_eq!(a.options().suspend, Some(true));
        assert_eq!(a.options().unpause, None);
    }
}
