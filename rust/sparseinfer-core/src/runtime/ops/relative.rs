//! T5's relative position bias (Raffel et al., arXiv 1910.10683, section 2.1): a learned scalar per head and
//! per bucket of the key-minus-query distance, added to the attention scores. Distances up to half the
//! buckets get a bucket each; longer ones share logarithmically wider buckets up to `max_distance`, beyond
//! which they all fall in the last. Encoder attention is bidirectional (separate buckets for keys after the
//! query); decoder self-attention counts only keys at or before it.

use super::attention::RelBias;

/// The bucket of distance `rel = key position - query position`.
pub fn bucket(rel: i64, bidirectional: bool, buckets: usize, max_distance: usize) -> usize {
    let (mut n, mut base) = (buckets as i64, 0i64);
    let dist = if bidirectional {
        n /= 2;
        if rel > 0 {
            base = n;
        }
        rel.abs()
    } else {
        (-rel).max(0)
    };
    let exact = n / 2;
    if dist < exact {
        return (base + dist) as usize;
    }
    // Computed in f32 as the reference implementation does, so the bucket edges fall on the same distances;
    // the cast truncates toward zero (the value is non-negative).
    let log_ratio = (dist as f32 / exact as f32).ln() / (max_distance as f32 / exact as f32).ln();
    let large = exact + (log_ratio * (n - exact) as f32) as i64;
    (base + large.min(n - 1)) as usize
}

/// A stack's learned relative position bias: `[buckets × H]` tables, bucket-major.
#[derive(Clone, Debug)]
pub enum RelativeBias {
    /// One table for every block of the stack (T5 and mT5 learn it in the first block).
    Shared(Vec<f32>),
    /// One table per block, in block order (UMT5).
    PerLayer(Vec<Vec<f32>>),
}

impl RelativeBias {
    fn tables(&self) -> &[Vec<f32>] {
        match self {
            RelativeBias::Shared(t) => std::slice::from_ref(t),
            RelativeBias::PerLayer(ts) => ts,
        }
    }
}

/// The bias of every distance a step can see, for each table of a stack's [`RelativeBias`]: queries at
/// positions `q0..q0 + k` over keys `0..len`, so distances `-(q0 + k - 1)..=len - 1 - q0`.
pub struct BiasTable {
    /// Head-major biases of each table, `width` distances per head.
    values: Vec<Vec<f32>>,
    /// Block `l` reads table `l` (else table 0).
    per_layer: bool,
    width: usize,
    zero: usize,
}

impl BiasTable {
    /// The head-major biases of this step's distances, from every table of `bias` (`H` heads each).
    pub fn new(
        bias: &RelativeBias,
        heads: usize,
        bidirectional: bool,
        max_distance: usize,
        q0: usize,
        k: usize,
        len: usize,
    ) -> BiasTable {
        let tables = bias.tables();
        let buckets = tables.first().map_or(0, |w| w.len() / heads);
        let zero = q0 + k - 1;
        let width = len + k - 1;
        // A distance falls in the same bucket in every table: bucket once, then gather per table.
        let index: Vec<usize> =
            (0..width).map(|i| bucket(i as i64 - zero as i64, bidirectional, buckets, max_distance)).collect();
        let values = tables
            .iter()
            .map(|weights| {
                let mut values = vec![0.0f32; heads * width];
                for (i, &b) in index.iter().enumerate() {
                    for h in 0..heads {
                        values[h * width + i] = weights[b * heads + h];
                    }
                }
                values
            })
            .collect();
        BiasTable { values, per_layer: matches!(bias, RelativeBias::PerLayer(_)), width, zero }
    }

    /// The view the attention of block `layer` reads.
    pub fn view(&self, layer: usize) -> RelBias<'_> {
        let values = &self.values[if self.per_layer { layer } else { 0 }];
        RelBias { values, width: self.width, zero: self.zero }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_match_the_reference_values() {
        // Values of transformers' T5Attention._relative_position_bucket at 32 buckets, max distance 128.
        let bi: Vec<usize> = [-200i64, -128, -64, -20, -8, -7, -1, 0, 1, 7, 8, 20, 64, 127, 128, 500]
            .iter()
            .map(|&r| bucket(r, true, 32, 128))
            .collect();
        assert_eq!(bi, [15, 15, 14, 10, 8, 7, 1, 0, 17, 23, 24, 26, 30, 31, 31, 31]);
        let uni: Vec<usize> =
            [-500i64, -128, -64, -20, -16, -15, -1, 0, 5].iter().map(|&r| bucket(r, false, 32, 128)).collect();
        assert_eq!(uni, [31, 31, 26, 17, 16, 15, 1, 0, 0]);
    }

    #[test]
    fn each_block_reads_its_own_table_or_the_shared_one() {
        // Two heads, 8 buckets; table t holds 100·t + 10·bucket + head.
        let table = |t: usize| (0..16).map(|i| (100 * t + 10 * (i / 2) + i % 2) as f32).collect::<Vec<_>>();
        // Decoding one token at position 5 over keys 0..6: distances -5..=0, buckets 4, 4, 3, 2, 1, 0.
        let want =
            |t: usize, h: usize| [4.0, 4.0, 3.0, 2.0, 1.0, 0.0].map(|b: f32| 100.0 * t as f32 + 10.0 * b + h as f32);
        let per_layer =
            BiasTable::new(&RelativeBias::PerLayer(vec![table(0), table(1), table(2)]), 2, false, 16, 5, 1, 6);
        let shared = BiasTable::new(&RelativeBias::Shared(table(0)), 2, false, 16, 5, 1, 6);
        for layer in 0..3 {
            for (t, view) in [(layer, per_layer.view(layer)), (0, shared.view(layer))] {
                assert_eq!((view.width, view.zero), (6, 5));
                for h in 0..2 {
                    assert_eq!(view.values[h * 6..(h + 1) * 6], want(t, h), "layer {layer}, head {h}");
                }
            }
        }
    }
}
