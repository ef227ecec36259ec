//! Running Xen's own `xl` tool: `xl restore` of an image (to build a replica), `xl domid`,
//! `xl destroy`. Every run has a deadline, and a failure carries xl's own stderr.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hypervisor::DomId;
use thiserror::Error;

/// Most of xl's output kept for an error message.
const MAX_OUTPUT: usize = 64 << 10;

/// Errors of running `xl`.
#[derive(Debug, Error)]
pub enum XlError {
    /// The program could not be started.
    #[error("cannot run {program} {args}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// Its arguments.
        args: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// It did not finish in time (it was killed).
    #[error("{program} {args} did not finish within {timeout:?} (killed); stderr: {stderr}")]
    Timeout {
        /// The program.
        program: String,
        /// Its arguments.
        args: String,
        /// The limit.
        timeout: Duration,
        /// What it had written to stderr.
        stderr: String,
    },
    /// It failed.
    #[error("{program} {args} failed ({status}): {stderr}")]
    Failed {
        /// The program.
        program: String,
        /// Its arguments.
        args: String,
        /// Exit status.
        status: String,
        /// Its stderr (trimmed, at most 64 KiB).
        stderr: String,
    },
    /// It printed something unexpected.
    #[error("{program} {args}: unexpected output {output:?}")]
    BadOutput {
        /// The program.
        program: String,
        /// Its arguments.
        args: String,
        /// The output.
        output: String,
    },
    /// `xl restore` succeeded but no domain of the expected name exists; or the restore failed
    /// and the half-made domain could not be destroyed.
    #[error("replica {name}: {detail}")]
    Replica {
        /// The domain name.
        name: String,
        /// What went wrong.
        detail: String,
    },
}

/// Output of a finished run.
#[derive(Debug, Clone)]
pub struct XlOutput {
    /// stdout.
    pub stdout: String,
    /// stderr.
    pub stderr: String,
    /// How long it took.
    pub elapsed: Duration,
}

/// The `xl` program with a deadline per command.
#[derive(Debug, Clone)]
pub struct XlTool {
    program: PathBuf,
    timeout: Duration,
}

impl Default for XlTool {
    fn default() -> Self {
        XlTool::new(PathBuf::from("xl"), Duration::from_secs(300))
    }
}

/// Collects up to [`MAX_OUTPUT`] bytes of a pipe in a thread.
struct Capture {
    rx: std::sync::mpsc::Receiver<()>,
    kept: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Capture {
    fn start(mut r: impl Read + Send + 'static) -> Capture {
        let kept = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = kept.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            loop {
                match r.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if let Ok(mut kept) = sink.lock() {
                            let room = MAX_OUTPUT.saturating_sub(kept.len());
                            kept.extend_from_slice(&buf[..n.min(room)]);
                        }
                    }
                }
            }
            let _ = tx.send(());
        });
        Capture { rx, kept }
    }

    /// What was read, waiting up to `grace` for the pipe to close (a process xl started, such
    /// as a device model, may have inherited it and keep it open).
    fn finish(self, grace: Duration) -> String {
        let _ = self.rx.recv_timeout(grace);
        let kept = self.kept.lock().map(|k| k.clone()).unwrap_or_default();
        String::from_utf8_lossy(&kept).trim().to_string()
    }
}

impl XlTool {
    /// `program` (normally `xl`), each command killed after `timeout`.
    pub fn new(program: PathBuf, timeout: Duration) -> XlTool {
        XlTool { program, timeout }
    }

    /// Runs `xl args...`; fails with its stderr unless it exits with status 0.
    pub fn run(&self, args: &[&str]) -> Result<XlOutput, XlError> {
        let program = self.program.display().to_string();
        let joined = args.join(" ");
        let start = Instant::now();
        let mut child = Command::new(&self.program)
            .args(args)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| XlError::Spawn {
                program: program.clone(),
                args: joined.clone(),
                source,
            })?;
        let stdout = child.stdout.take().map(Capture::start);
        let stderr = child.stderr.take().map(Capture::start);
        let collect = |c: Option<Capture>| {
            c.map(|c| c.finish(Duration::from_secs(2)))
                .unwrap_or_default()
        };
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if start.elapsed() < self.timeout => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(None) => {
                    // The whole process group: xl's own children too.
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(child.id() as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(XlError::Timeout {
                        program,
                        args: joined,
                        timeout: self.timeout,
                        stderr: collect(stderr),
                    });
                }
                Err(source) => {
                    return Err(XlError::Spawn {
                        program,
                        args: joined,
                        source,
                    })
                }
            }
        };
        let out = XlOutput {
            stdout: collect(stdout),
            stderr: collect(stderr),
            elapsed: start.elapsed(),
        };
        if !status.success() {
            return Err(XlError::Failed {
                program,
                args: joined,
                status: status.to_string(),
                stderr: if out.stderr.is_empty() {
                    out.stdout
                } else {
                    out.stderr
                },
            });
        }
        Ok(out)
    }

    /// `xl domid NAME`: the id of the domain called `name`, or `None` if there is none.
    pub fn domid(&self, name: &str) -> Result<Option<DomId>, XlError> {
        match self.run(&["domid", name]) {
            Ok(out) => {
                out.stdout
                    .trim()
                    .parse::<DomId>()
                    .map(Some)
                    .map_err(|_| XlError::BadOutput {
                        program: self.program.display().to_string(),
                        args: format!("domid {name}"),
                        output: out.stdout.clone(),
                    })
            }
            Err(XlError::Failed { .. }) => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// `xl destroy DOMID`.
    pub fn destroy(&self, domid: DomId) -> Result<(), XlError> {
        self.run(&["destroy", &domid.to_string()]).map(drop)
    }

    /// `xl restore [-p] -e IMAGE`, expecting a domain called `name` (the image's
    /// `c_info.name`); returns its id. `-e` makes xl return once the domain is built instead of
    /// staying to monitor it. If the restore fails, a domain of that name it left behind is
    /// destroyed, and the error carries xl's stderr.
    pub fn restore(
        &self,
        image: &Path,
        name: &str,
        paused: bool,
    ) -> Result<(DomId, XlOutput), XlError> {
        if let Some(existing) = self.domid(name)? {
            return Err(XlError::Replica {
                name: name.into(),
                detail: format!("a domain of that name already exists (domain {existing})"),
            });
        }
        let image_arg = image.to_string_lossy().into_owned();
        let mut args = vec!["restore"];
        if paused {
            args.push("-p");
        }
        args.extend(["-e", &image_arg]);
        match self.run(&args) {
            Ok(out) => match self.domid(name)? {
                Some(domid) => Ok((domid, out)),
                None => Err(XlError::Replica {
                    name: name.into(),
                    detail: format!(
                        "xl restore of {image_arg} succeeded but no domain has that name; xl said: {}",
                        out.stderr
                    ),
                }),
            },
            Err(err) => {
                if let Ok(Some(left)) = self.domid(name) {
                    if let Err(derr) = self.destroy(left) {
                        return Err(XlError::Replica {
                            name: name.into(),
                            detail: format!(
                                "{err}; and destroying the half-restored domain {left} failed: {derr}"
                            ),
                        });
                    }
                    log::warn!("destroyed half-restored domain {left} ({name}) after: {err}");
                }
                Err(err)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A fake `xl` as a shell script; `log` records every call.
    struct FakeXl {
        dir: PathBuf,
    }

    impl FakeXl {
        fn new(tag: &str, body: &str) -> FakeXl {
            let dir =
                std::env::temp_dir().join(format!("kemari-fakexl-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let script = format!(
                "#!/bin/sh\nD='{}'\necho \"$*\" >>\"$D/log\"\n{body}\n",
                dir.display()
            );
            let path = dir.join("xl");
            std::fs::write(&path, script).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
            FakeXl { dir }
        }
        fn tool(&self, timeout: Duration) -> XlTool {
            XlTool::new(self.dir.join("xl"), timeout)
        }
        fn log(&self) -> String {
            std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
        }
    }

    impl Drop for FakeXl {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    // The fake keeps "existing domains" as files NAME -> DOMID in $D/doms.
    const DOMS: &str = r#"
mkdir -p "$D/doms"
case "$1" in
  domid) [ -f "$D/doms/$2" ] && cat "$D/doms/$2" && exit 0; echo "Can't get domid of domain name '$2', maybe this domain does not exist." >&2; exit 1 ;;
  destroy) for f in "$D/doms/"*; do [ "$(cat "$f")" = "$2" ] && rm -f "$f"; done; exit 0 ;;
esac
"#;

    #[test]
    fn restore_finds_the_new_domain() {
        let xl = FakeXl::new(
            "ok",
            &format!("{DOMS}\n[ \"$1\" = restore ] && echo 7 >\"$D/doms/g1\" && echo 'Loading new save file' >&2 && exit 0\nexit 9"),
        );
        let (domid, out) = xl
            .tool(Duration::from_secs(10))
            .restore(Path::new("/tmp/x.img"), "g1", true)
            .unwrap();
        assert_eq!(domid, 7);
        assert!(out.stderr.contains("Loading new save file"));
        assert!(
            xl.log().contains("restore -p -e /tmp/x.img"),
            "{}",
            xl.log()
        );
    }

    #[test]
    fn failed_restore_destroys_the_leftover_and_reports_stderr() {
        let xl = FakeXl::new(
            "fail",
            &format!("{DOMS}\n[ \"$1\" = restore ] && echo 9 >\"$D/doms/g1\" && echo 'libxl: error: restore failed: bad stream' >&2 && exit 3\nexit 9"),
        );
        let err = xl
            .tool(Duration::from_secs(10))
            .restore(Path::new("/tmp/x.img"), "g1", false)
            .unwrap_err();
        assert!(err.to_string().contains("bad stream"), "{err}");
        assert!(err.to_string().contains("restore -e /tmp/x.img"), "{err}");
        assert!(xl.log().contains("destroy 9"), "{}", xl.log());
        assert!(!xl.dir.join("doms/g1").exists());
    }

    #[test]
    fn name_clash_is_refused_before_restoring() {
        let xl = FakeXl::new(
            "clash",
            &format!("mkdir -p \"$D/doms\"; echo 3 >\"$D/doms/g1\"\n{DOMS}"),
        );
        let err = xl
            .tool(Duration::from_secs(10))
            .restore(Path::new("/tmp/x.img"), "g1", true)
            .unwrap_err();
        assert!(
            err.to_string().contains("already exists (domain 3)"),
            "{err}"
        );
        assert!(!xl.log().contains("restore"), "{}", xl.log());
    }

    #[test]
    fn hanging_xl_is_killed_at_the_deadline() {
        let xl = FakeXl::new("hang", "echo started >&2; sleep 30");
        let start = Instant::now();
        let err = xl
            .tool(Duration::from_millis(300))
            .run(&["restore", "x"])
            .unwrap_err();
        assert!(matches!(err, XlError::Timeout { .. }), "{err:?}");
        assert!(start.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn missing_program_is_a_spawn_error() {
        let err = XlTool::new(PathBuf::from("/nonexistent/xl"), Duration::from_secs(1))
            .run(&["list"])
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/xl list"), "{err}");
    }

    #[test]
    fn domid_parses_or_reports_none() {
        let xl = FakeXl::new(
            "domid",
            &format!(
                "mkdir -p \"$D/doms\"; echo 12 >\"$D/doms/a\"; echo bogus >\"$D/doms/b\"\n{DOMS}"
            ),
        );
        let tool = xl.tool(Duration::from_secs(10));
        assert_eq!(tool.domid("a").unwrap(), Some(12));
        assert_eq!(tool.domid("zz").unwrap(), None);
        assert!(matches!(tool.domid("b"), Err(XlError::BadOutput { .. })));
    }
}
