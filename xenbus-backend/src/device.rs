//! The xenstore side of one split device: the frontend and backend directories, their
//! permissions, the state nodes, and reading what the frontend publishes.
//!
//! Layout for a block device `devid` of guest `domid`, served from `backend_domid` (dom0):
//!
//! ```text
//! /local/domain/<domid>/device/vbd/<devid>/          owner domid, backend reads
//!     backend      = /local/domain/0/backend/kemari-vbd/<domid>/<devid>
//!     backend-id   = 0
//!     state        = 1            (the frontend's, written by the guest from then on)
//!     virtual-device = <devid>   device-type = disk
//! /local/domain/0/backend/kemari-vbd/<domid>/<devid>/ owner dom0, guest reads
//!     frontend     = /local/domain/<domid>/device/vbd/<devid>
//!     frontend-id  = <domid>      online = 1      state = 1..6
//!     kemari-state = initialising|initwait|connected|attached|closing|closed
//!     (+ the backend's features, e.g. sectors, sector-size, info, feature-flush-cache)
//! ```
//!
//! The backend type directory (`kemari-vbd`, `kemari-vif`) is one no dom0 kernel backend or
//! QEMU watches, so only this crate serves the device.

use hypervisor::{with_transaction, DomId, HypervisorError, Tx, XenStore, XsPerm, XsPermKind};

use crate::state::{BackendState, StateError, XenbusState, KEMARI_STATE_NODE};

/// Transaction attempts before giving up on a conflicting xenstore.
const TX_ATTEMPTS: u32 = 16;
/// Longest frontend value we read (they are numbers and short names).
const MAX_FRONT_VALUE: usize = 64;

/// Errors of a device's xenstore handling.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A xenstore call failed.
    #[error("{what}: {source}")]
    Xenstore {
        /// What was being done, with the path.
        what: String,
        /// The cause.
        source: HypervisorError,
    },
    /// The guest already has a device with this id.
    #[error("guest {domid} already has device {path} (backend {backend:?})")]
    Exists {
        /// The guest.
        domid: DomId,
        /// The frontend directory.
        path: String,
        /// Its `backend` node.
        backend: String,
    },
    /// A node the frontend must write is missing or malformed.
    #[error("frontend node {path} holds {value:?}: {why}")]
    BadFrontendNode {
        /// The node.
        path: String,
        /// What it held (truncated), or `<missing>`.
        value: String,
        /// What was expected.
        why: &'static str,
    },
    /// A state change the state machine refuses.
    #[error(transparent)]
    State(#[from] StateError),
}

/// Paths of one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevicePaths {
    /// The guest.
    pub domid: DomId,
    /// The device id (for disks `virtual-device`, e.g. 51712 for xvda).
    pub devid: u32,
    /// The backend's domain (0).
    pub backend_domid: DomId,
    /// Frontend directory.
    pub frontend: String,
    /// Backend directory.
    pub backend: String,
}

impl DevicePaths {
    /// Paths for a device of frontend class `front_class` (`vbd`, `vif`) served under backend
    /// type `back_type` (`kemari-vbd`).
    pub fn new(
        xs: &dyn XenStore,
        domid: DomId,
        devid: u32,
        backend_domid: DomId,
        front_class: &str,
        back_type: &str,
    ) -> Result<DevicePaths, DeviceError> {
        let home = |d: DomId| {
            xs.get_domain_path(d)
                .map_err(|source| DeviceError::Xenstore {
                    what: format!("domain path of {d}"),
                    source,
                })
        };
        Ok(DevicePaths {
            domid,
            devid,
            backend_domid,
            frontend: format!("{}/device/{front_class}/{devid}", home(domid)?),
            backend: format!(
                "{}/backend/{back_type}/{domid}/{devid}",
                home(backend_domid)?
            ),
        })
    }

    /// The frontend's `state` node.
    pub fn frontend_state(&self) -> String {
        format!("{}/state", self.frontend)
    }

    /// A node of the frontend directory.
    pub fn front(&self, node: &str) -> String {
        format!("{}/{node}", self.frontend)
    }

    /// A node of the backend directory.
    pub fn back(&self, node: &str) -> String {
        format!("{}/{node}", self.backend)
    }
}

fn xs_err(what: impl Into<String>) -> impl FnOnce(HypervisorError) -> DeviceError {
    let what = what.into();
    move |source| DeviceError::Xenstore { what, source }
}

/// Creates `path` with `perms` unless it exists (existing directories keep the rights the
/// toolstack gave them).
fn ensure_dir(xs: &dyn XenStore, tx: Tx, path: &str, perms: &[XsPerm]) -> hypervisor::Result<()> {
    match xs.read(tx, path) {
        Ok(_) => Ok(()),
        Err(e) if e.errno() == Some(hypervisor::Errno::ENOENT) => {
            xs.mkdir(tx, path)?;
            xs.set_permissions(tx, path, perms)
        }
        Err(e) => Err(e),
    }
}

/// Creates both directories of a device in one transaction: the frontend's (owned by the
/// guest, readable by the backend domain) and the backend's (owned by the backend domain,
/// readable by the guest), with `front_nodes` and `back_nodes` besides the standard ones.
/// Both `state` nodes start at `Initialising`. Refused if the guest already has the device.
pub fn create_nodes(
    xs: &dyn XenStore,
    paths: &DevicePaths,
    front_nodes: &[(&str, String)],
    back_nodes: &[(&str, String)],
) -> Result<(), DeviceError> {
    let front_perms = [
        XsPerm::new(paths.domid, XsPermKind::None),
        XsPerm::new(paths.backend_domid, XsPermKind::Read),
    ];
    let back_perms = [
        XsPerm::new(paths.backend_domid, XsPermKind::None),
        XsPerm::new(paths.domid, XsPermKind::Read),
    ];
    let class_dir = paths
        .frontend
        .rsplit_once('/')
        .map(|(p, _)| p.to_owned())
        .unwrap_or_default();
    let init = XenbusState::Initialising.as_node_value();
    let result = with_transaction(xs, TX_ATTEMPTS, |tx| {
        match xs.read(tx, &paths.front("backend")) {
            Ok(b) => return Ok(Err(String::from_utf8_lossy(&b).into_owned())),
            Err(e) if e.errno() == Some(hypervisor::Errno::ENOENT) => {}
            Err(e) => return Err(e),
        }
        // the guest lists its device class directory: it must be able to read it
        ensure_dir(
            xs,
            tx,
            &class_dir,
            &[
                XsPerm::new(paths.backend_domid, XsPermKind::None),
                XsPerm::new(paths.domid, XsPermKind::Read),
            ],
        )?;
        let mut front: Vec<(String, String)> = vec![
            (paths.front("backend"), paths.backend.clone()),
            (paths.front("backend-id"), paths.backend_domid.to_string()),
            (paths.front("state"), init.clone()),
        ];
        front.extend(front_nodes.iter().map(|(k, v)| (paths.front(k), v.clone())));
        let mut back: Vec<(String, String)> = vec![
            (paths.back("frontend"), paths.frontend.clone()),
            (paths.back("frontend-id"), paths.domid.to_string()),
            (paths.back("online"), "1".to_owned()),
            (paths.back("state"), init.clone()),
            (
                paths.back(KEMARI_STATE_NODE),
                BackendState::Xenbus(XenbusState::Initialising)
                    .as_private_value()
                    .to_owned(),
            ),
        ];
        back.extend(back_nodes.iter().map(|(k, v)| (paths.back(k), v.clone())));
        for (dir, nodes, perms) in [
            (&paths.frontend, &front, &front_perms),
            (&paths.backend, &back, &back_perms),
        ] {
            xs.mkdir(tx, dir)?;
            xs.set_permissions(tx, dir, perms)?;
            for (path, value) in nodes {
                xs.write(tx, path, value.as_bytes())?;
                xs.set_permissions(tx, path, perms)?;
            }
        }
        Ok(Ok(()))
    })
    .map_err(xs_err(format!(
        "creating device nodes {} and {}",
        paths.frontend, paths.backend
    )))?;
    result.map_err(|backend| DeviceError::Exists {
        domid: paths.domid,
        path: paths.frontend.clone(),
        backend,
    })
}

/// Removes the backend directory, and the frontend directory if it still points at it (the
/// guest may be gone, taking its directory along).
pub fn remove_nodes(xs: &dyn XenStore, paths: &DevicePaths) -> Result<(), DeviceError> {
    if let Ok(b) = xs.read(Tx::NONE, &paths.front("backend")) {
        if b == paths.backend.as_bytes() {
            match xs.rm(Tx::NONE, &paths.frontend) {
                Ok(()) => {}
                Err(e) if e.errno() == Some(hypervisor::Errno::ENOENT) => {}
                Err(e) => return Err(xs_err(format!("removing {}", paths.frontend))(e)),
            }
        }
    }
    match xs.rm(Tx::NONE, &paths.backend) {
        Ok(()) => {}
        Err(e) if e.errno() == Some(hypervisor::Errno::ENOENT) => {}
        Err(e) => return Err(xs_err(format!("removing {}", paths.backend))(e)),
    }
    // the guest's directory under the backend type, once its last device is gone (checked and
    // removed in one transaction, so a device another process adds meanwhile stays)
    let Some((domain_dir, _)) = paths.backend.rsplit_once('/') else {
        return Ok(());
    };
    with_transaction(xs, TX_ATTEMPTS, |tx| match xs.directory(tx, domain_dir) {
        Ok(children) if children.is_empty() => xs.rm(tx, domain_dir),
        Ok(_) => Ok(()),
        Err(e) if e.errno() == Some(hypervisor::Errno::ENOENT) => Ok(()),
        Err(e) => Err(e),
    })
    .map_err(xs_err(format!("removing {domain_dir}")))
}

/// Publishes a backend state change (checked): the guest-visible `state` and the private
/// `kemari-state`.
pub fn publish_state(
    xs: &dyn XenStore,
    paths: &DevicePaths,
    from: BackendState,
    to: BackendState,
) -> Result<(), DeviceError> {
    from.check_transition(to)?;
    let state = paths.back("state");
    let private = paths.back(KEMARI_STATE_NODE);
    with_transaction(xs, TX_ATTEMPTS, |tx| {
        xs.write(tx, &state, to.published().as_node_value().as_bytes())?;
        xs.write(tx, &private, to.as_private_value().as_bytes())
    })
    .map_err(xs_err(format!("publishing state {to} at {state}")))
}

/// The frontend's state; `None` if its directory is gone (guest destroyed).
pub fn frontend_state(
    xs: &dyn XenStore,
    paths: &DevicePaths,
) -> Result<Option<XenbusState>, DeviceError> {
    let path = paths.frontend_state();
    match xs.read(Tx::NONE, &path) {
        Ok(v) => {
            let s = String::from_utf8_lossy(&v);
            Ok(Some(s.parse::<XenbusState>()?))
        }
        Err(e) if e.errno() == Some(hypervisor::Errno::ENOENT) => Ok(None),
        Err(e) => Err(xs_err(format!("reading {path}"))(e)),
    }
}

/// Reads a frontend node as a string (`None` if absent); values longer than any node the
/// protocol defines are refused.
pub fn read_front(
    xs: &dyn XenStore,
    paths: &DevicePaths,
    node: &str,
) -> Result<Option<String>, DeviceError> {
    let path = paths.front(node);
    match xs.read(Tx::NONE, &path) {
        Ok(v) => {
            if v.len() > MAX_FRONT_VALUE {
                return Err(DeviceError::BadFrontendNode {
                    path,
                    value: String::from_utf8_lossy(&v[..MAX_FRONT_VALUE]).into_owned(),
                    why: "value too long",
                });
            }
            Ok(Some(
                String::from_utf8_lossy(&v)
                    .trim_end_matches(['\0', '\n'])
                    .to_owned(),
            ))
        }
        Err(e) if e.errno() == Some(hypervisor::Errno::ENOENT) => Ok(None),
        Err(e) => Err(xs_err(format!("reading {path}"))(e)),
    }
}

/// Reads a required unsigned frontend node (decimal).
pub fn read_front_u32(
    xs: &dyn XenStore,
    paths: &DevicePaths,
    node: &str,
) -> Result<u32, DeviceError> {
    let v = read_front(xs, paths, node)?;
    v.as_deref()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .ok_or_else(|| DeviceError::BadFrontendNode {
            path: paths.front(node),
            value: v.unwrap_or_else(|| "<missing>".to_owned()),
            why: "expected an unsigned decimal number",
        })
}

/// Writes a node of the backend directory (readable by the guest, as its directory).
pub fn write_back(
    xs: &dyn XenStore,
    paths: &DevicePaths,
    node: &str,
    value: &str,
) -> Result<(), DeviceError> {
    let path = paths.back(node);
    xs.write(Tx::NONE, &path, value.as_bytes())
        .map_err(xs_err(format!("writing {path}")))
}

/// Bad requests of one device a guest can send without flooding dom0's log: the first
/// [`LOGGED_BAD_REQUESTS`] are logged at warn level, the rest at debug level.
pub const LOGGED_BAD_REQUESTS: u32 = 8;

/// The log of a device's bad requests (see [`LOGGED_BAD_REQUESTS`]).
#[derive(Debug, Default)]
pub struct BadRequestLog {
    count: u32,
}

impl BadRequestLog {
    /// Logs one bad request of `backend` (a `kind` of device: "device", "vif"); true if it
    /// went to the warn level.
    pub fn log(&mut self, backend: &str, kind: &str, msg: std::fmt::Arguments<'_>) -> bool {
        self.count = self.count.saturating_add(1);
        if self.count > LOGGED_BAD_REQUESTS {
            log::debug!("{backend}: {msg}");
            return false;
        }
        log::warn!("{backend}: {msg}");
        if self.count == LOGGED_BAD_REQUESTS {
            log::warn!("{backend}: further bad requests of this {kind} are logged at debug level");
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_requests_are_logged_at_warn_level_only_up_to_the_limit() {
        let mut l = BadRequestLog::default();
        for _ in 0..LOGGED_BAD_REQUESTS {
            assert!(l.log("b", "device", format_args!("x")));
        }
        assert!(!l.log("b", "device", format_args!("x")));
        l.count = u32::MAX;
        assert!(
            !l.log("b", "device", format_args!("x")),
            "no wrap back to warn"
        );
    }
}
