//! Scaled dot-product attention (Vaswani et al., arXiv 1706.03762) of new queries over a view of keys and
//! values, with grouped-query heads (Ainslie et al., arXiv 2305.13245). The [`Span`] says which positions a
//! query sees: causal self-attention over a KV cache (with an optional sliding window and ALiBi biases, Press et
//! al., arXiv 2108.12409), or every position, as encoder self-attention and cross-attention need.

use crate::kernels::vector::{self, F16, MAX_QUERIES, PANEL};
use crate::parallel;

/// The heads of one attention layer.
#[derive(Clone, Copy, Debug)]
pub struct Heads {
    /// Query heads `H`.
    pub heads: usize,
    /// Key/value heads `G`; query head `h` reads key/value head `h / (H / G)`.
    pub kv_heads: usize,
    /// Width of one head `hd`.
    pub head_dim: usize,
    /// Score scale.
    pub scale: f32,
    /// Whether an encoder's attention ([`attend_rows`]) may run in bf16 where the CPU has AMX-BF16 (queries,
    /// keys, probabilities and values rounded to bf16, products and sums in f32): set for layers whose linears
    /// take int8 activations, whose own rounding is of the same order. [`attend`] ignores it.
    pub bf16: bool,
}

/// Keys and values of one layer, per key/value head (`[g]`): keys in panels ([`vector::key_panels`]: each run of
/// [`PANEL`] positions dimension-major, as the cache writes them), so the score kernels read them sequentially
/// with no horizontal sums; values position-major (`hd` per position). In f32 or f16, or as int8 codes with one
/// scale per position.
#[derive(Clone, Copy)]
pub enum KvView<'a> {
    /// f32 keys and values.
    F32 {
        /// Key panels.
        keys: &'a [Vec<f32>],
        /// Values.
        values: &'a [Vec<f32>],
    },
    /// f16 keys and values.
    F16 {
        /// Key panels.
        keys: &'a [Vec<F16>],
        /// Values.
        values: &'a [Vec<F16>],
    },
    /// Int8 codes: position `j`'s key is `key_scales[g][j] · code`, its value likewise.
    I8 {
        /// Key code panels.
        keys: &'a [Vec<i8>],
        /// One scale per position.
        key_scales: &'a [Vec<f32>],
        /// Value codes.
        values: &'a [Vec<i8>],
        /// One scale per position.
        value_scales: &'a [Vec<f32>],
    },
}

/// An additive score bias that depends on the head and the distance `key position - query position` (T5's
/// relative position bias, [`super::relative`]): `values[h · width + zero + j - i]`.
#[derive(Clone, Copy, Debug)]
pub struct RelBias<'a> {
    /// Head-major biases, `width` distances per head.
    pub values: &'a [f32],
    /// Distances per head.
    pub width: usize,
    /// Index of distance 0.
    pub zero: usize,
}

/// Which positions of the view each query sees.
#[derive(Clone, Copy, Debug)]
pub enum Span<'a> {
    /// Query `a` sits at position `pos0 + a` and sees positions up to its own (the last `window` of them, when
    /// set); `alibi` adds `slope_h · (j - i)` to the score of query position `i` at key position `j`.
    Causal {
        /// Position of the first query.
        pos0: usize,
        /// Sliding window (Mistral).
        window: Option<usize>,
        /// One ALiBi slope per query head.
        alibi: Option<&'a [f32]>,
        /// A relative position bias.
        rel: Option<RelBias<'a>>,
    },
    /// Every query sees positions `0..len` (encoder self-attention, cross-attention); query `a` sits at position
    /// `a` (for `rel`).
    All {
        /// Positions in the view.
        len: usize,
        /// A relative position bias.
        rel: Option<RelBias<'a>>,
    },
}

/// Query heads that share a key/value head and go through the block kernels together: the largest divisor of
/// the group size up to [`MAX_QUERIES`], so each key or value load of a decoding step feeds every query head
/// that reads it.
fn heads_per_block(group: usize) -> usize {
    (1..=group.min(MAX_QUERIES)).rev().find(|d| group.is_multiple_of(*d)).unwrap_or(1)
}

/// Query `a`'s keys `start..end` under `span`, its ALiBi slope (for head `h`), relative bias and position.
fn key_range(span: Span, a: usize, h: usize) -> (usize, usize, Option<f32>, Option<RelBias>, usize) {
    match span {
        Span::Causal { pos0, window, alibi, rel } => {
            let pos = pos0 + a;
            (window.map_or(0, |w| (pos + 1).saturating_sub(w)), pos + 1, alibi.map(|s| s[h]), rel, pos)
        }
        Span::All { len, rel } => (0, len, None, rel, a),
    }
}

/// Adds the position biases of query `a`, head `h` to its scores over its own keys `own` (from its first).
fn add_bias(span: Span, a: usize, h: usize, own: &mut [f32]) {
    let (start, _, alibi, rel, pos) = key_range(span, a, h);
    if let Some(m) = alibi {
        own.iter_mut().enumerate().for_each(|(i, v)| *v += m * ((start + i) as f32 - pos as f32));
    }
    if let Some(RelBias { values, width, zero }) = rel {
        // Distance `start - pos` sits at `zero + start - pos` (>= 0 by the table's construction).
        let row = &values[h * width + zero + start - pos..];
        own.iter_mut().zip(row).for_each(|(v, b)| *v += b);
    }
}

/// `out[k × H·hd]`: the attention of `k` queries, query `a` of head `h` at `q[a · q_stride + h · hd..]`, over
/// `kv`. Each task takes up to [`MAX_QUERIES`] (query, head) pairs that read one key/value head: the query heads
/// of a group ([`heads_per_block`]) times as many queries as fit. Scores come from the block kernels
/// ([`crate::kernels::vector::VectorOps::scores`]) over the union of the pairs' key ranges, from a panel's start;
/// each pair's softmax covers its own range only. Tasks run on the thread pool when the work is large enough.
pub fn attend(heads: Heads, span: Span, q: &[f32], q_stride: usize, k: usize, kv: KvView, out: &mut [f32]) {
    let Heads { heads: n_heads, kv_heads, head_dim: hd, scale, .. } = heads;
    assert!(kv_heads > 0 && n_heads.is_multiple_of(kv_heads), "{n_heads} heads over {kv_heads} key/value heads");
    assert!(k.checked_mul(n_heads * hd).is_some_and(|n| out.len() >= n), "attention output too short");
    let group = n_heads / kv_heads;
    let out_ptr = SendPtr(out.as_mut_ptr());
    let ops = vector::ops();
    let n = match span {
        Span::Causal { pos0, .. } => pos0 + k,
        Span::All { len, .. } => len,
    };
    let range = |a: usize, h: usize| key_range(span, a, h);
    let bias = |a: usize, h: usize, own: &mut [f32]| add_bias(span, a, h, own);
    // Scores (already scaled) of query `a`, head `h`, over `from..from + scores.len()` → probabilities in
    // place, 0 outside the query's own keys; returns 1 / their sum.
    let softmax = |a: usize, h: usize, from: usize, scores: &mut [f32]| -> f32 {
        let (start, end, ..) = range(a, h);
        let (lo, hi) = (start - from, end - from);
        let own = &mut scores[lo..hi];
        bias(a, h, own);
        let sum = (ops.exp_shifted)(own);
        scores[..lo].fill(0.0);
        scores[hi..].fill(0.0);
        // No keys at all (an empty window) attends to nothing.
        if sum > 0.0 {
            1.0 / sum
        } else {
            0.0
        }
    };
    // SAFETY: each task writes the hd-wide slices of its own (query, head) pairs of `out`.
    let out_of = |a: usize, h: usize| unsafe {
        std::slice::from_raw_parts_mut(out_ptr.get().add(a * n_heads * hd + h * hd), hd)
    };
    let hb = heads_per_block(group);
    let qb = (MAX_QUERIES / hb).max(1);
    let head_blocks = n_heads / hb;
    let task = |t: usize| {
        let (a0, h0) = ((t / head_blocks) * qb, (t % head_blocks) * hb);
        let a1 = (a0 + qb).min(k);
        // Row r of the block is the pair (a0 + r / hb, h0 + r % hb).
        let m = (a1 - a0) * hb;
        let pair = |r: usize| (a0 + r / hb, h0 + r % hb);
        let g = h0 / group;
        // The union of the pairs' key ranges (causal ranges grow with the query), from a panel's start.
        let (first, to) = (range(a0, h0).0, range(a1 - 1, h0).1);
        let from = first / PANEL * PANEL;
        let l = to - from;
        if l == 0 {
            (0..m).for_each(|r| out_of(pair(r).0, pair(r).1).fill(0.0));
            return;
        }
        SCRATCH.with_borrow_mut(|b| {
            let Scratch { qf, scores, o, .. } = b;
            let (qs, scores, o) = (sized(qf, m * hd), sized(scores, m * l), sized(o, m * hd));
            for (r, qa) in qs.chunks_exact_mut(hd).enumerate() {
                let (a, h) = pair(r);
                let src = &q[a * q_stride + h * hd..a * q_stride + (h + 1) * hd];
                qa.iter_mut().zip(src).for_each(|(d, s)| *d = s * scale);
            }
            // Each of the `m` rows of `scores` times per-position scales.
            let rescale = |scores: &mut [f32], scales: &[f32]| {
                for row in scores.chunks_exact_mut(l) {
                    row.iter_mut().zip(&scales[from..to]).for_each(|(x, s)| *x *= s);
                }
            };
            match kv {
                KvView::F32 { keys, .. } => (ops.scores)(qs, m, &keys[g], from..to, scores),
                KvView::F16 { keys, .. } => (ops.scores_f16)(qs, m, &keys[g], from..to, scores),
                KvView::I8 { keys, key_scales, .. } => {
                    (ops.scores_i8)(qs, m, &keys[g], from..to, scores);
                    rescale(scores, &key_scales[g]);
                }
            }
            let mut inv = [0.0f32; MAX_QUERIES];
            for (r, s) in scores.chunks_exact_mut(l).enumerate() {
                let (a, h) = pair(r);
                inv[r] = softmax(a, h, from, s);
            }
            match kv {
                KvView::F32 { values, .. } => (ops.weighted)(scores, m, &values[g], hd, from, o),
                KvView::F16 { values, .. } => (ops.weighted_f16)(scores, m, &values[g], hd, from, o),
                KvView::I8 { values, value_scales, .. } => {
                    rescale(scores, &value_scales[g]);
                    (ops.weighted_i8)(scores, m, &values[g], hd, from, o);
                }
            }
            for (r, oa) in o.chunks_exact(hd).enumerate() {
                let (a, h) = pair(r);
                out_of(a, h).iter_mut().zip(oa.iter()).for_each(|(o, v)| *o = v * inv[r]);
            }
        });
    };
    let n_tasks = k.div_ceil(qb) * head_blocks;
    let work = k * n_heads * n * hd;
    let threads = parallel::num_threads();
    if threads > 1 && work >= 1 << 16 {
        parallel::global().run(n_tasks, threads, &task);
    } else {
        (0..n_tasks).for_each(task);
    }
}

/// Bidirectional attention (an encoder's) of `k` positions over themselves, read from the rows that hold their
/// queries, keys and values (`qkv[p · stride..]`: `H·hd` query values, `G·hd` keys, `G·hd` values), without a
/// cache: where the bf16 AMX path runs ([`Heads::bf16`]), its tiles are built from these rows directly. Returns
/// whether it ran; where it did not, nothing was written, and the caller caches the keys and values and calls
/// [`attend`].
pub fn attend_rows(heads: Heads, rel: Option<RelBias>, qkv: &[f32], stride: usize, k: usize, out: &mut [f32]) -> bool {
    let Heads { heads: n_heads, kv_heads, head_dim: hd, scale, bf16 } = heads;
    assert!(kv_heads > 0 && n_heads.is_multiple_of(kv_heads), "{n_heads} heads over {kv_heads} key/value heads");
    assert!(k.checked_mul(n_heads * hd).is_some_and(|n| out.len() >= n), "attention output too short");
    let (q_w, kv_w) = (n_heads * hd, kv_heads * hd);
    assert!(q_w + 2 * kv_w <= stride && (k == 0 || qkv.len() >= (k - 1) * stride + q_w + 2 * kv_w));
    #[cfg(target_arch = "x86_64")]
    if bf16 && k >= AMX_TILE_ROWS && hd.is_multiple_of(32) && amx_bf16() {
        use crate::kernels::amx;
        let span = Span::All { len: k, rel };
        let ctx = Bf16Attention { n_heads, group: n_heads / kv_heads, hd, scale, n: k, q: qkv, q_stride: stride, k };
        let tiles = |g: usize| {
            let keys = &qkv[q_w + g * hd..];
            let values = &qkv[q_w + kv_w + g * hd..];
            (amx::key_tiles(keys, stride, k, hd), amx::value_tiles(values, stride, k, hd))
        };
        ctx.run(&tiles, &|a, h, own: &mut [f32]| add_bias(span, a, h, own), SendPtr(out.as_mut_ptr()));
        return true;
    }
    let _ = (rel, scale, bf16);
    false
}

/// Rows of an AMX tile: the fewest queries the AMX attention takes.
#[cfg(target_arch = "x86_64")]
const AMX_TILE_ROWS: usize = 16;

/// Queries per AMX attention task: four tiles, which share each key tile ([`amx::bf16_scores`]).
#[cfg(target_arch = "x86_64")]
const AMX_QUERIES: usize = 4 * AMX_TILE_ROWS;

/// Whether the bf16 AMX attention can run here (the AVX-512 path, AMX-BF16 and AVX512-BF16, which every CPU
/// with AMX-BF16 has so far).
#[cfg(target_arch = "x86_64")]
fn amx_bf16() -> bool {
    use crate::kernels::{active_isa, amx, Isa};
    active_isa().is_ok_and(|i| i == Isa::Avx512)
        && amx::bf16_supported()
        && is_x86_feature_detected!("avx512dq")
        && is_x86_feature_detected!("avx512bf16")
}

/// Bidirectional attention on AMX-BF16 (see [`Heads::bf16`], [`attend_rows`]): each key/value head's keys and
/// values become bf16 tiles once per call; a task takes up to 64 queries of one head: scores by `tdpbf16ps`
/// against every key, the softmax's exponentials at bf16 accuracy ([`vector::x86::exp_shifted_bf16_512`])
/// rounded to bf16 and multiplied by the value tiles, the sums in f32.
#[cfg(target_arch = "x86_64")]
struct Bf16Attention<'a> {
    n_heads: usize,
    group: usize,
    hd: usize,
    scale: f32,
    n: usize,
    q: &'a [f32],
    q_stride: usize,
    k: usize,
}

#[cfg(target_arch = "x86_64")]
impl Bf16Attention<'_> {
    /// `tiles(g)` builds the key and value tiles of key/value head `g` ([`amx::key_tiles`],
    /// [`amx::value_tiles`]); `bias(a, h, scores)` adds the position biases of query `a`, head `h` to its scores
    /// over every key.
    fn run<T, B>(&self, tiles_of: &T, bias: &B, out: SendPtr)
    where
        T: Fn(usize) -> (Vec<u16>, Vec<u16>) + Sync,
        B: Fn(usize, usize, &mut [f32]) + Sync,
    {
        use crate::kernels::amx;
        use std::sync::OnceLock;
        let Bf16Attention { n_heads, group, hd, scale, n, q, q_stride, k } = *self;
        let threads = parallel::num_threads();
        let tiles: Vec<OnceLock<(Vec<u16>, Vec<u16>)>> = (0..n_heads / group).map(|_| OnceLock::new()).collect();
        let convert = |g: usize| {
            tiles[g].get_or_init(|| tiles_of(g));
        };
        parallel::global().run(tiles.len(), threads, &convert);
        let lpad = n.div_ceil(32) * 32;
        let task = |t: usize| {
            let (h, a0) = (t % n_heads, t / n_heads * AMX_QUERIES);
            let m = (k - a0).min(AMX_QUERIES);
            let (kt, vt) = tiles[h / group].get().expect("converted above");
            // The task's queries fill `nq` tiles of 16 rows; rows past `m` are zero.
            let nq = m.div_ceil(AMX_TILE_ROWS);
            let rows = nq * AMX_TILE_ROWS;
            SCRATCH.with_borrow_mut(|b| {
                let Scratch { qf, qb, scores, pb, o } = b;
                let qf = sized(qf, rows * hd);
                qf.fill(0.0);
                for (r, row) in qf.chunks_exact_mut(hd).take(m).enumerate() {
                    let src = &q[(a0 + r) * q_stride + h * hd..][..hd];
                    row.iter_mut().zip(src).for_each(|(d, s)| *d = s * scale);
                }
                // Written in full below before they are read.
                let (qb, pb) = (sized(qb, rows * hd), sized(pb, rows * lpad));
                let (scores, o) = (sized(scores, rows * lpad), sized(o, rows * hd));
                let mut inv = [0.0f32; AMX_QUERIES];
                // SAFETY: AMX-BF16 was detected; the buffers have the sizes the kernels read and write (`rows`
                // rows of hd or lpad, the tiles cover lpad positions).
                unsafe {
                    amx::to_bf16(qf, qb);
                    let _tiles = amx::Tiles::acquire();
                    amx::bf16_scores(qb.as_ptr(), nq, hd, kt.as_ptr(), lpad / 16, scores.as_mut_ptr(), lpad);
                    // Each row's probabilities go straight to bf16 (rows past the queries are zero).
                    for (r, (row, p)) in scores.chunks_exact_mut(lpad).zip(pb.chunks_exact_mut(lpad)).enumerate() {
                        if r < m {
                            bias(a0 + r, h, &mut row[..n]);
                            let sum = vector::x86::exp_shifted_bf16_512(&row[..n], p);
                            inv[r] = if sum > 0.0 { 1.0 / sum } else { 0.0 };
                        } else {
                            p.fill(0);
                        }
                    }
                    for i in 0..nq {
                        let (p, o) =
                            (pb.as_ptr().add(i * AMX_TILE_ROWS * lpad), o.as_mut_ptr().add(i * AMX_TILE_ROWS * hd));
                        amx::bf16_weighted(p, lpad, vt.as_ptr(), hd, lpad / 32, o);
                    }
                }
                for (r, row) in o.chunks_exact(hd).take(m).enumerate() {
                    // SAFETY: each task writes the hd-wide slices of its own queries of head h.
                    let dst =
                        unsafe { std::slice::from_raw_parts_mut(out.get().add((a0 + r) * n_heads * hd + h * hd), hd) };
                    dst.iter_mut().zip(row).for_each(|(d, v)| *d = v * inv[r]);
                }
            });
        };
        let n_tasks = k.div_ceil(AMX_QUERIES) * n_heads;
        if threads > 1 {
            parallel::global().run(n_tasks, threads, &task);
        } else {
            (0..n_tasks).for_each(task);
        }
    }
}

/// One thread's buffers for attention tasks, kept between calls: fresh ones per task were zeroed and faulted in
/// every time (long encoder spans make them hundreds of KiB). The u16 ones hold bf16 for [`Bf16Attention`].
#[derive(Default)]
struct Scratch {
    qf: Vec<f32>,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    qb: Vec<u16>,
    scores: Vec<f32>,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pb: Vec<u16>,
    o: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// The first `n` elements of `v`, grown if needed; what they hold is left from earlier use.
fn sized<T: Copy + Default>(v: &mut Vec<T>, n: usize) -> &mut [T] {
    if v.len() < n {
        v.resize(n, T::default());
    }
    &mut v[..n]
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::kv_cache::quantize;

    /// Attention by its definition, in f64, from position-major keys and values `[g][position][hd]`.
    fn reference(heads: Heads, span: Span, q: &[f32], k: usize, keys: &[Vec<f32>], values: &[Vec<f32>]) -> Vec<f32> {
        let Heads { heads: nh, kv_heads, head_dim: hd, scale, .. } = heads;
        let mut out = vec![0.0f32; k * nh * hd];
        for a in 0..k {
            for h in 0..nh {
                let g = h / (nh / kv_heads);
                let (start, end, slope, rel, pos) = match span {
                    Span::Causal { pos0, window, alibi, rel } => {
                        let pos = pos0 + a;
                        (window.map_or(0, |w| (pos + 1).saturating_sub(w)), pos + 1, alibi.map(|s| s[h]), rel, pos)
                    }
                    Span::All { len, rel } => (0, len, None, rel, a),
                };
                let scores: Vec<f64> = (start..end)
                    .map(|j| {
                        let dot: f64 =
                            (0..hd).map(|d| q[(a * nh + h) * hd + d] as f64 * keys[g][j * hd + d] as f64).sum();
                        let mut s = dot * scale as f64;
                        if let Some(m) = slope {
                            s += m as f64 * (j as f64 - pos as f64);
                        }
                        if let Some(RelBias { values, width, zero }) = rel {
                            s += values[h * width + zero + j - pos] as f64;
                        }
                        s
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for d in 0..hd {
                    let v: f64 = e.iter().enumerate().map(|(i, p)| p * values[g][(start + i) * hd + d] as f64).sum();
                    out[(a * nh + h) * hd + d] = if sum > 0.0 { (v / sum) as f32 } else { 0.0 };
                }
            }
        }
        out
    }

    /// Every span kind, plain, grouped-query and multi-query heads, one query to many: the attention over key
    /// panels matches the definition; over int8 codes it matches the definition on the dequantized keys and
    /// values.
    #[test]
    fn attention_matches_its_definition() {
        let n = 90;
        let val = |i: usize, m: usize| ((i * m + 11) % 37) as f32 / 18.0 - 1.0;
        let slopes: Vec<f32> = (0..16).map(|i| 0.5 / (1 << i) as f32).collect();
        // T5-style relative biases: distances -n..n per head.
        let rel_table: Vec<f32> = (0..16 * (2 * n + 1)).map(|i| val(i, 5) * 0.5).collect();
        let rel = RelBias { values: &rel_table, width: 2 * n + 1, zero: n };
        for (h, g, hd) in [(4, 4, 16), (4, 2, 24), (8, 1, 8), (6, 2, 72), (12, 1, 16), (10, 1, 16), (16, 1, 16)] {
            let keys: Vec<Vec<f32>> = (0..g).map(|x| (0..n * hd).map(|i| val(i + x, 7)).collect()).collect();
            let values: Vec<Vec<f32>> = (0..g).map(|x| (0..n * hd).map(|i| val(i + x, 5)).collect()).collect();
            let panels: Vec<Vec<f32>> = keys.iter().map(|x| vector::key_panels(x, n, hd)).collect();
            let heads = Heads { heads: h, kv_heads: g, head_dim: hd, scale: 0.25, bf16: false };
            // Int8 codes with one scale per position, as an int8 cache writes them.
            let quant = |x: &Vec<f32>| -> (Vec<i8>, Vec<f32>) {
                let mut codes = vec![0i8; n * hd];
                let scales = x.chunks_exact(hd).zip(codes.chunks_exact_mut(hd)).map(|(x, c)| quantize(x, c)).collect();
                (codes, scales)
            };
            let (kc, ks): (Vec<_>, Vec<_>) = keys.iter().map(quant).unzip();
            let (vc, vs): (Vec<_>, Vec<_>) = values.iter().map(quant).unzip();
            let deq = |c: &[Vec<i8>], s: &[Vec<f32>]| -> Vec<Vec<f32>> {
                c.iter().zip(s).map(|(c, s)| (0..n * hd).map(|i| c[i] as f32 * s[i / hd]).collect()).collect()
            };
            let (dk, dv) = (deq(&kc, &ks), deq(&vc, &vs));
            let kp: Vec<Vec<i8>> = kc.iter().map(|x| vector::key_panels(x, n, hd)).collect();
            // f16 values, and the f32 values they hold.
            let half = |x: &[Vec<f32>]| -> Vec<Vec<F16>> {
                x.iter().map(|x| x.iter().map(|&v| F16::saturating(v)).collect()).collect()
            };
            let (hk, hv) = (half(&keys), half(&values));
            let widen =
                |x: &[Vec<F16>]| -> Vec<Vec<f32>> { x.iter().map(|x| x.iter().map(|&v| v.into()).collect()).collect() };
            let (wk, wv) = (widen(&hk), widen(&hv));
            let hp: Vec<Vec<F16>> = hk.iter().map(|x| vector::key_panels(x, n, hd)).collect();
            for k in [1, 3, 20, 23] {
                let q: Vec<f32> = (0..k * h * hd).map(|i| val(i, 3)).collect();
                let spans = [
                    Span::All { len: n, rel: None },
                    Span::All { len: 0, rel: None },
                    Span::All { len: k.min(n), rel: Some(rel) },
                    Span::Causal { pos0: n - k, window: None, alibi: None, rel: None },
                    Span::Causal { pos0: n - k, window: Some(33), alibi: Some(&slopes[..h]), rel: None },
                    Span::Causal { pos0: n - k, window: None, alibi: None, rel: Some(rel) },
                ];
                for span in spans {
                    let want = reference(heads, span, &q, k, &keys, &values);
                    let mut got = vec![0.0f32; k * h * hd];
                    attend(heads, span, &q, h * hd, k, KvView::F32 { keys: &panels, values: &values }, &mut got);
                    for (x, y) in want.iter().zip(&got) {
                        assert!((x - y).abs() <= 1e-5, "{x} vs {y}: {h} heads / {g}, {k} queries, {span:?}");
                    }
                    let want = reference(heads, span, &q, k, &dk, &dv);
                    let view = KvView::I8 { keys: &kp, key_scales: &ks, values: &vc, value_scales: &vs };
                    attend(heads, span, &q, h * hd, k, view, &mut got);
                    for (x, y) in want.iter().zip(&got) {
                        assert!((x - y).abs() <= 1e-5, "{x} vs {y} over int8: {h} heads / {g}, {k} queries");
                    }
                    let want = reference(heads, span, &q, k, &wk, &wv);
                    attend(heads, span, &q, h * hd, k, KvView::F16 { keys: &hp, values: &hv }, &mut got);
                    for (x, y) in want.iter().zip(&got) {
                        assert!((x - y).abs() <= 1e-5, "{x} vs {y} over f16: {h} heads / {g}, {k} queries");
                    }
                }
            }
        }
    }

    /// The bf16 path (AMX) against the f64 definition. Rounding q and k to bf16 moves each score by at most
    /// `2·BF16_REL·Σ|q·k|·scale`, which moves each probability by about that factor (twice, with the max
    /// shift); the probabilities and values are rounded once more each: so
    /// `|Δout| <= max|v| · (4·BF16_REL·max Σ|q·k|·scale + 3·BF16_REL)`.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn bf16_attention_within_its_rounding() {
        use crate::formats::budget::BF16_REL;
        let val = |i: usize, m: usize| ((i * m + 11) % 37) as f32 / 18.0 - 1.0;
        // Distances up to the most positions below.
        let w = 100;
        let rel_table: Vec<f32> = (0..8 * (2 * w + 1)).map(|i| val(i, 5) * 0.5).collect();
        let rel = RelBias { values: &rel_table, width: 2 * w + 1, zero: w };
        for (h, g, hd) in [(4, 4, 64), (8, 2, 32), (6, 1, 64), (2, 2, 96)] {
            let heads = Heads { heads: h, kv_heads: g, head_dim: hd, scale: 0.25, bf16: true };
            // One tile, a partial one, several, a whole task of four and one more task.
            for k in [16, 21, 40, 64, 100] {
                let q: Vec<f32> = (0..k * h * hd).map(|i| val(i, 3)).collect();
                let keys: Vec<Vec<f32>> = (0..g).map(|x| (0..k * hd).map(|i| val(i + x, 7)).collect()).collect();
                let values: Vec<Vec<f32>> = (0..g).map(|x| (0..k * hd).map(|i| val(i + x, 5)).collect()).collect();
                // Rows as a fused projection writes them, with room to spare: queries, keys, values.
                let stride = (h + 2 * g) * hd + 3;
                let mut qkv = vec![f32::NAN; k * stride];
                for p in 0..k {
                    let row = &mut qkv[p * stride..];
                    row[..h * hd].copy_from_slice(&q[p * h * hd..(p + 1) * h * hd]);
                    for x in 0..g {
                        row[(h + x) * hd..][..hd].copy_from_slice(&keys[x][p * hd..(p + 1) * hd]);
                        row[(h + g + x) * hd..][..hd].copy_from_slice(&values[x][p * hd..(p + 1) * hd]);
                    }
                }
                for rel in [None, Some(rel)] {
                    let span = Span::All { len: k, rel };
                    let want = reference(heads, span, &q, k, &keys, &values);
                    let mut got = vec![f32::NAN; k * h * hd];
                    if !attend_rows(heads, rel, &qkv, stride, k, &mut got) {
                        eprintln!("no AMX-BF16 here: skipped");
                        assert!(got.iter().all(|v| v.is_nan()), "nothing written");
                        return;
                    }
                    for (i, (x, y)) in want.iter().zip(&got).enumerate() {
                        let (a, head) = (i / (h * hd), i / hd % h);
                        let (qa, kv) = (&q[a * h * hd + head * hd..][..hd], head / (h / g));
                        let s_abs = (0..k)
                            .map(|j| (0..hd).map(|d| (qa[d] * keys[kv][j * hd + d]).abs()).sum::<f32>() * 0.25)
                            .fold(0.0f32, f32::max);
                        let v_max = values[kv].iter().fold(0.0f32, |m, v| m.max(v.abs()));
                        let tol = v_max * (4.0 * BF16_REL * s_abs + 3.0 * BF16_REL) + 1e-6;
                        assert!(
                            (x - y).abs() <= tol,
                            "{x} vs {y} (tol {tol}): {h} heads / {g}, hd {hd}, {k} positions, {span:?}"
                        );
                    }
                }
                // Without bf16 (or below a tile) the caller's cache path runs instead.
                let f32_heads = Heads { bf16: false, ..heads };
                assert!(!attend_rows(f32_heads, None, &qkv, stride, k, &mut vec![0.0; k * h * hd]));
            }
        }
        let heads = Heads { heads: 2, kv_heads: 1, head_dim: 32, scale: 1.0, bf16: true };
        assert!(!attend_rows(heads, None, &vec![0.0; 15 * 128], 128, 15, &mut vec![0.0; 15 * 64]));
    }

    #[test]
    fn heads_per_block_divides_the_group() {
        for (group, want) in [(1, 1), (4, 4), (7, 7), (8, 8), (12, 6), (16, 8), (32, 8), (11, 1)] {
            assert_eq!(heads_per_block(group), want, "group {group}");
        }
    }
}
