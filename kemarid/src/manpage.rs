//! Manual pages generated from the binaries' clap definitions, so they cannot drift from the
//! commands they describe.
//!
//! `kemari` and `kemarid` call [`write_if_requested`] first thing in `main`: when the
//! environment variable [`ENV_DIR`] names a folder, the binary writes its pages there (roff,
//! `kemari.1`, `kemari-start.1`, ... / `kemarid.8`) and exits instead of running. The pages are
//! checked in under `man/` (regenerate them with `scripts/gen-man`); `kemarid/tests/manpages.rs`
//! fails when they differ from what the binaries generate and checks that groff renders them
//! without warnings; `scripts/install` installs them.
//!
//! The generator is a build-time tool: it is compiled only with the crate feature `manpages`
//! (scripts/gen-man and the crate's tests turn it on). A binary built without it refuses
//! [`ENV_DIR`] with an error that says so.

#[cfg(feature = "manpages")]
use std::ffi::OsStr;
#[cfg(feature = "manpages")]
use std::path::Path;
use std::path::PathBuf;
use std::process::ExitCode;

/// Environment variable that makes a binary write its manual pages into the folder it names.
pub const ENV_DIR: &str = "KEMARI_MANPAGE_DIR";

/// Name of the manual every page belongs to (the `.TH` header's fifth field).
#[cfg(feature = "manpages")]
const MANUAL: &str = "Kemari for Xen";

/// The `.TH` date field: roff's zero-width character. An empty field would be dropped from the
/// unquoted header line and shift the source and manual fields left; a real date would make the
/// pages differ on every regeneration.
#[cfg(feature = "manpages")]
const NO_DATE: &str = "\\&";

/// What went wrong while writing manual pages.
#[derive(Debug, thiserror::Error)]
pub enum ManpageError {
    /// Rendering a page into memory failed.
    #[error("rendering manual page {page}: {source}")]
    Render {
        /// File name of the page.
        page: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Writing a page file failed.
    #[error("writing manual page {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// This binary was built without the generator.
    #[error("{var} is set, but this binary was built without manual page generation (build with `--features manpages`, as scripts/gen-man does)")]
    NotBuiltIn {
        /// The environment variable.
        var: &'static str,
    },
    /// The output folder is not usable.
    #[error("manual page folder {path} is not a folder (create it first)")]
    NotAFolder {
        /// The folder.
        path: PathBuf,
    },
}

#[cfg(feature = "manpages")]
/// One rendered page: its file name (e.g. `kemari-start.1`) and its roff text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// File name, `<name>.<section>`.
    pub file_name: String,
    /// The roff source.
    pub roff: Vec<u8>,
}

#[cfg(feature = "manpages")]
/// Renders the page of `cmd` in `section` and one page per visible subcommand at every depth
/// (`kemari-debug-pause.1`, as git does), in a stable order: the command's own page first,
/// then its subcommands depth-first in definition order. No date in the header, so the output
/// depends only on the definitions and the version.
pub fn render(cmd: clap::Command, section: &str) -> Result<Vec<Page>, ManpageError> {
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let source = format!("{MANUAL} {}", cmd.get_version().unwrap_or_default());
    let mut pages = Vec::new();
    render_tree(cmd, section, &source, &mut pages)?;
    Ok(pages)
}

#[cfg(feature = "manpages")]
fn render_tree(
    cmd: clap::Command,
    section: &str,
    source: &str,
    pages: &mut Vec<Page>,
) -> Result<(), ManpageError> {
    let subs: Vec<clap::Command> = cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .cloned()
        .collect();
    let man = clap_mangen::Man::new(cmd)
        .section(section)
        .date(NO_DATE)
        .source(source)
        .manual(MANUAL);
    let file_name = man.get_filename();
    let mut roff = Vec::new();
    man.render(&mut roff)
        .map_err(|source| ManpageError::Render {
            page: file_name.clone(),
            source,
        })?;
    pages.push(Page { file_name, roff });
    for sub in subs {
        render_tree(sub, section, source, pages)?;
    }
    Ok(())
}

#[cfg(feature = "manpages")]
/// Writes the pages of [`render`] into `dir` (which must exist), replacing files of the same
/// name, and returns their paths.
pub fn write_to(
    cmd: clap::Command,
    section: &str,
    dir: &Path,
) -> Result<Vec<PathBuf>, ManpageError> {
    if !dir.is_dir() {
        return Err(ManpageError::NotAFolder {
            path: dir.to_path_buf(),
        });
    }
    let mut written = Vec::new();
    for page in render(cmd, section)? {
        let path = dir.join(&page.file_name);
        std::fs::write(&path, &page.roff).map_err(|source| ManpageError::Write {
            path: path.clone(),
            source,
        })?;
        written.push(path);
    }
    Ok(written)
}

/// The hook of the binaries' `main`: when [`ENV_DIR`] is set, writes the pages of `cmd` into
/// that folder, prints their paths and returns the exit code the binary must end with; `None`
/// (the binary runs normally) when the variable is unset.
pub fn write_if_requested(cmd: clap::Command, section: &str) -> Option<ExitCode> {
    let dir = std::env::var_os(ENV_DIR)?;
    #[cfg(feature = "manpages")]
    return Some(write_and_report(cmd, section, &dir));
    #[cfg(not(feature = "manpages"))]
    {
        let _ = (section, dir);
        eprintln!(
            "{}: {}",
            cmd.get_name(),
            ManpageError::NotBuiltIn { var: ENV_DIR }
        );
        Some(ExitCode::FAILURE)
    }
}

#[cfg(feature = "manpages")]
fn write_and_report(cmd: clap::Command, section: &str, dir: &OsStr) -> ExitCode {
    let name = cmd.get_name().to_owned();
    match write_to(cmd, section, Path::new(dir)) {
        Ok(paths) => {
            for p in paths {
                println!("{}", p.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{name}: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(all(test, feature = "manpages"))]
mod tests {
    use super::*;

    fn sample() -> clap::Command {
        clap::Command::new("tool")
            .version("1.2.3")
            .about("A sample tool")
            .subcommand(
                clap::Command::new("run")
                    .about("Run it")
                    .subcommand(clap::Command::new("fast").about("Fast")),
            )
            .subcommand(clap::Command::new("secret").hide(true))
    }

    #[test]
    fn one_page_per_visible_command_in_order() {
        let pages = render(sample(), "8").unwrap();
        let names: Vec<&str> = pages.iter().map(|p| p.file_name.as_str()).collect();
        assert_eq!(names, ["tool.8", "tool-run.8", "tool-run-fast.8"]);
        let top = String::from_utf8(pages[0].roff.clone()).unwrap();
        assert!(
            top.contains(".TH tool 8 \\& \"Kemari for Xen 1.2.3\" \"Kemari for Xen\"\n"),
            "{top}"
        );
        assert!(top.contains("tool\\-run"), "subcommands listed: {top}");
        assert!(!top.contains("secret"), "hidden subcommand listed: {top}");
    }

    #[test]
    fn write_to_refuses_a_missing_folder_and_writes_into_an_existing_one() {
        let tmp = std::env::temp_dir().join(format!("kemari-man-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let err = write_to(sample(), "1", &tmp).unwrap_err();
        assert!(err.to_string().contains("is not a folder"), "{err}");
        std::fs::create_dir_all(&tmp).unwrap();
        let paths = write_to(sample(), "1", &tmp).unwrap();
        assert_eq!(paths.len(), 3);
        let page = std::fs::read_to_string(tmp.join("tool-run-fast.1")).unwrap();
        assert!(page.contains("\n.TH tool-run-fast 1 "), "{page}");
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
