//! The dom0 event channel handle of the in-memory host.

use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::time::Duration;

use super::{lock, EventQueue, PortState, Shared, Target};
use crate::{DomId, Errno, EventChannels, HypervisorError, Method, Port, Result};

/// An event channel handle of dom0 on a [`MemXen`](super::MemXen) (like one open
/// `/dev/xen/evtchn`): ports bound through it deliver here, masked on delivery until
/// [`unmask`](EventChannels::unmask). Dropping it closes its ports (their guest ends become
/// unbound, waiting for dom0 again).
#[derive(Debug)]
pub struct MemEventChannels {
    shared: Arc<Shared>,
    id: u64,
    queue: Arc<EventQueue<Port>>,
}

impl MemEventChannels {
    pub(crate) fn open(shared: Arc<Shared>) -> Result<MemEventChannels> {
        let op = Method::EvtchnOpen;
        shared
            .fault(op, Target::None)
            .map_err(|errno| HypervisorError::Call { op, errno })?;
        let queue = Arc::new(EventQueue::new().map_err(|err| HypervisorError::Call {
            op,
            errno: Errno::from_io(&err),
        })?);
        let id = {
            let mut host = lock(&shared.host);
            let id = host.next_handle;
            host.next_handle += 1;
            host.evtchn_queues.insert(id, queue.clone());
            id
        };
        Ok(MemEventChannels { shared, id, queue })
    }

    fn fault_port(&self, op: Method, port: Port) -> Result<()> {
        self.shared
            .fault(op, Target::Port(port))
            .map_err(|errno| HypervisorError::Port { op, port, errno })
    }

    /// Checks that `port` of dom0 was bound through this handle.
    fn check_mine(&self, host: &super::HostState, op: Method, port: Port) -> Result<()> {
        let mine = host
            .domains
            .get(&0)
            .and_then(|d| d.ports.get(&port))
            .is_some_and(|e| e.handle == Some(self.id));
        if mine {
            Ok(())
        } else {
            Err(HypervisorError::Port {
                op,
                port,
                errno: Errno::EINVAL,
            })
        }
    }

    /// Number of delivered events not yet taken with `pending`/`wait`.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }
}

impl EventChannels for MemEventChannels {
    fn bind_interdomain(&self, remote_domid: DomId, remote_port: Port) -> Result<Port> {
        let op = Method::EvtchnBindInterdomain;
        self.shared
            .fault(op, Target::Domain(remote_domid))
            .map_err(|errno| HypervisorError::Domain {
                op,
                domid: remote_domid,
                errno,
            })?;
        let mut host = lock(&self.shared.host);
        host.bind_interdomain(op, 0, remote_domid, remote_port, Some(self.id))
    }

    fn unbind(&self, port: Port) -> Result<()> {
        let op = Method::EvtchnUnbind;
        self.fault_port(op, port)?;
        let mut host = lock(&self.shared.host);
        self.check_mine(&host, op, port)?;
        host.close_port(0, port);
        Ok(())
    }

    fn notify(&self, port: Port) -> Result<()> {
        let op = Method::EvtchnNotify;
        self.fault_port(op, port)?;
        let mut host = lock(&self.shared.host);
        self.check_mine(&host, op, port)?;
        let state = host
            .domains
            .get(&0)
            .and_then(|d| d.ports.get(&port))
            .map(|e| e.state);
        // An unbound port drops the notification silently, as Xen's evtchn_send does.
        if let Some(PortState::Interdomain {
            remote,
            remote_port,
        }) = state
        {
            host.raise(remote, remote_port);
        }
        Ok(())
    }

    fn pending(&self) -> Result<Option<Port>> {
        self.wait(Some(Duration::ZERO))
    }

    fn wait(&self, timeout: Option<Duration>) -> Result<Option<Port>> {
        let op = Method::EvtchnPending;
        self.shared
            .fault(op, Target::None)
            .map_err(|errno| HypervisorError::Call { op, errno })?;
        Ok(self.queue.pop(timeout))
    }

    fn unmask(&self, port: Port) -> Result<()> {
        let op = Method::EvtchnUnmask;
        self.fault_port(op, port)?;
        let mut host = lock(&self.shared.host);
        self.check_mine(&host, op, port)?;
        if let Some(entry) = host
            .domains
            .get_mut(&0)
            .and_then(|d| d.ports.get_mut(&port))
        {
            if entry.latched {
                entry.latched = false;
                entry.masked = true;
                self.queue.push(port);
            } else {
                entry.masked = false;
            }
        }
        Ok(())
    }

    fn as_fd(&self) -> BorrowedFd<'_> {
        self.queue.fd()
    }
}

impl Drop for MemEventChannels {
    fn drop(&mut self) {
        let mut host = lock(&self.shared.host);
        let mine: Vec<Port> = host
            .domains
            .get(&0)
            .map(|d| {
                d.ports
                    .iter()
                    .filter(|(_, e)| e.handle == Some(self.id))
                    .map(|(p, _)| *p)
                    .collect()
            })
            .unwrap_or_default();
        for port in mine {
            host.close_port(0, port);
        }
        host.evtchn_queues.remove(&self.id);
    }
}
