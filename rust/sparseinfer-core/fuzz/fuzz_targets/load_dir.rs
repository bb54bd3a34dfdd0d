//! libFuzzer entry for [`sparseinfer_fuzz::load_dir`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = sparseinfer_fuzz::load_dir(data);
});
