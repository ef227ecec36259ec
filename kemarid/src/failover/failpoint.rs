//! Debug kill windows for the lab (`KEMARI_DEBUG_FAILPOINT`, off by default).
//!
//! The `failpoints` lab scenario kills the primary's host at a chosen point of protection. A
//! power loss is instantaneous, but the lab sees the primary only through a polled console, so
//! `kemari replicate` widens the window of the chosen point: when protection reaches it, it
//! writes a marker file and holds the point for a while. The scenario kills the host inside
//! that window, and the marker says which point (and checkpoint) the kill hit.
//!
//! | point | where `kemari replicate` holds | state at the kill |
//! |---|---|---|
//! | `initial-sync` | after the first round of the initial image was sent | no replica on the secondary yet |
//! | `mid-checkpoint` | checkpoint N staged, disk log taken, guest stopped, frame not yet sent | secondary at N-1 |
//! | `between-ack-and-release` | N's ACK received, before its output is released (`acked` hooks) | secondary at N, the output of N not released |
//! | `idle` | after N's ACK and release, before the next checkpoint starts | secondary at N, guest running |
//!
//! Environment: `KEMARI_DEBUG_FAILPOINT=POINT`, `KEMARI_DEBUG_FAILPOINT_MS` (how long the window
//! stays open, default 20000), `KEMARI_DEBUG_FAILPOINT_SEQ` (the first checkpoint at which the
//! window opens, default 5; ignored by `initial-sync`), `KEMARI_DEBUG_FAILPOINT_FILE` (the
//! marker: one line `POINT seq=N`). The window opens once.

use std::path::PathBuf;
use std::time::Duration;

use crate::sync::sender::{AckInfo, AfterAck, CheckpointHook, DeviceError, Release};
use crate::sync::trigger::Reasons;

/// Errors of the failpoint configuration.
#[derive(Debug, thiserror::Error)]
pub enum FailPointError {
    /// An unknown point.
    #[error("KEMARI_DEBUG_FAILPOINT={0:?}: expected initial-sync, mid-checkpoint, between-ack-and-release or idle")]
    Point(String),
    /// A number that does not parse.
    #[error("{var}={value:?}: not a number")]
    Number {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
    },
}

/// Where protection is held open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// During the initial sync.
    InitialSync,
    /// A checkpoint staged, not yet sent.
    MidCheckpoint,
    /// An ACK received, its output not yet released.
    BetweenAckAndRelease,
    /// Between checkpoints.
    Idle,
}

impl Point {
    /// The name used in the environment and the marker.
    pub fn name(self) -> &'static str {
        match self {
            Point::InitialSync => "initial-sync",
            Point::MidCheckpoint => "mid-checkpoint",
            Point::BetweenAckAndRelease => "between-ack-and-release",
            Point::Idle => "idle",
        }
    }
}

/// A configured kill window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailPoint {
    /// Which point.
    pub point: Point,
    /// How long it is held.
    pub window: Duration,
    /// The first checkpoint at which it opens.
    pub from_seq: u64,
    /// The marker file.
    pub marker: Option<PathBuf>,
    fired: bool,
}

impl FailPoint {
    /// From the process environment; `None` when `KEMARI_DEBUG_FAILPOINT` is unset or empty.
    pub fn from_env() -> Result<Option<FailPoint>, FailPointError> {
        FailPoint::parse(|k| std::env::var(k).ok())
    }

    /// From `get` (a variable's value).
    pub fn parse(
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<FailPoint>, FailPointError> {
        let Some(p) = get("KEMARI_DEBUG_FAILPOINT").filter(|v| !v.is_empty()) else {
            return Ok(None);
        };
        let point = match p.as_str() {
            "initial-sync" => Point::InitialSync,
            "mid-checkpoint" => Point::MidCheckpoint,
            "between-ack-and-release" => Point::BetweenAckAndRelease,
            "idle" => Point::Idle,
            _ => return Err(FailPointError::Point(p)),
        };
        let num = |var: &'static str, default: u64| -> Result<u64, FailPointError> {
            match get(var).filter(|v| !v.is_empty()) {
                None => Ok(default),
                Some(value) => value
                    .trim()
                    .parse()
                    .map_err(|_| FailPointError::Number { var, value }),
            }
        };
        Ok(Some(FailPoint {
            point,
            window: Duration::from_millis(num("KEMARI_DEBUG_FAILPOINT_MS", 20_000)?),
            from_seq: num("KEMARI_DEBUG_FAILPOINT_SEQ", 5)?,
            marker: get("KEMARI_DEBUG_FAILPOINT_FILE")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            fired: false,
        }))
    }

    /// Opens the window if `at` is this point and `seq` is due: marker, then hold. Returns
    /// whether it opened.
    fn hit(&mut self, at: Point, seq: u64) -> bool {
        if self.fired || at != self.point || (at != Point::InitialSync && seq < self.from_seq) {
            return false;
        }
        self.fired = true;
        let line = format!("{} seq={seq}\n", at.name());
        eprintln!(
            "kemari replicate: KEMARI_DEBUG_FAILPOINT: holding {} at seq {seq} for {} ms",
            at.name(),
            self.window.as_millis()
        );
        if let Some(m) = &self.marker {
            if let Err(e) = std::fs::write(m, &line) {
                log::warn!("failpoint marker {}: {e}", m.display());
            }
        }
        std::thread::sleep(self.window);
        eprintln!(
            "kemari replicate: KEMARI_DEBUG_FAILPOINT: {} window closed",
            at.name()
        );
        true
    }

    /// From the initial sync's progress callback (after each round sent).
    pub fn initial_progress(&mut self) -> bool {
        self.hit(Point::InitialSync, 0)
    }

    /// Wraps the protection hook.
    pub fn hook<'a>(self, inner: Box<dyn CheckpointHook + 'a>) -> Box<dyn CheckpointHook + 'a> {
        Box::new(FailPointHook { inner, fp: self })
    }
}

/// The hook that holds the checkpoint points open (outermost: before any release).
struct FailPointHook<'a> {
    inner: Box<dyn CheckpointHook + 'a>,
    fp: FailPoint,
}

impl CheckpointHook for FailPointHook<'_> {
    fn release(&mut self, seq: u64, reasons: Reasons) -> Release {
        self.inner.release(seq, reasons)
    }

    fn acked(&mut self, info: &AckInfo) -> AfterAck {
        self.fp.hit(Point::BetweenAckAndRelease, info.seq);
        let after = self.inner.acked(info);
        self.fp.hit(Point::Idle, info.seq);
        after
    }

    fn extra(&mut self, seq: u64) -> Result<Vec<(u32, Vec<u8>)>, DeviceError> {
        let extra = self.inner.extra(seq)?;
        self.fp.hit(Point::MidCheckpoint, seq);
        Ok(extra)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn off_by_default_and_bad_values_refused() {
        assert_eq!(FailPoint::parse(env(&[])).unwrap(), None);
        assert_eq!(
            FailPoint::parse(env(&[("KEMARI_DEBUG_FAILPOINT", "")])).unwrap(),
            None
        );
        let e = FailPoint::parse(env(&[("KEMARI_DEBUG_FAILPOINT", "later")])).unwrap_err();
        assert!(e.to_string().contains("\"later\""), "{e}");
        let e = FailPoint::parse(env(&[
            ("KEMARI_DEBUG_FAILPOINT", "idle"),
            ("KEMARI_DEBUG_FAILPOINT_MS", "5s"),
        ]))
        .unwrap_err();
        assert!(
            e.to_string().contains("KEMARI_DEBUG_FAILPOINT_MS=\"5s\""),
            "{e}"
        );
        let fp = FailPoint::parse(env(&[("KEMARI_DEBUG_FAILPOINT", "mid-checkpoint")]))
            .unwrap()
            .unwrap();
        assert_eq!(
            (fp.point, fp.window, fp.from_seq, fp.marker),
            (Point::MidCheckpoint, Duration::from_secs(20), 5, None)
        );
    }

    /// Records the order of the inner hook's calls and the marker's content at each.
    struct Inner {
        log: Vec<String>,
        marker: PathBuf,
    }

    impl Inner {
        fn note(&mut self, what: String) {
            let m = std::fs::read_to_string(&self.marker).unwrap_or_default();
            self.log.push(format!("{what} marker={}", m.trim()));
        }
    }

    impl CheckpointHook for &mut Inner {
        fn acked(&mut self, info: &AckInfo) -> AfterAck {
            self.note(format!("acked {}", info.seq));
            AfterAck::Continue
        }
        fn extra(&mut self, seq: u64) -> Result<Vec<(u32, Vec<u8>)>, DeviceError> {
            self.note(format!("extra {seq}"));
            Ok(vec![(1, vec![seq as u8])])
        }
    }

    fn info(seq: u64) -> AckInfo {
        AckInfo {
            seq,
            reasons: Reasons::INTERVAL,
            coalesced: 0,
            pages: 0,
            paused: false,
        }
    }

    fn run(point: &str, dir: &str) -> Vec<String> {
        let d = std::env::temp_dir().join(format!("kemari-fp-{}-{dir}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let marker = d.join("marker");
        let _ = std::fs::remove_file(&marker);
        let fp = FailPoint::parse(env(&[
            ("KEMARI_DEBUG_FAILPOINT", point),
            ("KEMARI_DEBUG_FAILPOINT_MS", "0"),
            ("KEMARI_DEBUG_FAILPOINT_SEQ", "2"),
            ("KEMARI_DEBUG_FAILPOINT_FILE", marker.to_str().unwrap()),
        ]))
        .unwrap()
        .unwrap();
        let mut inner = Inner {
            log: Vec::new(),
            marker: marker.clone(),
        };
        {
            let mut h = fp.hook(Box::new(&mut inner));
            for seq in 1..=3 {
                assert_eq!(h.extra(seq).unwrap(), vec![(1, vec![seq as u8])]);
                assert_eq!(h.acked(&info(seq)), AfterAck::Continue);
            }
        }
        let end = std::fs::read_to_string(&marker).unwrap_or_default();
        inner.log.push(format!("end marker={}", end.trim()));
        std::fs::remove_dir_all(&d).unwrap();
        inner.log
    }

    #[test]
    fn each_point_opens_once_at_its_place() {
        // mid-checkpoint: after checkpoint 2's extra records were taken, before its ACK
        assert_eq!(
            run("mid-checkpoint", "mid")[2..4],
            ["extra 2 marker=", "acked 2 marker=mid-checkpoint seq=2"]
        );
        // between ACK and release: before the inner acked (which releases output) of 2
        let l = run("between-ack-and-release", "ack");
        assert_eq!(
            l[2..4],
            [
                "extra 2 marker=",
                "acked 2 marker=between-ack-and-release seq=2"
            ]
        );
        // idle: after the inner acked of 2, before checkpoint 3
        let l = run("idle", "idle");
        assert_eq!(l[3..5], ["acked 2 marker=", "extra 3 marker=idle seq=2"]);
        // opens once, and not for the initial sync
        let l = run("initial-sync", "init");
        assert_eq!(l.last().unwrap(), "end marker=");
    }

    #[test]
    fn initial_sync_opens_at_the_first_round_only() {
        let mut fp = FailPoint::parse(env(&[
            ("KEMARI_DEBUG_FAILPOINT", "initial-sync"),
            ("KEMARI_DEBUG_FAILPOINT_MS", "0"),
        ]))
        .unwrap()
        .unwrap();
        assert!(fp.initial_progress());
        assert!(!fp.initial_progress());
        let mut other = FailPoint::parse(env(&[
            ("KEMARI_DEBUG_FAILPOINT", "idle"),
            ("KEMARI_DEBUG_FAILPOINT_MS", "0"),
        ]))
        .unwrap()
        .unwrap();
        assert!(!other.initial_progress());
    }
}
