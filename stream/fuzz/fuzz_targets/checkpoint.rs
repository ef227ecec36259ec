//! cargo-fuzz target: checkpoint frame and reply decoding (see `kemari_stream::fuzzing`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    kemari_stream::fuzzing::checkpoint_one_input(data);
});
