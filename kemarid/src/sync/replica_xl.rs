//! [`ReplicaBuilder`] over Xen's own `xl restore -p`: the replica is built by the stock
//! toolstack from the `xl save` image, so libxl sets up its devices, device model and xenstore
//! entries exactly as for any restored domain.
//!
//! `xl restore` names the domain after the `c_info.name` of the image's configuration. When the
//! caller wants another name (a replica on a host where a domain of the original name exists),
//! a copy of the image with the name changed in its xl header is restored, then removed.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hypervisor::{DomId, DomainControl};
use kemari_stream::xl::XlHeader;
use kemari_stream::Limits;

use super::replica::{ReplicaBuilder, ReplicaError};
use crate::domconfig;
use crate::xltool::XlTool;

/// Builds replicas with `xl restore -p -e`.
pub struct XlReplicaBuilder {
    xl: XlTool,
    control: Option<Arc<dyn DomainControl>>,
}

impl std::fmt::Debug for XlReplicaBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XlReplicaBuilder")
            .field("xl", &self.xl)
            .field("checks_paused", &self.control.is_some())
            .finish()
    }
}

impl XlReplicaBuilder {
    /// Runs `xl`; with `control`, also checks that each new domain is paused.
    pub fn new(xl: XlTool, control: Option<Arc<dyn DomainControl>>) -> XlReplicaBuilder {
        XlReplicaBuilder { xl, control }
    }

    /// The configuration name in the image's xl header.
    pub fn image_name(image: &Path) -> Result<String, ReplicaError> {
        let (header, _) = read_header(image)?;
        let config = parse(image, &header)?;
        domconfig::config_name(&config)
            .map(str::to_string)
            .ok_or_else(|| ReplicaError::Image {
                path: image.to_path_buf(),
                detail: "the configuration has no c_info.name".into(),
            })
    }
}

fn io(path: &Path, source: std::io::Error) -> ReplicaError {
    ReplicaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads the xl header; returns it with the reader positioned after it.
fn read_header(image: &Path) -> Result<(XlHeader, BufReader<File>), ReplicaError> {
    let file = File::open(image).map_err(|e| io(image, e))?;
    let mut r = BufReader::new(file);
    let header = XlHeader::read(&mut r, &Limits::default()).map_err(|e| ReplicaError::Image {
        path: image.to_path_buf(),
        detail: e.to_string(),
    })?;
    Ok((header, r))
}

fn parse(image: &Path, header: &XlHeader) -> Result<serde_json::Value, ReplicaError> {
    if !header.config_is_json() {
        return Err(ReplicaError::Image {
            path: image.to_path_buf(),
            detail: "the xl header carries no JSON configuration".into(),
        });
    }
    domconfig::parse_config(&image.display().to_string(), header.config_text()).map_err(|e| {
        ReplicaError::Image {
            path: image.to_path_buf(),
            detail: e.to_string(),
        }
    })
}

/// Writes a copy of `image` whose configuration is named `name`; returns its path.
fn renamed_copy(image: &Path, name: &str) -> Result<PathBuf, ReplicaError> {
    let (header, mut rest) = read_header(image)?;
    let config = domconfig::for_image(parse(image, &header)?, Some(name));
    let mut new_header = XlHeader::new(&domconfig::to_image_bytes(&config));
    new_header.optional_flags = header.optional_flags;
    new_header.extra_optional_data = header.extra_optional_data.clone();
    let mut os = image.as_os_str().to_owned();
    os.push(format!(".{name}.renamed"));
    let copy = PathBuf::from(os);
    let result = (|| {
        let mut w = BufWriter::new(File::create(&copy).map_err(|e| io(&copy, e))?);
        new_header
            .write(&mut w, &Limits::default())
            .map_err(|e| ReplicaError::Image {
                path: copy.clone(),
                detail: e.to_string(),
            })?;
        std::io::copy(&mut rest, &mut w).map_err(|e| io(&copy, e))?;
        w.flush().map_err(|e| io(&copy, e))
    })();
    if let Err(err) = result {
        let _ = std::fs::remove_file(&copy);
        return Err(err);
    }
    Ok(copy)
}

impl ReplicaBuilder for XlReplicaBuilder {
    fn create_paused(&self, image: &Path, name: &str) -> Result<DomId, ReplicaError> {
        let current = XlReplicaBuilder::image_name(image)?;
        let (path, temporary) = if current == name {
            (image.to_path_buf(), false)
        } else {
            (renamed_copy(image, name)?, true)
        };
        let restored = self.xl.restore(&path, name, true);
        if temporary {
            if let Err(err) = std::fs::remove_file(&path) {
                log::warn!("cannot remove renamed image copy {}: {err}", path.display());
            }
        }
        let (domid, out) = restored.map_err(|e| ReplicaError::Tool {
            what: format!("xl restore -p {}", image.display()),
            source: Box::new(e),
        })?;
        log::info!(
            "replica {name} restored as domain {domid} in {:?}",
            out.elapsed
        );
        if let Some(control) = &self.control {
            let paused = control.domain_info(domid).map(|i| i.paused);
            if !matches!(paused, Ok(true)) {
                let destroyed = self.destroy(domid);
                return match (paused, destroyed) {
                    (Err(e), _) => Err(ReplicaError::Tool {
                        what: format!("checking replica domain {domid}"),
                        source: Box::new(e),
                    }),
                    (Ok(_), Err(e)) => Err(e),
                    (Ok(_), Ok(())) => Err(ReplicaError::NotPaused { domid }),
                };
            }
        }
        Ok(domid)
    }

    fn destroy(&self, domid: DomId) -> Result<(), ReplicaError> {
        self.xl.destroy(domid).map_err(|e| ReplicaError::Tool {
            what: format!("destroying domain {domid}"),
            source: Box::new(e),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A fake `xl`: `restore` records the name found in the image (grep of the header) and
    /// the file it was given, and creates domain 5 under that name.
    fn setup(tag: &str, restore_rc: i32) -> (Dir, XlReplicaBuilder) {
        let dir = std::env::temp_dir().join(format!("kemari-replxl-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("doms")).unwrap();
        let script = format!(
            r#"#!/bin/sh
D='{d}'
echo "$*" >>"$D/log"
case "$1" in
  domid) [ -f "$D/doms/$2" ] && cat "$D/doms/$2" && exit 0; echo "no such domain $2" >&2; exit 1 ;;
  destroy) for f in "$D/doms/"*; do [ "$(cat "$f")" = "$2" ] && rm -f "$f"; done; exit 0 ;;
  restore)
    img=$4
    name=$(grep -ao '"name":"[a-z0-9-]*"' "$img" | head -1 | cut -d'"' -f4)
    cp "$img" "$D/restored.img"
    echo 5 >"$D/doms/$name"
    [ {rc} = 0 ] || {{ echo "libxl: error: cannot restore" >&2; exit {rc}; }}
    exit 0 ;;
esac
exit 9
"#,
            d = dir.display(),
            rc = restore_rc
        );
        std::fs::write(dir.join("xl"), script).unwrap();
        std::fs::set_permissions(dir.join("xl"), std::fs::Permissions::from_mode(0o755)).unwrap();
        let builder =
            XlReplicaBuilder::new(XlTool::new(dir.join("xl"), Duration::from_secs(10)), None);
        (Dir(dir), builder)
    }

    fn image(dir: &Path, name: &str) -> PathBuf {
        let config =
            format!(r#"{{"c_info":{{"type":"pvh","name":"{name}","domid":0}},"b_info":{{}}}}"#);
        let path = dir.join("initial.img");
        let mut f = File::create(&path).unwrap();
        XlHeader::new(config.as_bytes())
            .write(&mut f, &Limits::default())
            .unwrap();
        f.write_all(b"LibxlFmt...rest of the stream").unwrap();
        path
    }

    #[test]
    fn restores_under_the_image_name() {
        let (dir, builder) = setup("same", 0);
        let img = image(&dir.0, "g1");
        assert_eq!(builder.create_paused(&img, "g1").unwrap(), 5);
        let log = std::fs::read_to_string(dir.0.join("log")).unwrap();
        assert!(
            log.contains(&format!("restore -p -e {}", img.display())),
            "{log}"
        );
        assert_eq!(
            std::fs::read(dir.0.join("restored.img")).unwrap(),
            std::fs::read(&img).unwrap()
        );
    }

    #[test]
    fn renames_through_a_temporary_copy() {
        let (dir, builder) = setup("rename", 0);
        let img = image(&dir.0, "g1");
        assert_eq!(builder.create_paused(&img, "g1-replica").unwrap(), 5);
        let restored = dir.0.join("restored.img");
        assert_eq!(
            XlReplicaBuilder::image_name(&restored).unwrap(),
            "g1-replica"
        );
        // the stream after the header is unchanged
        assert!(std::fs::read(&restored)
            .unwrap()
            .ends_with(b"LibxlFmt...rest of the stream"));
        // the temporary copy is gone, the original untouched
        let left: Vec<_> = std::fs::read_dir(&dir.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("renamed"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        assert_eq!(XlReplicaBuilder::image_name(&img).unwrap(), "g1");
    }

    #[test]
    fn failure_destroys_the_half_made_domain_and_keeps_xl_stderr() {
        let (dir, builder) = setup("fail", 4);
        let img = image(&dir.0, "g1");
        let err = builder.create_paused(&img, "g1").unwrap_err();
        let msg = format!("{err}: {}", std::error::Error::source(&err).unwrap());
        assert!(msg.contains("cannot restore"), "{msg}");
        assert!(!dir.0.join("doms/g1").exists(), "half-made domain left");
    }

    #[test]
    fn a_bad_image_is_refused_before_xl_runs() {
        let (dir, builder) = setup("bad", 0);
        let img = dir.0.join("junk.img");
        std::fs::write(&img, b"not an xl image at all, far too short").unwrap();
        let err = builder.create_paused(&img, "g1").unwrap_err();
        assert!(matches!(err, ReplicaError::Image { .. }), "{err:?}");
        assert!(!dir.0.join("log").exists());
        let err = builder
            .create_paused(&dir.0.join("missing.img"), "g1")
            .unwrap_err();
        assert!(err.to_string().contains("missing.img"), "{err}");
    }

    #[test]
    fn a_domain_that_is_not_paused_is_destroyed() {
        use hypervisor::mem::{DomainConfig, MemXen};
        let (dir, _) = setup("notpaused", 0);
        let xen = Arc::new(MemXen::new());
        // domain 5 exists in the in-memory Xen and is running (pause count 0)
        while xen.create_domain(DomainConfig::pvh(4)).unwrap() < 5 {}
        let builder = XlReplicaBuilder::new(
            XlTool::new(dir.0.join("xl"), Duration::from_secs(10)),
            Some(xen.clone() as Arc<dyn DomainControl>),
        );
        let img = image(&dir.0, "g1");
        let err = builder.create_paused(&img, "g1").unwrap_err();
        assert!(
            matches!(err, ReplicaError::NotPaused { domid: 5 }),
            "{err:?}"
        );
        assert!(!dir.0.join("doms/g1").exists());
    }
}
