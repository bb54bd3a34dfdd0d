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

/// The bias of every distance a step can see, from the learned `weights[buckets × H]`: queries at positions
/// `q0..q0 + k` over keys `0..len`, so distances `-(q0 + k - 1)..=len - 1 - q0`.
pub struct BiasTable {
    values: Vec<f32>,
    width: usize,
    zero: usize,
}

impl BiasTable {
    /// The table of head-major biases for this step's distances.
    pub fn new(
        weights: &[f32],
        heads: usize,
        bidirectional: bool,
        max_distance: usize,
        q0: usize,
        k: usize,
        len: usize,
    ) -> BiasTable {
        let buckets = weights.len() / heads;
        let zero = q0 + k - 1;
        let width = len + k - 1;
        let mut values = vec![0.0f32; heads * width];
        for i in 0..width {
            let rel = i as i64 - zero as i64;
            let b = bucket(rel, bidirectional, buckets, max_distance);
            for h in 0..heads {
                values[h * width + i] = weights[b * heads + h];
            }
        }
        BiasTable { values, width, zero }
    }

    /// The view attention reads.
    pub fn view(&self) -> RelBias<'_> {
        RelBias { values: &self.values, width: self.width, zero: self.zero }
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
}
