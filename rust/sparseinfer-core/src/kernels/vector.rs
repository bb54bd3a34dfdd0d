//! Small f32 vector operations for the attention loops (`q·k` and `o += p·v`), with an AVX2+FMA variant picked
//! by the active ISA. The scalar versions are the reference; both sum in a fixed order of 8 lanes, so results
//! differ only by FMA rounding.

#[cfg(target_arch = "x86_64")]
use super::{active_isa, Isa};

/// The dot and axpy functions of the active ISA, chosen once. Loops that call them per element (attention
/// calls `dot` once per cached position) should pick them with this instead of dispatching on every call.
#[derive(Clone, Copy)]
pub struct VectorOps {
    /// `Σ a[i]·b[i]`.
    pub dot: fn(&[f32], &[f32]) -> f32,
    /// `y[i] += alpha·x[i]`.
    pub axpy: fn(f32, &[f32], &mut [f32]),
}

/// The operations for the active ISA (AVX2+FMA on every SIMD path, else the scalar reference).
pub fn ops() -> VectorOps {
    #[cfg(target_arch = "x86_64")]
    if active_isa().is_ok_and(|i| i != Isa::Scalar) {
        return VectorOps { dot: x86::dot_checked, axpy: x86::axpy_checked };
    }
    VectorOps { dot: dot_scalar, axpy: axpy_scalar }
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
