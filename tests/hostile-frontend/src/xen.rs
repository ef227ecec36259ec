//! The guest-side Xen devices a frontend needs, used directly (no library in the guest):
//! `/dev/xen/xenbus` (xenstore messages), `/dev/xen/gntalloc` (grant pages to another domain)
//! and `/dev/xen/evtchn` (an unbound event channel for the backend, notifications).
//!
//! Layouts and ioctl numbers are those of Linux's uapi headers `xen/gntalloc.h` and
//! `xen/evtchn.h` and Xen's `io/xs_wire.h`.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

use anyhow::{bail, Context};

/// Bytes in a page.
pub const PAGE_SIZE: usize = 4096;

const XS_READ: u32 = 2;
const XS_WRITE: u32 = 11;
const XS_ERROR: u32 = 16;

/// `_IOC(_IOC_NONE, type, nr, size)`.
const fn ioc_none(ty: u8, nr: u8, size: usize) -> libc::c_ulong {
    ((size as libc::c_ulong) << 16) | ((ty as libc::c_ulong) << 8) | nr as libc::c_ulong
}

/// `struct ioctl_gntalloc_alloc_gref` with room for `MAX_GREFS` references.
#[repr(C)]
struct AllocGref {
    domid: u16,
    flags: u16,
    count: u32,
    index: u64,
    gref_ids: [u32; MAX_GREFS],
}

/// `struct ioctl_gntalloc_dealloc_gref`.
#[repr(C)]
struct DeallocGref {
    index: u64,
    count: u32,
}

const MAX_GREFS: usize = 8;
/// The header's size of the alloc struct (`gref_ids[1]`, padded to 8): 24 bytes.
const IOCTL_GNTALLOC_ALLOC_GREF: libc::c_ulong = ioc_none(b'G', 5, 24);
const IOCTL_GNTALLOC_DEALLOC_GREF: libc::c_ulong =
    ioc_none(b'G', 6, std::mem::size_of::<DeallocGref>());
const GNTALLOC_FLAG_WRITABLE: u16 = 1;
const IOCTL_EVTCHN_BIND_UNBOUND_PORT: libc::c_ulong = ioc_none(b'E', 2, 4);
const IOCTL_EVTCHN_NOTIFY: libc::c_ulong = ioc_none(b'E', 4, 4);

/// A connection to xenstore through the guest kernel's `/dev/xen/xenbus`.
pub struct XenBus {
    file: File,
    req_id: u32,
}

impl XenBus {
    /// Opens `/dev/xen/xenbus`.
    pub fn open() -> anyhow::Result<XenBus> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/xen/xenbus")
            .context("opening /dev/xen/xenbus")?;
        Ok(XenBus { file, req_id: 0 })
    }

    fn request(&mut self, ty: u32, payload: &[u8]) -> anyhow::Result<Result<Vec<u8>, String>> {
        self.req_id = self.req_id.wrapping_add(1);
        let len = u32::try_from(payload.len()).context("xenstore message too long")?;
        let mut msg = Vec::with_capacity(16 + payload.len());
        for v in [ty, self.req_id, 0, len] {
            msg.extend_from_slice(&v.to_ne_bytes());
        }
        msg.extend_from_slice(payload);
        self.file
            .write_all(&msg)
            .context("writing to /dev/xen/xenbus")?;
        let mut hdr = [0u8; 16];
        self.file
            .read_exact(&mut hdr)
            .context("reading a xenstore reply header")?;
        let word = |i: usize| u32::from_ne_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
        let (rty, rlen) = (word(0), word(12));
        if rlen > 65536 {
            bail!("xenstore reply of {rlen} bytes");
        }
        let mut body = vec![0u8; rlen as usize];
        self.file
            .read_exact(&mut body)
            .context("reading a xenstore reply")?;
        if rty == XS_ERROR {
            let e = String::from_utf8_lossy(&body)
                .trim_end_matches('\0')
                .to_owned();
            return Ok(Err(e));
        }
        if rty != ty {
            bail!("xenstore answered type {rty} to a request of type {ty}");
        }
        Ok(Ok(body))
    }

    /// Reads `path` (relative paths are under this domain's home); `None` if it does not exist.
    pub fn read(&mut self, path: &str) -> anyhow::Result<Option<String>> {
        let mut p = path.as_bytes().to_vec();
        p.push(0);
        match self.request(XS_READ, &p)? {
            Ok(v) => Ok(Some(
                String::from_utf8_lossy(&v)
                    .trim_end_matches('\0')
                    .to_owned(),
            )),
            Err(e) if e == "ENOENT" => Ok(None),
            Err(e) => bail!("xenstore read {path}: {e}"),
        }
    }

    /// Writes `value` at `path`.
    pub fn write(&mut self, path: &str, value: &str) -> anyhow::Result<()> {
        let mut p = path.as_bytes().to_vec();
        p.push(0);
        p.extend_from_slice(value.as_bytes());
        match self.request(XS_WRITE, &p)? {
            Ok(_) => Ok(()),
            Err(e) => bail!("xenstore write {path} = {value:?}: {e}"),
        }
    }
}

/// Pages this guest granted to another domain, mapped here.
pub struct Grant {
    /// The grant references, one per page.
    pub refs: Vec<u32>,
    index: u64,
    ptr: NonNull<u8>,
    len: usize,
}

impl Grant {
    /// Copies `data` to byte `offset` of the pages.
    pub fn write(&self, offset: usize, data: &[u8]) {
        assert!(offset + data.len() <= self.len, "write beyond the grant");
        for (i, b) in data.iter().enumerate() {
            // SAFETY: offset + i < len (checked above): inside our live mapping; volatile
            // because the other domain reads the page concurrently.
            unsafe { self.ptr.as_ptr().add(offset + i).write_volatile(*b) };
        }
    }

    /// Copies bytes at `offset` into `out`.
    pub fn read(&self, offset: usize, out: &mut [u8]) {
        assert!(offset + out.len() <= self.len, "read beyond the grant");
        for (i, b) in out.iter_mut().enumerate() {
            // SAFETY: inside our live mapping (checked above); volatile: the other domain
            // writes the page concurrently.
            *b = unsafe { self.ptr.as_ptr().add(offset + i).read_volatile() };
        }
    }

    /// Stores a 32-bit ring index at an aligned `offset`.
    pub fn write_u32(&self, offset: usize, v: u32) {
        assert!(offset % 4 == 0 && offset + 4 <= self.len, "bad u32 offset");
        // SAFETY: aligned (the mapping is page aligned, offset % 4 == 0) and inside the mapping.
        unsafe { (self.ptr.as_ptr().add(offset) as *mut u32).write_volatile(v) };
    }

    /// Loads a 32-bit ring index at an aligned `offset`.
    pub fn read_u32(&self, offset: usize) -> u32 {
        assert!(offset % 4 == 0 && offset + 4 <= self.len, "bad u32 offset");
        // SAFETY: aligned and inside the mapping, as in write_u32.
        unsafe { (self.ptr.as_ptr().add(offset) as *const u32).read_volatile() }
    }
}

impl Drop for Grant {
    fn drop(&mut self) {
        // SAFETY: ptr/len are the mapping mmap returned; nothing uses it after this.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// `/dev/xen/gntalloc`.
pub struct GntAlloc {
    file: File,
}

impl GntAlloc {
    /// Opens `/dev/xen/gntalloc` (module xen-gntalloc).
    pub fn open() -> anyhow::Result<GntAlloc> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/xen/gntalloc")
            .context("opening /dev/xen/gntalloc")?;
        Ok(GntAlloc { file })
    }

    /// Grants `count` new zeroed pages to `domid` (writable or read-only) and maps them here.
    pub fn alloc(&self, domid: u16, count: usize, writable: bool) -> anyhow::Result<Grant> {
        if count == 0 || count > MAX_GREFS {
            bail!("gntalloc: {count} pages asked, 1..={MAX_GREFS} possible");
        }
        let mut a = AllocGref {
            domid,
            flags: if writable { GNTALLOC_FLAG_WRITABLE } else { 0 },
            count: count as u32,
            index: 0,
            gref_ids: [0; MAX_GREFS],
        };
        // SAFETY: the struct is the uapi layout with room for `count` references, which is all
        // the kernel writes back.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                IOCTL_GNTALLOC_ALLOC_GREF,
                &mut a as *mut AllocGref,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("IOCTL_GNTALLOC_ALLOC_GREF of {count} pages to {domid}"));
        }
        let len = count * PAGE_SIZE;
        // SAFETY: maps the pages just allocated (the offset is the index gntalloc returned);
        // the result is checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.file.as_raw_fd(),
                a.index as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mmap of the granted pages");
        }
        let ptr = NonNull::new(p.cast::<u8>()).context("mmap returned NULL")?;
        Ok(Grant {
            refs: a.gref_ids[..count].to_vec(),
            index: a.index,
            ptr,
            len,
        })
    }

    /// Unmaps the pages and ends their grants: their references are no longer this guest's to
    /// give.
    pub fn revoke(&self, grant: Grant) -> anyhow::Result<Vec<u32>> {
        let d = DeallocGref {
            index: grant.index,
            count: grant.refs.len() as u32,
        };
        let refs = grant.refs.clone();
        drop(grant);
        // SAFETY: the uapi struct, read by the kernel only.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                IOCTL_GNTALLOC_DEALLOC_GREF,
                &d as *const DeallocGref,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error()).context("IOCTL_GNTALLOC_DEALLOC_GREF");
        }
        Ok(refs)
    }
}

/// `/dev/xen/evtchn`.
pub struct Evtchn {
    file: File,
}

impl Evtchn {
    /// Opens `/dev/xen/evtchn` (module xen-evtchn).
    pub fn open() -> anyhow::Result<Evtchn> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/xen/evtchn")
            .context("opening /dev/xen/evtchn")?;
        Ok(Evtchn { file })
    }

    /// Allocates a port `remote` may bind to; returns it.
    pub fn bind_unbound(&self, remote: u32) -> anyhow::Result<u32> {
        let mut arg: u32 = remote;
        // SAFETY: struct ioctl_evtchn_bind_unbound_port is one unsigned int.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                IOCTL_EVTCHN_BIND_UNBOUND_PORT,
                &mut arg as *mut u32,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("IOCTL_EVTCHN_BIND_UNBOUND_PORT to domain {remote}"));
        }
        Ok(rc as u32)
    }

    /// Kicks the other end of `port`.
    pub fn notify(&self, port: u32) -> anyhow::Result<()> {
        let mut arg: u32 = port;
        // SAFETY: struct ioctl_evtchn_notify is one unsigned int.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                IOCTL_EVTCHN_NOTIFY,
                &mut arg as *mut u32,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("IOCTL_EVTCHN_NOTIFY port {port}"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_linux_uapi() {
        // values of the macros in Linux's include/uapi/xen/{gntalloc,evtchn}.h on x86_64
        assert_eq!(IOCTL_GNTALLOC_ALLOC_GREF, 0x0018_4705);
        assert_eq!(IOCTL_GNTALLOC_DEALLOC_GREF, 0x0010_4706);
        assert_eq!(IOCTL_EVTCHN_BIND_UNBOUND_PORT, 0x0004_4502);
        assert_eq!(IOCTL_EVTCHN_NOTIFY, 0x0004_4504);
        assert_eq!(std::mem::offset_of!(AllocGref, gref_ids), 16);
    }
}
