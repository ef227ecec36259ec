//! libxc's migration stream v3 (`docs/specs/libxc-migration-stream.pandoc`,
//! `tools/libs/guest/xg_sr_stream_format.h`).
//!
//! Image header (24 octets, big-endian): `u64 marker ~0`, `u32 id "XENF"`, `u32 version`,
//! `u16 options` (bit 0 big-endian), reserved. Domain header (16 octets, little-endian):
//! `u32 type` (1 x86 PV, 2 x86 HVM; Xen 4.17 saves PVH guests as x86 HVM), `u16 page_shift`,
//! reserved, `u32 xen_major`, `u32 xen_minor`. Records: `{u32 type, u32 length}`, body, zero
//! padding to 8; bit 31 of the type marks an optional record, which a reader that does not know
//! it may skip; an unknown mandatory record is fatal.

use std::io::{Read, Write};

use serde::Serialize;
use thiserror::Error;
use zerocopy::byteorder::big_endian::{U16 as BeU16, U32 as BeU32, U64 as BeU64};
use zerocopy::byteorder::little_endian::{U16 as LeU16, U32 as LeU32, U64 as LeU64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::frame::{self, FrameError};
use crate::{Limits, MAX_PAGES_PER_RECORD, PAGE_SHIFT, PAGE_SIZE};

/// `IHDR_MARKER`.
pub const IHDR_MARKER: u64 = u64::MAX;
/// `IHDR_ID` ("XENF").
pub const IHDR_ID: u32 = 0x5845_4E46;
/// The version we write (Xen 4.17 writes 3 and restores 2 and 3).
pub const IHDR_VERSION: u32 = 3;
/// `IHDR_OPT_BIG_ENDIAN`.
pub const IHDR_OPT_BIG_ENDIAN: u16 = 1;
/// Size of the image header.
pub const IMAGE_HEADER_LEN: usize = 24;
/// Size of the domain header.
pub const DOMAIN_HEADER_LEN: usize = 16;

/// Bit 31 of a record type: the record is optional.
pub const REC_OPTIONAL: u32 = 0x8000_0000;
/// `END`.
pub const REC_END: u32 = 0x00;
/// `PAGE_DATA`.
pub const REC_PAGE_DATA: u32 = 0x01;
/// `X86_PV_INFO`.
pub const REC_X86_PV_INFO: u32 = 0x02;
/// `X86_PV_P2M_FRAMES`.
pub const REC_X86_PV_P2M_FRAMES: u32 = 0x03;
/// `X86_PV_VCPU_BASIC`.
pub const REC_X86_PV_VCPU_BASIC: u32 = 0x04;
/// `X86_PV_VCPU_EXTENDED`.
pub const REC_X86_PV_VCPU_EXTENDED: u32 = 0x05;
/// `X86_PV_VCPU_XSAVE`.
pub const REC_X86_PV_VCPU_XSAVE: u32 = 0x06;
/// `SHARED_INFO`.
pub const REC_SHARED_INFO: u32 = 0x07;
/// `X86_TSC_INFO`.
pub const REC_X86_TSC_INFO: u32 = 0x08;
/// `HVM_CONTEXT`.
pub const REC_HVM_CONTEXT: u32 = 0x09;
/// `HVM_PARAMS`.
pub const REC_HVM_PARAMS: u32 = 0x0A;
/// `TOOLSTACK` (obsolete).
pub const REC_TOOLSTACK: u32 = 0x0B;
/// `X86_PV_VCPU_MSRS`.
pub const REC_X86_PV_VCPU_MSRS: u32 = 0x0C;
/// `VERIFY`.
pub const REC_VERIFY: u32 = 0x0D;
/// `CHECKPOINT`.
pub const REC_CHECKPOINT: u32 = 0x0E;
/// `CHECKPOINT_DIRTY_PFN_LIST`.
pub const REC_CHECKPOINT_DIRTY_PFN_LIST: u32 = 0x0F;
/// `STATIC_DATA_END`.
pub const REC_STATIC_DATA_END: u32 = 0x10;
/// `X86_CPUID_POLICY`.
pub const REC_X86_CPUID_POLICY: u32 = 0x11;
/// `X86_MSR_POLICY`.
pub const REC_X86_MSR_POLICY: u32 = 0x12;

/// Bits 51-0 of a `PAGE_DATA` pfn entry.
pub const PFN_MASK: u64 = 0x000f_ffff_ffff_ffff;
/// Size of one `HVM_PARAMS` entry.
const HVM_PARAM_ENTRY_LEN: usize = 16;
/// Size of a `TSC_INFO` body.
pub const TSC_INFO_LEN: usize = 24;

/// Errors of the libxc stream codec.
#[derive(Debug, Error)]
pub enum LibxcError {
    /// Framing or I/O failure.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// Bad image header marker.
    #[error("libxc image header: marker {found:#018x}, expected {IHDR_MARKER:#018x}")]
    BadMarker {
        /// Marker read.
        found: u64,
    },
    /// Bad image header id.
    #[error("libxc image header: id {found:#010x}, expected {IHDR_ID:#010x} (\"XENF\")")]
    BadId {
        /// Id read.
        found: u32,
    },
    /// Unsupported version.
    #[error("libxc image header: version {found}, supported 2 and 3")]
    BadVersion {
        /// Version read.
        found: u32,
    },
    /// Big-endian image.
    #[error("libxc image header: options {options:#x} say big-endian, which Xen cannot restore")]
    BigEndian {
        /// Options read.
        options: u16,
    },
    /// Unknown domain type.
    #[error("libxc domain header: type {found:#x} is neither x86 PV (1) nor x86 HVM (2)")]
    BadDomainType {
        /// Type read.
        found: u32,
    },
    /// Page size other than 4 KiB.
    #[error("libxc domain header: page_shift {found}, only {PAGE_SHIFT} (4 KiB) is supported")]
    BadPageShift {
        /// Shift read.
        found: u16,
    },
    /// A mandatory record this decoder does not know.
    #[error("libxc stream: unknown mandatory record type {rtype:#010x} (length {length})")]
    UnknownMandatory {
        /// Type.
        rtype: u32,
        /// Length.
        length: u32,
    },
    /// A record's length does not fit its type.
    #[error("libxc {name} record: length {length} invalid: {why}")]
    BadLength {
        /// Record name.
        name: &'static str,
        /// Length read.
        length: usize,
        /// What is wrong.
        why: String,
    },
    /// `PAGE_DATA` page count outside 1..=1024.
    #[error("libxc PAGE_DATA record: count {count} outside 1..={MAX_PAGES_PER_RECORD}")]
    BadPageCount {
        /// Count read.
        count: u32,
    },
    /// A reserved page type.
    #[error("libxc PAGE_DATA record: pfn {pfn:#x} (index {index}) has reserved type {ptype:#x}")]
    BadPageType {
        /// Pfn.
        pfn: u64,
        /// Index in the record.
        index: usize,
        /// Type nibble.
        ptype: u8,
    },
    /// Encoding request that cannot be expressed in the format.
    #[error("libxc encode: {0}")]
    Encode(String),
    /// A malformed HVM context blob.
    #[error("HVM context: {0}")]
    BadHvmContext(String),
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawImageHeader {
    marker: BeU64,
    id: BeU32,
    version: BeU32,
    options: BeU16,
    res1: BeU16,
    res2: BeU32,
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawDomainHeader {
    dtype: LeU32,
    page_shift: LeU16,
    res1: LeU16,
    xen_major: LeU32,
    xen_minor: LeU32,
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawTscInfo {
    mode: LeU32,
    khz: LeU32,
    nsec: LeU64,
    incarnation: LeU32,
    res1: LeU32,
}

/// The image header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ImageHeader {
    /// Stream version (2 or 3).
    pub version: u32,
}

impl ImageHeader {
    /// Reads and checks the image header.
    pub fn read<R: Read + ?Sized>(r: &mut R) -> Result<Self, LibxcError> {
        let mut buf = [0u8; IMAGE_HEADER_LEN];
        frame::read_exact(r, &mut buf, "libxc image header")?;
        let raw: RawImageHeader = zerocopy::transmute!(buf);
        if raw.marker.get() != IHDR_MARKER {
            return Err(LibxcError::BadMarker {
                found: raw.marker.get(),
            });
        }
        if raw.id.get() != IHDR_ID {
            return Err(LibxcError::BadId {
                found: raw.id.get(),
            });
        }
        let version = raw.version.get();
        if !(2..=3).contains(&version) {
            return Err(LibxcError::BadVersion { found: version });
        }
        if raw.options.get() & IHDR_OPT_BIG_ENDIAN != 0 {
            return Err(LibxcError::BigEndian {
                options: raw.options.get(),
            });
        }
        Ok(ImageHeader { version })
    }

    /// Writes a version-3 little-endian image header.
    pub fn write<W: Write + ?Sized>(w: &mut W) -> Result<(), LibxcError> {
        let raw = RawImageHeader {
            marker: BeU64::new(IHDR_MARKER),
            id: BeU32::new(IHDR_ID),
            version: BeU32::new(IHDR_VERSION),
            options: BeU16::new(0),
            res1: BeU16::new(0),
            res2: BeU32::new(0),
        };
        w.write_all(raw.as_bytes())
            .map_err(|source| FrameError::Io {
                what: "libxc image header",
                error: source,
            })?;
        Ok(())
    }
}

/// libxc's domain type. Xen 4.17 has no PVH type: PVH guests are saved as [`DomainType::X86Hvm`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum DomainType {
    /// `DHDR_TYPE_X86_PV`.
    X86Pv,
    /// `DHDR_TYPE_X86_HVM` (HVM and PVH guests).
    X86Hvm,
}

impl DomainType {
    /// Wire code.
    pub fn code(self) -> u32 {
        match self {
            DomainType::X86Pv => 1,
            DomainType::X86Hvm => 2,
        }
    }
}

/// The domain header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DomainHeader {
    /// Domain type.
    pub domain_type: DomainType,
    /// `log2` of the page size (always 12 here).
    pub page_shift: u16,
    /// Xen major version of the saving host (0 for converted legacy streams).
    pub xen_major: u32,
    /// Xen minor version of the saving host.
    pub xen_minor: u32,
}

impl DomainHeader {
    /// An x86 HVM (or PVH) header for Xen `major.minor`.
    pub fn hvm(xen_major: u32, xen_minor: u32) -> Self {
        DomainHeader {
            domain_type: DomainType::X86Hvm,
            page_shift: PAGE_SHIFT,
            xen_major,
            xen_minor,
        }
    }

    /// Reads and checks the domain header.
    pub fn read<R: Read + ?Sized>(r: &mut R) -> Result<Self, LibxcError> {
        let mut buf = [0u8; DOMAIN_HEADER_LEN];
        frame::read_exact(r, &mut buf, "libxc domain header")?;
        let raw: RawDomainHeader = zerocopy::transmute!(buf);
        let domain_type = match raw.dtype.get() {
            1 => DomainType::X86Pv,
            2 => DomainType::X86Hvm,
            found => return Err(LibxcError::BadDomainType { found }),
        };
        let page_shift = raw.page_shift.get();
        if page_shift != PAGE_SHIFT {
            return Err(LibxcError::BadPageShift { found: page_shift });
        }
        Ok(DomainHeader {
            domain_type,
            page_shift,
            xen_major: raw.xen_major.get(),
            xen_minor: raw.xen_minor.get(),
        })
    }

    /// Writes the domain header.
    pub fn write<W: Write + ?Sized>(&self, w: &mut W) -> Result<(), LibxcError> {
        if self.page_shift != PAGE_SHIFT {
            return Err(LibxcError::BadPageShift {
                found: self.page_shift,
            });
        }
        let raw = RawDomainHeader {
            dtype: LeU32::new(self.domain_type.code()),
            page_shift: LeU16::new(self.page_shift),
            res1: LeU16::new(0),
            xen_major: LeU32::new(self.xen_major),
            xen_minor: LeU32::new(self.xen_minor),
        };
        w.write_all(raw.as_bytes())
            .map_err(|source| FrameError::Io {
                what: "libxc domain header",
                error: source,
            })?;
        Ok(())
    }
}

/// Page type of a `PAGE_DATA` entry (`XEN_DOMCTL_PFINFO_*` >> 28, in bits 63-60 of the entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct PageType(u8);

impl PageType {
    /// Normal page.
    pub const NOTAB: PageType = PageType(0x0);
    /// Broken page (no data).
    pub const BROKEN: PageType = PageType(0xD);
    /// Allocate only (no data).
    pub const XALLOC: PageType = PageType(0xE);
    /// Invalid page (no data).
    pub const XTAB: PageType = PageType(0xF);

    /// A type from its 4-bit code; the reserved codes 5-8 are refused.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            0..=4 | 9..=0xF => Some(PageType(code)),
            _ => None,
        }
    }

    /// The 4-bit code.
    pub fn code(self) -> u8 {
        self.0
    }

    /// Whether page contents follow in the record for this type.
    pub fn carries_data(self) -> bool {
        !matches!(self.0, 0xD..=0xF)
    }

    /// Name as in the spec.
    pub fn name(self) -> &'static str {
        match self.0 {
            0x0 => "NOTAB",
            0x1 => "L1TAB",
            0x2 => "L2TAB",
            0x3 => "L3TAB",
            0x4 => "L4TAB",
            0x9 => "L1TAB_PIN",
            0xA => "L2TAB_PIN",
            0xB => "L3TAB_PIN",
            0xC => "L4TAB_PIN",
            0xD => "BROKEN",
            0xE => "XALLOC",
            0xF => "XTAB",
            _ => "RESERVED",
        }
    }
}

/// A `PAGE_DATA` record: pfns with types, and the contents of the pages whose type carries data,
/// in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageData {
    /// `(pfn, type)` per entry.
    pub entries: Vec<(u64, PageType)>,
    /// `PAGE_SIZE` bytes per entry whose type carries data.
    pub data: Vec<u8>,
}

impl PageData {
    /// Iterates over `(pfn, type, contents)`; contents are `None` for types without data.
    pub fn pages(&self) -> impl Iterator<Item = (u64, PageType, Option<&[u8]>)> + '_ {
        let mut chunks = self.data.chunks_exact(PAGE_SIZE);
        self.entries.iter().map(move |&(pfn, t)| {
            let data = if t.carries_data() {
                chunks.next()
            } else {
                None
            };
            (pfn, t, data)
        })
    }

    /// Number of entries with contents.
    pub fn present(&self) -> usize {
        self.entries
            .iter()
            .filter(|(_, t)| t.carries_data())
            .count()
    }

    /// Decodes the body of a `PAGE_DATA` record.
    pub fn decode(body: &[u8]) -> Result<Self, LibxcError> {
        let (entries, data_off) = Self::decode_entries(body)?;
        Ok(PageData {
            entries,
            data: body[data_off..].to_vec(),
        })
    }

    /// Checks a `PAGE_DATA` body and decodes its entries without copying page contents; returns
    /// the entries and the offset of the first page's contents in `body` (the contents of the
    /// entries that carry data follow there, [`PAGE_SIZE`] bytes each).
    pub fn decode_entries(body: &[u8]) -> Result<(Vec<(u64, PageType)>, usize), LibxcError> {
        let bad = |why: String| LibxcError::BadLength {
            name: "PAGE_DATA",
            length: body.len(),
            why,
        };
        if body.len() < 8 {
            return Err(bad("shorter than the 8-byte header".into()));
        }
        let count = u32::from_le_bytes([body[0], body[1], body[2], body[3]]);
        if count == 0 || count > MAX_PAGES_PER_RECORD {
            return Err(LibxcError::BadPageCount { count });
        }
        let pfn_end = 8 + 8 * count as usize;
        if body.len() < pfn_end {
            return Err(bad(format!("too short for {count} pfn entries")));
        }
        let mut entries = Vec::with_capacity(count as usize);
        for (index, raw) in body[8..pfn_end].chunks_exact(8).enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(raw);
            let v = u64::from_le_bytes(b);
            let pfn = v & PFN_MASK;
            let code = (v >> 60) as u8;
            let ptype = PageType::from_code(code).ok_or(LibxcError::BadPageType {
                pfn,
                index,
                ptype: code,
            })?;
            entries.push((pfn, ptype));
        }
        let present = entries.iter().filter(|(_, t)| t.carries_data()).count();
        let expected = pfn_end + present * PAGE_SIZE;
        if body.len() != expected {
            return Err(bad(format!(
                "{count} entries with {present} pages of data need exactly {expected} bytes"
            )));
        }
        Ok((entries, pfn_end))
    }

    fn encode_header(&self) -> Result<Vec<u8>, LibxcError> {
        let count = self.entries.len();
        if count == 0 || count > MAX_PAGES_PER_RECORD as usize {
            return Err(LibxcError::BadPageCount {
                count: u32::try_from(count).unwrap_or(u32::MAX),
            });
        }
        if self.data.len() != self.present() * PAGE_SIZE {
            return Err(LibxcError::Encode(format!(
                "PAGE_DATA with {} data-carrying entries has {} bytes of data, expected {}",
                self.present(),
                self.data.len(),
                self.present() * PAGE_SIZE
            )));
        }
        let mut hdr = Vec::with_capacity(8 + 8 * count);
        hdr.extend_from_slice(&(count as u32).to_le_bytes());
        hdr.extend_from_slice(&0u32.to_le_bytes());
        for &(pfn, t) in &self.entries {
            if pfn & !PFN_MASK != 0 {
                return Err(LibxcError::Encode(format!(
                    "pfn {pfn:#x} does not fit in 52 bits"
                )));
            }
            hdr.extend_from_slice(&(pfn | (u64::from(t.code()) << 60)).to_le_bytes());
        }
        Ok(hdr)
    }
}

/// `X86_TSC_INFO`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct TscInfo {
    /// `TSC_MODE_*`.
    pub mode: u32,
    /// TSC frequency in kHz.
    pub khz: u32,
    /// Elapsed time in ns.
    pub nsec: u64,
    /// Incarnation.
    pub incarnation: u32,
}

/// One libxc record, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// `END`.
    End,
    /// `PAGE_DATA`.
    PageData(PageData),
    /// `X86_TSC_INFO`.
    TscInfo(TscInfo),
    /// `HVM_CONTEXT`: Xen's HVM save blob (see [`hvm_context_records`]).
    HvmContext(Vec<u8>),
    /// `HVM_PARAMS`: `(index, value)` pairs.
    HvmParams(Vec<(u64, u64)>),
    /// `X86_CPUID_POLICY` (opaque).
    X86CpuidPolicy(Vec<u8>),
    /// `X86_MSR_POLICY` (opaque).
    X86MsrPolicy(Vec<u8>),
    /// `STATIC_DATA_END`.
    StaticDataEnd,
    /// `CHECKPOINT`.
    Checkpoint,
    /// `CHECKPOINT_DIRTY_PFN_LIST`.
    CheckpointDirtyPfnList(Vec<u64>),
    /// `VERIFY`.
    Verify,
    /// A known mandatory record kept opaque (x86 PV records, `SHARED_INFO`, `TOOLSTACK`).
    Opaque {
        /// Type.
        rtype: u32,
        /// Body.
        body: Vec<u8>,
    },
    /// An optional record this decoder does not know; its body was read and dropped.
    SkippedOptional {
        /// Type.
        rtype: u32,
        /// Body length.
        length: u32,
    },
}

fn expect_len(name: &'static str, body: &[u8], want: usize) -> Result<(), LibxcError> {
    if body.len() != want {
        return Err(LibxcError::BadLength {
            name,
            length: body.len(),
            why: format!("expected {want}"),
        });
    }
    Ok(())
}

/// Decodes the body of an `HVM_PARAMS` record.
pub fn decode_hvm_params(body: &[u8]) -> Result<Vec<(u64, u64)>, LibxcError> {
    let bad = |why: String| LibxcError::BadLength {
        name: "HVM_PARAMS",
        length: body.len(),
        why,
    };
    if body.len() < 8 {
        return Err(bad("shorter than the 8-byte header".into()));
    }
    let count = u32::from_le_bytes([body[0], body[1], body[2], body[3]]) as usize;
    let want = count
        .checked_mul(HVM_PARAM_ENTRY_LEN)
        .and_then(|n| n.checked_add(8))
        .ok_or_else(|| bad(format!("count {count} overflows")))?;
    if body.len() != want {
        return Err(bad(format!("{count} entries need exactly {want} bytes")));
    }
    Ok(body[8..]
        .chunks_exact(HVM_PARAM_ENTRY_LEN)
        .map(|e| {
            let mut i = [0u8; 8];
            let mut v = [0u8; 8];
            i.copy_from_slice(&e[..8]);
            v.copy_from_slice(&e[8..]);
            (u64::from_le_bytes(i), u64::from_le_bytes(v))
        })
        .collect())
}

/// Encodes the body of an `HVM_PARAMS` record.
pub fn encode_hvm_params(params: &[(u64, u64)]) -> Result<Vec<u8>, LibxcError> {
    let count = u32::try_from(params.len())
        .map_err(|_| LibxcError::Encode(format!("{} HVM params", params.len())))?;
    let mut body = Vec::with_capacity(8 + params.len() * HVM_PARAM_ENTRY_LEN);
    body.extend_from_slice(&count.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    for (i, v) in params {
        body.extend_from_slice(&i.to_le_bytes());
        body.extend_from_slice(&v.to_le_bytes());
    }
    Ok(body)
}

impl Record {
    /// Decodes a record body of type `rtype`.
    pub fn decode(rtype: u32, body: Vec<u8>) -> Result<Self, LibxcError> {
        Ok(match rtype {
            REC_END => {
                expect_len("END", &body, 0)?;
                Record::End
            }
            REC_PAGE_DATA => Record::PageData(PageData::decode(&body)?),
            REC_X86_TSC_INFO => {
                expect_len("X86_TSC_INFO", &body, TSC_INFO_LEN)?;
                let raw =
                    RawTscInfo::read_from_bytes(&body[..]).map_err(|_| LibxcError::BadLength {
                        name: "X86_TSC_INFO",
                        length: body.len(),
                        why: format!("expected {TSC_INFO_LEN}"),
                    })?;
                Record::TscInfo(TscInfo {
                    mode: raw.mode.get(),
                    khz: raw.khz.get(),
                    nsec: raw.nsec.get(),
                    incarnation: raw.incarnation.get(),
                })
            }
            REC_HVM_CONTEXT => Record::HvmContext(body),
            REC_HVM_PARAMS => Record::HvmParams(decode_hvm_params(&body)?),
            REC_X86_CPUID_POLICY => Record::X86CpuidPolicy(body),
            REC_X86_MSR_POLICY => Record::X86MsrPolicy(body),
            REC_STATIC_DATA_END => {
                expect_len("STATIC_DATA_END", &body, 0)?;
                Record::StaticDataEnd
            }
            REC_CHECKPOINT => {
                expect_len("CHECKPOINT", &body, 0)?;
                Record::Checkpoint
            }
            REC_VERIFY => {
                expect_len("VERIFY", &body, 0)?;
                Record::Verify
            }
            REC_CHECKPOINT_DIRTY_PFN_LIST => {
                if body.len() % 8 != 0 {
                    return Err(LibxcError::BadLength {
                        name: "CHECKPOINT_DIRTY_PFN_LIST",
                        length: body.len(),
                        why: "not a multiple of 8".into(),
                    });
                }
                Record::CheckpointDirtyPfnList(
                    body.chunks_exact(8)
                        .map(|c| {
                            let mut b = [0u8; 8];
                            b.copy_from_slice(c);
                            u64::from_le_bytes(b)
                        })
                        .collect(),
                )
            }
            REC_X86_PV_INFO..=REC_SHARED_INFO | REC_TOOLSTACK | REC_X86_PV_VCPU_MSRS => {
                Record::Opaque { rtype, body }
            }
            _ if rtype & REC_OPTIONAL != 0 => Record::SkippedOptional {
                rtype,
                length: u32::try_from(body.len()).unwrap_or(u32::MAX),
            },
            _ => {
                return Err(LibxcError::UnknownMandatory {
                    rtype,
                    length: u32::try_from(body.len()).unwrap_or(u32::MAX),
                })
            }
        })
    }

    /// Reads one record. Lengths are checked against `limits` before anything is read; the
    /// body of an unknown optional record is read in bounded chunks and dropped; an unknown
    /// mandatory record fails without its body being read.
    pub fn read<R: Read + ?Sized>(r: &mut R, limits: &Limits) -> Result<Self, LibxcError> {
        let (rtype, length) = frame::read_header(r, "libxc record header")?;
        if !is_known(rtype) {
            if rtype & REC_OPTIONAL == 0 {
                return Err(LibxcError::UnknownMandatory { rtype, length });
            }
            skip_body(r, rtype, length, limits)?;
            return Ok(Record::SkippedOptional { rtype, length });
        }
        let body = frame::read_body(r, rtype, length, limits.record_cap(), record_name(rtype))?;
        Record::decode(rtype, body)
    }

    /// The record's type code (for [`Record::SkippedOptional`] and [`Record::Opaque`] the
    /// original one).
    pub fn rtype(&self) -> u32 {
        match self {
            Record::End => REC_END,
            Record::PageData(_) => REC_PAGE_DATA,
            Record::TscInfo(_) => REC_X86_TSC_INFO,
            Record::HvmContext(_) => REC_HVM_CONTEXT,
            Record::HvmParams(_) => REC_HVM_PARAMS,
            Record::X86CpuidPolicy(_) => REC_X86_CPUID_POLICY,
            Record::X86MsrPolicy(_) => REC_X86_MSR_POLICY,
            Record::StaticDataEnd => REC_STATIC_DATA_END,
            Record::Checkpoint => REC_CHECKPOINT,
            Record::CheckpointDirtyPfnList(_) => REC_CHECKPOINT_DIRTY_PFN_LIST,
            Record::Verify => REC_VERIFY,
            Record::Opaque { rtype, .. } | Record::SkippedOptional { rtype, .. } => *rtype,
        }
    }

    /// Writes the record. [`Record::SkippedOptional`] cannot be written (its body is gone).
    pub fn write<W: Write + ?Sized>(&self, w: &mut W, limits: &Limits) -> Result<(), LibxcError> {
        let cap = limits.record_cap();
        let what = record_name(self.rtype());
        let rtype = self.rtype();
        match self {
            Record::End | Record::StaticDataEnd | Record::Checkpoint | Record::Verify => {
                frame::write_record(w, rtype, &[], cap, what)?;
            }
            Record::PageData(pd) => {
                let hdr = pd.encode_header()?;
                frame::write_record(w, rtype, &[&hdr, &pd.data], cap, what)?;
            }
            Record::TscInfo(t) => {
                let raw = RawTscInfo {
                    mode: LeU32::new(t.mode),
                    khz: LeU32::new(t.khz),
                    nsec: LeU64::new(t.nsec),
                    incarnation: LeU32::new(t.incarnation),
                    res1: LeU32::new(0),
                };
                frame::write_record(w, rtype, &[raw.as_bytes()], cap, what)?;
            }
            Record::HvmContext(b)
            | Record::X86CpuidPolicy(b)
            | Record::X86MsrPolicy(b)
            | Record::Opaque { body: b, .. } => {
                frame::write_record(w, rtype, &[b], cap, what)?;
            }
            Record::HvmParams(p) => {
                let body = encode_hvm_params(p)?;
                frame::write_record(w, rtype, &[&body], cap, what)?;
            }
            Record::CheckpointDirtyPfnList(pfns) => {
                let body: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
                frame::write_record(w, rtype, &[&body], cap, what)?;
            }
            Record::SkippedOptional { rtype, .. } => {
                return Err(LibxcError::Encode(format!(
                    "cannot write skipped optional record {rtype:#010x}: its body was dropped"
                )));
            }
        }
        Ok(())
    }
}

/// Writes one `PAGE_DATA` record of normal pages straight from borrowed page buffers.
pub fn write_page_data<W: Write + ?Sized>(
    w: &mut W,
    pages: &[(u64, &[u8; PAGE_SIZE])],
    limits: &Limits,
) -> Result<usize, LibxcError> {
    let count = pages.len();
    if count == 0 || count > MAX_PAGES_PER_RECORD as usize {
        return Err(LibxcError::BadPageCount {
            count: u32::try_from(count).unwrap_or(u32::MAX),
        });
    }
    let mut hdr = Vec::with_capacity(8 + 8 * count);
    hdr.extend_from_slice(&(count as u32).to_le_bytes());
    hdr.extend_from_slice(&0u32.to_le_bytes());
    for &(pfn, _) in pages {
        if pfn & !PFN_MASK != 0 {
            return Err(LibxcError::Encode(format!(
                "pfn {pfn:#x} does not fit in 52 bits"
            )));
        }
        hdr.extend_from_slice(&pfn.to_le_bytes());
    }
    let mut parts: Vec<&[u8]> = Vec::with_capacity(count + 1);
    parts.push(&hdr);
    parts.extend(pages.iter().map(|(_, d)| &d[..]));
    Ok(frame::write_record(
        w,
        REC_PAGE_DATA,
        &parts,
        limits.record_cap(),
        "PAGE_DATA",
    )?)
}

fn skip_body<R: Read + ?Sized>(
    r: &mut R,
    rtype: u32,
    length: u32,
    limits: &Limits,
) -> Result<(), LibxcError> {
    let cap = limits.record_cap();
    if length > cap {
        return Err(FrameError::TooLong {
            what: "libxc optional",
            rtype,
            len: u64::from(length),
            cap,
        }
        .into());
    }
    let mut left = length as usize;
    let mut buf = [0u8; 4096];
    while left > 0 {
        let n = left.min(buf.len());
        frame::read_exact(r, &mut buf[..n], "libxc optional record body")?;
        left -= n;
    }
    frame::read_padding(r, rtype, length as usize, "libxc optional record")?;
    Ok(())
}

/// Whether `rtype` is a record type this decoder knows.
pub fn is_known(rtype: u32) -> bool {
    rtype <= REC_X86_MSR_POLICY
}

/// Human-readable name of a libxc record type.
pub fn record_name(rtype: u32) -> &'static str {
    match rtype {
        REC_END => "END",
        REC_PAGE_DATA => "PAGE_DATA",
        REC_X86_PV_INFO => "X86_PV_INFO",
        REC_X86_PV_P2M_FRAMES => "X86_PV_P2M_FRAMES",
        REC_X86_PV_VCPU_BASIC => "X86_PV_VCPU_BASIC",
        REC_X86_PV_VCPU_EXTENDED => "X86_PV_VCPU_EXTENDED",
        REC_X86_PV_VCPU_XSAVE => "X86_PV_VCPU_XSAVE",
        REC_SHARED_INFO => "SHARED_INFO",
        REC_X86_TSC_INFO => "X86_TSC_INFO",
        REC_HVM_CONTEXT => "HVM_CONTEXT",
        REC_HVM_PARAMS => "HVM_PARAMS",
        REC_TOOLSTACK => "TOOLSTACK",
        REC_X86_PV_VCPU_MSRS => "X86_PV_VCPU_MSRS",
        REC_VERIFY => "VERIFY",
        REC_CHECKPOINT => "CHECKPOINT",
        REC_CHECKPOINT_DIRTY_PFN_LIST => "CHECKPOINT_DIRTY_PFN_LIST",
        REC_STATIC_DATA_END => "STATIC_DATA_END",
        REC_X86_CPUID_POLICY => "X86_CPUID_POLICY",
        REC_X86_MSR_POLICY => "X86_MSR_POLICY",
        t if t & REC_OPTIONAL != 0 => crate::records::kemari_record_name(t),
        _ => "UNKNOWN",
    }
}

/// HVM save record type codes (`xen/include/public/arch-x86/hvm/save.h`).
pub mod hvm_save {
    /// `END`.
    pub const END: u16 = 0;
    /// `HEADER`.
    pub const HEADER: u16 = 1;
    /// `CPU` (one per vCPU).
    pub const CPU: u16 = 2;

    /// Name of an HVM save type code.
    pub fn name(code: u16) -> &'static str {
        match code {
            0 => "END",
            1 => "HEADER",
            2 => "CPU",
            3 => "PIC",
            4 => "IOAPIC",
            5 => "LAPIC",
            6 => "LAPIC_REGS",
            7 => "PCI_IRQ",
            8 => "ISA_IRQ",
            9 => "PCI_LINK",
            10 => "PIT",
            11 => "RTC",
            12 => "HPET",
            13 => "PMTIMER",
            14 => "MTRR",
            15 => "VIRIDIAN_DOMAIN",
            16 => "CPU_XSAVE",
            17 => "VIRIDIAN_VCPU",
            18 => "VMCE_VCPU",
            19 => "TSC_ADJUST",
            20 => "CPU_MSR",
            _ => "UNKNOWN",
        }
    }
}

/// One record inside an HVM context blob (`struct hvm_save_descriptor` + data).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct HvmSaveRecord {
    /// Type code ([`hvm_save`]).
    pub typecode: u16,
    /// Instance (vCPU number for per-vCPU types).
    pub instance: u16,
    /// Length of the data after the descriptor.
    pub length: u32,
    /// Offset of the data in the blob.
    pub offset: usize,
}

/// Walks the descriptors of an HVM context blob, up to and including its `END` record.
/// Fails if a descriptor or its data runs past the blob or no `END` is found.
pub fn hvm_context_records(ctx: &[u8]) -> Result<Vec<HvmSaveRecord>, LibxcError> {
    let mut out = Vec::new();
    let mut off = 0usize;
    loop {
        let desc = ctx.get(off..off + 8).ok_or_else(|| {
            LibxcError::BadHvmContext(format!(
                "descriptor at offset {off} runs past the end ({} bytes) without an END record",
                ctx.len()
            ))
        })?;
        let typecode = u16::from_le_bytes([desc[0], desc[1]]);
        let instance = u16::from_le_bytes([desc[2], desc[3]]);
        let length = u32::from_le_bytes([desc[4], desc[5], desc[6], desc[7]]);
        let data_off = off + 8;
        let end = data_off
            .checked_add(length as usize)
            .filter(|e| *e <= ctx.len())
            .ok_or_else(|| {
                LibxcError::BadHvmContext(format!(
                    "record {} (type {typecode}) at offset {off} claims {length} bytes, past the end ({} bytes)",
                    out.len(),
                    ctx.len()
                ))
            })?;
        out.push(HvmSaveRecord {
            typecode,
            instance,
            length,
            offset: data_off,
        });
        if typecode == hvm_save::END {
            return Ok(out);
        }
        off = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lim() -> Limits {
        Limits::default()
    }

    fn page(b: u8) -> Vec<u8> {
        vec![b; PAGE_SIZE]
    }

    fn sample_records() -> Vec<Record> {
        let mut data = page(1);
        data.extend(page(2));
        vec![
            Record::X86CpuidPolicy(vec![1, 2, 3, 4, 5]),
            Record::X86MsrPolicy(vec![9; 16]),
            Record::StaticDataEnd,
            Record::PageData(PageData {
                entries: vec![
                    (0x10, PageType::NOTAB),
                    (0x11, PageType::XTAB),
                    (0xfffff, PageType::NOTAB),
                    (0x12, PageType::BROKEN),
                ],
                data,
            }),
            Record::TscInfo(TscInfo {
                mode: 1,
                khz: 2_000_000,
                nsec: 123,
                incarnation: 4,
            }),
            Record::HvmContext(vec![7; 33]),
            Record::HvmParams(vec![(1, 2), (3, u64::MAX)]),
            Record::Checkpoint,
            Record::CheckpointDirtyPfnList(vec![1, 5, 9]),
            Record::Verify,
            Record::End,
        ]
    }

    #[test]
    fn headers_round_trip() {
        let mut out = Vec::new();
        ImageHeader::write(&mut out).unwrap();
        assert_eq!(&out[..8], &[0xff; 8]);
        assert_eq!(&out[8..12], b"XENF");
        DomainHeader::hvm(4, 17).write(&mut out).unwrap();
        let mut r = &out[..];
        assert_eq!(ImageHeader::read(&mut r).unwrap().version, 3);
        assert_eq!(
            DomainHeader::read(&mut r).unwrap(),
            DomainHeader::hvm(4, 17)
        );
    }

    #[test]
    fn hostile_headers() {
        let mut out = Vec::new();
        ImageHeader::write(&mut out).unwrap();
        let mut b = out.clone();
        b[0] = 0;
        assert!(matches!(
            ImageHeader::read(&mut &b[..]),
            Err(LibxcError::BadMarker { .. })
        ));
        let mut b = out.clone();
        b[8] = b'Y';
        assert!(matches!(
            ImageHeader::read(&mut &b[..]),
            Err(LibxcError::BadId { .. })
        ));
        let mut b = out.clone();
        b[15] = 4;
        assert!(matches!(
            ImageHeader::read(&mut &b[..]),
            Err(LibxcError::BadVersion { found: 4 })
        ));
        let mut b = out.clone();
        b[17] = 1;
        assert!(matches!(
            ImageHeader::read(&mut &b[..]),
            Err(LibxcError::BigEndian { .. })
        ));
        let mut d = Vec::new();
        DomainHeader::hvm(4, 17).write(&mut d).unwrap();
        let mut b = d.clone();
        b[0] = 3;
        assert!(matches!(
            DomainHeader::read(&mut &b[..]),
            Err(LibxcError::BadDomainType { found: 3 })
        ));
        let mut b = d.clone();
        b[4] = 21;
        assert!(matches!(
            DomainHeader::read(&mut &b[..]),
            Err(LibxcError::BadPageShift { found: 21 })
        ));
    }

    #[test]
    fn records_round_trip() {
        let mut out = Vec::new();
        for r in sample_records() {
            r.write(&mut out, &lim()).unwrap();
        }
        let mut r = &out[..];
        for want in sample_records() {
            assert_eq!(Record::read(&mut r, &lim()).unwrap(), want);
        }
        assert!(r.is_empty());
        for cut in 0..out.len() {
            let mut r = &out[..cut];
            let mut n = 0;
            while Record::read(&mut r, &lim()).is_ok() {
                n += 1;
            }
            assert!(n < sample_records().len(), "cut at {cut}");
        }
    }

    #[test]
    fn write_page_data_matches_generic_encoding() {
        let a = [3u8; PAGE_SIZE];
        let b = [4u8; PAGE_SIZE];
        let mut fast = Vec::new();
        write_page_data(&mut fast, &[(5, &a), (6, &b)], &lim()).unwrap();
        let mut data = a.to_vec();
        data.extend_from_slice(&b);
        let mut generic = Vec::new();
        Record::PageData(PageData {
            entries: vec![(5, PageType::NOTAB), (6, PageType::NOTAB)],
            data,
        })
        .write(&mut generic, &lim())
        .unwrap();
        assert_eq!(fast, generic);
        assert!(write_page_data(&mut fast, &[], &lim()).is_err());
    }

    #[test]
    fn optional_unknown_skipped_mandatory_unknown_fatal() {
        let mut out = Vec::new();
        frame::write_record(&mut out, REC_OPTIONAL | 0x7777, &[b"hello"], 100, "t").unwrap();
        Record::End.write(&mut out, &lim()).unwrap();
        let mut r = &out[..];
        assert_eq!(
            Record::read(&mut r, &lim()).unwrap(),
            Record::SkippedOptional {
                rtype: REC_OPTIONAL | 0x7777,
                length: 5
            }
        );
        assert_eq!(Record::read(&mut r, &lim()).unwrap(), Record::End);
        let mut out = Vec::new();
        frame::write_record(&mut out, 0x7777, &[b"hello"], 100, "t").unwrap();
        assert!(matches!(
            Record::read(&mut &out[..], &lim()),
            Err(LibxcError::UnknownMandatory {
                rtype: 0x7777,
                length: 5
            })
        ));
    }

    #[test]
    fn hostile_page_data() {
        let rec = |body: &[u8]| {
            let mut out = Vec::new();
            frame::write_record(&mut out, REC_PAGE_DATA, &[body], u32::MAX, "t").unwrap();
            Record::read(&mut &out[..], &lim())
        };
        assert!(matches!(
            rec(&[0, 0, 0, 0, 0, 0, 0, 0]),
            Err(LibxcError::BadPageCount { count: 0 })
        ));
        assert!(matches!(
            rec(&[1, 4, 0, 0, 0, 0, 0, 0]),
            Err(LibxcError::BadPageCount { count: 1025 })
        ));
        // One pfn claimed, no page data.
        let mut b = vec![1, 0, 0, 0, 0, 0, 0, 0];
        b.extend_from_slice(&7u64.to_le_bytes());
        assert!(matches!(rec(&b), Err(LibxcError::BadLength { .. })));
        // Reserved type 5.
        let mut b = vec![1, 0, 0, 0, 0, 0, 0, 0];
        b.extend_from_slice(&(7u64 | 5 << 60).to_le_bytes());
        b.extend(page(0));
        assert!(matches!(
            rec(&b),
            Err(LibxcError::BadPageType { ptype: 5, .. })
        ));
        // XTAB with data attached is too long.
        let mut b = vec![1, 0, 0, 0, 0, 0, 0, 0];
        b.extend_from_slice(&(7u64 | 0xF << 60).to_le_bytes());
        b.extend(page(0));
        assert!(matches!(rec(&b), Err(LibxcError::BadLength { .. })));
        // Huge claimed length on a short stream.
        let h = frame::header_bytes(REC_PAGE_DATA, u32::MAX);
        assert!(matches!(
            Record::read(&mut &h[..], &lim()),
            Err(LibxcError::Frame(FrameError::TooLong { .. }))
        ));
        let small = Limits {
            max_record_len: 1000,
            ..lim()
        };
        let h = frame::header_bytes(REC_HVM_CONTEXT, 1001);
        assert!(matches!(
            Record::read(&mut &h[..], &small),
            Err(LibxcError::Frame(FrameError::TooLong { cap: 1000, .. }))
        ));
    }

    #[test]
    fn hostile_params_and_tsc() {
        assert!(decode_hvm_params(&[2, 0, 0, 0, 0, 0, 0, 0]).is_err());
        assert!(decode_hvm_params(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]).is_err());
        assert!(Record::decode(REC_X86_TSC_INFO, vec![0; 23]).is_err());
        assert!(Record::decode(REC_END, vec![0; 8]).is_err());
        assert!(Record::decode(REC_CHECKPOINT_DIRTY_PFN_LIST, vec![0; 7]).is_err());
    }

    #[test]
    fn hvm_context_walk() {
        let mut blob = Vec::new();
        for (t, i, len) in [(1u16, 0u16, 24u32), (2, 0, 16), (2, 1, 16), (0, 0, 0)] {
            blob.extend_from_slice(&t.to_le_bytes());
            blob.extend_from_slice(&i.to_le_bytes());
            blob.extend_from_slice(&len.to_le_bytes());
            blob.extend(vec![0u8; len as usize]);
        }
        let recs = hvm_context_records(&blob).unwrap();
        assert_eq!(recs.len(), 4);
        assert_eq!(
            recs.iter().filter(|r| r.typecode == hvm_save::CPU).count(),
            2
        );
        assert!(hvm_context_records(&blob[..blob.len() - 8]).is_err());
        let mut bad = blob.clone();
        bad[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(hvm_context_records(&bad).is_err());
    }
}
