//! A test's hand inside a guest of the in-memory host.

use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;

use super::{lock, GrantEntry, HostState, MemXenStore, PortEntry, PortState, Shared};
use crate::{DomId, GrantRef, Method, Pfn, Port, Result, ShutdownReason, PAGE_SIZE};

/// Why a guest-side action of the in-memory model was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum GuestError {
    /// The domain does not exist.
    #[error("domain {domid} does not exist")]
    NoSuchDomain {
        /// The domain.
        domid: DomId,
    },
    /// No domain id is left.
    #[error("no free domain id")]
    NoFreeDomid,
    /// The domain is paused (or shut down): its vCPUs cannot run, so it cannot act. A
    /// checkpoint that copies memory while the guest still writes shows up here.
    #[error("domain {domid} cannot run: {why}")]
    NotRunning {
        /// The domain.
        domid: DomId,
        /// `"paused"` or `"shut down"`.
        why: &'static str,
    },
    /// No such vCPU.
    #[error("domain {domid} has no vCPU {vcpu}")]
    NoSuchVcpu {
        /// The domain.
        domid: DomId,
        /// The vCPU.
        vcpu: u32,
    },
    /// The page is not populated.
    #[error("pfn {pfn:#x} of domain {domid} is not populated")]
    Unpopulated {
        /// The domain.
        domid: DomId,
        /// The page.
        pfn: Pfn,
    },
    /// An access crosses the end of the page.
    #[error("{len} bytes at offset {offset} do not fit in a page")]
    OutsidePage {
        /// Offset in the page.
        offset: usize,
        /// Length.
        len: usize,
    },
    /// No such grant reference.
    #[error("domain {domid} has no grant ref {gref}")]
    NoSuchGrant {
        /// The domain.
        domid: DomId,
        /// The reference.
        gref: GrantRef,
    },
    /// The grant is still mapped by the grantee.
    #[error("grant ref {gref} of domain {domid} is still mapped {count} times")]
    GrantInUse {
        /// The domain.
        domid: DomId,
        /// The reference.
        gref: GrantRef,
        /// Live mappings.
        count: u32,
    },
    /// No such event channel port, or not bindable.
    #[error("event channel port {port} of domain {domid}: {why}")]
    BadPort {
        /// The domain.
        domid: DomId,
        /// The port.
        port: Port,
        /// What is wrong.
        why: &'static str,
    },
}

/// What a guest does, driven by a test, on a [`MemXen`](super::MemXen) (see the
/// [module docs](super)). Every action that needs the guest's vCPUs to run (writing memory,
/// granting, event channel operations, shutting down) is refused with
/// [`GuestError::NotRunning`] while the domain is paused or shut down; reading is always
/// allowed (it is how tests check what the toolstack wrote).
#[derive(Debug, Clone)]
pub struct MemGuest {
    shared: Arc<Shared>,
    domid: DomId,
}

impl MemGuest {
    pub(crate) fn new(shared: Arc<Shared>, domid: DomId) -> MemGuest {
        MemGuest { shared, domid }
    }

    /// The guest's domain id.
    pub fn domid(&self) -> DomId {
        self.domid
    }

    /// Runs `f` on the domain if it can run.
    fn running<T>(
        &self,
        f: impl FnOnce(&mut HostState) -> std::result::Result<T, GuestError>,
    ) -> std::result::Result<T, GuestError> {
        let mut host = lock(&self.shared.host);
        let domid = self.domid;
        let dom = host
            .domains
            .get(&domid)
            .ok_or(GuestError::NoSuchDomain { domid })?;
        if dom.pause_count > 0 {
            return Err(GuestError::NotRunning {
                domid,
                why: "paused",
            });
        }
        if dom.shutdown.is_some() {
            return Err(GuestError::NotRunning {
                domid,
                why: "shut down",
            });
        }
        f(&mut host)
    }

    /// Writes `data` at `offset` of page `pfn`, like a running guest: marks the page dirty
    /// when log-dirty is on.
    pub fn write(
        &self,
        pfn: Pfn,
        offset: usize,
        data: &[u8],
    ) -> std::result::Result<(), GuestError> {
        let domid = self.domid;
        if !matches!(offset.checked_add(data.len()), Some(end) if end <= PAGE_SIZE) {
            return Err(GuestError::OutsidePage {
                offset,
                len: data.len(),
            });
        }
        self.running(|host| {
            let dom = host
                .domains
                .get_mut(&domid)
                .ok_or(GuestError::NoSuchDomain { domid })?;
            let page = dom
                .page(pfn)
                .ok_or(GuestError::Unpopulated { domid, pfn })?;
            lock(&page)[offset..offset + data.len()].copy_from_slice(data);
            dom.mark_dirty(pfn);
            Ok(())
        })
    }

    /// Writes `data` at `offset` of page `pfn` the way an HVM guest's device model (QEMU)
    /// does: through its own mapping, so also while the vCPUs are paused (an emulated device
    /// completing a transfer), and logged dirty when log-dirty is on (QEMU reports its writes
    /// with `xendevicemodel_modified_memory`). Only a stopped device model stops these writes.
    pub fn dm_write(
        &self,
        pfn: Pfn,
        offset: usize,
        data: &[u8],
    ) -> std::result::Result<(), GuestError> {
        self.write_from_outside(pfn, offset, data, |dom| dom.mark_dirty(pfn))
    }

    /// Writes `data` at `offset` of page `pfn` the way Xen writes a guest page it keeps mapped
    /// itself (`vcpu_info`, runstate area, FIFO event arrays): also while the domain is paused
    /// (event delivery), and **not** logged dirty; only a final-round harvest
    /// ([`LogDirty::log_dirty_clean_final`](crate::LogDirty::log_dirty_clean_final)) reports
    /// such pages, every time, from the first such write on.
    pub fn xen_write(
        &self,
        pfn: Pfn,
        offset: usize,
        data: &[u8],
    ) -> std::result::Result<(), GuestError> {
        self.write_from_outside(pfn, offset, data, |dom| {
            dom.xen_mapped.insert(pfn);
        })
    }

    /// A write that does not need the vCPUs (also while paused); `then` records it.
    fn write_from_outside(
        &self,
        pfn: Pfn,
        offset: usize,
        data: &[u8],
        then: impl FnOnce(&mut super::Domain),
    ) -> std::result::Result<(), GuestError> {
        let domid = self.domid;
        if !matches!(offset.checked_add(data.len()), Some(end) if end <= PAGE_SIZE) {
            return Err(GuestError::OutsidePage {
                offset,
                len: data.len(),
            });
        }
        let mut host = lock(&self.shared.host);
        let dom = host
            .domains
            .get_mut(&domid)
            .ok_or(GuestError::NoSuchDomain { domid })?;
        let page = dom
            .page(pfn)
            .ok_or(GuestError::Unpopulated { domid, pfn })?;
        lock(&page)[offset..offset + data.len()].copy_from_slice(data);
        then(dom);
        Ok(())
    }

    /// Writes a whole page.
    pub fn write_page(
        &self,
        pfn: Pfn,
        data: &[u8; PAGE_SIZE],
    ) -> std::result::Result<(), GuestError> {
        self.write(pfn, 0, data)
    }

    /// Fills a whole page with `byte`.
    pub fn fill_page(&self, pfn: Pfn, byte: u8) -> std::result::Result<(), GuestError> {
        self.write(pfn, 0, &[byte; PAGE_SIZE])
    }

    /// Reads `buf.len()` bytes at `offset` of page `pfn` (allowed while paused).
    pub fn read(
        &self,
        pfn: Pfn,
        offset: usize,
        buf: &mut [u8],
    ) -> std::result::Result<(), GuestError> {
        let domid = self.domid;
        if !matches!(offset.checked_add(buf.len()), Some(end) if end <= PAGE_SIZE) {
            return Err(GuestError::OutsidePage {
                offset,
                len: buf.len(),
            });
        }
        let host = lock(&self.shared.host);
        let dom = host
            .domains
            .get(&domid)
            .ok_or(GuestError::NoSuchDomain { domid })?;
        if !dom.populated(pfn) {
            return Err(GuestError::Unpopulated { domid, pfn });
        }
        match dom.pages.get(&pfn) {
            Some(page) => buf.copy_from_slice(&lock(page)[offset..offset + buf.len()]),
            None => buf.fill(0),
        }
        Ok(())
    }

    /// A copy of page `pfn` (allowed while paused).
    pub fn read_page(&self, pfn: Pfn) -> std::result::Result<Box<[u8; PAGE_SIZE]>, GuestError> {
        let mut page = Box::new([0u8; PAGE_SIZE]);
        self.read(pfn, 0, &mut page[..])?;
        Ok(page)
    }

    /// Waits until the domain is not paused; false on timeout or if it does not exist.
    pub fn wait_running(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut host = lock(&self.shared.host);
        loop {
            match host.domains.get(&self.domid) {
                None => return false,
                Some(dom) if dom.pause_count == 0 => return true,
                Some(_) => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            host = self
                .shared
                .unpaused
                .wait_timeout(host, deadline - now)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// Grants `grantee` access to page `pfn` (`gnttab_grant_foreign_access`).
    pub fn grant_access(
        &self,
        grantee: DomId,
        pfn: Pfn,
        readonly: bool,
    ) -> std::result::Result<GrantRef, GuestError> {
        let domid = self.domid;
        self.running(|host| {
            let dom = host
                .domains
                .get_mut(&domid)
                .ok_or(GuestError::NoSuchDomain { domid })?;
            if !dom.populated(pfn) {
                return Err(GuestError::Unpopulated { domid, pfn });
            }
            let gref = dom.next_gref;
            dom.next_gref += 1;
            dom.grants.insert(
                gref,
                GrantEntry {
                    grantee,
                    pfn,
                    readonly,
                    map_count: 0,
                },
            );
            Ok(gref)
        })
    }

    /// Revokes a grant (`gnttab_end_foreign_access_ref`); refused while it is mapped.
    pub fn end_access(&self, gref: GrantRef) -> std::result::Result<(), GuestError> {
        let domid = self.domid;
        self.running(|host| {
            let dom = host
                .domains
                .get_mut(&domid)
                .ok_or(GuestError::NoSuchDomain { domid })?;
            match dom.grants.get(&gref) {
                None => Err(GuestError::NoSuchGrant { domid, gref }),
                Some(g) if g.map_count > 0 => Err(GuestError::GrantInUse {
                    domid,
                    gref,
                    count: g.map_count,
                }),
                Some(_) => {
                    dom.grants.remove(&gref);
                    Ok(())
                }
            }
        })
    }

    /// Allocates a port that `remote` may bind (`EVTCHNOP_alloc_unbound` from the guest).
    pub fn evtchn_alloc_unbound(&self, remote: DomId) -> std::result::Result<Port, GuestError> {
        let domid = self.domid;
        self.running(|host| {
            let dom = host
                .domains
                .get_mut(&domid)
                .ok_or(GuestError::NoSuchDomain { domid })?;
            let port = dom.free_port();
            dom.ports.insert(
                port,
                PortEntry {
                    state: PortState::Unbound { remote },
                    handle: None,
                    masked: false,
                    latched: false,
                },
            );
            Ok(port)
        })
    }

    /// Binds a new port to `remote_port` of `remote`, which must be unbound and waiting for
    /// this guest (`EVTCHNOP_bind_interdomain` from the guest).
    pub fn evtchn_bind_interdomain(
        &self,
        remote: DomId,
        remote_port: Port,
    ) -> std::result::Result<Port, GuestError> {
        let domid = self.domid;
        self.running(|host| {
            host.bind_interdomain(
                Method::EvtchnBindInterdomain,
                domid,
                remote,
                remote_port,
                None,
            )
            .map_err(|_| GuestError::BadPort {
                domid: remote,
                port: remote_port,
                why: "not unbound for this domain",
            })
        })
    }

    /// Notifies the other end of `port` (`EVTCHNOP_send`).
    pub fn evtchn_notify(&self, port: Port) -> std::result::Result<(), GuestError> {
        let domid = self.domid;
        self.running(|host| {
            let state = host
                .domains
                .get(&domid)
                .and_then(|d| d.ports.get(&port))
                .map(|e| e.state)
                .ok_or(GuestError::BadPort {
                    domid,
                    port,
                    why: "not allocated",
                })?;
            if let PortState::Interdomain {
                remote,
                remote_port,
            } = state
            {
                host.raise(remote, remote_port);
            }
            Ok(())
        })
    }

    /// Closes `port` (`EVTCHNOP_close`).
    pub fn evtchn_close(&self, port: Port) -> std::result::Result<(), GuestError> {
        let domid = self.domid;
        self.running(|host| {
            let known = host
                .domains
                .get(&domid)
                .is_some_and(|d| d.ports.contains_key(&port));
            if !known {
                return Err(GuestError::BadPort {
                    domid,
                    port,
                    why: "not allocated",
                });
            }
            host.close_port(domid, port);
            Ok(())
        })
    }

    /// Takes the ports with an event pending on the guest side, ascending.
    pub fn take_events(&self) -> Vec<Port> {
        let mut host = lock(&self.shared.host);
        match host.domains.get_mut(&self.domid) {
            Some(dom) => std::mem::take(&mut dom.guest_events).into_iter().collect(),
            None => Vec::new(),
        }
    }

    /// Shuts the domain down with `reason` (`SCHEDOP_shutdown`).
    pub fn shutdown(&self, reason: ShutdownReason) -> std::result::Result<(), GuestError> {
        let domid = self.domid;
        self.running(|host| {
            if let Some(dom) = host.domains.get_mut(&domid) {
                dom.shutdown = Some(reason);
            }
            Ok(())
        })
    }

    /// Sets the bytes [`vcpu_context`](crate::DomainControl::vcpu_context) returns for `vcpu`.
    pub fn set_vcpu_context(
        &self,
        vcpu: u32,
        context: &[u8],
    ) -> std::result::Result<(), GuestError> {
        let domid = self.domid;
        let mut host = lock(&self.shared.host);
        let dom = host
            .domains
            .get_mut(&domid)
            .ok_or(GuestError::NoSuchDomain { domid })?;
        match dom.vcpu_contexts.get_mut(vcpu as usize) {
            Some(ctx) => {
                *ctx = context.to_vec();
                Ok(())
            }
            None => Err(GuestError::NoSuchVcpu { domid, vcpu }),
        }
    }

    /// A xenstore connection as this domain (subject to node permissions; fault-injected as
    /// `xs_open`).
    pub fn xenstore(&self) -> Result<MemXenStore> {
        MemXenStore::connect(self.shared.clone(), self.domid)
    }
}
