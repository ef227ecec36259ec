//! Self-fencing of the primary (`kemarid::failover::fence`): `kemari replicate` starts the
//! guardian `kemari fence-guard` (hidden subcommand) with a pipe on its stdin; the guardian
//! pauses and destroys the guest when `kemari replicate` dies or hangs while protection is on.

use std::os::unix::process::CommandExt;
use std::process::{ChildStdin, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Args;
use hypervisor::DomId;
use kemarid::failover::fence::{self, Guard, Verdict};
use kemarid::failover::heartbeat::HeartbeatConfig;
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

/// The shared guard of `kemari replicate`.
pub type SharedGuard = Arc<Guard<ChildStdin>>;

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Starts the guardian of `domid` (its stderr is ours: the same log). Its silence is
/// [`fence::silence_for`] the heartbeat's timing.
pub fn start(domid: DomId, hb: &HeartbeatConfig) -> anyhow::Result<SharedGuard> {
    let exe = std::env::current_exe().context("finding this program to start the fence guard")?;
    let silence = fence::silence_for(hb);
    let mut child = Command::new(&exe)
        .arg("fence-guard")
        .arg(domid.to_string())
        .arg("--silence-ms")
        .arg(silence.as_millis().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        // its own process group: a Ctrl-C meant for kemari replicate does not end it
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting the fence guard {}", exe.display()))?;
    let stdin = child
        .stdin
        .take()
        .context("the fence guard has no stdin pipe")?;
    eprintln!(
        "kemari replicate: fence guard {} for domain {domid}: once protection is on, the guest is paused and destroyed if this process dies or is silent for {} ms",
        child.id(),
        silence.as_millis()
    );
    // not waited for: it outlives this process on purpose
    drop(child);
    Ok(Arc::new(Guard::new(stdin)))
}

/// Disarms the guard when `kemari replicate` returns (any orderly end, including errors);
/// a panic is not an orderly end: the guard is left armed and the guardian fences.
pub struct DisarmOnReturn(pub Option<SharedGuard>);

impl DisarmOnReturn {
    /// Disarms now (protection ended in order).
    pub fn disarm(&self) {
        if let Some(g) = &self.0 {
            if let Err(e) = g.disarm() {
                log::warn!("{e}");
            }
        }
    }
}

impl Drop for DisarmOnReturn {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.disarm();
        }
    }
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
