//! The generic decoder forward pass over a [`Spec`]: embeddings, pre-norm blocks (attention + MLP), final norm,
//! output head. Prefill runs the `matmul` kernels on chunks of up to [`PREFILL_CHUNK`] tokens; decode runs the
//! same code with one token, which the kernels serve as a `matvec`.
//!
//! Shapes: `k` tokens in flight, `D` hidden, `H`/`G` query/key-value heads of width `hd`, `I` MLP width,
//! `V` vocabulary, `T` positions in the cache.

use super::arch::{self, Parts};
use super::config::{Act, Mlp, NormKind, Positions, Spec};
use super::kv_cache::KvCache;
use super::ops::{Embedding, Linear, NormW};
use crate::error::{Error, Result};
use crate::kernels::vector;
use crate::parallel;

/// Tokens per prefill step: large enough to amortise reading the weights, small enough for the caches.
pub const PREFILL_CHUNK: usize = 32;

/// One transformer block.
pub struct Layer {
    /// Norm before attention.
    pub ln1: NormW,
    /// Fused q/k/v projection: `(H + 2G)·hd` rows.
    pub qkv: Linear,
    /// Attention output projection.
    pub o: Linear,
    /// Norm before the MLP.
    pub ln2: NormW,
    /// MLP input projection (`2I` rows, gate first, when gated).
    pub up: Linear,
    /// MLP output projection.
    pub down: Linear,
}

/// A loaded decoder, immutable and shareable across threads. Sequences live in [`KvCache`]s.
pub struct Model {
    /// The architecture description.
    pub spec: Spec,
    embed: Embedding,
    pos_embed: Option<Vec<f32>>,
    /// The blocks.
    pub layers: Vec<Layer>,
    final_norm: Option<NormW>,
    /// The output head.
    pub lm_head: Linear,
}

impl Model {
    /// Assembles a model from an architecture's parts.
    pub fn from_parts(spec: Spec, parts: Parts) -> Model {
        let Parts { embed, pos_embed, layers, final_norm, lm_head } = parts;
        Model { spec, embed, pos_embed, layers, final_norm, lm_head }
    }

    /// Bytes of every packed linear layer and the head (what one decode step reads), plus the embedding
    /// table as stored (read one row per token).
    pub fn weight_bytes(&self) -> (usize, usize) {
        let linear: usize =
            self.layers.iter().map(|l| l.qkv.w.nbytes() + l.o.w.nbytes() + l.up.w.nbytes() + l.down.w.nbytes()).sum();
        (linear + self.lm_head.w.nbytes(), self.embed.nbytes())
    }

    /// The norm before the output head, if the architecture has one.
    pub fn final_norm(&self) -> Option<&NormW> {
        self.final_norm.as_ref()
    }

    /// A fresh cache for up to `capacity` positions (capped at the model's context).
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        let s = &self.spec;
        KvCache::new(s.layers, s.kv_heads, s.head_dim, capacity.min(s.max_positions))
    }

    /// Runs `tokens` at the cache's next positions and appends them to the cache. Returns logits `[n × V]`
    /// for every token when `all_logits`, else for the last one only.
    pub fn forward(&self, cache: &mut KvCache, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>> {
        const OP: &str = "forward";
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
        let v = self.spec.vocab;
        let want = if all_logits { tokens.len().saturating_mul(v) } else { v };
        let mut logits = Vec::new();
        logits
            .try_reserve_exact(want)
            .map_err(|_| Error::invalid(OP, format!("not enough memory for {} x {v} logits", tokens.len())))?;
        let n_chunks = tokens.len().div_ceil(PREFILL_CHUNK);
        for (c, chunk) in tokens.chunks(PREFILL_CHUNK).enumerate() {
            let last = c + 1 == n_chunks;
            let x = self.blocks(cache, chunk)?;
            if all_logits {
                logits.extend(self.head(&x, chunk.len())?);
            } else if last {
                let d = self.spec.hidden;
                logits = self.head(&x[(chunk.len() - 1) * d..], 1)?;
            }
        }
        Ok(logits)
    }

    /// Embeddings and every block for one chunk; returns the residual stream `x[k × D]`.
    fn blocks(&self, cache: &mut KvCache, tokens: &[u32]) -> Result<Vec<f32>> {
        let s = &self.spec;
        let (k, d, hd) = (tokens.len(), s.hidden, s.head_dim);
        let pos0 = cache.len();
        // x: [k, D]
        let mut x = vec![0.0f32; k * d];
        for (a, &t) in tokens.iter().enumerate() {
            let row = &mut x[a * d..(a + 1) * d];
            self.embed.row(t as usize, row)?;
            if let (Some(pe), Positions::Learned { offset }) = (&self.pos_embed, &s.positions) {
                let p = pos0 + a + offset;
                row.iter_mut().zip(&pe[p * d..(p + 1) * d]).for_each(|(x, e)| *x += e);
            }
        }
        let rope = match &s.positions {
            Positions::Rope { inv_freq } => Some(rope_tables(inv_freq, pos0, k)),
            _ => None,
        };
        let (q_w, kv_w) = (s.heads * hd, s.kv_heads * hd);
        let inner = match s.mlp {
            Mlp::Gated(_) => 2 * s.intermediate,
            Mlp::Plain(_) => s.intermediate,
        };
        let mut h = vec![0.0f32; k * d];
        let mut qkv = vec![0.0f32; k * s.qkv_rows()];
        let mut att = vec![0.0f32; k * q_w];
        let mut proj = vec![0.0f32; k * d];
        let mut up = vec![0.0f32; k * inner];
        let mut act = vec![0.0f32; k * s.intermediate];
        for (li, layer) in self.layers.iter().enumerate() {
            // Attention: h = norm(x); qkv = h Wqkvᵀ; rope; cache; softmax(q kᵀ) v; x += att Woᵀ.
            norm(&layer.ln1, s.norm, s.norm_eps, &x, &mut h);
            layer.qkv.forward(&h, k, &mut qkv)?;
            for a in 0..k {
                let row = &mut qkv[a * s.qkv_rows()..(a + 1) * s.qkv_rows()];
                if let Some(c) = s.clip_qkv {
                    row.iter_mut().for_each(|v| *v = v.clamp(-c, c));
                }
                if let Some((cos, sin)) = &rope {
                    let half = hd / 2;
                    let (cs, sn) = (&cos[a * half..(a + 1) * half], &sin[a * half..(a + 1) * half]);
                    for head in row[..q_w + kv_w].chunks_exact_mut(hd) {
                        apply_rope(head, cs, sn);
                    }
                }
                cache.write(li, pos0 + a, &row[q_w..q_w + kv_w], &row[q_w + kv_w..])?;
            }
            self.attention(cache, li, pos0, k, &qkv, &mut att);
            layer.o.forward(&att, k, &mut proj)?;
            x.iter_mut().zip(&proj).for_each(|(x, p)| *x += p);
            // MLP: h = norm(x); x += down(act(up(h))).
            norm(&layer.ln2, s.norm, s.norm_eps, &x, &mut h);
            layer.up.forward(&h, k, &mut up)?;
            match s.mlp {
                Mlp::Gated(f) => {
                    let i = s.intermediate;
                    for a in 0..k {
                        let (gate, upv) = up[a * 2 * i..(a + 1) * 2 * i].split_at(i);
                        for ((o, g), u) in act[a * i..(a + 1) * i].iter_mut().zip(gate).zip(upv) {
                            *o = activate(f, *g) * u;
                        }
                    }
                }
                Mlp::Plain(f) => act.iter_mut().zip(&up).for_each(|(o, u)| *o = activate(f, *u)),
            }
            layer.down.forward(&act, k, &mut proj)?;
            x.iter_mut().zip(&proj).for_each(|(x, p)| *x += p);
        }
        cache.advance(k);
        Ok(x)
    }

    /// Final norm and output head for `k` rows of the residual stream.
    fn head(&self, x: &[f32], k: usize) -> Result<Vec<f32>> {
        let s = &self.spec;
        let mut h = x[..k * s.hidden].to_vec();
        if let Some(n) = &self.final_norm {
            norm(n, s.norm, s.norm_eps, &x[..k * s.hidden], &mut h);
        }
        let mut logits = vec![0.0f32; k * s.vocab];
        self.lm_head.forward(&h, k, &mut logits)?;
        Ok(logits)
    }

    /// Causal attention of `k` new queries (positions `pos0..pos0+k`) over the cache, one task per
    /// (token, head) pair on the thread pool when the work is large enough.
    fn attention(&self, cache: &KvCache, layer: usize, pos0: usize, k: usize, qkv: &[f32], out: &mut [f32]) {
        let s = &self.spec;
        let (hd, heads) = (s.head_dim, s.heads);
        let group = s.heads / s.kv_heads;
        let rows = s.qkv_rows();
        let out_ptr = SendPtr(out.as_mut_ptr());
        let ops = vector::ops();
        let scale = s.attn_scale();
        let task = |t: usize| {
            let (a, h) = (t / heads, t % heads);
            let pos = pos0 + a;
            let start = s.sliding_window.map_or(0, |w| (pos + 1).saturating_sub(w));
            let q = &qkv[a * rows + h * hd..a * rows + (h + 1) * hd];
            let (keys, values) = cache.head(layer, h / group);
            let mut scores: Vec<f32> =
                (start..=pos).map(|j| (ops.dot)(q, &keys[j * hd..(j + 1) * hd]) * scale).collect();
            if let Positions::Alibi { slopes } = &s.positions {
                let m = slopes[h];
                scores.iter_mut().enumerate().for_each(|(i, v)| *v += m * ((start + i) as f32 - pos as f32));
            }
            let max = scores.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let mut sum = 0.0f32;
            scores.iter_mut().for_each(|v| {
                *v = (*v - max).exp();
                sum += *v;
            });
            let inv = 1.0 / sum;
            // SAFETY: each (token, head) task writes its own hd-wide slice of `out`.
            let o = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(a * heads * hd + h * hd), hd) };
            o.fill(0.0);
            for (i, p) in scores.iter().enumerate() {
                let vrow = &values[(start + i) * hd..(start + i + 1) * hd];
                (ops.axpy)(p * inv, vrow, o);
            }
        };
        let n_tasks = k * heads;
        let work = n_tasks * (pos0 + k) * hd;
        let threads = parallel::num_threads();
        if threads > 1 && work >= 1 << 16 {
            parallel::global().run(n_tasks, threads, &task);
        } else {
            (0..n_tasks).for_each(task);
        }
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}
// SAFETY: used only for disjoint writes from pool tasks while the owner waits.
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

/// Loads a model from a spec and a loader (see [`super::load_dir`]).
pub fn build(spec: Spec, loader: &super::loader::Loader) -> Result<Model> {
    let parts = arch::load(&spec, loader)?;
    Ok(Model::from_parts(spec, parts))
}

/// Applies a norm row by row: `out[k × D]` from `x[k × D]`.
fn norm(w: &NormW, kind: NormKind, eps: f32, x: &[f32], out: &mut [f32]) {
    let d = w.w.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        match kind {
            NormKind::Rms => {
                let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
                let r = 1.0 / (ms + eps).sqrt();
                or.iter_mut().zip(xr).zip(&w.w).for_each(|((o, x), w)| *o = x * r * w);
            }
            NormKind::LayerNorm { .. } => {
                let mean = xr.iter().sum::<f32>() / d as f32;
                let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
                let r = 1.0 / (var + eps).sqrt();
                or.iter_mut().zip(xr).zip(&w.w).for_each(|((o, x), w)| *o = (x - mean) * r * w);
                if let Some(b) = &w.b {
                    or.iter_mut().zip(b).for_each(|(o, b)| *o += b);
                }
            }
        }
    }
}

/// cos/sin tables `[k × hd/2]` for positions `pos0..pos0+k`.
fn rope_tables(inv_freq: &[f32], pos0: usize, k: usize) -> (Vec<f32>, Vec<f32>) {
    let half = inv_freq.len();
    let (mut cos, mut sin) = (vec![0.0; k * half], vec![0.0; k * half]);
    for a in 0..k {
        for (i, f) in inv_freq.iter().enumerate() {
            // Match the reference: the angle is formed in f32, then its cosine and sine are taken.
            let angle = ((pos0 + a) as f32 * f) as f64;
            cos[a * half + i] = angle.cos() as f32;
            sin[a * half + i] = angle.sin() as f32;
        }
    }
    (cos, sin)
}

/// Rotates one head in place, "rotate_half" convention: pairs `(i, i + hd/2)`.
fn apply_rope(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = head.len() / 2;
    let (x1, x2) = head.split_at_mut(half);
    for i in 0..half {
        let (a, b) = (x1[i], x2[i]);
        x1[i] = a * cos[i] - b * sin[i];
        x2[i] = b * cos[i] + a * sin[i];
    }
}

fn activate(f: Act, x: f32) -> f32 {
    match f {
        Act::Silu => x / (1.0 + (-x).exp()),
        Act::Relu => x.max(0.0),
        Act::GeluTanh => 0.5 * x * (1.0 + (0.797_884_6 * (x + 0.044_715 * x * x * x)).tanh()),
        Act::Gelu => 0.5 * x * (1.0 + erf(x as f64 / std::f64::consts::SQRT_2) as f32),
    }
}

/// The error function to ~1e-12 (W. J. Cody's rational approximations are overkill here; this is the
/// classic series / continued-fraction split in f64, accurate far beyond f32).
fn erf(x: f64) -> f64 {
    let ax = x.abs();
    let r = if ax < 2.5 {
        // Maclaurin series: erf(x) = 2/√π Σ (-1)^n x^(2n+1) / (n! (2n+1)).
        let (mut term, mut sum, x2) = (ax, ax, ax * ax);
        let mut n = 0.0;
        while term.abs() > 1e-17 * sum.abs() {
            n += 1.0;
            term *= -x2 / n;
            let add = term / (2.0 * n + 1.0);
            sum += add;
            if add.abs() < 1e-17 {
                break;
            }
        }
        sum * std::f64::consts::FRAC_2_SQRT_PI
    } else {
        // erfc(x) = exp(-x²)/(x√π) · continued fraction; evaluated bottom-up with 60 terms.
        let mut f = 0.0;
        for k in (1..=60).rev() {
            f = (k as f64 / 2.0) / (ax + f);
        }
        1.0 - (-ax * ax).exp() / (std::f64::consts::PI.sqrt() * (ax + f))
    };
    if x < 0.0 {
        -r
    } else {
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_matches_known_values() {
        for (x, want) in [
            (0.0, 0.0),
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (2.0, 0.995_322_265_018_952_7),
            (3.0, 0.999_977_909_503_001_4),
            (-1.0, -0.842_700_792_949_714_9),
        ] {
            assert!((erf(x) - want).abs() < 1e-12, "erf({x}) = {} want {want}", erf(x));
        }
    }

    #[test]
    fn rope_rotates_pairs_half_apart() {
        let mut h = [1.0, 0.0, 0.0, 1.0];
        apply_rope(&mut h, &[0.0, 1.0], &[1.0, 0.0]);
        assert_eq!(h, [0.0, 0.0, 1.0, 1.0]);
    }
}
