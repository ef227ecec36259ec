//! Fingerprints for comparing a primary with its replica: every populated page, and the
//! vCPU records of an HVM context.

use hypervisor::{hvm_save, DomId, GuestMemory, HypervisorError, Pfn, PAGE_SIZE};
use serde::Serialize;

use crate::debug::fnv1a64;

/// Pages per read call while hashing.
const HASH_BATCH: usize = 1024;

/// Size of Xen 4.17's `struct hvm_hw_cpu` (the body of an `HVM_SAVE_CPU` record).
pub const HVM_HW_CPU_LEN: usize = 1032;
/// Offset of `hvm_hw_cpu.tsc`: 512 bytes of FPU state, 28 u64 registers (rax..dr7), 18 u32
/// selectors and limits, 10 u64 bases, 8 u32 attribute words, 11 u64 MSR fields.
pub const HVM_HW_CPU_TSC_OFFSET: usize = 1008;

/// Errors of the fingerprint functions.
#[derive(Debug, thiserror::Error)]
pub enum HashError {
    /// Reading the domain failed (other than unpopulated pages, which are skipped).
    #[error("hashing the memory of domain {domid}: {source}")]
    Xen {
        /// The domain.
        domid: DomId,
        /// The failed call.
        #[source]
        source: HypervisorError,
    },
    /// The HVM context is malformed.
    #[error("HVM context: {0}")]
    Context(#[from] hvm_save::HvmSaveError),
}

/// A fingerprint of a domain's memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemHash {
    /// Populated pages hashed.
    pub pages: u64,
    /// Pfns up to the highest one that could not be read (unpopulated: holes).
    pub holes: u64,
    /// FNV-1a 64 over `(pfn, page hash)` of every populated page, ascending pfn, as hex.
    pub hash: String,
    /// `(pfn, FNV-1a 64 of the page)`, if asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_page: Option<Vec<(Pfn, String)>>,
}

/// Hashes every populated page of `domid` (pfns `0..=max_pfn`). Pause the domain first for a
/// meaningful result.
pub fn mem_hash(
    mem: &dyn GuestMemory,
    domid: DomId,
    max_pfn: Pfn,
    per_page: bool,
) -> Result<MemHash, HashError> {
    let mut combined = Vec::with_capacity(16);
    let mut state = FNV_OFFSET;
    let mut pages = 0u64;
    let mut holes = 0u64;
    let mut list = per_page.then(Vec::new);
    let mut buf = vec![0u8; HASH_BATCH * PAGE_SIZE];
    let mut start = 0u64;
    while start <= max_pfn {
        let end = max_pfn.saturating_add(1).min(start + HASH_BATCH as u64);
        let pfns: Vec<Pfn> = (start..end).collect();
        let buf = &mut buf[..pfns.len() * PAGE_SIZE];
        let failed: Vec<Pfn> = match mem.read_pages(domid, &pfns, buf) {
            Ok(()) => Vec::new(),
            Err(HypervisorError::Pages { failures, .. }) => {
                failures.into_iter().map(|(p, _)| p).collect()
            }
            Err(source) => return Err(HashError::Xen { domid, source }),
        };
        for (pfn, page) in pfns.iter().zip(buf.chunks_exact(PAGE_SIZE)) {
            if failed.contains(pfn) {
                holes += 1;
                continue;
            }
            let h = fnv1a64(page);
            combined.clear();
            combined.extend_from_slice(&pfn.to_le_bytes());
            combined.extend_from_slice(&h.to_le_bytes());
            state = fnv_extend(state, &combined);
            pages += 1;
            if let Some(list) = list.as_mut() {
                list.push((*pfn, format!("{h:016x}")));
            }
        }
        start = end;
    }
    Ok(MemHash {
        pages,
        holes,
        hash: format!("{state:016x}"),
        per_page: list,
    })
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv_extend(mut h: u64, data: &[u8]) -> u64 {
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// A fingerprint of one vCPU's `HVM_SAVE_CPU` record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CpuHash {
    /// vCPU (record instance).
    pub vcpu: u16,
    /// FNV-1a 64 of the record with the `tsc` field zeroed, as hex.
    pub hash: String,
    /// The `tsc` field (Xen computes it at save time from the running TSC, so it differs
    /// between two saves of the same paused guest).
    pub tsc: u64,
    /// `rip`, for humans.
    pub rip: u64,
}

/// Offset of `hvm_hw_cpu.rip`.
const HVM_HW_CPU_RIP_OFFSET: usize = 512 + 16 * 8;

fn le_u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(off..off + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

/// Fingerprints of the CPU records of an HVM context, by vCPU. Records of another size than
/// Xen 4.17's are hashed whole (tsc reported as 0).
pub fn cpu_hashes(context: &[u8]) -> Result<Vec<CpuHash>, HashError> {
    let mut out = Vec::new();
    for rec in hvm_save::parse(context)? {
        if rec.typecode != hvm_save::HVM_SAVE_CPU {
            continue;
        }
        let mut body = rec.body.to_vec();
        let (tsc, rip) = if body.len() == HVM_HW_CPU_LEN {
            let tsc = le_u64_at(&body, HVM_HW_CPU_TSC_OFFSET);
            body[HVM_HW_CPU_TSC_OFFSET..HVM_HW_CPU_TSC_OFFSET + 8].fill(0);
            (tsc, le_u64_at(&body, HVM_HW_CPU_RIP_OFFSET))
        } else {
            (0, 0)
        };
        out.push(CpuHash {
            vcpu: rec.instance,
            hash: format!("{:016x}", fnv1a64(&body)),
            tsc,
            rip,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hypervisor::hvm_save::HvmContextBuilder;
    use hypervisor::mem::{DomainConfig, MemXen};

    #[test]
    fn mem_hash_skips_holes_and_sees_every_change() {
        let xen = MemXen::new();
        let dom = xen
            .create_domain(DomainConfig::hvm(2100).with_holes(&[5, 2000]))
            .unwrap();
        let g = xen.guest(dom);
        let a = mem_hash(&xen, dom, 2099, true).unwrap();
        assert_eq!(a.pages, 2098);
        assert_eq!(a.holes, 2);
        assert_eq!(a.per_page.as_ref().unwrap().len(), 2098);
        g.write(2099, 4095, &[1]).unwrap();
        let b = mem_hash(&xen, dom, 2099, false).unwrap();
        assert_ne!(a.hash, b.hash);
        assert!(b.per_page.is_none());
        g.write(2099, 4095, &[0]).unwrap();
        assert_eq!(mem_hash(&xen, dom, 2099, false).unwrap().hash, a.hash);
    }

    #[test]
    fn cpu_hash_ignores_only_the_tsc() {
        let mk = |tsc: u64, rax: u8| {
            let mut body = vec![0u8; HVM_HW_CPU_LEN];
            body[512] = rax;
            body[HVM_HW_CPU_TSC_OFFSET..HVM_HW_CPU_TSC_OFFSET + 8]
                .copy_from_slice(&tsc.to_le_bytes());
            let mut b = HvmContextBuilder::new();
            b.push(hvm_save::HVM_SAVE_CPU, 0, &body).unwrap();
            b.finish()
        };
        let a = cpu_hashes(&mk(100, 1)).unwrap();
        let b = cpu_hashes(&mk(200, 1)).unwrap();
        let c = cpu_hashes(&mk(100, 2)).unwrap();
        assert_eq!(a[0].hash, b[0].hash);
        assert_eq!((a[0].tsc, b[0].tsc), (100, 200));
        assert_ne!(a[0].hash, c[0].hash);
        assert!(cpu_hashes(&[1, 2, 3]).is_err());
    }
}
