//! `kemari debug` logic against the in-memory Xen: the self-test passes on a live guest, fails at
//! the right step when a call fails, and cleans up after itself either way.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use hypervisor::mem::{DomainConfig, FaultPlan, MemXen, Trigger};
use hypervisor::{DomId, DomainControl, Errno, Hypervisor, Method, Tx};
use kemarid::debug::{self, DebugError, SelftestOptions};

fn quick() -> SelftestOptions {
    SelftestOptions {
        dirty_interval: Duration::from_millis(20),
        dirty_rounds: 2,
        watch_timeout: Duration::from_secs(2),
    }
}

/// A guest that keeps writing pages 1..8 while it runs (writes fail while it is paused).
struct Writer {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Writer {
    fn start(host: &MemXen, domid: DomId) -> Writer {
        let guest = host.guest(domid);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut n: u64 = 0;
            while !flag.load(Ordering::Relaxed) {
                let pfn = 1 + n % 8;
                let _ = guest.write(pfn, 0, &n.to_le_bytes());
                n += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        Writer {
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.join().unwrap();
        }
    }
}

fn host_with_guest(faults: FaultPlan, cfg: DomainConfig) -> (MemXen, DomId) {
    let host = MemXen::with_faults(faults);
    let domid = host.create_domain(cfg).unwrap();
    (host, domid)
}

#[test]
fn domains_lists_dom0_and_guests_with_types() {
    let host = MemXen::new();
    let a = host
        .create_domain(DomainConfig::hvm(16).with_vcpus(2))
        .unwrap();
    let b = host.create_domain(DomainConfig::pvh(16)).unwrap();
    host.pause(b).unwrap();
    let rows = debug::domains(&host).unwrap();
    let ids: Vec<DomId> = rows.iter().map(|r| r.domid).collect();
    assert_eq!(ids, vec![0, a, b]);
    assert_eq!(rows[1].guest_type, "hvm");
    assert_eq!(rows[1].vcpus, 2);
    assert_eq!(rows[2].guest_type, "pvh");
    assert_eq!(rows[2].state, "paused");
    assert_eq!(rows[1].tot_pages, 16);
}

#[test]
fn domains_reports_the_failed_call() {
    let faults = FaultPlan::new();
    faults.fail_always_with(Method::ListDomains, Errno::EPERM);
    let host = MemXen::with_faults(faults);
    let err = debug::domains(&host).unwrap_err();
    assert!(
        matches!(
            err,
            DebugError::Xen {
                step: "list domains",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn selftest_passes_on_a_live_writing_guest_and_leaves_it_clean() {
    let (host, domid) = host_with_guest(
        FaultPlan::new(),
        DomainConfig::pvh(64).with_name("selftest"),
    );
    let _w = Writer::start(&host, domid);
    let report = debug::selftest(&host, domid, &quick());
    let names: Vec<&str> = report.steps.iter().map(|s| s.step).collect();
    assert!(report.ok, "{:#?}", report.steps);
    assert_eq!(
        names,
        [
            "list-domains",
            "pause-unpause",
            "hvm-context",
            "log-dirty",
            "map-page",
            "xenstore-watch"
        ]
    );
    assert_eq!(host.pause_count(domid), Some(0));
    assert_eq!(host.log_dirty_enabled(domid), Some(false));
    // No node left behind.
    let xs = host.open_xenstore().unwrap();
    let dompath = xs.get_domain_path(domid).unwrap();
    assert!(xs
        .read(Tx::NONE, &format!("{dompath}/data/kemari-selftest"))
        .is_err());
}

#[test]
fn selftest_fails_when_the_guest_writes_nothing() {
    let (host, domid) = host_with_guest(FaultPlan::new(), DomainConfig::hvm(32));
    let report = debug::selftest(&host, domid, &quick());
    assert!(!report.ok);
    let last = report.steps.last().unwrap();
    assert_eq!(last.step, "log-dirty");
    assert!(last.detail.contains("no dirty pages"), "{}", last.detail);
    assert_eq!(host.log_dirty_enabled(domid), Some(false));
}

#[test]
fn selftest_refuses_a_paused_guest() {
    let (host, domid) = host_with_guest(FaultPlan::new(), DomainConfig::hvm(32));
    host.pause(domid).unwrap();
    let report = debug::selftest(&host, domid, &quick());
    assert!(!report.ok);
    assert_eq!(report.steps.last().unwrap().step, "pause-unpause");
    assert_eq!(
        host.pause_count(domid),
        Some(1),
        "our pause count untouched"
    );
}

/// Every Xen call the self-test makes, failed in turn: the test stops at that step, and the guest
/// is left unpaused with log-dirty off.
#[test]
fn selftest_stops_at_the_failing_step_and_cleans_up() {
    let cases: &[(Method, Trigger, &str)] = &[
        (Method::ListDomains, Trigger::Always, "list-domains"),
        (Method::Pause, Trigger::Nth(1), "pause-unpause"),
        (Method::Unpause, Trigger::Nth(1), "pause-unpause"),
        (Method::HvmContext, Trigger::Always, "hvm-context"),
        (Method::LogDirtyEnable, Trigger::Always, "log-dirty"),
        (Method::LogDirtyClean, Trigger::Nth(2), "log-dirty"),
        (Method::ReadPages, Trigger::Always, "map-page"),
    ];
    for (method, trigger, step) in cases {
        let faults = FaultPlan::new();
        let (host, domid) = host_with_guest(faults.clone(), DomainConfig::pvh(64));
        let _w = Writer::start(&host, domid);
        faults.fail(*method, *trigger, Errno::EIO);
        let report = debug::selftest(&host, domid, &quick());
        assert!(!report.ok, "{method:?} failure not reported");
        let last = report.steps.last().unwrap();
        assert_eq!(last.step, *step, "{method:?}: {:#?}", report.steps);
        assert!(!last.ok);
        assert!(
            last.detail.contains(method.name())
                || last.detail.contains("EIO")
                || last.detail.contains("Input/output"),
            "{method:?}: detail {:?} does not name the failure",
            last.detail
        );
        faults.clear_all();
        // An unpause that failed leaves one pause behind: that is the one case the test cannot undo.
        let want = if *method == Method::Unpause { 1 } else { 0 };
        assert_eq!(host.pause_count(domid), Some(want), "{method:?}");
        assert_eq!(host.log_dirty_enabled(domid), Some(false), "{method:?}");
    }
}

#[test]
fn log_dirty_rounds_count_written_pages_and_disable_on_failure() {
    let faults = FaultPlan::new();
    let (host, domid) = host_with_guest(faults.clone(), DomainConfig::hvm(64));
    let guest = host.guest(domid);
    // Nothing written: every round reports zero pages after the initial harvest.
    let r = debug::log_dirty_rounds(&host, domid, 2, Duration::from_millis(1)).unwrap();
    assert_eq!(r.iter().map(|r| r.dirty_pages).collect::<Vec<_>>(), [0, 0]);
    // Writes between harvests are counted, each page once.
    let w = Writer::start(&host, domid);
    let r = debug::log_dirty_rounds(&host, domid, 2, Duration::from_millis(50)).unwrap();
    drop(w);
    assert!(
        r.iter().all(|r| r.dirty_pages > 0 && r.dirty_pages <= 8),
        "{r:?}"
    );
    guest.fill_page(40, 1).unwrap();
    faults.fail(Method::LogDirtyClean, Trigger::Nth(2), Errno::EIO);
    let err = debug::log_dirty_rounds(&host, domid, 3, Duration::from_millis(1)).unwrap_err();
    assert!(
        matches!(
            err,
            DebugError::Xen {
                step: "log-dirty clean",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(host.log_dirty_enabled(domid), Some(false));
}

#[test]
fn read_page_returns_what_the_guest_wrote() {
    let (host, domid) = host_with_guest(FaultPlan::new(), DomainConfig::hvm(16).with_holes(&[5]));
    host.guest(domid).fill_page(3, 0xab).unwrap();
    let page = debug::read_page(&host, domid, 3).unwrap();
    assert!(page.iter().all(|b| *b == 0xab));
    assert_eq!(debug::fnv1a64(&page[..]), debug::fnv1a64(&[0xab; 4096]));
    assert_ne!(debug::fnv1a64(&page[..]), debug::fnv1a64(&[0; 4096]));
    assert!(
        debug::read_page(&host, domid, 5).is_err(),
        "a hole is not readable"
    );
}

#[test]
fn resolve_domain_by_id_and_name() {
    let host = MemXen::new();
    let a = host
        .create_domain(DomainConfig::hvm(8).with_name("web"))
        .unwrap();
    assert_eq!(debug::resolve_domain(&host, "web").unwrap(), a);
    assert_eq!(debug::resolve_domain(&host, &a.to_string()).unwrap(), a);
    assert_eq!(debug::resolve_domain(&host, "Domain-0").unwrap(), 0);
    let err = debug::resolve_domain(&host, "db").unwrap_err().to_string();
    assert!(err.contains("\"db\"") && err.contains("web"), "{err}");
}

#[test]
fn fnv1a64_known_values() {
    // Reference values of 64-bit FNV-1a.
    assert_eq!(debug::fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
    assert_eq!(debug::fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    assert_eq!(debug::fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
}

#[test]
fn pause_and_unpause_by_name_and_the_failed_call() {
    let host = MemXen::new();
    let a = host
        .create_domain(DomainConfig::hvm(8).with_name("web"))
        .unwrap();
    assert_eq!(debug::pause_domain(&host, "web", true).unwrap(), a);
    assert_eq!(debug::domains(&host).unwrap()[1].state, "paused");
    assert_eq!(
        debug::pause_domain(&host, &a.to_string(), false).unwrap(),
        a
    );
    assert_ne!(debug::domains(&host).unwrap()[1].state, "paused");

    let faults = FaultPlan::new();
    faults.fail_always_with(Method::Unpause, Errno::EPERM);
    let (host, domid) = host_with_guest(faults, DomainConfig::hvm(8).with_name("db"));
    let err = debug::pause_domain(&host, "db", false).unwrap_err();
    assert!(
        matches!(&err, DebugError::Pause { domain, pause: false, .. } if domain == "db"),
        "{err}"
    );
    assert_eq!(err.to_string(), "unpausing domain db");
    let err = debug::pause_domain(&host, &domid.to_string(), true);
    assert!(err.is_ok(), "pause is not faulted: {err:?}");
    let err = debug::pause_domain(&host, "nosuch", true).unwrap_err();
    assert!(
        matches!(
            err,
            DebugError::Check {
                step: "resolve domain",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn parse_pfn_decimal_and_hex() {
    assert_eq!(debug::parse_pfn("0").unwrap(), 0);
    assert_eq!(debug::parse_pfn("4096").unwrap(), 4096);
    assert_eq!(debug::parse_pfn("0x1f").unwrap(), 31);
    assert_eq!(debug::parse_pfn("0xffffffffffffffff").unwrap(), u64::MAX);
    for bad in ["", "0x", "1f", "-1", "0x10000000000000000", " 1"] {
        let err = debug::parse_pfn(bad).unwrap_err();
        assert!(
            matches!(&err, DebugError::Pfn { value, .. } if value == bad),
            "{bad}: {err}"
        );
        assert_eq!(
            err.to_string(),
            format!("pfn {bad:?} is not a number (decimal or 0x-prefixed hex)")
        );
    }
}

#[test]
fn xs_read_and_watch() {
    let host = MemXen::new();
    let xs = host.open_xenstore().unwrap();
    xs.write(Tx::NONE, "/test/k", b"v\xff").unwrap();
    assert_eq!(debug::xs_read(&host, "/test/k").unwrap(), "v\u{fffd}");
    let err = debug::xs_read(&host, "/test/none").unwrap_err();
    assert!(matches!(err, DebugError::Xenstore(_)), "{err}");

    // The watch hands over events until the handler fails; the handler's error comes back.
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        xs.write(Tx::NONE, "/test/k/child", b"x").unwrap();
    });
    let mut seen = Vec::new();
    let r: Result<(), anyhow::Error> =
        debug::xs_watch(&host, "/test/k", Duration::from_secs(5), |ev| {
            seen.push(ev.path.clone());
            if ev.path == "/test/k/child" {
                Err(anyhow::anyhow!("stop"))
            } else {
                Ok(())
            }
        });
    writer.join().unwrap();
    assert_eq!(r.unwrap_err().to_string(), "stop", "{seen:?}");
    // Nothing changes: the watch ends at its timeout.
    let r: Result<(), DebugError> =
        debug::xs_watch(&host, "/other", Duration::from_millis(50), |_| Ok(()));
    assert!(r.is_ok(), "{r:?}");
}

#[test]
fn text_of_domains_rounds_pages_and_selftest() {
    let rows = [debug::DomainRow {
        domid: 12,
        guest_type: "hvm",
        state: "running".into(),
        tot_pages: 262_144,
        vcpus: 2,
    }];
    assert_eq!(
        debug::render_domains(&rows),
        "   ID  TYPE  STATE                  PAGES  VCPUS\n   12  hvm   running               262144      2\n"
    );
    assert_eq!(
        debug::render_domains(&[]),
        "   ID  TYPE  STATE                  PAGES  VCPUS\n"
    );
    let rounds = [
        debug::DirtyRound {
            dirty_pages: 0,
            interval_ms: 1000,
        },
        debug::DirtyRound {
            dirty_pages: 42,
            interval_ms: 1001,
        },
    ];
    assert_eq!(
        debug::render_dirty_rounds(&rounds),
        "round 1: 0 dirty pages in 1000 ms\nround 2: 42 dirty pages in 1001 ms\n"
    );
    assert_eq!(debug::render_dirty_rounds(&[]), "");
    let page: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
    let fp = debug::fnv1a64(&page);
    assert_eq!(
        debug::render_page(3, 0x10, &page, false),
        format!("domain 3 pfn 0x10: fnv1a64 {fp:016x}\n")
    );
    let text = debug::render_page(3, 0x10, &page, true);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 17, "{text}");
    assert_eq!(
        lines[1],
        "0000: 00 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f"
    );
    assert_eq!(
        lines[16],
        "00f0: f0 f1 f2 f3 f4 f5 f6 f7 f8 f9 fa fb fc fd fe ff"
    );
    let report = debug::SelftestReport {
        domid: 3,
        ok: false,
        steps: vec![
            debug::StepReport {
                step: "pause",
                ok: true,
                detail: "paused and unpaused".into(),
                millis: 1,
            },
            debug::StepReport {
                step: "log-dirty",
                ok: false,
                detail: "no pages".into(),
                millis: 123_456,
            },
        ],
    };
    assert_eq!(
        debug::render_selftest(3, &report),
        "pause            ok        1 ms  paused and unpaused\n\
         log-dirty        FAIL 123456 ms  no pages\n\
         selftest of domain 3: FAIL\n"
    );
}
