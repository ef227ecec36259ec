//! The primary's side: initial live sync, then one checkpoint per trigger.
//!
//! ```text
//! initial_sync: log-dirty on; PAGE_DATA of every populated page while the guest runs; rounds
//!               of the pages dirtied meanwhile until the dirty set stops shrinking; pause;
//!               stop the device model and save its state; harvest; copy the last dirty
//!               pages, HVM context, params; unpause; write them; wait for ACK 0 (the
//!               replica exists).
//! protect:      wait for a trigger; pause; (device state); harvest; copy dirty pages +
//!               context + params to a staging buffer; unpause (or, for a held checkpoint,
//!               keep the guest paused until the ACK); stream the frame; wait for its ACK.
//! ```
//!
//! A stream error, a NACK or a missing ACK means the secondary is gone: the sender returns the
//! error with the guest running and log-dirty off (the caller decides what happens next).

use std::io::{BufWriter, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use hypervisor::{
    DirtyBitmap, DomId, GuestType, Hypervisor, HypervisorError, PauseGuard, Pfn, XenStore,
    PAGE_SIZE,
};
use kemari_stream::checkpoint::{
    self, Checkpoint, CheckpointError, EpochReason, NackReason, Page, Reply,
};
use kemari_stream::Limits;

use super::image::{self, EmulatorImage, ImageError};
use super::stats::{CheckpointStats, InitialStats, Progress, StatsSummary};
use super::trigger::{Reasons, Triggers, Wakeup};
use crate::counting::Counting;

/// Pages per read call.
const READ_BATCH: usize = 1024;

/// The HVM parameters libxc's saver sends (`write_hvm_params` in `xg_sr_save_x86_hvm.c`):
/// STORE_PFN, IOREQ_PFN, BUFIOREQ_PFN, PAGING/MONITOR/SHARING_RING_PFN, VM86_TSS_SIZED,
/// CONSOLE_PFN, ACPI_IOPORTS_LOCATION, VIRIDIAN, IDENT_PT, VM_GENERATION_ID_ADDR,
/// IOREQ_SERVER_PFN, NR_IOREQ_SERVER_PAGES, X87_FIP_WIDTH, MCA_CAP.
pub const SAVED_HVM_PARAMS: [u32; 16] =
    [1, 5, 6, 27, 28, 29, 37, 17, 19, 9, 12, 34, 32, 33, 36, 38];

/// Errors of a device model's state save (boxed: each implementation has its own).
pub type DeviceError = Box<dyn std::error::Error + Send + Sync>;

/// The device model (QEMU) of an HVM guest, whose state travels with every checkpoint. PVH
/// guests have none (the sender is given `None`).
pub trait DeviceState: Send {
    /// Saves the device state. Called with the guest paused; may stop the device model,
    /// which [`resumed`](Self::resumed) restarts.
    fn save(&mut self) -> Result<Vec<u8>, DeviceError>;

    /// Called right after the guest was unpaused following a [`save`](Self::save).
    fn resumed(&mut self) -> Result<(), DeviceError> {
        Ok(())
    }

    /// The device model's xenstore data for the initial image (`EMULATOR_XENSTORE_DATA`).
    fn xenstore_data(&mut self) -> Result<Option<Vec<u8>>, DeviceError> {
        Ok(None)
    }

    /// Called with `true` right after log-dirty was turned on for the guest, and with `false`
    /// when it is turned off: the device model reports its own writes to guest memory (an
    /// emulated device's DMA) to Xen's log-dirty bitmap while it is on.
    fn track_writes(&mut self, enable: bool) -> Result<(), DeviceError> {
        let _ = enable;
        Ok(())
    }
}

/// Errors of the sender.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// A call to Xen failed.
    #[error("domain {domid}: {step}: {source}")]
    Xen {
        /// The protected domain.
        domid: DomId,
        /// Which step.
        step: &'static str,
        /// The failed call.
        #[source]
        source: HypervisorError,
    },
    /// The domain cannot be protected.
    #[error("domain {domid} is a {guest_type:?} guest: only HVM and PVH guests can be protected (no log-dirty for PV here)")]
    NotProtectable {
        /// The domain.
        domid: DomId,
        /// Its type.
        guest_type: GuestType,
    },
    /// The device model's state could not be saved.
    #[error("domain {domid}: device model: {step}: {source}")]
    Device {
        /// The domain.
        domid: DomId,
        /// Which step.
        step: &'static str,
        /// Why.
        #[source]
        source: DeviceError,
    },
    /// Writing the initial image failed (the secondary is gone or refused it).
    #[error("sending the initial image: {0}")]
    Image(#[from] ImageError),
    /// Writing a checkpoint or reading its reply failed: the secondary is gone.
    #[error("checkpoint {seq}: {source}")]
    Stream {
        /// The checkpoint.
        seq: u64,
        /// Why.
        #[source]
        source: CheckpointError,
    },
    /// Socket setup or flush failed.
    #[error("{what}: {source}")]
    Io {
        /// What was done.
        what: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// No reply within the timeout.
    #[error("no ACK for checkpoint {seq} within {waited:?}: secondary considered failed")]
    AckTimeout {
        /// The checkpoint.
        seq: u64,
        /// How long we waited.
        waited: Duration,
    },
    /// The secondary refused the checkpoint.
    #[error("secondary refused checkpoint {seq}: {reason:?}")]
    Nack {
        /// The checkpoint.
        seq: u64,
        /// Its reason.
        reason: NackReason,
    },
    /// The guest did not suspend for a cooperative checkpoint ([`Quiesce::Suspend`]).
    #[error("checkpoint {seq}: {source}")]
    Suspend {
        /// The checkpoint (0: the initial image's final round).
        seq: u64,
        /// Why.
        #[source]
        source: crate::xlsave::SaveError,
    },
    /// The hook could not provide the checkpoint's extra records.
    #[error("checkpoint {seq}: extra records (disk write log): {source}")]
    Extra {
        /// The checkpoint.
        seq: u64,
        /// Why.
        #[source]
        source: DeviceError,
    },
    /// A reply for another checkpoint.
    #[error("reply for checkpoint {got} while waiting for {expected}")]
    WrongReply {
        /// Awaited.
        expected: u64,
        /// Received.
        got: u64,
    },
}

impl SendError {
    /// Whether the error says the secondary is gone or unusable (the stream, the socket, its
    /// replies), as opposed to a failure on this host (Xen, the device model, the guest's
    /// suspend, the hook's extra records): the caller reports the two differently, and only the
    /// first is a "secondary lost".
    pub fn peer_lost(&self) -> bool {
        match self {
            SendError::Image(_)
            | SendError::Stream { .. }
            | SendError::Io { .. }
            | SendError::AckTimeout { .. }
            | SendError::Nack { .. }
            | SendError::WrongReply { .. } => true,
            SendError::Xen { .. }
            | SendError::NotProtectable { .. }
            | SendError::Device { .. }
            | SendError::Suspend { .. }
            | SendError::Extra { .. } => false,
        }
    }
}

/// Tuning of the sender.
#[derive(Debug, Clone)]
pub struct SenderOptions {
    /// Most live rounds after the first full copy.
    pub max_live_rounds: u32,
    /// Stop the live rounds once no more than this many pages are dirty.
    pub live_dirty_target: u64,
    /// Wait for each checkpoint's ACK at most this long.
    pub ack_timeout: Duration,
    /// Wait for the ACK of the initial image (the secondary builds the replica) this long.
    pub initial_ack_timeout: Duration,
    /// Limits of the stream codec.
    pub limits: Limits,
    /// The guest runs at least this long between the end of one checkpoint and the start of
    /// the next, whatever triggers are pending (they are kept and coalesced). Zero: none. A
    /// guest whose output is always held (many writers, an inbound stream) is otherwise
    /// starved by back-to-back checkpoints (docs/sync.md).
    pub min_run: Duration,
}

impl Default for SenderOptions {
    fn default() -> Self {
        SenderOptions {
            max_live_rounds: 8,
            live_dirty_target: 64,
            ack_timeout: Duration::from_secs(30),
            initial_ack_timeout: Duration::from_secs(600),
            limits: Limits::default(),
            min_run: Duration::ZERO,
        }
    }
}

/// When the guest may run again during a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// As soon as the checkpoint is staged in local memory (before it is sent).
    AfterStaging,
    /// Only after the secondary ACKed it (the guest is paused during the ACK hook).
    AfterAck,
}

/// What to do after an ACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterAck {
    /// Keep protecting.
    Continue,
    /// End protection (the guest runs; log-dirty off).
    Stop,
    /// End protection and leave the guest paused, exactly at the ACKed checkpoint (only after
    /// a checkpoint released [`Release::AfterAck`]; otherwise the same as `Stop`).
    StopPaused,
}

/// One ACKed checkpoint, as the hook sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckInfo {
    /// Its sequence number.
    pub seq: u64,
    /// Why it was taken.
    pub reasons: Reasons,
    /// Triggers merged into it beyond the first.
    pub coalesced: u64,
    /// Pages it carried.
    pub pages: u64,
    /// Whether the guest is still paused (released [`Release::AfterAck`]).
    pub paused: bool,
}

/// Hooks into the protected loop: where output commit (release of buffered I/O) goes.
pub trait CheckpointHook {
    /// Before checkpoint `seq` is taken: when to let the guest run again.
    fn release(&mut self, _seq: u64, _reasons: Reasons) -> Release {
        Release::AfterStaging
    }

    /// After the ACK of a checkpoint.
    fn acked(&mut self, info: &AckInfo) -> AfterAck;

    /// Called with the guest paused for checkpoint `seq`, after its state was staged: extra
    /// records `(kind, data)` for the frame (`KEMARI_EXTRA`: the disk write log of the epoch
    /// this checkpoint closes). An error ends protection.
    fn extra(&mut self, _seq: u64) -> Result<Vec<(u32, Vec<u8>)>, DeviceError> {
        Ok(Vec::new())
    }
}

/// A hook that stops after `limit` checkpoints (if set), holding the guest paused at the last
/// one if `hold`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CountHook {
    /// Stop after this many checkpoints.
    pub limit: Option<u64>,
    /// Leave the guest paused right after the last ACK.
    pub hold: bool,
}

impl CheckpointHook for CountHook {
    fn release(&mut self, seq: u64, _reasons: Reasons) -> Release {
        if self.hold && self.limit == Some(seq) {
            Release::AfterAck
        } else {
            Release::AfterStaging
        }
    }

    fn acked(&mut self, info: &AckInfo) -> AfterAck {
        match self.limit {
            Some(limit) if info.seq >= limit => {
                if self.hold {
                    AfterAck::StopPaused
                } else {
                    AfterAck::Stop
                }
            }
            _ => AfterAck::Continue,
        }
    }
}

/// How protection ended without error.
#[derive(Debug, Clone, PartialEq)]
pub struct ProtectOutcome {
    /// Last ACKed sequence number.
    pub last_seq: u64,
    /// The guest was left paused at `last_seq`.
    pub held_paused: bool,
    /// Checkpoint figures.
    pub stats: StatsSummary,
}

/// How the guest is stopped for a checkpoint (see `docs/failover.md`).
pub enum Quiesce {
    /// Toolstack pause (the default): the guest does not notice; the checkpoint is a complete
    /// image only for a guest that uses none of Xen's PV interfaces (design notes §3).
    Pause,
    /// Cooperative suspend, as Remus: `control/shutdown` = `suspend`, wait until Xen reports
    /// the guest shut down for suspend, copy, then `xc_domain_resume(fast)`: the guest sees
    /// its suspend cancelled and goes on. The state copied is the one `xl save` would write,
    /// so the secondary can restore it and the guest resumes through its own resume path.
    Suspend {
        /// A xenstore connection to write the request through.
        xenstore: Box<dyn XenStore>,
        /// Give up (and end protection, guest running) when the guest takes longer.
        timeout: Duration,
    },
}

impl std::fmt::Debug for Quiesce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Quiesce::Pause => f.write_str("Pause"),
            Quiesce::Suspend { timeout, .. } => {
                f.debug_struct("Suspend").field("timeout", timeout).finish()
            }
        }
    }
}

/// The guest stopped for a checkpoint: paused, or suspended. Dropping it lets the guest run
/// again (unpause, or fast resume), so no error path leaves it stopped.
struct Stopped<'h> {
    pause: Option<PauseGuard<'h, dyn Hypervisor + 'h>>,
    suspended: Option<(&'h dyn Hypervisor, DomId)>,
}

impl Stopped<'_> {
    /// Lets the guest run again.
    fn release(mut self) -> hypervisor::Result<()> {
        if let Some(g) = self.pause.take() {
            g.unpause()?;
        }
        if let Some((hv, domid)) = self.suspended.take() {
            hv.resume(domid, true)?;
        }
        Ok(())
    }

    /// Leaves the guest stopped for good: a paused guest keeps the pause reference; a
    /// suspended one is paused, then resumed (fast), so it stays paused but not shut down.
    fn hold(mut self) -> hypervisor::Result<()> {
        if let Some(g) = self.pause.take() {
            std::mem::forget(g);
        }
        if let Some((hv, domid)) = self.suspended.take() {
            hv.pause(domid)?;
            hv.resume(domid, true)?;
        }
        Ok(())
    }
}

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        if let Some((hv, domid)) = self.suspended.take() {
            if let Err(e) = hv.resume(domid, true) {
                log::error!("domain {domid}: resuming the suspended guest after an error: {e}");
            }
        }
    }
}

/// Called after every acknowledged checkpoint with its figures.
pub type CheckpointObserver<'a> = Box<dyn FnMut(&CheckpointSample) + Send + 'a>;

/// One checkpoint, as the sender observed it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CheckpointSample {
    /// Its sequence number.
    pub seq: u64,
    /// Time the guest was paused.
    pub pause: Duration,
    /// Pause start to ACK.
    pub latency: Duration,
    /// Last byte sent to ACK.
    pub ack_wait: Duration,
    /// Pages it carried.
    pub pages: u64,
    /// Its bytes on the wire.
    pub bytes: u64,
}

/// The primary's end of one protection connection.
pub struct Sender<'a> {
    hv: &'a dyn Hypervisor,
    domid: DomId,
    opts: SenderOptions,
    device: Option<Box<dyn DeviceState + 'a>>,
    /// The device model was stopped by a save and not resumed yet.
    device_stopped: bool,
    out: Counting<BufWriter<TcpStream>>,
    replies: TcpStream,
    bitmap: DirtyBitmap,
    log_dirty: bool,
    next_seq: u64,
    stats: CheckpointStats,
    last_epoch: Instant,
    quiesce: Quiesce,
    observer: Option<CheckpointObserver<'a>>,
}

impl std::fmt::Debug for Sender<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("domid", &self.domid)
            .field("next_seq", &self.next_seq)
            .field("log_dirty", &self.log_dirty)
            .finish()
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SendError {
    let what = what.into();
    move |source| SendError::Io { what, source }
}

/// The checkpoint's reason for the frame (one value: I/O wins over a request over the timer).
fn epoch_reason(reasons: Reasons) -> EpochReason {
    if reasons.contains(Reasons::IO) {
        EpochReason::Io {
            device: String::new(),
        }
    } else if reasons.contains(Reasons::REQUEST) {
        EpochReason::Request
    } else {
        EpochReason::Interval
    }
}

impl<'a> Sender<'a> {
    /// A sender for `domid` over the connected `stream` (to a receiver). `device` is the
    /// guest's device model (HVM), `None` for PVH.
    pub fn new(
        hv: &'a dyn Hypervisor,
        domid: DomId,
        stream: TcpStream,
        opts: SenderOptions,
        device: Option<Box<dyn DeviceState + 'a>>,
    ) -> Result<Sender<'a>, SendError> {
        stream
            .set_nodelay(true)
            .map_err(io_err("setting TCP_NODELAY"))?;
        stream
            .set_write_timeout(Some(opts.ack_timeout.max(Duration::from_secs(1))))
            .map_err(io_err("setting the send timeout"))?;
        let replies = stream
            .try_clone()
            .map_err(io_err("cloning the connection"))?;
        Ok(Sender {
            hv,
            domid,
            opts,
            device,
            device_stopped: false,
            out: Counting::new(BufWriter::with_capacity(1 << 20, stream)),
            replies,
            bitmap: DirtyBitmap::new(0),
            log_dirty: false,
            next_seq: 0,
            stats: CheckpointStats::default(),
            last_epoch: Instant::now(),
            quiesce: Quiesce::Pause,
            observer: None,
        })
    }

    fn xen<T>(&self, step: &'static str, r: hypervisor::Result<T>) -> Result<T, SendError> {
        r.map_err(|source| SendError::Xen {
            domid: self.domid,
            step,
            source,
        })
    }

    /// Checkpoint figures so far.
    pub fn stats(&self) -> StatsSummary {
        self.stats.summary()
    }

    /// Called after every acknowledged checkpoint with its figures (the daemon's status and
    /// metrics).
    pub fn set_observer(&mut self, observer: CheckpointObserver<'a>) {
        self.observer = Some(observer);
    }

    /// How the guest is stopped for the initial image's final round and every checkpoint
    /// (default [`Quiesce::Pause`]).
    pub fn set_quiesce(&mut self, quiesce: Quiesce) {
        self.quiesce = quiesce;
    }

    /// After a failed suspend request the guest had already taken: it may still suspend, and
    /// nobody would resume it. Wait up to twice `timeout` for that, and resume it (fast) if it
    /// does. (A guest later still stays suspended: `xl` can resume it by hand; logged.)
    fn resume_late_suspend(&self, timeout: Duration) {
        let start = Instant::now();
        while start.elapsed() < timeout.saturating_mul(2) {
            match self.hv.domain_info(self.domid) {
                Ok(i) if i.shutdown == Some(hypervisor::ShutdownReason::Suspend) => {
                    if let Err(e) = self.hv.resume(self.domid, true) {
                        log::error!("domain {}: resuming a late suspend: {e}", self.domid);
                    }
                    return;
                }
                Ok(i) if i.shutdown.is_none() && !i.dying => {}
                Ok(_) | Err(_) => return,
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        log::error!(
            "domain {}: the guest took the suspend request but has not suspended after {:?}; if it does later it stays suspended",
            self.domid,
            start.elapsed()
        );
    }

    /// Stops the guest for checkpoint `seq` the configured way.
    fn stop_guest(&self, seq: u64) -> Result<Stopped<'a>, SendError> {
        let hv = self.hv;
        match &self.quiesce {
            Quiesce::Pause => Ok(Stopped {
                pause: Some(self.xen("pausing", PauseGuard::pause(hv, self.domid))?),
                suspended: None,
            }),
            Quiesce::Suspend { xenstore, timeout } => {
                if let Err(source) =
                    crate::xlsave::suspend_guest(hv, xenstore.as_ref(), self.domid, *timeout)
                {
                    if !matches!(
                        source,
                        crate::xlsave::SaveError::SuspendTimeout {
                            cancelled: "withdrawn",
                            ..
                        }
                    ) {
                        self.resume_late_suspend(*timeout);
                    }
                    return Err(SendError::Suspend { seq, source });
                }
                Ok(Stopped {
                    pause: None,
                    suspended: Some((hv, self.domid)),
                })
            }
        }
    }

    /// Reads `pfns` (the guest may be running): returns the pages that could be read, and
    /// the number of pfns that could not (unpopulated).
    fn read_batch(
        &self,
        step: &'static str,
        pfns: &[Pfn],
        buf: &mut Vec<u8>,
    ) -> Result<Vec<bool>, SendError> {
        buf.resize(pfns.len() * PAGE_SIZE, 0);
        let mut ok = vec![true; pfns.len()];
        match self.hv.read_pages(self.domid, pfns, buf) {
            Ok(()) => {}
            Err(HypervisorError::Pages { failures, .. }) => {
                for (pfn, _) in failures {
                    for (i, p) in pfns.iter().enumerate() {
                        if *p == pfn {
                            if let Some(slot) = ok.get_mut(i) {
                                *slot = false;
                            }
                        }
                    }
                }
            }
            Err(source) => {
                return Err(SendError::Xen {
                    domid: self.domid,
                    step,
                    source,
                })
            }
        }
        Ok(ok)
    }

    /// Sends `pfns` live; returns (pages sent, pfns skipped).
    fn send_live(&mut self, pfns: &[Pfn], buf: &mut Vec<u8>) -> Result<(u64, u64), SendError> {
        let (mut sent, mut holes) = (0u64, 0u64);
        for batch in pfns.chunks(READ_BATCH) {
            let ok = self.read_batch("reading pages (live round)", batch, buf)?;
            let mut pages: Vec<(u64, &[u8; PAGE_SIZE])> = Vec::with_capacity(batch.len());
            for ((pfn, good), chunk) in batch.iter().zip(&ok).zip(buf.chunks_exact(PAGE_SIZE)) {
                if !good {
                    holes += 1;
                    continue;
                }
                if let Ok(page) = <&[u8; PAGE_SIZE]>::try_from(chunk) {
                    pages.push((*pfn, page));
                }
            }
            sent += pages.len() as u64;
            image::write_pages(&mut self.out, &pages, &self.opts.limits)?;
        }
        Ok((sent, holes))
    }

    fn read_params(&self) -> Result<Vec<(u32, u64)>, SendError> {
        let mut params = Vec::with_capacity(SAVED_HVM_PARAMS.len());
        for p in SAVED_HVM_PARAMS {
            let v = self.xen("reading HVM parameters", self.hv.hvm_param(self.domid, p))?;
            params.push((p, v));
        }
        Ok(params)
    }

    fn device_save(&mut self) -> Result<Option<Vec<u8>>, SendError> {
        let domid = self.domid;
        match self.device.as_mut() {
            None => Ok(None),
            Some(d) => {
                // A failed save may have stopped the device model too: resume it on cleanup.
                self.device_stopped = true;
                d.save().map(Some).map_err(|source| SendError::Device {
                    domid,
                    step: "saving device state",
                    source,
                })
            }
        }
    }

    fn device_resumed(&mut self) -> Result<(), SendError> {
        let domid = self.domid;
        if let Some(d) = self.device.as_mut() {
            self.device_stopped = false;
            d.resumed().map_err(|source| SendError::Device {
                domid,
                step: "resuming the device model",
                source,
            })?;
        }
        Ok(())
    }

    /// After an error: the guest runs again (its pause guard is gone), so its device model
    /// must run too (best effort, logged), and log-dirty goes off.
    fn cleanup_after_error(&mut self) {
        if self.device_stopped {
            self.device_stopped = false;
            if let Some(d) = self.device.as_mut() {
                if let Err(e) = d.resumed() {
                    log::error!(
                        "domain {}: resuming the device model after an error: {e}",
                        self.domid
                    );
                }
            }
        }
        self.stop_log_dirty();
    }

    /// Turns log-dirty off (best effort, logged).
    fn stop_log_dirty(&mut self) {
        if self.log_dirty {
            self.log_dirty = false;
            if let Err(e) = self.hv.log_dirty_disable(self.domid) {
                log::warn!("domain {}: turning log-dirty off: {e}", self.domid);
            }
            if let Some(d) = self.device.as_mut() {
                if let Err(e) = d.track_writes(false) {
                    log::warn!(
                        "domain {}: turning the device model's dirty tracking off: {e}",
                        self.domid
                    );
                }
            }
        }
    }

    fn wait_reply(&mut self, seq: u64, timeout: Duration) -> Result<(), SendError> {
        self.replies
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
            .map_err(io_err("setting the ACK timeout"))?;
        let start = Instant::now();
        match Reply::read(&mut self.replies) {
            Ok(Reply::Ack(a)) if a.seq == seq => Ok(()),
            Ok(Reply::Ack(a)) => Err(SendError::WrongReply {
                expected: seq,
                got: a.seq,
            }),
            Ok(Reply::Nack(n)) => Err(SendError::Nack {
                seq: n.seq,
                reason: n.reason,
            }),
            Err(CheckpointError::Frame(kemari_stream::frame::FrameError::Io { error, .. }))
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Err(SendError::AckTimeout {
                    seq,
                    waited: start.elapsed(),
                })
            }
            Err(source) => Err(SendError::Stream { seq, source }),
        }
    }

    /// The live initial copy; returns when the secondary ACKed the image (sequence 0).
    /// `config_json` is the domain's libxl configuration for the image's xl header.
    /// On error, log-dirty is off and the guest runs.
    pub fn initial_sync(
        &mut self,
        config_json: &[u8],
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<InitialStats, SendError> {
        let r = self.initial_sync_inner(config_json, progress);
        if r.is_err() {
            self.cleanup_after_error();
        }
        r
    }

    fn initial_sync_inner(
        &mut self,
        config_json: &[u8],
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<InitialStats, SendError> {
        let started = Instant::now();
        let domid = self.domid;
        let info = self.xen("domain info", self.hv.domain_info(domid))?;
        if !matches!(info.guest_type, GuestType::Hvm | GuestType::Pvh) {
            return Err(SendError::NotProtectable {
                domid,
                guest_type: info.guest_type,
            });
        }
        let max_pfn = self.xen("maximum gpfn", self.hv.maximum_gpfn(domid))?;
        self.xen("enabling log-dirty", self.hv.log_dirty_enable(domid))?;
        self.log_dirty = true;
        if let Some(d) = self.device.as_mut() {
            d.track_writes(true).map_err(|source| SendError::Device {
                domid,
                step: "turning on the device model's dirty tracking",
                source,
            })?;
        }
        self.bitmap = DirtyBitmap::new(max_pfn.saturating_add(1));
        image::write_prologue(&mut self.out, config_json, &self.opts.limits)?;

        let mut stats = InitialStats::default();
        let mut buf = Vec::new();
        let mut round = 1u32;
        let mut round_start = Instant::now();
        let all: Vec<Pfn> = (0..=max_pfn).collect();
        let (sent, holes) = self.send_live(&all, &mut buf)?;
        drop(all);
        stats.live_pages += sent;
        stats.holes = holes;
        let mut round_pages = sent;
        let mut prev_dirty = u64::MAX;
        let carry = loop {
            let mut harvested = DirtyBitmap::new(self.bitmap.nr_pages());
            self.xen(
                "harvesting dirty pages (live round)",
                self.hv.log_dirty_clean(domid, &mut harvested),
            )?;
            let dirty = harvested.count();
            let secs = round_start.elapsed().as_secs_f64().max(1e-6);
            let last = dirty <= self.opts.live_dirty_target
                || round > self.opts.max_live_rounds
                || dirty >= prev_dirty;
            progress(&Progress {
                round,
                round_pages,
                total_pages: stats.live_pages,
                holes: stats.holes,
                dirty_rate: dirty as f64 / secs,
                dirty_after: dirty,
                last,
            });
            if last {
                break harvested;
            }
            prev_dirty = dirty;
            round += 1;
            round_start = Instant::now();
            let pfns: Vec<Pfn> = harvested.iter().collect();
            let (sent, holes) = self.send_live(&pfns, &mut buf)?;
            stats.live_pages += sent;
            stats.holes += holes;
            round_pages = sent;
        };
        stats.rounds = round;

        // The paused round: everything dirty since the last harvest, plus what that harvest
        // found and did not send.
        let pause_start = Instant::now();
        let guard = self.stop_guest(0)?;
        // The device model first (as libxl does): until it is stopped it still writes guest
        // memory and raises interrupts, which the harvest and the context must include.
        let emulator = match self.device_save()? {
            None => None,
            Some(context) => {
                let xenstore_data = match self.device.as_mut() {
                    Some(d) => d.xenstore_data().map_err(|source| SendError::Device {
                        domid,
                        step: "reading the device model's xenstore data",
                        source,
                    })?,
                    None => None,
                };
                Some(EmulatorImage {
                    xenstore_data,
                    context,
                })
            }
        };
        let mut last = DirtyBitmap::new(self.bitmap.nr_pages());
        self.xen(
            "harvesting dirty pages (final round)",
            self.hv.log_dirty_clean_final(domid, &mut last),
        )?;
        last.union_with(&carry);
        let pfns: Vec<Pfn> = last.iter().collect();
        let (pages, skipped) = self.stage(&pfns)?;
        let context = self.xen("reading the HVM context", self.hv.hvm_context(domid))?;
        let params = self.read_params()?;
        // The device model runs again before the vCPUs do (see `checkpoint`).
        self.device_resumed()?;
        self.xen("unpausing", guard.release())?;
        self.last_epoch = pause_start;
        stats.pause_ms = pause_start.elapsed().as_secs_f64() * 1000.0;

        let refs: Vec<(u64, &[u8; PAGE_SIZE])> = pages.iter().map(|(p, d)| (*p, &**d)).collect();
        image::write_pages(&mut self.out, &refs, &self.opts.limits)?;
        stats.final_pages = pages.len() as u64;
        stats.holes += skipped;
        let nonzero: Vec<(u32, u64)> = params.iter().copied().filter(|(_, v)| *v != 0).collect();
        image::write_epilogue(
            &mut self.out,
            &context,
            &nonzero,
            emulator.as_ref(),
            &self.opts.limits,
        )?;
        self.out
            .flush()
            .map_err(io_err("sending the initial image"))?;
        stats.bytes = self.out.bytes();
        self.wait_reply(0, self.opts.initial_ack_timeout)?;
        self.next_seq = 1;
        stats.total_ms = started.elapsed().as_secs_f64() * 1000.0;
        Ok(stats)
    }

    /// Copies `pfns` (guest paused) into owned pages; returns them and the number of pfns
    /// that could not be read (no longer populated), which are left out.
    fn stage(&self, pfns: &[Pfn]) -> Result<(Vec<(u64, Page)>, u64), SendError> {
        let mut pages = Vec::with_capacity(pfns.len());
        let mut skipped = 0u64;
        let mut buf = Vec::new();
        for batch in pfns.chunks(READ_BATCH) {
            let ok = self.read_batch("reading dirty pages", batch, &mut buf)?;
            for ((pfn, good), chunk) in batch.iter().zip(&ok).zip(buf.chunks_exact(PAGE_SIZE)) {
                if !good {
                    skipped += 1;
                    continue;
                }
                let mut page = checkpoint::zero_page();
                page.copy_from_slice(chunk);
                pages.push((*pfn, page));
            }
        }
        if skipped > 0 {
            log::warn!(
                "domain {}: {skipped} dirty pfns could not be read (no longer populated) and are left out",
                self.domid
            );
        }
        Ok((pages, skipped))
    }

    /// Takes, sends and confirms one checkpoint. Returns whether to go on and whether the
    /// guest was left paused.
    fn checkpoint(
        &mut self,
        reasons: Reasons,
        coalesced: u64,
        hook: &mut dyn CheckpointHook,
    ) -> Result<(AfterAck, bool), SendError> {
        let seq = self.next_seq;
        let domid = self.domid;
        let release = hook.release(seq, reasons);
        let t0 = Instant::now();
        self.last_epoch = t0;
        let guard = self.stop_guest(seq)?;
        // The device model is stopped before the harvest and the context are read, as libxl
        // does: a running QEMU can still complete a transfer into guest memory or raise an
        // interrupt after the vCPUs are paused, and the checkpoint must hold both. (The lab's
        // hvm-nopv console hang was the resume order below, not this order: docs/failover.md.)
        let emulator_state = self.device_save()?;
        let mut bitmap = std::mem::replace(&mut self.bitmap, DirtyBitmap::new(0));
        // Paused: also the pages Xen writes through its own mappings (vcpu_info, ...).
        let harvested = self.hv.log_dirty_clean_final(domid, &mut bitmap);
        let pfns: Vec<Pfn> = bitmap.iter().collect();
        self.bitmap = bitmap;
        self.xen("harvesting the dirty bitmap", harvested)?;
        let (pages, skipped) = self.stage(&pfns)?;
        self.stats.add_skipped(skipped);
        let hvm_context = self.xen("reading the HVM context", self.hv.hvm_context(domid))?;
        let hvm_params = self.read_params()?;
        let extra = hook
            .extra(seq)
            .map_err(|source| SendError::Extra { seq, source })?;
        let mut held = Some(guard);
        let mut pause = Duration::ZERO;
        if release == Release::AfterStaging {
            // QEMU first, as libxl resumes a domain: a stopped QEMU has its ioreq server
            // disabled, so a vCPU running before `cont` has its port I/O to emulated devices
            // dropped (reads return all ones). A UART interrupt handled in that window reads
            // "no interrupt pending", the line stays raised, no new edge comes and the guest's
            // console tty waits forever (lab: hvm-nopv guest, pause checkpoints).
            self.device_resumed()?;
            if let Some(g) = held.take() {
                self.xen("unpausing", g.release())?;
            }
            pause = t0.elapsed();
        }
        let cp = Checkpoint {
            seq,
            reason: epoch_reason(reasons),
            pages,
            hvm_context,
            hvm_params,
            emulator_state,
            extra,
        };
        let npages = cp.pages.len() as u64;
        let bytes = checkpoint::write_checkpoint(&mut self.out, &cp, &self.opts.limits)
            .map_err(|source| SendError::Stream { seq, source })?;
        drop(cp);
        self.out
            .flush()
            .map_err(io_err(format!("sending checkpoint {seq}")))?;
        let sent = Instant::now();
        self.wait_reply(seq, self.opts.ack_timeout)?;
        let ack_wait = sent.elapsed();
        self.next_seq = seq + 1;
        let info = AckInfo {
            seq,
            reasons,
            coalesced,
            pages: npages,
            paused: held.is_some(),
        };
        let action = hook.acked(&info);
        let mut left_paused = false;
        if let Some(g) = held.take() {
            if action == AfterAck::StopPaused {
                // Keep the toolstack pause reference: the guest stays exactly at `seq`.
                self.xen("holding the guest paused", g.hold())?;
                left_paused = true;
            } else {
                self.device_resumed()?;
                self.xen("unpausing", g.release())?;
            }
            pause = t0.elapsed();
        }
        self.stats.record(pause, npages, bytes, ack_wait);
        if let Some(observe) = self.observer.as_mut() {
            observe(&CheckpointSample {
                seq,
                pause,
                latency: t0.elapsed(),
                ack_wait,
                pages: npages,
                bytes: bytes as u64,
            });
        }
        Ok((action, left_paused))
    }

    /// Protected mode: one checkpoint per trigger until the hook or [`Triggers::stop`] ends
    /// it. On error the guest runs and log-dirty is off.
    pub fn protect(
        &mut self,
        triggers: &Triggers,
        hook: &mut dyn CheckpointHook,
    ) -> Result<ProtectOutcome, SendError> {
        let mut last_seq = self.next_seq.saturating_sub(1);
        let mut not_before = Instant::now() + self.opts.min_run;
        loop {
            match triggers.wait_after(self.last_epoch, not_before) {
                Wakeup::Stop => {
                    self.stop_log_dirty();
                    return Ok(ProtectOutcome {
                        last_seq,
                        held_paused: false,
                        stats: self.stats.summary(),
                    });
                }
                Wakeup::Checkpoint { reasons, coalesced } => {
                    self.stats.add_coalesced(coalesced);
                    match self.checkpoint(reasons, coalesced, hook) {
                        Err(e) => {
                            self.cleanup_after_error();
                            return Err(e);
                        }
                        Ok((action, held_paused)) => {
                            last_seq = self.next_seq - 1;
                            not_before = Instant::now() + self.opts.min_run;
                            if action != AfterAck::Continue {
                                self.stop_log_dirty();
                                return Ok(ProtectOutcome {
                                    last_seq,
                                    held_paused,
                                    stats: self.stats.summary(),
                                });
                            }
                        }
                    }
                }
            }
        }
    }
}

impl Drop for Sender<'_> {
    fn drop(&mut self) {
        self.stop_log_dirty();
    }
}
