//! One file per architecture. Each turns `config.json` into a [`Spec`] and names the checkpoint's tensors
//! (the Hugging Face → internal name map is written at the top of each file).

pub mod gpt2;
pub mod llama;
pub mod mpt;
pub mod opt;

use super::model::Layer;
use super::safetensors::WeightStore;
use super::spec::{NormKind, Spec};
use super::weights::{Embedding, Layout, Linear, Loader, NormW};
use crate::error::{Error, Result};
use serde_json::Value;

/// What an architecture's loader hands to the generic model (`final_norm` is optional for architectures
/// without one).
pub struct Parts {
    /// Token embedding `[V, D]`, left in the memory map.
    pub embed: Embedding,
    /// Learned positions `[P, D]`, if the architecture has them.
    pub pos_embed: Option<Vec<f32>>,
    /// The blocks.
    pub layers: Vec<Layer>,
    /// The norm before the head.
    pub final_norm: Option<NormW>,
    /// The output head.
    pub lm_head: Linear,
}

/// Every supported `model_type`.
pub fn supported() -> Vec<&'static str> {
    let mut v: Vec<&str> = [llama::MODEL_TYPES, opt::MODEL_TYPES, gpt2::MODEL_TYPES, mpt::MODEL_TYPES].concat();
    v.sort_unstable();
    v
}

/// The spec for a parsed `config.json`.
pub fn spec(config: &Value) -> Result<Spec> {
    let model_type = config
        .get("model_type")
        .and_then(|t| t.as_str())
        .ok_or_else(|| Error::invalid("config", "config.json has no \"model_type\""))?;
    if llama::MODEL_TYPES.contains(&model_type) {
        llama::spec(config, model_type)
    } else if opt::MODEL_TYPES.contains(&model_type) {
        opt::spec(config, model_type)
    } else if gpt2::MODEL_TYPES.contains(&model_type) {
        gpt2::spec(config, model_type)
    } else if mpt::MODEL_TYPES.contains(&model_type) {
        mpt::spec(config, model_type)
    } else {
        Err(Error::unsupported(
            "config",
            format!("model_type {model_type:?} is not supported; supported: {}", supported().join(", ")),
        ))
    }
}

/// The weights of a spec's architecture.
pub fn load(spec: &Spec, loader: &Loader) -> Result<Parts> {
    let t = spec.model_type.as_str();
    let parts = if llama::MODEL_TYPES.contains(&t) {
        llama::load(spec, loader)
    } else if opt::MODEL_TYPES.contains(&t) {
        opt::load(spec, loader)
    } else if gpt2::MODEL_TYPES.contains(&t) {
        gpt2::load(spec, loader)
    } else {
        mpt::load(spec, loader)
    }?;
    debug_assert!(matches!(spec.norm, NormKind::Rms | NormKind::LayerNorm { .. }));
    Ok(parts)
}

/// Builds `n` layers with `f(i)` on up to the kernels' thread count (packing is the slow part of loading).
/// Returns the first error in layer order.
pub(crate) fn par_layers(n: usize, f: impl Fn(usize) -> Result<Layer> + Sync) -> Result<Vec<Layer>> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    let threads = crate::parallel::num_threads().clamp(1, n.max(1));
    let next = AtomicUsize::new(0);
    let slots: Vec<Mutex<Option<Result<Layer>>>> = (0..n).map(|_| Mutex::new(None)).collect();
    let work = || loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= n {
            break;
        }
        let r = f(i);
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

/// The parts around the blocks, shared by every architecture: the token embedding (left in the mmap), learned
/// positions if any, the final norm, and the output head (the embedding itself when tied, else `lm_head.weight`)
/// packed in the plan's head format.
pub(crate) fn finish(
    s: &Spec,
    l: &Loader,
    layers: Vec<Layer>,
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
        lm_head: l.linear(&[(head_name, s.vocab)], d, Layout::OutIn, false, Some(l.plan.lm_head))?,
    })
}

/// The first prefix under which `probe` exists (checkpoints of the base model omit the task prefix).
pub(crate) fn prefix_of(store: &WeightStore, prefixes: &[&'static str], probe: &str) -> Result<&'static str> {
    prefixes.iter().copied().find(|p| store.contains(&format!("{p}{probe}"))).ok_or_else(|| {
        Error::invalid("load", format!("tensor {:?} is missing from the checkpoint", format!("{}{probe}", prefixes[0])))
    })
}
