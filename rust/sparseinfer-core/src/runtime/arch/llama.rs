//! The Llama family: Llama 2/3, Mistral, Qwen2, SmolLM (Touvron et al., arXiv 2302.13971).
//!
//! Pre-norm blocks with RMSNorm, rotary position embeddings (Su et al., arXiv 2104.09864) with optional
//! `linear`/`llama3` scaling, grouped-query attention, SwiGLU MLP (gate and up fused into one matrix), optional
//! q/k/v biases (Qwen2) and tied embeddings (SmolLM).
//!
//! Hugging Face names → ours (prefix `model.`):
//! `embed_tokens` → embedding; `layers.i.input_layernorm` → attn.norm; `self_attn.{q,k,v}_proj` → attn.qkv (stacked);
//! `self_attn.o_proj` → attn.o; `post_attention_layernorm` → ffn.norm; `mlp.{gate,up}_proj` → ffn.up (stacked);
//! `mlp.down_proj` → ffn.down; `norm` → final norm; `lm_head` (or the embedding when tied) → head.

use super::{finish, par_layers, prefix_of, Parts};
use crate::error::{Error, Result};
use crate::runtime::blocks::{DecoderBlock, FeedForward, SelfAttention};
use crate::runtime::checkpoint::Orientation;
use crate::runtime::config::{limits, Act, Cfg, Mlp, NormKind, Positions, Sizes, Spec};
use crate::runtime::loader::Loader;
use crate::runtime::ops::rope;

/// The spec from `config.json`.
pub fn spec(c: &Cfg) -> Result<Spec> {
    let (v, model_type) = (c.v, c.model_type);
    let hidden = c.size("hidden_size", limits::HIDDEN)?;
    let heads = c.size("num_attention_heads", limits::HEADS)?;
    let head_dim = c.opt_size("head_dim", limits::HEAD_DIM)?.unwrap_or(hidden.checked_div(heads).unwrap_or(0));
    let inv_freq = rope::inv_freq(v, model_type, head_dim)?;
    let sliding_window =
        if c.bool_or("use_sliding_window", model_type == "mistral")? { c.opt_usize("sliding_window")? } else { None };
    let sizes = Sizes {
        hidden,
        layers: c.size("num_hidden_layers", limits::LAYERS)?,
        heads,
        intermediate: c.size("intermediate_size", limits::INTERMEDIATE)?,
        vocab: c.size("vocab_size", limits::VOCAB)?,
        max_positions: c.opt_size("max_position_embeddings", limits::POSITIONS)?.unwrap_or(2048),
    };
    let spec = Spec {
        kv_heads: c.opt_size("num_key_value_heads", limits::HEADS)?.unwrap_or(heads),
        head_dim,
        norm: NormKind::Rms,
        norm_eps: c.opt_f64("rms_norm_eps")?.unwrap_or(1e-6) as f32,
        positions: Positions::Rope { inv_freq },
        mlp: Mlp::Gated(Act::parse(c.opt_str("hidden_act").unwrap_or("silu"))?),
        sliding_window,
        tie_embeddings: c.bool_or("tie_word_embeddings", false)?,
        attn_bias: c.bool_or("attention_bias", model_type == "qwen2")?,
        mlp_bias: c.bool_or("mlp_bias", false)?,
        ..Spec::new(c, sizes)?
    };
    if c.opt_f64("partial_rotary_factor")?.is_some_and(|f| f != 1.0) {
        return Err(Error::unsupported("config", format!("{model_type}: partial_rotary_factor != 1 is not supported")));
    }
    Ok(spec)
}

/// The weights, per the name map in the module docs.
pub fn load(s: &Spec, l: &Loader) -> Result<Parts> {
    let p = prefix_of(l.store, &["model.", ""], "embed_tokens.weight")?;
    let (d, hd) = (s.hidden, s.head_dim);
    let layers = par_layers(s.layers, |i| {
        let n = |x: &str| format!("{p}layers.{i}.{x}");
        let (q, k, v) = (n("self_attn.q_proj.weight"), n("self_attn.k_proj.weight"), n("self_attn.v_proj.weight"));
        let (gate, up) = (n("mlp.gate_proj.weight"), n("mlp.up_proj.weight"));
        Ok(DecoderBlock {
            attn: SelfAttention {
                norm: l.norm(&n("input_layernorm"), d, false)?,
                qkv: l.proj(
                    &[(&q, s.heads * hd), (&k, s.kv_heads * hd), (&v, s.kv_heads * hd)],
                    d,
                    Orientation::OutIn,
                    s.attn_bias,
                )?,
                o: l.proj(&[(&n("self_attn.o_proj.weight"), d)], s.heads * hd, Orientation::OutIn, false)?,
            },
            ffn: FeedForward {
                norm: l.norm(&n("post_attention_layernorm"), d, false)?,
                up: l.proj(&[(&gate, s.intermediate), (&up, s.intermediate)], d, Orientation::OutIn, s.mlp_bias)?,
                down: l.proj(&[(&n("mlp.down_proj.weight"), d)], s.intermediate, Orientation::OutIn, s.mlp_bias)?,
            },
        })
    })?;
    let pos_embed = None;
    finish(s, l, layers, &format!("{p}embed_tokens.weight"), pos_embed, &format!("{p}norm"), false)
}
