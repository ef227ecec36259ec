//! In-memory host: pages "Xen" writes through its own mappings are invisible to an ordinary
//! log-dirty harvest and reported by every final-round harvest.

use hypervisor::mem::{DomainConfig, MemXen};
use hypervisor::{DirtyBitmap, DomainControl, LogDirty, Method, PAGE_SIZE};

#[test]
fn xen_mapped_pages_appear_only_in_final_harvests() {
    let xen = MemXen::new();
    let dom = xen.create_domain(DomainConfig::hvm(64)).unwrap();
    let g = xen.guest(dom);
    xen.log_dirty_enable(dom).unwrap();
    xen.pause(dom).unwrap();
    // Event delivery to a paused guest: Xen writes its vcpu_info page.
    g.xen_write(7, 0, &[1]).unwrap();
    assert_eq!(g.read_page(7).unwrap()[0], 1);
    let mut b = DirtyBitmap::new(64);
    xen.log_dirty_clean(dom, &mut b).unwrap();
    assert!(b.is_clean(), "an ordinary clean does not see Xen's writes");
    xen.log_dirty_clean_final(dom, &mut b).unwrap();
    assert_eq!(b.iter().collect::<Vec<_>>(), vec![7]);
    // Still mapped by Xen: reported again by the next final harvest, not by an ordinary one.
    xen.log_dirty_clean(dom, &mut b).unwrap();
    assert!(b.is_clean());
    xen.unpause(dom).unwrap();
    g.write(3, 0, &[2; 8]).unwrap();
    xen.pause(dom).unwrap();
    xen.log_dirty_clean_final(dom, &mut b).unwrap();
    assert_eq!(b.iter().collect::<Vec<_>>(), vec![3, 7]);
    assert!(g.xen_write(64, 0, &[1]).is_err(), "not populated");
    assert!(
        g.xen_write(1, PAGE_SIZE - 1, &[1, 2]).is_err(),
        "outside the page"
    );
    // The final clean is the same hypercall: fault-injected and logged as logdirty_clean.
    xen.faults()
        .fail_next(Method::LogDirtyClean, hypervisor::Errno::EIO);
    assert!(xen.log_dirty_clean_final(dom, &mut b).is_err());
}

/// The device model writes a paused guest's memory (an emulated transfer completing) and the
/// write is logged dirty, unlike a guest write, which a pause refuses.
#[test]
fn device_model_writes_a_paused_guest_and_is_logged_dirty() {
    let xen = MemXen::new();
    let dom = xen.create_domain(DomainConfig::hvm(64)).unwrap();
    let g = xen.guest(dom);
    xen.log_dirty_enable(dom).unwrap();
    xen.pause(dom).unwrap();
    assert!(g.write(5, 0, &[1]).is_err(), "a paused guest cannot write");
    g.dm_write(5, 16, &[9, 9]).unwrap();
    assert_eq!(g.read_page(5).unwrap()[16..18], [9, 9]);
    let mut b = DirtyBitmap::new(64);
    xen.log_dirty_clean(dom, &mut b).unwrap();
    assert_eq!(b.iter().collect::<Vec<_>>(), vec![5]);
    xen.log_dirty_clean(dom, &mut b).unwrap();
    assert!(b.is_clean(), "reported once, unlike Xen's own mappings");
    assert!(g.dm_write(64, 0, &[1]).is_err(), "not populated");
    assert!(
        g.dm_write(1, PAGE_SIZE - 1, &[1, 2]).is_err(),
        "outside the page"
    );
}
