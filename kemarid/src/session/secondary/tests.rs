//! Tests of the secondary's session: its options and the verdict at the end of a connection
//! (whole sessions run against the primary's in `super::super::primary`'s tests).

use std::time::Duration;

use super::*;
use crate::session::outputs::VifSpec;

fn options() -> SecondaryOptions {
    SecondaryOptions {
        listen: "0.0.0.0:7100".into(),
        spool_dir: "/var/lib/kemari/spool".into(),
        once: false,
        name: None,
        idle_timeout_s: 600,
        heartbeat_listen: Some("0.0.0.0:7101".into()),
        heartbeat: HeartbeatTiming {
            period_ms: 100,
            misses: 5,
        },
        disks: vec![ReplicaDisk {
            devid: 51712,
            path: "/copy.img".into(),
        }],
        vdev: "xvda".into(),
        vif: None,
        status_file: None,
        failover: true,
        failover_method: FailoverMethod::Restore,
    }
}

fn vif(settings: &str, mac: Option<[u8; 6]>) -> FailoverVif {
    FailoverVif {
        settings: settings.into(),
        spec: VifSpec {
            mac,
            bridge: Some("xenbr0".into()),
            devid: 0,
            ifname: Some("t1".into()),
            gso: false,
        },
    }
}

#[test]
fn a_failover_vif_needs_the_guests_mac_and_failover() {
    let mut o = options();
    o.vif = Some(vif("bridge=xenbr0", None));
    let e = o.validate().unwrap_err();
    assert_eq!(
        e.to_string(),
        "--vif \"bridge=xenbr0\": mac= is required (the guest's MAC on the primary)"
    );
    o.vif = Some(vif(
        "mac=00:16:3e:77:00:96",
        Some([0, 0x16, 0x3e, 0x77, 0, 0x96]),
    ));
    o.validate().unwrap();
    let s = o.net_spec().unwrap().unwrap();
    assert_eq!(s.vif.mac_string(), "00:16:3e:77:00:96");
    assert_eq!(s.bridge.as_deref(), Some("xenbr0"));
    assert_eq!(s.tap_name.as_deref(), Some("t1"));
    assert!(!s.gso);
    o.failover = false;
    let e = o.validate().unwrap_err();
    assert_eq!(
        e.to_string(),
        "--vif serves the guest's NIC after a failover: it needs --failover"
    );
    o.vif = None;
    o.validate().unwrap();
    assert!(o.net_spec().unwrap().is_none());
}

#[test]
fn devices_are_served_after_a_failover_only_with_failover() {
    let mut o = options();
    assert!(o.serves_after_failover());
    o.failover = false;
    assert!(!o.serves_after_failover());
    o.failover = true;
    o.disks.clear();
    assert!(!o.serves_after_failover());
    o.vif = Some(vif("mac=00:16:3e:77:00:96", Some([0; 6])));
    assert!(o.serves_after_failover());
}

#[test]
fn receiver_options_follow_the_arguments() {
    let mut o = options();
    let r = o.receiver_options();
    assert_eq!(r.idle_timeout, Some(Duration::from_secs(600)));
    assert_eq!(r.spool_dir, PathBuf::from("/var/lib/kemari/spool"));
    o.idle_timeout_s = 0;
    assert_eq!(o.receiver_options().idle_timeout, None, "0: never");
}

#[test]
fn options_round_trip_as_json() {
    let mut o = options();
    o.vif = Some(vif(
        "mac=00:16:3e:77:00:96",
        Some([0, 0x16, 0x3e, 0x77, 0, 0x96]),
    ));
    o.failover_method = FailoverMethod::InPlace;
    let text = serde_json::to_string(&o).unwrap();
    let back: SecondaryOptions = serde_json::from_str(&text).unwrap();
    assert_eq!(back, o);
}

#[test]
fn a_dead_primary_is_a_failover_only_after_an_acked_checkpoint() {
    let cause = DeathCause::Missed {
        missed: 5,
        silent: Duration::from_millis(500),
        stream_lost: true,
    };
    let dead = PeerState::Dead(cause);
    let v = Verdict::new(dead, Some(3), Some(7), true);
    assert_eq!(
        v,
        Verdict::FailOver {
            replica: 3,
            cause,
            acked: 7
        }
    );
    assert_eq!(
        v.stderr_line().unwrap(),
        format!("kemari receive: primary dead ({cause:?}) after checkpoint 7: failing over")
    );
    // no checkpoint ACKed, or no replica: refused
    for (replica, acked) in [(Some(3), None), (None, None), (None, Some(7))] {
        let v = Verdict::new(dead, replica, acked, true);
        assert_eq!(v, Verdict::Refused(cause));
        assert!(
            v.stderr_line().unwrap().contains("REFUSING FAILOVER"),
            "{v:?}"
        );
    }
}

#[test]
fn a_primary_that_still_answers_is_never_failed_over() {
    let v = Verdict::new(PeerState::Alive, Some(3), Some(7), true);
    assert_eq!(
        v,
        Verdict::NoFailover {
            state: PeerState::Alive,
            stream_failed: true
        }
    );
    assert_eq!(
        v.stderr_line().unwrap(),
        "kemari receive: stream failed but the primary still answers (Alive): no failover (split-brain guard)"
    );
    // a clean end with a goodbye: nothing to say
    let v = Verdict::new(PeerState::Ended, Some(3), Some(7), false);
    assert_eq!(v.stderr_line(), None);
}
