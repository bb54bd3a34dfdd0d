//! Fuzz targets over the loaders of an untrusted model directory (SECURITY.md, docs/security/fuzzing.md).
//!
//! Each target writes a model directory into a fresh temporary folder (tmpfs `/dev/shm` where there is one) and
//! loads it through the public API, [`sparseinfer_core::runtime::load_dir`], then runs one token through any
//! model that loads. A finding is a panic, an abort, a hang or unbounded memory; a typed error is the expected
//! answer to bad input.
//!
//! - [`load_dir`]: every file of the directory from the input ([`split_files`]).
//! - [`safetensors`]: `model.safetensors` from the input, beside a fixed tiny Llama `config.json`; the file is
//!   also opened and read tensor by tensor on its own.
//! - [`config`]: `config.json` from the input, beside weights of the tiny model of its `model_type`.
//! - [`compressed`]: a structure-aware generator of compressed-tensors checkpoints (sparse-bitmask,
//!   pack-quantized, int-quantized, dense; scales, shapes and `quantization_config`), told by the input where
//!   to lie.
//! - [`pack_cache`]: a load cache entry of the tiny Llama (`runtime::pack_cache`) edited as the input says, its
//!   digests recomputed so the edits reach the record parser and `PackedMatrix::from_raw`.
//!
//! This file is also compiled into `rust/sparseinfer-core/tests/fuzz_corpus.rs`, which replays the committed
//! corpus on stable Rust without instrumentation; it uses only `sparseinfer_core`, `serde_json` and std.

use serde_json::{json, Value};
use sparseinfer_core::formats::{Format, Layout, PackOptions};
use sparseinfer_core::runtime::{self, LoadOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Separates the files of a [`load_dir`] input.
pub const FILE_SEP: &[u8] = b"\n--8<--\n";

/// The file each part of a [`load_dir`] input is written to, in order (an empty part: no such file).
pub const FILE_NAMES: &[&str] = &[
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "sparseinfer.json",
];

// ---------------------------------------------------------------------------------------------------------
// The targets.

/// The whole directory from the input: byte 0 picks the [`LoadOptions`], the rest is [`FILE_NAMES`]' contents
/// separated by [`FILE_SEP`]; each `.safetensors` part is [`safetensors_file`]-framed.
pub fn load_dir(data: &[u8]) -> Outcome {
    let Some((&opts, rest)) = data.split_first() else { return Err("empty input".into()) };
    let files: Vec<(&str, Vec<u8>)> = FILE_NAMES
        .iter()
        .zip(split_files(rest))
        .filter(|(_, part)| !part.is_empty())
        .map(|(&name, part)| {
            let bytes = if name.ends_with(".safetensors") { safetensors_file(part) } else { part.to_vec() };
            (name, bytes)
        })
        .collect();
    load_files(&files, load_options(opts))
}

/// `model.safetensors` from the input ([`safetensors_file`]-framed) beside the tiny Llama's `config.json`.
pub fn safetensors(data: &[u8]) -> Outcome {
    let st = safetensors_file(data);
    let dir = TempDir::new();
    write(&dir.0, "model.safetensors", &st);
    // The reader on its own: every tensor it accepts must be readable within the file.
    if let Ok(f) = runtime::checkpoint::safetensors::SafeTensors::open(&dir.0.join("model.safetensors")) {
        for name in f.names() {
            let t = f.get(name).expect("a readable file").expect("a listed tensor");
            assert_eq!(t.bytes.len(), t.numel() * t.dtype.size(), "{name}");
            if let Ok(v) = t.to_f32(name) {
                assert_eq!(v.len(), t.numel(), "{name}");
            }
        }
    }
    write(&dir.0, "config.json", TINY[0].config().to_string().as_bytes());
    load_in(&dir.0, LoadOptions::default())
}

/// `config.json` from the input beside the weights of the tiny model whose `model_type` it names (Llama's
/// when it names none of them).
pub fn config(data: &[u8]) -> Outcome {
    let model_type = serde_json::from_slice::<Value>(data)
        .ok()
        .and_then(|v| v.get("model_type").and_then(|t| t.as_str()).map(str::to_string))
        .unwrap_or_default();
    let arch = TINY.iter().find(|a| a.model_types.contains(&model_type.as_str())).unwrap_or(&TINY[0]);
    load_files(&[("config.json", data.to_vec()), ("model.safetensors", arch.weights())], LoadOptions::default())
}

/// A compressed-tensors checkpoint of the tiny Llama built from the input ([`Gen`]): the
/// `quantization_config`, then for each linear layer its encoding, its tensors, and where they lie.
pub fn compressed(data: &[u8]) -> Outcome {
    let mut g = Gen::new(data);
    let opts = load_options(g.u8());
    let (config, tensors) = compressed_checkpoint(&mut g);
    load_files(&[("config.json", config.to_string().into_bytes()), ("model.safetensors", tensors.build())], opts)
}

/// The formats and layouts [`pack_cache`]'s first byte picks from: every format the cache keeps.
const CACHED: [(Format, Layout); 8] = [
    (Format::SparseInt8, Layout::Rows),
    (Format::SparseInt8, Layout::Tiles),
    (Format::SparseInt4, Layout::Rows),
    (Format::SparseInt4, Layout::Tiles),
    (Format::DenseInt8, Layout::Rows),
    (Format::DenseInt8, Layout::Tiles),
    (Format::DenseInt4, Layout::Rows),
    (Format::DenseInt4, Layout::Tiles),
];

/// The tiny Llama loaded twice with a load cache: the first load writes the entry; then the input edits it and
/// the second load (and one token) must succeed, from the entry or rebuilding it. Byte 0 picks the format and
/// layout ([`CACHED`]; bit 3: int4 asymmetric (tiles then fall back to rows), bit 4: group 32), the rest are edits of 5 bytes: a little-endian
/// u32 position in the entry's records and index (modulo their length) and a byte XORed there. Every record's
/// digest in the index, and the index's digest, are then recomputed from the edited bytes (the file format is in
/// `runtime::pack_cache`'s docs), so an edit is caught by the checks behind the digests, not by them.
pub fn pack_cache(data: &[u8]) -> Outcome {
    let Some((&pick, edits)) = data.split_first() else { return Err("empty input".into()) };
    let (format, layout) = CACHED[pick as usize % CACHED.len()];
    let int4 = format == Format::DenseInt4 || format == Format::SparseInt4;
    let asymmetric = int4 && pick & 8 != 0;
    let group_size = (pick & 16 != 0).then_some(32);
    let dir = TempDir::new();
    write(&dir.0, "config.json", TINY[0].config().to_string().as_bytes());
    write(&dir.0, "model.safetensors", &TINY[0].weights());
    let cache = runtime::pack_cache::CacheOptions { dir: dir.0.join("cache"), max_bytes: u64::MAX };
    let opts = LoadOptions {
        weights: Some(format),
        pack: PackOptions { group_size, asymmetric, layout },
        activations: None,
        cache: Some(cache.clone()),
        kv_cache: None,
    };
    load_in(&dir.0, opts.clone()).expect("the tiny Llama loads");
    let entry = std::fs::read_dir(&cache.dir)
        .expect("the cache directory")
        .map(|e| e.expect("an entry").path())
        .find(|p| p.extension().is_some_and(|x| x == "pack"))
        .expect("the first load wrote an entry");
    let mut file = std::fs::read(&entry).expect("the entry");
    let word = |f: &[u8], at: usize| u64::from_le_bytes(f[at..at + 8].try_into().expect("8 bytes")) as usize;
    let (start, end) = (16 + word(&file, 8), file.len() - 32);
    for e in edits.chunks_exact(5) {
        let at = start + u32::from_le_bytes(e[..4].try_into().expect("4 bytes")) as usize % (end - start);
        file[at] ^= e[4];
    }
    // The index: u64 count, then per layer u64 n, key, u64 offset, u64 length, u64 digest. Edits may have broken
    // it; recompute what can still be parsed.
    let index_at = word(&file, end);
    if index_at >= start && index_at + 8 <= end {
        let mut p = index_at + 8;
        for _ in 0..word(&file, index_at).min(10_000) {
            let Some(n) = (p + 8 <= end).then(|| word(&file, p)) else { break };
            p = match p.checked_add(8 + n) {
                Some(q) if q + 24 <= end => q,
                _ => break,
            };
            let (off, len) = (word(&file, p), word(&file, p + 8));
            if len > 0 && off.checked_add(len).is_some_and(|e| e <= end) {
                let digest = xxhash_rust::xxh3::xxh3_64(&file[off..off + len]);
                file[p + 16..p + 24].copy_from_slice(&digest.to_le_bytes());
            }
            p += 24;
        }
        let index_len = word(&file, end + 8);
        if index_at.checked_add(index_len).is_some_and(|e| e <= end) {
            let digest = xxhash_rust::xxh3::xxh3_64(&file[index_at..index_at + index_len]);
            file[end + 16..end + 24].copy_from_slice(&digest.to_le_bytes());
        }
    }
    std::fs::write(&entry, &file).expect("writing the entry");
    load_in(&dir.0, opts)
}

// ---------------------------------------------------------------------------------------------------------
// Running a directory.

fn load_files(files: &[(&str, Vec<u8>)], opts: LoadOptions) -> Outcome {
    let dir = TempDir::new();
    for (name, bytes) in files {
        write(&dir.0, name, bytes);
    }
    load_in(&dir.0, opts)
}

/// What a target made of its input: `Ok` when the model loaded and ran a token, else the typed error's text.
pub type Outcome = Result<(), String>;

fn load_in(dir: &Path, opts: LoadOptions) -> Outcome {
    sparseinfer_core::parallel::set_num_threads(1);
    // Running may still refuse, with a typed error: finite weights can overflow to a non-finite activation.
    let run = |e: sparseinfer_core::Error| format!("run: {e}");
    match runtime::load_any(dir, opts).map_err(|e| e.to_string())? {
        runtime::AnyModel::Decoder(model) => {
            let last = (model.spec.vocab.min(u32::MAX as usize) - 1) as u32;
            let tokens: &[u32] = if model.spec.max_positions < 2 { &[0] } else { &[0, last] };
            runtime::logits(&model, tokens).map(|_| ()).map_err(run)
        }
        runtime::AnyModel::Seq2Seq(model) => {
            let last = (model.spec.vocab.min(u32::MAX as usize) - 1) as u32;
            let enc = match model.spec.encoder_input {
                runtime::config::EncoderInput::Tokens => model.encode(&[0, last, 0]),
                runtime::config::EncoderInput::Mel { bins, positions } => {
                    let frames = (2 * positions).min(5);
                    let mel: Vec<f32> = (0..bins * frames).map(|i| (i % 7) as f32 * 0.25 - 0.75).collect();
                    model.encode_features(&mel, frames)
                }
            }
            .map_err(run)?;
            let mut state = model.start(&enc, 2).map_err(run)?;
            model.decode(&mut state, &[0, last], true).map(|_| ()).map_err(run)
        }
    }
}

/// The [`LoadOptions`] byte: below 128 the weights as stored, with each self-attention cache (the default for
/// the format, f16, f32 or int8: bits 0-1); else a kernel format with a group size and symmetry, and the default
/// or an int8 cache.
pub fn load_options(b: u8) -> LoadOptions {
    const FORMATS: [Format; 8] = [
        Format::DenseF32,
        Format::DenseBf16,
        Format::DenseInt8,
        Format::DenseInt4,
        Format::SparseF32,
        Format::SparseBf16,
        Format::SparseInt8,
        Format::SparseInt4,
    ];
    if b < 128 {
        let kv = [None, Some(runtime::KvFormat::F16), Some(runtime::KvFormat::F32), Some(runtime::KvFormat::Int8)];
        return LoadOptions { kv_cache: kv[(b & 3) as usize], ..LoadOptions::default() };
    }
    let format = FORMATS[(b & 7) as usize];
    let group_size = [None, Some(32), Some(64), Some(128)][((b >> 3) & 3) as usize];
    let asymmetric = b & 0x20 != 0;
    LoadOptions {
        weights: Some(format),
        pack: PackOptions { group_size, asymmetric, ..Default::default() },
        activations: None,
        cache: None,
        // Unset: each format's default (f16 for the int8-activation formats).
        kv_cache: (b & 0x40 != 0).then_some(runtime::KvFormat::Int8),
    }
}

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = base.join(format!("sparseinfer-fuzz-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).expect("a temporary directory");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::write(dir.join(name), bytes).expect("writing a temporary file");
}

// ---------------------------------------------------------------------------------------------------------
// Input framing.

/// The parts of `data` between [`FILE_SEP`]s.
pub fn split_files(data: &[u8]) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    let mut rest = data;
    while let Some(i) = rest.windows(FILE_SEP.len()).position(|w| w == FILE_SEP) {
        parts.push(&rest[..i]);
        rest = &rest[i + FILE_SEP.len()..];
    }
    parts.push(rest);
    parts
}

/// A `.safetensors` file from a fuzz input: `{header JSON}` NUL `data` becomes the file with the header's
/// length prefixed (so the fuzzer can edit the JSON without keeping the prefix in step); anything that does
/// not start with `{` is the file's bytes as they are (length prefix included).
pub fn safetensors_file(part: &[u8]) -> Vec<u8> {
    if part.first() != Some(&b'{') {
        return part.to_vec();
    }
    let (header, data) = match part.iter().position(|&b| b == 0) {
        Some(i) => (&part[..i], &part[i + 1..]),
        None => (part, &[][..]),
    };
    let mut out = Vec::with_capacity(8 + part.len());
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(header);
    out.extend_from_slice(data);
    out
}

/// The inverse of [`safetensors_file`] for a well-formed file: the framed form seeds are written in.
pub fn frame_safetensors(file: &[u8]) -> Vec<u8> {
    let n = u64::from_le_bytes(file[..8].try_into().expect("8 bytes")) as usize;
    let mut out = file[8..8 + n].to_vec();
    out.push(0);
    out.extend_from_slice(&file[8 + n..]);
    out
}

// ---------------------------------------------------------------------------------------------------------
// Tiny checkpoints.

/// Tensors to be written as one `.safetensors` file, in order.
#[derive(Default)]
pub struct Tensors(pub Vec<(String, &'static str, Vec<usize>, Vec<u8>)>);

impl Tensors {
    /// Adds a tensor; `bytes` is its data as stored.
    pub fn add(&mut self, name: &str, dtype: &'static str, shape: &[usize], bytes: Vec<u8>) {
        self.0.push((name.to_string(), dtype, shape.to_vec(), bytes));
    }

    /// An F32 tensor of small deterministic values (`fill` = ones for norms).
    pub fn f32(&mut self, name: &str, shape: &[usize], ones: bool) {
        let n: usize = shape.iter().product();
        let seed = name.bytes().fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32));
        let v = (0..n).map(|i| if ones { 1.0 } else { small(seed.wrapping_add(i as u32)) });
        self.add(name, "F32", shape, v.flat_map(f32::to_le_bytes).collect());
    }

    /// The `.safetensors` file: an 8-byte header length, the JSON header, the data in order.
    pub fn build(&self) -> Vec<u8> {
        let mut header = serde_json::Map::new();
        let mut off = 0;
        for (name, dtype, shape, bytes) in &self.0 {
            header.insert(
                name.clone(),
                json!({"dtype": dtype, "shape": shape, "data_offsets": [off, off + bytes.len()]}),
            );
            off += bytes.len();
        }
        let header = Value::Object(header).to_string();
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        for (_, _, _, bytes) in &self.0 {
            out.extend_from_slice(bytes);
        }
        out
    }
}

/// A value in (-0.25, 0.25) from a hash of `i`.
fn small(i: u32) -> f32 {
    let mut x = i.wrapping_mul(0x9E37_79B9) ^ 0x5bd1_e995;
    x ^= x >> 15;
    x = x.wrapping_mul(0x2c1b_3c6d);
    x ^= x >> 12;
    ((x & 0xffff) as f32 / 65536.0 - 0.5) * 0.5
}

/// One supported architecture at its smallest: hidden 8, two heads, one layer (two for UMT5, whose blocks each
/// learn a bias table), vocabulary 16, 16 positions.
pub struct Tiny {
    /// The `model_type`s it stands for.
    pub model_types: &'static [&'static str],
    config: fn() -> Value,
    weights: fn(&mut Tensors),
}

impl Tiny {
    /// Its `config.json`.
    pub fn config(&self) -> Value {
        (self.config)()
    }

    /// Its `model.safetensors`.
    pub fn weights(&self) -> Vec<u8> {
        let mut t = Tensors::default();
        (self.weights)(&mut t);
        t.build()
    }
}

const D: usize = 8;
const I: usize = 16;
const V: usize = 16;
const P: usize = 16;

/// Llama, OPT, GPT-2, MPT, T5, UMT5 and Whisper.
pub const TINY: &[Tiny] = &[
    Tiny {
        model_types: &["llama", "mistral", "qwen2"],
        config: || {
            json!({"model_type": "llama", "hidden_size": D, "intermediate_size": I, "num_hidden_layers": 1,
                   "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": P,
                   "vocab_size": V, "tie_word_embeddings": false, "bos_token_id": 0, "eos_token_id": 1})
        },
        weights: |t| {
            t.f32("model.embed_tokens.weight", &[V, D], false);
            let p = "model.layers.0.";
            t.f32(&format!("{p}input_layernorm.weight"), &[D], true);
            t.f32(&format!("{p}self_attn.q_proj.weight"), &[D, D], false);
            t.f32(&format!("{p}self_attn.k_proj.weight"), &[D / 2, D], false);
            t.f32(&format!("{p}self_attn.v_proj.weight"), &[D / 2, D], false);
            t.f32(&format!("{p}self_attn.o_proj.weight"), &[D, D], false);
            t.f32(&format!("{p}post_attention_layernorm.weight"), &[D], true);
            t.f32(&format!("{p}mlp.gate_proj.weight"), &[I, D], false);
            t.f32(&format!("{p}mlp.up_proj.weight"), &[I, D], false);
            t.f32(&format!("{p}mlp.down_proj.weight"), &[D, I], false);
            t.f32("model.norm.weight", &[D], true);
            t.f32("lm_head.weight", &[V, D], false);
        },
    },
    Tiny {
        model_types: &["opt"],
        config: || {
            json!({"model_type": "opt", "hidden_size": D, "ffn_dim": I, "num_hidden_layers": 1,
                   "num_attention_heads": 2, "max_position_embeddings": P, "vocab_size": V,
                   "tie_word_embeddings": false, "bos_token_id": 0, "eos_token_id": 1})
        },
        weights: |t| {
            let p = "model.decoder.";
            t.f32(&format!("{p}embed_tokens.weight"), &[V, D], false);
            t.f32(&format!("{p}embed_positions.weight"), &[P + 2, D], false);
            let l = format!("{p}layers.0.");
            for norm in ["self_attn_layer_norm", "final_layer_norm"] {
                t.f32(&format!("{l}{norm}.weight"), &[D], true);
                t.f32(&format!("{l}{norm}.bias"), &[D], false);
            }
            for (m, rows, cols) in [
                ("self_attn.q_proj", D, D),
                ("self_attn.k_proj", D, D),
                ("self_attn.v_proj", D, D),
                ("self_attn.out_proj", D, D),
                ("fc1", I, D),
                ("fc2", D, I),
            ] {
                t.f32(&format!("{l}{m}.weight"), &[rows, cols], false);
                t.f32(&format!("{l}{m}.bias"), &[rows], false);
            }
            t.f32(&format!("{p}final_layer_norm.weight"), &[D], true);
            t.f32(&format!("{p}final_layer_norm.bias"), &[D], false);
            t.f32("lm_head.weight", &[V, D], false);
        },
    },
    Tiny {
        model_types: &["gpt2"],
        config: || {
            json!({"model_type": "gpt2", "n_embd": D, "n_head": 2, "n_layer": 1, "n_inner": I, "vocab_size": V,
                   "n_positions": P, "tie_word_embeddings": false, "bos_token_id": 0, "eos_token_id": 1})
        },
        weights: |t| {
            let p = "transformer.";
            t.f32(&format!("{p}wte.weight"), &[V, D], false);
            t.f32(&format!("{p}wpe.weight"), &[P, D], false);
            let l = format!("{p}h.0.");
            for norm in ["ln_1", "ln_2"] {
                t.f32(&format!("{l}{norm}.weight"), &[D], true);
                t.f32(&format!("{l}{norm}.bias"), &[D], false);
            }
            // Conv1D: [in, out].
            for (m, cols, rows) in
                [("attn.c_attn", D, 3 * D), ("attn.c_proj", D, D), ("mlp.c_fc", D, I), ("mlp.c_proj", I, D)]
            {
                t.f32(&format!("{l}{m}.weight"), &[cols, rows], false);
                t.f32(&format!("{l}{m}.bias"), &[rows], false);
            }
            t.f32(&format!("{p}ln_f.weight"), &[D], true);
            t.f32(&format!("{p}ln_f.bias"), &[D], false);
            t.f32("lm_head.weight", &[V, D], false);
        },
    },
    Tiny {
        model_types: &["mpt"],
        config: || {
            json!({"model_type": "mpt", "d_model": D, "n_heads": 2, "n_layers": 1, "expansion_ratio": 2,
                   "vocab_size": V, "max_seq_len": P, "tie_word_embeddings": false, "bos_token_id": 0,
                   "eos_token_id": 1})
        },
        weights: |t| {
            let p = "transformer.";
            t.f32(&format!("{p}wte.weight"), &[V, D], false);
            let l = format!("{p}blocks.0.");
            t.f32(&format!("{l}norm_1.weight"), &[D], true);
            t.f32(&format!("{l}attn.Wqkv.weight"), &[3 * D, D], false);
            t.f32(&format!("{l}attn.out_proj.weight"), &[D, D], false);
            t.f32(&format!("{l}norm_2.weight"), &[D], true);
            t.f32(&format!("{l}ffn.up_proj.weight"), &[2 * D, D], false);
            t.f32(&format!("{l}ffn.down_proj.weight"), &[D, 2 * D], false);
            t.f32(&format!("{p}norm_f.weight"), &[D], true);
            t.f32("lm_head.weight", &[V, D], false);
        },
    },
    Tiny {
        model_types: &["t5", "mt5"],
        config: || {
            json!({"model_type": "t5", "d_model": D, "d_kv": D / 2, "d_ff": I, "num_layers": 1,
                   "num_decoder_layers": 1, "num_heads": 2, "relative_attention_num_buckets": 8,
                   "relative_attention_max_distance": 16, "feed_forward_proj": "gated-gelu", "vocab_size": V,
                   "tie_word_embeddings": true, "decoder_start_token_id": 0, "eos_token_id": 1})
        },
        weights: |t| t5_weights(t, 1, false),
    },
    Tiny {
        model_types: &["umt5"],
        config: || {
            json!({"model_type": "umt5", "d_model": D, "d_kv": D / 2, "d_ff": I, "num_layers": 2,
                   "num_decoder_layers": 2, "num_heads": 2, "relative_attention_num_buckets": 8,
                   "relative_attention_max_distance": 16, "feed_forward_proj": "gated-gelu", "vocab_size": V,
                   "tie_word_embeddings": true, "scale_decoder_outputs": true, "decoder_start_token_id": 0,
                   "eos_token_id": 1})
        },
        weights: |t| t5_weights(t, 2, true),
    },
    Tiny {
        model_types: &["whisper"],
        config: || {
            json!({"model_type": "whisper", "d_model": D, "encoder_layers": 1, "decoder_layers": 1,
                   "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": I,
                   "decoder_ffn_dim": I, "num_mel_bins": 4, "max_source_positions": 4,
                   "max_target_positions": P, "vocab_size": V, "decoder_start_token_id": 0, "eos_token_id": 1})
        },
        weights: |t| {
            let p = "model.";
            t.f32(&format!("{p}encoder.conv1.weight"), &[D, 4, 3], false);
            t.f32(&format!("{p}encoder.conv1.bias"), &[D], false);
            t.f32(&format!("{p}encoder.conv2.weight"), &[D, D, 3], false);
            t.f32(&format!("{p}encoder.conv2.bias"), &[D], false);
            t.f32(&format!("{p}encoder.embed_positions.weight"), &[4, D], false);
            t.f32(&format!("{p}decoder.embed_tokens.weight"), &[V, D], false);
            t.f32(&format!("{p}decoder.embed_positions.weight"), &[P, D], false);
            for stack in ["encoder", "decoder"] {
                let l = format!("{p}{stack}.layers.0.");
                let mut attns = vec!["self_attn"];
                if stack == "decoder" {
                    attns.push("encoder_attn");
                }
                for a in attns {
                    for m in ["q", "k", "v", "out"] {
                        t.f32(&format!("{l}{a}.{m}_proj.weight"), &[D, D], false);
                        if m != "k" {
                            t.f32(&format!("{l}{a}.{m}_proj.bias"), &[D], false);
                        }
                    }
                    t.f32(&format!("{l}{a}_layer_norm.weight"), &[D], true);
                    t.f32(&format!("{l}{a}_layer_norm.bias"), &[D], false);
                }
                t.f32(&format!("{l}fc1.weight"), &[I, D], false);
                t.f32(&format!("{l}fc1.bias"), &[I], false);
                t.f32(&format!("{l}fc2.weight"), &[D, I], false);
                t.f32(&format!("{l}fc2.bias"), &[D], false);
                t.f32(&format!("{l}final_layer_norm.weight"), &[D], true);
                t.f32(&format!("{l}final_layer_norm.bias"), &[D], false);
                t.f32(&format!("{p}{stack}.layer_norm.weight"), &[D], true);
                t.f32(&format!("{p}{stack}.layer_norm.bias"), &[D], false);
            }
        },
    },
];

/// A gated-GELU T5 of `blocks` blocks per stack with a tied head; the relative position bias in the first block
/// of each stack, or in every block (`every_block`, UMT5).
fn t5_weights(t: &mut Tensors, blocks: usize, every_block: bool) {
    t.f32("shared.weight", &[V, D], false);
    for stack in ["encoder", "decoder"] {
        for i in 0..blocks {
            let b = format!("{stack}.block.{i}.layer.");
            if i == 0 || every_block {
                t.f32(&format!("{b}0.SelfAttention.relative_attention_bias.weight"), &[8, 2], false);
            }
            let mut sub = vec![(0, "SelfAttention")];
            if stack == "decoder" {
                sub.push((1, "EncDecAttention"));
            }
            for (j, name) in sub {
                t.f32(&format!("{b}{j}.layer_norm.weight"), &[D], true);
                for m in ["q", "k", "v", "o"] {
                    t.f32(&format!("{b}{j}.{name}.{m}.weight"), &[D, D], false);
                }
            }
            let f = if stack == "decoder" { 2 } else { 1 };
            t.f32(&format!("{b}{f}.layer_norm.weight"), &[D], true);
            t.f32(&format!("{b}{f}.DenseReluDense.wi_0.weight"), &[I, D], false);
            t.f32(&format!("{b}{f}.DenseReluDense.wi_1.weight"), &[I, D], false);
            t.f32(&format!("{b}{f}.DenseReluDense.wo.weight"), &[D, I], false);
        }
        t.f32(&format!("{stack}.final_layer_norm.weight"), &[D], true);
    }
}

// ---------------------------------------------------------------------------------------------------------
// The compressed-tensors generator.

/// Reads choices from the fuzz input; past its end every choice is 0 (the honest, default one).
pub struct Gen<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Gen<'a> {
    /// A reader over `data`.
    pub fn new(data: &'a [u8]) -> Gen<'a> {
        Gen { data, at: 0 }
    }

    /// The next byte (0 past the end).
    pub fn u8(&mut self) -> u8 {
        let b = self.data.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }

    /// One of `n` choices.
    pub fn pick(&mut self, n: usize) -> usize {
        self.u8() as usize % n
    }

    /// `n` bytes (zeros past the end).
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.u8()).collect()
    }
}

/// The compressed layers of the generator's model: (module, rows, cols). Hidden 32 and MLP width 64: one and
/// two groups of 32 columns, the kernels' smallest.
const CT_D: usize = 32;
const CT_I: usize = 64;
const CT_LAYERS: &[(&str, usize, usize)] = &[
    ("model.layers.0.self_attn.q_proj", CT_D, CT_D),
    ("model.layers.0.self_attn.k_proj", CT_D / 2, CT_D),
    ("model.layers.0.self_attn.v_proj", CT_D / 2, CT_D),
    ("model.layers.0.self_attn.o_proj", CT_D, CT_D),
    ("model.layers.0.mlp.gate_proj", CT_I, CT_D),
    ("model.layers.0.mlp.up_proj", CT_I, CT_D),
    ("model.layers.0.mlp.down_proj", CT_D, CT_I),
    ("lm_head", V, CT_D),
];

/// `config.json` and tensors of a tiny compressed Llama whose every choice comes from `g`.
pub fn compressed_checkpoint(g: &mut Gen) -> (Value, Tensors) {
    const FORMATS: [Option<&str>; 7] = [
        Some("pack-quantized"),
        Some("int-quantized"),
        Some("sparse-bitmask"),
        Some("dense"),
        None,
        Some("float-quantized"),
        Some("sparse-24-bitmask"),
    ];
    let bits = [8u64, 4, 8, 4, 2, 16][g.pick(6)];
    let group = [None, Some(32u64), Some(64), Some(16), Some(0), Some(3), Some(5), Some(1 << 40)][g.pick(8)];
    let format = FORMATS[g.pick(FORMATS.len())];
    let sparsity =
        [None, Some("sparse-bitmask"), Some("dense"), Some("pack-quantized"), Some("sparse-24-bitmask")][g.pick(5)];
    let flags = g.u8();
    let mut weights = json!({"num_bits": bits, "type": if flags & 1 == 0 { "int" } else { "float" },
                             "symmetric": flags & 2 == 0, "strategy": if group.is_some() { "group" } else { "channel" }});
    if let Some(gs) = group {
        weights["group_size"] = json!(gs);
    }
    let mut group0 = json!({"targets": ["Linear"], "weights": weights, "format": format});
    if flags & 4 != 0 {
        group0["input_activations"] = json!({"num_bits": 8, "type": "int", "strategy": "token", "dynamic": true});
    }
    let mut qc = json!({"quant_method": if flags & 8 == 0 { "compressed-tensors" } else { "gptq" },
                        "format": format, "config_groups": {"group_0": group0}});
    if let Some(s) = sparsity {
        qc["sparsity_config"] = json!({"format": s, "sparsity_structure": "unstructured"});
    }
    if flags & 16 != 0 {
        qc["sparseinfer_format_version"] = json!(g.u8() as i64 - 1);
    }
    let mut config = json!({"model_type": "llama", "hidden_size": CT_D, "intermediate_size": CT_I,
                            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                            "max_position_embeddings": P, "vocab_size": V, "tie_word_embeddings": false});
    if flags & 32 == 0 {
        config["quantization_config"] = qc;
    }

    let mut t = Tensors::default();
    t.f32("model.embed_tokens.weight", &[V, CT_D], false);
    t.f32("model.layers.0.input_layernorm.weight", &[CT_D], true);
    t.f32("model.layers.0.post_attention_layernorm.weight", &[CT_D], true);
    t.f32("model.norm.weight", &[CT_D], true);
    let bits: u32 = if bits == 4 { 4 } else { 8 };
    let asymmetric = flags & 2 != 0;
    let per_row = |cols: usize| match group {
        Some(gs) if gs > 0 => cols.div_ceil(gs.min(cols as u64) as usize),
        _ => 1,
    };
    // Each layer's encoding first, so that a seed can choose all of them in its first bytes.
    let encodings = g.bytes(CT_LAYERS.len());
    for (&(module, rows, cols), enc) in CT_LAYERS.iter().zip(encodings) {
        let w = format!("{module}.weight");
        match enc % 7 {
            // Dense floats.
            0 => t.f32(&w, &[rows, cols], false),
            1 => {
                let v = g_vals(g, rows * cols);
                lie(g, &mut t, &w, "BF16", vec![rows, cols], v);
            }
            // int-quantized: I8 codes and scales.
            2 => {
                let codes = g.bytes(rows * cols).into_iter().map(|b| clamp_code(b, bits)).collect();
                lie(g, &mut t, &w, "I8", vec![rows, cols], codes);
                scales(g, &mut t, module, rows, per_row(cols));
                zero_points(g, &mut t, module, rows, per_row(cols), bits, asymmetric);
            }
            // pack-quantized: 32 / bits codes per I32 word, the shape, scales.
            3 => {
                let words = (cols * bits as usize).div_ceil(32);
                let packed = g.bytes(rows * words * 4);
                lie(g, &mut t, &format!("{module}.weight_packed"), "I32", vec![rows, words], packed);
                shape_tensor(g, &mut t, &format!("{module}.weight_shape"), rows, cols);
                scales(g, &mut t, module, rows, per_row(cols));
                zero_points(g, &mut t, module, rows, per_row(cols), bits, asymmetric);
            }
            // sparse-24-bitmask: two of every four columns (mostly), the values `[rows, cols / 2]`, the shape.
            6 => {
                let row_bytes = cols.div_ceil(8);
                let mut mask = g.bytes(rows * row_bytes);
                if g.u8() < 200 {
                    // Each nibble one of the six 2-of-4 patterns, as compressed-tensors writes them.
                    const TWO_OF_FOUR: [u8; 6] = [0b0011, 0b0101, 0b0110, 0b1001, 0b1010, 0b1100];
                    for b in mask.iter_mut() {
                        *b = TWO_OF_FOUR[(*b & 0xF) as usize % 6] | TWO_OF_FOUR[(*b >> 4) as usize % 6] << 4;
                    }
                }
                lie(g, &mut t, &format!("{module}.bitmask"), "U8", vec![rows, row_bytes], mask);
                shape_tensor(g, &mut t, &format!("{module}.shape"), rows, cols);
                let (compressed, n) = (format!("{module}.compressed"), rows * cols / 2);
                if g.u8() & 1 == 0 {
                    let v = g_vals(g, n);
                    lie(g, &mut t, &compressed, "BF16", vec![rows, cols / 2], v);
                } else {
                    let codes = g.bytes(n).into_iter().map(|b| clamp_code(b, bits)).collect();
                    lie(g, &mut t, &compressed, "I8", vec![rows, cols / 2], codes);
                    scales(g, &mut t, module, rows, per_row(cols));
                    zero_points(g, &mut t, module, rows, per_row(cols), bits, asymmetric);
                }
            }
            // sparse-bitmask: the mask, the nonzeros (floats or int8 codes), the shape.
            4 | 5 => {
                let row_bytes = cols.div_ceil(8);
                let mut mask = g.bytes(rows * row_bytes);
                if g.u8() < 200 {
                    // Clear the bits past `cols`, as a writer would.
                    for r in 0..rows {
                        if cols % 8 != 0 {
                            mask[r * row_bytes + cols / 8] &= (1u8 << (cols % 8)) - 1;
                        }
                    }
                }
                let nnz: usize = mask.iter().map(|b| b.count_ones() as usize).sum();
                let base = if g.u8() & 1 == 0 { module.to_string() } else { w.clone() };
                lie(g, &mut t, &format!("{base}.bitmask"), "U8", vec![rows, row_bytes], mask);
                shape_tensor(g, &mut t, &format!("{base}.shape"), rows, cols);
                let compressed = format!("{base}.compressed");
                if g.u8() & 1 == 0 {
                    let v = g_vals(g, nnz);
                    lie(g, &mut t, &compressed, "F16", vec![nnz], v);
                } else {
                    let codes = g.bytes(nnz).into_iter().map(|b| clamp_code(b, bits)).collect();
                    lie(g, &mut t, &compressed, "I8", vec![nnz], codes);
                    scales(g, &mut t, module, rows, per_row(cols));
                    zero_points(g, &mut t, module, rows, per_row(cols), bits, asymmetric);
                }
            }
            _ => unreachable!(),
        }
    }
    (config, t)
}

/// `n` 16-bit floats from the input: mostly small values, the raw bits (NaN, infinities) when the byte says.
fn g_vals(g: &mut Gen, n: usize) -> Vec<u8> {
    let raw = g.u8() >= 240;
    (0..n)
        .flat_map(|_| {
            let (a, b) = (g.u8(), g.u8());
            if raw {
                [a, b]
            } else {
                // bf16/f16 of a small value: a sign, an exponent near 1, a mantissa.
                [b, 0x3c | (a & 0x80) | (a & 0x03)]
            }
        })
        .collect()
}

/// A code byte, mostly within the `bits` range.
fn clamp_code(b: u8, bits: u32) -> u8 {
    if b >= 250 {
        return b; // out of range on purpose
    }
    let c = b as i8 as i32;
    let (lo, hi) = if bits == 8 { (-128, 127) } else { (-8, 7) };
    (c.clamp(lo, hi) as i8) as u8
}

/// `<module>.weight_scale` `[rows, per_row]`: positive F32 scales (or NaN, or F16, or the wrong shape).
fn scales(g: &mut Gen, t: &mut Tensors, module: &str, rows: usize, per_row: usize) {
    let nan = g.u8() >= 245;
    let v: Vec<u8> = (0..rows * per_row)
        .flat_map(|i| {
            let s = if nan && i == 0 { f32::NAN } else { 0.001 + g.u8() as f32 / 2048.0 };
            s.to_le_bytes()
        })
        .collect();
    lie(g, t, &format!("{module}.weight_scale"), "F32", vec![rows, per_row], v);
}

/// `<module>.weight_zero_point` of an asymmetric scheme (and, rarely, of a symmetric one): I8 `[rows, per_row]`,
/// or packed along the rows in I32 words as pack-quantized stores it.
fn zero_points(g: &mut Gen, t: &mut Tensors, module: &str, rows: usize, per_row: usize, bits: u32, asym: bool) {
    if !asym && g.u8() < 250 {
        return;
    }
    let name = format!("{module}.weight_zero_point");
    if g.u8() & 1 == 0 {
        let z = g.bytes(rows * per_row).into_iter().map(|b| clamp_code(b, bits)).collect();
        lie(g, t, &name, "I8", vec![rows, per_row], z);
    } else {
        let words = (rows * bits as usize).div_ceil(32);
        let z = g.bytes(words * per_row * 4);
        lie(g, t, &name, "I32", vec![words, per_row], z);
    }
}

/// A shape stored as a tensor (I64 `[2]`), sometimes I32, sometimes wrong.
fn shape_tensor(g: &mut Gen, t: &mut Tensors, name: &str, rows: usize, cols: usize) {
    let mut dims = [rows as i64, cols as i64];
    match g.u8() {
        200..=219 => dims[0] += 1,
        220..=239 => dims[1] -= 1,
        240..=249 => dims[0] = -1,
        _ => {}
    }
    if g.u8() >= 200 {
        let bytes = dims.iter().flat_map(|&d| (d as i32).to_le_bytes()).collect();
        t.add(name, "I32", &[2], bytes);
    } else {
        t.add(name, "I64", &[2], dims.iter().flat_map(|d| d.to_le_bytes()).collect());
    }
}

/// Adds a tensor as given, or, when the input says so, with a lie: a row or column more, another dtype of the
/// same byte count, a flattened shape, or left out.
fn lie(g: &mut Gen, t: &mut Tensors, name: &str, dtype: &'static str, mut shape: Vec<usize>, mut bytes: Vec<u8>) {
    let size = |d: &str| match d {
        "F32" | "I32" => 4,
        "F16" | "BF16" => 2,
        "I64" => 8,
        _ => 1,
    };
    let mut dtype = dtype;
    match g.u8() {
        200..=209 => shape[0] += 1,
        210..=219 => {
            if let Some(c) = shape.get_mut(1) {
                *c += 1;
            }
        }
        220..=229 => {
            const ALL: [&str; 8] = ["F32", "F16", "BF16", "I8", "U8", "I32", "I64", "BOOL"];
            dtype = ALL[g.pick(ALL.len())];
        }
        230..=239 => shape = vec![shape.iter().product()],
        240..=249 => return,
        250..=255 => shape.reverse(),
        _ => {}
    }
    // Keep the header consistent with the data so the lie reaches the decoder, not the header check.
    let numel: usize = shape.iter().product();
    bytes.resize(numel * size(dtype), 0);
    t.add(name, dtype, &shape, bytes);
}
