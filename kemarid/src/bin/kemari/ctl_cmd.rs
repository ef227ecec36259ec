//! `kemari start/stop/status/failover/checkpoint/events`: the operator's verbs, over kemarid's
//! control socket (docs/api.md, docs/cli.md).
//!
//! Every verb sends one request to the daemon of this host ([`kemarid::ctl`]) and prints its
//! answer, as text ([`kemarid::ctl::render`]) or (with `--json`) as the reply's JSON. Failures
//! print what failed for which guest and host, why, and what to do about it, and exit with
//! status 1 (xl's style; 2 is a usage error).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use kemarid::api::{self, StartOptions};
use kemarid::ctl::{self, render, CtlError, SyncProgress};

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
        Err(Outcome::Failed(f)) => report(&f, json),
    }
}

/// Reports a failure on stderr (and, with --json, as a JSON object on stdout); exit status 1.
fn report(f: &CtlError, json: bool) -> ExitCode {
    if json {
        let _ = writeln!(std::io::stdout().lock(), "{}", f.json());
    }
    let _ = std::io::stderr()
        .lock()
        .write_all(f.stderr_text().as_bytes());
    ExitCode::from(ctl::EXIT_FAILURE)
}

/// Why a verb did not succeed.
#[derive(Debug)]
enum Outcome {
    Failed(Box<CtlError>),
    Output(std::io::Error),
}

impl From<CtlError> for Outcome {
    fn from(f: CtlError) -> Self {
        Outcome::Failed(Box::new(f))
    }
}

impl From<std::io::Error> for Outcome {
    fn from(e: std::io::Error) -> Self {
        Outcome::Output(e)
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, v)?;
    writeln!(out)
}

fn print_line(line: &str) -> std::io::Result<()> {
    writeln!(std::io::stdout().lock(), "{line}")
}

fn start(a: &StartArgs, json: bool) -> Result<(), Outcome> {
    let s = ctl::Start {
        dom: a.dom.clone(),
        host: a.host.clone(),
        options: a.options(),
        timeout: a.timeout,
    };
    let mut g = ctl::start(&a.sock.socket, &s)?;
    if !a.no_wait {
        let mut bar = (!json && std::io::stdout().is_terminal()).then(SyncBar::new);
        let progress = bar.as_mut().map(|b| b as &mut dyn SyncProgress);
        g = ctl::wait_protected(&a.sock.socket, &s, g, progress)?;
    }
    if json {
        print_json(&g)?;
    } else {
        print_line(&render::start_line(&g))?;
    }
    Ok(())
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
}

impl SyncProgress for SyncBar {
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
        self.bar.set_message(render::sync_bar_message(s));
    }

    fn clear(&mut self) {
        self.bar.finish_and_clear();
    }
}

fn stop(a: &StopArgs, json: bool) -> Result<(), Outcome> {
    let g = ctl::stop(&a.sock.socket, &a.dom, a.no_wait)?;
    if json {
        print_json(&g)?;
    } else {
        print_line(&render::stop_line(&g))?;
    }
    Ok(())
}

fn status(a: &StatusArgs, json: bool) -> Result<(), Outcome> {
    let st = ctl::status(&a.sock.socket, a.dom.as_deref())?;
    if json {
        print_json(&st)?;
    } else {
        std::io::stdout()
            .lock()
            .write_all(render::render_status(&st).as_bytes())?;
    }
    Ok(())
}

fn failover(a: &FailoverArgs, json: bool) -> Result<(), Outcome> {
    let g = ctl::failover(&a.sock.socket, &a.dom, a.force)?;
    if json {
        print_json(&g)?;
    } else {
        print_line(&render::failover_line(&g, &ctl::this_host()))?;
    }
    Ok(())
}

fn checkpoint(a: &CheckpointArgs, json: bool) -> Result<(), Outcome> {
    let c = ctl::checkpoint(&a.sock.socket, &a.dom, a.wait_ms)?;
    if json {
        print_json(&c)?;
    } else {
        print_line(&render::checkpoint_line(&c))?;
    }
    Ok(())
}

fn events(a: &EventsArgs, json: bool) -> Result<(), Outcome> {
    let mut stream = ctl::events(&a.sock.socket, a.dom.as_deref())?;
    if a.count == Some(0) {
        return Ok(());
    }
    for (i, ev) in (&mut stream).enumerate() {
        let ev = ev?;
        let mut out = std::io::stdout().lock();
        if json {
            serde_json::to_writer(&mut out, &ev).map_err(std::io::Error::from)?;
            writeln!(out)?;
        } else {
            writeln!(out, "{}", render::render_event(&ev))?;
        }
        out.flush()?;
        if a.count.is_some_and(|n| i as u64 + 1 >= n) {
            return Ok(());
        }
    }
    Err(stream.closed().into())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

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
