//! The arguments of `kemari start/stop/status/failover/checkpoint/events` (docs/cli.md);
//! `ctl_cmd.rs` runs them.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use kemarid::api::{self, StartOptions};

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
    /// Minimum guest run time between two checkpoints (ms; 0: none): bounds the checkpoint
    /// rate of a guest whose output is always held.
    #[arg(long, value_name = "MS")]
    pub min_run_ms: Option<u64>,
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
    /// The options of the `start` request.
    pub fn options(&self) -> StartOptions {
        StartOptions {
            interval_ms: self.interval_ms,
            min_run_ms: self.min_run_ms,
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
            "--min-run-ms",
            "40",
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
                min_run_ms: Some(40),
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
