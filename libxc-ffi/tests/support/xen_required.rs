//! Whether a test that needs Xen's headers or libraries may skip when they are missing.
//!
//! Included with `#[path]` by libxc-ffi/tests/*.rs and hypervisor/tests/xen_host.rs. Where CI
//! runs (`CI` set, as by `.ci/run`'s environment, which also installs libxen-dev) or
//! `KEMARI_REQUIRE_XEN=1` is set (`scripts/test` sets it when /usr/include/xenctrl.h exists),
//! a missing piece fails the test instead. Otherwise the test skips and says so on the
//! terminal: straight to stderr, which the test harness does not capture.

use std::io::Write;

/// True when the environment demands the Xen headers and libraries.
pub fn required() -> bool {
    let set =
        |name: &str| std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0" && v != "false");
    set("KEMARI_REQUIRE_XEN") || set("CI")
}

/// Reports that `test` cannot run because `what` is missing: a panic when Xen is required
/// ([`required`]), else a line on stderr. Returns so the caller can skip.
pub fn missing(test: &str, what: &str) {
    if required() {
        panic!(
            "{test}: {what} missing, and KEMARI_REQUIRE_XEN or CI is set: a Xen-dependent test \
             must not skip here (apt-get install libxen-dev)"
        );
    }
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: {what} missing (apt-get install libxen-dev; set KEMARI_REQUIRE_XEN=1 to make this a failure)"
    );
}
