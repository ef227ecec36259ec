#![allow(clippy::unwrap_used)] // test code

use std::path::Path;

use super::render::*;
use super::*;
use crate::api::{self, EventKind, HeartbeatStatus, Quantiles, Role};

fn guest(dom: &str) -> GuestStatus {
    GuestStatus {
        dom: dom.to_string(),
        domid: Some(7),
        role: Role::Primary,
        peer: "host2".to_string(),
        state: GuestState::Protected,
        since: 0.0,
        worker_pid: None,
        checkpoints: 120,
        checkpoints_per_s: 9.96,
        last_acked_seq: Some(121),
        pause_ms: Quantiles {
            p50: 0.42,
            p99: 12.34,
            max: 20.0,
        },
        checkpoint_ms: Quantiles::default(),
        dirty_pages_per_checkpoint: 53.5,
        replication_lag_ms: Some(40.0),
        link_bytes_per_s: 3.0 * 1024.0 * 1024.0,
        bytes: 1 << 30,
        heartbeat: Some(HeartbeatStatus {
            period_ms: 100,
            misses_allowed: 5,
            peer: "alive".to_string(),
            last_heard_ms: Some(35.0),
            misses: 0,
        }),
        initial_sync: None,
        error: None,
    }
}

fn sync(pages: u64, total: u64, round: u32, eta_s: Option<f64>, done: bool) -> InitialSync {
    InitialSync {
        pages,
        total,
        rate_pages_per_s: 20_000.0,
        round,
        eta_s,
        done,
    }
}

#[test]
fn status_table_has_every_figure_in_its_column() {
    let mut g2 = guest("db-with-a-long-name");
    g2.role = Role::Secondary;
    g2.peer = "host1".to_string();
    g2.state = GuestState::InitialSync;
    g2.heartbeat = None;
    g2.last_acked_seq = None;
    g2.checkpoints = 0;
    g2.initial_sync = Some(sync(1024, 4096, 0, Some(125.0), false));
    g2.error = Some("peer slow".to_string());
    let st = StatusReply {
        host: "host1".to_string(),
        guests: vec![guest("web1"), g2],
    };
    let text = render_status(&st);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 5, "{text}");
    let hdr = lines[0];
    let col = |name: &str| hdr.find(name).unwrap();
    let row = lines[1];
    assert_eq!(&row[col("GUEST")..col("ROLE")].trim_end(), &"web1");
    assert_eq!(&row[col("ROLE")..col("PEER")].trim_end(), &"primary");
    assert_eq!(&row[col("STATE")..col("CKPT/S")].trim_end(), &"protected");
    assert_eq!(&row[col("CKPT/S")..col("LAST-ACK")].trim_end(), &"10.0");
    assert_eq!(&row[col("LAST-ACK")..col("PAUSE")].trim_end(), &"121");
    assert_eq!(
        &row[col("PAUSE")..col("DIRTY/CKPT")].trim_end(),
        &"0.42ms/12.3ms"
    );
    assert_eq!(&row[col("DIRTY/CKPT")..col("LAG")].trim_end(), &"53.5");
    assert_eq!(&row[col("LAG")..col("LINK")].trim_end(), &"40.0ms");
    assert_eq!(&row[col("LINK")..col("HEARTBEAT")].trim_end(), &"3.0 MiB/s");
    assert_eq!(
        &row[col("HEARTBEAT")..col("DOMID")].trim_end(),
        &"alive (35.0ms ago)"
    );
    let row2 = lines[2];
    assert!(
        row2.starts_with("db-with-a-long-name  secondary  host1"),
        "{row2}"
    );
    assert_eq!(&row2[col("LAST-ACK")..col("PAUSE")].trim_end(), &"-");
    assert_eq!(&row2[col("HEARTBEAT")..col("DOMID")].trim_end(), &"off");
    assert_eq!(
        lines[3],
        "db-with-a-long-name: initial sync 25% (1024 of 4096 pages, 20.0k pages/s, round 0, ETA 2m05s)"
    );
    assert_eq!(lines[4], "db-with-a-long-name: error: peer slow");
}

#[test]
fn status_table_exact_text() {
    let st = StatusReply {
        host: "h".to_string(),
        guests: vec![guest("web1")],
    };
    assert_eq!(
        render_status(&st),
        "GUEST  ROLE     PEER   STATE      CKPT/S  LAST-ACK  PAUSE p50/p99  DIRTY/CKPT  LAG     LINK       HEARTBEAT           DOMID\n\
         web1   primary  host2  protected  10.0    121       0.42ms/12.3ms  53.5        40.0ms  3.0 MiB/s  alive (35.0ms ago)  7\n"
    );
}

#[test]
fn status_row_missing_values_are_dashes() {
    let mut g = guest("g");
    g.domid = None;
    g.last_acked_seq = None;
    g.replication_lag_ms = None;
    g.checkpoints = 0;
    g.checkpoints_per_s = 0.0;
    g.dirty_pages_per_checkpoint = 0.0;
    g.link_bytes_per_s = 0.0;
    g.heartbeat = None;
    assert_eq!(
        status_row(&g),
        [
            "g",
            "primary",
            "host2",
            "protected",
            "0.0",
            "-",
            "-",
            "0",
            "-",
            "0 B/s",
            "off",
            "-"
        ]
        .map(str::to_string)
    );
    // A secondary has no pause figures even with checkpoints.
    let mut g = guest("g");
    g.role = Role::Secondary;
    assert_eq!(status_row(&g)[6], "-");
}

#[test]
fn status_sync_line_edge_cases() {
    let mut g = guest("g");
    g.state = GuestState::InitialSync;
    // Unknown size: 0 %, no ETA; pages past the total (later rounds) count as 100 %.
    g.initial_sync = Some(sync(0, 0, 0, None, false));
    let st = StatusReply {
        host: "h".into(),
        guests: vec![g.clone()],
    };
    assert!(render_status(&st)
        .ends_with("g: initial sync 0% (0 of 0 pages, 20.0k pages/s, round 0, ETA -)\n"));
    g.initial_sync = Some(sync(5000, 4096, 2, Some(0.4), false));
    let st = StatusReply {
        host: "h".into(),
        guests: vec![g.clone()],
    };
    assert!(render_status(&st)
        .ends_with("g: initial sync 100% (5000 of 4096 pages, 20.0k pages/s, round 2, ETA 0s)\n"));
    // Done: no line.
    g.initial_sync = Some(sync(4096, 4096, 3, None, true));
    let st = StatusReply {
        host: "h".into(),
        guests: vec![g],
    };
    assert_eq!(render_status(&st).lines().count(), 2);
}

#[test]
fn empty_status_says_so() {
    let st = StatusReply {
        host: "h".to_string(),
        guests: vec![],
    };
    assert_eq!(render_status(&st), "kemarid on h: no protected guests\n");
}

#[test]
fn heartbeat_cells() {
    let mut g = guest("g");
    assert_eq!(heartbeat_cell(&g), "alive (35.0ms ago)");
    if let Some(h) = g.heartbeat.as_mut() {
        h.last_heard_ms = None;
        h.peer = "dead".into();
    }
    assert_eq!(heartbeat_cell(&g), "dead");
    g.heartbeat = None;
    assert_eq!(heartbeat_cell(&g), "off");
}

#[test]
fn units() {
    assert_eq!(fmt_rate(0.0), "0 B/s");
    assert_eq!(fmt_rate(-5.0), "0 B/s");
    assert_eq!(fmt_rate(1023.0), "1023 B/s");
    assert_eq!(fmt_rate(1024.0), "1.0 KiB/s");
    assert_eq!(fmt_rate(1536.0), "1.5 KiB/s");
    assert_eq!(fmt_rate(5.0 * 1024.0 * 1024.0 * 1024.0), "5.0 GiB/s");
    assert_eq!(fmt_rate(3.0 * 1024f64.powi(5)), "3072.0 TiB/s");
    assert_eq!(fmt_ms(0.0), "0.00ms");
    assert_eq!(fmt_ms(0.123), "0.12ms");
    assert_eq!(fmt_ms(10.0), "10.0ms");
    assert_eq!(fmt_ms(99.94), "99.9ms");
    assert_eq!(fmt_ms(1500.0), "1.5s");
    assert_eq!(fmt_ms(3_600_000.0), "3600.0s");
    assert_eq!(fmt_secs(0.0), "0s");
    assert_eq!(fmt_secs(-3.0), "0s");
    assert_eq!(fmt_secs(59.4), "59s");
    assert_eq!(fmt_secs(59.6), "1m00s");
    assert_eq!(fmt_secs(3599.0), "59m59s");
    assert_eq!(fmt_secs(7260.0), "2h01m");
    assert_eq!(fmt_secs(360_000.0), "100h00m");
    assert_eq!(fmt_count(0.0), "0");
    assert_eq!(fmt_count(3.0), "3");
    assert_eq!(fmt_count(12.25), "12.2");
    assert_eq!(fmt_count(150.5), "150");
    assert_eq!(fmt_count(4321.0), "4321");
    assert_eq!(fmt_count(43_210.0), "43.2k");
    assert_eq!(fmt_count(2_500_000.0), "2.5M");
    assert_eq!(fmt_count(7.25e9), "7.2G");
    assert_eq!(opt(None::<u64>), "-");
    assert_eq!(opt(Some(0u64)), "0");
    assert_eq!(opt(Some(u64::MAX)), "18446744073709551615");
}

#[test]
fn event_lines() {
    let ev = Event {
        time: 1_764_558_000.25,
        dom: "web1".to_string(),
        kind: EventKind::State {
            from: Some(GuestState::InitialSync),
            to: GuestState::Protected,
            reason: "initial sync acknowledged".to_string(),
        },
    };
    assert_eq!(
        render_event(&ev),
        "2025-12-01T03:00:00.250Z web1 state initial-sync -> protected: initial sync acknowledged"
    );
    let ev = Event {
        time: 951_782_400.0, // 2000-02-29
        dom: "d".to_string(),
        kind: EventKind::WorkerExit { pid: 9, code: None },
    };
    assert_eq!(
        render_event(&ev),
        "2000-02-29T00:00:00.000Z d worker-exit pid 9 killed by a signal"
    );
    assert_eq!(fmt_time(0.0), "1970-01-01T00:00:00.000Z");
    assert_eq!(fmt_time(-1.0), "1970-01-01T00:00:00.000Z");
    assert_eq!(fmt_time(4_102_444_799.999_6), "2100-01-01T00:00:00.000Z");
}

#[test]
fn every_event_kind_has_its_line() {
    let line = |kind| {
        render_event(&Event {
            time: 0.0,
            dom: "g".into(),
            kind,
        })
    };
    let t = "1970-01-01T00:00:00.000Z g";
    assert_eq!(
        line(EventKind::State {
            from: None,
            to: GuestState::Starting,
            reason: "asked".into()
        }),
        format!("{t} state (new) -> starting: asked")
    );
    assert_eq!(
        line(EventKind::InitialSync {
            pages: 10,
            total: 4096,
            rate_pages_per_s: 12_345.0
        }),
        format!("{t} initial-sync 10/4096 pages, 12.3k pages/s")
    );
    assert_eq!(
        line(EventKind::Checkpoints {
            last_acked_seq: 5,
            checkpoints: 6,
            per_s: 9.96
        }),
        format!("{t} checkpoints last ACKed sequence 5, 6 in total, 10.0/s")
    );
    assert_eq!(
        line(EventKind::Heartbeat {
            peer: "dead".into()
        }),
        format!("{t} heartbeat peer dead")
    );
    assert_eq!(
        line(EventKind::FailedOver {
            domid: Some(12),
            seq: Some(40)
        }),
        format!("{t} failed-over runs here as domain 12 from checkpoint 40")
    );
    assert_eq!(
        line(EventKind::FailedOver {
            domid: None,
            seq: None
        }),
        format!("{t} failed-over runs here from checkpoint -")
    );
    assert_eq!(
        line(EventKind::WorkerExit {
            pid: 3,
            code: Some(0)
        }),
        format!("{t} worker-exit pid 3 exited with status 0")
    );
    assert_eq!(
        line(EventKind::Adopted { pid: 77 }),
        format!("{t} adopted worker pid 77")
    );
}

#[test]
fn verb_lines() {
    let mut g = guest("web1");
    assert_eq!(
        start_line(&g),
        "web1: protected, replica on host2 (120 checkpoints, last ACKed sequence 121)"
    );
    g.initial_sync = Some(sync(4096, 4096, 1, None, true));
    assert_eq!(
        start_line(&g),
        "web1: protected, replica on host2 (initial sync 4096 pages in 2 rounds; 120 checkpoints, last ACKed sequence 121)"
    );
    g.state = GuestState::Starting;
    assert_eq!(
        start_line(&g),
        "web1: protection starting, replica on host2 (state starting); follow it with `kemari status web1`"
    );
    g.state = GuestState::Stopped;
    assert_eq!(
        stop_line(&g),
        "web1: protection stopped; the guest runs on here unprotected (role primary, peer host2, state stopped)"
    );
    g.state = GuestState::FailedOver;
    g.last_acked_seq = None;
    assert_eq!(
        failover_line(&g, "host1"),
        "web1: runs on host1 as domain 7 from checkpoint - (state failed-over); it is not protected now"
    );
    g.domid = None;
    g.last_acked_seq = Some(0);
    assert_eq!(
        failover_line(&g, "host1"),
        "web1: runs on host1 from checkpoint 0 (state failed-over); it is not protected now"
    );
    assert_eq!(
        checkpoint_line(&CheckpointReply {
            dom: "web1".into(),
            acked_seq: u64::MAX
        }),
        "web1: checkpoint acknowledged, sequence 18446744073709551615"
    );
}

#[test]
fn stop_texts_by_role_and_state() {
    use Role::{Primary, Secondary};
    let cases = [
        (
            Primary,
            GuestState::Stopping,
            "stopping (the checkpoint in progress completes)",
        ),
        (
            Primary,
            GuestState::Stopped,
            "protection stopped; the guest runs on here unprotected",
        ),
        (Secondary, GuestState::Stopped, "replica dropped"),
        (
            Secondary,
            GuestState::FailedOver,
            "record cleared; the guest runs here since its failover, unprotected",
        ),
        (
            Primary,
            GuestState::Failed,
            "record cleared; protection had failed, the guest runs on here unprotected",
        ),
        (
            Secondary,
            GuestState::Failed,
            "record cleared; protection had failed",
        ),
        (Primary, GuestState::Protected, "stop asked"),
    ];
    for (role, state, text) in cases {
        assert_eq!(stop_text(role, state), text, "{role:?} {state:?}");
    }
}

#[test]
fn sync_bar_messages() {
    assert_eq!(
        sync_bar_message(&sync(1, 2, 0, Some(65.0), false)),
        "20.0k/s, round 0, ETA 1m05s"
    );
    assert_eq!(
        sync_bar_message(&sync(1, 2, 0, None, false)),
        "20.0k/s, round 0, ETA -"
    );
    assert_eq!(
        sync_bar_message(&sync(1, 2, 3, None, false)),
        "20.0k/s, round 3, converging"
    );
    assert_eq!(
        sync_bar_message(&sync(2, 2, 3, None, true)),
        "20.0k/s, round 3, acknowledged"
    );
}

const SOCK: &str = "/run/k.sock";

fn client_failure(e: ClientError) -> CtlError {
    CtlError::from_client("cannot do X", "host1", Path::new(SOCK), e)
}

fn io(kind: std::io::ErrorKind) -> std::io::Error {
    std::io::Error::new(kind, "boom")
}

#[test]
fn client_errors_map_to_message_code_and_fix() {
    let path = SOCK.to_string();
    let see_log = Some(SEE_LOG.to_string());
    let cases: Vec<(ClientError, &str, String, Option<String>)> = vec![
        (
            ClientError::Api(ApiError::new(
                ErrorCode::UnknownDomain,
                "no guest web9",
                "see kemari status",
            )),
            "unknown-domain",
            "cannot do X: no guest web9".into(),
            Some("see kemari status".into()),
        ),
        (
            ClientError::Api(ApiError::bare(ErrorCode::UnknownDomain, "no guest web9")),
            "unknown-domain",
            "cannot do X: no guest web9".into(),
            None,
        ),
        (
            ClientError::Connect {
                path: path.clone(),
                source: io(std::io::ErrorKind::PermissionDenied),
            },
            "daemon-not-running",
            "cannot do X: permission denied on kemarid's control socket /run/k.sock on host1"
                .into(),
            Some("the control socket is root's only: run kemari as root".into()),
        ),
        (
            ClientError::Connect {
                path: path.clone(),
                source: io(std::io::ErrorKind::NotFound),
            },
            "daemon-not-running",
            "cannot do X: kemarid is not running on host1: cannot connect to /run/k.sock (boom)"
                .into(),
            Some(format!(
                "start it with `systemctl start kemarid` (or run `kemarid` as root); if it listens elsewhere, give its socket with --socket PATH (default {})",
                api::DEFAULT_SOCKET
            )),
        ),
        (
            ClientError::Closed { path: path.clone() },
            "connection-closed",
            "cannot do X: kemarid on host1 closed the connection without an answer (/run/k.sock)"
                .into(),
            see_log.clone(),
        ),
        (
            ClientError::Io {
                path: path.clone(),
                source: io(std::io::ErrorKind::ConnectionReset),
            },
            "connection-error",
            "cannot do X: talking to kemarid on host1 (/run/k.sock): boom".into(),
            see_log,
        ),
        (
            ClientError::Protocol {
                path,
                detail: "bad json".into(),
                line: "{".into(),
            },
            "protocol-error",
            "cannot do X: kemarid at /run/k.sock sent an invalid line (bad json): {".into(),
            Some(SAME_RELEASE.into()),
        ),
    ];
    for (e, code, message, fix) in cases {
        let dbg = format!("{e:?}");
        let f = client_failure(e);
        assert_eq!(f.code(), code, "{dbg}");
        assert_eq!(f.to_string(), message, "{dbg}");
        assert_eq!(f.fix(), fix, "{dbg}");
    }
}

#[test]
fn unknown_domain_is_typed_not_textual() {
    let refused = client_failure(ClientError::Api(ApiError::bare(
        ErrorCode::UnknownDomain,
        "x",
    )));
    assert!(refused.is_unknown_domain());
    let gone = CtlError::GuestGone {
        what: "w".into(),
        host: "h".into(),
        dom: "g".into(),
    };
    assert!(gone.is_unknown_domain());
    assert_eq!(gone.code(), "unknown-domain");
    assert_eq!(gone.to_string(), "w: kemarid on h no longer knows guest g");
    let other = client_failure(ClientError::Closed { path: SOCK.into() });
    assert!(!other.is_unknown_domain());
}

#[test]
fn client_side_failures() {
    let f = CtlError::ProtectionFailed {
        what: "w".into(),
        cause: "disk gone".into(),
        state: GuestState::Failed,
        host: "host1".into(),
        peer: "host2".into(),
        dom: "web1".into(),
    };
    assert_eq!(
        (f.code(), f.to_string()),
        (
            "protection-failed",
            "w: disk gone (state failed)".to_string()
        )
    );
    assert_eq!(
        f.fix().unwrap(),
        "see kemarid's log on host1 and on host2; `kemari stop web1` clears the guest's record before a new start"
    );
    let f = CtlError::Timeout {
        what: "w".into(),
        secs: 0,
        state: GuestState::InitialSync,
        dom: "web1".into(),
    };
    assert_eq!(
        (f.code(), f.to_string()),
        (
            "timeout",
            "w: not protected after 0 s (state initial-sync); protection goes on in kemarid"
                .to_string()
        )
    );
    assert_eq!(
        f.fix().unwrap(),
        "follow it with `kemari status web1` or `kemari events web1`"
    );
    let f = CtlError::EventsClosed {
        what: "w".into(),
        host: "h".into(),
        socket: SOCK.into(),
    };
    assert_eq!(
        (f.code(), f.to_string()),
        (
            "connection-closed",
            "w: kemarid on h closed the event stream (/run/k.sock)".to_string()
        )
    );
    let f = unexpected("w", &Reply::PeerStopped { dom: "web1".into() });
    assert_eq!(f.code(), "protocol-error");
    assert_eq!(
        f.to_string(),
        format!(
            "w: kemarid answered with an unexpected reply: {}",
            api::to_line(&Reply::PeerStopped { dom: "web1".into() }).trim_end()
        )
    );
    assert_eq!(f.fix().as_deref(), Some(SAME_RELEASE));
}

#[test]
fn failure_report_text_and_json() {
    let f = client_failure(ClientError::Closed { path: SOCK.into() });
    assert_eq!(
        f.stderr_text(),
        format!("kemari: {f}\nkemari: fix: {SEE_LOG}\n")
    );
    let v: serde_json::Value = serde_json::from_str(&f.json()).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"ok": false, "error": {"code": "connection-closed", "message": f.to_string(), "fix": SEE_LOG}})
    );
    let f = client_failure(ClientError::Api(ApiError::bare(
        ErrorCode::UnknownDomain,
        "m",
    )));
    assert_eq!(f.stderr_text(), "kemari: cannot do X: m\n");
    assert!(f.json().contains("\"fix\":null"), "{}", f.json());
    assert_eq!(EXIT_FAILURE, 1);
}
