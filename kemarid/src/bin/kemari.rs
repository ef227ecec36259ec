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
#[path = "kemari/ctl_cmd.rs"]
mod ctl_cmd;
#[path = "kemari/debug_cmd.rs"]
mod debug_cmd;
#[path = "kemari/fence_cmd.rs"]
mod fence_cmd;
#[path = "kemari/pv_cmd.rs"]
mod pv_cmd;
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
    Ctl(ctl_cmd::CtlCommand),
    /// Low-level operations on this host's Xen, run in dom0 as root. They talk to Xen directly
    /// through libxenctrl & co (Xen 4.17 only) and need no daemon.
    #[command(subcommand)]
    Debug(debug_cmd::DebugCommand),
    #[command(flatten)]
    Sync(sync_cmd::SyncCommand),
    /// Serve a disk image (userspace blkback) and/or a NIC on a dom0 tap (userspace netback) to
    /// a guest (foreground): creates the device nodes for a guest created paused without them
    /// (`xl create -p`), optionally unpauses it, and serves until the guest is gone or
    /// SIGINT/SIGTERM (docs/backends.md).
    Attach(attach_cmd::AttachArgs),
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
