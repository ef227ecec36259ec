//! Access to memory shared with a guest (grant mappings, foreign mappings, resources).
//!
//! The guest can change this memory at any moment, so it is never handed out as `&[u8]` or
//! `&mut [u8]` (that would promise Rust it cannot change).  Instead every access is a bounds-
//! checked copy in or out ([`GuestMemory::read_into`], [`GuestMemory::write_from`]) or a
//! volatile, naturally aligned scalar access ([`GuestMemory::read_u32`], ...).  Callers that
//! need ordering against the guest (ring indices) pair these with
//! `std::sync::atomic::fence`.

use core::cell::UnsafeCell;
use core::ptr::NonNull;

/// A guest-memory access was refused before touching memory.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemError {
    /// The access does not fit inside the mapping.
    #[error("access of {len} bytes at offset {offset} is outside the {size}-byte mapping")]
    OutOfBounds {
        /// Requested offset.
        offset: usize,
        /// Requested length in bytes.
        len: usize,
        /// Size of the mapping in bytes.
        size: usize,
    },
    /// A write to a mapping made read-only.
    #[error("write of {len} bytes at offset {offset} to a read-only mapping")]
    ReadOnly {
        /// Requested offset.
        offset: usize,
        /// Requested length in bytes.
        len: usize,
    },
    /// A scalar access at an offset not aligned to its size.
    #[error("{width}-byte access at offset {offset} is not {width}-byte aligned")]
    Misaligned {
        /// Requested offset.
        offset: usize,
        /// Size of the scalar in bytes.
        width: usize,
    },
}

/// A mapped range of memory that another party (a guest) may modify concurrently.
///
/// Invariant: `ptr..ptr+len` stays mapped (readable, and writable if `writable`) for the
/// lifetime of the `Region`; the owner (a mapping type) unmaps only after dropping it.
#[derive(Debug)]
pub(crate) struct Region {
    ptr: NonNull<u8>,
    len: usize,
    writable: bool,
}

impl Region {
    /// # Safety
    /// `ptr..ptr+len` must be mapped readable (and writable if `writable`) until the `Region`
    /// is dropped, and must not be accessed through Rust references by anyone else.
    pub(crate) unsafe fn new(ptr: NonNull<u8>, len: usize, writable: bool) -> Self {
        Self { ptr, len, writable }
    }

    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    fn check(&self, offset: usize, len: usize) -> Result<(), MemError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(MemError::OutOfBounds {
                offset,
                len,
                size: self.len,
            }),
        }
    }

    fn check_write(&self, offset: usize, len: usize) -> Result<(), MemError> {
        self.check(offset, len)?;
        if self.writable {
            Ok(())
        } else {
            Err(MemError::ReadOnly { offset, len })
        }
    }

    fn check_scalar(&self, offset: usize, width: usize) -> Result<(), MemError> {
        self.check(offset, width)?;
        if (self.ptr.as_ptr() as usize).wrapping_add(offset) % width == 0 {
            Ok(())
        } else {
            Err(MemError::Misaligned { offset, width })
        }
    }

    pub(crate) fn read_into_checked(&self, offset: usize, buf: &mut [u8]) -> Result<(), MemError> {
        self.read_into(offset, buf)
    }

    pub(crate) fn write_from_checked(&self, offset: usize, buf: &[u8]) -> Result<(), MemError> {
        self.write_from(offset, buf)
    }

    fn read_into(&self, offset: usize, buf: &mut [u8]) -> Result<(), MemError> {
        self.check(offset, buf.len())?;
        // SAFETY: offset..offset+buf.len() is inside the mapping (checked above, invariant of
        // Region); buf is a distinct Rust buffer, so the ranges cannot overlap.
        unsafe {
            core::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().add(offset),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        Ok(())
    }

    fn write_from(&self, offset: usize, buf: &[u8]) -> Result<(), MemError> {
        self.check_write(offset, buf.len())?;
        // SAFETY: inside a writable mapping (checked above); buf is a distinct Rust buffer.
        unsafe {
            core::ptr::copy_nonoverlapping(buf.as_ptr(), self.ptr.as_ptr().add(offset), buf.len())
        };
        Ok(())
    }

    fn fill(&self, offset: usize, len: usize, byte: u8) -> Result<(), MemError> {
        self.check_write(offset, len)?;
        // SAFETY: inside a writable mapping (checked above).
        unsafe { core::ptr::write_bytes(self.ptr.as_ptr().add(offset), byte, len) };
        Ok(())
    }
}

macro_rules! scalar_access {
    ($($read:ident $write:ident $t:ty),*) => {$(
        impl Region {
            fn $read(&self, offset: usize) -> Result<$t, MemError> {
                self.check_scalar(offset, core::mem::size_of::<$t>())?;
                // SAFETY: in bounds and naturally aligned (checked above); volatile because
                // the guest may change the value at any time.
                Ok(unsafe { core::ptr::read_volatile(self.ptr.as_ptr().add(offset).cast::<$t>()) })
            }
            fn $write(&self, offset: usize, value: $t) -> Result<(), MemError> {
                self.check_scalar(offset, core::mem::size_of::<$t>())?;
                self.check_write(offset, core::mem::size_of::<$t>())?;
                // SAFETY: in bounds, aligned and writable (checked above).
                unsafe {
                    core::ptr::write_volatile(self.ptr.as_ptr().add(offset).cast::<$t>(), value)
                };
                Ok(())
            }
        }
    )*};
}
scalar_access!(read_u8 write_u8 u8, read_u16 write_u16 u16, read_u32 write_u32 u32, read_u64 write_u64 u64);

/// Copy-in/copy-out and volatile scalar access to memory shared with a guest.
///
/// Implemented by [`crate::GrantMapping`], [`crate::ForeignMapping`],
/// [`crate::ResourceMapping`] and, for tests and in-memory fakes, [`HeapMemory`].
/// Offsets are in bytes from the start of the mapping; scalars are little-endian (x86) and
/// must be naturally aligned.
pub trait GuestMemory {
    /// Size of the mapping in bytes.
    fn len(&self) -> usize;
    /// Whether the mapping is empty (never true for a real mapping).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Whether writes are allowed.
    fn is_writable(&self) -> bool;
    /// Copies `buf.len()` bytes starting at `offset` out of the mapping.
    fn read_into(&self, offset: usize, buf: &mut [u8]) -> Result<(), MemError>;
    /// Copies `buf` into the mapping at `offset`.
    fn write_from(&self, offset: usize, buf: &[u8]) -> Result<(), MemError>;
    /// Sets `len` bytes at `offset` to `byte`.
    fn fill(&self, offset: usize, len: usize, byte: u8) -> Result<(), MemError>;
    /// Volatile read of a `u8`.
    fn read_u8(&self, offset: usize) -> Result<u8, MemError>;
    /// Volatile read of an aligned `u16`.
    fn read_u16(&self, offset: usize) -> Result<u16, MemError>;
    /// Volatile read of an aligned `u32`.
    fn read_u32(&self, offset: usize) -> Result<u32, MemError>;
    /// Volatile read of an aligned `u64`.
    fn read_u64(&self, offset: usize) -> Result<u64, MemError>;
    /// Volatile write of a `u8`.
    fn write_u8(&self, offset: usize, value: u8) -> Result<(), MemError>;
    /// Volatile write of an aligned `u16`.
    fn write_u16(&self, offset: usize, value: u16) -> Result<(), MemError>;
    /// Volatile write of an aligned `u32`.
    fn write_u32(&self, offset: usize, value: u32) -> Result<(), MemError>;
    /// Volatile write of an aligned `u64`.
    fn write_u64(&self, offset: usize, value: u64) -> Result<(), MemError>;
    /// Copies the whole mapping into a new vector.
    fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len()];
        // Cannot fail: the range is exactly the mapping.
        let _ = self.read_into(0, &mut v);
        v
    }
}

impl GuestMemory for Region {
    fn len(&self) -> usize {
        self.len
    }
    fn is_writable(&self) -> bool {
        self.writable
    }
    fn read_into(&self, offset: usize, buf: &mut [u8]) -> Result<(), MemError> {
        Region::read_into(self, offset, buf)
    }
    fn write_from(&self, offset: usize, buf: &[u8]) -> Result<(), MemError> {
        Region::write_from(self, offset, buf)
    }
    fn fill(&self, offset: usize, len: usize, byte: u8) -> Result<(), MemError> {
        Region::fill(self, offset, len, byte)
    }
    fn read_u8(&self, offset: usize) -> Result<u8, MemError> {
        Region::read_u8(self, offset)
    }
    fn read_u16(&self, offset: usize) -> Result<u16, MemError> {
        Region::read_u16(self, offset)
    }
    fn read_u32(&self, offset: usize) -> Result<u32, MemError> {
        Region::read_u32(self, offset)
    }
    fn read_u64(&self, offset: usize) -> Result<u64, MemError> {
        Region::read_u64(self, offset)
    }
    fn write_u8(&self, offset: usize, value: u8) -> Result<(), MemError> {
        Region::write_u8(self, offset, value)
    }
    fn write_u16(&self, offset: usize, value: u16) -> Result<(), MemError> {
        Region::write_u16(self, offset, value)
    }
    fn write_u32(&self, offset: usize, value: u32) -> Result<(), MemError> {
        Region::write_u32(self, offset, value)
    }
    fn write_u64(&self, offset: usize, value: u64) -> Result<(), MemError> {
        Region::write_u64(self, offset, value)
    }
}

/// Implements [`GuestMemory`] for a type with a `region(&self) -> &Region` method.
macro_rules! impl_guest_memory {
    ($ty:ty) => {
        impl $crate::mem::GuestMemory for $ty {
            fn len(&self) -> usize {
                $crate::mem::GuestMemory::len(self.region())
            }
            fn is_writable(&self) -> bool {
                $crate::mem::GuestMemory::is_writable(self.region())
            }
            fn read_into(&self, offset: usize, buf: &mut [u8]) -> Result<(), $crate::MemError> {
                $crate::mem::GuestMemory::read_into(self.region(), offset, buf)
            }
            fn write_from(&self, offset: usize, buf: &[u8]) -> Result<(), $crate::MemError> {
                $crate::mem::GuestMemory::write_from(self.region(), offset, buf)
            }
            fn fill(&self, offset: usize, len: usize, byte: u8) -> Result<(), $crate::MemError> {
                $crate::mem::GuestMemory::fill(self.region(), offset, len, byte)
            }
            fn read_u8(&self, offset: usize) -> Result<u8, $crate::MemError> {
                $crate::mem::GuestMemory::read_u8(self.region(), offset)
            }
            fn read_u16(&self, offset: usize) -> Result<u16, $crate::MemError> {
                $crate::mem::GuestMemory::read_u16(self.region(), offset)
            }
            fn read_u32(&self, offset: usize) -> Result<u32, $crate::MemError> {
                $crate::mem::GuestMemory::read_u32(self.region(), offset)
            }
            fn read_u64(&self, offset: usize) -> Result<u64, $crate::MemError> {
                $crate::mem::GuestMemory::read_u64(self.region(), offset)
            }
            fn write_u8(&self, offset: usize, value: u8) -> Result<(), $crate::MemError> {
                $crate::mem::GuestMemory::write_u8(self.region(), offset, value)
            }
            fn write_u16(&self, offset: usize, value: u16) -> Result<(), $crate::MemError> {
                $crate::mem::GuestMemory::write_u16(self.region(), offset, value)
            }
            fn write_u32(&self, offset: usize, value: u32) -> Result<(), $crate::MemError> {
                $crate::mem::GuestMemory::write_u32(self.region(), offset, value)
            }
            fn write_u64(&self, offset: usize, value: u64) -> Result<(), $crate::MemError> {
                $crate::mem::GuestMemory::write_u64(self.region(), offset, value)
            }
        }
    };
}
pub(crate) use impl_guest_memory;

/// Heap-backed [`GuestMemory`]: the same access rules and checks as a real mapping, over
/// ordinary memory.  For tests and in-memory fakes of the Xen interfaces.
pub struct HeapMemory {
    // Declared before `storage` so it is dropped first (Region's invariant).
    region: Region,
    // u64 cells: 8-byte alignment, like the page-aligned real mappings; UnsafeCell because
    // writes go through `&self`, as they do for guest memory.
    _storage: Box<[UnsafeCell<u64>]>,
}

impl HeapMemory {
    /// `len` zero bytes, writable unless `read_only`.
    pub fn new(len: usize, read_only: bool) -> Self {
        let words = len.div_ceil(8).max(1);
        let storage: Box<[UnsafeCell<u64>]> = (0..words).map(|_| UnsafeCell::new(0)).collect();
        let ptr =
            NonNull::new(storage.as_ptr().cast_mut().cast::<u8>()).unwrap_or(NonNull::dangling());
        // SAFETY: the boxed slice holds at least `len` bytes, is never moved out of or
        // referenced elsewhere, and outlives `region` (field order); UnsafeCell makes writes
        // through the shared pointer legitimate.
        let region = unsafe { Region::new(ptr, len, !read_only) };
        Self {
            region,
            _storage: storage,
        }
    }

    /// A writable copy of `bytes`.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let m = Self::new(bytes.len(), false);
        // Cannot fail: same length, writable.
        let _ = m.region.write_from(0, bytes);
        m
    }

    fn region(&self) -> &Region {
        &self.region
    }
}

impl_guest_memory!(HeapMemory);

// SAFETY: HeapMemory owns its storage (the Region points into it); moving both to another
// thread together is fine.  Not Sync, like the real mappings.
unsafe impl Send for HeapMemory {}

impl core::fmt::Debug for HeapMemory {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("HeapMemory")
            .field("len", &self.region.len)
            .field("writable", &self.region.writable)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_in_and_out_within_bounds() {
        let m = HeapMemory::new(4096, false);
        assert_eq!(m.len(), 4096);
        assert!(m.is_writable());
        m.write_from(4090, b"kemari").unwrap();
        let mut buf = [0u8; 6];
        m.read_into(4090, &mut buf).unwrap();
        assert_eq!(&buf, b"kemari");
        let mut empty = [0u8; 0];
        m.read_into(4096, &mut empty).unwrap();
    }

    #[test]
    fn out_of_bounds_is_refused_without_touching_memory() {
        let m = HeapMemory::from_bytes(&[7u8; 16]);
        let mut buf = [0u8; 4];
        assert_eq!(
            m.read_into(13, &mut buf),
            Err(MemError::OutOfBounds {
                offset: 13,
                len: 4,
                size: 16
            })
        );
        assert_eq!(buf, [0; 4]);
        assert_eq!(
            m.write_from(usize::MAX, &buf),
            Err(MemError::OutOfBounds {
                offset: usize::MAX,
                len: 4,
                size: 16
            })
        );
        assert!(matches!(m.read_u64(9), Err(MemError::OutOfBounds { .. })));
        assert!(matches!(
            m.fill(10, 7, 0),
            Err(MemError::OutOfBounds { .. })
        ));
        assert_eq!(m.to_vec(), vec![7u8; 16]);
        assert_eq!(
            MemError::OutOfBounds {
                offset: 13,
                len: 4,
                size: 16
            }
            .to_string(),
            "access of 4 bytes at offset 13 is outside the 16-byte mapping"
        );
    }

    #[test]
    fn read_only_mapping_refuses_every_write() {
        let m = HeapMemory::new(64, true);
        assert!(!m.is_writable());
        assert_eq!(
            m.write_from(0, b"x"),
            Err(MemError::ReadOnly { offset: 0, len: 1 })
        );
        assert_eq!(
            m.write_u32(4, 1),
            Err(MemError::ReadOnly { offset: 4, len: 4 })
        );
        assert_eq!(
            m.fill(0, 64, 0xff),
            Err(MemError::ReadOnly { offset: 0, len: 64 })
        );
        assert_eq!(m.read_u32(4), Ok(0));
    }

    #[test]
    fn scalars_are_little_endian_and_must_be_aligned() {
        let m = HeapMemory::new(32, false);
        m.write_u32(4, 0x1122_3344).unwrap();
        m.write_u64(8, 0x0102_0304_0506_0708).unwrap();
        m.write_u16(18, 0xbeef).unwrap();
        m.write_u8(21, 0x5a).unwrap();
        let mut raw = [0u8; 4];
        m.read_into(4, &mut raw).unwrap();
        assert_eq!(raw, [0x44, 0x33, 0x22, 0x11]);
        assert_eq!(m.read_u32(4), Ok(0x1122_3344));
        assert_eq!(m.read_u64(8), Ok(0x0102_0304_0506_0708));
        assert_eq!(m.read_u16(18), Ok(0xbeef));
        assert_eq!(m.read_u8(21), Ok(0x5a));
        assert_eq!(
            m.read_u32(6),
            Err(MemError::Misaligned {
                offset: 6,
                width: 4
            })
        );
        assert_eq!(
            m.write_u64(4, 0),
            Err(MemError::Misaligned {
                offset: 4,
                width: 8
            })
        );
        assert_eq!(
            m.read_u16(3),
            Err(MemError::Misaligned {
                offset: 3,
                width: 2
            })
        );
        m.fill(0, 32, 0xaa).unwrap();
        assert_eq!(m.read_u64(24), Ok(0xaaaa_aaaa_aaaa_aaaa));
    }
}
