//! What `kemarid` does when it starts and stops (docs/api.md): its configuration from the file
//! and the command line's overrides, the backend (Xen, or the in-memory one of `--mem`), the
//! listeners and the supervisor, systemd's notifications, and the shutdown that leaves the
//! workers running. The `kemarid` binary parses the arguments and calls these in order.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use hypervisor::mem::GuestError;
use hypervisor::xen::XenOpenError;
use hypervisor::HypervisorError;
use nix::sys::signal::{SigSet, Signal};

use crate::api::{ApiError, Reply, Request};
use crate::daemon::config::{Config, ConfigError, DEFAULT_CONFIG};
use crate::daemon::mem::{parse_guest, MemBackend};
use crate::daemon::server::{Addresses, Server};
use crate::daemon::worker::{Backend, XenBackend};
use crate::daemon::{notify, Daemon, DaemonError, Settings};

/// Errors of this module: which step of kemarid's start failed, and why.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The hypervisor's libraries or device files could not be opened.
    #[error("cannot open this host's Xen (kemarid runs in a Xen 4.17 dom0, as root)")]
    OpenXen {
        /// The cause.
        source: XenOpenError,
    },
    /// Xen did not list the domains.
    #[error("listing domains")]
    ListDomains {
        /// The cause.
        source: HypervisorError,
    },
    /// The configuration file could not be read (the error names it).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `--mem` without `--socket`.
    #[error("--mem needs --socket PATH (the in-memory daemon is for tests)")]
    MemNeedsSocket,
    /// kemarid's own path could not be found (to find `kemari` next to it).
    #[error("locating kemarid's own binary")]
    CurrentExe {
        /// The cause.
        source: std::io::Error,
    },
    /// The worker binary is not there.
    #[error("the worker binary {} does not exist (set kemari_bin in kemarid.conf)", .path.display())]
    NoWorkerBinary {
        /// Where it was looked for.
        path: PathBuf,
    },
    /// A `--mem-guest` argument is not NAME[:PAGES] (the message names it).
    #[error("{0}")]
    MemGuestArg(String),
    /// The in-memory guests could not be created.
    #[error("creating the in-memory guests")]
    MemGuests {
        /// The cause.
        source: GuestError,
    },
    /// The daemon could not be set up (the error names the step).
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    /// A listener thread did not start.
    #[error("starting the listener threads")]
    Listeners {
        /// The cause.
        source: std::io::Error,
    },
    /// The supervisor thread did not start.
    #[error("starting the supervisor")]
    Supervisor {
        /// The cause.
        source: std::io::Error,
    },
    /// The daemon did not answer its own `hello`.
    #[error(transparent)]
    Hello(ApiError),
    /// SIGTERM/SIGINT could not be blocked.
    #[error("blocking SIGTERM/SIGINT")]
    BlockSignals {
        /// The cause.
        source: nix::Error,
    },
    /// Waiting for SIGTERM/SIGINT failed.
    #[error("waiting for SIGTERM/SIGINT")]
    WaitSignals {
        /// The cause.
        source: nix::Error,
    },
}

/// Opens this host's Xen and lists its domains: their number (`kemarid --check`).
pub fn check_host() -> Result<usize, LaunchError> {
    let host =
        hypervisor::xen::XenHost::open().map_err(|source| LaunchError::OpenXen { source })?;
    let hv: &dyn hypervisor::Hypervisor = &host;
    let domains = hv
        .list_domains()
        .map_err(|source| LaunchError::ListDomains { source })?;
    Ok(domains.len())
}

/// The command line's say over the configuration.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--config`.
    pub config: Option<PathBuf>,
    /// `--socket`.
    pub socket: Option<PathBuf>,
    /// `--state-dir`.
    pub state_dir: Option<PathBuf>,
    /// `--peer-listen`.
    pub peer_listen: Option<String>,
    /// `--metrics-listen`.
    pub metrics_listen: Option<String>,
    /// `--hostname`.
    pub hostname: Option<String>,
    /// `--mem`.
    pub mem: bool,
}

/// The configuration: the file (`--config`, else [`DEFAULT_CONFIG`], which `--mem` does not
/// read), then `--mem`'s defaults (state in SOCKET.d, peer port on 127.0.0.1:0 unless
/// configured, data on 127.0.0.1), then the command line's values.
pub fn config(o: &Overrides) -> Result<Config, LaunchError> {
    let c = match (&o.config, o.mem) {
        (Some(p), _) => Config::load(p)?,
        (None, true) => Config::default(),
        (None, false) => Config::load(Path::new(DEFAULT_CONFIG))?,
    };
    apply(c, o)
}

/// [`config`] after the file is read.
pub fn apply(mut c: Config, o: &Overrides) -> Result<Config, LaunchError> {
    if o.mem {
        let socket = o.socket.clone().ok_or(LaunchError::MemNeedsSocket)?;
        let mut state = socket.clone().into_os_string();
        state.push(".d");
        c.daemon.state_dir = o.state_dir.clone().unwrap_or_else(|| state.into());
        c.daemon.spool_dir = c.daemon.state_dir.join("spool");
        if o.peer_listen.is_none() && o.config.is_none() {
            c.daemon.peer_listen = "127.0.0.1:0".into();
        }
        c.daemon.data_listen = "127.0.0.1".into();
    }
    if let Some(s) = &o.socket {
        c.daemon.socket = s.clone();
    }
    if let Some(s) = &o.state_dir {
        c.daemon.state_dir = s.clone();
    }
    if let Some(s) = &o.peer_listen {
        c.daemon.peer_listen = s.clone();
    }
    if let Some(s) = &o.metrics_listen {
        c.daemon.metrics_listen = s.clone();
    }
    if let Some(s) = &o.hostname {
        c.daemon.hostname = s.clone();
    }
    Ok(c)
}

/// The worker binary: `kemari_bin`, else `kemari` next to kemarid.
pub fn kemari_bin(c: &Config) -> Result<PathBuf, LaunchError> {
    if !c.daemon.kemari_bin.is_empty() {
        return Ok(PathBuf::from(&c.daemon.kemari_bin));
    }
    let exe = std::env::current_exe().map_err(|source| LaunchError::CurrentExe { source })?;
    Ok(exe.with_file_name("kemari"))
}

/// Blocks SIGTERM and SIGINT in this thread, before any other starts: they are taken by
/// [`wait_for_signal`] only.
pub fn block_signals() -> Result<SigSet, LaunchError> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.thread_block()
        .map_err(|source| LaunchError::BlockSignals { source })?;
    Ok(set)
}

/// Waits for SIGTERM or SIGINT.
pub fn wait_for_signal(set: &SigSet) -> Result<Signal, LaunchError> {
    set.wait()
        .map_err(|source| LaunchError::WaitSignals { source })
}

/// The backend: with `mem`, in-memory guests (`--mem-guest NAME[:PAGES]`); else this host's
/// Xen, its workers running the worker binary.
pub fn backend(
    c: &Config,
    mem: bool,
    mem_guests: &[String],
) -> Result<Box<dyn Backend>, LaunchError> {
    if mem {
        let guests = mem_guests
            .iter()
            .map(|g| parse_guest(g))
            .collect::<Result<Vec<_>, _>>()
            .map_err(LaunchError::MemGuestArg)?;
        return Ok(Box::new(
            MemBackend::new(&guests).map_err(|source| LaunchError::MemGuests { source })?,
        ));
    }
    let bin = kemari_bin(c)?;
    if !bin.exists() {
        return Err(LaunchError::NoWorkerBinary { path: bin });
    }
    let n = check_host()?;
    log::info!("Xen 4.17, {n} domains; workers run {}", bin.display());
    Ok(Box::new(
        XenBackend::open(bin).map_err(|source| LaunchError::OpenXen { source })?,
    ))
}

/// A started kemarid: listening, supervising, systemd told.
#[derive(Debug)]
pub struct Running {
    daemon: Arc<Daemon>,
    socket: PathBuf,
}

impl Running {
    /// Sets the daemon up on `backend`, binds and serves its sockets, starts the supervisor and
    /// tells systemd it is ready (with `$NOTIFY_SOCKET`).
    pub fn start(
        cfg: Config,
        backend: Box<dyn Backend>,
        mem: bool,
    ) -> Result<Running, LaunchError> {
        let addrs = Addresses {
            socket: cfg.daemon.socket.clone(),
            peer_listen: cfg.daemon.peer_listen.clone(),
            metrics_listen: cfg.daemon.metrics_listen.clone(),
        };
        let settings = Settings::from_config(cfg, mem)?;
        let daemon = Daemon::new(settings, backend)?;
        let server = Server::bind(&addrs)?;
        let socket = server.socket().to_path_buf();
        server
            .run(&daemon)
            .map_err(|source| LaunchError::Listeners { source })?;
        daemon
            .supervise()
            .map_err(|source| LaunchError::Supervisor { source })?;
        let hello = daemon.handle(Request::Hello).map_err(LaunchError::Hello)?;
        log::info!(
            "kemarid ready on {} (host {}): control socket {}, {hello:?}",
            if mem { "the in-memory Xen" } else { "Xen 4.17" },
            daemon.host(),
            socket.display()
        );
        match notify::notify("READY=1") {
            Ok(true) => log::info!("told systemd we are ready"),
            Ok(false) => {}
            Err(e) => log::warn!("{e}"),
        }
        Ok(Running { daemon, socket })
    }

    /// After `sig`: stops taking requests, tells systemd, removes the control socket, and
    /// leaves the workers running (a restarted kemarid adopts them).
    pub fn shutdown(self, sig: Signal) {
        let running = match self.daemon.handle(Request::Status { dom: None }) {
            Ok(Reply::Status(s)) => s.guests.iter().filter(|g| g.worker_pid.is_some()).count(),
            _ => 0,
        };
        self.daemon.begin_shutdown();
        if let Err(e) = notify::notify("STOPPING=1") {
            log::warn!("{e}");
        }
        if let Err(e) = std::fs::remove_file(&self.socket) {
            log::warn!("removing {}: {e}", self.socket.display());
        }
        log::info!(
            "kemarid: {sig} received, shutting down; {running} worker process(es) left running (a restarted kemarid adopts them; `kemari stop` ends protection)"
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code

    use super::*;

    fn mem(socket: Option<&str>) -> Overrides {
        Overrides {
            socket: socket.map(PathBuf::from),
            mem: true,
            ..Overrides::default()
        }
    }

    #[test]
    fn mem_state_lives_next_to_the_socket() {
        let c = apply(Config::default(), &mem(Some("/tmp/k.sock"))).unwrap();
        assert_eq!(c.daemon.socket, Path::new("/tmp/k.sock"));
        assert_eq!(c.daemon.state_dir, Path::new("/tmp/k.sock.d"));
        assert_eq!(c.daemon.spool_dir, Path::new("/tmp/k.sock.d/spool"));
        assert_eq!(c.daemon.peer_listen, "127.0.0.1:0");
        assert_eq!(c.daemon.data_listen, "127.0.0.1");
    }

    #[test]
    fn mem_needs_a_socket() {
        let e = apply(Config::default(), &mem(None)).unwrap_err();
        assert!(matches!(e, LaunchError::MemNeedsSocket));
        assert_eq!(
            e.to_string(),
            "--mem needs --socket PATH (the in-memory daemon is for tests)"
        );
    }

    #[test]
    fn command_line_values_win() {
        let o = Overrides {
            state_dir: Some("/s".into()),
            peer_listen: Some(String::new()),
            metrics_listen: Some("127.0.0.1:9100".into()),
            hostname: Some("h1".into()),
            ..mem(Some("/tmp/k.sock"))
        };
        let c = apply(Config::default(), &o).unwrap();
        assert_eq!(c.daemon.state_dir, Path::new("/s"));
        assert_eq!(c.daemon.spool_dir, Path::new("/s/spool"));
        assert_eq!(c.daemon.peer_listen, "");
        assert_eq!(c.daemon.metrics_listen, "127.0.0.1:9100");
        assert_eq!(c.daemon.hostname, "h1");
        // --mem with a configuration file keeps the file's peer port.
        let mut file = Config::default();
        file.daemon.peer_listen = "0.0.0.0:7300".into();
        let o = Overrides {
            config: Some("/etc/k.conf".into()),
            ..mem(Some("/tmp/k.sock"))
        };
        assert_eq!(apply(file, &o).unwrap().daemon.peer_listen, "0.0.0.0:7300");
        // Without --mem nothing but the given values changes.
        let d = Config::default();
        let o = Overrides {
            socket: Some("/run/x.sock".into()),
            ..Overrides::default()
        };
        let c = apply(d.clone(), &o).unwrap();
        assert_eq!(c.daemon.socket, Path::new("/run/x.sock"));
        assert_eq!(c.daemon.state_dir, d.daemon.state_dir);
        assert_eq!(c.daemon.peer_listen, d.daemon.peer_listen);
    }

    #[test]
    fn worker_binary_from_the_config_or_next_to_kemarid() {
        let mut c = Config::default();
        c.daemon.kemari_bin = "/opt/kemari".into();
        assert_eq!(kemari_bin(&c).unwrap(), Path::new("/opt/kemari"));
        c.daemon.kemari_bin.clear();
        assert_eq!(kemari_bin(&c).unwrap().file_name().unwrap(), "kemari");
    }

    #[test]
    fn a_bad_mem_guest_is_named() {
        let Err(e) = backend(&Config::default(), true, &["web:lots".into()]) else {
            panic!("web:lots is not a page count")
        };
        assert!(matches!(e, LaunchError::MemGuestArg(_)), "{e}");
        assert!(e.to_string().contains("web:lots"), "{e}");
    }
}
