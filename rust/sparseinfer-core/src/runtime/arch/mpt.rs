//! MPT (MosaicML, 2023), the seed paper's model (Kurtic et al., arXiv 2310.06927).
//!
//! Pre-norm blocks with bias-free LayerNorm, ALiBi attention biases (Press et al., arXiv 2108.12409) instead of
//! position embeddings, fused `Wqkv`, exact-GELU MLP, no linear biases, tied output head, optional `clip_qkv`.
//!
//! Hugging Face names → ours (prefix `transformer.`):
//! `wte` → embedding; `blocks.i.norm_1` → attn.norm; `attn.Wqkv` → attn.qkv; `attn.out_proj` → attn.o; `norm_2` → ffn.norm;
//! `ffn.up_proj` → ffn.up; `ffn.down_proj` → ffn.down; `norm_f` → final norm.

use super::{finish, par_layers, prefix_of, Parts};
use crate::error::{Error, Result};
use crate::runtime::blocks::{DecoderBlock, FeedForward, SelfAttention};
use crate::runtime::checkpoint::Orientation;
use crate::runtime::config::{limits, Act, Cfg, Mlp, NormKind, Positions, Sizes, Spec};
use crate::runtime::loader::Loader;
use serde_json::Value;

/// MPT's ALiBi slopes: `1 / 2^(8·i / n)` over the next power of two `n ≥ heads`, interleaved when `heads` is
/// not a power of two (odd positions first), as MPT's reference code builds them.
pub fn alibi_slopes(heads: usize, bias_max: f64) -> Vec<f32> {
    let n = heads.next_power_of_two();
    let all: Vec<f64> = (1..=n).map(|i| 1.0 / 2f64.powf(i as f64 * bias_max / n as f64)).collect();
    let ordered: Vec<f64> =
        if n == heads { all } else { all.iter().skip(1).step_by(2).chain(all.iter().step_by(2)).copied().collect() };
    ordered.into_iter().take(heads).map(|x| x as f32).collect()
}

/// The spec from `config.json`.
pub fn spec(c: &Cfg) -> Result<Spec> {
    let hidden = c.size("d_model", limits::HIDDEN)?;
    let heads = c.size("n_heads", limits::HEADS)?;
    let null = Value::Null;
    let a = Cfg { v: c.v.get("attn_config").unwrap_or(&null), model_type: c.model_type };
    if !a.bool_or("alibi", true)? {
        return Err(Error::unsupported(
            "config",
            "mpt: only ALiBi MPT models (attn_config.alibi = true) are supported",
        ));
    }
    for key in ["qk_ln", "prefix_lm", "attn_uses_sequence_id"] {
        if a.bool_or(key, false)? {
            return Err(Error::unsupported("config", format!("mpt: attn_config.{key} is not supported")));
        }
    }
    if !c.bool_or("no_bias", true)? {
        return Err(Error::unsupported("config", "mpt: linear biases (no_bias = false) are not supported"));
    }
    if !hidden.is_multiple_of(heads.max(1)) {
        return Err(Error::invalid("config", format!("mpt: d_model {hidden} is not a multiple of {heads} heads")));
    }
    let sizes = Sizes {
        hidden,
        layers: c.size("n_layers", limits::LAYERS)?,
        heads,
        intermediate: c.opt_size("expansion_ratio", limits::RATIO)?.unwrap_or(4) * hidden,
        vocab: c.size("vocab_size", limits::VOCAB)?,
        max_positions: c.opt_size("max_seq_len", limits::POSITIONS)?.unwrap_or(2048),
    };
    Ok(Spec {
        norm: NormKind::LayerNorm { bias: false },
        norm_eps: c.opt_f64("layer_norm_epsilon")?.unwrap_or(1e-5) as f32,
        positions: Positions::Alibi { slopes: alibi_slopes(heads, a.opt_f64("alibi_bias_max")?.unwrap_or(8.0)) },
        mlp: Mlp::Plain(Act::Gelu),
        attn_scale: a.opt_f64("softmax_scale")?.map(|s| s as f32),
        clip_qkv: a.opt_f64("clip_qkv")?.map(|x| x as f32),
        attn_bias: false,
        mlp_bias: false,
        ..Spec::new(c, sizes)?
    })
}

/// The weights, per the name map in the module docs.
pub fn load(s: &Spec, l: &Loader) -> Result<Parts> {
    let p = prefix_of(l.store, &["transformer.", ""], "wte.weight")?;
    let d = s.hidden;
    let layers = par_layers(s.layers, |i| {
        let n = |x: &str| format!("{p}blocks.{i}.{x}");
        Ok(DecoderBlock {
            attn: SelfAttention {
                norm: l.norm(&n("norm_1"), d, false)?,
                qkv: l.proj(&[(&n("attn.Wqkv.weight"), 3 * d)], d, Orientation::OutIn, false)?,
                o: l.proj(&[(&n("attn.out_proj.weight"), d)], d, Orientation::OutIn, false)?,
            },
            ffn: FeedForward {
                norm: l.norm(&n("norm_2"), d, false)?,
                up: l.proj(&[(&n("ffn.up_proj.weight"), s.intermediate)], d, Orientation::OutIn, false)?,
                down: l.proj(&[(&n("ffn.down_proj.weight"), d)], s.intermediate, Orientation::OutIn, false)?,
            },
        })
    })?;
    let pos_embed = None;
    finish(s, l, layers, &format!("{p}wte.weight"), pos_embed, &format!("{p}norm_f"), false)
}
