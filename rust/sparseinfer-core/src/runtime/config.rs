//! The architecture-neutral description of a model ([`Spec`]) that every architecture file fills in from its
//! `config.json`, and the reader of that JSON ([`Cfg`]) whose errors name the key.
//!
//! [`Spec::new`] holds the common choices (a GPT-2-style decoder); an architecture reads its sizes and overrides
//! only the fields where it differs, so a new field gets its default in one place.

pub use super::ops::activations::Act;
pub use super::ops::norm::NormKind;
use crate::error::{Error, Result};
use serde_json::Value;

const OP: &str = "config";

/// Upper bounds on the sizes a `config.json` may declare, checked before anything is sized from them. Each is
/// several times the largest released model's (hidden 16384, 126 layers, 128 heads, head_dim 256,
/// intermediate 53248, vocabulary 256k, 10M positions); the tensors' shapes must then match exactly.
pub mod limits {
    /// Residual width.
    pub const HIDDEN: usize = 1 << 17;
    /// Transformer blocks.
    pub const LAYERS: usize = 1 << 10;
    /// Attention heads (query or key/value).
    pub const HEADS: usize = 1 << 10;
    /// Width of one head.
    pub const HEAD_DIM: usize = 1 << 11;
    /// MLP inner width.
    pub const INTERMEDIATE: usize = 1 << 20;
    /// Vocabulary (token ids are u32).
    pub const VOCAB: usize = 1 << 24;
    /// Context length (the KV cache grows with use, so this bounds only what a config may claim).
    pub const POSITIONS: usize = 1 << 26;
    /// Multipliers of another size (MPT's `expansion_ratio`).
    pub const RATIO: usize = 64;
    /// Input channels of an audio encoder (Whisper's mel bins: 80 or 128).
    pub const MEL_BINS: usize = 1 << 12;
    /// Positions of an audio encoder (Whisper's 1500: 30 s at 50 frames/s).
    pub const SOURCE_POSITIONS: usize = 1 << 16;
}

/// What the encoder of an encoder-decoder model reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncoderInput {
    /// Token ids through the shared embedding (T5).
    Tokens,
    /// A log-mel spectrogram `[bins × frames]` through two convolutions, the second of stride 2, onto at most
    /// `positions` encoder positions (Whisper).
    Mel {
        /// Mel bins (input channels).
        bins: usize,
        /// Encoder positions (the learned or sinusoidal table's rows); up to `2 · positions` frames.
        positions: usize,
    },
}

/// Where positions enter the model.
#[derive(Clone, Debug, PartialEq)]
pub enum Positions {
    /// Rotary embeddings on q and k (half-split "rotate_half" convention), with per-pair inverse frequencies
    /// (rope scaling already applied).
    Rope {
        /// `head_dim / 2` inverse frequencies.
        inv_freq: Vec<f32>,
    },
    /// A learned table added to the token embeddings; position `p` reads row `p + offset`.
    Learned {
        /// OPT stores two padding rows first.
        offset: usize,
    },
    /// T5's relative position bias: a learned per-head bias per bucket of distances
    /// ([`super::ops::relative`]), stored in the first block of each stack or in every block.
    Buckets {
        /// Buckets (each direction gets half in the encoder).
        buckets: usize,
        /// Distances beyond this share the last bucket.
        max_distance: usize,
        /// Every block learns its own table (UMT5); otherwise the first block's serves the whole stack (T5).
        per_layer: bool,
    },
    /// ALiBi: a per-head linear bias `slope_h · (j - i)` on attention scores.
    Alibi {
        /// One slope per head.
        slopes: Vec<f32>,
    },
}

/// MLP shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mlp {
    /// `down(act(gate(x)) · up(x))`; gate and up are fused into one matrix (gate rows first).
    Gated(Act),
    /// `down(act(up(x)))`.
    Plain(Act),
}

/// The sizes every architecture reads from its config (under its own key names).
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    /// Residual width `D`.
    pub hidden: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Query heads `H`.
    pub heads: usize,
    /// MLP inner width `I`.
    pub intermediate: usize,
    /// Vocabulary size `V`.
    pub vocab: usize,
    /// Longest context the model supports.
    pub max_positions: usize,
}

/// Everything the generic forward pass needs to know about a decoder.
#[derive(Clone, Debug)]
pub struct Spec {
    /// `model_type` from the config.
    pub model_type: String,
    /// Residual width `D`.
    pub hidden: usize,
    /// Transformer blocks (of the decoder, in an encoder-decoder model).
    pub layers: usize,
    /// Encoder blocks of an encoder-decoder model; 0 for a decoder-only one.
    pub encoder_layers: usize,
    /// What the encoder reads (an encoder-decoder model's).
    pub encoder_input: EncoderInput,
    /// Query heads `H`.
    pub heads: usize,
    /// Key/value heads `G` (`H` is a multiple of `G`).
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// MLP inner width `I`.
    pub intermediate: usize,
    /// Vocabulary size `V`.
    pub vocab: usize,
    /// Longest context the model supports.
    pub max_positions: usize,
    /// Norm kind and epsilon.
    pub norm: NormKind,
    /// Norm epsilon.
    pub norm_eps: f32,
    /// Position scheme.
    pub positions: Positions,
    /// MLP kind.
    pub mlp: Mlp,
    /// Attention score scale; `None`: `1/sqrt(head_dim)` (see [`Spec::attn_scale`]).
    pub attn_scale: Option<f32>,
    /// Clamp q, k and v to `±clip` (MPT's `clip_qkv`).
    pub clip_qkv: Option<f32>,
    /// Attend only to the last `w` positions (Mistral's sliding window).
    pub sliding_window: Option<usize>,
    /// Whether the output head reuses the token embedding.
    pub tie_embeddings: bool,
    /// Factor on the final hidden state before the head (T5's `d_model^-0.5`).
    pub output_scale: f32,
    /// Whether q/k/v carry biases (and o, in the architectures whose o has one).
    pub attn_bias: bool,
    /// Whether the MLP carries biases.
    pub mlp_bias: bool,
    /// Token ids that end generation.
    pub eos: Vec<u32>,
    /// The beginning-of-sequence token, if any; an encoder-decoder model's first decoder token.
    pub bos: Option<u32>,
}

impl Spec {
    /// The spec of a GPT-2-style decoder of these sizes, which an architecture overrides where it differs:
    /// multi-head attention (`kv_heads = heads`, `head_dim = hidden / heads`, scale `1/sqrt(head_dim)`), biased
    /// LayerNorm with epsilon 1e-5, learned positions, a plain tanh-GELU MLP, biases on every projection, no
    /// q/k/v clipping or sliding window. The head is tied unless `tie_word_embeddings` is false (Hugging Face's
    /// default), and the eos/bos ids are the config's.
    pub fn new(c: &Cfg, sizes: Sizes) -> Result<Spec> {
        let Sizes { hidden, layers, heads, intermediate, vocab, max_positions } = sizes;
        Ok(Spec {
            model_type: c.model_type.to_string(),
            hidden,
            layers,
            encoder_layers: 0,
            encoder_input: EncoderInput::Tokens,
            heads,
            kv_heads: heads,
            head_dim: hidden.checked_div(heads).unwrap_or(0),
            intermediate,
            vocab,
            max_positions,
            norm: NormKind::LayerNorm { bias: true },
            norm_eps: 1e-5,
            positions: Positions::Learned { offset: 0 },
            mlp: Mlp::Plain(Act::GeluTanh),
            attn_scale: None,
            clip_qkv: None,
            sliding_window: None,
            tie_embeddings: c.bool_or("tie_word_embeddings", true)?,
            output_scale: 1.0,
            attn_bias: true,
            mlp_bias: true,
            eos: c.token_ids("eos_token_id"),
            bos: c.token_ids("bos_token_id").first().copied(),
        })
    }

    /// The attention score scale: the configured one, else `1/sqrt(head_dim)`.
    pub fn attn_scale(&self) -> f32 {
        self.attn_scale.unwrap_or(1.0 / (self.head_dim as f32).sqrt())
    }

    /// Rows of the fused q/k/v projection: `(H + 2G) · head_dim`.
    pub fn qkv_rows(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }

    /// Checks the numbers fit together and within [`limits`] ([`super::arch::spec`] calls it for every
    /// architecture).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::invalid(OP, format!("{}: config.json: {m}", self.model_type)));
        for (name, v, max) in [
            ("hidden size", self.hidden, limits::HIDDEN),
            ("layers", self.layers, limits::LAYERS),
            ("heads", self.heads, limits::HEADS),
            ("kv heads", self.kv_heads, limits::HEADS),
            ("head_dim", self.head_dim, limits::HEAD_DIM),
            ("intermediate size", self.intermediate, limits::INTERMEDIATE),
            ("vocab size", self.vocab, limits::VOCAB),
            ("max positions", self.max_positions, limits::POSITIONS),
        ] {
            if v == 0 {
                return bad(format!("{name} is 0"));
            }
            if v > max {
                return bad(format!("{name} {v} is over the limit of {max}"));
            }
        }
        if self.encoder_layers > limits::LAYERS {
            return bad(format!("encoder layers {} is over the limit of {}", self.encoder_layers, limits::LAYERS));
        }
        if let EncoderInput::Mel { bins, positions } = self.encoder_input {
            if bins == 0 || bins > limits::MEL_BINS || positions == 0 || positions > limits::SOURCE_POSITIONS {
                return bad(format!(
                    "num_mel_bins {bins} / max_source_positions {positions} are out of range (1..={}, 1..={})",
                    limits::MEL_BINS,
                    limits::SOURCE_POSITIONS
                ));
            }
        }
        if self.sliding_window == Some(0) {
            return bad("sliding_window is 0 (no position could attend to any)".into());
        }
        if let Some(c) = self.clip_qkv {
            if !(c.is_finite() && c > 0.0) {
                return bad(format!("clip_qkv {c} is not a positive number"));
            }
        }
        if !self.attn_scale().is_finite() {
            return bad(format!("attention scale {} is not finite", self.attn_scale()));
        }
        match &self.positions {
            Positions::Rope { inv_freq } if inv_freq.iter().any(|f| !(f.is_finite() && *f > 0.0)) => {
                return bad("rotary frequencies are not finite positive numbers (rope_theta or rope scaling)".into());
            }
            Positions::Alibi { slopes } if slopes.len() != self.heads || slopes.iter().any(|s| !s.is_finite()) => {
                return bad("ALiBi slopes are not finite (alibi_bias_max)".into());
            }
            // At least one bucket per direction beyond the exact ones, and a farthest distance past them.
            Positions::Buckets { buckets, max_distance, .. }
                if *buckets < 4
                    || *buckets > 1 << 16
                    || *max_distance <= buckets / 4
                    || *max_distance > limits::POSITIONS =>
            {
                return bad(format!(
                    "relative_attention_num_buckets {buckets} / max_distance {max_distance} are out of range"
                ));
            }
            _ => {}
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return bad(format!("{} heads is not a multiple of {} key/value heads", self.heads, self.kv_heads));
        }
        if let Positions::Rope { inv_freq } = &self.positions {
            if !self.head_dim.is_multiple_of(2) || inv_freq.len() != self.head_dim / 2 {
                return bad(format!("rotary embeddings need an even head_dim, got {}", self.head_dim));
            }
        }
        if !(self.norm_eps.is_finite() && self.norm_eps >= 0.0) {
            return bad(format!("norm epsilon {} is not a non-negative number", self.norm_eps));
        }
        Ok(())
    }
}

/// Read access to a config JSON object with errors that name the key.
pub struct Cfg<'a> {
    /// The JSON object.
    pub v: &'a Value,
    /// The model type, for messages.
    pub model_type: &'a str,
}

impl Cfg<'_> {
    fn missing(&self, key: &str) -> Error {
        Error::invalid(OP, format!("{}: config.json has no usable {key:?}", self.model_type))
    }

    /// A required non-negative integer.
    pub fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| self.missing(key))
    }

    /// A required size of at most `max` (see [`limits`]).
    pub fn size(&self, key: &str, max: usize) -> Result<usize> {
        self.opt_size(key, max)?.ok_or_else(|| self.missing(key))
    }

    /// An optional size of at most `max`.
    pub fn opt_size(&self, key: &str, max: usize) -> Result<Option<usize>> {
        match self.opt_usize(key)? {
            Some(n) if n > max => Err(Error::invalid(
                OP,
                format!("{}: config.json {key:?} = {n} is over the limit of {max}", self.model_type),
            )),
            n => Ok(n),
        }
    }

    /// An optional non-negative integer (absent or null: `None`).
    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x.as_u64().and_then(|n| usize::try_from(n).ok()).map(Some).ok_or_else(|| {
                Error::invalid(OP, format!("{}: {key:?} must be a non-negative integer, got {x}", self.model_type))
            }),
        }
    }

    /// An optional number.
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x
                .as_f64()
                .map(Some)
                .ok_or_else(|| Error::invalid(OP, format!("{}: {key:?} must be a number, got {x}", self.model_type))),
        }
    }

    /// An optional boolean, with a default.
    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(x) => x.as_bool().ok_or_else(|| {
                Error::invalid(OP, format!("{}: {key:?} must be true or false, got {x}", self.model_type))
            }),
        }
    }

    /// An optional string.
    pub fn opt_str(&self, key: &str) -> Option<&str> {
        self.v.get(key).and_then(|x| x.as_str())
    }

    /// Token ids under `key`: an integer, a list of them, or absent. Values that are not u32 are skipped
    /// (not truncated onto another id).
    pub fn token_ids(&self, key: &str) -> Vec<u32> {
        let id = |x: &Value| x.as_u64().and_then(|n| u32::try_from(n).ok());
        match self.v.get(key) {
            Some(n @ Value::Number(_)) => id(n).into_iter().collect(),
            Some(Value::Array(a)) => a.iter().filter_map(id).collect(),
            _ => Vec::new(),
        }
    }
}
