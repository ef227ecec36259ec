//! Waiting for an fd to become readable (event channels, xenstore watches).

use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use crate::errno::Errno;

/// Waits until `fd` polls readable or `timeout` passes (`None`: forever).  Returns whether it
/// is readable.  Retries on `EINTR` with the remaining time.
pub(crate) fn wait_readable(fd: RawFd, timeout: Option<Duration>) -> Result<bool, Errno> {
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let ms: i32 = match deadline {
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                // Round up so a sub-millisecond remainder still waits.
                i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
            }
        };
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        if n < 0 {
            let e = Errno::last();
            if e == Errno(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        if n > 0 {
            if p.revents & libc::POLLNVAL != 0 {
                return Err(Errno(libc::EBADF));
            }
            if p.revents & libc::POLLERR != 0 && p.revents & libc::POLLIN == 0 {
                return Err(Errno(libc::EIO));
            }
            return Ok(true);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_out_then_sees_data() {
        let mut fds = [0; 2];
        // SAFETY: fds has room for the two descriptors pipe() returns.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let [r, w] = fds;
        let t = Instant::now();
        assert_eq!(wait_readable(r, Some(Duration::from_millis(30))), Ok(false));
        assert!(t.elapsed() >= Duration::from_millis(30));
        assert_eq!(wait_readable(r, Some(Duration::ZERO)), Ok(false));
        // SAFETY: writes one byte from a valid buffer to our pipe.
        assert_eq!(unsafe { libc::write(w, b"x".as_ptr().cast(), 1) }, 1);
        assert_eq!(wait_readable(r, None), Ok(true));
        assert_eq!(wait_readable(r, Some(Duration::ZERO)), Ok(true));
        // SAFETY: closes the two descriptors this test opened.
        unsafe {
            libc::close(r);
            libc::close(w);
        }
    }

    #[test]
    fn invalid_fd_is_an_error() {
        assert_eq!(
            wait_readable(1_000_000, Some(Duration::ZERO)),
            Err(Errno(libc::EBADF))
        );
    }
}
