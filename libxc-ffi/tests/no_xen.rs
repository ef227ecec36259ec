//! The real Debian Xen 4.17 libraries on a machine that does not run Xen: each handle loads
//! its library and fails to open with an errno (or, without libxen at all, reports the
//! missing soname).  Skipped where Xen runs (tests/dom0.rs covers that).

// A test crate: helpers outside #[test] functions may unwrap too (clippy.toml allows it
// only inside them).
#![allow(clippy::unwrap_used)]

#[path = "support/xen_required.rs"]
mod xen_required;

use libxc_ffi::*;

fn xen_running() -> bool {
    let running = std::path::Path::new("/dev/xen/privcmd").exists();
    if running {
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            b"SKIPPED: this machine runs Xen (tests/dom0.rs covers it)\n",
        );
    }
    running
}

fn library_present(soname: &str) -> bool {
    // SAFETY: loading a Xen library only runs its initialisers.
    let ok = unsafe { libloading::Library::new(soname) }.is_ok();
    if !ok {
        // the not-found path is checked instead; where Xen is required that is a failure
        xen_required::missing(
            std::thread::current().name().unwrap_or("test"),
            &format!("{soname} (checking the not-found path instead)"),
        );
    }
    ok
}

#[test]
fn evtchn_open_fails_with_errno_without_xen() {
    if xen_running() {
        return;
    }
    let err = XenEvtchn::open().unwrap_err();
    if library_present(SONAME_XENEVTCHN) {
        assert!(
            matches!(err, EvtchnError::Open { errno } if errno.raw() != 0),
            "{err:?}"
        );
        assert!(
            err.to_string().starts_with("xenevtchn_open failed: errno "),
            "{err}"
        );
    } else {
        assert!(
            matches!(err, EvtchnError::Load(LoadError::NotFound { .. })),
            "{err:?}"
        );
    }
}

#[test]
fn gnttab_open_fails_with_errno_without_xen() {
    if xen_running() {
        return;
    }
    let err = XenGnttab::open().unwrap_err();
    if library_present(SONAME_XENGNTTAB) {
        assert!(
            matches!(err, GnttabError::Open { errno } if errno.raw() != 0),
            "{err:?}"
        );
    } else {
        assert!(
            matches!(err, GnttabError::Load(LoadError::NotFound { .. })),
            "{err:?}"
        );
    }
}

#[test]
fn foreignmemory_open_fails_with_errno_without_xen() {
    if xen_running() {
        return;
    }
    let err = XenForeignMemory::open().unwrap_err();
    if library_present(SONAME_XENFOREIGNMEMORY) {
        assert!(
            matches!(err, ForeignMemoryError::Open { errno } if errno.raw() != 0),
            "{err:?}"
        );
    } else {
        assert!(
            matches!(err, ForeignMemoryError::Load(LoadError::NotFound { .. })),
            "{err:?}"
        );
    }
}

#[test]
fn xenstore_open_fails_with_errno_without_xen() {
    if xen_running() || std::path::Path::new("/run/xenstored/socket").exists() {
        return;
    }
    let err = XenStore::open().unwrap_err();
    if library_present(SONAME_XENSTORE) {
        assert!(
            matches!(err, XsError::Open { errno } if errno.raw() != 0),
            "{err:?}"
        );
        assert!(
            err.to_string().starts_with("xs_open failed: errno "),
            "{err}"
        );
    } else {
        assert!(
            matches!(err, XsError::Load(LoadError::NotFound { .. })),
            "{err:?}"
        );
    }
}

#[test]
fn xenctrl_open_fails_with_errno_without_xen() {
    if xen_running() {
        return;
    }
    let err = XenCtrl::open().unwrap_err();
    if library_present(SONAME_XENCTRL) {
        assert!(
            matches!(err, XcError::Open { errno } if errno.raw() != 0),
            "{err:?}"
        );
    } else {
        assert!(
            matches!(err, XcError::Load(LoadError::NotFound { .. })),
            "{err:?}"
        );
    }
}

struct Capture(std::sync::Mutex<Vec<String>>);

impl log::Log for Capture {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.target() == "xen"
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            self.0.lock().unwrap().push(r.args().to_string());
        }
    }
    fn flush(&self) {}
}

static CAPTURE: Capture = Capture(std::sync::Mutex::new(Vec::new()));

#[test]
fn c_library_messages_go_to_the_log_crate_with_their_arguments() {
    if xen_running() || !library_present(SONAME_XENCTRL) {
        return;
    }
    log::set_logger(&CAPTURE).unwrap();
    log::set_max_level(log::LevelFilter::Debug);
    assert!(XenCtrl::open().is_err());
    let got = CAPTURE.0.lock().unwrap().clone();
    // libxencall's message, formatted through vsnprintf with its arguments, and its errno.
    assert!(
        got.iter().any(|m| m.starts_with("xencall error: ")
            && m.contains("privileged command interface")
            && m.ends_with("errno 2 (No such file or directory)")),
        "{got:?}"
    );
}
