//! The scalar reference: decode a row to f32, then a plain sequential dot product.
//!
//! This is the twin every SIMD kernel is tested against, the decoder behind `to_dense`, and the fallback
//! on CPUs without a SIMD path. It favours obviousness over speed.

use crate::formats::{bf16_to_f32, Elem, PackedMatrix, CHUNK};

/// Dequantizes row `r` into `out[..cols_pad]` (padding columns decode to zero or to the group minimum).
pub fn decode_row(m: &PackedMatrix, r: usize, out: &mut [f32]) {
    let m = m.row_major();
    let out = &mut out[..m.cols_pad];
    let data = &m.data[m.row_start(r)..];
    let groups = m.groups();
    // ŵ of integer code `q` at column `c`.
    let dequant = |q: i32, c: usize| -> f32 {
        let g = r * groups + c / m.group;
        if m.asym {
            m.scale_at(g) * q as f32 + m.min_at(g)
        } else {
            m.scale_at(g) * q as f32
        }
    };
    let int4 = |nibble: u8| -> i32 {
        if m.asym {
            nibble as i32
        } else {
            nibble as i32 - 8
        }
    };
    if !m.format.is_sparse() {
        for (c, o) in out.iter_mut().enumerate() {
            *o = match m.format.elem() {
                Elem::F32 => f32::from_le_bytes(data[4 * c..4 * c + 4].try_into().unwrap()),
                Elem::Bf16 => bf16_to_f32(u16::from_le_bytes([data[2 * c], data[2 * c + 1]])),
                Elem::I8 => dequant(data[c] as i8 as i32, c),
                Elem::I4 => {
                    let (ch, j) = (c / CHUNK, c % CHUNK);
                    let byte = data[ch * CHUNK / 2 + j % (CHUNK / 2)];
                    dequant(int4((byte >> (4 * (j / (CHUNK / 2)))) & 0xF), c)
                }
            };
        }
        return;
    }
    out.fill(0.0);
    let mut pos = 0; // bytes consumed in this row
    for ch in 0..m.chunks() {
        let mask = m.masks[r * m.chunks() + ch];
        let mut k = 0; // index of the stored value within this chunk
        for j in 0..CHUNK {
            if mask >> j & 1 == 0 {
                continue;
            }
            let c = ch * CHUNK + j;
            out[c] = match m.format.elem() {
                Elem::F32 => f32::from_le_bytes(data[pos + 4 * k..pos + 4 * k + 4].try_into().unwrap()),
                Elem::Bf16 => bf16_to_f32(u16::from_le_bytes([data[pos + 2 * k], data[pos + 2 * k + 1]])),
                Elem::I8 => dequant(data[pos + k] as i8 as i32, c),
                Elem::I4 => dequant(int4((data[pos + k / 2] >> (4 * (k % 2))) & 0xF), c),
            };
            k += 1;
        }
        pos += m.format.elem().bytes(k);
    }
}

/// `y[a·rows + r] = Σ_c ŵ[r, c] · xs[a·cols_pad + c]` for rows `r0..r1` and activation rows `a < k`.
///
/// # Safety
/// `y` must be valid for writes at every index above; `xs` holds `k` zero-padded rows of `cols_pad`.
pub unsafe fn rows(m: &PackedMatrix, r0: usize, r1: usize, xs: &[f32], k: usize, y: *mut f32) {
    let mut w = vec![0.0f32; m.cols_pad];
    for r in r0..r1 {
        decode_row(m, r, &mut w);
        for a in 0..k {
            let x = &xs[a * m.cols_pad..(a + 1) * m.cols_pad];
            let dot = w.iter().zip(x).fold(0.0f32, |acc, (w, x)| acc + w * x);
            *y.add(a * m.rows + r) = dot;
        }
    }
}
