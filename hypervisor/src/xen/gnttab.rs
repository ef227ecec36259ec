//! [`GrantMapping`] over `libxc_ffi::GrantMapping`.

use libxc_ffi::GuestMemory as _;

use super::errors;
use crate::{DomId, GrantMapping, GrantRef, Result};

/// Pages a domain granted to dom0, mapped with `xengnttab_map_domain_grant_refs`; unmapped
/// (`xengnttab_unmap`) on drop.
///
/// Accesses go through `libxc-ffi`'s bounds-checked copies and volatile, naturally aligned
/// scalar accesses: nothing here ever forms a Rust reference into the guest's pages.
#[derive(Debug)]
pub struct XenGrantMapping {
    domid: DomId,
    /// The first reference mapped, named in permission errors.
    first_ref: GrantRef,
    writable: bool,
    mapping: libxc_ffi::GrantMapping,
}

impl XenGrantMapping {
    pub(crate) fn new(
        domid: DomId,
        refs: &[GrantRef],
        writable: bool,
        mapping: libxc_ffi::GrantMapping,
    ) -> XenGrantMapping {
        XenGrantMapping {
            domid,
            first_ref: refs.first().copied().unwrap_or(0),
            writable,
            mapping,
        }
    }

    /// Number of pages mapped.
    pub fn pages(&self) -> usize {
        self.mapping.pages()
    }

    fn map_err<T>(&self, r: std::result::Result<T, libxc_ffi::MemError>) -> Result<T> {
        r.map_err(|e| errors::grant_access(self.domid, self.first_ref, e))
    }
}

impl GrantMapping for XenGrantMapping {
    fn domid(&self) -> DomId {
        self.domid
    }

    fn len(&self) -> usize {
        libxc_ffi::GuestMemory::len(&self.mapping)
    }

    fn writable(&self) -> bool {
        self.writable
    }

    fn read(&self, offset: usize, buf: &mut [u8]) -> Result<()> {
        self.map_err(self.mapping.read_into(offset, buf))
    }

    fn write(&self, offset: usize, data: &[u8]) -> Result<()> {
        self.map_err(self.mapping.write_from(offset, data))
    }

    fn read_u8(&self, offset: usize) -> Result<u8> {
        self.map_err(self.mapping.read_u8(offset))
    }

    fn read_u16(&self, offset: usize) -> Result<u16> {
        self.map_err(self.mapping.read_u16(offset))
    }

    fn read_u32(&self, offset: usize) -> Result<u32> {
        self.map_err(self.mapping.read_u32(offset))
    }

    fn read_u64(&self, offset: usize) -> Result<u64> {
        self.map_err(self.mapping.read_u64(offset))
    }

    fn write_u8(&self, offset: usize, value: u8) -> Result<()> {
        self.map_err(self.mapping.write_u8(offset, value))
    }

    fn write_u16(&self, offset: usize, value: u16) -> Result<()> {
        self.map_err(self.mapping.write_u16(offset, value))
    }

    fn write_u32(&self, offset: usize, value: u32) -> Result<()> {
        self.map_err(self.mapping.write_u32(offset, value))
    }

    fn write_u64(&self, offset: usize, value: u64) -> Result<()> {
        self.map_err(self.mapping.write_u64(offset, value))
    }
}
