//! A tap device in dom0: the host side of a guest's vif served by [`crate::netback`].
//!
//! [`Tap::create`] opens `/dev/net/tun` with `TUNSETIFF` (`IFF_TAP | IFF_NO_PI`, optionally
//! `IFF_VNET_HDR`): Ethernet frames, no packet-information header; with the option each frame
//! is preceded by a 10-byte
//! [`VnetHdr`], through which a frame written can ask the kernel to fill in its checksum and to
//! segment it (a guest's 64 KiB TCP segments); no receive offloads are enabled, so every frame
//! read carries complete checksums and is at most the link's MTU plus its Ethernet header). The
//! interface exists as long as the `Tap` (and its clones) are open. [`Tap::link_up`] brings it
//! up, optionally in a bridge, with the `ip` (or busybox `brctl`) command. Reads and writes are
//! non-blocking, one frame each.
//!
//! [`Tap::from_fd`] wraps any other file descriptor that carries one frame per read/write (a
//! datagram socket in tests), with or without the header.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::process::Command;

use nix::fcntl::{fcntl, FcntlArg, OFlag};

/// `IFNAMSIZ`: interface names are at most 15 bytes and a NUL.
pub const IFNAMSIZ: usize = 16;
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
/// Size of [`VnetHdr`] (`struct virtio_net_hdr`, the tap's default `TUNSETVNETHDRSZ`).
pub const VNET_HDR_LEN: usize = 10;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: checksum from `csum_start`, stored at `+csum_offset`.
pub const VNET_F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_F_DATA_VALID`: the checksum was checked.
pub const VNET_F_DATA_VALID: u8 = 2;
/// `VIRTIO_NET_HDR_GSO_TCPV4`.
pub const VNET_GSO_TCPV4: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_TCPV6`.
pub const VNET_GSO_TCPV6: u8 = 4;

/// `struct virtio_net_hdr` (little-endian on x86): what precedes each frame on a tap opened
/// with `IFF_VNET_HDR`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    /// `VNET_F_*`.
    pub flags: u8,
    /// `VNET_GSO_*` (0: none).
    pub gso_type: u8,
    /// Bytes of headers (Ethernet to TCP) of a GSO frame.
    pub hdr_len: u16,
    /// Payload bytes per segment of a GSO frame.
    pub gso_size: u16,
    /// Where the checksummed part starts.
    pub csum_start: u16,
    /// Offset of the checksum field from `csum_start`.
    pub csum_offset: u16,
}

impl VnetHdr {
    /// The 10 bytes.
    pub fn to_bytes(self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b
    }

    /// Decodes 10 bytes.
    pub fn from_bytes(b: &[u8; VNET_HDR_LEN]) -> VnetHdr {
        let u = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        }
    }
}

/// Where a frame read with [`Tap::recv`] is in the caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxFrame {
    /// Offset of the Ethernet frame (after the header, if any).
    pub offset: usize,
    /// Its length.
    pub len: usize,
    /// The header said the checksum was checked.
    pub data_valid: bool,
}
/// The MAC Linux's netback gives its vifs (the bridge never takes it as its own address).
pub const HOST_MAC: &str = "fe:ff:ff:ff:ff:ff";

/// `struct ifreq` as `TUNSETIFF` reads it: the name, then `ifr_flags` at the start of the
/// 24-byte union.
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: i16,
    _pad: [u8; 22],
}

const _: () = assert!(std::mem::size_of::<IfReq>() == 40);

// TUNSETIFF is _IOW('T', 202, int) although it passes a struct ifreq (as in <linux/if_tun.h>)
nix::ioctl_write_ptr_bad!(
    tun_set_iff,
    nix::request_code_write!(b'T', 202, std::mem::size_of::<std::ffi::c_int>()),
    IfReq
);

/// Errors of a tap device.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The interface name does not fit or has odd characters.
    #[error("tap name {0:?}: expected 1-15 characters of [A-Za-z0-9._-]")]
    BadName(String),
    /// Opening `/dev/net/tun`.
    #[error("opening /dev/net/tun (is the tun module loaded?): {0}")]
    Open(std::io::Error),
    /// `TUNSETIFF` refused.
    #[error("TUNSETIFF {name}: {source}")]
    SetIff {
        /// The name asked for.
        name: String,
        /// The cause.
        source: nix::Error,
    },
    /// Setting `O_NONBLOCK` or duplicating the descriptor.
    #[error("tap {name}: {what}: {source}")]
    Fd {
        /// The interface.
        name: String,
        /// What failed.
        what: &'static str,
        /// The cause.
        source: nix::Error,
    },
    /// `ip`/`brctl` failed.
    #[error("tap {name}: `{command}` failed: {output}")]
    Command {
        /// The interface.
        name: String,
        /// The command line.
        command: String,
        /// Its exit status and stderr.
        output: String,
    },
}

/// An open tap device (or any frame-per-read file descriptor).
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    vnet_hdr: bool,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < IFNAMSIZ
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn set_nonblocking(fd: BorrowedFd<'_>, name: &str) -> Result<(), TapError> {
    let err = |what, source| TapError::Fd {
        name: name.to_owned(),
        what,
        source,
    };
    let flags = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL).map_err(|e| err("F_GETFL", e))?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags)).map_err(|e| err("F_SETFL", e))?;
    Ok(())
}

impl Tap {
    /// Creates the tap interface `name` (`IFF_TAP | IFF_NO_PI`, and `IFF_VNET_HDR` if
    /// `vnet_hdr`), non-blocking. It is not up yet: see [`link_up`](Self::link_up).
    pub fn create(name: &str, vnet_hdr: bool) -> Result<Tap, TapError> {
        if !valid_name(name) {
            return Err(TapError::BadName(name.to_owned()));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(TapError::Open)?;
        let mut req = IfReq {
            name: [0; IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | if vnet_hdr { IFF_VNET_HDR } else { 0 },
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        {
            // SAFETY: `file` is an open /dev/net/tun descriptor and `req` a live, properly
            // sized and initialised `struct ifreq` (40 bytes, name NUL-terminated) that the
            // kernel only reads and writes within its size during the call.
            unsafe { tun_set_iff(file.as_raw_fd(), &req) }.map_err(|source| TapError::SetIff {
                name: name.to_owned(),
                source,
            })?;
        }
        set_nonblocking(file.as_fd(), name)?;
        Ok(Tap {
            file,
            name: name.to_owned(),
            vnet_hdr,
        })
    }

    /// Wraps a descriptor that carries one frame per read and write (e.g. one end of a
    /// `UnixDatagram` pair in tests), made non-blocking; `vnet_hdr`: each frame is preceded
    /// by a [`VnetHdr`] both ways, as on a tap from [`create`](Self::create).
    pub fn from_fd(fd: OwnedFd, name: &str, vnet_hdr: bool) -> Result<Tap, TapError> {
        set_nonblocking(fd.as_fd(), name)?;
        Ok(Tap {
            file: File::from(fd),
            name: name.to_owned(),
            vnet_hdr,
        })
    }

    /// Whether frames carry a [`VnetHdr`].
    pub fn vnet_hdr(&self) -> bool {
        self.vnet_hdr
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A second handle on the same device (e.g. one for transmit, one for receive).
    pub fn try_clone(&self) -> Result<Tap, TapError> {
        let file = self.file.try_clone().map_err(|e| TapError::Fd {
            name: self.name.clone(),
            what: "dup",
            source: nix::Error::from_raw(e.raw_os_error().unwrap_or(0)),
        })?;
        Ok(Tap {
            file,
            name: self.name.clone(),
            vnet_hdr: self.vnet_hdr,
        })
    }

    /// Sets the host-side MAC to [`HOST_MAC`], brings the link up, and adds it to `bridge`
    /// if given (`ip link set dev NAME master BRIDGE`, or `brctl addif` where `ip` lacks
    /// `master`, as busybox's may).
    pub fn link_up(&self, bridge: Option<&str>) -> Result<(), TapError> {
        let name = self.name.as_str();
        run(
            name,
            "ip",
            &["link", "set", "dev", name, "address", HOST_MAC],
        )?;
        if let Some(br) = bridge {
            if !valid_name(br) {
                return Err(TapError::BadName(br.to_owned()));
            }
            if let Err(e) = run(name, "ip", &["link", "set", "dev", name, "master", br]) {
                log::debug!("{e}; trying brctl");
                run(name, "brctl", &["addif", br, name])?;
            }
        }
        run(name, "ip", &["link", "set", "dev", name, "up"])
    }

    /// Reads one frame into `buf` (after its header, if any); `None` if none is waiting. A
    /// frame longer than `buf` is truncated (the caller's buffer is larger than any MTU it
    /// serves); one shorter than the header reads as empty.
    pub fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<Option<RxFrame>> {
        loop {
            match self.file.read(buf) {
                Ok(n) if !self.vnet_hdr => {
                    return Ok(Some(RxFrame {
                        offset: 0,
                        len: n,
                        data_valid: false,
                    }))
                }
                Ok(n) => {
                    let data_valid = n >= VNET_HDR_LEN
                        && buf.first().is_some_and(|f| f & VNET_F_DATA_VALID != 0);
                    return Ok(Some(RxFrame {
                        offset: VNET_HDR_LEN,
                        len: n.saturating_sub(VNET_HDR_LEN),
                        data_valid,
                    }));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes one frame (with its header first if the tap has them). `WouldBlock` means the
    /// device's queue is full (the frame is lost).
    pub fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        loop {
            match self.file.write(frame) {
                Ok(n) if n == frame.len() => return Ok(()),
                Ok(n) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::WriteZero,
                        format!("short write of {n} of {} bytes", frame.len()),
                    ))
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

fn run(name: &str, cmd: &str, args: &[&str]) -> Result<(), TapError> {
    let line = format!("{cmd} {}", args.join(" "));
    let fail = |output: String| TapError::Command {
        name: name.to_owned(),
        command: line.clone(),
        output,
    };
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| fail(e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(fail(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    #[test]
    fn names_are_checked() {
        assert!(valid_name("kvif5.0"));
        assert!(valid_name("a23456789012345"));
        for bad in ["", "a234567890123456", "a b", "x/y", "é"] {
            assert!(!valid_name(bad), "{bad}");
            assert!(matches!(Tap::create(bad, true), Err(TapError::BadName(_))));
        }
    }

    #[test]
    fn frames_keep_their_boundaries_and_reads_do_not_block() {
        let (a, b) = UnixDatagram::pair().unwrap();
        let mut tap = Tap::from_fd(OwnedFd::from(a), "test0", false).unwrap();
        let mut buf = [0u8; 2048];
        assert_eq!(tap.recv(&mut buf).unwrap(), None);
        b.send(&[1u8; 60]).unwrap();
        b.send(&[2u8; 1514]).unwrap();
        let plain = |len| {
            Some(RxFrame {
                offset: 0,
                len,
                data_valid: false,
            })
        };
        assert_eq!(tap.recv(&mut buf).unwrap(), plain(60));
        assert_eq!(tap.recv(&mut buf).unwrap(), plain(1514));
        assert_eq!(buf[1513], 2);
        assert_eq!(tap.recv(&mut buf).unwrap(), None);
        let mut other = tap.try_clone().unwrap();
        other.send(&[3u8; 100]).unwrap();
        let mut got = [0u8; 200];
        assert_eq!(b.recv(&mut got).unwrap(), 100);
    }

    #[test]
    fn vnet_headers_round_trip_and_are_skipped_on_read() {
        let h = VnetHdr {
            flags: VNET_F_NEEDS_CSUM,
            gso_type: VNET_GSO_TCPV4,
            hdr_len: 66,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
        };
        let b = h.to_bytes();
        assert_eq!(b, [1, 1, 66, 0, 0xa8, 0x05, 34, 0, 16, 0]);
        assert_eq!(VnetHdr::from_bytes(&b), h);
        let (a, peer) = UnixDatagram::pair().unwrap();
        let mut tap = Tap::from_fd(OwnedFd::from(a), "test1", true).unwrap();
        let mut msg = VnetHdr {
            flags: VNET_F_DATA_VALID,
            ..VnetHdr::default()
        }
        .to_bytes()
        .to_vec();
        msg.extend_from_slice(&[7u8; 60]);
        peer.send(&msg).unwrap();
        peer.send(&[0u8; 4]).unwrap();
        let mut buf = [0u8; 2048];
        assert_eq!(
            tap.recv(&mut buf).unwrap(),
            Some(RxFrame {
                offset: VNET_HDR_LEN,
                len: 60,
                data_valid: true
            })
        );
        assert_eq!(tap.recv(&mut buf).unwrap().map(|f| f.len), Some(0));
    }
}
