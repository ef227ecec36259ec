//! The daemon's listeners: the local control socket (unix, 0600), the peer port (TCP) and the
//! metrics endpoint (TCP, HTTP/1.0 `GET /metrics`). One thread per connection.

use std::io::{BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::{Daemon, DaemonError};
use crate::api::{
    parse_request, read_line, to_line, ApiError, ErrorCode, EventLine, Reply, Request,
    ResponseLine, PROTOCOL_VERSION,
};

/// Where the daemon listens.
#[derive(Debug, Clone, Default)]
pub struct Addresses {
    /// The control socket.
    pub socket: PathBuf,
    /// The peer port ("" = none).
    pub peer_listen: String,
    /// The metrics endpoint ("" = none).
    pub metrics_listen: String,
}

/// The bound sockets; [`Server::run`] serves them in threads.
#[derive(Debug)]
pub struct Server {
    unix: UnixListener,
    socket: PathBuf,
    peer: Option<TcpListener>,
    metrics: Option<TcpListener>,
}

fn bind_tcp(what: &'static str, addr: &str) -> Result<Option<TcpListener>, DaemonError> {
    if addr.trim().is_empty() {
        return Ok(None);
    }
    TcpListener::bind(addr)
        .map(Some)
        .map_err(|source| DaemonError::Bind {
            what,
            addr: addr.into(),
            source,
        })
}

fn bind_unix(path: &Path) -> Result<UnixListener, DaemonError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| DaemonError::Io {
            what: "creating the socket's folder",
            path: dir.into(),
            source,
        })?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(DaemonError::AlreadyRunning(path.into()));
        }
        // left by a daemon that did not end cleanly
        std::fs::remove_file(path).map_err(|source| DaemonError::Io {
            what: "removing the stale socket",
            path: path.into(),
            source,
        })?;
    }
    let l = UnixListener::bind(path).map_err(|source| DaemonError::Bind {
        what: "control socket",
        addr: path.display().to_string(),
        source,
    })?;
    // connecting needs write permission: with the usual umask (022) nobody else could
    // connect before this chmod either
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        DaemonError::Io {
            what: "making the control socket root-only",
            path: path.into(),
            source,
        }
    })?;
    Ok(l)
}

impl Server {
    /// Binds every socket (nothing is served yet).
    pub fn bind(addrs: &Addresses) -> Result<Server, DaemonError> {
        let peer = bind_tcp("peer port", &addrs.peer_listen)?;
        let metrics = bind_tcp("metrics", &addrs.metrics_listen)?;
        let unix = bind_unix(&addrs.socket)?;
        Ok(Server {
            unix,
            socket: addrs.socket.clone(),
            peer,
            metrics,
        })
    }

    /// Serves in background threads; returns at once.
    pub fn run(self, d: &Arc<Daemon>) -> std::io::Result<()> {
        let local = |l: &Option<TcpListener>| {
            l.as_ref()
                .and_then(|l| l.local_addr().ok())
                .map(|a| a.to_string())
        };
        *d.peer_addr
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = local(&self.peer);
        *d.metrics_addr
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = local(&self.metrics);
        let dd = d.clone();
        let unix = self.unix;
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                for conn in unix.incoming() {
                    match conn {
                        Ok(s) => {
                            let d = dd.clone();
                            let _ = std::thread::Builder::new()
                                .name("control-conn".into())
                                .spawn(move || {
                                    if let Ok(r) = s.try_clone() {
                                        serve_conn(&d, BufReader::new(r), s, false);
                                    }
                                });
                        }
                        Err(e) => log::warn!("control socket: accept: {e}"),
                    }
                }
            })?;
        if let Some(peer) = self.peer {
            let dd = d.clone();
            std::thread::Builder::new()
                .name("peer".into())
                .spawn(move || {
                    for conn in peer.incoming() {
                        match conn {
                            Ok(s) => {
                                let d = dd.clone();
                                let _ = std::thread::Builder::new().name("peer-conn".into()).spawn(
                                    move || {
                                        // a peer that goes quiet does not hold a thread forever
                                        let _ = s.set_read_timeout(Some(Duration::from_secs(300)));
                                        if let Ok(r) = s.try_clone() {
                                            serve_conn(&d, BufReader::new(r), s, true);
                                        }
                                    },
                                );
                            }
                            Err(e) => log::warn!("peer port: accept: {e}"),
                        }
                    }
                })?;
        }
        if let Some(m) = self.metrics {
            let dd = d.clone();
            std::thread::Builder::new()
                .name("metrics".into())
                .spawn(move || {
                    for conn in m.incoming() {
                        match conn {
                            Ok(s) => serve_metrics(&dd, s),
                            Err(e) => log::warn!("metrics: accept: {e}"),
                        }
                    }
                })?;
        }
        Ok(())
    }

    /// The control socket's path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

fn write_line(w: &mut impl Write, line: &str) -> bool {
    w.write_all(line.as_bytes())
        .and_then(|()| w.flush())
        .is_ok()
}

/// Serves one connection: request lines until EOF, or an event stream after `events`.
pub fn serve_conn(d: &Daemon, mut r: BufReader<impl Read>, mut w: impl Write, from_peer: bool) {
    loop {
        let line = match read_line(&mut r) {
            Ok(Some(l)) => l,
            Ok(None) => return,
            Err(e) => {
                let err = ApiError::new(
                    ErrorCode::BadRequest,
                    format!("unreadable request: {e}"),
                    "send one UTF-8 JSON object per line, at most 1 MiB",
                );
                write_line(&mut w, &to_line(&ResponseLine::err(None, err)));
                return;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        let req = match parse_request(&line) {
            Ok(r) => r,
            Err((id, e)) => {
                if !write_line(&mut w, &to_line(&ResponseLine::err(id, e))) {
                    return;
                }
                continue;
            }
        };
        if from_peer && !req.req.allowed_from_peer() {
            let e = ApiError::new(
                ErrorCode::Forbidden,
                format!("{} is not served on the peer port", req.req.op()),
                "use the control socket on that host (kemari ...)",
            );
            if !write_line(&mut w, &to_line(&ResponseLine::err(req.id, e))) {
                return;
            }
            continue;
        }
        if !from_peer
            && matches!(
                req.req,
                Request::PeerReceive { .. } | Request::PeerStop { .. }
            )
        {
            let e = ApiError::new(
                ErrorCode::Forbidden,
                format!("{} is daemon-to-daemon only (the peer port)", req.req.op()),
                "use start/stop",
            );
            if !write_line(&mut w, &to_line(&ResponseLine::err(req.id, e))) {
                return;
            }
            continue;
        }
        log::debug!("request {}", req.req.op());
        if let Request::Events { dom } = req.req {
            if let Some(name) = &dom {
                // an unknown guest is refused (its events could never come)
                if let Err(e) = d.handle(Request::Status {
                    dom: Some(name.clone()),
                }) {
                    write_line(&mut w, &to_line(&ResponseLine::err(req.id, e)));
                    continue;
                }
            }
            let rx = d.subscribe(dom.clone());
            if !write_line(
                &mut w,
                &to_line(&ResponseLine::ok(req.id, Reply::Subscribed { dom })),
            ) {
                return;
            }
            while let Ok(event) = rx.recv() {
                let line = to_line(&EventLine {
                    v: PROTOCOL_VERSION,
                    event,
                });
                if !write_line(&mut w, &line) {
                    return;
                }
            }
            return;
        }
        let resp = match d.handle(req.req) {
            Ok(reply) => ResponseLine::ok(req.id, reply),
            Err(e) => ResponseLine::err(req.id, e),
        };
        if !write_line(&mut w, &to_line(&resp)) {
            return;
        }
    }
}

fn serve_metrics(d: &Daemon, mut s: TcpStream) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
    let mut r = BufReader::new(match s.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    });
    let first = read_line(&mut r).ok().flatten().unwrap_or_default();
    // the rest of the request head
    while let Ok(Some(l)) = read_line(&mut r) {
        if l.is_empty() {
            break;
        }
    }
    let mut parts = first.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) = if method != "GET" {
        (
            "405 Method Not Allowed",
            "text/plain",
            "GET /metrics\n".to_string(),
        )
    } else if path == "/metrics" || path == "/" {
        (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            super::metrics::render(d),
        )
    } else {
        ("404 Not Found", "text/plain", "GET /metrics\n".to_string())
    };
    let _ = write!(
        s,
        "HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}
