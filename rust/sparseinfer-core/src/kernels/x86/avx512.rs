//! AVX-512 kernels (F/BW/DQ/VL + VBMI2). Kernel names: `<weight format>_f32` (f32 activations).
//!
//! Every kernel walks a row in 64-column chunks, the width of one mask word. Per chunk it produces four
//! 16-lane f32 weight vectors and multiply-adds each against the matching slice of up to `NR` activation
//! rows, keeping four independent accumulators per activation row so FMA latency never limits a row.
//!
//! Sparse decode is one instruction per chunk: VBMI2's `vpexpandb`/`vpexpandw` (and AVX-512F's
//! `vexpandps`) scatter the packed nonzeros into the lanes whose mask bit is set and zero the rest.

use super::vnni::PREFETCH;
use super::{min, scale};
use crate::formats::{Format, PackedMatrix, CHUNK};
use crate::kernels::simd::{f32_row_kernels, scale_mode, RowScales, ASYM, GRP, ROW};
use core::arch::x86_64::*;

type Acc<const NR: usize> = [[__m512; 4]; NR];

f32_row_kernels!("avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi2,gfni,popcnt,bmi2,fma", |acc| hsum(acc));

/// One row's dot product from its four accumulators (every path reduces in this order).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn hsum(acc: &[__m512; 4]) -> f32 {
    _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])))
}

/// Weight rows a float-format matvec computes per pass over the activations ([`rows_shared_x`]).
const RB: usize = 4;

/// [`rows`], except that a single activation row (`k == 1`, decode) of a float format ([`shares_x`]) computes
/// [`RB`] weight rows per pass: each activation vector is loaded once for all of them.
///
/// One row at a time, a 5632-column f32 activation row (22 KB) did not stay in the 32 KB L1 next to the
/// streaming weights, and every row read it again from L2. Four rows read four weight streams side by side,
/// which the hardware prefetcher follows badly, so each stream prefetches (into L2) the bytes it will read
/// one row group later: the same offset, [`RB`] rows on. Each row's sums are formed in the same order as by
/// `row`, so the results are bit-identical to [`rows`].
///
/// # Safety
/// As for [`rows`].
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi2,popcnt,fma")]
pub(crate) unsafe fn rows_shared_x(m: &PackedMatrix, r0: usize, r1: usize, xs: &[f32], k: usize, y: *mut f32) {
    if k != 1 || !shares_x(m) {
        return rows(m, r0, r1, xs, k, y);
    }
    let kern: unsafe fn(&PackedMatrix, usize, *const f32) -> [[__m512; 4]; RB] = match m.format {
        Format::DenseF32 => dense_f32_rb,
        Format::DenseBf16 => dense_bf16_rb,
        Format::SparseF32 => sparse_f32_rb,
        Format::SparseBf16 => sparse_bf16_rb,
        f => unreachable!("shares_x took {}", f.name()),
    };
    let mut r = r0;
    while r + RB <= r1 {
        for (i, acc) in kern(m, r, xs.as_ptr()).iter().enumerate() {
            *y.add(r + i) = hsum(acc);
        }
        r += RB;
    }
    rows(m, r, r1, xs, 1, y)
}

/// Whether a matvec of `m` takes [`rows_shared_x`]'s row groups: dense f32 and bf16 always; sparse f32 and
/// bf16 while there are enough values per row for the activation reloads to matter. Paired runs from DRAM on
/// AMD Zen 4 (time of four rows per pass / one), 1B Llama shapes:
///
/// | format | 5632x2048, 0 / 50 / 70 % | 2048x5632, 0 / 50 / 70 / 80 % |
/// |---|---|---|
/// | dense f32, bf16 | 0.92, 0.94 | 0.89, 0.77 |
/// | sparse f32 | 0.75 / 0.98 / 1.13 | 0.80 / 0.67 / 0.86 / 1.10 |
/// | sparse bf16 | 0.71 / 0.89 / 1.07 | 0.73 / 0.79 / 0.92 / 0.95 |
///
/// At high sparsity these kernels are bound by `vexpandps`/`vpexpandw` and the FMAs (which share ports on
/// Zen 4), not by the activations, and four pointer chains cost more than the reloads they save.
pub(crate) fn shares_x(m: &PackedMatrix) -> bool {
    match m.format {
        Format::DenseF32 | Format::DenseBf16 => true,
        Format::SparseF32 | Format::SparseBf16 => {
            let d = m.density();
            d >= 0.45 || (m.cols_pad >= 4096 && d >= 0.25)
        }
        _ => false,
    }
}

/// The value streams of sparse rows `r..r + RB`: where each starts, and how far ahead it prefetches (to the
/// same offset one row group on: the bytes from its row to the row `RB` later, or to the end of the last row).
///
/// # Safety
/// Rows `r..r + RB` exist.
unsafe fn sparse_streams<T>(m: &PackedMatrix, r: usize) -> ([*const T; RB], [usize; RB]) {
    let start = core::array::from_fn(|i| m.data.as_ptr().add(m.row_start(r + i)) as *const T);
    let ahead = core::array::from_fn(|i| m.row_offsets[(r + i + RB).min(m.rows)] - m.row_offsets[r + i]);
    (start, ahead)
}

/// Chunk `ch`'s mask word of each of the sparse rows `r..r + RB`.
///
/// # Safety
/// Rows `r..r + RB` exist and `ch < m.chunks()`.
#[inline]
unsafe fn group_masks(m: &PackedMatrix, r: usize, ch: usize) -> [u64; RB] {
    core::array::from_fn(|i| *m.masks.as_ptr().add((r + i) * m.chunks() + ch))
}

#[inline]
#[target_feature(enable = "avx512f,fma")]
unsafe fn dense_f32_rb(m: &PackedMatrix, r: usize, x: *const f32) -> [[__m512; 4]; RB] {
    let w: [*const f32; RB] = core::array::from_fn(|i| m.data.as_ptr().add(m.row_start(r + i)) as *const f32);
    let ahead = RB * m.cols_pad;
    let mut acc = [[_mm512_setzero_ps(); 4]; RB];
    for ch in 0..m.chunks() {
        for i in 0..4 {
            let col = ch * CHUNK + 16 * i;
            let xv = _mm512_loadu_ps(x.add(col));
            for (a, w) in acc.iter_mut().zip(w) {
                _mm_prefetch::<_MM_HINT_T1>(w.wrapping_add(col + ahead) as *const i8);
                a[i] = _mm512_fmadd_ps(_mm512_loadu_ps(w.add(col)), xv, a[i]);
            }
        }
    }
    acc
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,fma")]
unsafe fn dense_bf16_rb(m: &PackedMatrix, r: usize, x: *const f32) -> [[__m512; 4]; RB] {
    let w: [*const u16; RB] = core::array::from_fn(|i| m.data.as_ptr().add(m.row_start(r + i)) as *const u16);
    let ahead = RB * m.cols_pad;
    let mut acc = [[_mm512_setzero_ps(); 4]; RB];
    for ch in 0..m.chunks() {
        for i in 0..4 {
            let col = ch * CHUNK + 16 * i;
            let xv = _mm512_loadu_ps(x.add(col));
            for (a, w) in acc.iter_mut().zip(w) {
                if i % 2 == 0 {
                    _mm_prefetch::<_MM_HINT_T1>(w.wrapping_add(col + ahead) as *const i8);
                }
                let h = _mm256_loadu_si256(w.add(col) as *const __m256i);
                let f = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)));
                a[i] = _mm512_fmadd_ps(f, xv, a[i]);
            }
        }
    }
    acc
}

#[inline]
#[target_feature(enable = "avx512f,popcnt,fma")]
unsafe fn sparse_f32_rb(m: &PackedMatrix, r: usize, x: *const f32) -> [[__m512; 4]; RB] {
    let (mut p, ahead) = sparse_streams::<f32>(m, r);
    let mut acc = [[_mm512_setzero_ps(); 4]; RB];
    for ch in 0..m.chunks() {
        let mask = group_masks(m, r, ch);
        for i in 0..4 {
            let xv = _mm512_loadu_ps(x.add(ch * CHUNK + 16 * i));
            for (((a, p), mask), ahead) in acc.iter_mut().zip(p.iter_mut()).zip(mask).zip(ahead) {
                _mm_prefetch::<_MM_HINT_T1>((*p as *const i8).wrapping_add(ahead));
                let k = (mask >> (16 * i)) as u16;
                let w = _mm512_maskz_expand_ps(k, _mm512_castsi512_ps(load512_nofold!(*p)));
                *p = p.add(k.count_ones() as usize);
                a[i] = _mm512_fmadd_ps(w, xv, a[i]);
            }
        }
    }
    acc
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi2,popcnt,fma")]
unsafe fn sparse_bf16_rb(m: &PackedMatrix, r: usize, x: *const f32) -> [[__m512; 4]; RB] {
    let (mut p, ahead) = sparse_streams::<u16>(m, r);
    let mut acc = [[_mm512_setzero_ps(); 4]; RB];
    let high = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
    for ch in 0..m.chunks() {
        let mask = group_masks(m, r, ch);
        for half in 0..2 {
            let col = ch * CHUNK + 32 * half;
            let (xe, xo) = (_mm512_loadu_ps(x.add(col)), _mm512_loadu_ps(x.add(col + 16)));
            for (((a, p), mask), ahead) in acc.iter_mut().zip(p.iter_mut()).zip(mask).zip(ahead) {
                _mm_prefetch::<_MM_HINT_T1>((*p as *const i8).wrapping_add(ahead));
                let k = (mask >> (32 * half)) as u32;
                let e = _mm512_maskz_expand_epi16(k, load512_nofold!(*p));
                *p = p.add(k.count_ones() as usize);
                a[2 * half] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32::<16>(e)), xe, a[2 * half]);
                a[2 * half + 1] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(e, high)), xo, a[2 * half + 1]);
            }
        }
    }
    acc
}

/// `acc[a][i] += w · x[a][col..col+16]` for every activation row.
#[inline]
#[target_feature(enable = "avx512f,fma")]
unsafe fn fma_rows<const NR: usize>(acc: &mut Acc<NR>, i: usize, w: __m512, xp: &[*const f32; NR], col: usize) {
    for a in 0..NR {
        acc[a][i] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xp[a].add(col)), acc[a][i]);
    }
}

/// Dequantizes 16 integer codes (as f32) at column `col`. `keep` zeroes pruned lanes for the asymmetric
/// form, whose `m` would otherwise make them nonzero.
#[inline]
#[target_feature(enable = "avx512f,fma")]
unsafe fn dequant<const MODE: u8>(q: __m512, keep: __mmask16, s: &RowScales, col: usize) -> __m512 {
    match MODE {
        ROW => q,
        GRP => _mm512_mul_ps(q, _mm512_set1_ps(scale(s, col >> s.shift))),
        _ => {
            let g = col >> s.shift;
            _mm512_maskz_fmadd_ps(keep, q, _mm512_set1_ps(scale(s, g)), _mm512_set1_ps(min(s, g)))
        }
    }
}

/// 64 signed bytes -> four vectors of 16 f32 (sign-extend each 16-byte lane, convert).
#[inline]
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn i8x64_to_f32(v: __m512i) -> [__m512; 4] {
    let lane = |x: __m128i| _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(x));
    [
        lane(_mm512_castsi512_si128(v)),
        lane(_mm512_extracti32x4_epi32::<1>(v)),
        lane(_mm512_extracti32x4_epi32::<2>(v)),
        lane(_mm512_extracti32x4_epi32::<3>(v)),
    ]
}

/// 32 bytes of packed nibbles -> 64 bytes in order, each 0..=15 (the sparse int4 layout, where a chunk's
/// stored values pair up as neighbours).
///
/// ```text
/// memory byte j:        [ hi_j | lo_j ]              (lo_j is value 2j, hi_j value 2j+1)
/// zero-extend to u16:   0000 0000 hi_j lo_j
/// (u16 | u16 << 4) & 0x0F0F            ->  0000 hi_j 0000 lo_j  = bytes [lo_j, hi_j] in little-endian order
/// ```
/// One shuffle, one shift and one `vpternlogd`. The VNNI int4 kernels use it too: on AMD Zen 4 it was 7-15 %
/// faster there than `vpermq` + `vpmultishiftqb` + AND, whose two shuffles compete with `vpexpandb`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn nibbles_to_bytes(p: *const u8) -> __m512i {
    let w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(p as *const __m256i));
    // 0xA8: (A | B) & C.
    _mm512_ternarylogic_epi32::<0xA8>(w, _mm512_slli_epi16::<4>(w), _mm512_set1_epi16(0x0F0F))
}

/// A dense int4 chunk (32 bytes, byte j = column j | column j + 32 << 4, see `formats`) -> its 64 codes in
/// column order, each 0..=15: the 32 bytes broadcast to both halves of the register, then one
/// `vgf2p8affineqb` whose bit matrix (one per 64-bit lane) keeps the low nibble in the lower half and moves
/// the high nibble down in the upper half. On AMD Zen 4 the VNNI dense int4 kernel took 10-15 % fewer cycles
/// per chunk from L2 than with the interleaved layout and [`nibbles_to_bytes`].
///
/// A matrix row for output bit i is byte 7 - i of the lane's u64; output bits 4-7 have empty rows (zero).
#[inline]
#[target_feature(enable = "avx512f,gfni")]
pub(super) unsafe fn dense_nibbles(p: *const u8) -> __m512i {
    const LOW: i64 = 0x0102_0408_0000_0000; // bit i <- bit i, i < 4
    const HIGH: i64 = 0x1020_4080_0000_0000; // bit i <- bit i + 4, i < 4
    let m = _mm512_set_epi64(HIGH, HIGH, HIGH, HIGH, LOW, LOW, LOW, LOW);
    _mm512_gf2p8affine_epi64_epi8::<0>(_mm512_broadcast_i64x4(_mm256_loadu_si256(p as *const __m256i)), m)
}

/// Symmetric int4 nibbles hold `q + 8`; the asymmetric ones hold `q`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn center_int4<const MODE: u8>(v: __m512i) -> __m512i {
    if MODE == ASYM {
        v
    } else {
        _mm512_sub_epi8(v, _mm512_set1_epi8(8))
    }
}

fn zero_acc<const NR: usize>() -> Acc<NR> {
    // SAFETY: an all-zero bit pattern is a valid __m512 (+0.0 in every lane).
    unsafe { core::mem::zeroed() }
}

#[inline]
#[target_feature(enable = "avx512f,fma")]
unsafe fn dense_f32_f32<const NR: usize>(m: &PackedMatrix, r: usize, xp: &[*const f32; NR]) -> Acc<NR> {
    let w = m.data.as_ptr().add(m.row_start(r)) as *const f32;
    let mut acc = zero_acc::<NR>();
    for ch in 0..m.chunks() {
        for i in 0..4 {
            let col = ch * CHUNK + 16 * i;
            fma_rows(&mut acc, i, _mm512_loadu_ps(w.add(col)), xp, col);
        }
    }
    acc
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,fma")]
unsafe fn dense_bf16_f32<const NR: usize>(m: &PackedMatrix, r: usize, xp: &[*const f32; NR]) -> Acc<NR> {
    let w = m.data.as_ptr().add(m.row_start(r)) as *const u16;
    let mut acc = zero_acc::<NR>();
    for ch in 0..m.chunks() {
        for i in 0..4 {
            let col = ch * CHUNK + 16 * i;
            // bf16 is the upper half of an f32: widen to 32 bits and shift into place.
            let h = _mm256_loadu_si256(w.add(col) as *const __m256i);
            let f = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)));
            fma_rows(&mut acc, i, f, xp, col);
        }
    }
    acc
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,fma")]
unsafe fn dense_int8_f32<const NR: usize, const MODE: u8>(
    m: &PackedMatrix,
    r: usize,
    xp: &[*const f32; NR],
) -> Acc<NR> {
    let w = m.data.as_ptr().add(m.row_start(r)) as *const i8;
    let s = RowScales::of(m, r);
    let mut acc = zero_acc::<NR>();
    for ch in 0..m.chunks() {
        for i in 0..4 {
            let col = ch * CHUNK + 16 * i;
            let q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(w.add(col) as *const __m128i)));
            fma_rows(&mut acc, i, dequant::<MODE>(q, 0xFFFF, &s, col), xp, col);
        }
    }
    acc
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,gfni,fma")]
unsafe fn dense_int4_f32<const NR: usize, const MODE: u8>(
    m: &PackedMatrix,
    r: usize,
    xp: &[*const f32; NR],
) -> Acc<NR> {
    let w = m.data.as_ptr().add(m.row_start(r));
    let s = RowScales::of(m, r);
    let mut acc = zero_acc::<NR>();
    for ch in 0..m.chunks() {
        let q = i8x64_to_f32(center_int4::<MODE>(dense_nibbles(w.add(ch * CHUNK / 2))));
        for (i, q) in q.into_iter().enumerate() {
            let col = ch * CHUNK + 16 * i;
            fma_rows(&mut acc, i, dequant::<MODE>(q, 0xFFFF, &s, col), xp, col);
        }
    }
    acc
}

#[inline]
#[target_feature(enable = "avx512f,popcnt,fma")]
unsafe fn sparse_f32_f32<const NR: usize>(m: &PackedMatrix, r: usize, xp: &[*const f32; NR]) -> Acc<NR> {
    let mut p = m.data.as_ptr().add(m.row_start(r)) as *const f32;
    let masks = m.masks.as_ptr().add(r * m.chunks());
    let mut acc = zero_acc::<NR>();
    for ch in 0..m.chunks() {
        let mask = *masks.add(ch);
        _mm_prefetch::<_MM_HINT_T0>((p as *const i8).wrapping_add(PREFETCH));
        for i in 0..4 {
            let k = (mask >> (16 * i)) as u16;
            // vexpandps: the next popcount(k) packed values go to the set lanes, zeros elsewhere.
            let w = _mm512_maskz_expand_ps(k, _mm512_castsi512_ps(load512_nofold!(p)));
            p = p.add(k.count_ones() as usize);
            fma_rows(&mut acc, i, w, xp, ch * CHUNK + 16 * i);
        }
    }
    acc
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi2,popcnt,fma")]
unsafe fn sparse_bf16_f32<const NR: usize>(m: &PackedMatrix, r: usize, xp: &[*const f32; NR]) -> Acc<NR> {
    let mut p = m.data.as_ptr().add(m.row_start(r)) as *const u16;
    let masks = m.masks.as_ptr().add(r * m.chunks());
    let mut acc = zero_acc::<NR>();
    let high = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
    for ch in 0..m.chunks() {
        let mask = *masks.add(ch);
        for half in 0..2 {
            // One prefetch per 32 columns: they hold up to 64 bytes, a cache line.
            _mm_prefetch::<_MM_HINT_T0>((p as *const i8).wrapping_add(PREFETCH));
            let k = (mask >> (32 * half)) as u32;
            // vpexpandw: 32 bf16 lanes from the next popcount(k) packed values. Each 32-bit lane then holds an
            // even column in its low half and the next odd column in its high half: a shift makes the even
            // ones f32, an AND the odd ones, in place (no widening shuffles). The activations come permuted to
            // match ([`bf16_pair_order`]): 16 even columns, then 16 odd ones.
            let e = _mm512_maskz_expand_epi16(k, load512_nofold!(p));
            p = p.add(k.count_ones() as usize);
            let col = ch * CHUNK + 32 * half;
            fma_rows(&mut acc, 2 * half, _mm512_castsi512_ps(_mm512_slli_epi32::<16>(e)), xp, col);
            fma_rows(&mut acc, 2 * half + 1, _mm512_castsi512_ps(_mm512_and_si512(e, high)), xp, col + 16);
        }
    }
    acc
}

/// Shared tail of the sparse integer kernels: 64 expanded codes of one chunk -> dequantize -> FMA.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,fma")]
unsafe fn fma_codes<const NR: usize, const MODE: u8>(
    acc: &mut Acc<NR>,
    codes: __m512i,
    mask: u64,
    s: &RowScales,
    xp: &[*const f32; NR],
    ch: usize,
) {
    for (i, q) in i8x64_to_f32(codes).into_iter().enumerate() {
        let col = ch * CHUNK + 16 * i;
        fma_rows(acc, i, dequant::<MODE>(q, (mask >> (16 * i)) as u16, s, col), xp, col);
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vbmi2,popcnt,fma")]
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
        _mm_prefetch::<_MM_HINT_T0>((p as *const i8).wrapping_add(PREFETCH));
        // vpexpandb: 64 byte lanes from the next popcount(mask) packed codes.
        let codes = _mm512_maskz_expand_epi8(mask, load512_nofold!(p));
        p = p.add(mask.count_ones() as usize);
        fma_codes::<NR, MODE>(&mut acc, codes, mask, &s, xp, ch);
    }
    acc
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vbmi2,popcnt,fma")]
unsafe fn sparse_int4_f32<const NR: usize, const MODE: u8>(
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
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH) as *const i8);
        // Unpack this chunk's nibbles to bytes in order, center them, then expand like int8.
        let bytes = center_int4::<MODE>(nibbles_to_bytes(p));
        let codes = _mm512_maskz_expand_epi8(mask, bytes);
        p = p.add((mask.count_ones() as usize).div_ceil(2));
        fma_codes::<NR, MODE>(&mut acc, codes, mask, &s, xp, ch);
    }
    acc
}

/// [`crate::kernels::quantize_blocks`] written out for AVX-512, with the same f32 operations in the same
/// order, so the codes, scales and `x̂` are bit-identical (a unit test checks it). LLVM's
/// vectorization of the portable loop reduced each block's maximum through scalar shuffles and a mask-register
/// dance: ~1.4 µs per 2048 columns, more than the matvec of a 256-row sparse matrix.
///
/// # Safety
/// The CPU must support the enabled features.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
pub(crate) unsafe fn quantize_blocks(xs: &[f32], mut q: crate::kernels::QuantRows) {
    let with_xhat = !q.xhat.is_empty();
    // The stores below go through raw pointers: every buffer must hold what `xs` quantizes to.
    assert!(xs.len().is_multiple_of(CHUNK) && q.xq.len() == xs.len() && q.sx.len() == xs.len() / CHUNK);
    assert!(!with_xhat || q.xhat.len() == xs.len());
    let abs = _mm512_set1_epi32(0x7FFF_FFFF);
    let (lo, hi, half) = (_mm512_set1_ps(-127.0), _mm512_set1_ps(127.0), _mm512_set1_ps(0.5));
    let one = _mm512_set1_epi32(1);
    for (b, block) in xs.chunks_exact(CHUNK).enumerate() {
        let a: [__m512; 4] = core::array::from_fn(|i| {
            _mm512_castsi512_ps(_mm512_and_si512(_mm512_loadu_si512(block.as_ptr().add(16 * i) as *const _), abs))
        });
        // Lane maxima as the portable loop forms them (a > l ? a : l over the four 16-value parts), then
        // their maximum: max is exact, so the order of the reduction does not matter.
        let mut l = _mm512_setzero_ps();
        for v in a {
            l = _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, l), l, v);
        }
        q.sx[b] = _mm512_reduce_max_ps(l);
    }
    if q.token {
        crate::kernels::spread_row_maxima(&mut q);
    }
    for (b, block) in xs.chunks_exact(CHUNK).enumerate() {
        let x: [__m512; 4] = core::array::from_fn(|i| _mm512_loadu_ps(block.as_ptr().add(16 * i)));
        let (s, inv) = crate::kernels::block_scale(q.sx[b]);
        let inv = _mm512_set1_ps(inv);
        q.sx[b] = s;
        let codes: [__m512i; 4] = core::array::from_fn(|i| {
            let r = _mm512_max_ps(_mm512_min_ps(_mm512_mul_ps(x[i], inv), hi), lo);
            let t = _mm512_cvttps_epi32(r);
            let frac = _mm512_sub_ps(r, _mm512_cvtepi32_ps(t));
            let away = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(
                _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(frac), abs)),
                half,
            );
            // ±1 by the sign of r (-0.0 never steps: its remainder is 0).
            let step = _mm512_mask_blend_epi32(
                _mm512_cmp_ps_mask::<_CMP_LT_OQ>(r, _mm512_setzero_ps()),
                one,
                _mm512_set1_epi32(-1),
            );
            _mm512_mask_add_epi32(t, away, t, step)
        });
        let packed = _mm512_inserti64x4::<1>(
            _mm512_castsi256_si512(_mm256_inserti128_si256::<1>(
                _mm256_castsi128_si256(_mm512_cvtepi32_epi8(codes[0])),
                _mm512_cvtepi32_epi8(codes[1]),
            )),
            _mm256_inserti128_si256::<1>(
                _mm256_castsi128_si256(_mm512_cvtepi32_epi8(codes[2])),
                _mm512_cvtepi32_epi8(codes[3]),
            ),
        );
        _mm512_storeu_si512(q.xq.as_mut_ptr().add(b * CHUNK) as *mut _, packed);
        if with_xhat {
            let sv = _mm512_set1_ps(s);
            for (i, c) in codes.iter().enumerate() {
                _mm512_storeu_ps(
                    q.xhat.as_mut_ptr().add(b * CHUNK + 16 * i),
                    _mm512_mul_ps(sv, _mm512_cvtepi32_ps(*c)),
                );
            }
        }
    }
}

/// Whether these f32 kernels read `m`'s activations in [`bf16_pair_order`] (sparse bf16).
pub(crate) fn wants_bf16_pair_order(m: &PackedMatrix) -> bool {
    m.format == crate::Format::SparseBf16
}

/// Activation rows (`cols_pad` each, a multiple of 32) in the order the sparse bf16 kernel multiplies them:
/// each 32-column block as its 16 even columns, then its 16 odd ones.
pub(crate) fn bf16_pair_order(xs: &[f32]) -> Vec<f32> {
    let mut out = vec![0.0f32; xs.len()];
    for (src, dst) in xs.chunks_exact(32).zip(out.chunks_exact_mut(32)) {
        for j in 0..16 {
            dst[j] = src[2 * j];
            dst[16 + j] = src[2 * j + 1];
        }
    }
    out
}
