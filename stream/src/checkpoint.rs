//! Kemari's checkpoint frames and the replies to them.
//!
//! On a Kemari connection the initial image (see [`crate::image`]) is followed by one frame per
//! checkpoint. A frame is a run of libxc-framed records (`{u32 type, u32 length}`, body, zero
//! padding to 8): Xen's own `PAGE_DATA`, `HVM_CONTEXT` and `HVM_PARAMS`, plus Kemari's records,
//! which are all OPTIONAL (bit 31 set) in the range [`KEMARI_REC_BASE`]`..+0xFF` (`0x80004Bxx`,
//! `0x4B` = 'K'), so Xen's own readers would skip them:
//!
//! ```text
//! KEMARI_CHECKPOINT_BEGIN   u32 version=1, u32 reason, u64 seq, u32 page_count,
//!                           u32 extra_count, u32 flags (bit 0: emulator state follows),
//!                           u32 device_len, device_len bytes (UTF-8, reason Io only)
//! PAGE_DATA *               normal (NOTAB) pages only, <= 1024 per record, no pfn twice
//! HVM_CONTEXT               exactly one
//! HVM_PARAMS                exactly one
//! KEMARI_EMULATOR_STATE ?   the device model's state, if flags bit 0
//! KEMARI_EXTRA *            u32 kind, u32 reserved=0, data (extra_count of them); kind 1 is
//!                           the disk write log (crate::disklog::EXTRA_DISK_LOG)
//! KEMARI_CHECKPOINT_END     u64 seq, u64 frame_len, u32 crc32, u32 reserved=0
//! ```
//!
//! `frame_len` counts every byte from the first byte of `BEGIN` up to the first byte of `END`'s
//! header, and `crc32` (IEEE, `crc32fast`) is computed over exactly those bytes. The reader
//! buffers a whole frame, checks order, counts, sequence and checksum, and returns the
//! checkpoint only if all of it is valid: truncated, corrupt, reordered or oversized frames are
//! typed errors and nothing is returned.
//!
//! The reverse direction carries [`Reply`] messages: one 24-byte record `KEMARI_ACK` or
//! `KEMARI_NACK` with `u64 seq, u32 reason, u32 crc32` (crc over type and the first 12 body bytes).

use std::collections::HashSet;
use std::io::{Read, Write};

use serde::Serialize;
use thiserror::Error;

use crate::frame::{self, FrameError, RECORD_HEADER_LEN};
use crate::libxc::{self, LibxcError, PageData, PageType, Record};
use crate::{Limits, MAX_PAGES_PER_RECORD, PAGE_SIZE};

pub use crate::records::{
    kemari_record_name, KEMARI_REC_BASE, REC_KEMARI_ACK, REC_KEMARI_CHECKPOINT_BEGIN,
    REC_KEMARI_CHECKPOINT_END, REC_KEMARI_EMULATOR_STATE, REC_KEMARI_EXTRA, REC_KEMARI_NACK,
};

/// Frame format version in `BEGIN`.
pub const CHECKPOINT_VERSION: u32 = 1;
/// Longest device name in an [`EpochReason::Io`].
pub const MAX_DEVICE_LEN: usize = 256;
const BEGIN_FIXED_LEN: usize = 32;
const END_LEN: usize = 24;
const FLAG_EMULATOR: u32 = 1;
/// Size of an encoded [`Reply`].
pub const REPLY_LEN: usize = RECORD_HEADER_LEN + 16;

/// Errors of the checkpoint codec.
#[derive(Debug, Error)]
pub enum CheckpointError {
    /// The peer closed the stream cleanly between two frames.
    #[error("checkpoint stream closed by the peer before a new frame began")]
    Closed,
    /// Framing or I/O failure (including truncation).
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// A Xen record inside the frame is malformed.
    #[error(transparent)]
    Libxc(#[from] LibxcError),
    /// A record in the wrong place.
    #[error("checkpoint frame: record {name} ({rtype:#010x}) not allowed {place}")]
    UnexpectedRecord {
        /// Type.
        rtype: u32,
        /// Its name.
        name: &'static str,
        /// Where in the frame it appeared.
        place: &'static str,
    },
    /// Unsupported frame version.
    #[error("checkpoint frame: version {found}, expected {CHECKPOINT_VERSION}")]
    BadVersion {
        /// Version read.
        found: u32,
    },
    /// The frame is not the next checkpoint.
    #[error("checkpoint frame: sequence {got}, expected {expected}")]
    OutOfOrder {
        /// Sequence the caller expected.
        expected: u64,
        /// Sequence in the frame.
        got: u64,
    },
    /// The frame exceeds the configured maximum checkpoint size.
    #[error("checkpoint frame: {bytes} bytes (or more), above the limit of {cap}")]
    Oversized {
        /// Bytes the frame needs so far.
        bytes: u64,
        /// Limit.
        cap: u64,
    },
    /// A field of `BEGIN`, `END` or `EXTRA` is invalid.
    #[error("checkpoint frame: {0}")]
    BadField(String),
    /// Declared and actual counts differ.
    #[error("checkpoint frame: {what}: declared {declared}, found {found}")]
    CountMismatch {
        /// What was counted.
        what: &'static str,
        /// Declared in `BEGIN`.
        declared: u64,
        /// Found in the frame.
        found: u64,
    },
    /// The same pfn appears twice.
    #[error("checkpoint frame: pfn {pfn:#x} appears twice")]
    DuplicatePfn {
        /// The pfn.
        pfn: u64,
    },
    /// A page entry that is not a normal page with data.
    #[error("checkpoint frame: pfn {pfn:#x} has page type {ptype}, only NOTAB pages are allowed")]
    BadPageType {
        /// The pfn.
        pfn: u64,
        /// Its type name.
        ptype: &'static str,
    },
    /// Checksum mismatch.
    #[error("checkpoint frame {seq}: crc32 {computed:#010x} over {len} bytes, trailer says {stored:#010x}")]
    BadChecksum {
        /// Sequence from the trailer.
        seq: u64,
        /// Computed value.
        computed: u32,
        /// Value in the trailer.
        stored: u32,
        /// Bytes covered.
        len: u64,
    },
    /// A checkpoint that cannot be encoded.
    #[error("checkpoint encode: {0}")]
    Invalid(String),
    /// A malformed ACK/NACK.
    #[error("checkpoint reply: {0}")]
    BadReply(String),
}

/// Why a checkpoint was taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum EpochReason {
    /// The first checkpoint after the initial image.
    Initial,
    /// The guest did I/O that must not leave the host before the secondary has the state.
    Io {
        /// Which device (e.g. `vif1.0`, `xvda`), at most [`MAX_DEVICE_LEN`] bytes.
        device: String,
    },
    /// The maximum epoch interval passed.
    Interval,
    /// Explicit request (CLI).
    Request,
}

impl EpochReason {
    fn code(&self) -> u32 {
        match self {
            EpochReason::Initial => 0,
            EpochReason::Io { .. } => 1,
            EpochReason::Interval => 2,
            EpochReason::Request => 3,
        }
    }
}

/// One guest page.
pub type Page = Box<[u8; PAGE_SIZE]>;

/// A complete checkpoint.
#[derive(Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// Sequence number (consecutive on a connection).
    pub seq: u64,
    /// Why it was taken.
    pub reason: EpochReason,
    /// Dirty pages: `(pfn, contents)`, no pfn twice.
    pub pages: Vec<(u64, Page)>,
    /// HVM context blob (`xc_domain_hvm_getcontext`).
    pub hvm_context: Vec<u8>,
    /// HVM params `(index, value)`.
    pub hvm_params: Vec<(u32, u64)>,
    /// Device-model state (HVM guests with QEMU).
    pub emulator_state: Option<Vec<u8>>,
    /// Extra data `(kind, bytes)` for later features (disk write log, ring state).
    pub extra: Vec<(u32, Vec<u8>)>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("seq", &self.seq)
            .field("reason", &self.reason)
            .field(
                "pages",
                &self.pages.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
            )
            .field("hvm_context_len", &self.hvm_context.len())
            .field("hvm_params", &self.hvm_params)
            .field(
                "emulator_state_len",
                &self.emulator_state.as_ref().map(Vec::len),
            )
            .field(
                "extra",
                &self
                    .extra
                    .iter()
                    .map(|(k, d)| (*k, d.len()))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// A zeroed page on the heap.
pub fn zero_page() -> Page {
    Box::new([0u8; PAGE_SIZE])
}

fn begin_body(cp: &Checkpoint) -> Vec<u8> {
    let device: &[u8] = match &cp.reason {
        EpochReason::Io { device } => device.as_bytes(),
        _ => &[],
    };
    let mut b = Vec::with_capacity(BEGIN_FIXED_LEN + device.len());
    b.extend_from_slice(&CHECKPOINT_VERSION.to_le_bytes());
    b.extend_from_slice(&cp.reason.code().to_le_bytes());
    b.extend_from_slice(&cp.seq.to_le_bytes());
    // Counts are validated to fit in u32 before this is called.
    b.extend_from_slice(&(cp.pages.len() as u32).to_le_bytes());
    b.extend_from_slice(&(cp.extra.len() as u32).to_le_bytes());
    let flags = if cp.emulator_state.is_some() {
        FLAG_EMULATOR
    } else {
        0
    };
    b.extend_from_slice(&flags.to_le_bytes());
    b.extend_from_slice(&(device.len() as u32).to_le_bytes());
    b.extend_from_slice(device);
    b
}

/// Checks that `cp` can be encoded within `limits` and returns the frame's size in bytes.
pub fn encoded_len(cp: &Checkpoint, limits: &Limits) -> Result<u64, CheckpointError> {
    if let EpochReason::Io { device } = &cp.reason {
        if device.len() > MAX_DEVICE_LEN {
            return Err(CheckpointError::Invalid(format!(
                "device name of {} bytes, limit {MAX_DEVICE_LEN}",
                device.len()
            )));
        }
    }
    if u32::try_from(cp.pages.len()).is_err() || u32::try_from(cp.extra.len()).is_err() {
        return Err(CheckpointError::Invalid(format!(
            "{} pages / {} extras do not fit in u32",
            cp.pages.len(),
            cp.extra.len()
        )));
    }
    let mut seen = HashSet::with_capacity(cp.pages.len());
    for (pfn, _) in &cp.pages {
        if pfn & !libxc::PFN_MASK != 0 {
            return Err(CheckpointError::Invalid(format!(
                "pfn {pfn:#x} does not fit in 52 bits"
            )));
        }
        if !seen.insert(*pfn) {
            return Err(CheckpointError::DuplicatePfn { pfn: *pfn });
        }
    }
    let cap = limits.record_cap() as usize;
    let check = |what: &str, len: usize| {
        if len > cap {
            Err(CheckpointError::Invalid(format!(
                "{what} of {len} bytes exceeds the record limit of {cap}"
            )))
        } else {
            Ok(frame::record_wire_len(len) as u64)
        }
    };
    let mut total = check("BEGIN", BEGIN_FIXED_LEN + cp.reason_device_len())?;
    for chunk in cp.pages.chunks(MAX_PAGES_PER_RECORD as usize) {
        total += check("PAGE_DATA", 8 + chunk.len() * (8 + PAGE_SIZE))?;
    }
    total += check("HVM_CONTEXT", cp.hvm_context.len())?;
    total += check("HVM_PARAMS", 8 + 16 * cp.hvm_params.len())?;
    if let Some(e) = &cp.emulator_state {
        total += check("emulator state", e.len())?;
    }
    for (_, data) in &cp.extra {
        total += check("EXTRA", 8 + data.len())?;
    }
    total += frame::record_wire_len(END_LEN) as u64;
    if total > limits.max_checkpoint_bytes {
        return Err(CheckpointError::Oversized {
            bytes: total,
            cap: limits.max_checkpoint_bytes,
        });
    }
    Ok(total)
}

impl Checkpoint {
    fn reason_device_len(&self) -> usize {
        match &self.reason {
            EpochReason::Io { device } => device.len(),
            _ => 0,
        }
    }
}

struct CrcWriter<'a, W: Write + ?Sized> {
    inner: &'a mut W,
    crc: crc32fast::Hasher,
    len: u64,
}

impl<W: Write + ?Sized> Write for CrcWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes one checkpoint frame. The checkpoint is validated (sizes, pfns, duplicates, the
/// frame limit) before the first byte is written. Returns the bytes written.
pub fn write_checkpoint<W: Write + ?Sized>(
    w: &mut W,
    cp: &Checkpoint,
    limits: &Limits,
) -> Result<u64, CheckpointError> {
    let total = encoded_len(cp, limits)?;
    let cap = limits.record_cap();
    let mut cw = CrcWriter {
        inner: w,
        crc: crc32fast::Hasher::new(),
        len: 0,
    };
    frame::write_record(
        &mut cw,
        REC_KEMARI_CHECKPOINT_BEGIN,
        &[&begin_body(cp)],
        cap,
        "KEMARI_CHECKPOINT_BEGIN",
    )?;
    for chunk in cp.pages.chunks(MAX_PAGES_PER_RECORD as usize) {
        let refs: Vec<(u64, &[u8; PAGE_SIZE])> = chunk.iter().map(|(p, d)| (*p, &**d)).collect();
        libxc::write_page_data(&mut cw, &refs, limits)?;
    }
    frame::write_record(
        &mut cw,
        libxc::REC_HVM_CONTEXT,
        &[&cp.hvm_context],
        cap,
        "HVM_CONTEXT",
    )?;
    let params: Vec<(u64, u64)> = cp
        .hvm_params
        .iter()
        .map(|(i, v)| (u64::from(*i), *v))
        .collect();
    Record::HvmParams(params).write(&mut cw, limits)?;
    if let Some(e) = &cp.emulator_state {
        frame::write_record(
            &mut cw,
            REC_KEMARI_EMULATOR_STATE,
            &[e],
            cap,
            "KEMARI_EMULATOR_STATE",
        )?;
    }
    for (kind, data) in &cp.extra {
        frame::write_record(
            &mut cw,
            REC_KEMARI_EXTRA,
            &[&kind.to_le_bytes(), &0u32.to_le_bytes(), data],
            cap,
            "KEMARI_EXTRA",
        )?;
    }
    let frame_len = cw.len;
    let crc = cw.crc.clone().finalize();
    let mut end = Vec::with_capacity(END_LEN);
    end.extend_from_slice(&cp.seq.to_le_bytes());
    end.extend_from_slice(&frame_len.to_le_bytes());
    end.extend_from_slice(&crc.to_le_bytes());
    end.extend_from_slice(&0u32.to_le_bytes());
    frame::write_record(
        cw.inner,
        REC_KEMARI_CHECKPOINT_END,
        &[&end],
        cap,
        "KEMARI_CHECKPOINT_END",
    )?;
    let written = frame_len + frame::record_wire_len(END_LEN) as u64;
    debug_assert_eq!(written, total);
    Ok(written)
}

/// Encodes a checkpoint frame into a buffer.
pub fn encode_checkpoint(cp: &Checkpoint, limits: &Limits) -> Result<Vec<u8>, CheckpointError> {
    let len = encoded_len(cp, limits)?;
    let mut out = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    write_checkpoint(&mut out, cp, limits)?;
    Ok(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Pages,
    HvmContext,
    HvmParams,
    Emulator,
    Extra,
}

impl Phase {
    fn place(self) -> &'static str {
        match self {
            Phase::Pages => "among the pages",
            Phase::HvmContext => "after HVM_CONTEXT",
            Phase::HvmParams => "after HVM_PARAMS",
            Phase::Emulator => "after the emulator state",
            Phase::Extra => "among the extras",
        }
    }
}

fn le_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

struct Begin {
    reason: EpochReason,
    seq: u64,
    page_count: u32,
    extra_count: u32,
    emulator: bool,
}

fn decode_begin(body: &[u8]) -> Result<Begin, CheckpointError> {
    if body.len() < BEGIN_FIXED_LEN {
        return Err(CheckpointError::BadField(format!(
            "BEGIN body of {} bytes, needs at least {BEGIN_FIXED_LEN}",
            body.len()
        )));
    }
    let version = le_u32(body, 0);
    if version != CHECKPOINT_VERSION {
        return Err(CheckpointError::BadVersion { found: version });
    }
    let reason_code = le_u32(body, 4);
    let seq = le_u64(body, 8);
    let page_count = le_u32(body, 16);
    let extra_count = le_u32(body, 20);
    let flags = le_u32(body, 24);
    let device_len = le_u32(body, 28) as usize;
    if flags & !FLAG_EMULATOR != 0 {
        return Err(CheckpointError::BadField(format!(
            "BEGIN flags {flags:#x} has unknown bits"
        )));
    }
    if body.len() != BEGIN_FIXED_LEN + device_len {
        return Err(CheckpointError::BadField(format!(
            "BEGIN body of {} bytes does not match device length {device_len}",
            body.len()
        )));
    }
    let device = &body[BEGIN_FIXED_LEN..];
    let reason = match reason_code {
        1 => EpochReason::Io {
            device: std::str::from_utf8(device)
                .map_err(|e| CheckpointError::BadField(format!("device name is not UTF-8: {e}")))?
                .to_owned(),
        },
        0 | 2 | 3 if !device.is_empty() => {
            return Err(CheckpointError::BadField(format!(
                "reason {reason_code} carries a {}-byte device name",
                device.len()
            )))
        }
        0 => EpochReason::Initial,
        2 => EpochReason::Interval,
        3 => EpochReason::Request,
        other => {
            return Err(CheckpointError::BadField(format!(
                "unknown epoch reason {other}"
            )))
        }
    };
    Ok(Begin {
        reason,
        seq,
        page_count,
        extra_count,
        emulator: flags & FLAG_EMULATOR != 0,
    })
}

/// Reads whole checkpoint frames with bounded memory (see the module docs).
#[derive(Debug, Clone)]
pub struct CheckpointReader {
    limits: Limits,
}

struct FrameIn<'a, R: Read + ?Sized> {
    r: &'a mut R,
    crc: crc32fast::Hasher,
    len: u64,
    cap: u64,
}

impl<R: Read + ?Sized> FrameIn<'_, R> {
    fn account(&mut self, rtype: u32, length: u32, record_cap: u32) -> Result<(), CheckpointError> {
        let need = self.len + frame::record_wire_len(length as usize) as u64;
        if need > self.cap {
            return Err(CheckpointError::Oversized {
                bytes: need,
                cap: self.cap,
            });
        }
        if length > record_cap {
            return Err(FrameError::TooLong {
                what: "checkpoint",
                rtype,
                len: u64::from(length),
                cap: record_cap,
            }
            .into());
        }
        Ok(())
    }

    fn body(
        &mut self,
        rtype: u32,
        length: u32,
        record_cap: u32,
    ) -> Result<(u32, Vec<u8>), CheckpointError> {
        let body = frame::read_body(self.r, rtype, length, record_cap, "checkpoint record")?;
        self.crc.update(&frame::header_bytes(rtype, length));
        self.crc.update(&body);
        self.crc
            .update(&[0u8; frame::RECORD_ALIGN][..frame::padding_len(body.len())]);
        self.len += frame::record_wire_len(body.len()) as u64;
        Ok((rtype, body))
    }
}

impl CheckpointReader {
    /// A reader enforcing `limits` (record cap and `max_checkpoint_bytes`).
    pub fn new(limits: Limits) -> Self {
        CheckpointReader { limits }
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Reads one whole frame and returns it only if it is complete and valid and its sequence
    /// number is `expected_seq`. A clean end of stream before the frame's first byte is
    /// [`CheckpointError::Closed`].
    pub fn read<R: Read + ?Sized>(
        &self,
        r: &mut R,
        expected_seq: u64,
    ) -> Result<Checkpoint, CheckpointError> {
        let record_cap = self.limits.record_cap();
        let Some((rtype, length)) = frame::read_header_or_eof(r, "checkpoint BEGIN header")? else {
            return Err(CheckpointError::Closed);
        };
        let mut fin = FrameIn {
            r,
            crc: crc32fast::Hasher::new(),
            len: 0,
            cap: self.limits.max_checkpoint_bytes,
        };
        if rtype != REC_KEMARI_CHECKPOINT_BEGIN {
            return Err(CheckpointError::UnexpectedRecord {
                rtype,
                name: libxc::record_name(rtype),
                place: "at the start of a frame (expected KEMARI_CHECKPOINT_BEGIN)",
            });
        }
        let begin_cap = (BEGIN_FIXED_LEN + MAX_DEVICE_LEN) as u32;
        fin.account(rtype, length, begin_cap.min(record_cap))?;
        let (_, body) = fin.body(rtype, length, begin_cap.min(record_cap))?;
        let begin = decode_begin(&body)?;
        if begin.seq != expected_seq {
            return Err(CheckpointError::OutOfOrder {
                expected: expected_seq,
                got: begin.seq,
            });
        }
        let page_bytes = u64::from(begin.page_count) * PAGE_SIZE as u64;
        if page_bytes > self.limits.max_checkpoint_bytes {
            return Err(CheckpointError::Oversized {
                bytes: page_bytes,
                cap: self.limits.max_checkpoint_bytes,
            });
        }

        let mut phase = Phase::Pages;
        let mut pages: Vec<(u64, Page)> =
            Vec::with_capacity((begin.page_count as usize).min(MAX_PAGES_PER_RECORD as usize));
        let mut seen = HashSet::new();
        let mut hvm_context = Vec::new();
        let mut hvm_params = Vec::new();
        let mut emulator_state = None;
        let mut extra = Vec::new();
        loop {
            let (rtype, length) = frame::read_header(fin.r, "checkpoint record header")?;
            if rtype == REC_KEMARI_CHECKPOINT_END {
                if length as usize != END_LEN {
                    return Err(CheckpointError::BadField(format!(
                        "END record of {length} bytes, expected {END_LEN}"
                    )));
                }
                let frame_len = fin.len;
                let computed = fin.crc.clone().finalize();
                let end = frame::read_body(fin.r, rtype, length, END_LEN as u32, "checkpoint END")?;
                let seq = le_u64(&end, 0);
                let stored_len = le_u64(&end, 8);
                let stored = le_u32(&end, 16);
                let reserved = le_u32(&end, 20);
                if reserved != 0 {
                    return Err(CheckpointError::BadField(format!(
                        "END reserved field is {reserved:#x}, not zero"
                    )));
                }
                if seq != begin.seq {
                    return Err(CheckpointError::BadField(format!(
                        "END sequence {seq} differs from BEGIN sequence {}",
                        begin.seq
                    )));
                }
                if stored_len != frame_len {
                    return Err(CheckpointError::BadField(format!(
                        "END says the frame has {stored_len} bytes, {frame_len} were read"
                    )));
                }
                if stored != computed {
                    return Err(CheckpointError::BadChecksum {
                        seq,
                        computed,
                        stored,
                        len: frame_len,
                    });
                }
                if phase < Phase::HvmParams {
                    return Err(CheckpointError::UnexpectedRecord {
                        rtype,
                        name: "KEMARI_CHECKPOINT_END",
                        place: "before HVM_CONTEXT and HVM_PARAMS",
                    });
                }
                let counts = [
                    ("pages", u64::from(begin.page_count), pages.len() as u64),
                    ("extras", u64::from(begin.extra_count), extra.len() as u64),
                    (
                        "emulator states",
                        u64::from(begin.emulator),
                        u64::from(emulator_state.is_some()),
                    ),
                ];
                for (what, declared, found) in counts {
                    if declared != found {
                        return Err(CheckpointError::CountMismatch {
                            what,
                            declared,
                            found,
                        });
                    }
                }
                return Ok(Checkpoint {
                    seq,
                    reason: begin.reason,
                    pages,
                    hvm_context,
                    hvm_params,
                    emulator_state,
                    extra,
                });
            }
            fin.account(rtype, length, record_cap)?;
            let next = match rtype {
                libxc::REC_PAGE_DATA => Phase::Pages,
                libxc::REC_HVM_CONTEXT => Phase::HvmContext,
                libxc::REC_HVM_PARAMS => Phase::HvmParams,
                REC_KEMARI_EMULATOR_STATE => Phase::Emulator,
                REC_KEMARI_EXTRA => Phase::Extra,
                _ => {
                    return Err(CheckpointError::UnexpectedRecord {
                        rtype,
                        name: libxc::record_name(rtype),
                        place: "in a checkpoint frame",
                    })
                }
            };
            // Allowed transitions: pages repeat; HVM_CONTEXT and HVM_PARAMS exactly once, in
            // that order; emulator at most once, only if declared; extras repeat at the end.
            let ok = match next {
                Phase::Pages => phase == Phase::Pages,
                Phase::HvmContext => phase == Phase::Pages,
                Phase::HvmParams => phase == Phase::HvmContext,
                Phase::Emulator => phase == Phase::HvmParams && begin.emulator,
                Phase::Extra => {
                    phase >= Phase::HvmParams
                        && (phase != Phase::HvmParams || !begin.emulator)
                        && extra.len() < begin.extra_count as usize
                }
            };
            if !ok {
                return Err(CheckpointError::UnexpectedRecord {
                    rtype,
                    name: libxc::record_name(rtype),
                    place: phase.place(),
                });
            }
            if next == Phase::Pages {
                // Bound the page count before the body is read.
                let body_pages = (length as usize).saturating_sub(8) / (8 + PAGE_SIZE);
                if pages.len() + body_pages > begin.page_count as usize {
                    return Err(CheckpointError::CountMismatch {
                        what: "pages (running)",
                        declared: u64::from(begin.page_count),
                        found: (pages.len() + body_pages) as u64,
                    });
                }
            }
            let (_, body) = fin.body(rtype, length, record_cap)?;
            phase = next;
            match next {
                Phase::Pages => {
                    take_pages(&body, &mut pages, &mut seen, begin.page_count)?;
                }
                Phase::HvmContext => hvm_context = body,
                Phase::HvmParams => {
                    for (i, v) in libxc::decode_hvm_params(&body)? {
                        let i = u32::try_from(i).map_err(|_| {
                            CheckpointError::BadField(format!(
                                "HVM param index {i:#x} does not fit in 32 bits"
                            ))
                        })?;
                        hvm_params.push((i, v));
                    }
                }
                Phase::Emulator => emulator_state = Some(body),
                Phase::Extra => {
                    if body.len() < 8 {
                        return Err(CheckpointError::BadField(format!(
                            "EXTRA record of {} bytes, needs at least 8",
                            body.len()
                        )));
                    }
                    let kind = le_u32(&body, 0);
                    let res = le_u32(&body, 4);
                    if res != 0 {
                        return Err(CheckpointError::BadField(format!(
                            "EXTRA reserved field is {res:#x}, not zero"
                        )));
                    }
                    extra.push((kind, body[8..].to_vec()));
                }
            }
        }
    }
}

/// Moves the pages of a `PAGE_DATA` body into `pages` (one copy, straight from the body).
fn take_pages(
    body: &[u8],
    pages: &mut Vec<(u64, Page)>,
    seen: &mut HashSet<u64>,
    declared: u32,
) -> Result<(), CheckpointError> {
    let (entries, data_off) = PageData::decode_entries(body)?;
    let mut data = body[data_off..].chunks_exact(PAGE_SIZE);
    for (pfn, t) in entries {
        if t != PageType::NOTAB {
            return Err(CheckpointError::BadPageType {
                pfn,
                ptype: t.name(),
            });
        }
        if !seen.insert(pfn) {
            return Err(CheckpointError::DuplicatePfn { pfn });
        }
        if pages.len() >= declared as usize {
            return Err(CheckpointError::CountMismatch {
                what: "pages (running)",
                declared: u64::from(declared),
                found: pages.len() as u64 + 1,
            });
        }
        let mut page = zero_page();
        match data.next() {
            Some(d) => page.copy_from_slice(d),
            _ => {
                return Err(CheckpointError::BadField(format!(
                    "pfn {pfn:#x} has no page contents"
                )))
            }
        }
        pages.push((pfn, page));
    }
    Ok(())
}

/// Acknowledgement: the secondary holds checkpoint `seq` completely.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Ack {
    /// Sequence acknowledged.
    pub seq: u64,
}

/// Why a checkpoint was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum NackReason {
    /// Checksum or structure invalid.
    Corrupt,
    /// Unexpected sequence number.
    OutOfOrder,
    /// Above the receiver's limits.
    Oversized,
    /// Decoded but could not be applied to the replica.
    ApplyFailed,
    /// A code this version does not know.
    Other(u32),
}

impl NackReason {
    fn code(self) -> u32 {
        match self {
            NackReason::Corrupt => 1,
            NackReason::OutOfOrder => 2,
            NackReason::Oversized => 3,
            NackReason::ApplyFailed => 4,
            NackReason::Other(c) => c,
        }
    }

    fn from_code(c: u32) -> Self {
        match c {
            1 => NackReason::Corrupt,
            2 => NackReason::OutOfOrder,
            3 => NackReason::Oversized,
            4 => NackReason::ApplyFailed,
            c => NackReason::Other(c),
        }
    }

    /// The reason matching a decode error.
    pub fn for_error(e: &CheckpointError) -> Self {
        match e {
            CheckpointError::OutOfOrder { .. } => NackReason::OutOfOrder,
            CheckpointError::Oversized { .. } => NackReason::Oversized,
            CheckpointError::Frame(FrameError::TooLong { .. }) => NackReason::Oversized,
            _ => NackReason::Corrupt,
        }
    }
}

/// Refusal of checkpoint `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Nack {
    /// Sequence refused.
    pub seq: u64,
    /// Why.
    pub reason: NackReason,
}

/// A message from the secondary to the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Reply {
    /// See [`Ack`].
    Ack(Ack),
    /// See [`Nack`].
    Nack(Nack),
}

fn reply_crc(rtype: u32, body12: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&rtype.to_le_bytes());
    h.update(body12);
    h.finalize()
}

impl Reply {
    /// Encodes the reply ([`REPLY_LEN`] bytes).
    pub fn encode(&self) -> [u8; REPLY_LEN] {
        let (rtype, seq, reason) = match self {
            Reply::Ack(a) => (REC_KEMARI_ACK, a.seq, 0),
            Reply::Nack(n) => (REC_KEMARI_NACK, n.seq, n.reason.code()),
        };
        let mut out = [0u8; REPLY_LEN];
        out[..8].copy_from_slice(&frame::header_bytes(rtype, 16));
        out[8..16].copy_from_slice(&seq.to_le_bytes());
        out[16..20].copy_from_slice(&reason.to_le_bytes());
        let crc = reply_crc(rtype, &out[8..20]);
        out[20..24].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Writes the reply.
    pub fn write<W: Write + ?Sized>(&self, w: &mut W) -> Result<(), CheckpointError> {
        w.write_all(&self.encode())
            .map_err(|source| FrameError::Io {
                what: "checkpoint reply",
                error: source,
            })?;
        Ok(())
    }

    /// Reads one reply. A clean end of stream before it is [`CheckpointError::Closed`].
    pub fn read<R: Read + ?Sized>(r: &mut R) -> Result<Self, CheckpointError> {
        let Some((rtype, length)) = frame::read_header_or_eof(r, "checkpoint reply")? else {
            return Err(CheckpointError::Closed);
        };
        if rtype != REC_KEMARI_ACK && rtype != REC_KEMARI_NACK {
            return Err(CheckpointError::BadReply(format!(
                "record type {rtype:#010x} is neither ACK nor NACK"
            )));
        }
        if length != 16 {
            return Err(CheckpointError::BadReply(format!(
                "length {length}, expected 16"
            )));
        }
        let mut body = [0u8; 16];
        frame::read_exact(r, &mut body, "checkpoint reply body")?;
        let seq = le_u64(&body, 0);
        let reason = le_u32(&body, 8);
        let crc = le_u32(&body, 12);
        let want = reply_crc(rtype, &body[..12]);
        if crc != want {
            return Err(CheckpointError::BadReply(format!(
                "crc32 {crc:#010x}, computed {want:#010x}"
            )));
        }
        if rtype == REC_KEMARI_ACK {
            if reason != 0 {
                return Err(CheckpointError::BadReply(format!(
                    "ACK with reason {reason}"
                )));
            }
            Ok(Reply::Ack(Ack { seq }))
        } else {
            Ok(Reply::Nack(Nack {
                seq,
                reason: NackReason::from_code(reason),
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample(seq: u64, npages: usize) -> Checkpoint {
        Checkpoint {
            seq,
            reason: EpochReason::Io {
                device: "vif1.0".into(),
            },
            pages: (0..npages)
                .map(|i| {
                    let mut p = zero_page();
                    p[0] = i as u8;
                    p[4095] = (i >> 8) as u8;
                    (i as u64 * 3 + 1, p)
                })
                .collect(),
            hvm_context: vec![1, 2, 3, 4, 5, 6, 7],
            hvm_params: vec![(2, 0xfeff_f000), (5, 1)],
            emulator_state: Some(vec![0x51; 100]),
            extra: vec![(1, b"disk log".to_vec()), (2, vec![])],
        }
    }

    fn lim() -> Limits {
        Limits::default()
    }

    #[test]
    fn round_trip_and_size() {
        for n in [0, 1, 1024, 1025, 2100] {
            let cp = sample(7, n);
            let bytes = encode_checkpoint(&cp, &lim()).unwrap();
            assert_eq!(bytes.len() as u64, encoded_len(&cp, &lim()).unwrap());
            let mut r = &bytes[..];
            let back = CheckpointReader::new(lim()).read(&mut r, 7).unwrap();
            assert_eq!(back, cp);
            assert!(r.is_empty());
        }
    }

    #[test]
    fn consecutive_frames_and_clean_close() {
        let mut bytes = Vec::new();
        for seq in 1..=3 {
            write_checkpoint(&mut bytes, &sample(seq, 2), &lim()).unwrap();
        }
        let rd = CheckpointReader::new(lim());
        let mut r = &bytes[..];
        for seq in 1..=3 {
            assert_eq!(rd.read(&mut r, seq).unwrap().seq, seq);
        }
        assert!(matches!(rd.read(&mut r, 4), Err(CheckpointError::Closed)));
    }

    #[test]
    fn out_of_order_rejected() {
        let bytes = encode_checkpoint(&sample(5, 1), &lim()).unwrap();
        assert!(matches!(
            CheckpointReader::new(lim()).read(&mut &bytes[..], 4),
            Err(CheckpointError::OutOfOrder {
                expected: 4,
                got: 5
            })
        ));
    }

    #[test]
    fn truncated_at_every_offset_rejected() {
        let bytes = encode_checkpoint(&sample(1, 3), &lim()).unwrap();
        let rd = CheckpointReader::new(lim());
        for cut in 0..bytes.len() {
            let res = rd.read(&mut &bytes[..cut], 1);
            assert!(res.is_err(), "cut at {cut} accepted");
            if cut == 0 {
                assert!(matches!(res, Err(CheckpointError::Closed)));
            } else {
                assert!(!matches!(res, Err(CheckpointError::Closed)), "cut {cut}");
            }
        }
    }

    #[test]
    fn every_single_byte_corruption_rejected() {
        let cp = sample(9, 2);
        let bytes = encode_checkpoint(&cp, &lim()).unwrap();
        let rd = CheckpointReader::new(lim());
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x5a;
            // Every byte is covered by the crc or checked field by field in the trailer.
            assert!(
                rd.read(&mut &b[..], 9).is_err(),
                "corrupt byte {i} accepted"
            );
        }
    }

    #[test]
    fn oversized_rejected_before_reading() {
        let cp = sample(1, 10);
        let bytes = encode_checkpoint(&cp, &lim()).unwrap();
        let small = Limits {
            max_checkpoint_bytes: 20_000,
            ..lim()
        };
        assert!(matches!(
            CheckpointReader::new(small).read(&mut &bytes[..], 1),
            Err(CheckpointError::Oversized { cap: 20_000, .. })
        ));
        assert!(matches!(
            encode_checkpoint(&cp, &small),
            Err(CheckpointError::Oversized { .. })
        ));
        // A BEGIN claiming 2^32-1 pages is refused from the header alone.
        let mut begin = begin_body(&sample(1, 0));
        begin[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut out = Vec::new();
        frame::write_record(
            &mut out,
            REC_KEMARI_CHECKPOINT_BEGIN,
            &[&begin],
            u32::MAX,
            "t",
        )
        .unwrap();
        assert!(matches!(
            CheckpointReader::new(small).read(&mut &out[..], 1),
            Err(CheckpointError::Oversized { .. })
        ));
        // A huge record claimed after BEGIN is refused before its body is read.
        let mut out = Vec::new();
        frame::write_record(
            &mut out,
            REC_KEMARI_CHECKPOINT_BEGIN,
            &[&begin_body(&sample(1, 1))],
            u32::MAX,
            "t",
        )
        .unwrap();
        out.extend_from_slice(&frame::header_bytes(libxc::REC_PAGE_DATA, u32::MAX - 7));
        assert!(matches!(
            CheckpointReader::new(lim()).read(&mut &out[..], 1),
            Err(CheckpointError::Oversized { .. })
                | Err(CheckpointError::Frame(FrameError::TooLong { .. }))
        ));
    }

    #[test]
    fn reordered_and_foreign_records_rejected() {
        let cp = sample(1, 1);
        // Build a frame with HVM_PARAMS before HVM_CONTEXT by hand, with a valid trailer.
        let mut body = Vec::new();
        let mut cw = CrcWriter {
            inner: &mut body,
            crc: crc32fast::Hasher::new(),
            len: 0,
        };
        frame::write_record(
            &mut cw,
            REC_KEMARI_CHECKPOINT_BEGIN,
            &[&begin_body(&cp)],
            u32::MAX,
            "t",
        )
        .unwrap();
        let p0: &[u8; PAGE_SIZE] = &cp.pages[0].1;
        libxc::write_page_data(&mut cw, &[(cp.pages[0].0, p0)], &lim()).unwrap();
        Record::HvmParams(vec![(2, 1)])
            .write(&mut cw, &lim())
            .unwrap();
        Record::HvmContext(vec![1]).write(&mut cw, &lim()).unwrap();
        let (len, crc) = (cw.len, cw.crc.clone().finalize());
        let mut end = Vec::new();
        end.extend_from_slice(&1u64.to_le_bytes());
        end.extend_from_slice(&len.to_le_bytes());
        end.extend_from_slice(&crc.to_le_bytes());
        end.extend_from_slice(&0u32.to_le_bytes());
        frame::write_record(&mut body, REC_KEMARI_CHECKPOINT_END, &[&end], 100, "t").unwrap();
        assert!(matches!(
            CheckpointReader::new(lim()).read(&mut &body[..], 1),
            Err(CheckpointError::UnexpectedRecord {
                rtype: libxc::REC_HVM_PARAMS,
                ..
            })
        ));
        // A frame that does not start with BEGIN.
        let mut other = Vec::new();
        Record::End.write(&mut other, &lim()).unwrap();
        assert!(matches!(
            CheckpointReader::new(lim()).read(&mut &other[..], 1),
            Err(CheckpointError::UnexpectedRecord { rtype: 0, .. })
        ));
    }

    #[test]
    fn invalid_checkpoints_not_encoded() {
        let mut cp = sample(1, 2);
        cp.pages[1].0 = cp.pages[0].0;
        assert!(matches!(
            encode_checkpoint(&cp, &lim()),
            Err(CheckpointError::DuplicatePfn { .. })
        ));
        let mut cp = sample(1, 1);
        cp.pages[0].0 = 1 << 60;
        assert!(encode_checkpoint(&cp, &lim()).is_err());
        let mut cp = sample(1, 0);
        cp.reason = EpochReason::Io {
            device: "x".repeat(MAX_DEVICE_LEN + 1),
        };
        assert!(encode_checkpoint(&cp, &lim()).is_err());
    }

    #[test]
    fn all_reasons_round_trip() {
        for reason in [
            EpochReason::Initial,
            EpochReason::Interval,
            EpochReason::Request,
            EpochReason::Io {
                device: String::new(),
            },
        ] {
            let mut cp = sample(3, 1);
            cp.reason = reason;
            cp.emulator_state = None;
            cp.extra.clear();
            let bytes = encode_checkpoint(&cp, &lim()).unwrap();
            assert_eq!(
                CheckpointReader::new(lim())
                    .read(&mut &bytes[..], 3)
                    .unwrap(),
                cp
            );
        }
    }

    #[test]
    fn replies_round_trip_and_reject_corruption() {
        for reply in [
            Reply::Ack(Ack { seq: 42 }),
            Reply::Nack(Nack {
                seq: 43,
                reason: NackReason::OutOfOrder,
            }),
            Reply::Nack(Nack {
                seq: 44,
                reason: NackReason::Other(99),
            }),
        ] {
            let b = reply.encode();
            assert_eq!(Reply::read(&mut &b[..]).unwrap(), reply);
            for i in 0..b.len() {
                let mut m = b;
                m[i] ^= 1;
                assert!(Reply::read(&mut &m[..]).is_err(), "byte {i}");
            }
            for cut in 0..b.len() {
                assert!(Reply::read(&mut &b[..cut]).is_err());
            }
        }
        assert!(matches!(
            Reply::read(&mut &[][..]),
            Err(CheckpointError::Closed)
        ));
    }
}
