//! Layer normalisation: RMSNorm (Zhang & Sennrich, arXiv 1910.07467) and LayerNorm (Ba et al., arXiv
//! 1607.06450), row by row over the residual stream.

/// Norm weights (`D` values each).
pub struct NormW {
    /// Scale.
    pub w: Vec<f32>,
    /// Shift (LayerNorm with bias only).
    pub b: Option<Vec<f32>>,
}

/// Layer normalisation kind.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum NormKind {
    /// `x / sqrt(mean(x²) + eps) · w` (Llama family).
    Rms,
    /// `(x - mean) / sqrt(var + eps) · w (+ b)`.
    LayerNorm {
        /// Whether the checkpoint carries a bias.
        bias: bool,
    },
}

impl NormW {
    /// Normalises `x[k × D]` row by row into `out[k × D]` (rows split over the thread pool when there are many).
    pub fn forward(&self, kind: NormKind, eps: f32, x: &[f32], out: &mut [f32]) {
        let d = self.w.len();
        crate::parallel::for_rows(out, d, |r0, out| self.rows(kind, eps, &x[r0 * d..r0 * d + out.len()], out));
    }

    fn rows(&self, kind: NormKind, eps: f32, x: &[f32], out: &mut [f32]) {
        let d = self.w.len();
        for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            match kind {
                NormKind::Rms => {
                    let ms = lane_sum(xr, |v| v * v) / d as f32;
                    let r = 1.0 / (ms + eps).sqrt();
                    or.iter_mut().zip(xr).zip(&self.w).for_each(|((o, x), w)| *o = x * r * w);
                }
                NormKind::LayerNorm { .. } => {
                    let mean = lane_sum(xr, |v| v) / d as f32;
                    let var = lane_sum(xr, |v| (v - mean) * (v - mean)) / d as f32;
                    let r = 1.0 / (var + eps).sqrt();
                    or.iter_mut().zip(xr).zip(&self.w).for_each(|((o, x), w)| *o = (x - mean) * r * w);
                    if let Some(b) = &self.b {
                        or.iter_mut().zip(b).for_each(|(o, b)| *o += b);
                    }
                }
            }
        }
    }
}

/// `Σ f(x)` in 16 running sums (a sequential f32 sum is one chain of dependent adds, which no compiler may
/// reorder into vector lanes).
#[inline(always)]
fn lane_sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0.0f32; 16];
    let chunks = xs.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        lanes.iter_mut().zip(c).for_each(|(l, &v)| *l += f(v));
    }
    lanes.iter_mut().zip(rest).for_each(|(l, &v)| *l += f(v));
    lanes.iter().sum()
}
