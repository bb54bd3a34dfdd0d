//! Sets `SPARSEINFER_SOURCE_HASH`: a digest of the crate's sources, part of the load cache's key
//! (`runtime::pack_cache`), so that a build whose packing differs never reads another build's entries.

use std::path::Path;

fn visit(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).expect("src is readable").flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            visit(&p, files);
        } else if p.extension().is_some_and(|e| e == "rs") {
            files.push(p);
        }
    }
}

fn main() {
    println!("cargo:rerun-if-changed=src");
    let mut files = Vec::new();
    visit(Path::new("src"), &mut files);
    // FNV-1a over each file's path and contents: the build script has no dependencies to call on.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for f in files {
        let bytes = std::fs::read(&f).expect("a source file is readable");
        for b in f.to_string_lossy().bytes().chain([0]).chain(bytes) {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
    println!("cargo:rustc-env=SPARSEINFER_SOURCE_HASH={h:016x}");
}
