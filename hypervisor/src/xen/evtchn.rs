//! [`EventChannels`] over `libxc_ffi::XenEvtchn` (one `xenevtchn_open` handle).

use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

use libxc_ffi::{LibraryPaths, XenEvtchn};

use super::errors;
use crate::{DomId, EventChannels, Method, Port, Result};

/// One event channel handle of this process (`xenevtchn_handle`), from
/// [`Hypervisor::open_event_channels`](crate::Hypervisor::open_event_channels). Closing it
/// (drop) unbinds every port still bound through it.
///
/// Let one thread take events ([`pending`](EventChannels::pending) /
/// [`wait`](EventChannels::wait)); any thread may bind, notify and unmask.
#[derive(Debug)]
pub struct XenEventChannels {
    handle: XenEvtchn,
}

impl XenEventChannels {
    /// Opens a handle with the library named by `paths.xenevtchn`.
    pub fn open(paths: &LibraryPaths) -> Result<XenEventChannels> {
        let handle = XenEvtchn::open_with(paths).map_err(|e| {
            log::warn!(
                "cannot open libxenevtchn ({}): {e}",
                paths.xenevtchn.to_string_lossy()
            );
            errors::evtchn(Method::EvtchnOpen, None, e)
        })?;
        Ok(XenEventChannels { handle })
    }
}

impl EventChannels for XenEventChannels {
    fn bind_interdomain(&self, remote_domid: DomId, remote_port: Port) -> Result<Port> {
        self.handle
            .bind_interdomain(u32::from(remote_domid), remote_port)
            .map_err(|e| errors::evtchn(Method::EvtchnBindInterdomain, None, e))
    }

    fn unbind(&self, port: Port) -> Result<()> {
        self.handle
            .unbind(port)
            .map_err(|e| errors::evtchn(Method::EvtchnUnbind, Some(port), e))
    }

    fn notify(&self, port: Port) -> Result<()> {
        self.handle
            .notify(port)
            .map_err(|e| errors::evtchn(Method::EvtchnNotify, Some(port), e))
    }

    fn pending(&self) -> Result<Option<Port>> {
        self.handle
            .wait_pending(Some(Duration::ZERO))
            .map_err(|e| errors::evtchn(Method::EvtchnPending, None, e))
    }

    fn wait(&self, timeout: Option<Duration>) -> Result<Option<Port>> {
        self.handle
            .wait_pending(timeout)
            .map_err(|e| errors::evtchn(Method::EvtchnPending, None, e))
    }

    fn unmask(&self, port: Port) -> Result<()> {
        self.handle
            .unmask(port)
            .map_err(|e| errors::evtchn(Method::EvtchnUnmask, Some(port), e))
    }

    fn as_fd(&self) -> BorrowedFd<'_> {
        self.handle.as_fd()
    }
}
