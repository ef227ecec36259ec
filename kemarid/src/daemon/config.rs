//! `/etc/kemari/kemarid.conf`: TOML, every key optional (docs/api.md, "Configuration").

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::api::{ApiError, ErrorCode, StartOptions};

/// Where the configuration is read from unless `--config` says otherwise.
pub const DEFAULT_CONFIG: &str = "/etc/kemari/kemarid.conf";

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file exists but cannot be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown keys or wrong types.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong where (toml's message names the line and key).
        message: String,
    },
    /// A value is out of range.
    #[error("{path}: {key} = {value:?}: {why}")]
    Value {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// Its value.
        value: String,
        /// What is wrong with it.
        why: String,
    },
}

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[daemon]`.
    pub daemon: DaemonConfig,
    /// `[defaults]`: options of every guest.
    pub defaults: GuestConfig,
    /// `[guest.NAME]`: options of one guest.
    pub guest: BTreeMap<String, GuestConfig>,
}

/// `[daemon]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// The local control socket.
    pub socket: PathBuf,
    /// Worker records and status files (`guests/DOM/`).
    pub state_dir: PathBuf,
    /// TCP address for the peer daemon ("" = no peer port).
    pub peer_listen: String,
    /// Port range of the receiving workers, `FIRST-LAST`.
    pub data_ports: String,
    /// Address the receiving workers listen on.
    pub data_listen: String,
    /// Secondary: spool folder per guest.
    pub spool_dir: PathBuf,
    /// Prometheus endpoint ("" = off).
    pub metrics_listen: String,
    /// The `kemari` binary ("" = next to kemarid).
    pub kemari_bin: String,
    /// This host's name ("" = the kernel's).
    pub hostname: String,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            socket: PathBuf::from(crate::api::DEFAULT_SOCKET),
            state_dir: PathBuf::from("/run/kemari"),
            peer_listen: format!("0.0.0.0:{}", crate::api::DEFAULT_PEER_PORT),
            data_ports: "7210-7299".into(),
            data_listen: "0.0.0.0".into(),
            spool_dir: PathBuf::from("/var/lib/kemari/spool"),
            metrics_listen: String::new(),
            kemari_bin: String::new(),
            hostname: String::new(),
        }
    }
}

/// `[defaults]` and `[guest.NAME]`: every key optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuestConfig {
    /// Maximum epoch (ms).
    pub interval_ms: Option<u64>,
    /// Minimum guest run time between checkpoints (ms).
    pub min_run_ms: Option<u64>,
    /// Checkpoints at suspend points.
    pub suspend: Option<bool>,
    /// Seconds the guest may take to suspend for one checkpoint (primary, with `suspend`).
    pub suspend_timeout_s: Option<u64>,
    /// The guest's disk image (primary).
    pub disk: Option<PathBuf>,
    /// The secondary's copy of it.
    pub disk_copy: Option<PathBuf>,
    /// Virtual device of the disk.
    pub vdev: Option<String>,
    /// The NIC on the secondary after a failover.
    pub vif: Option<String>,
    /// Unpause after the initial sync.
    pub unpause: Option<bool>,
    /// Heartbeat period (ms).
    pub heartbeat_ms: Option<u64>,
    /// Misses before the peer is dead.
    pub heartbeat_misses: Option<u32>,
}

/// The default of `--suspend-timeout-s` (`kemari replicate`) and of `suspend_timeout_s`.
pub const DEFAULT_SUSPEND_TIMEOUT_S: u64 = 10;

fn default_suspend_timeout_s() -> u64 {
    DEFAULT_SUSPEND_TIMEOUT_S
}

/// A guest's options with every default applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolved {
    /// Maximum epoch (ms).
    pub interval_ms: u64,
    /// Minimum guest run time between two checkpoints (ms; 0: none). Absent in the records of
    /// daemons that predate it: 0.
    #[serde(default)]
    pub min_run_ms: u64,
    /// Checkpoints at suspend points.
    pub suspend: bool,
    /// Seconds the guest may take to suspend (primary; `kemari replicate --suspend-timeout-s`).
    /// Not a request option: the primary's kemarid.conf sets it. Absent in the records of
    /// daemons that predate it: the default.
    #[serde(default = "default_suspend_timeout_s")]
    pub suspend_timeout_s: u64,
    /// The guest's disk image.
    pub disk: Option<PathBuf>,
    /// The secondary's copy.
    pub disk_copy: Option<PathBuf>,
    /// Virtual device.
    pub vdev: String,
    /// NIC after a failover.
    pub vif: Option<String>,
    /// Unpause after the initial sync.
    pub unpause: bool,
    /// Heartbeat period (ms).
    pub heartbeat_ms: u64,
    /// Misses before dead.
    pub heartbeat_misses: u32,
}

impl Resolved {
    /// Back into request options (all set), for `peer-receive`.
    pub fn to_options(&self) -> StartOptions {
        StartOptions {
            interval_ms: Some(self.interval_ms),
            min_run_ms: Some(self.min_run_ms),
            suspend: Some(self.suspend),
            disk: self.disk.clone(),
            disk_copy: self.disk_copy.clone(),
            vdev: Some(self.vdev.clone()),
            vif: self.vif.clone(),
            unpause: Some(self.unpause),
            heartbeat_ms: Some(self.heartbeat_ms),
            heartbeat_misses: Some(self.heartbeat_misses),
        }
    }
}

impl Config {
    /// Reads `path`; a missing file is the defaults.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                log::info!("{} not found: using the defaults", path.display());
                return Ok(Config::default());
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.into(),
                    source,
                })
            }
        };
        Config::parse(&text, path)
    }

    /// Parses the text of `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let c: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        c.data_ports().map_err(|why| ConfigError::Value {
            path: path.into(),
            key: "daemon.data_ports".into(),
            value: c.daemon.data_ports.clone(),
            why,
        })?;
        for (key, g) in std::iter::once(("defaults".to_string(), &c.defaults))
            .chain(c.guest.iter().map(|(n, g)| (format!("guest.{n}"), g)))
        {
            let bad = |k: &str, v: String, why: &str| ConfigError::Value {
                path: path.into(),
                key: format!("{key}.{k}"),
                value: v,
                why: why.into(),
            };
            if g.interval_ms == Some(0) {
                return Err(bad("interval_ms", "0".into(), "must be at least 1"));
            }
            if g.suspend_timeout_s == Some(0) {
                return Err(bad("suspend_timeout_s", "0".into(), "must be at least 1"));
            }
            if g.heartbeat_ms == Some(0) {
                return Err(bad("heartbeat_ms", "0".into(), "must be at least 1"));
            }
            if g.heartbeat_misses == Some(0) {
                return Err(bad("heartbeat_misses", "0".into(), "must be at least 1"));
            }
        }
        Ok(c)
    }

    /// The receiving workers' port range.
    pub fn data_ports(&self) -> Result<std::ops::RangeInclusive<u16>, String> {
        let s = self.daemon.data_ports.trim();
        let (a, b) = s.split_once('-').unwrap_or((s, s));
        let p = |x: &str| {
            x.trim()
                .parse::<u16>()
                .map_err(|e| format!("{x:?} is not a port: {e}"))
        };
        let (a, b) = (p(a)?, p(b)?);
        if a == 0 || a > b {
            return Err("expected FIRST-LAST with 0 < FIRST <= LAST".into());
        }
        Ok(a..=b)
    }

    /// `opts` over `[guest.NAME]` over `[defaults]` over the built-in defaults.
    pub fn resolve(&self, name: &str, opts: &StartOptions) -> Result<Resolved, ApiError> {
        let g = self.guest.get(name).cloned().unwrap_or_default();
        let d = &self.defaults;
        let r = Resolved {
            interval_ms: opts
                .interval_ms
                .or(g.interval_ms)
                .or(d.interval_ms)
                .unwrap_or(100),
            min_run_ms: opts
                .min_run_ms
                .or(g.min_run_ms)
                .or(d.min_run_ms)
                .unwrap_or(0),
            suspend: opts.suspend.or(g.suspend).or(d.suspend).unwrap_or(true),
            suspend_timeout_s: g
                .suspend_timeout_s
                .or(d.suspend_timeout_s)
                .unwrap_or(DEFAULT_SUSPEND_TIMEOUT_S),
            disk: opts.disk.clone().or(g.disk).or(d.disk.clone()),
            disk_copy: opts
                .disk_copy
                .clone()
                .or(g.disk_copy)
                .or(d.disk_copy.clone()),
            vdev: opts
                .vdev
                .clone()
                .or(g.vdev)
                .or(d.vdev.clone())
                .unwrap_or_else(|| "xvda".into()),
            vif: opts.vif.clone().or(g.vif).or(d.vif.clone()),
            unpause: opts.unpause.or(g.unpause).or(d.unpause).unwrap_or(false),
            heartbeat_ms: opts
                .heartbeat_ms
                .or(g.heartbeat_ms)
                .or(d.heartbeat_ms)
                .unwrap_or(100),
            heartbeat_misses: opts
                .heartbeat_misses
                .or(g.heartbeat_misses)
                .or(d.heartbeat_misses)
                .unwrap_or(5),
        };
        let bad = |what: &str| {
            ApiError::new(
                ErrorCode::BadRequest,
                format!("guest {name}: {what} must be at least 1"),
                format!("give {what} >= 1 in the request or in kemarid.conf"),
            )
        };
        if r.interval_ms == 0 {
            return Err(bad("interval_ms"));
        }
        if r.suspend_timeout_s == 0 {
            return Err(bad("suspend_timeout_s"));
        }
        if r.heartbeat_ms == 0 {
            return Err(bad("heartbeat_ms"));
        }
        if r.heartbeat_misses == 0 {
            return Err(bad("heartbeat_misses"));
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_file_is_the_defaults_and_the_documented_example_parses() {
        let c = Config::load(Path::new("/nonexistent/kemarid.conf")).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.data_ports().unwrap(), 7210..=7299);
        let text = r#"
[daemon]
socket = "/run/kemari/kemarid.sock"
state_dir = "/run/kemari"
peer_listen = "0.0.0.0:7200"
data_ports = "7210-7299"
data_listen = "0.0.0.0"
spool_dir = "/var/lib/kemari/spool"
metrics_listen = ""
kemari_bin = ""
hostname = ""

[defaults]
interval_ms = 100
suspend = true
vdev = "xvda"
unpause = false
heartbeat_ms = 100
heartbeat_misses = 5

[guest.web1]
disk = "/srv/xen/web1.img"
disk_copy = "/srv/xen/web1-copy.img"
vif = "mac=00:16:3e:00:00:01,bridge=xenbr0"
interval_ms = 50
min_run_ms = 25
suspend_timeout_s = 120
"#;
        let c = Config::parse(text, Path::new("t.conf")).unwrap();
        let r = c.resolve("web1", &StartOptions::default()).unwrap();
        assert_eq!(r.interval_ms, 50);
        assert_eq!(r.min_run_ms, 25);
        assert_eq!(r.suspend_timeout_s, 120);
        assert_eq!(r.disk.as_deref(), Some(Path::new("/srv/xen/web1.img")));
        let r = c
            .resolve(
                "web1",
                &StartOptions {
                    interval_ms: Some(20),
                    min_run_ms: Some(0),
                    ..StartOptions::default()
                },
            )
            .unwrap();
        assert_eq!(r.interval_ms, 20);
        assert_eq!(r.min_run_ms, 0, "the request's 0 wins over the guest's 25");
        let other = c.resolve("other", &StartOptions::default()).unwrap();
        assert_eq!(other.disk, None);
        assert!(other.suspend);
        assert_eq!(other.heartbeat_misses, 5);
        assert_eq!(other.min_run_ms, 0);
        assert_eq!(other.suspend_timeout_s, DEFAULT_SUSPEND_TIMEOUT_S);
        // resolved options survive the trip to the peer
        let back = c.resolve("other", &other.to_options()).unwrap();
        assert_eq!(back, other);
    }

    #[test]
    fn bad_files_name_the_key() {
        for (text, want) in [
            ("[daemon]\nsockett = \"x\"\n", "sockett"),
            ("[daemon]\ndata_ports = \"9-3\"\n", "daemon.data_ports"),
            ("[guest.a]\ninterval_ms = 0\n", "guest.a.interval_ms"),
            (
                "[defaults]\nsuspend_timeout_s = 0\n",
                "defaults.suspend_timeout_s",
            ),
            ("[defaults]\nsuspend = \"yes\"\n", "suspend"),
            ("not toml at all", "t.conf"),
        ] {
            let e = Config::parse(text, Path::new("t.conf")).unwrap_err();
            assert!(e.to_string().contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn zero_in_a_request_is_refused() {
        let e = Config::default()
            .resolve(
                "g",
                &StartOptions {
                    heartbeat_ms: Some(0),
                    ..StartOptions::default()
                },
            )
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert!(e.message.contains("heartbeat_ms"));
    }

    #[test]
    fn resolved_options_of_an_older_daemon_get_the_default_suspend_timeout() {
        let r = Config::default()
            .resolve("g", &StartOptions::default())
            .unwrap();
        let mut v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["suspend_timeout_s"], DEFAULT_SUSPEND_TIMEOUT_S);
        v.as_object_mut().unwrap().remove("suspend_timeout_s");
        let old: Resolved = serde_json::from_value(v).unwrap();
        assert_eq!(old, r);
    }
}
