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
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Act::Silu => x / (1.0 + (-x).exp()),
            Act::Relu => x.max(0.0),
            Act::GeluTanh => 0.5 * x * (1.0 + (0.797_884_6 * (x + 0.044_715 * x * x * x)).tanh()),
            Act::Gelu => 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2)),
        }
    }
}

/// The MLP's activation of `k` rows: `act[k × I] = f(up)`, or for a gated MLP `f(gate) · up` from
/// `up[k × 2I]` (gate columns first in each row).
pub fn mlp_activation(mlp: Mlp, i: usize, up: &[f32], act: &mut [f32]) {
    match mlp {
        Mlp::Gated(f) => {
            for (row, out) in up.chunks_exact(2 * i).zip(act.chunks_exact_mut(i)) {
                let (gate, upv) = row.split_at(i);
                for ((o, g), u) in out.iter_mut().zip(gate).zip(upv) {
                    *o = f.apply(*g) * u;
                }
            }
        }
        Mlp::Plain(f) => act.iter_mut().zip(up).for_each(|(o, u)| *o = f.apply(*u)),
    }
}

/// The error function to within [`ERF_BUDGET`] (Abramowitz & Stegun 7.1.26: a degree-5 polynomial in
/// `1 / (1 + p|x|)` times `exp(-x²)`, evaluated in f64 so that f32 rounding adds nothing to the
/// approximation's own 1.5e-7), cheap enough for every MLP activation of an encoder over 1500 positions; tests
/// hold it to the f64 series reference below.
fn erf(x: f32) -> f32 {
    const P: f64 = 0.327_591_1;
    const A: [f64; 5] = [0.254_829_592, -0.284_496_736, 1.421_413_741, -1.453_152_027, 1.061_405_429];
    let ax = (x as f64).abs();
    let t = 1.0 / (1.0 + P * ax);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    ((1.0 - poly * (-ax * ax).exp()) as f32).copysign(x)
}

/// Largest |error| of [`erf`] against the exact function: the approximation's 1.5e-7 plus one f32 rounding.
pub const ERF_BUDGET: f32 = 2e-7;

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
