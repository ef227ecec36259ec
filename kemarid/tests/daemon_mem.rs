//! The `kemarid` binary in its in-memory mode: two daemons as processes, readiness through
//! $NOTIFY_SOCKET, a guest protected through the control socket, metrics, SIGTERM.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use kemarid::api::{Client, GuestState, Reply, Request};

struct Daemon {
    child: Child,
    socket: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kemarid-bin-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Starts `kemarid --mem` and waits for its READY=1.
fn spawn(dir: &Path, name: &str, guests: &[&str]) -> Daemon {
    let notify = dir.join(format!("{name}.notify"));
    let rx = UnixDatagram::bind(&notify).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let socket = dir.join(format!("{name}.sock"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kemarid"));
    cmd.args(["--mem", "--socket"])
        .arg(&socket)
        .args(["--hostname", name, "--metrics-listen", "127.0.0.1:0"])
        .env("NOTIFY_SOCKET", &notify)
        .env("RUST_LOG", "warn");
    for g in guests {
        cmd.args(["--mem-guest", g]);
    }
    let child = cmd.spawn().unwrap();
    let mut buf = [0u8; 64];
    let n = rx.recv(&mut buf).expect("READY=1 from kemarid");
    assert_eq!(&buf[..n], b"READY=1");
    let meta = std::fs::metadata(&socket).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o600,
        "control socket is root-only"
    );
    Daemon { child, socket }
}

fn hello(d: &Daemon) -> kemarid::api::HelloInfo {
    match Client::connect(&d.socket)
        .unwrap()
        .call(&Request::Hello)
        .unwrap()
    {
        Reply::Hello(h) => h,
        other => panic!("{other:?}"),
    }
}

#[test]
fn two_daemons_protect_a_guest_and_stop_on_sigterm() {
    let dir = tmp("two");
    let a = spawn(&dir, "hosta", &["web:512"]);
    let b = spawn(&dir, "hostb", &[]);
    let hb = hello(&b);
    assert_eq!(hb.mode, "mem");
    assert_eq!(hb.protocols, vec![1]);
    let peer = hb.peer_listen.unwrap();
    let mut c = Client::connect(&a.socket).unwrap();
    match c
        .call(&Request::Start {
            dom: "web".into(),
            host: peer,
            options: Default::default(),
        })
        .unwrap()
    {
        Reply::Guest(s) => assert_eq!(s.peer, "127.0.0.1"),
        other => panic!("{other:?}"),
    }
    let t0 = Instant::now();
    let s = loop {
        let s = c.status(Some("web")).unwrap().guests.remove(0);
        if s.state == GuestState::Protected && s.checkpoints >= 5 {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "{s:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(s.last_acked_seq.unwrap() >= 5);
    assert_eq!(
        Client::connect(&b.socket)
            .unwrap()
            .status(None)
            .unwrap()
            .guests[0]
            .peer,
        "hosta"
    );
    // metrics over HTTP
    let addr = hello(&a).metrics_listen.unwrap();
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    use std::io::{Read, Write};
    conn.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut page = String::new();
    conn.read_to_string(&mut page).unwrap();
    assert!(page.starts_with("HTTP/1.0 200 OK"), "{page}");
    assert!(page.contains("kemari_checkpoints_total{dom=\"web\",role=\"primary\"}"));
    // SIGTERM: a clean exit, the socket removed
    for d in [a, b] {
        let pid = nix::unistd::Pid::from_raw(d.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let mut d = d;
        let status = d.child.wait().unwrap();
        assert!(status.success(), "{status:?}");
        assert!(!d.socket.exists());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_second_daemon_on_the_same_socket_is_refused() {
    let dir = tmp("dup");
    let a = spawn(&dir, "hostc", &[]);
    let out = Command::new(env!("CARGO_BIN_EXE_kemarid"))
        .args(["--mem", "--socket"])
        .arg(&a.socket)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another kemarid is serving"), "{err}");
    // the first one still answers
    assert_eq!(hello(&a).host, "hostc");
    let _ = std::fs::remove_dir_all(&dir);
}
