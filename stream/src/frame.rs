//! Record framing shared by libxc and libxl streams: `{u32 type, u32 length}` little-endian,
//! `length` bytes of body, zero padding up to the next multiple of 8 octets.
//!
//! Also the bounded readers every decoder here uses: a body is read in chunks of at most
//! [`READ_CHUNK`] bytes and the buffer only grows as bytes really arrive.

use std::io::{self, Read, Write};

use thiserror::Error;
use zerocopy::byteorder::little_endian::U32;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Records are aligned to 8 octets (`REC_ALIGN_ORDER` 3).
pub const RECORD_ALIGN: usize = 8;
/// Largest step by which a body buffer grows while it is read.
pub const READ_CHUNK: usize = 1 << 20;

/// Errors of the framing layer.
#[derive(Debug, Error)]
pub enum FrameError {
    /// The stream ended before a structure was complete.
    #[error("stream truncated: {what} needs {wanted} bytes, only {got} arrived")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Bytes that arrived.
        got: usize,
        /// Bytes needed.
        wanted: usize,
    },
    /// The underlying reader or writer failed.
    #[error("I/O error on {what}: {error}")]
    Io {
        /// What was being read or written.
        what: &'static str,
        /// The error (in the message; not a separate source, so `{:#}` chains say it once).
        error: io::Error,
    },
    /// A record claims (or would have) a body longer than the limit.
    #[error("{what} record type {rtype:#010x} has length {len}, above the limit of {cap} bytes")]
    TooLong {
        /// Which stream layer.
        what: &'static str,
        /// Record type.
        rtype: u32,
        /// Claimed length.
        len: u64,
        /// Limit in force.
        cap: u32,
    },
    /// A padding byte after a record body was not zero.
    #[error("record type {rtype:#010x}: padding byte {index} is {byte:#04x}, not zero")]
    BadPadding {
        /// Record type.
        rtype: u32,
        /// Index of the padding byte.
        index: usize,
        /// Its value.
        byte: u8,
    },
}

/// A record header as on the wire.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawRecordHeader {
    /// Record type.
    pub rtype: U32,
    /// Body length, padding excluded.
    pub length: U32,
}

/// Size of [`RawRecordHeader`].
pub const RECORD_HEADER_LEN: usize = 8;

/// Number of zero octets after a body of `len` bytes.
pub fn padding_len(len: usize) -> usize {
    (RECORD_ALIGN - len % RECORD_ALIGN) % RECORD_ALIGN
}

/// Bytes a record with a body of `len` bytes takes on the wire.
pub fn record_wire_len(len: usize) -> usize {
    RECORD_HEADER_LEN + len + padding_len(len)
}

/// Reads exactly `buf.len()` bytes; a short stream is [`FrameError::Truncated`].
pub fn read_exact<R: Read + ?Sized>(
    r: &mut R,
    buf: &mut [u8],
    what: &'static str,
) -> Result<(), FrameError> {
    let got = read_up_to(r, buf, what)?;
    if got < buf.len() {
        return Err(FrameError::Truncated {
            what,
            got,
            wanted: buf.len(),
        });
    }
    Ok(())
}

/// Reads until `buf` is full or the stream ends; returns the number of bytes read.
pub fn read_up_to<R: Read + ?Sized>(
    r: &mut R,
    buf: &mut [u8],
    what: &'static str,
) -> Result<usize, FrameError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(FrameError::Io {
                    what,
                    error: source,
                })
            }
        }
    }
    Ok(got)
}

/// Reads a body of `len` bytes, growing the buffer by at most [`READ_CHUNK`] at a time, so a
/// length that the stream does not back up is never allocated in full.
pub fn read_vec<R: Read + ?Sized>(
    r: &mut R,
    len: usize,
    what: &'static str,
) -> Result<Vec<u8>, FrameError> {
    let mut buf = Vec::with_capacity(len.min(READ_CHUNK));
    while buf.len() < len {
        let start = buf.len();
        let step = (len - start).min(READ_CHUNK);
        buf.resize(start + step, 0);
        let got = read_up_to(r, &mut buf[start..], what)?;
        if got < step {
            return Err(FrameError::Truncated {
                what,
                got: start + got,
                wanted: len,
            });
        }
    }
    Ok(buf)
}

/// Reads and checks the zero padding after a body of `len` bytes.
pub fn read_padding<R: Read + ?Sized>(
    r: &mut R,
    rtype: u32,
    len: usize,
    what: &'static str,
) -> Result<(), FrameError> {
    let mut pad = [0u8; RECORD_ALIGN];
    let n = padding_len(len);
    read_exact(r, &mut pad[..n], what)?;
    if let Some((index, &byte)) = pad[..n].iter().enumerate().find(|(_, b)| **b != 0) {
        return Err(FrameError::BadPadding { rtype, index, byte });
    }
    Ok(())
}

/// Reads a record header; `Ok(None)` if the stream ends cleanly before its first byte.
pub fn read_header_or_eof<R: Read + ?Sized>(
    r: &mut R,
    what: &'static str,
) -> Result<Option<(u32, u32)>, FrameError> {
    let mut buf = [0u8; RECORD_HEADER_LEN];
    let got = read_up_to(r, &mut buf, what)?;
    if got == 0 {
        return Ok(None);
    }
    if got < buf.len() {
        return Err(FrameError::Truncated {
            what,
            got,
            wanted: buf.len(),
        });
    }
    Ok(Some(parse_header(&buf)))
}

/// Reads a record header.
pub fn read_header<R: Read + ?Sized>(
    r: &mut R,
    what: &'static str,
) -> Result<(u32, u32), FrameError> {
    let mut buf = [0u8; RECORD_HEADER_LEN];
    read_exact(r, &mut buf, what)?;
    Ok(parse_header(&buf))
}

fn parse_header(buf: &[u8; RECORD_HEADER_LEN]) -> (u32, u32) {
    let h: RawRecordHeader = zerocopy::transmute!(*buf);
    (h.rtype.get(), h.length.get())
}

/// Reads a record's body (after its header) and padding, checking `length` against `cap` first.
pub fn read_body<R: Read + ?Sized>(
    r: &mut R,
    rtype: u32,
    length: u32,
    cap: u32,
    what: &'static str,
) -> Result<Vec<u8>, FrameError> {
    if length > cap {
        return Err(FrameError::TooLong {
            what,
            rtype,
            len: u64::from(length),
            cap,
        });
    }
    let body = read_vec(r, length as usize, what)?;
    read_padding(r, rtype, body.len(), what)?;
    Ok(body)
}

/// Encodes a record header.
pub fn header_bytes(rtype: u32, length: u32) -> [u8; RECORD_HEADER_LEN] {
    let h = RawRecordHeader {
        rtype: U32::new(rtype),
        length: U32::new(length),
    };
    let mut out = [0u8; RECORD_HEADER_LEN];
    out.copy_from_slice(h.as_bytes());
    out
}

/// Writes one record whose body is the concatenation of `parts`, then its padding.
/// Fails (before writing anything) if the body is longer than `cap`.
pub fn write_record<W: Write + ?Sized>(
    w: &mut W,
    rtype: u32,
    parts: &[&[u8]],
    cap: u32,
    what: &'static str,
) -> Result<usize, FrameError> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let length = u32::try_from(total)
        .ok()
        .filter(|l| *l <= cap)
        .ok_or(FrameError::TooLong {
            what,
            rtype,
            len: total as u64,
            cap,
        })?;
    let io = |source| FrameError::Io {
        what,
        error: source,
    };
    w.write_all(&header_bytes(rtype, length)).map_err(io)?;
    for p in parts {
        w.write_all(p).map_err(io)?;
    }
    w.write_all(&[0u8; RECORD_ALIGN][..padding_len(total)])
        .map_err(io)?;
    Ok(record_wire_len(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_lengths() {
        assert_eq!(padding_len(0), 0);
        assert_eq!(padding_len(1), 7);
        assert_eq!(padding_len(8), 0);
        assert_eq!(padding_len(13), 3);
        assert_eq!(record_wire_len(13), 24);
    }

    #[test]
    fn record_round_trip_and_padding_check() {
        let mut out = Vec::new();
        let n = write_record(&mut out, 7, &[b"abc", b"de"], 100, "test").unwrap();
        assert_eq!(n, 16);
        assert_eq!(out.len(), 16);
        let mut r = &out[..];
        let (t, l) = read_header(&mut r, "test").unwrap();
        assert_eq!((t, l), (7, 5));
        assert_eq!(read_body(&mut r, t, l, 100, "test").unwrap(), b"abcde");
        let mut bad = out.clone();
        bad[15] = 1;
        let mut r = &bad[8..];
        assert!(matches!(
            read_body(&mut r, 7, 5, 100, "test"),
            Err(FrameError::BadPadding { index: 2, .. })
        ));
    }

    #[test]
    fn too_long_rejected_before_reading() {
        let mut r: &[u8] = &[];
        assert!(matches!(
            read_body(&mut r, 1, 1000, 999, "test"),
            Err(FrameError::TooLong { len: 1000, .. })
        ));
        let mut out = Vec::new();
        assert!(write_record(&mut out, 1, &[&[0u8; 10]], 9, "test").is_err());
        assert!(out.is_empty());
    }

    #[test]
    fn lying_length_allocates_at_most_one_chunk() {
        // 100 bytes of body backing a claimed 100 MiB: truncated, and the buffer never grew past
        // what arrived plus one chunk (checked by the error's figures).
        let data = [0u8; 100];
        let mut r = &data[..];
        match read_vec(&mut r, 100 << 20, "test") {
            Err(FrameError::Truncated { got, wanted, .. }) => {
                assert_eq!(got, 100);
                assert_eq!(wanted, 100 << 20);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn clean_eof_versus_partial_header() {
        let mut r: &[u8] = &[];
        assert!(read_header_or_eof(&mut r, "t").unwrap().is_none());
        let mut r: &[u8] = &[1, 2, 3];
        assert!(matches!(
            read_header_or_eof(&mut r, "t"),
            Err(FrameError::Truncated { got: 3, .. })
        ));
    }
}
