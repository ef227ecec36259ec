//! The `kemari` CLI's daemon verbs (start, stop, status, failover, checkpoint, events) run as
//! the real binary against real `kemarid --mem` daemons (the in-memory mode: a primary with a
//! guest, a secondary it replicates to over loopback TCP), including their error output for an
//! unknown domain, an unreachable host, a daemon that is not running and a guest already
//! protected. docs/cli.md documents what is checked here.
//!
//! A target of the kemarid package (kemarid/Cargo.toml `[[test]]`), so cargo builds both
//! binaries first and `cargo test --workspace` runs it.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use kemarid::api::{Client, GuestStatus, HelloInfo, StatusReply};
use serde_json::Value;

const KEMARI: &str = env!("CARGO_BIN_EXE_kemari");
const KEMARID: &str = env!("CARGO_BIN_EXE_kemarid");

/// A fresh folder under the system's temp dir, removed at drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "kemari-cli-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `kemarid --mem` process, killed at drop.
struct Daemon {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
    hello: HelloInfo,
}

impl Daemon {
    /// Starts `kemarid --mem --socket DIR/NAME.sock --peer-listen 127.0.0.1:0 ARGS` and waits
    /// until it answers `hello`.
    fn start(dir: &Path, name: &str, args: &[&str]) -> Daemon {
        let socket = dir.join(format!("{name}.sock"));
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(KEMARID)
            .arg("--mem")
            .arg("--socket")
            .arg(&socket)
            .args(["--peer-listen", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.join(format!("{name}.err"))).unwrap())
            .spawn()
            .unwrap();
        let mut d = Daemon {
            child,
            socket,
            log,
            hello: HelloInfo {
                daemon: String::new(),
                protocols: vec![],
                host: String::new(),
                mode: String::new(),
                pid: 0,
                peer_listen: None,
                metrics_listen: None,
            },
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = d.child.try_wait().unwrap() {
                panic!("kemarid --mem exited ({st}) before serving:\n{}", d.logs());
            }
            let hello = Client::connect(&d.socket).and_then(|mut c| {
                match c.call(&kemarid::api::Request::Hello)? {
                    kemarid::api::Reply::Hello(h) => Ok(h),
                    other => panic!("hello answered {other:?}"),
                }
            });
            if let Ok(h) = hello {
                d.hello = h;
                return d;
            }
            assert!(
                Instant::now() < deadline,
                "kemarid --mem did not serve {} in 30 s:\n{}",
                d.socket.display(),
                d.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn sock(&self) -> &str {
        self.socket.to_str().unwrap()
    }

    /// Its peer address (`127.0.0.1:PORT`), the HOST argument of `kemari start`.
    fn peer(&self) -> String {
        self.hello.peer_listen.clone().expect("peer port bound")
    }

    /// The host part of [`Daemon::peer`]: the `peer` the other side's status shows.
    fn peer_host(&self) -> String {
        let p = self.peer();
        p.rsplit_once(':').map_or(p.clone(), |(h, _)| h.to_string())
    }

    fn logs(&self) -> String {
        let mut s = std::fs::read_to_string(&self.log).unwrap_or_default();
        s += &std::fs::read_to_string(self.log.with_extension("err")).unwrap_or_default();
        s
    }

    fn status(&self) -> StatusReply {
        Client::connect(&self.socket).unwrap().status(None).unwrap()
    }

    fn guest(&self, dom: &str) -> Option<GuestStatus> {
        self.status().guests.into_iter().find(|g| g.dom == dom)
    }

    /// Polls until `dom`'s status satisfies `f` (30 s at most).
    fn wait_for(&self, dom: &str, what: &str, f: impl Fn(&GuestStatus) -> bool) -> GuestStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let g = self.guest(dom);
            if let Some(g) = g.as_ref().filter(|g| f(g)) {
                return g.clone();
            }
            assert!(
                Instant::now() < deadline,
                "{dom} not {what} in 30 s: {g:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A primary with guest `web1` (and `db1`) and a secondary.
struct Pair {
    primary: Daemon,
    secondary: Daemon,
    _dir: TempDir,
}

fn pair(tag: &str) -> Pair {
    let dir = TempDir::new(tag);
    let secondary = Daemon::start(&dir.0, "secondary", &[]);
    let primary = Daemon::start(
        &dir.0,
        "primary",
        &["--mem-guest", "web1:256", "--mem-guest", "db1:128"],
    );
    Pair {
        primary,
        secondary,
        _dir: dir,
    }
}

/// Runs `kemari ARGS` (60 s at most).
fn kemari(args: &[&str]) -> Output {
    let mut child = Command::new(KEMARI)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("kemari {args:?} did not finish in 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts success and returns stdout.
fn ok(args: &[&str]) -> String {
    let o = kemari(args);
    assert_eq!(
        o.status.code(),
        Some(0),
        "kemari {args:?} failed:\nstdout: {}\nstderr: {}",
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

/// Asserts exit status 1 with a `kemari: ...` message and a `kemari: fix: ...` line on stderr
/// and nothing on stdout; returns stderr.
fn fails(args: &[&str]) -> String {
    let o = kemari(args);
    let err = stderr(&o);
    assert_eq!(
        o.status.code(),
        Some(1),
        "kemari {args:?}: expected exit status 1\nstdout: {}\nstderr: {err}",
        stdout(&o)
    );
    assert!(o.stdout.is_empty(), "{args:?}: stdout {}", stdout(&o));
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "{args:?}: {err}");
    assert!(lines[0].starts_with("kemari: "), "{err}");
    assert!(lines[1].starts_with("kemari: fix: "), "{err}");
    err
}

/// With --json a failure is also one JSON object on stdout; returns its error object.
fn fails_json(args: &[&str]) -> Value {
    let o = kemari(args);
    assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["ok"], false);
    assert!(v["error"]["message"].as_str().unwrap().len() > 10, "{v}");
    assert!(v["error"]["fix"].as_str().is_some(), "{v}");
    v["error"].clone()
}

fn json_line(s: &str) -> Value {
    let lines: Vec<&str> = s.lines().collect();
    assert_eq!(lines.len(), 1, "one JSON line expected: {s}");
    serde_json::from_str(lines[0]).unwrap()
}

/// `kemari start` through the initial sync, asserting it is protected.
fn start(p: &Pair, dom: &str) -> String {
    let host = p.secondary.peer();
    let out = ok(&[
        "start",
        dom,
        &host,
        "--interval-ms",
        "50",
        "--socket",
        p.primary.sock(),
    ]);
    assert!(
        out.starts_with(&format!(
            "{dom}: protected, replica on {} (",
            p.secondary.peer_host()
        )),
        "{out}"
    );
    out
}

// --- the verbs ----------------------------------------------------------------------------

#[test]
fn start_waits_for_the_initial_sync_and_reports_protection() {
    let p = pair("start");
    let out = start(&p, "web1");
    // Not a terminal: no progress bar, one line.
    assert_eq!(out.lines().count(), 1, "{out}");
    let g = p.primary.guest("web1").unwrap();
    assert_eq!(g.state.as_str(), "protected");
    assert_eq!(g.role.as_str(), "primary");
    assert!(g.initial_sync.as_ref().is_some_and(|s| s.done), "{g:?}");
    let s = p
        .secondary
        .wait_for("web1", "protected", |g| g.state.as_str() == "protected");
    assert_eq!(s.role.as_str(), "secondary");
}

#[test]
fn start_on_a_terminal_draws_the_initial_sync_progress() {
    // util-linux's script(1) gives kemari a pseudo-terminal as stdout.
    if Command::new("script").arg("--version").output().is_err() {
        panic!("script(1) (util-linux, part of every Debian) is needed for this test");
    }
    let p = pair("tty");
    let cmd = format!(
        "{KEMARI} start web1 {} --interval-ms 50 --socket {}",
        p.secondary.peer(),
        p.primary.sock()
    );
    let o = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let out = stdout(&o);
    assert!(o.status.success(), "{out}{}", stderr(&o));
    assert!(
        out.contains("initial sync"),
        "no progress bar drawn: {out:?}"
    );
    // The bar is cleared (ANSI erase) before the result line.
    assert!(out.contains("\u{1b}["), "{out:?}");
    let bar = out.find("initial sync").unwrap();
    let result = out.rfind("web1: protected, replica on ");
    assert!(result.is_some_and(|r| r > bar), "{out:?}");
    assert!(out.ends_with("\n"), "{out:?}");
}

#[test]
fn start_json_no_wait_answers_the_guest_at_once() {
    let p = pair("startjson");
    let host = p.secondary.peer();
    let v = json_line(&ok(&[
        "--json",
        "start",
        "web1",
        &host,
        "--no-wait",
        "--no-suspend",
        "--socket",
        p.primary.sock(),
    ]));
    assert_eq!(v["dom"], "web1");
    assert_eq!(v["role"], "primary");
    assert_eq!(v["peer"], p.secondary.peer_host().as_str());
    let state = v["state"].as_str().unwrap();
    assert!(
        ["starting", "initial-sync", "protected"].contains(&state),
        "{v}"
    );
    p.primary
        .wait_for("web1", "protected", |g| g.state.as_str() == "protected");
}

#[test]
fn status_table_and_json() {
    let p = pair("status");
    start(&p, "web1");
    p.primary.wait_for("web1", "checkpointing", |g| {
        g.checkpoints >= 3 && g.last_acked_seq.is_some()
    });
    let table = ok(&["status", "--socket", p.primary.sock()]);
    let lines: Vec<&str> = table.lines().collect();
    for col in [
        "GUEST",
        "ROLE",
        "PEER",
        "STATE",
        "CKPT/S",
        "LAST-ACK",
        "PAUSE p50/p99",
        "DIRTY/CKPT",
        "LAG",
        "LINK",
        "HEARTBEAT",
    ] {
        assert!(lines[0].contains(col), "{col}: {table}");
    }
    let row = lines
        .iter()
        .find(|l| l.starts_with("web1 "))
        .unwrap_or_else(|| panic!("{table}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[1], "primary", "{row}");
    assert_eq!(cells[2], p.secondary.peer_host(), "{row}");
    assert_eq!(cells[3], "protected", "{row}");
    assert!(cells[5].parse::<u64>().is_ok(), "LAST-ACK: {row}");

    // One guest, as JSON: the daemon's status reply.
    let v = json_line(&ok(&[
        "--json",
        "status",
        "web1",
        "--socket",
        p.primary.sock(),
    ]));
    assert_eq!(v["guests"].as_array().unwrap().len(), 1, "{v}");
    let g = &v["guests"][0];
    assert_eq!(g["dom"], "web1");
    assert_eq!(g["state"], "protected");
    assert!(g["last_acked_seq"].as_u64().is_some(), "{v}");
    for k in [
        "checkpoints_per_s",
        "pause_ms",
        "dirty_pages_per_checkpoint",
        "link_bytes_per_s",
    ] {
        assert!(!g[k].is_null(), "{k}: {v}");
    }

    // The secondary sees its replica.
    let table = ok(&["status", "--socket", p.secondary.sock()]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("web1 ") && l.contains(" secondary ")),
        "{table}"
    );
}

#[test]
fn status_without_guests_says_so() {
    let dir = TempDir::new("empty");
    let d = Daemon::start(&dir.0, "lonely", &[]);
    let out = ok(&["status", "--socket", d.sock()]);
    assert_eq!(
        out,
        format!("kemarid on {}: no protected guests\n", d.hello.host)
    );
    let v = json_line(&ok(&["status", "--json", "--socket", d.sock()]));
    assert_eq!(v["guests"], serde_json::json!([]));
}

#[test]
fn checkpoint_is_acknowledged_with_a_newer_sequence() {
    let p = pair("ckpt");
    start(&p, "web1");
    let before = p.primary.guest("web1").unwrap().last_acked_seq.unwrap();
    let out = ok(&["checkpoint", "web1", "--socket", p.primary.sock()]);
    let seq: u64 = out
        .trim()
        .strip_prefix("web1: checkpoint acknowledged, sequence ")
        .unwrap_or_else(|| panic!("{out}"))
        .parse()
        .unwrap();
    assert!(seq > before, "{seq} after {before}");
    let v = json_line(&ok(&[
        "checkpoint",
        "web1",
        "--json",
        "--wait-ms",
        "5000",
        "--socket",
        p.primary.sock(),
    ]));
    assert_eq!(v["dom"], "web1");
    assert!(v["acked_seq"].as_u64().unwrap() > seq, "{v}");
}

#[test]
fn events_follow_a_guest() {
    let p = pair("events");
    // Subscribe (to all guests: web1 is not known before the start) first, then start: the
    // state changes of the start are seen.
    let mut child = Command::new(KEMARI)
        .args(["events", "--count", "3", "--json", "--socket"])
        .arg(p.primary.sock())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    start(&p, "web1");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("kemari events did not see 3 events in 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(child.wait().unwrap().success(), "{out}{err}");
    let events: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 3, "{out}");
    assert!(events.iter().all(|e| e["dom"] == "web1"), "{out}");
    assert_eq!(events[0]["kind"], "state", "{out}");
    assert!(events[0]["to"].as_str().is_some(), "{out}");

    // Text form: a timestamp, the guest, the kind.
    let out = ok(&[
        "events",
        "web1",
        "--count",
        "1",
        "--socket",
        p.primary.sock(),
    ]);
    let line = out.trim_end();
    assert!(line.ends_with('\n') || !line.contains('\n'), "{out}");
    let fields: Vec<&str> = line.split(' ').collect();
    assert!(fields[0].len() == 24 && fields[0].ends_with('Z'), "{line}");
    assert_eq!(fields[1], "web1", "{line}");
}

#[test]
fn stop_ends_protection_on_both_hosts() {
    let p = pair("stop");
    start(&p, "web1");
    let out = ok(&["stop", "web1", "--socket", p.primary.sock()]);
    assert!(
        out.starts_with(
            "web1: protection stopped; the guest runs on here unprotected (role primary"
        ),
        "{out}"
    );
    assert_eq!(p.primary.guest("web1").unwrap().state.as_str(), "stopped");
    p.secondary
        .wait_for("web1", "stopped", |g| g.state.is_final());
    // Protection can be started again after a stop.
    start(&p, "web1");
    let v = json_line(&ok(&[
        "--json",
        "stop",
        "web1",
        "--socket",
        p.primary.sock(),
    ]));
    assert_eq!(v["state"], "stopped", "{v}");
}

#[test]
fn failover_runs_the_guest_on_the_secondary() {
    let p = pair("failover");
    start(&p, "web1");
    let acked = p
        .primary
        .wait_for("web1", "checkpointing", |g| g.checkpoints >= 2)
        .last_acked_seq
        .unwrap();
    p.secondary
        .wait_for("web1", "protected", |g| g.state.as_str() == "protected");
    // On the primary it is refused: failover is the secondary's.
    let err = fails(&["failover", "web1", "--socket", p.primary.sock()]);
    assert!(err.contains("web1"), "{err}");
    let out = ok(&[
        "failover",
        "web1",
        "--force",
        "--socket",
        p.secondary.sock(),
    ]);
    assert!(out.starts_with("web1: runs on "), "{out}");
    assert!(out.contains("(state failed-over)"), "{out}");
    let g = p.secondary.guest("web1").unwrap();
    assert_eq!(g.state.as_str(), "failed-over");
    assert!(g.last_acked_seq.unwrap() >= acked, "{g:?}");
}

// --- errors -------------------------------------------------------------------------------

#[test]
fn unknown_domain_is_named_with_its_host_and_a_fix() {
    let p = pair("unknown");
    let host = p.secondary.peer();
    let err = fails(&["start", "nosuch", &host, "--socket", p.primary.sock()]);
    assert!(err.contains("nosuch"), "{err}");
    assert!(err.contains(&host), "{err}");
    let e = fails_json(&[
        "--json",
        "start",
        "nosuch",
        &host,
        "--socket",
        p.primary.sock(),
    ]);
    assert_eq!(e["code"], "unknown-domain", "{e}");
    for verb in ["stop", "status", "failover", "checkpoint"] {
        let err = fails(&[verb, "nosuch", "--socket", p.primary.sock()]);
        assert!(err.contains("nosuch"), "{verb}: {err}");
        let e = fails_json(&[verb, "nosuch", "--json", "--socket", p.primary.sock()]);
        assert_eq!(e["code"], "unknown-domain", "{verb}: {e}");
    }
}

#[test]
fn unreachable_host_is_named_with_the_cause_and_a_fix() {
    let p = pair("unreachable");
    // A port nobody listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let err = fails(&["start", "web1", &closed, "--socket", p.primary.sock()]);
    assert!(err.contains("web1"), "{err}");
    assert!(err.contains(&closed), "{err}");
    assert!(err.contains("kemarid"), "{err}");
    let e = fails_json(&[
        "start",
        "web1",
        &closed,
        "--json",
        "--socket",
        p.primary.sock(),
    ]);
    assert_eq!(e["code"], "unreachable-host", "{e}");
    // Nothing half-applied: the guest can be protected afterwards.
    start(&p, "web1");
}

#[test]
fn daemon_not_running_is_reported_by_every_verb() {
    let dir = TempDir::new("nodaemon");
    let sock = dir.0.join("absent.sock");
    let sock = sock.to_str().unwrap();
    let verbs: [&[&str]; 6] = [
        &["start", "web1", "host2"],
        &["stop", "web1"],
        &["status"],
        &["failover", "web1"],
        &["checkpoint", "web1"],
        &["events"],
    ];
    for v in verbs {
        let mut args = v.to_vec();
        args.extend(["--socket", sock]);
        let err = fails(&args);
        assert!(err.contains("kemarid is not running"), "{v:?}: {err}");
        assert!(err.contains(sock), "{v:?}: {err}");
        assert!(err.contains("--socket PATH"), "{v:?}: {err}");
        if let Some(dom) = v.get(1) {
            assert!(err.contains(dom), "{v:?}: {err}");
        }
        args.push("--json");
        let e = fails_json(&args);
        assert_eq!(e["code"], "daemon-not-running", "{v:?}: {e}");
    }
    // The default socket is named when --socket is not given (and kemarid is not running
    // there on a build machine).
    if !Path::new(kemarid::api::DEFAULT_SOCKET).exists() {
        let err = fails(&["status"]);
        assert!(err.contains(kemarid::api::DEFAULT_SOCKET), "{err}");
    }
}

#[test]
fn guest_already_protected_is_refused_with_a_fix() {
    let p = pair("twice");
    start(&p, "web1");
    let host = p.secondary.peer();
    let err = fails(&["start", "web1", &host, "--socket", p.primary.sock()]);
    assert!(err.contains("web1"), "{err}");
    assert!(err.contains("kemari stop web1"), "{err}");
    let e = fails_json(&[
        "start",
        "web1",
        &host,
        "--json",
        "--socket",
        p.primary.sock(),
    ]);
    assert_eq!(e["code"], "already-protected", "{e}");
    // The running protection is untouched.
    assert_eq!(p.primary.guest("web1").unwrap().state.as_str(), "protected");
}

#[test]
fn usage_errors_exit_with_status_2() {
    for args in [&["start", "web1"][..], &["stop"], &["status", "--bogus"]] {
        let o = kemari(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
    }
}
