//! Two in-memory daemons in this process, talking over their real sockets: a primary
//! protecting a guest on a secondary with the real sync engine.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::mem::MemBackend;
use super::server::{Addresses, Server};
use super::*;
use crate::api::{Client, ClientError, ErrorCode, EventKind, GuestState, Reply, Request};

struct Host {
    d: Arc<Daemon>,
    xen: hypervisor::mem::MemXen,
    socket: PathBuf,
    dir: PathBuf,
}

impl Drop for Host {
    fn drop(&mut self) {
        self.d.begin_shutdown();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn host(tag: &str, guests: &[(&str, u64)]) -> Host {
    let dir = std::env::temp_dir().join(format!(
        "kemarid-test-{}-{tag}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut config = Config::default();
    config.daemon.state_dir = dir.join("state");
    config.daemon.spool_dir = dir.join("spool");
    config.daemon.data_listen = "127.0.0.1".into();
    config.daemon.hostname = tag.into();
    config.defaults.interval_ms = Some(20);
    let settings = Settings::from_config(config, true).unwrap();
    let guests: Vec<(String, u64)> = guests.iter().map(|(n, p)| (n.to_string(), *p)).collect();
    let backend = MemBackend::new(&guests).unwrap();
    let xen = backend.xen().clone();
    let d = Daemon::new(settings, Box::new(backend)).unwrap();
    let socket = dir.join("kemarid.sock");
    let server = Server::bind(&Addresses {
        socket: socket.clone(),
        peer_listen: "127.0.0.1:0".into(),
        metrics_listen: "127.0.0.1:0".into(),
    })
    .unwrap();
    server.run(&d).unwrap();
    d.supervise().unwrap();
    Host {
        d,
        xen,
        socket,
        dir,
    }
}

fn peer_of(h: &Host) -> String {
    h.d.peer_addr.lock().unwrap().clone().unwrap()
}

fn client(h: &Host) -> Client {
    Client::connect(&h.socket).unwrap()
}

fn api_err(r: Result<Reply, ClientError>) -> crate::api::ApiError {
    match r {
        Err(ClientError::Api(e)) => e,
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn wait_state(h: &Host, dom: &str, want: GuestState, timeout: Duration) -> crate::api::GuestStatus {
    let t0 = Instant::now();
    let mut c = client(h);
    loop {
        let s = c.status(Some(dom)).unwrap().guests.remove(0);
        if s.state == want {
            return s;
        }
        assert!(
            t0.elapsed() < timeout,
            "{dom} on {} stayed {:?} (want {want:?}): {s:?}",
            h.d.host(),
            s.state
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start(a: &Host, b: &Host, dom: &str) -> crate::api::GuestStatus {
    match client(a)
        .call(&Request::Start {
            dom: dom.into(),
            host: peer_of(b),
            options: Default::default(),
        })
        .unwrap()
    {
        Reply::Guest(s) => *s,
        other => panic!("{other:?}"),
    }
}

#[test]
fn protect_checkpoint_stop_through_the_sockets() {
    let a = host("alpha", &[("web1", 256)]);
    let b = host("beta", &[]);
    let events = client(&a).events(Some("web1"));
    // events of a guest not yet known are refused
    assert_eq!(
        match events {
            Err(ClientError::Api(e)) => e.code,
            other => panic!("{other:?}"),
        },
        ErrorCode::UnknownDomain
    );
    let events = client(&a).events(None).unwrap();
    let s = start(&a, &b, "web1");
    assert_eq!(s.role, Role::Primary);
    assert_eq!(s.state, GuestState::Starting);
    let p = wait_state(&a, "web1", GuestState::Protected, Duration::from_secs(30));
    assert!(p.initial_sync.as_ref().unwrap().done);
    assert!(p.initial_sync.unwrap().total >= 256);
    let sec = wait_state(&b, "web1", GuestState::Protected, Duration::from_secs(30));
    assert_eq!(sec.role, Role::Secondary);
    assert_eq!(sec.peer, "alpha");
    assert!(sec.domid.is_some());

    // guest already protected: refused, on both sides
    let e = api_err(client(&a).call(&Request::Start {
        dom: "web1".into(),
        host: peer_of(&b),
        options: Default::default(),
    }));
    assert_eq!(e.code, ErrorCode::AlreadyProtected);
    assert!(e.fix.unwrap().contains("kemari stop web1"));

    // forced checkpoints are acknowledged
    let mut c = client(&a);
    let mut last = 0;
    for _ in 0..3 {
        match c
            .call(&Request::Checkpoint {
                dom: "web1".into(),
                wait_ms: None,
            })
            .unwrap()
        {
            Reply::Checkpoint(r) => {
                assert!(r.acked_seq > last);
                last = r.acked_seq;
            }
            other => panic!("{other:?}"),
        }
    }
    // wrong side
    assert_eq!(
        api_err(client(&b).call(&Request::Checkpoint {
            dom: "web1".into(),
            wait_ms: None
        }))
        .code,
        ErrorCode::NotPrimary
    );
    assert_eq!(
        api_err(client(&a).call(&Request::Failover {
            dom: "web1".into(),
            force: false
        }))
        .code,
        ErrorCode::NotSecondary
    );
    // let the rates fill in
    std::thread::sleep(Duration::from_millis(600));
    let s = c.status(Some("web1")).unwrap().guests.remove(0);
    assert!(s.checkpoints >= 3, "{s:?}");
    assert!(s.checkpoints_per_s > 0.0, "{s:?}");
    assert!(s.bytes > 0 && s.link_bytes_per_s > 0.0, "{s:?}");
    assert!(
        s.pause_ms.max > 0.0 && s.checkpoint_ms.p50 >= s.pause_ms.p50,
        "{s:?}"
    );
    assert!(s.replication_lag_ms.is_some());
    let secondary_domid = b_status(&b).domid.unwrap();

    // metrics
    let text = scrape(&a);
    let m = parse_metrics(&text);
    let cps = m["kemari_checkpoints_total{dom=\"web1\",role=\"primary\"}"];
    assert!(cps >= 3.0, "{text}");
    assert_eq!(
        m["kemari_checkpoint_pause_seconds_count{dom=\"web1\",role=\"primary\"}"],
        m["kemari_checkpoint_pause_seconds_bucket{dom=\"web1\",role=\"primary\",le=\"+Inf\"}"]
    );
    assert!(m["kemari_bytes_sent_total{dom=\"web1\",role=\"primary\"}"] > 0.0);
    assert_eq!(
        m["kemari_guest_protected{dom=\"web1\",role=\"primary\"}"],
        1.0
    );

    // stop: the primary ends protection, the secondary drops its replica
    let s = match client(&a)
        .call(&Request::Stop { dom: "web1".into() })
        .unwrap()
    {
        Reply::Guest(s) => *s,
        other => panic!("{other:?}"),
    };
    assert_eq!(s.state, GuestState::Stopped, "{s:?}");
    wait_state(&b, "web1", GuestState::Stopped, Duration::from_secs(30));
    let t0 = Instant::now();
    while hypervisor::DomainControl::domain_info(
        mem_xen(&b),
        hypervisor::DomId::try_from(secondary_domid).unwrap(),
    )
    .is_ok()
    {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "replica not destroyed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // the event stream told the story
    let mut seen = Vec::new();
    for ev in events {
        let ev = ev.unwrap();
        if let EventKind::State { to, .. } = ev.kind {
            seen.push(to);
            if to == GuestState::Stopped {
                break;
            }
        }
    }
    // the initial sync of 256 pages may be over between two looks of the supervisor
    seen.retain(|s| *s != GuestState::InitialSync);
    assert_eq!(
        seen,
        vec![
            GuestState::Starting,
            GuestState::Protected,
            GuestState::Stopping,
            GuestState::Stopped
        ]
    );
    // a stopped guest can be forgotten, then protected again
    client(&a)
        .call(&Request::Stop { dom: "web1".into() })
        .unwrap();
    assert_eq!(client(&a).status(None).unwrap().guests.len(), 0);
    client(&b)
        .call(&Request::Stop { dom: "web1".into() })
        .unwrap();
    start(&a, &b, "web1");
    wait_state(&a, "web1", GuestState::Protected, Duration::from_secs(30));
}

fn b_status(b: &Host) -> crate::api::GuestStatus {
    client(b).status(Some("web1")).unwrap().guests.remove(0)
}

fn mem_xen(h: &Host) -> &hypervisor::mem::MemXen {
    &h.xen
}

fn scrape(h: &Host) -> String {
    let addr = h.d.metrics_addr.lock().unwrap().clone().unwrap();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status).unwrap();
    assert!(status.starts_with("HTTP/1.0 200"), "{status}");
    let mut body = String::new();
    let mut in_body = false;
    for line in r.lines() {
        let line = line.unwrap();
        if in_body {
            body.push_str(&line);
            body.push('\n');
        } else if line.is_empty() {
            in_body = true;
        }
    }
    body
}

/// Parses the text format strictly enough to catch malformed lines: every sample line is
/// `name{labels} value` with a declared TYPE.
fn parse_metrics(text: &str) -> std::collections::BTreeMap<String, f64> {
    let mut typed = std::collections::BTreeSet::new();
    let mut out = std::collections::BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut p = rest.split(' ');
            let name = p.next().unwrap();
            let kind = p.next().unwrap();
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            typed.insert(name.to_string());
            continue;
        }
        if line.starts_with('#') {
            assert!(line.starts_with("# HELP "), "{line}");
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        let v: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let name = series.split('{').next().unwrap();
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|b| typed.contains(*b))
            .unwrap_or(name);
        assert!(typed.contains(base), "sample without TYPE: {line}");
        if let Some(l) = series.strip_prefix(name) {
            if !l.is_empty() {
                assert!(l.starts_with('{') && l.ends_with('}'), "{line}");
            }
        }
        out.insert(series.to_string(), v);
    }
    out
}

#[test]
fn errors_name_the_guest_the_host_and_the_fix() {
    let a = host("gamma", &[("db", 64)]);
    let mut c = client(&a);
    let e = api_err(c.call(&Request::Start {
        dom: "nosuch".into(),
        host: "127.0.0.1:1".into(),
        options: Default::default(),
    }));
    assert_eq!(e.code, ErrorCode::UnknownDomain);
    assert!(
        e.message.contains("nosuch") && e.message.contains("db"),
        "{e}"
    );
    // nothing listens on port 1
    let e = api_err(c.call(&Request::Start {
        dom: "db".into(),
        host: "127.0.0.1:1".into(),
        options: Default::default(),
    }));
    assert_eq!(e.code, ErrorCode::UnreachableHost);
    assert!(
        e.message.contains("db") && e.message.contains("127.0.0.1:1"),
        "{e}"
    );
    assert!(e.fix.unwrap().contains("start kemarid"));
    // nothing half-applied
    assert!(c.status(None).unwrap().guests.is_empty());
    let e = api_err(c.call(&Request::Stop { dom: "db".into() }));
    assert_eq!(e.code, ErrorCode::UnknownDomain);
    // the peer-only ops are refused locally, the local ops on the peer port
    let e = api_err(c.call(&Request::PeerStop { dom: "db".into() }));
    assert_eq!(e.code, ErrorCode::Forbidden);
    let mut p = Client::connect_tcp(&peer_of(&a), Duration::from_secs(2)).unwrap();
    let e = api_err(p.call(&Request::Status { dom: None }));
    assert_eq!(e.code, ErrorCode::Forbidden);
    match p.call(&Request::Hello).unwrap() {
        Reply::Hello(h) => {
            assert_eq!(h.mode, "mem");
            assert_eq!(h.host, "gamma");
        }
        other => panic!("{other:?}"),
    }
    // bad lines on the raw socket: version first, then the request
    let s = std::os::unix::net::UnixStream::connect(&a.socket).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    for (line, code) in [
        (
            "{\"v\":9,\"id\":1,\"op\":\"hello\"}\n",
            "unsupported-version",
        ),
        ("{\"v\":1,\"id\":2,\"op\":\"reboot\"}\n", "bad-request"),
        ("garbage\n", "bad-request"),
    ] {
        w.write_all(line.as_bytes()).unwrap();
        let mut resp = String::new();
        r.read_line(&mut resp).unwrap();
        assert!(
            resp.contains(&format!("\"code\":\"{code}\"")),
            "{line} -> {resp}"
        );
    }
}

#[test]
fn failover_on_the_secondary_runs_the_guest_there() {
    let a = host("delta", &[("app", 128)]);
    let b = host("epsilon", &[]);
    // before anything is protected
    assert_eq!(
        api_err(client(&b).call(&Request::Failover {
            dom: "app".into(),
            force: false
        }))
        .code,
        ErrorCode::UnknownDomain
    );
    start(&a, &b, "app");
    wait_state(&b, "app", GuestState::Protected, Duration::from_secs(30));
    let s = match client(&b)
        .call(&Request::Failover {
            dom: "app".into(),
            force: false,
        })
        .unwrap()
    {
        Reply::Guest(s) => *s,
        other => panic!("{other:?}"),
    };
    assert_eq!(s.state, GuestState::FailedOver);
    let domid = hypervisor::DomId::try_from(s.domid.unwrap()).unwrap();
    let info = hypervisor::DomainControl::domain_info(mem_xen(&b), domid).unwrap();
    assert!(!info.paused, "the failed-over guest runs");
    // the primary lost its secondary and says so
    let p = wait_state(&a, "app", GuestState::Failed, Duration::from_secs(30));
    assert!(p.error.is_some());
    let m = parse_metrics(&scrape(&b));
    assert_eq!(m["kemari_failovers_total"], 1.0);
    // again: already done
    assert_eq!(
        api_err(client(&b).call(&Request::Failover {
            dom: "app".into(),
            force: false
        }))
        .code,
        ErrorCode::WrongState
    );
}

/// A backend that only adopts (the way the dom0 backend does: processes recognised by their
/// command line).
struct AdoptOnly;

impl Backend for AdoptOnly {
    fn mode(&self) -> &'static str {
        "test"
    }
    fn resolve(&self, dom: &str) -> Result<(u32, String), crate::api::ApiError> {
        Err(crate::api::ApiError::bare(ErrorCode::UnknownDomain, dom))
    }
    fn start_primary(&self, _: &WorkerSpec) -> Result<Box<dyn Worker>, crate::api::ApiError> {
        Err(crate::api::ApiError::bare(
            ErrorCode::Internal,
            "no workers here",
        ))
    }
    fn start_secondary(
        &self,
        _: &WorkerSpec,
    ) -> Result<(Box<dyn Worker>, u16), crate::api::ApiError> {
        Err(crate::api::ApiError::bare(
            ErrorCode::Internal,
            "no workers here",
        ))
    }
    fn adopt(&self, rec: &GuestRecord, dir: &std::path::Path) -> Option<Box<dyn Worker>> {
        worker::ProcessWorker::adopt(rec.pid?, &dir.join(worker::STATUS_FILE))
            .map(|w| Box::new(w) as Box<dyn Worker>)
    }
    fn destroy_replica(&self, _: u32) -> Result<(), String> {
        Ok(())
    }
}

#[test]
fn a_restarted_daemon_adopts_running_workers_and_reports_dead_ones() {
    let dir = std::env::temp_dir().join(format!("kemarid-adopt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut config = Config::default();
    config.daemon.state_dir = dir.join("state");
    config.daemon.spool_dir = dir.join("spool");
    config.daemon.hostname = "zeta".into();
    let settings = Settings::from_config(config.clone(), true).unwrap();
    let opts = config.resolve("x", &Default::default()).unwrap();
    // "live": a worker process still running, its last report says protected
    let live_dir = settings.guests_dir.join("live");
    std::fs::create_dir_all(&live_dir).unwrap();
    let status = live_dir.join(worker::STATUS_FILE);
    let mut child = std::process::Command::new("sh")
        .args(["-c", "sleep 30; true", &status.display().to_string()])
        .spawn()
        .unwrap();
    let w = report::StatusWriter::new(Some(&status), Role::Primary).unwrap();
    w.initial_done();
    drop(w);
    let rec = |dom: &str, pid: u32| GuestRecord {
        dom: dom.into(),
        role: Role::Primary,
        peer: "eta".into(),
        peer_daemon: Some("eta:7200".into()),
        opts: opts.clone(),
        pid: Some(pid),
        domid: Some(4),
        data_port: Some(7210),
        started: 1.0,
    };
    rec("live", child.id()).save(&live_dir).unwrap();
    // "gone": its worker died while no daemon ran
    let gone_dir = settings.guests_dir.join("gone");
    std::fs::create_dir_all(&gone_dir).unwrap();
    let mut dead = std::process::Command::new("true").spawn().unwrap();
    let dead_pid = dead.id();
    dead.wait().unwrap();
    rec("gone", dead_pid).save(&gone_dir).unwrap();
    // wait until the child shows its own command line (after exec)
    let t0 = Instant::now();
    while worker::ProcessWorker::adopt(child.id(), &status).is_none() {
        assert!(t0.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(10));
    }

    let d = Daemon::new(settings, Box::new(AdoptOnly)).unwrap();
    let s = match d.handle(Request::Status { dom: None }).unwrap() {
        Reply::Status(s) => s.guests,
        other => panic!("{other:?}"),
    };
    assert_eq!(s.len(), 2);
    let gone = s.iter().find(|g| g.dom == "gone").unwrap();
    assert_eq!(gone.state, GuestState::Failed);
    assert!(
        gone.error.as_ref().unwrap().contains("was gone"),
        "{gone:?}"
    );
    assert_eq!(gone.worker_pid, None);
    let live = s.iter().find(|g| g.dom == "live").unwrap();
    assert_eq!(live.state, GuestState::Protected);
    assert_eq!(live.worker_pid, Some(child.id()));
    assert_eq!(live.peer, "eta");
    // the worker ends: the daemon notices and says so
    child.kill().unwrap();
    child.wait().unwrap();
    d.poll();
    let live = match d
        .handle(Request::Status {
            dom: Some("live".into()),
        })
        .unwrap()
    {
        Reply::Status(mut s) => s.guests.remove(0),
        other => panic!("{other:?}"),
    };
    assert_eq!(live.state, GuestState::Failed);
    assert!(live.error.unwrap().contains("without reporting an end"));
    // stop forgets a guest whose protection is over, and its folder
    d.handle(Request::Stop { dom: "gone".into() }).unwrap();
    assert!(!dir.join("state/guests/gone").exists());
    let _ = std::fs::remove_dir_all(&dir);
}
