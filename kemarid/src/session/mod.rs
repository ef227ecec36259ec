//! The session layer (issue 12): the code that runs one protected guest, as opposed to the
//! engine it drives ([`crate::sync`], [`crate::failover`]) and to the CLI that parses its
//! arguments and prints what happened (`bin/kemari`).
//!
//! * [`primary`]: what `kemari replicate` (and `kemari protect`) does: the initial sync,
//!   checkpoints, output commit, heartbeat, fence guard, the report of a loss, the stop.
//! * [`secondary`]: what `kemari receive` does: keep the replica, and with `--failover` run
//!   the guest here from the last ACKed checkpoint when the primary is dead.
//! * [`hook`]: the checkpoint hook of a protected guest, the composition of a held stop on
//!   request with the output commit of its disk's and NIC's gates; the order of the wrappers
//!   is what makes output commit correct (see the module).
//! * [`outputs`]: the guest's disk and NIC served in this process by Kemari's blkback and
//!   netback, each in its own thread and behind its own output gate, and the NIC served
//!   after a failover.
//! * [`fence`]: the primary's fence guard, a guardian process that fences the guest if the
//!   primary's process dies while protection is on.
//!
//! Each session is driven by a plain options struct (the values of the CLI's arguments) and
//! returns typed outcomes; the CLI prints them. The progress lines on stderr (`kemari
//! replicate: ...`, `kemari receive: ...`) are written here, as the lab reads them.

use std::time::Duration;

use crate::failover::heartbeat::HeartbeatConfig;

pub mod fence;
pub mod hook;
pub mod outputs;
pub mod primary;
pub mod secondary;

/// Heartbeat timing (both ends should agree).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HeartbeatTiming {
    /// Heartbeat period (ms).
    pub period_ms: u64,
    /// The peer is dead after this many missed heartbeats.
    pub misses: u32,
}

impl HeartbeatTiming {
    /// The heartbeat's configuration.
    pub fn config(&self) -> HeartbeatConfig {
        HeartbeatConfig {
            period: Duration::from_millis(self.period_ms),
            misses: self.misses,
            connect_timeout: None,
        }
    }
}

/// Who handles the process's signals during a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signals {
    /// The session blocks and waits for them as the `kemari` commands do (SIGINT/SIGTERM stop,
    /// SIGUSR1 holds or hands the disk over, SIGUSR2 as kemarid's worker); each is blocked in
    /// the calling thread before the threads that must inherit the mask start.
    Process,
    /// None are touched (a session inside a test or another program).
    Off,
}

/// `e` and its sources, `: `-separated (as `anyhow`'s `{:#}`).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
