use std::io::{BufReader, Write};
use std::os::unix::net::UnixListener;

use super::*;

fn status(dom: &str) -> GuestStatus {
    GuestStatus {
        dom: dom.into(),
        domid: Some(3),
        role: Role::Primary,
        peer: "host2".into(),
        state: GuestState::Protected,
        since: 1.5,
        worker_pid: Some(42),
        checkpoints: 10,
        checkpoints_per_s: 9.5,
        last_acked_seq: Some(10),
        pause_ms: Quantiles {
            p50: 1.0,
            p99: 2.0,
            max: 3.0,
        },
        checkpoint_ms: Quantiles::default(),
        dirty_pages_per_checkpoint: 12.0,
        replication_lag_ms: Some(40.0),
        link_bytes_per_s: 1000.0,
        bytes: 4096,
        heartbeat: Some(HeartbeatStatus {
            period_ms: 100,
            misses_allowed: 5,
            peer: "alive".into(),
            last_heard_ms: Some(20.0),
            misses: 0,
        }),
        initial_sync: Some(InitialSync {
            pages: 100,
            total: 100,
            rate_pages_per_s: 1e5,
            round: 2,
            eta_s: None,
            done: true,
        }),
        error: None,
    }
}

#[test]
fn every_request_round_trips() {
    let reqs = vec![
        Request::Hello,
        Request::Status { dom: None },
        Request::Status {
            dom: Some("g".into()),
        },
        Request::Start {
            dom: "g".into(),
            host: "host2".into(),
            options: StartOptions {
                interval_ms: Some(50),
                suspend: Some(true),
                disk: Some("/srv/g.img".into()),
                ..StartOptions::default()
            },
        },
        Request::Stop { dom: "g".into() },
        Request::Failover {
            dom: "g".into(),
            force: true,
        },
        Request::Checkpoint {
            dom: "g".into(),
            wait_ms: Some(5),
        },
        Request::Events { dom: None },
        Request::PeerReceive {
            dom: "g".into(),
            primary: "host1".into(),
            options: StartOptions::default(),
        },
        Request::PeerStop { dom: "g".into() },
    ];
    for req in reqs {
        let line = to_line(&RequestLine {
            v: PROTOCOL_VERSION,
            id: Some(9),
            req: req.clone(),
        });
        assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'));
        assert!(line.contains(&format!("\"op\":\"{}\"", req.op())), "{line}");
        let back = parse_request(line.trim_end()).unwrap();
        assert_eq!(back.req, req);
        assert_eq!(back.id, Some(9));
    }
}

#[test]
fn documented_request_form_parses() {
    let r = parse_request(
        r#"{"v":1,"op":"start","dom":"g1","host":"host2","options":{"interval_ms":50}}"#,
    )
    .unwrap();
    assert_eq!(
        r.req,
        Request::Start {
            dom: "g1".into(),
            host: "host2".into(),
            options: StartOptions {
                interval_ms: Some(50),
                ..StartOptions::default()
            }
        }
    );
    assert_eq!(r.id, None);
}

#[test]
fn replies_and_events_round_trip() {
    let replies = vec![
        Reply::Hello(HelloInfo {
            daemon: "0.1.0".into(),
            protocols: vec![1],
            host: "h".into(),
            mode: "mem".into(),
            pid: 1,
            peer_listen: Some("127.0.0.1:7200".into()),
            metrics_listen: None,
        }),
        Reply::Status(StatusReply {
            host: "h".into(),
            guests: vec![status("a"), status("b")],
        }),
        Reply::Guest(Box::new(status("c"))),
        Reply::Checkpoint(CheckpointReply {
            dom: "c".into(),
            acked_seq: 7,
        }),
        Reply::Subscribed { dom: None },
        Reply::PeerReady(PeerReady {
            dom: "c".into(),
            data_port: 1,
            heartbeat_port: 2,
        }),
        Reply::PeerStopped { dom: "c".into() },
    ];
    for r in replies {
        let line = to_line(&ResponseLine::ok(Some(3), r.clone()));
        let back: ResponseLine = serde_json::from_str(&line).unwrap();
        assert_eq!(back.id, Some(3));
        assert_eq!(back.into_result().unwrap(), r);
    }
    let kinds = vec![
        EventKind::State {
            from: None,
            to: GuestState::Starting,
            reason: "start".into(),
        },
        EventKind::InitialSync {
            pages: 1,
            total: 2,
            rate_pages_per_s: 3.0,
        },
        EventKind::Checkpoints {
            last_acked_seq: 4,
            checkpoints: 4,
            per_s: 2.0,
        },
        EventKind::Heartbeat {
            peer: "dead".into(),
        },
        EventKind::FailedOver {
            domid: Some(5),
            seq: Some(4),
        },
        EventKind::WorkerExit { pid: 9, code: None },
        EventKind::Adopted { pid: 9 },
    ];
    for kind in kinds {
        let ev = EventLine {
            v: 1,
            event: Event {
                time: 2.0,
                dom: "g".into(),
                kind,
            },
        };
        let line = to_line(&ev);
        assert_eq!(serde_json::from_str::<EventLine>(&line).unwrap(), ev);
    }
}

#[test]
fn error_response_carries_code_message_and_fix() {
    let e = ApiError::new(
        ErrorCode::AlreadyProtected,
        "guest g is already protected (secondary host2)",
        "kemari stop g first",
    );
    let line = to_line(&ResponseLine::err(Some(1), e.clone()));
    assert!(line.contains("\"code\":\"already-protected\""), "{line}");
    let back: ResponseLine = serde_json::from_str(&line).unwrap();
    assert_eq!(back.into_result().unwrap_err(), e);
    assert_eq!(
        e.to_string(),
        "guest g is already protected (secondary host2) (kemari stop g first)"
    );
    // a code from a newer daemon still parses
    let newer: ApiError = serde_json::from_str(r#"{"code":"brand-new","message":"m"}"#).unwrap();
    assert_eq!(newer.code, ErrorCode::Unknown);
    for c in [
        ErrorCode::UnknownDomain,
        ErrorCode::UnreachableHost,
        ErrorCode::NotSecondary,
        ErrorCode::Internal,
    ] {
        assert_eq!(
            serde_json::to_string(&c).unwrap(),
            format!("\"{}\"", c.as_str())
        );
    }
}

#[test]
fn unknown_version_is_refused_before_the_request_is_read() {
    for line in [
        r#"{"v":2,"id":4,"op":"hello"}"#,
        r#"{"v":2,"id":4,"op":"no-such-op","junk":true}"#,
        r#"{"v":"1","id":4,"op":"hello"}"#,
        r#"{"id":4,"op":"hello"}"#,
    ] {
        let (id, e) = parse_request(line).unwrap_err();
        assert_eq!(e.code, ErrorCode::UnsupportedVersion, "{line}");
        assert_eq!(id, Some(4));
        assert!(e.fix.is_some());
    }
}

#[test]
fn malformed_requests_are_bad_requests() {
    for line in [
        "not json",
        r#"{"v":1,"op":"frobnicate"}"#,
        r#"{"v":1,"op":"start","dom":"g"}"#,
        r#"{"v":1,"op":"stop","dom":"g","extra":1}"#,
        r#"{"v":1,"op":"start","dom":"g","host":"h","options":{"intervl_ms":5}}"#,
    ] {
        let (_, e) = parse_request(line).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest, "{line}: {e}");
    }
}

#[test]
fn read_line_refuses_overlong_lines() {
    let mut long = vec![b'x'; MAX_LINE + 10];
    long.push(b'\n');
    let mut r = BufReader::new(&long[..]);
    assert!(read_line(&mut r).is_err());
    let mut r = BufReader::new(&b"a\r\nb"[..]);
    assert_eq!(read_line(&mut r).unwrap().as_deref(), Some("a"));
    assert_eq!(read_line(&mut r).unwrap().as_deref(), Some("b"));
    assert_eq!(read_line(&mut r).unwrap(), None);
}

fn socket_path(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("kemari-api-{}-{tag}.sock", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

#[test]
fn client_calls_status_and_follows_events() {
    let path = socket_path("client");
    let listener = UnixListener::bind(&path).unwrap();
    let server = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut w = s;
        // status
        let req = parse_request(&read_line(&mut r).unwrap().unwrap()).unwrap();
        assert_eq!(req.req, Request::Status { dom: None });
        let reply = Reply::Status(StatusReply {
            host: "h".into(),
            guests: vec![status("g")],
        });
        w.write_all(to_line(&ResponseLine::ok(req.id, reply)).as_bytes())
            .unwrap();
        // an error
        let req = parse_request(&read_line(&mut r).unwrap().unwrap()).unwrap();
        let e = ApiError::new(
            ErrorCode::NotSecondary,
            "g is primary here",
            "run it on host2",
        );
        w.write_all(to_line(&ResponseLine::err(req.id, e)).as_bytes())
            .unwrap();
        // events
        let req = parse_request(&read_line(&mut r).unwrap().unwrap()).unwrap();
        assert_eq!(req.req, Request::Events { dom: None });
        w.write_all(to_line(&ResponseLine::ok(req.id, Reply::Subscribed { dom: None })).as_bytes())
            .unwrap();
        for seq in 1..=3 {
            let ev = EventLine {
                v: 1,
                event: Event {
                    time: 0.0,
                    dom: "g".into(),
                    kind: EventKind::Checkpoints {
                        last_acked_seq: seq,
                        checkpoints: seq,
                        per_s: 1.0,
                    },
                },
            };
            w.write_all(to_line(&ev).as_bytes()).unwrap();
        }
    });
    let mut c = Client::connect(&path).unwrap();
    let s = c.status(None).unwrap();
    assert_eq!(s.guests, vec![status("g")]);
    match c.call(&Request::Failover {
        dom: "g".into(),
        force: false,
    }) {
        Err(ClientError::Api(e)) => assert_eq!(e.code, ErrorCode::NotSecondary),
        other => panic!("{other:?}"),
    }
    let seqs: Vec<u64> = c
        .events(None)
        .unwrap()
        .map(|e| match e.unwrap().kind {
            EventKind::Checkpoints { last_acked_seq, .. } => last_acked_seq,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(seqs, vec![1, 2, 3]);
    server.join().unwrap();
    let _ = std::fs::remove_file(&path);
}

#[test]
fn client_reports_a_missing_daemon_and_a_wrong_version() {
    let path = socket_path("absent");
    match Client::connect(&path) {
        Err(e @ ClientError::Connect { .. }) => {
            assert!(e.to_string().contains("is kemarid running"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    let listener = UnixListener::bind(&path).unwrap();
    let server = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let _ = read_line(&mut r).unwrap();
        let mut w = s;
        w.write_all(b"{\"v\":2,\"ok\":true,\"result\":{\"type\":\"subscribed\"}}\n")
            .unwrap();
    });
    let mut c = Client::connect(&path).unwrap();
    match c.call(&Request::Hello) {
        Err(ClientError::Protocol { detail, .. }) => assert!(detail.contains("version 2")),
        other => panic!("{other:?}"),
    }
    server.join().unwrap();
    let _ = std::fs::remove_file(&path);
}
