//! AVX-512 VNNI kernels for integer weights with int8 activations (`Activations::Int8`).
//! Kernel names: `<weight format>_i8`.
//!
//! Per 64-column chunk, `vpdpbusd` multiplies 64 unsigned bytes by 64 signed bytes and adds each group of
//! four products into one of 16 i32 lanes: exact integer arithmetic. The chunk's i32 lanes are then
//! converted to f32 and multiply-added with the chunk scale `s_x · d` into an f32 accumulator.
//!
//! `vpdpbusd` needs one unsigned operand:
//! - int8 weights (signed): multiply `|w|` by `x` with `w`'s sign moved onto it (`vpabsb`, `vpmovb2m`, masked
//!   `vpsubb`), the AVX-512 form of llama.cpp's `vpsignb` trick;
//! - int4 codes are already unsigned (`c = q + 8`): `Σ c·x` directly, then the zero point `Σ_g m_g·Σx̂_g`
//!   once per row from precomputed group sums. Sparse rows expand with 8 (a zero weight) in the pruned
//!   lanes, so the same correction holds.
//!
//! Sparse asymmetric int4 is not served here (`supports` is false); it runs the f32 kernels on `x̂`.

use super::avx512::{nibbles_to_bytes, RowScales, ASYM, GRP, ROW};
use crate::formats::{Elem, Format, PackedMatrix, CHUNK};
use crate::kernels::QuantActs;
use core::arch::x86_64::*;

/// Two f32 accumulators per activation row, alternating by chunk, so FMA latency does not bind.
type Acc<const NR: usize> = [[__m512; NR]; 2];

/// Runs `$body` for every chunk with `$acc` bound to `$a0` for even and `$a1` for odd chunks. Unrolled by
/// hand so the accumulator index is a constant: indexing `acc[ch & 1]` at run time spills the
/// accumulators to the stack and puts a store-forwarding round trip on every FMA.
macro_rules! for_chunks {
    ($chunks:expr, $a0:ident, $a1:ident, |$ch:ident, $acc:ident| $body:block) => {{
        let chunks = $chunks;
        let mut base = 0;
        while base + 2 <= chunks {
            {
                let ($ch, $acc) = (base, &mut $a0);
                $body
            }
            {
                let ($ch, $acc) = (base + 1, &mut $a1);
                $body
            }
            base += 2;
        }
        if base < chunks {
            let ($ch, $acc) = (base, &mut $a0);
            #[allow(unused_assignments)] // the last chunk's pointer advance
            $body
        }
    }};
}

/// Bytes ahead of the weight stream to prefetch: the cores stall on DRAM latency otherwise, because the
/// integer kernels do more work per byte than the hardware prefetcher keeps up with.
pub(super) const PREFETCH: usize = 1024;

/// Whether these kernels serve `m` (and the CPU has VNNI).
pub(crate) fn supports(m: &PackedMatrix) -> bool {
    matches!(m.format.elem(), Elem::I8 | Elem::I4) && !(m.format.is_sparse() && m.asym) && super::vnni_supported()
}

/// Computes rows `r0..r1` for the `k` quantized activation rows in `q`.
///
/// # Safety
/// The CPU must support the enabled features and [`supports`] must hold for `m`; `q` was built for `m`
/// with `k` rows; `y` is valid for writes at `a·rows + r` for every `a < k` and `r0 <= r < r1`.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi2,avx512vnni,popcnt,bmi2,fma")]
pub(crate) unsafe fn rows(m: &PackedMatrix, r0: usize, r1: usize, q: &QuantActs, k: usize, y: *mut f32) {
    debug_assert!(q.k == k && q.xq.len() == k * m.cols_pad);
    for r in r0..r1 {
        let mut a = 0;
        while a + 4 <= k {
            row::<4>(m, r, q, a, y);
            a += 4;
        }
        while a < k {
            row::<1>(m, r, q, a, y);
            a += 1;
        }
    }
}

/// Pointers to one activation row's codes and block scales.
struct ActRow {
    xq: *const i8,
    sx: *const f32,
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi2,avx512vnni,popcnt,bmi2,fma")]
unsafe fn row<const NR: usize>(m: &PackedMatrix, r: usize, q: &QuantActs, a0: usize, y: *mut f32) {
    let (cp, chunks, groups) = (m.cols_pad, m.chunks(), m.groups());
    let act: [ActRow; NR] = core::array::from_fn(|a| ActRow {
        xq: q.xq.as_ptr().add((a0 + a) * cp),
        sx: q.sx.as_ptr().add((a0 + a) * chunks),
    });
    let mode = if m.asym {
        ASYM
    } else if m.group != m.cols_pad {
        GRP
    } else {
        ROW
    };
    let acc: Acc<NR> = match (m.format, mode) {
        (Format::DenseInt8, ROW) => dense_int8_i8::<NR, ROW>(m, r, &act),
        (Format::DenseInt8, _) => dense_int8_i8::<NR, GRP>(m, r, &act),
        (Format::SparseInt8, ROW) => sparse_int8_i8::<NR, ROW>(m, r, &act),
        (Format::SparseInt8, _) => sparse_int8_i8::<NR, GRP>(m, r, &act),
        (Format::DenseInt4, ROW) => dense_int4_i8::<NR, ROW>(m, r, &act),
        (Format::DenseInt4, _) => dense_int4_i8::<NR, GRP>(m, r, &act),
        (Format::SparseInt4, ROW) => sparse_int4_i8::<NR, ROW>(m, r, &act),
        (Format::SparseInt4, _) => sparse_int4_i8::<NR, GRP>(m, r, &act),
        _ => unreachable!("vnni::supports admits integer formats only"),
    };
    let row_scale = if mode == ROW { m.scales[r] } else { 1.0 };
    for (a, (even, odd)) in acc[0].iter().zip(&acc[1]).enumerate() {
        let mut out = _mm512_reduce_add_ps(_mm512_add_ps(*even, *odd)) * row_scale;
        if m.format.elem() == Elem::I4 {
            // Zero point of every group: ŵ = d·c + m' with m' = m (asymmetric) or -8·d (symmetric).
            let gs = q.gsum.as_ptr().add((a0 + a) * groups);
            for g in 0..groups {
                let zp = if m.asym { m.mins[r * groups + g] } else { -8.0 * m.scales[r * groups + g] };
                out += zp * *gs.add(g);
            }
        }
        *y.add((a0 + a) * m.rows + r) = out;
    }
}

/// The f32 factor of chunk `ch`'s 16 i32 lanes: the activation block scale times the weight group scale
/// (lane `j` covers columns `4j..4j+4`, so a 32-column group splits the lanes 8/8).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn chunk_scale<const MODE: u8>(s: &RowScales, group: usize, sx: *const f32, ch: usize) -> __m512 {
    // Both factors are broadcast straight from memory (load ports) and multiplied on the FMA ports: a
    // broadcast from a register would add to port 5, which vpexpandb and the mask moves already saturate.
    let sx = _mm512_set1_ps(*sx.add(ch));
    if MODE == ROW {
        return sx;
    }
    let g = (ch * CHUNK) >> s.shift;
    if group >= CHUNK {
        _mm512_mul_ps(sx, _mm512_set1_ps(*s.d.add(g)))
    } else {
        let d = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(*s.d.add(g)), _mm512_set1_ps(*s.d.add(g + 1)));
        _mm512_mul_ps(sx, d)
    }
}

/// `acc[a] += cvt(Σ |w|·(±x)) · scale` for signed int8 weights `w` of chunk `ch`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma")]
unsafe fn signed_chunk<const NR: usize, const MODE: u8>(
    acc: &mut [__m512; NR],
    w: __m512i,
    act: &[ActRow; NR],
    s: &RowScales,
    group: usize,
    ch: usize,
) {
    let aw = _mm512_abs_epi8(w);
    let neg = _mm512_movepi8_mask(w);
    for (a, x) in act.iter().enumerate() {
        let xa = _mm512_loadu_si512(x.xq.add(ch * CHUNK) as *const _);
        // x where w >= 0, -x where w < 0 (0 - x under the sign mask).
        let sx = _mm512_mask_sub_epi8(xa, neg, _mm512_setzero_si512(), xa);
        let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), aw, sx);
        acc[a] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), chunk_scale::<MODE>(s, group, x.sx, ch), acc[a]);
    }
}

/// `acc[a] += cvt(Σ c·x) · scale` for unsigned int4 codes `c` of chunk `ch` (zero points are added per row).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma")]
unsafe fn unsigned_chunk<const NR: usize, const MODE: u8>(
    acc: &mut [__m512; NR],
    c: __m512i,
    act: &[ActRow; NR],
    s: &RowScales,
    group: usize,
    ch: usize,
) {
    for (a, x) in act.iter().enumerate() {
        let xa = _mm512_loadu_si512(x.xq.add(ch * CHUNK) as *const _);
        let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c, xa);
        acc[a] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), chunk_scale::<MODE>(s, group, x.sx, ch), acc[a]);
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma")]
unsafe fn dense_int8_i8<const NR: usize, const MODE: u8>(m: &PackedMatrix, r: usize, act: &[ActRow; NR]) -> Acc<NR> {
    let p = m.data.as_ptr().add(m.row_start(r));
    let s = RowScales::of(m, r);
    let (mut acc0, mut acc1) = ([_mm512_setzero_ps(); NR], [_mm512_setzero_ps(); NR]);
    for_chunks!(m.chunks(), acc0, acc1, |ch, acc| {
        _mm_prefetch::<_MM_HINT_T0>(p.add(ch * CHUNK + PREFETCH) as *const i8);
        let w = _mm512_loadu_si512(p.add(ch * CHUNK) as *const _);
        signed_chunk::<NR, MODE>(acc, w, act, &s, m.group, ch);
    });
    [acc0, acc1]
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi2,avx512vnni,popcnt,fma")]
unsafe fn sparse_int8_i8<const NR: usize, const MODE: u8>(m: &PackedMatrix, r: usize, act: &[ActRow; NR]) -> Acc<NR> {
    let mut p = m.data.as_ptr().add(m.row_start(r));
    let masks = m.masks.as_ptr().add(r * m.chunks());
    let s = RowScales::of(m, r);
    let (mut acc0, mut acc1) = ([_mm512_setzero_ps(); NR], [_mm512_setzero_ps(); NR]);
    for_chunks!(m.chunks(), acc0, acc1, |ch, acc| {
        let mask = *masks.add(ch);
        _mm_prefetch::<_MM_HINT_T0>(p.add(PREFETCH) as *const i8);
        let w = _mm512_maskz_expand_epi8(mask, load512_nofold!(p));
        p = p.add(mask.count_ones() as usize);
        signed_chunk::<NR, MODE>(acc, w, act, &s, m.group, ch);
    });
    [acc0, acc1]
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma")]
unsafe fn dense_int4_i8<const NR: usize, const MODE: u8>(m: &PackedMatrix, r: usize, act: &[ActRow; NR]) -> Acc<NR> {
    let p = m.data.as_ptr().add(m.row_start(r));
    let s = RowScales::of(m, r);
    let (mut acc0, mut acc1) = ([_mm512_setzero_ps(); NR], [_mm512_setzero_ps(); NR]);
    for_chunks!(m.chunks(), acc0, acc1, |ch, acc| {
        _mm_prefetch::<_MM_HINT_T0>(p.add(ch * CHUNK / 2 + PREFETCH) as *const i8);
        let c = nibbles_to_bytes(p.add(ch * CHUNK / 2)); // unsigned codes; zero points added per row
        unsigned_chunk::<NR, MODE>(acc, c, act, &s, m.group, ch);
    });
    [acc0, acc1]
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi2,avx512vnni,popcnt,fma")]
unsafe fn sparse_int4_i8<const NR: usize, const MODE: u8>(m: &PackedMatrix, r: usize, act: &[ActRow; NR]) -> Acc<NR> {
    let mut p = m.data.as_ptr().add(m.row_start(r));
    let masks = m.masks.as_ptr().add(r * m.chunks());
    let s = RowScales::of(m, r);
    let (mut acc0, mut acc1) = ([_mm512_setzero_ps(); NR], [_mm512_setzero_ps(); NR]);
    for_chunks!(m.chunks(), acc0, acc1, |ch, acc| {
        let mask = *masks.add(ch);
        _mm_prefetch::<_MM_HINT_T0>(p.add(PREFETCH) as *const i8);
        // Codes c = q + 8 in the stored lanes and 8 (a zero weight) in the pruned ones, so the row's zero
        // point term is the same precomputed Σ -8·d·x̂ as for dense int4.
        let c = _mm512_mask_expand_epi8(_mm512_set1_epi8(8), mask, nibbles_to_bytes(p));
        p = p.add((mask.count_ones() as usize).div_ceil(2));
        unsigned_chunk::<NR, MODE>(acc, c, act, &s, m.group, ch);
    });
    [acc0, acc1]
}
