//! Xen's HVM save format, the blob of [`DomainControl::hvm_context`](crate::DomainControl::hvm_context).
//!
//! A sequence of records, each an 8-byte descriptor `struct hvm_save_descriptor { u16
//! typecode; u16 instance; u32 length; }` (little-endian, packed) followed by `length` bytes
//! of body, no padding, ending with an `END` record (typecode 0, instance 0, length 0).
//! Per-vCPU records (`CPU`, `LAPIC`, ...) have one instance per vCPU.

use thiserror::Error;

/// Typecode of the terminating record.
pub const HVM_SAVE_END: u16 = 0;
/// Typecode of the header record (`struct hvm_save_header`, first in every context).
pub const HVM_SAVE_HEADER: u16 = 1;
/// Typecode of the per-vCPU register record (`struct hvm_hw_cpu`).
pub const HVM_SAVE_CPU: u16 = 2;
/// `magic` of `struct hvm_save_header`.
pub const HVM_FILE_MAGIC: u32 = 0x5438_1286;
/// Size of a descriptor.
pub const DESCRIPTOR_SIZE: usize = 8;

/// A malformed HVM context.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HvmSaveError {
    /// A descriptor or body runs past the end of the blob.
    #[error(
        "HVM context truncated: record at offset {offset} needs {needed} bytes, {available} left"
    )]
    Truncated {
        /// Offset of the record's descriptor.
        offset: usize,
        /// Bytes the record needs (descriptor + body).
        needed: usize,
        /// Bytes left from `offset`.
        available: usize,
    },
    /// The blob ends without an `END` record.
    #[error("HVM context of {len} bytes has no END record")]
    MissingEnd {
        /// Length of the blob.
        len: usize,
    },
    /// Bytes follow the `END` record.
    #[error("HVM context has {extra} bytes after the END record at offset {offset}")]
    TrailingData {
        /// Offset of the END record.
        offset: usize,
        /// Bytes after it.
        extra: usize,
    },
    /// A body is too long for the `u32` length field.
    #[error("HVM record body of {len} bytes is too long")]
    BodyTooLong {
        /// Length of the body.
        len: usize,
    },
}

/// One record of an HVM context, borrowing its body from the blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HvmRecord<'a> {
    /// Kind of record (`HVM_SAVE_CODE(...)`).
    pub typecode: u16,
    /// Instance (vCPU number for per-vCPU records).
    pub instance: u16,
    /// The body.
    pub body: &'a [u8],
}

/// Splits a context into its records, excluding the final `END`, checking that it is
/// well-formed: every record complete, one `END` record, nothing after it.
pub fn parse(blob: &[u8]) -> Result<Vec<HvmRecord<'_>>, HvmSaveError> {
    let mut records = Vec::new();
    let mut offset = 0usize;
    loop {
        let rest = blob.get(offset..).unwrap_or(&[]);
        if rest.is_empty() {
            return Err(HvmSaveError::MissingEnd { len: blob.len() });
        }
        let Some(desc) = rest.get(..DESCRIPTOR_SIZE) else {
            return Err(HvmSaveError::Truncated {
                offset,
                needed: DESCRIPTOR_SIZE,
                available: rest.len(),
            });
        };
        let typecode = u16::from_le_bytes([desc[0], desc[1]]);
        let instance = u16::from_le_bytes([desc[2], desc[3]]);
        let length = u32::from_le_bytes([desc[4], desc[5], desc[6], desc[7]]) as usize;
        let needed = DESCRIPTOR_SIZE.saturating_add(length);
        let Some(body) = rest.get(DESCRIPTOR_SIZE..needed) else {
            return Err(HvmSaveError::Truncated {
                offset,
                needed,
                available: rest.len(),
            });
        };
        if typecode == HVM_SAVE_END {
            let extra = rest.len() - needed;
            if extra != 0 {
                return Err(HvmSaveError::TrailingData { offset, extra });
            }
            return Ok(records);
        }
        records.push(HvmRecord {
            typecode,
            instance,
            body,
        });
        offset += needed;
    }
}

/// The body of record (`typecode`, `instance`), as `xc_domain_hvm_getcontext_partial` returns
/// it; `Ok(None)` if the context has no such record.
pub fn find(blob: &[u8], typecode: u16, instance: u16) -> Result<Option<&[u8]>, HvmSaveError> {
    Ok(parse(blob)?
        .into_iter()
        .find(|r| r.typecode == typecode && r.instance == instance)
        .map(|r| r.body))
}

/// Builds a context record by record; [`finish`](Self::finish) appends the `END` record.
#[derive(Debug, Clone, Default)]
pub struct HvmContextBuilder {
    blob: Vec<u8>,
}

impl HvmContextBuilder {
    /// An empty context.
    pub fn new() -> HvmContextBuilder {
        HvmContextBuilder::default()
    }

    /// Appends one record.
    pub fn push(&mut self, typecode: u16, instance: u16, body: &[u8]) -> Result<(), HvmSaveError> {
        let length =
            u32::try_from(body.len()).map_err(|_| HvmSaveError::BodyTooLong { len: body.len() })?;
        self.blob.extend_from_slice(&typecode.to_le_bytes());
        self.blob.extend_from_slice(&instance.to_le_bytes());
        self.blob.extend_from_slice(&length.to_le_bytes());
        self.blob.extend_from_slice(body);
        Ok(())
    }

    /// Appends the `END` record and returns the blob.
    pub fn finish(mut self) -> Vec<u8> {
        self.blob.extend_from_slice(&[0u8; DESCRIPTOR_SIZE]);
        self.blob
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_parse_find_roundtrip() {
        let mut b = HvmContextBuilder::new();
        b.push(HVM_SAVE_HEADER, 0, &[1, 2, 3, 4]).unwrap();
        b.push(HVM_SAVE_CPU, 0, &[5; 10]).unwrap();
        b.push(HVM_SAVE_CPU, 1, &[6; 3]).unwrap();
        let blob = b.finish();
        assert_eq!(blob.len(), 3 * 8 + 4 + 10 + 3 + 8);
        let records = parse(&blob).unwrap();
        assert_eq!(records.len(), 3);
        assert_eq!(records[2].typecode, HVM_SAVE_CPU);
        assert_eq!(records[2].instance, 1);
        assert_eq!(find(&blob, HVM_SAVE_CPU, 1).unwrap(), Some(&[6u8; 3][..]));
        assert_eq!(find(&blob, HVM_SAVE_CPU, 2).unwrap(), None);
        // Little-endian descriptor of the first record.
        assert_eq!(&blob[..8], &[1, 0, 0, 0, 4, 0, 0, 0]);
    }

    #[test]
    fn malformed_contexts_are_rejected() {
        let mut b = HvmContextBuilder::new();
        b.push(HVM_SAVE_HEADER, 0, &[9; 16]).unwrap();
        let good = b.finish();
        assert_eq!(parse(&[]), Err(HvmSaveError::MissingEnd { len: 0 }));
        // Without the END record.
        assert_eq!(
            parse(&good[..good.len() - 8]),
            Err(HvmSaveError::MissingEnd { len: 24 })
        );
        // Body cut short.
        assert!(matches!(
            parse(&good[..20]),
            Err(HvmSaveError::Truncated {
                offset: 0,
                needed: 24,
                available: 20
            })
        ));
        // Half a descriptor.
        assert!(matches!(
            parse(&good[..28]),
            Err(HvmSaveError::Truncated {
                offset: 24,
                needed: 8,
                available: 4
            })
        ));
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(
            parse(&trailing),
            Err(HvmSaveError::TrailingData {
                offset: 24,
                extra: 1
            })
        );
    }
}
