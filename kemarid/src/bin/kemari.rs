//! `kemari`: the command-line tool of Kemari for Xen.
//!
//! The operator's verbs (`start`, `stop`, `status`, `failover`, `checkpoint`, `events`) talk to
//! this host's kemarid over its control socket (`kemari/ctl_cmd.rs` over [`kemarid::ctl`],
//! docs/cli.md). The `debug` commands talk to Xen directly (no daemon needed) and prove the FFI
//! on a real dom0;
//! `replicate`/`receive` run the sync engine in the foreground (kemarid's workers run them).

use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use hypervisor::Hypervisor;

#[path = "kemari/attach_cmd.rs"]
mod attach_cmd;
#[path = "kemari/commit_cmd.rs"]
mod commit_cmd;
#[path = "kemari/ctl_args.rs"]
mod ctl_args;
#[path = "kemari/ctl_cmd.rs"]
mod ctl_cmd;
#[path = "kemari/debug_cmd.rs"]
mod debug_cmd;
#[path = "kemari/fence_cmd.rs"]
mod fence_cmd;
#[path = "kemari/pv_cmd.rs"]
mod pv_cmd;
#[path = "kemari/sync_args.rs"]
mod sync_args;
#[path = "kemari/sync_cmd.rs"]
mod sync_cmd;

/// Kemari for Xen: fault tolerance for Xen 4.17 HVM and PVH guests.
///
/// Protect guests through this host's kemarid (start, stop, status, failover, checkpoint,
/// events: exit status 0 on success, 1 on failure, 2 on a usage error; docs/cli.md); run the
/// sync engine in the foreground (replicate/receive); serve a guest's disk and NIC (attach);
/// low-level Xen operations (debug).
#[derive(Parser, Debug)]
#[command(name = "kemari", version, about, long_about)]
struct Cli {
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    #[command(flatten)]
    Ctl(ctl_args::CtlCommand),
    /// Low-level operations on this host's Xen, run in dom0 as root. They talk to Xen directly
    /// through libxenctrl & co (Xen 4.17 only) and need no daemon.
    #[command(subcommand)]
    Debug(DebugCommand),
    #[command(flatten)]
    Sync(sync_args::SyncCommand),
    /// Serve a disk image (userspace blkback) and/or a NIC on a dom0 tap (userspace netback) to
    /// a guest (foreground): creates the device nodes for a guest created paused without them
    /// (`xl create -p`), optionally unpauses it, and serves until the guest is gone or
    /// SIGINT/SIGTERM (docs/backends.md).
    Attach(attach_cmd::AttachArgs),
}

#[derive(Subcommand, Debug)]
pub enum DebugCommand {
    /// List the domains of this host (id, type, state, pages, vCPUs).
    Domains,
    #[command(flatten)]
    Sync(sync_args::SyncDebug),
    #[command(flatten)]
    Pv(pv_cmd::PvDebug),
    /// Show what an `xl save` image file contains (xl header, domain type, records by type,
    /// pages, pfn range, HVM context, params, emulator blobs). Needs no Xen; exit status 1 on
    /// malformed input.
    StreamInfo {
        /// Image file (written by `xl save` or by Kemari).
        file: std::path::PathBuf,
    },
    /// Pause a domain (Xen's pause count goes up by one).
    Pause {
        /// Domain id or name.
        domain: String,
    },
    /// Unpause a domain.
    Unpause {
        /// Domain id or name.
        domain: String,
    },
    /// Enable log-dirty mode, report the pages the guest dirties per interval, disable it again.
    LogDirty {
        /// Domain id or name (HVM or PVH: classic PV guests have no log-dirty on this Xen).
        domain: String,
        /// Number of rounds after the initial harvest.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Milliseconds between harvests.
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
    },
    /// Copy one guest page out (foreign mapping) and print its fingerprint or a hex dump.
    ReadPage {
        /// Domain id or name.
        domain: String,
        /// Guest page frame number (decimal or 0x-prefixed hex).
        pfn: String,
        /// Print a hex dump of the first 256 bytes.
        #[arg(long)]
        hexdump: bool,
    },
    /// Read a xenstore node.
    XsRead {
        /// Absolute xenstore path.
        path: String,
    },
    /// Watch a xenstore path and print events until the timeout passes.
    XsWatch {
        /// Absolute xenstore path (events for descendants are reported too).
        path: String,
        /// Seconds to watch.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
    },
    /// Exercise every Xen path the daemon depends on against a running HVM or PVH guest: list,
    /// pause/unpause, HVM context, log-dirty, page mapping, xenstore watch. Exit status 0 only if
    /// all steps pass.
    Selftest {
        /// Domain id or name of a running guest that writes memory.
        domain: String,
        /// Log-dirty rounds.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Milliseconds between log-dirty harvests.
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
    },
    /// Write a complete image of an HVM or PVH domain in `xl save` format, restorable by stock
    /// `xl restore`. With --destroy the guest is asked to suspend (like `xl save`), saved and
    /// destroyed; without it the guest is only paused while saved and runs on (such an image
    /// lacks the guest's PV state: see docs/stream.md).
    Save {
        /// Domain id or name.
        domain: String,
        /// Image file to write (created or truncated).
        file: std::path::PathBuf,
        /// Suspend the guest cooperatively and destroy it after the save (`xl save` without -c).
        #[arg(long)]
        destroy: bool,
        /// Name the domain gets in the image's config (default: unchanged).
        #[arg(long)]
        rename: Option<String>,
        /// Seconds the guest may take to suspend.
        #[arg(long, default_value_t = 60)]
        suspend_timeout: u64,
    },
    /// Build a replica domain from an `xl save` image the way the secondary does: `xl restore
    /// -p -e` under NAME (the image's config is renamed through a copy if needed), checked to be
    /// paused. With --unpause the replica is then let run.
    ReplicaRestore {
        /// Image file (`xl save` format).
        image: std::path::PathBuf,
        /// Name of the replica domain.
        name: String,
        /// Unpause the replica once built.
        #[arg(long)]
        unpause: bool,
    },
}

fn open_host() -> anyhow::Result<Box<dyn Hypervisor>> {
    let host = hypervisor::xen::XenHost::open()
        .context("cannot open this host's Xen (kemari debug runs in a Xen 4.17 dom0, as root)")?;
    Ok(Box::new(host))
}

fn main() -> ExitCode {
    if let Some(code) = kemarid::manpage::write_if_requested(Cli::command(), "1") {
        return code;
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let r = match cli.command {
        Command::Ctl(cmd) => Ok(ctl_cmd::run(cmd, cli.json)),
        Command::Debug(cmd) => debug_cmd::run(cmd, cli.json),
        Command::Sync(cmd) => sync_cmd::run(cmd, cli.json),
        Command::Attach(args) => {
            open_host().and_then(|hv| attach_cmd::run(hv.as_ref(), args, cli.json))
        }
    };
    match r {
        Ok(code) => code,
        // `kemari debug domains | head`: the reader went away; that is not our failure.
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kemari: {e:#}");
            ExitCode::FAILURE
        }
    }
}
