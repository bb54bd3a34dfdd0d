//! Rotary position embeddings (Su et al., arXiv 2104.09864), "rotate_half" convention: the pairs of one head
//! are `(i, i + hd/2)`, rotated by the angle `position · inv_freq[i]`.

use crate::error::{Error, Result};
use serde_json::Value;

/// The `head_dim / 2` inverse frequencies `theta^(-2i / head_dim)` with rope scaling applied, from a
/// `config.json`: `rope_parameters` (transformers ≥ 5) or the older `rope_theta` + `rope_scaling`.
pub fn inv_freq(v: &Value, model_type: &str, head_dim: usize) -> Result<Vec<f32>> {
    // Present but of the wrong type is an error: read as absent, the model would run with other positions.
    let wrong = |key: &str, what: &str| Error::invalid("config", format!("{model_type}: {key} must be {what}"));
    let object = |key: &str| match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(p) if p.is_object() => Ok(Some(p)),
        Some(_) => Err(wrong(key, "an object")),
    };
    let params = object("rope_parameters")?;
    let scaling = match params {
        Some(p) => Some(p),
        None => object("rope_scaling")?,
    };
    let theta = match params.and_then(|p| p.get("rope_theta")).or_else(|| v.get("rope_theta")) {
        None | Some(Value::Null) => 10000.0,
        Some(t) => t.as_f64().ok_or_else(|| wrong("rope_theta", "a number"))?,
    };
    let half = head_dim / 2;
    let mut inv: Vec<f64> = (0..half).map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64)).collect();
    let kind = scaling
        .and_then(|s| s.get("rope_type").or_else(|| s.get("type")))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    let num = |key: &str| scaling.and_then(|s| s.get(key)).and_then(|x| x.as_f64());
    match kind {
        "default" => {}
        "linear" => {
            let f = num("factor").unwrap_or(1.0);
            inv.iter_mut().for_each(|x| *x /= f);
        }
        "llama3" => {
            let factor = num("factor").unwrap_or(8.0);
            let low = num("low_freq_factor").unwrap_or(1.0);
            let high = num("high_freq_factor").unwrap_or(4.0);
            let old_ctx = num("original_max_position_embeddings").unwrap_or(8192.0);
            let (low_wavelen, high_wavelen) = (old_ctx / low, old_ctx / high);
            for x in inv.iter_mut() {
                let wavelen = 2.0 * std::f64::consts::PI / *x;
                if wavelen > low_wavelen {
                    *x /= factor;
                } else if wavelen >= high_wavelen {
                    let smooth = (old_ctx / wavelen - low) / (high - low);
                    *x = (1.0 - smooth) * *x / factor + smooth * *x;
                }
            }
        }
        other => {
            return Err(Error::unsupported(
                "config",
                format!("{model_type}: rope scaling {other:?} is not supported (default, linear, llama3)"),
            ))
        }
    }
    Ok(inv.into_iter().map(|x| x as f32).collect())
}

/// cos/sin tables `[k × hd/2]` for positions `pos0..pos0+k`.
pub fn tables(inv_freq: &[f32], pos0: usize, k: usize) -> (Vec<f32>, Vec<f32>) {
    let half = inv_freq.len();
    let (mut cos, mut sin) = (vec![0.0; k * half], vec![0.0; k * half]);
    for a in 0..k {
        for (i, f) in inv_freq.iter().enumerate() {
            // Match the reference: the angle is formed in f32, then its cosine and sine are taken.
            let angle = ((pos0 + a) as f32 * f) as f64;
            cos[a * half + i] = angle.cos() as f32;
            sin[a * half + i] = angle.sin() as f32;
        }
    }
    (cos, sin)
}

/// Rotates one head in place, "rotate_half" convention: pairs `(i, i + hd/2)`.
pub fn rotate(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = head.len() / 2;
    let (x1, x2) = head.split_at_mut(half);
    for i in 0..half {
        let (a, b) = (x1[i], x2[i]);
        x1[i] = a * cos[i] - b * sin[i];
        x2[i] = b * cos[i] + a * sin[i];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_rotates_pairs_half_apart() {
        let mut h = [1.0, 0.0, 0.0, 1.0];
        rotate(&mut h, &[0.0, 1.0], &[1.0, 0.0]);
        assert_eq!(h, [0.0, 0.0, 1.0, 1.0]);
    }
}
