//! `kemarid`: the Kemari for Xen dom0 daemon (docs/api.md).
//!
//! The arguments are parsed here; starting and stopping is [`kemarid::launch`]'s.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use kemarid::launch::{self, Overrides, Running};

/// Kemari for Xen dom0 daemon.
///
/// Protects guests of this host (primary) and keeps replicas of other hosts' guests
/// (secondary), each with a worker process (`kemari replicate` / `kemari receive`) it supervises.
/// Clients talk to it over the control socket (/run/kemari/kemarid.sock, root only; protocol in
/// docs/api.md: `kemari start/stop/status/failover/checkpoint/events`), the peer host's kemarid
/// over the peer port (TCP 7200: trusted replication network only). Configuration:
/// /etc/kemari/kemarid.conf (TOML; every key optional). SIGTERM/SIGINT stop the daemon and leave
/// the workers running: protection goes on, and a restarted kemarid adopts them (`kemari stop`
/// ends protection). With $NOTIFY_SOCKET set it tells systemd when it is ready (Type=notify).
#[derive(Parser, Debug)]
#[command(name = "kemarid", version, about, long_about)]
struct Args {
    /// Check that this host can run kemarid (Xen 4.17 libraries present, hypervisor reachable,
    /// domains listable), print the result and exit: 0 if usable, 1 if not.
    #[arg(long)]
    check: bool,
    /// Configuration file (default /etc/kemari/kemarid.conf; not read by --mem unless given).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The control socket (overrides the configuration's `socket`).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// The state folder (overrides `state_dir`; --mem: default SOCKET.d).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// The peer port's address (overrides `peer_listen`; "" turns it off; --mem: default
    /// 127.0.0.1:0, the bound address is in `hello`).
    #[arg(long)]
    peer_listen: Option<String>,
    /// The Prometheus endpoint's address (overrides `metrics_listen`; "" turns it off).
    #[arg(long)]
    metrics_listen: Option<String>,
    /// This host's name (overrides `hostname`).
    #[arg(long)]
    hostname: Option<String>,
    /// In-memory mode for tests of clients: no Xen; guests in an in-memory hypervisor, workers
    /// are threads running the real sync engine over loopback TCP (docs/api.md).
    #[arg(long)]
    mem: bool,
    /// --mem: a running in-memory guest NAME with PAGES pages (default 1024); repeatable.
    #[arg(long, value_name = "NAME[:PAGES]", requires = "mem")]
    mem_guest: Vec<String>,
}

impl Args {
    fn overrides(&self) -> Overrides {
        Overrides {
            config: self.config.clone(),
            socket: self.socket.clone(),
            state_dir: self.state_dir.clone(),
            peer_listen: self.peer_listen.clone(),
            metrics_listen: self.metrics_listen.clone(),
            hostname: self.hostname.clone(),
            mem: self.mem,
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    if args.check {
        let n = launch::check_host()?;
        println!("kemarid: this host is usable: Xen 4.17, {n} domains");
        return Ok(());
    }
    let cfg = launch::config(&args.overrides())?;
    // before any thread starts: the signals are taken by this thread only
    let signals = launch::block_signals()?;
    let backend = launch::backend(&cfg, args.mem, &args.mem_guest)?;
    let running = Running::start(cfg, backend, args.mem)?;
    let sig = launch::wait_for_signal(&signals)?;
    running.shutdown(sig);
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
