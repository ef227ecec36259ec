//! cargo-fuzz target: `xl save` image decoding (see `kemari_stream::fuzzing`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    kemari_stream::fuzzing::image_one_input(data);
});
