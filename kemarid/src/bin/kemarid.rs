//! `kemarid`: the Kemari for Xen dom0 daemon.
//!
//! Today it checks that it runs on a usable Xen 4.17 dom0 and then waits for SIGTERM/SIGINT; the
//! sync engine, the backends and the control socket arrive with their issues.

use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser};
use nix::sys::signal::{SigSet, Signal};

/// Kemari for Xen dom0 daemon.
///
/// Status: the daemon opens this host's Xen (libxenctrl 4.17 & co, loaded at run time; any other
/// Xen version is refused), reports what it found, and waits for SIGTERM or SIGINT. It does not yet
/// protect guests or serve a control socket.
#[derive(Parser, Debug)]
#[command(name = "kemarid", version, about, long_about)]
struct Args {
    /// Check that this host can run kemarid (Xen 4.17 libraries present, hypervisor reachable,
    /// domains listable), print the result and exit: 0 if usable, 1 if not.
    #[arg(long)]
    check: bool,
}

fn check_host() -> anyhow::Result<usize> {
    let host = hypervisor::xen::XenHost::open()
        .context("cannot open this host's Xen (kemarid runs in a Xen 4.17 dom0, as root)")?;
    let hv: &dyn hypervisor::Hypervisor = &host;
    let domains = hv.list_domains().context("listing domains")?;
    Ok(domains.len())
}

fn run(args: Args) -> anyhow::Result<()> {
    let n = check_host()?;
    if args.check {
        println!("kemarid: this host is usable: Xen 4.17, {n} domains");
        return Ok(());
    }
    log::info!("kemarid started: Xen 4.17, {n} domains; no guests protected (protection is not implemented yet)");
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.thread_block().context("blocking SIGTERM/SIGINT")?;
    let sig = set.wait().context("waiting for SIGTERM/SIGINT")?;
    log::info!("kemarid: {sig} received, shutting down");
    Ok(())
}

fn main() -> ExitCode {
    if let Some(code) = kemarid::manpage::write_if_requested(Args::command(), "8") {
        return code;
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kemarid: {e:#}");
            ExitCode::FAILURE
        }
    }
}
