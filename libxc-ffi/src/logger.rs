//! A `xentoollog_logger` that forwards the C libraries' messages to the `log` crate.
//!
//! Without it, libxenctrl & co. print every failure to stderr.  Failures are already reported
//! through our `Result`s (with errno), and some are guest-triggerable, so the C messages go to
//! `log` at debug level (target `xen`), where they cost nothing unless enabled.

use core::ffi::{c_char, c_int, CStr};

use crate::sys::types::{
    __va_list_tag, xentoollog_level, xentoollog_level_XTL_ERROR, xentoollog_logger,
};

extern "C" {
    // From the C library, always linked.  On x86-64 a `va_list` parameter is a pointer to
    // `__va_list_tag`, exactly what the logger callback receives.
    fn vsnprintf(s: *mut c_char, n: usize, format: *const c_char, ap: *mut __va_list_tag) -> c_int;
}

unsafe extern "C" fn vmessage(
    _logger: *mut xentoollog_logger,
    level: xentoollog_level,
    errnoval: c_int,
    context: *const c_char,
    format: *const c_char,
    al: *mut __va_list_tag,
) {
    if !log::log_enabled!(target: "xen", log::Level::Debug) || format.is_null() {
        return;
    }
    let mut buf = [0u8; 512];
    // SAFETY: buf is writable for buf.len() bytes; format and al come from the C library's
    // xtl_logv(), which passes a valid printf format and its matching, unused va_list.
    let n = unsafe { vsnprintf(buf.as_mut_ptr().cast(), buf.len(), format, al) };
    if n < 0 {
        return;
    }
    let ctx = if context.is_null() {
        None
    } else {
        // SAFETY: a non-null context is a NUL-terminated string constant of the C library.
        Some(unsafe { CStr::from_ptr(context) })
    };
    // A panic must not unwind into C: a misbehaving `log` backend loses the message instead.
    let _ = std::panic::catch_unwind(|| emit(level, errnoval, ctx, &buf));
}

fn emit(level: xentoollog_level, errnoval: c_int, context: Option<&CStr>, buf: &[u8]) {
    let text = CStr::from_bytes_until_nul(buf)
        .map_or(std::borrow::Cow::Borrowed(""), |c| c.to_string_lossy());
    let ctx = context.map_or(std::borrow::Cow::Borrowed("xen"), CStr::to_string_lossy);
    let sev = if level >= xentoollog_level_XTL_ERROR {
        "error"
    } else {
        "info"
    };
    if errnoval >= 0 {
        let e = crate::Errno(errnoval);
        log::debug!(target: "xen", "{ctx} {sev}: {text}: {e}");
    } else {
        log::debug!(target: "xen", "{ctx} {sev}: {text}");
    }
}

unsafe extern "C" fn destroy(_logger: *mut xentoollog_logger) {}

/// The one logger instance; the C libraries only ever read it (they call its functions).
static LOGGER: xentoollog_logger = xentoollog_logger {
    vmessage: Some(vmessage),
    progress: None,
    destroy: Some(destroy),
};

/// Pointer to pass as the `logger` argument of `xc_interface_open` / `*_open`.
pub(crate) fn logger_ptr() -> *mut xentoollog_logger {
    // The libraries take `xentoollog_logger *` but never write through it (xtl_logv and
    // xtl_logger_destroy only call the function pointers), so the static stays immutable.
    core::ptr::addr_of!(LOGGER).cast_mut()
}
