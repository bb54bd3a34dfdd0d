//! The key/value cache of one sequence. It grows with the positions written, so a large capacity (a long
//! context in `config.json`, a large `max_new_tokens`) costs nothing until it is used.
//!
//! Layout: one buffer per layer and key/value head, positions back to back, so one head's keys are
//! contiguous for the attention dot products:
//!
//! ```text
//! keys[layer · kv_heads + kv_head][position][head_dim]     values[...] likewise
//! ```

use super::ops::attention::{KvView, Store};
use crate::error::{Error, Result};
use crate::kernels::vector::key_panels;

/// Cached keys and values for up to `capacity` positions.
pub struct KvCache {
    kv_heads: usize,
    head_dim: usize,
    capacity: usize,
    len: usize,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    /// Set by [`KvCache::freeze`]: keys packed in panels, no longer `[position][head_dim]`.
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

/// Symmetric int8 codes of `[n × hd]` rows, one scale per row (`max |x| / 127`): each value is within half a
/// scale step of `scale · code`.
fn quantize_rows(x: &[f32], n: usize, hd: usize) -> (Vec<i8>, Vec<f32>) {
    let mut codes = vec![0i8; n * hd];
    let mut scales = Vec::with_capacity(n);
    for (row, out) in x[..n * hd].chunks_exact(hd.max(1)).zip(codes.chunks_exact_mut(hd.max(1))) {
        let s = row.iter().fold(0.0f32, |a, v| a.max(v.abs())) / 127.0;
        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
        row.iter().zip(out).for_each(|(v, c)| *c = (v * inv).round().clamp(-127.0, 127.0) as i8);
        scales.push(s);
    }
    (codes, scales)
}

impl KvCache {
    /// An empty cache with room for `capacity` positions (memory: `2 · layers · kv_heads · head_dim` floats
    /// per position written).
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

    /// Ends the cache's growth (cross-attention keys and values, written once per input) and packs each head's
    /// keys in panels (`kernels::vector::key_panels`), so every attention call over them takes the blocked
    /// kernels without a copy; with `int8`, keys and values are stored as int8 codes with one scale per
    /// position and head (a quarter of the bytes every decoding step reads).
    pub fn freeze(&mut self, int8: bool) {
        if self.frozen {
            return;
        }
        let (n, hd) = (self.len, self.head_dim);
        if int8 {
            let (keys, key_scales): (Vec<_>, Vec<_>) = std::mem::take(&mut self.keys)
                .iter()
                .map(|k| {
                    let (codes, scales) = quantize_rows(k, n, hd);
                    (key_panels(&codes, n, hd), scales)
                })
                .unzip();
            let (values, value_scales) =
                std::mem::take(&mut self.values).iter().map(|v| quantize_rows(v, n, hd)).unzip();
            self.int8 = Some(Box::new(Int8 { keys, key_scales, values, value_scales }));
        } else {
            for k in &mut self.keys {
                *k = key_panels(k, n, hd);
            }
            for v in &mut self.values {
                v.truncate(n * hd);
            }
        }
        self.frozen = true;
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
        for h in 0..self.kv_heads {
            let i = layer * self.kv_heads + h;
            for (buf, src) in
                [(&mut self.keys[i], &k[h * hd..(h + 1) * hd]), (&mut self.values[i], &v[h * hd..(h + 1) * hd])]
            {
                let at = pos * hd;
                if buf.len() < at + hd {
                    let grow = at + hd - buf.len();
                    buf.try_reserve(grow)
                        .map_err(|_| Error::invalid("kv cache", format!("not enough memory for position {pos}")))?;
                    buf.resize(at + hd, 0.0);
                }
                buf[at..at + hd].copy_from_slice(src);
            }
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
            None if self.frozen => total(&self.keys) + total(&self.values),
            None => 2 * self.keys.len() * self.len * self.head_dim * 4,
        }
    }

    /// Keys and values of one head of one layer, `positions written × head_dim` each, while the cache grows.
    pub fn head(&self, layer: usize, head: usize) -> Option<(&[f32], &[f32])> {
        self.layer(layer).rows(head)
    }

    /// The keys and values of `layer`, as attention reads them.
    pub fn layer(&self, layer: usize) -> KvView<'_> {
        let heads = layer * self.kv_heads..(layer + 1) * self.kv_heads;
        match &self.int8 {
            Some(q) => KvView::packed(Store::PanelsI8 {
                keys: &q.keys[heads.clone()],
                key_scales: &q.key_scales[heads.clone()],
                values: &q.values[heads.clone()],
                value_scales: &q.value_scales[heads],
            }),
            None if self.frozen => {
                KvView::packed(Store::Panels { keys: &self.keys[heads.clone()], values: &self.values[heads] })
            }
            None => KvView::new(&self.keys[heads.clone()], &self.values[heads]),
        }
    }

    /// Marks `n` more positions as filled (after every layer wrote them); a frozen cache stays as it is.
    pub fn advance(&mut self, n: usize) {
        if !self.frozen {
            self.len = (self.len + n).min(self.capacity);
        }
    }
}
