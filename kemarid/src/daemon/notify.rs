//! systemd's readiness protocol (`sd_notify`): a datagram to `$NOTIFY_SOCKET` (a path, or an
//! abstract name after `@`), so that `kemarid.service` can be `Type=notify` without libsystemd.

use std::os::unix::net::UnixDatagram;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// The datagram could not be sent.
    #[error("notifying systemd at {socket} ({state}): {source}")]
    Send {
        /// `$NOTIFY_SOCKET`.
        socket: String,
        /// What was sent.
        state: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// Sends `state` (e.g. `READY=1`) if `$NOTIFY_SOCKET` is set; `Ok(false)` if it is not (not
/// started by systemd).
pub fn notify(state: &str) -> Result<bool, NotifyError> {
    match std::env::var_os("NOTIFY_SOCKET") {
        None => Ok(false),
        Some(s) => notify_to(&s.to_string_lossy(), state).map(|()| true),
    }
}

/// Sends `state` to the notify socket `socket`.
pub fn notify_to(socket: &str, state: &str) -> Result<(), NotifyError> {
    let err = |source| NotifyError::Send {
        socket: socket.into(),
        state: state.into(),
        source,
    };
    let sock = UnixDatagram::unbound().map_err(err)?;
    if let Some(name) = socket.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        let addr =
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).map_err(err)?;
        sock.send_to_addr(state.as_bytes(), &addr).map_err(err)?;
    } else {
        sock.send_to(state.as_bytes(), socket).map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_reaches_a_path_socket_and_an_abstract_one() {
        let path = std::env::temp_dir().join(format!("kemari-notify-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let rx = UnixDatagram::bind(&path).unwrap();
        notify_to(&path.display().to_string(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        let _ = std::fs::remove_file(&path);

        use std::os::linux::net::SocketAddrExt;
        let name = format!("kemari-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&addr).unwrap();
        notify_to(&format!("@{name}"), "STOPPING=1").unwrap();
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
        assert!(notify_to("/nonexistent/notify.sock", "READY=1").is_err());
    }
}
