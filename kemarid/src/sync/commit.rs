//! Output commit on the engine's side: the adapter between the backends' [`OutputGate`]
//! (`xenbus_backend::commit`) and the sender.
//!
//! * [`TriggerTap`]: a backend's kick becomes [`Triggers::fire`]`(`[`Reasons::IO`]`)`.
//! * [`CommitHook`]: wraps the caller's [`CheckpointHook`]; with the guest paused for
//!   checkpoint `seq` it closes the gate's epoch and puts the disk writes of that epoch into the
//!   checkpoint ([`kemari_stream::disklog`] records); after the ACK of `seq` it releases the
//!   output of epochs `<= seq` ([`OutputGate::acked`]).
//!
//! When protection ends, for whatever reason, the caller calls [`OutputGate::end`]: held
//! output is released and the guest continues unprotected (the secondary is considered failed
//! or was stopped). With `--hold` the guest stays paused at the last ACKed checkpoint, whose
//! output was released by its ACK; output of the next epoch stays held until the backend
//! stops (it is then dropped unanswered, see `Vbd::run`).

use std::sync::Arc;

use kemari_stream::disklog::{self, DiskLogEntry, DiskOp};
use xenbus_backend::commit::{LoggedOp, OutputGate, Tap};

use super::sender::{AckInfo, AfterAck, CheckpointHook, DeviceError, Release};
use super::trigger::{Reasons, Triggers};

/// The backends' tap as a synchronization trigger.
#[derive(Debug, Clone)]
pub struct TriggerTap(pub Triggers);

impl Tap for TriggerTap {
    fn kick(&self) {
        self.0.fire(Reasons::IO);
    }
}

/// A [`CheckpointHook`] adding output commit to `inner`.
#[derive(Debug)]
pub struct CommitHook<H> {
    /// The caller's hook (when to stop, hold).
    pub inner: H,
    /// The gate shared with the backends.
    pub gate: Arc<OutputGate>,
    /// Disk log entries shipped so far.
    pub shipped_entries: u64,
    /// Bytes they covered.
    pub shipped_bytes: u64,
}

impl<H> CommitHook<H> {
    /// Output commit through `gate` around `inner`.
    pub fn new(inner: H, gate: Arc<OutputGate>) -> CommitHook<H> {
        CommitHook {
            inner,
            gate,
            shipped_entries: 0,
            shipped_bytes: 0,
        }
    }
}

impl<H: CheckpointHook> CheckpointHook for CommitHook<H> {
    fn release(&mut self, seq: u64, reasons: Reasons) -> Release {
        self.inner.release(seq, reasons)
    }

    fn extra(&mut self, seq: u64) -> Result<Vec<(u32, Vec<u8>)>, DeviceError> {
        let mut extra = self.inner.extra(seq)?;
        let log: Vec<DiskLogEntry<Arc<[u8]>>> = self
            .gate
            .take_log(seq)
            .into_iter()
            .map(|w| DiskLogEntry {
                seq: w.seq,
                devid: w.devid,
                sector: w.sector,
                op: match w.op {
                    LoggedOp::Write(d) => DiskOp::Write(d),
                    LoggedOp::Discard { bytes } => DiskOp::Discard { bytes },
                },
            })
            .collect();
        self.shipped_entries += log.len() as u64;
        self.shipped_bytes += log.iter().map(DiskLogEntry::len_bytes).sum::<u64>();
        extra.extend(disklog::encode(&log)?);
        Ok(extra)
    }

    fn acked(&mut self, info: &AckInfo) -> AfterAck {
        self.gate.acked(info.seq);
        self.inner.acked(info)
    }
}
