//! Two-phase application of a checkpoint's disk write log to the secondary's copies of the
//! guest's disks (see [`kemari_stream::disklog`] for the log itself).
//!
//! Phase 1 ([`DiskApply::prepare`]) finds the disk of every entry, checks that the entry lies
//! inside it, and copies the bytes every entry will overwrite into an undo buffer: nothing is
//! written, so a failure leaves the disks untouched. Phase 2 ([`DiskApply::write`]) applies the
//! entries in log order (a discard writes zeros: a discarded range reads back as zeros on the
//! primary too) and `fdatasync`s every disk it touched. If a write or a sync fails, the
//! entries written so far, the failed one included, are written back from the undo buffer in
//! reverse order and synced: the disks are again exactly at the previous checkpoint.
//! [`DiskApply::undo`] does the same after a successful write when a later step of the
//! checkpoint's apply fails. Only a failing rollback leaves a disk between two checkpoints, and
//! the error says so ([`DiskApplyError::RollbackFailed`]).

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use kemari_stream::disklog::{DiskLogEntry, DiskOp, SECTOR_BYTES};

/// A disk of the replica: the secondary's copy of one of the guest's disks.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplicaDisk {
    /// The guest's `virtual-device` number (51712 = xvda).
    pub devid: u32,
    /// The copy (raw image file or block device).
    pub path: PathBuf,
}

/// Errors of the disk apply.
#[derive(Debug, thiserror::Error)]
pub enum DiskApplyError {
    /// An entry names a disk the receiver was not given.
    #[error("disk log entry {seq} is for device {devid}, which this receiver has no copy of (receive --disk): nothing applied")]
    UnknownDisk {
        /// The entry.
        seq: u64,
        /// Its device.
        devid: u32,
    },
    /// An entry lies (partly) beyond the end of its disk.
    #[error("disk log entry {seq}: {bytes} bytes at sector {sector} end beyond {path} ({size} bytes): nothing applied")]
    OutOfRange {
        /// The entry.
        seq: u64,
        /// Its sector.
        sector: u64,
        /// Its length.
        bytes: u64,
        /// The disk.
        path: PathBuf,
        /// The disk's size.
        size: u64,
    },
    /// Opening a disk or reading what will be overwritten failed: nothing was written.
    #[error("preparing {path}: {what}, nothing applied: {source}")]
    Prepare {
        /// The disk.
        path: PathBuf,
        /// What failed.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Writing failed and was rolled back: the disks are at the previous checkpoint.
    #[error("disk log entry {seq} on {path}: {what} failed, disks rolled back to the previous checkpoint: {source}")]
    RolledBack {
        /// The entry (0: the final sync).
        seq: u64,
        /// The disk.
        path: PathBuf,
        /// What failed.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Writing failed and restoring the previous contents failed too: the disk is lost.
    #[error("disk log: {write}; restoring the previous contents of {path} failed too, the replica's disk is lost: {source}")]
    RollbackFailed {
        /// The failure that started the rollback.
        write: String,
        /// The disk.
        path: PathBuf,
        /// The rollback failure.
        #[source]
        source: std::io::Error,
    },
}

struct OpenDisk {
    path: PathBuf,
    file: File,
    size: u64,
}

/// One checkpoint's disk log, prepared for a two-phase write.
pub struct DiskApply {
    disks: HashMap<u32, OpenDisk>,
    /// Per entry, in log order: (devid, byte offset, previous contents).
    undo: Vec<(u32, u64, Vec<u8>)>,
}

impl std::fmt::Debug for DiskApply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskApply")
            .field("entries", &self.undo.len())
            .finish_non_exhaustive()
    }
}

fn entry_bytes(e: &DiskLogEntry<Vec<u8>>) -> u64 {
    match &e.op {
        DiskOp::Write(d) => d.len() as u64,
        DiskOp::Discard { bytes } => *bytes,
    }
}

static ZEROS: [u8; 64 * 1024] = [0u8; 64 * 1024];

fn write_zeros(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(ZEROS.len() as u64) as usize;
        file.write_all_at(&ZEROS[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

impl DiskApply {
    /// Phase 1: opens the disks the entries name, checks every range, and copies what each
    /// entry will overwrite.
    pub fn prepare(
        disks: &[ReplicaDisk],
        entries: &[DiskLogEntry<Vec<u8>>],
    ) -> Result<DiskApply, DiskApplyError> {
        let mut open: HashMap<u32, OpenDisk> = HashMap::new();
        let mut undo = Vec::with_capacity(entries.len());
        for e in entries {
            let disk = match open.entry(e.devid) {
                Entry::Occupied(o) => o.into_mut(),
                Entry::Vacant(v) => {
                    let d = disks.iter().find(|d| d.devid == e.devid).ok_or(
                        DiskApplyError::UnknownDisk {
                            seq: e.seq,
                            devid: e.devid,
                        },
                    )?;
                    let prep = |what: &str| {
                        let path = d.path.clone();
                        let what = what.to_string();
                        move |source| DiskApplyError::Prepare { path, what, source }
                    };
                    let file = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(&d.path)
                        .map_err(prep("opening it read-write"))?;
                    // a block device's metadata says 0: its size is where seeking to the end lands
                    let size = {
                        use std::io::{Seek, SeekFrom};
                        let mut f = &file;
                        f.seek(SeekFrom::End(0)).map_err(prep("finding its size"))?
                    };
                    v.insert(OpenDisk {
                        path: d.path.clone(),
                        file,
                        size,
                    })
                }
            };
            let size = &disk.size;
            let bytes = entry_bytes(e);
            let offset = e.sector.saturating_mul(SECTOR_BYTES);
            if offset.checked_add(bytes).map_or(true, |end| end > *size) {
                return Err(DiskApplyError::OutOfRange {
                    seq: e.seq,
                    sector: e.sector,
                    bytes,
                    path: disk.path.clone(),
                    size: *size,
                });
            }
            let mut old = vec![0u8; bytes as usize];
            disk.file
                .read_exact_at(&mut old, offset)
                .map_err(|source| DiskApplyError::Prepare {
                    path: disk.path.clone(),
                    what: format!("reading {bytes} bytes at offset {offset}"),
                    source,
                })?;
            undo.push((e.devid, offset, old));
        }
        Ok(DiskApply { disks: open, undo })
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.undo.len()
    }

    /// True if the log was empty.
    pub fn is_empty(&self) -> bool {
        self.undo.is_empty()
    }

    /// Phase 2: writes `entries` (the ones given to [`prepare`](Self::prepare)) and syncs the
    /// disks; rolled back on failure.
    pub fn write(&self, entries: &[DiskLogEntry<Vec<u8>>]) -> Result<(), DiskApplyError> {
        for (i, e) in entries.iter().enumerate() {
            let Some(disk) = self.disks.get(&e.devid) else {
                continue;
            };
            let offset = e.sector.saturating_mul(SECTOR_BYTES);
            let r = match &e.op {
                DiskOp::Write(d) => disk.file.write_all_at(d, offset),
                DiskOp::Discard { bytes } => write_zeros(&disk.file, offset, *bytes),
            };
            if let Err(source) = r {
                let failure = DiskApplyError::RolledBack {
                    seq: e.seq,
                    path: disk.path.clone(),
                    what: "writing",
                    source,
                };
                return Err(self.rollback(i + 1, failure));
            }
        }
        if let Err((path, source)) = self.sync() {
            let failure = DiskApplyError::RolledBack {
                seq: 0,
                path,
                what: "fdatasync",
                source,
            };
            return Err(self.rollback(self.undo.len(), failure));
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), (PathBuf, std::io::Error)> {
        for d in self.disks.values() {
            d.file.sync_data().map_err(|e| (d.path.clone(), e))?;
        }
        Ok(())
    }

    /// Writes back the first `n` entries' previous contents, last first, and syncs; returns
    /// `failure` if that worked, a `RollbackFailed` otherwise.
    fn rollback(&self, n: usize, failure: DiskApplyError) -> DiskApplyError {
        for (devid, offset, old) in self.undo.iter().take(n).rev() {
            if let Some(d) = self.disks.get(devid) {
                if let Err(source) = d.file.write_all_at(old, *offset) {
                    return DiskApplyError::RollbackFailed {
                        write: failure.to_string(),
                        path: d.path.clone(),
                        source,
                    };
                }
            }
        }
        if let Err((path, source)) = self.sync() {
            return DiskApplyError::RollbackFailed {
                write: failure.to_string(),
                path,
                source,
            };
        }
        failure
    }

    /// Restores every entry's previous contents after a successful [`write`](Self::write)
    /// (a later step of the checkpoint failed).
    pub fn undo(&self) -> Result<(), DiskApplyError> {
        let marker = DiskApplyError::RolledBack {
            seq: 0,
            path: PathBuf::new(),
            what: "a later step of the checkpoint",
            source: std::io::Error::other("checkpoint not applied"),
        };
        match self.rollback(self.undo.len(), marker) {
            DiskApplyError::RolledBack { .. } => Ok(()),
            e => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(tag: &str, bytes: usize) -> ReplicaDisk {
        let dir = std::env::temp_dir().join(format!(
            "kemari-disk-apply-{}-{tag}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("copy.img");
        let data: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, data).unwrap();
        ReplicaDisk { devid: 51712, path }
    }

    fn w(seq: u64, sector: u64, fill: u8, sectors: usize) -> DiskLogEntry<Vec<u8>> {
        DiskLogEntry {
            seq,
            devid: 51712,
            sector,
            op: DiskOp::Write(vec![fill; sectors * 512]),
        }
    }

    #[test]
    fn writes_discards_and_undo() {
        let d = disk("ok", 64 * 1024);
        let before = std::fs::read(&d.path).unwrap();
        let entries = vec![
            w(1, 0, 0xaa, 2),
            w(2, 1, 0xbb, 1),
            DiskLogEntry {
                seq: 3,
                devid: 51712,
                sector: 8,
                op: DiskOp::Discard { bytes: 4096 },
            },
        ];
        let a = DiskApply::prepare(std::slice::from_ref(&d), &entries).unwrap();
        assert_eq!(a.len(), 3);
        a.write(&entries).unwrap();
        let after = std::fs::read(&d.path).unwrap();
        assert!(after[..512].iter().all(|b| *b == 0xaa));
        assert!(after[512..1024].iter().all(|b| *b == 0xbb));
        assert!(after[4096..8192].iter().all(|b| *b == 0));
        assert_eq!(after[8192..], before[8192..]);
        a.undo().unwrap();
        assert_eq!(std::fs::read(&d.path).unwrap(), before);
    }

    #[test]
    fn bad_entries_refused_before_writing() {
        let d = disk("bad", 8192);
        let before = std::fs::read(&d.path).unwrap();
        // the second entry ends one sector past the disk
        let entries = vec![w(1, 0, 1, 1), w(2, 15, 2, 2)];
        assert!(matches!(
            DiskApply::prepare(std::slice::from_ref(&d), &entries),
            Err(DiskApplyError::OutOfRange { seq: 2, .. })
        ));
        let mut other = w(1, 0, 1, 1);
        other.devid = 51728;
        assert!(matches!(
            DiskApply::prepare(std::slice::from_ref(&d), &[other]),
            Err(DiskApplyError::UnknownDisk { devid: 51728, .. })
        ));
        let missing = ReplicaDisk {
            devid: 51712,
            path: d.path.with_extension("missing"),
        };
        assert!(matches!(
            DiskApply::prepare(&[missing], &entries),
            Err(DiskApplyError::Prepare { .. })
        ));
        assert_eq!(std::fs::read(&d.path).unwrap(), before);
    }
}
