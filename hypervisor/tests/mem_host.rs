//! In-memory host: domain control, guest memory, log-dirty, and a checkpoint made of them.

use std::time::Duration;

use hypervisor::hvm_save::{self, HvmContextBuilder, HVM_SAVE_CPU, HVM_SAVE_HEADER};
use hypervisor::mem::{DomainConfig, GuestError, MemXen, MAX_PAUSE_COUNT};
use hypervisor::{
    DirtyBitmap, DomainControl, Errno, GuestMemory, GuestType, HypervisorError, LogDirty, Method,
    ShutdownReason, PAGE_SIZE,
};

fn page_of(byte: u8) -> [u8; PAGE_SIZE] {
    [byte; PAGE_SIZE]
}

fn errno<T: std::fmt::Debug>(r: Result<T, HypervisorError>) -> Errno {
    r.expect_err("the call should fail")
        .errno()
        .expect("error with errno")
}

#[test]
fn list_and_info_describe_the_domains() {
    let xen = MemXen::new();
    let a = xen
        .create_domain(DomainConfig::hvm(64).with_vcpus(4).with_holes(&[10, 11]))
        .unwrap();
    let b = xen.create_domain(DomainConfig::pvh(32)).unwrap();
    assert_eq!((a, b), (1, 2));
    let all = xen.list_domains().unwrap();
    assert_eq!(
        all.iter().map(|d| d.domid).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    assert_eq!(all[0].guest_type, GuestType::Pv);
    let info = xen.domain_info(a).unwrap();
    assert_eq!(info.guest_type, GuestType::Hvm);
    assert_eq!(info.max_vcpu_id, 3);
    assert_eq!(info.tot_pages, 62, "holes are not populated");
    assert_eq!(info.max_pages, 64);
    assert!(info.running && !info.paused && info.shutdown.is_none());
    assert_eq!(xen.domain_info(b).unwrap().guest_type, GuestType::Pvh);
    assert_eq!(xen.maximum_gpfn(a).unwrap(), 63);

    let err = xen.domain_info(9).unwrap_err();
    assert_eq!(
        err,
        HypervisorError::Domain {
            op: Method::DomainInfo,
            domid: 9,
            errno: Errno::ESRCH
        }
    );
    assert!(
        err.to_string()
            .contains("domain_info failed for domain 9: ESRCH"),
        "{err}"
    );

    xen.guest(b).shutdown(ShutdownReason::Crash).unwrap();
    let info = xen.domain_info(b).unwrap();
    assert_eq!(info.shutdown, Some(ShutdownReason::Crash));
    assert!(!info.running);
    xen.destroy_domain(b).unwrap();
    assert_eq!(errno(xen.domain_info(b)), Errno::ESRCH);
    assert_eq!(xen.list_domains().unwrap().len(), 2);
}

#[test]
fn pause_is_a_refcount() {
    let xen = MemXen::new();
    let d = xen.create_domain(DomainConfig::hvm(8)).unwrap();
    let guest = xen.guest(d);
    xen.pause(d).unwrap();
    xen.pause(d).unwrap();
    assert_eq!(xen.pause_count(d), Some(2));
    xen.unpause(d).unwrap();
    assert!(xen.domain_info(d).unwrap().paused, "one reference left");
    assert_eq!(
        guest.write(0, 0, b"x"),
        Err(GuestError::NotRunning {
            domid: d,
            why: "paused"
        })
    );
    xen.unpause(d).unwrap();
    assert!(!xen.domain_info(d).unwrap().paused);
    guest.write(0, 0, b"x").unwrap();
    assert_eq!(errno(xen.unpause(d)), Errno::EINVAL, "not paused by us");
    assert_eq!(
        errno(xen.pause(0)),
        Errno::EINVAL,
        "dom0 cannot pause itself"
    );
    assert_eq!(errno(xen.pause(42)), Errno::ESRCH);
    for _ in 0..MAX_PAUSE_COUNT {
        xen.pause(d).unwrap();
    }
    assert_eq!(errno(xen.pause(d)), Errno::EOVERFLOW);
    assert_eq!(xen.pause_count(d), Some(MAX_PAUSE_COUNT));
}

#[test]
fn a_guest_waits_while_paused() {
    let xen = MemXen::new();
    let d = xen.create_domain(DomainConfig::hvm(8)).unwrap();
    let guest = xen.guest(d);
    xen.pause(d).unwrap();
    assert!(!guest.wait_running(Duration::from_millis(20)));
    let waiter = std::thread::spawn(move || guest.wait_running(Duration::from_secs(10)));
    std::thread::sleep(Duration::from_millis(20));
    xen.unpause(d).unwrap();
    assert!(waiter.join().unwrap());
}

#[test]
fn hvm_context_roundtrip_partial_and_validation() {
    let xen = MemXen::new();
    let d = xen
        .create_domain(DomainConfig::hvm(8).with_vcpus(2))
        .unwrap();
    let ctx = xen.hvm_context(d).unwrap();
    let records = hvm_save::parse(&ctx).unwrap();
    assert_eq!(records[0].typecode, HVM_SAVE_HEADER);
    assert_eq!(
        records
            .iter()
            .filter(|r| r.typecode == HVM_SAVE_CPU)
            .count(),
        2
    );

    let mut b = HvmContextBuilder::new();
    b.push(HVM_SAVE_HEADER, 0, &[7; 24]).unwrap();
    b.push(HVM_SAVE_CPU, 0, &[0xA0; 40]).unwrap();
    b.push(HVM_SAVE_CPU, 1, &[0xA1; 40]).unwrap();
    let new_ctx = b.finish();
    xen.set_hvm_context(d, &new_ctx).unwrap();
    assert_eq!(xen.hvm_context(d).unwrap(), new_ctx);
    assert_eq!(
        xen.hvm_context_partial(d, HVM_SAVE_CPU, 1).unwrap(),
        vec![0xA1; 40],
        "body only, no descriptor"
    );
    assert_eq!(
        errno(xen.hvm_context_partial(d, HVM_SAVE_CPU, 5)),
        Errno::ENOENT
    );

    // A truncated blob is refused and the old context kept.
    assert_eq!(
        errno(xen.set_hvm_context(d, &new_ctx[..new_ctx.len() - 8])),
        Errno::EINVAL
    );
    assert_eq!(xen.hvm_context(d).unwrap(), new_ctx);
    // Dom0 is PV: no HVM context.
    assert_eq!(errno(xen.hvm_context(0)), Errno::EINVAL);
}

#[test]
fn params_and_vcpu_contexts() {
    let xen = MemXen::new();
    let d = xen
        .create_domain(DomainConfig::hvm(8).with_vcpus(2))
        .unwrap();
    assert_eq!(xen.hvm_param(d, 1).unwrap(), 0, "unset params read 0");
    xen.set_hvm_param(d, 1, 0xdead).unwrap();
    xen.set_hvm_param(d, 2, 7).unwrap();
    assert_eq!(xen.hvm_param(d, 1).unwrap(), 0xdead);
    assert_eq!(xen.hvm_param(d, 2).unwrap(), 7);
    assert_eq!(errno(xen.hvm_param(d, 1000)), Errno::EINVAL);
    assert_eq!(errno(xen.set_hvm_param(d, 1000, 1)), Errno::EINVAL);

    let v1 = xen.vcpu_context(d, 1).unwrap();
    assert_eq!(&v1[..4], &1u32.to_le_bytes());
    xen.guest(d).set_vcpu_context(0, b"registers").unwrap();
    assert_eq!(xen.vcpu_context(d, 0).unwrap(), b"registers");
    assert_eq!(errno(xen.vcpu_context(d, 2)), Errno::EINVAL);
}

#[test]
fn copy_out_equals_what_the_guest_wrote() {
    let xen = MemXen::new();
    let d = xen.create_domain(DomainConfig::hvm(16)).unwrap();
    let guest = xen.guest(d);
    guest.fill_page(3, 0x33).unwrap();
    guest.fill_page(9, 0x99).unwrap();
    guest.write(9, 100, b"hello").unwrap();

    let pfns = [9, 3, 0, 9];
    let mut buf = vec![0xFFu8; pfns.len() * PAGE_SIZE];
    xen.read_pages(d, &pfns, &mut buf).unwrap();
    let pages: Vec<&[u8]> = buf.chunks(PAGE_SIZE).collect();
    assert_eq!(pages[0], &guest.read_page(9).unwrap()[..]);
    assert_eq!(&pages[0][100..105], b"hello");
    assert_eq!(pages[1], &page_of(0x33)[..]);
    assert_eq!(pages[2], &page_of(0)[..], "never written: zero");
    assert_eq!(pages[3], pages[0]);

    let mut one = [0u8; PAGE_SIZE];
    xen.read_page(d, 3, &mut one).unwrap();
    assert_eq!(one, page_of(0x33));
}

#[test]
fn batch_reads_check_sizes_and_report_bad_pages() {
    let xen = MemXen::new();
    let d = xen
        .create_domain(DomainConfig::hvm(8).with_holes(&[2]))
        .unwrap();
    let guest = xen.guest(d);
    guest.fill_page(1, 1).unwrap();
    guest.fill_page(3, 3).unwrap();

    let mut short = vec![0xEEu8; PAGE_SIZE];
    assert_eq!(
        xen.read_pages(d, &[1, 3], &mut short).unwrap_err(),
        HypervisorError::BufferSize {
            op: Method::ReadPages,
            expected: 2 * PAGE_SIZE,
            actual: PAGE_SIZE
        }
    );
    assert!(short.iter().all(|b| *b == 0xEE), "nothing copied");

    let mut buf = vec![0xEEu8; 4 * PAGE_SIZE];
    let err = xen.read_pages(d, &[1, 2, 3, 100], &mut buf).unwrap_err();
    match &err {
        HypervisorError::Pages {
            op,
            domid,
            failures,
        } => {
            assert_eq!((*op, *domid), (Method::ReadPages, d));
            assert_eq!(failures, &vec![(2, Errno::ENOENT), (100, Errno::ENOENT)]);
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(err.to_string().contains("2 of the pages failed"), "{err}");
    assert_eq!(&buf[..PAGE_SIZE], &page_of(1)[..], "good pages are copied");
    assert_eq!(
        &buf[PAGE_SIZE..2 * PAGE_SIZE],
        &page_of(0)[..],
        "bad slot zeroed"
    );
    assert_eq!(&buf[2 * PAGE_SIZE..3 * PAGE_SIZE], &page_of(3)[..]);
    assert_eq!(errno(xen.read_pages(77, &[], &mut [])), Errno::ESRCH);
}

#[test]
fn toolstack_writes_land_in_the_guest_but_are_not_dirty() {
    let xen = MemXen::new();
    let d = xen.create_domain(DomainConfig::hvm(8)).unwrap();
    xen.log_dirty_enable(d).unwrap();
    let mut data = vec![0u8; 2 * PAGE_SIZE];
    data[..PAGE_SIZE].fill(0x11);
    data[PAGE_SIZE..].fill(0x22);
    xen.pause(d).unwrap();
    xen.write_pages(d, &[4, 5], &data).unwrap();
    xen.write_page(d, 6, &page_of(0x66)).unwrap();
    xen.unpause(d).unwrap();
    let guest = xen.guest(d);
    assert_eq!(*guest.read_page(4).unwrap(), page_of(0x11));
    assert_eq!(*guest.read_page(5).unwrap(), page_of(0x22));
    assert_eq!(*guest.read_page(6).unwrap(), page_of(0x66));
    let mut bitmap = DirtyBitmap::new(8);
    xen.log_dirty_peek(d, &mut bitmap).unwrap();
    assert!(bitmap.is_clean(), "foreign writes are not logged");
    assert!(matches!(
        xen.write_pages(d, &[4, 8], &data).unwrap_err(),
        HypervisorError::Pages { ref failures, .. } if failures == &vec![(8, Errno::ENOENT)]
    ));
}

#[test]
fn log_dirty_enable_rules() {
    let xen = MemXen::new();
    let d = xen.create_domain(DomainConfig::hvm(8)).unwrap();
    let mut bitmap = DirtyBitmap::new(8);
    assert_eq!(
        errno(xen.log_dirty_clean(d, &mut bitmap)),
        Errno::EINVAL,
        "not enabled"
    );
    xen.log_dirty_enable(d).unwrap();
    assert_eq!(xen.log_dirty_enabled(d), Some(true));
    assert_eq!(
        errno(xen.log_dirty_enable(d)),
        Errno::EINVAL,
        "already enabled"
    );
    xen.log_dirty_disable(d).unwrap();
    xen.log_dirty_disable(d).unwrap();
    assert_eq!(errno(xen.log_dirty_peek(d, &mut bitmap)), Errno::EINVAL);
    assert_eq!(
        errno(xen.log_dirty_enable(0)),
        Errno::EINVAL,
        "PV dom0 has no log-dirty"
    );
}

#[test]
fn writes_mark_clean_resets_peek_does_not() {
    let xen = MemXen::new();
    let d = xen.create_domain(DomainConfig::hvm(200)).unwrap();
    let guest = xen.guest(d);
    guest.fill_page(5, 1).unwrap(); // before enabling: not logged
    xen.log_dirty_enable(d).unwrap();
    let mut bitmap = DirtyBitmap::new(200);
    xen.log_dirty_peek(d, &mut bitmap).unwrap();
    assert!(bitmap.is_clean(), "log-dirty starts clean");

    for pfn in [7, 64, 199, 7] {
        guest.write(pfn, 0, &[1]).unwrap();
    }
    let stats = xen.log_dirty_peek(d, &mut bitmap).unwrap();
    assert_eq!(bitmap.iter().collect::<Vec<_>>(), vec![7, 64, 199]);
    assert_eq!(stats.dirty_count, 3);
    // Peek again: still there.
    xen.log_dirty_peek(d, &mut bitmap).unwrap();
    assert_eq!(bitmap.count(), 3);

    let stats = xen.log_dirty_clean(d, &mut bitmap).unwrap();
    assert_eq!(bitmap.iter().collect::<Vec<_>>(), vec![7, 64, 199]);
    assert_eq!(stats.dirty_count, 3);
    xen.log_dirty_clean(d, &mut bitmap).unwrap();
    assert!(bitmap.is_clean(), "clean reset the log");

    guest.write(8, 0, &[2]).unwrap();
    xen.log_dirty_clean(d, &mut bitmap).unwrap();
    assert_eq!(bitmap.iter().collect::<Vec<_>>(), vec![8]);
}

#[test]
fn clean_leaves_pages_beyond_the_bitmap_dirty() {
    let xen = MemXen::new();
    let d = xen.create_domain(DomainConfig::hvm(100)).unwrap();
    let guest = xen.guest(d);
    xen.log_dirty_enable(d).unwrap();
    guest.write(3, 0, &[1]).unwrap();
    guest.write(90, 0, &[1]).unwrap();
    let mut small = DirtyBitmap::new(50);
    xen.log_dirty_clean(d, &mut small).unwrap();
    assert_eq!(small.iter().collect::<Vec<_>>(), vec![3]);
    let mut full = DirtyBitmap::new(100);
    xen.log_dirty_clean(d, &mut full).unwrap();
    assert_eq!(full.iter().collect::<Vec<_>>(), vec![90]);
}

/// A checkpoint as the daemon takes it: pause, harvest, copy, unpause. The copy must equal the
/// guest's memory at the pause, whatever the guest writes afterwards.
#[test]
fn checkpoint_copies_a_consistent_image() {
    let xen = MemXen::new();
    let d = xen.create_domain(DomainConfig::hvm(32)).unwrap();
    let guest = xen.guest(d);
    let faults = xen.faults();
    let n = xen.maximum_gpfn(d).unwrap() + 1;
    xen.log_dirty_enable(d).unwrap();
    let mut bitmap = DirtyBitmap::new(n);
    for (epoch, pfns) in [[1u64, 2], [2, 30]].iter().enumerate() {
        for pfn in pfns {
            guest.fill_page(*pfn, epoch as u8 + 1).unwrap();
        }
        faults.reset_calls();
        xen.pause(d).unwrap();
        assert!(guest.fill_page(0, 0xFF).is_err(), "the guest is stopped");
        xen.log_dirty_clean(d, &mut bitmap).unwrap();
        let dirty: Vec<u64> = bitmap.iter().collect();
        assert_eq!(dirty, pfns.to_vec());
        let mut copy = vec![0u8; dirty.len() * PAGE_SIZE];
        xen.read_pages(d, &dirty, &mut copy).unwrap();
        xen.unpause(d).unwrap();
        for (i, pfn) in dirty.iter().enumerate() {
            assert_eq!(
                &copy[i * PAGE_SIZE..(i + 1) * PAGE_SIZE],
                &guest.read_page(*pfn).unwrap()[..]
            );
        }
        assert_eq!(
            faults.method_sequence(),
            vec![
                Method::Pause,
                Method::LogDirtyClean,
                Method::ReadPages,
                Method::Unpause
            ]
        );
    }
    assert_eq!(xen.unpaused_snapshots(d), Some(0));
}

#[test]
fn snapshots_of_a_running_domain_are_counted() {
    let xen = MemXen::new();
    let d = xen.create_domain(DomainConfig::hvm(8)).unwrap();
    xen.log_dirty_enable(d).unwrap();
    let mut bitmap = DirtyBitmap::new(8);
    let mut page = [0u8; PAGE_SIZE];
    // A checkpoint that forgot to pause.
    xen.log_dirty_clean(d, &mut bitmap).unwrap();
    xen.read_page(d, 1, &mut page).unwrap();
    xen.hvm_context(d).unwrap();
    assert_eq!(xen.unpaused_snapshots(d), Some(3));
    // The same calls while paused are fine; so is reading a crashed (stopped) guest.
    xen.pause(d).unwrap();
    xen.log_dirty_clean(d, &mut bitmap).unwrap();
    xen.read_page(d, 1, &mut page).unwrap();
    xen.vcpu_context(d, 0).unwrap();
    xen.unpause(d).unwrap();
    xen.guest(d).shutdown(ShutdownReason::Crash).unwrap();
    xen.read_page(d, 1, &mut page).unwrap();
    assert_eq!(xen.unpaused_snapshots(d), Some(3));
    assert_eq!(xen.unpaused_snapshots(99), None);
}

#[test]
fn pause_guard_unpauses_exactly_once() {
    use hypervisor::PauseGuard;
    let xen = MemXen::new();
    let d = xen.create_domain(DomainConfig::hvm(8)).unwrap();
    let faults = xen.faults();

    // Explicit unpause.
    let guard = PauseGuard::pause(&xen, d).unwrap();
    assert_eq!((guard.domid(), xen.pause_count(d)), (d, Some(1)));
    guard.unpause().unwrap();
    assert_eq!(xen.pause_count(d), Some(0));

    // Early exit: the drop unpauses.
    let early = |xen: &MemXen| -> Result<(), HypervisorError> {
        let _guard = PauseGuard::pause(xen, d)?;
        xen.hvm_context_partial(d, 99, 0)?; // fails with ENOENT
        Ok(())
    };
    assert_eq!(errno(early(&xen)), Errno::ENOENT);
    assert_eq!(xen.pause_count(d), Some(0));
    assert_eq!(faults.calls(Method::Unpause), 2);

    // Through a trait object, and a failed pause holds nothing.
    let dc: &dyn DomainControl = &xen;
    faults.fail_next(Method::Pause, Errno::EIO);
    assert_eq!(errno(PauseGuard::pause(dc, d)), Errno::EIO);
    assert_eq!(faults.calls(Method::Unpause), 2, "nothing to give back");

    // A failing explicit unpause is reported.
    let guard = PauseGuard::pause(dc, d).unwrap();
    faults.fail_next(Method::Unpause, Errno::EBUSY);
    assert_eq!(errno(guard.unpause()), Errno::EBUSY);
    assert_eq!(faults.calls(Method::Unpause), 3, "not retried by a drop");
}

#[test]
fn resume_only_after_a_suspend() {
    let xen = MemXen::new();
    let d = xen.create_domain(DomainConfig::hvm(8)).unwrap();
    // Running, or shut down for another reason: EINVAL, nothing changes.
    assert_eq!(errno(xen.resume(d, true)), Errno::EINVAL);
    xen.guest(d).shutdown(ShutdownReason::Suspend).unwrap();
    assert!(!xen.domain_info(d).unwrap().running);
    xen.resume(d, true).unwrap();
    let info = xen.domain_info(d).unwrap();
    assert_eq!(info.shutdown, None);
    assert!(info.running);
    assert_eq!(xen.resume_counts(d), Some((1, 1)));
    assert_eq!(errno(xen.resume(d, true)), Errno::EINVAL);
    xen.guest(d).shutdown(ShutdownReason::Suspend).unwrap();
    xen.resume(d, false).unwrap();
    assert_eq!(xen.resume_counts(d), Some((2, 1)));
    xen.guest(d).shutdown(ShutdownReason::Crash).unwrap();
    assert_eq!(errno(xen.resume(d, true)), Errno::EINVAL);
    assert_eq!(errno(xen.resume(99, true)), Errno::ESRCH);
}
