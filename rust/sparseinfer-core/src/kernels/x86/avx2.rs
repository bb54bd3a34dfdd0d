//! AVX2 + FMA kernels. Kernel names: `<weight format>_f32` (f32 activations; symmetric integer weights with
//! int8 activations run the integer kernels of [`super::avx2_int`]).
//!
//! Same walk as the AVX-512 kernels (64-column chunks, up to `NR` activation rows) with 8-lane vectors.
//! AVX2 has no expand instruction, so sparse decode goes one mask byte (8 columns) at a time through
//! 256-entry lookup tables built at compile time:
//!
//! ```text
//! mask byte b = 0b0010_1101         packed values: v0 v1 v2 v3 ...
//! lane:          7654 3210
//! f32:  vpermps with EXPAND_IDX[b] = [0,0,1,2,0,3,0,0] -> [v0, x, v1, v2, x, v3, x, x], AND LANE_MASK[b]
//! i8:   pshufb  with SHUF_I8[b]    = [0,FF,1,2,FF,3,FF,FF] (a set high bit zeroes a byte)
//! bf16: pshufb  with SHUF_I16[b]   = two bytes per lane
//! ```
//! then the pointer advances by popcount(b) values.

use super::{min, scale};
use crate::formats::{Format, PackedMatrix, CHUNK};
use crate::kernels::simd::{expand_table, f32_row_kernels, scale_mode, RowScales, ASYM, GRP, ROW};
use core::arch::x86_64::*;

type Acc<const NR: usize> = [[__m256; 2]; NR];

#[repr(align(32))]
struct Lut32([[u32; 8]; 256]);
#[repr(align(16))]
pub(super) struct Lut16(pub(super) [[u8; 16]; 256]);

/// For each mask byte: the rank of each set lane among the set lanes (0 for clear lanes).
static EXPAND_IDX: Lut32 = Lut32(build_expand_idx());
/// For each mask byte: all-ones in set lanes.
static LANE_MASK: Lut32 = Lut32(build_lane_mask());
/// For each mask byte: pshufb control placing byte `rank` in each set lane (first 8 bytes used).
static SHUF_I8: Lut16 = Lut16(expand_table(1));
/// For each mask byte: pshufb control placing 16-bit value `rank` in each set lane.
static SHUF_I16: Lut16 = Lut16(expand_table(2));

/// For each mask byte, the rank of each set lane among the set lanes (0 in clear lanes).
const fn build_expand_idx() -> [[u32; 8]; 256] {
    let mut t = [[0u32; 8]; 256];
    let mut b = 0;
    while b < 256 {
        let (mut lane, mut rank) = (0, 0);
        while lane < 8 {
            if b >> lane & 1 == 1 {
                t[b][lane] = rank;
                rank += 1;
            }
            lane += 1;
        }
        b += 1;
    }
    t
}

const fn build_lane_mask() -> [[u32; 8]; 256] {
    let mut t = [[0u32; 8]; 256];
    let mut b = 0;
    while b < 256 {
        let mut lane = 0;
        while lane < 8 {
            if b >> lane & 1 == 1 {
                t[b][lane] = u32::MAX;
            }
            lane += 1;
        }
        b += 1;
    }
    t
}

f32_row_kernels!("avx2,fma,popcnt,bmi2", |acc| hsum(_mm256_add_ps(acc[0], acc[1])));

#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// `acc[a][i % 2] += w · x[a][col..col+8]` for every activation row.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fma_rows<const NR: usize>(acc: &mut Acc<NR>, i: usize, w: __m256, xp: &[*const f32; NR], col: usize) {
    for a in 0..NR {
        acc[a][i & 1] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xp[a].add(col)), acc[a][i & 1]);
    }
}

/// Dequantizes 8 codes (as f32) at column `col`; `keep` (all-ones lanes) zeroes pruned lanes for the
/// asymmetric form.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dequant<const MODE: u8>(q: __m256, keep: __m256, s: &RowScales, col: usize) -> __m256 {
    match MODE {
        ROW => q,
        GRP => _mm256_mul_ps(q, _mm256_set1_ps(scale(s, col >> s.shift))),
        _ => {
            let g = col >> s.shift;
            _mm256_and_ps(keep, _mm256_fmadd_ps(q, _mm256_set1_ps(scale(s, g)), _mm256_set1_ps(min(s, g))))
        }
    }
}

/// The low 8 signed bytes of `v` as 8 f32.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn i8x8_to_f32(v: __m128i) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v))
}

/// A dense int4 chunk (32 bytes, byte j = column j | column j + 32 << 4) -> codes of columns 0-31 and
/// 32-63, each 0..=15.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn dense_nibbles(p: *const u8) -> [__m256i; 2] {
    let v = _mm256_loadu_si256(p as *const __m256i);
    let low = _mm256_set1_epi8(0x0F);
    [_mm256_and_si256(v, low), _mm256_and_si256(_mm256_srli_epi16::<4>(v), low)]
}

/// 16 bytes of packed nibbles -> 32 bytes in order, each 0..=15 (the sparse int4 layout; see the AVX-512
/// twin for the diagram).
#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn nibbles_to_bytes(p: *const u8) -> __m256i {
    let w = _mm256_cvtepu8_epi16(_mm_loadu_si128(p as *const __m128i));
    let lo = _mm256_and_si256(w, _mm256_set1_epi16(0x000F));
    let hi = _mm256_slli_epi16::<4>(_mm256_and_si256(w, _mm256_set1_epi16(0x00F0)));
    _mm256_or_si256(lo, hi)
}

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn center_int4<const MODE: u8>(v: __m256i) -> __m256i {
    if MODE == ASYM {
        v
    } else {
        _mm256_sub_epi8(v, _mm256_set1_epi8(8))
    }
}

fn zero_acc<const NR: usize>() -> Acc<NR> {
    // SAFETY: an all-zero bit pattern is a valid __m256 (+0.0 in every lane).
    unsafe { core::mem::zeroed() }
}

const ALL_LANES: __m256 = unsafe { core::mem::transmute::<[u32; 8], __m256>([u32::MAX; 8]) };

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dense_f32_f32<const NR: usize>(m: &PackedMatrix, r: usize, xp: &[*const f32; NR]) -> Acc<NR> {
    let w = m.data.as_ptr().add(m.row_start(r)) as *const f32;
    let mut acc = zero_acc::<NR>();
    for col in (0..m.cols_pad).step_by(8) {
        fma_rows(&mut acc, col / 8, _mm256_loadu_ps(w.add(col)), xp, col);
    }
    acc
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dense_bf16_f32<const NR: usize>(m: &PackedMatrix, r: usize, xp: &[*const f32; NR]) -> Acc<NR> {
    let w = m.data.as_ptr().add(m.row_start(r)) as *const u16;
    let mut acc = zero_acc::<NR>();
    for col in (0..m.cols_pad).step_by(8) {
        let h = _mm_loadu_si128(w.add(col) as *const __m128i);
        let f = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)));
        fma_rows(&mut acc, col / 8, f, xp, col);
    }
    acc
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dense_int8_f32<const NR: usize, const MODE: u8>(
    m: &PackedMatrix,
    r: usize,
    xp: &[*const f32; NR],
) -> Acc<NR> {
    let w = m.data.as_ptr().add(m.row_start(r));
    let s = RowScales::of(m, r);
    let mut acc = zero_acc::<NR>();
    for col in (0..m.cols_pad).step_by(8) {
        let q = i8x8_to_f32(_mm_loadl_epi64(w.add(col) as *const __m128i));
        fma_rows(&mut acc, col / 8, dequant::<MODE>(q, ALL_LANES, &s, col), xp, col);
    }
    acc
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dense_int4_f32<const NR: usize, const MODE: u8>(
    m: &PackedMatrix,
    r: usize,
    xp: &[*const f32; NR],
) -> Acc<NR> {
    let w = m.data.as_ptr().add(m.row_start(r));
    let s = RowScales::of(m, r);
    let mut acc = zero_acc::<NR>();
    for ch in 0..m.chunks() {
        for (part, bytes) in dense_nibbles(w.add(ch * CHUNK / 2)).into_iter().enumerate() {
            let (col32, bytes) = (ch * CHUNK + 32 * part, center_int4::<MODE>(bytes));
            let halves = [_mm256_castsi256_si128(bytes), _mm256_extracti128_si256::<1>(bytes)];
            for (h, half) in halves.into_iter().enumerate() {
                for (j, q) in [half, _mm_srli_si128::<8>(half)].into_iter().enumerate() {
                    let col = col32 + 16 * h + 8 * j;
                    fma_rows(&mut acc, j, dequant::<MODE>(i8x8_to_f32(q), ALL_LANES, &s, col), xp, col);
                }
            }
        }
    }
    acc
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
unsafe fn sparse_f32_f32<const NR: usize>(m: &PackedMatrix, r: usize, xp: &[*const f32; NR]) -> Acc<NR> {
    let mut p = m.data.as_ptr().add(m.row_start(r)) as *const f32;
    let masks = m.masks.as_ptr().add(r * m.chunks());
    let mut acc = zero_acc::<NR>();
    for ch in 0..m.chunks() {
        let mask = *masks.add(ch);
        for i in 0..8 {
            let b = (mask >> (8 * i)) as u8 as usize;
            let idx = _mm256_load_si256(EXPAND_IDX.0[b].as_ptr() as *const __m256i);
            let keep = _mm256_load_ps(LANE_MASK.0[b].as_ptr() as *const f32);
            let w = _mm256_and_ps(keep, _mm256_permutevar8x32_ps(_mm256_loadu_ps(p), idx));
            p = p.add(b.count_ones() as usize);
            fma_rows(&mut acc, i, w, xp, ch * CHUNK + 8 * i);
        }
    }
    acc
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
unsafe fn sparse_bf16_f32<const NR: usize>(m: &PackedMatrix, r: usize, xp: &[*const f32; NR]) -> Acc<NR> {
    let mut p = m.data.as_ptr().add(m.row_start(r)) as *const u16;
    let masks = m.masks.as_ptr().add(r * m.chunks());
    let mut acc = zero_acc::<NR>();
    for ch in 0..m.chunks() {
        let mask = *masks.add(ch);
        for i in 0..8 {
            let b = (mask >> (8 * i)) as u8 as usize;
            let ctl = _mm_load_si128(SHUF_I16.0[b].as_ptr() as *const __m128i);
            let h = _mm_shuffle_epi8(_mm_loadu_si128(p as *const __m128i), ctl);
            p = p.add(b.count_ones() as usize);
            let f = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)));
            fma_rows(&mut acc, i, f, xp, ch * CHUNK + 8 * i);
        }
    }
    acc
}

/// Expands and accumulates the 64 columns of one chunk from signed byte codes at `p` (int8 codes, or int4
/// codes already unpacked to bytes). Returns the number of codes consumed.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
unsafe fn chunk_codes<const NR: usize, const MODE: u8>(
    acc: &mut Acc<NR>,
    mut p: *const u8,
    mask: u64,
    s: &RowScales,
    xp: &[*const f32; NR],
    ch: usize,
) {
    for i in 0..8 {
        let b = (mask >> (8 * i)) as u8 as usize;
        let ctl = _mm_loadl_epi64(SHUF_I8.0[b].as_ptr() as *const __m128i);
        let codes = _mm_shuffle_epi8(_mm_loadl_epi64(p as *const __m128i), ctl);
        p = p.add(b.count_ones() as usize);
        let keep = if MODE == ASYM { _mm256_load_ps(LANE_MASK.0[b].as_ptr() as *const f32) } else { ALL_LANES };
        let col = ch * CHUNK + 8 * i;
        fma_rows(acc, i, dequant::<MODE>(i8x8_to_f32(codes), keep, s, col), xp, col);
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
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
#[target_feature(enable = "avx2,fma,f16c,popcnt")]
unsafe fn sparse_int4_f32<const NR: usize, const MODE: u8>(
    m: &PackedMatrix,
    r: usize,
    xp: &[*const f32; NR],
) -> Acc<NR> {
    let mut p = m.data.as_ptr().add(m.row_start(r));
    let masks = m.masks.as_ptr().add(r * m.chunks());
    let s = RowScales::of(m, r);
    let mut acc = zero_acc::<NR>();
    // The chunk's codes unpacked to bytes, plus 8 bytes of slack for the last 8-byte load.
    let mut buf = [0u8; CHUNK + 8];
    for ch in 0..m.chunks() {
        let mask = *masks.add(ch);
        let n = mask.count_ones() as usize;
        // Unpack only the bytes this chunk uses (one 16-byte load covers 32 codes).
        for h in 0..n.div_ceil(32) {
            let bytes = center_int4::<MODE>(nibbles_to_bytes(p.add(16 * h)));
            _mm256_storeu_si256(buf.as_mut_ptr().add(32 * h) as *mut __m256i, bytes);
        }
        chunk_codes::<NR, MODE>(&mut acc, buf.as_ptr(), mask, &s, xp, ch);
        p = p.add(n.div_ceil(2));
    }
    acc
}

/// [`crate::kernels::quantize_blocks`] compiled for this ISA (LLVM vectorizes it; the codes are identical).
///
/// # Safety
/// The CPU must support the enabled features.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn quantize_blocks(xs: &[f32], q: crate::kernels::QuantRows) {
    crate::kernels::quantize_blocks(xs, q)
}
