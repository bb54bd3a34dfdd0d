//! The attention block kernels on NEON (the NEON path's [`VectorOps`]), the counterparts of the x86 ones in
//! [`crate::kernels::vector`]: the scores of up to [`MAX_QUERIES`](vector::MAX_QUERIES) queries over key panels (a panel's [`PANEL`]
//! positions as eight vectors of four lanes, each key row loaded once for two queries), the weighted sums of
//! position-major values (sixteen dimensions at a time for up to four queries), and the softmax numerators with
//! the x86 kernels' polynomial exponential. Keys and values are f32, f16 (widened by `fcvtl`) or int8 codes
//! (widened by `sxtl` and `scvtf`). The scalar references are the contract: the sums differ from theirs only by
//! FMA rounding, the exponential by at most [`EXP_BUDGET`](crate::kernels::vector::EXP_BUDGET).

use crate::kernels::vector::{self, KvElem, VectorOps, EXP_HI, EXP_LN2_HI, EXP_LN2_LO, EXP_LO, EXP_TAYLOR, F16, PANEL};
use core::arch::aarch64::*;
use std::ops::Range;

/// The kernels, installed by [`crate::kernels::vector::ops`] where the NEON path runs.
pub fn ops() -> VectorOps {
    VectorOps {
        scores: scores::<f32>,
        scores_i8: scores::<i8>,
        scores_f16: scores::<F16>,
        weighted: weighted::<f32>,
        weighted_i8: weighted::<i8>,
        weighted_f16: weighted::<F16>,
        exp_shifted,
    }
}

/// Sixteen elements widened to f32 lanes.
trait Lanes: KvElem {
    /// # Safety
    /// NEON; `p` points at sixteen readable elements.
    unsafe fn load16(p: *const Self) -> [float32x4_t; 4];
}

impl Lanes for f32 {
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> [float32x4_t; 4] {
        [vld1q_f32(p), vld1q_f32(p.add(4)), vld1q_f32(p.add(8)), vld1q_f32(p.add(12))]
    }
}

impl Lanes for F16 {
    #[inline(always)]
    unsafe fn load16(p: *const F16) -> [float32x4_t; 4] {
        // `F16` is a transparent `u16`.
        let (a, b) = (vld1q_u16(p as *const u16), vld1q_u16((p as *const u16).add(8)));
        [
            widen_f16(vget_low_u16(a)),
            widen_f16(vget_high_u16(a)),
            widen_f16(vget_low_u16(b)),
            widen_f16(vget_high_u16(b)),
        ]
    }
}

/// Four halves to f32 (exact, as `f16_to_f32`) with `fcvtl`, base Advanced SIMD. Written as assembly because its
/// intrinsic (`vcvt_f32_f16`) is stable only from Rust 1.94, above this crate's minimum version.
#[inline(always)]
unsafe fn widen_f16(h: uint16x4_t) -> float32x4_t {
    let f: float32x4_t;
    core::arch::asm!("fcvtl {f:v}.4s, {h:v}.4h", h = in(vreg) h, f = lateout(vreg) f, options(pure, nomem, nostack));
    f
}

impl Lanes for i8 {
    #[inline(always)]
    unsafe fn load16(p: *const i8) -> [float32x4_t; 4] {
        let v = vld1q_s8(p);
        let (lo, hi) = (vmovl_s8(vget_low_s8(v)), vmovl_high_s8(v));
        let f = |w: int32x4_t| vcvtq_f32_s32(w);
        [f(vmovl_s16(vget_low_s16(lo))), f(vmovl_high_s16(lo)), f(vmovl_s16(vget_low_s16(hi))), f(vmovl_high_s16(hi))]
    }
}

/// [`crate::kernels::vector::scores_scalar`] on NEON, with the bounds checks every block kernel makes (`check_scores`).
fn scores<T: Lanes>(q: &[f32], m: usize, panels: &[T], range: Range<usize>, out: &mut [f32]) {
    let (hd, l) = vector::check_scores(q.len(), m, panels.len(), &range, out.len());
    for a0 in (0..m).step_by(2) {
        let (qa, oa) = (&q[a0 * hd..], &mut out[a0 * l..]);
        // SAFETY: `ops` installs this only where the NEON path runs; the panels cover `range` (checked above),
        // `qa` holds the pair's queries and `oa` their `l` scores each.
        unsafe {
            if m - a0 >= 2 {
                panel_scores::<T, 2>(qa, hd, panels.as_ptr(), range.clone(), oa);
            } else {
                panel_scores::<T, 1>(qa, hd, panels.as_ptr(), range.clone(), oa);
            }
        }
    }
}

/// Scores of `M` (1 or 2) queries `q[a · hd..]` over every panel of `range`: per panel and query eight
/// accumulators of four positions, one key row load per dimension for both queries.
///
/// # Safety
/// NEON; `panels` holds the whole panels covering `range` (`hd · PANEL` elements each), `q` `M · hd` values and
/// `out` `M · range.len()`.
#[target_feature(enable = "neon")]
unsafe fn panel_scores<T: Lanes, const M: usize>(
    q: &[f32],
    hd: usize,
    panels: *const T,
    range: Range<usize>,
    out: &mut [f32],
) {
    let l = range.len();
    let mut lanes = [0.0f32; PANEL];
    for p in range.start / PANEL..range.end.div_ceil(PANEL) {
        let panel = panels.add(p * hd * PANEL);
        let mut acc = [[vdupq_n_f32(0.0); 8]; M];
        for d in 0..hd {
            let (k0, k1) = (T::load16(panel.add(d * PANEL)), T::load16(panel.add(d * PANEL + 16)));
            for (a, acc) in acc.iter_mut().enumerate() {
                let qd = vdupq_n_f32(*q.get_unchecked(a * hd + d));
                for v in 0..4 {
                    acc[v] = vfmaq_f32(acc[v], qd, k0[v]);
                    acc[4 + v] = vfmaq_f32(acc[4 + v], qd, k1[v]);
                }
            }
        }
        let (lo, hi) = ((p * PANEL).max(range.start), ((p + 1) * PANEL).min(range.end));
        for (a, acc) in acc.iter().enumerate() {
            for (v, &x) in acc.iter().enumerate() {
                vst1q_f32(lanes.as_mut_ptr().add(4 * v), x);
            }
            out[a * l + lo - range.start..a * l + hi - range.start]
                .copy_from_slice(&lanes[lo - p * PANEL..hi - p * PANEL]);
        }
    }
}

/// [`crate::kernels::vector::weighted_scalar`] on NEON, with the bounds checks every block kernel makes (`check_weighted`).
fn weighted<T: Lanes>(p: &[f32], m: usize, v: &[T], hd: usize, start: usize, out: &mut [f32]) {
    let l = vector::check_weighted(p.len(), m, v.len(), hd, start, out.len());
    let v = &v[start * hd..(start + l) * hd];
    for a0 in (0..m).step_by(4) {
        let (pa, oa) = (&p[a0 * l..], &mut out[a0 * hd..]);
        // SAFETY: as for `scores`: `v` holds `l` rows of `hd`, `pa` the group's `l` weights per query, `oa` its
        // `hd` sums per query.
        unsafe {
            match m - a0 {
                1 => weighted_rows::<T, 1>(pa, l, v, hd, oa),
                2 => weighted_rows::<T, 2>(pa, l, v, hd, oa),
                3 => weighted_rows::<T, 3>(pa, l, v, hd, oa),
                _ => weighted_rows::<T, 4>(pa, l, v, hd, oa),
            }
        }
    }
}

/// Weighted sums of `l` value rows for `M` (1 to 4) queries: sixteen dimensions at a time in four accumulators
/// per query, each value load feeding every query; a tail of fewer than sixteen dimensions one at a time.
///
/// # Safety
/// NEON; `v` holds `l · hd` elements, `p` `M · l` weights and `out` `M · hd` sums.
#[target_feature(enable = "neon")]
unsafe fn weighted_rows<T: Lanes, const M: usize>(p: &[f32], l: usize, v: &[T], hd: usize, out: &mut [f32]) {
    let vp = v.as_ptr();
    let mut d0 = 0;
    while d0 + 16 <= hd {
        let mut acc = [[vdupq_n_f32(0.0); 4]; M];
        for i in 0..l {
            let x = T::load16(vp.add(i * hd + d0));
            for (a, acc) in acc.iter_mut().enumerate() {
                let w = vdupq_n_f32(*p.get_unchecked(a * l + i));
                for k in 0..4 {
                    acc[k] = vfmaq_f32(acc[k], w, x[k]);
                }
            }
        }
        for (a, acc) in acc.iter().enumerate() {
            for (k, &s) in acc.iter().enumerate() {
                vst1q_f32(out.as_mut_ptr().add(a * hd + d0 + 4 * k), s);
            }
        }
        d0 += 16;
    }
    for d in d0..hd {
        for a in 0..M {
            out[a * hd + d] = (0..l).fold(0.0f32, |s, i| p[a * l + i].mul_add(v[i * hd + d].into(), s));
        }
    }
}

/// [`crate::kernels::vector::exp_shifted_scalar`] with the polynomial exponential, on NEON.
fn exp_shifted(s: &mut [f32]) -> f32 {
    // SAFETY: installed only where the NEON path runs.
    unsafe { exp_shifted_neon(s) }
}

/// # Safety
/// NEON.
#[target_feature(enable = "neon")]
unsafe fn exp_shifted_neon(s: &mut [f32]) -> f32 {
    let (n, sp) = (s.len(), s.as_mut_ptr());
    if n == 0 {
        return 0.0;
    }
    // The maximum ignores NaN, as the reference's `f32::max` does (`fmaxnm`).
    let mut mv = vdupq_n_f32(f32::NEG_INFINITY);
    let mut i = 0;
    while i + 4 <= n {
        mv = vmaxnmq_f32(mv, vld1q_f32(sp.add(i)));
        i += 4;
    }
    let max = s[i..].iter().fold(vmaxnmvq_f32(mv), |a, &b| a.max(b));
    let mx = vdupq_n_f32(max);
    let mut sum = vdupq_n_f32(0.0);
    i = 0;
    while i + 4 <= n {
        let e = exp4(vsubq_f32(vld1q_f32(sp.add(i)), mx));
        vst1q_f32(sp.add(i), e);
        sum = vaddq_f32(sum, e);
        i += 4;
    }
    let mut total = vaddvq_f32(sum);
    if i < n {
        // The last lanes through a buffer, so every score takes the same exponential.
        let mut buf = [max; 4];
        buf[..n - i].copy_from_slice(&s[i..]);
        let mut e = [0.0f32; 4];
        vst1q_f32(e.as_mut_ptr(), exp4(vsubq_f32(vld1q_f32(buf.as_ptr()), mx)));
        s[i..].copy_from_slice(&e[..n - i]);
        total += e[..n - i].iter().sum::<f32>();
    }
    total
}

/// `exp` of four lanes by the x86 kernels' steps: `x` held to [-87.3, 88] (a NaN stays NaN: `fmax`/`fmin`
/// return it), `n = round(x / ln 2)` (to nearest even), `r = x - n · ln 2` in two parts, the degree-7 Taylor
/// polynomial of `e^r`, times `2^n` built in the exponent bits.
///
/// # Safety
/// NEON.
#[target_feature(enable = "neon")]
unsafe fn exp4(x: float32x4_t) -> float32x4_t {
    let x = vminq_f32(vdupq_n_f32(EXP_HI), vmaxq_f32(vdupq_n_f32(EXP_LO), x));
    let n = vrndnq_f32(vmulq_n_f32(x, std::f32::consts::LOG2_E));
    let r = vfmsq_f32(x, n, vdupq_n_f32(EXP_LN2_HI));
    let r = vfmsq_f32(r, n, vdupq_n_f32(EXP_LN2_LO));
    let mut poly = vdupq_n_f32(EXP_TAYLOR[0]);
    for c in &EXP_TAYLOR[1..] {
        poly = vfmaq_f32(vdupq_n_f32(*c), poly, r);
    }
    let one = vdupq_n_f32(1.0);
    let poly = vfmaq_f32(one, vfmaq_f32(one, poly, r), r);
    let two_n = vshlq_n_s32::<23>(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)));
    vmulq_f32(poly, vreinterpretq_f32_s32(two_n))
}
