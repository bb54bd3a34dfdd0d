//! The key/value cache of one sequence. It grows with the positions written, so a large capacity (a long
//! context in `config.json`, a large `max_new_tokens`) costs nothing until it is used.
//!
//! Layout: one buffer per layer and key/value head; keys in panels of [`PANEL`] positions, each panel
//! dimension-major (the layout the attention's block kernels read, `kernels::vector::key_panels`), values
//! position-major:
//!
//! ```text
//! keys[layer · kv_heads + kv_head][position / PANEL][head_dim][position % PANEL]
//! values[layer · kv_heads + kv_head][position][head_dim]
//! ```
//!
//! A half-precision cache stores each value as the nearest f16 (saturating at its largest); an int8 cache stores
//! codes, one scale per position and head, quantized as each position is written.

use super::ops::attention::KvView;
use crate::error::{Error, Result};
#[cfg(test)]
use crate::kernels::vector::key_panels;
use crate::kernels::vector::{F16, PANEL};

/// Cached keys and values for up to `capacity` positions.
pub struct KvCache {
    kv_heads: usize,
    head_dim: usize,
    capacity: usize,
    len: usize,
    store: Store,
}

/// Per layer and key/value head: key panels and position-major values.
enum Store {
    F32 { keys: Vec<Vec<f32>>, values: Vec<Vec<f32>> },
    F16 { keys: Vec<Vec<F16>>, values: Vec<Vec<F16>> },
    I8(Box<Int8>),
}

/// Int8 codes, one scale per position (`max |x| / 127` of the head's row).
struct Int8 {
    keys: Vec<Vec<i8>>,
    key_scales: Vec<Vec<f32>>,
    values: Vec<Vec<i8>>,
    value_scales: Vec<Vec<f32>>,
}

/// Runs `f(h)` for every head `h < heads`: on the pool when the `n` positions make it worth a hand-off.
fn for_heads(heads: usize, n: usize, f: impl Fn(usize) + Sync) {
    let threads = if n >= crate::parallel::MIN_ROWS_PER_TASK { crate::parallel::num_threads() } else { 1 };
    crate::parallel::global().run(heads, threads, &f);
}

/// Grows `buf` with zeros to `len` values, failing (rather than aborting) when memory cannot be had.
fn grow<T: Copy + Default>(buf: &mut Vec<T>, len: usize, pos: usize) -> Result<()> {
    if buf.len() < len {
        buf.try_reserve(len - buf.len())
            .map_err(|_| Error::invalid("kv cache", format!("not enough memory for position {pos}")))?;
        buf.resize(len, T::default());
    }
    Ok(())
}

/// Symmetric int8 codes of `x` and their scale (`max |x| / 127`): each value is within half a scale step of
/// `scale · code`.
#[inline(always)]
pub(crate) fn quantize(x: &[f32], codes: &mut [i8]) -> f32 {
    // The largest magnitude by its bits, NaN ignored as `f32::max` ignores it: non-negative floats order as their
    // bit patterns do, and integer maxima in 16 lanes vectorize where a float max reduction does not.
    let magnitude = |v: &f32| {
        let b = v.to_bits() & 0x7fff_ffff;
        if b > 0x7f80_0000 {
            0
        } else {
            b
        }
    };
    let mut lanes = [0u32; 16];
    let mut blocks = x.chunks_exact(16);
    for block in &mut blocks {
        lanes.iter_mut().zip(block).for_each(|(m, v)| *m = (*m).max(magnitude(v)));
    }
    let bits = blocks.remainder().iter().map(magnitude).chain(lanes).max().unwrap_or(0);
    let s = f32::from_bits(bits) / 127.0;
    let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
    x.iter().zip(codes).for_each(|(v, c)| *c = round_code(v * inv));
    s
}

/// Positions `pos..end` of one key/value head in rows of new keys and values (`stride` apart): the keys at
/// `keys_at` of each row, the values at `values_at`.
struct HeadRows<'a> {
    rows: &'a [f32],
    pos: usize,
    end: usize,
    stride: usize,
    keys_at: usize,
    values_at: usize,
}

/// The float stores' part of [`KvCache::write_rows`] for one layer's heads (`keys[h]`, `values[h]`): every
/// head's buffers grow first (serially, so a failure is reported before anything is written); then each pool task
/// writes one head's positions from `src(h)`, each value through `conv`.
fn write_floats<'a, T: Copy + Default + Send>(
    keys: &mut [Vec<T>],
    values: &mut [Vec<T>],
    hd: usize,
    src: &(dyn Fn(usize) -> HeadRows<'a> + Sync),
    conv: impl Fn(f32) -> T + Sync,
) -> Result<()> {
    let (pos, end) = (src(0).pos, src(0).end);
    for (k, v) in keys.iter_mut().zip(values.iter_mut()) {
        grow(k, end.div_ceil(PANEL) * hd * PANEL, end - 1)?;
        grow(v, end * hd, end - 1)?;
    }
    let bufs: Vec<_> = keys.iter_mut().zip(values.iter_mut()).map(std::sync::Mutex::new).collect();
    for_heads(bufs.len(), end - pos, |h| {
        let mut guard = bufs[h].lock().unwrap_or_else(|e| e.into_inner());
        let (keys, values) = &mut *guard;
        let HeadRows { rows, stride, keys_at, values_at, .. } = src(h);
        for p in pos..end {
            let row = &rows[(p - pos) * stride..];
            let at = (p / PANEL) * hd * PANEL + p % PANEL;
            row[keys_at..keys_at + hd].iter().enumerate().for_each(|(d, &x)| keys[at + d * PANEL] = conv(x));
            let dst = &mut values[p * hd..(p + 1) * hd];
            dst.iter_mut().zip(&row[values_at..values_at + hd]).for_each(|(v, &x)| *v = conv(x));
        }
    });
    Ok(())
}

/// One head's int8 buffers in the cache's layout.
struct HeadCodes<'a> {
    keys: &'a mut [i8],
    key_scales: &'a mut [f32],
    values: &'a mut [i8],
    value_scales: &'a mut [f32],
}

crate::kernels::on_active_isa! {
    /// Quantizes one head's new positions into its buffers, compiled for the active SIMD path: an encoder's
    /// output gives a cross-attention cache thousands of positions per layer at once.
    fn quantize_head(src: &HeadRows, hd: usize, dst: HeadCodes) {
        let HeadCodes { keys, key_scales, values, value_scales } = dst;
        let mut codes = vec![0i8; hd];
        for p in src.pos..src.end {
            let row = &src.rows[(p - src.pos) * src.stride..];
            key_scales[p] = quantize(&row[src.keys_at..src.keys_at + hd], &mut codes);
            let at = (p / PANEL) * hd * PANEL + p % PANEL;
            codes.iter().enumerate().for_each(|(d, &c)| keys[at + d * PANEL] = c);
            value_scales[p] = quantize(&row[src.values_at..src.values_at + hd], &mut values[p * hd..(p + 1) * hd]);
        }
    }
}

/// `y` clamped to ±127 and rounded half away from zero: `f32::round(y).clamp(-127, 127)` for every `y`
/// (NaN gives 0; `y` is infinite when a row's largest magnitude is subnormal). Truncation and a compare,
/// which vectorize; `round` is a libm call on baseline x86-64.
#[inline(always)]
fn round_code(y: f32) -> i8 {
    let y = y.clamp(-127.0, 127.0);
    let t = y as i32;
    let step = if (y - t as f32).abs() >= 0.5 { y.signum() as i32 } else { 0 };
    (t + step) as i8
}

/// How self-attention caches store keys and values: f32; f16 (half the bytes every decoding step reads, which
/// dominate long contexts; each value rounded to 11 significant bits); or int8 codes with one scale per position
/// and head (a quarter of the bytes; values move by up to half a code step).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvFormat {
    /// f32 keys and values.
    #[default]
    F32,
    /// f16 keys and values, saturating at ±65504 (infinities too, where f32 keeps them).
    F16,
    /// int8 codes, one scale per position and head.
    Int8,
}

impl KvFormat {
    /// The format called `name` (`"f32"`, `"f16"` or `"int8"`).
    pub fn from_name(name: &str) -> Result<KvFormat> {
        match name {
            "f32" => Ok(KvFormat::F32),
            "f16" => Ok(KvFormat::F16),
            "int8" => Ok(KvFormat::Int8),
            _ => Err(Error::invalid("load", format!("kv_cache: unknown format {name:?}; expected f32, f16 or int8"))),
        }
    }

    /// The format a load takes unless told: f16 for models whose linear layers take int8 activations (a half's
    /// rounding, 2⁻¹¹ of each value, is far below theirs), f32 for the rest (which match transformers' logits to
    /// within f32 rounding).
    pub fn default_for(int8_activations: bool) -> KvFormat {
        if int8_activations {
            KvFormat::F16
        } else {
            KvFormat::F32
        }
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            KvFormat::F32 => "f32",
            KvFormat::F16 => "f16",
            KvFormat::Int8 => "int8",
        }
    }
}

impl KvCache {
    /// An empty cache in `format` (see [`KvCache::new`] and [`KvCache::new_int8`]).
    pub fn with_format(format: KvFormat, layers: usize, kv_heads: usize, head_dim: usize, capacity: usize) -> KvCache {
        match format {
            KvFormat::F32 => KvCache::new(layers, kv_heads, head_dim, capacity),
            KvFormat::F16 => KvCache::new_f16(layers, kv_heads, head_dim, capacity),
            KvFormat::Int8 => KvCache::new_int8(layers, kv_heads, head_dim, capacity),
        }
    }

    /// An empty f32 cache with room for `capacity` positions (memory: `2 · layers · kv_heads · head_dim` floats
    /// per position written, keys rounded up to whole panels).
    pub fn new(layers: usize, kv_heads: usize, head_dim: usize, capacity: usize) -> KvCache {
        let heads = layers * kv_heads;
        let empty = || (0..heads).map(|_| Vec::new()).collect();
        KvCache { kv_heads, head_dim, capacity, len: 0, store: Store::F32 { keys: empty(), values: empty() } }
    }

    /// An empty cache that stores keys and values as f16 ([`KvFormat::F16`]: half the bytes attention reads).
    pub fn new_f16(layers: usize, kv_heads: usize, head_dim: usize, capacity: usize) -> KvCache {
        let heads = layers * kv_heads;
        let empty = || (0..heads).map(|_| Vec::new()).collect();
        KvCache { kv_heads, head_dim, capacity, len: 0, store: Store::F16 { keys: empty(), values: empty() } }
    }

    /// An empty cache that stores each position's keys and values as int8 codes with one scale per head (a
    /// quarter of the bytes attention reads): the cross-attention of models whose linears take int8 activations,
    /// and self-attention where the load asks for it ([`KvFormat::Int8`]).
    pub fn new_int8(layers: usize, kv_heads: usize, head_dim: usize, capacity: usize) -> KvCache {
        let heads = layers * kv_heads;
        let (e8, e32) = (|| (0..heads).map(|_| Vec::new()).collect(), || (0..heads).map(|_| Vec::new()).collect());
        let store = Store::I8(Box::new(Int8 { keys: e8(), key_scales: e32(), values: e8(), value_scales: e32() }));
        KvCache { kv_heads, head_dim, capacity, len: 0, store }
    }

    /// Positions filled.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions available in all.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets every position (keeps the memory).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Drops positions from `len` on (for reusing a shared prefix).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Stores `n` positions from `pos` (at most `len()`) in `layer`: position `pos + a`'s keys start at
    /// `rows[a · stride + offset]`, its values right after them (`kv_heads × head_dim` each). Heads run on
    /// the pool (an encoder layer, or a cross-attention cache, takes a whole input at once). Fails, rather
    /// than aborting, when memory cannot be had.
    pub fn write_rows(
        &mut self,
        layer: usize,
        pos: usize,
        rows: &[f32],
        n: usize,
        stride: usize,
        offset: usize,
    ) -> Result<()> {
        let (hd, w) = (self.head_dim, self.kv_heads * self.head_dim);
        if n == 0 {
            return Ok(());
        }
        assert!(offset + 2 * w <= stride && rows.len() >= (n - 1) * stride + offset + 2 * w);
        let end = pos + n;
        if end > self.capacity {
            return Err(Error::invalid(
                "kv cache",
                format!("position {} is past the capacity {}", end - 1, self.capacity),
            ));
        }
        let panels = end.div_ceil(PANEL) * hd * PANEL;
        let heads = layer * self.kv_heads..(layer + 1) * self.kv_heads;
        let src =
            |h: usize| HeadRows { rows, pos, end, stride, keys_at: offset + h * hd, values_at: offset + w + h * hd };
        // Every head's buffers grow first (serially, so a failure is reported before anything is written); then
        // each pool task fills one head's, which no other task touches.
        match &mut self.store {
            Store::F32 { keys, values } => write_floats(&mut keys[heads.clone()], &mut values[heads], hd, &src, |x| x)?,
            Store::F16 { keys, values } => {
                write_floats(&mut keys[heads.clone()], &mut values[heads], hd, &src, F16::saturating)?
            }
            Store::I8(q) => {
                let Int8 { keys, key_scales, values, value_scales } = &mut **q;
                for i in heads.clone() {
                    grow(&mut keys[i], panels, end - 1)?;
                    grow(&mut key_scales[i], end, end - 1)?;
                    grow(&mut values[i], end * hd, end - 1)?;
                    grow(&mut value_scales[i], end, end - 1)?;
                }
                let bufs: Vec<_> = keys[heads.clone()]
                    .iter_mut()
                    .zip(&mut key_scales[heads.clone()])
                    .zip(values[heads.clone()].iter_mut().zip(&mut value_scales[heads]))
                    .map(std::sync::Mutex::new)
                    .collect();
                for_heads(bufs.len(), n, |h| {
                    let mut guard = bufs[h].lock().unwrap_or_else(|e| e.into_inner());
                    let ((keys, key_scales), (values, value_scales)) = &mut *guard;
                    let dst = HeadCodes { keys, key_scales, values, value_scales };
                    quantize_head(&src(h), hd, dst);
                });
            }
        }
        Ok(())
    }

    /// Bytes of the keys and values of the positions filled (what attention over all of them reads).
    pub fn bytes(&self) -> usize {
        let (heads, per_position) = match &self.store {
            Store::F32 { keys, .. } => (keys.len(), 2 * self.head_dim * 4),
            Store::F16 { keys, .. } => (keys.len(), 2 * self.head_dim * 2),
            Store::I8(q) => (q.keys.len(), 2 * (self.head_dim + 4)),
        };
        heads * self.len * per_position
    }

    /// The keys and values of `layer`, as attention reads them.
    pub fn layer(&self, layer: usize) -> KvView<'_> {
        let h = layer * self.kv_heads..(layer + 1) * self.kv_heads;
        match &self.store {
            Store::F32 { keys, values } => KvView::F32 { keys: &keys[h.clone()], values: &values[h] },
            Store::F16 { keys, values } => KvView::F16 { keys: &keys[h.clone()], values: &values[h] },
            Store::I8(q) => KvView::I8 {
                keys: &q.keys[h.clone()],
                key_scales: &q.key_scales[h.clone()],
                values: &q.values[h.clone()],
                value_scales: &q.value_scales[h],
            },
        }
    }

    /// Marks `n` more positions as filled (after every layer wrote them).
    pub fn advance(&mut self, n: usize) {
        self.len = (self.len + n).min(self.capacity);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Positions written one by one land where the key panels of the whole sequence put them, across a panel
    /// boundary; an f16 cache holds the nearest halves (saturated), an int8 cache keeps every value within half a
    /// step of its scale. Writing them all at once (from rows with a query part before the keys, on the pool)
    /// stores the same bits.
    #[test]
    fn writes_fill_key_panels_and_int8_codes_stay_close() {
        let (heads, hd, n) = (2, 8, PANEL + 5);
        // Values past the largest half among them, which the f16 cache saturates.
        let val = |i: usize| if i.is_multiple_of(41) { 7e4 } else { ((i * 7 + 3) % 23) as f32 / 11.0 - 1.0 };
        let rows: Vec<Vec<f32>> = (0..n).map(|p| (0..2 * heads * hd).map(|i| val(p * 97 + i)).collect()).collect();
        let (mut cache, mut int8) = (KvCache::new(2, heads, hd, 100), KvCache::new_int8(2, heads, hd, 100));
        let mut half = KvCache::with_format(KvFormat::F16, 2, heads, hd, 100);
        for c in [&mut cache, &mut int8, &mut half] {
            for (p, r) in rows.iter().enumerate() {
                c.write_rows(0, p, r, 1, r.len(), 0).unwrap();
                c.advance(1);
            }
        }
        // Layer 1: all positions in one call, each row `[3 query values | keys | values]`.
        let qkv: Vec<f32> = rows.iter().flat_map(|r| [7.0, 8.0, 9.0].into_iter().chain(r.iter().copied())).collect();
        for c in [&mut cache, &mut int8, &mut half] {
            c.write_rows(1, 0, &qkv, n, 3 + 2 * heads * hd, 3).unwrap();
        }
        match (cache.layer(0), cache.layer(1)) {
            (KvView::F32 { keys: k0, values: v0 }, KvView::F32 { keys: k1, values: v1 }) => {
                assert!(k0 == k1 && v0 == v1);
            }
            _ => panic!("f32"),
        }
        match (int8.layer(0), int8.layer(1)) {
            (
                KvView::I8 { keys: k0, key_scales: ks0, values: v0, value_scales: vs0 },
                KvView::I8 { keys: k1, key_scales: ks1, values: v1, value_scales: vs1 },
            ) => assert!(k0 == k1 && ks0 == ks1 && v0 == v1 && vs0 == vs1),
            _ => panic!("int8"),
        }
        let KvView::F32 { keys, values } = cache.layer(0) else { panic!("f32") };
        for h in 0..heads {
            let k: Vec<f32> = rows.iter().flat_map(|r| r[h * hd..(h + 1) * hd].to_vec()).collect();
            assert_eq!(keys[h][..key_panels(&k, n, hd).len()], key_panels(&k, n, hd)[..]);
            let v: Vec<f32> = rows.iter().flat_map(|r| r[(heads + h) * hd..(heads + h + 1) * hd].to_vec()).collect();
            assert_eq!(values[h][..n * hd], v[..]);
        }
        let (KvView::F16 { keys: k0, values: v0 }, KvView::F16 { keys: k1, values: v1 }) =
            (half.layer(0), half.layer(1))
        else {
            panic!("f16")
        };
        assert!(k0 == k1 && v0 == v1);
        let KvView::F32 { keys: fk, values: fv } = cache.layer(0) else { panic!("f32") };
        for h in 0..heads {
            let want = |x: &[f32]| x.iter().map(|&x| F16::saturating(x)).collect::<Vec<_>>();
            assert_eq!(k0[h], want(&fk[h]), "f16 keys");
            assert_eq!(v0[h][..n * hd], want(&fv[h][..n * hd])[..], "f16 values");
            assert!(k0[h].iter().chain(&v0[h]).any(|&x| f32::from(x) == 65504.0), "a saturated value");
        }
        let KvView::I8 { keys, key_scales, values, value_scales } = int8.layer(0) else { panic!("int8") };
        for h in 0..heads {
            for (p, r) in rows.iter().enumerate() {
                for d in 0..hd {
                    let code = keys[h][(p / PANEL) * hd * PANEL + d * PANEL + p % PANEL];
                    assert!((code as f32 * key_scales[h][p] - r[h * hd + d]).abs() <= key_scales[h][p] / 2.0 + 1e-7);
                    let code = values[h][p * hd + d];
                    let want = r[(heads + h) * hd + d];
                    assert!((code as f32 * value_scales[h][p] - want).abs() <= value_scales[h][p] / 2.0 + 1e-7);
                }
            }
        }
        assert_eq!((cache.bytes(), int8.bytes()), (2 * heads * n * 2 * hd * 4, 2 * heads * n * 2 * (hd + 4)));
        assert_eq!(half.bytes(), 2 * heads * n * 2 * hd * 2);
        assert!(cache.write_rows(0, 100, &rows[0], 1, rows[0].len(), 0).is_err());
        assert!(cache.write_rows(0, 99, &qkv, 2, 3 + 2 * heads * hd, 3).is_err());
    }

    /// The int8 codes round as `f32::round` does (half away from zero), on every half step and its neighbours.
    #[test]
    fn codes_round_half_away_from_zero() {
        for i in -256..=256 {
            let half = i as f32 / 2.0;
            for y in [half, half.next_up(), half.next_down(), half * 1.0001, half + 0.3, 127.00001, -127.00002] {
                assert_eq!(round_code(y), y.round().clamp(-127.0, 127.0) as i8, "{y}");
            }
        }
        for y in [f32::INFINITY, f32::NEG_INFINITY, 1e30, -1e30, f32::MAX, f32::MIN] {
            assert_eq!(round_code(y), y.round().clamp(-127.0, 127.0) as i8, "{y}");
        }
        assert_eq!(round_code(f32::NAN), 0);
        // A row whose largest value is subnormal: its scale is too, and 1 / scale infinite.
        let mut codes = [0i8; 3];
        quantize(&[1e-39, -1e-39, 0.0], &mut codes);
        assert_eq!(codes, [127, -127, 0]);
    }
}
