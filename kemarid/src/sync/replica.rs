//! Building the replica domain on the secondary from the initial image.
//!
//! The receiver spools the initial image (an `xl save` image) to a file and hands it to a
//! [`ReplicaBuilder`], which creates the replica **paused**. On real Xen that is
//! `xl restore -p <image>` (implemented next to this file, over [`crate::xltool`]); in tests,
//! `MemReplicaBuilder` builds the domain in a [`MemXen`](hypervisor::mem::MemXen).

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
