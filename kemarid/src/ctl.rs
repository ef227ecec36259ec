//! The client side of `kemari start/stop/status/failover/checkpoint/events`: one request to
//! this host's kemarid over its control socket (docs/api.md, docs/cli.md), the polls `start`
//! and `stop` make while they wait, and what a failure says to the operator.
//!
//! Every verb returns the daemon's typed answer or a [`CtlError`] naming what failed for which
//! guest and host, why, and what to do about it; the `kemari` binary prints them (text from
//! [`render`], or the reply's JSON) and exits with status 1 on a failure (xl's style; 2 is a
//! usage error).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::api::{
    self, ApiError, CheckpointReply, Client, ClientError, ErrorCode, Event, Events, GuestState,
    GuestStatus, InitialSync, Reply, Request, StartOptions, StatusReply,
};

pub mod render;

#[cfg(test)]
mod tests;

/// How often `start` and `stop` look at the guest's status while they wait.
pub const POLL: Duration = Duration::from_millis(200);

/// How long `stop` waits for the checkpoint in progress to complete.
pub const STOP_WAIT: Duration = Duration::from_secs(60);

/// The exit status of a failed verb.
pub const EXIT_FAILURE: u8 = 1;

/// The fix for a daemon that went away mid-conversation.
const SEE_LOG: &str = "kemarid may have stopped or crashed: see its log (journalctl -u kemarid)";

/// The fix for a reply this client does not understand.
const SAME_RELEASE: &str = "use a kemari of the same release as kemarid";

/// Errors of this module: a failed verb. Each message starts with what was being done (naming
/// the guest and the host: the `what` of every variant), then the cause; [`CtlError::code`] is
/// the error code (the daemon's, or one of the client's own) and [`CtlError::fix`] the
/// suggested fix.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// kemarid refused the request.
    #[error("{what}: {}", .error.message)]
    Refused {
        /// What was being done.
        what: String,
        /// The daemon's error.
        error: ApiError,
    },
    /// The control socket is root's only.
    #[error("{what}: permission denied on kemarid's control socket {} on {host}", .socket.display())]
    PermissionDenied {
        /// What was being done.
        what: String,
        /// This host's name.
        host: String,
        /// The control socket.
        socket: PathBuf,
    },
    /// Nothing listens on the control socket.
    #[error("{what}: kemarid is not running on {host}: cannot connect to {} ({source})", .socket.display())]
    NotRunning {
        /// What was being done.
        what: String,
        /// This host's name.
        host: String,
        /// The control socket.
        socket: PathBuf,
        /// The connect error.
        source: std::io::Error,
    },
    /// kemarid closed the connection before it answered.
    #[error("{what}: kemarid on {host} closed the connection without an answer ({})", .socket.display())]
    Closed {
        /// What was being done.
        what: String,
        /// This host's name.
        host: String,
        /// The control socket.
        socket: PathBuf,
    },
    /// Reading or writing the connection failed.
    #[error("{what}: talking to kemarid on {host} ({}): {source}", .socket.display())]
    Connection {
        /// What was being done.
        what: String,
        /// This host's name.
        host: String,
        /// The control socket.
        socket: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// kemarid sent a line that is not protocol version 1.
    #[error("{what}: {source}")]
    Protocol {
        /// What was being done.
        what: String,
        /// The client's [`ClientError::Protocol`].
        source: ClientError,
    },
    /// kemarid answered with a reply of another request.
    #[error("{what}: kemarid answered with an unexpected reply: {reply}")]
    Unexpected {
        /// What was being done.
        what: String,
        /// The reply's JSON line.
        reply: String,
    },
    /// The guest disappeared from kemarid's status while the client waited.
    #[error("{what}: kemarid on {host} no longer knows guest {dom}")]
    GuestGone {
        /// What was being done.
        what: String,
        /// This host's name.
        host: String,
        /// The guest.
        dom: String,
    },
    /// Protection ended (failed, stopped) before the guest was protected.
    #[error("{what}: {cause} (state {})", .state.as_str())]
    ProtectionFailed {
        /// What was being done.
        what: String,
        /// The guest's error, or what state it ended in.
        cause: String,
        /// The guest's state.
        state: GuestState,
        /// This host's name.
        host: String,
        /// The secondary.
        peer: String,
        /// The guest.
        dom: String,
    },
    /// `start --timeout` passed before the guest was protected.
    #[error("{what}: not protected after {secs} s (state {}); protection goes on in kemarid", .state.as_str())]
    Timeout {
        /// What was being done.
        what: String,
        /// The timeout.
        secs: u64,
        /// The guest's state then.
        state: GuestState,
        /// The guest.
        dom: String,
    },
    /// kemarid ended the event stream.
    #[error("{what}: kemarid on {host} closed the event stream ({})", .socket.display())]
    EventsClosed {
        /// What was being done.
        what: String,
        /// This host's name.
        host: String,
        /// The control socket.
        socket: PathBuf,
    },
}

impl CtlError {
    /// A client error of `what`, talking to the kemarid of `host` at `socket`.
    pub fn from_client(what: &str, host: &str, socket: &Path, e: ClientError) -> CtlError {
        let (what, host, socket) = (what.to_string(), host.to_string(), socket.to_path_buf());
        match e {
            ClientError::Api(error) => CtlError::Refused { what, error },
            ClientError::Connect { source, .. }
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                CtlError::PermissionDenied { what, host, socket }
            }
            ClientError::Connect { source, .. } => CtlError::NotRunning {
                what,
                host,
                socket,
                source,
            },
            ClientError::Closed { .. } => CtlError::Closed { what, host, socket },
            ClientError::Io { source, .. } => CtlError::Connection {
                what,
                host,
                socket,
                source,
            },
            source @ ClientError::Protocol { .. } => CtlError::Protocol { what, source },
        }
    }

    /// The error code: the daemon's ([`ErrorCode::as_str`]) or one of the client's own.
    pub fn code(&self) -> &'static str {
        match self {
            CtlError::Refused { error, .. } => error.code.as_str(),
            CtlError::PermissionDenied { .. } | CtlError::NotRunning { .. } => "daemon-not-running",
            CtlError::Closed { .. } | CtlError::EventsClosed { .. } => "connection-closed",
            CtlError::Connection { .. } => "connection-error",
            CtlError::Protocol { .. } | CtlError::Unexpected { .. } => "protocol-error",
            CtlError::GuestGone { .. } => ErrorCode::UnknownDomain.as_str(),
            CtlError::ProtectionFailed { .. } => "protection-failed",
            CtlError::Timeout { .. } => "timeout",
        }
    }

    /// Whether kemarid does not know the guest (refused with `unknown-domain`, or gone from
    /// its status).
    pub fn is_unknown_domain(&self) -> bool {
        match self {
            CtlError::Refused { error, .. } => error.code == ErrorCode::UnknownDomain,
            CtlError::GuestGone { .. } => true,
            _ => false,
        }
    }

    /// What the operator can do about it.
    pub fn fix(&self) -> Option<String> {
        Some(match self {
            CtlError::Refused { error, .. } => return error.fix.clone(),
            CtlError::PermissionDenied { .. } => {
                "the control socket is root's only: run kemari as root".to_string()
            }
            CtlError::NotRunning { .. } => format!(
                "start it with `systemctl start kemarid` (or run `kemarid` as root); if it \
                 listens elsewhere, give its socket with --socket PATH (default {})",
                api::DEFAULT_SOCKET
            ),
            CtlError::Closed { .. } | CtlError::Connection { .. } => SEE_LOG.to_string(),
            CtlError::Protocol { .. } | CtlError::Unexpected { .. } => SAME_RELEASE.to_string(),
            CtlError::GuestGone { .. } => "see `kemari status` and kemarid's log".to_string(),
            CtlError::ProtectionFailed {
                host, peer, dom, ..
            } => format!(
                "see kemarid's log on {host} and on {peer}; `kemari stop {dom}` clears the guest's record before a new start"
            ),
            CtlError::Timeout { dom, .. } => {
                format!("follow it with `kemari status {dom}` or `kemari events {dom}`")
            }
            CtlError::EventsClosed { .. } => {
                "kemarid stopped or dropped a subscriber that read too slowly: see its log"
                    .to_string()
            }
        })
    }

    /// The failure as `--json` prints it on stdout (one line, without the newline).
    pub fn json(&self) -> String {
        serde_json::json!({
            "ok": false,
            "error": {"code": self.code(), "message": self.to_string(), "fix": self.fix()},
        })
        .to_string()
    }

    /// The failure as printed on stderr: the message, then the fix if there is one (lines
    /// ending in a newline).
    pub fn stderr_text(&self) -> String {
        let mut s = format!("kemari: {self}\n");
        if let Some(fix) = self.fix() {
            s.push_str(&format!("kemari: fix: {fix}\n"));
        }
        s
    }
}

/// This host's name, for messages about the local daemon.
pub use crate::host::this_host;

/// Connects and sends one request.
pub fn call(socket: &Path, what: &str, req: &Request) -> Result<Reply, CtlError> {
    Client::connect(socket)
        .and_then(|mut c| c.call(req))
        .map_err(|e| CtlError::from_client(what, &this_host(), socket, e))
}

fn unexpected(what: &str, reply: &Reply) -> CtlError {
    CtlError::Unexpected {
        what: what.to_string(),
        reply: api::to_line(reply).trim_end().to_string(),
    }
}

fn guest_reply(what: &str, reply: Reply) -> Result<GuestStatus, CtlError> {
    match reply {
        Reply::Guest(g) => Ok(*g),
        other => Err(unexpected(what, &other)),
    }
}

/// One guest's status, polled while `start` or `stop` waits.
pub fn poll_guest(socket: &Path, what: &str, dom: &str) -> Result<GuestStatus, CtlError> {
    let reply = call(
        socket,
        what,
        &Request::Status {
            dom: Some(dom.to_string()),
        },
    )?;
    match reply {
        Reply::Status(StatusReply { guests, .. }) => guests
            .into_iter()
            .find(|g| g.dom == dom)
            .ok_or_else(|| CtlError::GuestGone {
                what: what.to_string(),
                host: this_host(),
                dom: dom.to_string(),
            }),
        other => Err(unexpected(what, &other)),
    }
}

/// What `start` shows of the initial sync while it waits (the binary's progress bar).
pub trait SyncProgress {
    /// The initial sync's figures, at each poll.
    fn update(&mut self, s: &InitialSync);
    /// The wait ends (protected, failed or timed out): the display goes away. Not called
    /// when a poll fails.
    fn clear(&mut self);
}

/// `kemari start`: the request, and how long to wait for the guest to be protected.
#[derive(Debug, Clone)]
pub struct Start {
    /// The guest.
    pub dom: String,
    /// The secondary (HOST or HOST:PORT).
    pub host: String,
    /// Options left out take kemarid.conf's values.
    pub options: StartOptions,
    /// Give up waiting after this many seconds (0: wait as long as it takes).
    pub timeout: u64,
}

impl Start {
    /// What `start` does, for its failures.
    fn what(&self) -> String {
        format!(
            "cannot protect guest {} of {} with a replica on {}",
            self.dom,
            this_host(),
            self.host
        )
    }
}

/// `kemari start`: asks kemarid to protect the guest; the guest's status right after (state
/// `starting`). [`wait_protected`] waits for the protection to begin.
pub fn start(socket: &Path, s: &Start) -> Result<GuestStatus, CtlError> {
    let what = s.what();
    let reply = call(
        socket,
        &what,
        &Request::Start {
            dom: s.dom.clone(),
            host: s.host.clone(),
            options: s.options.clone(),
        },
    )?;
    guest_reply(&what, reply)
}

/// After `start`: polls the guest's status until it is protected (showing the initial sync
/// on `progress`), fails if protection ends first or the timeout passes.
pub fn wait_protected(
    socket: &Path,
    s: &Start,
    mut g: GuestStatus,
    mut progress: Option<&mut dyn SyncProgress>,
) -> Result<GuestStatus, CtlError> {
    let what = &s.what();
    let deadline = (s.timeout > 0).then(|| Instant::now() + Duration::from_secs(s.timeout));
    loop {
        if let (Some(p), Some(sync)) = (progress.as_mut(), g.initial_sync.as_ref()) {
            p.update(sync);
        }
        match g.state {
            GuestState::Protected => {
                if let Some(p) = progress.take() {
                    p.clear();
                }
                return Ok(g);
            }
            state if state.is_final() => {
                if let Some(p) = progress.take() {
                    p.clear();
                }
                let cause = g.error.clone().unwrap_or_else(|| {
                    format!(
                        "protection ended in state {} before it began",
                        state.as_str()
                    )
                });
                return Err(CtlError::ProtectionFailed {
                    what: what.to_string(),
                    cause,
                    state,
                    host: this_host(),
                    peer: s.host.clone(),
                    dom: s.dom.clone(),
                });
            }
            _ => {}
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            if let Some(p) = progress.take() {
                p.clear();
            }
            return Err(CtlError::Timeout {
                what: what.to_string(),
                secs: s.timeout,
                state: g.state,
                dom: s.dom.clone(),
            });
        }
        std::thread::sleep(POLL);
        g = poll_guest(socket, what, &s.dom)?;
    }
}

/// `kemari stop`: ends the guest's protection and (unless `no_wait`) waits up to
/// [`STOP_WAIT`] for the checkpoint in progress to complete.
pub fn stop(socket: &Path, dom: &str, no_wait: bool) -> Result<GuestStatus, CtlError> {
    let what = format!(
        "cannot stop the protection of guest {dom} on {}",
        this_host()
    );
    let reply = call(
        socket,
        &what,
        &Request::Stop {
            dom: dom.to_string(),
        },
    )?;
    let mut g = guest_reply(&what, reply)?;
    if !no_wait {
        let deadline = Instant::now() + STOP_WAIT;
        while g.state == GuestState::Stopping && Instant::now() < deadline {
            std::thread::sleep(POLL);
            g = match poll_guest(socket, &what, dom) {
                Ok(g) => g,
                // Cleared from the daemon's table: stopped.
                Err(e) if e.is_unknown_domain() => break,
                Err(e) => return Err(e),
            };
        }
    }
    Ok(g)
}

/// `kemari status`: the guests of this host's kemarid, or one of them.
pub fn status(socket: &Path, dom: Option<&str>) -> Result<StatusReply, CtlError> {
    let what = match dom {
        Some(d) => format!("cannot get the status of guest {d} on {}", this_host()),
        None => format!(
            "cannot get the status of the protected guests on {}",
            this_host()
        ),
    };
    let reply = call(
        socket,
        &what,
        &Request::Status {
            dom: dom.map(str::to_string),
        },
    )?;
    match reply {
        Reply::Status(s) => Ok(s),
        other => Err(unexpected(&what, &other)),
    }
}

/// `kemari failover`: runs the replica here now.
pub fn failover(socket: &Path, dom: &str, force: bool) -> Result<GuestStatus, CtlError> {
    let what = format!("cannot fail guest {dom} over to {}", this_host());
    let reply = call(
        socket,
        &what,
        &Request::Failover {
            dom: dom.to_string(),
            force,
        },
    )?;
    guest_reply(&what, reply)
}

/// `kemari checkpoint`: a checkpoint now, acknowledged.
pub fn checkpoint(
    socket: &Path,
    dom: &str,
    wait_ms: Option<u64>,
) -> Result<CheckpointReply, CtlError> {
    let what = format!("cannot take a checkpoint of guest {dom} on {}", this_host());
    let reply = call(
        socket,
        &what,
        &Request::Checkpoint {
            dom: dom.to_string(),
            wait_ms,
        },
    )?;
    match reply {
        Reply::Checkpoint(c) => Ok(c),
        other => Err(unexpected(&what, &other)),
    }
}

/// `kemari events`: kemarid's events (one guest's, or all), as they come.
#[derive(Debug)]
pub struct EventFollow {
    what: String,
    host: String,
    socket: PathBuf,
    stream: Events,
}

/// Subscribes to kemarid's events (of `dom`, or of all guests).
pub fn events(socket: &Path, dom: Option<&str>) -> Result<EventFollow, CtlError> {
    let host = this_host();
    let what = match dom {
        Some(d) => format!("cannot follow the events of guest {d} on {host}"),
        None => format!("cannot follow the events of kemarid on {host}"),
    };
    let stream = Client::connect(socket)
        .and_then(|c| c.events(dom))
        .map_err(|e| CtlError::from_client(&what, &host, socket, e))?;
    Ok(EventFollow {
        what,
        host,
        socket: socket.to_path_buf(),
        stream,
    })
}

impl EventFollow {
    /// The error for a stream kemarid ended (the iterator returned `None`).
    pub fn closed(&self) -> CtlError {
        CtlError::EventsClosed {
            what: self.what.clone(),
            host: this_host(),
            socket: self.socket.clone(),
        }
    }
}

impl Iterator for EventFollow {
    type Item = Result<Event, CtlError>;

    fn next(&mut self) -> Option<Self::Item> {
        let ev = self.stream.next()?;
        Some(ev.map_err(|e| CtlError::from_client(&self.what, &self.host, &self.socket, e)))
    }
}
