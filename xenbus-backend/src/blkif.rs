//! The blkif wire format (`xen/include/public/io/blkif.h`, x86_64 ABI) and the validation of
//! every request a guest puts on the ring.
//!
//! A ring entry is the union of a request (112 bytes) and a response (16 bytes). The backend
//! copies a whole request out of the shared page before looking at it (the guest may rewrite
//! the slot meanwhile), decodes it with [`parse_request`] against the disk's size, and answers
//! with a [`BlkifResponse`]. Nothing a guest writes can make the decoder panic or index out
//! of bounds: a malformed request becomes a [`BlkifError`], answered with
//! [`BLKIF_RSP_ERROR`] (or [`BLKIF_RSP_EOPNOTSUPP`] for an operation we do not offer).

use zerocopy::little_endian::{I16, U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::ring::RING_HEADER_SIZE;

/// `BLKIF_OP_READ`.
pub const BLKIF_OP_READ: u8 = 0;
/// `BLKIF_OP_WRITE`.
pub const BLKIF_OP_WRITE: u8 = 1;
/// `BLKIF_OP_WRITE_BARRIER`: ordered write (we serve it as write + `fdatasync`).
pub const BLKIF_OP_WRITE_BARRIER: u8 = 2;
/// `BLKIF_OP_FLUSH_DISKCACHE`: flush, optionally carrying data to write first (Linux sends
/// FUA writes this way).
pub const BLKIF_OP_FLUSH_DISKCACHE: u8 = 3;
/// `BLKIF_OP_DISCARD`.
pub const BLKIF_OP_DISCARD: u8 = 5;
/// `BLKIF_OP_INDIRECT`: segments in separately granted pages.
pub const BLKIF_OP_INDIRECT: u8 = 6;

/// `BLKIF_RSP_OKAY`.
pub const BLKIF_RSP_OKAY: i16 = 0;
/// `BLKIF_RSP_ERROR`.
pub const BLKIF_RSP_ERROR: i16 = -1;
/// `BLKIF_RSP_EOPNOTSUPP`.
pub const BLKIF_RSP_EOPNOTSUPP: i16 = -2;

/// `BLKIF_MAX_SEGMENTS_PER_REQUEST`.
pub const BLKIF_MAX_SEGMENTS_PER_REQUEST: usize = 11;
/// `BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST`.
pub const BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST: usize = 8;
/// Segment descriptors per indirect page (`PAGE_SIZE / sizeof(struct blkif_request_segment)`).
pub const SEGMENTS_PER_INDIRECT_PAGE: usize = hypervisor::PAGE_SIZE / SEGMENT_SIZE;
/// Indirect segments this backend accepts per request (advertised in
/// `feature-max-indirect-segments`; Linux's blkback offers the same 256).
pub const MAX_INDIRECT_SEGMENTS: usize = 256;

/// Sector unit of every blkif field (`sector_number`, `first_sect`, `last_sect`, `sectors`).
pub const SECTOR_SIZE: u64 = 512;
/// Sectors per page (`last_sect` is at most this minus one).
pub const SECTORS_PER_PAGE: u8 = (hypervisor::PAGE_SIZE as u64 / SECTOR_SIZE) as u8;

/// `VDISK_READONLY`, in the backend's `info` node.
pub const VDISK_READONLY: u32 = 0x4;

/// Size of one ring entry (the request/response union).
pub const ENTRY_SIZE: usize = 112;
/// Size of `struct blkif_request_segment`.
pub const SEGMENT_SIZE: usize = 8;

/// Entries of a blkif ring of `pages` pages (`__RING_SIZE`: header off, rounded down to a power
/// of two): 32 for one page.
pub fn ring_entries(pages: usize) -> u32 {
    crate::ring::ring_size(pages * hypervisor::PAGE_SIZE, ENTRY_SIZE)
}

/// `struct blkif_request_segment`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct RawSegment {
    /// Grant reference of the data page.
    pub gref: U32,
    /// First 512-byte sector in the page (inclusive).
    pub first_sect: u8,
    /// Last 512-byte sector in the page (inclusive).
    pub last_sect: u8,
    /// Padding.
    pub pad: [u8; 2],
}

/// `struct blkif_request` (read/write/flush/barrier).
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct RawRequest {
    /// `BLKIF_OP_*`.
    pub operation: u8,
    /// Number of segments (read/write/flush with data).
    pub nr_segments: u8,
    /// Virtual device handle (not checked, as Linux's blkback).
    pub handle: U16,
    /// Padding (x86_64 alignment of `id`).
    pub pad: [u8; 4],
    /// Guest cookie, echoed in the response.
    pub id: U64,
    /// First sector on disk.
    pub sector_number: U64,
    /// Data segments.
    pub seg: [RawSegment; BLKIF_MAX_SEGMENTS_PER_REQUEST],
}

/// `struct blkif_request_discard`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct RawDiscard {
    /// `BLKIF_OP_DISCARD`.
    pub operation: u8,
    /// `BLKIF_DISCARD_SECURE` (1) or 0.
    pub flag: u8,
    /// Virtual device handle.
    pub handle: U16,
    /// Padding.
    pub pad: [u8; 4],
    /// Guest cookie.
    pub id: U64,
    /// First sector.
    pub sector_number: U64,
    /// Sectors to discard.
    pub nr_sectors: U64,
    /// Rest of the entry.
    pub tail: [u8; ENTRY_SIZE - 32],
}

/// `struct blkif_request_indirect`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct RawIndirect {
    /// `BLKIF_OP_INDIRECT`.
    pub operation: u8,
    /// `BLKIF_OP_READ` or `BLKIF_OP_WRITE`.
    pub indirect_op: u8,
    /// Number of segments, in the indirect pages.
    pub nr_segments: U16,
    /// Padding.
    pub pad1: [u8; 4],
    /// Guest cookie.
    pub id: U64,
    /// First sector.
    pub sector_number: U64,
    /// Virtual device handle.
    pub handle: U16,
    /// Padding.
    pub pad2: [u8; 2],
    /// Grant references of the pages holding the segment descriptors.
    pub indirect_grefs: [U32; BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST],
    /// Rest of the entry.
    pub tail: [u8; ENTRY_SIZE - 60],
}

/// `struct blkif_response`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct BlkifResponse {
    /// The request's `id`.
    pub id: U64,
    /// The request's `operation`.
    pub operation: u8,
    /// Padding.
    pub pad: u8,
    /// `BLKIF_RSP_*`.
    pub status: I16,
    /// Padding.
    pub pad2: [u8; 4],
}

impl BlkifResponse {
    /// A response to request `id` of `operation` with `status`.
    pub fn new(id: u64, operation: u8, status: i16) -> BlkifResponse {
        BlkifResponse {
            id: U64::new(id),
            operation,
            pad: 0,
            status: I16::new(status),
            pad2: [0; 4],
        }
    }
}

// Layout checks against blkif.h's x86_64 ABI.
const _: () = assert!(std::mem::size_of::<RawSegment>() == SEGMENT_SIZE);
const _: () = assert!(std::mem::size_of::<RawRequest>() == ENTRY_SIZE);
const _: () = assert!(std::mem::size_of::<RawDiscard>() == ENTRY_SIZE);
const _: () = assert!(std::mem::size_of::<RawIndirect>() == ENTRY_SIZE);
const _: () = assert!(std::mem::size_of::<BlkifResponse>() == 16);
const _: () = assert!(RING_HEADER_SIZE == 64);

/// Why a request was refused. Each becomes an error response; none ends the device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlkifError {
    /// An operation code this backend does not serve.
    #[error("request {id:#x}: operation {operation} is not supported")]
    UnsupportedOp {
        /// The request's cookie.
        id: u64,
        /// Its operation code.
        operation: u8,
    },
    /// A read or write without segments, or with more than the limit.
    #[error("request {id:#x} (op {operation}): {nr} segments, allowed {min}..={max}")]
    BadSegmentCount {
        /// The request's cookie.
        id: u64,
        /// Its operation code.
        operation: u8,
        /// Segments the request claims.
        nr: usize,
        /// Smallest count allowed for this operation.
        min: usize,
        /// Largest count allowed.
        max: usize,
    },
    /// A segment whose sector range is empty or leaves the page.
    #[error("request {id:#x}: segment {index} covers sectors {first}..={last} of a page of {SECTORS_PER_PAGE}")]
    BadSegment {
        /// The request's cookie.
        id: u64,
        /// Segment index.
        index: usize,
        /// Its `first_sect`.
        first: u8,
        /// Its `last_sect`.
        last: u8,
    },
    /// The request's sectors leave the disk.
    #[error("request {id:#x}: sectors {start}+{count} beyond the disk's {disk_sectors} sectors")]
    OutOfRange {
        /// The request's cookie.
        id: u64,
        /// First sector.
        start: u64,
        /// Sectors requested.
        count: u64,
        /// Size of the disk in sectors.
        disk_sectors: u64,
    },
    /// A write to a read-only device.
    #[error("request {id:#x}: write to a read-only disk")]
    ReadOnly {
        /// The request's cookie.
        id: u64,
    },
    /// An indirect request whose inner operation is not read or write.
    #[error("request {id:#x}: indirect operation {indirect_op} is not read or write")]
    BadIndirectOp {
        /// The request's cookie.
        id: u64,
        /// The inner operation.
        indirect_op: u8,
    },
}

impl BlkifError {
    /// The status to answer with.
    pub fn status(&self) -> i16 {
        match self {
            BlkifError::UnsupportedOp { .. } => BLKIF_RSP_EOPNOTSUPP,
            _ => BLKIF_RSP_ERROR,
        }
    }
}

/// A validated data segment: the grant and the byte range inside its page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Grant reference of the page.
    pub gref: hypervisor::GrantRef,
    /// First sector in the page.
    pub first_sect: u8,
    /// Last sector in the page (inclusive, `>= first_sect`, `< SECTORS_PER_PAGE`).
    pub last_sect: u8,
}

impl Segment {
    /// Checks a raw segment.
    pub fn validate(id: u64, index: usize, raw: &RawSegment) -> Result<Segment, BlkifError> {
        if raw.first_sect > raw.last_sect || raw.last_sect >= SECTORS_PER_PAGE {
            return Err(BlkifError::BadSegment {
                id,
                index,
                first: raw.first_sect,
                last: raw.last_sect,
            });
        }
        Ok(Segment {
            gref: raw.gref.get(),
            first_sect: raw.first_sect,
            last_sect: raw.last_sect,
        })
    }

    /// Sectors covered.
    pub fn sectors(&self) -> u64 {
        u64::from(self.last_sect - self.first_sect) + 1
    }

    /// Byte offset of the data in its page.
    pub fn page_offset(&self) -> usize {
        usize::from(self.first_sect) * SECTOR_SIZE as usize
    }

    /// Bytes covered.
    pub fn len(&self) -> usize {
        self.sectors() as usize * SECTOR_SIZE as usize
    }

    /// Never empty (validated); for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// Direction of a data transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Disk to guest.
    Read,
    /// Guest to disk.
    Write,
}

/// A decoded request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Read or write with segments in the ring entry; `flush` means `fdatasync` after the
    /// write (flush/barrier ops carrying data), and a flush with no data is `Flush`.
    Rw {
        /// The cookie.
        id: u64,
        /// The operation code to echo.
        operation: u8,
        /// Transfer direction.
        dir: Direction,
        /// First disk sector.
        sector: u64,
        /// Validated segments.
        segments: Vec<Segment>,
        /// Sync the disk after writing.
        flush: bool,
    },
    /// Flush without data.
    Flush {
        /// The cookie.
        id: u64,
        /// The operation code to echo.
        operation: u8,
    },
    /// Discard a sector range (validated against the disk).
    Discard {
        /// The cookie.
        id: u64,
        /// First sector.
        sector: u64,
        /// Number of sectors.
        nr_sectors: u64,
    },
    /// Indirect read/write: the segment pages still have to be mapped and their descriptors
    /// checked with [`parse_indirect_segments`].
    Indirect {
        /// The cookie.
        id: u64,
        /// The inner operation (`BLKIF_OP_READ`/`WRITE`), which the response echoes (blkfront
        /// checks it against the operation it queued, not `BLKIF_OP_INDIRECT`).
        indirect_op: u8,
        /// Transfer direction.
        dir: Direction,
        /// First disk sector.
        sector: u64,
        /// Number of segments (1..=[`MAX_INDIRECT_SEGMENTS`]).
        nr_segments: usize,
        /// Grants of the descriptor pages actually used.
        indirect_grefs: Vec<hypervisor::GrantRef>,
    },
}

impl Request {
    /// The cookie.
    pub fn id(&self) -> u64 {
        match self {
            Request::Rw { id, .. }
            | Request::Flush { id, .. }
            | Request::Discard { id, .. }
            | Request::Indirect { id, .. } => *id,
        }
    }

    /// The operation code echoed in the response.
    pub fn operation(&self) -> u8 {
        match self {
            Request::Rw { operation, .. } | Request::Flush { operation, .. } => *operation,
            Request::Discard { .. } => BLKIF_OP_DISCARD,
            Request::Indirect { indirect_op, .. } => *indirect_op,
        }
    }
}

/// What the disk allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskLimits {
    /// Size in 512-byte sectors.
    pub sectors: u64,
    /// Writes refused.
    pub readonly: bool,
    /// Discard offered.
    pub discard: bool,
    /// Indirect descriptors offered.
    pub indirect: bool,
}

/// Checks that `count` sectors from `start` fit in the disk.
pub fn check_range(id: u64, start: u64, count: u64, disk_sectors: u64) -> Result<(), BlkifError> {
    match start.checked_add(count) {
        Some(end) if end <= disk_sectors => Ok(()),
        _ => Err(BlkifError::OutOfRange {
            id,
            start,
            count,
            disk_sectors,
        }),
    }
}

/// Sectors covered by validated segments.
pub fn total_sectors(segments: &[Segment]) -> u64 {
    segments.iter().map(Segment::sectors).sum()
}

/// Decodes and validates one ring entry (a copy, never the shared slot).
pub fn parse_request(entry: &[u8; ENTRY_SIZE], disk: &DiskLimits) -> Result<Request, BlkifError> {
    let raw = RawRequest::read_from_bytes(entry).map_err(|_| BlkifError::UnsupportedOp {
        id: 0,
        operation: entry[0],
    })?;
    let id = raw.id.get();
    let operation = raw.operation;
    match operation {
        BLKIF_OP_READ | BLKIF_OP_WRITE | BLKIF_OP_WRITE_BARRIER | BLKIF_OP_FLUSH_DISKCACHE => {
            let nr = usize::from(raw.nr_segments);
            let data_optional =
                matches!(operation, BLKIF_OP_WRITE_BARRIER | BLKIF_OP_FLUSH_DISKCACHE);
            if data_optional && nr == 0 {
                return Ok(Request::Flush { id, operation });
            }
            if nr == 0 || nr > BLKIF_MAX_SEGMENTS_PER_REQUEST {
                return Err(BlkifError::BadSegmentCount {
                    id,
                    operation,
                    nr,
                    min: usize::from(!data_optional),
                    max: BLKIF_MAX_SEGMENTS_PER_REQUEST,
                });
            }
            let dir = if operation == BLKIF_OP_READ {
                Direction::Read
            } else {
                Direction::Write
            };
            if dir == Direction::Write && disk.readonly {
                return Err(BlkifError::ReadOnly { id });
            }
            let segments = raw.seg[..nr]
                .iter()
                .enumerate()
                .map(|(i, s)| Segment::validate(id, i, s))
                .collect::<Result<Vec<_>, _>>()?;
            let sector = raw.sector_number.get();
            check_range(id, sector, total_sectors(&segments), disk.sectors)?;
            Ok(Request::Rw {
                id,
                operation,
                dir,
                sector,
                segments,
                flush: data_optional,
            })
        }
        BLKIF_OP_DISCARD if disk.discard => {
            let d = RawDiscard::read_from_bytes(entry)
                .map_err(|_| BlkifError::UnsupportedOp { id, operation })?;
            if disk.readonly {
                return Err(BlkifError::ReadOnly { id });
            }
            let (sector, nr_sectors) = (d.sector_number.get(), d.nr_sectors.get());
            check_range(id, sector, nr_sectors, disk.sectors)?;
            Ok(Request::Discard {
                id,
                sector,
                nr_sectors,
            })
        }
        BLKIF_OP_INDIRECT if disk.indirect => {
            let r = RawIndirect::read_from_bytes(entry)
                .map_err(|_| BlkifError::UnsupportedOp { id, operation })?;
            let dir = match r.indirect_op {
                BLKIF_OP_READ => Direction::Read,
                BLKIF_OP_WRITE => Direction::Write,
                other => {
                    return Err(BlkifError::BadIndirectOp {
                        id,
                        indirect_op: other,
                    })
                }
            };
            if dir == Direction::Write && disk.readonly {
                return Err(BlkifError::ReadOnly { id });
            }
            let nr = usize::from(r.nr_segments.get());
            if nr == 0 || nr > MAX_INDIRECT_SEGMENTS {
                return Err(BlkifError::BadSegmentCount {
                    id,
                    operation,
                    nr,
                    min: 1,
                    max: MAX_INDIRECT_SEGMENTS,
                });
            }
            let pages = nr.div_ceil(SEGMENTS_PER_INDIRECT_PAGE);
            let indirect_grefs = r.indirect_grefs[..pages].iter().map(|g| g.get()).collect();
            Ok(Request::Indirect {
                id,
                indirect_op: r.indirect_op,
                dir,
                sector: r.sector_number.get(),
                nr_segments: nr,
                indirect_grefs,
            })
        }
        _ => Err(BlkifError::UnsupportedOp { id, operation }),
    }
}

/// Validates the segment descriptors of an indirect request, copied out of its descriptor
/// pages (`descriptors.len() >= nr_segments * SEGMENT_SIZE`), and the request's sector range.
pub fn parse_indirect_segments(
    id: u64,
    sector: u64,
    nr_segments: usize,
    descriptors: &[u8],
    disk: &DiskLimits,
) -> Result<Vec<Segment>, BlkifError> {
    let bad_count = BlkifError::BadSegmentCount {
        id,
        operation: BLKIF_OP_INDIRECT,
        nr: nr_segments,
        min: 1,
        max: MAX_INDIRECT_SEGMENTS,
    };
    let bytes = descriptors
        .get(..nr_segments.saturating_mul(SEGMENT_SIZE))
        .ok_or(bad_count.clone())?;
    let raws = <[RawSegment]>::ref_from_bytes(bytes).map_err(|_| bad_count)?;
    let segments = raws
        .iter()
        .enumerate()
        .map(|(i, s)| Segment::validate(id, i, s))
        .collect::<Result<Vec<_>, _>>()?;
    check_range(id, sector, total_sectors(&segments), disk.sectors)?;
    Ok(segments)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use zerocopy::FromZeros;

    const DISK: DiskLimits = DiskLimits {
        sectors: 2048,
        readonly: false,
        discard: true,
        indirect: true,
    };

    fn rw(op: u8, sector: u64, segs: &[(u32, u8, u8)]) -> [u8; ENTRY_SIZE] {
        let mut r = RawRequest::new_zeroed();
        r.operation = op;
        r.nr_segments = segs.len() as u8;
        r.id = U64::new(0xabcd);
        r.sector_number = U64::new(sector);
        for (i, (g, f, l)) in segs.iter().enumerate() {
            r.seg[i] = RawSegment {
                gref: U32::new(*g),
                first_sect: *f,
                last_sect: *l,
                pad: [0; 2],
            };
        }
        let mut e = [0u8; ENTRY_SIZE];
        e.copy_from_slice(r.as_bytes());
        e
    }

    #[test]
    fn field_offsets_match_blkif_h() {
        let e = rw(BLKIF_OP_WRITE, 0x1122, &[(0x55, 1, 7)]);
        assert_eq!(e[0], 1);
        assert_eq!(e[1], 1);
        assert_eq!(&e[8..16], &0xabcdu64.to_le_bytes());
        assert_eq!(&e[16..24], &0x1122u64.to_le_bytes());
        assert_eq!(&e[24..28], &0x55u32.to_le_bytes());
        assert_eq!((e[28], e[29]), (1, 7));
        let rsp = BlkifResponse::new(7, 3, BLKIF_RSP_ERROR);
        let b = rsp.as_bytes();
        assert_eq!(&b[0..8], &7u64.to_le_bytes());
        assert_eq!(b[8], 3);
        assert_eq!(&b[10..12], &(-1i16).to_le_bytes());
        assert_eq!(ring_entries(1), 32);
        assert_eq!(ring_entries(2), 64);
    }

    #[test]
    fn read_write_flush_decode() {
        let r = parse_request(&rw(BLKIF_OP_READ, 8, &[(9, 0, 7), (10, 0, 3)]), &DISK).unwrap();
        match r {
            Request::Rw {
                dir,
                sector,
                segments,
                flush,
                ..
            } => {
                assert_eq!(dir, Direction::Read);
                assert_eq!(sector, 8);
                assert_eq!(total_sectors(&segments), 12);
                assert!(!flush);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse_request(&rw(BLKIF_OP_FLUSH_DISKCACHE, 0, &[]), &DISK).unwrap(),
            Request::Flush {
                id: 0xabcd,
                operation: BLKIF_OP_FLUSH_DISKCACHE
            }
        );
        let fua = parse_request(&rw(BLKIF_OP_FLUSH_DISKCACHE, 0, &[(1, 0, 0)]), &DISK).unwrap();
        assert!(matches!(
            fua,
            Request::Rw {
                flush: true,
                dir: Direction::Write,
                ..
            }
        ));
    }

    #[test]
    fn hostile_requests_are_refused() {
        let bad = [
            rw(BLKIF_OP_READ, 0, &[]),
            rw(BLKIF_OP_WRITE, 0, &[(1, 3, 2)]),
            rw(BLKIF_OP_WRITE, 0, &[(1, 0, 8)]),
            rw(BLKIF_OP_READ, 2047, &[(1, 0, 1)]),
            rw(BLKIF_OP_READ, u64::MAX, &[(1, 0, 0)]),
        ];
        for e in bad {
            let err = parse_request(&e, &DISK).unwrap_err();
            assert_eq!(err.status(), BLKIF_RSP_ERROR, "{err}");
        }
        let mut e = rw(BLKIF_OP_READ, 0, &[(1, 0, 0)]);
        e[1] = 12;
        assert!(matches!(
            parse_request(&e, &DISK),
            Err(BlkifError::BadSegmentCount { nr: 12, .. })
        ));
        e[0] = 4;
        assert_eq!(
            parse_request(&e, &DISK).unwrap_err().status(),
            BLKIF_RSP_EOPNOTSUPP
        );
        let ro = DiskLimits {
            readonly: true,
            ..DISK
        };
        assert_eq!(
            parse_request(&rw(BLKIF_OP_WRITE, 0, &[(1, 0, 0)]), &ro),
            Err(BlkifError::ReadOnly { id: 0xabcd })
        );
    }

    #[test]
    fn discard_and_indirect_only_when_offered() {
        let mut d = RawDiscard::new_zeroed();
        d.operation = BLKIF_OP_DISCARD;
        d.sector_number = U64::new(100);
        d.nr_sectors = U64::new(28);
        let mut e = [0u8; ENTRY_SIZE];
        e.copy_from_slice(d.as_bytes());
        assert!(matches!(
            parse_request(&e, &DISK),
            Ok(Request::Discard {
                sector: 100,
                nr_sectors: 28,
                ..
            })
        ));
        let plain = DiskLimits {
            discard: false,
            indirect: false,
            ..DISK
        };
        assert_eq!(
            parse_request(&e, &plain).unwrap_err().status(),
            BLKIF_RSP_EOPNOTSUPP
        );
        d.nr_sectors = U64::new(u64::MAX);
        e.copy_from_slice(d.as_bytes());
        assert!(matches!(
            parse_request(&e, &DISK),
            Err(BlkifError::OutOfRange { .. })
        ));

        let mut i = RawIndirect::new_zeroed();
        i.operation = BLKIF_OP_INDIRECT;
        i.indirect_op = BLKIF_OP_WRITE;
        i.nr_segments = U16::new(600);
        e.copy_from_slice(i.as_bytes());
        assert!(matches!(
            parse_request(&e, &DISK),
            Err(BlkifError::BadSegmentCount { nr: 600, .. })
        ));
        i.nr_segments = U16::new(513);
        i.indirect_grefs[0] = U32::new(40);
        i.indirect_grefs[1] = U32::new(41);
        e.copy_from_slice(i.as_bytes());
        assert!(matches!(
            parse_request(&e, &DISK),
            Err(BlkifError::BadSegmentCount { nr: 513, .. })
        ));
        i.nr_segments = U16::new(20);
        e.copy_from_slice(i.as_bytes());
        match parse_request(&e, &DISK).unwrap() {
            Request::Indirect {
                nr_segments,
                indirect_grefs,
                ..
            } => {
                assert_eq!(nr_segments, 20);
                assert_eq!(indirect_grefs, vec![40]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse_request(&e, &plain).unwrap_err().status(),
            BLKIF_RSP_EOPNOTSUPP
        );
    }

    #[test]
    fn indirect_segments_validated() {
        let mut page = vec![0u8; 3 * SEGMENT_SIZE];
        for (i, s) in [(5u32, 0u8, 7u8), (6, 0, 7), (7, 2, 1)].iter().enumerate() {
            let raw = RawSegment {
                gref: U32::new(s.0),
                first_sect: s.1,
                last_sect: s.2,
                pad: [0; 2],
            };
            page[i * SEGMENT_SIZE..(i + 1) * SEGMENT_SIZE].copy_from_slice(raw.as_bytes());
        }
        assert_eq!(
            parse_indirect_segments(1, 0, 2, &page, &DISK)
                .unwrap()
                .len(),
            2
        );
        assert!(matches!(
            parse_indirect_segments(1, 0, 3, &page, &DISK),
            Err(BlkifError::BadSegment { index: 2, .. })
        ));
        assert!(matches!(
            parse_indirect_segments(1, 0, 4, &page, &DISK),
            Err(BlkifError::BadSegmentCount { .. })
        ));
        assert!(matches!(
            parse_indirect_segments(1, 2040, 2, &page, &DISK),
            Err(BlkifError::OutOfRange { .. })
        ));
    }

    proptest! {
        /// Any 112 bytes decode to an error or to a request that stays inside the disk and
        /// its pages.
        #[test]
        fn any_entry_decodes_safely(bytes in proptest::collection::vec(any::<u8>(), ENTRY_SIZE)) {
            let mut e = [0u8; ENTRY_SIZE];
            e.copy_from_slice(&bytes);
            match parse_request(&e, &DISK) {
                Ok(Request::Rw { sector, segments, .. }) => {
                    prop_assert!(!segments.is_empty() && segments.len() <= 11);
                    prop_assert!(sector + total_sectors(&segments) <= DISK.sectors);
                    for s in &segments {
                        prop_assert!(s.page_offset() + s.len() <= hypervisor::PAGE_SIZE);
                    }
                }
                Ok(Request::Discard { sector, nr_sectors, .. }) => {
                    prop_assert!(sector + nr_sectors <= DISK.sectors);
                }
                Ok(Request::Indirect { nr_segments, indirect_grefs, .. }) => {
                    prop_assert!((1..=MAX_INDIRECT_SEGMENTS).contains(&nr_segments));
                    prop_assert!(indirect_grefs.len() * SEGMENTS_PER_INDIRECT_PAGE >= nr_segments);
                }
                Ok(Request::Flush { .. }) | Err(_) => {}
            }
        }

        #[test]
        fn any_descriptor_page_decodes_safely(
            bytes in proptest::collection::vec(any::<u8>(), 0..512),
            nr in 0usize..80,
            sector in any::<u64>(),
        ) {
            if let Ok(segs) = parse_indirect_segments(1, sector, nr, &bytes, &DISK) {
                prop_assert_eq!(segs.len(), nr);
                prop_assert!(sector + total_sectors(&segs) <= DISK.sectors);
            }
        }
    }
}
