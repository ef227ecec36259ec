#![allow(clippy::unwrap_used)] // test code

use super::*;

#[test]
fn vif_settings() {
    assert_eq!(parse_vif_spec("").unwrap(), VifSpec::default());
    assert_eq!(parse_vif_spec(" , ,").unwrap(), VifSpec::default());
    let v = parse_vif_spec("mac=00:16:3e:01:02:03, bridge=xenbr0,devid=2,ifname=t0").unwrap();
    assert_eq!(v.mac, Some([0, 0x16, 0x3e, 1, 2, 3]));
    assert_eq!(v.bridge.as_deref(), Some("xenbr0"));
    assert_eq!((v.devid, v.ifname.as_deref()), (2, Some("t0")));
    assert!(v.gso);
    assert!(!parse_vif_spec("gso=off").unwrap().gso);
    assert!(!parse_vif_spec("gso=0").unwrap().gso);
    assert!(parse_vif_spec("gso=0,gso=on").unwrap().gso);
    assert!(parse_vif_spec("gso = 1").unwrap().gso);
    let v = parse_vif_spec(" devid = 7 , bridge= br1 ").unwrap();
    assert_eq!((v.devid, v.bridge.as_deref()), (7, Some("br1")));
}

#[test]
fn bad_vif_settings_say_which_and_why() {
    let cases = [
        ("bridge", "--vif \"bridge\": expected key=value"),
        (
            "mac=01:00:5e:00:00:01",
            "--vif mac=\"01:00:5e:00:00:01\": expected a unicast aa:bb:cc:dd:ee:ff",
        ),
        (
            "mac=nope",
            "--vif mac=\"nope\": expected a unicast aa:bb:cc:dd:ee:ff",
        ),
        ("devid=x", "--vif devid=\"x\": expected a number"),
        ("devid=-1", "--vif devid=\"-1\": expected a number"),
        ("gso=2", "--vif gso=\"2\": expected 0/1/on/off"),
        (
            "color=red",
            "--vif: unknown setting \"color\" (mac, bridge, devid, ifname, gso)",
        ),
        (
            "devid=1,Mac=00:16:3e:01:02:03",
            "--vif: unknown setting \"Mac\" (mac, bridge, devid, ifname, gso)",
        ),
    ];
    for (spec, msg) in cases {
        let e = parse_vif_spec(spec).unwrap_err();
        assert_eq!(e.to_string(), msg, "{spec}");
    }
    assert!(matches!(
        parse_vif_spec("devid=x"),
        Err(AttachError::VifDevid { source: _, .. })
    ));
    let e = parse_vif_spec("devid=99999999999").unwrap_err();
    assert!(std::error::Error::source(&e).is_some(), "{e}");
}

#[test]
fn step_errors_name_the_device_and_domain() {
    let disk = |takeover| AttachError::Disk {
        vdev: "xvdb".into(),
        domid: 4,
        takeover,
        source: VbdError::Poll(nix::Error::EIO),
    };
    assert_eq!(disk(false).to_string(), "creating xvdb for domain 4");
    assert_eq!(disk(true).to_string(), "taking over xvdb of domain 4");
    let e = AttachError::VifThread {
        source: std::io::Error::other("no threads"),
    };
    assert_eq!(e.to_string(), "starting the vif thread: no threads");
}

fn vbd_stats() -> VbdStats {
    VbdStats {
        requests: 10,
        read_bytes: 3 << 20,
        write_bytes: (1 << 20) - 1,
        flushes: 1,
        discards: 0,
        errors: 0,
        notifies: 9,
        connects: 1,
        persistent_maps: 32,
        oneoff_maps: 2,
        ..VbdStats::default()
    }
}

#[test]
fn disk_reports() {
    let s = vbd_stats();
    assert_eq!(
        disk_report_line(4, "xvda", &VbdStatus::Gone, 12.34, &s),
        "kemari attach: domain 4 xvda: Gone after 12.3 s; 10 requests, 3 MiB read, 0 MiB written, 1 flushes, 0 discards, 0 errors, 1 connects, 32 pages mapped persistently, 2 one-off mappings"
    );
    let v = disk_report_json(4, 51712, &VbdStatus::Failed("bad ring".into()), 0.0, &s);
    assert_eq!(v["status"], "Failed(\"bad ring\")");
    assert_eq!(v["devid"], 51712);
    assert_eq!(v["read_bytes"], 3 << 20);
    assert_eq!(v.as_object().unwrap().len(), 14);
}

#[test]
fn vif_reports() {
    let done = VifDone {
        status: VifStatus::Gone,
        stats: VifStats {
            tx_packets: 5,
            tx_bytes: 500,
            rx_packets: 6,
            rx_bytes: 600,
            tx_dropped: 1,
            connects: 1,
            ..VifStats::default()
        },
        devid: 0,
    };
    assert_eq!(
        vif_report_line(4, &done, 1.05),
        "kemari attach: domain 4 vif 0: Gone after 1.1 s; tx 5 packets (500 bytes), rx 6 packets (600 bytes), 0 tx errors, 1 tx dropped, 0 rx errors, 0 rx dropped, 1 connects"
    );
    let v = vif_report_json(4, &done, 1.0);
    assert_eq!(v["device"], "vif");
    assert_eq!(v["status"], "Gone");
    assert_eq!(v["tx_dropped"], 1);
    assert_eq!(v.as_object().unwrap().len(), 15);
}
