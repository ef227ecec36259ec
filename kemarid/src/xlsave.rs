//! Writing a complete image of a running HVM or PVH domain in `xl save` format
//! (`kemari debug save`), restorable by stock `xl restore`.
//!
//! The image is what `xl save` writes (see `docs/stream.md`): xl's header with the domain's
//! libxl configuration as JSON ([`crate::domconfig`]), libxl's stream v2 header, a
//! `LIBXC_CONTEXT` record followed by a libxc stream v3, then for HVM guests the device model's
//! records (`EMULATOR_XENSTORE_DATA`, `EMULATOR_CONTEXT`), and libxl's `END`.
//!
//! The libxc stream follows `xg_sr_save.c` for an HVM/PVH guest (both are `DHDR_TYPE_X86_HVM`):
//! image and domain headers, `STATIC_DATA_END`, `PAGE_DATA` records of up to 1024 pages over
//! `0..=maximum_gpfn`, then `HVM_CONTEXT`, `HVM_PARAMS` (the 16 parameters libxc's
//! `write_hvm_params` sends, non-zero ones only) and `END`, written by
//! [`kemari_stream::image::ImageWriter`]. Frames that cannot be mapped are unpopulated (MMIO
//! holes, ballooned-out memory): libxc lists them as `XTAB` entries without data, which a
//! restore of a non-checkpointed stream skips; here they are simply left out, with the same
//! effect (the restored domain has exactly the populated frames of the image).
//!
//! Left out, because the restorer does not need them on a host of the same kind: `X86_TSC_INFO`
//! (the restored domain keeps the TSC mode from its config), and the CPUID/MSR policy records
//! (without them libxl applies the config's policy, as for streams from Xen < 4.14).
//!
//! Two ways to quiesce the guest ([`SaveMode`]):
//! * [`SaveMode::Suspend`] (what `xl save` does): ask the guest to suspend through xenstore
//!   (`control/shutdown` = `suspend`) and wait until Xen reports it shut down for suspend. The
//!   guest's kernel then resumes through its own resume path after `xl restore`, re-creating its
//!   event channels, grant frames and xenstore connection, which no toolstack call can save
//!   (design notes §3). The suspended original cannot be resumed by this tool (that needs
//!   `xc_domain_resume`, outside our FFI), so the caller destroys it, like `xl save` without `-c`.
//! * [`SaveMode::Pause`]: pause, save, unpause. The guest keeps running, but a guest that uses
//!   Xen's PV interfaces (PVH, PVHVM Linux) will not find its event channels in a domain
//!   restored from such an image: it is for inspection and decoder tests.

use std::collections::HashSet;
use std::io::Write;
use std::time::{Duration, Instant};

use hypervisor::{
    DomId, DomainInfo, Errno, GuestType, Hypervisor, HypervisorError, PauseGuard, Pfn,
    ShutdownReason, Tx, XenStore, PAGE_SIZE,
};
use kemari_stream::image::{GuestKind, ImageSpec, ImageWriter};
use kemari_stream::{Limits, MAX_PAGES_PER_RECORD};
use serde::Serialize;
use thiserror::Error;

use crate::counting::Counting;
use crate::qmp::{QmpDeviceModel, QmpError};

/// The HVM parameters libxc's `write_hvm_params` (`xg_sr_save_x86_hvm.c`) sends, by number:
/// STORE_PFN, IOREQ_PFN, BUFIOREQ_PFN, PAGING_RING_PFN, MONITOR_RING_PFN, SHARING_RING_PFN,
/// VM86_TSS_SIZED, CONSOLE_PFN, ACPI_IOPORTS_LOCATION, VIRIDIAN, IDENT_PT,
/// VM_GENERATION_ID_ADDR, IOREQ_SERVER_PFN, NR_IOREQ_SERVER_PAGES, X87_FIP_WIDTH, MCA_CAP.
pub const SAVED_HVM_PARAMS: [u32; 16] =
    [1, 5, 6, 27, 28, 29, 37, 17, 19, 9, 12, 34, 32, 33, 36, 38];

/// `HVM_PARAM_CALLBACK_IRQ`: non-zero once a guest's PV drivers registered their upcall.
pub const HVM_PARAM_CALLBACK_IRQ: u32 = 0;

/// Whether `domid` is an HVM guest without PV drivers: no event-channel callback registered
/// (`HVM_PARAM_CALLBACK_IRQ` 0), so it cannot be asked to suspend through xenstore. A guest
/// that has not run yet (created paused) has registered nothing either; callers that must
/// tell it apart look at [`DomainInfo::paused`] first.
pub fn hvm_without_pv_drivers(
    hv: &dyn Hypervisor,
    domid: DomId,
    info: &DomainInfo,
) -> hypervisor::Result<bool> {
    Ok(info.guest_type == GuestType::Hvm && hv.hvm_param(domid, HVM_PARAM_CALLBACK_IRQ)? == 0)
}

/// Xen version written in the domain header (kemari runs on Xen 4.17 only).
pub const XEN_VERSION: (u32, u32) = (4, 17);

/// Errors of [`save_image`].
#[derive(Debug, Error)]
pub enum SaveError {
    /// A call to Xen failed.
    #[error("domain {domid}: {step}: {source}")]
    Xen {
        /// The domain.
        domid: DomId,
        /// What was being done.
        step: &'static str,
        /// The failed call.
        #[source]
        source: HypervisorError,
    },
    /// The domain cannot be saved this way.
    #[error("domain {domid}: {why}")]
    Unsupported {
        /// The domain.
        domid: DomId,
        /// Why.
        why: String,
    },
    /// The guest did not suspend in time.
    #[error("domain {domid}: guest did not suspend within {timeout:?} (control/shutdown {state}); the request was {cancelled}")]
    SuspendTimeout {
        /// The domain.
        domid: DomId,
        /// The limit.
        timeout: Duration,
        /// What the guest had done with the request.
        state: String,
        /// Whether the request could be withdrawn.
        cancelled: &'static str,
    },
    /// The domain shut down for another reason while we waited.
    #[error("domain {domid}: shut down ({reason:?}) instead of suspending")]
    WrongShutdown {
        /// The domain.
        domid: DomId,
        /// What Xen reported.
        reason: ShutdownReason,
    },
    /// The device model's state could not be saved.
    #[error("domain {domid}: device model state: {source}")]
    DeviceModel {
        /// The domain.
        domid: DomId,
        /// The QMP failure.
        #[source]
        source: QmpError,
    },
    /// Writing the image failed.
    #[error("domain {domid}: writing the image ({what}): {detail}")]
    Write {
        /// The domain.
        domid: DomId,
        /// Which part.
        what: &'static str,
        /// The encoder's or writer's error.
        detail: String,
    },
}

/// How the guest is quiesced for the save (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum SaveMode {
    /// Cooperative suspend through xenstore, like `xl save`; the caller destroys the guest.
    Suspend,
    /// Toolstack pause; the guest runs on afterwards.
    Pause,
}

/// Source of the device model's state for HVM guests.
pub trait EmulatorState {
    /// Stops the device model and returns its saved state (QEMU's `xen-save-devices-state`).
    fn save_stopped(&self) -> Result<Vec<u8>, QmpError>;
    /// Lets the device model run again after [`save_stopped`](Self::save_stopped) (only used
    /// in [`SaveMode::Pause`]).
    fn resume(&self) -> Result<(), QmpError>;
}

impl EmulatorState for QmpDeviceModel {
    fn save_stopped(&self) -> Result<Vec<u8>, QmpError> {
        self.stop_and_save()
    }

    fn resume(&self) -> Result<(), QmpError> {
        self.connect()?.cont()
    }
}

/// Options of [`save_image`].
#[derive(Debug, Clone)]
pub struct SaveOptions {
    /// How to quiesce the guest.
    pub mode: SaveMode,
    /// How long the guest may take to suspend ([`SaveMode::Suspend`]); libxl waits 60 s.
    pub suspend_timeout: Duration,
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions {
            mode: SaveMode::Suspend,
            suspend_timeout: Duration::from_secs(60),
        }
    }
}

/// What [`save_image`] did, with its figures.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SaveReport {
    /// The domain.
    pub domid: DomId,
    /// `hvm` or `pvh`.
    pub guest_type: &'static str,
    /// How it was quiesced.
    pub mode: SaveMode,
    /// Frames scanned (`maximum_gpfn + 1`).
    pub pfns_scanned: u64,
    /// Pages written with their contents.
    pub pages: u64,
    /// Unpopulated frames (left out of the image).
    pub holes: u64,
    /// Bytes of QEMU device state (0 for PVH).
    pub device_state_bytes: u64,
    /// Bytes of the image.
    pub image_bytes: u64,
    /// Time from the suspend request (or pause) until the guest was quiescent.
    pub quiesce_ms: u64,
    /// Time spent copying memory into the image.
    pub memory_ms: u64,
    /// Time from the start until the image was complete.
    pub total_ms: u64,
}

fn xen<T>(domid: DomId, step: &'static str, r: hypervisor::Result<T>) -> Result<T, SaveError> {
    r.map_err(|source| SaveError::Xen {
        domid,
        step,
        source,
    })
}

fn wr<T, E: std::fmt::Display>(
    domid: DomId,
    what: &'static str,
    r: Result<T, E>,
) -> Result<T, SaveError> {
    r.map_err(|e| SaveError::Write {
        domid,
        what,
        detail: e.to_string(),
    })
}

/// Asks the guest to suspend (xenstore `control/shutdown` = `suspend`) and waits until Xen
/// reports it shut down for suspend. On timeout the request is withdrawn if the guest has not
/// taken it yet, as libxl does.
pub fn suspend_guest(
    hv: &dyn Hypervisor,
    xs: &dyn XenStore,
    domid: DomId,
    timeout: Duration,
) -> Result<(), SaveError> {
    let node = format!("/local/domain/{domid}/control/shutdown");
    xen(
        domid,
        "request suspend",
        xs.write(Tx::NONE, &node, b"suspend"),
    )?;
    let start = Instant::now();
    let mut delay = Duration::from_millis(5);
    loop {
        let info = xen(domid, "wait for suspend", hv.domain_info(domid))?;
        match info.shutdown {
            Some(ShutdownReason::Suspend) => return Ok(()),
            Some(reason) => return Err(SaveError::WrongShutdown { domid, reason }),
            None => {}
        }
        if info.dying {
            return Err(SaveError::Unsupported {
                domid,
                why: "the domain is dying".into(),
            });
        }
        if start.elapsed() >= timeout {
            break;
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(100));
    }
    // Withdraw the request unless the guest has acknowledged it (cleared the node).
    let state = xs
        .read(Tx::NONE, &node)
        .map(|v| String::from_utf8_lossy(&v).into_owned())
        .unwrap_or_default();
    let cancelled = if state == "suspend" {
        match hypervisor::with_transaction(xs, 5, |tx| {
            if xs.read(tx, &node)? == b"suspend" {
                xs.write(tx, &node, b"")?;
            }
            Ok(())
        }) {
            Ok(()) => "withdrawn",
            Err(err) => {
                log::warn!("domain {domid}: cannot withdraw the suspend request: {err}");
                "not withdrawn"
            }
        }
    } else {
        "acknowledged by the guest, which may still suspend"
    };
    Err(SaveError::SuspendTimeout {
        domid,
        timeout,
        state: format!("{state:?}"),
        cancelled,
    })
}

/// The device model's xenstore data as libxl's `libxl__save_emulator_xenstore_data` collects
/// it: for each `physmap/<id>` under `/local/domain/0/device-model/<domid>`, the keys
/// `start_addr`, `size`, `name`, as NUL-terminated `key\0value\0` pairs relative to that path.
pub fn emulator_xenstore_data(xs: &dyn XenStore, domid: DomId) -> Result<Vec<u8>, SaveError> {
    let root = format!("/local/domain/0/device-model/{domid}");
    let entries = match xs.directory(Tx::NONE, &format!("{root}/physmap")) {
        Ok(e) => e,
        Err(err) if err.errno() == Some(Errno::ENOENT) => return Ok(Vec::new()),
        Err(source) => {
            return Err(SaveError::Xen {
                domid,
                step: "read device-model physmap",
                source,
            })
        }
    };
    let mut out = Vec::new();
    for entry in entries {
        for sub in ["start_addr", "size", "name"] {
            let key = format!("physmap/{entry}/{sub}");
            let value = xen(
                domid,
                "read device-model physmap entry",
                xs.read(Tx::NONE, &format!("{root}/{key}")),
            )?;
            out.extend_from_slice(key.as_bytes());
            out.push(0);
            out.extend_from_slice(&value);
            out.push(0);
        }
    }
    Ok(out)
}

/// Writes the memory of `domid` (paused or suspended) through `image`, in batches of up to
/// 1024 frames over `0..=max_gpfn`. Frames that cannot be mapped are unpopulated and left out.
/// Returns (pages, holes).
fn write_memory<W: Write>(
    hv: &dyn Hypervisor,
    domid: DomId,
    max_gpfn: Pfn,
    image: &mut ImageWriter<W>,
) -> Result<(u64, u64), SaveError> {
    let batch = MAX_PAGES_PER_RECORD as u64;
    let mut buf = vec![0u8; batch as usize * PAGE_SIZE];
    let (mut pages, mut holes) = (0u64, 0u64);
    let mut start: Pfn = 0;
    while start <= max_gpfn {
        let end = (start + batch - 1).min(max_gpfn);
        let pfns: Vec<Pfn> = (start..=end).collect();
        let bytes = &mut buf[..pfns.len() * PAGE_SIZE];
        let failed: HashSet<Pfn> = match hv.read_pages(domid, &pfns, bytes) {
            Ok(()) => HashSet::new(),
            Err(HypervisorError::Pages { failures, .. }) => {
                failures.into_iter().map(|(pfn, _)| pfn).collect()
            }
            Err(source) => {
                return Err(SaveError::Xen {
                    domid,
                    step: "read guest pages",
                    source,
                })
            }
        };
        let present: Vec<(u64, &[u8; PAGE_SIZE])> = pfns
            .iter()
            .zip(bytes.chunks_exact(PAGE_SIZE))
            .filter(|(pfn, _)| !failed.contains(pfn))
            .filter_map(|(&pfn, page)| page.try_into().ok().map(|page| (pfn, page)))
            .collect();
        holes += (pfns.len() - present.len()) as u64;
        pages += present.len() as u64;
        if !present.is_empty() {
            wr(domid, "PAGE_DATA", image.write_pages(&present))?;
        }
        start = end + 1;
    }
    Ok((pages, holes))
}

/// The HVM parameters libxc saves, non-zero ones only.
pub fn saved_hvm_params(hv: &dyn Hypervisor, domid: DomId) -> Result<Vec<(u64, u64)>, SaveError> {
    let mut params = Vec::new();
    for index in SAVED_HVM_PARAMS {
        let value = hv
            .hvm_param(domid, index)
            .map_err(|source| SaveError::Xen {
                domid,
                step: "read HVM parameter",
                source,
            })?;
        if value != 0 {
            params.push((u64::from(index), value));
        }
    }
    Ok(params)
}

/// Writes the whole image of `domid` to `out` (see the module docs). `config_json` is the
/// libxl configuration for the image ([`crate::domconfig::domain_config_json`]); `emulator`
/// saves QEMU's state and is required for HVM guests.
///
/// In [`SaveMode::Pause`] the guest (and its device model) runs again when this returns, on
/// every path. In [`SaveMode::Suspend`] it stays suspended, also on failure.
pub fn save_image<W: Write>(
    hv: &dyn Hypervisor,
    domid: DomId,
    out: W,
    config_json: &[u8],
    emulator: Option<&dyn EmulatorState>,
    opts: &SaveOptions,
) -> Result<SaveReport, SaveError> {
    let start = Instant::now();
    let info: DomainInfo = xen(domid, "domain info", hv.domain_info(domid))?;
    let guest_type = match info.guest_type {
        GuestType::Hvm => "hvm",
        GuestType::Pvh => "pvh",
        GuestType::Pv => {
            return Err(SaveError::Unsupported {
                domid,
                why: "classic PV guests are not supported (only HVM and PVH)".into(),
            })
        }
    };
    if info.guest_type == GuestType::Hvm && emulator.is_none() {
        return Err(SaveError::Unsupported {
            domid,
            why: "an HVM guest needs its device model's state, and none was given".into(),
        });
    }
    if info.shutdown.is_some() || info.dying {
        return Err(SaveError::Unsupported {
            domid,
            why: format!(
                "the domain is {}",
                if info.dying { "dying" } else { "shut down" }
            ),
        });
    }
    let xs = xen(domid, "open xenstore", hv.open_xenstore())?;

    // Quiesce.
    let mut guard = None;
    match opts.mode {
        SaveMode::Suspend => {
            // libxl asks an HVM guest without PV drivers to suspend with xc_domain_shutdown,
            // which our FFI lacks; such a guest has no event-channel callback registered.
            if xen(
                domid,
                "read HVM_PARAM_CALLBACK_IRQ",
                hvm_without_pv_drivers(hv, domid, &info),
            )? {
                return Err(SaveError::Unsupported {
                    domid,
                    why: "HVM guest without PV drivers (no event-channel callback): it cannot be asked to suspend through xenstore; use the pause mode".into(),
                });
            }
            suspend_guest(hv, xs.as_ref(), domid, opts.suspend_timeout)?
        }
        SaveMode::Pause => guard = Some(xen(domid, "pause", PauseGuard::pause(hv, domid))?),
    }
    let quiesce_ms = start.elapsed().as_millis() as u64;

    let mut emulator_stopped = false;
    let result = (|| {
        let w = Counting::new(std::io::BufWriter::with_capacity(1 << 20, out));
        let spec = ImageSpec {
            kind: if info.guest_type == GuestType::Hvm {
                GuestKind::Hvm
            } else {
                GuestKind::Pvh
            },
            config_json: config_json.to_vec(),
            xen_major: XEN_VERSION.0,
            xen_minor: XEN_VERSION.1,
            cpuid_policy: None,
            msr_policy: None,
        };
        let mut image = wr(
            domid,
            "headers",
            ImageWriter::new(w, &spec, Limits::default()),
        )?;

        // The device model is stopped and saved first, as libxl does: until then it may
        // still write guest memory and raise interrupts that the memory and the HVM context
        // written below must include.
        let mut device_state_bytes = 0;
        let mut xs_data = Vec::new();
        let mut blob = None;
        if let (GuestType::Hvm, Some(emulator)) = (info.guest_type, emulator) {
            xs_data = emulator_xenstore_data(xs.as_ref(), domid)?;
            emulator_stopped = true;
            let state = emulator
                .save_stopped()
                .map_err(|source| SaveError::DeviceModel { domid, source })?;
            device_state_bytes = state.len() as u64;
            blob = Some(state);
        }

        let max_gpfn = xen(domid, "maximum gpfn", hv.maximum_gpfn(domid))?;
        let t_mem = Instant::now();
        let (pages, holes) = write_memory(hv, domid, max_gpfn, &mut image)?;
        let memory_ms = t_mem.elapsed().as_millis() as u64;

        let context = xen(domid, "HVM context", hv.hvm_context(domid))?;
        wr(domid, "HVM_CONTEXT", image.write_hvm_context(&context))?;
        let params = saved_hvm_params(hv, domid)?;
        wr(domid, "HVM_PARAMS", image.write_hvm_params(&params))?;
        let xs_data = (!xs_data.is_empty()).then_some(&xs_data[..]);
        let w = wr(domid, "END records", image.finish(blob.as_deref(), xs_data))?;
        Ok(SaveReport {
            domid,
            guest_type,
            mode: opts.mode,
            pfns_scanned: max_gpfn + 1,
            pages,
            holes,
            device_state_bytes,
            image_bytes: w.bytes(),
            quiesce_ms,
            memory_ms,
            total_ms: start.elapsed().as_millis() as u64,
        })
    })();

    if let Some(guard) = guard {
        if emulator_stopped {
            if let Some(emulator) = emulator {
                if let Err(err) = emulator.resume() {
                    log::error!("domain {domid}: cannot let the device model run again: {err}");
                }
            }
        }
        let unpaused = guard.unpause();
        if let (Ok(_), Err(source)) = (&result, unpaused) {
            return Err(SaveError::Xen {
                domid,
                step: "unpause",
                source,
            });
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use hypervisor::mem::{DomainConfig, MemXen};
    use hypervisor::DomainControl;
    use kemari_stream::libxc::{DomainHeader, DomainType, ImageHeader, PageType, Record};
    use kemari_stream::libxl::{LibxlHeader, LibxlRecord, EMULATOR_QEMU_UPSTREAM};
    use kemari_stream::xl::XlHeader;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    const CONFIG: &[u8] = br#"{"c_info":{"type":"pvh","name":"g","domid":0},"b_info":{}}"#;

    /// A fake device model.
    #[derive(Default)]
    struct FakeEmulator {
        saves: AtomicUsize,
        resumed: AtomicBool,
        fail: bool,
    }

    impl EmulatorState for FakeEmulator {
        fn save_stopped(&self) -> Result<Vec<u8>, QmpError> {
            self.saves.fetch_add(1, Ordering::SeqCst);
            if self.fail {
                return Err(QmpError::Command {
                    peer: "fake".into(),
                    command: "xen-save-devices-state".into(),
                    class: "GenericError".into(),
                    desc: "no space".into(),
                });
            }
            Ok(b"QEVM-fake-device-state".to_vec())
        }
        fn resume(&self) -> Result<(), QmpError> {
            self.resumed.store(true, Ordering::SeqCst);
            Ok(())
        }
    }

    /// Everything read back from an image.
    #[derive(Debug)]
    struct Decoded {
        config: Vec<u8>,
        domain_type: DomainType,
        pages: Vec<(u64, PageType, Option<Vec<u8>>)>,
        hvm_context: Vec<u8>,
        params: Vec<(u64, u64)>,
        static_data_end_before_pages: bool,
        emulator: Vec<LibxlRecord>,
    }

    fn decode(image: &[u8]) -> Decoded {
        let limits = Limits::default();
        let mut r = image;
        let xl = XlHeader::read(&mut r, &limits).unwrap();
        LibxlHeader::read(&mut r).unwrap();
        assert_eq!(
            LibxlRecord::read(&mut r, &limits).unwrap(),
            LibxlRecord::LibxcContext
        );
        ImageHeader::read(&mut r).unwrap();
        let dh = DomainHeader::read(&mut r).unwrap();
        let mut out = Decoded {
            config: xl.config_text().to_vec(),
            domain_type: dh.domain_type,
            pages: Vec::new(),
            hvm_context: Vec::new(),
            params: Vec::new(),
            static_data_end_before_pages: false,
            emulator: Vec::new(),
        };
        let mut seen_sde = false;
        loop {
            match Record::read(&mut r, &limits).unwrap() {
                Record::End => break,
                Record::StaticDataEnd => seen_sde = true,
                Record::PageData(pd) => {
                    if out.pages.is_empty() {
                        out.static_data_end_before_pages = seen_sde;
                    }
                    for (pfn, t, data) in pd.pages() {
                        out.pages.push((pfn, t, data.map(<[u8]>::to_vec)));
                    }
                }
                Record::HvmContext(c) => out.hvm_context = c,
                Record::HvmParams(p) => out.params = p,
                other => panic!("unexpected libxc record {other:?}"),
            }
        }
        loop {
            match LibxlRecord::read(&mut r, &limits).unwrap() {
                LibxlRecord::End => break,
                rec => out.emulator.push(rec),
            }
        }
        assert!(r.is_empty(), "{} bytes after the libxl END", r.len());
        out
    }

    /// A guest that suspends when asked through xenstore (as Linux's xenbus `manage.c` does).
    fn suspending_guest(xen: &MemXen, domid: DomId) -> std::thread::JoinHandle<bool> {
        let xs = xen.open_xenstore().unwrap();
        let guest = xen.guest(domid);
        std::thread::spawn(move || {
            let node = format!("/local/domain/{domid}/control/shutdown");
            for _ in 0..500 {
                if xs.read(Tx::NONE, &node).ok().as_deref() == Some(b"suspend") {
                    xs.write(Tx::NONE, &node, b"").unwrap();
                    guest.shutdown(ShutdownReason::Suspend).unwrap();
                    return true;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            false
        })
    }

    fn fill(xen: &MemXen, domid: DomId, pfns: &[Pfn]) {
        let guest = xen.guest(domid);
        for &pfn in pfns {
            guest
                .fill_page(pfn, (pfn as u8).wrapping_mul(7).wrapping_add(1))
                .unwrap();
        }
    }

    #[test]
    fn pvh_suspend_save_writes_a_complete_image() {
        let xen = MemXen::new();
        let domid = xen
            .create_domain(DomainConfig::pvh(64).with_holes(&[3, 40]))
            .unwrap();
        let populated: Vec<Pfn> = (0..64).filter(|p| *p != 3 && *p != 40).collect();
        fill(&xen, domid, &populated);
        xen.set_hvm_param(domid, 1, 0x3f).unwrap(); // STORE_PFN
        xen.set_hvm_param(domid, 17, 0x3e).unwrap(); // CONSOLE_PFN
        let guest = suspending_guest(&xen, domid);
        let mut image = Vec::new();
        let report = save_image(
            &xen,
            domid,
            &mut image,
            CONFIG,
            None,
            &SaveOptions {
                mode: SaveMode::Suspend,
                suspend_timeout: Duration::from_secs(10),
            },
        )
        .unwrap();
        assert!(guest.join().unwrap());
        let d = decode(&image);
        assert_eq!(d.config, CONFIG);
        assert_eq!(d.domain_type, DomainType::X86Hvm);
        assert!(d.static_data_end_before_pages);
        let max = xen.maximum_gpfn(domid).unwrap();
        assert_eq!(report.pfns_scanned, max + 1);
        assert_eq!(report.pages, populated.len() as u64);
        assert_eq!(report.image_bytes, image.len() as u64);
        assert_eq!(report.holes, max + 1 - populated.len() as u64);
        for (pfn, t, data) in &d.pages {
            assert_eq!(*t, PageType::NOTAB, "pfn {pfn}");
            let want = xen.guest(domid).read_page(*pfn).unwrap();
            assert_eq!(data.as_deref(), Some(&want[..]), "pfn {pfn}");
        }
        let sent: Vec<Pfn> = d.pages.iter().map(|p| p.0).collect();
        assert_eq!(
            sent, populated,
            "every populated frame once, in order, holes left out"
        );
        assert_eq!(d.hvm_context, xen.hvm_context(domid).unwrap());
        assert_eq!(d.params, vec![(1, 0x3f), (17, 0x3e)]);
        assert!(d.emulator.is_empty(), "PVH has no device model records");
        // the guest stays suspended (the caller destroys it)
        assert_eq!(
            xen.domain_info(domid).unwrap().shutdown,
            Some(ShutdownReason::Suspend)
        );
    }

    #[test]
    fn hvm_pause_save_includes_device_state_and_resumes_everything() {
        let xen = MemXen::new();
        let domid = xen.create_domain(DomainConfig::hvm(16)).unwrap();
        fill(&xen, domid, &(0..16).collect::<Vec<_>>());
        let xs = xen.open_xenstore().unwrap();
        let root = format!("/local/domain/0/device-model/{domid}/physmap/f0000000");
        xs.write(Tx::NONE, &format!("{root}/start_addr"), b"f0000000")
            .unwrap();
        xs.write(Tx::NONE, &format!("{root}/size"), b"800000")
            .unwrap();
        xs.write(Tx::NONE, &format!("{root}/name"), b"vga.vram")
            .unwrap();
        let emu = FakeEmulator::default();
        let mut image = Vec::new();
        let report = save_image(
            &xen,
            domid,
            &mut image,
            CONFIG,
            Some(&emu),
            &SaveOptions {
                mode: SaveMode::Pause,
                suspend_timeout: Duration::from_secs(1),
            },
        )
        .unwrap();
        assert_eq!(report.pages, 16);
        assert_eq!(report.device_state_bytes, 22);
        let d = decode(&image);
        assert_eq!(
            d.emulator,
            vec![
                LibxlRecord::EmulatorXenstoreData {
                    id: EMULATOR_QEMU_UPSTREAM,
                    index: 0,
                    data: b"physmap/f0000000/start_addr\0f0000000\0physmap/f0000000/size\0800000\0physmap/f0000000/name\0vga.vram\0".to_vec(),
                },
                LibxlRecord::EmulatorContext {
                    id: EMULATOR_QEMU_UPSTREAM,
                    index: 0,
                    blob: b"QEVM-fake-device-state".to_vec(),
                },
            ]
        );
        assert_eq!(xen.pause_count(domid), Some(0));
        assert!(emu.resumed.load(Ordering::SeqCst));
        assert_eq!(xen.domain_info(domid).unwrap().shutdown, None);
    }

    #[test]
    fn pause_mode_failure_leaves_the_guest_running() {
        let xen = MemXen::new();
        let domid = xen.create_domain(DomainConfig::hvm(8)).unwrap();
        let emu = FakeEmulator {
            fail: true,
            ..FakeEmulator::default()
        };
        let err = save_image(
            &xen,
            domid,
            Vec::new(),
            CONFIG,
            Some(&emu),
            &SaveOptions {
                mode: SaveMode::Pause,
                suspend_timeout: Duration::from_secs(1),
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("no space"), "{err}");
        assert_eq!(xen.pause_count(domid), Some(0));
        assert!(emu.resumed.load(Ordering::SeqCst));
    }

    #[test]
    fn a_guest_that_does_not_suspend_times_out_and_the_request_is_withdrawn() {
        let xen = MemXen::new();
        let domid = xen.create_domain(DomainConfig::pvh(8)).unwrap();
        let start = Instant::now();
        let err = save_image(
            &xen,
            domid,
            Vec::new(),
            CONFIG,
            None,
            &SaveOptions {
                mode: SaveMode::Suspend,
                suspend_timeout: Duration::from_millis(200),
            },
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                SaveError::SuspendTimeout {
                    cancelled: "withdrawn",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(start.elapsed() < Duration::from_secs(5));
        let xs = xen.open_xenstore().unwrap();
        let node = format!("/local/domain/{domid}/control/shutdown");
        assert_eq!(xs.read(Tx::NONE, &node).unwrap(), b"");
    }

    #[test]
    fn refusals_are_clear() {
        let xen = MemXen::new();
        let hvm = xen.create_domain(DomainConfig::hvm(8)).unwrap();
        let opts = SaveOptions::default();
        let err = save_image(&xen, hvm, Vec::new(), CONFIG, None, &opts).unwrap_err();
        assert!(err.to_string().contains("device model"), "{err}");
        let emu = FakeEmulator::default();
        let err = save_image(&xen, hvm, Vec::new(), CONFIG, Some(&emu), &opts).unwrap_err();
        assert!(err.to_string().contains("without PV drivers"), "{err}");
        assert_eq!(emu.saves.load(Ordering::SeqCst), 0);
        let err = save_image(&xen, 99, Vec::new(), CONFIG, None, &opts).unwrap_err();
        assert!(err.to_string().contains("domain 99"), "{err}");
    }

    #[test]
    fn hvm_without_pv_drivers_is_an_hvm_guest_without_a_callback() {
        let xen = MemXen::new();
        let hvm = xen.create_domain(DomainConfig::hvm(8)).unwrap();
        let pvh = xen.create_domain(DomainConfig::pvh(8)).unwrap();
        let info = |d| xen.domain_info(d).unwrap();
        assert!(hvm_without_pv_drivers(&xen, hvm, &info(hvm)).unwrap());
        assert!(!hvm_without_pv_drivers(&xen, pvh, &info(pvh)).unwrap());
        // PV drivers registered their upcall
        xen.set_hvm_param(hvm, HVM_PARAM_CALLBACK_IRQ, 0x0200_0000_0000_00f3)
            .unwrap();
        assert!(!hvm_without_pv_drivers(&xen, hvm, &info(hvm)).unwrap());
    }

    #[test]
    fn a_failing_page_read_stops_the_save_with_its_step() {
        use hypervisor::mem::FaultPlan;
        use hypervisor::Method;
        let faults = FaultPlan::new();
        let xen = MemXen::with_faults(faults.clone());
        let domid = xen.create_domain(DomainConfig::pvh(8)).unwrap();
        faults.fail_next(Method::HvmContext, hypervisor::Errno::EIO);
        let err = save_image(
            &xen,
            domid,
            Vec::new(),
            CONFIG,
            None,
            &SaveOptions {
                mode: SaveMode::Pause,
                suspend_timeout: Duration::from_secs(1),
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("HVM context"), "{err}");
        assert_eq!(xen.pause_count(domid), Some(0));
    }
}
