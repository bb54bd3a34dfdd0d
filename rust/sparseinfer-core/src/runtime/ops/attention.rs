//! Scaled dot-product attention (Vaswani et al., arXiv 1706.03762) of new queries over a view of keys and
//! values, with grouped-query heads (Ainslie et al., arXiv 2305.13245). The [`Span`] says which positions a
//! query sees: causal self-attention over a KV cache (with an optional sliding window and ALiBi biases, Press et
//! al., arXiv 2108.12409), or every position, as encoder self-attention and cross-attention need.

use crate::kernels::vector::{self, MAX_QUERIES, PANEL};
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
}

/// Keys and values of one layer, per key/value head: as a growing cache writes them (position-major, `hd` values
/// per position), or packed once a cache stops growing (cross-attention's): keys in panels
/// ([`vector::key_panels`]) so no call has to transpose them, in f32 or as int8 codes with one scale per position.
#[derive(Clone, Copy)]
pub struct KvView<'a> {
    store: Store<'a>,
}

/// How a [`KvView`] holds its keys and values (`[g]`: key/value head `g`).
#[derive(Clone, Copy)]
pub enum Store<'a> {
    /// Keys and values `[position][hd]`.
    Rows {
        /// Keys.
        keys: &'a [Vec<f32>],
        /// Values.
        values: &'a [Vec<f32>],
    },
    /// Keys in panels, values `[position][hd]`.
    Panels {
        /// Key panels.
        keys: &'a [Vec<f32>],
        /// Values.
        values: &'a [Vec<f32>],
    },
    /// Int8 codes of both, key codes in panels, value codes `[position][hd]`; position `j`'s key is
    /// `key_scales[g][j] · code` and likewise its value.
    PanelsI8 {
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

impl<'a> KvView<'a> {
    /// A view of per-head key and value buffers (`keys[g]`: positions × `hd`).
    pub fn new(keys: &'a [Vec<f32>], values: &'a [Vec<f32>]) -> KvView<'a> {
        debug_assert_eq!(keys.len(), values.len());
        KvView { store: Store::Rows { keys, values } }
    }

    /// A view of packed keys and values.
    pub fn packed(store: Store<'a>) -> KvView<'a> {
        KvView { store }
    }

    /// Keys and values of key/value head `g` when the view holds them position-major.
    pub fn rows(&self, g: usize) -> Option<(&'a [f32], &'a [f32])> {
        match self.store {
            Store::Rows { keys, values } => Some((&keys[g], &values[g])),
            _ => None,
        }
    }

    /// Whether the view is packed (keys in panels).
    pub fn is_packed(&self) -> bool {
        !matches!(self.store, Store::Rows { .. })
    }
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

/// Queries and positions from which [`attend`] works on transposed keys and values (see [`Layout`]).
const TRANSPOSE_QUERIES: usize = 8;
const TRANSPOSE_POSITIONS: usize = 64;

/// How [`attend_with`] reads keys and values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// As stored, position-major, one query at a time: an `hd`-long dot product per score and an `hd`-long
    /// axpy per value row. Cheapest for few queries (decoding), where a transposed copy would cost as much as
    /// the work.
    Positions,
    /// Up to [`MAX_QUERIES`] queries at a time over key panels (the view's own or packed once per call), so
    /// each key or value load feeds one FMA per query and no score needs a horizontal sum
    /// ([`crate::kernels::vector::VectorOps::scores`]). For many queries over many positions (an encoder, a
    /// prefill), and for any query over packed keys.
    Blocked,
}

/// `out[k × H·hd]`: the attention of `k` queries, query `a` of head `h` at `q[a · q_stride + h · hd..]`, over
/// `kv`. One task per (query, head) pair, or per (block of up to four queries, head) in [`Layout::Blocked`], on
/// the thread pool when the work is large enough.
pub fn attend(heads: Heads, span: Span, q: &[f32], q_stride: usize, k: usize, kv: KvView, out: &mut [f32]) {
    let layout = if kv.is_packed() || (k >= TRANSPOSE_QUERIES && seen(span, k) >= TRANSPOSE_POSITIONS) {
        Layout::Blocked
    } else {
        Layout::Positions
    };
    attend_with(layout, heads, span, q, q_stride, k, kv, out)
}

/// Positions of the view the queries of `span` reach.
fn seen(span: Span, k: usize) -> usize {
    match span {
        Span::Causal { pos0, .. } => pos0 + k,
        Span::All { len, .. } => len,
    }
}

/// [`attend`] with the key/value layout chosen by the caller (tests compare the two; a packed view always takes
/// [`Layout::Blocked`]).
#[allow(clippy::too_many_arguments)]
pub fn attend_with(
    layout: Layout,
    heads: Heads,
    span: Span,
    q: &[f32],
    q_stride: usize,
    k: usize,
    kv: KvView,
    out: &mut [f32],
) {
    let Heads { heads: n_heads, kv_heads, head_dim: hd, scale } = heads;
    let layout = if kv.is_packed() { Layout::Blocked } else { layout };
    let group = n_heads / kv_heads;
    let out_ptr = SendPtr(out.as_mut_ptr());
    let ops = vector::ops();
    let n = seen(span, k);
    // Query `a`'s keys `start..end`, ALiBi slope (for head `h`), relative bias and position.
    let range = |a: usize, h: usize| match span {
        Span::Causal { pos0, window, alibi, rel } => {
            let pos = pos0 + a;
            (window.map_or(0, |w| (pos + 1).saturating_sub(w)), pos + 1, alibi.map(|s| s[h]), rel, pos)
        }
        Span::All { len, rel } => (0, len, None, rel, a),
    };
    // Scores (already scaled) of query `a`, head `h`, over `from..from + scores.len()` → probabilities in
    // place, 0 outside the query's own keys; returns 1 / their sum.
    let softmax = |a: usize, h: usize, from: usize, scores: &mut [f32]| -> f32 {
        let (start, end, alibi, rel, pos) = range(a, h);
        let (lo, hi) = (start - from, end - from);
        let own = &mut scores[lo..hi];
        if let Some(m) = alibi {
            own.iter_mut().enumerate().for_each(|(i, v)| *v += m * ((start + i) as f32 - pos as f32));
        }
        if let Some(RelBias { values, width, zero }) = rel {
            // Distance `start - pos` sits at `zero + start - pos` (>= 0 by the table's construction).
            let row = &values[h * width + zero + start - pos..];
            own.iter_mut().zip(row).for_each(|(v, b)| *v += b);
        }
        let sum = (ops.exp_shifted)(own);
        scores[..lo].fill(0.0);
        scores[hi..].fill(0.0);
        1.0 / sum
    };
    // SAFETY: each task writes the hd-wide slices of its own (query, head) pairs of `out`.
    let out_of = |a: usize, h: usize| unsafe {
        std::slice::from_raw_parts_mut(out_ptr.get().add(a * n_heads * hd + h * hd), hd)
    };
    let one = |a: usize, h: usize| {
        let (start, end, ..) = range(a, h);
        let qh = &q[a * q_stride + h * hd..a * q_stride + (h + 1) * hd];
        let (keys, values) = kv.rows(h / group).expect("position-major keys and values");
        let mut scores: Vec<f32> = (start..end).map(|j| (ops.dot)(qh, &keys[j * hd..(j + 1) * hd]) * scale).collect();
        let inv = softmax(a, h, start, &mut scores);
        let o = out_of(a, h);
        o.fill(0.0);
        for (i, p) in scores.iter().enumerate() {
            (ops.axpy)(p * inv, &values[(start + i) * hd..(start + i + 1) * hd], o);
        }
    };
    // Key panels (`vector::key_panels`) of a position-major view, per key/value head.
    let copies: Vec<Vec<f32>> = match kv.store {
        Store::Rows { keys, .. } if layout == Layout::Blocked => {
            keys.iter().map(|k| vector::key_panels(k, n, hd)).collect()
        }
        _ => Vec::new(),
    };
    let block = |a0: usize, h: usize| {
        let (m, g) = (MAX_QUERIES.min(k - a0), h / group);
        // The union of the queries' key ranges (causal ranges grow with the query), from a panel's start.
        let (first, to) = (range(a0, h).0, range(a0 + m - 1, h).1);
        let from = first / PANEL * PANEL;
        let mut qs = vec![0.0f32; m * hd];
        for (i, qa) in qs.chunks_exact_mut(hd).enumerate() {
            let src = &q[(a0 + i) * q_stride + h * hd..(a0 + i) * q_stride + (h + 1) * hd];
            qa.iter_mut().zip(src).for_each(|(d, s)| *d = s * scale);
        }
        let l = to - from;
        if l == 0 {
            (a0..a0 + m).for_each(|a| out_of(a, h).fill(0.0));
            return;
        }
        let mut scores = vec![0.0f32; m * l];
        // Each of the `m` rows of `scores` times per-position scales.
        let rescale = |scores: &mut [f32], scales: &[f32]| {
            for row in scores.chunks_exact_mut(l) {
                row.iter_mut().zip(&scales[from..to]).for_each(|(x, s)| *x *= s);
            }
        };
        match kv.store {
            Store::Rows { .. } => (ops.scores)(&qs, m, &copies[g], from..to, &mut scores),
            Store::Panels { keys, .. } => (ops.scores)(&qs, m, &keys[g], from..to, &mut scores),
            Store::PanelsI8 { keys, key_scales, .. } => {
                (ops.scores_i8)(&qs, m, &keys[g], from..to, &mut scores);
                rescale(&mut scores, &key_scales[g]);
            }
        }
        let mut inv = [0.0f32; MAX_QUERIES];
        for (i, s) in scores.chunks_exact_mut(l).enumerate() {
            inv[i] = softmax(a0 + i, h, from, s);
        }
        let mut o = vec![0.0f32; m * hd];
        match kv.store {
            Store::Rows { values, .. } | Store::Panels { values, .. } => {
                (ops.weighted)(&scores, m, &values[g], hd, from, &mut o)
            }
            Store::PanelsI8 { values, value_scales, .. } => {
                rescale(&mut scores, &value_scales[g]);
                (ops.weighted_i8)(&scores, m, &values[g], hd, from, &mut o);
            }
        }
        for (i, oa) in o.chunks_exact(hd).enumerate() {
            out_of(a0 + i, h).iter_mut().zip(oa).for_each(|(o, v)| *o = v * inv[i]);
        }
    };
    let per_block = if layout == Layout::Blocked { MAX_QUERIES } else { 1 };
    let blocks = k.div_ceil(per_block);
    let task = |t: usize| {
        let (b, h) = (t / n_heads, t % n_heads);
        if layout == Layout::Blocked {
            block(b * per_block, h);
        } else {
            one(b, h);
        }
    };
    let n_tasks = blocks * n_heads;
    let work = k * n_heads * n * hd;
    let threads = parallel::num_threads();
    if threads > 1 && work >= 1 << 16 {
        parallel::global().run(n_tasks, threads, &task);
    } else {
        (0..n_tasks).for_each(task);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Both layouts, and keys packed in panels beforehand, over every span kind: the same attention within f32
    /// rounding of the summation order.
    #[test]
    fn blocked_layout_matches_the_position_layout() {
        let (h, g, hd, n) = (4, 2, 16, 90);
        let val = |i: usize, m: usize| ((i * m + 11) % 37) as f32 / 18.0 - 1.0;
        let keys: Vec<Vec<f32>> = (0..g).map(|x| (0..n * hd).map(|i| val(i + x, 7)).collect()).collect();
        let values: Vec<Vec<f32>> = (0..g).map(|x| (0..n * hd).map(|i| val(i + x, 5)).collect()).collect();
        let kv = KvView::new(&keys, &values);
        let heads = Heads { heads: h, kv_heads: g, head_dim: hd, scale: 0.25 };
        let slopes = [0.5, 0.25, 0.125, 0.0625];
        // 23 queries: five blocks of four and three left over.
        for k in [20, 23] {
            let q: Vec<f32> = (0..k * h * hd).map(|i| val(i, 3)).collect();
            let spans = [
                Span::All { len: n, rel: None },
                Span::Causal { pos0: n - k, window: None, alibi: None, rel: None },
                Span::Causal { pos0: n - k, window: Some(33), alibi: Some(&slopes), rel: None },
            ];
            for span in spans {
                let mut a = vec![0.0f32; k * h * hd];
                let mut b = vec![0.0f32; k * h * hd];
                attend_with(Layout::Positions, heads, span, &q, h * hd, k, kv, &mut a);
                attend_with(Layout::Blocked, heads, span, &q, h * hd, k, kv, &mut b);
                for (x, y) in a.iter().zip(&b) {
                    assert!((x - y).abs() <= 1e-5, "{x} vs {y} in {span:?}");
                }
                if let Span::All { .. } = span {
                    // One query, and all of them, over packed keys (cross-attention after `KvCache::freeze`).
                    let panels: Vec<Vec<f32>> = keys.iter().map(|x| vector::key_panels(x, n, hd)).collect();
                    let packed = KvView::packed(Store::Panels { keys: &panels, values: &values });
                    let mut c = vec![0.0f32; k * h * hd];
                    attend(heads, span, &q, h * hd, k, packed, &mut c);
                    let mut one = vec![0.0f32; h * hd];
                    attend(heads, span, &q, h * hd, 1, packed, &mut one);
                    for (x, y) in a.iter().zip(&c).chain(a.iter().zip(&one)) {
                        assert!((x - y).abs() <= 1e-5, "{x} vs {y} over packed keys");
                    }
                    // Int8 codes of the same keys and values give the attention of the dequantized ones.
                    let quant = |x: &Vec<f32>| -> (Vec<i8>, Vec<f32>) {
                        let mut codes = vec![0i8; n * hd];
                        let scales = (0..n)
                            .map(|j| {
                                let s = x[j * hd..(j + 1) * hd].iter().fold(0.0f32, |a, v| a.max(v.abs())) / 127.0;
                                for d in 0..hd {
                                    codes[j * hd + d] = (x[j * hd + d] / s).round() as i8;
                                }
                                s
                            })
                            .collect();
                        (codes, scales)
                    };
                    let (kc, ks): (Vec<_>, Vec<_>) = keys.iter().map(quant).unzip();
                    let (vc, vs): (Vec<_>, Vec<_>) = values.iter().map(quant).unzip();
                    let deq = |c: &[Vec<i8>], s: &[Vec<f32>]| -> Vec<Vec<f32>> {
                        c.iter().zip(s).map(|(c, s)| (0..n * hd).map(|i| c[i] as f32 * s[i / hd]).collect()).collect()
                    };
                    let (dk, dv) = (deq(&kc, &ks), deq(&vc, &vs));
                    let mut want = vec![0.0f32; k * h * hd];
                    attend_with(Layout::Positions, heads, span, &q, h * hd, k, KvView::new(&dk, &dv), &mut want);
                    let kp: Vec<Vec<i8>> = kc.iter().map(|x| vector::key_panels(x, n, hd)).collect();
                    let store = Store::PanelsI8 { keys: &kp, key_scales: &ks, values: &vc, value_scales: &vs };
                    let mut got = vec![0.0f32; k * h * hd];
                    attend(heads, span, &q, h * hd, k, KvView::packed(store), &mut got);
                    for (x, y) in want.iter().zip(&got) {
                        assert!((x - y).abs() <= 1e-5, "{x} vs {y} over int8 keys and values");
                    }
                }
            }
        }
    }
}
