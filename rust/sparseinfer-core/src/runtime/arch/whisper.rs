//! Whisper (Radford et al., arXiv 2212.04356): an encoder-decoder over a log-mel spectrogram. The audio front
//! end is two width-3 convolutions with GELU (the second of stride 2: 3000 frames of 10 ms become 1500
//! positions), plus a sinusoidal position table; then pre-norm blocks with biased LayerNorm, attention scaled
//! by `1/sqrt(head_dim)` whose key projection has no bias, and a plain GELU MLP. The decoder adds learned
//! positions to its token embeddings; the head is tied to them. `scale_embedding` is read by transformers'
//! Whisper but never applied, so it is ignored here too.
//!
//! Hugging Face names → ours (prefix `model.`, absent in a bare `WhisperModel`): `encoder.conv{1,2}` →
//! the front end's convolutions; `encoder.embed_positions` → its position table (computed when absent);
//! `{encoder,decoder}.layers.i.self_attn_layer_norm` → attn.norm; `self_attn.{q,k,v}_proj` → attn.qkv
//! (`k_proj` without bias); `self_attn.out_proj` → attn.o; decoder `encoder_attn_layer_norm` → cross.norm,
//! `encoder_attn.q_proj` → cross.q, `encoder_attn.{k,v}_proj` → cross.kv, `encoder_attn.out_proj` → cross.o;
//! `final_layer_norm` → ffn.norm, `fc1` → ffn.up, `fc2` → ffn.down; `{encoder,decoder}.layer_norm` → the
//! final norms; `decoder.embed_tokens` → embedding; `decoder.embed_positions` → decoder positions;
//! `proj_out` (top level, or the embedding when tied and absent) → head.

use super::{par_layers, prefix_of};
use crate::error::{Error, Result};
use crate::runtime::blocks::{CrossAttention, CrossBlock, DecoderBlock, FeedForward, SelfAttention};
use crate::runtime::checkpoint::{out_of_memory, Orientation};
use crate::runtime::config::{limits, Act, Cfg, EncoderInput, Mlp, NormKind, Positions, Sizes, Spec};
use crate::runtime::loader::Loader;
use crate::runtime::models::seq2seq::{AudioFrontEnd, Seq2SeqParts};
use crate::runtime::ops::conv;

/// The spec from `config.json`. The runtime shares one head count and MLP width between the stacks, as every
/// released Whisper does; configs that differ are refused.
pub fn spec(c: &Cfg) -> Result<Spec> {
    let hidden = c.size("d_model", limits::HIDDEN)?;
    let heads = c.size("decoder_attention_heads", limits::HEADS)?;
    let intermediate = c.size("decoder_ffn_dim", limits::INTERMEDIATE)?;
    for (key, want, max) in
        [("encoder_attention_heads", heads, limits::HEADS), ("encoder_ffn_dim", intermediate, limits::INTERMEDIATE)]
    {
        let got = c.opt_size(key, max)?.unwrap_or(want);
        if got != want {
            return Err(Error::unsupported(
                "config",
                format!("whisper: {key} {got} differs from the decoder's {want} (not supported)"),
            ));
        }
    }
    if !hidden.is_multiple_of(heads.max(1)) {
        return Err(Error::invalid("config", format!("whisper: d_model {hidden} is not a multiple of {heads} heads")));
    }
    let sizes = Sizes {
        hidden,
        layers: c.size("decoder_layers", limits::LAYERS)?,
        heads,
        intermediate,
        vocab: c.size("vocab_size", limits::VOCAB)?,
        max_positions: c.opt_size("max_target_positions", limits::POSITIONS)?.unwrap_or(448),
    };
    let bins = c.opt_size("num_mel_bins", limits::MEL_BINS)?.unwrap_or(80);
    let positions = c.opt_size("max_source_positions", limits::SOURCE_POSITIONS)?.unwrap_or(1500);
    Ok(Spec {
        encoder_layers: c.size("encoder_layers", limits::LAYERS)?,
        encoder_input: EncoderInput::Mel { bins, positions },
        norm: NormKind::LayerNorm { bias: true },
        positions: Positions::Learned { offset: 0 },
        mlp: Mlp::Plain(Act::parse(c.opt_str("activation_function").unwrap_or("gelu"))?),
        bos: c.token_ids("decoder_start_token_id").first().copied().or(Some(50258)),
        ..Spec::new(c, sizes)?
    })
}

/// The weights, per the name map in the module docs.
pub fn load(s: &Spec, l: &Loader) -> Result<Seq2SeqParts> {
    let p = prefix_of(l.store, &["model.", ""], "decoder.embed_tokens.weight")?;
    let (d, f) = (s.hidden, s.intermediate);
    let EncoderInput::Mel { bins, positions } = s.encoder_input else {
        unreachable!("whisper::spec sets a mel encoder input")
    };
    let ln = |n: &str| l.norm(n, d, true);
    let o = Orientation::OutIn;
    // q, k, v with biases on q and v only.
    let attn = |n: &dyn Fn(&str) -> String, a: &str| -> Result<SelfAttention> {
        let (q, k, v) =
            (n(&format!("{a}.q_proj.weight")), n(&format!("{a}.k_proj.weight")), n(&format!("{a}.v_proj.weight")));
        Ok(SelfAttention {
            norm: ln(&n(&format!("{a}_layer_norm")))?,
            qkv: l.proj_biases(&[(&q, d), (&k, d), (&v, d)], &[true, false, true], d, o)?,
            o: l.proj(&[(&n(&format!("{a}.out_proj.weight")), d)], d, o, true)?,
        })
    };
    let ffn = |n: &dyn Fn(&str) -> String| -> Result<FeedForward> {
        Ok(FeedForward {
            norm: ln(&n("final_layer_norm"))?,
            up: l.proj(&[(&n("fc1.weight"), f)], d, o, true)?,
            down: l.proj(&[(&n("fc2.weight"), d)], f, o, true)?,
        })
    };
    let encoder = par_layers(s.encoder_layers, |i| {
        let n = |x: &str| format!("{p}encoder.layers.{i}.{x}");
        Ok(DecoderBlock { attn: attn(&n, "self_attn")?, ffn: ffn(&n)? })
    })?;
    let decoder = par_layers(s.layers, |i| {
        let n = |x: &str| format!("{p}decoder.layers.{i}.{x}");
        let (k, v) = (n("encoder_attn.k_proj.weight"), n("encoder_attn.v_proj.weight"));
        Ok(CrossBlock {
            attn: attn(&n, "self_attn")?,
            cross: CrossAttention {
                norm: ln(&n("encoder_attn_layer_norm"))?,
                q: l.proj(&[(&n("encoder_attn.q_proj.weight"), d)], d, o, true)?,
                kv: l.proj_biases(&[(&k, d), (&v, d)], &[false, true], d, o)?,
                o: l.proj(&[(&n("encoder_attn.out_proj.weight"), d)], d, o, true)?,
            },
            ffn: ffn(&n)?,
        })
    })?;
    let enc_pos = format!("{p}encoder.embed_positions.weight");
    let audio = AudioFrontEnd {
        conv1: l.conv1d(&format!("{p}encoder.conv1"), d, bins, conv::WIDTH)?,
        conv2: l.conv1d(&format!("{p}encoder.conv2"), d, d, conv::WIDTH)?,
        positions: if l.store.contains(&enc_pos) {
            l.f32(&enc_pos, &[positions, d])?
        } else {
            sinusoids(positions, d)?
        },
    };
    let embed = format!("{p}decoder.embed_tokens.weight");
    let head = if !s.tie_embeddings || l.store.contains("proj_out.weight") { "proj_out.weight" } else { &embed };
    Ok(Seq2SeqParts {
        embed: l.embedding(&embed, s.vocab, d)?,
        audio: Some(audio),
        encoder,
        encoder_norm: ln(&format!("{p}encoder.layer_norm"))?,
        encoder_bias: None,
        decoder,
        decoder_norm: ln(&format!("{p}decoder.layer_norm"))?,
        decoder_bias: None,
        decoder_positions: Some(l.f32(&format!("{p}decoder.embed_positions.weight"), &[s.max_positions, d])?),
        lm_head: l.linear(&[(head, s.vocab)], d, o, false, Some(l.plan.lm_head))?,
    })
}

/// Whisper's sinusoidal table `[length × channels]`: row `t` is `sin(t·f_i)` for the first half of the
/// channels and `cos(t·f_i)` for the second, `f_i = 10000^(-i / (channels/2 - 1))`.
pub fn sinusoids(length: usize, channels: usize) -> Result<Vec<f32>> {
    let half = channels / 2;
    if !channels.is_multiple_of(2) || half < 2 {
        return Err(Error::invalid(
            "load",
            format!("whisper: sinusoidal positions need an even d_model >= 4, got {channels}"),
        ));
    }
    let n = length.checked_mul(channels).ok_or_else(|| out_of_memory("encoder positions", usize::MAX))?;
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| out_of_memory("encoder positions", n))?;
    let step = (10000f64).ln() / (half - 1) as f64;
    for t in 0..length {
        let angles = (0..half).map(|i| t as f64 * (-step * i as f64).exp());
        let angles: Vec<f64> = angles.collect();
        v.extend(angles.iter().map(|a| a.sin() as f32));
        v.extend(angles.iter().map(|a| a.cos() as f32));
    }
    Ok(v)
}
