//! The in-flight request journal: copies of the requests a backend has taken from a ring and
//! not yet answered, kept in a file (normally on dom0's tmpfs) so that a backend that takes the
//! ring over after a crash (`Attached`) can serve them again.
//!
//! Why it is needed: a backend answers a request by writing the response into the ring slot
//! the request occupied, and publishes responses in batches (`rsp_prod`). A backend killed
//! between writing responses and publishing them leaves slots between `rsp_prod` and
//! `req_prod` that hold responses, not requests; the request copies are gone from the ring.
//! Reading such a slot as a request yields garbage (seen in the lab: `kemari attach --takeover`
//! refused "requests" whose id was the overwritten response's operation). With the journal the
//! new backend takes the request from the journal whenever the journal holds the entry for
//! that exact ring index.
//!
//! Layout: a 32-byte header (magic, version, entry size, ring size, ring identity) then one
//! slot per ring entry: `u32 index, u32 length, u32 crc32(index, length, entry), u32 0, entry`.
//! A slot is written with a single `pwrite` before the request is acted on; a torn or stale
//! slot fails its crc or index check and is ignored (the ring slot is then used, which is
//! right for a request the old backend never consumed).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"KMRJRNL1";
const HEADER_SIZE: usize = 32;
const SLOT_HEADER: usize = 16;
/// The largest ring entry a journal takes (block and net entries are far smaller).
pub const MAX_ENTRY_SIZE: usize = 512;
/// The largest ring a journal covers (entries).
pub const MAX_RING_SIZE: u32 = 4096;

/// Errors of the journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// Creating, reading or writing the journal file failed.
    #[error("in-flight journal {path}: {what}: {source}")]
    Io {
        /// The journal file.
        path: PathBuf,
        /// The operation.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The ring or its entries are larger than a journal takes.
    #[error("in-flight journal {path}: ring of {ring_size} entries of {entry_size} bytes is beyond the limits ({MAX_RING_SIZE} entries of at most {MAX_ENTRY_SIZE} bytes)")]
    TooLarge {
        /// The journal file.
        path: PathBuf,
        /// Entries in the ring.
        ring_size: u32,
        /// Bytes per entry.
        entry_size: usize,
    },
}

/// Which connection a journal belongs to: a journal written for another ring is never used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingIdentity {
    /// The guest.
    pub domid: u32,
    /// The first grant reference of the ring.
    pub first_ref: u32,
    /// The frontend's event channel port.
    pub remote_port: u32,
}

/// The journal of one ring.
#[derive(Debug)]
pub struct Journal {
    file: File,
    path: PathBuf,
    ring_size: u32,
    entry_size: usize,
}

fn crc(index: u32, entry: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&index.to_le_bytes());
    h.update(&(entry.len() as u32).to_le_bytes());
    h.update(entry);
    h.finalize()
}

impl Journal {
    fn header(id: RingIdentity, ring_size: u32, entry_size: usize) -> [u8; HEADER_SIZE] {
        let mut h = [0u8; HEADER_SIZE];
        h[..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&(entry_size as u32).to_le_bytes());
        h[12..16].copy_from_slice(&ring_size.to_le_bytes());
        h[16..20].copy_from_slice(&id.domid.to_le_bytes());
        h[20..24].copy_from_slice(&id.first_ref.to_le_bytes());
        h[24..28].copy_from_slice(&id.remote_port.to_le_bytes());
        h
    }

    /// Opens the journal at `path` for a ring. `keep`: a journal already there for this very
    /// ring is kept (taking a ring over); otherwise, or if it belongs to another ring, it is
    /// started afresh.
    pub fn open(
        path: &Path,
        id: RingIdentity,
        ring_size: u32,
        entry_size: usize,
        keep: bool,
    ) -> Result<Journal, JournalError> {
        let io = |what, source| JournalError::Io {
            path: path.to_path_buf(),
            what,
            source,
        };
        if ring_size == 0 || ring_size > MAX_RING_SIZE || entry_size > MAX_ENTRY_SIZE {
            return Err(JournalError::TooLarge {
                path: path.to_path_buf(),
                ring_size,
                entry_size,
            });
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| io("creating its directory", e))?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| io("opening", e))?;
        let want = Journal::header(id, ring_size, entry_size);
        let mut have = [0u8; HEADER_SIZE];
        let same = keep && file.read_exact_at(&mut have, 0).is_ok() && have == want;
        if !same {
            file.set_len(0).map_err(|e| io("truncating", e))?;
            file.write_all_at(&want, 0)
                .map_err(|e| io("writing the header", e))?;
        }
        Ok(Journal {
            file,
            path: path.to_path_buf(),
            ring_size,
            entry_size,
        })
    }

    fn slot_offset(&self, index: u32) -> u64 {
        (HEADER_SIZE + (index % self.ring_size) as usize * (SLOT_HEADER + self.entry_size)) as u64
    }

    /// Records the request taken from ring index `index` (before acting on it).
    pub fn record(&self, index: u32, entry: &[u8]) -> Result<(), JournalError> {
        let n = entry.len().min(self.entry_size);
        let mut slot = vec![0u8; SLOT_HEADER + self.entry_size];
        slot[..4].copy_from_slice(&index.to_le_bytes());
        slot[4..8].copy_from_slice(&(n as u32).to_le_bytes());
        slot[8..12].copy_from_slice(&crc(index, &entry[..n]).to_le_bytes());
        slot[SLOT_HEADER..SLOT_HEADER + n].copy_from_slice(&entry[..n]);
        self.file
            .write_all_at(&slot, self.slot_offset(index))
            .map_err(|source| JournalError::Io {
                path: self.path.clone(),
                what: "recording a request",
                source,
            })
    }

    /// The request recorded for ring index `index`, if the journal holds an intact copy of it.
    pub fn lookup(&self, index: u32) -> Option<Vec<u8>> {
        let mut slot = vec![0u8; SLOT_HEADER + self.entry_size];
        self.file
            .read_exact_at(&mut slot, self.slot_offset(index))
            .ok()?;
        let word = |i: usize| u32::from_le_bytes([slot[i], slot[i + 1], slot[i + 2], slot[i + 3]]);
        let (idx, len, sum) = (word(0), word(4) as usize, word(8));
        if idx != index || len > self.entry_size {
            return None;
        }
        let entry = &slot[SLOT_HEADER..SLOT_HEADER + len];
        (crc(index, entry) == sum).then(|| entry.to_vec())
    }

    /// The journal file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the journal file (the device ended cleanly).
    pub fn remove(self) -> Result<(), JournalError> {
        std::fs::remove_file(&self.path).map_err(|source| JournalError::Io {
            path: self.path.clone(),
            what: "removing",
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kemari-journal-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d.join(name)
    }

    const ID: RingIdentity = RingIdentity {
        domid: 7,
        first_ref: 8,
        remote_port: 9,
    };

    #[test]
    fn records_are_found_by_their_exact_index() {
        let p = path("exact");
        let j = Journal::open(&p, ID, 32, 112, false).unwrap();
        assert_eq!(j.lookup(5), None);
        j.record(5, &[1u8; 112]).unwrap();
        assert_eq!(j.lookup(5), Some(vec![1u8; 112]));
        // same slot, another lap of the ring
        assert_eq!(j.lookup(5 + 32), None);
        j.record(5 + 32, &[2u8; 112]).unwrap();
        assert_eq!(j.lookup(5), None);
        assert_eq!(j.lookup(37), Some(vec![2u8; 112]));
        // wrapping indexes
        j.record(u32::MAX, &[3u8; 112]).unwrap();
        assert_eq!(j.lookup(u32::MAX), Some(vec![3u8; 112]));
    }

    #[test]
    fn kept_only_for_the_same_ring() {
        let p = path("keep");
        let j = Journal::open(&p, ID, 32, 112, false).unwrap();
        j.record(3, &[9u8; 112]).unwrap();
        drop(j);
        let j = Journal::open(&p, ID, 32, 112, true).unwrap();
        assert_eq!(j.lookup(3), Some(vec![9u8; 112]));
        drop(j);
        let other = RingIdentity {
            first_ref: 99,
            ..ID
        };
        let j = Journal::open(&p, other, 32, 112, true).unwrap();
        assert_eq!(j.lookup(3), None, "another ring's journal is not used");
        j.record(3, &[1u8; 112]).unwrap();
        drop(j);
        // a fresh connection (keep = false) starts empty
        let j = Journal::open(&p, other, 32, 112, false).unwrap();
        assert_eq!(j.lookup(3), None);
        j.remove().unwrap();
        assert!(!p.exists());
    }

    #[test]
    fn corrupt_slots_are_ignored() {
        let p = path("corrupt");
        let j = Journal::open(&p, ID, 4, 16, false).unwrap();
        j.record(2, &[7u8; 16]).unwrap();
        let off = j.slot_offset(2) + SLOT_HEADER as u64 + 3;
        j.file.write_all_at(&[0], off).unwrap();
        assert_eq!(j.lookup(2), None);
        // a length beyond the entry size
        j.record(1, &[7u8; 16]).unwrap();
        j.file.write_all_at(&[200], j.slot_offset(1) + 4).unwrap();
        assert_eq!(j.lookup(1), None);
    }

    #[test]
    fn limits() {
        let p = path("limits");
        assert!(matches!(
            Journal::open(&p, ID, MAX_RING_SIZE + 1, 112, false),
            Err(JournalError::TooLarge { .. })
        ));
        assert!(matches!(
            Journal::open(&p, ID, 0, 112, false),
            Err(JournalError::TooLarge { .. })
        ));
        assert!(Journal::open(Path::new("/proc/nonexistent/x"), ID, 4, 16, false).is_err());
    }
}
