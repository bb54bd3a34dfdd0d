//! f32 vector operations for attention: the scores of up to [`MAX_QUERIES`] queries over keys packed in
//! [`PANEL`]-position panels, their weighted sums of position-major values (keys and values in f32, f16 or as
//! int8 codes), and the softmax numerators `exp(s - max)`; plus the dot product the VNNI kernels use. AVX2+FMA variants
//! serve every x86 SIMD path, AVX-512 ones the AVX-512 path, NEON ones (`aarch64::attention`) the NEON path. The
//! scalar versions are the reference: the block kernels differ from them only by summation order and FMA
//! rounding, the exponential by at most [`EXP_BUDGET`].

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
use super::{active_isa, Isa};
use std::ops::Range;

/// Queries the block kernels take at once (each key or value load feeds one FMA per query).
pub const MAX_QUERIES: usize = 8;

/// Positions per key panel: [`key_panels`] stores each run of `PANEL` positions dimension-major and
/// contiguous (`hd × PANEL` values), so the score kernels read keys sequentially, one vector of positions per
/// dimension, with no horizontal sums.
pub const PANEL: usize = 32;

/// Position-major keys `[n × hd]` as `⌈n / PANEL⌉` panels of `hd × PANEL` values (`panels[(j / PANEL) · hd ·
/// PANEL + d · PANEL + j % PANEL] = keys[j · hd + d]`), the last padded with zeros.
pub fn key_panels<T: Copy + Default>(keys: &[T], n: usize, hd: usize) -> Vec<T> {
    let mut out = vec![T::default(); n.div_ceil(PANEL) * PANEL * hd];
    for (j, row) in keys[..n * hd].chunks_exact(hd.max(1)).enumerate() {
        let panel = &mut out[(j / PANEL) * hd * PANEL..];
        for (d, &v) in row.iter().enumerate() {
            panel[d * PANEL + j % PANEL] = v;
        }
    }
    out
}

/// An IEEE half-precision value by its bits: the element of half-precision key/value caches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(transparent)]
pub struct F16(pub u16);

impl F16 {
    /// The half nearest `v` (round to nearest even), saturating at ±65504 where the half would be infinite
    /// (infinities too, where an f32 cache keeps them); NaN stays NaN.
    pub fn saturating(v: f32) -> F16 {
        use crate::formats::{f16_round, F16_MAX};
        if v.is_nan() {
            return F16(0x7E00);
        }
        F16(f16_round(v.clamp(-F16_MAX, F16_MAX)))
    }
}

impl From<F16> for f32 {
    fn from(h: F16) -> f32 {
        crate::formats::f16_to_f32(h.0)
    }
}

/// [`KvElem::KIND`] of f32.
pub const KIND_F32: u8 = 0;
/// [`KvElem::KIND`] of int8 codes.
pub const KIND_I8: u8 = 1;
/// [`KvElem::KIND`] of [`F16`].
pub const KIND_F16: u8 = 2;

/// The element types keys and values are stored in: f32, f16, or int8 codes whose scales the caller applies.
pub trait KvElem: Copy + Default + Into<f32> + sealed::Sealed {
    /// How the SIMD kernels load it ([`KIND_F32`], [`KIND_I8`], [`KIND_F16`]).
    const KIND: u8;
}
impl KvElem for f32 {
    const KIND: u8 = KIND_F32;
}
impl KvElem for i8 {
    const KIND: u8 = KIND_I8;
}
impl KvElem for F16 {
    const KIND: u8 = KIND_F16;
}
mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for i8 {}
    impl Sealed for super::F16 {}
}

/// `(q[m × hd], m, panels, positions, out[m × L])`: see [`scores_scalar`].
pub type Scores<T> = fn(&[f32], usize, &[T], Range<usize>, &mut [f32]);
/// `(p[m × L], m, v, hd, start, out[m × hd])`: see [`weighted_scalar`].
pub type Weighted<T> = fn(&[f32], usize, &[T], usize, usize, &mut [f32]);

/// The vector functions of the active ISA, chosen once: loops that call them many times (attention, per block of
/// queries) pick them with this instead of dispatching on every call.
#[derive(Clone, Copy)]
pub struct VectorOps {
    /// Scores of up to [`MAX_QUERIES`] queries over key panels: see [`scores_scalar`].
    pub scores: Scores<f32>,
    /// The same over int8 key panels (unscaled sums of the codes).
    pub scores_i8: Scores<i8>,
    /// The same over f16 key panels.
    pub scores_f16: Scores<F16>,
    /// Weighted value sums of up to [`MAX_QUERIES`] queries: see [`weighted_scalar`].
    pub weighted: Weighted<f32>,
    /// The same over int8 value codes (the caller folds their scales into the weights).
    pub weighted_i8: Weighted<i8>,
    /// The same over f16 values.
    pub weighted_f16: Weighted<F16>,
    /// Softmax numerators in place, returning their sum: see [`exp_shifted_scalar`].
    pub exp_shifted: fn(&mut [f32]) -> f32,
}

/// The operations for the active ISA (AVX-512 block kernels on the AVX-512 path, AVX2+FMA for the rest of every
/// x86 SIMD path, NEON on the NEON path, else the scalar reference).
pub fn ops() -> VectorOps {
    #[cfg(target_arch = "x86_64")]
    match active_isa() {
        Ok(Isa::Avx512) => return x86::ops::<true>(),
        Ok(Isa::Avx2 | Isa::AvxVnni) => return x86::ops::<false>(),
        _ => {}
    }
    #[cfg(target_arch = "aarch64")]
    if active_isa().is_ok_and(|i| i == Isa::Neon) {
        return super::aarch64::attention::ops();
    }
    VectorOps {
        scores: scores_scalar,
        scores_i8: scores_scalar,
        scores_f16: scores_scalar,
        weighted: weighted_scalar,
        weighted_i8: weighted_scalar,
        weighted_f16: weighted_scalar,
        exp_shifted: exp_shifted_scalar,
    }
}

/// `Σ a[i]·b[i]` on the active ISA.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if active_isa().is_ok_and(|i| i != Isa::Scalar) {
        return x86::dot_checked(a, b);
    }
    dot_scalar(a, b)
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

/// The reference for `m` (at most [`MAX_QUERIES`]) queries' scores over key panels ([`key_panels`]): `out[a ·
/// L + j - start] = Σ_d q[a · hd + d] · key[j][d]` for queries `a < m` and positions `j` in `range` (`L` long;
/// `start` a multiple of [`PANEL`], `end` within the panels), `hd = q.len() / m`.
pub fn scores_scalar<T: KvElem>(q: &[f32], m: usize, panels: &[T], range: Range<usize>, out: &mut [f32]) {
    let (hd, l) = (q.len() / m, range.len());
    out[..m * l].fill(0.0);
    for (i, j) in range.enumerate() {
        let panel = &panels[(j / PANEL) * hd * PANEL + j % PANEL..];
        for a in 0..m {
            out[a * l + i] = (0..hd).map(|d| q[a * hd + d] * panel[d * PANEL].into()).sum();
        }
    }
}

/// The reference for `m` queries' weighted sums of position-major values: `out[a · hd + d] = Σ_i p[a · L + i]
/// · v[(start + i) · hd + d]` for `L = p.len() / m` positions from `start`.
pub fn weighted_scalar<T: KvElem>(p: &[f32], m: usize, v: &[T], hd: usize, start: usize, out: &mut [f32]) {
    let l = p.len() / m;
    out[..m * hd].fill(0.0);
    for i in 0..l {
        let row = &v[(start + i) * hd..(start + i + 1) * hd];
        for a in 0..m {
            let pa = p[a * l + i];
            out[a * hd..(a + 1) * hd].iter_mut().zip(row).for_each(|(o, &x)| *o += pa * x.into());
        }
    }
}

/// The reference softmax numerators: `s[i] = exp(s[i] - max s)` in place; returns `Σ s[i]` (0 for no scores).
pub fn exp_shifted_scalar(s: &mut [f32]) -> f32 {
    let max = s.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut sum = 0.0f32;
    s.iter_mut().for_each(|v| {
        *v = (*v - max).exp();
        sum += *v;
    });
    sum
}

/// The bounds every SIMD block kernel checks before its raw loads, in one place: `1..=MAX_QUERIES` queries of
/// `hd = q_len / m`, positions from a panel's start, whole panels covering them (no product may wrap), and room
/// for `m × L` scores. Returns `(hd, L)`.
pub(crate) fn check_scores(
    q_len: usize,
    m: usize,
    panels_len: usize,
    range: &Range<usize>,
    out_len: usize,
) -> (usize, usize) {
    assert!((1..=MAX_QUERIES).contains(&m) && q_len.is_multiple_of(m), "1 to {MAX_QUERIES} queries");
    let (hd, l) = (q_len / m, range.len());
    assert!(range.start.is_multiple_of(PANEL) && range.start <= range.end, "positions start a panel");
    let needed = range.end.div_ceil(PANEL).checked_mul(PANEL).and_then(|n| n.checked_mul(hd));
    assert!(needed.is_some_and(|n| panels_len >= n), "keys out of range");
    assert!(m.checked_mul(l).is_some_and(|n| out_len >= n), "output too short");
    (hd, l)
}

/// [`check_scores`] for the weighted sums: `m` queries of `L = p_len / m` weights, `L` value rows of `hd` from
/// row `start`, room for `m × hd` sums. Returns `L`.
pub(crate) fn check_weighted(p_len: usize, m: usize, v_len: usize, hd: usize, start: usize, out_len: usize) -> usize {
    assert!((1..=MAX_QUERIES).contains(&m) && p_len.is_multiple_of(m), "1 to {MAX_QUERIES} queries");
    let l = p_len / m;
    let needed = start.checked_add(l).and_then(|n| n.checked_mul(hd));
    assert!(needed.is_some_and(|n| v_len >= n), "values out of range");
    assert!(m.checked_mul(hd).is_some_and(|n| out_len >= n), "output too short");
    l
}

/// The SIMD exponentials' constants (`exp(x)` for `x` in `[EXP_LO, EXP_HI]`: `n = round(x / ln 2)`, `r = x -
/// n · (LN2_HI + LN2_LO)`, then `1/k!` for k = 7 down to 2 by Horner and `2^n` in the exponent bits), shared by
/// every ISA's copy so all compute the same polynomial.
pub(crate) const EXP_LO: f32 = -87.3;
pub(crate) const EXP_HI: f32 = 88.0;
pub(crate) const EXP_LN2_HI: f32 = 0.693_359_4;
pub(crate) const EXP_LN2_LO: f32 = -2.121_944_4e-4;
pub(crate) const EXP_TAYLOR: [f32; 6] = [1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5];

/// Largest relative error of the SIMD softmax numerators against the exact `exp(s - max)` where that is a normal
/// f32 (arguments in `[-85, 0]`; below, results are within 2e-38 of it): the degree-7 Taylor polynomial's 7e-9
/// on `|r| <= ln2/2` plus about one rounding of the result (6e-8), with room for the argument's reduction.
/// Tests hold it to the f64 exponential.
pub const EXP_BUDGET: f32 = 1.5e-7;

/// Relative error of the exponentials that [`x86::exp_shifted_bf16_512`] rounds to bf16 (before rounding).
pub const EXP_BF16_BUDGET: f32 = 3e-6;

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::{KvElem, EXP_HI, EXP_LN2_HI, EXP_LN2_LO, EXP_LO, EXP_TAYLOR, KIND_F16, KIND_F32, KIND_I8, PANEL};
    use core::arch::x86_64::*;
    use std::ops::Range;

    /// [`dot`] behind a safe signature; only called by [`super::dot`] when a SIMD ISA (hence AVX2+FMA) is
    /// active.
    pub fn dot_checked(a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: `super::dot` calls this only when the active ISA implies AVX2 and FMA.
        unsafe { dot(a, b) }
    }

    /// Calls the kernel `$f::<M, ...>` for the query count `M = $m`: 1 to 4 (`@4`, the ymm kernels' limit, and
    /// the zmm kernels with four accumulators per query), or 5 to 8 as well (`@8`).
    macro_rules! by_queries {
        (@4 $m:expr, $f:ident <$($c:tt),+>, $($arg:expr),*) => {
            match $m {
                1 => $f::<1, $({ $c }),+>($($arg),*),
                2 => $f::<2, $({ $c }),+>($($arg),*),
                3 => $f::<3, $({ $c }),+>($($arg),*),
                _ => $f::<4, $({ $c }),+>($($arg),*),
            }
        };
        (@8 $m:expr, $f:ident <$($c:tt),+>, $($arg:expr),*) => {
            match $m {
                1..=4 => by_queries!(@4 $m, $f<$($c),+>, $($arg),*),
                5 => $f::<5, $({ $c }),+>($($arg),*),
                6 => $f::<6, $({ $c }),+>($($arg),*),
                7 => $f::<7, $({ $c }),+>($($arg),*),
                _ => $f::<8, $({ $c }),+>($($arg),*),
            }
        };
    }

    /// The block kernels on zmm (`WIDE`, the AVX-512 path) or ymm registers (AVX2+FMA).
    pub fn ops<const WIDE: bool>() -> super::VectorOps {
        super::VectorOps {
            scores: scores_checked::<WIDE, f32>,
            scores_i8: scores_checked::<WIDE, i8>,
            scores_f16: scores_checked::<WIDE, super::F16>,
            weighted: weighted_checked::<WIDE, f32>,
            weighted_i8: weighted_checked::<WIDE, i8>,
            weighted_f16: weighted_checked::<WIDE, super::F16>,
            exp_shifted: if WIDE { exp_shifted512_checked } else { exp_shifted_checked },
        }
    }

    /// [`super::scores_scalar`] behind a safe signature, on zmm (`WIDE`) or ymm registers; only installed by
    /// [`super::ops`] when the active ISA has them.
    pub fn scores_checked<const WIDE: bool, T: KvElem>(
        q: &[f32],
        m: usize,
        panels: &[T],
        range: Range<usize>,
        out: &mut [f32],
    ) {
        let (hd, l) = super::check_scores(q.len(), m, panels.len(), &range, out.len());
        let base = panels[range.start * hd..].as_ptr() as *const u8;
        // SAFETY: `ops` installs the WIDE variant only on the AVX-512 path and the other only where the AVX2 path
        // runs (`avx2_supported`: AVX2, FMA and F16C); the bounds are checked above in elements of `T` (whole
        // panels, so padded lanes are readable).
        unsafe {
            match (WIDE, T::KIND) {
                (true, KIND_I8) => by_queries!(@8 m, scores512<KIND_I8>, q, base, l, out),
                (true, KIND_F16) => by_queries!(@8 m, scores512<KIND_F16>, q, base, l, out),
                (true, KIND_F32) => by_queries!(@8 m, scores512<KIND_F32>, q, base, l, out),
                // Four queries at a time: ymm registers hold no more accumulators.
                (false, kind) => {
                    for a0 in (0..m).step_by(4) {
                        let mm = (m - a0).min(4);
                        let (qa, oa) = (&q[a0 * hd..(a0 + mm) * hd], &mut out[a0 * l..(a0 + mm) * l]);
                        match kind {
                            KIND_I8 => by_queries!(@4 mm, scores256<KIND_I8>, qa, base, l, oa),
                            KIND_F16 => by_queries!(@4 mm, scores256<KIND_F16>, qa, base, l, oa),
                            KIND_F32 => by_queries!(@4 mm, scores256<KIND_F32>, qa, base, l, oa),
                            kind => unreachable!("key element kind {kind}"),
                        }
                    }
                }
                (true, kind) => unreachable!("key element kind {kind}"),
            }
        }
    }

    /// [`super::weighted_scalar`] behind a safe signature, under the same conditions.
    pub fn weighted_checked<const WIDE: bool, T: KvElem>(
        p: &[f32],
        m: usize,
        v: &[T],
        hd: usize,
        start: usize,
        out: &mut [f32],
    ) {
        let l = super::check_weighted(p.len(), m, v.len(), hd, start, out.len());
        let v = v[start * hd..].as_ptr() as *const u8;
        // SAFETY: as for `scores_checked`.
        unsafe {
            match (WIDE, m > 4, T::KIND) {
                (true, true, KIND_I8) => by_queries!(@8 m, weighted512<2, KIND_I8>, p, v, hd, out),
                (true, true, KIND_F16) => by_queries!(@8 m, weighted512<2, KIND_F16>, p, v, hd, out),
                (true, true, KIND_F32) => by_queries!(@8 m, weighted512<2, KIND_F32>, p, v, hd, out),
                (true, false, KIND_I8) => by_queries!(@4 m, weighted512<4, KIND_I8>, p, v, hd, out),
                (true, false, KIND_F16) => by_queries!(@4 m, weighted512<4, KIND_F16>, p, v, hd, out),
                (true, false, KIND_F32) => by_queries!(@4 m, weighted512<4, KIND_F32>, p, v, hd, out),
                (false, _, kind) => {
                    for a0 in (0..m).step_by(4) {
                        let mm = (m - a0).min(4);
                        let (pa, oa) = (&p[a0 * l..(a0 + mm) * l], &mut out[a0 * hd..(a0 + mm) * hd]);
                        match kind {
                            KIND_I8 => by_queries!(@4 mm, weighted256<KIND_I8>, pa, v, hd, oa),
                            KIND_F16 => by_queries!(@4 mm, weighted256<KIND_F16>, pa, v, hd, oa),
                            KIND_F32 => by_queries!(@4 mm, weighted256<KIND_F32>, pa, v, hd, oa),
                            kind => unreachable!("value element kind {kind}"),
                        }
                    }
                }
                (true, _, kind) => unreachable!("value element kind {kind}"),
            }
        }
    }

    /// [`super::exp_shifted_scalar`] with the polynomial exponential, behind a safe signature, where AVX2 and FMA
    /// run.
    pub fn exp_shifted_checked(s: &mut [f32]) -> f32 {
        // SAFETY: `ops` installs this only on x86 SIMD paths, all of which have AVX2 and FMA.
        unsafe { exp_shifted(s) }
    }

    /// The same on zmm registers; only installed by [`super::ops`] on the AVX-512 path.
    pub fn exp_shifted512_checked(s: &mut [f32]) -> f32 {
        // SAFETY: installed only where the AVX-512 path runs.
        unsafe { exp_shifted512(s) }
    }

    /// How far ahead of their loads the AVX-512 attention loops prefetch, in bytes: a decoded token reads the
    /// whole cache once, from memory, one head per task, and a single stream per core leaves the hardware
    /// prefetchers short of the memory's bandwidth.
    const AHEAD: usize = 4096;

    /// Prefetches the lines of `bytes` bytes from `p`, which may lie past the data.
    #[inline(always)]
    fn prefetch(p: *const u8, bytes: usize) {
        for off in (0..bytes).step_by(64) {
            // SAFETY: a prefetch reads nothing the program sees and never faults, whatever the address (SSE,
            // which every x86-64 CPU has).
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(off) as *const i8) };
        }
    }

    /// Bytes of an element of kind `e` ([`KvElem::KIND`]); the kernels evaluate it at compile time, so a kind
    /// without a case here fails to build.
    const fn size(e: u8) -> usize {
        match e {
            KIND_I8 => 1,
            KIND_F16 => 2,
            KIND_F32 => 4,
            _ => panic!("unknown key/value element kind"),
        }
    }

    /// Eight f32 lanes from elements of kind `$e` (`i8` codes, f16 or f32 values) at byte address `$p`.
    macro_rules! load8 {
        ($e:expr, $p:expr) => {
            match $e {
                KIND_I8 => _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64($p as *const __m128i))),
                KIND_F16 => _mm256_cvtph_ps(_mm_loadu_si128($p as *const __m128i)),
                KIND_F32 => _mm256_loadu_ps($p as *const f32),
                _ => unreachable!(),
            }
        };
    }

    /// Sixteen f32 lanes likewise, the lanes outside `$mask` zero and unread.
    macro_rules! load16 {
        ($e:expr, $p:expr, $mask:expr) => {
            match $e {
                KIND_I8 => _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8($mask, $p as *const i8))),
                KIND_F16 => _mm512_cvtph_ps(_mm256_maskz_loadu_epi16($mask, $p as *const i16)),
                KIND_F32 => _mm512_maskz_loadu_ps($mask, $p as *const f32),
                _ => unreachable!(),
            }
        };
    }

    /// Per panel half, 16 positions × `M` (at most 4) queries in `2M` accumulators: each key load feeds `M` FMAs.
    ///
    /// # Safety
    /// AVX2, FMA and F16C; `panels` holds `⌈l / PANEL⌉` whole panels of `hd = q.len() / M` elements of kind
    /// `E`, `out` `M · l`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scores256<const M: usize, const E: u8>(q: &[f32], panels: *const u8, l: usize, out: &mut [f32]) {
        let (hd, size) = (q.len() / M, const { size(E) });
        let (op, qp) = (out.as_mut_ptr(), q.as_ptr());
        let mut j = 0;
        while j < l {
            let base = panels.add(((j / PANEL) * hd * PANEL + j % PANEL) * size);
            let mut acc = [[_mm256_setzero_ps(); 2]; M];
            for d in 0..hd {
                let row = base.add(d * PANEL * size);
                let (k0, k1) = (load8!(E, row), load8!(E, row.add(8 * size)));
                for (a, acc) in acc.iter_mut().enumerate() {
                    let b = _mm256_broadcast_ss(&*qp.add(a * hd + d));
                    acc[0] = _mm256_fmadd_ps(b, k0, acc[0]);
                    acc[1] = _mm256_fmadd_ps(b, k1, acc[1]);
                }
            }
            let take = (l - j).min(16);
            for (a, acc) in acc.iter().enumerate() {
                if take == 16 {
                    _mm256_storeu_ps(op.add(a * l + j), acc[0]);
                    _mm256_storeu_ps(op.add(a * l + j + 8), acc[1]);
                } else {
                    // The panel's padded lanes are computed but not stored.
                    let mut buf = [0.0f32; 16];
                    _mm256_storeu_ps(buf.as_mut_ptr(), acc[0]);
                    _mm256_storeu_ps(buf.as_mut_ptr().add(8), acc[1]);
                    std::ptr::copy_nonoverlapping(buf.as_ptr(), op.add(a * l + j), take);
                }
            }
            j += 16;
        }
    }

    /// Per panel, its 32 positions × `M` queries in `2M` zmm accumulators; the last positions are stored under
    /// a lane mask.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL; as [`scores256`] otherwise.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn scores512<const M: usize, const E: u8>(q: &[f32], panels: *const u8, l: usize, out: &mut [f32]) {
        let (hd, size) = (q.len() / M, const { size(E) });
        let (op, qp) = (out.as_mut_ptr(), q.as_ptr());
        let mut j = 0;
        while j < l {
            let base = panels.add(j * hd * size);
            let mut acc = [[_mm512_setzero_ps(); 2]; M];
            for d in 0..hd {
                let row = base.add(d * PANEL * size);
                prefetch(row.wrapping_add(AHEAD), PANEL * size);
                let (k0, k1) = (load16!(E, row, 0xffff), load16!(E, row.add(16 * size), 0xffff));
                for (a, acc) in acc.iter_mut().enumerate() {
                    let b = _mm512_set1_ps(*qp.add(a * hd + d));
                    acc[0] = _mm512_fmadd_ps(b, k0, acc[0]);
                    acc[1] = _mm512_fmadd_ps(b, k1, acc[1]);
                }
            }
            let lanes = |from: usize| -> __mmask16 {
                let take = l.saturating_sub(j + from).min(16);
                ((1u32 << take) - 1) as __mmask16
            };
            let (m0, m1) = (lanes(0), lanes(16));
            for (a, acc) in acc.iter().enumerate() {
                _mm512_mask_storeu_ps(op.add(a * l + j), m0, acc[0]);
                if m1 != 0 {
                    // (Only then is the second half's address inside `out`.)
                    _mm512_mask_storeu_ps(op.add(a * l + j + 16), m1, acc[1]);
                }
            }
            j += PANEL;
        }
    }

    /// 16 dimensions × `M` (at most 4) queries in `2M` accumulators over every position.
    ///
    /// # Safety
    /// AVX2, FMA and F16C; `v` holds `l = p.len() / M` rows of `hd` elements of kind `E`, `out` `M · hd`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn weighted256<const M: usize, const E: u8>(p: &[f32], v: *const u8, hd: usize, out: &mut [f32]) {
        let (l, size) = (p.len() / M, const { size(E) });
        let (op, pp) = (out.as_mut_ptr(), p.as_ptr());
        let mut d0 = 0;
        while d0 + 16 <= hd {
            let mut acc = [[_mm256_setzero_ps(); 2]; M];
            for i in 0..l {
                let row = v.add((i * hd + d0) * size);
                let (v0, v1) = (load8!(E, row), load8!(E, row.add(8 * size)));
                for (a, acc) in acc.iter_mut().enumerate() {
                    let b = _mm256_broadcast_ss(&*pp.add(a * l + i));
                    acc[0] = _mm256_fmadd_ps(b, v0, acc[0]);
                    acc[1] = _mm256_fmadd_ps(b, v1, acc[1]);
                }
            }
            for (a, acc) in acc.iter().enumerate() {
                _mm256_storeu_ps(op.add(a * hd + d0), acc[0]);
                _mm256_storeu_ps(op.add(a * hd + d0 + 8), acc[1]);
            }
            d0 += 16;
        }
        for d in d0..hd {
            for a in 0..M {
                let mut s = 0.0f32;
                for i in 0..l {
                    let at = v.add((i * hd + d) * size);
                    let x = match E {
                        KIND_I8 => *(at as *const i8) as f32,
                        KIND_F16 => crate::formats::f16_to_f32(*(at as *const u16)),
                        KIND_F32 => *(at as *const f32),
                        _ => unreachable!(),
                    };
                    s += p[a * l + i] * x;
                }
                out[a * hd + d] = s;
            }
        }
    }

    /// `16 · D` dimensions × `M` queries in `D · M` zmm accumulators over every position (`D = 4`: one pass for
    /// the common head width 64, for up to four queries; `D = 2` for more), then 16 at a time, the last under
    /// a lane mask.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL; as [`weighted256`] otherwise.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn weighted512<const M: usize, const D: usize, const E: u8>(
        p: &[f32],
        v: *const u8,
        hd: usize,
        out: &mut [f32],
    ) {
        let (l, size) = (p.len() / M, const { size(E) });
        let (op, pp) = (out.as_mut_ptr(), p.as_ptr());
        // Whole positions ahead, so each prefetch lands on the columns this pass will read.
        let ahead = AHEAD.div_ceil((hd * size).max(1)) * hd * size;
        let mut d0 = 0;
        while d0 + 16 * D <= hd {
            let mut acc = [[_mm512_setzero_ps(); D]; M];
            for i in 0..l {
                let row = v.add((i * hd + d0) * size);
                prefetch(row.wrapping_add(ahead), 16 * D * size);
                let vs: [__m512; D] = std::array::from_fn(|c| load16!(E, row.add(16 * c * size), 0xffff));
                for (a, acc) in acc.iter_mut().enumerate() {
                    let b = _mm512_set1_ps(*pp.add(a * l + i));
                    for (x, v) in acc.iter_mut().zip(vs) {
                        *x = _mm512_fmadd_ps(b, v, *x);
                    }
                }
            }
            for (a, acc) in acc.iter().enumerate() {
                for (c, x) in acc.iter().enumerate() {
                    _mm512_storeu_ps(op.add(a * hd + d0 + 16 * c), *x);
                }
            }
            d0 += 16 * D;
        }
        while d0 < hd {
            let mask: __mmask16 = if hd - d0 >= 16 { 0xffff } else { (1u16 << (hd - d0)) - 1 };
            let mut acc = [_mm512_setzero_ps(); M];
            for i in 0..l {
                let v0 = load16!(E, v.add((i * hd + d0) * size), mask);
                for (a, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm512_fmadd_ps(_mm512_set1_ps(*pp.add(a * l + i)), v0, *acc);
                }
            }
            for (a, acc) in acc.iter().enumerate() {
                _mm512_mask_storeu_ps(op.add(a * hd + d0), mask, *acc);
            }
            d0 += 16;
        }
    }

    /// `exp(x)` of eight lanes to within [`super::EXP_BUDGET`] on `[-87, 0]` (inputs are clamped to `[-87.3, 88]`):
    /// `x = n·ln2 + r` with `|r| <= ln2/2` (ln2 split in two so `n·ln2_hi` is exact), the degree-7 Taylor
    /// polynomial of `e^r` by Horner, times `2^n` built in the exponent field.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp256(x: __m256) -> __m256 {
        // The bound first: `max`/`min` return their second operand when either is NaN, so a NaN stays NaN.
        let x = _mm256_min_ps(_mm256_set1_ps(EXP_HI), _mm256_max_ps(_mm256_set1_ps(EXP_LO), x));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
            x,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
        ));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_LO), r);
        let mut poly = _mm256_set1_ps(EXP_TAYLOR[0]);
        for c in &EXP_TAYLOR[1..] {
            poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(*c));
        }
        let poly = _mm256_fmadd_ps(_mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.0)), r, _mm256_set1_ps(1.0));
        let two_n = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
        _mm256_mul_ps(poly, _mm256_castsi256_ps(two_n))
    }

    /// The largest of eight lanes.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    unsafe fn max256(v: __m256) -> f32 {
        let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_max_ss(s, _mm_shuffle_ps::<1>(s, s)))
    }

    /// The sum of eight lanes.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    unsafe fn sum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_shifted(s: &mut [f32]) -> f32 {
        let (n, sp) = (s.len(), s.as_mut_ptr());
        if n == 0 {
            return 0.0;
        }
        let mut mv = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut i = 0;
        while i + 8 <= n {
            mv = _mm256_max_ps(mv, _mm256_loadu_ps(sp.add(i)));
            i += 8;
        }
        let max = s[i..].iter().fold(max256(mv), |a, &b| a.max(b));
        let mx = _mm256_set1_ps(max);
        let mut sum = _mm256_setzero_ps();
        i = 0;
        while i + 8 <= n {
            let e = exp256(_mm256_sub_ps(_mm256_loadu_ps(sp.add(i)), mx));
            _mm256_storeu_ps(sp.add(i), e);
            sum = _mm256_add_ps(sum, e);
            i += 8;
        }
        let mut total = sum256(sum);
        if i < n {
            // The last lanes through a buffer, so every score takes the same exponential.
            let mut buf = [max; 8];
            buf[..n - i].copy_from_slice(&s[i..]);
            let mut e = [0.0f32; 8];
            _mm256_storeu_ps(e.as_mut_ptr(), exp256(_mm256_sub_ps(_mm256_loadu_ps(buf.as_ptr()), mx)));
            s[i..].copy_from_slice(&e[..n - i]);
            total += e[..n - i].iter().sum::<f32>();
        }
        total
    }

    /// [`exp256`] on sixteen lanes (the same operations lane by lane, so the same values).
    ///
    /// # Safety
    /// The CPU must support AVX-512 F.
    #[target_feature(enable = "avx512f")]
    unsafe fn exp512(x: __m512) -> __m512 {
        let x = _mm512_min_ps(_mm512_set1_ps(EXP_HI), _mm512_max_ps(_mm512_set1_ps(EXP_LO), x));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
            x,
            _mm512_set1_ps(std::f32::consts::LOG2_E),
        ));
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_HI), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_LO), r);
        let mut poly = _mm512_set1_ps(EXP_TAYLOR[0]);
        for c in &EXP_TAYLOR[1..] {
            poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(*c));
        }
        let poly = _mm512_fmadd_ps(_mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0)), r, _mm512_set1_ps(1.0));
        let two_n = _mm512_slli_epi32::<23>(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)));
        _mm512_mul_ps(poly, _mm512_castsi512_ps(two_n))
    }

    /// [`exp_shifted`] on zmm registers, the last lanes under a mask.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp_shifted512(s: &mut [f32]) -> f32 {
        let (n, sp) = (s.len(), s.as_mut_ptr());
        if n == 0 {
            return 0.0;
        }
        let tail: __mmask16 = ((1u32 << (n % 16)) - 1) as __mmask16;
        let mut mv = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut i = 0;
        while i + 16 <= n {
            mv = _mm512_max_ps(mv, _mm512_loadu_ps(sp.add(i)));
            i += 16;
        }
        mv = _mm512_max_ps(mv, _mm512_mask_loadu_ps(mv, tail, sp.add(i)));
        let mx = _mm512_set1_ps(_mm512_reduce_max_ps(mv));
        let mut sum = _mm512_setzero_ps();
        i = 0;
        while i + 16 <= n {
            let e = exp512(_mm512_sub_ps(_mm512_loadu_ps(sp.add(i)), mx));
            _mm512_storeu_ps(sp.add(i), e);
            sum = _mm512_add_ps(sum, e);
            i += 16;
        }
        if tail != 0 {
            let e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, sp.add(i)), mx));
            _mm512_mask_storeu_ps(sp.add(i), tail, e);
            sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(tail, e));
        }
        _mm512_reduce_add_ps(sum)
    }

    /// Softmax numerators of one row of scores as bf16: `out[i] = bf16(exp(s[i] - max s))` (rounded to nearest
    /// even, below the smallest normal f32 flushed to zero; zero in `out[s.len()..]`); returns the f32 sum of the
    /// exponentials before rounding. The exponential is `2^t` as a degree-4 polynomial in the fraction of `t`
    /// (relative error below 3e-6, a thousandth of a bf16 rounding; [`EXP_BF16_BUDGET`]) scaled by `vscalefps`:
    /// half the work of [`exp512`], whose full f32 accuracy the rounding to bf16 would throw away.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F, BW, DQ and BF16; `s` is not empty and `out` holds at least `s.len()`
    /// values.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512bf16")]
    pub unsafe fn exp_shifted_bf16_512(s: &[f32], out: &mut [u16]) -> f32 {
        // Least-squares fit of 2^f on [-1/2, 1/2] for relative error.
        const C: [f32; 5] = [0.999_999_17, 0.693_121_97, 0.240_249_81, 0.055_917_12, 0.009_560_52];
        let n = s.len();
        assert!(n > 0 && out.len() >= n);
        let (sp, op) = (s.as_ptr(), out.as_mut_ptr());
        // The maximum, and whether any score is NaN or +inf (whose softmax is undefined).
        const NAN_OR_INF: i32 = 0x01 | 0x08 | 0x80;
        let (mut mv, mut bad) = (_mm512_set1_ps(f32::NEG_INFINITY), 0);
        let mut i = 0;
        while i + 16 <= n {
            let v = _mm512_loadu_ps(sp.add(i));
            bad |= _mm512_fpclass_ps_mask::<NAN_OR_INF>(v);
            mv = _mm512_max_ps(mv, v);
            i += 16;
        }
        let tail: __mmask16 = ((1u32 << (n % 16)) - 1) as __mmask16;
        let v = _mm512_mask_loadu_ps(mv, tail, sp.add(i));
        bad |= _mm512_fpclass_ps_mask::<NAN_OR_INF>(v);
        if bad != 0 {
            // Not hidden: every numerator and the sum are NaN.
            out[..n].fill(0x7fc0);
            out[n..].fill(0);
            return f32::NAN;
        }
        let mx = _mm512_set1_ps(_mm512_reduce_max_ps(_mm512_max_ps(mv, v)));
        let exp = |x: __m512| {
            // t <= 0; below -150 every result is 0 (and -inf must not reach the subtraction below).
            let t = _mm512_max_ps(
                _mm512_mul_ps(_mm512_sub_ps(x, mx), _mm512_set1_ps(std::f32::consts::LOG2_E)),
                _mm512_set1_ps(-150.0),
            );
            let k = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
            let f = _mm512_sub_ps(t, k);
            let mut p = _mm512_set1_ps(C[4]);
            for c in C[..4].iter().rev() {
                p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(*c));
            }
            _mm512_scalef_ps(p, k)
        };
        let mut sum = _mm512_setzero_ps();
        i = 0;
        while i + 32 <= n {
            let (lo, hi) = (exp(_mm512_loadu_ps(sp.add(i))), exp(_mm512_loadu_ps(sp.add(i + 16))));
            sum = _mm512_add_ps(sum, _mm512_add_ps(lo, hi));
            _mm512_storeu_si512(
                op.add(i) as *mut __m512i,
                std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo)),
            );
            i += 32;
        }
        while i < n {
            let live: __mmask16 = if n - i >= 16 { !0 } else { tail };
            let e = _mm512_maskz_mov_ps(live, exp(_mm512_maskz_loadu_ps(live, sp.add(i))));
            sum = _mm512_add_ps(sum, e);
            let b = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(e));
            _mm256_mask_storeu_epi16(op.add(i) as *mut i16, live, b);
            i += 16;
        }
        out[n..].fill(0);
        _mm512_reduce_add_ps(sum)
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
        let mut total = sum256(_mm256_add_ps(acc0, acc1));
        while i < n {
            total += a[i] * b[i];
            i += 1;
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernels of the active ISA and of every SIMD path this CPU runs, whichever is active.
    fn every_ops() -> Vec<VectorOps> {
        #[allow(unused_mut)]
        let mut all = vec![ops()];
        #[cfg(target_arch = "aarch64")]
        if Isa::Neon.is_supported() {
            all.push(crate::kernels::aarch64::attention::ops());
        }
        #[cfg(target_arch = "x86_64")]
        {
            if Isa::Avx2.is_supported() {
                all.push(x86::ops::<false>());
            }
            if Isa::Avx512.is_supported() {
                all.push(x86::ops::<true>());
            }
        }
        all
    }

    /// Every query count and a spread of head widths and position ranges (whole panels, partial last panels,
    /// scalar and masked dimension tails) against the references, on the active ISA and every x86 SIMD path this
    /// CPU runs.
    #[test]
    fn block_kernels_match_their_references() {
        let val = |i: usize, m: usize| ((i * m + 5) % 29) as f32 / 14.0 - 1.0;
        let shapes =
            [(64, 90, 0, 90), (16, 40, 32, 37), (24, 17, 0, 17), (8, 5, 0, 4), (80, 1500, 0, 1500), (72, 50, 32, 32)];
        for (o, (hd, n, start, end)) in every_ops().into_iter().flat_map(|o| shapes.map(|s| (o, s))) {
            let keys: Vec<f32> = (0..n * hd).map(|i| val(i, 7)).collect();
            let panels = key_panels(&keys, n, hd);
            for m in 1..=MAX_QUERIES {
                let q: Vec<f32> = (0..m * hd).map(|i| val(i, 3)).collect();
                let l = end - start;
                // The definition, from position-major keys.
                let want: Vec<f32> = (0..m * l)
                    .map(|x| (0..hd).map(|d| q[(x / l) * hd + d] * keys[(start + x % l) * hd + d]).sum())
                    .collect();
                let (mut a, mut b) = (vec![0.0f32; m * l], vec![7.0f32; m * l + 3]);
                scores_scalar(&q, m, &panels, start..end, &mut a);
                (o.scores)(&q, m, &panels, start..end, &mut b);
                assert!(want.iter().zip(&a).all(|(x, y)| (x - y).abs() <= 1e-4), "reference scores hd {hd} m {m}");
                assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() <= 1e-4), "scores hd {hd} n {n} m {m}");
                assert_eq!(b[m * l..], [7.0; 3], "scores wrote past their output");
                let p: Vec<f32> = (0..m * l).map(|i| val(i, 11).abs()).collect();
                let v: Vec<f32> = (0..n * hd).map(|i| val(i, 13)).collect();
                let (mut a, mut b) = (vec![0.0f32; m * hd], vec![7.0f32; m * hd + 3]);
                weighted_scalar(&p, m, &v, hd, start, &mut a);
                (o.weighted)(&p, m, &v, hd, start, &mut b);
                let tol = 1e-5 * (l as f32 + 1.0);
                assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() <= tol), "weighted hd {hd} n {n} m {m}");
                assert_eq!(b[m * hd..], [7.0; 3], "weighted sums wrote past their output");
                // Int8 codes, the full range included, exact in f32: the same sums.
                let code = |x: f32| (x * 127.0).round().clamp(-127.0, 127.0) as i8;
                let kc: Vec<i8> = keys.iter().map(|&x| code(x)).collect();
                let vc: Vec<i8> = v.iter().map(|&x| code(x)).collect();
                let (kf, vf): (Vec<f32>, Vec<f32>) =
                    (kc.iter().map(|&c| c as f32).collect(), vc.iter().map(|&c| c as f32).collect());
                let (mut a, mut b) = (vec![0.0f32; m * l], vec![7.0f32; m * l + 3]);
                scores_scalar(&q, m, &key_panels(&kf, n, hd), start..end, &mut a);
                (o.scores_i8)(&q, m, &key_panels(&kc, n, hd), start..end, &mut b);
                assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() <= 1e-4 * 127.0), "int8 scores hd {hd} m {m}");
                assert_eq!(b[m * l..], [7.0; 3], "int8 scores wrote past their output");
                let (mut a, mut b) = (vec![0.0f32; m * hd], vec![7.0f32; m * hd + 3]);
                weighted_scalar(&p, m, &vf, hd, start, &mut a);
                (o.weighted_i8)(&p, m, &vc, hd, start, &mut b);
                assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() <= tol * 127.0), "int8 weighted hd {hd} m {m}");
                assert_eq!(b[m * hd..], [7.0; 3], "int8 weighted sums wrote past their output");
                // f16 values: the sums of the f32 values they stand for (the reference reads both the same way).
                let (kh, vh): (Vec<F16>, Vec<F16>) = (
                    keys.iter().map(|&x| F16::saturating(x)).collect(),
                    v.iter().map(|&x| F16::saturating(x)).collect(),
                );
                let (kf, vf): (Vec<f32>, Vec<f32>) =
                    (kh.iter().map(|&h| h.into()).collect(), vh.iter().map(|&h| h.into()).collect());
                let (mut a, mut b) = (vec![0.0f32; m * l], vec![7.0f32; m * l + 3]);
                scores_scalar(&q, m, &key_panels(&kf, n, hd), start..end, &mut a);
                (o.scores_f16)(&q, m, &key_panels(&kh, n, hd), start..end, &mut b);
                assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() <= 1e-4), "f16 scores hd {hd} m {m}");
                assert_eq!(b[m * l..], [7.0; 3], "f16 scores wrote past their output");
                let (mut a, mut b) = (vec![0.0f32; m * hd], vec![7.0f32; m * hd + 3]);
                weighted_scalar(&p, m, &vf, hd, start, &mut a);
                (o.weighted_f16)(&p, m, &vh, hd, start, &mut b);
                assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() <= tol), "f16 weighted hd {hd} m {m}");
                assert_eq!(b[m * hd..], [7.0; 3], "f16 weighted sums wrote past their output");
            }
        }
    }

    /// A position range whose panel count overflows is refused (a panic, as the reference's indexing gives), not
    /// read from a wrapped size, on every path.
    #[test]
    fn block_kernels_refuse_ranges_past_any_panel() {
        for o in every_ops() {
            let far = (usize::MAX - 31)..usize::MAX;
            let r = std::panic::catch_unwind(|| (o.scores)(&[1.0], 1, &[] as &[f32], far.clone(), &mut [0.0; 31]));
            assert!(r.is_err(), "scores over {far:?}");
        }
    }

    /// Halves round to nearest, saturate instead of overflowing, keep NaN, and read back as the f32 they hold.
    #[test]
    fn f16_elements_round_saturate_and_read_back() {
        for (v, want) in [(1.0f32, 1.0f32), (-2.5, -2.5), (1.0 + 1.0 / 4096.0, 1.0), (65504.0, 65504.0)] {
            assert_eq!(f32::from(F16::saturating(v)), want, "{v}");
        }
        for (v, want) in [(65520.0f32, 65504.0f32), (1e9, 65504.0), (-1e9, -65504.0), (f32::INFINITY, 65504.0)] {
            assert_eq!(f32::from(F16::saturating(v)), want, "{v}");
        }
        assert!(f32::from(F16::saturating(f32::NAN)).is_nan());
        assert_eq!(f32::from(F16::saturating(1e-8)), 0.0, "below the smallest subnormal half");
        assert_eq!(f32::from(F16::saturating(6e-8)), 5.960_464_5e-8, "the smallest subnormal half");
    }

    /// The softmax numerators of every path this CPU runs within [`EXP_BUDGET`] of the f64 exponential, for every tail
    /// length and over the whole clamped range, and their sum.
    #[test]
    fn exp_shifted_is_within_its_budget() {
        for exp_shifted in every_ops().into_iter().map(|o| o.exp_shifted) {
            let mut worst = 0.0f64;
            for len in 0..40 {
                // Scores from -87 below the maximum to the maximum itself, so exp spans [e^-87, 1].
                let s: Vec<f32> = (0..len).map(|i| 3.0 - 90.0 * ((i * 7 % 40) as f32 / 39.0).powi(2)).collect();
                let max = s.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                let mut got = s.clone();
                let sum = exp_shifted(&mut got);
                let mut want_sum = 0.0f64;
                for (x, g) in s.iter().zip(&got) {
                    let want = ((*x - max) as f64).exp();
                    want_sum += want;
                    if want > 1e-37 {
                        // Smaller results are subnormal in f32 (or clamped): absolute error below 2e-38.
                        worst = worst.max((*g as f64 - want).abs() / want);
                    } else {
                        assert!((*g as f64 - want).abs() < 2e-38, "exp({}) = {g}", x - max);
                    }
                }
                assert!((sum as f64 - want_sum).abs() <= 1e-6 * want_sum.max(1e-30), "sum of {len}");
            }
            // Dense sweep of the exponential itself, through one long row.
            let mut row: Vec<f32> = (0..=175_000).map(|i| -87.0 + i as f32 * 1e-3).collect();
            let orig = row.clone();
            exp_shifted(&mut row);
            let top = orig[orig.len() - 1];
            for (x, g) in orig.iter().zip(&row) {
                let want = ((*x - top) as f64).exp();
                if want > 1e-37 {
                    worst = worst.max((*g as f64 - want).abs() / want);
                }
            }
            assert!(worst <= EXP_BUDGET as f64, "worst relative error {worst:e} over {EXP_BUDGET:e}");
            assert_eq!(exp_shifted(&mut []), 0.0);
            // A NaN score is not hidden: its numerator and the sum are NaN, wherever it sits.
            for len in [1, 7, 16, 23, 40] {
                for at in [0, len / 2, len - 1] {
                    let mut row: Vec<f32> = (0..len).map(|i| i as f32 * 0.1).collect();
                    row[at] = f32::NAN;
                    let sum = exp_shifted(&mut row);
                    assert!(sum.is_nan() && row[at].is_nan(), "NaN at {at} of {len}");
                }
            }
        }
    }

    /// The bf16 softmax numerators of the AVX-512 attention: each within [`EXP_BF16_BUDGET`] of the f64
    /// exponential plus a bf16 rounding, zeros past the row, the f32 sum within the budget; a NaN or +inf score
    /// makes the row NaN.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn exp_shifted_bf16_is_within_its_budget() {
        use crate::formats::{bf16_to_f32, budget::BF16_REL};
        if !(is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("avx512bf16"))
        {
            eprintln!("no AVX512-BF16 here: skipped");
            return;
        }
        let mut rows: Vec<Vec<f32>> =
            (1..80).map(|len| (0..len).map(|i| 3.0 - 120.0 * ((i * 7 % 40) as f32 / 39.0).powi(2)).collect()).collect();
        rows.push((0..=175_000).map(|i| -100.0 + i as f32 * 6e-4).collect());
        rows.push(vec![f32::NEG_INFINITY, 0.5, -3.0]);
        for s in &rows {
            let mut out = vec![u16::MAX; s.len() + 40];
            // SAFETY: the features were detected; `out` is longer than the row.
            let sum = unsafe { x86::exp_shifted_bf16_512(s, &mut out) };
            let max = s.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let mut want_sum = 0.0f64;
            for (x, &b) in s.iter().zip(&out) {
                let want = ((*x - max) as f64).exp();
                want_sum += want;
                // The conversion flushes results below the smallest normal f32 to zero.
                let tol = want * (EXP_BF16_BUDGET as f64 + BF16_REL as f64) + f32::MIN_POSITIVE as f64;
                assert!((bf16_to_f32(b) as f64 - want).abs() <= tol, "exp({}) = {}", x - max, bf16_to_f32(b));
            }
            assert!(out[s.len()..].iter().all(|&b| b == 0), "zeros past {}", s.len());
            assert!((sum as f64 - want_sum).abs() <= EXP_BF16_BUDGET as f64 * want_sum, "sum of {}", s.len());
        }
        for len in [1, 7, 16, 23, 40] {
            for at in [0, len / 2, len - 1] {
                for bad in [f32::NAN, f32::INFINITY] {
                    let mut row: Vec<f32> = (0..len).map(|i| i as f32 * 0.1).collect();
                    row[at] = bad;
                    let mut out = vec![0u16; len];
                    // SAFETY: as above.
                    let sum = unsafe { x86::exp_shifted_bf16_512(&row, &mut out) };
                    assert!(sum.is_nan() && bf16_to_f32(out[at]).is_nan(), "{bad} at {at} of {len}");
                }
            }
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
        }
    }
}
