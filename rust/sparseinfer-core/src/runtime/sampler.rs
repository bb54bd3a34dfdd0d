//! Choosing the next token from logits: greedy, or temperature → top-k → top-p sampling (the order
//! transformers applies them), with an optional repetition penalty (Keskar et al., arXiv 1909.05858).

use crate::error::{Error, Result};

/// Temperatures below this sample greedily: every token but the maximum has probability 0 in f64 there
/// (a logit gap of 1e-6 over 1e-30 is exp(-1e24)), so the division is skipped.
pub const GREEDY_BELOW: f32 = 1e-30;

/// Sampling settings.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 (or anything below [`GREEDY_BELOW`]) means greedy.
    pub temperature: f32,
    /// Keep the `k` most likely tokens.
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches `p`.
    pub top_p: Option<f32>,
    /// Divide positive logits (multiply negative ones) of tokens already seen by this factor; 1 = off.
    pub repetition_penalty: f32,
    /// Random seed; `None` seeds from the clock.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { temperature: 0.0, top_k: None, top_p: None, repetition_penalty: 1.0, seed: None }
    }
}

impl SamplingParams {
    /// Rejects settings that have no meaning.
    pub fn validate(&self) -> Result<()> {
        const OP: &str = "sampling";
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::invalid(
                OP,
                format!("temperature must be a finite number >= 0, got {}", self.temperature),
            ));
        }
        if self.top_k == Some(0) {
            return Err(Error::invalid(OP, "top_k must be >= 1"));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::invalid(OP, format!("top_p must be in (0, 1], got {p}")));
            }
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(Error::invalid(OP, format!("repetition_penalty must be > 0, got {}", self.repetition_penalty)));
        }
        Ok(())
    }
}

/// A sampler with its own random stream (splitmix64; no global state).
pub struct Sampler {
    params: SamplingParams,
    state: u64,
}

impl Sampler {
    /// A sampler; errors on invalid settings.
    pub fn new(params: SamplingParams) -> Result<Sampler> {
        params.validate()?;
        let state = params.seed.unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0x5eed, |d| d.as_nanos() as u64)
        });
        Ok(Sampler { params, state })
    }

    fn next_f64(&mut self) -> f64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Picks a token from `logits` (modified in place by the penalty), given the tokens seen so far.
    pub fn sample(&mut self, logits: &mut [f32], seen: &[u32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(Error::invalid("sample", "empty logits"));
        }
        if let Some(i) = logits.iter().position(|v| v.is_nan()) {
            return Err(Error::invalid("sample", format!("logit {i} is NaN (the model produced non-finite values)")));
        }
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let mut done = vec![false; logits.len()];
            for &t in seen {
                let t = t as usize;
                if t < logits.len() && !done[t] {
                    done[t] = true;
                    let l = &mut logits[t];
                    // Clamped: a tiny penalty must not turn a logit into an infinity.
                    *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty }
                        .clamp(f32::MIN, f32::MAX);
                }
            }
        }
        if p.temperature < GREEDY_BELOW {
            // First maximum, as argmax does in torch.
            let mut best = 0;
            for (i, &v) in logits.iter().enumerate() {
                if v > logits[best] {
                    best = i;
                }
            }
            return Ok(best as u32);
        }
        // Candidates in decreasing logit order (the order of logit / T for any T > 0).
        let mut cand: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if let Some(k) = p.top_k {
            cand.truncate(k.min(cand.len()));
        }
        // Softmax of logit / T in log space: (l - max) / T is <= 0, so a tiny T sends it to -inf (probability 0)
        // instead of overflowing l / T to infinities whose difference is NaN.
        let (max, t) = (cand[0].1 as f64, p.temperature as f64);
        let mut probs: Vec<f64> =
            cand.iter().map(|c| if c.1 as f64 == max { 1.0 } else { ((c.1 as f64 - max) / t).exp() }).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
        if let Some(top_p) = p.top_p {
            // Keep the most likely tokens until their mass reaches top_p (always at least one).
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, &q) in probs.iter().enumerate() {
                acc += q;
                if acc >= top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            let s: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|x| *x /= s);
        }
        let r = self.next_f64();
        let mut acc = 0.0;
        for (i, q) in probs.iter().enumerate() {
            acc += q;
            if r < acc {
                return Ok(cand[i].0);
            }
        }
        Ok(cand[probs.len() - 1].0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(SamplingParams::default()).unwrap();
        assert_eq!(s.sample(&mut [1.0, 3.0, 3.0, -1.0], &[]).unwrap(), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_seed_repeats() {
        let p = SamplingParams { temperature: 1.0, top_k: Some(1), seed: Some(7), ..Default::default() };
        let mut s = Sampler::new(p).unwrap();
        assert_eq!(s.sample(&mut [0.0, 0.5, 2.0], &[]).unwrap(), 2);
        let p = SamplingParams { temperature: 1.0, seed: Some(3), ..Default::default() };
        let draw = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone()).unwrap();
            (0..20).map(|_| s.sample(&mut [0.1, 0.2, 0.3, 0.4], &[]).unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(draw(&p), draw(&p));
        assert!(draw(&p).iter().any(|&t| t != draw(&p)[0]), "temperature 1 over near-flat logits must vary");
    }

    #[test]
    fn repetition_penalty_demotes_seen_tokens() {
        let p = SamplingParams { repetition_penalty: 2.0, ..Default::default() };
        let mut s = Sampler::new(p).unwrap();
        assert_eq!(s.sample(&mut [3.0, 2.0], &[0]).unwrap(), 1);
    }

    #[test]
    fn tiny_temperatures_pick_the_maximum() {
        for t in [1e-20f32, 1e-30, 1e-38, 1e-45, f32::MIN_POSITIVE] {
            for seed in 0..20 {
                let p = SamplingParams { temperature: t, seed: Some(seed), ..Default::default() };
                let mut s = Sampler::new(p).unwrap();
                let mut logits = [3.0, 1e30, -1e30, 1e30 * (1.0 - 1e-7), 0.5];
                assert_eq!(s.sample(&mut logits, &[]).unwrap(), 1, "temperature {t}");
                assert_eq!(s.sample(&mut [-5.0, -1.0, -3.0], &[]).unwrap(), 1, "temperature {t}");
            }
        }
    }

    #[test]
    fn tiny_repetition_penalty_stays_finite() {
        let p = SamplingParams { temperature: 1.0, repetition_penalty: 1e-45, seed: Some(1), ..Default::default() };
        let mut s = Sampler::new(p).unwrap();
        assert!(s.sample(&mut [1.0, 2.0, 3.0], &[0, 1]).unwrap() < 3);
    }

    #[test]
    fn bad_settings_and_nan_are_errors() {
        for t in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -1e-30] {
            assert!(Sampler::new(SamplingParams { temperature: t, ..Default::default() }).is_err(), "{t}");
        }
        assert!(Sampler::new(SamplingParams { temperature: -1.0, ..Default::default() }).is_err());
        assert!(Sampler::new(SamplingParams { top_p: Some(0.0), ..Default::default() }).is_err());
        assert!(Sampler::new(SamplingParams::default()).unwrap().sample(&mut [f32::NAN], &[]).is_err());
    }
}
