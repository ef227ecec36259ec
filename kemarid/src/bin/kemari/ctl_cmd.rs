//! `kemari start/stop/status/failover/checkpoint/events`: the operator's verbs, over kemarid's
//! control socket (docs/api.md, docs/cli.md); their arguments are in `ctl_args.rs`.
//!
//! Every verb sends one request to the daemon of this host ([`kemarid::ctl`]) and prints its
//! answer, as text ([`kemarid::ctl::render`]) or (with `--json`) as the reply's JSON. Failures
//! print what failed for which guest and host, why, and what to do about it, and exit with
//! status 1 (xl's style; 2 is a usage error).

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use kemarid::api;
use kemarid::ctl::{self, render, CtlError, SyncProgress};

use crate::ctl_args::{
    CheckpointArgs, CtlCommand, EventsArgs, FailoverArgs, StartArgs, StatusArgs, StopArgs,
};

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
