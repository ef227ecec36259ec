//! The real implementation, `hypervisor::xen::XenHost`, without Xen and with it.
//!
//! * Opening on a machine without Xen fails with an error that names the library.
//! * Against fake Xen libraries: libxc-ffi's test fakes (`libxc-ffi/tests/fake/*.c`, compiled
//!   here with `cc` against libxen-dev's 4.17 headers and loaded through `LibraryPaths` like
//!   the real libraries), every trait method runs end to end through libxc-ffi. Without the
//!   headers (no libxen-dev) these tests say so and return.
//! * Against real Xen (ignored by default): run as root in a Xen 4.17 dom0. Cargo is not in
//!   the lab's dom0, so build the test binary on the host and copy it in:
//!
//!   ```text
//!   cargo test -p hypervisor --test xen_host --no-run     # prints target/debug/deps/xen_host-<hash>
//!   # copy that file into dom0 (e.g. the lab's 9p share), then in dom0:
//!   KEMARI_TEST_DOMID=<domid of a running HVM/PVH scratch guest> \
//!       ./xen_host-<hash> --ignored --nocapture --test-threads=1
//!   ```
//!
//!   It pauses the guest briefly, turns log-dirty on and off, and writes and removes
//!   `/local/domain/<domid>/data/kemari-xen-host-test` in xenstore.

// A test crate: helpers outside #[test] functions may unwrap too.
#![allow(clippy::unwrap_used)]

#[path = "../../libxc-ffi/tests/support/xen_required.rs"]
mod xen_required;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use hypervisor::xen::{LibraryPaths, OpenErrorKind, XenHost};
use hypervisor::{
    hvm_save, with_transaction, DirtyBitmap, DomainControl, Errno, EventChannelControl,
    EvtchnState, GrantTables, GuestMemory, GuestType, Hypervisor, HypervisorError, LogDirty,
    Method, ShutdownReason, Tx, PAGE_SIZE,
};

// ------------------------------------------------------------------------------------------
// Without Xen

#[test]
fn open_with_an_absent_library_names_it() {
    let paths = LibraryPaths {
        xenctrl: "libxenctrl-kemari-absent.so.4.17".into(),
        ..LibraryPaths::default()
    };
    let err = XenHost::open_with(&paths).unwrap_err();
    assert_eq!(err.kind(), OpenErrorKind::LibraryNotFound, "{err}");
    assert_eq!(err.library(), "libxenctrl-kemari-absent.so.4.17");
    let msg = err.to_string();
    assert!(
        msg.contains("libxenctrl-kemari-absent.so.4.17 not found: is this a Xen 4.17 dom0?"),
        "{msg}"
    );
}

#[test]
fn open_on_a_machine_without_xen_fails_cleanly() {
    if Path::new("/dev/xen/privcmd").exists() {
        eprintln!("skipped: this machine runs Xen (see the ignored dom0 test)");
        return;
    }
    let err = XenHost::open().unwrap_err();
    // libxen-dev installed: the library loads and xc_interface_open fails (no privcmd);
    // no Xen libraries at all: libxenctrl.so.4.17 is not found.
    match err.kind() {
        OpenErrorKind::InterfaceOpenFailed => {
            assert!(
                err.to_string().contains("xc_interface_open failed"),
                "{err}"
            );
        }
        OpenErrorKind::LibraryNotFound => {
            assert!(
                err.to_string().contains("libxenctrl.so.4.17 not found"),
                "{err}"
            );
        }
        other => panic!("unexpected {other:?}: {err}"),
    }
    assert_eq!(err.library(), "libxenctrl.so.4.17");
}

// ------------------------------------------------------------------------------------------
// Fake libraries

const FAKE_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../libxc-ffi/tests/fake");

/// Whether libxen-dev's headers are there; without them the test skips, visibly, or fails
/// where Xen is required (CI, `KEMARI_REQUIRE_XEN=1`: [`xen_required`]).
fn headers_present() -> bool {
    let ok = Path::new("/usr/include/xenctrl.h").exists();
    if !ok {
        xen_required::missing(&test_name(), "/usr/include/xenctrl.h");
    }
    ok
}

fn test_name() -> String {
    std::thread::current().name().unwrap_or("test").to_string()
}

/// Compiles `<FAKE_DIR>/<src>.c` with `defines` (once per distinct build) and returns a fresh
/// copy, so each test gets its own instance of the fake's global state.
fn fake_lib(src: &str, defines: &[&str]) -> PathBuf {
    static BUILT: OnceLock<Mutex<Vec<(String, PathBuf)>>> = OnceLock::new();
    static COPIES: AtomicUsize = AtomicUsize::new(0);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("hypervisor-xen-fakes");
    std::fs::create_dir_all(&dir).unwrap();
    let key = format!("{src}{}", defines.join(""));
    let built = {
        let mut cache = BUILT
            .get_or_init(|| {
                // Builds and copies of earlier runs (named with their pid) are not needed.
                let mine = format!("-{}-", std::process::id());
                for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                    if !entry.file_name().to_string_lossy().contains(&mine) {
                        let _ = std::fs::remove_file(entry.path());
                    }
                }
                Mutex::new(Vec::new())
            })
            .lock()
            .unwrap();
        match cache.iter().find(|(k, _)| *k == key) {
            Some((_, p)) => p.clone(),
            None => {
                let out = dir.join(format!("{src}-{}-{}.so", std::process::id(), cache.len()));
                let mut cmd = Command::new("cc");
                cmd.args(["-shared", "-fPIC", "-Wall", "-o"])
                    .arg(&out)
                    .arg(format!("{FAKE_DIR}/{src}.c"));
                for d in defines {
                    cmd.arg(format!("-D{d}"));
                }
                assert!(cmd.status().expect("running cc").success(), "cc {src}.c");
                cache.push((key, out.clone()));
                out
            }
        }
    };
    let n = COPIES.fetch_add(1, Ordering::SeqCst);
    let copy = dir.join(format!("{src}-{}-copy{n}.so", std::process::id()));
    std::fs::copy(&built, &copy).unwrap();
    copy
}

fn fake_paths() -> LibraryPaths {
    LibraryPaths {
        xenctrl: fake_lib("fake_xenctrl", &[]).into(),
        xenevtchn: fake_lib("fake_xenevtchn", &[]).into(),
        xengnttab: fake_lib("fake_xengnttab", &[]).into(),
        xenforeignmemory: fake_lib("fake_xenforeignmemory", &[]).into(),
        xenstore: fake_lib("fake_xenstore", &[]).into(),
        search_dirs: vec![],
    }
}

fn fake_host() -> Option<XenHost> {
    if !headers_present() {
        return None;
    }
    Some(XenHost::open_with(&fake_paths()).unwrap())
}

#[test]
fn fake_open_failures_are_classified() {
    if !headers_present() {
        return;
    }
    let mut p = fake_paths();
    p.xenforeignmemory = "libxenforeignmemory-kemari-absent.so.1".into();
    let err = XenHost::open_with(&p).unwrap_err();
    assert_eq!(err.kind(), OpenErrorKind::LibraryNotFound);
    assert_eq!(err.library(), "libxenforeignmemory-kemari-absent.so.1");
    assert!(
        err.to_string()
            .starts_with("cannot open libxenforeignmemory"),
        "{err}"
    );

    let mut p = fake_paths();
    p.xenctrl = fake_lib("fake_xenctrl", &["FAKE_OPEN_FAILS"]).into();
    let err = XenHost::open_with(&p).unwrap_err();
    assert_eq!(err.kind(), OpenErrorKind::InterfaceOpenFailed);
    assert!(
        err.to_string().contains("xc_interface_open failed"),
        "{err}"
    );
    assert!(
        err.to_string().contains("EACCES") || err.to_string().contains("errno 13"),
        "{err}"
    );

    let mut p = fake_paths();
    p.xenctrl = fake_lib("fake_xenctrl", &["FAKE_VERSION=((4<<16)|18)"]).into();
    let err = XenHost::open_with(&p).unwrap_err();
    assert_eq!(err.kind(), OpenErrorKind::WrongXenVersion);
    assert!(err.to_string().contains("Xen 4.18"), "{err}");
}

#[test]
fn fake_domains_types_pause_and_errors() {
    let Some(host) = fake_host() else { return };
    let list = host.list_domains().unwrap();
    assert_eq!(list.len(), 300, "more than one getinfolist batch");
    assert!(list.windows(2).all(|w| w[0].domid < w[1].domid));
    let dom = |id| list.iter().find(|d| d.domid == id).unwrap();
    assert_eq!(dom(0).guest_type, GuestType::Pv);
    assert_eq!(dom(5).guest_type, GuestType::Pvh, "emulation flags = LAPIC");
    assert_eq!(dom(3).guest_type, GuestType::Hvm, "all but vPCI");
    assert_eq!(dom(7).shutdown, Some(ShutdownReason::Crash));
    assert_eq!(dom(5).max_vcpu_id.wrapping_add(1), 0, "no vCPUs");
    assert_eq!(dom(3).max_vcpu_id, 1);
    assert_eq!((dom(3).tot_pages, dom(3).max_pages), (1003, 2003));
    assert!(dom(3).running && !dom(3).paused);

    host.pause(3).unwrap();
    assert!(host.domain_info(3).unwrap().paused);
    host.unpause(3).unwrap();
    assert!(!host.domain_info(3).unwrap().paused);

    assert_eq!(
        host.domain_info(4).unwrap_err(),
        HypervisorError::Domain {
            op: Method::DomainInfo,
            domid: 4,
            errno: Errno::ESRCH
        }
    );
    assert_eq!(
        host.pause(4).unwrap_err(),
        HypervisorError::Domain {
            op: Method::Pause,
            domid: 4,
            errno: Errno::ESRCH
        }
    );
    assert_eq!(host.maximum_gpfn(3).unwrap(), 0xfffff);
}

#[test]
fn fake_hvm_context_params_and_vcpu() {
    let Some(host) = fake_host() else { return };
    let blob = host.hvm_context(3).unwrap();
    let records = hvm_save::parse(&blob).unwrap();
    let cpus = records
        .iter()
        .filter(|r| r.typecode == hvm_save::HVM_SAVE_CPU)
        .count();
    assert_eq!(cpus, 2);
    let cpu1 = host
        .hvm_context_partial(3, hvm_save::HVM_SAVE_CPU, 1)
        .unwrap();
    assert_eq!(Some(&cpu1[..]), hvm_save::find(&blob, 2, 1).unwrap());
    assert_eq!(
        host.hvm_context_partial(3, hvm_save::HVM_SAVE_CPU, 2)
            .unwrap_err()
            .errno(),
        Some(Errno::ENOENT)
    );
    host.set_hvm_context(3, &blob).unwrap();
    assert_eq!(
        host.set_hvm_context(3, &blob[..blob.len() - 8])
            .unwrap_err(),
        HypervisorError::Domain {
            op: Method::SetHvmContext,
            domid: 3,
            errno: Errno::EINVAL
        }
    );
    host.set_hvm_param(3, 1, 0xabc).unwrap();
    assert_eq!(host.hvm_param(3, 1).unwrap(), 0xabc);
    assert_eq!(
        host.hvm_param(3, 100_000).unwrap_err().errno(),
        Some(Errno::EINVAL)
    );
    let ctx = host.vcpu_context(3, 1).unwrap();
    assert!(ctx.len() > 1000, "a whole vcpu_guest_context_any_t");
    assert_eq!(
        host.vcpu_context(3, 9).unwrap_err().op(),
        Method::VcpuContext
    );
}

#[test]
fn fake_log_dirty_round_trip() {
    let Some(host) = fake_host() else { return };
    let mut bitmap = DirtyBitmap::new(1000);
    assert_eq!(
        host.log_dirty_clean(3, &mut bitmap).unwrap_err(),
        HypervisorError::Domain {
            op: Method::LogDirtyClean,
            domid: 3,
            errno: Errno::EINVAL
        },
        "log-dirty off"
    );
    host.log_dirty_enable(3).unwrap();
    bitmap.set(0); // stale: must be overwritten
    let stats = host.log_dirty_clean(3, &mut bitmap).unwrap();
    let want: Vec<u64> = (3..1000).step_by(7).collect();
    assert_eq!(bitmap.iter().collect::<Vec<_>>(), want);
    assert_eq!(stats.dirty_count as usize, want.len());
    assert_eq!(stats.fault_count, 42);
    // Second round reuses the cached buffer.
    let stats = host.log_dirty_peek(3, &mut bitmap).unwrap();
    assert_eq!((stats.fault_count, bitmap.count()), (0, want.len() as u64));
    // Another size: a new buffer.
    let mut small = DirtyBitmap::new(20);
    host.log_dirty_clean(3, &mut small).unwrap();
    assert_eq!(small.iter().collect::<Vec<_>>(), vec![3, 10, 17]);
    host.log_dirty_disable(3).unwrap();
    host.log_dirty_disable(3).unwrap();
    assert_eq!(
        host.log_dirty_clean(3, &mut bitmap).unwrap_err().errno(),
        Some(Errno::EINVAL)
    );

    // Xen covers fewer pages than asked (domain 9 has 1001): the rest reads clean, not
    // stale buffer contents.
    host.log_dirty_enable(9).unwrap();
    let mut big = DirtyBitmap::new(4000);
    host.log_dirty_clean(9, &mut big).unwrap();
    assert_eq!(big.iter().last(), Some(997));
    assert!(big.iter().all(|p| p < 1001));
    host.log_dirty_disable(9).unwrap();

    assert_eq!(
        host.log_dirty_enable(0).unwrap_err(),
        HypervisorError::Domain {
            op: Method::LogDirtyEnable,
            domid: 0,
            errno: Errno::EOPNOTSUPP
        }
    );
}

#[test]
fn fake_guest_pages_are_copied_with_per_page_errors() {
    let Some(host) = fake_host() else { return };
    // The fake's page i holds its pfn at offset 0; pfn 0xbad fails.
    let pfns = [0x10, 0xbad, 0x7];
    let mut buf = vec![0xffu8; pfns.len() * PAGE_SIZE];
    let err = host.read_pages(3, &pfns, &mut buf).unwrap_err();
    assert_eq!(
        err,
        HypervisorError::Pages {
            op: Method::ReadPages,
            domid: 3,
            failures: vec![(0xbad, Errno::EFAULT)]
        }
    );
    let word = |i: usize| u64::from_le_bytes(buf[i * PAGE_SIZE..][..8].try_into().unwrap());
    assert_eq!((word(0), word(2)), (0x10, 0x7));
    assert!(
        buf[PAGE_SIZE..2 * PAGE_SIZE].iter().all(|b| *b == 0),
        "failed slot zeroed"
    );

    let mut page = [0u8; PAGE_SIZE];
    host.read_page(3, 0x42, &mut page).unwrap();
    assert_eq!(u64::from_le_bytes(page[..8].try_into().unwrap()), 0x42);

    host.write_pages(3, &[1, 2], &vec![0u8; 2 * PAGE_SIZE])
        .unwrap();
    assert_eq!(
        host.write_pages(3, &[1, 0xbad], &vec![0u8; 2 * PAGE_SIZE])
            .unwrap_err(),
        HypervisorError::Pages {
            op: Method::WritePages,
            domid: 3,
            failures: vec![(0xbad, Errno::EFAULT)]
        }
    );
    assert_eq!(
        host.read_pages(3, &[1, 2], &mut [0u8; PAGE_SIZE])
            .unwrap_err(),
        HypervisorError::BufferSize {
            op: Method::ReadPages,
            expected: 2 * PAGE_SIZE,
            actual: PAGE_SIZE
        }
    );
    host.read_pages(3, &[], &mut []).unwrap();
    // The whole map call failing (the fake's domain 999).
    assert_eq!(
        host.read_page(999, 1, &mut page).unwrap_err(),
        HypervisorError::Domain {
            op: Method::ReadPages,
            domid: 999,
            errno: Errno::ESRCH
        }
    );
    // More than one map batch (libxc_ffi::COPY_BATCH pages).
    let many: Vec<u64> = (0..libxc_ffi::COPY_BATCH as u64 + 3).collect();
    let mut big = vec![0u8; many.len() * PAGE_SIZE];
    host.read_pages(3, &many, &mut big).unwrap();
    let last = many.len() - 1;
    assert_eq!(
        u64::from_le_bytes(big[last * PAGE_SIZE..][..8].try_into().unwrap()),
        last as u64
    );
}

#[test]
fn fake_event_channels() {
    let Some(host) = fake_host() else { return };
    assert_eq!(host.evtchn_alloc_unbound(3, 0).unwrap(), 10);
    assert_eq!(
        host.evtchn_status(3, 1).unwrap().state,
        EvtchnState::Interdomain {
            remote_domid: 0,
            remote_port: 7
        }
    );
    let st = host.evtchn_status(3, 3).unwrap();
    assert_eq!((st.vcpu, st.state), (1, EvtchnState::Virq(5)));
    assert_eq!(
        host.evtchn_status(4, 1).unwrap_err(),
        HypervisorError::Domain {
            op: Method::EvtchnStatus,
            domid: 4,
            errno: Errno::ESRCH
        }
    );

    let ev = host.open_event_channels().unwrap();
    let port = ev.bind_interdomain(3, 10).unwrap();
    assert_eq!(ev.pending().unwrap(), None);
    let t0 = Instant::now();
    assert_eq!(ev.wait(Some(Duration::from_millis(30))).unwrap(), None);
    assert!(t0.elapsed() >= Duration::from_millis(30));
    ev.notify(port).unwrap(); // the fake loops notifications back
    let fd = ev.as_fd();
    let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
    assert_eq!(
        nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO).unwrap(),
        1
    );
    assert_eq!(ev.wait(None).unwrap(), Some(port));
    ev.unmask(port).unwrap();
    ev.unbind(port).unwrap();
    assert_eq!(
        ev.notify(port).unwrap_err(),
        HypervisorError::Port {
            op: Method::EvtchnNotify,
            port,
            errno: Errno::EINVAL
        }
    );
    assert_eq!(
        ev.bind_interdomain(999, 1).unwrap_err(),
        HypervisorError::Domain {
            op: Method::EvtchnBindInterdomain,
            domid: 999,
            errno: Errno::ESRCH
        }
    );
}

#[test]
fn fake_grant_mappings() {
    let Some(host) = fake_host() else { return };
    // The fake's granted page: u32 ref at 0, u32 domid at 4, then bytes (ref & 0xff).
    let m = host.map_grant_refs(3, &[0x21, 0x22], true).unwrap();
    assert_eq!((m.domid(), m.len(), m.writable()), (3, 2 * PAGE_SIZE, true));
    assert_eq!(m.read_u32(0).unwrap(), 0x21);
    assert_eq!(m.read_u32(4).unwrap(), 3);
    assert_eq!(m.read_u32(PAGE_SIZE).unwrap(), 0x22);
    assert_eq!(m.read_u8(PAGE_SIZE + 100).unwrap(), 0x22);
    m.write_u64(8, 0x1122_3344_5566_7788).unwrap();
    assert_eq!(m.read_u64(8).unwrap(), 0x1122_3344_5566_7788);
    assert_eq!(m.read_u16(8).unwrap(), 0x7788);
    let mut buf = [0u8; 6];
    m.read(PAGE_SIZE - 3, &mut buf).unwrap();
    assert_eq!(buf, [0x21, 0x21, 0x21, 0x22, 0, 0]);
    m.write(PAGE_SIZE - 1, &[9, 9]).unwrap();
    assert_eq!(m.read_u8(PAGE_SIZE).unwrap(), 9);
    assert_eq!(
        m.read_u32(2 * PAGE_SIZE - 2).unwrap_err(),
        HypervisorError::OutOfBounds {
            op: Method::GrantAccess,
            offset: 2 * PAGE_SIZE - 2,
            len: 4,
            size: 2 * PAGE_SIZE
        }
    );
    assert_eq!(
        m.write_u32(2, 1).unwrap_err(),
        HypervisorError::Misaligned {
            op: Method::GrantAccess,
            offset: 2,
            len: 4
        }
    );
    drop(m);

    let ro = host.map_grant_refs(5, &[0x30], false).unwrap();
    assert_eq!(
        ro.write_u32(0, 1).unwrap_err(),
        HypervisorError::Grant {
            op: Method::GrantAccess,
            domid: 5,
            gref: 0x30,
            errno: Errno::EACCES
        }
    );
    assert_eq!(ro.read_u32(0).unwrap(), 0x30, "nothing written");

    assert_eq!(
        host.map_grant_refs(3, &[1, 0xdead], false).unwrap_err(),
        HypervisorError::Grant {
            op: Method::GnttabMap,
            domid: 3,
            gref: 1,
            errno: Errno::EINVAL
        }
    );
    assert_eq!(
        host.map_grant_refs(3, &[], false).unwrap_err().errno(),
        Some(Errno::EINVAL)
    );
}

#[test]
fn fake_xenstore_watch_transactions_and_errors() {
    let Some(host) = fake_host() else { return };
    let xs = host.open_xenstore().unwrap();
    let dom = xs.get_domain_path(3).unwrap();
    assert_eq!(dom, "/local/domain/3");
    assert_eq!(
        xs.get_domain_path(0x7ff5).unwrap_err(),
        HypervisorError::Domain {
            op: Method::XsGetDomainPath,
            domid: 0x7ff5,
            errno: Errno::EINVAL
        }
    );

    // The selftest's sequence: watch, initial event, write, event for the write, read back.
    let node = format!("{dom}/data/kemari-selftest");
    assert_eq!(xs.read_watch(Some(Duration::ZERO)).unwrap(), None);
    xs.watch(&node, "tok").unwrap();
    let ev = xs
        .read_watch(Some(Duration::from_secs(1)))
        .unwrap()
        .unwrap();
    assert_eq!(
        (ev.path.as_str(), ev.token.as_str()),
        (node.as_str(), "tok")
    );
    xs.write(Tx::NONE, &node, b"hello").unwrap();
    {
        let fd = xs.as_fd();
        let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
        assert_eq!(
            nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO).unwrap(),
            1
        );
    }
    let ev = xs.read_watch(None).unwrap().unwrap();
    assert_eq!(ev.path, node);
    assert_eq!(xs.read(Tx::NONE, &node).unwrap(), b"hello");
    let t0 = Instant::now();
    assert_eq!(
        xs.read_watch(Some(Duration::from_millis(30))).unwrap(),
        None
    );
    assert!(t0.elapsed() >= Duration::from_millis(30));
    xs.rm(Tx::NONE, &node).unwrap();
    xs.unwatch(&node, "tok").unwrap();
    assert_eq!(
        xs.unwatch(&node, "tok").unwrap_err(),
        HypervisorError::XenStore {
            op: Method::XsUnwatch,
            path: node.clone(),
            errno: Errno::ENOENT
        }
    );
    assert_eq!(
        xs.read(Tx::NONE, &node).unwrap_err(),
        HypervisorError::XenStore {
            op: Method::XsRead,
            path: node.clone(),
            errno: Errno::ENOENT
        }
    );

    // Directory names come back sorted whatever xenstored's order.
    xs.mkdir(Tx::NONE, "/d").unwrap();
    for n in ["c", "a", "b"] {
        xs.write(Tx::NONE, &format!("/d/{n}"), b"").unwrap();
    }
    assert_eq!(xs.directory(Tx::NONE, "/d").unwrap(), vec!["a", "b", "c"]);

    // Permissions.
    use hypervisor::{XsPerm, XsPermKind};
    let perms = [
        XsPerm::new(0, XsPermKind::None),
        XsPerm::new(3, XsPermKind::Both),
    ];
    xs.set_permissions(Tx::NONE, "/d", &perms).unwrap();
    assert_eq!(xs.get_permissions(Tx::NONE, "/d").unwrap(), perms);
    assert_eq!(
        xs.set_permissions(Tx::NONE, "/d", &[]).unwrap_err().errno(),
        Some(Errno::EINVAL)
    );

    // Transactions: the fake's commit fails with EAGAIN as often as /fake/conflicts says.
    xs.write(Tx::NONE, "/fake/conflicts", b"2").unwrap();
    let mut attempts = 0;
    let v = with_transaction(xs.as_ref(), 5, |tx| {
        attempts += 1;
        assert_ne!(tx, Tx::NONE);
        xs.write(tx, "/d/a", b"in-tx")?;
        Ok(7)
    })
    .unwrap();
    assert_eq!((v, attempts), (7, 3));
    xs.write(Tx::NONE, "/fake/conflicts", b"9").unwrap();
    assert_eq!(
        with_transaction(xs.as_ref(), 2, |_| Ok(())).unwrap_err(),
        HypervisorError::TransactionRetriesExhausted { attempts: 2 }
    );
    let tx = xs.transaction_start().unwrap();
    xs.transaction_end(tx, true).unwrap();
    assert_eq!(
        xs.transaction_end(Tx(1_000_000), false).unwrap_err(),
        HypervisorError::XenStore {
            op: Method::XsTransactionEnd,
            path: String::new(),
            errno: Errno::ENOENT
        }
    );
    assert_eq!(
        xs.write(Tx::NONE, "/with\0nul", b"").unwrap_err().errno(),
        Some(Errno::EINVAL)
    );
}

#[test]
fn host_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<XenHost>();
    check::<hypervisor::xen::XenEventChannels>();
    check::<hypervisor::xen::XenStoreConnection>();
    fn send<T: Send>() {}
    send::<hypervisor::xen::XenGrantMapping>();
}

// ------------------------------------------------------------------------------------------
// Real Xen

fn test_domid() -> Option<u16> {
    std::env::var("KEMARI_TEST_DOMID")
        .ok()
        .map(|v| v.parse().expect("KEMARI_TEST_DOMID must be a domain id"))
}

/// The paths `kemari debug selftest` takes, on a real dom0 (see the module documentation).
#[test]
#[ignore = "needs root in a Xen 4.17 dom0 (KEMARI_TEST_DOMID=<running HVM/PVH guest>)"]
fn dom0_real_xen() {
    let host = XenHost::open().expect("XenHost::open");
    let list = host.list_domains().unwrap();
    assert_eq!(list[0].domid, 0);
    for d in &list {
        println!(
            "dom {:>4} {:?} paused={} pages={}",
            d.domid, d.guest_type, d.paused, d.tot_pages
        );
    }
    let Some(domid) = test_domid() else {
        println!("KEMARI_TEST_DOMID unset: only dom0-wide checks ran");
        return;
    };
    let info = host.domain_info(domid).unwrap();
    assert_ne!(info.guest_type, GuestType::Pv, "needs an HVM or PVH guest");
    assert!(!info.paused, "needs a running guest");

    host.pause(domid).unwrap();
    let paused = host.domain_info(domid).unwrap().paused;
    host.unpause(domid).unwrap();
    assert!(paused);
    assert!(!host.domain_info(domid).unwrap().paused);

    let blob = host.hvm_context(domid).unwrap();
    let records = hvm_save::parse(&blob).unwrap();
    let cpus = records
        .iter()
        .filter(|r| r.typecode == hvm_save::HVM_SAVE_CPU)
        .count();
    assert_eq!(cpus as u32, info.max_vcpu_id + 1);
    let cpu0 = host
        .hvm_context_partial(domid, hvm_save::HVM_SAVE_CPU, 0)
        .unwrap();
    assert!(!cpu0.is_empty());

    let max = host.maximum_gpfn(domid).unwrap();
    let mut bitmap = DirtyBitmap::new(max + 1);
    host.log_dirty_enable(domid).unwrap();
    let mut dirty = None;
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(500));
        host.log_dirty_clean(domid, &mut bitmap).unwrap();
        if let Some(pfn) = bitmap.iter().last() {
            dirty = Some(pfn);
        }
    }
    host.log_dirty_disable(domid).unwrap();
    let pfn = dirty.expect("the guest dirtied no page in 2.5 s");
    println!("max gpfn {max:#x}, last dirty pfn {pfn:#x}");
    host.pause(domid).unwrap();
    let mut a = [0u8; PAGE_SIZE];
    let mut b = [0u8; PAGE_SIZE];
    let ra = host.read_page(domid, pfn, &mut a);
    let rb = host.read_page(domid, pfn, &mut b);
    host.unpause(domid).unwrap();
    ra.unwrap();
    rb.unwrap();
    assert_eq!(a, b, "page changed while paused");

    let xs = host.open_xenstore().unwrap();
    let dom = xs.get_domain_path(domid).unwrap();
    let name = xs.read(Tx::NONE, &format!("{dom}/name")).unwrap();
    println!("{dom}/name = {:?}", String::from_utf8_lossy(&name));
    let node = format!("{dom}/data/kemari-xen-host-test");
    xs.watch(&node, "kemari-test").unwrap();
    let first = xs.read_watch(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(first.map(|e| e.path), Some(node.clone()));
    xs.write(Tx::NONE, &node, b"x").unwrap();
    let ev = xs.read_watch(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(ev.map(|e| e.path), Some(node.clone()));
    assert_eq!(xs.read(Tx::NONE, &node).unwrap(), b"x");
    xs.rm(Tx::NONE, &node).unwrap();
    xs.unwatch(&node, "kemari-test").unwrap();
}
