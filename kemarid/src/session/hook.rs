//! The checkpoint hook of `kemari replicate`: the caller's hook (when to stop, `--hold`), a
//! held stop on request (SIGUSR1), and output commit through the disk's gate and the NIC's
//! gate, composed in this order from the inside out ([`chain`]):
//!
//! 1. [`HoldOnRequest`] around the caller's hook: once asked, the next checkpoint keeps the
//!    guest paused after its ACK and protection stops there. Innermost, so that the gates'
//!    wrappers around it act on that checkpoint as on any other.
//! 2. [`CommitHook`] (the disk's gate): the checkpoint carries the epoch's disk writes, its
//!    ACK releases them.
//! 3. [`NetCommitHook`] (the NIC's gate): the epoch is closed with the guest paused, after the
//!    disk log was taken; the ACK releases the frames before the disk's gate and the caller's
//!    hook see it.
//! 4. [`ReleaseAtSuspend`] (the disk's gate, `--suspend` only): outermost, so that the disk's
//!    writes are released at the suspend request of every checkpoint, the held one included,
//!    before any inner hook decides anything.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use xenbus_backend::commit::OutputGate;

use super::outputs::Outputs;
use crate::sync::commit::CommitHook;
use crate::sync::sender::{AckInfo, AfterAck, CheckpointHook, DeviceError, Release};
use crate::sync::trigger::Reasons;

/// A hook that, once `flag` is set, holds the next checkpoint and stops after its ACK.
#[derive(Debug)]
pub struct HoldOnRequest<H> {
    inner: H,
    flag: Arc<AtomicBool>,
}

impl<H> HoldOnRequest<H> {
    /// `inner`, held and stopped at the first checkpoint after `flag` is set.
    pub fn new(inner: H, flag: Arc<AtomicBool>) -> HoldOnRequest<H> {
        HoldOnRequest { inner, flag }
    }
}

impl<H: CheckpointHook> CheckpointHook for HoldOnRequest<H> {
    fn release(&mut self, seq: u64, reasons: Reasons) -> Release {
        if self.flag.load(Ordering::SeqCst) {
            Release::AfterAck
        } else {
            self.inner.release(seq, reasons)
        }
    }

    fn acked(&mut self, info: &AckInfo) -> AfterAck {
        let inner = self.inner.acked(info);
        if info.paused && self.flag.load(Ordering::SeqCst) {
            AfterAck::StopPaused
        } else {
            inner
        }
    }

    fn extra(&mut self, seq: u64) -> Result<Vec<(u32, Vec<u8>)>, DeviceError> {
        self.inner.extra(seq)
    }
}

/// A boxed hook as a hook (to stack the wrappers below).
struct Boxed<'a>(Box<dyn CheckpointHook + 'a>);

impl CheckpointHook for Boxed<'_> {
    fn release(&mut self, seq: u64, reasons: Reasons) -> Release {
        self.0.release(seq, reasons)
    }

    fn acked(&mut self, info: &AckInfo) -> AfterAck {
        self.0.acked(info)
    }

    fn extra(&mut self, seq: u64) -> Result<Vec<(u32, Vec<u8>)>, DeviceError> {
        self.0.extra(seq)
    }
}

/// Output commit of the NIC's gate: the epoch is closed with the guest paused for checkpoint
/// `seq` (frames the netback takes from then on belong to `seq + 1`), and frames of epochs
/// `<= seq` are released by the ACK of `seq` - never earlier, with or without --suspend.
struct NetCommitHook<H> {
    inner: H,
    gate: Arc<OutputGate>,
}

impl<H: CheckpointHook> CheckpointHook for NetCommitHook<H> {
    fn release(&mut self, seq: u64, reasons: Reasons) -> Release {
        self.inner.release(seq, reasons)
    }

    fn acked(&mut self, info: &AckInfo) -> AfterAck {
        self.gate.acked(info.seq);
        self.inner.acked(info)
    }

    fn extra(&mut self, seq: u64) -> Result<Vec<(u32, Vec<u8>)>, DeviceError> {
        let extra = self.inner.extra(seq)?;
        // a NIC logs no disk writes: this only closes the epoch
        let _ = self.gate.take_log(seq);
        Ok(extra)
    }
}

/// `--suspend` with `--disk`: the disk writes of epoch `seq` are released when checkpoint
/// `seq` is about to ask the guest to suspend, instead of after its ACK. Linux's Xen suspend
/// freezes every task first, and a task waiting for a write held until the ACK of the very
/// checkpoint that waits for the suspend cannot be frozen: the suspend fails after 20 s
/// (lab run 20261130-231528). Released this way, the writes still reach the primary's disk
/// only after the guest issued them and travel in checkpoint `seq`'s disk log, applied on the
/// secondary with that checkpoint (Remus' disk semantics): if the primary dies before the ACK,
/// the secondary resumes the guest at the previous checkpoint, in a state in which those
/// writes have not completed, and the guest issues them again. What the guest made visible
/// outside because a write completed is the network's output commit to hold: the NIC has a
/// gate of its own, released only by ACKs. (Frames need no such release: the netback answers
/// a TX request once the frame is copied, so no guest task waits for a held frame and the
/// freezer is not blocked.)
struct ReleaseAtSuspend<H> {
    inner: H,
    gate: Arc<OutputGate>,
}

impl<H: CheckpointHook> CheckpointHook for ReleaseAtSuspend<H> {
    fn release(&mut self, seq: u64, reasons: Reasons) -> Release {
        self.gate.acked(seq);
        self.inner.release(seq, reasons)
    }

    fn acked(&mut self, info: &AckInfo) -> AfterAck {
        self.inner.acked(info)
    }

    fn extra(&mut self, seq: u64) -> Result<Vec<(u32, Vec<u8>)>, DeviceError> {
        self.inner.extra(seq)
    }
}

/// The hook of `kemari replicate`: `inner`, a held stop once `usr1` is set, output commit
/// through the disk's gate and the NIC's gate of `outputs` if there are; with `suspend`, the
/// disk's writes are released at the suspend request ([`ReleaseAtSuspend`]), the NIC's frames
/// still by the ACK.
pub fn hook<'a, H: CheckpointHook + 'a>(
    inner: H,
    usr1: Arc<AtomicBool>,
    outputs: Option<&Outputs>,
    suspend: bool,
) -> Box<dyn CheckpointHook + 'a> {
    let disk = outputs.and_then(Outputs::disk_gate).cloned();
    let net = outputs.and_then(Outputs::net_gate).cloned();
    chain(inner, usr1, disk, net, suspend)
}

/// `inner` held on `usr1` and wrapped in the gates' hooks, in the order of the module's doc.
fn chain<'a, H: CheckpointHook + 'a>(
    inner: H,
    usr1: Arc<AtomicBool>,
    disk: Option<Arc<OutputGate>>,
    net: Option<Arc<OutputGate>>,
    suspend: bool,
) -> Box<dyn CheckpointHook + 'a> {
    let mut h: Box<dyn CheckpointHook + 'a> = Box::new(HoldOnRequest::new(inner, usr1));
    if let Some(g) = &disk {
        h = Box::new(CommitHook::new(Boxed(h), g.clone()));
    }
    if let Some(g) = net {
        h = Box::new(NetCommitHook {
            inner: Boxed(h),
            gate: g,
        });
    }
    if let (true, Some(g)) = (suspend, disk) {
        h = Box::new(ReleaseAtSuspend {
            inner: Boxed(h),
            gate: g,
        });
    }
    h
}

#[cfg(test)]
mod tests;
