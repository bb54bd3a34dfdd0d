//! libFuzzer entry for [`sparseinfer_fuzz::pack_cache`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = sparseinfer_fuzz::pack_cache(data);
});
