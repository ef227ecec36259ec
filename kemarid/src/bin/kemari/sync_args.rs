//! The arguments of `kemari replicate`, `kemari receive`, `kemari protect` and `kemari debug
//! sync ...` (clap), and their conversion into the sessions' options (`kemarid::session`).

use std::path::PathBuf;

use clap::{Args, Subcommand};
use kemarid::session::primary::PrimaryOptions;
use kemarid::session::secondary::{FailoverMethod, FailoverVif, SecondaryOptions};
use kemarid::session::HeartbeatTiming;

/// Top-level commands of the sync engine.
#[derive(Subcommand, Debug)]
pub enum SyncCommand {
    /// Protect a guest by hand (foreground; the lab's handle until the control API exists):
    /// connect to `kemari receive` on the secondary, copy the guest live (progress lines), then
    /// take checkpoints at the maximum epoch interval until --checkpoints are ACKed (forever
    /// without it). With --hold the guest is left PAUSED right after the last ACK, exactly at
    /// the state the secondary holds. Prints a final stats line (--json: one JSON object).
    Replicate(ReplicateArgs),
    /// Serve one primary (foreground; the lab's handle until the control API exists): spool the
    /// initial image into --spool-dir, build the replica paused with `xl restore -p`, apply and
    /// ACK checkpoints until the stream ends. The replica is left paused; the staged CPU/device
    /// state of the last checkpoint is in DIR/staged.kemari (see `kemari debug staged-context`).
    Receive(ReceiveArgs),
    /// Protect again a guest that runs here after a failover (same options as replicate):
    /// with --disk, its disk device, still served by `kemari receive` after the failover, is
    /// taken over (Kemari's `Attached` state: the live ring and in-flight journal, no
    /// handshake) and put under output commit. Before it: `xl pause GUEST`, SIGUSR1 to that
    /// `kemari receive` (it hands the disk over), and the disk copied to the new secondary;
    /// give --unpause. A full initial sync follows (docs/failover.md, re-protection).
    Protect(ReplicateArgs),
    /// The fencing guardian `kemari replicate` starts (internal).
    #[command(hide = true)]
    FenceGuard(crate::fence_cmd::FenceGuardArgs),
}

/// Arguments of `kemari replicate`.
#[derive(Args, Debug)]
pub struct ReplicateArgs {
    /// Domain id or name (HVM or PVH).
    pub domain: String,
    /// The secondary's `kemari receive` address.
    pub target: String,
    /// Stop after this many checkpoints.
    #[arg(long)]
    pub checkpoints: Option<u64>,
    /// Maximum epoch interval: a checkpoint at least this often (ms).
    #[arg(long, default_value_t = 100)]
    pub interval_ms: u64,
    /// Minimum run time: the guest runs at least this long between two checkpoints, however
    /// many I/O triggers are pending (they coalesce into the next one). 0: none. Bounds the
    /// checkpoint rate of a guest whose output is always held (docs/sync.md).
    #[arg(long, default_value_t = 0)]
    pub min_run_ms: u64,
    /// Leave the guest paused right after the last checkpoint's ACK (needs --checkpoints).
    #[arg(long, requires = "checkpoints")]
    pub hold: bool,
    /// Seconds to wait for each checkpoint's ACK.
    #[arg(long, default_value_t = 30)]
    pub ack_timeout_s: u64,
    /// Most live rounds after the first full copy.
    #[arg(long, default_value_t = 8)]
    pub max_live_rounds: u32,
    /// Name of the replica in the image's configuration (default: the guest's name).
    #[arg(long)]
    pub replica_name: Option<String>,
    /// Checkpoints at a cooperative suspend point (as Remus: the guest suspends, is copied,
    /// and resumes with its suspend cancelled) instead of a toolstack pause: what lets the
    /// secondary resume a PV-aware guest (docs/failover.md).
    #[arg(long)]
    pub suspend: bool,
    /// Seconds the guest may take to suspend for one checkpoint (--suspend).
    #[arg(long, default_value_t = kemarid::daemon::config::DEFAULT_SUSPEND_TIMEOUT_S)]
    pub suspend_timeout_s: u64,
    /// UDP port of the secondary's heartbeat (`kemari receive --heartbeat-listen`), on the
    /// target's host: when the secondary stops answering, protection ends at once.
    #[arg(long)]
    pub heartbeat_port: Option<u16>,
    #[command(flatten)]
    pub heartbeat: HeartbeatArgs,
    /// Do not start the fence guard. With --heartbeat-port a guardian process pauses and
    /// destroys the guest if this process dies or hangs while protection is on, before the
    /// secondary (which then hears no heartbeat) resumes its copy (docs/failover.md).
    #[arg(long)]
    pub no_fence: bool,
    /// Worker of kemarid: rewrite this status file (JSON, docs/api.md) as protection goes; a
    /// SIGUSR2 then asks for a checkpoint now.
    #[arg(long)]
    pub status_file: Option<PathBuf>,
    /// Output commit: the guest's disk served here (--disk, --vdev, --unpause, --commit-log).
    #[command(flatten)]
    pub commit: crate::commit_cmd::CommitArgs,
}

/// Heartbeat timing (both ends should agree).
#[derive(Args, Debug, Clone, Copy)]
pub struct HeartbeatArgs {
    /// Heartbeat period (ms).
    #[arg(long, default_value_t = 100)]
    pub heartbeat_ms: u64,
    /// The peer is dead after this many missed heartbeats.
    #[arg(long, default_value_t = 5)]
    pub heartbeat_misses: u32,
}

impl From<HeartbeatArgs> for HeartbeatTiming {
    fn from(a: HeartbeatArgs) -> HeartbeatTiming {
        HeartbeatTiming {
            period_ms: a.heartbeat_ms,
            misses: a.heartbeat_misses,
        }
    }
}

/// How `kemari receive --failover` resumes the guest.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailoverMethodArg {
    /// xl save image from the replica + staged state, destroy the replica, xl restore.
    Restore,
    /// Load the staged HVM context into the replica and unpause it (experiment only).
    InPlace,
}

/// Arguments of `kemari receive`.
#[derive(Args, Debug)]
pub struct ReceiveArgs {
    /// Address to listen on (`0.0.0.0:7100`).
    #[arg(long)]
    pub listen: String,
    /// Folder for the spooled image and the staged state.
    #[arg(long)]
    pub spool_dir: PathBuf,
    /// Serve one connection, then exit.
    #[arg(long)]
    pub once: bool,
    /// Name of the replica domain (default: the name in the image).
    #[arg(long)]
    pub name: Option<String>,
    /// Give up when the primary is silent this long (s; 0: never).
    #[arg(long, default_value_t = 600)]
    pub idle_timeout_s: u64,
    /// UDP address to answer the primary's heartbeat on (`0.0.0.0:7101`).
    #[arg(long)]
    pub heartbeat_listen: Option<String>,
    #[command(flatten)]
    pub heartbeat: HeartbeatArgs,
    /// The secondary's copy of the guest's disk (--disk, --vdev).
    #[command(flatten)]
    pub disk: crate::commit_cmd::ReceiveDiskArgs,
    /// The guest's NIC after a failover (--vif).
    #[command(flatten)]
    pub net: crate::commit_cmd::ReceiveNetArgs,
    /// Worker of kemarid: rewrite this status file (JSON, docs/api.md) as the replica is kept;
    /// a SIGUSR2 then asks for a failover now (treated as the primary's death).
    #[arg(long)]
    pub status_file: Option<PathBuf>,
    /// When the primary is dead (heartbeat) after the initial sync, run the guest here from
    /// the last ACKed checkpoint.
    #[arg(long, requires = "heartbeat_listen")]
    pub failover: bool,
    /// How the guest is resumed at failover.
    #[arg(long, value_enum, default_value = "restore")]
    pub failover_method: FailoverMethodArg,
}

/// Sync-related `kemari debug` commands.
#[derive(Subcommand, Debug)]
pub enum SyncDebug {
    /// Hash every populated page of a domain (pause it first for a meaningful result).
    MemHash {
        /// Domain id or name.
        domain: String,
        /// Also list each page's hash.
        #[arg(long)]
        per_page: bool,
    },
    /// List the guest pages Xen keeps mapped and writes itself (vcpu_info, runstate, FIFO event
    /// arrays): log-dirty on, one final-round harvest (XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL), off.
    /// Pause the domain first, or pages the guest writes meanwhile are listed too.
    XenMapped {
        /// Domain id or name.
        domain: String,
    },
    /// Print the non-zero 16-byte lines of one guest page in hex (to diff a page across hosts).
    PageDump {
        /// Domain id or name.
        domain: String,
        /// Guest page frame number (decimal or 0x-prefixed hex).
        pfn: String,
    },
    /// Fingerprint of each vCPU's HVM_SAVE_CPU record of a domain's current HVM context (the
    /// `tsc` field, which Xen recomputes at every save, is excluded from the hash and printed).
    CpuContext {
        /// Domain id or name.
        domain: String,
    },
    /// The same fingerprints for the staged state a `kemari receive` wrote (DIR/staged.kemari).
    StagedContext {
        /// The staged state file.
        file: PathBuf,
    },
    /// List the disk write log a `kemari receive --disk` kept (DIR/disklog.kemari: the last
    /// applied checkpoint's writes) or was applying when it died (DIR/disklog.kemari.tmp); with
    /// --replay, write its entries to the copy (idempotent: brings a copy left between two
    /// checkpoints by a receiver that died while applying to that checkpoint).
    DiskLog {
        /// The log file.
        file: PathBuf,
        /// The secondary's copy of the disk to write the entries to.
        #[arg(long)]
        replay: Option<PathBuf>,
        /// Virtual device the copy stands for.
        #[arg(long, default_value = "xvda")]
        vdev: String,
    },
}

impl From<FailoverMethodArg> for FailoverMethod {
    fn from(m: FailoverMethodArg) -> FailoverMethod {
        match m {
            FailoverMethodArg::Restore => FailoverMethod::Restore,
            FailoverMethodArg::InPlace => FailoverMethod::InPlace,
        }
    }
}

impl ReplicateArgs {
    /// The session's options.
    pub fn options(&self) -> anyhow::Result<PrimaryOptions> {
        Ok(PrimaryOptions {
            domain: self.domain.clone(),
            target: self.target.clone(),
            checkpoints: self.checkpoints,
            interval_ms: self.interval_ms,
            min_run_ms: self.min_run_ms,
            hold: self.hold,
            ack_timeout_s: self.ack_timeout_s,
            max_live_rounds: self.max_live_rounds,
            replica_name: self.replica_name.clone(),
            suspend: self.suspend,
            suspend_timeout_s: self.suspend_timeout_s,
            heartbeat_port: self.heartbeat_port,
            heartbeat: self.heartbeat.into(),
            no_fence: self.no_fence,
            status_file: self.status_file.clone(),
            outputs: self.commit.config()?,
            unpause: self.commit.unpause,
            config_dir: None,
        })
    }
}

impl ReceiveArgs {
    /// The session's options.
    pub fn options(&self) -> anyhow::Result<SecondaryOptions> {
        let vif = match &self.net.vif {
            None => None,
            Some(s) => Some(FailoverVif {
                settings: s.clone(),
                spec: crate::attach_cmd::parse_vif_spec(s)?,
            }),
        };
        Ok(SecondaryOptions {
            listen: self.listen.clone(),
            spool_dir: self.spool_dir.clone(),
            once: self.once,
            name: self.name.clone(),
            idle_timeout_s: self.idle_timeout_s,
            heartbeat_listen: self.heartbeat_listen.clone(),
            heartbeat: self.heartbeat.into(),
            disks: self.disk.disks()?,
            vdev: self.disk.vdev.clone(),
            vif,
            status_file: self.status_file.clone(),
            failover: self.failover,
            failover_method: self.failover_method.into(),
        })
    }
}
