//! `kemari replicate`, `kemari receive` and the sync-related `kemari debug` commands.
//!
//! The sessions themselves are the library's (`kemarid::session::primary`, `secondary`): this
//! parses their arguments, converts them into the sessions' options, runs them in the
//! foreground and prints what they return. They are the lab's handle on the engine and
//! kemarid's workers.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use hypervisor::{DomainControl, Hypervisor};
use kemarid::session::outputs::Device;
use kemarid::session::primary::{self, PrimaryEnd, PrimaryOptions, PrimaryReport};
use kemarid::session::secondary::{
    self, FailoverMethod, FailoverVif, SecondaryEnd, SecondaryOptions, SecondaryReport,
};
use kemarid::session::{HeartbeatTiming, Signals};
use kemarid::sync::hash::{cpu_hashes, mem_hash};
use kemarid::sync::receiver::read_staged;

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

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

/// Runs a top-level sync command.
pub fn run(cmd: SyncCommand, json: bool) -> anyhow::Result<ExitCode> {
    match cmd {
        SyncCommand::Replicate(a) => {
            let status_file = a.status_file.clone();
            report_failure(status_file, replicate(a, json))
        }
        SyncCommand::Receive(a) => {
            let status_file = a.status_file.clone();
            report_failure(status_file, receive(a, json))
        }
        SyncCommand::FenceGuard(a) => crate::fence_cmd::run_guard(a),
        SyncCommand::Protect(mut a) => {
            if a.commit.disk.is_some() {
                let host = hypervisor::xen::XenHost::open()
                    .context("cannot open this host's Xen (run in a Xen 4.17 dom0, as root)")?;
                let domid = kemarid::debug::resolve_domain(&host, &a.domain)?;
                let info = host.domain_info(domid)?;
                anyhow::ensure!(
                    info.paused,
                    "kemari protect: domain {domid} runs: pause it (xl pause) before taking its disk over, so that the copy on the new secondary equals it"
                );
                a.commit.takeover = true;
            }
            replicate(a, json)
        }
    }
}

/// As kemarid's worker: an error that ends the command before it reported an end goes into
/// the status file.
fn report_failure(
    status_file: Option<PathBuf>,
    r: anyhow::Result<ExitCode>,
) -> anyhow::Result<ExitCode> {
    if let (Some(p), Err(e)) = (&status_file, &r) {
        kemarid::daemon::report::mark_failed(p, &format!("{e:#}"));
    }
    r
}

fn replicate(a: ReplicateArgs, json: bool) -> anyhow::Result<ExitCode> {
    let opts = a.options()?;
    let mut printed = Ok(());
    let end = primary::replicate(
        &opts,
        Signals::Process,
        hypervisor::xen::XenHost::open,
        &mut |r| {
            if printed.is_ok() {
                printed = print_primary(&r, json);
            }
        },
    );
    printed?;
    Ok(match end? {
        PrimaryEnd::Replicated => ExitCode::SUCCESS,
        PrimaryEnd::StoppedAfterInitialSync => ExitCode::FAILURE,
    })
}

fn print_primary(r: &PrimaryReport<'_>, json: bool) -> anyhow::Result<()> {
    match r {
        PrimaryReport::Replicated(r) if json => print_json(&r.json())?,
        PrimaryReport::Replicated(r) => println!("{}", r.line()),
        PrimaryReport::Device(_, r) if json => println!("{}", r.json),
        PrimaryReport::Device(Device::Vif, r) => println!("kemari replicate: {}", r.text),
        PrimaryReport::Device(_, r) => println!("{}", r.text),
    }
    Ok(())
}

fn receive(a: ReceiveArgs, json: bool) -> anyhow::Result<ExitCode> {
    let opts = a.options()?;
    let mut printed = Ok(());
    let end = secondary::receive(
        &opts,
        Signals::Process,
        secondary::this_host_xen,
        &mut |r| {
            if printed.is_ok() {
                printed = print_secondary(&r, json);
            }
        },
    );
    printed?;
    Ok(match end? {
        SecondaryEnd::FailedOver | SecondaryEnd::Served { failed: false } => ExitCode::SUCCESS,
        SecondaryEnd::Served { failed: true } => ExitCode::FAILURE,
    })
}

fn print_secondary(r: &SecondaryReport<'_>, json: bool) -> anyhow::Result<()> {
    match r {
        SecondaryReport::Received(r) if json => print_json(&r.json())?,
        SecondaryReport::Received(r) => println!("{}", r.line()),
        SecondaryReport::FailoverDisk(d) if json => print_json(&d.json())?,
        SecondaryReport::FailoverDisk(d) => println!("{}", d.line()),
        SecondaryReport::FailoverVif(r) if json => {
            println!("{}", serde_json::json!({ "vif": r.json }))
        }
        SecondaryReport::FailoverVif(r) => println!("kemari receive: {}", r.text),
    }
    Ok(())
}

/// Runs a sync-related debug command.
pub fn run_debug(hv: &dyn Hypervisor, cmd: SyncDebug, json: bool) -> anyhow::Result<ExitCode> {
    match cmd {
        SyncDebug::MemHash { domain, per_page } => {
            let domid = kemarid::debug::resolve_domain(hv, &domain)?;
            let max = hv.maximum_gpfn(domid)?;
            let h = mem_hash(hv, domid, max, per_page)?;
            if json {
                print_json(&serde_json::json!({"domid": domid, "max_pfn": max, "mem": h}))?;
            } else {
                println!(
                    "domain {domid}: pages={} holes={} hash={}",
                    h.pages, h.holes, h.hash
                );
                for (pfn, ph) in h.per_page.unwrap_or_default() {
                    println!("{pfn:#x} {ph}");
                }
            }
        }
        SyncDebug::XenMapped { domain } => {
            let domid = kemarid::debug::resolve_domain(hv, &domain)?;
            let max = hv.maximum_gpfn(domid)?;
            let mut bitmap = hypervisor::DirtyBitmap::new(max + 1);
            hv.log_dirty_enable(domid)
                .with_context(|| format!("enabling log-dirty on domain {domid}"))?;
            let r = hv.log_dirty_clean_final(domid, &mut bitmap);
            if let Err(e) = hv.log_dirty_disable(domid) {
                eprintln!("kemari: turning log-dirty off on domain {domid}: {e}");
            }
            r.with_context(|| format!("final log-dirty harvest of domain {domid}"))?;
            let pfns: Vec<u64> = bitmap.iter().collect();
            if json {
                print_json(&serde_json::json!({"domid": domid, "pfns": pfns}))?;
            } else {
                let hex: Vec<String> = pfns.iter().map(|p| format!("{p:#x}")).collect();
                println!("domain {domid}: {} pages: {}", pfns.len(), hex.join(" "));
            }
        }
        SyncDebug::PageDump { domain, pfn } => {
            let domid = kemarid::debug::resolve_domain(hv, &domain)?;
            let pfn = match pfn.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => pfn.parse(),
            }
            .with_context(|| format!("pfn {pfn:?} is not a number"))?;
            let page = kemarid::debug::read_page(hv, domid, pfn)?;
            let mut out = std::io::stdout().lock();
            for (i, line) in page.chunks(16).enumerate() {
                if line.iter().any(|b| *b != 0) {
                    let hex: Vec<String> = line.iter().map(|b| format!("{b:02x}")).collect();
                    writeln!(out, "{:04x}: {}", i * 16, hex.join(" "))?;
                }
            }
        }
        SyncDebug::CpuContext { domain } => {
            let domid = kemarid::debug::resolve_domain(hv, &domain)?;
            let ctx = hv.hvm_context(domid)?;
            print_cpus(&format!("domain {domid}"), &ctx, None, None, json)?;
        }
        SyncDebug::DiskLog { file, replay, vdev } => {
            crate::commit_cmd::disk_log(&file, replay, &vdev, json)?;
        }
        SyncDebug::StagedContext { file } => {
            let staged = read_staged(&file)?;
            print_cpus(
                &file.display().to_string(),
                &staged.hvm_context,
                Some(staged.seq),
                Some(&staged.hvm_params),
                json,
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_cpus(
    what: &str,
    ctx: &[u8],
    seq: Option<u64>,
    params: Option<&[(u32, u64)]>,
    json: bool,
) -> anyhow::Result<()> {
    let cpus = cpu_hashes(ctx)?;
    if json {
        print_json(
            &serde_json::json!({"source": what, "seq": seq, "vcpus": cpus, "params": params}),
        )?;
    } else {
        for c in cpus {
            println!(
                "{what}{}: vcpu {} cpu-hash {} rip {:#x} tsc {}",
                seq.map_or(String::new(), |s| format!(" seq {s}")),
                c.vcpu,
                c.hash,
                c.rip,
                c.tsc
            );
        }
    }
    Ok(())
}
