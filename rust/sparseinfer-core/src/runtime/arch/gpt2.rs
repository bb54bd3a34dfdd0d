//! GPT-2 (Radford et al., 2019).
//!
//! Pre-norm blocks with biased LayerNorm, learned absolute positions, `gelu_new` MLP, biases everywhere, tied
//! output head. Projections are `Conv1D` modules stored `[in, out]`; the loader transposes them once.
//!
//! Hugging Face names → ours (prefix `transformer.`):
//! `wte` → embedding; `wpe` → positions; `h.i.ln_1` → attn.norm; `attn.c_attn` → attn.qkv (already fused);
//! `attn.c_proj` → attn.o; `ln_2` → ffn.norm; `mlp.c_fc` → ffn.up; `mlp.c_proj` → ffn.down; `ln_f` → final norm.

use super::{finish, par_layers, prefix_of, Parts};
use crate::error::{Error, Result};
use crate::runtime::blocks::{DecoderBlock, FeedForward, SelfAttention};
use crate::runtime::checkpoint::Orientation;
use crate::runtime::config::{limits, Act, Cfg, Mlp, Sizes, Spec};
use crate::runtime::loader::Loader;

/// The spec from `config.json`.
pub fn spec(c: &Cfg) -> Result<Spec> {
    let hidden = c.size("n_embd", limits::HIDDEN)?;
    let heads = c.size("n_head", limits::HEADS)?;
    if c.bool_or("scale_attn_by_inverse_layer_idx", false)? {
        return Err(Error::unsupported("config", "gpt2: scale_attn_by_inverse_layer_idx is not supported"));
    }
    if !hidden.is_multiple_of(heads.max(1)) {
        return Err(Error::invalid("config", format!("gpt2: n_embd {hidden} is not a multiple of {heads} heads")));
    }
    let unscaled = !c.bool_or("scale_attn_weights", true)?;
    let sizes = Sizes {
        hidden,
        layers: c.size("n_layer", limits::LAYERS)?,
        heads,
        intermediate: c.opt_size("n_inner", limits::INTERMEDIATE)?.unwrap_or(4 * hidden),
        vocab: c.size("vocab_size", limits::VOCAB)?,
        max_positions: c.size("n_positions", limits::POSITIONS)?,
    };
    Ok(Spec {
        norm_eps: c.opt_f64("layer_norm_epsilon")?.unwrap_or(1e-5) as f32,
        mlp: Mlp::Plain(Act::parse(c.opt_str("activation_function").unwrap_or("gelu_new"))?),
        attn_scale: unscaled.then_some(1.0),
        ..Spec::new(c, sizes)?
    })
}

/// The weights, per the name map in the module docs.
pub fn load(s: &Spec, l: &Loader) -> Result<Parts> {
    let p = prefix_of(l.store, &["transformer.", ""], "wte.weight")?;
    let d = s.hidden;
    let layers = par_layers(s.layers, |i| {
        let n = |x: &str| format!("{p}h.{i}.{x}");
        Ok(DecoderBlock {
            attn: SelfAttention {
                norm: l.norm(&n("ln_1"), d, true)?,
                qkv: l.proj(&[(&n("attn.c_attn.weight"), 3 * d)], d, Orientation::InOut, true)?,
                o: l.proj(&[(&n("attn.c_proj.weight"), d)], d, Orientation::InOut, true)?,
            },
            ffn: FeedForward {
                norm: l.norm(&n("ln_2"), d, true)?,
                up: l.proj(&[(&n("mlp.c_fc.weight"), s.intermediate)], d, Orientation::InOut, true)?,
                down: l.proj(&[(&n("mlp.c_proj.weight"), d)], s.intermediate, Orientation::InOut, true)?,
            },
        })
    })?;
    let pos_embed = Some(l.f32(&format!("{p}wpe.weight"), &[s.max_positions, d])?);
    finish(s, l, layers, &format!("{p}wte.weight"), pos_embed, &format!("{p}ln_f"), true)
}
