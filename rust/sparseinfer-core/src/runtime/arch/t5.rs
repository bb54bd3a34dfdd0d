//! T5, T5 v1.1 / flan-t5 and mT5 (Raffel et al., arXiv 1910.10683), and UMT5 (Chung et al., arXiv 2304.09151):
//! an encoder-decoder with pre-norm blocks, RMS-style layer norms without bias, unscaled attention scores with a
//! relative position bias in self-attention (T5 and mT5 learn one table per stack, in its first block; UMT5
//! learns one in every block), no biases anywhere, a ReLU MLP (T5) or a gated-GELU one (v1.1, flan-t5, mT5,
//! UMT5). The original T5 ties the head to the embedding and scales the decoder output by `d_model^-0.5` before
//! it; v1.1 (`tie_word_embeddings: false`) has its own head and no scaling. Transformers 5 writes v1.1 and UMT5
//! configs as `tie_word_embeddings: true` with `scale_decoder_outputs` and ties the head: the scaling follows
//! `scale_decoder_outputs` when present, and the head is `lm_head` when stored.
//!
//! Hugging Face names → ours: `shared` → embedding (both stacks); `{encoder,decoder}.block.i.layer.0` →
//! attn (`layer_norm` → norm, `SelfAttention.{q,k,v}` → qkv stacked, `.o` → o,
//! `SelfAttention.relative_attention_bias` → the stack's bias table from block 0, or block i's own table in
//! UMT5); decoder `layer.1` → cross (`EncDecAttention.q` → q, `.{k,v}` → kv stacked, `.o` → o); the last layer
//! → ffn (`DenseReluDense.wi`, or `wi_0` (gate) and `wi_1` stacked → up, `.wo` → down);
//! `{encoder,decoder}.final_layer_norm` → the final norms; `lm_head` (or `shared` when tied) → head.

use super::par_layers;
use crate::error::{Error, Result};
use crate::runtime::blocks::{CrossAttention, CrossBlock, DecoderBlock, FeedForward, SelfAttention};
use crate::runtime::checkpoint::Orientation;
use crate::runtime::config::{limits, Act, Cfg, Mlp, NormKind, Positions, Sizes, Spec};
use crate::runtime::loader::Loader;
use crate::runtime::models::seq2seq::Seq2SeqParts;
use crate::runtime::ops::relative::RelativeBias;

/// The spec of T5 or mT5 from `config.json`. `layers` counts the decoder's blocks, `encoder_layers` the
/// encoder's; `bos` is the decoder's start token.
pub fn spec(c: &Cfg) -> Result<Spec> {
    spec_of(c, false)
}

/// The spec of UMT5: T5's, with a relative position bias table in every block.
pub fn umt5_spec(c: &Cfg) -> Result<Spec> {
    spec_of(c, true)
}

/// The spec of the T5 family; `per_layer`: every block has its own bias table.
fn spec_of(c: &Cfg, per_layer: bool) -> Result<Spec> {
    let hidden = c.size("d_model", limits::HIDDEN)?;
    let heads = c.size("num_heads", limits::HEADS)?;
    let encoder_layers = c.size("num_layers", limits::LAYERS)?;
    let layers = c.opt_size("num_decoder_layers", limits::LAYERS)?.unwrap_or(encoder_layers);
    // Transformers' default: T5's is ReLU, mT5's and UMT5's the gated GELU.
    let default_proj = if c.model_type == "t5" { "relu" } else { "gated-gelu" };
    let proj = c.opt_str("feed_forward_proj").unwrap_or(default_proj);
    let unsupported = || {
        Error::unsupported(
            "config",
            format!("{}: feed_forward_proj {proj:?} is not supported (\"<act>\" or \"gated-<act>\")", c.model_type),
        )
    };
    let act = |name: &str| Act::parse(name).map_err(|_| unsupported());
    let mlp = match proj.split_once('-') {
        // The name Hugging Face keeps for v1.1's tanh GELU.
        _ if proj == "gated-gelu" => Mlp::Gated(Act::GeluTanh),
        Some(("gated", a)) => Mlp::Gated(act(a)?),
        None => Mlp::Plain(act(proj)?),
        _ => return Err(unsupported()),
    };
    let sizes = Sizes {
        hidden,
        layers,
        heads,
        intermediate: c.size("d_ff", limits::INTERMEDIATE)?,
        vocab: c.size("vocab_size", limits::VOCAB)?,
        // Relative positions set no context limit; the caches grow with use.
        max_positions: limits::POSITIONS,
    };
    let buckets = c.opt_size("relative_attention_num_buckets", 1 << 16)?.unwrap_or(32);
    let max_distance = c.opt_size("relative_attention_max_distance", limits::POSITIONS)?.unwrap_or(128);
    let start = c.token_ids("decoder_start_token_id").first().copied().or(c.token_ids("pad_token_id").first().copied());
    let tied = c.bool_or("tie_word_embeddings", true)?;
    // Transformers' MT5 never scales the decoder output; T5 and UMT5 scale it when `scale_decoder_outputs`
    // says so, which transformers 5 derives from a tied head.
    let scaled = c.model_type != "mt5" && c.bool_or("scale_decoder_outputs", tied)?;
    Ok(Spec {
        encoder_layers,
        output_scale: if scaled { (hidden as f32).powf(-0.5) } else { 1.0 },
        head_dim: c.size("d_kv", limits::HEAD_DIM)?,
        norm: NormKind::Rms,
        norm_eps: c.opt_f64("layer_norm_epsilon")?.unwrap_or(1e-6) as f32,
        positions: Positions::Buckets { buckets, max_distance, per_layer },
        mlp,
        attn_scale: Some(1.0),
        attn_bias: false,
        mlp_bias: false,
        bos: Some(start.unwrap_or(0)),
        eos: match c.token_ids("eos_token_id") {
            e if e.is_empty() => vec![1],
            e => e,
        },
        ..Spec::new(c, sizes)?
    })
}

/// The weights, per the name map in the module docs.
pub fn load(s: &Spec, l: &Loader) -> Result<Seq2SeqParts> {
    let (d, hd, h) = (s.hidden, s.head_dim, s.heads);
    let inner = h * hd;
    let (buckets, per_layer) = match s.positions {
        Positions::Buckets { buckets, per_layer, .. } => (buckets, per_layer),
        _ => unreachable!("t5::spec sets bucketed positions"),
    };
    let attn = |p: &str| -> Result<SelfAttention> {
        let qkv = [
            format!("{p}.SelfAttention.q.weight"),
            format!("{p}.SelfAttention.k.weight"),
            format!("{p}.SelfAttention.v.weight"),
        ];
        Ok(SelfAttention {
            norm: l.norm(&format!("{p}.layer_norm"), d, false)?,
            qkv: l.proj(&[(&qkv[0], inner), (&qkv[1], inner), (&qkv[2], inner)], d, Orientation::OutIn, false)?,
            o: l.proj(&[(&format!("{p}.SelfAttention.o.weight"), d)], inner, Orientation::OutIn, false)?,
        })
    };
    let ffn = |p: &str| -> Result<FeedForward> {
        let f = s.intermediate;
        let up = match s.mlp {
            Mlp::Gated(_) => {
                let (g, u) = (format!("{p}.DenseReluDense.wi_0.weight"), format!("{p}.DenseReluDense.wi_1.weight"));
                l.proj(&[(&g, f), (&u, f)], d, Orientation::OutIn, false)?
            }
            Mlp::Plain(_) => l.proj(&[(&format!("{p}.DenseReluDense.wi.weight"), f)], d, Orientation::OutIn, false)?,
        };
        Ok(FeedForward {
            norm: l.norm(&format!("{p}.layer_norm"), d, false)?,
            up,
            down: l.proj(&[(&format!("{p}.DenseReluDense.wo.weight"), d)], f, Orientation::OutIn, false)?,
        })
    };
    let encoder = par_layers(s.encoder_layers, |i| {
        Ok(DecoderBlock {
            attn: attn(&format!("encoder.block.{i}.layer.0"))?,
            ffn: ffn(&format!("encoder.block.{i}.layer.1"))?,
        })
    })?;
    let decoder = par_layers(s.layers, |i| {
        let c = format!("decoder.block.{i}.layer.1");
        let (k, v) = (format!("{c}.EncDecAttention.k.weight"), format!("{c}.EncDecAttention.v.weight"));
        Ok(CrossBlock {
            attn: attn(&format!("decoder.block.{i}.layer.0"))?,
            cross: CrossAttention {
                norm: l.norm(&format!("{c}.layer_norm"), d, false)?,
                q: l.proj(&[(&format!("{c}.EncDecAttention.q.weight"), inner)], d, Orientation::OutIn, false)?,
                kv: l.proj(&[(&k, inner), (&v, inner)], d, Orientation::OutIn, false)?,
                o: l.proj(&[(&format!("{c}.EncDecAttention.o.weight"), d)], inner, Orientation::OutIn, false)?,
            },
            ffn: ffn(&format!("decoder.block.{i}.layer.2"))?,
        })
    })?;
    let table_name =
        |stack: &str, i: usize| format!("{stack}.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight");
    let bias = |stack: &str, blocks: usize| -> Result<RelativeBias> {
        if per_layer {
            let tables = (0..blocks).map(|i| l.f32(&table_name(stack, i), &[buckets, h])).collect::<Result<_>>()?;
            return Ok(RelativeBias::PerLayer(tables));
        }
        // Read as T5, a checkpoint with a table in every block would run with the first block's alone.
        if blocks > 1 && l.store.contains(&table_name(stack, 1)) {
            return Err(Error::invalid(
                "load",
                format!(
                    "tensor {:?} is not part of {}, which learns the bias in block 0 only (is this a umt5 model?)",
                    table_name(stack, 1),
                    s.model_type
                ),
            ));
        }
        Ok(RelativeBias::Shared(l.f32(&table_name(stack, 0), &[buckets, h])?))
    };
    // A checkpoint of a tied model may still carry `lm_head.weight` (a copy); an untied one must.
    let head = if !s.tie_embeddings || l.store.contains("lm_head.weight") { "lm_head.weight" } else { "shared.weight" };

    Ok(Seq2SeqParts {
        embed: l.embedding("shared.weight", s.vocab, d)?,
        audio: None,
        encoder,
        encoder_norm: l.norm("encoder.final_layer_norm", d, false)?,
        encoder_bias: Some(bias("encoder", s.encoder_layers)?),
        decoder,
        decoder_norm: l.norm("decoder.final_layer_norm", d, false)?,
        decoder_bias: Some(bias("decoder", s.layers)?),
        decoder_positions: None,
        lm_head: l.linear(&[(head, s.vocab)], d, Orientation::OutIn, false, Some(l.plan.lm_head))?,
    })
}
