//! Small f32 vector operations for the attention loops (`q·k` and `o += p·v`, one query at a time or four),
//! with an AVX2+FMA variant picked by the active ISA. The scalar versions are the reference; results differ
//! only by summation order and FMA rounding.

#[cfg(target_arch = "x86_64")]
use super::{active_isa, Isa};

/// `(q[4 × hd], kt[hd × n], n, positions, out[4 × L])`: see [`scores4_scalar`].
pub type Scores4 = fn(&[f32], &[f32], usize, std::ops::Range<usize>, &mut [f32]);

/// The dot and axpy functions of the active ISA, chosen once. Loops that call them per element (attention
/// calls `dot` once per cached position) should pick them with this instead of dispatching on every call.
#[derive(Clone, Copy)]
pub struct VectorOps {
    /// `Σ a[i]·b[i]`.
    pub dot: fn(&[f32], &[f32]) -> f32,
    /// `y[i] += alpha·x[i]`.
    pub axpy: fn(f32, &[f32], &mut [f32]),
    /// Scores of four queries: see [`scores4_scalar`].
    pub scores4: Scores4,
    /// Weighted value sums of four queries: see [`weighted4_scalar`].
    pub weighted4: fn(&[f32], &[f32], usize, usize, &mut [f32]),
}

/// The operations for the active ISA (AVX2+FMA on every SIMD path, else the scalar reference).
pub fn ops() -> VectorOps {
    #[cfg(target_arch = "x86_64")]
    if active_isa().is_ok_and(|i| i != Isa::Scalar) {
        return VectorOps {
            dot: x86::dot_checked,
            axpy: x86::axpy_checked,
            scores4: x86::scores4_checked,
            weighted4: x86::weighted4_checked,
        };
    }
    VectorOps { dot: dot_scalar, axpy: axpy_scalar, scores4: scores4_scalar, weighted4: weighted4_scalar }
}

/// `Σ a[i]·b[i]` on the active ISA.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    (ops().dot)(a, b)
}

/// `y[i] += alpha·x[i]` on the active ISA.
pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    (ops().axpy)(alpha, x, y)
}

/// The reference axpy.
pub fn axpy_scalar(alpha: f32, x: &[f32], y: &mut [f32]) {
    y.iter_mut().zip(x).for_each(|(y, x)| *y += alpha * x);
}

/// The reference dot product, eight partial sums.
pub fn dot_scalar(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The reference for four queries' scores over transposed keys: `out[a · L + j - start] = Σ_d q[a · hd + d] ·
/// kt[d · n + j]` for queries `a < 4`, positions `j` in `range` (`L` long), `hd = q.len() / 4` dimensions of `n`
/// positions each in `kt`.
pub fn scores4_scalar(q: &[f32], kt: &[f32], n: usize, range: std::ops::Range<usize>, out: &mut [f32]) {
    let (hd, l) = (q.len() / 4, range.len());
    out[..4 * l].fill(0.0);
    for d in 0..hd {
        let row = &kt[d * n + range.start..d * n + range.end];
        for a in 0..4 {
            let qa = q[a * hd + d];
            out[a * l..(a + 1) * l].iter_mut().zip(row).for_each(|(o, k)| *o += qa * k);
        }
    }
}

/// The reference for four queries' weighted sums of position-major values: `out[a · hd + d] = Σ_i p[a · L + i]
/// · v[(start + i) · hd + d]` for `L = p.len() / 4` positions from `start`.
pub fn weighted4_scalar(p: &[f32], v: &[f32], hd: usize, start: usize, out: &mut [f32]) {
    let l = p.len() / 4;
    out[..4 * hd].fill(0.0);
    for i in 0..l {
        let row = &v[(start + i) * hd..(start + i + 1) * hd];
        for a in 0..4 {
            let pa = p[a * l + i];
            out[a * hd..(a + 1) * hd].iter_mut().zip(row).for_each(|(o, x)| *o += pa * x);
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use core::arch::x86_64::*;

    /// [`dot`] behind a safe signature; only installed by [`super::ops`] when a SIMD ISA (hence AVX2+FMA) is
    /// active.
    pub fn dot_checked(a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: `ops` returns this only when the active ISA implies AVX2 and FMA.
        unsafe { dot(a, b) }
    }

    /// [`axpy`] behind a safe signature, under the same condition.
    pub fn axpy_checked(alpha: f32, x: &[f32], y: &mut [f32]) {
        // SAFETY: as for `dot_checked`.
        unsafe { axpy(alpha, x, y) }
    }

    /// [`scores4`] behind a safe signature, under the same condition.
    pub fn scores4_checked(q: &[f32], kt: &[f32], n: usize, range: std::ops::Range<usize>, out: &mut [f32]) {
        let hd = q.len() / 4;
        assert!(hd == 0 || (range.end <= n && kt.len() >= (hd - 1) * n + range.end), "keys out of range");
        assert!(out.len() >= 4 * range.len(), "output too short");
        // SAFETY: as for `dot_checked`; the bounds are checked above.
        unsafe { scores4(q, kt, n, range, out) }
    }

    /// [`weighted4`] behind a safe signature, under the same condition.
    pub fn weighted4_checked(p: &[f32], v: &[f32], hd: usize, start: usize, out: &mut [f32]) {
        assert!(v.len() >= (start + p.len() / 4) * hd && out.len() >= 4 * hd, "values out of range");
        // SAFETY: as for `dot_checked`; the bounds are checked above.
        unsafe { weighted4(p, v, hd, start, out) }
    }

    /// [`super::scores4_scalar`]: 16 positions × 4 queries in 8 accumulators, one key load shared by four
    /// FMAs.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `kt` must hold `hd` rows of `n` with `range` inside, `out` `4 · L`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn scores4(q: &[f32], kt: &[f32], n: usize, range: std::ops::Range<usize>, out: &mut [f32]) {
        let (hd, l) = (q.len() / 4, range.len());
        let (kp, op) = (kt.as_ptr(), out.as_mut_ptr());
        let mut j = 0;
        while j + 16 <= l {
            let mut acc = [_mm256_setzero_ps(); 8];
            for d in 0..hd {
                let row = kp.add(d * n + range.start + j);
                let (k0, k1) = (_mm256_loadu_ps(row), _mm256_loadu_ps(row.add(8)));
                for a in 0..4 {
                    let b = _mm256_set1_ps(*q.get_unchecked(a * hd + d));
                    acc[2 * a] = _mm256_fmadd_ps(b, k0, acc[2 * a]);
                    acc[2 * a + 1] = _mm256_fmadd_ps(b, k1, acc[2 * a + 1]);
                }
            }
            for a in 0..4 {
                _mm256_storeu_ps(op.add(a * l + j), acc[2 * a]);
                _mm256_storeu_ps(op.add(a * l + j + 8), acc[2 * a + 1]);
            }
            j += 16;
        }
        // The last positions, scalar.
        for jj in j..l {
            for a in 0..4 {
                let mut s = 0.0f32;
                for d in 0..hd {
                    s += q[a * hd + d] * kt[d * n + range.start + jj];
                }
                out[a * l + jj] = s;
            }
        }
    }

    /// [`super::weighted4_scalar`]: 16 dimensions × 4 queries in 8 accumulators over every position.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `v` must hold rows `start..start + L` of `hd`, `out` `4 · hd`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn weighted4(p: &[f32], v: &[f32], hd: usize, start: usize, out: &mut [f32]) {
        let l = p.len() / 4;
        let (vp, op) = (v.as_ptr(), out.as_mut_ptr());
        let mut d0 = 0;
        while d0 + 16 <= hd {
            let mut acc = [_mm256_setzero_ps(); 8];
            for i in 0..l {
                let row = vp.add((start + i) * hd + d0);
                let (v0, v1) = (_mm256_loadu_ps(row), _mm256_loadu_ps(row.add(8)));
                for a in 0..4 {
                    let b = _mm256_set1_ps(*p.get_unchecked(a * l + i));
                    acc[2 * a] = _mm256_fmadd_ps(b, v0, acc[2 * a]);
                    acc[2 * a + 1] = _mm256_fmadd_ps(b, v1, acc[2 * a + 1]);
                }
            }
            for a in 0..4 {
                _mm256_storeu_ps(op.add(a * hd + d0), acc[2 * a]);
                _mm256_storeu_ps(op.add(a * hd + d0 + 8), acc[2 * a + 1]);
            }
            d0 += 16;
        }
        for d in d0..hd {
            for a in 0..4 {
                let mut s = 0.0f32;
                for i in 0..l {
                    s += p[a * l + i] * v[(start + i) * hd + d];
                }
                out[a * hd + d] = s;
            }
        }
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 16 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a.as_ptr().add(i)), _mm256_loadu_ps(b.as_ptr().add(i)), acc0);
            acc1 =
                _mm256_fmadd_ps(_mm256_loadu_ps(a.as_ptr().add(i + 8)), _mm256_loadu_ps(b.as_ptr().add(i + 8)), acc1);
            i += 16;
        }
        if i + 8 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a.as_ptr().add(i)), _mm256_loadu_ps(b.as_ptr().add(i)), acc0);
            i += 8;
        }
        // Horizontal sum of the 8 lanes.
        let v = _mm256_add_ps(acc0, acc1);
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        let mut total = _mm_cvtss_f32(s);
        while i < n {
            total += a[i] * b[i];
            i += 1;
        }
        total
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len().min(y.len());
        let a = _mm256_set1_ps(alpha);
        let mut i = 0;
        while i + 8 <= n {
            let yp = y.as_mut_ptr().add(i);
            _mm256_storeu_ps(yp, _mm256_fmadd_ps(a, _mm256_loadu_ps(x.as_ptr().add(i)), _mm256_loadu_ps(yp)));
            i += 8;
        }
        while i < n {
            y[i] += alpha * x[i];
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn four_query_kernels_match_their_references() {
        let val = |i: usize, m: usize| ((i * m + 5) % 29) as f32 / 14.0 - 1.0;
        for (hd, n, start, end) in [(64, 90, 0, 90), (16, 40, 3, 37), (24, 17, 0, 17), (8, 5, 1, 4)] {
            let q: Vec<f32> = (0..4 * hd).map(|i| val(i, 3)).collect();
            let kt: Vec<f32> = (0..hd * n).map(|i| val(i, 7)).collect();
            let l = end - start;
            let (mut a, mut b) = (vec![0.0f32; 4 * l], vec![0.0f32; 4 * l]);
            scores4_scalar(&q, &kt, n, start..end, &mut a);
            (ops().scores4)(&q, &kt, n, start..end, &mut b);
            assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() <= 1e-5), "scores hd {hd} n {n}");
            let p: Vec<f32> = (0..4 * l).map(|i| val(i, 11).abs()).collect();
            let v: Vec<f32> = (0..n * hd).map(|i| val(i, 13)).collect();
            let (mut a, mut b) = (vec![0.0f32; 4 * hd], vec![0.0f32; 4 * hd]);
            weighted4_scalar(&p, &v, hd, start, &mut a);
            (ops().weighted4)(&p, &v, hd, start, &mut b);
            assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() <= 1e-4), "weighted hd {hd} n {n}");
        }
    }

    #[test]
    fn simd_matches_scalar_for_every_length() {
        for n in 0..70 {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let exact: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((dot(&a, &b) as f64 - exact).abs() < 1e-5, "n={n}");
            assert!((dot_scalar(&a, &b) as f64 - exact).abs() < 1e-5, "n={n}");
            let mut y = b.clone();
            axpy(0.5, &a, &mut y);
            for i in 0..n {
                assert!((y[i] - (b[i] + 0.5 * a[i])).abs() < 1e-6);
            }
        }
    }
}
