//! The key/value cache of one sequence, preallocated for its whole capacity.
//!
//! Layout per layer and per key/value head: `capacity × head_dim` keys, then the same for values, so one
//! head's keys are contiguous for the attention dot products:
//!
//! ```text
//! keys[layer][kv_head][position][head_dim]     values[layer][kv_head][position][head_dim]
//! ```

/// Cached keys and values for up to `capacity` positions.
pub struct KvCache {
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    capacity: usize,
    len: usize,
    keys: Vec<f32>,
    values: Vec<f32>,
}

impl KvCache {
    /// An empty cache (memory: `2 · layers · kv_heads · capacity · head_dim` floats).
    pub fn new(layers: usize, kv_heads: usize, head_dim: usize, capacity: usize) -> KvCache {
        let n = layers * kv_heads * capacity * head_dim;
        KvCache { layers, kv_heads, head_dim, capacity, len: 0, keys: vec![0.0; n], values: vec![0.0; n] }
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

    fn base(&self, layer: usize, head: usize) -> usize {
        debug_assert!(layer < self.layers && head < self.kv_heads);
        (layer * self.kv_heads + head) * self.capacity * self.head_dim
    }

    /// Stores the keys and values (`kv_heads × head_dim` each) of position `pos` in `layer`.
    pub fn write(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let hd = self.head_dim;
        for h in 0..self.kv_heads {
            let at = self.base(layer, h) + pos * hd;
            self.keys[at..at + hd].copy_from_slice(&k[h * hd..(h + 1) * hd]);
            self.values[at..at + hd].copy_from_slice(&v[h * hd..(h + 1) * hd]);
        }
    }

    /// Keys and values of one head of one layer, `capacity × head_dim` each (valid up to the written ones).
    pub fn head(&self, layer: usize, head: usize) -> (&[f32], &[f32]) {
        let (b, n) = (self.base(layer, head), self.capacity * self.head_dim);
        (&self.keys[b..b + n], &self.values[b..b + n])
    }

    /// Marks `n` more positions as filled (after every layer wrote them).
    pub fn advance(&mut self, n: usize) {
        self.len = (self.len + n).min(self.capacity);
    }
}
