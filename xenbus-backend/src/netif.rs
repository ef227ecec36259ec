//! The netif wire format (`xen/include/public/io/netif.h`) and the validation of the transmit
//! requests a guest's `xen-netfront` puts on its TX ring, used by [`crate::netback`]; and the
//! completion of the partial TCP/UDP checksums netfront leaves to the backend.
//!
//! A packet on the TX ring is a chain of slots: the first request carries the whole packet's
//! size and the first fragment's page; `NETTXF_more_data` says another data slot follows;
//! `NETTXF_extra_info` on the first slot says extra-info slots (GSO, multicast, hash) follow
//! it, each with `NETIF_EXTRA_FLAG_MORE` if another one does. Every slot is answered with a
//! response carrying its `id`. [`parse_tx_packet`] checks a chain copied out of the ring the
//! way Linux's netback does: malformed chains that say nothing about the ring's integrity are
//! dropped (every slot answered with [`NETIF_RSP_ERROR`]); chains that cannot be delimited
//! (incomplete, too long, unknown extra type) are protocol errors that end the device.

use zerocopy::little_endian::{I16, U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// `NETTXF_csum_blank`: the protocol checksum is to be filled in.
pub const NETTXF_CSUM_BLANK: u16 = 1 << 0;
/// `NETTXF_data_validated`: the checksum was checked.
pub const NETTXF_DATA_VALIDATED: u16 = 1 << 1;
/// `NETTXF_more_data`: another data slot follows.
pub const NETTXF_MORE_DATA: u16 = 1 << 2;
/// `NETTXF_extra_info`: extra-info slots follow the first slot.
pub const NETTXF_EXTRA_INFO: u16 = 1 << 3;

/// `NETRXF_data_validated`.
pub const NETRXF_DATA_VALIDATED: u16 = 1 << 0;
/// `NETRXF_csum_blank`.
pub const NETRXF_CSUM_BLANK: u16 = 1 << 1;
/// `NETRXF_more_data`.
pub const NETRXF_MORE_DATA: u16 = 1 << 2;
/// `NETRXF_extra_info`.
pub const NETRXF_EXTRA_INFO: u16 = 1 << 3;

/// `NETIF_RSP_DROPPED`.
pub const NETIF_RSP_DROPPED: i16 = -2;
/// `NETIF_RSP_ERROR`.
pub const NETIF_RSP_ERROR: i16 = -1;
/// `NETIF_RSP_OKAY`.
pub const NETIF_RSP_OKAY: i16 = 0;
/// `NETIF_RSP_NULL`: the response of an extra-info slot.
pub const NETIF_RSP_NULL: i16 = 1;

/// `XEN_NETIF_EXTRA_TYPE_GSO`.
pub const NETIF_EXTRA_TYPE_GSO: u8 = 1;
/// `XEN_NETIF_EXTRA_TYPE_MCAST_ADD`.
pub const NETIF_EXTRA_TYPE_MCAST_ADD: u8 = 2;
/// `XEN_NETIF_EXTRA_TYPE_MCAST_DEL`.
pub const NETIF_EXTRA_TYPE_MCAST_DEL: u8 = 3;
/// `XEN_NETIF_EXTRA_TYPE_HASH`.
pub const NETIF_EXTRA_TYPE_HASH: u8 = 4;
/// `XEN_NETIF_EXTRA_TYPE_MAX`: types are `1..MAX`.
pub const NETIF_EXTRA_TYPE_MAX: u8 = 5;
/// `XEN_NETIF_GSO_TYPE_TCPV4` (the GSO extra's type).
pub const NETIF_GSO_TYPE_TCPV4: u8 = 1;
/// `XEN_NETIF_GSO_TYPE_TCPV6`.
pub const NETIF_GSO_TYPE_TCPV6: u8 = 2;
/// `XEN_NETIF_EXTRA_FLAG_MORE`.
pub const NETIF_EXTRA_FLAG_MORE: u8 = 1 << 0;

/// Ethernet header: the smallest packet accepted.
pub const ETH_HLEN: usize = 14;
/// Largest packet (`XEN_NETIF_MAX_TX_SIZE`).
pub const MAX_TX_SIZE: usize = 0xFFFF;
/// Data slots per packet (`XEN_NETBK_LEGACY_SLOTS_MAX`, what netfront uses without
/// `feature-sg` negotiation limits).
pub const MAX_TX_SLOTS: usize = 18;
/// Extra-info slots per packet (one per type at most).
pub const MAX_EXTRA_SLOTS: usize = (NETIF_EXTRA_TYPE_MAX - 1) as usize;

/// Size of a TX ring entry (request 12 bytes, response 4).
pub const TX_ENTRY_SIZE: usize = 12;
/// Size of an RX ring entry (request 8 bytes, response 8).
pub const RX_ENTRY_SIZE: usize = 8;

/// Entries of a TX ring of `pages` pages (256 for one page).
pub fn tx_ring_entries(pages: usize) -> u32 {
    crate::ring::ring_size(pages * hypervisor::PAGE_SIZE, TX_ENTRY_SIZE)
}

/// Entries of an RX ring of `pages` pages (256 for one page).
pub fn rx_ring_entries(pages: usize) -> u32 {
    crate::ring::ring_size(pages * hypervisor::PAGE_SIZE, RX_ENTRY_SIZE)
}

/// `struct netif_tx_request`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct TxRequest {
    /// Grant of the data page.
    pub gref: U32,
    /// Offset of the data in the page.
    pub offset: U16,
    /// `NETTXF_*`.
    pub flags: U16,
    /// Echoed in the response.
    pub id: U16,
    /// First slot: the whole packet's size; later slots: this slot's size.
    pub size: U16,
}

/// `struct netif_tx_response`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct TxResponse {
    /// The request's id.
    pub id: U16,
    /// `NETIF_RSP_*`.
    pub status: I16,
}

/// `struct netif_rx_request`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct RxRequest {
    /// Echoed in the response.
    pub id: U16,
    /// Padding.
    pub pad: U16,
    /// Grant of the page to receive into.
    pub gref: U32,
}

/// `struct netif_rx_response`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct RxResponse {
    /// The request's id.
    pub id: U16,
    /// Offset of the data in the page.
    pub offset: U16,
    /// `NETRXF_*`.
    pub flags: U16,
    /// Bytes received (> 0) or `NETIF_RSP_*` (< 0).
    pub status: I16,
}

/// `struct netif_extra_info` (the type-specific union kept as bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct ExtraInfo {
    /// `XEN_NETIF_EXTRA_TYPE_*`.
    pub kind: u8,
    /// `XEN_NETIF_EXTRA_FLAG_*`.
    pub flags: u8,
    /// The union (GSO: size u16, type u8, pad u8, features u16).
    pub body: [u8; 10],
}

const _: () = assert!(std::mem::size_of::<TxRequest>() == TX_ENTRY_SIZE);
const _: () = assert!(std::mem::size_of::<TxResponse>() == 4);
const _: () = assert!(std::mem::size_of::<RxRequest>() == RX_ENTRY_SIZE);
const _: () = assert!(std::mem::size_of::<RxResponse>() == RX_ENTRY_SIZE);
const _: () = assert!(std::mem::size_of::<ExtraInfo>() == TX_ENTRY_SIZE);

/// Why a TX chain was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetifError {
    /// The chain runs past the requests the frontend produced (netfront pushes whole packets).
    #[error("packet at slot {start} continues past req_prod ({available} slots available)")]
    Incomplete {
        /// Index (in the slots given) of the packet's first slot.
        start: usize,
        /// Slots available.
        available: usize,
    },
    /// More data slots than any frontend uses.
    #[error("packet with more than {MAX_TX_SLOTS} data slots")]
    TooManySlots,
    /// More extra-info slots than there are types.
    #[error("packet with more than {MAX_EXTRA_SLOTS} extra-info slots")]
    TooManyExtras,
    /// An extra-info type that does not exist.
    #[error("extra-info slot of unknown type {kind}")]
    BadExtraType {
        /// The type.
        kind: u8,
    },
    /// A slot's data leaves its page.
    #[error("slot {index}: {size} bytes at offset {offset} leave the page")]
    SlotOutsidePage {
        /// Data slot index in the packet.
        index: usize,
        /// Offset.
        offset: u16,
        /// Size.
        size: u16,
    },
    /// The first slot's size (the packet's) is smaller than the later slots together, or the
    /// packet is shorter than an Ethernet header.
    #[error("packet size {total} with {rest} bytes in later slots (minimum {ETH_HLEN})")]
    BadSize {
        /// Size in the first slot.
        total: usize,
        /// Bytes of the later slots.
        rest: usize,
    },
    /// Extra info of a feature the backend did not offer (e.g. GSO).
    #[error("extra-info type {kind} was not negotiated")]
    NotNegotiated {
        /// The type.
        kind: u8,
    },
}

impl NetifError {
    /// Whether the error ends the device (the chain cannot be delimited, so the ring is
    /// unusable) rather than dropping the packet.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            NetifError::Incomplete { .. }
                | NetifError::TooManySlots
                | NetifError::TooManyExtras
                | NetifError::BadExtraType { .. }
        )
    }
}

/// One validated data slot: `len` bytes at `offset` of the page `gref`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxSlot {
    /// Grant of the page.
    pub gref: hypervisor::GrantRef,
    /// Offset in the page.
    pub offset: usize,
    /// Bytes.
    pub len: usize,
}

/// A delimited TX chain: the ids to answer (data slots and extras, in ring order, with the
/// status each gets) and, if valid, the packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxChain {
    /// Slots consumed from the ring.
    pub consumed: usize,
    /// `(id, is_extra)` per consumed slot, in order: data slots are answered with the packet's
    /// status, extras with `NETIF_RSP_NULL`.
    pub ids: Vec<(u16, bool)>,
    /// The packet, or why it is dropped.
    pub packet: Result<TxPacket, NetifError>,
}

/// A validated packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxPacket {
    /// Data slots in order; their lengths add up to `size`.
    pub slots: Vec<TxSlot>,
    /// Packet size.
    pub size: usize,
    /// `NETTXF_csum_blank`.
    pub csum_blank: bool,
    /// `NETTXF_data_validated`.
    pub data_validated: bool,
    /// Extra-info slots (type, flags, body) that came with it.
    pub extras: Vec<ExtraInfo>,
}

/// Delimits and validates the packet starting at `slots[0]` (entries copied out of the TX ring,
/// all of those between the consumer and `req_prod`). `negotiated_extra(kind)` says which
/// extra-info types the backend offered. A fatal error means the chain cannot be delimited.
pub fn parse_tx_packet(
    slots: &[[u8; TX_ENTRY_SIZE]],
    negotiated_extra: impl Fn(u8) -> bool,
) -> Result<TxChain, NetifError> {
    let incomplete = NetifError::Incomplete {
        start: 0,
        available: slots.len(),
    };
    let req = |i: usize| -> Result<TxRequest, NetifError> {
        let bytes = slots.get(i).ok_or(incomplete.clone())?;
        TxRequest::read_from_bytes(bytes).map_err(|_| incomplete.clone())
    };
    let first = req(0)?;
    let mut ids = vec![(first.id.get(), false)];
    let mut next = 1;
    // extras follow the first slot
    let mut extras = Vec::new();
    if first.flags.get() & NETTXF_EXTRA_INFO != 0 {
        loop {
            if extras.len() == MAX_EXTRA_SLOTS {
                return Err(NetifError::TooManyExtras);
            }
            let bytes = slots.get(next).ok_or(incomplete.clone())?;
            let extra = ExtraInfo::read_from_bytes(bytes).map_err(|_| incomplete.clone())?;
            if extra.kind == 0 || extra.kind >= NETIF_EXTRA_TYPE_MAX {
                return Err(NetifError::BadExtraType { kind: extra.kind });
            }
            // an extra slot's response only carries NETIF_RSP_NULL (netfront skips it); it gets
            // the packet's id, as Linux's netback leaves it
            ids.push((first.id.get(), true));
            extras.push(extra);
            next += 1;
            if extra.flags & NETIF_EXTRA_FLAG_MORE == 0 {
                break;
            }
        }
    }
    let mut data = vec![first];
    let mut flags = first.flags.get();
    while flags & NETTXF_MORE_DATA != 0 {
        if data.len() == MAX_TX_SLOTS {
            return Err(NetifError::TooManySlots);
        }
        let r = req(next)?;
        ids.push((r.id.get(), false));
        data.push(r);
        flags = r.flags.get();
        next += 1;
    }
    let packet = validate(&data, &extras, first.flags.get(), &negotiated_extra);
    Ok(TxChain {
        consumed: next,
        ids,
        packet,
    })
}

fn validate(
    data: &[TxRequest],
    extras: &[ExtraInfo],
    first_flags: u16,
    negotiated_extra: &impl Fn(u8) -> bool,
) -> Result<TxPacket, NetifError> {
    if let Some(e) = extras.iter().find(|e| !negotiated_extra(e.kind)) {
        return Err(NetifError::NotNegotiated { kind: e.kind });
    }
    let total = usize::from(data[0].size.get());
    let rest: usize = data[1..].iter().map(|r| usize::from(r.size.get())).sum();
    if total < ETH_HLEN || rest > total {
        return Err(NetifError::BadSize { total, rest });
    }
    let mut slots = Vec::with_capacity(data.len());
    for (index, r) in data.iter().enumerate() {
        let len = if index == 0 {
            total - rest
        } else {
            usize::from(r.size.get())
        };
        let offset = usize::from(r.offset.get());
        if offset + len > hypervisor::PAGE_SIZE {
            return Err(NetifError::SlotOutsidePage {
                index,
                offset: r.offset.get(),
                size: u16::try_from(len).unwrap_or(u16::MAX),
            });
        }
        slots.push(TxSlot {
            gref: r.gref.get(),
            offset,
            len,
        });
    }
    Ok(TxPacket {
        slots,
        size: total,
        csum_blank: first_flags & NETTXF_CSUM_BLANK != 0,
        data_validated: first_flags & NETTXF_DATA_VALIDATED != 0,
        extras: extras.to_vec(),
    })
}

/// Why a partial checksum could not be completed (the packet is dropped, as Linux's netback
/// drops packets whose `checksum_setup` fails).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChecksumError {
    /// The frame ends inside a header.
    #[error("frame of {len} bytes ends inside the {what} header")]
    Truncated {
        /// Frame length.
        len: usize,
        /// Which header.
        what: &'static str,
    },
    /// Not IPv4/IPv6 (ethertype), or not TCP/UDP, or a fragment.
    #[error("no TCP/UDP checksum to complete: {0}")]
    Unsupported(String),
}

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86DD;
const ETHERTYPE_VLAN: u16 = 0x8100;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

fn be16(frame: &[u8], at: usize, what: &'static str) -> Result<u16, ChecksumError> {
    match frame.get(at..at + 2) {
        Some(b) => Ok(u16::from_be_bytes([b[0], b[1]])),
        None => Err(ChecksumError::Truncated {
            len: frame.len(),
            what,
        }),
    }
}

fn byte(frame: &[u8], at: usize, what: &'static str) -> Result<u8, ChecksumError> {
    frame.get(at).copied().ok_or(ChecksumError::Truncated {
        len: frame.len(),
        what,
    })
}

/// Where the transport header starts and the offset of its checksum field in it, for an
/// Ethernet frame carrying TCP or UDP over IPv4 or IPv6 (one optional VLAN tag, IPv6
/// hop-by-hop/routing/destination-options extension headers).
pub fn checksum_location(frame: &[u8]) -> Result<(usize, usize), ChecksumError> {
    let mut at = 12;
    let mut ethertype = be16(frame, at, "Ethernet")?;
    at += 2;
    if ethertype == ETHERTYPE_VLAN {
        ethertype = be16(frame, at + 2, "VLAN")?;
        at += 4;
    }
    let (proto, l4) = match ethertype {
        ETHERTYPE_IPV4 => {
            let ihl = usize::from(byte(frame, at, "IPv4")? & 0x0f) * 4;
            if ihl < 20 || frame.len() < at + ihl {
                return Err(ChecksumError::Truncated {
                    len: frame.len(),
                    what: "IPv4",
                });
            }
            let frag = be16(frame, at + 6, "IPv4")?;
            if frag & 0x3fff != 0 {
                return Err(ChecksumError::Unsupported("IPv4 fragment".into()));
            }
            (byte(frame, at + 9, "IPv4")?, at + ihl)
        }
        ETHERTYPE_IPV6 => {
            let mut next = byte(frame, at + 6, "IPv6")?;
            let mut l4 = at + 40;
            // hop-by-hop, routing, destination options: (len + 1) * 8 bytes each
            let mut hops = 0;
            while matches!(next, 0 | 43 | 60) {
                hops += 1;
                if hops > 8 {
                    return Err(ChecksumError::Unsupported(
                        "more than 8 IPv6 extension headers".into(),
                    ));
                }
                let len = (usize::from(byte(frame, l4 + 1, "IPv6 extension")?) + 1) * 8;
                next = byte(frame, l4, "IPv6 extension")?;
                l4 += len;
            }
            (next, l4)
        }
        t => return Err(ChecksumError::Unsupported(format!("ethertype {t:#06x}"))),
    };
    let field = match proto {
        IPPROTO_TCP => 16,
        IPPROTO_UDP => 6,
        p => return Err(ChecksumError::Unsupported(format!("IP protocol {p}"))),
    };
    if frame.len() < l4 + field + 2 {
        return Err(ChecksumError::Truncated {
            len: frame.len(),
            what: if proto == IPPROTO_TCP { "TCP" } else { "UDP" },
        });
    }
    Ok((l4, field))
}

/// The 16-bit one's complement sum of `data` (odd tail padded with a zero byte), unfolded.
fn ones_sum(data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(2);
    let mut sum: u64 = chunks
        .by_ref()
        .map(|c| u64::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    if let [last] = chunks.remainder() {
        sum += u64::from(*last) << 8;
    }
    sum
}

fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // lossless: folded into 16 bits
    u16::try_from(sum).unwrap_or(0xffff)
}

/// Completes the TCP/UDP checksum of a frame sent with `NETTXF_csum_blank` (Linux's
/// `CHECKSUM_PARTIAL`: the guest left the pseudo-header sum in the checksum field): the one's
/// complement of the sum from the transport header to the end is stored in the field (0 is
/// sent as 0xffff, as `skb_checksum_help` does).
pub fn complete_checksum(frame: &mut [u8]) -> Result<(), ChecksumError> {
    let (start, field) = checksum_location(frame)?;
    let csum = !fold(ones_sum(&frame[start..]));
    let csum = if csum == 0 { 0xffff } else { csum };
    frame[start + field..start + field + 2].copy_from_slice(&csum.to_be_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tx(gref: u32, offset: u16, flags: u16, id: u16, size: u16) -> [u8; TX_ENTRY_SIZE] {
        let r = TxRequest {
            gref: U32::new(gref),
            offset: U16::new(offset),
            flags: U16::new(flags),
            id: U16::new(id),
            size: U16::new(size),
        };
        let mut e = [0u8; TX_ENTRY_SIZE];
        e.copy_from_slice(r.as_bytes());
        e
    }

    fn extra(kind: u8, more: bool, id: u16) -> [u8; TX_ENTRY_SIZE] {
        let mut e = [0u8; TX_ENTRY_SIZE];
        e[0] = kind;
        e[1] = if more { NETIF_EXTRA_FLAG_MORE } else { 0 };
        e[8..10].copy_from_slice(&id.to_le_bytes());
        e
    }

    const NONE: fn(u8) -> bool = |_| false;

    #[test]
    fn layouts_and_ring_sizes() {
        let e = tx(0x11223344, 0x100, NETTXF_MORE_DATA, 7, 1514);
        assert_eq!(&e[0..4], &0x11223344u32.to_le_bytes());
        assert_eq!(&e[4..6], &0x100u16.to_le_bytes());
        assert_eq!(&e[8..10], &7u16.to_le_bytes());
        assert_eq!(&e[10..12], &1514u16.to_le_bytes());
        assert_eq!(tx_ring_entries(1), 256);
        assert_eq!(rx_ring_entries(1), 256);
    }

    #[test]
    fn single_and_multi_slot_packets() {
        let c = parse_tx_packet(&[tx(8, 0, NETTXF_CSUM_BLANK, 1, 60)], NONE).unwrap();
        assert_eq!((c.consumed, c.ids.clone()), (1, vec![(1, false)]));
        let p = c.packet.unwrap();
        assert_eq!(
            p.slots,
            vec![TxSlot {
                gref: 8,
                offset: 0,
                len: 60
            }]
        );
        assert!(p.csum_blank && !p.data_validated);

        // 1514 bytes across a page boundary: 1000 in the first slot, 514 in the second
        let chain = [
            tx(8, 3096, NETTXF_MORE_DATA, 1, 1514),
            tx(9, 0, 0, 2, 514),
            tx(10, 0, 0, 3, 60),
        ];
        let c = parse_tx_packet(&chain, NONE).unwrap();
        assert_eq!(c.consumed, 2);
        let p = c.packet.unwrap();
        assert_eq!(
            p.slots[0],
            TxSlot {
                gref: 8,
                offset: 3096,
                len: 1000
            }
        );
        assert_eq!(
            p.slots[1],
            TxSlot {
                gref: 9,
                offset: 0,
                len: 514
            }
        );
        assert_eq!(p.size, 1514);
    }

    #[test]
    fn extras_are_consumed_and_need_negotiation() {
        let chain = [
            tx(8, 0, NETTXF_EXTRA_INFO | NETTXF_MORE_DATA, 1, 3000),
            extra(NETIF_EXTRA_TYPE_GSO, true, 0xffff),
            extra(NETIF_EXTRA_TYPE_HASH, false, 0xffff),
            tx(9, 0, 0, 2, 1000),
        ];
        let c = parse_tx_packet(&chain, |k| k == NETIF_EXTRA_TYPE_GSO).unwrap();
        assert_eq!(c.consumed, 4);
        assert_eq!(c.ids.iter().filter(|(_, x)| *x).count(), 2);
        assert_eq!(
            c.packet,
            Err(NetifError::NotNegotiated {
                kind: NETIF_EXTRA_TYPE_HASH
            })
        );
        let c = parse_tx_packet(&chain, |_| true).unwrap();
        assert_eq!(c.packet.unwrap().extras.len(), 2);
        let bad = [tx(8, 0, NETTXF_EXTRA_INFO, 1, 60), extra(9, false, 0)];
        assert_eq!(
            parse_tx_packet(&bad, NONE),
            Err(NetifError::BadExtraType { kind: 9 })
        );
    }

    #[test]
    fn malformed_packets_are_dropped_undelimitable_ones_are_fatal() {
        let drop_cases = [
            vec![tx(8, 4000, 0, 1, 200)],
            vec![tx(8, 0, 0, 1, 10)],
            vec![tx(8, 0, NETTXF_MORE_DATA, 1, 100), tx(9, 0, 0, 2, 200)],
            vec![tx(8, 0, NETTXF_MORE_DATA, 1, 5000), tx(9, 100, 0, 2, 4000)],
        ];
        for chain in drop_cases {
            let c = parse_tx_packet(&chain, NONE).unwrap();
            assert_eq!(c.consumed, chain.len());
            let e = c.packet.unwrap_err();
            assert!(!e.is_fatal(), "{e}");
        }
        let incomplete = [tx(8, 0, NETTXF_MORE_DATA, 1, 100)];
        assert!(parse_tx_packet(&incomplete, NONE).unwrap_err().is_fatal());
        let long: Vec<_> = (0..30)
            .map(|i| tx(8, 0, NETTXF_MORE_DATA, i, 100))
            .collect();
        assert_eq!(parse_tx_packet(&long, NONE), Err(NetifError::TooManySlots));
        let extras: Vec<_> = std::iter::once(tx(8, 0, NETTXF_EXTRA_INFO, 1, 60))
            .chain((0..6).map(|_| extra(NETIF_EXTRA_TYPE_GSO, true, 0)))
            .collect();
        assert_eq!(
            parse_tx_packet(&extras, NONE),
            Err(NetifError::TooManyExtras)
        );
        assert!(parse_tx_packet(&[], NONE).unwrap_err().is_fatal());
    }

    /// Full checksum check over pseudo header (given as bytes) and segment: the sum is 0xffff.
    fn verify(pseudo: &[u8], seg: &[u8]) -> bool {
        fold(ones_sum(pseudo) + ones_sum(seg)) == 0xffff
    }

    /// Ethernet + IPv4/IPv6 (+ one 8-byte destination-options header for v6) + L4 header
    /// with the pseudo-header sum in the checksum field, as a CHECKSUM_PARTIAL packet.
    fn partial(v6: bool, vlan: bool, proto: u8, payload: &[u8]) -> (Vec<u8>, Vec<u8>, usize) {
        let l4len = if proto == IPPROTO_TCP { 20 } else { 8 } + payload.len();
        let mut f = vec![0u8; 12];
        if vlan {
            f.extend_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
            f.extend_from_slice(&[0, 5]);
        }
        let (src, dst): (Vec<u8>, Vec<u8>) = if v6 {
            ((1..=16).collect(), (101..=116).collect())
        } else {
            (vec![10, 0, 0, 1], vec![10, 0, 0, 2])
        };
        if v6 {
            f.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
            let mut h = vec![0u8; 40];
            h[0] = 0x60;
            h[4..6].copy_from_slice(&((l4len + 8) as u16).to_be_bytes());
            h[6] = 60; // destination options follow
            h[8..24].copy_from_slice(&src);
            h[24..40].copy_from_slice(&dst);
            f.extend_from_slice(&h);
            f.extend_from_slice(&[proto, 0, 1, 4, 0, 0, 0, 0]);
        } else {
            f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
            let mut h = vec![0u8; 20];
            h[0] = 0x45;
            h[9] = proto;
            h[12..16].copy_from_slice(&src);
            h[16..20].copy_from_slice(&dst);
            f.extend_from_slice(&h);
        }
        let start = f.len();
        let mut l4 = vec![0u8; l4len - payload.len()];
        l4[0..4].copy_from_slice(&[0x1b, 0x58, 0x9c, 0x40]);
        if proto == IPPROTO_TCP {
            l4[12] = 5 << 4;
        } else {
            l4[4..6].copy_from_slice(&(l4len as u16).to_be_bytes());
        }
        f.extend_from_slice(&l4);
        f.extend_from_slice(payload);
        let mut pseudo = src.clone();
        pseudo.extend_from_slice(&dst);
        pseudo.extend_from_slice(&(l4len as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, proto]);
        let seed = fold(ones_sum(&pseudo));
        let field = start + if proto == IPPROTO_TCP { 16 } else { 6 };
        f[field..field + 2].copy_from_slice(&seed.to_be_bytes());
        (f, pseudo, start)
    }

    #[test]
    fn partial_checksums_are_completed() {
        for (v6, vlan, proto, payload) in [
            (false, false, IPPROTO_TCP, &b"kemari-count 1\n"[..]),
            (false, true, IPPROTO_UDP, &b"odd"[..]),
            (true, false, IPPROTO_TCP, &b""[..]),
            (true, true, IPPROTO_UDP, &[0xffu8; 1001][..]),
        ] {
            let (mut f, pseudo, start) = partial(v6, vlan, proto, payload);
            assert!(!verify(&pseudo, &f[start..]));
            complete_checksum(&mut f).unwrap();
            assert!(
                verify(&pseudo, &f[start..]),
                "v6={v6} vlan={vlan} proto={proto}"
            );
        }
    }

    #[test]
    fn checksums_that_cannot_be_completed_are_refused() {
        let (mut f, _, _) = partial(false, false, IPPROTO_TCP, b"x");
        f[14 + 6] = 0x20; // more fragments
        assert!(matches!(
            complete_checksum(&mut f),
            Err(ChecksumError::Unsupported(_))
        ));
        let (mut f, _, _) = partial(false, false, 1, b"icmp");
        assert!(complete_checksum(&mut f).is_err());
        let (f, _, start) = partial(false, false, IPPROTO_TCP, b"");
        let mut short = f[..start + 10].to_vec();
        assert!(matches!(
            complete_checksum(&mut short),
            Err(ChecksumError::Truncated { .. })
        ));
        let mut arp = vec![0u8; 60];
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert!(complete_checksum(&mut arp).is_err());
        assert!(complete_checksum(&mut []).is_err());
    }

    proptest! {
        /// Any slots: never a panic; a delimited chain consumes what it names, and a valid
        /// packet's slots stay in their pages and add up to its size.
        #[test]
        fn any_tx_slots_parse_safely(
            raw in proptest::collection::vec(proptest::collection::vec(any::<u8>(), TX_ENTRY_SIZE), 0..24),
            flags_bias in proptest::collection::vec(0u16..16, 0..24),
        ) {
            let mut slots: Vec<[u8; TX_ENTRY_SIZE]> = Vec::new();
            for (i, r) in raw.iter().enumerate() {
                let mut e = [0u8; TX_ENTRY_SIZE];
                e.copy_from_slice(r);
                // bias the flags towards the interesting bits
                if let Some(f) = flags_bias.get(i) {
                    e[6..8].copy_from_slice(&f.to_le_bytes());
                }
                slots.push(e);
            }
            match parse_tx_packet(&slots, |k| k == NETIF_EXTRA_TYPE_GSO) {
                Ok(c) => {
                    prop_assert!(c.consumed >= 1 && c.consumed <= slots.len());
                    prop_assert_eq!(c.ids.len(), c.consumed);
                    if let Ok(p) = c.packet {
                        prop_assert!(p.size >= ETH_HLEN && p.size <= MAX_TX_SIZE);
                        prop_assert_eq!(p.slots.iter().map(|s| s.len).sum::<usize>(), p.size);
                        prop_assert!(p.slots.len() <= MAX_TX_SLOTS);
                        for s in &p.slots {
                            prop_assert!(s.offset + s.len <= hypervisor::PAGE_SIZE);
                        }
                    }
                }
                Err(e) => prop_assert!(e.is_fatal(), "{e}"),
            }
        }

        /// Any frame: completing its checksum never panics nor changes its length.
        #[test]
        fn any_frame_checksum_is_safe(mut f in proptest::collection::vec(any::<u8>(), 0..200), v6 in any::<bool>()) {
            if f.len() > 14 {
                let t = if v6 { ETHERTYPE_IPV6 } else { ETHERTYPE_IPV4 };
                f[12..14].copy_from_slice(&t.to_be_bytes());
            }
            let n = f.len();
            let _ = complete_checksum(&mut f);
            prop_assert_eq!(f.len(), n);
        }
    }
}
