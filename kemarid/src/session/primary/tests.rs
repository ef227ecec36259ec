//! Tests of the primary's session: its options, the classification of a loss, and whole
//! sessions against [`super::super::secondary`] over loopback TCP on the in-memory Xen.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hypervisor::hvm_save::{self, HvmContextBuilder};
use hypervisor::mem::{DomainConfig, MemXen};
use hypervisor::{DomId, DomainControl, Hypervisor, Tx};

use super::*;
use crate::api::GuestState;
use crate::daemon::report::WorkerReport;
use crate::failover::heartbeat::DeathCause;
use crate::session::secondary::{
    self, FailoverMethod, Received, SecondaryEnd, SecondaryOptions, SecondaryReport,
};
use crate::sync::hash::mem_hash;
use crate::sync::replica::{MemReplicaBuilder, ReplicaBuilder};

const PAGES: u64 = 600;
const UUID: &str = "7c0ffee0-1234-4a0e-9a35-0c2f4b1e7d10";

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kemari-session-test-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn options(target: String, config_dir: &Path) -> PrimaryOptions {
    PrimaryOptions {
        domain: String::new(),
        target,
        checkpoints: Some(3),
        interval_ms: 20,
        min_run_ms: 0,
        hold: true,
        ack_timeout_s: 20,
        max_live_rounds: 4,
        replica_name: Some("replica".into()),
        suspend: false,
        suspend_timeout_s: 10,
        heartbeat_port: None,
        heartbeat: HeartbeatTiming {
            period_ms: 100,
            misses: 5,
        },
        no_fence: false,
        status_file: None,
        outputs: None,
        unpause: false,
        config_dir: Some(config_dir.to_path_buf()),
    }
}

fn cpu_context(marker: u64) -> Vec<u8> {
    let mut b = HvmContextBuilder::new();
    let mut header = vec![0u8; 24];
    header[..4].copy_from_slice(&hvm_save::HVM_FILE_MAGIC.to_le_bytes());
    b.push(hvm_save::HVM_SAVE_HEADER, 0, &header).unwrap();
    let mut body = vec![0u8; 1032];
    body[512..520].copy_from_slice(&marker.to_le_bytes());
    b.push(hvm_save::HVM_SAVE_CPU, 0, &body).unwrap();
    b.finish()
}

/// A running PVH guest on its own in-memory Xen, its libxl configuration in `dir`.
fn guest(dir: &Path) -> (MemXen, DomId) {
    let xen = MemXen::new();
    let mut cfg = DomainConfig::pvh(PAGES);
    cfg.hvm_context = Some(cpu_context(0));
    let dom = xen.create_domain(cfg).unwrap();
    let g = xen.guest(dom);
    for pfn in 0..PAGES {
        g.fill_page(pfn, (pfn % 251) as u8).unwrap();
    }
    let xs = xen.open_xenstore().unwrap();
    xs.write(
        Tx::NONE,
        &format!("/local/domain/{dom}/vm"),
        format!("/vm/{UUID}").as_bytes(),
    )
    .unwrap();
    let mut config =
        format!(r#"{{"c_info":{{"type":"pvh","name":"guest","uuid":"{UUID}"}},"b_info":{{"max_memkb":4096}}}}"#).into_bytes();
    config.push(0);
    std::fs::write(crate::domconfig::userdata_path(dir, dom, UUID), config).unwrap();
    (xen, dom)
}

fn secondary_options(spool: PathBuf) -> SecondaryOptions {
    SecondaryOptions {
        listen: "127.0.0.1:0".into(),
        spool_dir: spool,
        once: true,
        name: Some("replica".into()),
        idle_timeout_s: 60,
        heartbeat_listen: None,
        heartbeat: HeartbeatTiming {
            period_ms: 100,
            misses: 5,
        },
        disks: Vec::new(),
        vdev: "xvda".into(),
        vif: None,
        status_file: None,
        failover: false,
        failover_method: FailoverMethod::Restore,
    }
}

/// What the secondary's thread saw: its end, the replica's host, and the reported
/// connections (peer, replica, acked, checkpoints, error).
type SecondarySeen = (
    SecondaryEnd,
    MemXen,
    Vec<(Option<DomId>, Option<u64>, u64, Option<String>)>,
);

#[test]
fn a_primary_session_replicates_to_a_secondary_session_and_stops() {
    let dir = temp_dir("e2e");
    let (xen, dom) = guest(&dir);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = listener.local_addr().unwrap().to_string();
    let mut sopts = secondary_options(dir.join("spool"));
    sopts.status_file = Some(dir.join("secondary.json"));
    let sec_xen = MemXen::new();
    let sx = sec_xen.clone();
    let secondary = std::thread::spawn(move || -> SecondarySeen {
        let mut seen = Vec::new();
        let end = secondary::receive_on(
            &sopts,
            Signals::Off,
            || {
                let builder: Box<dyn ReplicaBuilder> = Box::new(MemReplicaBuilder::new(sx.clone()));
                Ok((Arc::new(sx.clone()), builder))
            },
            |_| Ok(listener),
            &mut |r| {
                if let SecondaryReport::Received(r) = r {
                    let line = r.line();
                    assert!(line.starts_with("received from 127.0.0.1:"), "{line}");
                    assert!(line.contains(" checkpoints=3 "), "{line}");
                    assert_eq!(r.json()["checkpoints"], 3);
                    assert!(r.json()["failover"].is_null());
                    let Received { session, error, .. } = r;
                    seen.push((
                        session.replica,
                        session.acked,
                        session.checkpoints,
                        error.as_ref().map(ToString::to_string),
                    ));
                }
            },
        )
        .unwrap();
        (end, sx, seen)
    });
    let mut opts = options(target, &dir);
    opts.domain = dom.to_string();
    opts.status_file = Some(dir.join("primary.json"));
    let mut done = None;
    let end = replicate(&opts, Signals::Off, || Ok(xen.clone()), &mut |r| match r {
        PrimaryReport::Replicated(r) => done = Some(r.clone()),
        PrimaryReport::Device(..) => panic!("no device is served"),
    })
    .unwrap();
    assert_eq!(end, PrimaryEnd::Replicated);
    let done = done.expect("the stats are reported");
    assert_eq!(done.domid, dom);
    assert!(done.outcome.held_paused, "--hold");
    assert_eq!(done.outcome.stats.checkpoints, 3);
    assert!(done.initial.live_pages + done.initial.final_pages >= PAGES);
    assert!(xen.domain_info(dom).unwrap().paused, "held at the last ACK");
    // what kemari replicate prints
    let line = done.line();
    assert!(
        line.starts_with(&format!("replicated domain {dom}: checkpoints=3 per_s=")),
        "{line}"
    );
    assert!(
        line.ends_with(&format!(
            " last_seq={} held_paused=true",
            done.outcome.last_seq
        )),
        "{line}"
    );
    let json = done.json();
    for key in [
        "domid",
        "initial",
        "checkpoints",
        "checkpoints_per_s",
        "protect_s",
        "last_seq",
        "held_paused",
        "total_s",
    ] {
        assert!(json.get(key).is_some(), "{key}: {json}");
    }
    assert_eq!(json["checkpoints"]["checkpoints"], 3);

    let (send, sec_xen, seen) = secondary.join().unwrap();
    assert_eq!(send, SecondaryEnd::Served { failed: false });
    assert_eq!(seen.len(), 1, "{seen:?}");
    let (replica, acked, checkpoints, error) = seen[0].clone();
    assert_eq!(acked, Some(done.outcome.last_seq));
    assert_eq!(checkpoints, 3);
    assert_eq!(error, None);
    // the replica holds the guest as it was held
    let replica = replica.expect("a replica was built");
    let hash = |x: &MemXen, d| {
        let max = x.maximum_gpfn(d).unwrap();
        let mut h = mem_hash(x, d, max, false).unwrap();
        h.holes = 0;
        h
    };
    assert_eq!(hash(&sec_xen, replica), hash(&xen, dom));

    let p = WorkerReport::read(&dir.join("primary.json"))
        .unwrap()
        .unwrap();
    assert_eq!(p.state, GuestState::Stopped);
    assert_eq!(p.domid, Some(u32::from(dom)));
    assert_eq!(p.last_acked_seq, Some(done.outcome.last_seq));
    let s = WorkerReport::read(&dir.join("secondary.json"))
        .unwrap()
        .unwrap();
    assert_eq!(s.state, GuestState::Stopped);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_secondary_gone_during_the_initial_sync_is_reported_as_lost() {
    let dir = temp_dir("lost");
    let (xen, dom) = guest(&dir);
    // a "secondary" that accepts and hangs up at once
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = listener.local_addr().unwrap().to_string();
    let peer = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        drop(s);
    });
    let mut opts = options(target, &dir);
    opts.domain = dom.to_string();
    opts.status_file = Some(dir.join("primary.json"));
    let e = replicate(&opts, Signals::Off, || Ok(xen.clone()), &mut |_| {
        panic!("nothing is printed on stdout")
    })
    .unwrap_err();
    peer.join().unwrap();
    match &e {
        PrimaryError::Lost {
            domid,
            what,
            source,
        } => {
            assert_eq!(*domid, dom);
            assert_eq!(*what, "during the initial sync");
            assert!(source.peer_lost(), "{source}");
        }
        other => panic!("{other:?}"),
    }
    let chain = error_chain(&e);
    assert!(
        chain.starts_with(&format!(
            "protection of domain {dom} lost during the initial sync: "
        )),
        "{chain}"
    );
    let p = WorkerReport::read(&dir.join("primary.json"))
        .unwrap()
        .unwrap();
    assert_eq!(p.state, GuestState::Failed);
    let err = p.error.unwrap();
    assert!(
        err.starts_with("secondary lost during the initial sync: stream: "),
        "{err}"
    );
    // the guest runs on, unprotected
    assert!(!xen.domain_info(dom).unwrap().paused);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_unknown_secondary_address_names_it() {
    let dir = temp_dir("connect");
    let (xen, dom) = guest(&dir);
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut opts = options(format!("127.0.0.1:{port}"), &dir);
    opts.domain = dom.to_string();
    let e = replicate(&opts, Signals::Off, || Ok(xen.clone()), &mut |_| {}).unwrap_err();
    assert!(matches!(e, PrimaryError::Connect { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        format!("connecting to the secondary at 127.0.0.1:{port}")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_loss_is_classified_by_the_heartbeat_then_the_error_kind() {
    let cause = DeathCause::Missed {
        missed: 5,
        silent: Duration::from_millis(500),
        stream_lost: false,
    };
    assert_eq!(
        LossKind::classify(Some(PeerState::Dead(cause)), false),
        LossKind::HeartbeatDead(cause)
    );
    assert_eq!(
        LossKind::classify(Some(PeerState::Dead(cause)), true),
        LossKind::HeartbeatDead(cause)
    );
    assert_eq!(
        LossKind::classify(Some(PeerState::Alive), true),
        LossKind::StreamLost
    );
    assert_eq!(LossKind::classify(None, true), LossKind::StreamLost);
    assert_eq!(
        LossKind::classify(Some(PeerState::Alive), false),
        LossKind::LocalFailure
    );
    assert_eq!(LossKind::classify(None, false), LossKind::LocalFailure);
    assert!(LossKind::HeartbeatDead(cause).heartbeat_dead());
    assert!(!LossKind::StreamLost.heartbeat_dead());
}

#[test]
fn each_loss_says_what_was_lost_and_what_became_of_the_guest() {
    let e = "connection reset";
    let what = "during protection";
    let lost = LossKind::StreamLost;
    assert_eq!(
        lost.status_error(what, &e),
        "secondary lost during protection: stream: connection reset"
    );
    assert_eq!(
        lost.stderr_line(what, &e, 7, ""),
        "kemari replicate: SECONDARY LOST during protection (stream: connection reset): guest 7 keeps running UNPROTECTED"
    );
    let cause = DeathCause::Missed {
        missed: 5,
        silent: Duration::from_millis(500),
        stream_lost: false,
    };
    let dead = LossKind::HeartbeatDead(cause);
    assert_eq!(
        dead.status_error(what, &e),
        format!("secondary lost during protection: heartbeat: {cause:?}")
    );
    let line = dead.stderr_line(what, &e, 7, "");
    assert!(
        line.starts_with("kemari replicate: SECONDARY LOST during protection (heartbeat: Missed"),
        "{line}"
    );
    let local = LossKind::LocalFailure;
    assert_eq!(
        local.status_error("during the initial sync", &e),
        "protection failed on this host during the initial sync: connection reset"
    );
    assert_eq!(
        local.stderr_line("during the initial sync", &e, 7, "is gone"),
        "kemari replicate: PROTECTION FAILED on this host during the initial sync (connection reset): guest 7 is gone; the secondary was told not to fail over"
    );
}

#[test]
fn a_guest_fate_is_read_from_xen() {
    let xen = MemXen::new();
    let dom = xen.create_domain(DomainConfig::pvh(16)).unwrap();
    assert_eq!(guest_fate(&xen, dom), "keeps running UNPROTECTED");
    xen.destroy_domain(dom).unwrap();
    assert_eq!(guest_fate(&xen, dom), "is gone");
}

#[test]
fn options_give_the_senders_and_the_fence() {
    let dir = PathBuf::from("/nonexistent");
    let mut o = options("h:7100".into(), &dir);
    o.interval_ms = 0;
    o.min_run_ms = 50;
    o.ack_timeout_s = 7;
    o.max_live_rounds = 3;
    assert_eq!(o.interval(), Duration::from_millis(1));
    let s = o.sender_options();
    assert_eq!(s.max_live_rounds, 3);
    assert_eq!(s.ack_timeout, Duration::from_secs(7));
    assert_eq!(s.min_run, Duration::from_millis(50));
    assert!(!o.fenced(), "no heartbeat, no fence");
    o.heartbeat_port = Some(7101);
    assert!(o.fenced());
    o.no_fence = true;
    assert!(!o.fenced());
    assert!(!o.has_disk());
}

#[test]
fn options_round_trip_as_json() {
    let mut o = options("h:7100".into(), Path::new("/var/lib/xen"));
    o.outputs = Some(OutputsConfig {
        disk: Some(outputs::DiskSpec {
            image: "/img".into(),
            devid: 51712,
            takeover: false,
        }),
        vif: None,
        commit_log: Some("/tmp/c.log".into()),
    });
    let text = serde_json::to_string(&o).unwrap();
    let back: PrimaryOptions = serde_json::from_str(&text).unwrap();
    assert_eq!(back, o);
    assert!(back.has_disk());
}
