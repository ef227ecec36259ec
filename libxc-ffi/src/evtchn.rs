//! libxenevtchn: bind, notify and receive event channels.
//!
//! [`XenEvtchn`] is `Send + Sync`: on Linux every libxenevtchn call is one syscall on the
//! handle's fd (ioctl for bind/unbind/notify, read for pending, write for unmask) with no
//! user-space state changing after open, so concurrent calls are memory-safe.  xenevtchn.h's
//! warning is about *liveness*: if two threads poll the same handle and both call `pending`,
//! one of them blocks.  So let one thread consume events ([`XenEvtchn::wait_pending`], or
//! `poll` on [`XenEvtchn::as_fd`] then [`XenEvtchn::pending`]); others may bind, notify and
//! unmask.  After handling a port, [`XenEvtchn::unmask`] it, then re-check the ring.

use core::ptr::NonNull;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::time::Duration;

use crate::errno::{clear_errno, Errno};
use crate::loader::{self, LibraryPaths, LoadError};
use crate::logger::logger_ptr;
use crate::sys::types as t;
use crate::sys::xenevtchn::XenEvtchnLib;

/// Errors of the libxenevtchn wrappers.
#[derive(Debug, thiserror::Error)]
pub enum EvtchnError {
    /// libxenevtchn could not be loaded.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// `xenevtchn_open` failed.
    #[error("xenevtchn_open failed: {errno} (needs a Xen dom0 with /dev/xen/evtchn)")]
    Open {
        /// errno after the call.
        errno: Errno,
    },
    /// A call about a domain's port failed.
    #[error("{op} failed for domain {domid} port {port}: {errno}")]
    Domain {
        /// The libxenevtchn function.
        op: &'static str,
        /// The remote domain.
        domid: u32,
        /// The port involved (remote port for binds).
        port: u32,
        /// errno after the call.
        errno: Errno,
    },
    /// A call about one of our local ports failed.
    #[error("{op} failed for local port {port}: {errno}")]
    Port {
        /// The libxenevtchn function.
        op: &'static str,
        /// Local port.
        port: u32,
        /// errno after the call.
        errno: Errno,
    },
    /// A call without port failed.
    #[error("{op} failed: {errno}")]
    Call {
        /// The libxenevtchn function.
        op: &'static str,
        /// errno after the call.
        errno: Errno,
    },
}

/// An open event-channel handle (`xenevtchn_handle *`), closed on drop (which also unbinds
/// every port still bound through it).
pub struct XenEvtchn {
    lib: XenEvtchnLib,
    h: NonNull<t::xenevtchn_handle>,
    fd: RawFd,
}

// SAFETY: the handle is an fd plus data that never changes after open; moving it to another
// thread is fine.
unsafe impl Send for XenEvtchn {}
// SAFETY: every call is a single syscall on the fd with no shared user-space state (see the
// module documentation); the kernel serialises them.
unsafe impl Sync for XenEvtchn {}

impl core::fmt::Debug for XenEvtchn {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("XenEvtchn").field("fd", &self.fd).finish()
    }
}

impl XenEvtchn {
    /// Loads libxenevtchn.so.1 and opens a handle (close-on-exec).
    pub fn open() -> Result<Self, EvtchnError> {
        Self::open_with(&LibraryPaths::default())
    }

    /// Like [`XenEvtchn::open`], with the library taken from `paths.xenevtchn`.
    pub fn open_with(paths: &LibraryPaths) -> Result<Self, EvtchnError> {
        let lib = loader::load(
            &paths.xenevtchn,
            &paths.search_dirs,
            XenEvtchnLib::from_library::<libloading::Library>,
        )?;
        clear_errno();
        // SAFETY: the static logger outlives the handle; flags 0 = close-on-exec.
        let raw = unsafe { (lib.xenevtchn_open)(logger_ptr(), 0) };
        let Some(h) = NonNull::new(raw) else {
            return Err(EvtchnError::Open {
                errno: Errno::last(),
            });
        };
        // SAFETY: h is a valid handle.
        let fd = unsafe { (lib.xenevtchn_fd)(h.as_ptr()) };
        let me = Self { lib, h, fd };
        if fd < 0 {
            return Err(EvtchnError::Call {
                op: "xenevtchn_fd",
                errno: Errno::last(),
            });
        }
        Ok(me)
    }

    fn port_result(rc: i32, op: &'static str, domid: u32, port: u32) -> Result<u32, EvtchnError> {
        if rc < 0 {
            Err(EvtchnError::Domain {
                op,
                domid,
                port,
                errno: Errno::last(),
            })
        } else {
            Ok(rc as u32)
        }
    }

    /// `xenevtchn_bind_interdomain`: connects a new local port to `remote_port` of `domid`.
    /// Returns the local port.
    pub fn bind_interdomain(&self, domid: u32, remote_port: u32) -> Result<u32, EvtchnError> {
        // SAFETY: plain call on a valid handle.
        let rc =
            unsafe { (self.lib.xenevtchn_bind_interdomain)(self.h.as_ptr(), domid, remote_port) };
        Self::port_result(rc, "xenevtchn_bind_interdomain", domid, remote_port)
    }

    /// `xenevtchn_bind_unbound_port`: a new local port that `domid` may bind to.
    pub fn bind_unbound_port(&self, domid: u32) -> Result<u32, EvtchnError> {
        // SAFETY: plain call on a valid handle.
        let rc = unsafe { (self.lib.xenevtchn_bind_unbound_port)(self.h.as_ptr(), domid) };
        Self::port_result(rc, "xenevtchn_bind_unbound_port", domid, 0)
    }

    /// `xenevtchn_unbind` of a local port.
    pub fn unbind(&self, port: u32) -> Result<(), EvtchnError> {
        // SAFETY: plain call on a valid handle.
        let rc = unsafe { (self.lib.xenevtchn_unbind)(self.h.as_ptr(), port) };
        self.port_rc(rc, "xenevtchn_unbind", port)
    }

    /// `xenevtchn_notify`: kicks the remote end of local port `port`.
    pub fn notify(&self, port: u32) -> Result<(), EvtchnError> {
        // SAFETY: plain call on a valid handle.
        let rc = unsafe { (self.lib.xenevtchn_notify)(self.h.as_ptr(), port) };
        self.port_rc(rc, "xenevtchn_notify", port)
    }

    /// `xenevtchn_pending`: the next local port that fired.  Blocks if none is pending, so
    /// poll the fd first.  The port stays masked until [`XenEvtchn::unmask`].
    pub fn pending(&self) -> Result<u32, EvtchnError> {
        // SAFETY: plain call on a valid handle.
        let rc = unsafe { (self.lib.xenevtchn_pending)(self.h.as_ptr()) };
        if rc < 0 {
            return Err(EvtchnError::Call {
                op: "xenevtchn_pending",
                errno: Errno::last(),
            });
        }
        Ok(rc as u32)
    }

    /// Waits up to `timeout` (`None`: forever, `Some(Duration::ZERO)`: just check) for a port
    /// to fire, and takes it like [`XenEvtchn::pending`]; `None` if none fired in time.
    pub fn wait_pending(&self, timeout: Option<Duration>) -> Result<Option<u32>, EvtchnError> {
        let ready =
            crate::poll::wait_readable(self.fd, timeout).map_err(|errno| EvtchnError::Call {
                op: "poll(xenevtchn_fd)",
                errno,
            })?;
        if ready {
            self.pending().map(Some)
        } else {
            Ok(None)
        }
    }

    /// `xenevtchn_unmask`: re-enables delivery on a local port after handling it.
    pub fn unmask(&self, port: u32) -> Result<(), EvtchnError> {
        // SAFETY: plain call on a valid handle.
        let rc = unsafe { (self.lib.xenevtchn_unmask)(self.h.as_ptr(), port) };
        self.port_rc(rc, "xenevtchn_unmask", port)
    }

    fn port_rc(&self, rc: i32, op: &'static str, port: u32) -> Result<(), EvtchnError> {
        if rc < 0 {
            Err(EvtchnError::Port {
                op,
                port,
                errno: Errno::last(),
            })
        } else {
            Ok(())
        }
    }

    /// The pollable fd (readable when a port is pending).  Owned by the handle: do not close.
    pub fn fd(&self) -> RawFd {
        self.fd
    }
}

impl AsRawFd for XenEvtchn {
    fn as_raw_fd(&self) -> RawFd {
        self.fd
    }
}

impl AsFd for XenEvtchn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the fd stays open until xenevtchn_close in Drop, which needs `&mut self`,
        // so it outlives the returned borrow.
        unsafe { BorrowedFd::borrow_raw(self.fd) }
    }
}

impl Drop for XenEvtchn {
    fn drop(&mut self) {
        // SAFETY: h came from xenevtchn_open and is closed exactly once.
        let rc = unsafe { (self.lib.xenevtchn_close)(self.h.as_ptr()) };
        if rc != 0 {
            log::warn!("xenevtchn_close failed: {}", Errno::last());
        }
    }
}
