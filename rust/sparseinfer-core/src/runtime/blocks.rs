//! Transformer blocks built from [`super::ops`]. Each sublayer owns its weights and adds its output to the
//! residual stream `x[k × D]` (pre-norm: `x += f(norm(x))`): [`SelfAttention`], [`CrossAttention`] and
//! [`FeedForward`]. The decoder block is self-attention then the MLP; an encoder block is the same two with
//! self-attention over every position ([`Step::bidirectional`]); the decoder block of an encoder-decoder model
//! ([`CrossBlock`]) adds attention over the encoder's keys and values between the two.
//!
//! Shapes: `k` tokens in flight, `D` hidden, `H`/`G` query/key-value heads of width `hd`, `I` MLP width.

use super::config::{Mlp, Positions, Spec};
use super::kv_cache::KvCache;
use super::ops::activations::mlp_activation;
use super::ops::attention::{self, Heads, Span};
use super::ops::relative::{BiasTable, RelativeBias};
use super::ops::{rope, Linear, NormW};
use crate::error::{Error, Result};

/// A pre-norm decoder block: causal self-attention, then the MLP.
pub struct DecoderBlock {
    /// The self-attention sublayer.
    pub attn: SelfAttention,
    /// The MLP sublayer.
    pub ffn: FeedForward,
}

/// Pre-norm self-attention: `x += o(attend(qkv(norm(x))))`.
pub struct SelfAttention {
    /// Norm before attention.
    pub norm: NormW,
    /// Fused q/k/v projection: `(H + 2G)·hd` rows.
    pub qkv: Linear,
    /// Output projection.
    pub o: Linear,
}

/// Pre-norm MLP: `x += down(act(up(norm(x))))`.
pub struct FeedForward {
    /// Norm before the MLP.
    pub norm: NormW,
    /// Input projection (`2I` rows, gate first, when gated).
    pub up: Linear,
    /// Output projection.
    pub down: Linear,
}

/// Pre-norm attention over another sequence's keys and values (the encoder's, computed once per input):
/// `x += o(attend(q(norm(x)), kv(encoder)))`.
pub struct CrossAttention {
    /// Norm before attention.
    pub norm: NormW,
    /// Query projection: `H·hd` rows.
    pub q: Linear,
    /// Fused key/value projection of the encoder output: `2G·hd` rows.
    pub kv: Linear,
    /// Output projection.
    pub o: Linear,
}

/// The decoder block of an encoder-decoder model: causal self-attention, cross-attention, the MLP.
pub struct CrossBlock {
    /// The self-attention sublayer.
    pub attn: SelfAttention,
    /// Attention over the encoder output.
    pub cross: CrossAttention,
    /// The MLP sublayer.
    pub ffn: FeedForward,
}

/// What every block shares in one step: the spec, and the positions `pos0..pos0 + k` of the new tokens.
pub struct Step<'a> {
    /// The model.
    pub spec: &'a Spec,
    /// Position of the first new token.
    pub pos0: usize,
    /// New tokens.
    pub k: usize,
    /// Rotary cos/sin tables `[k × hd/2]` of these positions, for rotary models.
    pub rope: Option<(Vec<f32>, Vec<f32>)>,
    /// Self-attention sees every position of the step (an encoder), not only the earlier ones. Such a step's
    /// keys and values are read by their own block only, so every block writes layer 0 of a one-layer cache.
    pub bidirectional: bool,
    /// The relative position bias of self-attention, for every distance of this step (and every block, when
    /// each has its own).
    pub rel: Option<BiasTable>,
}

impl<'a> Step<'a> {
    /// The causal step of `k` tokens from position `pos0`.
    pub fn new(spec: &'a Spec, pos0: usize, k: usize) -> Step<'a> {
        let rope = match &spec.positions {
            Positions::Rope { inv_freq } => Some(rope::tables(inv_freq, pos0, k)),
            _ => None,
        };
        Step { spec, pos0, k, rope, bidirectional: false, rel: None }
    }

    /// A step whose self-attention adds the relative position bias of a stack's learned tables
    /// (bidirectional: an encoder over all `k` tokens at once, from position 0).
    pub fn relative(spec: &'a Spec, pos0: usize, k: usize, bias: &RelativeBias, bidirectional: bool) -> Step<'a> {
        let max_distance = match spec.positions {
            Positions::Buckets { max_distance, .. } => max_distance,
            _ => 0,
        };
        let rel = BiasTable::new(bias, spec.heads, bidirectional, max_distance, pos0, k, pos0 + k);
        Step { bidirectional, rel: Some(rel), ..Step::new(spec, pos0, k) }
    }
}

/// Buffers of one step, reused by every block.
pub struct Scratch {
    /// Normed input `[k × D]`.
    h: Vec<f32>,
    /// q/k/v `[k × (H + 2G)·hd]`.
    qkv: Vec<f32>,
    /// Attention output `[k × H·hd]`.
    att: Vec<f32>,
    /// A sublayer's output `[k × D]`.
    proj: Vec<f32>,
    /// MLP input projection `[k × 2I]` (gated) or `[k × I]`.
    up: Vec<f32>,
    /// MLP activation `[k × I]`.
    act: Vec<f32>,
}

impl Scratch {
    /// Buffers for `k` tokens of `s`; an error, not an abort, when the memory is not there (an encoder's `k`
    /// and the widths come from the config).
    pub fn new(s: &Spec, k: usize) -> Result<Scratch> {
        let inner = match s.mlp {
            Mlp::Gated(_) => 2 * s.intermediate,
            Mlp::Plain(_) => s.intermediate,
        };
        let buf = |width: usize| -> Result<Vec<f32>> {
            let n = k.checked_mul(width).ok_or_else(|| Error::invalid("forward", "scratch size overflows"))?;
            let mut v = Vec::new();
            v.try_reserve_exact(n).map_err(|_| {
                Error::invalid("forward", format!("not enough memory for {k} positions x {width} activations"))
            })?;
            v.resize(n, 0.0);
            Ok(v)
        };
        Ok(Scratch {
            h: buf(s.hidden)?,
            qkv: buf(s.qkv_rows())?,
            att: buf(s.heads * s.head_dim)?,
            proj: buf(s.hidden)?,
            up: buf(inner)?,
            act: buf(s.intermediate)?,
        })
    }
}

impl DecoderBlock {
    /// Runs block `layer` on `x[k × D]` in place, writing the new tokens' keys and values into the cache.
    pub fn forward(
        &self,
        step: &Step,
        layer: usize,
        cache: &mut KvCache,
        x: &mut [f32],
        buf: &mut Scratch,
    ) -> Result<()> {
        self.attn.forward(step, layer, cache, x, buf)?;
        self.ffn.forward(step, x, buf)
    }

    /// Bytes of the packed linear layers.
    pub fn linear_bytes(&self) -> usize {
        self.attn.qkv.w.nbytes() + self.attn.o.w.nbytes() + self.ffn.up.w.nbytes() + self.ffn.down.w.nbytes()
    }
}

impl SelfAttention {
    /// Causal self-attention over the cache: `h = norm(x)`; `qkv = h Wqkvᵀ`; clip, rotate q and k; store k and v
    /// at positions `pos0..pos0 + k` of `layer`; `x += attend(q, cache) Woᵀ`.
    pub fn forward(
        &self,
        step: &Step,
        layer: usize,
        cache: &mut KvCache,
        x: &mut [f32],
        buf: &mut Scratch,
    ) -> Result<()> {
        let (s, k, pos0) = (step.spec, step.k, step.pos0);
        let hd = s.head_dim;
        let (q_w, kv_w, rows) = (s.heads * hd, s.kv_heads * hd, s.qkv_rows());
        let slot = if step.bidirectional { 0 } else { layer };
        self.norm.forward(s.norm, s.norm_eps, x, &mut buf.h);
        self.qkv.forward(&buf.h, k, &mut buf.qkv)?;
        for a in 0..k {
            let row = &mut buf.qkv[a * rows..(a + 1) * rows];
            if let Some(c) = s.clip_qkv {
                row.iter_mut().for_each(|v| *v = v.clamp(-c, c));
            }
            if let Some((cos, sin)) = &step.rope {
                let half = hd / 2;
                let (cs, sn) = (&cos[a * half..(a + 1) * half], &sin[a * half..(a + 1) * half]);
                for head in row[..q_w + kv_w].chunks_exact_mut(hd) {
                    rope::rotate(head, cs, sn);
                }
            }
        }
        let bf16 = self.qkv.activations().is_int8();
        let heads = Heads { heads: s.heads, kv_heads: s.kv_heads, head_dim: hd, scale: s.attn_scale(), bf16 };
        let rel = step.rel.as_ref().map(|t| t.view(layer));
        // An encoder's keys and values serve only this call: where the AMX path runs they go from the rows to its
        // tiles without a cache.
        if step.bidirectional && pos0 == 0 && attention::attend_rows(heads, rel, &buf.qkv, rows, k, &mut buf.att) {
            self.o.forward(&buf.att, k, &mut buf.proj)?;
            add_rows(x, &buf.proj, s.hidden);
            return Ok(());
        }
        cache.write_rows(slot, pos0, &buf.qkv[..k * rows], k, rows, q_w)?;
        let alibi = match &s.positions {
            Positions::Alibi { slopes } => Some(slopes.as_slice()),
            _ => None,
        };
        let span = if step.bidirectional {
            Span::All { len: pos0 + k, rel }
        } else {
            Span::Causal { pos0, window: s.sliding_window, alibi, rel }
        };
        attention::attend(heads, span, &buf.qkv, rows, k, cache.layer(slot), &mut buf.att);
        self.o.forward(&buf.att, k, &mut buf.proj)?;
        add_rows(x, &buf.proj, s.hidden);
        Ok(())
    }
}

impl CrossAttention {
    /// The keys and values of the encoder output `enc[n × D]` for decoder layer `layer`, written to positions
    /// `0..n` of `cross` (once per input). `kv` holds `n × 2G·hd` values of scratch, shared by the layers.
    pub fn fill(
        &self,
        s: &Spec,
        layer: usize,
        enc: &[f32],
        n: usize,
        cross: &mut KvCache,
        kv: &mut [f32],
    ) -> Result<()> {
        let kv_w = s.kv_heads * s.head_dim;
        let kv = &mut kv[..n * 2 * kv_w];
        self.kv.forward(enc, n, kv)?;
        cross.write_rows(layer, 0, kv, n, 2 * kv_w, 0)
    }

    /// `x += o(attend(q(norm(x)), cross[layer]))` over every encoder position.
    pub fn forward(&self, step: &Step, layer: usize, cross: &KvCache, x: &mut [f32], buf: &mut Scratch) -> Result<()> {
        let (s, k) = (step.spec, step.k);
        let q_w = s.heads * s.head_dim;
        self.norm.forward(s.norm, s.norm_eps, x, &mut buf.h);
        let q = &mut buf.qkv[..k * q_w];
        self.q.forward(&buf.h, k, q)?;
        let heads =
            Heads { heads: s.heads, kv_heads: s.kv_heads, head_dim: s.head_dim, scale: s.attn_scale(), bf16: false };
        attention::attend(
            heads,
            Span::All { len: cross.len(), rel: None },
            q,
            q_w,
            k,
            cross.layer(layer),
            &mut buf.att,
        );
        self.o.forward(&buf.att, k, &mut buf.proj)?;
        add_rows(x, &buf.proj, s.hidden);
        Ok(())
    }
}

impl CrossBlock {
    /// Runs block `layer` on `x[k × D]` in place: self-attention over `cache` (which gets the new tokens'
    /// keys and values), cross-attention over `cross`, the MLP.
    pub fn forward(
        &self,
        step: &Step,
        layer: usize,
        cache: &mut KvCache,
        cross: &KvCache,
        x: &mut [f32],
        buf: &mut Scratch,
    ) -> Result<()> {
        self.attn.forward(step, layer, cache, x, buf)?;
        self.cross.forward(step, layer, cross, x, buf)?;
        self.ffn.forward(step, x, buf)
    }

    /// Bytes of the packed linear layers.
    pub fn linear_bytes(&self) -> usize {
        let c = &self.cross;
        self.attn.qkv.w.nbytes()
            + self.attn.o.w.nbytes()
            + c.q.w.nbytes()
            + c.kv.w.nbytes()
            + c.o.w.nbytes()
            + self.ffn.up.w.nbytes()
            + self.ffn.down.w.nbytes()
    }
}

impl FeedForward {
    /// `h = norm(x)`; `x += down(act(up(h)))` (gated: `act(gate(h)) · up(h)`).
    pub fn forward(&self, step: &Step, x: &mut [f32], buf: &mut Scratch) -> Result<()> {
        let (s, k) = (step.spec, step.k);
        self.norm.forward(s.norm, s.norm_eps, x, &mut buf.h);
        self.up.forward(&buf.h, k, &mut buf.up)?;
        mlp_activation(s.mlp, s.intermediate, &buf.up, &mut buf.act);
        self.down.forward(&buf.act, k, &mut buf.proj)?;
        add_rows(x, &buf.proj, s.hidden);
        Ok(())
    }
}

/// `x += p` over `[k × d]`, rows split over the thread pool when there are many.
fn add_rows(x: &mut [f32], p: &[f32], d: usize) {
    crate::parallel::for_rows(x, d, |r0, x| {
        x.iter_mut().zip(&p[r0 * d..]).for_each(|(x, p)| *x += p);
    });
}
