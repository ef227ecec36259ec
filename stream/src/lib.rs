//! Codec of Xen 4.17's save/migration stream and of Kemari's checkpoint frames.
//!
//! Layers, outermost first (see `docs/stream.md`):
//!
//! - [`xl`]: the header `xl save` puts in front of a save file (magic, byte-order marker, flags,
//!   the domain configuration as JSON).
//! - [`libxl`]: libxl's stream v2 (`LibxlFmt` header and records such as `LIBXC_CONTEXT` and
//!   `EMULATOR_CONTEXT`).
//! - [`libxc`]: libxc's stream v3 (image and domain headers, `PAGE_DATA`, `HVM_CONTEXT`, ...).
//! - [`image`]: a complete `xl save`-compatible image, written step by step ([`image::ImageWriter`])
//!   or read record by record with bounded memory ([`image::ImageReader`]).
//! - [`checkpoint`]: Kemari's checkpoint frames (libxc-framed records, Kemari's own data in
//!   OPTIONAL records) and the ACK/NACK replies.
//! - [`records`]: Kemari's record types in libxc's optional range (used by both of the above).
//! - [`disklog`]: the disk write log a checkpoint carries in its `KEMARI_EXTRA` records.
//!
//! Every decoder checks every length against a hard limit ([`Limits`]) before it reads, and
//! never allocates what a header merely claims: bodies are read in bounded chunks, so a lying
//! header on a short stream costs at most one chunk more than the bytes that really arrived.

pub mod checkpoint;
pub mod disklog;
pub mod frame;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod image;
pub mod libxc;
pub mod libxl;
pub mod records;
pub mod xl;

/// Size of a guest page (x86, `page_shift` 12).
pub const PAGE_SIZE: usize = 4096;
/// `log2(PAGE_SIZE)`.
pub const PAGE_SHIFT: u16 = 12;

/// Xen's record length cap (`REC_LENGTH_MAX`, 128 MiB) for libxc and libxl records.
pub const XEN_RECORD_LENGTH_MAX: u32 = 128 << 20;
/// Maximum number of pages in one `PAGE_DATA` record (Xen's saver batches 1024).
pub const MAX_PAGES_PER_RECORD: u32 = 1024;

/// Hard limits applied while decoding. Lower them for untrusted peers; they can never be raised
/// past Xen's own caps ([`XEN_RECORD_LENGTH_MAX`], [`MAX_PAGES_PER_RECORD`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest record body accepted (bytes, before padding). Clamped to 128 MiB.
    pub max_record_len: u32,
    /// Largest domain configuration (JSON) in an xl header.
    pub max_config_len: u32,
    /// Largest whole checkpoint frame (all records, headers and padding included).
    pub max_checkpoint_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_record_len: XEN_RECORD_LENGTH_MAX,
            max_config_len: 1 << 20,
            max_checkpoint_bytes: 1 << 30,
        }
    }
}

impl Limits {
    /// The record length cap actually in force (never above Xen's 128 MiB).
    pub fn record_cap(&self) -> u32 {
        self.max_record_len.min(XEN_RECORD_LENGTH_MAX)
    }
}
