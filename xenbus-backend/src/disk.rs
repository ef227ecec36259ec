//! The backing store of a virtual disk: a raw image file or a block device, accessed with
//! positioned reads and writes at 512-byte sector offsets.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::blkif::SECTOR_SIZE;

/// Errors of the backing store.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The image could not be opened.
    #[error("cannot open disk image {path} ({mode}): {source}")]
    Open {
        /// The image.
        path: PathBuf,
        /// `"read-only"` or `"read-write"`.
        mode: &'static str,
        /// The cause.
        source: std::io::Error,
    },
    /// The image's size could not be found, or is not a whole number of sectors.
    #[error("disk image {path}: size {size:?} is not a non-zero multiple of 512 bytes{}", .source.as_ref().map(|e| format!(": {e}")).unwrap_or_default())]
    Size {
        /// The image.
        path: PathBuf,
        /// The size found, if any.
        size: Option<u64>,
        /// Why it could not be read.
        source: Option<std::io::Error>,
    },
    /// A read, write, sync or discard failed.
    #[error("disk image {path}: {op} of {len} bytes at byte {offset}: {source}")]
    Io {
        /// The image.
        path: PathBuf,
        /// `"read"`, `"write"`, `"flush"`, `"discard"`.
        op: &'static str,
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
        /// The cause.
        source: std::io::Error,
    },
}

/// An open disk image.
#[derive(Debug)]
pub struct Disk {
    file: File,
    path: PathBuf,
    sectors: u64,
    readonly: bool,
    is_block_device: bool,
}

impl Disk {
    /// Opens `path` (a regular file or a block device) for reading, and writing unless
    /// `readonly`. Its size must be a non-zero multiple of 512 bytes.
    pub fn open(path: &Path, readonly: bool) -> Result<Disk, DiskError> {
        let mode = if readonly { "read-only" } else { "read-write" };
        let mut file = OpenOptions::new()
            .read(true)
            .write(!readonly)
            .open(path)
            .map_err(|source| DiskError::Open {
                path: path.to_owned(),
                mode,
                source,
            })?;
        let is_block_device = {
            use std::os::unix::fs::FileTypeExt;
            file.metadata()
                .map(|m| m.file_type().is_block_device())
                .unwrap_or(false)
        };
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| DiskError::Size {
                path: path.to_owned(),
                size: None,
                source: Some(source),
            })?;
        if size == 0 || size % SECTOR_SIZE != 0 {
            return Err(DiskError::Size {
                path: path.to_owned(),
                size: Some(size),
                source: None,
            });
        }
        Ok(Disk {
            file,
            path: path.to_owned(),
            sectors: size / SECTOR_SIZE,
            readonly,
            is_block_device,
        })
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Opened read-only.
    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// Whether discard is offered: hole punching in a regular file.
    pub fn can_discard(&self) -> bool {
        !self.readonly && !self.is_block_device
    }

    fn io_err(
        &self,
        op: &'static str,
        offset: u64,
        len: usize,
        source: std::io::Error,
    ) -> DiskError {
        DiskError::Io {
            path: self.path.clone(),
            op,
            offset,
            len: len as u64,
            source,
        }
    }

    /// Reads `buf.len()` bytes at byte `offset` (already checked against the size).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| self.io_err("read", offset, buf.len(), e))
    }

    /// Writes `data` at byte `offset`.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        self.file
            .write_all_at(data, offset)
            .map_err(|e| self.io_err("write", offset, data.len(), e))
    }

    /// `fdatasync`: everything written so far is on stable storage.
    pub fn flush(&self) -> Result<(), DiskError> {
        self.file
            .sync_data()
            .map_err(|e| self.io_err("flush", 0, 0, e))
    }

    /// Punches a hole over `len` bytes at `offset` (the size stays).
    pub fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        use nix::fcntl::{fallocate, FallocateFlags};
        let err = |e: std::io::Error| DiskError::Io {
            path: self.path.clone(),
            op: "discard",
            offset,
            len,
            source: e,
        };
        let off = i64::try_from(offset).map_err(|_| err(std::io::Error::from_raw_os_error(22)))?;
        let l = i64::try_from(len).map_err(|_| err(std::io::Error::from_raw_os_error(22)))?;
        use std::os::fd::AsRawFd;
        fallocate(
            self.file.as_raw_fd(),
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            off,
            l,
        )
        .map_err(|e| err(std::io::Error::from_raw_os_error(e as i32)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_image(name: &str, bytes: u64) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kemari-disk-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        let f = File::create(&p).unwrap();
        f.set_len(bytes).unwrap();
        p
    }

    #[test]
    fn open_checks_size_and_io_round_trips() {
        let p = temp_image("a.img", 64 * 1024);
        let d = Disk::open(&p, false).unwrap();
        assert_eq!(d.sectors(), 128);
        d.write_at(512, b"hello").unwrap();
        let mut b = [0u8; 5];
        d.read_at(512, &mut b).unwrap();
        assert_eq!(&b, b"hello");
        d.flush().unwrap();
        d.discard(0, 4096).unwrap();
        d.read_at(512, &mut b).unwrap();
        assert_eq!(b, [0; 5]);
        assert!(matches!(
            d.read_at(64 * 1024 - 2, &mut b),
            Err(DiskError::Io { op: "read", .. })
        ));

        let odd = temp_image("odd.img", 1000);
        assert!(matches!(
            Disk::open(&odd, true),
            Err(DiskError::Size {
                size: Some(1000),
                ..
            })
        ));
        let ro = Disk::open(&p, true).unwrap();
        assert!(ro.readonly() && !ro.can_discard());
        assert!(ro.write_at(0, b"x").is_err());
        assert!(matches!(
            Disk::open(Path::new("/nonexistent/x.img"), true),
            Err(DiskError::Open { .. })
        ));
    }
}
