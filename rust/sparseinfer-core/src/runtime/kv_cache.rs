//! The key/value cache of one sequence. It grows with the positions written, so a large capacity (a long
//! context in `config.json`, a large `max_new_tokens`) costs nothing until it is used.
//!
//! Layout: one buffer per layer and key/value head, positions back to back, so one head's keys are
//! contiguous for the attention dot products:
//!
//! ```text
//! keys[layer · kv_heads + kv_head][position][head_dim]     values[...] likewise
//! ```

use super::ops::attention::KvView;
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
    /// Keys are packed in panels ([`KvCache::freeze`]), no longer `[position][head_dim]`.
    frozen: bool,
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
        }
    }

    /// Ends the cache's growth (cross-attention keys and values, written once per input) and packs each head's
    /// keys in panels ([`key_panels`]), so every attention call over them takes the blocked kernels without a
    /// copy.
    pub fn freeze(&mut self) {
        if !self.frozen {
            let (n, hd) = (self.len, self.head_dim);
            for k in &mut self.keys {
                *k = key_panels(k, n, hd);
            }
            for v in &mut self.values {
                v.truncate(n * hd);
            }
            self.frozen = true;
        }
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

    /// Forgets every position (keeps the memory; a frozen cache grows again).
    pub fn clear(&mut self) {
        self.len = 0;
        self.frozen = false;
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

    /// Keys and values of one head of one layer, `positions written × head_dim` each (keys in panels once
    /// frozen).
    pub fn head(&self, layer: usize, head: usize) -> (&[f32], &[f32]) {
        self.layer(layer).head(head)
    }

    /// The keys and values of `layer`, as attention reads them.
    pub fn layer(&self, layer: usize) -> KvView<'_> {
        let heads = layer * self.kv_heads..(layer + 1) * self.kv_heads;
        let (keys, values) = (&self.keys[heads.clone()], &self.values[heads]);
        if self.frozen {
            KvView::with_key_panels(keys, values)
        } else {
            KvView::new(keys, values)
        }
    }

    /// Marks `n` more positions as filled (after every layer wrote them); a frozen cache stays as it is.
    pub fn advance(&mut self, n: usize) {
        if !self.frozen {
            self.len = (self.len + n).min(self.capacity);
        }
    }
}
