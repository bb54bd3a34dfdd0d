//! NEON kernels for symmetric integer weights with int8 activations: per 64-column block
//! (`Activations::Int8`, kernel names `<weight format>_i8 (neon sdot)`) or per row (`Activations::Int8Token`,
//! `<weight format>_i8_token (...)`). The twin of `x86::avx2_int`, with the same walk and the same exact sum per
//! 64-column chunk (split over lanes differently, so results may differ in the last bits between ISAs, and
//! between CPUs with and without `sdot`).
//!
//! Per 64-column chunk the weight codes `q` (int8, or int4 nibbles minus 8) sit in four 16-byte vectors of
//! signed bytes. A sparse chunk expands 16 columns at a time: one `tbl` over the 16 bytes from the half's
//! first value, its control two rows of [`RANKS_AFTER`] (the second offset by the first mask byte's count;
//! the clear marker is past the table, so pruned lanes come out 0). Sparse int4 rows are first unpacked to
//! signed bytes ([`unpack_row_int4`]) and then expand as int8 ones. With more than four activation rows
//! (prefill), a row that is not one byte per column is expanded once and every group of activation rows reads
//! that copy. The products `Σ q·x` of 16 columns land exactly in four i32 lanes:
//!
//! ```text
//! with FEAT_DotProd (Armv8.2+: Cortex-A55/A76 and later, Neoverse, Apple M):
//!   sdot          four i8·i8 products added into each i32 lane
//! without (Cortex-A53/A72):
//!   smull, smlal2 two i8·i8 products added into each i16 lane: |sum| <= 2·128·127 < 2^15
//!   sadalp        adjacent i16 pairs added into the i32 lanes
//! ```
//! and each chunk's lanes are converted once and multiply-added with the chunk scale `s_x · d` (two 32-column
//! halves with their own weight scale for 32-column groups). Every product and block sum is exact, as on x86;
//! only the f32 sum over chunks differs from the scalar reference in order, so the budget is
//! `SUM_ORDER · Σ|ŵ·x̂|`.

use crate::formats::{Format, PackedMatrix, CHUNK};
use crate::kernels::simd::{
    by_scaling, chunk_scaling, sparse_int4_row_bytes, RowScales, DI4, DI8, GRP, KERNEL_CODES, RANKS_AFTER, ROW, SI8,
};
use crate::kernels::QuantActs;
use core::arch::aarch64::*;

/// Whether these kernels serve `m` (symmetric int8 and int4, dense or sparse; tiled matrices run on their
/// row-layout twin) on this CPU.
pub(crate) fn supports(m: &PackedMatrix) -> bool {
    m.format.elem().is_int() && !m.asym && super::neon_supported()
}

/// Whether the CPU has the dot-product instructions (`sdot`), which the kernels then use.
pub(crate) fn has_dotprod() -> bool {
    std::arch::is_aarch64_feature_detected!("dotprod")
}

/// Signed codes already expanded to one byte per column: a weight row's copy made once for many activation rows.
const EXP: u8 = KERNEL_CODES;
/// A sparse int4 row's stored nibbles unpacked to signed bytes, chunk padding included ([`unpack_row_int4`]):
/// its chunks then expand as sparse int8 ones do.
const U4: u8 = KERNEL_CODES + 1;

/// Computes rows `r0..r1` (row layout) for the `k` quantized activation rows in `q`: four activation rows
/// share each decoded weight row, then one at a time. Every activation row goes through the same operations in
/// any blocking, so a matmul row equals the matvec bit for bit.
///
/// # Safety
/// [`supports`] must hold for `m` (row layout); `q` holds `k` rows of `m.cols_pad` codes and their block
/// scales; `y` is valid for writes at `a·rows + r` for every `a < k` and `r0 <= r < r1`.
pub(crate) unsafe fn rows(m: &PackedMatrix, r0: usize, r1: usize, q: &QuantActs, k: usize, y: *mut f32) {
    if has_dotprod() {
        rows_sdot(m, r0, r1, q, k, y)
    } else {
        rows_smull(m, r0, r1, q, k, y)
    }
}

#[target_feature(enable = "neon,dotprod")]
unsafe fn rows_sdot(m: &PackedMatrix, r0: usize, r1: usize, q: &QuantActs, k: usize, y: *mut f32) {
    rows_with::<true>(m, r0, r1, q, k, y)
}

#[target_feature(enable = "neon")]
unsafe fn rows_smull(m: &PackedMatrix, r0: usize, r1: usize, q: &QuantActs, k: usize, y: *mut f32) {
    rows_with::<false>(m, r0, r1, q, k, y)
}

/// [`rows`] with `sdot` (`DOT`) or without. Inlined into the two entry points, which carry the features.
#[inline(always)]
unsafe fn rows_with<const DOT: bool>(m: &PackedMatrix, r0: usize, r1: usize, q: &QuantActs, k: usize, y: *mut f32) {
    debug_assert!(!m.tiled && q.k == k && q.xq.len() == k * m.cols_pad && q.sx.len() == k * m.chunks());
    let scaling = chunk_scaling(m);
    let once = k > 4 && m.format != Format::DenseInt8;
    let unpack = m.format == Format::SparseInt4;
    // Room for every column, and for the 16-byte reads past a row's last value: the unpacked int4 row, then
    // (once) the expanded row.
    let room = m.cols_pad + 64;
    let mut copy = vec![0u8; room * (unpack as usize + once as usize)];
    let (unpacked, expanded) = (copy.as_mut_ptr(), copy.as_mut_ptr().add(if unpack { room } else { 0 }));
    let fmt = if once {
        EXP
    } else if unpack {
        U4
    } else {
        match m.format {
            Format::DenseInt8 => DI8,
            Format::SparseInt8 => SI8,
            Format::DenseInt4 => DI4,
            Format::SparseInt4 | Format::DenseF32 | Format::DenseBf16 | Format::SparseF32 | Format::SparseBf16 => {
                unreachable!("neon_int::supports admits integer formats only")
            }
        }
    };
    // The row the `EXP` and `U4` instantiations read (only they do).
    let codes = if once { expanded } else { unpacked } as *const u8;
    macro_rules! by_format {
        ($nr:literal, $r:expr, $a:expr) => {
            match fmt {
                DI8 => by_scaling!(scaling, row::<DOT, $nr, DI8>(m, $r, q, $a, y, codes)),
                SI8 => by_scaling!(scaling, row::<DOT, $nr, SI8>(m, $r, q, $a, y, codes)),
                DI4 => by_scaling!(scaling, row::<DOT, $nr, DI4>(m, $r, q, $a, y, codes)),
                U4 => by_scaling!(scaling, row::<DOT, $nr, U4>(m, $r, q, $a, y, codes)),
                _ => by_scaling!(scaling, row::<DOT, $nr, EXP>(m, $r, q, $a, y, codes)),
            }
        };
    }
    for r in r0..r1 {
        if unpack {
            unpack_row_int4(m, r, unpacked);
        }
        if once {
            match m.format {
                Format::SparseInt8 => expand_row::<SI8>(m, r, expanded, unpacked),
                Format::DenseInt4 => expand_row::<DI4>(m, r, expanded, unpacked),
                Format::SparseInt4 => expand_row::<U4>(m, r, expanded, unpacked),
                Format::DenseInt8 | Format::DenseF32 | Format::DenseBf16 | Format::SparseF32 | Format::SparseBf16 => {
                    unreachable!("dense int8 rows are read as they are")
                }
            }
        }
        let mut a = 0;
        while a + 4 <= k {
            by_format!(4, r, a);
            a += 4;
        }
        while a < k {
            by_format!(1, r, a);
            a += 1;
        }
    }
}

/// One activation row's codes and block scales.
struct ActRow {
    xq: *const i8,
    sx: *const f32,
}

/// Weight row `r`'s signed codes, one byte per column, written to `out` (`m.cols_pad` bytes); `unpacked`
/// holds the row's unpacked int4 codes for `U4`.
#[inline(always)]
unsafe fn expand_row<const FMT: u8>(m: &PackedMatrix, r: usize, out: *mut u8, unpacked: *const u8) {
    let mut p = if FMT == U4 { unpacked } else { m.data.as_ptr().add(m.row_start(r)) };
    let masks = m.masks.as_ptr().wrapping_add(r * m.chunks());
    for ch in 0..m.chunks() {
        let w = chunk_codes::<FMT>(&mut p, masks, ch);
        for (s, v) in w.into_iter().enumerate() {
            vst1q_s8(out.add(ch * CHUNK + 16 * s) as *mut i8, v);
        }
    }
}

/// Sparse int4 row `r`'s stored nibbles as signed bytes (nibble − 8) in order, written to `out`, two per
/// stored byte (value `2j` in the low nibble of byte `j`; a chunk with an odd count keeps its pad nibble, so
/// every chunk starts at an even index).
#[inline(always)]
unsafe fn unpack_row_int4(m: &PackedMatrix, r: usize, out: *mut u8) {
    let p = m.data.as_ptr().add(m.row_start(r));
    let bytes = sparse_int4_row_bytes(m, r);
    let eight = vdupq_n_u8(8);
    // 16 bytes at a time: the last group reads up to 15 bytes past the row, within the next row or `VALUE_PAD`.
    let mut i = 0;
    while i < bytes {
        let v = vld1q_u8(p.add(i));
        let (lo, hi) = (vandq_u8(v, vdupq_n_u8(0x0F)), vshrq_n_u8::<4>(v));
        vst1q_u8(out.add(2 * i), vsubq_u8(vzip1q_u8(lo, hi), eight));
        vst1q_u8(out.add(2 * i + 16), vsubq_u8(vzip2q_u8(lo, hi), eight));
        i += 16;
    }
}

/// Weight row `r` against activation rows `a0..a0 + NR`: writes `y[a, r]`. `codes`: the row expanded by
/// [`expand_row`] (`FMT` `EXP`) or unpacked by [`unpack_row_int4`] (`U4`); else unused.
#[inline(always)]
unsafe fn row<const DOT: bool, const NR: usize, const FMT: u8, const MODE: u8>(
    m: &PackedMatrix,
    r: usize,
    q: &QuantActs,
    a0: usize,
    y: *mut f32,
    codes: *const u8,
) {
    let (cp, chunks) = (m.cols_pad, m.chunks());
    let act: [ActRow; NR] = core::array::from_fn(|a| ActRow {
        xq: q.xq.as_ptr().add((a0 + a) * cp),
        sx: q.sx.as_ptr().add((a0 + a) * chunks),
    });
    let mut p = if FMT == EXP || FMT == U4 { codes } else { m.data.as_ptr().add(m.row_start(r)) };
    let masks = m.masks.as_ptr().wrapping_add(r * chunks);
    let s = RowScales::of(m, r);
    // Two f32 accumulators per activation row, alternating by chunk, so FMA latency does not bind.
    let (mut acc0, mut acc1) = ([vdupq_n_f32(0.0); NR], [vdupq_n_f32(0.0); NR]);
    let mut ch = 0;
    while ch + 2 <= chunks {
        let w = chunk_codes::<FMT>(&mut p, masks, ch);
        chunk_dot::<DOT, NR, MODE>(&mut acc0, w, &act, &s, ch);
        let w = chunk_codes::<FMT>(&mut p, masks, ch + 1);
        chunk_dot::<DOT, NR, MODE>(&mut acc1, w, &act, &s, ch + 1);
        ch += 2;
    }
    if ch < chunks {
        let w = chunk_codes::<FMT>(&mut p, masks, ch);
        chunk_dot::<DOT, NR, MODE>(&mut acc0, w, &act, &s, ch);
    }
    let scale = if MODE == ROW { *s.d } else { 1.0 };
    for a in 0..NR {
        *y.add((a0 + a) * m.rows + r) = vaddvq_f32(vaddq_f32(acc0[a], acc1[a])) * scale;
    }
}

/// Chunk `ch`'s 64 signed weight codes, 16 columns per vector. Dense chunks are read at their offset from the
/// row start `*p`; sparse ones at `*p`, which then advances past the chunk's values (chunks come in order).
#[inline(always)]
unsafe fn chunk_codes<const FMT: u8>(p: &mut *const u8, masks: *const u64, ch: usize) -> [int8x16_t; 4] {
    match FMT {
        DI8 | EXP => {
            let w = p.add(ch * CHUNK) as *const i8;
            [vld1q_s8(w), vld1q_s8(w.add(16)), vld1q_s8(w.add(32)), vld1q_s8(w.add(48))]
        }
        DI4 => {
            // Column j in the low and column j + 32 in the high nibble of byte j.
            let w = p.add(ch * CHUNK / 2);
            let (v0, v1) = (vld1q_u8(w), vld1q_u8(w.add(16)));
            let (low, eight) = (vdupq_n_u8(0x0F), vdupq_n_u8(8));
            [vandq_u8(v0, low), vandq_u8(v1, low), vshrq_n_u8::<4>(v0), vshrq_n_u8::<4>(v1)]
                .map(|v| vreinterpretq_s8_u8(vsubq_u8(v, eight)))
        }
        _ => {
            let mask = *masks.add(ch);
            let mut v = *p;
            let w = core::array::from_fn(|h| {
                let (b0, b1) = ((mask >> (16 * h)) as u8, (mask >> (16 * h + 8)) as u8);
                let c0 = b0.count_ones() as usize;
                let ctrl = vcombine_u8(
                    vld1_u8(RANKS_AFTER.0[0][b0 as usize].as_ptr()),
                    vld1_u8(RANKS_AFTER.0[c0][b1 as usize].as_ptr()),
                );
                // 16 bytes from the half's first value: within the row's values and `VALUE_PAD` (or the
                // unpacked row's room).
                let half = vreinterpretq_s8_u8(vqtbl1q_u8(vld1q_u8(v), ctrl));
                v = v.add(c0 + b1.count_ones() as usize);
                half
            });
            let n = mask.count_ones() as usize;
            *p = p.add(if FMT == U4 { (n + 1) & !1 } else { n });
            w
        }
    }
}

/// `acc + Σ q·x` of 16 signed weight codes `w` against 16 activation codes `x`, as four exact i32 lanes.
#[inline(always)]
unsafe fn dot16<const DOT: bool>(acc: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t {
    if DOT {
        // `vdotq_s32` is not stable in this toolchain; `sdot` itself is what it would emit. Only reached from
        // functions that enable `dotprod` (`rows_sdot`), whose CPUs were checked for it.
        let mut acc = acc;
        core::arch::asm!(
            "sdot {acc:v}.4s, {w:v}.16b, {x:v}.16b",
            acc = inout(vreg) acc,
            w = in(vreg) w,
            x = in(vreg) x,
            options(pure, nomem, nostack, preserves_flags)
        );
        acc
    } else {
        let pairs = vmlal_high_s8(vmull_s8(vget_low_s8(w), vget_low_s8(x)), w, x);
        vpadalq_s16(acc, pairs)
    }
}

/// `acc[a] += cvt(Σ q·x) · s_x · d` over chunk `ch` for every activation row.
#[inline(always)]
unsafe fn chunk_dot<const DOT: bool, const NR: usize, const MODE: u8>(
    acc: &mut [float32x4_t; NR],
    w: [int8x16_t; 4],
    act: &[ActRow; NR],
    s: &RowScales,
    ch: usize,
) {
    let zero = vdupq_n_s32(0);
    for (acc, x) in acc.iter_mut().zip(act) {
        let xq = x.xq.add(ch * CHUNK);
        // Columns 0-31 and 32-63 in two chains (their own scales for 32-column groups).
        let lo = dot16::<DOT>(dot16::<DOT>(zero, w[0], vld1q_s8(xq)), w[1], vld1q_s8(xq.add(16)));
        let hi = dot16::<DOT>(dot16::<DOT>(zero, w[2], vld1q_s8(xq.add(32))), w[3], vld1q_s8(xq.add(48)));
        let sx = *x.sx.add(ch);
        match MODE {
            ROW => *acc = vfmaq_n_f32(*acc, vcvtq_f32_s32(vaddq_s32(lo, hi)), sx),
            GRP => {
                let d = s.d((ch * CHUNK) >> s.shift);
                *acc = vfmaq_n_f32(*acc, vcvtq_f32_s32(vaddq_s32(lo, hi)), sx * d);
            }
            _ => {
                let g = (ch * CHUNK) >> s.shift;
                *acc = vfmaq_n_f32(*acc, vcvtq_f32_s32(lo), sx * s.d(g));
                *acc = vfmaq_n_f32(*acc, vcvtq_f32_s32(hi), sx * s.d(g + 1));
            }
        }
    }
}
