//! The test frontend shared by the blkback tests: a minimal `xen-blkfront` inside a guest of
//! the in-memory Xen (its pages, grants, event channel and xenstore connection as the guest).

#![allow(clippy::unwrap_used, dead_code)]

use std::path::PathBuf;

use hypervisor::mem::{MemGuest, MemXen};
use hypervisor::{DomId, GrantRef, Pfn, Port, Tx, XenStore, PAGE_SIZE};
use xenbus_backend::blkif::*;
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, FromZeros, IntoBytes};

pub const RING_PFN: Pfn = 10;
pub const DATA_PFN: Pfn = 32;
pub const DISK_BYTES: u64 = 1 << 20;

pub fn image(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "kemari-{}-test-{}",
        env!("CARGO_CRATE_NAME"),
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(DISK_BYTES).unwrap();
    p
}

/// A minimal blkfront: one ring of `pages` pages at RING_PFN.., data pages from DATA_PFN.
pub struct Front {
    pub g: MemGuest,
    pub xs: Box<dyn XenStore>,
    pub dir: String,
    pub back: String,
    pub port: Port,
    pub pages: usize,
    pub size: u32,
    pub req_prod: u32,
    pub rsp_cons: u32,
}

impl Front {
    /// Sets the ring up and publishes it, as blkfront's talk_to_blkback.
    pub fn connect(host: &MemXen, domid: DomId, devid: u32, order: Option<u32>) -> Front {
        Front::connect_with(host, domid, devid, order, false)
    }

    /// As `connect`; `persistent`: announce feature-persistent (grants reused).
    pub fn connect_with(
        host: &MemXen,
        domid: DomId,
        devid: u32,
        order: Option<u32>,
        persistent: bool,
    ) -> Front {
        let g = host.guest(domid);
        let xs: Box<dyn XenStore> = Box::new(g.xenstore().unwrap());
        let dir = format!("/local/domain/{domid}/device/vbd/{devid}");
        let back =
            String::from_utf8(xs.read(Tx::NONE, &format!("{dir}/backend")).unwrap()).unwrap();
        assert_eq!(xs.read(Tx::NONE, &format!("{back}/state")).unwrap(), b"2");
        let pages = 1usize << order.unwrap_or(0);
        let mut refs = Vec::new();
        for i in 0..pages {
            g.fill_page(RING_PFN + i as u64, 0).unwrap();
            refs.push(g.grant_access(0, RING_PFN + i as u64, false).unwrap());
        }
        // SHARED_RING_INIT: req_event = rsp_event = 1
        g.write(RING_PFN, 4, &1u32.to_le_bytes()).unwrap();
        g.write(RING_PFN, 12, &1u32.to_le_bytes()).unwrap();
        let port = g.evtchn_alloc_unbound(0).unwrap();
        let w = |k: &str, v: String| {
            xs.write(Tx::NONE, &format!("{dir}/{k}"), v.as_bytes())
                .unwrap()
        };
        match order {
            None => w("ring-ref", refs[0].to_string()),
            Some(o) => {
                w("ring-page-order", o.to_string());
                for (i, r) in refs.iter().enumerate() {
                    w(&format!("ring-ref{i}"), r.to_string());
                }
            }
        }
        w("event-channel", port.to_string());
        w("protocol", "x86_64-abi".into());
        if persistent {
            w("feature-persistent", "1".into());
        }
        w("state", "3".into());
        Front {
            g,
            xs,
            dir,
            back,
            port,
            pages,
            size: ring_entries(pages),
            req_prod: 0,
            rsp_cons: 0,
        }
    }

    pub fn back_node(&self, node: &str) -> String {
        String::from_utf8(
            self.xs
                .read(Tx::NONE, &format!("{}/{node}", self.back))
                .unwrap(),
        )
        .unwrap()
    }

    pub fn set_state(&self, s: u32) {
        self.xs
            .write(
                Tx::NONE,
                &format!("{}/state", self.dir),
                s.to_string().as_bytes(),
            )
            .unwrap();
    }

    /// Writes ring bytes at a byte offset of the (multi-page) ring.
    pub fn ring_write(&self, offset: usize, data: &[u8]) {
        let mut done = 0;
        while done < data.len() {
            let at = offset + done;
            let n = (PAGE_SIZE - at % PAGE_SIZE).min(data.len() - done);
            self.g
                .write(
                    RING_PFN + (at / PAGE_SIZE) as u64,
                    at % PAGE_SIZE,
                    &data[done..done + n],
                )
                .unwrap();
            done += n;
        }
    }

    pub fn ring_read(&self, offset: usize, buf: &mut [u8]) {
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done;
            let n = (PAGE_SIZE - at % PAGE_SIZE).min(buf.len() - done);
            self.g
                .read(
                    RING_PFN + (at / PAGE_SIZE) as u64,
                    at % PAGE_SIZE,
                    &mut buf[done..done + n],
                )
                .unwrap();
            done += n;
        }
    }

    pub fn push(&mut self, entry: &[u8]) {
        let slot = (self.req_prod & (self.size - 1)) as usize;
        self.ring_write(64 + slot * ENTRY_SIZE, entry);
        self.req_prod = self.req_prod.wrapping_add(1);
    }

    /// Publishes req_prod and kicks (the frontend's RING_PUSH_REQUESTS + notify).
    pub fn kick(&mut self) {
        self.ring_write(0, &self.req_prod.to_le_bytes());
        self.g.evtchn_notify(self.port).unwrap();
    }

    pub fn responses(&mut self) -> Vec<BlkifResponse> {
        let mut b = [0u8; 4];
        self.ring_read(8, &mut b);
        let prod = u32::from_le_bytes(b);
        let mut out = Vec::new();
        while self.rsp_cons != prod {
            let slot = (self.rsp_cons & (self.size - 1)) as usize;
            let mut e = [0u8; 16];
            self.ring_read(64 + slot * ENTRY_SIZE, &mut e);
            out.push(BlkifResponse::read_from_bytes(&e).unwrap());
            self.rsp_cons = self.rsp_cons.wrapping_add(1);
        }
        // ask for an event at the next response
        self.ring_write(12, &self.rsp_cons.wrapping_add(1).to_le_bytes());
        out
    }

    pub fn grant(&self, pfn: Pfn, readonly: bool) -> GrantRef {
        self.g.grant_access(0, pfn, readonly).unwrap()
    }
}

pub fn rw(op: u8, id: u64, sector: u64, segs: &[(GrantRef, u8, u8)]) -> Vec<u8> {
    let mut r = RawRequest::new_zeroed();
    r.operation = op;
    r.nr_segments = segs.len() as u8;
    r.id = U64::new(id);
    r.sector_number = U64::new(sector);
    for (i, (g, f, l)) in segs.iter().enumerate() {
        r.seg[i] = RawSegment {
            gref: U32::new(*g),
            first_sect: *f,
            last_sect: *l,
            pad: [0; 2],
        };
    }
    r.as_bytes().to_vec()
}

pub fn pattern(seed: u8) -> [u8; PAGE_SIZE] {
    let mut p = [0u8; PAGE_SIZE];
    for (i, b) in p.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
    }
    p
}
