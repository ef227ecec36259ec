//! Building the replica domain on the secondary from the initial image.
//!
//! The receiver spools the initial image (an `xl save` image) to a file and hands it to a
//! [`ReplicaBuilder`], which creates the replica **paused**. On real Xen that is
//! `xl restore -p <image>` (implemented next to this file, over [`crate::xltool`]); in tests,
//! [`MemReplicaBuilder`] builds the domain in a [`MemXen`](hypervisor::mem::MemXen).

use std::path::{Path, PathBuf};

use hypervisor::DomId;

/// Errors of replica creation and destruction.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// The image file cannot be read.
    #[error("replica image {path}: {source}")]
    Io {
        /// The image.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The image is not a valid `xl save` image.
    #[error("replica image {path}: {detail}")]
    Image {
        /// The image.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// The tool or hypervisor call that builds or destroys the domain failed.
    #[error("{what}: {source}")]
    Tool {
        /// What was being done (`xl restore -p /spool/initial.img`, `destroying domain 7`).
        what: String,
        /// Why it failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The domain was created but is not paused (a replica must never run on its own).
    #[error("replica domain {domid} was created but is not paused")]
    NotPaused {
        /// The domain.
        domid: DomId,
    },
}

/// Creates and destroys replica domains.
pub trait ReplicaBuilder: Send + Sync {
    /// Creates a domain named `name` from the `xl save` image at `image`, and returns it with
    /// its vCPUs paused (a toolstack pause reference held, as `xl restore -p` leaves it). The
    /// domain's memory, HVM context and parameters are those of the image. On failure no
    /// domain is left behind.
    fn create_paused(&self, image: &Path, name: &str) -> Result<DomId, ReplicaError>;

    /// Destroys a replica made by [`create_paused`](Self::create_paused).
    fn destroy(&self, domid: DomId) -> Result<(), ReplicaError>;
}

/// A [`ReplicaBuilder`] over the in-memory Xen, for tests: reads the image (checking it),
/// creates a domain sized to the highest pfn with data (pfns without data are holes), pauses
/// it, and loads the pages, HVM context and parameters through the [`hypervisor`] traits (so
/// a [`FaultPlan`](hypervisor::mem::FaultPlan) can fail any step; the half-built domain is
/// then destroyed).
#[derive(Debug, Clone)]
pub struct MemReplicaBuilder {
    xen: hypervisor::mem::MemXen,
    limits: kemari_stream::Limits,
}

impl MemReplicaBuilder {
    /// A builder creating replicas in `xen`.
    pub fn new(xen: hypervisor::mem::MemXen) -> MemReplicaBuilder {
        MemReplicaBuilder {
            xen,
            limits: kemari_stream::Limits::default(),
        }
    }

    fn load(
        &self,
        domid: DomId,
        pages: &std::collections::BTreeMap<u64, Box<[u8; hypervisor::PAGE_SIZE]>>,
        summary: &super::image::ImageSummary,
    ) -> hypervisor::Result<()> {
        use hypervisor::{DomainControl, GuestMemory};
        self.xen.pause(domid)?;
        let pfns: Vec<u64> = pages.keys().copied().collect();
        for (batch, keys) in pfns.chunks(1024).zip(pfns.chunks(1024)) {
            let mut data = Vec::with_capacity(batch.len() * hypervisor::PAGE_SIZE);
            for k in keys {
                if let Some(p) = pages.get(k) {
                    data.extend_from_slice(&p[..]);
                }
            }
            self.xen.write_pages(domid, batch, &data)?;
        }
        self.xen.set_hvm_context(domid, &summary.hvm_context)?;
        for (p, v) in &summary.hvm_params {
            self.xen.set_hvm_param(domid, *p, *v)?;
        }
        Ok(())
    }
}

impl ReplicaBuilder for MemReplicaBuilder {
    fn create_paused(&self, image: &Path, name: &str) -> Result<DomId, ReplicaError> {
        use std::collections::BTreeMap;
        let file = std::fs::File::open(image).map_err(|source| ReplicaError::Io {
            path: image.to_path_buf(),
            source,
        })?;
        let mut r = std::io::BufReader::new(file);
        let mut pages: BTreeMap<u64, Box<[u8; hypervisor::PAGE_SIZE]>> = BTreeMap::new();
        let summary = super::image::read_image(&mut r, &self.limits, &mut |pfn, data| {
            let mut page = Box::new([0u8; hypervisor::PAGE_SIZE]);
            page.copy_from_slice(data);
            pages.insert(pfn, page);
            Ok(())
        })
        .map_err(|e| ReplicaError::Image {
            path: image.to_path_buf(),
            detail: e.to_string(),
        })?;
        let memory_pages = summary.max_pfn.map_or(0, |m| m + 1);
        let holes: Vec<u64> = (0..memory_pages)
            .filter(|p| !pages.contains_key(p))
            .collect();
        let config: serde_json::Value =
            serde_json::from_slice(&summary.config).unwrap_or(serde_json::Value::Null);
        let pvh = crate::domconfig::config_type(&config) == Some("pvh");
        let vcpus = hypervisor::hvm_save::parse(&summary.hvm_context)
            .map(|recs| {
                recs.iter()
                    .filter(|r| r.typecode == hypervisor::hvm_save::HVM_SAVE_CPU)
                    .count()
            })
            .unwrap_or(1)
            .max(1);
        let base = if pvh {
            hypervisor::mem::DomainConfig::pvh(memory_pages)
        } else {
            hypervisor::mem::DomainConfig::hvm(memory_pages)
        };
        let cfg = base
            .with_vcpus(u32::try_from(vcpus).unwrap_or(1))
            .with_holes(&holes)
            .with_name(name);
        let domid = self
            .xen
            .create_domain(cfg)
            .map_err(|e| ReplicaError::Tool {
                what: format!("creating in-memory replica {name}"),
                source: Box::new(e),
            })?;
        if let Err(e) = self.load(domid, &pages, &summary) {
            if let Err(d) = self.xen.destroy_domain(domid) {
                log::warn!("destroying half-built replica {domid}: {d}");
            }
            return Err(ReplicaError::Tool {
                what: format!("loading in-memory replica {name} (domain {domid})"),
                source: Box::new(e),
            });
        }
        Ok(domid)
    }

    fn destroy(&self, domid: DomId) -> Result<(), ReplicaError> {
        self.xen
            .destroy_domain(domid)
            .map_err(|e| ReplicaError::Tool {
                what: format!("destroying in-memory replica {domid}"),
                source: Box::new(e),
            })
    }
}
