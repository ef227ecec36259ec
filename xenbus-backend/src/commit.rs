//! The event tap and output commit: what connects a protected guest's backends to the
//! synchronization engine, without this crate knowing the engine.
//!
//! One [`OutputGate`] is shared (in an `Arc`) by every backend of a protected guest and by the
//! engine's checkpoint loop:
//!
//! * **Tap.** A backend that takes output from the guest's ring (a disk write, flush or
//!   discard; later a packet to transmit) calls [`OutputGate::kick`], which calls the engine's
//!   [`Tap`] (in kemarid: a synchronization trigger with reason I/O).
//! * **Epochs.** The gate's *epoch* is the sequence number of the next checkpoint whose pause
//!   has not yet harvested the gate ([`OutputGate::take_log`], called with the guest paused,
//!   moves it to `seq + 1`). A backend tags each request with the epoch it reads *after* it
//!   took the request from the ring ([`OutputGate::hold`]). The guest wrote the request before
//!   it was taken, and it cannot write while paused, so the request is in the memory that
//!   checkpoint `epoch` captures: the checkpoint whose ACK may release it.
//! * **Release.** [`OutputGate::acked`] (after the secondary's ACK of `seq`) releases every
//!   request of epoch `<= seq`; backends learn it through a socket they poll
//!   ([`OutputGate::waker`]) and execute and answer the released requests in order.
//! * **Disk write log.** A disk write is logged with its epoch tag in the same locked step
//!   ([`OutputGate::hold_logged`]), and [`OutputGate::take_log`] hands the engine exactly the
//!   writes of the checkpoint being taken, which it ships inside that checkpoint: they are on
//!   the secondary's disk when the checkpoint that releases them is ACKed.
//! * **End.** [`OutputGate::end`] (protection over, secondary failed or stopped) turns the gate
//!   into a pass-through: everything held is released and new requests are not held.
//!
//! A backend without a gate works as an unprotected one. An optional commit log
//! ([`OutputGate::set_commit_log`]) records every ACK, shipped log and released request as one
//! text line each, so a test can check "released only after an ACK with seq >= epoch" request
//! by request.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

/// The engine's side of the tap: told when a backend took guest output that waits for a
/// checkpoint.
pub trait Tap: Send + Sync {
    /// The guest produced output on a protected device (a checkpoint should follow soon).
    fn kick(&self);
}

/// What a logged disk request does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoggedOp {
    /// Write these bytes.
    Write(Arc<[u8]>),
    /// Discard this many bytes (they read back as zeros).
    Discard {
        /// Length in bytes.
        bytes: u64,
    },
}

/// One entry of the disk write log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedWrite {
    /// Sequence number, consecutive over the gate's life, from 1.
    pub seq: u64,
    /// The disk (`virtual-device`).
    pub devid: u32,
    /// Start in 512-byte sectors.
    pub sector: u64,
    /// The operation.
    pub op: LoggedOp,
}

/// One released request, as written to the commit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReleaseRecord<'a> {
    /// Device (`virtual-device` number for disks).
    pub devid: u32,
    /// The guest's request id.
    pub id: u64,
    /// `write`, `flush`, `discard`, `read`.
    pub op: &'a str,
    /// Its epoch (the checkpoint that must be ACKed first).
    pub epoch: u64,
    /// The latest ACKed checkpoint when it was released; `None` if it was released because
    /// protection ended.
    pub acked: Option<u64>,
    /// When the backend took it from the ring.
    pub taken: Instant,
}

#[derive(Debug)]
struct GateState {
    protecting: bool,
    epoch: u64,
    released: u64,
    log: Vec<LoggedWrite>,
    next_log_seq: u64,
    held_total: u64,
}

/// See the module documentation.
pub struct OutputGate {
    state: Mutex<GateState>,
    tap: Box<dyn Tap>,
    wakers: Mutex<Vec<UnixStream>>,
    commit_log: Mutex<Option<Box<dyn Write + Send>>>,
    started: Instant,
}

impl std::fmt::Debug for OutputGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutputGate")
            .field("state", &*self.lock())
            .finish_non_exhaustive()
    }
}

impl OutputGate {
    /// A protecting gate whose first epoch is `first_epoch` (the first checkpoint after the
    /// initial image is 1): output taken from now on is held until `acked(first_epoch)`.
    pub fn new(first_epoch: u64, tap: Box<dyn Tap>) -> Arc<OutputGate> {
        Arc::new(OutputGate {
            state: Mutex::new(GateState {
                protecting: true,
                epoch: first_epoch,
                released: first_epoch.saturating_sub(1),
                log: Vec::new(),
                next_log_seq: 1,
                held_total: 0,
            }),
            tap,
            wakers: Mutex::new(Vec::new()),
            commit_log: Mutex::new(None),
            started: Instant::now(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes one line to the commit log, if any (a failing log is dropped with a warning).
    fn log_line(&self, line: std::fmt::Arguments<'_>) {
        let mut log = self
            .commit_log
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(w) = log.as_mut() {
            let t = self.started.elapsed().as_secs_f64();
            if let Err(e) = writeln!(w, "{t:.6} {line}") {
                log::warn!("commit log disabled: {e}");
                *log = None;
            }
        }
    }

    /// Records every ACK, shipped disk log and released request in `w` (one line each:
    /// `T ack seq=A`, `T ship seq=E entries=N first=F`, `T release dev=D id=I op=O epoch=E
    /// acked=A delay_us=U` (`acked=end`: released because protection ended), T in seconds
    /// since the gate was made).
    pub fn set_commit_log(&self, w: Box<dyn Write + Send>) {
        *self
            .commit_log
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(w);
    }

    /// Flushes the commit log.
    pub fn flush_commit_log(&self) {
        if let Some(w) = self
            .commit_log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_mut()
        {
            if let Err(e) = w.flush() {
                log::warn!("flushing the commit log: {e}");
            }
        }
    }

    /// A socket that becomes readable when held output may have been released (poll it, then
    /// [`drain_waker`] it and release what [`is_released`](Self::is_released) allows).
    pub fn waker(&self) -> std::io::Result<UnixStream> {
        let (tx, rx) = UnixStream::pair()?;
        tx.set_nonblocking(true)?;
        rx.set_nonblocking(true)?;
        self.wakers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(tx);
        Ok(rx)
    }

    fn wake(&self) {
        let mut wakers = self.wakers.lock().unwrap_or_else(PoisonError::into_inner);
        wakers.retain_mut(|w| match w.write(&[1]) {
            Ok(_) => true,
            // already readable: the backend has not drained it yet
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => true,
            // the backend went away
            Err(_) => false,
        });
    }

    /// Whether output is being held (false once [`end`](Self::end) was called).
    pub fn protecting(&self) -> bool {
        self.lock().protecting
    }

    /// Tells the engine that output is waiting (no-op once protection ended).
    pub fn kick(&self) {
        if self.protecting() {
            self.tap.kick();
        }
    }

    /// Tags output just taken from a ring: `Some(epoch)` to hold it until that checkpoint is
    /// ACKed, `None` when not protecting (serve it now).
    pub fn hold(&self) -> Option<u64> {
        let mut st = self.lock();
        if !st.protecting {
            return None;
        }
        st.held_total += 1;
        Some(st.epoch)
    }

    /// As [`hold`](Self::hold) for a disk write or discard, which is also appended to the
    /// disk write log of the same epoch (in one locked step, so a checkpoint's log holds
    /// exactly the writes tagged with its sequence number).
    pub fn hold_logged(&self, devid: u32, sector: u64, op: LoggedOp) -> Option<u64> {
        let mut st = self.lock();
        if !st.protecting {
            return None;
        }
        let seq = st.next_log_seq;
        st.next_log_seq += 1;
        st.log.push(LoggedWrite {
            seq,
            devid,
            sector,
            op,
        });
        st.held_total += 1;
        Some(st.epoch)
    }

    /// Called by the engine with the guest paused for checkpoint `seq`: closes the epoch (new
    /// output is tagged `seq + 1`) and returns the disk writes to ship in checkpoint `seq`.
    pub fn take_log(&self, seq: u64) -> Vec<LoggedWrite> {
        let log = {
            let mut st = self.lock();
            st.epoch = st.epoch.max(seq.saturating_add(1));
            std::mem::take(&mut st.log)
        };
        let first = log.first().map_or(0, |w| w.seq);
        self.log_line(format_args!(
            "ship seq={seq} entries={} first={first}",
            log.len()
        ));
        log
    }

    /// The secondary ACKed checkpoint `seq`: output of epochs `<= seq` is released.
    pub fn acked(&self, seq: u64) {
        // logged first: a release line naming this ACK always comes after it
        self.log_line(format_args!("ack seq={seq}"));
        {
            let mut st = self.lock();
            st.released = st.released.max(seq);
        }
        self.wake();
    }

    /// Protection is over (stopped, or the secondary failed): everything held is released and
    /// nothing more is held. Idempotent.
    pub fn end(&self) {
        let was = {
            let mut st = self.lock();
            std::mem::replace(&mut st.protecting, false)
        };
        if was {
            self.log_line(format_args!("end"));
        }
        self.wake();
    }

    /// Whether output tagged `epoch` may go out now.
    pub fn is_released(&self, epoch: u64) -> bool {
        let st = self.lock();
        !st.protecting || epoch <= st.released
    }

    /// The latest ACKed checkpoint.
    pub fn released(&self) -> u64 {
        self.lock().released
    }

    /// Requests held so far (over the gate's life).
    pub fn held_total(&self) -> u64 {
        self.lock().held_total
    }

    /// A backend released a request (commit log only).
    pub fn record_release(&self, r: &ReleaseRecord<'_>) {
        self.log_line(format_args!(
            "release dev={} id={:#x} op={} epoch={} acked={} delay_us={}",
            r.devid,
            r.id,
            r.op,
            r.epoch,
            r.acked.map_or_else(|| "end".to_string(), |a| a.to_string()),
            r.taken.elapsed().as_micros()
        ));
    }
}

/// Empties a waker socket (after poll said it is readable).
pub fn drain_waker(w: &UnixStream) {
    let mut buf = [0u8; 64];
    let mut r: &UnixStream = w;
    while let Ok(n) = std::io::Read::read(&mut r, &mut buf) {
        if n == 0 {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    struct Count(Arc<AtomicU64>);
    impl Tap for Count {
        fn kick(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn epochs_release_and_log() {
        let kicks = Arc::new(AtomicU64::new(0));
        let gate = OutputGate::new(1, Box::new(Count(kicks.clone())));
        let out = Shared::default();
        gate.set_commit_log(Box::new(out.clone()));
        let waker = gate.waker().unwrap();
        let data: Arc<[u8]> = Arc::from(vec![7u8; 512]);
        assert_eq!(
            gate.hold_logged(51712, 8, LoggedOp::Write(data.clone())),
            Some(1)
        );
        gate.kick();
        assert_eq!(kicks.load(Ordering::SeqCst), 1);
        assert!(!gate.is_released(1));
        // checkpoint 1 is taken: its log has the write, new output belongs to epoch 2
        let log = gate.take_log(1);
        assert_eq!(log.len(), 1);
        assert_eq!(log[0].seq, 1);
        assert_eq!(log[0].op, LoggedOp::Write(data));
        assert_eq!(gate.hold(), Some(2));
        assert_eq!(
            gate.hold_logged(51712, 9, LoggedOp::Discard { bytes: 4096 }),
            Some(2)
        );
        assert!(!gate.is_released(1));
        gate.acked(1);
        assert!(gate.is_released(1) && !gate.is_released(2));
        drain_waker(&waker);
        let log = gate.take_log(2);
        assert_eq!(log.iter().map(|w| w.seq).collect::<Vec<_>>(), vec![2]);
        assert!(gate.take_log(3).is_empty());
        // protection ends: everything goes, nothing is held any more
        gate.end();
        assert!(gate.is_released(u64::MAX));
        assert_eq!(gate.hold(), None);
        assert_eq!(
            gate.hold_logged(1, 1, LoggedOp::Discard { bytes: 512 }),
            None
        );
        gate.kick();
        assert_eq!(kicks.load(Ordering::SeqCst), 1);
        assert_eq!(gate.held_total(), 3);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let kinds: Vec<&str> = text
            .lines()
            .map(|l| l.split_whitespace().nth(1).unwrap())
            .collect();
        assert_eq!(kinds, ["ship", "ack", "ship", "ship", "end"]);
    }

    #[test]
    fn waker_becomes_readable_on_ack_and_end() {
        let gate = OutputGate::new(1, Box::new(Count(Arc::default())));
        let w = gate.waker().unwrap();
        let mut b = [0u8; 8];
        let mut r: &UnixStream = &w;
        assert!(std::io::Read::read(&mut r, &mut b).is_err());
        gate.acked(1);
        assert_eq!(std::io::Read::read(&mut r, &mut b).unwrap(), 1);
        gate.end();
        drain_waker(&w);
        assert!(std::io::Read::read(&mut r, &mut b).is_err());
        // many wakes without a drain do not block the engine
        for s in 0..100_000 {
            gate.acked(s);
        }
    }
}
