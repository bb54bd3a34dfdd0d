//! OPT (Zhang et al., arXiv 2205.01068).
//!
//! Pre-norm blocks (`do_layer_norm_before`) with biased LayerNorm, learned positions offset by 2, ReLU MLP,
//! biases on every projection, tied output head. The post-norm variant (opt-350m) and a projected embedding
//! width (`word_embed_proj_dim != hidden_size`) are refused with a clear error.
//!
//! Hugging Face names → ours (prefix `model.decoder.`):
//! `embed_tokens` → embedding; `embed_positions` → positions; `layers.i.self_attn_layer_norm` → attn.norm;
//! `self_attn.{q,k,v}_proj` → attn.qkv; `self_attn.out_proj` → attn.o; `final_layer_norm` → ffn.norm; `fc1` → ffn.up; `fc2` → ffn.down;
//! `final_layer_norm` (outside the layers) → final norm.

use super::{finish, par_layers, prefix_of, Parts};
use crate::error::{Error, Result};
use crate::runtime::blocks::{DecoderBlock, FeedForward, SelfAttention};
use crate::runtime::checkpoint::Orientation;
use crate::runtime::config::{limits, Act, Cfg, Mlp, NormKind, Positions, Sizes, Spec};
use crate::runtime::loader::Loader;

/// The spec from `config.json`.
pub fn spec(c: &Cfg) -> Result<Spec> {
    let hidden = c.size("hidden_size", limits::HIDDEN)?;
    let heads = c.size("num_attention_heads", limits::HEADS)?;
    if !c.bool_or("do_layer_norm_before", true)? {
        return Err(Error::unsupported("config", "opt: post-norm OPT (do_layer_norm_before = false) is not supported"));
    }
    if c.opt_usize("word_embed_proj_dim")?.is_some_and(|w| w != hidden) {
        return Err(Error::unsupported("config", "opt: word_embed_proj_dim != hidden_size is not supported"));
    }
    if c.bool_or("_remove_final_layer_norm", false)? {
        return Err(Error::unsupported("config", "opt: _remove_final_layer_norm is not supported"));
    }
    let bias = c.bool_or("enable_bias", true)?;
    let sizes = Sizes {
        hidden,
        layers: c.size("num_hidden_layers", limits::LAYERS)?,
        heads,
        intermediate: c.size("ffn_dim", limits::INTERMEDIATE)?,
        vocab: c.size("vocab_size", limits::VOCAB)?,
        max_positions: c.size("max_position_embeddings", limits::POSITIONS)?,
    };
    let spec = Spec {
        norm: NormKind::LayerNorm { bias: c.bool_or("layer_norm_elementwise_affine", true)? },
        positions: Positions::Learned { offset: 2 },
        mlp: Mlp::Plain(Act::parse(c.opt_str("activation_function").unwrap_or("relu"))?),
        attn_bias: bias,
        mlp_bias: bias,
        ..Spec::new(c, sizes)?
    };
    if !hidden.is_multiple_of(heads.max(1)) {
        return Err(Error::invalid("config", format!("opt: hidden_size {hidden} is not a multiple of {heads} heads")));
    }
    Ok(spec)
}

/// The weights, per the name map in the module docs.
pub fn load(s: &Spec, l: &Loader) -> Result<Parts> {
    let p = prefix_of(l.store, &["model.decoder.", "decoder.", ""], "embed_tokens.weight")?;
    let d = s.hidden;
    let ln_bias = matches!(s.norm, NormKind::LayerNorm { bias: true });
    let layers = par_layers(s.layers, |i| {
        let n = |x: &str| format!("{p}layers.{i}.{x}");
        let (q, k, v) = (n("self_attn.q_proj.weight"), n("self_attn.k_proj.weight"), n("self_attn.v_proj.weight"));
        Ok(DecoderBlock {
            attn: SelfAttention {
                norm: l.norm(&n("self_attn_layer_norm"), d, ln_bias)?,
                qkv: l.proj(&[(&q, d), (&k, d), (&v, d)], d, Orientation::OutIn, s.attn_bias)?,
                o: l.proj(&[(&n("self_attn.out_proj.weight"), d)], d, Orientation::OutIn, s.attn_bias)?,
            },
            ffn: FeedForward {
                norm: l.norm(&n("final_layer_norm"), d, ln_bias)?,
                up: l.proj(&[(&n("fc1.weight"), s.intermediate)], d, Orientation::OutIn, s.mlp_bias)?,
                down: l.proj(&[(&n("fc2.weight"), d)], s.intermediate, Orientation::OutIn, s.mlp_bias)?,
            },
        })
    })?;
    let pos_embed = Some(l.f32(&format!("{p}embed_positions.weight"), &[s.max_positions + 2, d])?);
    finish(s, l, layers, &format!("{p}embed_tokens.weight"), pos_embed, &format!("{p}final_layer_norm"), ln_bias)
}
