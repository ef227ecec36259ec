//! The disk write log: the guest's disk writes (and discards) that a checkpoint releases,
//! carried inside that checkpoint's frame so the secondary's copy of each disk moves with its
//! memory replica (no shared storage).
//!
//! The log travels in `KEMARI_EXTRA` records of kind [`EXTRA_DISK_LOG`] (see
//! [`crate::checkpoint`]). A checkpoint carries zero or more of them; their entries, in record
//! order, are the log of that checkpoint. Every entry has a sequence number, consecutive over
//! the whole connection (the first entry ever is 1), so a lost, repeated or reordered entry is
//! detected. One record body (after the extra's `kind, reserved` words):
//!
//! ```text
//! u32 version=1, u32 entry_count
//! entry_count times:
//!   u64 seq, u32 devid (virtual-device, e.g. 51712 = xvda), u8 op (1 write, 2 discard),
//!   u8[3] reserved=0, u64 sector (512-byte units), u32 bytes, u32 reserved=0,
//!   write: bytes of data, zero padding to 8 octets; discard: nothing
//! ```
//!
//! Limits: `bytes` is a non-zero multiple of 512 and at most [`MAX_ENTRY_BYTES`]; a record
//! body is at most [`MAX_RECORD_BYTES`] (the encoder starts a new record before that). The
//! decoder checks every field and every length before it copies data, and returns the whole
//! log or an error (nothing partial).

use thiserror::Error;

/// `KEMARI_EXTRA` kind of a disk log record.
pub const EXTRA_DISK_LOG: u32 = 1;
/// Format version of a disk log record.
pub const DISK_LOG_VERSION: u32 = 1;
/// Largest single entry (a write of 256 indirect segments is 1 MiB; room for more).
pub const MAX_ENTRY_BYTES: u32 = 4 << 20;
/// Largest disk log record body the encoder writes and the decoder accepts.
pub const MAX_RECORD_BYTES: usize = 16 << 20;
/// Sector size of the log's sector numbers.
pub const SECTOR_BYTES: u64 = 512;

const RECORD_HEADER: usize = 8;
const ENTRY_HEADER: usize = 32;
const OP_WRITE: u8 = 1;
const OP_DISCARD: u8 = 2;

/// Errors of the disk log codec.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DiskLogError {
    /// An entry that cannot be encoded or was decoded with a bad field.
    #[error("disk log entry {seq}: {detail}")]
    BadEntry {
        /// Its sequence number.
        seq: u64,
        /// What is wrong.
        detail: String,
    },
    /// A record's structure is wrong (header, lengths, padding).
    #[error("disk log record {index}: {detail}")]
    BadRecord {
        /// Index of the disk log record in the checkpoint.
        index: usize,
        /// What is wrong.
        detail: String,
    },
    /// Sequence numbers are not consecutive.
    #[error("disk log: entry with sequence {got} where {expected} was expected (an entry was lost, repeated or reordered)")]
    Sequence {
        /// The next sequence number expected.
        expected: u64,
        /// The one found.
        got: u64,
    },
}

/// What an entry does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskOp<D> {
    /// Write these bytes at the entry's sector.
    Write(D),
    /// Discard `bytes` bytes at the entry's sector (they read back as zeros).
    Discard {
        /// Length in bytes.
        bytes: u64,
    },
}

/// One log entry. `D` is the data's container: `&[u8]` to encode, `Vec<u8>` when decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskLogEntry<D> {
    /// Sequence number (consecutive over the connection, from 1).
    pub seq: u64,
    /// The disk (`virtual-device` number).
    pub devid: u32,
    /// Start, in 512-byte sectors.
    pub sector: u64,
    /// The operation.
    pub op: DiskOp<D>,
}

impl<D: AsRef<[u8]>> DiskLogEntry<D> {
    /// Bytes the entry covers on the disk.
    pub fn len_bytes(&self) -> u64 {
        match &self.op {
            DiskOp::Write(d) => d.as_ref().len() as u64,
            DiskOp::Discard { bytes } => *bytes,
        }
    }

    fn check(&self) -> Result<(u8, u32), DiskLogError> {
        let (op, len) = match &self.op {
            DiskOp::Write(d) => (OP_WRITE, d.as_ref().len() as u64),
            DiskOp::Discard { bytes } => (OP_DISCARD, *bytes),
        };
        check_len(self.seq, self.sector, len)?;
        // check_len bounds len by MAX_ENTRY_BYTES, which fits in u32
        Ok((op, len as u32))
    }

    fn wire_len(&self) -> usize {
        ENTRY_HEADER
            + match &self.op {
                DiskOp::Write(d) => padded(d.as_ref().len()),
                DiskOp::Discard { .. } => 0,
            }
    }
}

fn padded(n: usize) -> usize {
    n.div_ceil(8) * 8
}

fn check_len(seq: u64, sector: u64, len: u64) -> Result<(), DiskLogError> {
    let bad = |detail: String| DiskLogError::BadEntry { seq, detail };
    if len == 0 || len % SECTOR_BYTES != 0 {
        return Err(bad(format!(
            "{len} bytes: must be a non-zero multiple of {SECTOR_BYTES}"
        )));
    }
    if len > u64::from(MAX_ENTRY_BYTES) {
        return Err(bad(format!(
            "{len} bytes, above the entry limit of {MAX_ENTRY_BYTES}"
        )));
    }
    if sector
        .checked_mul(SECTOR_BYTES)
        .and_then(|b| b.checked_add(len))
        .is_none()
    {
        return Err(bad(format!("sector {sector} + {len} bytes overflows")));
    }
    Ok(())
}

/// Encodes `entries` (in order, consecutive sequence numbers) as `KEMARI_EXTRA` records
/// `(EXTRA_DISK_LOG, body)`, each body at most [`MAX_RECORD_BYTES`]. Nothing is returned if an
/// entry is invalid.
pub fn encode<D: AsRef<[u8]>>(
    entries: &[DiskLogEntry<D>],
) -> Result<Vec<(u32, Vec<u8>)>, DiskLogError> {
    let mut checked = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        if let Some(prev) = i.checked_sub(1).and_then(|p| entries.get(p)) {
            let expected = prev.seq.wrapping_add(1);
            if e.seq != expected {
                return Err(DiskLogError::Sequence {
                    expected,
                    got: e.seq,
                });
            }
        }
        checked.push(e.check()?);
    }
    let mut records = Vec::new();
    let mut body: Vec<u8> = Vec::new();
    let mut count = 0u32;
    let finish = |body: &mut Vec<u8>, count: &mut u32, records: &mut Vec<(u32, Vec<u8>)>| {
        if *count > 0 {
            body[4..8].copy_from_slice(&count.to_le_bytes());
            records.push((EXTRA_DISK_LOG, std::mem::take(body)));
            *count = 0;
        }
    };
    for (e, (op, len)) in entries.iter().zip(checked) {
        if count > 0 && body.len() + e.wire_len() > MAX_RECORD_BYTES {
            finish(&mut body, &mut count, &mut records);
        }
        if count == 0 {
            body.extend_from_slice(&DISK_LOG_VERSION.to_le_bytes());
            body.extend_from_slice(&0u32.to_le_bytes());
        }
        body.extend_from_slice(&e.seq.to_le_bytes());
        body.extend_from_slice(&e.devid.to_le_bytes());
        body.extend_from_slice(&[op, 0, 0, 0]);
        body.extend_from_slice(&e.sector.to_le_bytes());
        body.extend_from_slice(&len.to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes());
        if let DiskOp::Write(d) = &e.op {
            let d = d.as_ref();
            body.extend_from_slice(d);
            body.resize(body.len() + padded(d.len()) - d.len(), 0);
        }
        count += 1;
    }
    finish(&mut body, &mut count, &mut records);
    Ok(records)
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    b.get(off..off + 4)
        .and_then(|s| <[u8; 4]>::try_from(s).ok())
        .map(u32::from_le_bytes)
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    b.get(off..off + 8)
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .map(u64::from_le_bytes)
}

/// Decodes the disk log of one checkpoint from its extras (records of other kinds are
/// skipped). `next_seq`: the sequence number the first entry must have (the last applied
/// entry's plus one). Returns every entry or an error; nothing partial.
pub fn decode(
    extras: &[(u32, Vec<u8>)],
    next_seq: u64,
) -> Result<Vec<DiskLogEntry<Vec<u8>>>, DiskLogError> {
    let mut out = Vec::new();
    let mut expected = next_seq;
    for (index, (_, body)) in extras
        .iter()
        .filter(|(k, _)| *k == EXTRA_DISK_LOG)
        .enumerate()
    {
        let bad = |detail: String| DiskLogError::BadRecord { index, detail };
        if body.len() > MAX_RECORD_BYTES {
            return Err(bad(format!(
                "{} bytes, above the limit of {MAX_RECORD_BYTES}",
                body.len()
            )));
        }
        let (Some(version), Some(count)) = (u32_at(body, 0), u32_at(body, 4)) else {
            return Err(bad(format!(
                "{} bytes, shorter than its {RECORD_HEADER}-byte header",
                body.len()
            )));
        };
        if version != DISK_LOG_VERSION {
            return Err(bad(format!(
                "version {version}, expected {DISK_LOG_VERSION}"
            )));
        }
        if count == 0 {
            return Err(bad("no entries".into()));
        }
        // every entry needs at least its header: bound the count before allocating
        let room = (body.len() - RECORD_HEADER) / ENTRY_HEADER;
        if count as usize > room {
            return Err(bad(format!(
                "claims {count} entries, {} bytes hold at most {room}",
                body.len()
            )));
        }
        let mut off = RECORD_HEADER;
        for _ in 0..count {
            let h = body
                .get(off..off + ENTRY_HEADER)
                .ok_or_else(|| bad(format!("entry header at offset {off} runs past the record")))?;
            let (Some(seq), Some(devid), Some(sector), Some(len), Some(res)) = (
                u64_at(h, 0),
                u32_at(h, 8),
                u64_at(h, 16),
                u32_at(h, 24),
                u32_at(h, 28),
            ) else {
                return Err(bad(format!("entry header at offset {off} is short")));
            };
            let (op, res3) = (h[12], &h[13..16]);
            if seq != expected {
                return Err(DiskLogError::Sequence { expected, got: seq });
            }
            let bad_entry = |detail: String| DiskLogError::BadEntry { seq, detail };
            if res != 0 || res3.iter().any(|b| *b != 0) {
                return Err(bad_entry("reserved fields are not zero".into()));
            }
            check_len(seq, sector, u64::from(len))?;
            off += ENTRY_HEADER;
            let op = match op {
                OP_WRITE => {
                    let n = len as usize;
                    let data = body.get(off..off + n).ok_or_else(|| {
                        bad_entry(format!(
                            "{n} bytes of data at offset {off} run past the record of {} bytes",
                            body.len()
                        ))
                    })?;
                    let pad = body
                        .get(off + n..off + padded(n))
                        .ok_or_else(|| bad_entry("padding runs past the record".to_string()))?;
                    if pad.iter().any(|b| *b != 0) {
                        return Err(bad_entry("padding is not zero".into()));
                    }
                    off += padded(n);
                    DiskOp::Write(data.to_vec())
                }
                OP_DISCARD => DiskOp::Discard {
                    bytes: u64::from(len),
                },
                other => return Err(bad_entry(format!("unknown operation {other}"))),
            };
            out.push(DiskLogEntry {
                seq,
                devid,
                sector,
                op,
            });
            expected = expected.wrapping_add(1);
        }
        if off != body.len() {
            return Err(bad(format!(
                "{} bytes after the last of {count} entries",
                body.len() - off
            )));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(seq: u64, sector: u64, fill: u8, sectors: usize) -> DiskLogEntry<Vec<u8>> {
        DiskLogEntry {
            seq,
            devid: 51712,
            sector,
            op: DiskOp::Write(vec![fill; sectors * 512]),
        }
    }

    fn log(first: u64, n: u64) -> Vec<DiskLogEntry<Vec<u8>>> {
        (0..n)
            .map(|i| {
                if i % 5 == 4 {
                    DiskLogEntry {
                        seq: first + i,
                        devid: 51728,
                        sector: i * 8,
                        op: DiskOp::Discard { bytes: 4096 },
                    }
                } else {
                    w(first + i, i * 3, i as u8, 1 + (i as usize % 3))
                }
            })
            .collect()
    }

    #[test]
    fn round_trip_with_other_extras_between() {
        let entries = log(7, 23);
        let mut extras = encode(&entries).unwrap();
        assert_eq!(extras.len(), 1);
        extras.insert(0, (99, vec![1, 2, 3]));
        assert_eq!(decode(&extras, 7).unwrap(), entries);
        assert!(decode(&[], 1).unwrap().is_empty());
        assert!(encode::<Vec<u8>>(&[]).unwrap().is_empty());
    }

    #[test]
    fn large_logs_split_into_records_and_join_again() {
        // 40 writes of 1 MiB: more than two 16 MiB records
        let entries: Vec<_> = (0..40).map(|i| w(1 + i, i * 2048, i as u8, 2048)).collect();
        let extras = encode(&entries).unwrap();
        assert!(extras.len() >= 3, "{} records", extras.len());
        assert!(extras.iter().all(|(_, b)| b.len() <= MAX_RECORD_BYTES));
        assert_eq!(decode(&extras, 1).unwrap(), entries);
    }

    #[test]
    fn gaps_and_wrong_start_are_refused() {
        let mut entries = log(1, 4);
        let extras = encode(&entries).unwrap();
        assert_eq!(
            decode(&extras, 2),
            Err(DiskLogError::Sequence {
                expected: 2,
                got: 1
            })
        );
        entries[2].seq = 9;
        assert!(matches!(
            encode(&entries),
            Err(DiskLogError::Sequence { .. })
        ));
    }

    #[test]
    fn bad_entries_are_not_encoded() {
        for (sector, len) in [(0, 0), (0, 100), (0, u64::from(MAX_ENTRY_BYTES) + 512)] {
            let e: DiskLogEntry<Vec<u8>> = DiskLogEntry {
                seq: 1,
                devid: 1,
                sector,
                op: DiskOp::Discard { bytes: len },
            };
            assert!(encode(&[e]).is_err(), "{sector} {len}");
        }
        let e = DiskLogEntry {
            seq: 1,
            devid: 1,
            sector: u64::MAX / 256,
            op: DiskOp::Write(vec![0u8; 512]),
        };
        assert!(encode(&[e]).is_err());
    }

    #[test]
    fn every_truncation_and_most_corruptions_are_refused_whole() {
        let entries = log(1, 6);
        let extras = encode(&entries).unwrap();
        let body = &extras[0].1;
        for cut in 0..body.len() {
            let r = decode(&[(EXTRA_DISK_LOG, body[..cut].to_vec())], 1);
            assert!(r.is_err(), "cut at {cut} accepted");
        }
        // any change of a header or padding byte is refused; data bytes are the payload
        // (the frame's crc32 covers them)
        let mut data_bytes = std::collections::HashSet::new();
        let mut off = RECORD_HEADER;
        for e in &entries {
            off += ENTRY_HEADER;
            if let DiskOp::Write(d) = &e.op {
                data_bytes.extend(off..off + d.len());
                off += padded(d.len());
            }
        }
        for i in 0..body.len() {
            let mut b = body.clone();
            b[i] ^= 0x40;
            let r = decode(&[(EXTRA_DISK_LOG, b)], 1);
            if data_bytes.contains(&i) {
                assert!(r.is_ok());
            } else if let Ok(got) = r {
                // sector and devid numbers are free fields: the change shows in the result
                assert_ne!(got, entries, "corrupt byte {i} decoded to the same log");
            }
        }
    }

    #[test]
    fn lying_counts_do_not_allocate() {
        let mut body = Vec::new();
        body.extend_from_slice(&DISK_LOG_VERSION.to_le_bytes());
        body.extend_from_slice(&u32::MAX.to_le_bytes());
        body.extend_from_slice(&[0u8; 64]);
        assert!(matches!(
            decode(&[(EXTRA_DISK_LOG, body)], 1),
            Err(DiskLogError::BadRecord { .. })
        ));
    }
}
