//! The decoder runtime: load a model directory, run it, generate.
//!
//! - [`checkpoint`]: the validating safetensors reader, the declared quantization scheme, and
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
//!   the same for an encoder-decoder, which encodes its [`EncoderSource`] (token ids or a spectrogram) first.

pub mod arch;
pub mod blocks;
pub mod checkpoint;
pub mod config;
pub mod files;
pub mod kv_cache;
pub mod loader;
pub mod models;
pub mod ops;
pub mod pack_cache;
pub mod plan;
pub mod sampler;
pub mod version;

use crate::error::{Error, Result};
use crate::formats::{Format, PackOptions};
pub use kv_cache::{KvCache, KvFormat};
pub use models::{Model, Seq2Seq};
pub use sampler::{Sampler, SamplingParams};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// How to load a model directory.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Pack every linear layer into this format (zeros become the sparsity pattern); `None`: as stored.
    pub weights: Option<Format>,
    /// Group size / symmetry for integer formats.
    pub pack: PackOptions,
    /// Activation mode of every linear layer; `None`: each format's default.
    pub activations: Option<crate::kernels::Activations>,
    /// The load cache of packed layers ([`pack_cache`]); `None`: pack from the checkpoint every time.
    pub cache: Option<pack_cache::CacheOptions>,
    /// How self-attention caches store keys and values; `None`: f16 where the linear layers take int8
    /// activations (whose own rounding is far coarser than a half's), else f32.
    pub kv_cache: Option<kv_cache::KvFormat>,
}

/// How a load went.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    /// Wall-clock seconds from opening the directory to the finished model.
    pub seconds: f64,
    /// What the load cache did.
    pub pack_cache: pack_cache::Outcome,
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
    Decoder(Box<Model>),
    /// Encoder-decoder.
    Seq2Seq(Box<Seq2Seq>),
}

/// Loads a Hugging Face model directory (`config.json` + `*.safetensors`) of a decoder-only model. The model
/// keeps no reference to the files: what it reads later is copied before this returns.
pub fn load_dir(dir: &Path, opts: LoadOptions) -> Result<Model> {
    match load_any(dir, opts)? {
        AnyModel::Decoder(m) => Ok(*m),
        AnyModel::Seq2Seq(m) => Err(Error::unsupported(
            "load",
            format!("{} is an encoder-decoder model: load it as one (sparseinfer.load does)", m.spec.model_type),
        )),
    }
}

/// Loads a model directory of either kind (see [`load_dir`]).
pub fn load_any(dir: &Path, opts: LoadOptions) -> Result<AnyModel> {
    let start = Instant::now();
    if opts.pack.asymmetric && opts.weights.is_none_or(|f| f.elem() != crate::formats::Elem::I4) {
        let asked = opts.weights.map_or("the stored formats", |f| f.name());
        return Err(Error::invalid(
            "load",
            format!("asymmetric applies to the int4 formats (dense-int4, sparse-int4), not {asked}"),
        ));
    }
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
    let build = |cache: Option<&pack_cache::PackCache>| -> Result<AnyModel> {
        let loader = loader::Loader { store: &store, plan, quant, cache };
        Ok(match arch::build_of(&spec)? {
            arch::Build::Decoder(_) => AnyModel::Decoder(Box::new(models::decoder::build(spec.clone(), &loader)?)),
            arch::Build::Seq2Seq(_) => {
                let parts = arch::load_seq2seq(&spec, &loader)?;
                AnyModel::Seq2Seq(Box::new(Seq2Seq::from_parts(spec.clone(), parts)))
            }
        })
    };
    let (mut model, outcome) = match &opts.cache {
        None => (build(None)?, pack_cache::Outcome::Off),
        Some(c) => {
            let key = store
                .identities()
                .map(|files| pack_cache::key(&format!("{plan:?}"), dir.root(), &config, &files))
                .map_err(|e| e.to_string());
            match key.and_then(|key| pack_cache::PackCache::open(c, &key, false).map(|cache| (key, cache))) {
                Err(why) => (build(None)?, pack_cache::Outcome::Failed(why)),
                Ok((key, cache)) => match build(Some(&cache)) {
                    Ok(m) => (m, cache.finish(false)),
                    // A damaged entry: load again from the checkpoint, writing a new one.
                    Err(_) if cache.damaged() => {
                        drop(cache);
                        match pack_cache::PackCache::open(c, &key, true) {
                            Ok(fresh) => {
                                let m = build(Some(&fresh))?;
                                (m, fresh.finish(true))
                            }
                            Err(why) => (build(None)?, pack_cache::Outcome::Failed(why)),
                        }
                    }
                    Err(e) => return Err(e),
                },
            }
        }
    };
    let report = LoadReport { seconds: start.elapsed().as_secs_f64(), pack_cache: outcome };
    match &mut model {
        AnyModel::Decoder(m) => (m.load_report, m.kv_format) = (report, opts.kv_cache.unwrap_or(m.default_kv_format())),
        AnyModel::Seq2Seq(m) => (m.load_report, m.kv_format) = (report, opts.kv_cache.unwrap_or(m.default_kv_format())),
    }
    Ok(model)
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
    /// Bytes of the cross-attention keys and values each decoding step reads (encoder-decoders; 0 otherwise).
    pub cross_kv_bytes: usize,
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

/// What an encoder-decoder generation encodes.
#[derive(Clone, Debug)]
pub enum EncoderSource {
    /// Token ids (T5).
    Tokens(Vec<u32>),
    /// A log-mel spectrogram `[bins × frames]`, channel-major (Whisper).
    Mel {
        /// The values.
        values: Vec<f32>,
        /// Frames (columns).
        frames: usize,
    },
}

impl EncoderSource {
    /// The encoder output `[n × D]` of this input.
    pub fn encode(&self, model: &Seq2Seq) -> Result<Vec<f32>> {
        match self {
            EncoderSource::Tokens(ids) => model.encode(ids),
            EncoderSource::Mel { values, frames } => model.encode_features(values, *frames),
        }
    }
}

/// Tokens a decoder generation never produces (`suppress`), and tokens it does not produce first
/// (`begin_suppress`): Whisper's generation config lists both.
#[derive(Clone, Debug, Default)]
pub struct TokenRules {
    /// Never sampled.
    pub suppress: Vec<u32>,
    /// Not sampled as the first generated token.
    pub begin_suppress: Vec<u32>,
}

/// One input of an encoder-decoder being translated or transcribed. The first call that needs logits encodes
/// the input; the decoder then reads its prompt (the start token, or the caller's prompt), tokens the caller
/// [`force`](Seq2SeqGenerator::force)s, and what it generates, each decoded once into its cache.
pub struct Seq2SeqGenerator {
    model: Arc<Seq2Seq>,
    input: EncoderSource,
    state: Option<models::seq2seq::Seq2SeqState>,
    sampler: Sampler,
    rules: TokenRules,
    max_new_tokens: usize,
    /// Decoder tokens not yet run (the prompt first, then forced and generated ones).
    pending: Vec<u32>,
    generated: Vec<u32>,
    stats: GenStats,
}

impl Seq2SeqGenerator {
    /// A generator of up to `max_new_tokens` decoder tokens for `input`, after the decoder prompt
    /// `decoder_prompt` (empty: the model's start token).
    pub fn new(
        model: Arc<Seq2Seq>,
        input: EncoderSource,
        decoder_prompt: &[u32],
        max_new_tokens: usize,
        params: SamplingParams,
        rules: TokenRules,
    ) -> Result<Self> {
        const OP: &str = "generate";
        match &input {
            EncoderSource::Tokens(t) if t.is_empty() => {
                return Err(Error::invalid(OP, "the input is empty (no tokens)"))
            }
            EncoderSource::Mel { frames: 0, .. } => return Err(Error::invalid(OP, "the spectrogram has no frames")),
            _ => {}
        }
        let vocab = model.spec.vocab;
        for (what, ids) in [
            ("decoder prompt", decoder_prompt),
            ("suppress", &rules.suppress),
            ("begin_suppress", &rules.begin_suppress),
        ] {
            if let Some(t) = ids.iter().find(|&&t| t as usize >= vocab) {
                return Err(Error::invalid(OP, format!("{what} token id {t} is outside the vocabulary of {vocab}")));
            }
        }
        let sampler = Sampler::new(params)?;
        let pending =
            if decoder_prompt.is_empty() { vec![model.spec.bos.unwrap_or(0)] } else { decoder_prompt.to_vec() };
        Ok(Seq2SeqGenerator {
            model,
            input,
            state: None,
            sampler,
            rules,
            max_new_tokens,
            pending,
            generated: vec![],
            stats: GenStats::default(),
        })
    }

    /// Runs the pending decoder tokens (encoding the input first, on the first call) and returns the logits
    /// `[V]` after the last of them; `None` when the decoder's context is full.
    fn step(&mut self) -> Result<Option<Vec<f32>>> {
        let st = match &mut self.state {
            Some(st) => st,
            None => {
                let enc = self.input.encode(&self.model)?;
                self.stats.prompt_tokens = enc.len() / self.model.spec.hidden;
                let st = self.state.insert(self.model.start(&enc, usize::MAX)?);
                self.stats.cross_kv_bytes = st.cross_bytes();
                st
            }
        };
        if st.cache.len() + self.pending.len() > st.cache.capacity() {
            return Ok(None);
        }
        let logits = self.model.decode(st, &self.pending, false)?;
        self.pending.clear();
        Ok(Some(logits))
    }

    /// The next decoder token, or `None` after `max_new_tokens` or at the end of the decoder's context.
    pub fn next_token(&mut self) -> Result<Option<u32>> {
        if self.generated.len() >= self.max_new_tokens {
            return Ok(None);
        }
        let t0 = Instant::now();
        let first = self.state.is_none();
        let Some(mut logits) = self.step()? else { return Ok(None) };
        let mut mask = |ids: &[u32]| ids.iter().for_each(|&t| logits[t as usize] = f32::NEG_INFINITY);
        mask(&self.rules.suppress);
        if self.generated.is_empty() {
            mask(&self.rules.begin_suppress);
        }
        if logits.iter().all(|v| *v == f32::NEG_INFINITY) {
            return Err(Error::invalid("generate", "the suppressed tokens cover the whole vocabulary"));
        }
        let tok = self.sampler.sample(&mut logits, &self.generated)?;
        self.stats.record(first, t0.elapsed().as_secs_f64());
        self.generated.push(tok);
        self.pending.push(tok);
        Ok(Some(tok))
    }

    /// Appends `tokens` to the decoder's input after what it has read or produced so far (Whisper's task
    /// tokens after a detected language). They are not counted as generated.
    pub fn force(&mut self, tokens: &[u32]) -> Result<()> {
        let vocab = self.model.spec.vocab;
        if let Some(t) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::invalid("generate", format!("token id {t} is outside the vocabulary of {vocab}")));
        }
        self.pending.extend_from_slice(tokens);
        Ok(())
    }

    /// The most likely of `candidates` as the next decoder token (Whisper's language detection), which is then
    /// forced. `None` when the decoder's context is full.
    pub fn choose(&mut self, candidates: &[u32]) -> Result<Option<u32>> {
        let vocab = self.model.spec.vocab;
        if candidates.is_empty() {
            return Err(Error::invalid("generate", "no candidate tokens to choose from"));
        }
        if let Some(t) = candidates.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::invalid(
                "generate",
                format!("candidate token id {t} is outside the vocabulary of {vocab}"),
            ));
        }
        let t0 = Instant::now();
        let first = self.state.is_none();
        let Some(logits) = self.step()? else { return Ok(None) };
        // The first maximum, as argmax does.
        let best =
            candidates
                .iter()
                .copied()
                .fold(candidates[0], |b, t| if logits[t as usize] > logits[b as usize] { t } else { b });
        self.stats.record(first, t0.elapsed().as_secs_f64());
        self.pending.push(best);
        Ok(Some(best))
    }

    /// Timings so far (`prompt_tokens`: the encoder's positions; prefill: encoding and the first step).
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
