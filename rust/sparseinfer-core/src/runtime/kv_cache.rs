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
//! An int8 cache stores codes instead, one scale per position and head, quantized as each position is written.

use super::ops::attention::KvView;
use crate::error::{Error, Result};
#[cfg(test)]
use crate::kernels::vector::key_panels;
use crate::kernels::vector::PANEL;

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
    I8(Box<Int8>),
}

/// Int8 codes, one scale per position (`max |x| / 127` of the head's row).
struct Int8 {
    keys: Vec<Vec<i8>>,
    key_scales: Vec<Vec<f32>>,
    values: Vec<Vec<i8>>,
    value_scales: Vec<Vec<f32>>,
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
pub(crate) fn quantize(x: &[f32], codes: &mut [i8]) -> f32 {
    let s = x.iter().fold(0.0f32, |a, v| a.max(v.abs())) / 127.0;
    let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
    x.iter().zip(codes).for_each(|(v, c)| *c = (v * inv).round().clamp(-127.0, 127.0) as i8);
    s
}

/// How self-attention caches store keys and values: f32, or int8 codes with one scale per position and head
/// (a quarter of the bytes every decoding step reads, which dominate long contexts; values move by up to half a
/// code step).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvFormat {
    /// f32 keys and values.
    #[default]
    F32,
    /// int8 codes, one scale per position and head.
    Int8,
}

impl KvFormat {
    /// The format called `name` (`"f32"` or `"int8"`).
    pub fn from_name(name: &str) -> Result<KvFormat> {
        match name {
            "f32" => Ok(KvFormat::F32),
            "int8" => Ok(KvFormat::Int8),
            _ => Err(Error::invalid("load", format!("kv_cache: unknown format {name:?}; expected f32 or int8"))),
        }
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            KvFormat::F32 => "f32",
            KvFormat::Int8 => "int8",
        }
    }
}

impl KvCache {
    /// An empty cache in `format` (see [`KvCache::new`] and [`KvCache::new_int8`]).
    pub fn with_format(format: KvFormat, layers: usize, kv_heads: usize, head_dim: usize, capacity: usize) -> KvCache {
        match format {
            KvFormat::F32 => KvCache::new(layers, kv_heads, head_dim, capacity),
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

    /// Stores the keys and values (`kv_heads × head_dim` each) of position `pos` (at most `len()`) in `layer`.
    /// Fails, rather than aborting, when memory for a new position cannot be had.
    pub fn write(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) -> Result<()> {
        let hd = self.head_dim;
        if pos >= self.capacity {
            return Err(Error::invalid("kv cache", format!("position {pos} is past the capacity {}", self.capacity)));
        }
        let panel = (pos / PANEL) * hd * PANEL;
        // One head's key codes on their way into the panel (allocated by int8 caches only).
        let mut codes = Vec::new();
        for h in 0..self.kv_heads {
            let i = layer * self.kv_heads + h;
            let (kh, vh) = (&k[h * hd..(h + 1) * hd], &v[h * hd..(h + 1) * hd]);
            match &mut self.store {
                Store::F32 { keys, values } => {
                    grow(&mut keys[i], panel + hd * PANEL, pos)?;
                    kh.iter().enumerate().for_each(|(d, &x)| keys[i][panel + d * PANEL + pos % PANEL] = x);
                    grow(&mut values[i], (pos + 1) * hd, pos)?;
                    values[i][pos * hd..(pos + 1) * hd].copy_from_slice(vh);
                }
                Store::I8(q) => {
                    let Int8 { keys, key_scales, values, value_scales } = &mut **q;
                    grow(&mut keys[i], panel + hd * PANEL, pos)?;
                    grow(&mut key_scales[i], pos + 1, pos)?;
                    codes.resize(hd, 0);
                    key_scales[i][pos] = quantize(kh, &mut codes);
                    codes.iter().enumerate().for_each(|(d, &c)| keys[i][panel + d * PANEL + pos % PANEL] = c);
                    grow(&mut values[i], (pos + 1) * hd, pos)?;
                    grow(&mut value_scales[i], pos + 1, pos)?;
                    value_scales[i][pos] = quantize(vh, &mut values[i][pos * hd..(pos + 1) * hd]);
                }
            }
        }
        Ok(())
    }

    /// Bytes of the keys and values of the positions filled (what attention over all of them reads).
    pub fn bytes(&self) -> usize {
        let (heads, per_position) = match &self.store {
            Store::F32 { keys, .. } => (keys.len(), 2 * self.head_dim * 4),
            Store::I8(q) => (q.keys.len(), 2 * (self.head_dim + 4)),
        };
        heads * self.len * per_position
    }

    /// The keys and values of `layer`, as attention reads them.
    pub fn layer(&self, layer: usize) -> KvView<'_> {
        let h = layer * self.kv_heads..(layer + 1) * self.kv_heads;
        match &self.store {
            Store::F32 { keys, values } => KvView::F32 { keys: &keys[h.clone()], values: &values[h] },
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
    /// boundary; an int8 cache keeps every value within half a step of its scale.
    #[test]
    fn writes_fill_key_panels_and_int8_codes_stay_close() {
        let (heads, hd, n) = (2, 8, PANEL + 5);
        let val = |i: usize| ((i * 7 + 3) % 23) as f32 / 11.0 - 1.0;
        let rows: Vec<Vec<f32>> = (0..n).map(|p| (0..2 * heads * hd).map(|i| val(p * 97 + i)).collect()).collect();
        let (mut cache, mut int8) = (KvCache::new(1, heads, hd, 100), KvCache::new_int8(1, heads, hd, 100));
        for c in [&mut cache, &mut int8] {
            for (p, r) in rows.iter().enumerate() {
                c.write(0, p, &r[..heads * hd], &r[heads * hd..]).unwrap();
                c.advance(1);
            }
        }
        let KvView::F32 { keys, values } = cache.layer(0) else { panic!("f32") };
        for h in 0..heads {
            let k: Vec<f32> = rows.iter().flat_map(|r| r[h * hd..(h + 1) * hd].to_vec()).collect();
            assert_eq!(keys[h][..key_panels(&k, n, hd).len()], key_panels(&k, n, hd)[..]);
            let v: Vec<f32> = rows.iter().flat_map(|r| r[(heads + h) * hd..(heads + h + 1) * hd].to_vec()).collect();
            assert_eq!(values[h][..n * hd], v[..]);
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
        assert_eq!((cache.bytes(), int8.bytes()), (heads * n * 2 * hd * 4, heads * n * 2 * (hd + 4)));
        assert!(cache.write(0, 100, &rows[0][..heads * hd], &rows[0][heads * hd..]).is_err());
    }
}
