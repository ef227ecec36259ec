//! Synchronization triggers: why the next checkpoint is taken, and when.
//!
//! Every source of "take a checkpoint now" goes through one [`Triggers`] object: the backends'
//! event tap (a later issue), an explicit request (CLI / control API) and the maximum epoch
//! interval, which [`Triggers::wait`] applies itself. Triggers that arrive while a checkpoint is
//! being taken are not lost and not queued one by one: they set bits of one pending
//! [`Reasons`] set, which the next [`wait`](Triggers::wait) returns at once, so any number of
//! kicks during a checkpoint cost exactly one more checkpoint (coalescing).

use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Why a checkpoint was taken (a set: coalesced triggers add their reasons).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Reasons(u8);

impl Reasons {
    /// No reason.
    pub const NONE: Reasons = Reasons(0);
    /// The maximum epoch interval passed without any other trigger.
    pub const INTERVAL: Reasons = Reasons(1);
    /// A backend saw the guest start I/O (event tap).
    pub const IO: Reasons = Reasons(2);
    /// Someone asked for one (CLI, control API, tests).
    pub const REQUEST: Reasons = Reasons(4);

    /// Both sets.
    pub fn union(self, other: Reasons) -> Reasons {
        Reasons(self.0 | other.0)
    }

    /// Whether every reason of `other` is in `self`.
    pub fn contains(self, other: Reasons) -> bool {
        self.0 & other.0 == other.0
    }

    /// True for the empty set.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The raw bits (`1` interval, `2` I/O, `4` request), as carried in checkpoint frames.
    pub fn bits(self) -> u8 {
        self.0
    }

    /// From raw bits (unknown bits dropped).
    pub fn from_bits(bits: u8) -> Reasons {
        Reasons(bits & 7)
    }

    /// `interval+io`-style text for logs and CLI output.
    pub fn describe(self) -> String {
        let mut parts = Vec::new();
        for (bit, name) in [
            (Reasons::INTERVAL, "interval"),
            (Reasons::IO, "io"),
            (Reasons::REQUEST, "request"),
        ] {
            if self.contains(bit) && !bit.is_empty() {
                parts.push(name);
            }
        }
        if parts.is_empty() {
            String::from("none")
        } else {
            parts.join("+")
        }
    }
}

#[derive(Debug, Default)]
struct State {
    /// Reasons fired since the last [`Triggers::wait`] returned.
    pending: Reasons,
    /// Number of `fire` calls folded into `pending`.
    fired: u64,
    /// Set by [`Triggers::stop`]: the protected loop must end.
    stop: bool,
}

/// What [`Triggers::wait`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wakeup {
    /// Take a checkpoint for these reasons; `coalesced` triggers (beyond the first) were merged
    /// into it.
    Checkpoint {
        /// Why.
        reasons: Reasons,
        /// Extra triggers merged into this checkpoint (0: exactly one trigger, or the timer).
        coalesced: u64,
    },
    /// [`Triggers::stop`] was called.
    Stop,
}

/// The one interface through which checkpoints are requested. Cheap to clone; clones share
/// the pending set, so a backend thread, a CLI handler and the sender loop can each hold one.
#[derive(Debug, Clone)]
pub struct Triggers {
    inner: Arc<(Mutex<State>, Condvar)>,
    max_epoch: Duration,
}

impl Triggers {
    /// A trigger set whose [`wait`](Self::wait) fires on its own after `max_epoch` without any
    /// other trigger (the maximum epoch interval).
    pub fn new(max_epoch: Duration) -> Triggers {
        Triggers {
            inner: Arc::new((Mutex::new(State::default()), Condvar::new())),
            max_epoch,
        }
    }

    /// The maximum epoch interval.
    pub fn max_epoch(&self) -> Duration {
        self.max_epoch
    }

    /// Requests a checkpoint for `reasons`. Never blocks; if one is already pending (or being
    /// taken), the reasons join the next one.
    pub fn fire(&self, reasons: Reasons) {
        let (lock, cond) = &*self.inner;
        let mut st = lock.lock().unwrap_or_else(PoisonError::into_inner);
        st.pending = st.pending.union(reasons);
        st.fired += 1;
        cond.notify_all();
    }

    /// Asks the protected loop to end after the checkpoint in progress (if any).
    pub fn stop(&self) {
        let (lock, cond) = &*self.inner;
        let mut st = lock.lock().unwrap_or_else(PoisonError::into_inner);
        st.stop = true;
        cond.notify_all();
    }

    /// Whether [`stop`](Self::stop) was called.
    pub fn stopped(&self) -> bool {
        let (lock, _) = &*self.inner;
        lock.lock().unwrap_or_else(PoisonError::into_inner).stop
    }

    /// Waits for the next checkpoint: returns at once if triggers are pending (fired since the
    /// last return, e.g. during the previous checkpoint), else when one fires, else with
    /// [`Reasons::INTERVAL`] when `since + max_epoch` passes (`since`: when the previous
    /// checkpoint was taken). A stop request wins over pending triggers.
    pub fn wait(&self, since: Instant) -> Wakeup {
        self.wait_after(since, since)
    }

    /// As [`wait`](Self::wait), but no checkpoint is returned before `not_before` (pending
    /// triggers are kept and returned then; a stop request is returned at once). The sender
    /// passes the end of the previous checkpoint plus its minimum run time, so that a guest
    /// whose output is always held still runs between checkpoints.
    pub fn wait_after(&self, since: Instant, not_before: Instant) -> Wakeup {
        let (lock, cond) = &*self.inner;
        let deadline = (since + self.max_epoch).max(not_before);
        let mut st = lock.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if st.stop {
                return Wakeup::Stop;
            }
            let now = Instant::now();
            if now < not_before {
                st = cond
                    .wait_timeout(st, not_before - now)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
                continue;
            }
            if !st.pending.is_empty() {
                let reasons = st.pending;
                let coalesced = st.fired.saturating_sub(1);
                st.pending = Reasons::NONE;
                st.fired = 0;
                return Wakeup::Checkpoint { reasons, coalesced };
            }
            if now >= deadline {
                return Wakeup::Checkpoint {
                    reasons: Reasons::INTERVAL,
                    coalesced: 0,
                };
            }
            st = cond
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn triggers_fired_before_wait_coalesce_into_one() {
        let t = Triggers::new(Duration::from_secs(3600));
        t.fire(Reasons::IO);
        t.fire(Reasons::IO);
        t.fire(Reasons::REQUEST);
        match t.wait(Instant::now()) {
            Wakeup::Checkpoint { reasons, coalesced } => {
                assert!(reasons.contains(Reasons::IO) && reasons.contains(Reasons::REQUEST));
                assert!(!reasons.contains(Reasons::INTERVAL));
                assert_eq!(coalesced, 2);
                assert_eq!(reasons.describe(), "io+request");
            }
            Wakeup::Stop => panic!("not stopped"),
        }
    }

    #[test]
    fn pending_triggers_wait_for_the_minimum_run_time() {
        let t = Triggers::new(Duration::from_secs(3600));
        t.fire(Reasons::IO);
        let start = Instant::now();
        let not_before = start + Duration::from_millis(80);
        match t.wait_after(start, not_before) {
            Wakeup::Checkpoint { reasons, .. } => {
                assert_eq!(reasons, Reasons::IO);
                assert!(
                    Instant::now() >= not_before,
                    "returned before the minimum run time"
                );
            }
            Wakeup::Stop => panic!("not stopped"),
        }
    }

    #[test]
    fn stop_is_not_delayed_by_the_minimum_run_time() {
        let t = Triggers::new(Duration::from_secs(3600));
        t.fire(Reasons::IO);
        t.stop();
        let start = Instant::now();
        let r = t.wait_after(start, start + Duration::from_secs(3600));
        assert_eq!(r, Wakeup::Stop);
    }

    #[test]
    fn minimum_run_time_in_the_past_changes_nothing() {
        let t = Triggers::new(Duration::from_secs(3600));
        t.fire(Reasons::REQUEST);
        let earlier = Instant::now();
        let start = Instant::now();
        match t.wait_after(start, earlier) {
            Wakeup::Checkpoint { reasons, coalesced } => {
                assert_eq!(reasons, Reasons::REQUEST);
                assert_eq!(coalesced, 0);
            }
            Wakeup::Stop => panic!("not stopped"),
        }
    }

    #[test]
    fn interval_fires_when_nothing_else_does() {
        let t = Triggers::new(Duration::from_millis(1));
        let since = Instant::now() - Duration::from_millis(5);
        assert_eq!(
            t.wait(since),
            Wakeup::Checkpoint {
                reasons: Reasons::INTERVAL,
                coalesced: 0
            }
        );
    }

    #[test]
    fn fire_from_another_thread_wakes_the_waiter_and_stop_wins() {
        let t = Triggers::new(Duration::from_secs(3600));
        let t2 = t.clone();
        let h = std::thread::spawn(move || t2.fire(Reasons::REQUEST));
        let w = t.wait(Instant::now());
        h.join().unwrap();
        assert_eq!(
            w,
            Wakeup::Checkpoint {
                reasons: Reasons::REQUEST,
                coalesced: 0
            }
        );
        t.fire(Reasons::IO);
        t.stop();
        assert!(t.stopped());
        assert_eq!(t.wait(Instant::now()), Wakeup::Stop);
    }

    #[test]
    fn reasons_bits_round_trip() {
        let r = Reasons::INTERVAL.union(Reasons::IO);
        assert_eq!(Reasons::from_bits(r.bits()), r);
        assert_eq!(Reasons::from_bits(0xF8), Reasons::NONE);
        assert_eq!(Reasons::NONE.describe(), "none");
    }
}
