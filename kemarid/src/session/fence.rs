//! The primary's fence guard (`crate::failover::fence`): `kemari replicate` starts the
//! guardian `kemari fence-guard` (a hidden subcommand of this same program) with a pipe on its
//! stdin; the guardian pauses and destroys the guest when `kemari replicate` dies or hangs
//! while protection is on.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{ChildStdin, Command, Stdio};
use std::sync::Arc;

use hypervisor::DomId;

use crate::failover::fence::{self, Guard};
use crate::failover::heartbeat::HeartbeatConfig;

/// The shared guard of `kemari replicate`.
pub type SharedGuard = Arc<Guard<ChildStdin>>;

/// Errors of starting the guardian.
#[derive(Debug, thiserror::Error)]
pub enum FenceStartError {
    /// This program's path is unknown.
    #[error("finding this program to start the fence guard")]
    CurrentExe(#[source] std::io::Error),
    /// The guardian could not be started.
    #[error("starting the fence guard {}", exe.display())]
    Spawn {
        /// The program started.
        exe: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The guardian was started without a pipe on its stdin.
    #[error("the fence guard has no stdin pipe")]
    NoPipe,
}

/// Starts the guardian of `domid` (its stderr is ours: the same log). Its silence is
/// [`fence::silence_for`] the heartbeat's timing.
pub fn start(domid: DomId, hb: &HeartbeatConfig) -> Result<SharedGuard, FenceStartError> {
    let exe = std::env::current_exe().map_err(FenceStartError::CurrentExe)?;
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
        .map_err(|source| FenceStartError::Spawn {
            exe: exe.clone(),
            source,
        })?;
    let stdin = child.stdin.take().ok_or(FenceStartError::NoPipe)?;
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
