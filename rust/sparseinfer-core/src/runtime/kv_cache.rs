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
//! A cache that stops growing (cross-attention's, written once per input) can be frozen to int8 codes with one
//! scale per position and head.

use super::ops::attention::KvView;
use crate::error::{Error, Result};
use crate::kernels::vector::{key_panels, PANEL};

/// Cached keys and values for up to `capacity` positions.
pub struct KvCache {
    kv_heads: usize,
    head_dim: usize,
    capacity: usize,
    len: usize,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    /// Set by [`KvCache::freeze`]: no more positions are written.
    frozen: bool,
    /// Int8 codes and per-position scales of keys (in panels) and values, when frozen as int8 (the f32 buffers
    /// are then empty).
    int8: Option<Box<Int8>>,
}

struct Int8 {
    keys: Vec<Vec<i8>>,
    key_scales: Vec<Vec<f32>>,
    values: Vec<Vec<i8>>,
    value_scales: Vec<Vec<f32>>,
}

/// Symmetric int8 codes of `n` rows of `hd` values (row `j`'s value `d` at `at(j, d)`), one scale per row
/// (`max |x| / 127`): each value is within half a scale step of `scale · code`. Codes come back position-major.
fn quantize_rows(n: usize, hd: usize, at: impl Fn(usize, usize) -> f32) -> (Vec<i8>, Vec<f32>) {
    let mut codes = vec![0i8; n * hd];
    let mut scales = Vec::with_capacity(n);
    for j in 0..n {
        let s = (0..hd).fold(0.0f32, |a, d| a.max(at(j, d).abs())) / 127.0;
        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
        for d in 0..hd {
            codes[j * hd + d] = (at(j, d) * inv).round().clamp(-127.0, 127.0) as i8;
        }
        scales.push(s);
    }
    (codes, scales)
}

/// Grows `buf` with zeros to `len` values, failing (rather than aborting) when memory cannot be had.
fn grow(buf: &mut Vec<f32>, len: usize, pos: usize) -> Result<()> {
    if buf.len() < len {
        buf.try_reserve(len - buf.len())
            .map_err(|_| Error::invalid("kv cache", format!("not enough memory for position {pos}")))?;
        buf.resize(len, 0.0);
    }
    Ok(())
}

impl KvCache {
    /// An empty cache with room for `capacity` positions (memory: `2 · layers · kv_heads · head_dim` floats
    /// per position written, keys rounded up to whole panels).
    pub fn new(layers: usize, kv_heads: usize, head_dim: usize, capacity: usize) -> KvCache {
        let heads = layers * kv_heads;
        KvCache {
            kv_heads,
            head_dim,
            capacity,
            len: 0,
            keys: (0..heads).map(|_| Vec::new()).collect(),
            values: (0..heads).map(|_| Vec::new()).collect(),
            frozen: false,
            int8: None,
        }
    }

    /// Ends the cache's growth; with `int8`, stores keys and values as int8 codes with one scale per position
    /// and head (a quarter of the bytes each attention call reads).
    pub fn freeze(&mut self, int8: bool) {
        if self.frozen {
            return;
        }
        self.frozen = true;
        if !int8 {
            return;
        }
        let (n, hd) = (self.len, self.head_dim);
        let (keys, key_scales): (Vec<_>, Vec<_>) = std::mem::take(&mut self.keys)
            .iter()
            .map(|k| {
                let (codes, scales) = quantize_rows(n, hd, |j, d| k[(j / PANEL) * hd * PANEL + d * PANEL + j % PANEL]);
                (key_panels(&codes, n, hd), scales)
            })
            .unzip();
        let (values, value_scales) =
            std::mem::take(&mut self.values).iter().map(|v| quantize_rows(n, hd, |j, d| v[j * hd + d])).unzip();
        self.int8 = Some(Box::new(Int8 { keys, key_scales, values, value_scales }));
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

    /// Forgets every position (keeps the f32 memory; a frozen cache grows again).
    pub fn clear(&mut self) {
        self.len = 0;
        self.frozen = false;
        if let Some(q) = self.int8.take() {
            let heads = q.keys.len();
            self.keys = (0..heads).map(|_| Vec::new()).collect();
            self.values = (0..heads).map(|_| Vec::new()).collect();
        }
    }

    /// Drops positions from `len` on (for reusing a shared prefix). A frozen cache keeps its length.
    pub fn truncate(&mut self, len: usize) {
        if !self.frozen {
            self.len = self.len.min(len);
        }
    }

    /// Stores the keys and values (`kv_heads × head_dim` each) of position `pos` (at most `len()`) in `layer`.
    /// Fails, rather than aborting, when memory for a new position cannot be had.
    pub fn write(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) -> Result<()> {
        let hd = self.head_dim;
        if self.frozen {
            return Err(Error::invalid("kv cache", "the cache is frozen"));
        }
        if pos >= self.capacity {
            return Err(Error::invalid("kv cache", format!("position {pos} is past the capacity {}", self.capacity)));
        }
        let panel = (pos / PANEL) * hd * PANEL;
        for h in 0..self.kv_heads {
            let i = layer * self.kv_heads + h;
            let keys = &mut self.keys[i];
            grow(keys, panel + hd * PANEL, pos)?;
            for (d, &x) in k[h * hd..(h + 1) * hd].iter().enumerate() {
                keys[panel + d * PANEL + pos % PANEL] = x;
            }
            let values = &mut self.values[i];
            grow(values, (pos + 1) * hd, pos)?;
            values[pos * hd..(pos + 1) * hd].copy_from_slice(&v[h * hd..(h + 1) * hd]);
        }
        Ok(())
    }

    /// Bytes the cache's keys and values occupy (what attention over every position reads).
    pub fn bytes(&self) -> usize {
        let total = |v: &[Vec<f32>]| v.iter().map(|x| x.len() * 4).sum::<usize>();
        match &self.int8 {
            Some(q) => {
                let codes = |v: &[Vec<i8>]| v.iter().map(Vec::len).sum::<usize>();
                codes(&q.keys) + codes(&q.values) + total(&q.key_scales) + total(&q.value_scales)
            }
            None => total(&self.keys) + total(&self.values),
        }
    }

    /// The keys and values of `layer`, as attention reads them.
    pub fn layer(&self, layer: usize) -> KvView<'_> {
        let heads = layer * self.kv_heads..(layer + 1) * self.kv_heads;
        match &self.int8 {
            Some(q) => KvView::I8 {
                keys: &q.keys[heads.clone()],
                key_scales: &q.key_scales[heads.clone()],
                values: &q.values[heads.clone()],
                value_scales: &q.value_scales[heads],
            },
            None => KvView::F32 { keys: &self.keys[heads.clone()], values: &self.values[heads] },
        }
    }

    /// Marks `n` more positions as filled (after every layer wrote them); a frozen cache stays as it is.
    pub fn advance(&mut self, n: usize) {
        if !self.frozen {
            self.len = (self.len + n).min(self.capacity);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Positions written one by one land where the key panels of the whole sequence put them, across a panel
    /// boundary, and freezing to int8 keeps every value within half a step of its scale.
    #[test]
    fn writes_fill_key_panels_and_int8_codes_stay_close() {
        let (heads, hd, n) = (2, 8, PANEL + 5);
        let val = |i: usize| ((i * 7 + 3) % 23) as f32 / 11.0 - 1.0;
        let mut cache = KvCache::new(1, heads, hd, 100);
        let rows: Vec<Vec<f32>> = (0..n).map(|p| (0..2 * heads * hd).map(|i| val(p * 97 + i)).collect()).collect();
        for (p, r) in rows.iter().enumerate() {
            cache.write(0, p, &r[..heads * hd], &r[heads * hd..]).unwrap();
            cache.advance(1);
        }
        let KvView::F32 { keys, values } = cache.layer(0) else { panic!("f32 while growing") };
        for h in 0..heads {
            let k: Vec<f32> = rows.iter().flat_map(|r| r[h * hd..(h + 1) * hd].to_vec()).collect();
            assert_eq!(keys[h][..key_panels(&k, n, hd).len()], key_panels(&k, n, hd)[..]);
            let v: Vec<f32> = rows.iter().flat_map(|r| r[(heads + h) * hd..(heads + h + 1) * hd].to_vec()).collect();
            assert_eq!(values[h][..n * hd], v[..]);
        }
        cache.freeze(true);
        assert!(cache.write(0, n, &rows[0][..heads * hd], &rows[0][heads * hd..]).is_err());
        let KvView::I8 { keys, key_scales, values, value_scales } = cache.layer(0) else { panic!("int8") };
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
        // Key code panels (padded), value codes, two scales per position and head.
        assert_eq!(cache.bytes(), heads * (n.div_ceil(PANEL) * PANEL * hd + n * hd + 8 * n));
        cache.clear();
        assert!(cache.write(0, 0, &rows[0][..heads * hd], &rows[0][heads * hd..]).is_ok());
    }
}
