//! The header `xl save` writes in front of the libxl stream (`tools/xl/xl.h`,
//! `save_domain_core_writeconfig`):
//!
//! ```text
//! magic[32]            "Xen saved domain, xl format\n \0 \r"
//! u32 byteorder        0x01020304 in the domain's (little-endian) byte order
//! u32 mandatory_flags  bit 0 JSON config, bit 1 stream v2; unknown bits => reject
//! u32 optional_flags
//! u32 optional_data_len
//! optional data:       u32 config_len, config_len bytes of config (JSON + NUL from xl save)
//! ```

use std::io::{Read, Write};

use thiserror::Error;
use zerocopy::byteorder::little_endian::U32;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::frame::{self, FrameError};
use crate::Limits;

/// `savefileheader_magic`.
pub const XL_MAGIC: [u8; 32] = *b"Xen saved domain, xl format\n \0 \r";
/// `SAVEFILE_BYTEORDER_VALUE`.
pub const XL_BYTEORDER: u32 = 0x0102_0304;
/// `XL_MANDATORY_FLAG_JSON`: the config is JSON.
pub const FLAG_JSON: u32 = 1 << 0;
/// `XL_MANDATORY_FLAG_STREAMv2`: a libxl v2 stream follows.
pub const FLAG_STREAM_V2: u32 = 1 << 1;
/// Every mandatory flag xl 4.17 knows.
pub const FLAG_ALL: u32 = FLAG_JSON | FLAG_STREAM_V2;
/// Size of the fixed part of the header.
pub const XL_HEADER_LEN: usize = 48;
/// Optional data beyond the config that we accept (and skip), on top of the config cap.
pub const MAX_EXTRA_OPTIONAL_DATA: u32 = 64 << 10;

/// Errors of the xl header codec.
#[derive(Debug, Error)]
pub enum XlError {
    /// Framing or I/O failure.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// Wrong magic: not an `xl save` file.
    #[error("xl save header: wrong magic {found:02x?} (not a file written by `xl save`?)")]
    BadMagic {
        /// The first 32 bytes found.
        found: [u8; 32],
    },
    /// Wrong byte-order marker.
    #[error("xl save header: byte-order marker {found:#010x}, expected {XL_BYTEORDER:#010x} (little-endian)")]
    BadByteOrder {
        /// The marker read.
        found: u32,
    },
    /// Mandatory flags this reader does not know.
    #[error("xl save header: unsupported mandatory flags {flags:#x} (known: {FLAG_ALL:#x})")]
    UnknownMandatoryFlags {
        /// The unknown bits.
        flags: u32,
    },
    /// The file is not followed by a libxl v2 stream.
    #[error("xl save header: mandatory flags {flags:#x} lack STREAMv2 (legacy pre-4.6 images are not supported)")]
    NotStreamV2 {
        /// The flags read.
        flags: u32,
    },
    /// Optional data longer than the limit.
    #[error("xl save header: optional data of {len} bytes exceeds the limit of {cap}")]
    OptionalDataTooLong {
        /// Claimed length.
        len: u32,
        /// Limit.
        cap: u64,
    },
    /// The config length does not fit in the optional data.
    #[error("xl save header: config length {config_len} does not fit in {available} bytes of optional data")]
    ConfigOverrun {
        /// Claimed config length.
        config_len: u32,
        /// Optional data after the length field.
        available: u32,
    },
    /// Config longer than the limit.
    #[error("xl save header: config of {len} bytes exceeds the limit of {cap}")]
    ConfigTooLong {
        /// Length.
        len: usize,
        /// Limit.
        cap: u32,
    },
    /// Optional data present but shorter than its 4-byte config length field.
    #[error(
        "xl save header: optional data of {len} bytes is too short for the config length field"
    )]
    OptionalDataTooShort {
        /// Its length.
        len: u32,
    },
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawXlHeader {
    magic: [u8; 32],
    byteorder: U32,
    mandatory_flags: U32,
    optional_flags: U32,
    optional_data_len: U32,
}

/// A decoded xl save header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XlHeader {
    /// Mandatory flags ([`FLAG_JSON`], [`FLAG_STREAM_V2`]).
    pub mandatory_flags: u32,
    /// Optional flags (xl 4.17 writes none).
    pub optional_flags: u32,
    /// The config as stored (`xl save` stores the JSON text plus a trailing NUL).
    pub config: Vec<u8>,
    /// Optional data after the config, kept as is (xl itself ignores it).
    pub extra_optional_data: Vec<u8>,
}

impl XlHeader {
    /// A header like `xl save` writes: JSON config (a NUL is appended on write), stream v2.
    pub fn new(config_json: &[u8]) -> Self {
        let mut config = config_json.to_vec();
        let mut mandatory_flags = FLAG_STREAM_V2;
        if !config.is_empty() {
            mandatory_flags |= FLAG_JSON;
            if config.last() != Some(&0) {
                config.push(0);
            }
        }
        XlHeader {
            mandatory_flags,
            optional_flags: 0,
            config,
            extra_optional_data: Vec::new(),
        }
    }

    /// The config without xl's trailing NUL.
    pub fn config_text(&self) -> &[u8] {
        match self.config.split_last() {
            Some((0, rest)) => rest,
            _ => &self.config,
        }
    }

    /// Whether the config is JSON ([`FLAG_JSON`]).
    pub fn config_is_json(&self) -> bool {
        self.mandatory_flags & FLAG_JSON != 0
    }

    /// Reads and checks a header; the config must fit `limits.max_config_len`.
    pub fn read<R: Read + ?Sized>(r: &mut R, limits: &Limits) -> Result<Self, XlError> {
        let mut buf = [0u8; XL_HEADER_LEN];
        frame::read_exact(r, &mut buf, "xl save header")?;
        let raw: RawXlHeader = zerocopy::transmute!(buf);
        if raw.magic != XL_MAGIC {
            return Err(XlError::BadMagic { found: raw.magic });
        }
        if raw.byteorder.get() != XL_BYTEORDER {
            return Err(XlError::BadByteOrder {
                found: raw.byteorder.get(),
            });
        }
        let mandatory_flags = raw.mandatory_flags.get();
        if mandatory_flags & !FLAG_ALL != 0 {
            return Err(XlError::UnknownMandatoryFlags {
                flags: mandatory_flags & !FLAG_ALL,
            });
        }
        if mandatory_flags & FLAG_STREAM_V2 == 0 {
            return Err(XlError::NotStreamV2 {
                flags: mandatory_flags,
            });
        }
        let opt_len = raw.optional_data_len.get();
        let cap = 4 + u64::from(limits.max_config_len) + u64::from(MAX_EXTRA_OPTIONAL_DATA);
        if u64::from(opt_len) > cap {
            return Err(XlError::OptionalDataTooLong { len: opt_len, cap });
        }
        let mut config = Vec::new();
        let mut extra_optional_data = Vec::new();
        if opt_len > 0 {
            if opt_len < 4 {
                return Err(XlError::OptionalDataTooShort { len: opt_len });
            }
            let mut lenbuf = [0u8; 4];
            frame::read_exact(r, &mut lenbuf, "xl config length")?;
            let config_len = u32::from_le_bytes(lenbuf);
            let available = opt_len - 4;
            if config_len > available {
                return Err(XlError::ConfigOverrun {
                    config_len,
                    available,
                });
            }
            if config_len > limits.max_config_len {
                return Err(XlError::ConfigTooLong {
                    len: config_len as usize,
                    cap: limits.max_config_len,
                });
            }
            config = frame::read_vec(r, config_len as usize, "xl config")?;
            extra_optional_data =
                frame::read_vec(r, (available - config_len) as usize, "xl optional data")?;
        }
        Ok(XlHeader {
            mandatory_flags,
            optional_flags: raw.optional_flags.get(),
            config,
            extra_optional_data,
        })
    }

    /// Writes the header. Fails before writing if the config is longer than `limits` allows.
    pub fn write<W: Write + ?Sized>(&self, w: &mut W, limits: &Limits) -> Result<(), XlError> {
        if self.config.len() > limits.max_config_len as usize {
            return Err(XlError::ConfigTooLong {
                len: self.config.len(),
                cap: limits.max_config_len,
            });
        }
        let extra_len = self.extra_optional_data.len();
        if extra_len > MAX_EXTRA_OPTIONAL_DATA as usize {
            return Err(XlError::OptionalDataTooLong {
                len: u32::try_from(extra_len).unwrap_or(u32::MAX),
                cap: u64::from(MAX_EXTRA_OPTIONAL_DATA),
            });
        }
        // Both lengths are bounded above, so the sums fit in u32.
        let config_len = self.config.len() as u32;
        // Like xl: the config length field is always there, even for an empty config.
        let opt_len = 4 + config_len + extra_len as u32;
        let raw = RawXlHeader {
            magic: XL_MAGIC,
            byteorder: U32::new(XL_BYTEORDER),
            mandatory_flags: U32::new(self.mandatory_flags),
            optional_flags: U32::new(self.optional_flags),
            optional_data_len: U32::new(opt_len),
        };
        let io = |source| {
            XlError::Frame(FrameError::Io {
                what: "xl save header",
                error: source,
            })
        };
        w.write_all(raw.as_bytes()).map_err(io)?;
        {
            w.write_all(&config_len.to_le_bytes()).map_err(io)?;
            w.write_all(&self.config).map_err(io)?;
            w.write_all(&self.extra_optional_data).map_err(io)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(h: &XlHeader) -> Vec<u8> {
        let mut out = Vec::new();
        h.write(&mut out, &Limits::default()).unwrap();
        out
    }

    #[test]
    fn round_trip_matches_xl_layout() {
        let h = XlHeader::new(br#"{"c_info":{"type":"hvm"}}"#);
        let bytes = encode(&h);
        assert_eq!(&bytes[..32], &XL_MAGIC);
        assert_eq!(&bytes[32..36], &[4, 3, 2, 1]);
        assert_eq!(u32::from_le_bytes(bytes[36..40].try_into().unwrap()), 3);
        let opt = u32::from_le_bytes(bytes[44..48].try_into().unwrap());
        assert_eq!(opt as usize, 4 + h.config.len());
        assert_eq!(*bytes.last().unwrap(), 0, "config ends with NUL like xl's");
        let back = XlHeader::read(&mut &bytes[..], &Limits::default()).unwrap();
        assert_eq!(back, h);
        assert_eq!(back.config_text(), br#"{"c_info":{"type":"hvm"}}"#);
        assert!(back.config_is_json());
    }

    #[test]
    fn empty_config_keeps_length_field() {
        let h = XlHeader::new(b"");
        let bytes = encode(&h);
        assert_eq!(bytes.len(), XL_HEADER_LEN + 4);
        assert_eq!(h.mandatory_flags, FLAG_STREAM_V2);
        assert_eq!(
            XlHeader::read(&mut &bytes[..], &Limits::default()).unwrap(),
            h
        );
    }

    #[test]
    fn hostile_headers_rejected() {
        let good = encode(&XlHeader::new(b"{}"));
        let lim = Limits::default();
        let mut b = good.clone();
        b[0] = b'x';
        assert!(matches!(
            XlHeader::read(&mut &b[..], &lim),
            Err(XlError::BadMagic { .. })
        ));
        let mut b = good.clone();
        b[32..36].copy_from_slice(&[1, 2, 3, 4]);
        assert!(matches!(
            XlHeader::read(&mut &b[..], &lim),
            Err(XlError::BadByteOrder { found: 0x0403_0201 })
        ));
        let mut b = good.clone();
        b[36] |= 0x10;
        assert!(matches!(
            XlHeader::read(&mut &b[..], &lim),
            Err(XlError::UnknownMandatoryFlags { flags: 0x10 })
        ));
        let mut b = good.clone();
        b[36] = FLAG_JSON as u8;
        assert!(matches!(
            XlHeader::read(&mut &b[..], &lim),
            Err(XlError::NotStreamV2 { .. })
        ));
        let mut b = good.clone();
        b[44..48].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            XlHeader::read(&mut &b[..], &lim),
            Err(XlError::OptionalDataTooLong { .. })
        ));
        let mut b = good.clone();
        b[48..52].copy_from_slice(&100u32.to_le_bytes());
        assert!(matches!(
            XlHeader::read(&mut &b[..], &lim),
            Err(XlError::ConfigOverrun {
                config_len: 100,
                ..
            })
        ));
        let small = Limits {
            max_config_len: 2,
            ..Limits::default()
        };
        assert!(matches!(
            XlHeader::read(&mut &good[..], &small),
            Err(XlError::ConfigTooLong { len: 3, cap: 2 })
        ));
        for cut in 0..good.len() {
            assert!(
                XlHeader::read(&mut &good[..cut], &lim).is_err(),
                "truncated at {cut} accepted"
            );
        }
    }
}
