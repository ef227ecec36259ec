//! `Errno`: the C `errno` value captured right after a failing library call.

use core::fmt;

/// An `errno` value captured immediately after a failing Xen library call.
///
/// Displays as `errno 13 (Permission denied)`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Errno(pub i32);

impl Errno {
    /// The calling thread's current `errno`.  Call this first thing after the failing call.
    pub fn last() -> Self {
        Self(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }

    /// The raw value (e.g. `libc::EAGAIN`).
    pub fn raw(self) -> i32 {
        self.0
    }

    /// Converts into a `std::io::Error` of the same code.
    pub fn to_io_error(self) -> std::io::Error {
        std::io::Error::from_raw_os_error(self.0)
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = std::io::Error::from_raw_os_error(self.0).to_string();
        // std formats as "<text> (os error N)"; keep only the text.
        let text = text.split(" (os error").next().unwrap_or("");
        write!(f, "errno {} ({})", self.0, text)
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Errno({}: {})", self.0, self)
    }
}

/// Sets the calling thread's `errno` (used before calls that report errors only through errno
/// in some paths, so that a stale value is never reported).
pub(crate) fn clear_errno() {
    // SAFETY: __errno_location() returns the calling thread's valid, aligned errno slot.
    unsafe { *libc::__errno_location() = 0 };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_code_and_text() {
        let e = Errno(libc::ENOENT);
        assert_eq!(e.to_string(), "errno 2 (No such file or directory)");
        assert_eq!(e.raw(), 2);
        assert_eq!(e.to_io_error().kind(), std::io::ErrorKind::NotFound);
    }

    #[test]
    fn last_reads_the_thread_errno() {
        // SAFETY: close(-1) only fails with EBADF; it touches no memory.
        let rc = unsafe { libc::close(-1) };
        assert_eq!(rc, -1);
        assert_eq!(Errno::last(), Errno(libc::EBADF));
        clear_errno();
        assert_eq!(Errno::last(), Errno(0));
    }
}
