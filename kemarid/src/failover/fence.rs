//! Self-fencing of the primary when `kemari replicate` dies on a live host.
//!
//! The heartbeat comes from the `kemari replicate` process. If that process dies (SIGKILL,
//! OOM killer, a crash) while its host lives, its heartbeat stops and the secondary, after the
//! detection time, resumes a second copy of a guest that still runs on the primary: split-brain.
//! So `kemari replicate` starts a guardian, a separate small process (`kemari fence-guard`),
//! and keeps the write end of a pipe to it ([`Guard`]):
//!
//! * [`ARM`] once the initial sync is ACKed (before that the secondary has nothing to fail
//!   over to and refuses to; fencing would only lose the guest);
//! * [`TICK`] each time the heartbeat thread sends a ping;
//! * [`DISARM`] whenever protection ends in order (a clean stop, which the secondary hears as
//!   `Bye`; or the secondary lost, when the guest must keep running unprotected).
//!
//! The guardian ([`watch`]) fences the guest ([`fence`]: pause at once, then the caller destroys
//! it) when, armed, it sees the pipe end without a `DISARM` (the process is gone: the kernel
//! closed its descriptors) or no `TICK` for `silence` (the process hangs: no pings leave
//! either). `silence` is shorter than the secondary's detection time ([`silence_for`]), and a
//! dead process closes the pipe at once, so the guest on the primary is stopped before the
//! secondary declares the primary dead and resumes its copy.
//!
//! What this does not cover: a network partition (both sides alive, each hearing nothing from
//! the other) still lets both run; that needs a third party (quorum or a witness), not here.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hypervisor::{DomId, DomainControl, HypervisorError};

use super::heartbeat::HeartbeatConfig;

/// Byte: protection is on (the secondary has a replica it may resume).
pub const ARM: u8 = b'A';
/// Byte: the primary process is alive (sent with every heartbeat ping).
pub const TICK: u8 = b'.';
/// Byte: protection ended in order; do not fence.
pub const DISARM: u8 = b'D';

/// Errors of the fencing guard and guardian.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    /// Reading or writing the guard's pipe failed.
    #[error("fence guard: {what}: {source}")]
    Io {
        /// What was done.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Waiting on the pipe failed.
    #[error("fence guard: waiting for the primary process: {0}")]
    Poll(#[source] nix::Error),
    /// Pausing the guest failed.
    #[error("fencing domain {domid}: pausing it: {source}")]
    Pause {
        /// The guest.
        domid: DomId,
        /// Why.
        #[source]
        source: HypervisorError,
    },
    /// A silence that cannot be waited for.
    #[error("fence guard: silence {0:?} must be at least 1 ms")]
    BadSilence(Duration),
}

/// What the guardian saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Verdict {
    /// Protection ended in order (or never started: the pipe ended before `ARM`).
    Disarmed,
    /// Armed, the pipe ended without `DISARM`: the primary process is gone. Fence.
    Gone,
    /// Armed, no `TICK` for this long: the primary process hangs. Fence.
    Silent {
        /// Milliseconds since the last byte.
        ms: u64,
    },
}

impl Verdict {
    /// Whether the guest must be fenced.
    pub fn fence(self) -> bool {
        !matches!(self, Verdict::Disarmed)
    }
}

/// How long the guardian waits without a tick before fencing: `misses - 1` heartbeat periods
/// (at least one), so that a primary whose pings stopped is fenced 1.5 periods before the
/// secondary declares it dead (`(misses + 0.5) x period` after the last beat it heard).
pub fn silence_for(cfg: &HeartbeatConfig) -> Duration {
    cfg.period * cfg.misses.saturating_sub(1).max(1)
}

/// The primary's end of the pipe to the guardian.
pub struct Guard<W: Write + Send> {
    out: Mutex<Option<W>>,
    broken: AtomicBool,
}

impl<W: Write + Send> Guard<W> {
    /// A guard writing to `out` (the guardian's stdin).
    pub fn new(out: W) -> Guard<W> {
        Guard {
            out: Mutex::new(Some(out)),
            broken: AtomicBool::new(false),
        }
    }

    fn send(&self, b: u8) -> Result<(), FenceError> {
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        let Some(w) = out.as_mut() else {
            return Ok(());
        };
        w.write_all(&[b])
            .and_then(|()| w.flush())
            .map_err(|source| FenceError::Io {
                what: "writing to the guardian",
                source,
            })
    }

    /// Protection is on: from now on the guardian fences if this process dies.
    pub fn arm(&self) -> Result<(), FenceError> {
        self.send(ARM)
    }

    /// This process is alive (called with every heartbeat ping). A broken pipe (the guardian
    /// is gone) is logged once.
    pub fn tick(&self) {
        if let Err(e) = self.send(TICK) {
            if !self.broken.swap(true, Ordering::SeqCst) {
                log::error!("{e}: the guest is no longer fenced if this process dies");
            }
        }
    }

    /// Protection ended in order: the guardian exits without fencing. Later ticks are dropped.
    pub fn disarm(&self) -> Result<(), FenceError> {
        let r = self.send(DISARM);
        // closing the pipe after DISARM: the guardian exits
        self.out.lock().unwrap_or_else(|e| e.into_inner()).take();
        r
    }
}

/// The guardian: reads `input` (the pipe from `kemari replicate`) until a verdict.
pub fn watch<R: Read + AsFd>(input: &mut R, silence: Duration) -> Result<Verdict, FenceError> {
    use nix::poll::{PollFd, PollFlags, PollTimeout};
    if silence < Duration::from_millis(1) {
        return Err(FenceError::BadSilence(silence));
    }
    let mut armed = false;
    let mut last = Instant::now();
    let mut buf = [0u8; 256];
    loop {
        let ready = if armed {
            let left = silence.saturating_sub(last.elapsed());
            if left.is_zero() {
                return Ok(Verdict::Silent {
                    ms: last.elapsed().as_millis() as u64,
                });
            }
            let t = PollTimeout::try_from(left.max(Duration::from_millis(1)))
                .unwrap_or(PollTimeout::MAX);
            let mut fds = [PollFd::new(input.as_fd(), PollFlags::POLLIN)];
            match nix::poll::poll(&mut fds, t) {
                Ok(n) => n > 0,
                Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(FenceError::Poll(e)),
            }
        } else {
            true // not armed: block in read
        };
        if !ready {
            continue; // the silence check above decides
        }
        let n = match input.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(FenceError::Io {
                    what: "reading the pipe from the primary process",
                    source,
                })
            }
        };
        if n == 0 {
            return Ok(if armed {
                Verdict::Gone
            } else {
                Verdict::Disarmed
            });
        }
        let got = buf.get(..n).unwrap_or(&[]);
        if got.contains(&DISARM) {
            return Ok(Verdict::Disarmed);
        }
        if got.contains(&ARM) && !armed {
            armed = true;
            log::info!("fence guard: armed");
        }
        last = Instant::now();
    }
}

/// Fences `domid`: pauses it (one hypercall: it stops at once, whatever it was doing). The
/// caller then destroys it (`xl destroy`); a paused guest already emits nothing.
pub fn fence(hv: &dyn DomainControl, domid: DomId) -> Result<(), FenceError> {
    hv.pause(domid)
        .map_err(|source| FenceError::Pause { domid, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hypervisor::mem::{DomainConfig, MemXen};
    use std::os::unix::net::UnixStream;

    const LONG: Duration = Duration::from_secs(5);

    fn pair() -> (Guard<UnixStream>, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (Guard::new(a), b)
    }

    #[test]
    fn a_process_gone_while_armed_is_fenced() {
        let (g, mut r) = pair();
        g.arm().unwrap();
        g.tick();
        g.tick();
        drop(g); // as the kernel does for a SIGKILLed process
        assert_eq!(watch(&mut r, LONG).unwrap(), Verdict::Gone);
        assert!(Verdict::Gone.fence());
    }

    #[test]
    fn disarm_ends_without_fencing_and_later_ticks_are_dropped() {
        let (g, mut r) = pair();
        g.arm().unwrap();
        g.tick();
        g.disarm().unwrap();
        g.tick(); // after disarm: nothing is written, no error
        assert_eq!(watch(&mut r, LONG).unwrap(), Verdict::Disarmed);
        assert!(!Verdict::Disarmed.fence());
    }

    #[test]
    fn gone_before_arming_is_not_fenced() {
        // died during the initial sync: the secondary refuses to fail over, the guest must
        // keep running here
        let (g, mut r) = pair();
        g.tick();
        drop(g);
        assert_eq!(watch(&mut r, LONG).unwrap(), Verdict::Disarmed);
    }

    #[test]
    fn silence_only_counts_once_armed() {
        let (g, mut r) = pair();
        let t = std::thread::spawn(move || {
            // unarmed for longer than the silence: no verdict
            std::thread::sleep(Duration::from_millis(120));
            g.arm().unwrap();
            // then nothing: a hung process
            std::thread::sleep(Duration::from_secs(3));
            drop(g);
        });
        let v = watch(&mut r, Duration::from_millis(40)).unwrap();
        match v {
            Verdict::Silent { ms } => assert!(ms >= 40, "{ms}"),
            other => panic!("{other:?}"),
        }
        t.join().unwrap();
    }

    #[test]
    fn ticks_keep_it_from_fencing() {
        let (g, mut r) = pair();
        let t = std::thread::spawn(move || {
            g.arm().unwrap();
            for _ in 0..20 {
                g.tick();
                std::thread::sleep(Duration::from_millis(5));
            }
            g.disarm().unwrap();
        });
        // ticks every 5 ms against 2 s of allowed silence
        assert_eq!(
            watch(&mut r, Duration::from_secs(2)).unwrap(),
            Verdict::Disarmed
        );
        t.join().unwrap();
    }

    #[test]
    fn a_broken_pipe_is_reported_by_arm_and_disarm_not_by_tick() {
        let (g, r) = pair();
        drop(r);
        g.tick();
        g.tick();
        assert!(g.arm().unwrap_err().to_string().contains("guardian"));
        assert!(g.disarm().is_err());
    }

    #[test]
    fn zero_silence_is_refused() {
        let (_g, mut r) = pair();
        assert!(matches!(
            watch(&mut r, Duration::ZERO),
            Err(FenceError::BadSilence(_))
        ));
    }

    #[test]
    fn silence_is_shorter_than_detection() {
        for (ms, misses) in [(100, 5), (500, 6), (10, 1), (1000, 2)] {
            let cfg = HeartbeatConfig {
                period: Duration::from_millis(ms),
                misses,
                connect_timeout: None,
            };
            let s = silence_for(&cfg);
            assert!(s >= cfg.period && s < cfg.detection_time(), "{ms} {misses}");
        }
    }

    #[test]
    fn fence_pauses_the_guest() {
        let xen = MemXen::new();
        let d = xen.create_domain(DomainConfig::pvh(16)).unwrap();
        assert!(!xen.domain_info(d).unwrap().paused);
        fence(&xen, d).unwrap();
        assert!(xen.domain_info(d).unwrap().paused);
        let e = fence(&xen, 77).unwrap_err().to_string();
        assert!(e.contains("domain 77"), "{e}");
    }
}
