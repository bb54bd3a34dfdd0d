//! The supported architectures: one row of [`ARCHS`] and one file each. A file turns `config.json` into a
//! [`Spec`] (overriding [`Spec::new`]'s defaults) and names the checkpoint's tensors (the Hugging Face → internal
//! name map is written at its top).

pub mod gpt2;
pub mod llama;
pub mod mpt;
pub mod opt;
pub mod t5;
pub mod whisper;

use super::blocks::DecoderBlock;
use super::checkpoint::{Orientation, WeightStore};
use super::config::{Cfg, Spec};
use super::loader::Loader;
use super::models::seq2seq::Seq2SeqParts;
use super::ops::{Embedding, Linear, NormW};
use crate::error::{Error, Result};
use serde_json::Value;

/// What an architecture's loader hands to the generic model (`final_norm` is optional for architectures
/// without one).
pub struct Parts {
    /// Token embedding `[V, D]`, in its stored precision.
    pub embed: Embedding,
    /// Learned positions `[P, D]`, if the architecture has them.
    pub pos_embed: Option<Vec<f32>>,
    /// The blocks.
    pub layers: Vec<DecoderBlock>,
    /// The norm before the head.
    pub final_norm: Option<NormW>,
    /// The output head.
    pub lm_head: Linear,
}

/// The checkpoint's tensors → the model's parts, by kind of model.
#[derive(Clone, Copy)]
pub enum Build {
    /// A decoder-only model.
    Decoder(fn(&Spec, &Loader) -> Result<Parts>),
    /// An encoder-decoder model.
    Seq2Seq(fn(&Spec, &Loader) -> Result<Seq2SeqParts>),
}

/// One architecture: the `model_type`s it serves, its config reader and its weight loader.
pub struct Arch {
    /// `model_type` values of `config.json` this row serves.
    pub model_types: &'static [&'static str],
    /// `config.json` → [`Spec`] (validated afterwards by [`spec`]).
    pub spec: fn(&Cfg) -> Result<Spec>,
    /// The checkpoint's tensors → the model's parts.
    pub load: Build,
}

/// Every supported architecture.
pub const ARCHS: &[Arch] = &[
    Arch { model_types: &["llama", "mistral", "qwen2"], spec: llama::spec, load: Build::Decoder(llama::load) },
    Arch { model_types: &["opt"], spec: opt::spec, load: Build::Decoder(opt::load) },
    Arch { model_types: &["gpt2"], spec: gpt2::spec, load: Build::Decoder(gpt2::load) },
    Arch { model_types: &["mpt"], spec: mpt::spec, load: Build::Decoder(mpt::load) },
    Arch { model_types: &["t5", "mt5"], spec: t5::spec, load: Build::Seq2Seq(t5::load) },
    Arch { model_types: &["umt5"], spec: t5::umt5_spec, load: Build::Seq2Seq(t5::load) },
    Arch { model_types: &["whisper"], spec: whisper::spec, load: Build::Seq2Seq(whisper::load) },
];

/// The row serving `model_type`.
fn find(model_type: &str) -> Result<&'static Arch> {
    ARCHS.iter().find(|a| a.model_types.contains(&model_type)).ok_or_else(|| {
        Error::unsupported(
            "config",
            format!("model_type {model_type:?} is not supported; supported: {}", supported().join(", ")),
        )
    })
}

/// Every supported `model_type`, sorted.
pub fn supported() -> Vec<&'static str> {
    let mut v: Vec<&str> = ARCHS.iter().flat_map(|a| a.model_types.iter().copied()).collect();
    v.sort_unstable();
    v
}

/// The validated spec for a parsed `config.json`.
pub fn spec(config: &Value) -> Result<Spec> {
    let model_type = config
        .get("model_type")
        .and_then(|t| t.as_str())
        .ok_or_else(|| Error::invalid("config", "config.json has no \"model_type\""))?;
    let spec = (find(model_type)?.spec)(&Cfg { v: config, model_type })?;
    spec.validate()?;
    Ok(spec)
}

/// How a spec's architecture is built (which kind of model it is).
pub fn build_of(spec: &Spec) -> Result<Build> {
    Ok(find(&spec.model_type)?.load)
}

/// The weights of a decoder-only spec's architecture.
pub fn load(spec: &Spec, loader: &Loader) -> Result<Parts> {
    match build_of(spec)? {
        Build::Decoder(f) => f(spec, loader),
        Build::Seq2Seq(_) => Err(Error::unsupported(
            "load",
            format!("{} is an encoder-decoder model: load it as one (sparseinfer.load does)", spec.model_type),
        )),
    }
}

/// The weights of an encoder-decoder spec's architecture.
pub fn load_seq2seq(spec: &Spec, loader: &Loader) -> Result<Seq2SeqParts> {
    match build_of(spec)? {
        Build::Seq2Seq(f) => f(spec, loader),
        Build::Decoder(_) => Err(Error::unsupported(
            "load",
            format!("{} is a decoder-only model, not an encoder-decoder", spec.model_type),
        )),
    }
}

/// Builds `n` layers with `f(i)` on up to the kernels' thread count (packing is the slow part of loading).
/// Returns the first error in layer order.
pub(crate) fn par_layers<T: Send>(n: usize, f: impl Fn(usize) -> Result<T> + Sync) -> Result<Vec<T>> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    let threads = crate::parallel::num_threads().clamp(1, n.max(1));
    let next = AtomicUsize::new(0);
    let slots: Vec<Mutex<Option<Result<T>>>> = (0..n).map(|_| Mutex::new(None)).collect();
    let work = || loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= n {
            break;
        }
        // Each layer thread packs its matrices alone (several are packed at once already).
        let r = if threads > 1 { crate::formats::packing_alone(|| f(i)) } else { f(i) };
        let failed = r.is_err();
        *slots[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
        if failed {
            next.store(n, Ordering::Relaxed); // stop handing out more layers
        }
    };
    std::thread::scope(|scope| {
        for _ in 1..threads {
            scope.spawn(work);
        }
        work();
    });
    let mut layers = Vec::with_capacity(n);
    for slot in slots {
        match slot.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some(Ok(l)) => layers.push(l),
            Some(Err(e)) => return Err(e),
            None => return Err(Error::invalid("load", "a layer was not built (an earlier layer failed)")),
        }
    }
    Ok(layers)
}

/// The parts around the blocks, shared by every architecture: the token embedding (in its stored precision), learned
/// positions if any, the final norm, and the output head (the embedding itself when tied, else `lm_head.weight`)
/// packed in the plan's head format.
pub(crate) fn finish(
    s: &Spec,
    l: &Loader,
    layers: Vec<DecoderBlock>,
    embed_name: &str,
    pos_embed: Option<Vec<f32>>,
    final_norm: &str,
    norm_bias: bool,
) -> Result<Parts> {
    let d = s.hidden;
    let head_name = if s.tie_embeddings { embed_name } else { "lm_head.weight" };
    Ok(Parts {
        embed: l.embedding(embed_name, s.vocab, d)?,
        pos_embed,
        layers,
        final_norm: Some(l.norm(final_norm, d, norm_bias)?),
        lm_head: l.linear(&[(head_name, s.vocab)], d, Orientation::OutIn, false, Some(l.plan.lm_head))?,
    })
}

/// The first prefix under which `probe` exists (checkpoints of the base model omit the task prefix).
pub(crate) fn prefix_of(store: &WeightStore, prefixes: &[&'static str], probe: &str) -> Result<&'static str> {
    prefixes.iter().copied().find(|p| store.contains(&format!("{p}{probe}"))).ok_or_else(|| {
        Error::invalid("load", format!("tensor {:?} is missing from the checkpoint", format!("{}{probe}", prefixes[0])))
    })
}
