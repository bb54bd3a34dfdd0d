//! The decoder-only model: token (and learned position) embeddings, the blocks, the final norm and the head.
//! Prefill ([`Model::prefill`]) runs a prompt in chunks of [`kernels::prefill_rows`] tokens through the kernels'
//! `matmul`; decoding ([`Model::decode_one`]) runs one token, where the kernels serve as a `matvec`.
//!
//! Shapes: `k` tokens in flight, `D` hidden, `V` vocabulary.

use crate::error::{Error, Result};
use crate::kernels;
use crate::runtime::arch::{self, Parts};
use crate::runtime::blocks::{DecoderBlock, Scratch, Step};
use crate::runtime::config::{Positions, Spec};
use crate::runtime::kv_cache::KvCache;
use crate::runtime::loader::Loader;
use crate::runtime::ops::{Embedding, Linear, NormW};

const OP: &str = "forward";

/// A loaded decoder, immutable and shareable across threads. Sequences live in [`KvCache`]s.
pub struct Model {
    /// The architecture description.
    pub spec: Spec,
    embed: Embedding,
    pos_embed: Option<Vec<f32>>,
    /// The blocks.
    pub layers: Vec<DecoderBlock>,
    final_norm: Option<NormW>,
    /// The output head.
    pub lm_head: Linear,
    /// How the load went (set by the loader).
    pub load_report: crate::runtime::LoadReport,
    /// How [`Model::new_cache`] stores keys and values (set by the loader).
    pub kv_format: crate::runtime::KvFormat,
}

/// Loads a model from a spec and a loader (see [`crate::runtime::load_dir`]).
pub fn build(spec: Spec, loader: &Loader) -> Result<Model> {
    let parts = arch::load(&spec, loader)?;
    Ok(Model::from_parts(spec, parts))
}

impl Model {
    /// Assembles a model from an architecture's parts.
    pub fn from_parts(spec: Spec, parts: Parts) -> Model {
        let Parts { embed, pos_embed, layers, final_norm, lm_head } = parts;
        Model {
            spec,
            embed,
            pos_embed,
            layers,
            final_norm,
            lm_head,
            load_report: Default::default(),
            kv_format: Default::default(),
        }
    }

    /// Bytes of every packed linear layer and the head (what one decode step reads), plus the embedding
    /// table as stored (read one row per token).
    pub fn weight_bytes(&self) -> (usize, usize) {
        let linear: usize = self.layers.iter().map(DecoderBlock::linear_bytes).sum();
        (linear + self.lm_head.w.nbytes(), self.embed.nbytes())
    }

    /// The norm before the output head, if the architecture has one.
    pub fn final_norm(&self) -> Option<&NormW> {
        self.final_norm.as_ref()
    }

    /// How a load stores keys and values unless told ([`crate::runtime::KvFormat::default_for`]).
    pub fn default_kv_format(&self) -> crate::runtime::KvFormat {
        crate::runtime::KvFormat::default_for(self.layers.first().is_some_and(|b| b.attn.qkv.activations().is_int8()))
    }

    /// A fresh cache for up to `capacity` positions (capped at the model's context).
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        let s = &self.spec;
        KvCache::with_format(self.kv_format, s.layers, s.kv_heads, s.head_dim, capacity.min(s.max_positions))
    }

    /// Runs a prompt of `tokens` at the cache's next positions, [`kernels::prefill_rows`] at a time, and appends them to
    /// the cache. Returns logits `[n × V]` for every token when `all_logits`, else `[V]` for the last one.
    pub fn prefill(&self, cache: &mut KvCache, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>> {
        self.check(cache, tokens)?;
        let v = self.spec.vocab;
        let want = if all_logits { tokens.len().saturating_mul(v) } else { v };
        let mut logits = Vec::new();
        logits
            .try_reserve_exact(want)
            .map_err(|_| Error::invalid(OP, format!("not enough memory for {} x {v} logits", tokens.len())))?;
        let step = kernels::prefill_rows();
        let n_chunks = tokens.len().div_ceil(step);
        for (c, chunk) in tokens.chunks(step).enumerate() {
            let x = self.step(cache, chunk)?;
            if all_logits {
                logits.extend(self.head(&x, chunk.len())?);
            } else if c + 1 == n_chunks {
                let d = self.spec.hidden;
                logits = self.head(&x[(chunk.len() - 1) * d..], 1)?;
            }
        }
        Ok(logits)
    }

    /// Runs one token at the cache's next position and appends it to the cache. Returns its logits `[V]`.
    pub fn decode_one(&self, cache: &mut KvCache, token: u32) -> Result<Vec<f32>> {
        self.check(cache, &[token])?;
        let x = self.step(cache, &[token])?;
        self.head(&x, 1)
    }

    /// Refuses an empty input, ids outside the vocabulary and more tokens than the cache has room for.
    fn check(&self, cache: &KvCache, tokens: &[u32]) -> Result<()> {
        if tokens.is_empty() {
            return Err(Error::invalid(OP, "no tokens"));
        }
        if let Some(t) = tokens.iter().find(|&&t| t as usize >= self.spec.vocab) {
            return Err(Error::invalid(OP, format!("token id {t} is outside the vocabulary of {}", self.spec.vocab)));
        }
        if cache.len() + tokens.len() > cache.capacity() {
            return Err(Error::invalid(
                OP,
                format!(
                    "{} cached + {} new tokens exceed the context of {} positions",
                    cache.len(),
                    tokens.len(),
                    cache.capacity()
                ),
            ));
        }
        Ok(())
    }

    /// Embeddings and every block for `k` tokens at the cache's next positions; returns the residual stream
    /// `x[k × D]`.
    fn step(&self, cache: &mut KvCache, tokens: &[u32]) -> Result<Vec<f32>> {
        let s = &self.spec;
        let (k, pos0) = (tokens.len(), cache.len());
        let mut x = self.embed(tokens, pos0)?;
        let step = Step::new(s, pos0, k);
        let mut buf = Scratch::new(s, k)?;
        for (li, block) in self.layers.iter().enumerate() {
            block.forward(&step, li, cache, &mut x, &mut buf)?;
        }
        cache.advance(k);
        Ok(x)
    }

    /// `x[k × D]`: token embeddings, plus learned positions from `pos0` when the model has them.
    fn embed(&self, tokens: &[u32], pos0: usize) -> Result<Vec<f32>> {
        let d = self.spec.hidden;
        let mut x = vec![0.0f32; tokens.len() * d];
        for (a, (&t, row)) in tokens.iter().zip(x.chunks_exact_mut(d)).enumerate() {
            self.embed.row(t as usize, row)?;
            if let (Some(pe), Positions::Learned { offset }) = (&self.pos_embed, &self.spec.positions) {
                let p = pos0 + a + offset;
                row.iter_mut().zip(&pe[p * d..(p + 1) * d]).for_each(|(x, e)| *x += e);
            }
        }
        Ok(x)
    }

    /// Final norm and output head for `k` rows of the residual stream: logits `[k × V]`.
    fn head(&self, x: &[f32], k: usize) -> Result<Vec<f32>> {
        let s = &self.spec;
        let mut h = x[..k * s.hidden].to_vec();
        if let Some(n) = &self.final_norm {
            n.forward(s.norm, s.norm_eps, &x[..k * s.hidden], &mut h);
        }
        let mut logits = vec![0.0f32; k * s.vocab];
        self.lm_head.forward(&h, k, &mut logits)?;
        Ok(logits)
    }
}
