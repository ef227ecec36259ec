//! The libxl domain configuration of a running domain, as `xl save` puts it in an image.
//!
//! `xl save` asks `libxl_retrieve_domain_configuration`, which starts from the JSON libxl stored
//! when it created the domain, in `/var/lib/xen/userdata-d.<domid>.<uuid>.libxl-json`
//! (`libxl__userdata_path(gc, domid, "libxl-json", "d")`, a `libxl_domain_config` as JSON with
//! a trailing NUL), then sets `c_info.domid` to 0 (unless `-D`) and writes it into the xl header.
//! `xl restore` re-creates the domain from exactly that JSON (it has no other config).
//!
//! The domain's UUID is found in xenstore (`/local/domain/<domid>/vm` is `/vm/<uuid>`); when that
//! key is missing, the single userdata file of the domain id is taken.

use std::path::{Path, PathBuf};

use hypervisor::{DomId, Tx, XenStore};
use serde_json::Value;
use thiserror::Error;

/// Where libxl keeps per-domain userdata (`XEN_LIB_DIR`).
pub const XEN_LIB_DIR: &str = "/var/lib/xen";

/// Largest config file accepted (real ones are a few KiB).
pub const MAX_CONFIG_LEN: u64 = 16 << 20;

/// Errors finding, reading or changing a domain's configuration.
#[derive(Debug, Error)]
pub enum DomConfigError {
    /// The xenstore key naming the domain's VM path is malformed.
    #[error("domain {domid}: xenstore {path} is {value:?}, not /vm/<uuid>")]
    BadVmPath {
        /// The domain.
        domid: DomId,
        /// The key.
        path: String,
        /// Its value.
        value: String,
    },
    /// No userdata file for the domain.
    #[error("domain {domid}: no libxl config {wanted} (was the domain created by xl/libxl?)")]
    NotFound {
        /// The domain.
        domid: DomId,
        /// The file (or pattern) looked for.
        wanted: String,
    },
    /// Several candidate files and no UUID to choose.
    #[error("domain {domid}: several libxl configs in {dir}: {files:?}, and no UUID in xenstore to choose")]
    Ambiguous {
        /// The domain.
        domid: DomId,
        /// The directory.
        dir: PathBuf,
        /// The candidates.
        files: Vec<String>,
    },
    /// The file could not be read.
    #[error("domain {domid}: cannot read libxl config {path}: {source}")]
    Read {
        /// The domain.
        domid: DomId,
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The file is too big.
    #[error("domain {domid}: libxl config {path} has {len} bytes, more than {limit}")]
    TooLarge {
        /// The domain.
        domid: DomId,
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// The JSON is not a libxl domain configuration.
    #[error("libxl config {what}: {detail}")]
    BadJson {
        /// The file or image the JSON came from.
        what: String,
        /// What is wrong.
        detail: String,
    },
}

/// The userdata file libxl keeps for `domid` with UUID `uuid`.
pub fn userdata_path(dir: &Path, domid: DomId, uuid: &str) -> PathBuf {
    dir.join(format!("userdata-d.{domid}.{uuid}.libxl-json"))
}

fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The domain's UUID from xenstore (`/local/domain/<domid>/vm` = `/vm/<uuid>`), or `None` if the
/// key does not exist.
pub fn domain_uuid(xs: &dyn XenStore, domid: DomId) -> Result<Option<String>, DomConfigError> {
    let path = format!("/local/domain/{domid}/vm");
    let value = match xs.read(Tx::NONE, &path) {
        Ok(v) => v,
        Err(err) => {
            log::debug!("domain {domid}: {path}: {err}");
            return Ok(None);
        }
    };
    let value = String::from_utf8_lossy(&value).into_owned();
    match value.strip_prefix("/vm/") {
        Some(uuid) if is_uuid(uuid) => Ok(Some(uuid.to_string())),
        _ => Err(DomConfigError::BadVmPath { domid, path, value }),
    }
}

/// Finds the config file of `domid` in `dir`: by UUID when known, else the only
/// `userdata-d.<domid>.*.libxl-json`.
pub fn find_config_file(
    dir: &Path,
    domid: DomId,
    uuid: Option<&str>,
) -> Result<PathBuf, DomConfigError> {
    if let Some(uuid) = uuid {
        let path = userdata_path(dir, domid, uuid);
        return if path.exists() {
            Ok(path)
        } else {
            Err(DomConfigError::NotFound {
                domid,
                wanted: path.display().to_string(),
            })
        };
    }
    let prefix = format!("userdata-d.{domid}.");
    let suffix = ".libxl-json";
    let entries = std::fs::read_dir(dir).map_err(|source| DomConfigError::Read {
        domid,
        path: dir.to_path_buf(),
        source,
    })?;
    let mut files: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            n.strip_prefix(&prefix)
                .and_then(|rest| rest.strip_suffix(suffix))
                .is_some_and(is_uuid)
        })
        .collect();
    files.sort();
    match files.len() {
        0 => Err(DomConfigError::NotFound {
            domid,
            wanted: dir
                .join(format!("{prefix}<uuid>{suffix}"))
                .display()
                .to_string(),
        }),
        1 => Ok(dir.join(&files[0])),
        _ => Err(DomConfigError::Ambiguous {
            domid,
            dir: dir.to_path_buf(),
            files,
        }),
    }
}

/// Parses and checks a libxl domain configuration (`what` names its origin in errors): a JSON
/// object with `c_info` and `b_info` objects; a trailing NUL (as libxl stores it) is accepted.
pub fn parse_config(what: &str, text: &[u8]) -> Result<Value, DomConfigError> {
    let text = text.strip_suffix(b"\0").unwrap_or(text);
    let value: Value = serde_json::from_slice(text).map_err(|err| DomConfigError::BadJson {
        what: what.into(),
        detail: err.to_string(),
    })?;
    for key in ["c_info", "b_info"] {
        if !value.get(key).is_some_and(Value::is_object) {
            return Err(DomConfigError::BadJson {
                what: what.into(),
                detail: format!("no {key} object"),
            });
        }
    }
    Ok(value)
}

/// Reads the libxl configuration of `domid` from `dir` (normally [`XEN_LIB_DIR`]), finding the
/// file through the UUID in xenstore when `xs` is given.
pub fn read_domain_config(
    dir: &Path,
    domid: DomId,
    xs: Option<&dyn XenStore>,
) -> Result<Value, DomConfigError> {
    let uuid = match xs {
        Some(xs) => domain_uuid(xs, domid)?,
        None => None,
    };
    let path = find_config_file(dir, domid, uuid.as_deref())?;
    let len = std::fs::metadata(&path)
        .map_err(|source| DomConfigError::Read {
            domid,
            path: path.clone(),
            source,
        })?
        .len();
    if len > MAX_CONFIG_LEN {
        return Err(DomConfigError::TooLarge {
            domid,
            path,
            len,
            limit: MAX_CONFIG_LEN,
        });
    }
    let text = std::fs::read(&path).map_err(|source| DomConfigError::Read {
        domid,
        path: path.clone(),
        source,
    })?;
    parse_config(&path.display().to_string(), &text)
}

/// The configuration as `xl save` writes it into an image: `c_info.domid` = 0 (so that `xl
/// restore` picks a fresh domain id), and optionally a new `c_info.name` (a replica restored on
/// the host where the original still runs must not clash with its name).
pub fn for_image(mut config: Value, rename: Option<&str>) -> Value {
    if let Some(c_info) = config.get_mut("c_info").and_then(Value::as_object_mut) {
        c_info.insert("domid".into(), Value::from(0));
        if let Some(name) = rename {
            c_info.insert("name".into(), Value::from(name));
        }
    }
    config
}

/// The JSON text as `xl` stores it: compact, with a trailing NUL (xl writes `strlen + 1`).
pub fn to_image_bytes(config: &Value) -> Vec<u8> {
    let mut bytes = config.to_string().into_bytes();
    bytes.push(0);
    bytes
}

/// The `c_info.name` of a configuration.
pub fn config_name(config: &Value) -> Option<&str> {
    config.get("c_info")?.get("name")?.as_str()
}

/// `c_info.type` (`"hvm"`, `"pvh"`, `"pv"`).
pub fn config_type(config: &Value) -> Option<&str> {
    config.get("c_info")?.get("type")?.as_str()
}

/// `domain_config_json(domid)`: the configuration of a running domain of this host, ready for an
/// image (see [`for_image`]), as bytes with the trailing NUL.
pub fn domain_config_json(
    domid: DomId,
    xs: Option<&dyn XenStore>,
    rename: Option<&str>,
) -> Result<Vec<u8>, DomConfigError> {
    let config = read_domain_config(Path::new(XEN_LIB_DIR), domid, xs)?;
    Ok(to_image_bytes(&for_image(config, rename)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hypervisor::mem::MemXen;
    use hypervisor::Hypervisor;

    const UUID: &str = "2d5d44a1-4f6b-4a0e-9a35-0c2f4b1e7d10";
    const CONFIG: &str = r#"{"c_info":{"type":"pvh","name":"g1","uuid":"2d5d44a1-4f6b-4a0e-9a35-0c2f4b1e7d10","domid":5},"b_info":{"max_memkb":131072},"disks":[{"pdev_path":"/var/lib/lab/g1.img","vdev":"xvda"}]}"#;

    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let dir =
                std::env::temp_dir().join(format!("kemari-domconfig-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn write_config(dir: &Path, domid: DomId, uuid: &str, text: &str) {
        let mut bytes = text.as_bytes().to_vec();
        bytes.push(0);
        std::fs::write(userdata_path(dir, domid, uuid), bytes).unwrap();
    }

    #[test]
    fn finds_by_uuid_in_xenstore() {
        let dir = TempDir::new("uuid");
        write_config(&dir.0, 5, UUID, CONFIG);
        // a different domain's file and the lock file are ignored
        write_config(&dir.0, 6, "11111111-2222-3333-4444-555555555555", "{}");
        std::fs::write(dir.0.join("userdata-l.5.x.domain-userdata-lock"), b"").unwrap();
        let xen = MemXen::new();
        let xs = xen.open_xenstore().unwrap();
        xs.write(
            Tx::NONE,
            "/local/domain/5/vm",
            format!("/vm/{UUID}").as_bytes(),
        )
        .unwrap();
        let config = read_domain_config(&dir.0, 5, Some(xs.as_ref())).unwrap();
        assert_eq!(config_name(&config), Some("g1"));
        assert_eq!(config_type(&config), Some("pvh"));
    }

    #[test]
    fn without_xenstore_key_takes_the_only_file() {
        let dir = TempDir::new("scan");
        write_config(&dir.0, 5, UUID, CONFIG);
        write_config(&dir.0, 15, "11111111-2222-3333-4444-555555555555", "{}");
        let config = read_domain_config(&dir.0, 5, None).unwrap();
        assert_eq!(config["disks"][0]["vdev"], "xvda");
    }

    #[test]
    fn errors_name_the_domain_and_file() {
        let dir = TempDir::new("err");
        let err = read_domain_config(&dir.0, 9, None).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("domain 9") && msg.contains("userdata-d.9.<uuid>.libxl-json"),
            "{msg}"
        );

        write_config(&dir.0, 9, UUID, "{\"c_info\": {}}");
        let err = read_domain_config(&dir.0, 9, None).unwrap_err();
        assert!(err.to_string().contains("no b_info object"), "{err}");
        assert!(
            err.to_string().contains(&format!("userdata-d.9.{UUID}")),
            "{err}"
        );

        write_config(&dir.0, 9, UUID, "{not json");
        let err = read_domain_config(&dir.0, 9, None).unwrap_err();
        assert!(matches!(err, DomConfigError::BadJson { .. }), "{err:?}");

        write_config(&dir.0, 9, "11111111-2222-3333-4444-555555555555", CONFIG);
        let err = read_domain_config(&dir.0, 9, None).unwrap_err();
        assert!(
            matches!(err, DomConfigError::Ambiguous { ref files, .. } if files.len() == 2),
            "{err:?}"
        );

        let xen = MemXen::new();
        let xs = xen.open_xenstore().unwrap();
        xs.write(Tx::NONE, "/local/domain/9/vm", b"/vm/garbage")
            .unwrap();
        let err = read_domain_config(&dir.0, 9, Some(xs.as_ref())).unwrap_err();
        assert!(err.to_string().contains("/local/domain/9/vm"), "{err}");
        xs.write(
            Tx::NONE,
            "/local/domain/9/vm",
            b"/vm/99999999-2222-3333-4444-555555555555",
        )
        .unwrap();
        let err = read_domain_config(&dir.0, 9, Some(xs.as_ref())).unwrap_err();
        assert!(err.to_string().contains("userdata-d.9.99999999-"), "{err}");
    }

    #[test]
    fn image_form_clears_domid_and_renames() {
        let config = parse_config("test", CONFIG.as_bytes()).unwrap();
        let image = for_image(config.clone(), None);
        assert_eq!(image["c_info"]["domid"], 0);
        assert_eq!(image["c_info"]["name"], "g1");
        assert_eq!(image["disks"], config["disks"]);
        let renamed = for_image(config, Some("g1-replica"));
        let bytes = to_image_bytes(&renamed);
        assert_eq!(bytes.last(), Some(&0));
        let back = parse_config("image", &bytes).unwrap();
        assert_eq!(config_name(&back), Some("g1-replica"));
        assert_eq!(back["c_info"]["uuid"], UUID);
    }

    #[test]
    fn uuid_shape() {
        assert!(is_uuid(UUID));
        assert!(!is_uuid("2d5d44a1-4f6b-4a0e-9a35-0c2f4b1e7d1"));
        assert!(!is_uuid("../../etc/passwd"));
        assert!(!is_uuid("2d5d44a1-4f6b-4a0e-9a35-0c2f4b1e7d1g"));
    }
}
