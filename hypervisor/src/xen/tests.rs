//! Tests of the pure parts of the real implementation: error mapping and conversions of
//! `libxc-ffi`'s decoded structures. (Opening libraries: `tests/xen_host.rs`.)

use libxc_ffi::sys::types::{
    XEN_X86_EMU_ALL, XEN_X86_EMU_IOAPIC, XEN_X86_EMU_LAPIC, XEN_X86_EMU_PIT, XEN_X86_EMU_VPCI,
};
use libxc_ffi::{
    Access, EvtchnError, ForeignMemoryError, GnttabError, LoadError, MemError, PageError,
    Permission, XcError, XsError,
};

use super::errors::{self, OpenErrorKind, XenOpenError};
use super::xenstore::{perm_from_ffi, perm_to_ffi};
use super::{classify_guest, domain_info_from, evtchn_status_from, retry_enable_after_off};
use crate::{
    Errno, EvtchnState, GuestType, HypervisorError, Method, ShutdownReason, XsPerm, XsPermKind,
};

fn ffi(n: i32) -> libxc_ffi::Errno {
    libxc_ffi::Errno(n)
}

fn not_found() -> LoadError {
    LoadError::NotFound {
        soname: "libxenctrl.so.4.17".into(),
        dlerror: "libxenctrl.so.4.17: cannot open shared object file".into(),
        other_versions: vec![],
    }
}

#[test]
fn errno_zero_becomes_eio_and_negative_values_are_folded() {
    assert_eq!(errors::errno(ffi(libc::EPERM)), Errno::EPERM);
    assert_eq!(errors::errno(ffi(0)), Errno::EIO);
    assert_eq!(errors::errno(ffi(-libc::EFAULT)), Errno::EFAULT);
}

#[test]
fn xenctrl_errors_keep_method_domain_and_errno() {
    let e = errors::xc_domain(
        Method::Pause,
        5,
        XcError::Domain {
            op: "xc_domain_pause",
            domid: 5,
            errno: ffi(libc::ESRCH),
        },
    );
    assert_eq!(
        e,
        HypervisorError::Domain {
            op: Method::Pause,
            domid: 5,
            errno: Errno::ESRCH
        }
    );
    assert_eq!(
        e.to_string(),
        "pause failed for domain 5: ESRCH (3: No such process (os error 3))"
    );

    let e = errors::xc_domain(Method::DomainInfo, 9, XcError::NoSuchDomain { domid: 9 });
    assert_eq!(e.errno(), Some(Errno::ESRCH));
    assert_eq!(e.op(), Method::DomainInfo);

    let e = errors::xc_domain(
        Method::LogDirtyClean,
        3,
        XcError::Call {
            op: "xc__hypercall_buffer_alloc_pages",
            errno: ffi(libc::ENOMEM),
        },
    );
    assert_eq!(
        e,
        HypervisorError::Domain {
            op: Method::LogDirtyClean,
            domid: 3,
            errno: Errno::ENOMEM
        }
    );

    let e = errors::xc_domain(
        Method::HvmContext,
        4,
        XcError::Invalid {
            op: "xc_domain_hvm_getcontext",
            domid: 4,
            reason: "returned 10 bytes for a 5-byte buffer".into(),
        },
    );
    assert_eq!(e.errno(), Some(Errno::EINVAL));

    let e = errors::xc_call(
        Method::ListDomains,
        XcError::Domain {
            op: "xc_domain_getinfolist",
            domid: 0,
            errno: ffi(libc::EPERM),
        },
    );
    assert_eq!(
        e,
        HypervisorError::Call {
            op: Method::ListDomains,
            errno: Errno::EPERM
        }
    );
}

#[test]
fn foreign_memory_errors_become_pages_or_domain_errors() {
    let failed = [
        PageError {
            index: 1,
            pfn: 0xbad,
            errno: ffi(libc::EFAULT),
        },
        PageError {
            index: 3,
            pfn: 0x10,
            errno: ffi(libc::ENOENT),
        },
    ];
    let e = errors::page_failures(Method::ReadPages, 7, &failed);
    assert_eq!(
        e,
        HypervisorError::Pages {
            op: Method::ReadPages,
            domid: 7,
            failures: vec![(0xbad, Errno::EFAULT), (0x10, Errno::ENOENT)]
        }
    );
    assert_eq!(e.errno(), Some(Errno::EFAULT));

    let e = errors::foreign(
        Method::WritePages,
        7,
        ForeignMemoryError::Map {
            op: "xenforeignmemory_map",
            domid: 7,
            count: 4,
            errno: ffi(libc::ESRCH),
        },
    );
    assert_eq!(
        e,
        HypervisorError::Domain {
            op: Method::WritePages,
            domid: 7,
            errno: Errno::ESRCH
        }
    );

    let e = errors::foreign(
        Method::ReadPages,
        2,
        ForeignMemoryError::Page {
            domid: 2,
            index: 0,
            pfn: 0x42,
            errno: ffi(libc::EPERM),
        },
    );
    assert_eq!(
        e,
        HypervisorError::Pages {
            op: Method::ReadPages,
            domid: 2,
            failures: vec![(0x42, Errno::EPERM)]
        }
    );
}

#[test]
fn event_channel_errors_name_the_port_or_the_remote_domain() {
    let e = errors::evtchn(
        Method::EvtchnBindInterdomain,
        None,
        EvtchnError::Domain {
            op: "xenevtchn_bind_interdomain",
            domid: 4,
            port: 12,
            errno: ffi(libc::EINVAL),
        },
    );
    assert_eq!(
        e,
        HypervisorError::Domain {
            op: Method::EvtchnBindInterdomain,
            domid: 4,
            errno: Errno::EINVAL
        }
    );

    let e = errors::evtchn(
        Method::EvtchnNotify,
        Some(9),
        EvtchnError::Port {
            op: "xenevtchn_notify",
            port: 9,
            errno: ffi(libc::ENOTCONN),
        },
    );
    assert_eq!(
        e,
        HypervisorError::Port {
            op: Method::EvtchnNotify,
            port: 9,
            errno: Errno(libc::ENOTCONN)
        }
    );

    let e = errors::evtchn(
        Method::EvtchnPending,
        None,
        EvtchnError::Call {
            op: "xenevtchn_pending",
            errno: ffi(libc::EIO),
        },
    );
    assert_eq!(
        e,
        HypervisorError::Call {
            op: Method::EvtchnPending,
            errno: Errno::EIO
        }
    );

    let e = errors::evtchn(
        Method::EvtchnOpen,
        None,
        EvtchnError::Open {
            errno: ffi(libc::ENOENT),
        },
    );
    assert_eq!(
        e,
        HypervisorError::Call {
            op: Method::EvtchnOpen,
            errno: Errno::ENOENT
        }
    );

    let e = errors::evtchn(Method::EvtchnOpen, None, EvtchnError::Load(not_found()));
    assert_eq!(e.errno(), Some(Errno(libc::ELIBACC)));
}

#[test]
fn grant_errors_name_domain_and_reference() {
    let e = errors::gnttab(
        Method::GnttabMap,
        3,
        &[8, 9],
        GnttabError::Map {
            op: "xengnttab_map_domain_grant_refs",
            domid: 3,
            first_ref: 8,
            count: 2,
            errno: ffi(libc::EINVAL),
        },
    );
    assert_eq!(
        e,
        HypervisorError::Grant {
            op: Method::GnttabMap,
            domid: 3,
            gref: 8,
            errno: Errno::EINVAL
        }
    );
    let e = errors::gnttab(
        Method::GnttabMap,
        3,
        &[11],
        GnttabError::Open {
            errno: ffi(libc::ENOENT),
        },
    );
    assert_eq!(
        e,
        HypervisorError::Grant {
            op: Method::GnttabMap,
            domid: 3,
            gref: 11,
            errno: Errno::ENOENT
        }
    );

    let access = |err| errors::grant_access(6, 20, err);
    assert_eq!(
        access(MemError::OutOfBounds {
            offset: 4090,
            len: 8,
            size: 4096
        }),
        HypervisorError::OutOfBounds {
            op: Method::GrantAccess,
            offset: 4090,
            len: 8,
            size: 4096
        }
    );
    assert_eq!(
        access(MemError::Misaligned {
            offset: 2,
            width: 4
        }),
        HypervisorError::Misaligned {
            op: Method::GrantAccess,
            offset: 2,
            len: 4
        }
    );
    assert_eq!(
        access(MemError::ReadOnly { offset: 0, len: 4 }),
        HypervisorError::Grant {
            op: Method::GrantAccess,
            domid: 6,
            gref: 20,
            errno: Errno::EACCES
        }
    );
}

#[test]
fn xenstore_errors_keep_the_path_and_a_commit_conflict_is_recognised() {
    let e = errors::xs(
        Method::XsRead,
        "/local/domain/3/name",
        XsError::Path {
            op: "xs_read",
            path: "/local/domain/3/name".into(),
            errno: ffi(libc::ENOENT),
        },
    );
    assert_eq!(
        e,
        HypervisorError::XenStore {
            op: Method::XsRead,
            path: "/local/domain/3/name".into(),
            errno: Errno::ENOENT
        }
    );

    let conflict = errors::xs(
        Method::XsTransactionEnd,
        "",
        XsError::Call {
            op: "xs_transaction_end(commit)",
            errno: ffi(libc::EAGAIN),
        },
    );
    assert!(conflict.is_transaction_conflict(), "{conflict:?}");

    let e = errors::xs(
        Method::XsWrite,
        "/a\0b",
        XsError::Invalid {
            op: "xs_write",
            reason: "contains a NUL byte".into(),
        },
    );
    assert_eq!(e.errno(), Some(Errno::EINVAL));
    assert!(!e.is_transaction_conflict());

    assert_eq!(
        errors::xs(
            Method::XsTransactionEnd,
            "",
            XsError::TransactionRetries { attempts: 16 }
        ),
        HypervisorError::TransactionRetriesExhausted { attempts: 16 }
    );
    let e = errors::xs(Method::XsOpen, "", XsError::Load(not_found()));
    assert_eq!(e.op(), Method::XsOpen);
    assert_eq!(e.errno(), Some(Errno(libc::ELIBACC)));
}

#[test]
fn open_errors_say_which_library_failed_and_how() {
    let e = XenOpenError::XenCtrl {
        library: "libxenctrl.so.4.17".into(),
        error: XcError::Load(not_found()),
    };
    assert_eq!(e.kind(), OpenErrorKind::LibraryNotFound);
    assert_eq!(e.library(), "libxenctrl.so.4.17");
    assert!(
        std::error::Error::source(&e).is_none(),
        "the message already says why"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("libxenctrl.so.4.17 not found: is this a Xen 4.17 dom0?"),
        "{msg}"
    );

    let e = XenOpenError::XenCtrl {
        library: "libxenctrl.so.4.17".into(),
        error: XcError::Open {
            errno: ffi(libc::ENOENT),
        },
    };
    assert_eq!(e.kind(), OpenErrorKind::InterfaceOpenFailed);
    assert!(e.to_string().contains("xc_interface_open failed"), "{e}");

    let e = XenOpenError::XenCtrl {
        library: "libxenctrl.so.4.17".into(),
        error: XcError::WrongXenVersion {
            found_major: 4,
            found_minor: 18,
        },
    };
    assert_eq!(e.kind(), OpenErrorKind::WrongXenVersion);

    let e = XenOpenError::ForeignMemory {
        library: "libxenforeignmemory.so.1".into(),
        error: ForeignMemoryError::Load(LoadError::MissingSymbol {
            soname: "libxenforeignmemory.so.1".into(),
            dlerror: "undefined symbol: xenforeignmemory_map".into(),
        }),
    };
    assert_eq!(e.kind(), OpenErrorKind::MissingSymbol);
    assert!(
        e.to_string().starts_with("cannot open libxenforeignmemory"),
        "{e}"
    );
}

#[test]
fn guest_type_follows_xens_emulation_flag_rules() {
    let hvm = XEN_X86_EMU_ALL & !XEN_X86_EMU_VPCI;
    assert_eq!(classify_guest(false, 0), GuestType::Pv);
    assert_eq!(classify_guest(false, hvm), GuestType::Pv);
    assert_eq!(classify_guest(true, hvm), GuestType::Hvm);
    assert_eq!(classify_guest(true, XEN_X86_EMU_LAPIC), GuestType::Pvh);
    assert_eq!(
        classify_guest(
            true,
            XEN_X86_EMU_LAPIC | XEN_X86_EMU_IOAPIC | XEN_X86_EMU_VPCI
        ),
        GuestType::Pvh,
        "PVH dom0"
    );
    assert_eq!(
        classify_guest(true, XEN_X86_EMU_LAPIC | XEN_X86_EMU_PIT),
        GuestType::Hvm
    );
}

fn ffi_info() -> libxc_ffi::DomainInfo {
    libxc_ffi::DomainInfo {
        domid: 4,
        dying: false,
        hvm: true,
        guest_type: libxc_ffi::GuestType::Pvh,
        emulation_flags: XEN_X86_EMU_LAPIC,
        shutdown: None,
        paused: true,
        blocked: false,
        running: false,
        debugged: false,
        xs_domain: false,
        hap: true,
        max_vcpu_id: Some(1),
        nr_online_vcpus: 2,
        nr_pages: 24_576,
        max_pages: 25_000,
        shr_pages: 0,
        paged_pages: 0,
        shared_info_frame: 0xfeffe,
        cpu_time: 1,
        ssidref: 0,
        handle: [0; 16],
        cpupool: 0,
        flags: 0,
    }
}

#[test]
fn domain_info_is_converted_field_by_field() {
    let d = domain_info_from(&ffi_info()).unwrap();
    assert_eq!(d.domid, 4);
    assert_eq!(d.guest_type, GuestType::Pvh);
    assert!(d.paused && !d.running && !d.blocked && !d.dying);
    assert_eq!(d.shutdown, None);
    assert_eq!(
        (d.max_vcpu_id, d.tot_pages, d.max_pages),
        (1, 24_576, 25_000)
    );

    let mut raw = ffi_info();
    raw.hvm = false;
    raw.max_vcpu_id = None;
    raw.shutdown = Some(libxc_ffi::ShutdownReason::Other(9));
    raw.dying = true;
    let d = domain_info_from(&raw).unwrap();
    assert_eq!(d.guest_type, GuestType::Pv);
    assert_eq!(d.max_vcpu_id.wrapping_add(1), 0, "no vCPUs");
    assert_eq!(d.shutdown, Some(ShutdownReason::Other(9)));
    assert!(d.dying);
    raw.shutdown = Some(libxc_ffi::ShutdownReason::Suspend);
    assert_eq!(
        domain_info_from(&raw).unwrap().shutdown,
        Some(ShutdownReason::Suspend)
    );

    raw.domid = 0x1_0000;
    assert_eq!(domain_info_from(&raw), None, "not a domid_t");
}

#[test]
fn event_channel_status_is_converted() {
    let s = |state| libxc_ffi::EvtchnStatus {
        domid: 3,
        port: 5,
        vcpu: 1,
        state,
    };
    let got = evtchn_status_from(&s(libxc_ffi::EvtchnState::Interdomain {
        remote_domid: 0,
        remote_port: 33,
    }))
    .unwrap();
    assert_eq!(got.vcpu, 1);
    assert_eq!(
        got.state,
        EvtchnState::Interdomain {
            remote_domid: 0,
            remote_port: 33
        }
    );
    assert_eq!(
        evtchn_status_from(&s(libxc_ffi::EvtchnState::Unbound { remote_domid: 7 }))
            .unwrap()
            .state,
        EvtchnState::Unbound { remote_domid: 7 }
    );
    assert_eq!(
        evtchn_status_from(&s(libxc_ffi::EvtchnState::Virq(2)))
            .unwrap()
            .state,
        EvtchnState::Virq(2)
    );
    assert_eq!(
        evtchn_status_from(&s(libxc_ffi::EvtchnState::Unknown(99))),
        None
    );
}

#[test]
fn permissions_round_trip() {
    for kind in [
        XsPermKind::None,
        XsPermKind::Read,
        XsPermKind::Write,
        XsPermKind::Both,
    ] {
        let p = XsPerm::new(5, kind);
        assert_eq!(perm_from_ffi(&perm_to_ffi(&p)), Some(p));
    }
    assert_eq!(
        perm_to_ffi(&XsPerm::new(3, XsPermKind::Both)),
        Permission {
            domid: 3,
            access: Access::ReadWrite
        }
    );
    assert_eq!(
        perm_from_ffi(&Permission {
            domid: 0x1_0000,
            access: Access::Read
        }),
        None
    );
}

#[test]
fn log_dirty_enable_is_retried_only_for_einval_on_a_domain_we_did_not_enable() {
    let err = |errno| HypervisorError::Domain {
        op: Method::LogDirtyEnable,
        domid: 3,
        errno,
    };
    assert!(
        retry_enable_after_off(&err(Errno::EINVAL), false),
        "VRAM tracking"
    );
    assert!(
        !retry_enable_after_off(&err(Errno::EINVAL), true),
        "enabled twice"
    );
    assert!(!retry_enable_after_off(&err(Errno::EOPNOTSUPP), false));
    assert!(!retry_enable_after_off(&err(Errno::ESRCH), false));
}
