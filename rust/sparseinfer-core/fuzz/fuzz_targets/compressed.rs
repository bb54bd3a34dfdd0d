//! libFuzzer entry for [`sparseinfer_fuzz::compressed`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = sparseinfer_fuzz::compressed(data);
});
