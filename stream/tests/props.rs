//! Property tests: encode/decode round trips of checkpoints and images, single-byte mutations of
//! checkpoints, and decoders never panicking on arbitrary or mutated input.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeMap;

use kemari_stream::checkpoint::{
    encode_checkpoint, Checkpoint, CheckpointReader, EpochReason, Page,
};
use kemari_stream::image::{summarize, GuestKind, ImageItem, ImageReader, ImageSpec, ImageWriter};
use kemari_stream::libxc::{Record, TscInfo};
use kemari_stream::libxl::LibxlRecord;
use kemari_stream::{Limits, PAGE_SIZE};
use proptest::prelude::*;

fn page_from(seed: u8, fill: u8) -> Page {
    let mut p = Box::new([fill; PAGE_SIZE]);
    p[0] = seed;
    p[PAGE_SIZE - 1] = seed.wrapping_mul(31);
    p
}

fn reason() -> impl Strategy<Value = EpochReason> {
    prop_oneof![
        Just(EpochReason::Initial),
        Just(EpochReason::Interval),
        Just(EpochReason::Request),
        "[a-z0-9./-]{0,40}".prop_map(|device| EpochReason::Io { device }),
    ]
}

fn checkpoint() -> impl Strategy<Value = Checkpoint> {
    (
        any::<u64>(),
        reason(),
        prop::collection::btree_map(0u64..(1 << 52), (any::<u8>(), any::<u8>()), 0..12),
        prop::collection::vec(any::<u8>(), 0..300),
        prop::collection::vec((any::<u32>(), any::<u64>()), 0..8),
        prop::option::of(prop::collection::vec(any::<u8>(), 0..200)),
        prop::collection::vec(
            (any::<u32>(), prop::collection::vec(any::<u8>(), 0..64)),
            0..4,
        ),
    )
        .prop_map(
            |(seq, reason, pages, hvm_context, hvm_params, emulator_state, extra)| Checkpoint {
                seq,
                reason,
                pages: pages
                    .into_iter()
                    .map(|(pfn, (s, f))| (pfn, page_from(s, f)))
                    .collect(),
                hvm_context,
                hvm_params,
                emulator_state,
                extra,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn checkpoint_round_trip(cp in checkpoint()) {
        let lim = Limits::default();
        let bytes = encode_checkpoint(&cp, &lim).unwrap();
        let mut r = &bytes[..];
        let back = CheckpointReader::new(lim).read(&mut r, cp.seq).unwrap();
        prop_assert_eq!(back, cp);
        prop_assert!(r.is_empty());
    }

    #[test]
    fn checkpoint_single_byte_mutation_rejected_or_identical(
        cp in checkpoint(),
        pos in any::<prop::sample::Index>(),
        x in 1u8..=255,
    ) {
        let lim = Limits::default();
        let mut bytes = encode_checkpoint(&cp, &lim).unwrap();
        let i = pos.index(bytes.len());
        bytes[i] ^= x;
        if let Ok(back) = CheckpointReader::new(lim).read(&mut &bytes[..], cp.seq) {
            prop_assert_eq!(back, cp);
        }
    }

    #[test]
    fn checkpoint_decoder_never_panics(data in prop::collection::vec(any::<u8>(), 0..2048)) {
        kemari_stream::fuzzing::checkpoint_one_input(&data);
    }

    #[test]
    fn image_decoder_never_panics(data in prop::collection::vec(any::<u8>(), 0..2048)) {
        kemari_stream::fuzzing::image_one_input(&data);
    }

    #[test]
    fn image_round_trip(
        hvm in any::<bool>(),
        pages in prop::collection::btree_map(0u64..(1 << 40), any::<u8>(), 0..2100),
        ctx in prop::collection::vec(any::<u8>(), 0..200),
        params in prop::collection::vec((any::<u64>(), any::<u64>()), 0..6),
        tsc in prop::option::of((any::<u32>(), any::<u32>(), any::<u64>())),
        emu in prop::collection::vec(any::<u8>(), 1..300),
        mutate in prop::option::of((any::<prop::sample::Index>(), 1u8..=255)),
    ) {
        let kind = if hvm { GuestKind::Hvm } else { GuestKind::Pvh };
        let spec = ImageSpec {
            kind,
            config_json: br#"{"c_info":{"type":"x"}}"#.to_vec(),
            xen_major: 4,
            xen_minor: 17,
            cpuid_policy: None,
            msr_policy: Some(vec![3; 8]),
        };
        let lim = Limits::default();
        let bufs: Vec<(u64, [u8; PAGE_SIZE])> =
            pages.iter().map(|(p, b)| (*p, [*b; PAGE_SIZE])).collect();
        let refs: Vec<(u64, &[u8; PAGE_SIZE])> = bufs.iter().map(|(p, b)| (*p, b)).collect();
        let mut w = ImageWriter::new(Vec::new(), &spec, lim).unwrap();
        w.write_pages(&refs).unwrap();
        let tsc = tsc.map(|(mode, khz, nsec)| TscInfo { mode, khz, nsec, incarnation: 0 });
        if let Some(t) = &tsc {
            w.write_tsc_info(t).unwrap();
        }
        w.write_hvm_context(&ctx).unwrap();
        w.write_hvm_params(&params).unwrap();
        let img = if hvm {
            w.finish(Some(&emu), None).unwrap()
        } else {
            w.finish(None, None).unwrap()
        };

        let mut rd = ImageReader::new(&img[..], lim).unwrap();
        let mut got_pages = BTreeMap::new();
        let (mut got_ctx, mut got_params, mut got_tsc, mut got_emu) = (None, None, None, None);
        while let Some(item) = rd.next_item().unwrap() {
            match item {
                ImageItem::Libxc(Record::PageData(pd)) => {
                    for (pfn, _, data) in pd.pages() {
                        let d = data.unwrap();
                        prop_assert!(d.iter().all(|b| *b == d[0]));
                        prop_assert!(got_pages.insert(pfn, d[0]).is_none());
                    }
                }
                ImageItem::Libxc(Record::HvmContext(c)) => got_ctx = Some(c),
                ImageItem::Libxc(Record::HvmParams(p)) => got_params = Some(p),
                ImageItem::Libxc(Record::TscInfo(t)) => got_tsc = Some(t),
                ImageItem::Libxl(LibxlRecord::EmulatorContext { blob, .. }) => got_emu = Some(blob),
                _ => {}
            }
        }
        rd.finish().unwrap();
        prop_assert_eq!(got_pages, pages);
        prop_assert_eq!(got_ctx, Some(ctx));
        prop_assert_eq!(got_params, Some(params));
        prop_assert_eq!(got_tsc, tsc);
        prop_assert_eq!(got_emu, if hvm { Some(emu) } else { None });

        if let Some((pos, x)) = mutate {
            let mut m = img.clone();
            let i = pos.index(m.len());
            m[i] ^= x;
            // Must not panic; may be accepted (page contents carry no checksum in Xen's format).
            let _ = summarize(&m[..], lim, &mut |_, _| {});
        }
    }
}
