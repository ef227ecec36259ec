//! Run-time loading of Xen's libraries (`dlopen` of exact sonames via `libloading`).
//!
//! The crate never links against `libxen*`: the workspace builds and its tests run on machines
//! without Xen.  Each safe handle loads its library when it is opened, keeps it loaded for as
//! long as the handle (and every mapping made through it) lives, and reports a missing library
//! with the soname, the `dlerror` text and any other installed version of the same library.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use libloading::Library;

/// Soname of libxenctrl for Xen 4.17 (unstable ABI: one soname per Xen release).
pub const SONAME_XENCTRL: &str = "libxenctrl.so.4.17";
/// Soname of libxenguest for Xen 4.17 (unstable ABI; loaded on first use, for
/// `xc_domain_resume` only).
pub const SONAME_XENGUEST: &str = "libxenguest.so.4.17";
/// Soname of libxenevtchn (stable ABI).
pub const SONAME_XENEVTCHN: &str = "libxenevtchn.so.1";
/// Soname of libxengnttab (stable ABI).
pub const SONAME_XENGNTTAB: &str = "libxengnttab.so.1";
/// Soname of libxenforeignmemory (stable ABI).
pub const SONAME_XENFOREIGNMEMORY: &str = "libxenforeignmemory.so.1";
/// Soname of libxenstore (stable ABI).
pub const SONAME_XENSTORE: &str = "libxenstore.so.4";

/// Which files to load for each library, and where to look for other versions when loading
/// fails.  `Default` gives the Xen 4.17 sonames, resolved by the dynamic loader's usual search
/// (`LD_LIBRARY_PATH`, `ld.so.cache`, default directories).  Tests and unusual installations
/// can point any entry at another name or at an absolute path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LibraryPaths {
    /// libxenctrl (default [`SONAME_XENCTRL`]).
    pub xenctrl: OsString,
    /// libxenevtchn (default [`SONAME_XENEVTCHN`]).
    pub xenevtchn: OsString,
    /// libxengnttab (default [`SONAME_XENGNTTAB`]).
    pub xengnttab: OsString,
    /// libxenforeignmemory (default [`SONAME_XENFOREIGNMEMORY`]).
    pub xenforeignmemory: OsString,
    /// libxenstore (default [`SONAME_XENSTORE`]).
    pub xenstore: OsString,
    /// Directories searched for other versions of a library that failed to load, so the error
    /// can say e.g. "found libxenctrl.so.4.16.0".  Only used to word the error.
    pub search_dirs: Vec<PathBuf>,
}

impl Default for LibraryPaths {
    fn default() -> Self {
        let mut search_dirs: Vec<PathBuf> = std::env::var_os("LD_LIBRARY_PATH")
            .map(|v| {
                std::env::split_paths(&v)
                    .filter(|p| !p.as_os_str().is_empty())
                    .collect()
            })
            .unwrap_or_default();
        for d in [
            "/usr/local/lib",
            "/usr/lib/x86_64-linux-gnu",
            "/lib/x86_64-linux-gnu",
            "/usr/lib64",
            "/lib64",
            "/usr/lib",
            "/lib",
        ] {
            search_dirs.push(PathBuf::from(d));
        }
        Self {
            xenctrl: SONAME_XENCTRL.into(),
            xenevtchn: SONAME_XENEVTCHN.into(),
            xengnttab: SONAME_XENGNTTAB.into(),
            xenforeignmemory: SONAME_XENFOREIGNMEMORY.into(),
            xenstore: SONAME_XENSTORE.into(),
            search_dirs,
        }
    }
}

/// Loading a Xen library failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The shared object could not be opened.
    #[error(
        "{soname} not found: is this a Xen 4.17 dom0? (dlopen: {dlerror}){hint}",
        hint = other_versions_hint(.other_versions)
    )]
    NotFound {
        /// The name or path that was passed to `dlopen`.
        soname: String,
        /// The dynamic loader's message.
        dlerror: String,
        /// Other versions of the same library found in [`LibraryPaths::search_dirs`].
        other_versions: Vec<PathBuf>,
    },
    /// The shared object loaded but lacks a function libxc-ffi needs.
    #[error("{soname} lacks a function libxc-ffi needs (is it Xen 4.17's?): {dlerror}")]
    MissingSymbol {
        /// The name or path that was loaded.
        soname: String,
        /// The dynamic loader's message (names the symbol).
        dlerror: String,
    },
}

fn other_versions_hint(found: &[PathBuf]) -> String {
    if found.is_empty() {
        return String::new();
    }
    let list: Vec<String> = found.iter().map(|p| p.display().to_string()).collect();
    format!(
        "; found other versions: {} (this build supports Xen 4.17 only)",
        list.join(", ")
    )
}

/// Files in `dirs` that are another version of the library `soname` names: same stem
/// (`libxenctrl.so.`), not starting with `soname` itself.  Sorted, without duplicates.
pub fn find_other_versions(soname: &OsStr, dirs: &[PathBuf]) -> Vec<PathBuf> {
    let name = Path::new(soname)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let Some(pos) = name.find(".so") else {
        return Vec::new();
    };
    let stem = format!("{}.so.", &name[..pos]);
    let mut found = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            if file.starts_with(&stem) && !file.starts_with(&name) {
                found.push(entry.path());
            }
        }
    }
    found.sort();
    found.dedup();
    found
}

/// Opens `soname` and fills the generated function table with `from_library`.
pub(crate) fn load<T>(
    soname: &OsStr,
    search_dirs: &[PathBuf],
    from_library: unsafe fn(Library) -> Result<T, libloading::Error>,
) -> Result<T, LoadError> {
    let shown = soname.to_string_lossy().into_owned();
    // SAFETY: loading a Xen library runs its ELF initialisers, which only initialise the
    // library's own state; the name is one of Xen's libraries chosen by LibraryPaths.
    let lib = unsafe { Library::new(soname) }.map_err(|e| LoadError::NotFound {
        soname: shown.clone(),
        dlerror: dlerror_text(&e),
        other_versions: find_other_versions(soname, search_dirs),
    })?;
    // SAFETY: the generated `from_library` looks up every symbol by its C name and stores it
    // with the signature bindgen took from the 4.17 header of that same library.
    unsafe { from_library(lib) }.map_err(|e| LoadError::MissingSymbol {
        soname: shown,
        dlerror: dlerror_text(&e),
    })
}

fn dlerror_text(e: &libloading::Error) -> String {
    use std::error::Error as _;
    match e.source() {
        Some(src) => src.to_string(),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_paths_are_the_4_17_sonames() {
        let p = LibraryPaths::default();
        assert_eq!(p.xenctrl, "libxenctrl.so.4.17");
        assert_eq!(p.xenevtchn, "libxenevtchn.so.1");
        assert_eq!(p.xengnttab, "libxengnttab.so.1");
        assert_eq!(p.xenforeignmemory, "libxenforeignmemory.so.1");
        assert_eq!(p.xenstore, "libxenstore.so.4");
        assert!(p
            .search_dirs
            .contains(&PathBuf::from("/usr/lib/x86_64-linux-gnu")));
    }

    fn scratch_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("libxc-ffi-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn other_versions_are_found_and_the_wanted_one_is_not_listed() {
        let d = scratch_dir("versions");
        for f in [
            "libxenctrl.so.4.16",
            "libxenctrl.so.4.16.0",
            "libxenctrl.so.4.17.0",
            "libxenctrlx.so.1",
            "libxenguest.so.4.16",
        ] {
            std::fs::write(d.join(f), b"").unwrap();
        }
        let found = find_other_versions(OsStr::new("libxenctrl.so.4.17"), std::slice::from_ref(&d));
        assert_eq!(
            found,
            vec![d.join("libxenctrl.so.4.16"), d.join("libxenctrl.so.4.16.0")]
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn absent_library_error_names_soname_dlerror_and_other_versions() {
        let d = scratch_dir("absent");
        std::fs::write(d.join("libxenctrl-kemari-absent.so.4.16.0"), b"").unwrap();
        let soname = OsStr::new("libxenctrl-kemari-absent.so.4.17");
        let err = load(
            soname,
            std::slice::from_ref(&d),
            |_lib| -> Result<(), libloading::Error> { panic!("must not be reached") },
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with(
                "libxenctrl-kemari-absent.so.4.17 not found: is this a Xen 4.17 dom0? (dlopen: "
            ),
            "{msg}"
        );
        assert!(msg.contains("cannot open shared object file"), "{msg}");
        assert!(
            msg.contains("found other versions: ")
                && msg.contains("libxenctrl-kemari-absent.so.4.16.0"),
            "{msg}"
        );
        match err {
            LoadError::NotFound { other_versions, .. } => assert_eq!(other_versions.len(), 1),
            other => panic!("unexpected {other:?}"),
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn missing_symbol_is_reported_with_the_library_name() {
        // libc is always present and certainly lacks Xen's functions.
        let err = load(OsStr::new("libc.so.6"), &[], |lib| {
            // SAFETY: only looks the symbol up; it is never called.
            unsafe { lib.get::<unsafe extern "C" fn()>(b"xc_interface_open\0") }.map(|_| ())
        })
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("libc.so.6 lacks a function libxc-ffi needs"),
            "{msg}"
        );
        assert!(msg.contains("xc_interface_open"), "{msg}");
    }
}
