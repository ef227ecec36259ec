//! libxl's migration stream v2 (`docs/specs/libxl-migration-stream.pandoc`,
//! `tools/libs/light/libxl_sr_stream_format.h`).
//!
//! Header (16 octets, big-endian): `u64 ident "LibxlFmt"`, `u32 version 2`, `u32 options`
//! (bit 0 big-endian, bit 1 legacy). Records are little-endian `{u32 type, u32 length}`, body,
//! zero padding to 8 octets. A `LIBXC_CONTEXT` record has no body: the libxc stream follows it
//! directly, up to libxc's own `END` record.

use std::io::{Read, Write};

use thiserror::Error;
use zerocopy::byteorder::big_endian::{U32 as BeU32, U64 as BeU64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::frame::{self, FrameError};
use crate::Limits;

/// `RESTORE_STREAM_IDENT` ("LibxlFmt").
pub const LIBXL_IDENT: u64 = 0x4c69_6278_6c46_6d74;
/// `RESTORE_STREAM_VERSION`.
pub const LIBXL_VERSION: u32 = 2;
/// `RESTORE_OPT_BIG_ENDIAN`.
pub const OPT_BIG_ENDIAN: u32 = 1 << 0;
/// `RESTORE_OPT_LEGACY`.
pub const OPT_LEGACY: u32 = 1 << 1;
/// Size of the header.
pub const LIBXL_HEADER_LEN: usize = 16;

/// `REC_TYPE_END`.
pub const REC_END: u32 = 0;
/// `REC_TYPE_LIBXC_CONTEXT`.
pub const REC_LIBXC_CONTEXT: u32 = 1;
/// `REC_TYPE_EMULATOR_XENSTORE_DATA`.
pub const REC_EMULATOR_XENSTORE_DATA: u32 = 2;
/// `REC_TYPE_EMULATOR_CONTEXT`.
pub const REC_EMULATOR_CONTEXT: u32 = 3;
/// `REC_TYPE_CHECKPOINT_END`.
pub const REC_CHECKPOINT_END: u32 = 4;
/// `REC_TYPE_CHECKPOINT_STATE`.
pub const REC_CHECKPOINT_STATE: u32 = 5;

/// `EMULATOR_UNKNOWN`.
pub const EMULATOR_UNKNOWN: u32 = 0;
/// `EMULATOR_QEMU_TRADITIONAL`.
pub const EMULATOR_QEMU_TRADITIONAL: u32 = 1;
/// `EMULATOR_QEMU_UPSTREAM` (what Xen 4.17 HVM guests use).
pub const EMULATOR_QEMU_UPSTREAM: u32 = 2;

/// Errors of the libxl stream codec.
#[derive(Debug, Error)]
pub enum LibxlError {
    /// Framing or I/O failure.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// Wrong ident.
    #[error("libxl stream: ident {found:#018x}, expected {LIBXL_IDENT:#018x} (\"LibxlFmt\")")]
    BadIdent {
        /// Ident read.
        found: u64,
    },
    /// Wrong version.
    #[error("libxl stream: version {found}, expected {LIBXL_VERSION}")]
    BadVersion {
        /// Version read.
        found: u32,
    },
    /// Big-endian stream (Xen cannot restore those either).
    #[error("libxl stream: options {options:#x} say big-endian, which Xen cannot restore")]
    BigEndian {
        /// Options read.
        options: u32,
    },
    /// Unknown record type (libxl has no optional records: unknown is fatal).
    #[error("libxl stream: unknown record type {rtype:#010x} (length {length})")]
    UnknownRecord {
        /// Type.
        rtype: u32,
        /// Its length.
        length: u32,
    },
    /// A record's body has the wrong size for its type.
    #[error("libxl stream: {name} record has length {length}, expected {expected}")]
    BadLength {
        /// Record name.
        name: &'static str,
        /// Length read.
        length: u32,
        /// What the type needs.
        expected: &'static str,
    },
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawLibxlHeader {
    ident: BeU64,
    version: BeU32,
    options: BeU32,
}

/// The libxl stream header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LibxlHeader {
    /// Options ([`OPT_LEGACY`] for streams converted from the legacy format).
    pub options: u32,
}

impl LibxlHeader {
    /// Reads and checks the header.
    pub fn read<R: Read + ?Sized>(r: &mut R) -> Result<Self, LibxlError> {
        let mut buf = [0u8; LIBXL_HEADER_LEN];
        frame::read_exact(r, &mut buf, "libxl header")?;
        let raw: RawLibxlHeader = zerocopy::transmute!(buf);
        if raw.ident.get() != LIBXL_IDENT {
            return Err(LibxlError::BadIdent {
                found: raw.ident.get(),
            });
        }
        if raw.version.get() != LIBXL_VERSION {
            return Err(LibxlError::BadVersion {
                found: raw.version.get(),
            });
        }
        let options = raw.options.get();
        if options & OPT_BIG_ENDIAN != 0 {
            return Err(LibxlError::BigEndian { options });
        }
        Ok(LibxlHeader { options })
    }

    /// Writes the header.
    pub fn write<W: Write + ?Sized>(&self, w: &mut W) -> Result<(), LibxlError> {
        let raw = RawLibxlHeader {
            ident: BeU64::new(LIBXL_IDENT),
            version: BeU32::new(LIBXL_VERSION),
            options: BeU32::new(self.options),
        };
        w.write_all(raw.as_bytes())
            .map_err(|source| FrameError::Io {
                what: "libxl header",
                error: source,
            })?;
        Ok(())
    }
}

/// One libxl record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LibxlRecord {
    /// End of the stream.
    End,
    /// A libxc stream follows (read it with [`crate::libxc`]).
    LibxcContext,
    /// Device-model xenstore data.
    EmulatorXenstoreData {
        /// Emulator id (`EMULATOR_*`).
        id: u32,
        /// Emulator index.
        index: u32,
        /// The data.
        data: Vec<u8>,
    },
    /// The device model's saved state (QEMU's `xen-save-devices-state` output).
    EmulatorContext {
        /// Emulator id (`EMULATOR_*`).
        id: u32,
        /// Emulator index.
        index: u32,
        /// The blob.
        blob: Vec<u8>,
    },
    /// End of a checkpoint (Remus/COLO).
    CheckpointEnd,
    /// COLO checkpoint state.
    CheckpointState {
        /// `CHECKPOINT_*` id.
        id: u32,
    },
}

impl LibxlRecord {
    /// The record's type code.
    pub fn rtype(&self) -> u32 {
        match self {
            LibxlRecord::End => REC_END,
            LibxlRecord::LibxcContext => REC_LIBXC_CONTEXT,
            LibxlRecord::EmulatorXenstoreData { .. } => REC_EMULATOR_XENSTORE_DATA,
            LibxlRecord::EmulatorContext { .. } => REC_EMULATOR_CONTEXT,
            LibxlRecord::CheckpointEnd => REC_CHECKPOINT_END,
            LibxlRecord::CheckpointState { .. } => REC_CHECKPOINT_STATE,
        }
    }

    /// Reads one record (body and padding). For [`LibxlRecord::LibxcContext`] the libxc stream
    /// that follows is left unread.
    pub fn read<R: Read + ?Sized>(r: &mut R, limits: &Limits) -> Result<Self, LibxlError> {
        let (rtype, length) = frame::read_header(r, "libxl record header")?;
        let empty = |name| {
            if length != 0 {
                return Err(LibxlError::BadLength {
                    name,
                    length,
                    expected: "0",
                });
            }
            Ok(())
        };
        match rtype {
            REC_END => {
                empty("END")?;
                Ok(LibxlRecord::End)
            }
            REC_LIBXC_CONTEXT => {
                empty("LIBXC_CONTEXT")?;
                Ok(LibxlRecord::LibxcContext)
            }
            REC_CHECKPOINT_END => {
                empty("CHECKPOINT_END")?;
                Ok(LibxlRecord::CheckpointEnd)
            }
            REC_CHECKPOINT_STATE => {
                if length != 4 {
                    return Err(LibxlError::BadLength {
                        name: "CHECKPOINT_STATE",
                        length,
                        expected: "4",
                    });
                }
                let body = frame::read_body(r, rtype, length, 4, "libxl CHECKPOINT_STATE")?;
                let id = u32::from_le_bytes([body[0], body[1], body[2], body[3]]);
                Ok(LibxlRecord::CheckpointState { id })
            }
            REC_EMULATOR_XENSTORE_DATA | REC_EMULATOR_CONTEXT => {
                let name = if rtype == REC_EMULATOR_CONTEXT {
                    "EMULATOR_CONTEXT"
                } else {
                    "EMULATOR_XENSTORE_DATA"
                };
                if length < 8 {
                    return Err(LibxlError::BadLength {
                        name,
                        length,
                        expected: ">= 8 (emulator header)",
                    });
                }
                let mut body = frame::read_body(r, rtype, length, limits.record_cap(), name)?;
                let id = u32::from_le_bytes([body[0], body[1], body[2], body[3]]);
                let index = u32::from_le_bytes([body[4], body[5], body[6], body[7]]);
                let data = body.split_off(8);
                if rtype == REC_EMULATOR_CONTEXT {
                    Ok(LibxlRecord::EmulatorContext {
                        id,
                        index,
                        blob: data,
                    })
                } else {
                    Ok(LibxlRecord::EmulatorXenstoreData { id, index, data })
                }
            }
            _ => Err(LibxlError::UnknownRecord { rtype, length }),
        }
    }

    /// Writes the record. For [`LibxlRecord::LibxcContext`] the caller writes the libxc
    /// stream next.
    pub fn write<W: Write + ?Sized>(&self, w: &mut W, limits: &Limits) -> Result<(), LibxlError> {
        let cap = limits.record_cap();
        let rtype = self.rtype();
        match self {
            LibxlRecord::End | LibxlRecord::LibxcContext | LibxlRecord::CheckpointEnd => {
                frame::write_record(w, rtype, &[], cap, "libxl record")?;
            }
            LibxlRecord::CheckpointState { id } => {
                frame::write_record(w, rtype, &[&id.to_le_bytes()], cap, "libxl record")?;
            }
            LibxlRecord::EmulatorXenstoreData {
                id,
                index,
                data: blob,
            }
            | LibxlRecord::EmulatorContext { id, index, blob } => {
                frame::write_record(
                    w,
                    rtype,
                    &[&id.to_le_bytes(), &index.to_le_bytes(), blob],
                    cap,
                    "libxl emulator record",
                )?;
            }
        }
        Ok(())
    }
}

/// Human-readable name of a libxl record type.
pub fn record_name(rtype: u32) -> &'static str {
    match rtype {
        REC_END => "END",
        REC_LIBXC_CONTEXT => "LIBXC_CONTEXT",
        REC_EMULATOR_XENSTORE_DATA => "EMULATOR_XENSTORE_DATA",
        REC_EMULATOR_CONTEXT => "EMULATOR_CONTEXT",
        REC_CHECKPOINT_END => "CHECKPOINT_END",
        REC_CHECKPOINT_STATE => "CHECKPOINT_STATE",
        _ => "UNKNOWN",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_records() -> Vec<LibxlRecord> {
        vec![
            LibxlRecord::LibxcContext,
            LibxlRecord::EmulatorXenstoreData {
                id: EMULATOR_QEMU_UPSTREAM,
                index: 0,
                data: b"physmap/0\0x\0".to_vec(),
            },
            LibxlRecord::EmulatorContext {
                id: EMULATOR_QEMU_UPSTREAM,
                index: 0,
                blob: vec![0x51; 13],
            },
            LibxlRecord::CheckpointEnd,
            LibxlRecord::CheckpointState { id: 2 },
            LibxlRecord::End,
        ]
    }

    #[test]
    fn header_round_trip_is_big_endian() {
        let mut out = Vec::new();
        LibxlHeader { options: 0 }.write(&mut out).unwrap();
        assert_eq!(&out[..8], b"LibxlFmt");
        assert_eq!(&out[8..12], &[0, 0, 0, 2]);
        assert_eq!(
            LibxlHeader::read(&mut &out[..]).unwrap(),
            LibxlHeader { options: 0 }
        );
    }

    #[test]
    fn records_round_trip_with_padding() {
        let lim = Limits::default();
        let mut out = Vec::new();
        for r in all_records() {
            r.write(&mut out, &lim).unwrap();
            assert_eq!(out.len() % 8, 0);
        }
        let mut r = &out[..];
        for want in all_records() {
            assert_eq!(LibxlRecord::read(&mut r, &lim).unwrap(), want);
        }
        assert!(r.is_empty());
        for cut in 0..out.len() {
            let mut r = &out[..cut];
            let mut ok = 0;
            while LibxlRecord::read(&mut r, &lim).is_ok() {
                ok += 1;
            }
            assert!(
                ok < all_records().len(),
                "truncated at {cut} read everything"
            );
        }
    }

    #[test]
    fn hostile_input() {
        let lim = Limits::default();
        let mut h = Vec::new();
        LibxlHeader { options: 0 }.write(&mut h).unwrap();
        let mut b = h.clone();
        b[0] = b'X';
        assert!(matches!(
            LibxlHeader::read(&mut &b[..]),
            Err(LibxlError::BadIdent { .. })
        ));
        let mut b = h.clone();
        b[11] = 3;
        assert!(matches!(
            LibxlHeader::read(&mut &b[..]),
            Err(LibxlError::BadVersion { found: 3 })
        ));
        let mut b = h.clone();
        b[15] = 1;
        assert!(matches!(
            LibxlHeader::read(&mut &b[..]),
            Err(LibxlError::BigEndian { .. })
        ));
        let rec = frame::header_bytes(99, 0);
        assert!(matches!(
            LibxlRecord::read(&mut &rec[..], &lim),
            Err(LibxlError::UnknownRecord { rtype: 99, .. })
        ));
        let rec = frame::header_bytes(REC_EMULATOR_CONTEXT, u32::MAX);
        assert!(matches!(
            LibxlRecord::read(&mut &rec[..], &lim),
            Err(LibxlError::Frame(FrameError::TooLong { .. }))
        ));
        let rec = frame::header_bytes(REC_EMULATOR_CONTEXT, 4);
        assert!(matches!(
            LibxlRecord::read(&mut &rec[..], &lim),
            Err(LibxlError::BadLength { .. })
        ));
        let rec = frame::header_bytes(REC_END, 8);
        assert!(matches!(
            LibxlRecord::read(&mut &rec[..], &lim),
            Err(LibxlError::BadLength { .. })
        ));
    }
}
