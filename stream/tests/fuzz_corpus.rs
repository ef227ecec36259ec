//! Stable stand-in for the cargo-fuzz targets (which need nightly): runs each target's body over
//! the seed corpus checked in under `stream/fuzz/corpus/<target>/`, over freshly generated seeds,
//! and over every truncation and many single-byte mutations of them.
//!
//! `KEMARI_STREAM_WRITE_CORPUS=1 cargo test -p kemari-stream --test fuzz_corpus` rewrites the
//! generated seeds into the corpus folders.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::PathBuf;

use kemari_stream::checkpoint::{
    encode_checkpoint, zero_page, Ack, Checkpoint, EpochReason, Nack, NackReason, Reply,
};
use kemari_stream::fuzzing::{checkpoint_one_input, fuzz_limits, image_one_input};
use kemari_stream::image::{GuestKind, ImageSpec, ImageWriter};
use kemari_stream::libxc::TscInfo;
use kemari_stream::PAGE_SIZE;

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

fn hvm_blob() -> Vec<u8> {
    let mut blob = Vec::new();
    for (t, len) in [(1u16, 24u32), (2, 64), (0, 0)] {
        blob.extend_from_slice(&t.to_le_bytes());
        blob.extend_from_slice(&0u16.to_le_bytes());
        blob.extend_from_slice(&len.to_le_bytes());
        blob.extend(vec![0x11u8; len as usize]);
    }
    blob
}

fn image_seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for (kind, name, npages) in [
        (GuestKind::Pvh, "pvh-0pages", 0usize),
        (GuestKind::Pvh, "pvh-2pages", 2),
        (GuestKind::Hvm, "hvm-1page", 1),
    ] {
        let spec = ImageSpec {
            kind,
            config_json: match kind {
                GuestKind::Hvm => br#"{"c_info":{"type":"hvm","name":"seed"}}"#.to_vec(),
                GuestKind::Pvh => br#"{"c_info":{"type":"pvh","name":"seed"}}"#.to_vec(),
            },
            xen_major: 4,
            xen_minor: 17,
            cpuid_policy: Some(vec![0xC1; 24]),
            msr_policy: None,
        };
        let page = [0x5Au8; PAGE_SIZE];
        let mut w = ImageWriter::new(Vec::new(), &spec, fuzz_limits()).unwrap();
        let pages: Vec<(u64, &[u8; PAGE_SIZE])> = (0..npages as u64).map(|p| (p, &page)).collect();
        if !pages.is_empty() {
            w.write_pages(&pages).unwrap();
        }
        w.write_tsc_info(&TscInfo {
            mode: 0,
            khz: 1_000_000,
            nsec: 1,
            incarnation: 0,
        })
        .unwrap();
        w.write_hvm_context(&hvm_blob()).unwrap();
        w.write_hvm_params(&[(1, 2), (3, 4)]).unwrap();
        let img = match kind {
            GuestKind::Hvm => w.finish(Some(b"QEVM"), None).unwrap(),
            GuestKind::Pvh => w.finish(None, None).unwrap(),
        };
        out.push((name.to_string(), img));
    }
    out
}

fn checkpoint_seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut page = zero_page();
    page[7] = 7;
    let cps = [
        (
            "cp-empty",
            Checkpoint {
                seq: 1,
                reason: EpochReason::Initial,
                pages: vec![],
                hvm_context: vec![],
                hvm_params: vec![],
                emulator_state: None,
                extra: vec![],
            },
        ),
        (
            "cp-full",
            Checkpoint {
                seq: 2,
                reason: EpochReason::Io {
                    device: "vif1.0".into(),
                },
                pages: vec![(0x42, page)],
                hvm_context: hvm_blob(),
                hvm_params: vec![(2, 0xfeff_f000)],
                emulator_state: Some(b"QEVM".to_vec()),
                extra: vec![(1, b"log".to_vec())],
            },
        ),
    ];
    for (name, cp) in cps {
        out.push((
            name.to_string(),
            encode_checkpoint(&cp, &fuzz_limits()).unwrap(),
        ));
    }
    out.push((
        "reply-ack".into(),
        Reply::Ack(Ack { seq: 5 }).encode().to_vec(),
    ));
    out.push((
        "reply-nack".into(),
        Reply::Nack(Nack {
            seq: 6,
            reason: NackReason::Corrupt,
        })
        .encode()
        .to_vec(),
    ));
    out
}

fn run(target: &str, seeds: Vec<(String, Vec<u8>)>, body: fn(&[u8])) -> usize {
    let dir = corpus_dir(target);
    if std::env::var_os("KEMARI_STREAM_WRITE_CORPUS").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in &seeds {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
    let mut inputs: Vec<Vec<u8>> = seeds.into_iter().map(|(_, b)| b).collect();
    let mut checked_in = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        inputs.push(std::fs::read(entry.unwrap().path()).unwrap());
        checked_in += 1;
    }
    assert!(checked_in > 0, "no seed corpus in {}", dir.display());
    let mut runs = 0;
    for input in &inputs {
        body(input);
        runs += 1;
        // Every truncation of small inputs; a strided sample of large ones (real xl save heads).
        let cut_stride = (input.len() / 4096).max(1);
        for cut in (0..input.len()).step_by(cut_stride) {
            body(&input[..cut]);
            runs += 1;
        }
        // Single-byte mutations at a stride that still hits every header of small seeds.
        let stride = (input.len() / 512).max(1);
        for i in (0..input.len()).step_by(stride) {
            for x in [0x01u8, 0x80, 0xff] {
                let mut m = input.clone();
                m[i] ^= x;
                body(&m);
                runs += 1;
            }
        }
    }
    runs
}

#[test]
fn image_target_over_corpus() {
    let runs = run("image", image_seeds(), image_one_input);
    assert!(runs > 1000);
}

#[test]
fn checkpoint_target_over_corpus() {
    let runs = run("checkpoint", checkpoint_seeds(), checkpoint_one_input);
    assert!(runs > 1000);
}
