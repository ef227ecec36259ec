//! Failover on the secondary: the replica (memory of the last ACKed checkpoint, paused since
//! it was built) plus the staged CPU/device state of that checkpoint become a running guest.
//!
//! Two ways, chosen by experiment (`docs/failover.md`):
//! * [`Method::Restore`]: write an `xl save` image from the replica's memory and the staged
//!   HVM context, parameters and device state ([`write_image`]), destroy the replica and
//!   `xl restore` the image. With checkpoints taken at a cooperative suspend point
//!   (`kemari replicate --suspend`) this is exactly what `xl save`/`xl restore` do: the guest
//!   resumes through its own resume path, re-creating its event channels, grant frames and
//!   xenstore connection on the new host.
//! * [`Method::InPlace`]: load the staged HVM context into the paused replica and unpause it.
//!   Nothing Xen keeps outside guest memory (event channels, `vcpu_info` placement, timers) is
//!   rebuilt; kept to reproduce the experiment that shows what happens then.

use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hypervisor::{DomId, GuestType, Hypervisor, HypervisorError, Pfn, PAGE_SIZE};
use kemari_stream::image::{GuestKind, ImageSpec, ImageWriter};
use kemari_stream::xl::XlHeader;
use kemari_stream::{Limits, MAX_PAGES_PER_RECORD};

use crate::counting::Counting;
use crate::domconfig;
use crate::sync::receiver::Staged;
use crate::xltool::{XlError, XlTool};

/// Errors of the failover.
#[derive(Debug, thiserror::Error)]
pub enum FailoverError {
    /// A call to Xen about the replica failed.
    #[error("replica domain {domid}: {step}: {source}")]
    Xen {
        /// The replica.
        domid: DomId,
        /// Which step.
        step: &'static str,
        /// The failed call.
        #[source]
        source: HypervisorError,
    },
    /// The replica cannot be resumed this way.
    #[error("replica domain {domid}: {why}")]
    Unsupported {
        /// The replica.
        domid: DomId,
        /// Why.
        why: String,
    },
    /// Reading the spooled image's configuration or writing the failover image failed.
    #[error("{what} {path}: {detail}")]
    Image {
        /// What was done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        detail: String,
    },
    /// `xl destroy` or `xl restore` failed.
    #[error("{what}: {source}")]
    Xl {
        /// The command.
        what: String,
        /// Why.
        #[source]
        source: XlError,
    },
}

/// How the replica is turned into the running guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Image from replica + staged state, destroy the replica, `xl restore`.
    Restore,
    /// Load the staged context into the replica, unpause.
    InPlace,
}

/// What a failover did, with its timings.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FailoverReport {
    /// The checkpoint the guest resumed from.
    pub seq: u64,
    /// The running guest's domain id.
    pub domid: DomId,
    /// Pages in the image (restore) or 0 (in place).
    pub pages: u64,
    /// Bytes of the image (restore) or 0.
    pub image_bytes: u64,
    /// Writing the image.
    pub image_ms: f64,
    /// `xl destroy` of the replica.
    pub destroy_ms: f64,
    /// `xl restore` (or context load + unpause).
    pub restore_ms: f64,
}

/// What [`write_image`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageFigures {
    /// Pages written.
    pub pages: u64,
    /// Unpopulated pfns skipped.
    pub holes: u64,
    /// Bytes written.
    pub bytes: u64,
}

/// Writes an `xl save` image of `replica` to `out`: every populated page of its memory, then
/// the staged HVM context and parameters (non-zero ones, as libxc sends them) and, for HVM,
/// the staged device state with `emulator_xenstore` (the device model's physmap keys).
/// `config_json` is the libxl configuration (JSON text, NUL-terminated as xl stores it).
pub fn write_image<W: Write>(
    hv: &dyn Hypervisor,
    replica: DomId,
    staged: &Staged,
    config_json: &[u8],
    emulator_xenstore: Option<&[u8]>,
    out: W,
) -> Result<ImageFigures, FailoverError> {
    let xen = |step, source| FailoverError::Xen {
        domid: replica,
        step,
        source,
    };
    let img = |detail: String| FailoverError::Image {
        what: "writing the failover image of",
        path: PathBuf::from(format!("domain {replica}")),
        detail,
    };
    let info = hv.domain_info(replica).map_err(|e| xen("domain info", e))?;
    let kind = match info.guest_type {
        GuestType::Hvm => GuestKind::Hvm,
        GuestType::Pvh => GuestKind::Pvh,
        GuestType::Pv => {
            return Err(FailoverError::Unsupported {
                domid: replica,
                why: "a classic PV replica (only HVM and PVH are protected)".into(),
            })
        }
    };
    if kind == GuestKind::Hvm && staged.emulator_state.is_none() {
        return Err(FailoverError::Unsupported {
            domid: replica,
            why: format!(
                "HVM replica without staged device-model state (checkpoint {})",
                staged.seq
            ),
        });
    }
    let spec = ImageSpec {
        kind,
        config_json: config_json.to_vec(),
        xen_major: crate::xlsave::XEN_VERSION.0,
        xen_minor: crate::xlsave::XEN_VERSION.1,
        cpuid_policy: None,
        msr_policy: None,
    };
    let w = Counting::new(BufWriter::with_capacity(1 << 20, out));
    let mut image =
        ImageWriter::new(w, &spec, Limits::default()).map_err(|e| img(e.to_string()))?;
    let max_gpfn = hv
        .maximum_gpfn(replica)
        .map_err(|e| xen("maximum gpfn", e))?;
    let batch = MAX_PAGES_PER_RECORD as u64;
    let mut buf = vec![0u8; batch as usize * PAGE_SIZE];
    let (mut pages, mut holes) = (0u64, 0u64);
    let mut start: Pfn = 0;
    while start <= max_gpfn {
        let end = start.saturating_add(batch - 1).min(max_gpfn);
        let pfns: Vec<Pfn> = (start..=end).collect();
        let bytes = buf.get_mut(..pfns.len() * PAGE_SIZE).unwrap_or_default();
        let failed: std::collections::HashSet<Pfn> = match hv.read_pages(replica, &pfns, bytes) {
            Ok(()) => Default::default(),
            Err(HypervisorError::Pages { failures, .. }) => {
                failures.into_iter().map(|(pfn, _)| pfn).collect()
            }
            Err(e) => return Err(xen("reading the replica's pages", e)),
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
            image
                .write_pages(&present)
                .map_err(|e| img(e.to_string()))?;
        }
        if end == max_gpfn {
            break;
        }
        start = end + 1;
    }
    image
        .write_hvm_context(&staged.hvm_context)
        .map_err(|e| img(e.to_string()))?;
    let params: Vec<(u64, u64)> = staged
        .hvm_params
        .iter()
        .filter(|(_, v)| *v != 0)
        .map(|(p, v)| (u64::from(*p), *v))
        .collect();
    image
        .write_hvm_params(&params)
        .map_err(|e| img(e.to_string()))?;
    let (emu, xs) = match kind {
        GuestKind::Hvm => (staged.emulator_state.as_deref(), emulator_xenstore),
        GuestKind::Pvh => (None, None),
    };
    let mut w = image.finish(emu, xs).map_err(|e| img(e.to_string()))?;
    w.flush().map_err(|e| img(e.to_string()))?;
    Ok(ImageFigures {
        pages,
        holes,
        bytes: w.bytes(),
    })
}

/// The libxl configuration of the spooled initial image, renamed to `name`, as xl stores it.
pub fn image_config(initial_image: &Path, name: &str) -> Result<Vec<u8>, FailoverError> {
    let bad = |detail: String| FailoverError::Image {
        what: "reading the configuration of",
        path: initial_image.to_path_buf(),
        detail,
    };
    let f = std::fs::File::open(initial_image).map_err(|e| bad(e.to_string()))?;
    let header = XlHeader::read(&mut BufReader::new(f), &Limits::default())
        .map_err(|e| bad(e.to_string()))?;
    if !header.config_is_json() {
        return Err(bad("the xl header carries no JSON configuration".into()));
    }
    let config =
        domconfig::parse_config(&initial_image.display().to_string(), header.config_text())
            .map_err(|e| bad(e.to_string()))?;
    Ok(domconfig::to_image_bytes(&domconfig::for_image(
        config,
        Some(name),
    )))
}

/// Loads the staged HVM context into the paused replica and unpauses it ([`Method::InPlace`]).
pub fn resume_in_place(
    hv: &dyn Hypervisor,
    replica: DomId,
    staged: &Staged,
) -> Result<FailoverReport, FailoverError> {
    resume_in_place_paused(hv, replica, staged, false)
}

/// [`resume_in_place`]; with `keep_paused` the replica is left paused (its devices are then
/// brought up and it is unpaused by the caller, see [`super::disk`]).
pub fn resume_in_place_paused(
    hv: &dyn Hypervisor,
    replica: DomId,
    staged: &Staged,
    keep_paused: bool,
) -> Result<FailoverReport, FailoverError> {
    let t0 = Instant::now();
    let xen = |step, source| FailoverError::Xen {
        domid: replica,
        step,
        source,
    };
    hv.set_hvm_context(replica, &staged.hvm_context)
        .map_err(|e| xen("loading the staged HVM context", e))?;
    if !keep_paused {
        // The replica was built paused (`xl restore -p`): one toolstack pause reference.
        hv.unpause(replica).map_err(|e| xen("unpausing", e))?;
    }
    Ok(FailoverReport {
        seq: staged.seq,
        domid: replica,
        pages: 0,
        image_bytes: 0,
        image_ms: 0.0,
        destroy_ms: 0.0,
        restore_ms: ms(t0.elapsed()),
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// [`Method::Restore`] with `xl`: writes `DIR/failover.img` from the replica and `staged`
/// (configuration from the spooled `initial_image`, which is then removed), destroys the
/// replica, restores the image running under `name`, and removes the image.
pub fn resume_by_restore(
    hv: &dyn Hypervisor,
    xl: &XlTool,
    replica: DomId,
    staged: &Staged,
    initial_image: &Path,
    spool_dir: &Path,
    name: &str,
) -> Result<FailoverReport, FailoverError> {
    resume_by_restore_paused(
        hv,
        xl,
        replica,
        staged,
        initial_image,
        spool_dir,
        name,
        false,
    )
}

/// [`resume_by_restore`]; with `keep_paused` the image is restored paused (`xl restore -p`):
/// devices the configuration does not name (a disk Kemari's blkback served) are created by the
/// caller before it unpauses the guest ([`super::disk::serve_and_unpause`]).
#[allow(clippy::too_many_arguments)]
pub fn resume_by_restore_paused(
    hv: &dyn Hypervisor,
    xl: &XlTool,
    replica: DomId,
    staged: &Staged,
    initial_image: &Path,
    spool_dir: &Path,
    name: &str,
    keep_paused: bool,
) -> Result<FailoverReport, FailoverError> {
    let t0 = Instant::now();
    let config = image_config(initial_image, name)?;
    let emulator_xenstore = match hv.domain_info(replica) {
        Ok(i) if i.guest_type == GuestType::Hvm => {
            let xs = hv.open_xenstore().map_err(|source| FailoverError::Xen {
                domid: replica,
                step: "opening xenstore",
                source,
            })?;
            let data =
                crate::xlsave::emulator_xenstore_data(xs.as_ref(), replica).map_err(|e| {
                    FailoverError::Unsupported {
                        domid: replica,
                        why: format!("reading the device model's xenstore data: {e}"),
                    }
                })?;
            (!data.is_empty()).then_some(data)
        }
        _ => None,
    };
    // The spooled initial image is superseded (the replica holds newer memory, and only its
    // configuration was needed): remove it first, dom0's spool is usually a small RAM disk.
    if let Err(e) = std::fs::remove_file(initial_image) {
        log::warn!("cannot remove {}: {e}", initial_image.display());
    }
    let path = spool_dir.join("failover.img");
    let file = std::fs::File::create(&path).map_err(|e| FailoverError::Image {
        what: "creating",
        path: path.clone(),
        detail: e.to_string(),
    })?;
    let figures = write_image(
        hv,
        replica,
        staged,
        &config,
        emulator_xenstore.as_deref(),
        file,
    )?;
    let image_ms = ms(t0.elapsed());
    let t1 = Instant::now();
    xl.destroy(replica).map_err(|source| FailoverError::Xl {
        what: format!("xl destroy {replica} (the replica)"),
        source,
    })?;
    let destroy_ms = ms(t1.elapsed());
    let t2 = Instant::now();
    let restored = xl.restore(&path, name, keep_paused);
    if let Err(e) = std::fs::remove_file(&path) {
        log::warn!("cannot remove {}: {e}", path.display());
    }
    let (domid, _) = restored.map_err(|source| FailoverError::Xl {
        what: format!("xl restore {}", path.display()),
        source,
    })?;
    Ok(FailoverReport {
        seq: staged.seq,
        domid,
        pages: figures.pages,
        image_bytes: figures.bytes,
        image_ms,
        destroy_ms,
        restore_ms: ms(t2.elapsed()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::image::read_image;
    use hypervisor::hvm_save::{self, HvmContextBuilder};
    use hypervisor::mem::{DomainConfig, MemXen};
    use hypervisor::{DomainControl, GuestMemory};

    fn context(marker: u8) -> Vec<u8> {
        let mut b = HvmContextBuilder::new();
        let mut header = vec![0u8; 24];
        header[..4].copy_from_slice(&hvm_save::HVM_FILE_MAGIC.to_le_bytes());
        b.push(hvm_save::HVM_SAVE_HEADER, 0, &header).unwrap();
        b.push(hvm_save::HVM_SAVE_CPU, 0, &vec![marker; 1032])
            .unwrap();
        b.finish()
    }

    fn staged(seq: u64, emulator: Option<Vec<u8>>) -> Staged {
        Staged {
            seq,
            hvm_context: context(7),
            hvm_params: vec![(1, 0xfeffc), (5, 0), (17, 0xfeffd)],
            emulator_state: emulator,
        }
    }

    fn config() -> Vec<u8> {
        domconfig::to_image_bytes(&serde_json::json!({
            "c_info": {"type": "pvh", "name": "g"}, "b_info": {}
        }))
    }

    #[test]
    fn image_holds_the_replica_memory_and_the_staged_state() {
        let xen = MemXen::new();
        let d = xen
            .create_domain(DomainConfig {
                holes: vec![3, 9],
                ..DomainConfig::pvh(16)
            })
            .unwrap();
        let g = xen.guest(d);
        for pfn in 0..16u64 {
            if pfn != 3 && pfn != 9 {
                g.fill_page(pfn, pfn as u8 + 1).unwrap();
            }
        }
        let st = staged(42, None);
        let mut out = Vec::new();
        let fig = write_image(&xen, d, &st, &config(), None, &mut out).unwrap();
        assert_eq!((fig.pages, fig.holes, fig.bytes), (14, 2, out.len() as u64));
        let mut seen = Vec::new();
        let summary = read_image(&mut &out[..], &Limits::default(), &mut |pfn, page| {
            seen.push((pfn, page[0], page[4095]));
            Ok(())
        })
        .unwrap();
        assert_eq!(summary.pages, 14);
        assert_eq!(summary.hvm_context, st.hvm_context);
        // Non-zero parameters only, as libxc sends them.
        assert_eq!(summary.hvm_params, vec![(1, 0xfeffc), (17, 0xfeffd)]);
        assert!(summary.emulator.is_none());
        let want: Vec<(u64, u8, u8)> = (0..16u64)
            .filter(|p| *p != 3 && *p != 9)
            .map(|p| (p, p as u8 + 1, p as u8 + 1))
            .collect();
        assert_eq!(seen, want);
        // The replica is untouched and still there.
        assert!(xen.domain_info(d).is_ok());
    }

    #[test]
    fn hvm_image_needs_and_carries_the_device_state() {
        let xen = MemXen::new();
        let d = xen.create_domain(DomainConfig::hvm(8)).unwrap();
        let err = write_image(&xen, d, &staged(3, None), &config(), None, Vec::new()).unwrap_err();
        assert!(err.to_string().contains("device-model state"), "{err}");
        let mut out = Vec::new();
        write_image(
            &xen,
            d,
            &staged(3, Some(b"qemu-state".to_vec())),
            &config(),
            Some(b"physmap/1/name\0vga\0"),
            &mut out,
        )
        .unwrap();
        let summary = read_image(&mut &out[..], &Limits::default(), &mut |_, _| Ok(())).unwrap();
        let emu = summary.emulator.unwrap();
        assert_eq!(emu.context, b"qemu-state");
    }

    #[test]
    fn unreadable_replica_fails_whole() {
        let xen = MemXen::new();
        let d = xen.create_domain(DomainConfig::pvh(8)).unwrap();
        xen.faults()
            .fail_after(hypervisor::Method::ReadPages, 0, hypervisor::Errno::EIO);
        let err = write_image(&xen, d, &staged(1, None), &config(), None, Vec::new()).unwrap_err();
        assert!(matches!(err, FailoverError::Xen { .. }), "{err}");
        let err = write_image(&xen, 99, &staged(1, None), &config(), None, Vec::new())
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(
                "replica domain 99: domain info: domain_info failed for domain 99: ESRCH"
            ),
            "{err}"
        );
    }

    #[test]
    fn in_place_loads_the_context_and_unpauses() {
        let xen = MemXen::new();
        let d = xen.create_domain(DomainConfig::pvh(8)).unwrap();
        xen.pause(d).unwrap();
        let st = staged(5, None);
        let r = resume_in_place(&xen, d, &st).unwrap();
        assert_eq!((r.seq, r.domid), (5, d));
        assert_eq!(xen.hvm_context(d).unwrap(), st.hvm_context);
        assert!(xen.domain_info(d).unwrap().running);
        // Not paused any more: a second attempt fails at the unpause.
        assert!(resume_in_place(&xen, d, &st).is_err());
        let mut page = [0u8; PAGE_SIZE];
        xen.read_page(d, 0, &mut page).unwrap();
    }

    #[test]
    fn config_of_the_spooled_image_is_renamed() {
        let dir = std::env::temp_dir().join(format!("kemari-failover-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("initial.img");
        let mut f = std::fs::File::create(&path).unwrap();
        XlHeader::new(&config())
            .write(&mut f, &Limits::default())
            .unwrap();
        drop(f);
        let c = image_config(&path, "other").unwrap();
        let v: serde_json::Value = serde_json::from_slice(c.strip_suffix(&[0]).unwrap()).unwrap();
        assert_eq!(domconfig::config_name(&v), Some("other"));
        assert!(image_config(&dir.join("absent"), "x").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
