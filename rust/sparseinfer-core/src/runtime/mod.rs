//! The decoder runtime: load a model directory, run it, generate.
//!
//! - [`checkpoint`]: the memory-mapped, validating safetensors reader, the declared quantization scheme, and
//!   one decoder per stored weight encoding.
//! - [`config`] and [`arch`]: `config.json` → an architecture-neutral [`config::Spec`]; one table row and one
//!   file per architecture.
//! - [`version`]: the checkpoint format version a directory declares, checked before anything else.
//! - [`plan`]: which kernel format each linear layer is packed into; [`loader`]: checkpoint tensors → packed
//!   linear layers, norms and the embedding, as the plan says.
//! - [`ops`]: linear, norm, rope, relative position bias, activations, attention over a KV view, embedding;
//!   [`blocks`]: the decoder, encoder and cross-attention blocks built from them; [`models`]: the decoder-only
//!   model (prefill, decode one token) and the encoder-decoder.
//! - [`kv_cache`]: per-sequence state; [`sampler`]: next-token choice.
//! - [`Generator`]: prefill once, then one token per call (the binding streams from it); [`Seq2SeqGenerator`]:
//!   the same for an encoder-decoder, which encodes the input first.

pub mod arch;
pub mod blocks;
pub mod checkpoint;
pub mod config;
pub mod files;
pub mod kv_cache;
pub mod loader;
pub mod models;
pub mod ops;
pub mod plan;
pub mod sampler;
pub mod version;

use crate::error::{Error, Result};
use crate::formats::{Format, PackOptions};
pub use kv_cache::KvCache;
pub use models::{Model, Seq2Seq};
pub use sampler::{Sampler, SamplingParams};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// How to load a model directory.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoadOptions {
    /// Pack every linear layer into this format (zeros become the sparsity pattern); `None`: as stored.
    pub weights: Option<Format>,
    /// Group size / symmetry for integer formats.
    pub pack: PackOptions,
    /// Activation mode of every linear layer; `None`: each format's default.
    pub activations: Option<crate::kernels::Activations>,
}

/// Reads `config.json` of a model directory (a regular file inside it, at most [`files::MAX_JSON_BYTES`]).
pub fn read_config(dir: &Path) -> Result<serde_json::Value> {
    read_config_in(&files::ModelDir::new(dir)?)
}

fn read_config_in(dir: &files::ModelDir) -> Result<serde_json::Value> {
    dir.read_json("config.json", files::MAX_JSON_BYTES)?
        .ok_or_else(|| Error::invalid("load", format!("{}: no such file", dir.shown("config.json"))))
}

/// A loaded model of either kind.
pub enum AnyModel {
    /// Decoder-only.
    Decoder(Model),
    /// Encoder-decoder.
    Seq2Seq(Seq2Seq),
}

/// Loads a Hugging Face model directory (`config.json` + `*.safetensors`) of a decoder-only model. The model
/// keeps no reference to the files: what it reads later is copied before this returns.
pub fn load_dir(dir: &Path, opts: LoadOptions) -> Result<Model> {
    match load_any(dir, opts)? {
        AnyModel::Decoder(m) => Ok(m),
        AnyModel::Seq2Seq(m) => Err(Error::unsupported(
            "load",
            format!("{} is an encoder-decoder model: load it as one (sparseinfer.load does)", m.spec.model_type),
        )),
    }
}

/// Loads a model directory of either kind (see [`load_dir`]).
pub fn load_any(dir: &Path, opts: LoadOptions) -> Result<AnyModel> {
    let dir = files::ModelDir::new(dir)?;
    let config = read_config_in(&dir)?;
    version::check(&dir, &config)?;
    let spec = arch::spec(&config)?;
    let quant = checkpoint::QuantScheme::from_config(&config)?;
    let store = checkpoint::WeightStore::open_dir(&dir)?;
    let mut plan = match opts.weights {
        Some(f) => plan::WeightPlan::for_format(f, opts.pack),
        None => plan::WeightPlan::as_stored(store.main_float_dtype(), quant.is_some()),
    };
    // The caller's choice, else what the checkpoint was quantized for.
    let declared = quant.filter(|q| q.token_acts).map(|_| crate::kernels::Activations::Int8Token);
    plan.act = opts.activations.or(declared);
    let loader = loader::Loader { store: &store, plan, quant };
    Ok(match arch::build_of(&spec)? {
        arch::Build::Decoder(_) => AnyModel::Decoder(models::decoder::build(spec, &loader)?),
        arch::Build::Seq2Seq(_) => {
            let parts = arch::load_seq2seq(&spec, &loader)?;
            AnyModel::Seq2Seq(Seq2Seq::from_parts(spec, parts))
        }
    })
}

/// Time and token counts of one generation.
#[derive(Clone, Copy, Debug, Default)]
pub struct GenStats {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Seconds spent on the prompt (including the first token's sampling).
    pub prefill_s: f64,
    /// Tokens produced after the first.
    pub decode_tokens: usize,
    /// Seconds spent producing them.
    pub decode_s: f64,
}

impl GenStats {
    /// Counts a step of `dt` seconds: the prefill (the first), or one decoded token.
    fn record(&mut self, first: bool, dt: f64) {
        if first {
            self.prefill_s = dt;
        } else {
            self.decode_s += dt;
            self.decode_tokens += 1;
        }
    }
}

/// One sequence being generated: the prompt is prefilled by [`Generator::start`], then each
/// [`Generator::next_token`] decodes one step.
pub struct Generator {
    model: Arc<Model>,
    cache: KvCache,
    sampler: Sampler,
    seen: Vec<u32>,
    last: Option<u32>,
    stats: GenStats,
}

impl Generator {
    /// A generator with room for `prompt + max_new_tokens` positions (capped at the model's context).
    pub fn new(model: Arc<Model>, prompt: &[u32], max_new_tokens: usize, params: SamplingParams) -> Result<Generator> {
        const OP: &str = "generate";
        if prompt.is_empty() {
            return Err(Error::invalid(OP, "the prompt is empty (no tokens)"));
        }
        let ctx = model.spec.max_positions;
        if prompt.len() >= ctx {
            return Err(Error::invalid(
                OP,
                format!("the prompt has {} tokens; the model's context is {ctx} positions", prompt.len()),
            ));
        }
        let sampler = Sampler::new(params)?;
        let cache = model.new_cache(prompt.len().saturating_add(max_new_tokens));
        Ok(Generator { model, cache, sampler, seen: prompt.to_vec(), last: None, stats: GenStats::default() })
    }

    /// Positions left before the context (or the requested capacity) is full.
    pub fn remaining(&self) -> usize {
        self.cache.capacity() - self.cache.len()
    }

    /// The next token: the first call prefills the prompt, later ones decode the previous token. Returns
    /// `None` when the context is full.
    pub fn next_token(&mut self) -> Result<Option<u32>> {
        let t0 = Instant::now();
        let mut logits = match self.last {
            None => {
                self.stats.prompt_tokens = self.seen.len();
                self.model.prefill(&mut self.cache, &self.seen, false)?
            }
            Some(t) => {
                if self.remaining() == 0 {
                    return Ok(None);
                }
                self.model.decode_one(&mut self.cache, t)?
            }
        };
        let tok = self.sampler.sample(&mut logits, &self.seen)?;
        self.stats.record(self.last.is_none(), t0.elapsed().as_secs_f64());
        self.seen.push(tok);
        self.last = Some(tok);
        Ok(Some(tok))
    }

    /// Timings so far.
    pub fn stats(&self) -> GenStats {
        self.stats
    }
}

/// One input of an encoder-decoder being translated: the first [`Seq2SeqGenerator::next_token`] encodes the
/// input and decodes the start token; later ones decode the previous token.
pub struct Seq2SeqGenerator {
    model: Arc<Seq2Seq>,
    input: Vec<u32>,
    state: Option<models::seq2seq::Seq2SeqState>,
    sampler: Sampler,
    max_new_tokens: usize,
    seen: Vec<u32>,
    stats: GenStats,
}

impl Seq2SeqGenerator {
    /// A generator of up to `max_new_tokens` decoder tokens for the encoder input `input`.
    pub fn new(model: Arc<Seq2Seq>, input: &[u32], max_new_tokens: usize, params: SamplingParams) -> Result<Self> {
        if input.is_empty() {
            return Err(Error::invalid("generate", "the input is empty (no tokens)"));
        }
        let sampler = Sampler::new(params)?;
        let stats = GenStats::default();
        Ok(Seq2SeqGenerator { model, input: input.to_vec(), state: None, sampler, max_new_tokens, seen: vec![], stats })
    }

    /// The next decoder token, or `None` after `max_new_tokens`.
    pub fn next_token(&mut self) -> Result<Option<u32>> {
        if self.seen.len() >= self.max_new_tokens {
            return Ok(None);
        }
        let t0 = Instant::now();
        let mut logits = match (&mut self.state, self.seen.last()) {
            (Some(st), Some(&t)) => self.model.decode(st, &[t], false)?,
            _ => {
                self.stats.prompt_tokens = self.input.len();
                let enc = self.model.encode(&self.input)?;
                let mut st = self.model.start(&enc, self.max_new_tokens)?;
                let start = self.model.spec.bos.unwrap_or(0);
                let logits = self.model.decode(&mut st, &[start], false)?;
                self.state = Some(st);
                logits
            }
        };
        let tok = self.sampler.sample(&mut logits, &self.seen)?;
        self.stats.record(self.seen.is_empty(), t0.elapsed().as_secs_f64());
        self.seen.push(tok);
        Ok(Some(tok))
    }

    /// Timings so far (`prompt_tokens`: the encoder input; prefill: encoding and the first token).
    pub fn stats(&self) -> GenStats {
        self.stats
    }
}

/// Logits `[n × V]` of every position of `tokens`, from a fresh cache (parity tests use this).
pub fn logits(model: &Model, tokens: &[u32]) -> Result<Vec<f32>> {
    if tokens.is_empty() {
        return Err(Error::invalid("logits", "no tokens"));
    }
    if tokens.len() > model.spec.max_positions {
        return Err(Error::invalid(
            "logits",
            format!("{} tokens exceed the model's context of {} positions", tokens.len(), model.spec.max_positions),
        ));
    }
    let mut cache = model.new_cache(tokens.len());
    model.prefill(&mut cache, tokens, true)
}
