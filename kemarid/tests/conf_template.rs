//! scripts/kemarid.conf, the configuration scripts/install puts in /etc/kemari/ when there is
//! none, is what it says it is: as shipped (every key commented out) it is the defaults, and with
//! every commented key line uncommented it still parses (no unknown key, no wrong type) to the
//! same defaults, so the values it shows are kemarid's real defaults.

use std::path::{Path, PathBuf};

use kemarid::api::StartOptions;
use kemarid::daemon::config::Config;

fn template() -> (PathBuf, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/kemarid.conf");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    (path, text)
}

/// `# key = value  # note` -> `key = value  # note`; `# [section]` -> `[section]`; prose
/// comments stay.
fn uncomment(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let rest = line.strip_prefix("# ");
        let is_key = rest.is_some_and(|r| {
            r.starts_with('[')
                || r.split_once(" = ").is_some_and(|(k, _)| {
                    !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                })
        });
        match rest {
            Some(r) if is_key => out.push_str(r),
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[test]
fn shipped_configuration_is_the_defaults() {
    let (path, text) = template();
    let c = Config::parse(&text, &path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c, Config::default());
}

#[test]
fn every_key_shown_is_real_and_shows_its_default() {
    let (path, text) = template();
    let full = uncomment(&text);
    assert!(
        full.lines().filter(|l| l.contains(" = ")).count() >= 15,
        "too few keys uncommented:\n{full}"
    );
    let c = Config::parse(&full, &path)
        .unwrap_or_else(|e| panic!("scripts/kemarid.conf with its keys uncommented: {e}\n{full}"));
    let d = Config::default();
    assert_eq!(
        c.daemon, d.daemon,
        "[daemon] values shown differ from the defaults"
    );
    let opts = StartOptions::default();
    assert_eq!(
        c.resolve("some-guest", &opts).expect("resolve"),
        d.resolve("some-guest", &opts).expect("resolve"),
        "[defaults] values shown differ from the built-in defaults"
    );
    assert!(
        c.guest.contains_key("web1"),
        "the per-guest example is not a [guest.NAME] section"
    );
}
