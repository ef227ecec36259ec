//! `kemari debug save` and `kemari debug replica-restore`: a running domain's image into an
//! `xl save` file, and a replica domain built from one the way the secondary builds it
//! (docs/stream.md). The `kemari` binary parses the arguments and prints the reports.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hypervisor::{DomId, DomainControl, GuestType, Hypervisor, HypervisorError, ShutdownReason};

use crate::domconfig::{self, DomConfigError};
use crate::qmp::QmpDeviceModel;
use crate::sync::replica::{ReplicaBuilder, ReplicaError};
use crate::sync::replica_xl::XlReplicaBuilder;
use crate::xlsave::{self, SaveError, SaveReport};
use crate::xltool::{XlError, XlTool};

/// Errors of this module: which step of the save or the restore failed, for which domain and
/// file.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Opening xenstore, or the domain's info, failed (the hypervisor error names the call).
    #[error(transparent)]
    Xen(HypervisorError),
    /// The domain's configuration could not be read.
    #[error(transparent)]
    Config(#[from] DomConfigError),
    /// The image file could not be created.
    #[error("cannot create image file {}", .path.display())]
    Create {
        /// The image file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Writing the image failed (the file is removed).
    #[error("saving domain {domid} to {}{}", .path.display(), suspended_note(*.domid, *.suspended))]
    Save {
        /// The domain.
        domid: DomId,
        /// The image file.
        path: PathBuf,
        /// Whether the domain is left suspended (kemari cannot resume it).
        suspended: bool,
        /// The cause (boxed: it is large).
        source: Box<SaveError>,
    },
    /// The image file could not be synced to disk.
    #[error("cannot sync image file {}", .path.display())]
    Sync {
        /// The image file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// `xl destroy` failed after the save.
    #[error("domain {domid} is saved in {} but could not be destroyed", .path.display())]
    Destroy {
        /// The domain.
        domid: DomId,
        /// The image file.
        path: PathBuf,
        /// The cause.
        source: XlError,
    },
    /// The replica could not be built (the replica error names the image and the name).
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    /// The built replica could not be unpaused.
    #[error("unpausing replica domain {domid}")]
    Unpause {
        /// The replica.
        domid: DomId,
        /// The cause.
        source: HypervisorError,
    },
}

fn suspended_note(domid: DomId, suspended: bool) -> String {
    if suspended {
        format!(" (the domain stays suspended: destroy it with xl destroy {domid})")
    } else {
        String::new()
    }
}

/// `kemari debug save`: the image of `id` into `file`, then (with `destroy`) `xl destroy`.
/// `destroy` suspends the guest cooperatively (within `suspend_timeout`) instead of pausing
/// it; `rename` is the name in the image's config.
pub fn save_to_file(
    hv: &dyn Hypervisor,
    id: DomId,
    file: &Path,
    destroy: bool,
    rename: Option<&str>,
    suspend_timeout: Duration,
) -> Result<SaveReport, ImageError> {
    let xs = hv.open_xenstore().map_err(ImageError::Xen)?;
    let config = domconfig::domain_config_json(id, Some(xs.as_ref()), rename)?;
    let info = hv.domain_info(id).map_err(ImageError::Xen)?;
    let dm = QmpDeviceModel::for_domain(id);
    let emulator: Option<&dyn xlsave::EmulatorState> =
        (info.guest_type == GuestType::Hvm).then_some(&dm);
    let out = std::fs::File::create(file).map_err(|source| ImageError::Create {
        path: file.to_path_buf(),
        source,
    })?;
    let opts = xlsave::SaveOptions {
        mode: if destroy {
            xlsave::SaveMode::Suspend
        } else {
            xlsave::SaveMode::Pause
        },
        suspend_timeout,
    };
    let report = match xlsave::save_image(hv, id, &out, &config, emulator, &opts) {
        Ok(r) => r,
        Err(source) => {
            drop(out);
            let _ = std::fs::remove_file(file);
            // A guest that did suspend cannot be resumed by kemari (no xc_domain_resume): say so.
            let suspended =
                hv.domain_info(id).ok().and_then(|i| i.shutdown) == Some(ShutdownReason::Suspend);
            return Err(ImageError::Save {
                domid: id,
                path: file.to_path_buf(),
                suspended,
                source: Box::new(source),
            });
        }
    };
    out.sync_all().map_err(|source| ImageError::Sync {
        path: file.to_path_buf(),
        source,
    })?;
    if destroy {
        XlTool::default()
            .destroy(id)
            .map_err(|source| ImageError::Destroy {
                domid: id,
                path: file.to_path_buf(),
                source,
            })?;
    }
    Ok(report)
}

/// The line `kemari debug save` prints for the save of domain `id` (without the newline).
pub fn save_line(id: DomId, report: &SaveReport, file: &Path, destroy: bool) -> String {
    format!(
        "domain {id} ({}) saved to {}: {} bytes, {} pages, {} of {} frames unpopulated, device state {} bytes; quiesce {} ms, memory {} ms, total {} ms{}",
        report.guest_type,
        file.display(),
        report.image_bytes,
        report.pages,
        report.holes,
        report.pfns_scanned,
        report.device_state_bytes,
        report.quiesce_ms,
        report.memory_ms,
        report.total_ms,
        if destroy { "; domain destroyed" } else { "; domain runs on" }
    )
}

/// What `kemari debug replica-restore` built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    /// The replica's domain id.
    pub domid: DomId,
    /// Its name.
    pub name: String,
    /// How long `xl restore -p` took (ms).
    pub build_ms: u64,
    /// Whether it was unpaused.
    pub unpaused: bool,
}

impl Restored {
    /// As `--json` prints it.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({"domid": self.domid, "name": self.name, "build_ms": self.build_ms, "unpaused": self.unpaused})
    }

    /// As text (without the newline).
    pub fn line(&self) -> String {
        format!(
            "replica {} built as domain {} in {} ms{}",
            self.name,
            self.domid,
            self.build_ms,
            if self.unpaused {
                ", unpaused"
            } else {
                ", paused"
            }
        )
    }
}

/// `kemari debug replica-restore`: builds replica `name` from `image` with `xl restore -p -e`
/// (through a renamed copy of the config if needed) on `host`, checked to be paused; with
/// `unpause` it then runs.
pub fn replica_restore(
    host: Arc<dyn DomainControl>,
    image: &Path,
    name: &str,
    unpause: bool,
) -> Result<Restored, ImageError> {
    let builder = XlReplicaBuilder::new(XlTool::default(), Some(host.clone()));
    let start = Instant::now();
    let domid = builder.create_paused(image, name)?;
    let build_ms = start.elapsed().as_millis() as u64;
    if unpause {
        host.unpause(domid)
            .map_err(|source| ImageError::Unpause { domid, source })?;
    }
    Ok(Restored {
        domid,
        name: name.to_string(),
        build_ms,
        unpaused: unpause,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code

    use super::*;

    fn report() -> SaveReport {
        SaveReport {
            domid: 5,
            guest_type: "hvm",
            mode: xlsave::SaveMode::Pause,
            pfns_scanned: 1_048_576,
            pages: 262_144,
            holes: 786_432,
            device_state_bytes: 0,
            image_bytes: 1_073_807_360,
            quiesce_ms: 3,
            memory_ms: 2_100,
            total_ms: 2_150,
        }
    }

    #[test]
    fn save_lines() {
        let file = Path::new("/tmp/g.img");
        assert_eq!(
            save_line(5, &report(), file, false),
            "domain 5 (hvm) saved to /tmp/g.img: 1073807360 bytes, 262144 pages, 786432 of 1048576 frames unpopulated, device state 0 bytes; quiesce 3 ms, memory 2100 ms, total 2150 ms; domain runs on"
        );
        assert!(save_line(5, &report(), file, true).ends_with("total 2150 ms; domain destroyed"));
    }

    #[test]
    fn restored_text_and_json() {
        let mut r = Restored {
            domid: 9,
            name: "web-replica".into(),
            build_ms: 0,
            unpaused: false,
        };
        assert_eq!(
            r.line(),
            "replica web-replica built as domain 9 in 0 ms, paused"
        );
        assert_eq!(
            r.json().to_string(),
            r#"{"build_ms":0,"domid":9,"name":"web-replica","unpaused":false}"#
        );
        r.unpaused = true;
        assert_eq!(
            r.line(),
            "replica web-replica built as domain 9 in 0 ms, unpaused"
        );
    }

    #[test]
    fn error_messages_name_the_domain_and_the_file() {
        let path = PathBuf::from("/tmp/g.img");
        let io = || std::io::Error::other("disk full");
        let e = ImageError::Create {
            path: path.clone(),
            source: io(),
        };
        assert_eq!(e.to_string(), "cannot create image file /tmp/g.img");
        let e = ImageError::Sync {
            path: path.clone(),
            source: io(),
        };
        assert_eq!(e.to_string(), "cannot sync image file /tmp/g.img");
        let save = |suspended| ImageError::Save {
            domid: 5,
            path: path.clone(),
            suspended,
            source: Box::new(SaveError::Unsupported {
                domid: 5,
                why: "PV guest".into(),
            }),
        };
        assert_eq!(save(false).to_string(), "saving domain 5 to /tmp/g.img");
        assert_eq!(
            save(true).to_string(),
            "saving domain 5 to /tmp/g.img (the domain stays suspended: destroy it with xl destroy 5)"
        );
        assert!(std::error::Error::source(&save(false)).is_some());
    }
}
