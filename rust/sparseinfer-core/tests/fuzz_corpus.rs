//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) through the fuzz targets, without libFuzzer or
//! instrumentation: each input that once crashed a target, or reached new code, must still load or fail with a
//! typed error. The campaign itself is `make fuzz` (docs/security/fuzzing.md).

#[path = "../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod targets;

use std::path::Path;

fn replay(target: &str, run: fn(&[u8]) -> targets::Outcome) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("a corpus entry").path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{}: empty corpus", dir.display());
    for f in &files {
        let data = std::fs::read(f).expect("a corpus file");
        if let Err(e) = std::panic::catch_unwind(|| {
            let _ = run(&data);
        }) {
            std::panic::resume_unwind(Box::new(format!("{}: {:?}", f.display(), e.downcast_ref::<String>())));
        }
    }
}

#[test]
fn load_dir_corpus() {
    replay("load_dir", targets::load_dir);
}

#[test]
fn safetensors_corpus() {
    replay("safetensors", targets::safetensors);
}

#[test]
fn config_corpus() {
    replay("config", targets::config);
}

#[test]
fn compressed_corpus() {
    replay("compressed", targets::compressed);
}

#[test]
fn pack_cache_corpus() {
    replay("pack_cache", targets::pack_cache);
}
