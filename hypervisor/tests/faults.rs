//! Fault injection: every method of the in-memory implementation can be failed, the failure
//! has no side effect, and calls are counted and logged.

use std::time::Duration;

use hypervisor::mem::{DomainConfig, FaultPlan, MemXen, Target, Trigger};
use hypervisor::{
    DirtyBitmap, DomId, DomainControl, Errno, EventChannelControl, EventChannels, GrantRef,
    GrantTables, GuestMemory, Hypervisor, HypervisorError, LogDirty, Method, Port, Tx, XenStore,
    PAGE_SIZE,
};

struct Fixture {
    xen: MemXen,
    d: DomId,
    evtchn: Box<dyn EventChannels>,
    local: Port,
    gref: GrantRef,
    xs: Box<dyn XenStore>,
}

fn fixture() -> Fixture {
    let xen = MemXen::new();
    let d = xen
        .create_domain(DomainConfig::hvm(16).with_vcpus(2))
        .expect("test setup");
    let guest = xen.guest(d);
    xen.log_dirty_enable(d).expect("test setup");
    let port = guest.evtchn_alloc_unbound(0).expect("test setup");
    let evtchn = xen.open_event_channels().expect("test setup");
    let local = evtchn.bind_interdomain(d, port).expect("test setup");
    let gref = guest.grant_access(0, 1, false).expect("test setup");
    let xs = xen.open_xenstore().expect("test setup");
    xs.write(Tx::NONE, "/node", b"v").expect("test setup");
    Fixture {
        xen,
        d,
        evtchn,
        local,
        gref,
        xs,
    }
}

/// Makes one call of `method` (after any setup it needs, which uses other methods).
/// `None` for the methods that are not fault-injected.
fn exercise(fx: &Fixture, method: Method) -> Option<Result<(), HypervisorError>> {
    let (xen, d) = (&fx.xen, fx.d);
    let mut page = [0u8; PAGE_SIZE];
    let mut bitmap = DirtyBitmap::new(16);
    let r = match method {
        Method::ListDomains => xen.list_domains().map(drop),
        Method::DomainInfo => xen.domain_info(d).map(drop),
        Method::Pause => xen.pause(d),
        Method::Unpause => {
            xen.pause(d).expect("test setup");
            xen.unpause(d)
        }
        Method::Resume => {
            xen.guest(d)
                .shutdown(hypervisor::ShutdownReason::Suspend)
                .expect("test setup");
            let r = xen.resume(d, true);
            if r.is_err() {
                // Leave the fixture running for the next method.
                xen.resume(d, true).expect("test setup");
            }
            r
        }
        Method::HvmContext => xen.hvm_context(d).map(drop),
        Method::SetHvmContext => {
            let ctx = xen.hvm_context(d).expect("test setup");
            xen.set_hvm_context(d, &ctx)
        }
        Method::HvmContextPartial => xen.hvm_context_partial(d, 2, 1).map(drop),
        Method::VcpuContext => xen.vcpu_context(d, 1).map(drop),
        Method::HvmParam => xen.hvm_param(d, 3).map(drop),
        Method::SetHvmParam => xen.set_hvm_param(d, 3, 1),
        Method::MaximumGpfn => xen.maximum_gpfn(d).map(drop),
        Method::ReadPages => xen.read_page(d, 1, &mut page),
        Method::WritePages => xen.write_page(d, 1, &page),
        Method::LogDirtyEnable => {
            xen.log_dirty_disable(d).expect("test setup");
            xen.log_dirty_enable(d)
        }
        Method::LogDirtyClean => xen.log_dirty_clean(d, &mut bitmap).map(drop),
        Method::LogDirtyPeek => xen.log_dirty_peek(d, &mut bitmap).map(drop),
        Method::LogDirtyDisable => xen.log_dirty_disable(d),
        Method::EvtchnOpen => xen.open_event_channels().map(drop),
        Method::EvtchnBindInterdomain => {
            let p = xen.guest(d).evtchn_alloc_unbound(0).expect("test setup");
            fx.evtchn.bind_interdomain(d, p).map(drop)
        }
        Method::EvtchnUnbind => fx.evtchn.unbind(fx.local),
        Method::EvtchnNotify => fx.evtchn.notify(fx.local),
        Method::EvtchnPending => fx.evtchn.pending().map(drop),
        Method::EvtchnUnmask => fx.evtchn.unmask(fx.local),
        Method::EvtchnAllocUnbound => xen.evtchn_alloc_unbound(d, 0).map(drop),
        Method::EvtchnStatus => xen.evtchn_status(d, 1).map(drop),
        Method::GnttabMap => xen.map_grant_refs(d, &[fx.gref], true).map(drop),
        Method::GrantAccess => return None,
        // methods of the real XenHost only (not in the in-memory Xen)
        Method::SharedInfoFrame | Method::AddToPhysmap => return None,
        Method::XsOpen => xen.open_xenstore().map(drop),
        Method::XsRead => fx.xs.read(Tx::NONE, "/node").map(drop),
        Method::XsWrite => fx.xs.write(Tx::NONE, "/node", b"w"),
        Method::XsMkdir => fx.xs.mkdir(Tx::NONE, "/dir"),
        Method::XsRm => fx.xs.rm(Tx::NONE, "/node"),
        Method::XsDirectory => fx.xs.directory(Tx::NONE, "/").map(drop),
        Method::XsGetPermissions => fx.xs.get_permissions(Tx::NONE, "/node").map(drop),
        Method::XsSetPermissions => fx.xs.set_permissions(
            Tx::NONE,
            "/node",
            &[hypervisor::XsPerm::new(0, hypervisor::XsPermKind::Read)],
        ),
        Method::XsTransactionStart => fx.xs.transaction_start().map(drop),
        Method::XsTransactionEnd => {
            let tx = fx.xs.transaction_start().expect("test setup");
            fx.xs.transaction_end(tx, false)
        }
        Method::XsWatch => fx.xs.watch("/node", "t"),
        Method::XsUnwatch => {
            fx.xs.watch("/w", "t").expect("test setup");
            fx.xs.unwatch("/w", "t")
        }
        Method::XsReadWatch => fx.xs.read_watch(Some(Duration::ZERO)).map(drop),
        Method::XsGetDomainPath => fx.xs.get_domain_path(d).map(drop),
    };
    Some(r)
}

#[test]
fn every_method_can_be_failed_and_reports_itself() {
    let mut injected = 0;
    for &method in Method::ALL {
        // Without a rule the call succeeds...
        let fx = fixture();
        let Some(ok) = exercise(&fx, method) else {
            continue;
        };
        assert!(ok.is_ok(), "{method}: {ok:?}");
        assert!(
            fx.xen.faults().calls(method) >= 1,
            "{method} consults the plan"
        );
        // ...with one it fails with the errno asked for, naming the method.
        let fx = fixture();
        fx.xen.faults().fail_next(method, Errno::ENOSPC);
        let err = exercise(&fx, method)
            .unwrap()
            .expect_err("the injected failure");
        assert_eq!(err.op(), method, "{err}");
        assert_eq!(err.errno(), Some(Errno::ENOSPC), "{method}: {err}");
        assert_eq!(fx.xen.faults().injected(method), 1);
        injected += 1;
    }
    assert_eq!(
        injected,
        Method::ALL.len() - 3,
        "all but grant_access and the two XenHost-only methods"
    );
}

#[test]
fn grant_accesses_are_never_injected() {
    let fx = fixture();
    fx.xen.faults().fail_always(Method::GrantAccess);
    let map = fx.xen.map_grant_refs(fx.d, &[fx.gref], true).unwrap();
    map.write_u32(0, 5).unwrap();
    assert_eq!(map.read_u32(0).unwrap(), 5);
}

#[test]
fn method_names_are_stable_and_parse_back() {
    assert_eq!(Method::Pause.name(), "pause");
    assert_eq!(Method::LogDirtyClean.to_string(), "logdirty_clean");
    for &m in Method::ALL {
        assert_eq!(m.name().parse::<Method>().unwrap(), m);
    }
    let names: std::collections::HashSet<_> = Method::ALL.iter().map(|m| m.name()).collect();
    assert_eq!(names.len(), Method::ALL.len(), "names are unique");
    assert!("paws".parse::<Method>().is_err());
}

/// One checkpoint the way the daemon must take it: any failure after the pause unpauses.
fn checkpoint(xen: &MemXen, d: DomId, bitmap: &mut DirtyBitmap) -> Result<usize, HypervisorError> {
    xen.pause(d)?;
    let result = (|| {
        xen.log_dirty_clean(d, bitmap)?;
        let pfns: Vec<u64> = bitmap.iter().collect();
        let mut buf = vec![0u8; pfns.len() * PAGE_SIZE];
        xen.read_pages(d, &pfns, &mut buf)?;
        Ok(pfns.len())
    })();
    let unpaused = xen.unpause(d);
    let n = result?;
    unpaused?;
    Ok(n)
}

#[test]
fn the_third_pause_fails_and_only_it() {
    let xen = MemXen::new();
    let d = xen.create_domain(DomainConfig::hvm(8)).unwrap();
    xen.log_dirty_enable(d).unwrap();
    let faults = xen.faults();
    faults.fail_on(Method::Pause, 3, Errno::EIO);
    let mut bitmap = DirtyBitmap::new(8);
    let guest = xen.guest(d);
    let mut outcomes = Vec::new();
    for i in 0..5u8 {
        guest.fill_page(u64::from(i), i).unwrap();
        outcomes.push(checkpoint(&xen, d, &mut bitmap).map_err(|e| e.errno()));
    }
    assert_eq!(
        outcomes,
        vec![Ok(1), Ok(1), Err(Some(Errno::EIO)), Ok(2), Ok(1)],
        "the failed epoch's page is caught by the next checkpoint"
    );
    assert_eq!(xen.pause_count(d), Some(0));
    assert_eq!(faults.calls(Method::Pause), 5);
    assert_eq!(faults.calls(Method::Unpause), 4);
}

#[test]
fn a_failing_clean_keeps_the_dirty_log_and_the_guest_runs_again() {
    let xen = MemXen::new();
    let d = xen.create_domain(DomainConfig::hvm(8)).unwrap();
    xen.log_dirty_enable(d).unwrap();
    let faults = xen.faults();
    faults.fail_always(Method::LogDirtyClean);
    xen.guest(d).fill_page(2, 1).unwrap();
    let mut bitmap = DirtyBitmap::new(8);
    for _ in 0..3 {
        assert_eq!(
            checkpoint(&xen, d, &mut bitmap).unwrap_err(),
            HypervisorError::Domain {
                op: Method::LogDirtyClean,
                domid: d,
                errno: Errno::EIO
            }
        );
    }
    assert_eq!(xen.pause_count(d), Some(0));
    xen.log_dirty_peek(d, &mut bitmap).unwrap();
    assert_eq!(
        bitmap.iter().collect::<Vec<_>>(),
        vec![2],
        "nothing was reset"
    );
    faults.clear(Method::LogDirtyClean);
    assert_eq!(checkpoint(&xen, d, &mut bitmap).unwrap(), 1);
    assert_eq!(faults.injected(Method::LogDirtyClean), 3);
}

#[test]
fn fail_after_and_ranges() {
    let xen = MemXen::new();
    let d = xen.create_domain(DomainConfig::hvm(8)).unwrap();
    let faults = xen.faults();
    faults.fail_after(Method::DomainInfo, 2, Errno::EBUSY);
    let results: Vec<bool> = (0..4).map(|_| xen.domain_info(d).is_ok()).collect();
    assert_eq!(results, [true, true, false, false]);
    faults.fail(
        Method::MaximumGpfn,
        Trigger::Range { first: 2, count: 2 },
        Errno::EIO,
    );
    let results: Vec<bool> = (0..5).map(|_| xen.maximum_gpfn(d).is_ok()).collect();
    assert_eq!(results, [true, false, false, true, true]);
}

#[test]
fn injected_failures_have_no_side_effects() {
    let fx = fixture();
    let (xen, d) = (&fx.xen, fx.d);
    let faults = xen.faults();
    for m in [
        Method::Pause,
        Method::XsWrite,
        Method::GnttabMap,
        Method::EvtchnUnbind,
        Method::SetHvmParam,
        Method::WritePages,
        Method::XsTransactionEnd,
    ] {
        faults.fail_always(m);
    }
    assert!(xen.pause(d).is_err());
    assert_eq!(xen.pause_count(d), Some(0));

    fx.xs.watch("/node", "t").unwrap();
    fx.xs.read_watch(Some(Duration::ZERO)).unwrap();
    assert!(fx.xs.write(Tx::NONE, "/node", b"new").is_err());
    assert_eq!(fx.xs.read(Tx::NONE, "/node").unwrap(), b"v");
    assert_eq!(
        fx.xs.read_watch(Some(Duration::ZERO)).unwrap(),
        None,
        "no event"
    );

    assert!(xen.map_grant_refs(d, &[fx.gref], true).is_err());
    assert_eq!(xen.grant_map_count(d), 0);

    assert!(fx.evtchn.unbind(fx.local).is_err());
    xen.guest(d).evtchn_notify(1).unwrap();
    assert_eq!(fx.evtchn.pending().unwrap(), Some(fx.local), "still bound");

    assert!(xen.set_hvm_param(d, 3, 9).is_err());
    assert_eq!(xen.hvm_param(d, 3).unwrap(), 0);

    assert!(xen.write_page(d, 1, &[7; PAGE_SIZE]).is_err());
    assert_eq!(xen.guest(d).read_page(1).unwrap()[0], 0);

    let tx = fx.xs.transaction_start().unwrap();
    fx.xs.mkdir(tx, "/in-tx").unwrap();
    assert!(fx.xs.transaction_end(tx, false).is_err());
    assert!(fx.xs.read(Tx::NONE, "/in-tx").is_err(), "not committed");
    faults.clear(Method::XsTransactionEnd);
    fx.xs.transaction_end(tx, false).unwrap();
    assert_eq!(
        fx.xs.read(Tx::NONE, "/in-tx").unwrap(),
        b"",
        "the transaction was still open"
    );
}

#[test]
fn the_call_log_records_order_targets_and_injections() {
    let xen = MemXen::new();
    let d = xen.create_domain(DomainConfig::hvm(8)).unwrap();
    let xs = xen.open_xenstore().unwrap();
    let faults = xen.faults();
    faults.reset_calls();
    faults.fail_next(Method::XsRead, Errno::EACCES);
    xen.pause(d).unwrap();
    assert!(xs.read(Tx::NONE, "/local").is_err());
    xen.unpause(d).unwrap();
    let log = faults.log();
    assert_eq!(log.len(), 3);
    assert_eq!(
        (log[0].seq, log[0].method, log[0].nth),
        (1, Method::Pause, 1)
    );
    assert_eq!(log[0].target, Target::Domain(d));
    assert_eq!(log[1].target, Target::Path(String::from("/local")));
    assert_eq!(log[1].injected, Some(Errno::EACCES));
    assert_eq!(log[2].injected, None);
    assert_eq!(faults.total_calls(), 3);
}

#[test]
fn a_shared_plan_counts_calls_from_every_thread() {
    let faults = FaultPlan::new();
    let xen = MemXen::with_faults(faults.clone());
    let d = xen.create_domain(DomainConfig::hvm(8)).unwrap();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let xen = xen.clone();
            std::thread::spawn(move || {
                for _ in 0..100 {
                    xen.domain_info(d).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(faults.calls(Method::DomainInfo), 400);
}
