//! Against the real hypervisor: run as root in a Xen 4.17 dom0 with
//!
//!     KEMARI_TEST_DOMID=<domid of a running HVM/PVH guest> \
//!         cargo test -p libxc-ffi --test dom0 -- --ignored --nocapture
//!
//! Without KEMARI_TEST_DOMID only the dom0-wide checks run; KEMARI_TEST_GUEST_TYPE=pvh|hvm
//! also checks the guest-type classification.  The test pauses the guest
//! briefly and turns log-dirty on and off again; use a scratch guest.

// A test crate: helpers outside #[test] functions may unwrap too (clippy.toml allows it
// only inside them).
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use libxc_ffi::consts::*;
use libxc_ffi::*;

fn guest() -> Option<u32> {
    std::env::var("KEMARI_TEST_DOMID")
        .ok()
        .map(|v| v.parse().expect("KEMARI_TEST_DOMID"))
}

#[test]
#[ignore = "needs root in a Xen 4.17 dom0"]
fn dom0_hypervisor_and_xenstore() {
    let xc = XenCtrl::open().expect("XenCtrl::open");
    println!("Xen {}{}", xc.version(), xc.extraversion().unwrap());
    let doms = xc.domain_list().unwrap();
    assert_eq!(doms[0].domid, 0);
    for d in &doms {
        println!(
            "dom {:>4} {} {:?} emu={:#x} hvm={} hap={} paused={} pages={} vcpus={:?}",
            d.domid,
            d.uuid(),
            d.guest_type,
            d.emulation_flags,
            d.hvm,
            d.hap,
            d.paused,
            d.nr_pages,
            d.max_vcpu_id
        );
    }
    let xs = XenStore::open().expect("XenStore::open");
    assert_eq!(xs.get_domain_path(0).unwrap(), "/local/domain/0");
    assert!(!xs.directory("/local/domain").unwrap().is_empty());

    let Some(domid) = guest() else {
        println!("KEMARI_TEST_DOMID not set: guest checks skipped");
        return;
    };
    let info = xc.domain_info(domid).unwrap();
    assert!(
        info.hvm && info.hap,
        "the test guest must be HVM/PVH with HAP"
    );

    // Pause / unpause.
    xc.pause(domid).unwrap();
    assert!(xc.domain_info(domid).unwrap().paused);
    // HVM context while paused.
    let ctx = xc.hvm_getcontext(domid).unwrap();
    assert!(ctx.len() > 8);
    let cpu = xc.hvm_cpu_context(domid, 0).unwrap();
    println!(
        "vcpu0 rip={:#x} cr3={:#x}, context {} bytes",
        cpu.rip,
        cpu.cr3,
        ctx.len()
    );
    xc.unpause(domid).unwrap();
    assert!(!xc.domain_info(domid).unwrap().paused);

    // Log-dirty: enable, let the guest run, clean, count.
    let pages = xc.maximum_gpfn(domid).unwrap() + 1;
    let mut buf = xc.dirty_bitmap_buffer(pages).unwrap();
    xc.logdirty_enable(domid).unwrap();
    xc.logdirty_clean(domid, &mut buf, false).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    xc.pause(domid).unwrap();
    let t = Instant::now();
    let stats = xc.logdirty_clean(domid, &mut buf, true).unwrap();
    let harvest = t.elapsed();
    xc.unpause(domid).unwrap();
    let bitmap = buf.to_bitmap();
    println!(
        "log-dirty: {} of {pages} pages dirty in 1 s (Xen says {}), harvest {harvest:?}",
        bitmap.count(),
        stats.dirty_count
    );
    assert_eq!(stats.pages, pages);
    xc.logdirty_off(domid).unwrap();

    // Map a guest page (the xenstore ring page) read-only and read it.
    let store_pfn = xc.hvm_param_get(domid, HVM_PARAM_STORE_PFN).unwrap();
    let fm = XenForeignMemory::open().unwrap();
    let page = fm.map_page(domid, store_pfn, false).unwrap();
    let mut head = [0u8; 16];
    page.read_into(0, &mut head).unwrap();
    println!("store page {store_pfn:#x}: {head:02x?}");

    // Event channels: a port in the guest for dom0, bound from dom0, seen as interdomain.
    let guest_port = xc.evtchn_alloc_unbound(domid, 0).unwrap();
    assert_eq!(
        xc.evtchn_status(domid, guest_port).unwrap().state,
        EvtchnState::Unbound { remote_domid: 0 }
    );
    let ev = XenEvtchn::open().unwrap();
    let local = ev.bind_interdomain(domid, guest_port).unwrap();
    assert_eq!(
        xc.evtchn_status(domid, guest_port).unwrap().state,
        EvtchnState::Interdomain {
            remote_domid: 0,
            remote_port: local
        }
    );
    // Xen marks the local end pending when it binds (so no notification is lost): take it.
    let first = ev.wait_pending(Some(Duration::from_secs(1))).unwrap();
    assert_eq!(first, Some(local));
    ev.unmask(local).unwrap();
    // A notify goes to the guest's end, not to us.
    ev.notify(local).unwrap();
    assert_eq!(
        ev.wait_pending(Some(Duration::from_millis(100))).unwrap(),
        None
    );
    ev.unbind(local).unwrap();
    println!("event channel: guest port {guest_port} <-> dom0 port {local}");

    // The guest's grant table frames as a resource.
    let gt_size = fm
        .resource_size(
            domid,
            XENMEM_resource_grant_table,
            XENMEM_resource_grant_table_id_shared,
        )
        .unwrap();
    let gt = fm
        .map_resource(
            domid,
            XENMEM_resource_grant_table,
            XENMEM_resource_grant_table_id_shared,
            0,
            1,
            false,
        )
        .unwrap();
    println!(
        "grant table: {gt_size} bytes, first entry flags {:#x}",
        gt.read_u16(0).unwrap()
    );

    // Copy pages out in a batch, including one beyond the guest's memory.
    let mut buf = vec![0u8; 2 * PAGE_SIZE];
    let failed = fm
        .read_pages(domid, &[store_pfn, pages + 0x10_0000], &mut buf)
        .unwrap();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].index, 1);

    // Xenstore transaction in dom0's own tree.
    let dir = "/local/domain/0/kemari-libxc-ffi-test";
    xs.transaction(|t| {
        t.write(&format!("{dir}/a"), b"1")?;
        t.write(&format!("{dir}/b"), b"2")
    })
    .unwrap();
    let mut kids = xs.directory(dir).unwrap();
    kids.sort();
    assert_eq!(kids, ["a", "b"]);
    xs.rm(dir).unwrap();

    // Xenstore: read the guest's name, watch it.
    let home = xs.get_domain_path(domid).unwrap();
    let name = xs.read_string(&format!("{home}/name")).unwrap();
    println!("guest name {name:?}");
    xs.watch(&format!("{home}/name"), "selftest").unwrap();
    let ev = xs.read_watch().unwrap();
    assert_eq!(ev.token, "selftest");
    xs.unwatch(&format!("{home}/name"), "selftest").unwrap();
}
