//! NEON kernels (aarch64). Kernel names: `<weight format>_f32` (f32 activations, and int8 activations on `x̂`
//! for the formats [`super::neon_int`] does not serve: asymmetric int4).
//!
//! Same walk as the x86 kernels: 64-column chunks, up to `NR` activation rows, and here 8 columns (one mask
//! byte) per step as two 4-lane f32 vectors. NEON has no expand instruction, so sparse decode looks up, per
//! mask byte, a `tbl` control that moves the next popcount(b) packed values into the set lanes; indices
//! past the table (0xFF) give zero bytes, so pruned lanes come out as 0:
//!
//! ```text
//! mask byte b = 0b0010_1101         packed values: v0 v1 v2 v3 ...
//! lane:          7654 3210
//! i8:   tbl with TBL_I8[b]  = [0,FF,1,2,FF,3,FF,FF]            -> [v0, 0, v1, v2, 0, v3, 0, 0]
//! bf16: tbl with TBL_I16[b] = two bytes per lane (16-byte table)
//! f32:  tbl2 with TBL_I32[b] = four bytes per lane (32-byte table, two 16-byte halves of the output)
//! ```
//! then the pointer advances by popcount(b) values.

use crate::formats::{Format, PackedMatrix, CHUNK};
use crate::kernels::simd::{expand_table, f32_row_kernels, scale_mode, RowScales, ASYM, GRP, ROW};
use core::arch::aarch64::*;

/// Four accumulators per activation row: lanes 0-3 and 4-7 of even and of odd mask bytes.
type Acc<const NR: usize> = [[float32x4_t; 4]; NR];

#[repr(align(16))]
struct Lut<const N: usize>([[u8; N]; 256]);

/// For each mask byte: `tbl` control placing value `rank` (of 1, 2 or 4 bytes) in each set lane.
static TBL_I8: Lut<8> = Lut(expand_table(1));
static TBL_I16: Lut<16> = Lut(expand_table(2));
static TBL_I32: Lut<32> = Lut(expand_table(4));

f32_row_kernels!("neon", |acc| vaddvq_f32(vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3]))));

/// `acc[a] += w · x[a][col..col+8]` for every activation row; `i` (the mask byte) picks the accumulator pair.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn fma_rows<const NR: usize>(
    acc: &mut Acc<NR>,
    i: usize,
    w: [float32x4_t; 2],
    xp: &[*const f32; NR],
    col: usize,
) {
    let j = 2 * (i & 1);
    for a in 0..NR {
        acc[a][j] = vfmaq_f32(acc[a][j], w[0], vld1q_f32(xp[a].add(col)));
        acc[a][j + 1] = vfmaq_f32(acc[a][j + 1], w[1], vld1q_f32(xp[a].add(col + 4)));
    }
}

/// Dequantizes 8 codes (as f32) at column `col` (8 columns never straddle a group: groups are >= 32).
/// `keep` (the mask byte) zeroes pruned lanes for the asymmetric form, whose `m` would make them nonzero.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn dequant<const MODE: u8>(q: [float32x4_t; 2], keep: u8, s: &RowScales, col: usize) -> [float32x4_t; 2] {
    match MODE {
        ROW => q,
        GRP => {
            let d = s.d(col >> s.shift);
            [vmulq_n_f32(q[0], d), vmulq_n_f32(q[1], d)]
        }
        _ => {
            let g = col >> s.shift;
            let (d, mn) = (vdupq_n_f32(s.d(g)), vdupq_n_f32(s.m(g)));
            let lanes = lane_masks(keep);
            [
                vreinterpretq_f32_u32(vandq_u32(lanes[0], vreinterpretq_u32_f32(vfmaq_f32(mn, q[0], d)))),
                vreinterpretq_f32_u32(vandq_u32(lanes[1], vreinterpretq_u32_f32(vfmaq_f32(mn, q[1], d)))),
            ]
        }
    }
}

/// All-ones u32 lanes where bit `lane` of `b` is set (lanes 0-3, 4-7).
#[inline]
#[target_feature(enable = "neon")]
unsafe fn lane_masks(b: u8) -> [uint32x4_t; 2] {
    const BITS: [u32; 8] = [1, 2, 4, 8, 16, 32, 64, 128];
    let v = vdupq_n_u32(b as u32);
    let (lo, hi) = (vld1q_u32(BITS.as_ptr()), vld1q_u32(BITS.as_ptr().add(4)));
    [vtstq_u32(v, lo), vtstq_u32(v, hi)]
}

/// 8 signed byte codes as two f32x4.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn i8x8_to_f32(v: int8x8_t) -> [float32x4_t; 2] {
    let w = vmovl_s8(v);
    [vcvtq_f32_s32(vmovl_s16(vget_low_s16(w))), vcvtq_f32_s32(vmovl_high_s16(w))]
}

/// 8 bytes of packed sparse int4 values (value `2j` in the low nibble of byte `j`) -> 16 codes in order,
/// 0..=15, as two 8-byte halves (values 0-7 and 8-15).
#[inline]
#[target_feature(enable = "neon")]
unsafe fn nibbles(p: *const u8) -> [uint8x8_t; 2] {
    let v = vld1_u8(p);
    let (lo, hi) = (vand_u8(v, vdup_n_u8(0x0F)), vshr_n_u8::<4>(v));
    [vzip1_u8(lo, hi), vzip2_u8(lo, hi)]
}

/// Symmetric int4 nibbles hold `q + 8`; the asymmetric ones hold `q`.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn center_int4<const MODE: u8>(v: uint8x8_t) -> int8x8_t {
    let s = vreinterpret_s8_u8(v);
    if MODE == ASYM {
        s
    } else {
        vsub_s8(s, vdup_n_s8(8))
    }
}

fn zero_acc<const NR: usize>() -> Acc<NR> {
    // SAFETY: an all-zero bit pattern is a valid float32x4_t (+0.0 in every lane).
    unsafe { core::mem::zeroed() }
}

#[inline]
#[target_feature(enable = "neon")]
unsafe fn dense_f32_f32<const NR: usize>(m: &PackedMatrix, r: usize, xp: &[*const f32; NR]) -> Acc<NR> {
    let w = m.data.as_ptr().add(m.row_start(r)) as *const f32;
    let mut acc = zero_acc::<NR>();
    for col in (0..m.cols_pad).step_by(8) {
        fma_rows(&mut acc, col / 8, [vld1q_f32(w.add(col)), vld1q_f32(w.add(col + 4))], xp, col);
    }
    acc
}

/// 8 bf16 values as two f32x4: bf16 is the upper half of an f32.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn bf16x8_to_f32(h: uint16x8_t) -> [float32x4_t; 2] {
    [vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(h))), vreinterpretq_f32_u32(vshll_high_n_u16::<16>(h))]
}

#[inline]
#[target_feature(enable = "neon")]
unsafe fn dense_bf16_f32<const NR: usize>(m: &PackedMatrix, r: usize, xp: &[*const f32; NR]) -> Acc<NR> {
    let w = m.data.as_ptr().add(m.row_start(r)) as *const u16;
    let mut acc = zero_acc::<NR>();
    for col in (0..m.cols_pad).step_by(8) {
        fma_rows(&mut acc, col / 8, bf16x8_to_f32(vld1q_u16(w.add(col))), xp, col);
    }
    acc
}

#[inline]
#[target_feature(enable = "neon")]
unsafe fn dense_int8_f32<const NR: usize, const MODE: u8>(
    m: &PackedMatrix,
    r: usize,
    xp: &[*const f32; NR],
) -> Acc<NR> {
    let w = m.data.as_ptr().add(m.row_start(r)) as *const i8;
    let s = RowScales::of(m, r);
    let mut acc = zero_acc::<NR>();
    for col in (0..m.cols_pad).step_by(8) {
        let q = i8x8_to_f32(vld1_s8(w.add(col)));
        fma_rows(&mut acc, col / 8, dequant::<MODE>(q, 0xFF, &s, col), xp, col);
    }
    acc
}

#[inline]
#[target_feature(enable = "neon")]
unsafe fn dense_int4_f32<const NR: usize, const MODE: u8>(
    m: &PackedMatrix,
    r: usize,
    xp: &[*const f32; NR],
) -> Acc<NR> {
    let w = m.data.as_ptr().add(m.row_start(r));
    let s = RowScales::of(m, r);
    let mut acc = zero_acc::<NR>();
    // Dense int4 chunks hold column j in the low and column j + 32 in the high nibble of byte j.
    for ch in 0..m.chunks() {
        for k in 0..4 {
            let v = vld1_u8(w.add(ch * CHUNK / 2 + 8 * k));
            for (h, codes) in [vand_u8(v, vdup_n_u8(0x0F)), vshr_n_u8::<4>(v)].into_iter().enumerate() {
                let col = ch * CHUNK + 32 * h + 8 * k;
                let q = i8x8_to_f32(center_int4::<MODE>(codes));
                fma_rows(&mut acc, k % 2, dequant::<MODE>(q, 0xFF, &s, col), xp, col);
            }
        }
    }
    acc
}

#[inline]
#[target_feature(enable = "neon")]
unsafe fn sparse_f32_f32<const NR: usize>(m: &PackedMatrix, r: usize, xp: &[*const f32; NR]) -> Acc<NR> {
    let mut p = m.data.as_ptr().add(m.row_start(r));
    let masks = m.masks.as_ptr().add(r * m.chunks());
    let mut acc = zero_acc::<NR>();
    for ch in 0..m.chunks() {
        let mask = *masks.add(ch);
        for i in 0..8 {
            let b = (mask >> (8 * i)) as u8 as usize;
            let t = uint8x16x2_t(vld1q_u8(p), vld1q_u8(p.add(16)));
            let idx = TBL_I32.0[b].as_ptr();
            let w = [
                vreinterpretq_f32_u8(vqtbl2q_u8(t, vld1q_u8(idx))),
                vreinterpretq_f32_u8(vqtbl2q_u8(t, vld1q_u8(idx.add(16)))),
            ];
            p = p.add(4 * b.count_ones() as usize);
            fma_rows(&mut acc, i, w, xp, ch * CHUNK + 8 * i);
        }
    }
    acc
}

#[inline]
#[target_feature(enable = "neon")]
unsafe fn sparse_bf16_f32<const NR: usize>(m: &PackedMatrix, r: usize, xp: &[*const f32; NR]) -> Acc<NR> {
    let mut p = m.data.as_ptr().add(m.row_start(r));
    let masks = m.masks.as_ptr().add(r * m.chunks());
    let mut acc = zero_acc::<NR>();
    for ch in 0..m.chunks() {
        let mask = *masks.add(ch);
        for i in 0..8 {
            let b = (mask >> (8 * i)) as u8 as usize;
            let h = vqtbl1q_u8(vld1q_u8(p), vld1q_u8(TBL_I16.0[b].as_ptr()));
            p = p.add(2 * b.count_ones() as usize);
            fma_rows(&mut acc, i, bf16x8_to_f32(vreinterpretq_u16_u8(h)), xp, ch * CHUNK + 8 * i);
        }
    }
    acc
}

/// Expands and accumulates the 64 columns of one chunk from signed byte codes at `p` (int8 codes, or int4
/// codes already unpacked and centred to bytes).
#[inline]
#[target_feature(enable = "neon")]
unsafe fn chunk_codes<const NR: usize, const MODE: u8>(
    acc: &mut Acc<NR>,
    mut p: *const u8,
    mask: u64,
    s: &RowScales,
    xp: &[*const f32; NR],
    ch: usize,
) {
    for i in 0..8 {
        let b = (mask >> (8 * i)) as u8;
        let codes = vqtbl1_u8(vld1q_u8(p), vld1_u8(TBL_I8.0[b as usize].as_ptr()));
        p = p.add(b.count_ones() as usize);
        let col = ch * CHUNK + 8 * i;
        let q = i8x8_to_f32(vreinterpret_s8_u8(codes));
        fma_rows(acc, i, dequant::<MODE>(q, b, s, col), xp, col);
    }
}

#[inline]
#[target_feature(enable = "neon")]
unsafe fn sparse_int8_f32<const NR: usize, const MODE: u8>(
    m: &PackedMatrix,
    r: usize,
    xp: &[*const f32; NR],
) -> Acc<NR> {
    let mut p = m.data.as_ptr().add(m.row_start(r));
    let masks = m.masks.as_ptr().add(r * m.chunks());
    let s = RowScales::of(m, r);
    let mut acc = zero_acc::<NR>();
    for ch in 0..m.chunks() {
        let mask = *masks.add(ch);
        chunk_codes::<NR, MODE>(&mut acc, p, mask, &s, xp, ch);
        p = p.add(mask.count_ones() as usize);
    }
    acc
}

#[inline]
#[target_feature(enable = "neon")]
unsafe fn sparse_int4_f32<const NR: usize, const MODE: u8>(
    m: &PackedMatrix,
    r: usize,
    xp: &[*const f32; NR],
) -> Acc<NR> {
    let mut p = m.data.as_ptr().add(m.row_start(r));
    let masks = m.masks.as_ptr().add(r * m.chunks());
    let s = RowScales::of(m, r);
    let mut acc = zero_acc::<NR>();
    // The chunk's codes unpacked and centred to bytes, plus 16 bytes of slack for the last 16-byte load.
    let mut buf = [0u8; CHUNK + 16];
    for ch in 0..m.chunks() {
        let mask = *masks.add(ch);
        let n = mask.count_ones() as usize;
        // Unpack only the bytes this chunk uses (8 packed bytes hold 16 codes).
        for h in 0..n.div_ceil(16) {
            for (j, half) in nibbles(p.add(8 * h)).into_iter().enumerate() {
                let codes = vreinterpret_u8_s8(center_int4::<MODE>(half));
                vst1_u8(buf.as_mut_ptr().add(16 * h + 8 * j), codes);
            }
        }
        chunk_codes::<NR, MODE>(&mut acc, buf.as_ptr(), mask, &s, xp, ch);
        p = p.add(n.div_ceil(2));
    }
    acc
}
