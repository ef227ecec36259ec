//! `kemarid`: the Kemari for Xen dom0 daemon (docs/api.md).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser};
use kemarid::daemon::config::{Config, DEFAULT_CONFIG};
use kemarid::daemon::server::{Addresses, Server};
use kemarid::daemon::worker::{Backend, XenBackend};
use kemarid::daemon::{mem::MemBackend, notify, Daemon, Settings};
use nix::sys::signal::{SigSet, Signal};

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

fn check_host() -> anyhow::Result<usize> {
    let host = hypervisor::xen::XenHost::open()
        .context("cannot open this host's Xen (kemarid runs in a Xen 4.17 dom0, as root)")?;
    let hv: &dyn hypervisor::Hypervisor = &host;
    let domains = hv.list_domains().context("listing domains")?;
    Ok(domains.len())
}

fn config(args: &Args) -> anyhow::Result<Config> {
    let mut c = match (&args.config, args.mem) {
        (Some(p), _) => Config::load(p)?,
        (None, true) => Config::default(),
        (None, false) => Config::load(std::path::Path::new(DEFAULT_CONFIG))?,
    };
    if args.mem {
        let socket = args
            .socket
            .clone()
            .context("--mem needs --socket PATH (the in-memory daemon is for tests)")?;
        let mut state = socket.clone().into_os_string();
        state.push(".d");
        c.daemon.state_dir = args.state_dir.clone().unwrap_or_else(|| state.into());
        c.daemon.spool_dir = c.daemon.state_dir.join("spool");
        if args.peer_listen.is_none() && args.config.is_none() {
            c.daemon.peer_listen = "127.0.0.1:0".into();
        }
        c.daemon.data_listen = "127.0.0.1".into();
    }
    if let Some(s) = &args.socket {
        c.daemon.socket = s.clone();
    }
    if let Some(s) = &args.state_dir {
        c.daemon.state_dir = s.clone();
    }
    if let Some(s) = &args.peer_listen {
        c.daemon.peer_listen = s.clone();
    }
    if let Some(s) = &args.metrics_listen {
        c.daemon.metrics_listen = s.clone();
    }
    if let Some(s) = &args.hostname {
        c.daemon.hostname = s.clone();
    }
    Ok(c)
}

fn kemari_bin(c: &Config) -> anyhow::Result<PathBuf> {
    if !c.daemon.kemari_bin.is_empty() {
        return Ok(PathBuf::from(&c.daemon.kemari_bin));
    }
    let exe = std::env::current_exe().context("locating kemarid's own binary")?;
    Ok(exe.with_file_name("kemari"))
}

fn run(args: Args) -> anyhow::Result<()> {
    if args.check {
        let n = check_host()?;
        println!("kemarid: this host is usable: Xen 4.17, {n} domains");
        return Ok(());
    }
    let cfg = config(&args)?;
    // before any thread starts: the signals are taken by this thread only
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.thread_block().context("blocking SIGTERM/SIGINT")?;
    let backend: Box<dyn Backend> =
        if args.mem {
            let guests = args
                .mem_guest
                .iter()
                .map(|g| kemarid::daemon::mem::parse_guest(g))
                .collect::<Result<Vec<_>, _>>()
                .map_err(anyhow::Error::msg)?;
            Box::new(MemBackend::new(&guests).context("creating the in-memory guests")?)
        } else {
            let bin = kemari_bin(&cfg)?;
            anyhow::ensure!(
                bin.exists(),
                "the worker binary {} does not exist (set kemari_bin in kemarid.conf)",
                bin.display()
            );
            let n = check_host()?;
            log::info!("Xen 4.17, {n} domains; workers run {}", bin.display());
            Box::new(XenBackend::open(bin).context(
                "cannot open this host's Xen (kemarid runs in a Xen 4.17 dom0, as root)",
            )?)
        };
    let addrs = Addresses {
        socket: cfg.daemon.socket.clone(),
        peer_listen: cfg.daemon.peer_listen.clone(),
        metrics_listen: cfg.daemon.metrics_listen.clone(),
    };
    let settings = Settings::from_config(cfg, args.mem)?;
    let daemon = Daemon::new(settings, backend)?;
    let server = Server::bind(&addrs)?;
    let socket = server.socket().to_path_buf();
    server
        .run(&daemon)
        .context("starting the listener threads")?;
    daemon.supervise().context("starting the supervisor")?;
    let hello = daemon
        .handle(kemarid::api::Request::Hello)
        .map_err(anyhow::Error::msg)?;
    log::info!(
        "kemarid ready on {} (host {}): control socket {}, {hello:?}",
        if args.mem {
            "the in-memory Xen"
        } else {
            "Xen 4.17"
        },
        daemon.host(),
        socket.display()
    );
    match notify::notify("READY=1") {
        Ok(true) => log::info!("told systemd we are ready"),
        Ok(false) => {}
        Err(e) => log::warn!("{e}"),
    }
    let sig = set.wait().context("waiting for SIGTERM/SIGINT")?;
    let running = match daemon.handle(kemarid::api::Request::Status { dom: None }) {
        Ok(kemarid::api::Reply::Status(s)) => {
            s.guests.iter().filter(|g| g.worker_pid.is_some()).count()
        }
        _ => 0,
    };
    daemon.begin_shutdown();
    if let Err(e) = notify::notify("STOPPING=1") {
        log::warn!("{e}");
    }
    if let Err(e) = std::fs::remove_file(&socket) {
        log::warn!("removing {}: {e}", socket.display());
    }
    log::info!(
        "kemarid: {sig} received, shutting down; {running} worker process(es) left running (a restarted kemarid adopts them; `kemari stop` ends protection)"
    );
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
