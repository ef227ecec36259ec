//! `kemari debug`: low-level operations on one Xen host, and the FFI self-test.
//!
//! These commands exist to prove, on a real dom0, that every path from the daemon down to Xen works:
//! the lab's `ffi` scenario runs [`selftest`] against a live guest. They are written against the
//! [`Hypervisor`] traits, so the same code is unit-tested against the in-memory implementation.

use std::time::{Duration, Instant};

use hypervisor::{
    hvm_save, DirtyBitmap, DomId, DomainInfo, GuestType, Hypervisor, HypervisorError, Pfn, Tx,
    XenStore, PAGE_SIZE,
};
use serde::Serialize;

/// Errors of the debug commands.
#[derive(Debug, thiserror::Error)]
pub enum DebugError {
    /// A call to Xen failed.
    #[error("{step}: {source}")]
    Xen {
        /// Which step of the command.
        step: &'static str,
        /// The failed call.
        #[source]
        source: HypervisorError,
    },
    /// Xen answered, but not what the step expected.
    #[error("{step}: {detail}")]
    Check {
        /// Which step of the command.
        step: &'static str,
        /// What was expected and what was seen.
        detail: String,
    },
    /// `kemari debug read-page`: the pfn is not a number.
    #[error("pfn {value:?} is not a number (decimal or 0x-prefixed hex)")]
    Pfn {
        /// The argument.
        value: String,
        /// The parse error.
        source: std::num::ParseIntError,
    },
    /// `kemari debug pause`/`unpause`: Xen refused.
    #[error("{}pausing domain {domain}", if *.pause { "" } else { "un" })]
    Pause {
        /// The domain as given (id or name).
        domain: String,
        /// Pause (true) or unpause.
        pause: bool,
        /// The failed call.
        source: HypervisorError,
    },
    /// `kemari debug xs-read`/`xs-watch`: a xenstore call failed (the hypervisor error says
    /// which, and on which path).
    #[error(transparent)]
    Xenstore(HypervisorError),
}

/// Shorthand for wrapping a hypervisor error with the step it happened in.
fn at<T>(step: &'static str, r: hypervisor::Result<T>) -> Result<T, DebugError> {
    r.map_err(|source| DebugError::Xen { step, source })
}

/// A domain, as `kemari debug domains` prints it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DomainRow {
    /// Domain id.
    pub domid: DomId,
    /// `pv`, `hvm` or `pvh`.
    pub guest_type: &'static str,
    /// `running`, `blocked`, `paused`, `shutdown(<reason>)`, `dying` or `-`.
    pub state: String,
    /// Pages currently allocated.
    pub tot_pages: u64,
    /// Number of vCPUs (max vCPU id + 1).
    pub vcpus: u32,
}

impl From<&DomainInfo> for DomainRow {
    fn from(d: &DomainInfo) -> Self {
        let state = if d.dying {
            "dying".to_string()
        } else if let Some(r) = d.shutdown {
            format!("shutdown({r:?})").to_lowercase()
        } else if d.paused {
            "paused".to_string()
        } else if d.running {
            "running".to_string()
        } else if d.blocked {
            "blocked".to_string()
        } else {
            "-".to_string()
        };
        DomainRow {
            domid: d.domid,
            guest_type: guest_type_name(d.guest_type),
            state,
            tot_pages: d.tot_pages,
            vcpus: d.max_vcpu_id.wrapping_add(1),
        }
    }
}

/// The lower-case name of a guest type.
pub fn guest_type_name(t: GuestType) -> &'static str {
    match t {
        GuestType::Pv => "pv",
        GuestType::Hvm => "hvm",
        GuestType::Pvh => "pvh",
    }
}

/// Lists the host's domains.
pub fn domains(hv: &dyn Hypervisor) -> Result<Vec<DomainRow>, DebugError> {
    let list = at("list domains", hv.list_domains())?;
    Ok(list.iter().map(DomainRow::from).collect())
}

/// One round of log-dirty harvesting.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DirtyRound {
    /// Pages found dirty in this round.
    pub dirty_pages: u64,
    /// Milliseconds since the previous harvest.
    pub interval_ms: u64,
}

/// Enables log-dirty on `domid`, harvests `rounds` rounds `interval` apart (after one discarded
/// initial harvest, which reports every page), then turns log-dirty off again, also on failure.
pub fn log_dirty_rounds(
    hv: &dyn Hypervisor,
    domid: DomId,
    rounds: u32,
    interval: Duration,
) -> Result<Vec<DirtyRound>, DebugError> {
    let max_gpfn = at("maximum gpfn", hv.maximum_gpfn(domid))?;
    let mut bitmap = DirtyBitmap::new(max_gpfn + 1);
    at("enable log-dirty", hv.log_dirty_enable(domid))?;
    let result = (|| {
        at(
            "initial log-dirty clean",
            hv.log_dirty_clean(domid, &mut bitmap),
        )?;
        let mut out = Vec::new();
        let mut last = Instant::now();
        for _ in 0..rounds {
            std::thread::sleep(interval);
            bitmap.clear();
            at("log-dirty clean", hv.log_dirty_clean(domid, &mut bitmap))?;
            let now = Instant::now();
            out.push(DirtyRound {
                dirty_pages: bitmap.count(),
                interval_ms: millis(now - last),
            });
            last = now;
        }
        Ok(out)
    })();
    let off = at("disable log-dirty", hv.log_dirty_disable(domid));
    let out = result?;
    off?;
    Ok(out)
}

/// Copies one guest page out and returns it.
pub fn read_page(
    hv: &dyn Hypervisor,
    domid: DomId,
    pfn: Pfn,
) -> Result<Box<[u8; PAGE_SIZE]>, DebugError> {
    let mut page = Box::new([0u8; PAGE_SIZE]);
    at("read guest page", hv.read_page(domid, pfn, &mut page))?;
    Ok(page)
}

/// FNV-1a, 64 bit: a cheap fingerprint to compare pages in reports (not a security hash).
pub fn fnv1a64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// One step of the self-test.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    /// Short name of the step.
    pub step: &'static str,
    /// Whether it passed.
    pub ok: bool,
    /// What was seen (figures), or why it failed.
    pub detail: String,
    /// How long it took.
    pub millis: u64,
}

/// The self-test's whole report.
#[derive(Debug, Clone, Serialize)]
pub struct SelftestReport {
    /// The guest tested.
    pub domid: DomId,
    /// Every step, in order; the test stops at the first failure.
    pub steps: Vec<StepReport>,
    /// Whether every step passed.
    pub ok: bool,
}

/// Options of [`selftest`].
#[derive(Debug, Clone)]
pub struct SelftestOptions {
    /// Time between log-dirty harvests; the guest must write memory within it.
    pub dirty_interval: Duration,
    /// Log-dirty rounds; at least one must see dirty pages.
    pub dirty_rounds: u32,
    /// How long to wait for each xenstore watch event.
    pub watch_timeout: Duration,
}

impl Default for SelftestOptions {
    fn default() -> Self {
        SelftestOptions {
            dirty_interval: Duration::from_millis(1000),
            dirty_rounds: 3,
            watch_timeout: Duration::from_secs(5),
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Runs every FFI path the daemon depends on against a live guest `domid`, stopping at the first
/// failure: domain listing, pause/unpause (seen through domain info), HVM context (parsed),
/// log-dirty harvest of pages the guest writes, copy-out of a guest page (stable while paused), and
/// xenstore read/write with a watch. The guest is left running, log-dirty off, no nodes left behind.
pub fn selftest(hv: &dyn Hypervisor, domid: DomId, opts: &SelftestOptions) -> SelftestReport {
    let mut steps = Vec::new();
    let mut dirty_pfn: Option<Pfn> = None;
    type StepFn<'a> = Box<dyn FnMut(&mut Option<Pfn>) -> Result<String, DebugError> + 'a>;
    let plan: Vec<(&'static str, StepFn<'_>)> = vec![
        (
            "list-domains",
            Box::new(|_| {
                let list = at("list domains", hv.list_domains())?;
                let found = list.iter().any(|d| d.domid == domid);
                if !found {
                    return Err(DebugError::Check {
                        step: "list domains",
                        detail: format!("domain {domid} not among {} domains", list.len()),
                    });
                }
                Ok(format!("{} domains, {domid} among them", list.len()))
            }),
        ),
        ("pause-unpause", Box::new(|_| pause_unpause(hv, domid))),
        ("hvm-context", Box::new(|_| hvm_context(hv, domid))),
        (
            "log-dirty",
            Box::new(|pfn| log_dirty_step(hv, domid, opts, pfn)),
        ),
        ("map-page", Box::new(|pfn| map_page_step(hv, domid, *pfn))),
        (
            "xenstore-watch",
            Box::new(|_| xenstore_step(hv, domid, opts)),
        ),
    ];
    for (name, mut f) in plan {
        let t0 = Instant::now();
        let r = f(&mut dirty_pfn);
        let ok = r.is_ok();
        steps.push(StepReport {
            step: name,
            ok,
            detail: r.unwrap_or_else(|e| e.to_string()),
            millis: millis(t0.elapsed()),
        });
        if !ok {
            break;
        }
    }
    let ok = steps.iter().all(|s| s.ok) && steps.len() == 6;
    SelftestReport { domid, steps, ok }
}

fn pause_unpause(hv: &dyn Hypervisor, domid: DomId) -> Result<String, DebugError> {
    let before = at("domain info", hv.domain_info(domid))?;
    if before.paused {
        return Err(DebugError::Check {
            step: "pause",
            detail: format!(
                "domain {domid} is already paused; the self-test needs a running guest"
            ),
        });
    }
    let t0 = Instant::now();
    at("pause", hv.pause(domid))?;
    let pause_us = t0.elapsed().as_micros();
    let paused = hv.domain_info(domid);
    let t1 = Instant::now();
    let unpaused = hv.unpause(domid);
    let unpause_us = t1.elapsed().as_micros();
    let paused = at("domain info while paused", paused)?;
    at("unpause", unpaused)?;
    if !paused.paused {
        return Err(DebugError::Check {
            step: "pause",
            detail: format!("domain {domid} not reported paused after pause"),
        });
    }
    let after = at("domain info after unpause", hv.domain_info(domid))?;
    if after.paused {
        return Err(DebugError::Check {
            step: "unpause",
            detail: format!("domain {domid} still reported paused after unpause"),
        });
    }
    Ok(format!(
        "{} guest, pause {pause_us} us, unpause {unpause_us} us",
        guest_type_name(before.guest_type)
    ))
}

fn hvm_context(hv: &dyn Hypervisor, domid: DomId) -> Result<String, DebugError> {
    let info = at("domain info", hv.domain_info(domid))?;
    let blob = at("get HVM context", hv.hvm_context(domid))?;
    let records = hvm_save::parse(&blob).map_err(|e| DebugError::Check {
        step: "parse HVM context",
        detail: e.to_string(),
    })?;
    let cpus = records
        .iter()
        .filter(|r| r.typecode == hvm_save::HVM_SAVE_CPU)
        .count();
    let want = usize::try_from(info.max_vcpu_id.wrapping_add(1)).unwrap_or(usize::MAX);
    if cpus != want {
        return Err(DebugError::Check {
            step: "parse HVM context",
            detail: format!("{cpus} CPU records for {want} vCPUs"),
        });
    }
    Ok(format!(
        "{} bytes, {} records, {cpus} CPU",
        blob.len(),
        records.len()
    ))
}

fn log_dirty_step(
    hv: &dyn Hypervisor,
    domid: DomId,
    opts: &SelftestOptions,
    dirty_pfn: &mut Option<Pfn>,
) -> Result<String, DebugError> {
    let max_gpfn = at("maximum gpfn", hv.maximum_gpfn(domid))?;
    let mut bitmap = DirtyBitmap::new(max_gpfn + 1);
    at("enable log-dirty", hv.log_dirty_enable(domid))?;
    let result = (|| {
        let first = at(
            "initial log-dirty clean",
            hv.log_dirty_clean(domid, &mut bitmap),
        )?;
        let initial = bitmap.count();
        let mut counts = Vec::new();
        for _ in 0..opts.dirty_rounds {
            std::thread::sleep(opts.dirty_interval);
            bitmap.clear();
            at("log-dirty clean", hv.log_dirty_clean(domid, &mut bitmap))?;
            counts.push(bitmap.count());
            if dirty_pfn.is_none() {
                *dirty_pfn = bitmap.iter().next();
            }
        }
        Ok((first, initial, counts))
    })();
    let off = at("disable log-dirty", hv.log_dirty_disable(domid));
    let (first, initial, counts) = result?;
    off?;
    if counts.iter().all(|c| *c == 0) {
        return Err(DebugError::Check {
            step: "log-dirty",
            detail: format!(
                "no dirty pages in {} rounds of {} ms: is the guest running and writing memory?",
                opts.dirty_rounds,
                millis(opts.dirty_interval)
            ),
        });
    }
    Ok(format!(
        "max gpfn {max_gpfn:#x}, initial harvest {initial} pages (stats dirty {}), then dirty per round {counts:?}",
        first.dirty_count
    ))
}

fn map_page_step(
    hv: &dyn Hypervisor,
    domid: DomId,
    pfn: Option<Pfn>,
) -> Result<String, DebugError> {
    let pfn = pfn.ok_or_else(|| DebugError::Check {
        step: "map page",
        detail: "no page seen dirty to read".to_string(),
    })?;
    at("pause for page read", hv.pause(domid))?;
    let reads = (|| {
        let a = read_page(hv, domid, pfn)?;
        let b = read_page(hv, domid, pfn)?;
        Ok::<_, DebugError>((a, b))
    })();
    let unpaused = at("unpause after page read", hv.unpause(domid));
    let (a, b) = reads?;
    unpaused?;
    let (fa, fb) = (fnv1a64(&a[..]), fnv1a64(&b[..]));
    if fa != fb {
        return Err(DebugError::Check {
            step: "map page",
            detail: format!(
                "page {pfn:#x} changed while the guest was paused ({fa:016x} vs {fb:016x})"
            ),
        });
    }
    let nonzero = a.iter().filter(|b| **b != 0).count();
    Ok(format!(
        "pfn {pfn:#x} (a page the guest wrote): fnv1a64 {fa:016x}, {nonzero} non-zero bytes, stable while paused"
    ))
}

fn xenstore_step(
    hv: &dyn Hypervisor,
    domid: DomId,
    opts: &SelftestOptions,
) -> Result<String, DebugError> {
    let xs = at("open xenstore", hv.open_xenstore())?;
    let dompath = at("get domain path", xs.get_domain_path(domid))?;
    let name = at(
        "read domain name",
        xs.read(Tx::NONE, &format!("{dompath}/name")),
    )?;
    let name = String::from_utf8_lossy(&name).into_owned();
    let node = format!("{dompath}/data/kemari-selftest");
    let token = format!("kemari-selftest-{}", std::process::id());
    at("watch", xs.watch(&node, &token))?;
    let result = watch_round_trip(xs.as_ref(), &node, &token, opts.watch_timeout);
    let _ = xs.rm(Tx::NONE, &node);
    let unwatch = at("unwatch", xs.unwatch(&node, &token));
    let events = result?;
    unwatch?;
    Ok(format!(
        "{dompath}/name = {name:?}; watch on {node}: {events} events, write seen"
    ))
}

/// Waits for the watch's initial event, writes the node, waits for the event naming it, and reads
/// the value back. Returns how many events arrived.
fn watch_round_trip(
    xs: &dyn XenStore,
    node: &str,
    token: &str,
    timeout: Duration,
) -> Result<usize, DebugError> {
    let mut events = 0;
    let value = format!("written-at-{:?}", Instant::now());
    // xenstored fires every new watch once; drain it, then expect the event for our write.
    let deadline = Instant::now() + timeout;
    let initial = at("read watch (initial)", xs.read_watch(Some(timeout)))?;
    if initial.is_none() {
        return Err(DebugError::Check {
            step: "watch",
            detail: format!("no initial watch event on {node} within {timeout:?}"),
        });
    }
    events += 1;
    at("write", xs.write(Tx::NONE, node, value.as_bytes()))?;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(DebugError::Check {
                step: "watch",
                detail: format!("no watch event for the write of {node} within {timeout:?}"),
            });
        }
        match at("read watch", xs.read_watch(Some(left)))? {
            Some(ev) if ev.token == token && ev.path == node => {
                events += 1;
                break;
            }
            Some(_) => events += 1,
            None => continue,
        }
    }
    let back = at("read back", xs.read(Tx::NONE, node))?;
    if back != value.as_bytes() {
        return Err(DebugError::Check {
            step: "read back",
            detail: format!("wrote {value:?}, read {:?}", String::from_utf8_lossy(&back)),
        });
    }
    Ok(events)
}

/// Resolves a domain given as a number or as its name (xenstore `/local/domain/<id>/name`).
pub fn resolve_domain(hv: &dyn Hypervisor, spec: &str) -> Result<DomId, DebugError> {
    if let Ok(id) = spec.parse::<DomId>() {
        return Ok(id);
    }
    let xs = at("open xenstore", hv.open_xenstore())?;
    let ids = at(
        "list /local/domain",
        xs.directory(Tx::NONE, "/local/domain"),
    )?;
    let mut names = Vec::new();
    for id in ids {
        let Ok(domid) = id.parse::<DomId>() else {
            continue;
        };
        if let Ok(name) = xs.read(Tx::NONE, &format!("/local/domain/{id}/name")) {
            let name = String::from_utf8_lossy(&name).into_owned();
            if name == spec {
                return Ok(domid);
            }
            names.push(name);
        }
    }
    Err(DebugError::Check {
        step: "resolve domain",
        detail: format!(
            "no domain named {spec:?} (domains: {})",
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        ),
    })
}

/// `kemari debug read-page`'s pfn: decimal or 0x-prefixed hex.
pub fn parse_pfn(s: &str) -> Result<Pfn, DebugError> {
    let r = match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    r.map_err(|source| DebugError::Pfn {
        value: s.to_string(),
        source,
    })
}

/// `kemari debug pause` (`pause`) or `unpause`: the domain, by id or name; its id.
pub fn pause_domain(hv: &dyn Hypervisor, domain: &str, pause: bool) -> Result<DomId, DebugError> {
    let id = resolve_domain(hv, domain)?;
    let r = if pause { hv.pause(id) } else { hv.unpause(id) };
    r.map_err(|source| DebugError::Pause {
        domain: domain.to_string(),
        pause,
        source,
    })?;
    Ok(id)
}

/// `kemari debug xs-read`: a xenstore node's value (lossy UTF-8).
pub fn xs_read(hv: &dyn Hypervisor, path: &str) -> Result<String, DebugError> {
    let xs = hv.open_xenstore().map_err(DebugError::Xenstore)?;
    let v = xs.read(Tx::NONE, path).map_err(DebugError::Xenstore)?;
    Ok(String::from_utf8_lossy(&v).into_owned())
}

/// `kemari debug xs-watch`: watches `path` for `timeout`, handing each event to `on_event`
/// (whose error ends the watch, the watch left registered as before).
pub fn xs_watch<E: From<DebugError>>(
    hv: &dyn Hypervisor,
    path: &str,
    timeout: Duration,
    mut on_event: impl FnMut(&hypervisor::WatchEvent) -> Result<(), E>,
) -> Result<(), E> {
    let xs = hv.open_xenstore().map_err(DebugError::Xenstore)?;
    let token = format!("kemari-{}", std::process::id());
    xs.watch(path, &token).map_err(DebugError::Xenstore)?;
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        if let Some(ev) = xs.read_watch(Some(left)).map_err(DebugError::Xenstore)? {
            on_event(&ev)?;
        }
    }
    xs.unwatch(path, &token).map_err(DebugError::Xenstore)?;
    Ok(())
}

/// `kemari debug domains`' table.
pub fn render_domains(rows: &[DomainRow]) -> String {
    let mut out = format!(
        "{:>5}  {:<4}  {:<16}  {:>10}  {:>5}\n",
        "ID", "TYPE", "STATE", "PAGES", "VCPUS"
    );
    for r in rows {
        out.push_str(&format!(
            "{:>5}  {:<4}  {:<16}  {:>10}  {:>5}\n",
            r.domid, r.guest_type, r.state, r.tot_pages, r.vcpus
        ));
    }
    out
}

/// `kemari debug log-dirty`'s lines, one per round.
pub fn render_dirty_rounds(rounds: &[DirtyRound]) -> String {
    rounds
        .iter()
        .enumerate()
        .map(|(i, r)| {
            format!(
                "round {}: {} dirty pages in {} ms\n",
                i + 1,
                r.dirty_pages,
                r.interval_ms
            )
        })
        .collect()
}

/// `kemari debug read-page`'s text: the page's fingerprint and, with `hexdump`, its first 256
/// bytes, 16 a line.
pub fn render_page(domid: DomId, pfn: Pfn, page: &[u8], hexdump: bool) -> String {
    let mut out = format!(
        "domain {domid} pfn {pfn:#x}: fnv1a64 {:016x}\n",
        fnv1a64(page)
    );
    if hexdump {
        for (i, chunk) in page[..page.len().min(256)].chunks(16).enumerate() {
            let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
            out.push_str(&format!("{:04x}: {}\n", i * 16, hex.join(" ")));
        }
    }
    out
}

/// `kemari debug selftest`'s text: a line per step, then PASS or FAIL.
pub fn render_selftest(domid: DomId, report: &SelftestReport) -> String {
    let mut out = String::new();
    for s in &report.steps {
        out.push_str(&format!(
            "{:<16} {:<4} {:>6} ms  {}\n",
            s.step,
            if s.ok { "ok" } else { "FAIL" },
            s.millis,
            s.detail
        ));
    }
    out.push_str(&format!(
        "selftest of domain {domid}: {}\n",
        if report.ok { "PASS" } else { "FAIL" }
    ));
    out
}
