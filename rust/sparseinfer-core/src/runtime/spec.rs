//! The architecture-neutral description of a decoder ([`Spec`]) that every architecture file fills in from
//! its `config.json`, and small helpers to read that JSON with clear errors.

use crate::error::{Error, Result};
use serde_json::Value;

const OP: &str = "config";

/// Layer normalisation kind.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum NormKind {
    /// `x / sqrt(mean(x²) + eps) · w` (Llama family).
    Rms,
    /// `(x - mean) / sqrt(var + eps) · w (+ b)`.
    LayerNorm {
        /// Whether the checkpoint carries a bias.
        bias: bool,
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
    /// ALiBi: a per-head linear bias `slope_h · (j - i)` on attention scores.
    Alibi {
        /// One slope per head.
        slopes: Vec<f32>,
    },
}

/// Activation of the MLP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    /// `x · sigmoid(x)`.
    Silu,
    /// `max(x, 0)`.
    Relu,
    /// GELU with the tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    /// Exact GELU (erf).
    Gelu,
}

impl Act {
    /// Parses a Hugging Face activation name.
    pub fn parse(name: &str) -> Result<Act> {
        Ok(match name {
            "silu" | "swish" => Act::Silu,
            "relu" => Act::Relu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Act::GeluTanh,
            "gelu" => Act::Gelu,
            _ => {
                return Err(Error::unsupported(
                    OP,
                    format!("activation {name:?} is not supported (silu, relu, gelu, gelu_new, gelu_pytorch_tanh)"),
                ))
            }
        })
    }
}

/// MLP shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mlp {
    /// `down(act(gate(x)) · up(x))`; gate and up are fused into one matrix (gate rows first).
    Gated(Act),
    /// `down(act(up(x)))`.
    Plain(Act),
}

/// Everything the generic forward pass needs to know about a decoder.
#[derive(Clone, Debug)]
pub struct Spec {
    /// `model_type` from the config.
    pub model_type: String,
    /// Residual width `D`.
    pub hidden: usize,
    /// Transformer blocks.
    pub layers: usize,
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
    /// Attention score scale (usually `1/sqrt(head_dim)`).
    pub attn_scale: f32,
    /// Clamp q, k and v to `±clip` (MPT's `clip_qkv`).
    pub clip_qkv: Option<f32>,
    /// Attend only to the last `w` positions (Mistral's sliding window).
    pub sliding_window: Option<usize>,
    /// Whether the output head reuses the token embedding.
    pub tie_embeddings: bool,
    /// Whether q/k/v, o, up and down carry biases.
    pub attn_bias: bool,
    /// Whether the MLP carries biases.
    pub mlp_bias: bool,
    /// Token ids that end generation.
    pub eos: Vec<u32>,
    /// The beginning-of-sequence token, if any.
    pub bos: Option<u32>,
}

impl Spec {
    /// Rows of the fused q/k/v projection: `(H + 2G) · head_dim`.
    pub fn qkv_rows(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }

    /// Checks the numbers fit together; every architecture calls this.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::invalid(OP, format!("{}: {m}", self.model_type)));
        for (name, v) in [
            ("hidden size", self.hidden),
            ("layers", self.layers),
            ("heads", self.heads),
            ("kv heads", self.kv_heads),
            ("head_dim", self.head_dim),
            ("intermediate size", self.intermediate),
            ("vocab size", self.vocab),
            ("max positions", self.max_positions),
        ] {
            if v == 0 {
                return bad(format!("{name} is 0"));
            }
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

    /// An optional non-negative integer (absent or null: `None`).
    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
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

    /// Token ids under `key`: an integer, a list of them, or absent.
    pub fn token_ids(&self, key: &str) -> Vec<u32> {
        match self.v.get(key) {
            Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
            Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).map(|n| n as u32).collect(),
            _ => Vec::new(),
        }
    }
}
