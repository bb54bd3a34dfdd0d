//! The runtime's file handling: the safetensors reader accepts valid files and rejects every corruption with an
//! error (never a panic or an out-of-bounds read), and configs are validated.

use proptest::prelude::*;
use sparseinfer_core::runtime::checkpoint::safetensors::{f16_to_f32, Dtype, SafeTensors};
use sparseinfer_core::runtime::{arch, load_dir, LoadOptions};
use sparseinfer_core::Error;
use std::io::Write;
use std::path::{Path, PathBuf};

fn tmp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sparseinfer-rt-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A safetensors file with two f32 tensors, "a" [2, 3] and "b" [4].
fn file_bytes() -> Vec<u8> {
    let header = r#"{"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"b":{"dtype":"F32","shape":[4],"data_offsets":[24,40]},"__metadata__":{"format":"pt"}}"#;
    let mut h = header.as_bytes().to_vec();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    for i in 0..10 {
        out.extend((i as f32).to_le_bytes());
    }
    out
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::File::create(path).unwrap().write_all(bytes).unwrap();
}

#[test]
fn reads_a_valid_file() {
    let d = tmp_dir("valid");
    let p = d.join("m.safetensors");
    write(&p, &file_bytes());
    let st = SafeTensors::open(&p).unwrap();
    assert_eq!(st.names(), vec!["a", "b"]);
    let a = st.get("a").unwrap().unwrap();
    assert_eq!((a.dtype, a.shape), (Dtype::F32, &[2usize, 3][..]));
    assert_eq!(a.to_f32("a").unwrap(), vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    assert_eq!(st.get("b").unwrap().unwrap().to_f32("b").unwrap(), vec![6.0, 7.0, 8.0, 9.0]);
    assert!(st.get("c").unwrap().is_none());
}

#[test]
fn a_file_truncated_after_opening_is_an_error_not_a_fault() {
    // With a memory map the read past the new end would raise SIGBUS and kill the process.
    let d = tmp_dir("truncated-later");
    let p = d.join("m.safetensors");
    let bytes = file_bytes();
    write(&p, &bytes);
    let st = SafeTensors::open(&p).unwrap();
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(bytes.len() as u64 - 8).unwrap();
    let e = st.get("b").unwrap_err().to_string();
    assert!(e.contains("\"b\"") && e.contains("changed while loading"), "{e}");
    assert!(st.get("a").unwrap().is_some(), "a tensor before the cut still reads");
}

#[test]
fn rejects_truncation_at_every_length() {
    let d = tmp_dir("trunc");
    let p = d.join("m.safetensors");
    let good = file_bytes();
    for n in 0..good.len() {
        write(&p, &good[..n]);
        match SafeTensors::open(&p) {
            Err(Error::InvalidInput { .. }) => {}
            other => panic!("a file cut at {n} bytes must be rejected, got {:?}", other.map(|s| s.names().len())),
        }
    }
}

#[test]
fn rejects_lies_and_overlaps() {
    let d = tmp_dir("lies");
    let p = d.join("m.safetensors");
    for header in [
        r#"{"a":{"dtype":"F32","shape":[2,4],"data_offsets":[0,24]}}"#,
        r#"{"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#,
        r#"{"a":{"dtype":"F64","shape":[3],"data_offsets":[0,24]}}"#,
        r#"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,24]}}"#,
        r#"{"a":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,24]}}"#,
        r#"{"a":{"dtype":"F32","shape":[6],"data_offsets":[24,0]}}"#,
        r#"[1,2,3]"#,
    ] {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend(header.as_bytes());
        bytes.extend([0u8; 48]);
        write(&p, &bytes);
        assert!(matches!(SafeTensors::open(&p), Err(Error::InvalidInput { .. })), "accepted {header}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    /// Flipping any bytes of a valid file gives a valid file or an error, never a panic.
    #[test]
    fn corruption_never_panics(flips in proptest::collection::vec((0usize..200, any::<u8>()), 1..6)) {
        let d = tmp_dir("fuzz");
        let p = d.join("m.safetensors");
        let mut bytes = file_bytes();
        for (i, v) in flips {
            let n = bytes.len();
            bytes[i % n] = v;
        }
        write(&p, &bytes);
        if let Ok(st) = SafeTensors::open(&p) {
            for name in st.names() {
                let t = st.get(name).unwrap().unwrap();
                prop_assert_eq!(t.bytes.len(), t.numel() * t.dtype.size());
                let _ = t.to_f32(name);
            }
        }
    }
}

#[test]
fn f16_conversion_is_exact() {
    assert_eq!(f16_to_f32(0x3c00), 1.0);
    assert_eq!(f16_to_f32(0xc000), -2.0);
    assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
    assert_eq!(f16_to_f32(0x8001), -(2f32.powi(-24)));
    assert_eq!(f16_to_f32(0x7bff), 65504.0);
    assert!(f16_to_f32(0x7c00).is_infinite() && f16_to_f32(0x7e00).is_nan());
}

#[test]
fn configs_are_validated() {
    let unsupported = arch::spec(&serde_json::json!({"model_type": "bert"}));
    assert!(
        matches!(unsupported, Err(Error::Unsupported { ref msg, .. }) if msg.contains("llama") && msg.contains("mpt"))
    );
    let zero_heads = serde_json::json!({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 0,
        "num_hidden_layers": 1, "intermediate_size": 8, "vocab_size": 10});
    assert!(matches!(arch::spec(&zero_heads), Err(Error::InvalidInput { .. })));
    let bad_gqa = serde_json::json!({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
        "num_key_value_heads": 3, "num_hidden_layers": 1, "intermediate_size": 8, "vocab_size": 10});
    assert!(matches!(arch::spec(&bad_gqa), Err(Error::InvalidInput { .. })));
    let yarn = serde_json::json!({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
        "num_hidden_layers": 1, "intermediate_size": 8, "vocab_size": 10, "rope_scaling": {"rope_type": "yarn"}});
    assert!(matches!(arch::spec(&yarn), Err(Error::Unsupported { .. })));
    let missing = serde_json::json!({"model_type": "gpt2"});
    assert!(matches!(arch::spec(&missing), Err(Error::InvalidInput { ref msg, .. }) if msg.contains("n_embd")));
}

#[test]
fn a_directory_without_weights_is_an_error() {
    let d = tmp_dir("noweights");
    std::fs::write(
        d.join("config.json"),
        r#"{"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1,
            "intermediate_size": 8, "vocab_size": 10}"#,
    )
    .unwrap();
    assert!(
        matches!(load_dir(&d, LoadOptions::default()), Err(Error::InvalidInput { ref msg, .. }) if msg.contains("safetensors"))
    );
}

const LLAMA: &str = r#"{"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1,
    "intermediate_size": 8, "vocab_size": 10}"#;

#[test]
fn absurd_config_sizes_are_errors_before_any_allocation() {
    let base: serde_json::Value = serde_json::from_str(LLAMA).unwrap();
    for key in [
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "intermediate_size",
        "vocab_size",
        "max_position_embeddings",
    ] {
        for v in
            [serde_json::json!(1u64 << 40), serde_json::json!(u64::MAX), serde_json::json!(-1), serde_json::json!(2.5)]
        {
            let mut c = base.clone();
            c[key] = v.clone();
            assert!(matches!(arch::spec(&c), Err(Error::InvalidInput { .. })), "{key} = {v} was accepted");
        }
    }
    let mut c = base.clone();
    c["model_type"] = "mistral".into();
    c["sliding_window"] = 0.into();
    assert!(matches!(arch::spec(&c), Err(Error::InvalidInput { ref msg, .. }) if msg.contains("sliding_window")));
}

#[test]
fn index_entries_must_stay_inside_the_directory() {
    let d = tmp_dir("traversal");
    let outside = tmp_dir("traversal-outside");
    write(&outside.join("w.safetensors"), &file_bytes());
    std::fs::write(d.join("config.json"), LLAMA).unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(outside.join("w.safetensors"), d.join("link.safetensors")).unwrap();
    let abs = outside.join("w.safetensors").display().to_string();
    for entry in [
        "../sparseinfer-rt-traversal-outside-x/w.safetensors",
        abs.as_str(),
        "a/../../w.safetensors",
        "link.safetensors",
    ] {
        let index = serde_json::json!({"weight_map": {"a": entry}});
        std::fs::write(d.join("model.safetensors.index.json"), index.to_string()).unwrap();
        match load_dir(&d, LoadOptions::default()) {
            Err(Error::InvalidInput { msg, .. }) => {
                assert!(msg.contains("outside") || msg.contains("relative"), "{entry}: {msg}")
            }
            Err(e) => panic!("{entry}: {e}"),
            Ok(_) => panic!("{entry} was opened"),
        }
    }
}

#[cfg(unix)]
#[test]
fn special_files_are_refused_without_blocking() {
    let d = tmp_dir("fifo");
    let fifo = d.join("config.json");
    let c = std::ffi::CString::new(fifo.display().to_string()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    assert!(
        matches!(load_dir(&d, LoadOptions::default()), Err(Error::InvalidInput { ref msg, .. }) if msg.contains("regular"))
    );
    assert!(matches!(SafeTensors::open(&fifo), Err(Error::InvalidInput { .. })));
    std::fs::remove_file(&fifo).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &fifo).unwrap();
    assert!(matches!(load_dir(&d, LoadOptions::default()), Err(Error::InvalidInput { .. })));
}

#[test]
fn compressed_tensors_formats_are_refused_by_name() {
    use sparseinfer_core::runtime::checkpoint::QuantScheme;
    let group = |fmt: serde_json::Value| {
        serde_json::json!({"quantization_config": {"quant_method": "compressed-tensors", "format": "int-quantized",
            "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "format": fmt,
                "weights": {"num_bits": 8, "type": "int", "symmetric": true, "strategy": "channel"}}}}})
    };
    // What compressed-tensors writes (a group's format is null before 0.15) is read.
    for ok in [serde_json::json!("int-quantized"), serde_json::Value::Null] {
        let s = QuantScheme::from_config(&group(ok)).unwrap().unwrap();
        assert_eq!((s.bits, s.group_size), (8, None));
    }
    let refused = |c: &serde_json::Value, fmt: &str, field: &str| {
        let e = QuantScheme::from_config(c).unwrap_err();
        let want = format!("format \"{fmt}\" is not supported");
        assert!(
            matches!(&e, Error::Unsupported { msg, .. } if msg.contains(&want) && msg.contains(field)),
            "{fmt}: {e}"
        );
    };
    refused(&group("float-quantized".into()), "float-quantized", "config_groups.group_0.format");
    let mut top = group("int-quantized".into());
    top["quantization_config"]["format"] = "nvfp4-pack-quantized".into();
    refused(&top, "nvfp4-pack-quantized", "quantization_config.format");
    // Marlin's 2:4 layout (a GPU kernel's tile permutation) is not read: refused before any tensor is read.
    let sparse = serde_json::json!({"quantization_config": {"quant_method": "compressed-tensors", "format": "dense",
        "sparsity_config": {"format": "marlin-24", "sparsity_structure": "2:4"}}});
    refused(&sparse, "marlin-24", "sparsity_config.format");
    for format in ["sparse-bitmask", "sparse-24-bitmask"] {
        let mut bitmask = sparse.clone();
        bitmask["quantization_config"]["sparsity_config"]["format"] = format.into();
        assert_eq!(QuantScheme::from_config(&bitmask).unwrap(), None);
    }
    let mut not_a_name = group("int-quantized".into());
    not_a_name["quantization_config"]["format"] = 3.into();
    assert!(matches!(QuantScheme::from_config(&not_a_name), Err(Error::InvalidInput { .. })));
}
