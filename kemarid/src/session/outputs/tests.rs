use hypervisor::mem::{DomainConfig, MemXen};
use hypervisor::DomainControl;
use kemari_stream::disklog::DiskOp;
use xenbus_backend::commit::Tap as GateTap;
use xenbus_backend::BackendState;

use super::*;

struct NoTap;
impl GateTap for NoTap {
    fn kick(&self) {}
}

fn gate() -> Arc<OutputGate> {
    OutputGate::new(1, Box::new(NoTap))
}

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("kemari-outputs-{}-{name}", std::process::id()))
}

#[test]
fn vdev_names() {
    assert_eq!(vdev_to_devid("xvda").ok(), Some(51712));
    assert_eq!(vdev_to_devid("xvdb").ok(), Some(51728));
    assert_eq!(vdev_to_devid("xvdp").ok(), Some(51712 + 15 * 16));
    for bad in ["xvdq", "sda", "xvd", "xvdaa", ""] {
        match vdev_to_devid(bad) {
            Err(OutputsError::Vdev { vdev }) => assert_eq!(vdev, bad),
            other => panic!("{bad}: {other:?}"),
        }
    }
    assert_eq!(
        vdev_to_devid("sda").unwrap_err().to_string(),
        "--vdev \"sda\": expected xvda..xvdp"
    );
    for vdev in ["xvda", "xvdb", "xvdp"] {
        assert_eq!(vdev_name(vdev_to_devid(vdev).unwrap()), vdev);
    }
}

#[test]
fn a_commit_log_that_cannot_be_opened_starts_nothing() {
    let path = temp("no-such-dir").join("commit.log");
    let config = OutputsConfig {
        commit_log: Some(path.clone()),
        ..OutputsConfig::default()
    };
    let triggers = Triggers::new(Duration::from_millis(10));
    let usr1 = Arc::new(AtomicBool::new(false));
    let mut told = 0;
    let e = Outputs::start(7, config, &triggers, &usr1, &mut |_| told += 1)
        .err()
        .unwrap();
    assert!(
        matches!(&e, OutputsError::CommitLog { path: p, source } if *p == path && source.kind() == std::io::ErrorKind::NotFound),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        format!("opening the commit log {}", path.display())
    );
    assert_eq!(told, 0);
}

#[test]
fn no_devices_no_gates_no_reports() {
    let triggers = Triggers::new(Duration::from_millis(10));
    let usr1 = Arc::new(AtomicBool::new(false));
    let o = Outputs::start(7, OutputsConfig::default(), &triggers, &usr1, &mut |_| {
        panic!("nothing to start")
    })
    .unwrap();
    assert!(o.disk_gate().is_none() && o.net_gate().is_none());
    let mut told = false;
    assert_eq!(o.finish(false, &triggers, |_| told = true).count(), 0);
    // not held: the guest runs on unprotected (nothing served to wait for)
    assert!(told);
}

#[test]
fn a_device_that_fails_before_it_exists_fails_the_start() {
    let r = Served::spawn("blkback", gate(), |_, _, _| {
        Err(OutputsError::Vdev { vdev: "sdz".into() })
    });
    match r {
        Err(OutputsError::Vdev { vdev }) => assert_eq!(vdev, "sdz"),
        Err(e) => panic!("{e:?}"),
        Ok(_) => panic!("started"),
    }
    let r = Served::spawn("netback", gate(), |_, _, _| panic!("no device"));
    let e = r.err().unwrap();
    assert!(
        matches!(e, OutputsError::NotStarted { name: "netback" }),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        "the netback thread ended before the device existed"
    );
}

/// A device served until it is stopped, reporting `requests` requests.
fn served(name: &'static str, gate: Arc<OutputGate>, panic_at_stop: bool) -> Served {
    let (s, text) = Served::spawn(name, gate, move |g, stop, ready| {
        ready.send(format!("{name} ready"));
        while !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!panic_at_stop, "{name} panics");
        let stats = VbdStats {
            requests: 3,
            ..VbdStats::default()
        };
        Ok(disk_report("xvda", &VbdStatus::Gone, &stats, g.released()))
    })
    .unwrap();
    assert_eq!(text, format!("{name} ready"));
    s
}

/// Domain 7's disk and NIC served until stopped (the NIC's thread panics then if
/// `vif_panics`), their gates and the held-stop flag.
fn outputs(vif_panics: bool) -> (Outputs, Arc<OutputGate>, Arc<OutputGate>, Arc<AtomicBool>) {
    let (disk, net) = (gate(), gate());
    let usr1 = Arc::new(AtomicBool::new(false));
    let o = Outputs {
        disk: Some(served("blkback", disk.clone(), false)),
        vif: Some(served("netback", net.clone(), vif_panics)),
        domid: 7,
        started: Instant::now(),
        usr1: usr1.clone(),
    };
    (o, disk, net, usr1)
}

#[test]
fn unprotected_the_devices_are_served_until_a_stop_and_report_in_order() {
    let (o, disk, net, usr1) = outputs(true);
    assert!(Arc::ptr_eq(o.disk_gate().unwrap(), &disk));
    assert!(Arc::ptr_eq(o.net_gate().unwrap(), &net));
    let triggers = Triggers::new(Duration::from_millis(10));
    // the held-stop request ends serving an unprotected guest
    usr1.store(true, Ordering::SeqCst);
    let mut told = None;
    let ended: Vec<_> = o.finish(false, &triggers, |d| told = Some(d)).collect();
    assert_eq!(told, Some(7));
    assert!(
        !disk.protecting() && !net.protecting(),
        "held output released"
    );
    assert_eq!(ended.len(), 2);
    let (device, r) = &ended[0];
    assert_eq!(*device, Device::Disk);
    let r = r.as_ref().unwrap();
    assert_eq!(r.json["requests"], 3);
    assert!(r.json["seconds"].as_f64().is_some(), "{}", r.json);
    assert!(r
        .text
        .starts_with("kemari replicate: disk xvda: Gone; 3 requests answered"));
    let (device, r) = &ended[1];
    assert_eq!(*device, Device::Vif);
    let e = r.as_ref().unwrap_err();
    assert!(
        matches!(
            e,
            OutputsError::Panicked {
                device: Device::Vif
            }
        ),
        "{e:?}"
    );
    assert_eq!(e.to_string(), "the vif thread panicked");
}

#[test]
fn held_the_devices_stop_at_once_with_their_output_still_held() {
    let (o, disk, net, _) = outputs(false);
    // neither stopped nor asked to: only `held` makes this return
    let triggers = Triggers::new(Duration::from_millis(10));
    let ended: Vec<_> = o
        .finish(true, &triggers, |_| panic!("not unprotected"))
        .collect();
    assert!(disk.protecting() && net.protecting(), "nothing released");
    let devices: Vec<Device> = ended.iter().map(|(d, _)| *d).collect();
    assert_eq!(devices, [Device::Disk, Device::Vif]);
    assert!(ended.iter().all(|(_, r)| r.is_ok()));
}

#[test]
fn reports_print_as_before() {
    let s = VbdStats {
        requests: 10,
        held: 4,
        held_dropped: 1,
        read_bytes: 3 << 20,
        write_bytes: 2 << 20,
        flushes: 5,
        errors: 0,
        ..VbdStats::default()
    };
    let r = disk_report("xvdb", &VbdStatus::Gone, &s, 9);
    assert_eq!(
        r.text,
        "kemari replicate: disk xvdb: Gone; 10 requests answered, 4 held for output commit, 1 dropped unanswered, 3 MiB read, 2 MiB written, 5 flushes, 0 errors, last ACK 9"
    );
    assert_eq!(r.json["device"], "xvdb");
    assert_eq!(r.json["last_ack"], 9);
    let s = VifStats {
        tx_packets: 7,
        tx_bytes: 700,
        tx_held: 2,
        rx_packets: 3,
        rx_bytes: 300,
        connects: 1,
        ..VifStats::default()
    };
    let status = VifStatus::Active(BackendState::Attached);
    let r = vif_report(0, &status, &s, Some(4));
    assert_eq!(
        r.text,
        "vif 0: Active(Attached); tx 7 packets (700 bytes), 2 held for output commit (0 dropped: queue full), rx 3 packets (300 bytes), 0 tx errors, 0 tx dropped, 0 rx errors, 1 connects, last ACK 4"
    );
    let r = vif_report(1, &VifStatus::Gone, &s, None);
    assert!(r.text.ends_with("1 connects"), "{}", r.text);
    assert_eq!(r.json["last_ack"], serde_json::Value::Null);
}

#[test]
fn unpause_runs_the_guest_or_names_it() {
    let xen = MemXen::new();
    let d = xen.create_domain(DomainConfig::hvm(16)).unwrap();
    xen.pause(d).unwrap();
    unpause(&xen, d).unwrap();
    assert!(!xen.domain_info(d).unwrap().paused);
    let e = unpause(&xen, 999).unwrap_err();
    assert!(
        matches!(e, OutputsError::Unpause { domid: 999, .. }),
        "{e:?}"
    );
    assert_eq!(e.to_string(), "unpausing domain 999");
}

fn entry(devid: u32, sector: u64, byte: u8) -> DiskLogEntry<Vec<u8>> {
    DiskLogEntry {
        seq: 1,
        devid,
        sector,
        op: DiskOp::Write(vec![byte; 512]),
    }
}

#[test]
fn a_disk_log_replays_onto_its_copy_or_not_at_all() {
    let (log, copy) = (temp("disk.log"), temp("copy.img"));
    std::fs::write(&copy, vec![0u8; 4096]).unwrap();
    let xvda = vdev_to_devid("xvda").unwrap();
    replay_disk_log(&log, &[entry(xvda, 1, 0xab)], &copy, xvda).unwrap();
    let data = std::fs::read(&copy).unwrap();
    assert!(data[512..1024].iter().all(|b| *b == 0xab));
    assert!(data[..512].iter().chain(&data[1024..]).all(|b| *b == 0));
    // an entry for another disk: nothing written, and the error names both files
    let entries = [entry(xvda, 0, 0xcd), entry(xvda + 16, 0, 0xcd)];
    let e = replay_disk_log(&log, &entries, &copy, xvda).unwrap_err();
    assert!(
        matches!(&e, OutputsError::Replay { file, copy: c, source: DiskApplyError::UnknownDisk { .. } } if *file == log && *c == copy),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        format!("replaying {} onto {}", log.display(), copy.display())
    );
    assert_eq!(std::fs::read(&copy).unwrap(), data);
    // beyond the end of the copy
    let e = replay_disk_log(&log, &[entry(xvda, 8, 1)], &copy, xvda).unwrap_err();
    assert!(
        matches!(
            &e,
            OutputsError::Replay {
                source: DiskApplyError::OutOfRange { .. },
                ..
            }
        ),
        "{e:?}"
    );
    std::fs::remove_file(&copy).unwrap();
}
