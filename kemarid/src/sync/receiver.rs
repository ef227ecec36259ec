//! The secondary's side: spool the initial image, build the paused replica, then apply every
//! checkpoint whole or not at all, and ACK it.
//!
//! Per checkpoint: read the whole frame ([`CheckpointReader`]: order, counts, sequence,
//! checksum); check its HVM context; phase 1 of the page apply (pfns in range, the pages to be
//! overwritten copied aside); write the staged CPU/device state to a temporary file; phase 2
//! (write the pages, rolled back on failure); rename the staged file into place; ACK. Any
//! failure before the ACK leaves the replica and the staged state at the previous checkpoint,
//! NACKs (best effort) and ends the connection with an error; the replica stays paused.
//!
//! With disks ([`Receiver::with_disks`]), a checkpoint's disk write log (`KEMARI_EXTRA` kind
//! [`disklog::EXTRA_DISK_LOG`]) is applied to the secondary's copies of the guest's disks in
//! the same all-or-nothing step: decoded and checked (consecutive sequence numbers, ranges
//! inside the disks), the bytes it overwrites copied aside, the log written to
//! `DIR/disklog.kemari.tmp` (synced) before the first disk write, the disks written and synced
//! before the pages, and everything undone if a later step fails. After the ACK the log is
//! kept as `DIR/disklog.kemari` (the last applied checkpoint's writes).

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hypervisor::{hvm_save, DomId, Hypervisor, HypervisorError, PAGE_SIZE};
use kemari_stream::checkpoint::{
    self, Ack, Checkpoint, CheckpointError, CheckpointReader, EpochReason, Nack, NackReason, Reply,
};
use kemari_stream::Limits;

use kemari_stream::disklog::{self, DiskLogEntry, DiskLogError};

use super::apply::{ApplyError, PageApply};
use super::disk_apply::{DiskApply, DiskApplyError, ReplicaDisk};
use super::image::{self, ImageError};
use super::replica::{ReplicaBuilder, ReplicaError};

/// File name of the spooled initial image in the spool directory.
pub const IMAGE_FILE: &str = "initial.img";
/// File name of the staged CPU/device state in the spool directory.
pub const STAGED_FILE: &str = "staged.kemari";
/// File name of the last applied checkpoint's disk write log in the spool directory (while a
/// checkpoint is applied: `disklog.kemari.tmp`).
pub const DISK_LOG_FILE: &str = "disklog.kemari";

/// Errors of the receiver.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// Socket or spool I/O.
    #[error("{what}: {source}")]
    Io {
        /// What was done.
        what: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The initial image is invalid or incomplete.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The replica could not be built.
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    /// A call to Xen about the replica failed.
    #[error("replica domain {domid}: {step}: {source}")]
    Xen {
        /// The replica.
        domid: DomId,
        /// Which step.
        step: &'static str,
        /// The failed call.
        #[source]
        source: HypervisorError,
    },
    /// A checkpoint frame was refused (truncated, corrupt, reordered, oversized).
    #[error("checkpoint {seq} discarded, replica stays at {}: {source}", seq - 1)]
    Checkpoint {
        /// The expected sequence number.
        seq: u64,
        /// Why.
        #[source]
        source: CheckpointError,
    },
    /// The ACK could not be sent (the replica holds `seq`; the primary will not know it).
    #[error("sending the ACK of {seq}: {source}")]
    Reply {
        /// The sequence number ACKed.
        seq: u64,
        /// Why.
        #[source]
        source: CheckpointError,
    },
    /// A checkpoint decoded but carries an invalid HVM context.
    #[error("checkpoint {seq} discarded, replica stays at {}: HVM context: {source}", seq - 1)]
    Context {
        /// The checkpoint.
        seq: u64,
        /// Why.
        #[source]
        source: hvm_save::HvmSaveError,
    },
    /// Applying the pages failed (rolled back unless the error says the replica is lost).
    #[error("checkpoint {seq}: {source}")]
    Apply {
        /// The checkpoint.
        seq: u64,
        /// Why.
        #[source]
        source: ApplyError,
    },
    /// The checkpoint's disk write log is malformed or does not follow the previous one.
    #[error("checkpoint {seq} discarded, replica stays at {}: {source}", seq - 1)]
    DiskLog {
        /// The checkpoint.
        seq: u64,
        /// Why.
        #[source]
        source: DiskLogError,
    },
    /// The checkpoint carries an extra record this receiver does not know.
    #[error("checkpoint {seq} discarded, replica stays at {}: extra record of unknown kind {kind}", seq - 1)]
    UnknownExtra {
        /// The checkpoint.
        seq: u64,
        /// Its kind.
        kind: u32,
    },
    /// Applying the disk write log failed (rolled back unless the error says the disk is lost).
    #[error("checkpoint {seq}: {source}")]
    Disk {
        /// The checkpoint.
        seq: u64,
        /// Why.
        #[source]
        source: DiskApplyError,
    },
    /// The staged state file is malformed.
    #[error("staged state {path}: {detail}")]
    Staged {
        /// The file.
        path: PathBuf,
        /// Why.
        detail: String,
    },
}

/// Options of the receiver.
#[derive(Debug, Clone)]
pub struct ReceiverOptions {
    /// Where the initial image and the staged state are kept.
    pub spool_dir: PathBuf,
    /// Name of the replica domain (`None`: the name in the image's configuration).
    pub name: Option<String>,
    /// Limits of the stream codec (e.g. the largest checkpoint accepted).
    pub limits: Limits,
    /// Give up when the primary sends nothing for this long (`None`: wait forever).
    pub idle_timeout: Option<Duration>,
}

/// The CPU and device state of the last applied checkpoint, applied to the replica only at
/// failover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Staged {
    /// Its checkpoint.
    pub seq: u64,
    /// HVM context.
    pub hvm_context: Vec<u8>,
    /// HVM parameters.
    pub hvm_params: Vec<(u32, u64)>,
    /// Device-model state.
    pub emulator_state: Option<Vec<u8>>,
}

/// What a connection achieved (also on failure).
#[derive(Debug, Clone, Default)]
pub struct Session {
    /// The replica, once built.
    pub replica: Option<DomId>,
    /// Last ACKed sequence number (0: the initial image).
    pub acked: Option<u64>,
    /// Staged state of `acked`.
    pub staged: Option<Staged>,
    /// Checkpoints applied after the image.
    pub checkpoints: u64,
    /// Pages written by checkpoints.
    pub pages: u64,
    /// Pages in the initial image.
    pub image_pages: u64,
    /// Bytes of the initial image.
    pub image_bytes: u64,
    /// Checkpoint pages left out because the replica has no page at their pfn (see
    /// [`Receiver`]'s apply: frames the guest mapped into its physmap after the initial image).
    pub skipped_pages: u64,
    /// Disk write log entries applied to the secondary's disks.
    pub disk_entries: u64,
    /// Bytes they covered.
    pub disk_bytes: u64,
}

/// A connection that ended with an error: what it achieved, and why it ended.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct ReceiveFailure {
    /// State reached before the failure (the replica is at `session.acked`).
    pub session: Box<Session>,
    /// The failure.
    #[source]
    pub error: ReceiveError,
}

/// A `Read` that copies everything it reads into a `Write` (the spool file).
struct Tee<'a, R: Read, W: Write> {
    r: &'a mut R,
    w: &'a mut W,
    bytes: u64,
}

impl<R: Read, W: Write> Read for Tee<'_, R, W> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.r.read(buf)?;
        self.w.write_all(buf.get(..n).unwrap_or(&[]))?;
        self.bytes += n as u64;
        Ok(n)
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ReceiveError {
    let what = what.into();
    move |source| ReceiveError::Io { what, source }
}

/// Writes `staged` to `path` atomically enough for the caller: into `path.tmp`, synced; the
/// caller renames it. Format: `u64 seq` (LE) + a checkpoint frame without pages.
fn write_staged_tmp(
    path: &Path,
    staged: &Staged,
    limits: &Limits,
) -> Result<PathBuf, ReceiveError> {
    let tmp = path.with_extension("tmp");
    let cp = Checkpoint {
        seq: staged.seq,
        reason: EpochReason::Request,
        pages: Vec::new(),
        hvm_context: staged.hvm_context.clone(),
        hvm_params: staged.hvm_params.clone(),
        emulator_state: staged.emulator_state.clone(),
        extra: Vec::new(),
    };
    let what = format!("writing staged state {}", tmp.display());
    let mut f = File::create(&tmp).map_err(io_err(what.clone()))?;
    f.write_all(&staged.seq.to_le_bytes())
        .map_err(io_err(what.clone()))?;
    checkpoint::write_checkpoint(&mut f, &cp, limits).map_err(|e| ReceiveError::Staged {
        path: tmp.clone(),
        detail: e.to_string(),
    })?;
    f.sync_all().map_err(io_err(what))?;
    Ok(tmp)
}

/// Reads a staged state file written by the receiver (checksum-checked).
pub fn read_staged(path: &Path) -> Result<Staged, ReceiveError> {
    let f = File::open(path).map_err(io_err(format!("opening {}", path.display())))?;
    let mut r = BufReader::new(f);
    let mut seq = [0u8; 8];
    r.read_exact(&mut seq)
        .map_err(io_err(format!("reading {}", path.display())))?;
    let seq = u64::from_le_bytes(seq);
    let cp = CheckpointReader::new(Limits::default())
        .read(&mut r, seq)
        .map_err(|e| ReceiveError::Staged {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    Ok(Staged {
        seq,
        hvm_context: cp.hvm_context,
        hvm_params: cp.hvm_params,
        emulator_state: cp.emulator_state,
    })
}

/// The decoded entries of one checkpoint's disk write log.
pub type DiskLog = Vec<DiskLogEntry<Vec<u8>>>;

/// Reads a disk write log file the receiver wrote (`DIR/disklog.kemari`, or
/// `disklog.kemari.tmp` left by a receiver that died while applying that checkpoint): its
/// checkpoint's sequence number and entries, checksum-checked and decoded whole.
pub fn read_disk_log(path: &Path) -> Result<(u64, DiskLog), ReceiveError> {
    let f = File::open(path).map_err(io_err(format!("opening {}", path.display())))?;
    let mut r = BufReader::new(f);
    let mut seq = [0u8; 8];
    r.read_exact(&mut seq)
        .map_err(io_err(format!("reading {}", path.display())))?;
    let seq = u64::from_le_bytes(seq);
    let bad = |detail: String| ReceiveError::Staged {
        path: path.to_path_buf(),
        detail,
    };
    let cp = CheckpointReader::new(Limits::default())
        .read(&mut r, seq)
        .map_err(|e| bad(e.to_string()))?;
    // the entries' numbering goes on over the connection: start at the first entry's own
    let first = cp
        .extra
        .iter()
        .find(|(k, _)| *k == disklog::EXTRA_DISK_LOG)
        .and_then(|(_, b)| b.get(8..16))
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map_or(1, u64::from_le_bytes);
    let entries = disklog::decode(&cp.extra, first).map_err(|e| bad(e.to_string()))?;
    Ok((seq, entries))
}

/// The secondary's end of protection connections.
pub struct Receiver<'a> {
    hv: &'a dyn Hypervisor,
    builder: &'a dyn ReplicaBuilder,
    opts: ReceiverOptions,
    disks: Vec<ReplicaDisk>,
    observer: Option<std::sync::Mutex<SessionObserver<'a>>>,
}

/// Called with the session's figures when the replica is built and after every ACK.
pub type SessionObserver<'a> = Box<dyn FnMut(&Session) + Send + 'a>;

impl std::fmt::Debug for Receiver<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("opts", &self.opts)
            .finish()
    }
}

impl<'a> Receiver<'a> {
    /// A receiver building replicas with `builder` and applying checkpoints through `hv`.
    pub fn new(
        hv: &'a dyn Hypervisor,
        builder: &'a dyn ReplicaBuilder,
        opts: ReceiverOptions,
    ) -> Receiver<'a> {
        Receiver {
            hv,
            builder,
            opts,
            disks: Vec::new(),
            observer: None,
        }
    }

    /// Calls `observer` with the session's figures when the replica is built and after every
    /// ACK (the daemon's status).
    pub fn with_observer(mut self, observer: SessionObserver<'a>) -> Receiver<'a> {
        self.observer = Some(std::sync::Mutex::new(observer));
        self
    }

    fn observe(&self, session: &Session) {
        if let Some(o) = &self.observer {
            let mut f = o.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            f(session);
        }
    }

    /// The secondary's copies of the guest's disks, to which every checkpoint's disk write
    /// log is applied. Each must start equal to the primary's disk when protection starts
    /// (e.g. copied while the guest is paused). Without disks a checkpoint that carries a disk
    /// log is refused.
    pub fn with_disks(mut self, disks: Vec<ReplicaDisk>) -> Receiver<'a> {
        self.disks = disks;
        self
    }

    /// Path of the last applied disk write log.
    pub fn disk_log_path(&self) -> PathBuf {
        self.opts.spool_dir.join(DISK_LOG_FILE)
    }

    /// Path of the staged state file.
    pub fn staged_path(&self) -> PathBuf {
        self.opts.spool_dir.join(STAGED_FILE)
    }

    /// Serves one connection until the primary closes it (`Ok`) or something fails (`Err`,
    /// with what was achieved). The replica is left paused either way.
    pub fn serve(&self, stream: TcpStream) -> Result<Session, ReceiveFailure> {
        let mut session = Session::default();
        match self.serve_inner(stream, &mut session) {
            Ok(()) => Ok(session),
            Err(error) => Err(ReceiveFailure {
                session: Box::new(session),
                error,
            }),
        }
    }

    fn serve_inner(&self, stream: TcpStream, session: &mut Session) -> Result<(), ReceiveError> {
        stream
            .set_nodelay(true)
            .map_err(io_err("setting TCP_NODELAY"))?;
        stream
            .set_read_timeout(self.opts.idle_timeout)
            .map_err(io_err("setting the idle timeout"))?;
        let mut replies = stream
            .try_clone()
            .map_err(io_err("cloning the connection"))?;
        let mut input = BufReader::with_capacity(1 << 20, stream);

        // The initial image, validated while it is spooled.
        std::fs::create_dir_all(&self.opts.spool_dir).map_err(io_err(format!(
            "creating spool directory {}",
            self.opts.spool_dir.display()
        )))?;
        let image_path = self.opts.spool_dir.join(IMAGE_FILE);
        let spool = File::create(&image_path)
            .map_err(io_err(format!("creating {}", image_path.display())))?;
        let mut spool = std::io::BufWriter::new(spool);
        let mut tee = Tee {
            r: &mut input,
            w: &mut spool,
            bytes: 0,
        };
        let summary = image::read_image(&mut tee, &self.opts.limits, &mut |_, _| Ok(()))?;
        session.image_bytes = tee.bytes;
        session.image_pages = summary.pages;
        spool
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|f| f.sync_all())
            .map_err(io_err(format!("writing {}", image_path.display())))?;
        log::info!(
            "initial image: {} pages, {} bytes, spooled to {}",
            summary.pages,
            session.image_bytes,
            image_path.display()
        );

        let name = match &self.opts.name {
            Some(n) => n.clone(),
            None => serde_json::from_slice::<serde_json::Value>(&summary.config)
                .ok()
                .and_then(|c| crate::domconfig::config_name(&c).map(str::to_string))
                .ok_or_else(|| {
                    ImageError::Invalid("the image's configuration has no c_info.name".into())
                })?,
        };
        let domid = self.builder.create_paused(&image_path, &name)?;
        session.replica = Some(domid);
        self.observe(session);
        let xen = |step, source| ReceiveError::Xen {
            domid,
            step,
            source,
        };
        let info = self
            .hv
            .domain_info(domid)
            .map_err(|e| xen("domain info", e))?;
        if !info.paused {
            return Err(ReplicaError::NotPaused { domid }.into());
        }
        let max_pfn = self
            .hv
            .maximum_gpfn(domid)
            .map_err(|e| xen("maximum gpfn", e))?;
        let staged_path = self.staged_path();
        let staged = Staged {
            seq: 0,
            hvm_context: summary.hvm_context,
            hvm_params: summary.hvm_params,
            emulator_state: summary.emulator.map(|e| e.context),
        };
        let tmp = write_staged_tmp(&staged_path, &staged, &self.opts.limits)?;
        std::fs::rename(&tmp, &staged_path)
            .map_err(io_err(format!("renaming {} into place", tmp.display())))?;
        session.staged = Some(staged);
        Reply::Ack(Ack { seq: 0 })
            .write(&mut replies)
            .map_err(|source| ReceiveError::Reply { seq: 0, source })?;
        session.acked = Some(0);
        self.observe(session);

        let reader = CheckpointReader::new(self.opts.limits);
        let mut seq = 1u64;
        let mut next_log_seq = 1u64;
        loop {
            let cp = match reader.read(&mut input, seq) {
                Ok(cp) => cp,
                Err(CheckpointError::Closed) => {
                    log::info!("primary closed the stream after checkpoint {}", seq - 1);
                    return Ok(());
                }
                Err(source) => {
                    self.nack(&mut replies, seq, NackReason::for_error(&source));
                    return Err(ReceiveError::Checkpoint { seq, source });
                }
            };
            if let Err(source) = hvm_save::parse(&cp.hvm_context) {
                self.nack(&mut replies, seq, NackReason::Corrupt);
                return Err(ReceiveError::Context { seq, source });
            }
            let entries = match self.disk_log(&cp, next_log_seq) {
                Ok(entries) => entries,
                Err(e) => {
                    self.nack(&mut replies, seq, NackReason::Corrupt);
                    return Err(e);
                }
            };
            let count = entries.len() as u64;
            if let Err(e) = self.apply(domid, max_pfn, &staged_path, cp, entries, session) {
                self.nack(&mut replies, seq, NackReason::ApplyFailed);
                return Err(e);
            }
            next_log_seq += count;
            Reply::Ack(Ack { seq })
                .write(&mut replies)
                .map_err(|source| ReceiveError::Reply { seq, source })?;
            session.acked = Some(seq);
            self.observe(session);
            seq += 1;
        }
    }

    fn nack(&self, replies: &mut TcpStream, seq: u64, reason: NackReason) {
        if let Err(e) = (Reply::Nack(Nack { seq, reason })).write(replies) {
            log::debug!("cannot NACK checkpoint {seq}: {e}");
        }
    }

    /// Phase 1 of the page apply. A pfn the primary has and the replica does not (a hole when
    /// the initial image was taken: with Xen 4.17 these are frames the guest later maps into its
    /// physmap itself - grant-table frames when a frontend connects, shared info - whose
    /// contents are hypervisor state, not RAM; the replica cannot be given a page there without
    /// populating its physmap, which Xen's own restorer does and ours does not yet) fails the
    /// read of its undo copy: such pages are left out of the checkpoint (logged, counted in
    /// [`Session::skipped_pages`]), as the sender leaves out pfns it cannot read. Any other
    /// failure refuses the checkpoint.
    fn prepare_pages(
        &self,
        domid: DomId,
        max_pfn: u64,
        cp: &mut Checkpoint,
    ) -> Result<(PageApply, u64), ReceiveError> {
        let seq = cp.seq;
        let mut skipped = 0u64;
        loop {
            let pfns: Vec<u64> = cp.pages.iter().map(|(p, _)| *p).collect();
            match PageApply::prepare(self.hv, domid, max_pfn, &pfns) {
                Ok(a) => return Ok((a, skipped)),
                Err(ApplyError::Prepare {
                    source: HypervisorError::Pages { failures, .. },
                    ..
                }) if !failures.is_empty()
                    && failures.iter().all(|(_, e)| {
                        matches!(*e, hypervisor::Errno::EINVAL | hypervisor::Errno::ENOENT)
                    }) =>
                {
                    let missing: std::collections::HashSet<u64> =
                        failures.iter().map(|(p, _)| *p).collect();
                    let before = cp.pages.len();
                    cp.pages.retain(|(p, _)| !missing.contains(p));
                    let dropped = (before - cp.pages.len()) as u64;
                    if dropped == 0 {
                        // the failures name pfns the checkpoint does not have: give up
                        return Err(ReceiveError::Apply {
                            seq,
                            source: ApplyError::Prepare {
                                domid,
                                pages: pfns.len(),
                                source: HypervisorError::Pages {
                                    op: hypervisor::Method::ReadPages,
                                    domid,
                                    failures,
                                },
                            },
                        });
                    }
                    let mut list: Vec<u64> = missing.into_iter().collect();
                    list.sort_unstable();
                    log::warn!(
                        "checkpoint {seq}: {dropped} pages at pfns the replica does not have left out: {}",
                        list.iter()
                            .take(8)
                            .map(|p| format!("{p:#x}"))
                            .collect::<Vec<_>>()
                            .join(" ")
                    );
                    skipped += dropped;
                }
                Err(source) => return Err(ReceiveError::Apply { seq, source }),
            }
        }
    }

    /// Decodes and checks the checkpoint's disk write log (whose first entry must be
    /// `next_log_seq`); refuses extras of unknown kinds.
    fn disk_log(
        &self,
        cp: &Checkpoint,
        next_log_seq: u64,
    ) -> Result<Vec<DiskLogEntry<Vec<u8>>>, ReceiveError> {
        let seq = cp.seq;
        if let Some((kind, _)) = cp.extra.iter().find(|(k, _)| *k != disklog::EXTRA_DISK_LOG) {
            return Err(ReceiveError::UnknownExtra { seq, kind: *kind });
        }
        disklog::decode(&cp.extra, next_log_seq)
            .map_err(|source| ReceiveError::DiskLog { seq, source })
    }

    /// Writes the checkpoint's disk log records to `DIR/disklog.kemari.tmp` (synced): an
    /// 8-byte sequence number and a checkpoint frame without pages whose extras are the log.
    fn write_disk_log_tmp(
        &self,
        seq: u64,
        extra: Vec<(u32, Vec<u8>)>,
    ) -> Result<PathBuf, ReceiveError> {
        let tmp = self.disk_log_path().with_extension("kemari.tmp");
        let cp = Checkpoint {
            seq,
            reason: EpochReason::Request,
            pages: Vec::new(),
            hvm_context: Vec::new(),
            hvm_params: Vec::new(),
            emulator_state: None,
            extra,
        };
        let what = format!("writing the disk write log {}", tmp.display());
        let mut f = std::io::BufWriter::new(File::create(&tmp).map_err(io_err(what.clone()))?);
        f.write_all(&seq.to_le_bytes())
            .map_err(io_err(what.clone()))?;
        checkpoint::write_checkpoint(&mut f, &cp, &self.opts.limits).map_err(|e| {
            ReceiveError::Staged {
                path: tmp.clone(),
                detail: e.to_string(),
            }
        })?;
        f.into_inner()
            .map_err(|e| e.into_error())
            .and_then(|f| f.sync_all())
            .map_err(io_err(what))?;
        Ok(tmp)
    }

    /// Applies one checkpoint (pages, staged state, disk write log) whole or not at all.
    fn apply(
        &self,
        domid: DomId,
        max_pfn: u64,
        staged_path: &Path,
        mut cp: Checkpoint,
        entries: Vec<DiskLogEntry<Vec<u8>>>,
        session: &mut Session,
    ) -> Result<(), ReceiveError> {
        let seq = cp.seq;
        let (apply, skipped) = self.prepare_pages(domid, max_pfn, &mut cp)?;
        let pfns: Vec<u64> = cp.pages.iter().map(|(p, _)| *p).collect();
        let with_disks = !self.disks.is_empty() || !entries.is_empty();
        let disk_apply = if with_disks {
            Some(
                DiskApply::prepare(&self.disks, &entries)
                    .map_err(|source| ReceiveError::Disk { seq, source })?,
            )
        } else {
            None
        };
        let log_tmp = if with_disks {
            Some(self.write_disk_log_tmp(seq, std::mem::take(&mut cp.extra))?)
        } else {
            None
        };
        let remove_log = |log_tmp: &Option<PathBuf>| {
            if let Some(t) = log_tmp {
                remove_quietly(t);
            }
        };
        let staged = Staged {
            seq,
            hvm_context: cp.hvm_context,
            hvm_params: cp.hvm_params,
            emulator_state: cp.emulator_state,
        };
        let tmp = match write_staged_tmp(staged_path, &staged, &self.opts.limits) {
            Ok(t) => t,
            Err(e) => {
                remove_log(&log_tmp);
                return Err(e);
            }
        };
        // the disks first: a page failure below undoes them
        if let Some(d) = &disk_apply {
            if let Err(source) = d.write(&entries) {
                remove_quietly(&tmp);
                remove_log(&log_tmp);
                return Err(ReceiveError::Disk { seq, source });
            }
        }
        let undo_disks = |cause: String| -> Result<(), ReceiveError> {
            match disk_apply.as_ref().map(DiskApply::undo) {
                Some(Err(source)) => {
                    log::error!(
                        "checkpoint {seq}: {cause}; undoing its disk writes failed: {source}"
                    );
                    Err(ReceiveError::Disk { seq, source })
                }
                _ => Ok(()),
            }
        };
        let refs: Vec<&[u8; PAGE_SIZE]> = cp.pages.iter().map(|(_, d)| &**d).collect();
        if let Err(source) = apply.write(self.hv, &refs) {
            remove_quietly(&tmp);
            remove_log(&log_tmp);
            undo_disks(source.to_string())?;
            return Err(ReceiveError::Apply { seq, source });
        }
        if let Err(e) = std::fs::rename(&tmp, staged_path) {
            remove_quietly(&tmp);
            remove_log(&log_tmp);
            undo_disks(format!("renaming {} into place: {e}", tmp.display()))?;
            if let Err(source) = apply.undo(self.hv) {
                return Err(ReceiveError::Apply {
                    seq,
                    source: ApplyError::RollbackFailed {
                        domid,
                        write: HypervisorError::Call {
                            op: hypervisor::Method::WritePages,
                            errno: hypervisor::Errno::from_io(&e),
                        },
                        source,
                    },
                });
            }
            return Err(ReceiveError::Io {
                what: format!(
                    "renaming {} into place (checkpoint rolled back)",
                    tmp.display()
                ),
                source: e,
            });
        }
        if let Some(t) = &log_tmp {
            if let Err(e) = std::fs::rename(t, self.disk_log_path()) {
                // the checkpoint is applied; only the copy of its log for inspection is missing
                log::warn!(
                    "checkpoint {seq}: keeping its disk log as {}: {e}",
                    DISK_LOG_FILE
                );
            }
        }
        session.checkpoints += 1;
        session.pages += pfns.len() as u64;
        session.skipped_pages += skipped;
        session.disk_entries += entries.len() as u64;
        session.disk_bytes += entries.iter().map(DiskLogEntry::len_bytes).sum::<u64>();
        session.staged = Some(staged);
        Ok(())
    }
}

fn remove_quietly(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        log::debug!("removing {}: {e}", path.display());
    }
}
