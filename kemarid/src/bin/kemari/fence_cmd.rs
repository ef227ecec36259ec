//! Self-fencing of the primary (`kemarid::failover::fence`): `kemari replicate` starts the
//! guardian `kemari fence-guard` (hidden subcommand, run here) with a pipe on its stdin
//! (`kemarid::session::fence`); the guardian pauses and destroys the guest when `kemari
//! replicate` dies or hangs while protection is on.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use hypervisor::DomId;
use kemarid::daemon::report::unix_now;
use kemarid::failover::fence::{self, Verdict};
use kemarid::xltool::XlTool;

/// Arguments of the guardian (started by `kemari replicate`, not by hand).
#[derive(Args, Debug)]
pub struct FenceGuardArgs {
    /// The protected guest.
    pub domid: DomId,
    /// Fence when no tick came for this long once armed (ms).
    #[arg(long)]
    pub silence_ms: u64,
    /// Only pause the guest (default: pause, then `xl destroy`).
    #[arg(long)]
    pub pause_only: bool,
}

/// The guardian's main: watch stdin, fence on a verdict.
pub fn run_guard(a: FenceGuardArgs) -> anyhow::Result<ExitCode> {
    let mut input = std::io::stdin().lock();
    let verdict = fence::watch(&mut input, Duration::from_millis(a.silence_ms))?;
    let why = match verdict {
        Verdict::Disarmed => return Ok(ExitCode::SUCCESS),
        Verdict::Gone => "kemari replicate died without a clean stop".to_string(),
        Verdict::Silent { ms } => format!("kemari replicate silent for {ms} ms"),
    };
    let host = hypervisor::xen::XenHost::open().context("opening this host's Xen to fence")?;
    let paused = fence::fence(&host, a.domid);
    let t = unix_now();
    match &paused {
        Ok(()) => eprintln!(
            "kemari fence: {why}: domain {} PAUSED at {t:.3} (unix time): the secondary may resume it",
            a.domid
        ),
        Err(e) => eprintln!("kemari fence: {why}: {e} at {t:.3}"),
    }
    log::error!("fenced domain {}: {why}", a.domid);
    if !a.pause_only {
        match XlTool::default().destroy(a.domid) {
            Ok(()) => eprintln!(
                "kemari fence: domain {} DESTROYED at {:.3}",
                a.domid,
                unix_now()
            ),
            Err(e) => eprintln!("kemari fence: xl destroy {}: {e}", a.domid),
        }
    }
    paused.with_context(|| format!("fencing domain {}", a.domid))?;
    Ok(ExitCode::from(3))
}
