//! Writes the seed inputs of every target into `<dir>/<target>/seed-*` (default `corpus/`): the tiny model of
//! each architecture in each target's framing, and a few variants. `make fuzz-seeds` runs it; the committed
//! corpus is these seeds plus what the campaign kept (minimized with `-merge=1`).

use serde_json::{json, Value};
use sparseinfer_fuzz::{frame_safetensors, Tensors, FILE_NAMES, FILE_SEP, TINY};
use std::path::Path;

fn main() {
    let root = std::env::args().nth(1).unwrap_or_else(|| "corpus".into());
    let root = Path::new(&root);
    let mut count = 0;
    let mut put = |target: &str, name: &str, bytes: &[u8]| {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).expect("corpus dir");
        std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("seed");
        count += 1;
        let outcome = match target {
            "load_dir" => sparseinfer_fuzz::load_dir(bytes),
            "safetensors" => sparseinfer_fuzz::safetensors(bytes),
            "config" => sparseinfer_fuzz::config(bytes),
            "pack_cache" => sparseinfer_fuzz::pack_cache(bytes),
            _ => sparseinfer_fuzz::compressed(bytes),
        };
        eprintln!("{target}/{name}: {}", outcome.err().unwrap_or_else(|| "loads and runs".into()));
    };

    // load_dir: options byte, then the files.
    let dir_input = |opts: u8, files: &[(&str, Vec<u8>)]| {
        let mut out = vec![opts];
        for (i, name) in FILE_NAMES.iter().enumerate() {
            if i > 0 {
                out.extend_from_slice(FILE_SEP);
            }
            if let Some((_, b)) = files.iter().find(|(f, _)| f == name) {
                out.extend_from_slice(b);
            }
        }
        while out.ends_with(FILE_SEP) {
            out.truncate(out.len() - FILE_SEP.len());
        }
        out
    };
    for tiny in TINY {
        let files = [
            ("config.json", tiny.config().to_string().into_bytes()),
            ("model.safetensors", frame_safetensors(&tiny.weights())),
        ];
        put("load_dir", tiny.model_types[0], &dir_input(0, &files));
        put("config", tiny.model_types[0], tiny.config().to_string().as_bytes());
    }
    let llama = &TINY[0];
    let llama_files = |extra: &[(&'static str, Vec<u8>)]| -> Vec<(&'static str, Vec<u8>)> {
        let mut f = vec![
            ("config.json", llama.config().to_string().into_bytes()),
            ("model.safetensors", frame_safetensors(&llama.weights())),
        ];
        f.extend(extra.iter().cloned());
        f
    };
    // Every kernel format the loader can pack into (the options byte's high bit set).
    for (name, opts) in [
        ("sparse-int8", 0x86),
        ("dense-int4-g32", 0x8b),
        ("dense-int4-asym", 0xa3),
        ("sparse-bf16", 0x85),
        ("dense-int8", 0x82),
    ] {
        put("load_dir", &format!("llama-{name}"), &dir_input(opts, &llama_files(&[])));
    }
    put(
        "load_dir",
        "llama-version",
        &dir_input(0, &llama_files(&[("sparseinfer.json", br#"{"format_version": 1}"#.to_vec())])),
    );
    // Two shards and their index.
    let mut shard = [Tensors::default(), Tensors::default()];
    let mut weight_map = serde_json::Map::new();
    // The tiny Llama's tensors, the layers in the second shard.
    let st = llama.weights();
    let n = u64::from_le_bytes(st[..8].try_into().expect("8 bytes")) as usize;
    let header: Value = serde_json::from_slice(&st[8..8 + n]).expect("our header");
    for (name, e) in header.as_object().expect("an object") {
        let offs: Vec<usize> =
            e["data_offsets"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
        let shape: Vec<usize> = e["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
        let i = usize::from(name.contains("layers"));
        shard[i].add(name, "F32", &shape, st[8 + n + offs[0]..8 + n + offs[1]].to_vec());
        weight_map.insert(name.clone(), json!(FILE_NAMES[3 + i]));
    }
    let index = json!({"metadata": {"total_size": 0}, "weight_map": weight_map}).to_string();
    put(
        "load_dir",
        "llama-sharded",
        &dir_input(
            0,
            &[
                ("config.json", llama.config().to_string().into_bytes()),
                ("model.safetensors.index.json", index.into_bytes()),
                (FILE_NAMES[3], frame_safetensors(&shard[0].build())),
                (FILE_NAMES[4], frame_safetensors(&shard[1].build())),
            ],
        ),
    );

    // safetensors: framed and raw.
    put("safetensors", "llama-framed", &frame_safetensors(&llama.weights()));
    put("safetensors", "llama-raw", &llama.weights());
    let mut mixed = Tensors::default();
    for (dtype, size) in [("F16", 2), ("BF16", 2), ("I8", 1), ("U8", 1), ("I32", 4), ("I64", 8)] {
        mixed.add(&format!("t.{dtype}"), dtype, &[2, 3], vec![0x3c; 6 * size]);
    }
    mixed.add("t.scalar", "F32", &[], 1f32.to_le_bytes().to_vec());
    mixed.add("t.empty", "F32", &[0, 4], vec![]);
    put("safetensors", "dtypes", &frame_safetensors(&mixed.build()));

    // config: variants that reach each architecture's options.
    let with = |base: Value, extra: Value| {
        let mut v = base;
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v.to_string().into_bytes()
    };
    let variants = [
        (
            "llama-rope-llama3",
            0,
            json!({"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8}}),
        ),
        ("llama-rope-linear", 0, json!({"rope_scaling": {"type": "linear", "factor": 2.0}})),
        ("llama-rope-dynamic", 0, json!({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})),
        ("llama-head-dim", 0, json!({"head_dim": 4, "hidden_act": "gelu", "rms_norm_eps": 1e-5})),
        ("mistral-window", 0, json!({"model_type": "mistral", "sliding_window": 4})),
        ("qwen2", 0, json!({"model_type": "qwen2", "attention_bias": false, "use_sliding_window": false})),
        ("llama-tied", 0, json!({"tie_word_embeddings": true, "eos_token_id": [1, 2]})),
        (
            "llama-quant",
            0,
            json!({"quantization_config": {"quant_method": "compressed-tensors", "format": "dense",
            "config_groups": {"g": {"weights": {"num_bits": 8, "type": "int", "symmetric": true}}}}}),
        ),
        (
            "opt-options",
            1,
            json!({"activation_function": "gelu", "do_layer_norm_before": true, "enable_bias": true,
            "word_embed_proj_dim": 8, "layer_norm_elementwise_affine": true}),
        ),
        (
            "gpt2-options",
            2,
            json!({"activation_function": "gelu", "scale_attn_weights": false, "layer_norm_epsilon": 1e-5}),
        ),
        (
            "mpt-attn",
            3,
            json!({"attn_config": {"alibi": true, "alibi_bias_max": 8, "clip_qkv": 6.0, "softmax_scale": 0.5}}),
        ),
        (
            "t5-relu-untied",
            4,
            json!({"feed_forward_proj": "relu", "tie_word_embeddings": false, "scale_decoder_outputs": false,
            "layer_norm_epsilon": 1e-6, "num_decoder_layers": 1}),
        ),
        ("umt5-unscaled", 5, json!({"scale_decoder_outputs": false, "feed_forward_proj": "gated-silu"})),
    ];
    for (name, arch, extra) in variants {
        put("config", name, &with(TINY[arch].config(), extra));
    }

    // compressed: options, bits, group, format, sparsity format, flags, then each layer's encoding.
    for (name, head, enc) in [
        ("dense", [0u8, 0, 0, 3, 4, 0], 0u8),
        ("bf16", [0, 0, 0, 4, 0, 0], 1),
        ("int8-channel", [0, 0, 0, 1, 0, 0], 2),
        ("int8-token-acts", [0, 0, 0, 1, 0, 4], 2),
        ("int4-pack-g32", [0, 1, 1, 0, 0, 0], 3),
        ("int4-pack-g64-sparse-int8", [0x86, 1, 2, 0, 0, 0], 3),
        ("bitmask-f16", [0, 0, 0, 4, 1, 0], 4),
        ("bitmask-int8", [0, 0, 0, 1, 1, 0], 5),
        ("bitmask-int4-g32", [0, 1, 1, 0, 1, 0], 5),
        ("sparse24-bf16", [0, 0, 0, 3, 4, 0], 6),
        ("sparse24-int8", [0, 0, 0, 1, 4, 0], 6),
        ("int8-pack", [0, 0, 0, 0, 0, 0], 3),
        ("int4-pack-asym-g32", [0, 1, 1, 0, 0, 2], 3),
        ("int8-asym-channel", [0, 0, 0, 1, 0, 2], 2),
    ] {
        let mut s = head.to_vec();
        s.extend([enc; 8]);
        put("compressed", name, &s);
    }

    // pack_cache: each format and layout untouched, asymmetric / group 32, and a few edits (a mask word, a
    // record header field, the index).
    for pick in [0u8, 1, 2, 3, 4, 5, 2 | 8, 5 | 8 | 16, 1 | 16] {
        put("pack_cache", &format!("pick-{pick}"), &[pick]);
    }
    for (name, pick, at, xor) in
        [("edit-head", 0u8, 8u32, 0x10u8), ("edit-early", 1, 150, 0x01), ("edit-late", 3, 3000, 0x80)]
    {
        let mut s = vec![pick];
        s.extend(at.to_le_bytes());
        s.push(xor);
        put("pack_cache", name, &s);
    }
    eprintln!("wrote {count} seeds under {}", root.display());
}
