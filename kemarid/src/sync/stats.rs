//! Figures of a protection run: initial sync and per-checkpoint costs.

use std::time::Duration;

use serde::Serialize;

/// Progress of the live initial copy, reported after every round.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Progress {
    /// Round number (1: the full copy of every populated page).
    pub round: u32,
    /// Pages sent in this round (holes not counted).
    pub round_pages: u64,
    /// Pages sent so far, all rounds.
    pub total_pages: u64,
    /// Unpopulated pfns skipped so far (MMIO holes, beyond RAM).
    pub holes: u64,
    /// Pages the guest dirtied during this round, per second of the round.
    pub dirty_rate: f64,
    /// Pages dirty at the end of this round (what the next round would send).
    pub dirty_after: u64,
    /// Whether this was the last live round (the final, paused one follows).
    pub last: bool,
}

/// What the initial sync cost.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct InitialStats {
    /// Live rounds.
    pub rounds: u32,
    /// Pages sent while the guest ran.
    pub live_pages: u64,
    /// Pages sent in the final, paused round.
    pub final_pages: u64,
    /// Unpopulated pfns skipped.
    pub holes: u64,
    /// Image bytes written.
    pub bytes: u64,
    /// Time the guest was paused for the final round (ms).
    pub pause_ms: f64,
    /// Time from start to the secondary's ACK of seq 0 (ms).
    pub total_ms: f64,
}

/// Per-checkpoint figures, accumulated.
#[derive(Debug, Clone, Default)]
pub struct CheckpointStats {
    pause: Vec<Duration>,
    ack_wait: Vec<Duration>,
    pages: Vec<u64>,
    bytes: u64,
    coalesced: u64,
    skipped_pages: u64,
}

/// A summary of [`CheckpointStats`], for printing.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StatsSummary {
    /// Checkpoints ACKed.
    pub checkpoints: u64,
    /// Mean time the guest was paused per checkpoint (ms).
    pub pause_mean_ms: f64,
    /// 99th percentile of the pause time (ms).
    pub pause_p99_ms: f64,
    /// Longest pause (ms).
    pub pause_max_ms: f64,
    /// Mean dirty pages per checkpoint.
    pub pages_mean: f64,
    /// Most pages in one checkpoint.
    pub pages_max: u64,
    /// Checkpoint bytes sent.
    pub bytes: u64,
    /// Mean wait for the ACK after the last byte was sent (ms).
    pub ack_wait_mean_ms: f64,
    /// 99th percentile of the ACK wait (ms).
    pub ack_wait_p99_ms: f64,
    /// Triggers merged into another checkpoint.
    pub coalesced: u64,
    /// Dirty pfns that could not be read (no longer populated) and were left out.
    pub skipped_pages: u64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Nearest-rank percentile `p` (0..=100) of `values` (sorted here), 0 for none.
fn percentile(values: &[Duration], p: f64) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    let idx = rank.clamp(1, sorted.len()) - 1;
    sorted.get(idx).copied().unwrap_or(Duration::ZERO)
}

fn mean(values: &[Duration]) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    values.iter().sum::<Duration>() / u32::try_from(values.len()).unwrap_or(u32::MAX)
}

impl CheckpointStats {
    /// Records one ACKed checkpoint.
    pub fn record(&mut self, pause: Duration, pages: u64, bytes: u64, ack_wait: Duration) {
        self.pause.push(pause);
        self.pages.push(pages);
        self.bytes += bytes;
        self.ack_wait.push(ack_wait);
    }

    /// Counts triggers merged into a checkpoint.
    pub fn add_coalesced(&mut self, n: u64) {
        self.coalesced += n;
    }

    /// Counts dirty pfns left out because they could not be read.
    pub fn add_skipped(&mut self, n: u64) {
        self.skipped_pages += n;
    }

    /// Checkpoints recorded.
    pub fn count(&self) -> u64 {
        self.pause.len() as u64
    }

    /// The summary.
    pub fn summary(&self) -> StatsSummary {
        let n = self.pages.len();
        StatsSummary {
            checkpoints: n as u64,
            pause_mean_ms: ms(mean(&self.pause)),
            pause_p99_ms: ms(percentile(&self.pause, 99.0)),
            pause_max_ms: ms(self.pause.iter().max().copied().unwrap_or_default()),
            pages_mean: if n == 0 {
                0.0
            } else {
                self.pages.iter().sum::<u64>() as f64 / n as f64
            },
            pages_max: self.pages.iter().max().copied().unwrap_or(0),
            bytes: self.bytes,
            ack_wait_mean_ms: ms(mean(&self.ack_wait)),
            ack_wait_p99_ms: ms(percentile(&self.ack_wait, 99.0)),
            coalesced: self.coalesced,
            skipped_pages: self.skipped_pages,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_mean_and_p99() {
        let mut s = CheckpointStats::default();
        for i in 1..=100u64 {
            s.record(
                Duration::from_millis(i),
                i * 2,
                10,
                Duration::from_millis(1),
            );
        }
        s.add_coalesced(3);
        let sum = s.summary();
        assert_eq!(sum.checkpoints, 100);
        assert!((sum.pause_mean_ms - 50.5).abs() < 1e-6);
        assert!((sum.pause_p99_ms - 99.0).abs() < 1e-6);
        assert!((sum.pause_max_ms - 100.0).abs() < 1e-6);
        assert!((sum.pages_mean - 101.0).abs() < 1e-6);
        assert_eq!(sum.pages_max, 200);
        assert_eq!(sum.bytes, 1000);
        assert_eq!(sum.coalesced, 3);
    }

    #[test]
    fn empty_summary_is_zero() {
        let sum = CheckpointStats::default().summary();
        assert_eq!(sum, StatsSummary::default());
    }
}
