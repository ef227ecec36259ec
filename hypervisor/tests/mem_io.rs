//! In-memory host: event channels and grant tables, as a backend uses them.

use std::os::fd::BorrowedFd;
use std::time::Duration;

use hypervisor::mem::{DomainConfig, GuestError, MemXen};
use hypervisor::{
    DirtyBitmap, Errno, EventChannelControl, EventChannels, EvtchnState, GrantTables, Hypervisor,
    HypervisorError, LogDirty, Method, PAGE_SIZE,
};

fn readable(fd: BorrowedFd<'_>) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    let n = poll(&mut fds, PollTimeout::ZERO).expect("poll");
    n == 1
        && fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLIN))
}

fn errno<T>(r: Result<T, HypervisorError>) -> Errno {
    match r {
        Ok(_) => panic!("the call should fail"),
        Err(e) => e.errno().expect("error with errno"),
    }
}

/// A guest with a frontend port waiting for dom0, and the backend's handle bound to it.
fn connected() -> (MemXen, u16, u32, Box<dyn EventChannels>, u32) {
    let xen = MemXen::new();
    let d = xen
        .create_domain(DomainConfig::hvm(16))
        .expect("test setup");
    let guest_port = xen.guest(d).evtchn_alloc_unbound(0).expect("test setup");
    let evtchn = xen.open_event_channels().expect("test setup");
    let local = evtchn.bind_interdomain(d, guest_port).expect("test setup");
    (xen, d, guest_port, evtchn, local)
}

#[test]
fn binding_connects_both_ends() {
    let (xen, d, guest_port, _evtchn, local) = connected();
    assert_eq!(
        xen.evtchn_status(d, guest_port).unwrap().state,
        EvtchnState::Interdomain {
            remote_domid: 0,
            remote_port: local
        }
    );
    assert_eq!(
        xen.evtchn_status(0, local).unwrap().state,
        EvtchnState::Interdomain {
            remote_domid: d,
            remote_port: guest_port
        }
    );
    assert_eq!(
        xen.evtchn_status(d, 999).unwrap().state,
        EvtchnState::Closed
    );
}

#[test]
fn guest_kick_reaches_the_backend_masked_until_unmask() {
    let (xen, d, guest_port, evtchn, local) = connected();
    let guest = xen.guest(d);
    assert_eq!(evtchn.pending().unwrap(), None);
    assert!(!readable(evtchn.as_fd()));

    guest.evtchn_notify(guest_port).unwrap();
    assert!(readable(evtchn.as_fd()));
    assert_eq!(evtchn.pending().unwrap(), Some(local));
    assert!(!readable(evtchn.as_fd()));

    // Masked after delivery: further kicks are latched, not delivered...
    guest.evtchn_notify(guest_port).unwrap();
    guest.evtchn_notify(guest_port).unwrap();
    assert_eq!(evtchn.pending().unwrap(), None);
    // ...until unmask, which delivers them once.
    evtchn.unmask(local).unwrap();
    assert_eq!(evtchn.pending().unwrap(), Some(local));
    assert_eq!(evtchn.pending().unwrap(), None);
    // Unmask with nothing latched: the next kick is delivered directly.
    evtchn.unmask(local).unwrap();
    assert_eq!(evtchn.pending().unwrap(), None);
    guest.evtchn_notify(guest_port).unwrap();
    assert_eq!(evtchn.pending().unwrap(), Some(local));
}

#[test]
fn backend_notify_reaches_the_guest() {
    let (xen, d, guest_port, evtchn, local) = connected();
    let guest = xen.guest(d);
    assert!(guest.take_events().is_empty());
    evtchn.notify(local).unwrap();
    evtchn.notify(local).unwrap();
    assert_eq!(guest.take_events(), vec![guest_port]);
    assert!(guest.take_events().is_empty());
}

#[test]
fn wait_blocks_until_a_kick_or_the_timeout() {
    let (xen, d, guest_port, evtchn, local) = connected();
    assert_eq!(evtchn.wait(Some(Duration::from_millis(20))).unwrap(), None);
    let guest = xen.guest(d);
    let kicker = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(30));
        guest.evtchn_notify(guest_port).unwrap();
    });
    assert_eq!(evtchn.wait(None).unwrap(), Some(local));
    kicker.join().unwrap();
}

#[test]
fn binding_rules() {
    let xen = MemXen::new();
    let d = xen.create_domain(DomainConfig::hvm(4)).unwrap();
    let other = xen.create_domain(DomainConfig::hvm(4)).unwrap();
    let evtchn = xen.open_event_channels().unwrap();
    // A port waiting for another domain cannot be bound by dom0.
    let for_other = xen.guest(d).evtchn_alloc_unbound(other).unwrap();
    assert_eq!(
        evtchn.bind_interdomain(d, for_other).unwrap_err(),
        HypervisorError::Domain {
            op: Method::EvtchnBindInterdomain,
            domid: d,
            errno: Errno::EINVAL
        }
    );
    assert_eq!(errno(evtchn.bind_interdomain(d, 77)), Errno::EINVAL);
    assert_eq!(errno(evtchn.bind_interdomain(50, 1)), Errno::ESRCH);
    // Bound once: a second bind of the same port fails.
    let p = xen.guest(d).evtchn_alloc_unbound(0).unwrap();
    evtchn.bind_interdomain(d, p).unwrap();
    assert_eq!(errno(evtchn.bind_interdomain(d, p)), Errno::EINVAL);
    // The toolstack can allocate a port in the guest for dom0 to bind.
    let q = xen.evtchn_alloc_unbound(d, 0).unwrap();
    assert_eq!(
        xen.evtchn_status(d, q).unwrap().state,
        EvtchnState::Unbound { remote_domid: 0 }
    );
    evtchn.bind_interdomain(d, q).unwrap();
}

#[test]
fn ports_belong_to_their_handle_and_close_with_it() {
    let (xen, d, guest_port, evtchn, local) = connected();
    let other = xen.open_event_channels().unwrap();
    assert_eq!(
        other.notify(local).unwrap_err(),
        HypervisorError::Port {
            op: Method::EvtchnNotify,
            port: local,
            errno: Errno::EINVAL
        }
    );
    assert_eq!(errno(other.unbind(local)), Errno::EINVAL);
    assert_eq!(errno(other.unmask(local)), Errno::EINVAL);

    // A kick queued before unbind is dropped with the port.
    xen.guest(d).evtchn_notify(guest_port).unwrap();
    evtchn.unbind(local).unwrap();
    assert_eq!(evtchn.pending().unwrap(), None);
    assert!(!readable(evtchn.as_fd()));
    assert_eq!(
        xen.evtchn_status(d, guest_port).unwrap().state,
        EvtchnState::Unbound { remote_domid: 0 },
        "the guest end waits for dom0 again"
    );
    assert_eq!(errno(evtchn.notify(local)), Errno::EINVAL);
    // Rebind, then drop the handle: the port closes.
    let again = evtchn.bind_interdomain(d, guest_port).unwrap();
    drop(evtchn);
    assert_eq!(
        xen.evtchn_status(0, again).unwrap().state,
        EvtchnState::Closed
    );
    assert_eq!(
        xen.evtchn_status(d, guest_port).unwrap().state,
        EvtchnState::Unbound { remote_domid: 0 }
    );
}

#[test]
fn a_paused_guest_cannot_kick() {
    let (xen, d, guest_port, evtchn, _local) = connected();
    hypervisor::DomainControl::pause(&xen, d).unwrap();
    assert_eq!(
        xen.guest(d).evtchn_notify(guest_port),
        Err(GuestError::NotRunning {
            domid: d,
            why: "paused"
        })
    );
    assert_eq!(evtchn.pending().unwrap(), None);
}

#[test]
fn destroying_the_guest_unbinds_the_backend_end() {
    let (xen, d, _guest_port, evtchn, local) = connected();
    xen.destroy_domain(d).unwrap();
    assert_eq!(
        xen.evtchn_status(0, local).unwrap().state,
        EvtchnState::Unbound { remote_domid: d }
    );
    // Notifying an unbound port is silently dropped, as in Xen.
    evtchn.notify(local).unwrap();
}

#[test]
fn grant_mapping_shares_the_guest_page() {
    let xen = MemXen::new();
    let d = xen.create_domain(DomainConfig::hvm(16)).unwrap();
    let guest = xen.guest(d);
    guest.write(5, 0, b"request").unwrap();
    let gref = guest.grant_access(0, 5, false).unwrap();
    let map = xen.map_grant_refs(d, &[gref], true).unwrap();
    assert_eq!(
        (map.len(), map.domid(), map.writable()),
        (PAGE_SIZE, d, true)
    );
    let mut buf = [0u8; 7];
    map.read(0, &mut buf).unwrap();
    assert_eq!(&buf, b"request");

    map.write(100, b"response").unwrap();
    let mut seen = [0u8; 8];
    guest.read(5, 100, &mut seen).unwrap();
    assert_eq!(&seen, b"response");

    // Ring-style accessors: little-endian, aligned, seen by the guest and back.
    map.write_u32(0x40, 0xAABB_CCDD).unwrap();
    let mut raw = [0u8; 4];
    guest.read(5, 0x40, &mut raw).unwrap();
    assert_eq!(raw, 0xAABB_CCDDu32.to_le_bytes());
    guest.write(5, 0x44, &7u16.to_le_bytes()).unwrap();
    assert_eq!(map.read_u16(0x44).unwrap(), 7);
    map.write_u64(0x48, u64::MAX - 1).unwrap();
    assert_eq!(map.read_u64(0x48).unwrap(), u64::MAX - 1);
    map.write_u8(0x58, 0xEE).unwrap();
    assert_eq!(map.read_u8(0x58).unwrap(), 0xEE);
    assert_eq!(
        map.read_u8(0x40).unwrap(),
        0xDD,
        "lowest byte of the u32 first"
    );
    map.write_u16(0x50, 0x1234).unwrap();
    assert_eq!(map.read_u32(0x50).unwrap(), 0x1234);

    // Bounds and alignment.
    assert_eq!(
        map.read_u32(PAGE_SIZE).unwrap_err(),
        HypervisorError::OutOfBounds {
            op: Method::GrantAccess,
            offset: PAGE_SIZE,
            len: 4,
            size: PAGE_SIZE
        }
    );
    assert!(matches!(
        map.read(PAGE_SIZE - 2, &mut [0u8; 3]),
        Err(HypervisorError::OutOfBounds { .. })
    ));
    assert!(matches!(
        map.write(usize::MAX, b"x"),
        Err(HypervisorError::OutOfBounds { .. })
    ));
    assert_eq!(
        map.read_u32(2).unwrap_err(),
        HypervisorError::Misaligned {
            op: Method::GrantAccess,
            offset: 2,
            len: 4
        }
    );
    assert!(matches!(
        map.write_u16(1, 0),
        Err(HypervisorError::Misaligned { .. })
    ));
}

#[test]
fn multi_page_mappings_copy_across_page_boundaries() {
    let xen = MemXen::new();
    let d = xen.create_domain(DomainConfig::hvm(16)).unwrap();
    let guest = xen.guest(d);
    guest.fill_page(9, 0x99).unwrap();
    guest.fill_page(2, 0x22).unwrap();
    let refs = [
        guest.grant_access(0, 9, false).unwrap(),
        guest.grant_access(0, 2, false).unwrap(),
    ];
    let map = xen.map_grant_refs(d, &refs, true).unwrap();
    assert_eq!(map.len(), 2 * PAGE_SIZE);
    let mut across = [0u8; 4];
    map.read(PAGE_SIZE - 2, &mut across).unwrap();
    assert_eq!(
        across,
        [0x99, 0x99, 0x22, 0x22],
        "page order follows the refs"
    );
    map.write(PAGE_SIZE - 1, &[1, 2]).unwrap();
    let mut end = [0u8; 1];
    guest.read(9, PAGE_SIZE - 1, &mut end).unwrap();
    assert_eq!(end, [1]);
    guest.read(2, 0, &mut end).unwrap();
    assert_eq!(end, [2]);
}

#[test]
fn mapping_what_was_not_granted_fails_like_xen() {
    let xen = MemXen::new();
    let d = xen.create_domain(DomainConfig::hvm(16)).unwrap();
    let other = xen.create_domain(DomainConfig::hvm(16)).unwrap();
    let guest = xen.guest(d);
    let good = guest.grant_access(0, 1, false).unwrap();
    let to_other = guest.grant_access(other, 2, false).unwrap();
    let readonly = guest.grant_access(0, 3, true).unwrap();

    assert_eq!(
        xen.map_grant_refs(d, &[good, 4242], true).unwrap_err(),
        HypervisorError::Grant {
            op: Method::GnttabMap,
            domid: d,
            gref: 4242,
            errno: Errno::EINVAL
        }
    );
    assert_eq!(xen.grant_map_count(d), 0, "all or nothing");
    assert_eq!(
        errno(xen.map_grant_refs(d, &[to_other], false)),
        Errno::EINVAL
    );
    assert_eq!(
        errno(xen.map_grant_refs(d, &[readonly], true)),
        Errno::EACCES
    );
    assert_eq!(errno(xen.map_grant_refs(d, &[], false)), Errno::EINVAL);
    assert_eq!(errno(xen.map_grant_refs(99, &[good], false)), Errno::ESRCH);
    assert!(matches!(
        guest.grant_access(0, 100, false),
        Err(GuestError::Unpopulated { pfn: 100, .. })
    ));

    // A read-only mapping of a read-only grant works but refuses writes.
    let ro = xen.map_grant_refs(d, &[readonly], false).unwrap();
    assert_eq!(ro.read_u32(0).unwrap(), 0);
    assert_eq!(errno(ro.write_u32(0, 1)), Errno::EACCES);
    assert_eq!(errno(ro.write(0, b"x")), Errno::EACCES);
    let mut page = [0u8; 1];
    guest.read(3, 0, &mut page).unwrap();
    assert_eq!(page, [0], "nothing written");
}

#[test]
fn grants_cannot_be_revoked_while_mapped() {
    let xen = MemXen::new();
    let d = xen.create_domain(DomainConfig::hvm(16)).unwrap();
    let guest = xen.guest(d);
    let gref = guest.grant_access(0, 1, false).unwrap();
    let map = xen.map_grant_refs(d, &[gref], false).unwrap();
    let map2 = xen.map_grant_refs(d, &[gref], false).unwrap();
    assert_eq!(xen.grant_map_count(d), 2);
    assert_eq!(
        guest.end_access(gref),
        Err(GuestError::GrantInUse {
            domid: d,
            gref,
            count: 2
        })
    );
    drop(map);
    drop(map2);
    assert_eq!(xen.grant_map_count(d), 0);
    guest.end_access(gref).unwrap();
    assert_eq!(errno(xen.map_grant_refs(d, &[gref], false)), Errno::EINVAL);
    assert_eq!(
        guest.end_access(gref),
        Err(GuestError::NoSuchGrant { domid: d, gref })
    );
}

#[test]
fn writable_unmap_marks_pages_dirty() {
    let xen = MemXen::new();
    let d = xen.create_domain(DomainConfig::hvm(16)).unwrap();
    let guest = xen.guest(d);
    xen.log_dirty_enable(d).unwrap();
    let rw = guest.grant_access(0, 4, false).unwrap();
    let ro = guest.grant_access(0, 6, true).unwrap();
    let mut bitmap = DirtyBitmap::new(16);

    let rw_map = xen.map_grant_refs(d, &[rw], true).unwrap();
    let ro_map = xen.map_grant_refs(d, &[ro], false).unwrap();
    rw_map.write_u32(0, 1).unwrap();
    xen.log_dirty_peek(d, &mut bitmap).unwrap();
    assert!(
        bitmap.is_clean(),
        "Xen marks grant pages dirty on unmap, not on write"
    );
    drop(ro_map);
    drop(rw_map);
    xen.log_dirty_clean(d, &mut bitmap).unwrap();
    assert_eq!(bitmap.iter().collect::<Vec<_>>(), vec![4]);
}

#[test]
fn mappings_outlive_their_domain() {
    let xen = MemXen::new();
    let d = xen.create_domain(DomainConfig::hvm(16)).unwrap();
    let guest = xen.guest(d);
    guest.write(1, 0, b"kept").unwrap();
    let gref = guest.grant_access(0, 1, false).unwrap();
    let map = xen.map_grant_refs(d, &[gref], true).unwrap();
    xen.destroy_domain(d).unwrap();
    let mut buf = [0u8; 4];
    map.read(0, &mut buf).unwrap();
    assert_eq!(&buf, b"kept");
    drop(map);
}
