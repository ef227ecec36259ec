//! The safe API against fake Xen libraries: small C shared objects compiled at test time
//! from tests/fake/*.c against the real Xen 4.17 headers (so prototypes and structures are
//! the real ones), then loaded through `LibraryPaths` exactly like the real libraries.
//!
//! Needs `cc` (always there: it is Rust's linker) and libxen-dev's headers; without the
//! headers each test says so on stderr and returns, or fails where Xen is required (`CI`
//! set, `KEMARI_REQUIRE_XEN=1`: tests/support/xen_required.rs).

// A test crate: helpers outside #[test] functions may unwrap too (clippy.toml allows it
// only inside them).
#![allow(clippy::unwrap_used)]

#[path = "support/xen_required.rs"]
mod xen_required;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use libxc_ffi::consts::*;
use libxc_ffi::*;

const SRC_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fake");

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

/// Compiles tests/fake/<src>.c with `defines` (once per distinct build) and returns a fresh
/// copy of the .so, so each test gets its own instance of the fake's global state.
fn fake_lib(src: &str, defines: &[&str]) -> PathBuf {
    static BUILT: OnceLock<Mutex<Vec<(String, PathBuf)>>> = OnceLock::new();
    static COPIES: AtomicUsize = AtomicUsize::new(0);
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("libxc-ffi-fakes");
    let dir = root.join(std::process::id().to_string());
    let key = format!("{src}{}", defines.join(""));
    let built = {
        let mut cache = BUILT
            .get_or_init(|| {
                // One folder per test process; remove those of processes that are gone.
                for e in std::fs::read_dir(&root).into_iter().flatten().flatten() {
                    let pid = e.file_name().to_string_lossy().into_owned();
                    if !Path::new("/proc").join(&pid).exists() {
                        let p = e.path();
                        let _ = std::fs::remove_dir_all(&p).or_else(|_| std::fs::remove_file(&p));
                    }
                }
                std::fs::create_dir_all(&dir).unwrap();
                Mutex::new(Vec::new())
            })
            .lock()
            .unwrap();
        match cache.iter().find(|(k, _)| *k == key) {
            Some((_, p)) => p.clone(),
            None => {
                let out = dir.join(format!("{src}-{}-{}.so", std::process::id(), cache.len()));
                let mut cmd = Command::new("cc");
                cmd.args(["-shared", "-fPIC", "-Wall", "-Wextra", "-Werror", "-o"])
                    .arg(&out)
                    .arg(format!("{SRC_DIR}/{src}.c"));
                for d in defines {
                    cmd.arg(format!("-D{d}"));
                }
                let st = cmd.status().expect("running cc");
                assert!(st.success(), "cc failed for {src}.c");
                cache.push((key, out.clone()));
                out
            }
        }
    };
    let n = COPIES.fetch_add(1, Ordering::SeqCst);
    let copy = dir.join(format!("{src}-copy{n}.so"));
    std::fs::copy(&built, &copy).unwrap();
    copy
}

fn paths_with(f: impl FnOnce(&mut LibraryPaths)) -> LibraryPaths {
    let mut p = LibraryPaths::default();
    f(&mut p);
    p
}

/// Reads an `int` global of a loaded fake library.
fn fake_int(lib: &Path, name: &str) -> i32 {
    // SAFETY: the fake is already loaded (same path -> same instance); its initialisers are
    // trivial.
    let l = unsafe { libloading::Library::new(lib) }.unwrap();
    let sym = format!("{name}\0");
    // SAFETY: the symbol is an `int` global of the fake library, read while it is loaded.
    unsafe {
        let p = l.get::<*mut i32>(sym.as_bytes()).unwrap();
        std::ptr::read_volatile(*p)
    }
}

fn errno_of(e: &XcError) -> i32 {
    match e {
        XcError::Domain { errno, .. } | XcError::Call { errno, .. } | XcError::Open { errno } => {
            errno.raw()
        }
        other => panic!("no errno in {other:?}"),
    }
}

// ------------------------------------------------------------------------------------------
// xenctrl

fn xenctrl() -> Option<(XenCtrl, PathBuf)> {
    if !headers_present() {
        return None;
    }
    let lib = fake_lib("fake_xenctrl", &[]);
    let xc = XenCtrl::open_with(&paths_with(|p| p.xenctrl = lib.clone().into())).unwrap();
    Some((xc, lib))
}

#[test]
fn xenctrl_refuses_a_hypervisor_other_than_4_17_and_closes_the_handle() {
    if !headers_present() {
        return;
    }
    let lib = fake_lib("fake_xenctrl", &["FAKE_VERSION=((4<<16)|16)"]);
    let err = XenCtrl::open_with(&paths_with(|p| p.xenctrl = lib.clone().into())).unwrap_err();
    match err {
        XcError::WrongXenVersion {
            found_major,
            found_minor,
        } => assert_eq!((found_major, found_minor), (4, 16)),
        ref other => panic!("unexpected {other:?}"),
    }
    assert!(err.to_string().contains("Xen 4.16"), "{err}");
    assert!(err.to_string().contains("Xen 4.17 only"), "{err}");
    assert_eq!(fake_int(&lib, "fake_live_handles"), 0);
}

#[test]
fn xenctrl_open_failure_carries_errno() {
    if !headers_present() {
        return;
    }
    let lib = fake_lib("fake_xenctrl", &["FAKE_OPEN_FAILS"]);
    let err = XenCtrl::open_with(&paths_with(|p| p.xenctrl = lib.into())).unwrap_err();
    assert!(
        matches!(err, XcError::Open { errno } if errno == Errno(libc::EACCES)),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .starts_with("xc_interface_open failed: errno 13"),
        "{err}"
    );
}

#[test]
fn xenctrl_version_and_close_on_drop() {
    let Some((xc, lib)) = xenctrl() else { return };
    assert_eq!(
        xc.version(),
        XenVersion {
            major: 4,
            minor: 17
        }
    );
    assert_eq!(xc.extraversion().unwrap(), ".7-fake");
    assert_eq!(fake_int(&lib, "fake_live_handles"), 1);
    drop(xc);
    assert_eq!(fake_int(&lib, "fake_live_handles"), 0);
}

#[test]
fn xenctrl_lists_domains_across_batches_and_decodes_them() {
    let Some((xc, _lib)) = xenctrl() else { return };
    let doms = xc.domain_list().unwrap();
    assert_eq!(doms.len(), 300);
    let ids: Vec<u32> = doms.iter().map(|d| d.domid).collect();
    assert_eq!(&ids[..4], &[0, 3, 5, 7]);
    assert_eq!(*ids.last().unwrap(), 599);
    assert!(ids.windows(2).all(|w| w[0] < w[1]));

    let d0 = &doms[0];
    assert!(d0.running && !d0.paused && !d0.hvm && !d0.hap && d0.shutdown.is_none());
    let d3 = xc.domain_info(3).unwrap();
    assert!(d3.hvm && d3.hap && d3.running && !d3.dying);
    assert_eq!(d3.nr_pages, 1003);
    assert_eq!(d3.max_pages, 2003);
    assert_eq!(d3.shared_info_frame, 0xfeff3);
    assert_eq!(d3.cpu_time, 123_456_789 * 3);
    assert_eq!(d3.max_vcpu_id, Some(1));
    assert_eq!(d3.nr_online_vcpus, 2);
    assert_eq!(d3.uuid(), "03040506-0708-090a-0b0c-0d0e0f101112");
    assert_eq!(d0.guest_type, GuestType::Pv);
    assert_eq!(d3.guest_type, GuestType::Hvm);
    let d5 = xc.domain_info(5).unwrap();
    assert_eq!((d5.guest_type, d5.emulation_flags), (GuestType::Pvh, 1));
    assert_eq!(d5.max_vcpu_id, None);
    assert_eq!(
        xc.domain_info(7).unwrap().shutdown,
        Some(ShutdownReason::Crash)
    );

    let err = xc.domain_info(4).unwrap_err();
    assert!(matches!(err, XcError::NoSuchDomain { domid: 4 }), "{err:?}");
}

#[test]
fn xenctrl_pause_and_unpause() {
    let Some((xc, _lib)) = xenctrl() else { return };
    xc.pause(3).unwrap();
    let d = xc.domain_info(3).unwrap();
    assert!(d.paused && !d.running);
    xc.unpause(3).unwrap();
    assert!(!xc.domain_info(3).unwrap().paused);
    let err = xc.pause(4).unwrap_err();
    assert_eq!(
        err.to_string(),
        "xc_domain_pause failed for domain 4: errno 3 (No such process)"
    );
    assert_eq!(errno_of(&xc.unpause(4).unwrap_err()), libc::ESRCH);
}

#[test]
fn xenctrl_log_dirty_round_trip_with_hypercall_buffer() {
    let Some((xc, lib)) = xenctrl() else { return };
    let pages = xc.maximum_gpfn(3).unwrap() + 1;
    assert_eq!(pages, 0x10_0000);
    let expected = (3..pages).step_by(7).count() as u64;

    // CLEAN before ENABLE fails, with the operation and domain in the error.
    let mut buf = xc.dirty_bitmap_buffer(pages).unwrap();
    assert_eq!(buf.pages(), pages);
    assert_eq!(fake_int(&lib, "fake_live_buffers"), 1);
    let err = xc.logdirty_clean(3, &mut buf, false).unwrap_err();
    assert_eq!(
        err.to_string(),
        "xc_logdirty_control(CLEAN) failed for domain 3: errno 22 (Invalid argument)"
    );

    xc.logdirty_enable(3).unwrap();
    let stats = xc.logdirty_clean(3, &mut buf, false).unwrap();
    assert_eq!(fake_int(&lib, "fake_last_logdirty_mode"), 0);
    assert_eq!(stats.pages, pages);
    assert_eq!(u64::from(stats.dirty_count), expected);
    assert_eq!(stats.fault_count, 42);
    let bm = buf.to_bitmap();
    assert_eq!(bm.pages(), pages);
    assert_eq!(bm.count(), expected);
    assert!(bm.is_dirty(3) && bm.is_dirty(10) && !bm.is_dirty(4) && !bm.is_dirty(pages));
    assert!(bm.iter_dirty().take(3).eq([3, 10, 17]));

    let mut reused = DirtyBitmap::default();
    let stats = xc.logdirty_clean(3, &mut buf, true).unwrap();
    assert_eq!(
        fake_int(&lib, "fake_last_logdirty_mode"),
        1,
        "LOGDIRTY_FINAL passed"
    );
    buf.copy_into(&mut reused);
    assert_eq!(reused, bm);
    assert_eq!(stats.fault_count, 42);

    let peek = xc.logdirty_peek(3, &mut buf).unwrap();
    assert_eq!(peek.fault_count, 0);
    let (copy, st) = xc.logdirty_clean_copy(3, 1000).unwrap();
    assert_eq!(copy.count(), (3..1000).step_by(7).count() as u64);
    assert_eq!(u64::from(st.dirty_count), copy.count());

    xc.logdirty_off(3).unwrap();
    assert!(xc.logdirty_clean(3, &mut buf, false).is_err());
    let err = xc.logdirty_enable(0).unwrap_err();
    assert_eq!(errno_of(&err), libc::EOPNOTSUPP);

    drop(buf);
    assert_eq!(fake_int(&lib, "fake_live_buffers"), 0);
}

#[test]
fn xenctrl_log_dirty_bits_beyond_the_pages_xen_covered_are_cleared() {
    let Some((xc, _lib)) = xenctrl() else { return };
    let mut buf = xc.dirty_bitmap_buffer(5000).unwrap();
    assert_eq!(buf.to_bitmap().count(), 0, "a new buffer is clean");
    xc.logdirty_enable(3).unwrap();
    xc.logdirty_enable(9).unwrap();
    // Domain 3 covers all 5000 pages: pfn 3, 10, ... 4994 dirty.
    let full = xc.logdirty_clean(3, &mut buf, false).unwrap();
    assert_eq!(full.pages, 5000);
    assert!(buf.to_bitmap().is_dirty(4994) && buf.to_bitmap().is_dirty(1004));
    // Domain 9 covers only 1001 pages (a partial last byte): nothing from the previous
    // round may survive beyond that.
    let part = xc.logdirty_clean(9, &mut buf, false).unwrap();
    assert_eq!(part.pages, 1001);
    let bm = buf.to_bitmap();
    assert_eq!(bm.count(), u64::from(part.dirty_count));
    assert_eq!(bm.iter_dirty().last(), Some(997));
    assert!(!bm.is_dirty(1004) && !bm.is_dirty(4994));
}

#[test]
fn xenctrl_bitmap_buffer_cannot_be_used_on_another_interface() {
    let Some((xc, _lib)) = xenctrl() else { return };
    let Some((other, _lib2)) = xenctrl() else {
        return;
    };
    xc.logdirty_enable(3).unwrap();
    let mut buf = other.dirty_bitmap_buffer(64).unwrap();
    let err = xc.logdirty_clean(3, &mut buf, false).unwrap_err();
    assert!(matches!(err, XcError::Invalid { .. }), "{err:?}");
}

#[test]
fn xenctrl_hvm_and_vcpu_context() {
    let Some((xc, lib)) = xenctrl() else { return };
    // HEADER (8 + 24), CPU x2 (8 + 1032 each), END (8).
    assert_eq!(xc.hvm_context_size(3).unwrap(), 2120);
    let ctx = xc.hvm_getcontext(3).unwrap();
    assert_eq!(ctx.len(), 2120);
    let cpu1 = find_hvm_record(&ctx, HVM_SAVE_CODE_CPU, 1)
        .unwrap()
        .unwrap();
    assert_eq!(cpu1.len(), 1032);
    assert_eq!(cpu1[640..648], 0xfff1u64.to_le_bytes(), "rip at offset 640");
    assert_eq!(
        xc.hvm_record(3, HVM_SAVE_CODE_CPU, 0).unwrap()[640..648],
        0xfff0u64.to_le_bytes()
    );
    assert_eq!(xc.hvm_record(3, HVM_SAVE_CODE_HEADER, 0).unwrap().len(), 24);
    assert!(matches!(
        xc.hvm_record(3, HVM_SAVE_CODE_CPU, 2),
        Err(XcError::Invalid { .. })
    ));
    let mut reused = Vec::with_capacity(4096);
    xc.hvm_getcontext_into(3, &mut reused).unwrap();
    assert_eq!(reused, ctx);
    xc.hvm_setcontext(3, &ctx).unwrap();
    assert_eq!(fake_int(&lib, "fake_last_setcontext_size"), 2120);
    let err = xc.hvm_setcontext(3, &ctx[..50]).unwrap_err();
    assert_eq!(errno_of(&err), libc::EINVAL);
    assert_eq!(errno_of(&xc.hvm_getcontext(4).unwrap_err()), libc::ESRCH);

    let cpu = xc.hvm_cpu_context(3, 1).unwrap();
    assert_eq!(
        (cpu.rip, cpu.cr3, cpu.tsc),
        (0xfff1, 0x1000, 0x1122_3344_5566_7788)
    );
    let mut small = [0u8; 16];
    let err = xc
        .hvm_getcontext_partial(3, HVM_SAVE_CODE_CPU, 0, &mut small)
        .unwrap_err();
    assert!(err
        .to_string()
        .starts_with("xc_domain_hvm_getcontext_partial failed for domain 3"));

    let v = xc.vcpu_getcontext(3, 1).unwrap();
    assert_eq!(v.x64().flags, 1 << 5, "VGCF_online");
    assert_eq!(v.x64().ctrlreg[3], 0x1001);
    assert_eq!(v.as_bytes().len(), 5168);
    assert!(xc.vcpu_getcontext(3, 2).is_err());
}

#[test]
fn xenctrl_params_event_channels_physmap() {
    let Some((xc, _lib)) = xenctrl() else { return };
    xc.hvm_param_set(3, HVM_PARAM_STORE_EVTCHN, 17).unwrap();
    assert_eq!(xc.hvm_param_get(3, HVM_PARAM_STORE_EVTCHN).unwrap(), 17);
    assert_eq!(xc.hvm_param_get(5, HVM_PARAM_STORE_EVTCHN).unwrap(), 0);
    assert_eq!(
        errno_of(&xc.hvm_param_get(3, 1000).unwrap_err()),
        libc::EINVAL
    );

    let st = |port| xc.evtchn_status(3, port).unwrap();
    assert_eq!(
        st(1).state,
        EvtchnState::Interdomain {
            remote_domid: 0,
            remote_port: 7
        }
    );
    assert_eq!(st(2).state, EvtchnState::Unbound { remote_domid: 0 });
    assert_eq!((st(3).state, st(3).vcpu), (EvtchnState::Virq(5), 1));
    assert_eq!(st(4).state, EvtchnState::Ipi);
    assert_eq!(st(9).state, EvtchnState::Closed);
    assert_eq!((st(9).domid, st(9).port), (3, 9));
    assert!(xc.evtchn_status(4, 1).is_err());
    assert!(matches!(
        xc.evtchn_status(70000, 1),
        Err(XcError::Invalid { .. })
    ));

    assert_eq!(xc.evtchn_alloc_unbound(3, 0).unwrap(), 10);
    assert_eq!(
        errno_of(&xc.evtchn_alloc_unbound(3, 4).unwrap_err()),
        libc::ESRCH
    );

    xc.add_to_physmap(3, XENMAPSPACE_grant_table, 0, 0xf0000)
        .unwrap();
    let err = xc
        .add_to_physmap(3, XENMAPSPACE_gmfn, 0, 0xf0000)
        .unwrap_err();
    assert_eq!(errno_of(&err), libc::EINVAL);
}

// ------------------------------------------------------------------------------------------
// xenevtchn

fn poll_readable(fd: std::os::fd::BorrowedFd<'_>) -> bool {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n == 1 && p.revents & libc::POLLIN != 0
}

#[test]
fn evtchn_bind_notify_pending_unmask_unbind() {
    use std::os::fd::AsFd;
    if !headers_present() {
        return;
    }
    let lib = fake_lib("fake_xenevtchn", &[]);
    let ev = XenEvtchn::open_with(&paths_with(|p| p.xenevtchn = lib.clone().into())).unwrap();
    let port = ev.bind_interdomain(1, 7).unwrap();
    assert_eq!(port, 5);
    assert!(!poll_readable(ev.as_fd()));
    ev.notify(port).unwrap();
    assert!(poll_readable(ev.as_fd()));
    assert_eq!(ev.pending().unwrap(), port);
    assert_eq!(
        ev.wait_pending(Some(std::time::Duration::ZERO)).unwrap(),
        None
    );
    let t = std::time::Instant::now();
    assert_eq!(
        ev.wait_pending(Some(std::time::Duration::from_millis(20)))
            .unwrap(),
        None
    );
    assert!(t.elapsed() >= std::time::Duration::from_millis(20));
    ev.notify(port).unwrap();
    assert_eq!(ev.wait_pending(None).unwrap(), Some(port));
    ev.unmask(port).unwrap();
    assert_eq!(fake_int(&lib, "fake_unmasked_port"), 5);
    assert_eq!(ev.bind_unbound_port(1).unwrap(), 6);
    ev.unbind(port).unwrap();

    let err = ev.notify(port).unwrap_err();
    assert_eq!(
        err.to_string(),
        "xenevtchn_notify failed for local port 5: errno 22 (Invalid argument)"
    );
    let err = ev.bind_interdomain(999, 3).unwrap_err();
    assert_eq!(
        err.to_string(),
        "xenevtchn_bind_interdomain failed for domain 999 port 3: errno 3 (No such process)"
    );
    assert_eq!(fake_int(&lib, "fake_live_handles"), 1);
    drop(ev);
    assert_eq!(fake_int(&lib, "fake_live_handles"), 0);
}

// ------------------------------------------------------------------------------------------
// xengnttab

#[test]
fn gnttab_maps_copy_in_out_and_unmaps_on_drop() {
    if !headers_present() {
        return;
    }
    let lib = fake_lib("fake_xengnttab", &[]);
    let g = XenGnttab::open_with(&paths_with(|p| p.xengnttab = lib.clone().into())).unwrap();
    g.set_max_grants(64).unwrap();
    assert_eq!(fake_int(&lib, "fake_max_grants"), 64);
    assert!(g.set_max_grants(0).is_err());

    let ro = g.map_grant_ref(1, 77, false).unwrap();
    assert_eq!((ro.pages(), ro.len(), ro.is_writable()), (1, 4096, false));
    assert_eq!(ro.domid(), 1);
    assert_eq!(ro.read_u32(0), Ok(77));
    assert_eq!(ro.read_u32(4), Ok(1));
    assert_eq!(ro.read_u8(100), Ok(77));
    assert_eq!(
        ro.write_u32(0, 5),
        Err(MemError::ReadOnly { offset: 0, len: 4 })
    );

    let rw = g.map_grant_refs(2, &[10, 11, 12], true).unwrap();
    assert_eq!(rw.len(), 3 * 4096);
    for i in 0..3 {
        assert_eq!(rw.read_u32(i * 4096), Ok(10 + i as u32));
        assert_eq!(rw.read_u32(i * 4096 + 4), Ok(2));
    }
    rw.write_from(4096 + 8, b"ring data").unwrap();
    let mut back = [0u8; 9];
    rw.read_into(4096 + 8, &mut back).unwrap();
    assert_eq!(&back, b"ring data");
    assert!(matches!(
        rw.read_u8(3 * 4096),
        Err(MemError::OutOfBounds { .. })
    ));

    let multi = g.map_grant_refs_multi(&[(1, 20), (2, 21)], false).unwrap();
    assert_eq!(multi.read_u32(4096 + 4), Ok(2));
    assert_eq!(fake_int(&lib, "fake_live_pages"), 6);

    let err = g.map_grant_refs(3, &[1, 0xdead], true).unwrap_err();
    assert_eq!(
        err.to_string(),
        "xengnttab_map_domain_grant_refs of 2 grant ref(s) from domain 3 (first ref 1) failed: \
         errno 22 (Invalid argument)"
    );
    assert!(matches!(
        g.map_grant_refs(3, &[], true),
        Err(GnttabError::Invalid { .. })
    ));

    // Mappings keep the handle open after the XenGnttab itself is dropped.
    drop(g);
    assert_eq!(fake_int(&lib, "fake_live_handles"), 1);
    assert_eq!(multi.read_u32(0), Ok(20));
    drop((ro, rw, multi));
    assert_eq!(fake_int(&lib, "fake_live_pages"), 0);
    assert_eq!(fake_int(&lib, "fake_live_handles"), 0);
}

// ------------------------------------------------------------------------------------------
// xenforeignmemory

#[test]
fn foreign_memory_map_names_the_failed_pfn_and_unmaps() {
    if !headers_present() {
        return;
    }
    let lib = fake_lib("fake_xenforeignmemory", &[]);
    let fm = XenForeignMemory::open_with(&paths_with(|p| p.xenforeignmemory = lib.clone().into()))
        .unwrap();
    let m = fm.map(3, &[0x10, 0x11], true).unwrap();
    assert_eq!((m.pages(), m.domid(), m.len()), (2, 3, 8192));
    assert_eq!(m.read_u64(0), Ok(0x10));
    assert_eq!(m.read_u64(4096), Ok(0x11));
    m.write_u64(8, 0xabcd).unwrap();
    assert_eq!(m.read_u64(8), Ok(0xabcd));
    let page = fm.map_page(3, 0x42, false).unwrap();
    assert_eq!(page.to_vec()[..8], 0x42u64.to_le_bytes());

    let err = fm.map(3, &[0x10, 0xbad, 0x12], false).unwrap_err();
    assert!(
        matches!(err, ForeignMemoryError::Page { domid: 3, index: 1, pfn: 0xbad, errno }
            if errno == Errno(libc::EFAULT)),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "xenforeignmemory_map of domain 3: page 1 (pfn 0xbad) failed: errno 14 (Bad address)"
    );
    assert_eq!(
        fake_int(&lib, "fake_live_pages"),
        3,
        "the partial mapping was unmapped"
    );
    let err = fm.map(999, &[1], false).unwrap_err();
    assert!(matches!(err, ForeignMemoryError::Map { errno, .. } if errno == Errno(libc::ESRCH)));
    assert!(matches!(
        fm.map(3, &[], false),
        Err(ForeignMemoryError::Invalid { .. })
    ));

    let gt = fm
        .map_resource(3, XENMEM_resource_grant_table, 0, 2, 3, false)
        .unwrap();
    assert_eq!((gt.len(), gt.domid()), (3 * 4096, 3));
    assert_eq!(gt.read_u64(0), Ok(0x6002));
    assert_eq!(gt.read_u64(2 * 4096), Ok(0x6004));
    assert!(matches!(gt.write_u8(0, 1), Err(MemError::ReadOnly { .. })));
    assert_eq!(
        fm.resource_size(3, XENMEM_resource_grant_table, 0).unwrap(),
        32 * 4096
    );
    assert!(fm
        .resource_size(3, XENMEM_resource_ioreq_server, 0)
        .is_err());
    assert!(fm
        .map_resource(3, XENMEM_resource_ioreq_server, 0, 0, 1, false)
        .is_err());
    assert!(fm
        .map_resource(3, XENMEM_resource_grant_table, 0, 0, 0, false)
        .is_err());

    drop((m, page, gt));
    assert_eq!(fake_int(&lib, "fake_live_pages"), 0);
    drop(fm);
    assert_eq!(fake_int(&lib, "fake_live_handles"), 0);
}

#[test]
fn foreign_memory_copies_pages_in_batches_and_reports_failed_ones() {
    if !headers_present() {
        return;
    }
    let lib = fake_lib("fake_xenforeignmemory", &[]);
    let fm = XenForeignMemory::open_with(&paths_with(|p| p.xenforeignmemory = lib.clone().into()))
        .unwrap();
    // Three batches (1024 + 1024 + 2); the bad pfn sits in the last one.
    let mut pfns: Vec<u64> = (0x1000..0x1000 + 2050).collect();
    pfns[2049] = 0xbad;
    pfns[5] = 0x1000; // duplicates are fine
    let mut buf = vec![0xffu8; pfns.len() * PAGE_SIZE];
    let failed = fm.read_pages(3, &pfns, &mut buf).unwrap();
    assert_eq!(
        failed,
        vec![PageError {
            index: 2049,
            pfn: 0xbad,
            errno: Errno(libc::EFAULT)
        }]
    );
    for (i, &pfn) in pfns.iter().enumerate().take(2049) {
        assert_eq!(buf[i * PAGE_SIZE..][..8], pfn.to_le_bytes(), "page {i}");
    }
    assert!(
        buf[2049 * PAGE_SIZE..].iter().all(|&b| b == 0),
        "failed slot zero-filled"
    );
    assert_eq!(fake_int(&lib, "fake_live_pages"), 0, "every batch unmapped");

    let data = vec![7u8; 2 * PAGE_SIZE];
    assert_eq!(fm.write_pages(3, &[0x20, 0x21], &data).unwrap(), vec![]);
    let failed = fm.write_pages(3, &[0xbad, 0x21], &data).unwrap();
    assert_eq!(failed.iter().map(|f| f.index).collect::<Vec<_>>(), [0]);
    let err = fm.read_pages(3, &[1, 2], &mut [0u8; 4096]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "read_pages for domain 3: buffer of 4096 bytes for 2 page(s) (need 8192 bytes)"
    );
    assert!(matches!(
        fm.read_pages(999, &[1], &mut [0u8; 4096]),
        Err(ForeignMemoryError::Map { .. })
    ));
}

// ------------------------------------------------------------------------------------------
// xenstore

fn xenstore() -> Option<(XenStore, PathBuf)> {
    if !headers_present() {
        return None;
    }
    let lib = fake_lib("fake_xenstore", &[]);
    let xs = XenStore::open_with(&paths_with(|p| p.xenstore = lib.clone().into())).unwrap();
    Some((xs, lib))
}

#[test]
fn xenstore_nodes_directories_and_permissions() {
    let Some((xs, lib)) = xenstore() else { return };
    xs.write("/local/domain/3/name", b"guest").unwrap();
    xs.mkdir("/local/domain/3/device").unwrap();
    xs.mkdir("/local/domain/3").unwrap();
    assert_eq!(xs.read("/local/domain/3/name").unwrap(), b"guest");
    assert_eq!(xs.read_string("/local/domain/3/device").unwrap(), "");
    assert_eq!(xs.read_opt("/local/domain/3/nope").unwrap(), None);
    let err = xs.read("/local/domain/3/nope").unwrap_err();
    assert!(err.is_not_found());
    assert_eq!(
        err.to_string(),
        "xs_read \"/local/domain/3/nope\" failed: errno 2 (No such file or directory)"
    );
    let mut children = xs.directory("/local/domain/3").unwrap();
    children.sort();
    assert_eq!(children, ["device", "name"]);

    let perms = [
        Permission {
            domid: 0,
            access: Access::None,
        },
        Permission {
            domid: 3,
            access: Access::ReadWrite,
        },
        Permission {
            domid: 4,
            access: Access::Read,
        },
    ];
    xs.set_permissions("/local/domain/3/device", &perms)
        .unwrap();
    assert_eq!(xs.get_permissions("/local/domain/3/device").unwrap(), perms);
    assert!(matches!(
        xs.set_permissions("/local/domain/3/device", &[]),
        Err(XsError::Invalid { .. })
    ));

    xs.rm("/local/domain/3").unwrap();
    assert_eq!(xs.read_opt("/local/domain/3/name").unwrap(), None);
    assert!(xs.rm("/local/domain/3").unwrap_err().is_not_found());
    assert!(matches!(
        xs.read("/bad\0path"),
        Err(XsError::Invalid { .. })
    ));
    assert_eq!(xs.get_domain_path(3).unwrap(), "/local/domain/3");
    assert!(xs.get_domain_path(0x7ff0).is_err());

    drop(xs);
    assert_eq!(fake_int(&lib, "fake_live_handles"), 0);
}

#[test]
fn xenstore_transaction_retries_conflicts_then_commits() {
    let Some((xs, lib)) = xenstore() else { return };
    xs.write("/fake/conflicts", b"2").unwrap();
    let mut runs = 0;
    let v = xs
        .transaction(|t| {
            runs += 1;
            t.write("/backend/vbd/3/51712/state", b"4")?;
            t.read_string("/backend/vbd/3/51712/state")
        })
        .unwrap();
    assert_eq!(v, "4");
    assert_eq!(runs, 3, "two EAGAIN conflicts, then success");
    assert_eq!(fake_int(&lib, "fake_commits"), 1);

    xs.write("/fake/conflicts", b"1000").unwrap();
    let mut runs = 0;
    let err = xs
        .transaction(|_t| {
            runs += 1;
            Ok(())
        })
        .unwrap_err();
    assert!(
        matches!(err, XsError::TransactionRetries { attempts: 16 }),
        "{err:?}"
    );
    assert_eq!(runs, TRANSACTION_RETRIES);
}

#[test]
fn xenstore_transaction_aborts_on_error_and_on_drop() {
    let Some((xs, lib)) = xenstore() else { return };
    let err = xs
        .transaction(|t| t.read("/missing").map(|_| ()))
        .unwrap_err();
    assert!(err.is_not_found());
    assert_eq!(fake_int(&lib, "fake_aborts"), 1);
    assert_eq!(fake_int(&lib, "fake_commits"), 0);
    {
        let t = xs.transaction_start().unwrap();
        t.mkdir("/x").unwrap();
        assert!(t.id() > 0);
    }
    assert_eq!(fake_int(&lib, "fake_aborts"), 2);
    let t = xs.transaction_start().unwrap();
    t.commit().unwrap();
    assert_eq!(fake_int(&lib, "fake_commits"), 1);
    assert_eq!(fake_int(&lib, "fake_aborts"), 2);
}

#[test]
fn xenstore_transactions_by_raw_id() {
    let Some((xs, lib)) = xenstore() else { return };
    let tx = xs.transaction_start_raw().unwrap();
    assert_ne!(tx, XBT_NULL);
    xs.mkdir_tx(tx, "/a").unwrap();
    xs.write_tx(tx, "/a/b", b"1").unwrap();
    assert_eq!(xs.read_tx(tx, "/a/b").unwrap(), b"1");
    xs.mkdir_tx(tx, "/a/c").unwrap();
    assert_eq!(xs.directory_tx(tx, "/a").unwrap().len(), 2);
    xs.rm_tx(tx, "/a/c").unwrap();
    assert_eq!(xs.get_permissions_tx(tx, "/a/b").unwrap().len(), 1);
    xs.set_permissions_tx(
        tx,
        "/a/b",
        &[Permission {
            domid: 0,
            access: Access::Read,
        }],
    )
    .unwrap();
    xs.transaction_end(tx, false).unwrap();
    assert_eq!(fake_int(&lib, "fake_commits"), 1);
    let err = xs.transaction_end(tx + 100, false).unwrap_err();
    assert_eq!(err.errno(), Some(Errno(libc::ENOENT)));
    assert_eq!(
        err.to_string(),
        "xs_transaction_end(commit) failed: errno 2 (No such file or directory)"
    );
    assert_eq!(xs.read_tx(XBT_NULL, "/a/b").unwrap(), b"1");
}

#[test]
fn xenstore_watches_fire_through_the_pollable_fd() {
    use std::os::fd::AsFd;
    let Some((xs, _lib)) = xenstore() else { return };
    assert!(xs.fileno() >= 0);
    assert!(!poll_readable(xs.as_fd()));
    xs.watch("/local/domain/3/device", "vif").unwrap();
    assert!(poll_readable(xs.as_fd()));
    let first = xs.check_watch().unwrap().unwrap();
    assert_eq!(
        first,
        WatchEvent {
            path: "/local/domain/3/device".into(),
            token: "vif".into()
        }
    );
    assert_eq!(xs.check_watch().unwrap(), None);
    assert!(!poll_readable(xs.as_fd()));

    xs.write("/local/domain/3/device/vif/0/state", b"1")
        .unwrap();
    xs.write("/local/domain/4/name", b"other").unwrap();
    let ev = xs.read_watch().unwrap();
    assert_eq!(ev.path, "/local/domain/3/device/vif/0/state");
    assert_eq!(ev.token, "vif");
    assert_eq!(xs.check_watch().unwrap(), None);

    assert_eq!(
        xs.wait_watch(Some(std::time::Duration::from_millis(10)))
            .unwrap(),
        None
    );
    xs.write("/local/domain/3/device/vbd", b"").unwrap();
    let ev = xs.wait_watch(None).unwrap().unwrap();
    assert_eq!(ev.path, "/local/domain/3/device/vbd");

    xs.unwatch("/local/domain/3/device", "vif").unwrap();
    let err = xs.unwatch("/local/domain/3/device", "vif").unwrap_err();
    assert_eq!(
        err.to_string(),
        "xs_unwatch \"/local/domain/3/device\" failed: errno 2 (No such file or directory)"
    );
    xs.write("/local/domain/3/device/vif/0/state", b"4")
        .unwrap();
    assert_eq!(xs.check_watch().unwrap(), None);
}

// ------------------------------------------------------------------------------------------
// Every handle reports an absent library the same way.

#[test]
fn every_handle_reports_an_absent_library_by_soname() {
    let absent: OsString = "libxen-kemari-absent.so.4.17".into();
    let p = paths_with(|p| {
        p.xenctrl = absent.clone();
        p.xenevtchn = absent.clone();
        p.xengnttab = absent.clone();
        p.xenforeignmemory = absent.clone();
        p.xenstore = absent.clone();
    });
    let msgs = [
        XenCtrl::open_with(&p).unwrap_err().to_string(),
        XenEvtchn::open_with(&p).unwrap_err().to_string(),
        XenGnttab::open_with(&p).unwrap_err().to_string(),
        XenForeignMemory::open_with(&p).unwrap_err().to_string(),
        XenStore::open_with(&p).unwrap_err().to_string(),
    ];
    for m in msgs {
        assert!(
            m.starts_with("libxen-kemari-absent.so.4.17 not found: is this a Xen 4.17 dom0?"),
            "{m}"
        );
    }
}
