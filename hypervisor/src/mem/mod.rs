//! In-memory model of one Xen host. **For unit tests and fault injection only**: it runs no
//! guest and talks to no hypervisor; it exists so the daemon's checkpoint, backend and
//! failover logic can be tested without Xen, and made to fail at any call.
//!
//! * [`MemXen`] is the host as the daemon (dom0) sees it: it implements [`Hypervisor`] and
//!   all its traits, and opens [`MemEventChannels`] and [`MemXenStore`] handles.
//! * [`MemGuest`] is a test's hand inside a guest: it writes pages like a running guest
//!   (marking them in the log-dirty bitmap, and **refused while the domain is paused**, so a
//!   checkpoint that forgets to pause shows up as [`GuestError::NotRunning`] in the guest
//!   driver instead of silently copying a moving target; [`MemXen::unpaused_snapshots`]
//!   counts the copies taken from a running domain), grants pages, allocates and
//!   notifies event channels and talks to xenstore as its own domain.
//! * [`FaultPlan`] fails chosen calls (by [`Method`]) and logs all of them.
//!
//! What is modelled, after Xen 4.17: pause as a refcount (`EINVAL` when unpausing an
//! unpaused domain, `EOVERFLOW` beyond 255); log-dirty starting clean, `EINVAL` when enabled
//! twice; guest writes mark pages dirty, toolstack writes ([`GuestMemory`]) do not, and a
//! writable grant mapping marks its pages dirty when it is dropped (as Xen does on unmap);
//! HVM contexts in Xen's save format; event channels with the Linux evtchn device's
//! mask-on-delivery; grants that only the grantee can map, read-only grants refused for
//! writable mappings, no ending access while mapped; xenstore with permissions, watches and
//! optimistic transactions (see [`MemXenStore`]). Dom0 is domain 0, a PV domain without memory;
//! guests get ids from 1.

mod evtchn;
mod fault;
mod gnttab;
mod guest;
mod queue;
mod xenstore;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use crate::hvm_save::{self, HvmContextBuilder, HVM_FILE_MAGIC, HVM_SAVE_CPU, HVM_SAVE_HEADER};
use crate::{
    DirtyBitmap, DomId, DomainControl, DomainInfo, Errno, EventChannelControl, EventChannels,
    EvtchnState, EvtchnStatus, GrantMapping, GrantRef, GrantTables, GuestMemory, GuestType,
    Hypervisor, HypervisorError, LogDirty, LogDirtyStats, Method, Pfn, Port, Result,
    ShutdownReason, XenStore, DOMID_SELF, PAGE_SIZE,
};

pub use evtchn::MemEventChannels;
pub use fault::{CallRecord, FaultPlan, Target, Trigger};
pub use gnttab::MemGrantMapping;
pub use guest::{GuestError, MemGuest};
pub use xenstore::MemXenStore;

use queue::EventQueue;
use xenstore::XsState;

/// Locks a mutex, ignoring poisoning (a panicking test thread must not hide the state).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Number of HVM parameters Xen 4.17 knows (`HVM_NR_PARAMS`).
pub const HVM_NR_PARAMS: u32 = 39;
/// Xen's limit on the toolstack pause count.
pub const MAX_PAUSE_COUNT: u32 = 255;
/// First grant reference a guest hands out (Xen reserves 0..8 for the toolstack).
pub const FIRST_GUEST_GREF: GrantRef = 8;

/// One guest page; shared (`Arc`) with the grant mappings of it.
pub(crate) type Page = Mutex<[u8; PAGE_SIZE]>;

fn new_page() -> Arc<Page> {
    Arc::new(Mutex::new([0u8; PAGE_SIZE]))
}

/// How to build a domain in [`MemXen::create_domain`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainConfig {
    /// Name (written to xenstore).
    pub name: String,
    /// Kind of guest.
    pub guest_type: GuestType,
    /// Number of vCPUs (at least 1).
    pub vcpus: u32,
    /// Pfns `0..memory_pages` are populated (zero-filled until written).
    pub memory_pages: u64,
    /// Pfns inside `0..memory_pages` left unpopulated (MMIO holes).
    pub holes: Vec<Pfn>,
    /// `max_pages` of the domain info (defaults to `memory_pages`).
    pub max_pages: u64,
    /// Initial HVM context; `None` builds one with a header and a CPU record per vCPU.
    pub hvm_context: Option<Vec<u8>>,
}

impl DomainConfig {
    /// An HVM guest with one vCPU and `pages` pages.
    pub fn hvm(pages: u64) -> DomainConfig {
        DomainConfig {
            name: String::from("guest"),
            guest_type: GuestType::Hvm,
            vcpus: 1,
            memory_pages: pages,
            holes: Vec::new(),
            max_pages: pages,
            hvm_context: None,
        }
    }

    /// A PVH guest with one vCPU and `pages` pages.
    pub fn pvh(pages: u64) -> DomainConfig {
        DomainConfig {
            guest_type: GuestType::Pvh,
            ..DomainConfig::hvm(pages)
        }
    }

    /// With `vcpus` vCPUs.
    pub fn with_vcpus(mut self, vcpus: u32) -> DomainConfig {
        self.vcpus = vcpus.max(1);
        self
    }

    /// With these unpopulated pfns.
    pub fn with_holes(mut self, holes: &[Pfn]) -> DomainConfig {
        self.holes = holes.to_vec();
        self
    }

    /// With this name.
    pub fn with_name(mut self, name: &str) -> DomainConfig {
        self.name = name.to_owned();
        self
    }
}

#[derive(Debug, Default)]
pub(crate) struct LogDirtyState {
    pub(crate) dirty: BTreeSet<Pfn>,
    pub(crate) faults: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PortState {
    Unbound { remote: DomId },
    Interdomain { remote: DomId, remote_port: Port },
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct PortEntry {
    pub(crate) state: PortState,
    /// The dom0 event channel handle the port was bound through (`None`: guest side).
    pub(crate) handle: Option<u64>,
    /// Masked by delivery to the evtchn device (handle ports only).
    pub(crate) masked: bool,
    /// A notification arrived while masked; delivered at unmask.
    pub(crate) latched: bool,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct GrantEntry {
    pub(crate) grantee: DomId,
    pub(crate) pfn: Pfn,
    pub(crate) readonly: bool,
    pub(crate) map_count: u32,
}

#[derive(Debug)]
pub(crate) struct Domain {
    pub(crate) guest_type: GuestType,
    pub(crate) max_vcpu_id: u32,
    pub(crate) memory_pages: u64,
    pub(crate) max_pages: u64,
    pub(crate) holes: BTreeSet<Pfn>,
    pub(crate) pages: HashMap<Pfn, Arc<Page>>,
    pub(crate) pause_count: u32,
    pub(crate) shutdown: Option<ShutdownReason>,
    /// Resumes after a suspend ([`DomainControl::resume`]): all, and the fast ones.
    pub(crate) resumes: u64,
    pub(crate) fast_resumes: u64,
    pub(crate) log_dirty: Option<LogDirtyState>,
    pub(crate) hvm_context: Vec<u8>,
    pub(crate) vcpu_contexts: Vec<Vec<u8>>,
    pub(crate) params: BTreeMap<u32, u64>,
    pub(crate) ports: BTreeMap<Port, PortEntry>,
    /// Ports with an event pending on the guest side.
    pub(crate) guest_events: BTreeSet<Port>,
    pub(crate) grants: BTreeMap<GrantRef, GrantEntry>,
    pub(crate) next_gref: GrantRef,
    /// Snapshot calls (memory, contexts, dirty harvest) made while the domain was running.
    pub(crate) unpaused_snapshots: u64,
    /// Pages "Xen" keeps mapped writably and writes without logging them
    /// ([`MemGuest::xen_write`]); a final-round harvest marks them dirty.
    pub(crate) xen_mapped: BTreeSet<Pfn>,
}

impl Domain {
    pub(crate) fn populated(&self, pfn: Pfn) -> bool {
        pfn < self.memory_pages && !self.holes.contains(&pfn)
    }

    /// The page, allocated on first use; `None` if `pfn` is not populated.
    pub(crate) fn page(&mut self, pfn: Pfn) -> Option<Arc<Page>> {
        if !self.populated(pfn) {
            return None;
        }
        Some(self.pages.entry(pfn).or_insert_with(new_page).clone())
    }

    /// Records a guest write to `pfn` in the log-dirty state.
    pub(crate) fn mark_dirty(&mut self, pfn: Pfn) {
        if let Some(ld) = self.log_dirty.as_mut() {
            if ld.dirty.insert(pfn) {
                ld.faults = ld.faults.saturating_add(1);
            }
        }
    }

    /// Counts a snapshot call made while the vCPUs run (a checkpoint that forgot to pause).
    fn note_snapshot(&mut self, op: Method, domid: DomId) {
        if self.pause_count == 0 && self.shutdown.is_none() {
            self.unpaused_snapshots += 1;
            log::debug!("in-memory {op} of domain {domid} while it runs");
        }
    }

    pub(crate) fn is_hvm(&self) -> bool {
        matches!(self.guest_type, GuestType::Hvm | GuestType::Pvh)
    }

    /// Lowest free event channel port (Xen never hands out port 0).
    pub(crate) fn free_port(&self) -> Port {
        let mut port = 1;
        for used in self.ports.keys() {
            if *used != port {
                break;
            }
            port += 1;
        }
        port
    }

    fn info(&self, domid: DomId) -> DomainInfo {
        DomainInfo {
            domid,
            paused: self.pause_count > 0,
            running: self.pause_count == 0 && self.shutdown.is_none(),
            blocked: false,
            dying: false,
            shutdown: self.shutdown,
            guest_type: self.guest_type,
            max_vcpu_id: self.max_vcpu_id,
            tot_pages: self.memory_pages.saturating_sub(self.holes.len() as u64),
            max_pages: self.max_pages,
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct HostState {
    pub(crate) domains: BTreeMap<DomId, Domain>,
    pub(crate) next_domid: DomId,
    pub(crate) evtchn_queues: HashMap<u64, Arc<EventQueue<Port>>>,
    pub(crate) next_handle: u64,
}

impl HostState {
    pub(crate) fn domain(&mut self, op: Method, domid: DomId) -> Result<&mut Domain> {
        self.domains.get_mut(&domid).ok_or(HypervisorError::Domain {
            op,
            domid,
            errno: Errno::ESRCH,
        })
    }

    /// Delivers a notification to `port` of `domid`.
    pub(crate) fn raise(&mut self, domid: DomId, port: Port) {
        let Some(dom) = self.domains.get_mut(&domid) else {
            return;
        };
        let Some(entry) = dom.ports.get_mut(&port) else {
            return;
        };
        match entry.handle {
            Some(handle) => {
                if entry.masked {
                    entry.latched = true;
                } else if let Some(queue) = self.evtchn_queues.get(&handle) {
                    entry.masked = true;
                    queue.push(port);
                }
            }
            None => {
                dom.guest_events.insert(port);
            }
        }
    }

    /// Connects a new port of `local` (bound through `handle`, if any) to the unbound
    /// `remote_port` of `remote`, which must be waiting for `local`.
    pub(crate) fn bind_interdomain(
        &mut self,
        op: Method,
        local: DomId,
        remote: DomId,
        remote_port: Port,
        handle: Option<u64>,
    ) -> Result<Port> {
        let remote_dom = self.domain(op, remote)?;
        match remote_dom.ports.get(&remote_port).map(|e| e.state) {
            Some(PortState::Unbound { remote: allowed }) if allowed == local => {}
            _ => {
                return Err(HypervisorError::Domain {
                    op,
                    domid: remote,
                    errno: Errno::EINVAL,
                })
            }
        }
        let local_dom = self.domain(op, local)?;
        let port = local_dom.free_port();
        local_dom.ports.insert(
            port,
            PortEntry {
                state: PortState::Interdomain {
                    remote,
                    remote_port,
                },
                handle,
                masked: false,
                latched: false,
            },
        );
        if let Some(entry) = self
            .domains
            .get_mut(&remote)
            .and_then(|d| d.ports.get_mut(&remote_port))
        {
            entry.state = PortState::Interdomain {
                remote: local,
                remote_port: port,
            };
        }
        Ok(port)
    }

    /// Closes `port` of `domid`; the other end of an interdomain channel becomes unbound,
    /// waiting for `domid` again (as Xen's `evtchn_close`).
    pub(crate) fn close_port(&mut self, domid: DomId, port: Port) {
        let Some(entry) = self
            .domains
            .get_mut(&domid)
            .and_then(|d| d.ports.remove(&port))
        else {
            return;
        };
        if let Some(dom) = self.domains.get_mut(&domid) {
            dom.guest_events.remove(&port);
        }
        if let Some(handle) = entry.handle {
            if let Some(queue) = self.evtchn_queues.get(&handle) {
                queue.retain(|p| *p != port);
            }
        }
        if let PortState::Interdomain {
            remote,
            remote_port,
        } = entry.state
        {
            if let Some(other) = self
                .domains
                .get_mut(&remote)
                .and_then(|d| d.ports.get_mut(&remote_port))
            {
                other.state = PortState::Unbound { remote: domid };
            }
        }
    }
}

/// State shared by a [`MemXen`] and every handle, guest and mapping made from it.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) host: Mutex<HostState>,
    /// Signalled when a domain's pause count drops to zero or it goes away.
    pub(crate) unpaused: Condvar,
    pub(crate) xs: Mutex<XsState>,
    pub(crate) faults: FaultPlan,
}

impl Shared {
    /// Consults the fault plan; `Err(errno)` if the call must fail.
    pub(crate) fn fault(&self, method: Method, target: Target) -> std::result::Result<(), Errno> {
        match self.faults.check(method, target) {
            Some(errno) => Err(errno),
            None => Ok(()),
        }
    }

    /// Consults the fault plan for a call about `domid`.
    fn fault_dom(&self, op: Method, domid: DomId) -> Result<()> {
        self.fault(op, Target::Domain(domid))
            .map_err(|errno| HypervisorError::Domain { op, domid, errno })
    }
}

/// An in-memory Xen host (see the [module docs](self)). Cheap to clone: clones share the host.
#[derive(Debug, Clone)]
pub struct MemXen {
    shared: Arc<Shared>,
}

impl Default for MemXen {
    fn default() -> Self {
        MemXen::new()
    }
}

impl MemXen {
    /// A host with only dom0, and an empty fault plan.
    pub fn new() -> MemXen {
        MemXen::with_faults(FaultPlan::new())
    }

    /// A host with only dom0, consulting `faults`.
    pub fn with_faults(faults: FaultPlan) -> MemXen {
        let mut host = HostState {
            next_domid: 1,
            next_handle: 1,
            ..HostState::default()
        };
        host.domains.insert(
            0,
            Domain {
                guest_type: GuestType::Pv,
                max_vcpu_id: 0,
                memory_pages: 0,
                max_pages: 0,
                holes: BTreeSet::new(),
                pages: HashMap::new(),
                pause_count: 0,
                shutdown: None,
                resumes: 0,
                fast_resumes: 0,
                log_dirty: None,
                hvm_context: Vec::new(),
                vcpu_contexts: vec![vec![0; 16]],
                params: BTreeMap::new(),
                ports: BTreeMap::new(),
                guest_events: BTreeSet::new(),
                grants: BTreeMap::new(),
                next_gref: FIRST_GUEST_GREF,
                unpaused_snapshots: 0,
                xen_mapped: BTreeSet::new(),
            },
        );
        let shared = Arc::new(Shared {
            host: Mutex::new(host),
            unpaused: Condvar::new(),
            xs: Mutex::new(XsState::new()),
            faults,
        });
        xenstore::introduce_domain(&shared, 0, "Domain-0");
        MemXen { shared }
    }

    /// The fault plan every call of this host consults (shared, not a copy).
    pub fn faults(&self) -> FaultPlan {
        self.shared.faults.clone()
    }

    /// Creates a running domain (not fault-injected: test setup) and its xenstore home
    /// (`/local/domain/<id>` readable by it, with `name`, `domid`, and `device` and `data`
    /// directories it owns); fires `@introduceDomain` watches.
    pub fn create_domain(&self, config: DomainConfig) -> std::result::Result<DomId, GuestError> {
        let vcpus = config.vcpus.max(1);
        let hvm_context = match config.hvm_context {
            Some(ctx) => ctx,
            None => default_hvm_context(vcpus),
        };
        let domid = {
            let mut host = lock(&self.shared.host);
            let domid = host.next_domid;
            if domid >= DOMID_SELF {
                return Err(GuestError::NoFreeDomid);
            }
            host.next_domid += 1;
            host.domains.insert(
                domid,
                Domain {
                    guest_type: config.guest_type,
                    max_vcpu_id: vcpus - 1,
                    memory_pages: config.memory_pages,
                    max_pages: config.max_pages,
                    holes: config.holes.iter().copied().collect(),
                    pages: HashMap::new(),
                    pause_count: 0,
                    shutdown: None,
                    resumes: 0,
                    fast_resumes: 0,
                    log_dirty: None,
                    hvm_context,
                    vcpu_contexts: (0..vcpus)
                        .map(|v| {
                            let mut ctx = vec![0u8; 16];
                            ctx[..4].copy_from_slice(&v.to_le_bytes());
                            ctx
                        })
                        .collect(),
                    params: BTreeMap::new(),
                    ports: BTreeMap::new(),
                    guest_events: BTreeSet::new(),
                    grants: BTreeMap::new(),
                    next_gref: FIRST_GUEST_GREF,
                    unpaused_snapshots: 0,
                    xen_mapped: BTreeSet::new(),
                },
            );
            domid
        };
        xenstore::introduce_domain(&self.shared, domid, &config.name);
        Ok(domid)
    }

    /// Destroys a domain (not fault-injected): closes its event channels (their other ends
    /// become unbound), removes its xenstore home and fires `@releaseDomain` watches. Grant
    /// mappings of its pages stay usable, as Xen keeps mapped pages alive.
    pub fn destroy_domain(&self, domid: DomId) -> std::result::Result<(), GuestError> {
        if domid == 0 {
            return Err(GuestError::NoSuchDomain { domid });
        }
        {
            let mut host = lock(&self.shared.host);
            let ports: Vec<Port> = match host.domains.get(&domid) {
                Some(dom) => dom.ports.keys().copied().collect(),
                None => return Err(GuestError::NoSuchDomain { domid }),
            };
            for port in ports {
                host.close_port(domid, port);
            }
            host.domains.remove(&domid);
        }
        self.shared.unpaused.notify_all();
        xenstore::release_domain(&self.shared, domid);
        Ok(())
    }

    /// A test's hand inside guest `domid` (the domain need not exist yet; calls check).
    pub fn guest(&self, domid: DomId) -> MemGuest {
        MemGuest::new(self.shared.clone(), domid)
    }

    /// The toolstack pause count of a domain (`None`: no such domain).
    pub fn pause_count(&self, domid: DomId) -> Option<u32> {
        lock(&self.shared.host)
            .domains
            .get(&domid)
            .map(|d| d.pause_count)
    }

    /// How many snapshot calls (`read_pages`, `hvm_context`, `hvm_context_partial`,
    /// `vcpu_context`, `log_dirty_clean`/`peek`) found the domain running, i.e. not paused
    /// and not shut down (`None`: no such domain). A checkpoint that forgets to pause makes
    /// this non-zero; tests of checkpoint code should assert it stays 0.
    pub fn unpaused_snapshots(&self, domid: DomId) -> Option<u64> {
        lock(&self.shared.host)
            .domains
            .get(&domid)
            .map(|d| d.unpaused_snapshots)
    }

    /// How many times the domain was resumed after a suspend, and how many of those were fast
    /// (suspend cancelled) (`None`: no such domain).
    pub fn resume_counts(&self, domid: DomId) -> Option<(u64, u64)> {
        lock(&self.shared.host)
            .domains
            .get(&domid)
            .map(|d| (d.resumes, d.fast_resumes))
    }

    /// Whether log-dirty mode is on (`None`: no such domain).
    pub fn log_dirty_enabled(&self, domid: DomId) -> Option<bool> {
        lock(&self.shared.host)
            .domains
            .get(&domid)
            .map(|d| d.log_dirty.is_some())
    }

    /// Number of live grant mappings of `domid`'s grants.
    pub fn grant_map_count(&self, domid: DomId) -> u32 {
        lock(&self.shared.host)
            .domains
            .get(&domid)
            .map(|d| d.grants.values().map(|g| g.map_count).sum())
            .unwrap_or(0)
    }

    /// Opens a xenstore connection as domain `domid` (fault-injected as `xs_open`).
    pub fn open_xenstore_as(&self, domid: DomId) -> Result<MemXenStore> {
        MemXenStore::connect(self.shared.clone(), domid)
    }
}

/// A context with a header record and one CPU record per vCPU (bodies are placeholders of
/// the model, not Xen's structures).
fn default_hvm_context(vcpus: u32) -> Vec<u8> {
    let mut header = Vec::with_capacity(24);
    header.extend_from_slice(&HVM_FILE_MAGIC.to_le_bytes());
    header.extend_from_slice(&1u32.to_le_bytes());
    header.extend_from_slice(&[0u8; 16]);
    let mut builder = HvmContextBuilder::new();
    let mut bodies = vec![(HVM_SAVE_HEADER, 0u16, header)];
    for vcpu in 0..vcpus {
        let mut body = vec![0u8; 64];
        body[..4].copy_from_slice(&vcpu.to_le_bytes());
        bodies.push((HVM_SAVE_CPU, u16::try_from(vcpu).unwrap_or(u16::MAX), body));
    }
    for (typecode, instance, body) in bodies {
        if let Err(err) = builder.push(typecode, instance, &body) {
            log::warn!("in-memory default HVM context: {err}");
        }
    }
    builder.finish()
}

impl DomainControl for MemXen {
    fn list_domains(&self) -> Result<Vec<DomainInfo>> {
        self.shared
            .fault(Method::ListDomains, Target::None)
            .map_err(|errno| HypervisorError::Call {
                op: Method::ListDomains,
                errno,
            })?;
        let host = lock(&self.shared.host);
        Ok(host.domains.iter().map(|(id, d)| d.info(*id)).collect())
    }

    fn domain_info(&self, domid: DomId) -> Result<DomainInfo> {
        let op = Method::DomainInfo;
        self.shared.fault_dom(op, domid)?;
        let mut host = lock(&self.shared.host);
        Ok(host.domain(op, domid)?.info(domid))
    }

    fn pause(&self, domid: DomId) -> Result<()> {
        let op = Method::Pause;
        self.shared.fault_dom(op, domid)?;
        let invalid = |errno| HypervisorError::Domain { op, domid, errno };
        if domid == 0 {
            return Err(invalid(Errno::EINVAL));
        }
        let mut host = lock(&self.shared.host);
        let dom = host.domain(op, domid)?;
        if dom.pause_count >= MAX_PAUSE_COUNT {
            return Err(invalid(Errno::EOVERFLOW));
        }
        dom.pause_count += 1;
        Ok(())
    }

    fn unpause(&self, domid: DomId) -> Result<()> {
        let op = Method::Unpause;
        self.shared.fault_dom(op, domid)?;
        let mut host = lock(&self.shared.host);
        let dom = host.domain(op, domid)?;
        if dom.pause_count == 0 {
            return Err(HypervisorError::Domain {
                op,
                domid,
                errno: Errno::EINVAL,
            });
        }
        dom.pause_count -= 1;
        if dom.pause_count == 0 {
            self.shared.unpaused.notify_all();
        }
        Ok(())
    }

    fn resume(&self, domid: DomId, fast: bool) -> Result<()> {
        let op = Method::Resume;
        self.shared.fault_dom(op, domid)?;
        let mut host = lock(&self.shared.host);
        let dom = host.domain(op, domid)?;
        if dom.shutdown != Some(ShutdownReason::Suspend) {
            return Err(HypervisorError::Domain {
                op,
                domid,
                errno: Errno::EINVAL,
            });
        }
        dom.shutdown = None;
        dom.resumes += 1;
        if fast {
            dom.fast_resumes += 1;
        }
        if dom.pause_count == 0 {
            self.shared.unpaused.notify_all();
        }
        Ok(())
    }

    fn hvm_context(&self, domid: DomId) -> Result<Vec<u8>> {
        let op = Method::HvmContext;
        self.shared.fault_dom(op, domid)?;
        let mut host = lock(&self.shared.host);
        let dom = host.domain(op, domid)?;
        dom.note_snapshot(op, domid);
        if !dom.is_hvm() {
            return Err(HypervisorError::Domain {
                op,
                domid,
                errno: Errno::EINVAL,
            });
        }
        Ok(dom.hvm_context.clone())
    }

    fn set_hvm_context(&self, domid: DomId, context: &[u8]) -> Result<()> {
        let op = Method::SetHvmContext;
        self.shared.fault_dom(op, domid)?;
        let invalid = HypervisorError::Domain {
            op,
            domid,
            errno: Errno::EINVAL,
        };
        let mut host = lock(&self.shared.host);
        let dom = host.domain(op, domid)?;
        if !dom.is_hvm() {
            return Err(invalid);
        }
        if let Err(err) = hvm_save::parse(context) {
            log::debug!("in-memory set_hvm_context of domain {domid}: {err}");
            return Err(invalid);
        }
        dom.hvm_context = context.to_vec();
        Ok(())
    }

    fn hvm_context_partial(&self, domid: DomId, typecode: u16, instance: u16) -> Result<Vec<u8>> {
        let op = Method::HvmContextPartial;
        self.shared.fault_dom(op, domid)?;
        let err = |errno| HypervisorError::Domain { op, domid, errno };
        let mut host = lock(&self.shared.host);
        let dom = host.domain(op, domid)?;
        dom.note_snapshot(op, domid);
        if !dom.is_hvm() {
            return Err(err(Errno::EINVAL));
        }
        match hvm_save::find(&dom.hvm_context, typecode, instance) {
            Ok(Some(body)) => Ok(body.to_vec()),
            Ok(None) => Err(err(Errno::ENOENT)),
            Err(_) => Err(err(Errno::EINVAL)),
        }
    }

    fn vcpu_context(&self, domid: DomId, vcpu: u32) -> Result<Vec<u8>> {
        let op = Method::VcpuContext;
        self.shared.fault_dom(op, domid)?;
        let mut host = lock(&self.shared.host);
        let dom = host.domain(op, domid)?;
        dom.note_snapshot(op, domid);
        dom.vcpu_contexts
            .get(vcpu as usize)
            .cloned()
            .ok_or(HypervisorError::Domain {
                op,
                domid,
                errno: Errno::EINVAL,
            })
    }

    fn hvm_param(&self, domid: DomId, param: u32) -> Result<u64> {
        let op = Method::HvmParam;
        self.shared.fault_dom(op, domid)?;
        let mut host = lock(&self.shared.host);
        let dom = host.domain(op, domid)?;
        if param >= HVM_NR_PARAMS || !dom.is_hvm() {
            return Err(HypervisorError::Domain {
                op,
                domid,
                errno: Errno::EINVAL,
            });
        }
        Ok(dom.params.get(&param).copied().unwrap_or(0))
    }

    fn set_hvm_param(&self, domid: DomId, param: u32, value: u64) -> Result<()> {
        let op = Method::SetHvmParam;
        self.shared.fault_dom(op, domid)?;
        let mut host = lock(&self.shared.host);
        let dom = host.domain(op, domid)?;
        if param >= HVM_NR_PARAMS || !dom.is_hvm() {
            return Err(HypervisorError::Domain {
                op,
                domid,
                errno: Errno::EINVAL,
            });
        }
        dom.params.insert(param, value);
        Ok(())
    }

    fn maximum_gpfn(&self, domid: DomId) -> Result<Pfn> {
        let op = Method::MaximumGpfn;
        self.shared.fault_dom(op, domid)?;
        let mut host = lock(&self.shared.host);
        Ok(host.domain(op, domid)?.memory_pages.saturating_sub(1))
    }
}

/// Checks a batch buffer's size.
fn check_batch(op: Method, pfns: &[Pfn], len: usize) -> Result<()> {
    let expected = pfns.len().saturating_mul(PAGE_SIZE);
    if len != expected {
        return Err(HypervisorError::BufferSize {
            op,
            expected,
            actual: len,
        });
    }
    Ok(())
}

impl GuestMemory for MemXen {
    fn read_pages(&self, domid: DomId, pfns: &[Pfn], buf: &mut [u8]) -> Result<()> {
        let op = Method::ReadPages;
        self.shared.fault_dom(op, domid)?;
        check_batch(op, pfns, buf.len())?;
        let mut host = lock(&self.shared.host);
        let dom = host.domain(op, domid)?;
        dom.note_snapshot(op, domid);
        let mut failures = Vec::new();
        for (pfn, slot) in pfns.iter().zip(buf.chunks_exact_mut(PAGE_SIZE)) {
            if !dom.populated(*pfn) {
                slot.fill(0);
                failures.push((*pfn, Errno::ENOENT));
                continue;
            }
            match dom.pages.get(pfn) {
                Some(page) => slot.copy_from_slice(&*lock(page)),
                None => slot.fill(0),
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(HypervisorError::Pages {
                op,
                domid,
                failures,
            })
        }
    }

    fn write_pages(&self, domid: DomId, pfns: &[Pfn], data: &[u8]) -> Result<()> {
        let op = Method::WritePages;
        self.shared.fault_dom(op, domid)?;
        check_batch(op, pfns, data.len())?;
        let mut host = lock(&self.shared.host);
        let dom = host.domain(op, domid)?;
        let mut failures = Vec::new();
        for (pfn, chunk) in pfns.iter().zip(data.chunks_exact(PAGE_SIZE)) {
            match dom.page(*pfn) {
                Some(page) => lock(&page).copy_from_slice(chunk),
                None => failures.push((*pfn, Errno::ENOENT)),
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(HypervisorError::Pages {
                op,
                domid,
                failures,
            })
        }
    }
}

impl MemXen {
    fn log_dirty_harvest(
        &self,
        op: Method,
        domid: DomId,
        bitmap: &mut DirtyBitmap,
        reset: bool,
        final_round: bool,
    ) -> Result<LogDirtyStats> {
        self.shared.fault_dom(op, domid)?;
        let mut host = lock(&self.shared.host);
        let dom = host.domain(op, domid)?;
        dom.note_snapshot(op, domid);
        let xen_mapped: Vec<Pfn> = if final_round {
            dom.xen_mapped.iter().copied().collect()
        } else {
            Vec::new()
        };
        let Some(ld) = dom.log_dirty.as_mut() else {
            return Err(HypervisorError::Domain {
                op,
                domid,
                errno: Errno::EINVAL,
            });
        };
        ld.dirty.extend(xen_mapped);
        bitmap.clear();
        let limit = bitmap.nr_pages();
        let covered: Vec<Pfn> = ld.dirty.range(..limit).copied().collect();
        for pfn in &covered {
            bitmap.set(*pfn);
        }
        let stats = LogDirtyStats {
            fault_count: ld.faults,
            dirty_count: u32::try_from(covered.len()).unwrap_or(u32::MAX),
        };
        if reset {
            for pfn in &covered {
                ld.dirty.remove(pfn);
            }
            ld.faults = 0;
        }
        Ok(stats)
    }
}

impl LogDirty for MemXen {
    fn log_dirty_enable(&self, domid: DomId) -> Result<()> {
        let op = Method::LogDirtyEnable;
        self.shared.fault_dom(op, domid)?;
        let mut host = lock(&self.shared.host);
        let dom = host.domain(op, domid)?;
        if dom.log_dirty.is_some() || !dom.is_hvm() {
            return Err(HypervisorError::Domain {
                op,
                domid,
                errno: Errno::EINVAL,
            });
        }
        dom.log_dirty = Some(LogDirtyState::default());
        Ok(())
    }

    fn log_dirty_clean(&self, domid: DomId, bitmap: &mut DirtyBitmap) -> Result<LogDirtyStats> {
        self.log_dirty_harvest(Method::LogDirtyClean, domid, bitmap, true, false)
    }

    /// Marks the pages written through [`MemGuest::xen_write`] dirty first (consulted and
    /// logged as [`Method::LogDirtyClean`], the same hypercall).
    fn log_dirty_clean_final(
        &self,
        domid: DomId,
        bitmap: &mut DirtyBitmap,
    ) -> Result<LogDirtyStats> {
        self.log_dirty_harvest(Method::LogDirtyClean, domid, bitmap, true, true)
    }

    fn log_dirty_peek(&self, domid: DomId, bitmap: &mut DirtyBitmap) -> Result<LogDirtyStats> {
        self.log_dirty_harvest(Method::LogDirtyPeek, domid, bitmap, false, false)
    }

    fn log_dirty_disable(&self, domid: DomId) -> Result<()> {
        let op = Method::LogDirtyDisable;
        self.shared.fault_dom(op, domid)?;
        let mut host = lock(&self.shared.host);
        host.domain(op, domid)?.log_dirty = None;
        Ok(())
    }
}

impl EventChannelControl for MemXen {
    fn evtchn_alloc_unbound(&self, domid: DomId, remote_domid: DomId) -> Result<Port> {
        let op = Method::EvtchnAllocUnbound;
        self.shared.fault_dom(op, domid)?;
        let remote = if remote_domid == DOMID_SELF {
            0
        } else {
            remote_domid
        };
        let mut host = lock(&self.shared.host);
        let dom = host.domain(op, domid)?;
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
    }

    fn evtchn_status(&self, domid: DomId, port: Port) -> Result<EvtchnStatus> {
        let op = Method::EvtchnStatus;
        self.shared.fault_dom(op, domid)?;
        let mut host = lock(&self.shared.host);
        let dom = host.domain(op, domid)?;
        let state = match dom.ports.get(&port).map(|e| e.state) {
            None => EvtchnState::Closed,
            Some(PortState::Unbound { remote }) => EvtchnState::Unbound {
                remote_domid: remote,
            },
            Some(PortState::Interdomain {
                remote,
                remote_port,
            }) => EvtchnState::Interdomain {
                remote_domid: remote,
                remote_port,
            },
        };
        Ok(EvtchnStatus { vcpu: 0, state })
    }
}

impl GrantTables for MemXen {
    fn map_grant_refs(
        &self,
        domid: DomId,
        refs: &[GrantRef],
        writable: bool,
    ) -> Result<Box<dyn GrantMapping>> {
        Ok(Box::new(gnttab::map(&self.shared, domid, refs, writable)?))
    }
}

impl Hypervisor for MemXen {
    fn open_event_channels(&self) -> Result<Box<dyn EventChannels>> {
        Ok(Box::new(MemEventChannels::open(self.shared.clone())?))
    }

    fn open_xenstore(&self) -> Result<Box<dyn XenStore>> {
        Ok(Box::new(MemXenStore::connect(self.shared.clone(), 0)?))
    }
}
