//! The encoder-decoder model (T5, Whisper): the encoder runs once over the whole input, token ids
//! ([`Seq2Seq::encode`]) or a log-mel spectrogram through the audio front end ([`Seq2Seq::encode_features`]); each
//! decoder layer's cross-attention keys and values of that output are computed once ([`Seq2Seq::start`]); the
//! decoder then runs like a decoder-only model over its own KV cache ([`Seq2Seq::decode`]), prompt tokens in
//! chunks of [`kernels::prefill_rows`], generated tokens one at a time.
//!
//! Shapes: `n` encoder positions, `k` decoder tokens in flight, `D` hidden, `V` vocabulary, `M` mel bins,
//! `T` spectrogram frames.

use crate::error::{Error, Result};
use crate::kernels;
use crate::runtime::blocks::{CrossBlock, DecoderBlock, Scratch, Step};
use crate::runtime::config::{EncoderInput, Spec};
use crate::runtime::kv_cache::KvCache;
use crate::runtime::ops::activations::{activate_in_place, Act};
use crate::runtime::ops::relative::RelativeBias;
use crate::runtime::ops::{conv, Embedding, Linear, NormW};

const OP: &str = "forward";

/// What an encoder-decoder architecture's loader hands to the model.
pub struct Seq2SeqParts {
    /// Token embedding `[V, D]` of the decoder (and of the encoder, when it reads tokens).
    pub embed: Embedding,
    /// The audio front end, when the encoder reads a spectrogram ([`EncoderInput::Mel`]).
    pub audio: Option<AudioFrontEnd>,
    /// Encoder blocks (bidirectional self-attention, MLP).
    pub encoder: Vec<DecoderBlock>,
    /// The norm after the encoder.
    pub encoder_norm: NormW,
    /// The encoder's relative position bias, when it has one (T5).
    pub encoder_bias: Option<RelativeBias>,
    /// Decoder blocks (causal self-attention, cross-attention, MLP).
    pub decoder: Vec<CrossBlock>,
    /// The norm after the decoder.
    pub decoder_norm: NormW,
    /// The decoder's relative position bias, when it has one (T5).
    pub decoder_bias: Option<RelativeBias>,
    /// The decoder's learned positions `[max_positions × D]`, added to its token embeddings (Whisper).
    pub decoder_positions: Option<Vec<f32>>,
    /// The output head.
    pub lm_head: Linear,
}

/// Whisper's audio front end: `gelu(conv2(gelu(conv1(mel))))`, the second convolution of stride 2, plus
/// the encoder's position table.
pub struct AudioFrontEnd {
    /// `M → D` channels, stride 1 (`D` rows, `3M` columns).
    pub conv1: Linear,
    /// `D → D` channels, stride 2 (`D` rows, `3D` columns).
    pub conv2: Linear,
    /// Encoder positions `[P × D]` (sinusoidal in Whisper).
    pub positions: Vec<f32>,
}

/// A loaded encoder-decoder, immutable and shareable across threads. Inputs live in [`Seq2SeqState`]s.
pub struct Seq2Seq {
    /// The architecture description (`layers`: decoder blocks, `encoder_layers`: encoder blocks).
    pub spec: Spec,
    p: Seq2SeqParts,
    /// How the load went (set by the loader).
    pub load_report: crate::runtime::LoadReport,
    /// How the decoder's self-attention caches store keys and values (set by the loader).
    pub kv_format: crate::runtime::KvFormat,
}

/// One input being decoded: the decoder's self-attention cache and the encoder output's keys and values.
pub struct Seq2SeqState {
    /// Decoder self-attention keys and values.
    pub cache: KvCache,
    cross: KvCache,
}

impl Seq2SeqState {
    /// Encoder positions the decoder attends to.
    pub fn encoder_len(&self) -> usize {
        self.cross.len()
    }

    /// Bytes of the cross-attention keys and values (read by every decoding step).
    pub fn cross_bytes(&self) -> usize {
        self.cross.bytes()
    }
}

impl Seq2Seq {
    /// Assembles a model from an architecture's parts.
    pub fn from_parts(spec: Spec, p: Seq2SeqParts) -> Seq2Seq {
        Seq2Seq { spec, p, load_report: Default::default(), kv_format: Default::default() }
    }

    /// How a load stores the decoder's keys and values unless told ([`crate::runtime::KvFormat::default_for`]).
    pub fn default_kv_format(&self) -> crate::runtime::KvFormat {
        let int8 = self.p.decoder.first().is_some_and(|b| b.attn.qkv.activations().is_int8());
        crate::runtime::KvFormat::default_for(int8)
    }

    /// Bytes of the encoder's packed linear layers and convolutions (read once per input), of the decoder's
    /// and the head (read once per generated token), and of the embedding table as stored.
    pub fn weight_bytes(&self) -> (usize, usize, usize) {
        let conv = self.p.audio.as_ref().map_or(0, |a| a.conv1.w.nbytes() + a.conv2.w.nbytes());
        let enc: usize = conv + self.p.encoder.iter().map(DecoderBlock::linear_bytes).sum::<usize>();
        let dec: usize = self.p.decoder.iter().map(CrossBlock::linear_bytes).sum();
        (enc, dec + self.p.lm_head.w.nbytes(), self.p.embed.nbytes())
    }

    /// Every packed linear layer with its stack (`"encoder"`, `"decoder"`), block and name.
    pub fn linears(&self) -> Vec<(&'static str, usize, &'static str, &Linear)> {
        let mut v = Vec::new();
        for (i, b) in self.p.encoder.iter().enumerate() {
            for (n, l) in [("qkv", &b.attn.qkv), ("o", &b.attn.o), ("up", &b.ffn.up), ("down", &b.ffn.down)] {
                v.push(("encoder", i, n, l));
            }
        }
        for (i, b) in self.p.decoder.iter().enumerate() {
            let c = &b.cross;
            for (n, l) in [
                ("qkv", &b.attn.qkv),
                ("o", &b.attn.o),
                ("cross_q", &c.q),
                ("cross_kv", &c.kv),
                ("cross_o", &c.o),
                ("up", &b.ffn.up),
                ("down", &b.ffn.down),
            ] {
                v.push(("decoder", i, n, l));
            }
        }
        if let Some(a) = &self.p.audio {
            v.push(("encoder", 0, "conv1", &a.conv1));
            v.push(("encoder", 0, "conv2", &a.conv2));
        }
        v
    }

    /// The output head.
    pub fn lm_head(&self) -> &Linear {
        &self.p.lm_head
    }

    /// The encoder output `[n × D]` (after its final norm) of `tokens`.
    pub fn encode(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        if self.p.audio.is_some() {
            return Err(Error::invalid(
                OP,
                format!("{}'s encoder reads a spectrogram, not token ids", self.spec.model_type),
            ));
        }
        self.check_ids(tokens)?;
        let x = self.embed(tokens)?;
        self.run_encoder(x, tokens.len())
    }

    /// The encoder output `[n × D]` of the log-mel spectrogram `mel[M × T]` (channel-major, as Whisper's
    /// feature extractor lays it out), `n = ⌈T / 2⌉`. `T` may be anything up to twice the encoder's positions;
    /// Whisper was trained on exactly that many (30 s, padded).
    pub fn encode_features(&self, mel: &[f32], frames: usize) -> Result<Vec<f32>> {
        let s = &self.spec;
        let (Some(a), EncoderInput::Mel { bins, positions }) = (&self.p.audio, s.encoder_input) else {
            return Err(Error::invalid(OP, format!("{}'s encoder reads token ids, not a spectrogram", s.model_type)));
        };
        if frames == 0 || frames > 2 * positions {
            return Err(Error::invalid(
                OP,
                format!("the spectrogram has {frames} frames; the encoder takes 1 to {} (30 s)", 2 * positions),
            ));
        }
        if frames.checked_mul(bins) != Some(mel.len()) {
            return Err(Error::invalid(
                OP,
                format!("the spectrogram has {} values, not {bins} mel bins x {frames} frames", mel.len()),
            ));
        }
        if let Some(i) = mel.iter().position(|v| !v.is_finite()) {
            return Err(Error::invalid(OP, format!("the spectrogram holds a non-finite value at {i}")));
        }
        let d = s.hidden;
        let mut h = conv::conv1d_channel_major(&a.conv1, mel, bins, frames, 1)?;
        activate_in_place(Act::Gelu, &mut h, d);
        let mut x = conv::conv1d_time_major(&a.conv2, &h, d, frames, 2)?;
        drop(h);
        let n = conv::out_len(frames, 2);
        activate_in_place(Act::Gelu, &mut x, d);
        for (row, pos) in x.chunks_exact_mut(d).zip(a.positions.chunks_exact(d)) {
            row.iter_mut().zip(pos).for_each(|(v, p)| *v += p);
        }
        self.run_encoder(x, n)
    }

    /// The encoder blocks and final norm over the embedded input `x[n × D]`.
    fn run_encoder(&self, mut x: Vec<f32>, n: usize) -> Result<Vec<f32>> {
        let s = &self.spec;
        // One layer, overwritten by every block ([`Step::bidirectional`]).
        let mut cache = KvCache::new(1, s.kv_heads, s.head_dim, n);
        let step = match &self.p.encoder_bias {
            Some(bias) => Step::relative(s, 0, n, bias, true),
            None => Step { bidirectional: true, ..Step::new(s, 0, n) },
        };
        let mut buf = Scratch::new(s, n)?;
        for (li, block) in self.p.encoder.iter().enumerate() {
            block.forward(&step, li, &mut cache, &mut x, &mut buf)?;
        }
        let mut out = vec![0.0f32; x.len()];
        self.p.encoder_norm.forward(s.norm, s.norm_eps, &x, &mut out);
        Ok(out)
    }

    /// The decoding state of the encoder output `enc[n × D]`, with room for `capacity` decoder positions.
    pub fn start(&self, enc: &[f32], capacity: usize) -> Result<Seq2SeqState> {
        let s = &self.spec;
        let d = s.hidden;
        if enc.is_empty() || !enc.len().is_multiple_of(d) {
            return Err(Error::invalid(
                OP,
                format!("the encoder output has {} values, not a multiple of {d}", enc.len()),
            ));
        }
        let n = enc.len() / d;
        // Where the decoder's linears take int8 activations, the cross-attention keys and values are kept as int8
        // too: every decoding step reads all of them, the largest read after the weights.
        let int8 = self.p.decoder.first().is_some_and(|b| b.cross.kv.activations().is_int8());
        let mut cross = if int8 {
            KvCache::new_int8(s.layers, s.kv_heads, s.head_dim, n)
        } else {
            KvCache::new(s.layers, s.kv_heads, s.head_dim, n)
        };
        // One buffer for every layer's keys and values before they are stored: a fresh one per layer was mapped
        // and faulted in each time (megabytes for 30 s of audio).
        let kv_len = n
            .checked_mul(2 * s.kv_heads * s.head_dim)
            .ok_or_else(|| Error::invalid(OP, "the cross-attention keys and values overflow"))?;
        let mut kv = Vec::new();
        kv.try_reserve_exact(kv_len)
            .map_err(|_| Error::invalid(OP, format!("not enough memory for {n} encoder positions' keys and values")))?;
        kv.resize(kv_len, 0.0);
        for (li, block) in self.p.decoder.iter().enumerate() {
            block.cross.fill(s, li, enc, n, &mut cross, &mut kv)?;
        }
        cross.advance(n);
        let cache =
            KvCache::with_format(self.kv_format, s.layers, s.kv_heads, s.head_dim, capacity.min(s.max_positions));
        Ok(Seq2SeqState { cache, cross })
    }

    /// Runs decoder `tokens` at the state's next positions ([`kernels::prefill_rows`] at a time) and appends them to
    /// its cache. Returns logits `[k × V]` for every token when `all_logits`, else `[V]` for the last one.
    pub fn decode(&self, st: &mut Seq2SeqState, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>> {
        let s = &self.spec;
        self.check_ids(tokens)?;
        if st.cache.len() + tokens.len() > st.cache.capacity() {
            return Err(Error::invalid(
                OP,
                format!(
                    "{} cached + {} new tokens exceed the capacity of {} positions",
                    st.cache.len(),
                    tokens.len(),
                    st.cache.capacity()
                ),
            ));
        }
        let (v, d) = (s.vocab, s.hidden);
        let mut logits = Vec::new();
        let want = if all_logits { tokens.len().saturating_mul(v) } else { v };
        logits
            .try_reserve_exact(want)
            .map_err(|_| Error::invalid(OP, format!("not enough memory for {} x {v} logits", tokens.len())))?;
        let step = kernels::prefill_rows();
        let n_chunks = tokens.len().div_ceil(step);
        for (c, chunk) in tokens.chunks(step).enumerate() {
            let k = chunk.len();
            let pos0 = st.cache.len();
            let mut x = self.embed(chunk)?;
            if let Some(table) = &self.p.decoder_positions {
                // Positions below the cache's capacity, which `start` caps at the table's rows.
                let rows = table.get(pos0 * d..(pos0 + k) * d).ok_or_else(|| {
                    Error::invalid(OP, format!("position {} is past the model's {}", pos0 + k, s.max_positions))
                })?;
                x.iter_mut().zip(rows).for_each(|(v, p)| *v += p);
            }
            let step = match &self.p.decoder_bias {
                Some(bias) => Step::relative(s, pos0, k, bias, false),
                None => Step::new(s, pos0, k),
            };
            let mut buf = Scratch::new(s, k)?;
            for (li, block) in self.p.decoder.iter().enumerate() {
                block.forward(&step, li, &mut st.cache, &st.cross, &mut x, &mut buf)?;
            }
            st.cache.advance(k);
            if all_logits {
                logits.extend(self.head(&x, k)?);
            } else if c + 1 == n_chunks {
                logits = self.head(&x[(k - 1) * d..], 1)?;
            }
        }
        Ok(logits)
    }

    fn check_ids(&self, tokens: &[u32]) -> Result<()> {
        if tokens.is_empty() {
            return Err(Error::invalid(OP, "no tokens"));
        }
        if let Some(t) = tokens.iter().find(|&&t| t as usize >= self.spec.vocab) {
            return Err(Error::invalid(OP, format!("token id {t} is outside the vocabulary of {}", self.spec.vocab)));
        }
        Ok(())
    }

    fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let d = self.spec.hidden;
        let mut x = vec![0.0f32; tokens.len() * d];
        for (&t, row) in tokens.iter().zip(x.chunks_exact_mut(d)) {
            self.p.embed.row(t as usize, row)?;
        }
        Ok(x)
    }

    /// Final norm, output scaling and head for `k` rows: logits `[k × V]`.
    fn head(&self, x: &[f32], k: usize) -> Result<Vec<f32>> {
        let s = &self.spec;
        let mut h = vec![0.0f32; k * s.hidden];
        self.p.decoder_norm.forward(s.norm, s.norm_eps, &x[..k * s.hidden], &mut h);
        if s.output_scale != 1.0 {
            h.iter_mut().for_each(|v| *v *= s.output_scale);
        }
        let mut logits = vec![0.0f32; k * s.vocab];
        self.p.lm_head.forward(&h, k, &mut logits)?;
        Ok(logits)
    }
}
