//! The manual pages checked in under man/ are exactly what `kemari` and `kemarid` generate from
//! their clap definitions (kemarid::manpage), and groff renders every one without a warning.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("kemarid/ has a parent")
        .to_path_buf()
}

fn read_pages(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut pages = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display())) {
        let e = e.expect("dir entry");
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".1") || name.ends_with(".8") {
            pages.insert(name, std::fs::read(e.path()).expect("read page"));
        }
    }
    pages
}

fn generate(dir: &Path) {
    for bin in [env!("CARGO_BIN_EXE_kemari"), env!("CARGO_BIN_EXE_kemarid")] {
        let out = Command::new(bin)
            .env(kemarid::manpage::ENV_DIR, dir)
            .output()
            .expect("run binary");
        assert!(
            out.status.success(),
            "{bin} with {}={} failed: {}",
            kemarid::manpage::ENV_DIR,
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn checked_in_manual_pages_are_current() {
    let tmp = std::env::temp_dir().join(format!("kemari-manpages-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).expect("temp dir");
    generate(&tmp);
    let fresh = read_pages(&tmp);
    let checked_in = read_pages(&repo().join("man"));
    std::fs::remove_dir_all(&tmp).expect("remove temp dir");
    assert!(fresh.contains_key("kemari.1"), "kemari.1 not generated");
    assert!(fresh.contains_key("kemarid.8"), "kemarid.8 not generated");
    let mut problems = Vec::new();
    for (name, roff) in &fresh {
        match checked_in.get(name) {
            None => problems.push(format!("man/{name} is missing")),
            Some(old) if old != roff => problems.push(format!("man/{name} is out of date")),
            Some(_) => {}
        }
    }
    for name in checked_in.keys() {
        if !fresh.contains_key(name) {
            problems.push(format!(
                "man/{name} describes a command that no longer exists"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "{}\nthe manual pages are generated from the clap definitions: run scripts/gen-man and commit man/",
        problems.join("\n")
    );
}

#[test]
fn manual_pages_render_without_warnings() {
    let groff = Command::new("groff").arg("--version").output();
    if !matches!(groff, Ok(ref o) if o.status.success()) {
        eprintln!("groff not installed: rendering not checked (.ci/run installs groff-base)");
        return;
    }
    let pages = read_pages(&repo().join("man"));
    assert!(pages.len() >= 2, "man/ has {} pages", pages.len());
    for name in pages.keys() {
        let path = repo().join("man").join(name);
        // -ww: all warnings; -z: no output, only diagnostics; -rLL: a fixed line length
        let out = Command::new("groff")
            .args(["-man", "-Tutf8", "-ww", "-z", "-rLL=80n"])
            .arg(&path)
            .output()
            .expect("run groff");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && err.trim().is_empty(),
            "groff on man/{name}: status {}, diagnostics:\n{err}",
            out.status
        );
        // the page renders to text that starts with its own name
        let text = Command::new("groff")
            .args(["-man", "-Tascii", "-P-cbou"])
            .arg(&path)
            .output()
            .expect("run groff");
        let text = String::from_utf8_lossy(&text.stdout);
        let title = name.rsplit_once('.').map(|(t, _)| t).unwrap_or(name);
        assert!(
            text.contains("NAME") && text.contains(title),
            "man/{name} rendered without its NAME section or title:\n{text}"
        );
    }
}
