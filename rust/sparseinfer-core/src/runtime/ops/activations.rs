//! Activation functions of the MLP: SiLU (Elfwing et al., arXiv 1702.03118), ReLU, GELU exact and tanh
//! (Hendrycks & Gimpel, arXiv 1606.08415), and the gated form (Shazeer, arXiv 2002.05202).

use crate::error::{Error, Result};
use crate::runtime::config::Mlp;

/// Activation of the MLP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    /// `x · sigmoid(x)`.
    Silu,
    /// `max(x, 0)`.
    Relu,
    /// GELU with the tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    /// Exact GELU (erf).
    Gelu,
}

impl Act {
    /// Parses a Hugging Face activation name.
    pub fn parse(name: &str) -> Result<Act> {
        Ok(match name {
            "silu" | "swish" => Act::Silu,
            "relu" => Act::Relu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Act::GeluTanh,
            "gelu" => Act::Gelu,
            _ => {
                return Err(Error::unsupported(
                    "config",
                    format!("activation {name:?} is not supported (silu, relu, gelu, gelu_new, gelu_pytorch_tanh)"),
                ))
            }
        })
    }

    /// The activation of one value.
    #[inline(always)]
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Act::Silu => x / (1.0 + exp(-x)),
            Act::Relu => x.max(0.0),
            Act::GeluTanh => 0.5 * x * (1.0 + tanh(0.797_884_6 * (x + 0.044_715 * x * x * x))),
            Act::Gelu => 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2)),
        }
    }

    /// `dst[i] = f(src[i])`, one loop per activation so each vectorizes.
    #[inline(always)]
    fn apply_all(self, src: &[f32], dst: &mut [f32]) {
        match self {
            Act::Silu => dst.iter_mut().zip(src).for_each(|(d, &x)| *d = Act::Silu.apply(x)),
            Act::Relu => dst.iter_mut().zip(src).for_each(|(d, &x)| *d = Act::Relu.apply(x)),
            Act::GeluTanh => dst.iter_mut().zip(src).for_each(|(d, &x)| *d = Act::GeluTanh.apply(x)),
            Act::Gelu => dst.iter_mut().zip(src).for_each(|(d, &x)| *d = Act::Gelu.apply(x)),
        }
    }

    /// `x[i] = f(x[i])`, one loop per activation so each vectorizes.
    #[inline(always)]
    fn apply_in_place(self, x: &mut [f32]) {
        match self {
            Act::Silu => x.iter_mut().for_each(|v| *v = Act::Silu.apply(*v)),
            Act::Relu => x.iter_mut().for_each(|v| *v = Act::Relu.apply(*v)),
            Act::GeluTanh => x.iter_mut().for_each(|v| *v = Act::GeluTanh.apply(*v)),
            Act::Gelu => x.iter_mut().for_each(|v| *v = Act::Gelu.apply(*v)),
        }
    }
}

/// The MLP's activation of `k` rows: `act[k × I] = f(up)`, or for a gated MLP `f(gate) · up` from
/// `up[k × 2I]` (gate columns first in each row). The same operations compiled for the active SIMD path (the
/// functions are branch-free, so the loops vectorize), which gives the same bits as the portable build: there
/// is no fused multiply-add to contract. Rows are split over the thread pool when there are many.
pub fn mlp_activation(mlp: Mlp, i: usize, up: &[f32], act: &mut [f32]) {
    let up_w = if let Mlp::Gated(_) = mlp { 2 * i } else { i };
    crate::parallel::for_rows(act, i, |r0, act| mlp_rows(mlp, i, &up[r0 * up_w..], act));
}

crate::kernels::on_active_isa! {
    fn mlp_rows(mlp: Mlp, i: usize, up: &[f32], act: &mut [f32]) {
        mlp_body(mlp, i, up, act)
    }
}

/// `x = f(x)` in place over rows of `width` (the audio front end's GELUs), as [`mlp_activation`] computes it.
pub fn activate_in_place(f: Act, x: &mut [f32], width: usize) {
    crate::parallel::for_rows(x, width, |_, x| in_place(f, x));
}

crate::kernels::on_active_isa! {
    fn in_place(f: Act, x: &mut [f32]) {
        f.apply_in_place(x)
    }
}

#[inline(always)]
fn mlp_body(mlp: Mlp, i: usize, up: &[f32], act: &mut [f32]) {
    match mlp {
        Mlp::Gated(f) => {
            for (row, out) in up.chunks_exact(2 * i).zip(act.chunks_exact_mut(i)) {
                let (gate, upv) = row.split_at(i);
                f.apply_all(gate, out);
                out.iter_mut().zip(upv).for_each(|(o, u)| *o *= u);
            }
        }
        Mlp::Plain(f) => f.apply_all(up, act),
    }
}

/// `e^x` in f32 to within [`EXP_BUDGET`] relative, branch-free so loops over it vectorize: `x = n·ln2 + r`
/// (Cody-Waite, `|r| <= ln2/2`), `e^r` by its degree-7 Taylor polynomial, `2^n` from exponent bits. Arguments
/// are clamped to `[-87, 88]` (below, the result is within 2e-38 of the true one; above, the activations that
/// use it have reached their limits: SiLU's `x / (1 + e^-x)` is 0 to within 1e-36, tanh is ±1).
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75; // ln 2 with its last 12 bits zero, so n·LN2_HI is exact
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5·2^23 rounds to the nearest integer (|x·log2e| < 2^22).
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.0 / 5040.0;
    for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = p * r + c;
    }
    // n as an integer from the low mantissa bits of `shifted` (1.5·2^23 + n): integer lanes, where `n as i32`
    // (saturating, NaN-checked) made the compiler convert one lane at a time.
    let n_int = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    p * f32::from_bits(((n_int + 127) as u32) << 23)
}

/// Largest relative error of [`exp`] against the exact function over `[-87, 88]`: the polynomial's 5e-9 and a
/// few f32 roundings. Tests hold it to the f64 exponential.
pub const EXP_BUDGET: f32 = 3e-7;

/// `tanh(y) = 1 - 2 / (e^{2y} + 1)` with [`exp`]: within about 3e-7 absolute (relative accuracy near 0 is not
/// needed where it is used, inside `0.5·x·(1 + tanh(...))`).
#[inline(always)]
fn tanh(y: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * y) + 1.0)
}

/// The error function to within [`ERF_BUDGET`] (Abramowitz & Stegun 7.1.26: a degree-5 polynomial in
/// `1 / (1 + p|x|)` times `exp(-x²)`), in f32 and branch-free so every MLP activation of an encoder over 1500
/// positions vectorizes; tests hold it to the f64 series reference below.
#[inline(always)]
fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [0.254_829_6, -0.284_496_74, 1.421_413_8, -1.453_152, 1.061_405_4];
    let ax = x.abs();
    let t = 1.0 / (1.0 + P * ax);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    (1.0 - poly * exp(-ax * ax)).copysign(x)
}

/// Largest |error| of [`erf`] against the exact function: the approximation's 1.5e-7 plus the f32 roundings of
/// `t`, the polynomial and [`exp`] (up to [`EXP_BUDGET`] relative), which all carry into `poly·e^{-x²}` near 1.
pub const ERF_BUDGET: f32 = 6e-7;

#[cfg(test)]
mod tests {
    use super::*;

    /// The error function to ~1e-12 in f64 (series below 2.5, continued fraction above): the reference for
    /// [`erf`].
    fn erf_f64(x: f64) -> f64 {
        let ax = x.abs();
        let r = if ax < 2.5 {
            // Maclaurin series: erf(x) = 2/√π Σ (-1)^n x^(2n+1) / (n! (2n+1)).
            let (mut term, mut sum, x2) = (ax, ax, ax * ax);
            let mut n = 0.0;
            while term.abs() > 1e-17 * sum.abs() {
                n += 1.0;
                term *= -x2 / n;
                let add = term / (2.0 * n + 1.0);
                sum += add;
                if add.abs() < 1e-17 {
                    break;
                }
            }
            sum * std::f64::consts::FRAC_2_SQRT_PI
        } else {
            // erfc(x) = exp(-x²)/(x√π) · continued fraction, evaluated bottom-up with 60 terms.
            let mut f = 0.0;
            for k in (1..=60).rev() {
                f = (k as f64 / 2.0) / (ax + f);
            }
            1.0 - (-ax * ax).exp() / (std::f64::consts::PI.sqrt() * (ax + f))
        };
        r.copysign(x)
    }

    #[test]
    fn reference_erf_matches_known_values() {
        for (x, want) in [
            (0.0, 0.0),
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (2.0, 0.995_322_265_018_952_7),
            (3.0, 0.999_977_909_503_001_4),
            (-1.0, -0.842_700_792_949_714_9),
        ] {
            assert!((erf_f64(x) - want).abs() < 1e-12, "erf({x}) = {} want {want}", erf_f64(x));
        }
    }

    #[test]
    fn exp_is_within_its_budget() {
        let mut worst = 0.0f64;
        for i in -870_000..=880_000 {
            let x = i as f32 * 1e-4;
            let want = (x as f64).exp();
            worst = worst.max((exp(x) as f64 - want).abs() / want);
        }
        assert!(worst <= EXP_BUDGET as f64, "max relative exp error {worst:e} over {EXP_BUDGET:e}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) < 2e-38 && exp(f32::NEG_INFINITY) < 2e-38);
        assert!((tanh(20.0) - 1.0).abs() < 1e-7 && (tanh(-20.0) + 1.0).abs() < 1e-7);
    }

    /// Every activation against its f64 definition, and the SIMD-compiled loops against the portable one, bit
    /// for bit.
    #[test]
    fn activations_match_their_definitions_on_every_path() {
        let xs: Vec<f32> = (-3000..=3000).map(|i| i as f32 * 7e-3).chain([-100.0, 100.0, 0.0, -0.0]).collect();
        for (f, def) in [
            (Act::Silu, (|x: f64| x / (1.0 + (-x).exp())) as fn(f64) -> f64),
            (Act::Relu, |x: f64| x.max(0.0)),
            (Act::GeluTanh, |x: f64| 0.5 * x * (1.0 + (0.797_884_560_802_865_4 * (x + 0.044_715 * x * x * x)).tanh())),
            (Act::Gelu, |x: f64| 0.5 * x * (1.0 + erf_f64(x / std::f64::consts::SQRT_2))),
        ] {
            for &x in &xs {
                let (got, want) = (f.apply(x) as f64, def(x as f64));
                assert!((got - want).abs() <= 1e-6 * (1.0 + want.abs()), "{f:?}({x}) = {got}, want {want}");
            }
            let mut portable = vec![0.0f32; xs.len()];
            mlp_body(Mlp::Plain(f), xs.len(), &xs, &mut portable);
            let mut active = vec![0.0f32; xs.len()];
            mlp_activation(Mlp::Plain(f), xs.len(), &xs, &mut active);
            for (a, p) in active.iter().zip(&portable) {
                assert_eq!(a.to_bits(), p.to_bits(), "{f:?}");
            }
        }
    }

    #[test]
    fn erf_is_within_its_budget() {
        let mut worst = 0.0f32;
        for i in -80_000..=80_000 {
            let x = i as f32 * 1e-4; // -8..8
            let err = (erf(x) as f64 - erf_f64(x as f64)).abs() as f32;
            worst = worst.max(err);
        }
        assert!(worst <= ERF_BUDGET, "max |erf error| {worst:e} over the budget {ERF_BUDGET:e}");
        assert_eq!(erf(f32::INFINITY), 1.0);
        assert!(erf(0.0).abs() <= ERF_BUDGET && erf(-1.0) == -erf(1.0));
    }
}
