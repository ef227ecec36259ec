//! Bodies of the fuzz targets, shared by `stream/fuzz` (cargo-fuzz, nightly) and the stable
//! test `tests/fuzz_corpus.rs`, which runs them over the checked-in seed corpus. Each body
//! decodes arbitrary bytes with small limits and panics only if a decoder breaks one of its
//! promises (a panic inside a decoder, or a decoded value that does not survive re-encoding).

use crate::checkpoint::{encode_checkpoint, CheckpointReader, Reply, REPLY_LEN};
use crate::image::summarize;
use crate::{Limits, PAGE_SIZE};

/// Limits used while fuzzing: small, so that lying lengths are caught early.
pub fn fuzz_limits() -> Limits {
    Limits {
        max_record_len: 1 << 20,
        max_config_len: 64 << 10,
        max_checkpoint_bytes: 4 << 20,
    }
}

/// Decodes `data` as an `xl save` image. If it is accepted, every page handed out is one page
/// long, their number matches the summary, and the summary accounts for every input byte.
pub fn image_one_input(data: &[u8]) {
    let mut pages = 0u64;
    let res = summarize(data, fuzz_limits(), &mut |_, d| {
        assert_eq!(d.len(), PAGE_SIZE, "page handed out with a wrong length");
        pages += 1;
    });
    if let Ok(s) = res {
        assert_eq!(s.pages.with_data, pages, "summary page count differs");
        assert_eq!(
            s.total_bytes,
            data.len() as u64,
            "accepted image left bytes"
        );
        assert!(s.pages.max_per_record <= 1024);
    }
}

/// Decodes `data` as a checkpoint frame (expecting the sequence number the frame itself claims,
/// so the fuzzer gets past that check) and as a reply. An accepted checkpoint must re-encode
/// and decode to itself; an accepted reply must re-encode to the same bytes.
pub fn checkpoint_one_input(data: &[u8]) {
    let seq = data
        .get(16..24)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0);
    let limits = fuzz_limits();
    let rd = CheckpointReader::new(limits);
    let mut r = data;
    if let Ok(cp) = rd.read(&mut r, seq) {
        assert_eq!(cp.seq, seq);
        let bytes = match encode_checkpoint(&cp, &limits) {
            Ok(b) => b,
            Err(e) => panic!("accepted checkpoint cannot be re-encoded: {e}"),
        };
        match rd.read(&mut &bytes[..], seq) {
            Ok(again) => assert_eq!(again, cp, "re-encoded checkpoint decodes differently"),
            Err(e) => panic!("re-encoded checkpoint rejected: {e}"),
        }
    }
    if let Ok(reply) = Reply::read(&mut &data[..]) {
        assert_eq!(&reply.encode()[..], &data[..REPLY_LEN]);
    }
}
