//! A 1-D convolution of kernel width 3 with zero padding 1 (Whisper's audio front end), run as its im2col form
//! through a [`Linear`]: output position `t` reads input positions `t · stride - 1 ..= t · stride + 1`.

use super::Linear;
use crate::error::{Error, Result};

/// The kernel width.
pub const WIDTH: usize = 3;

/// Output positions of `frames` inputs at `stride` (`⌊(frames - 1) / stride⌋ + 1`, as PyTorch's `Conv1d`
/// with padding 1 gives).
pub fn out_len(frames: usize, stride: usize) -> usize {
    if frames == 0 {
        0
    } else {
        (frames - 1) / stride + 1
    }
}

/// `y[t × out]` of the channel-major input `x[channels × frames]` (row `c` holds channel `c` over time, as a
/// spectrogram is laid out) through the convolution `w` (`out` rows, `channels · 3` columns, index
/// `c · 3 + j`).
pub fn conv1d_channel_major(w: &Linear, x: &[f32], channels: usize, frames: usize, stride: usize) -> Result<Vec<f32>> {
    im2col_forward(w, channels, frames, stride, |c, t| x[c * frames + t])
}

/// As [`conv1d_channel_major`] for the time-major input `x[frames × channels]` (the previous layer's output).
pub fn conv1d_time_major(w: &Linear, x: &[f32], channels: usize, frames: usize, stride: usize) -> Result<Vec<f32>> {
    im2col_forward(w, channels, frames, stride, |c, t| x[t * channels + c])
}

fn im2col_forward(
    w: &Linear,
    channels: usize,
    frames: usize,
    stride: usize,
    at: impl Fn(usize, usize) -> f32,
) -> Result<Vec<f32>> {
    let cols = channels * WIDTH;
    if w.w.cols() != cols {
        return Err(Error::invalid(
            "conv",
            format!("{channels} input channels, the weight has {} columns", w.w.cols()),
        ));
    }
    let n = out_len(frames, stride);
    let mut patches = alloc(n.checked_mul(cols))?;
    for (t, row) in patches.chunks_exact_mut(cols).enumerate() {
        for c in 0..channels {
            for j in 0..WIDTH {
                // Input position t·stride + j - 1, zero outside 0..frames.
                let p = (t * stride + j).checked_sub(1).filter(|&p| p < frames);
                row[c * WIDTH + j] = p.map_or(0.0, |p| at(c, p));
            }
        }
    }
    let mut y = alloc(n.checked_mul(w.w.rows()))?;
    w.forward(&patches, n, &mut y)?;
    Ok(y)
}

fn alloc(n: Option<usize>) -> Result<Vec<f32>> {
    let n = n.ok_or_else(|| Error::invalid("conv", "the output size overflows"))?;
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| Error::invalid("conv", format!("not enough memory for {n} values")))?;
    v.resize(n, 0.0);
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::{Format, PackOptions, PackedMatrix};

    /// The convolution by its definition, in f64: `y[t][o] = b[o] + Σ_c Σ_j w[o][c][j] · x[c][t·stride + j - 1]`.
    fn direct(w: &[f32], b: &[f32], x: &[f32], out: usize, ch: usize, frames: usize, stride: usize) -> Vec<f32> {
        let n = out_len(frames, stride);
        let mut y = vec![0.0f32; n * out];
        for t in 0..n {
            for o in 0..out {
                let mut acc = b[o] as f64;
                for c in 0..ch {
                    for j in 0..WIDTH {
                        let p = (t * stride + j) as isize - 1;
                        if p >= 0 && (p as usize) < frames {
                            acc += w[(o * ch + c) * WIDTH + j] as f64 * x[c * frames + p as usize] as f64;
                        }
                    }
                }
                y[t * out + o] = acc as f32;
            }
        }
        y
    }

    #[test]
    fn im2col_matches_the_definition_at_both_strides_and_layouts() {
        let (out, ch) = (5, 4);
        let val = |i: usize, k: usize| ((i * k + 7) % 23) as f32 / 11.0 - 1.0;
        let w: Vec<f32> = (0..out * ch * WIDTH).map(|i| val(i, 3)).collect();
        let b: Vec<f32> = (0..out).map(|i| val(i, 5)).collect();
        let lin = Linear {
            w: PackedMatrix::pack(&w, out, ch * WIDTH, Format::DenseF32, PackOptions::default()).unwrap(),
            bias: Some(b.clone()),
            act: None,
        };
        for frames in [1, 2, 7, 8] {
            let x: Vec<f32> = (0..ch * frames).map(|i| val(i, 13)).collect();
            let time_major: Vec<f32> = (0..frames * ch).map(|i| x[(i % ch) * frames + i / ch]).collect();
            for stride in [1, 2] {
                let want = direct(&w, &b, &x, out, ch, frames, stride);
                let got = conv1d_channel_major(&lin, &x, ch, frames, stride).unwrap();
                let got_t = conv1d_time_major(&lin, &time_major, ch, frames, stride).unwrap();
                assert_eq!(got.len(), want.len());
                for ((g, t), w) in got.iter().zip(&got_t).zip(&want) {
                    assert!((g - w).abs() <= 1e-5 && (t - w).abs() <= 1e-5, "{g} {t} {w} (frames {frames})");
                }
            }
        }
        assert_eq!(out_len(3000, 2), 1500);
        assert_eq!(out_len(3001, 2), 1501);
    }
}
