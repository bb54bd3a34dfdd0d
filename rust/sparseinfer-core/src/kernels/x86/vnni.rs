//! AVX-512 VNNI kernels for integer weights with int8 activations: per 64-column block (`Activations::Int8`,
//! kernel names `<weight format>_i8`) or per row (`Activations::Int8Token`, `<weight format>_i8_token`, see
//! [`token_rows`]; they make the weights the unsigned operand, with one correction per scale block instead
//! of per chunk).
//!
//! Per-block activations: per 64-column chunk, `vpdpbusd` multiplies 64 unsigned bytes by 64 signed bytes and adds each group of
//! four products into one of 16 i32 lanes: exact integer arithmetic. The chunk's i32 lanes are then
//! converted to f32 and multiply-added with the chunk scale `s_x · d` into an f32 accumulator.
//!
//! `vpdpbusd` needs one unsigned operand: the weights, as codes `c = q + z` (int8: the stored byte with its
//! top bit flipped, `z = 128`; int4: the stored nibble `q + 8`). Sparse rows expand zeros into the pruned
//! lanes, which become `z`, a zero weight. With scale groups, each chunk's `vpdpbusd` starts from the
//! activations' zero-point lanes `-z·Σx` over the lane's four columns (`QuantActs::zcorr`, one vector per chunk,
//! shared by every weight row), so its i32 lanes are exactly `Σ q·x` at the cost of a load ([`block_zcorr`]);
//! tiled matrices subtract `z·Σx` from each segment's exact sums, and equal the AMX kernels' (`super::amx`).
//! One scale per row takes the zero point `-z·d_r·Σx̂` from precomputed sums (`QuantActs::gsum`) for 16 rows
//! at once, and asymmetric int4 (`ŵ = d·c + m`, no integer zero point) adds `Σ_g m_g·Σx̂_g` per row the same
//! way; both round in f32 with `|ŵ| + |zero point|` (see the test budgets).
//! On AMD Zen 4 this is 25 % faster for dense int8 from L2 than the signed form it replaced (activations
//! offset to `x + 128`, and a second `vpdpbusd` per chunk to subtract `Σ 128·w` exactly in i32); sparse int8,
//! which does more per chunk, gained ~2 %.
//!
//! Sparse asymmetric int4 is not served here (`supports` is false), nor any asymmetric int4 with per-row
//! activations; they run the f32 kernels on `x̂`.

use super::avx512::{dense_nibbles, nibbles_to_bytes};
use super::{staged_row_scales, STAGED_GROUPS};
use crate::formats::tiles::{QUAD, TILE};
use crate::formats::{Elem, Format, PackedMatrix, CHUNK};
use crate::kernels::simd::{
    by_scaling, chunk_scaling, scale_mode, RowScales, DI4, DI8, GRP, KERNEL_CODES, ROW, SI4, SI8,
};
use crate::kernels::vector::x86::dot;
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

/// Bytes ahead of a weight stream to prefetch: the sparse kernels do enough work per byte that the hardware
/// prefetcher falls behind. The address may lie past the end of the matrix (`wrapping_add`): a prefetch never
/// faults. Dense row-layout kernels do not prefetch (the hardware prefetcher streams them alone, as it does
/// dense f32); every tile stream is prefetched a line per step of four quads, and a dense int4 one every line
/// in decode steps on Intel. The distance and each choice were measured: docs/benchmarks/kernels.md.
pub(super) const PREFETCH: usize = 4096;

/// Whether these kernels serve `m` (and the CPU has VNNI), with per-block (`token: false`) or per-row
/// activation scales. Per-row scales take symmetric weights only, and rows short enough that every exact
/// integer sum fits an i32 ([`TOKEN_MAX_COLS`]).
pub(crate) fn supports(m: &PackedMatrix, token: bool) -> bool {
    let max_cols = if m.tiled { TILE_TOKEN_MAX_COLS } else { TOKEN_MAX_COLS };
    let shape = if token { !m.asym && m.cols_pad <= max_cols } else { !(m.format.is_sparse() && m.asym) };
    m.format.elem().is_int() && shape && super::vnni_supported()
}

/// Rows per batched horizontal reduction.
const BATCH: usize = 16;

/// Weight streams each thread reads side by side in a decode step (one activation row). A thread that reads
/// one sequential stream gets less of the memory bandwidth than one that reads two (the hardware prefetchers
/// keep a few lines in flight per stream; see `crate::bandwidth`), so the decode kernels step through rows
/// (or tiles) from different parts of their range in lockstep, each with its own accumulators: every row's
/// sum is the same bits as when it is computed alone.
const STREAMS: usize = 2;

/// Batches of rows the row-layout decode reads in lockstep, from as many parts of its range: more than the
/// tiles' [`STREAMS`] because a row-layout row is short (a 768-column vocabulary head's is 12 lines), so one
/// batch's rows are a single stream. Four read faster than two for dense int8 and int4 from DRAM; the tiles
/// did not.
const BATCH_STREAMS: usize = 4;

/// Computes rows `r0..r1` for the `k` quantized activation rows in `q`.
///
/// Blocks of four activation rows share each weight load (prefill). Each row's accumulator vector is kept
/// until 16 rows are done, then [`hsum16`] reduces the 16 together: a per-row horizontal sum is a serial
/// chain of ~10 shuffles and adds that cost ~15 % of a 2048-column row. Every row goes through the same
/// operations in every blocking, so a matmul row equals the matvec bit for bit.
///
/// # Safety
/// The CPU must support the enabled features and [`supports`] must hold for `m`; `q` was built for `m`
/// with `k` rows; `y` is valid for writes at `a·rows + r` for every `a < k` and `r0 <= r < r1`.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi,avx512vbmi2,avx512vnni,gfni,popcnt,bmi2,fma")]
pub(crate) unsafe fn rows(m: &PackedMatrix, r0: usize, r1: usize, q: &QuantActs, k: usize, y: *mut f32) {
    debug_assert!(q.k == k && q.xq.len() == k * m.cols_pad && m.cols_pad.is_multiple_of(CHUNK));
    // The aligned loads of `xq` and `zcorr` need every row and chunk on a 64-byte boundary.
    debug_assert!((q.xq.as_ptr() as usize).is_multiple_of(64));
    debug_assert!(if !q.token && !m.tiled && !block_zcorr(m) {
        q.gsum.len() == k * m.groups()
    } else {
        q.zcorr.len() == k * zcorr_per_row(m, q.token) && (q.zcorr.as_ptr() as usize).is_multiple_of(64)
    });
    if m.tiled {
        return tile_rows(m, r0, r1, q, k, y);
    }
    if k == 1 {
        // Decode: the range's full batches in [`BATCH_STREAMS`] parts, read in lockstep; then what is left
        // one batch at a time (its rows a part of the batch apart in lockstep when it is full).
        let part = (r1 - r0) / BATCH / BATCH_STREAMS;
        for b in 0..part {
            let g0 = r0 + b * BATCH;
            batch::<1, BATCH_STREAMS>(m, core::array::from_fn(|i| g0 + i * part * BATCH), BATCH, q, 0, y);
        }
        let mut g0 = r0 + BATCH_STREAMS * part * BATCH;
        while g0 < r1 {
            let n = BATCH.min(r1 - g0);
            batch::<1, 1>(m, [g0], n, q, 0, y);
            g0 += n;
        }
        return;
    }
    let mut g0 = r0;
    while g0 < r1 {
        let n = BATCH.min(r1 - g0);
        let mut a = 0;
        while a + 4 <= k {
            batch::<4, 1>(m, [g0], n, q, a, y);
            a += 4;
        }
        while a < k {
            batch::<1, 1>(m, [g0], n, q, a, y);
            a += 1;
        }
        g0 += n;
    }
}

/// The widest row the per-row-scale kernels take. Each i32 lane is converted on its own, and `vpdpbusd`,
/// the adds and the correction all wrap, so only each lane's final value has to fit: `Σ q·x` over its
/// `cols / 16` columns, at most `127 · 127 · cols / 16` in magnitude (int8), which fits an i32 up to ~2.1M
/// columns. The lane sums are exact integers; past 2^24 in magnitude (rows of more than ~16k columns) their
/// conversion to f32 rounds, by at most 2^-24 relative.
pub(crate) const TOKEN_MAX_COLS: usize = 1 << 20;

/// The widest row the per-row-scale kernels take on tiled matrices, where each i32 lane adds a whole scale
/// block of one row (every column of it, with per-row weight scales): `127 · 127 · cols` must fit an i32.
pub(crate) const TILE_TOKEN_MAX_COLS: usize = 1 << 17;

/// Chunks per scale block of the per-row-scale kernels: the weight group (or the whole row), one chunk for
/// 32-column groups (whose two groups split the chunk's lanes).
fn token_block_chunks(m: &PackedMatrix) -> usize {
    if scale_mode(m) == ROW {
        m.chunks()
    } else {
        (m.group / CHUNK).max(1)
    }
}

/// The zero point `z` of the unsigned weight codes `c = q + z` every kernel here adds up: `128` for int8 (the
/// stored bytes with the top bit flipped), `8` for int4.
fn zero_point(m: &PackedMatrix) -> u8 {
    if m.format.elem() == Elem::I8 {
        128
    } else {
        8
    }
}

/// Columns per scale segment of the tiled per-row-scale kernels: the weight group, or the whole row.
fn tile_token_segment(m: &PackedMatrix) -> usize {
    if scale_mode(m) == ROW {
        m.cols_pad
    } else {
        m.group
    }
}

/// Columns per scale segment of the tiled kernels: with per-block activations the chunk (or a 32-column
/// group), with per-row ones [`tile_token_segment`].
fn tile_segment(m: &PackedMatrix, token: bool) -> usize {
    if token {
        tile_token_segment(m)
    } else {
        m.group.min(CHUNK)
    }
}

/// Whether the per-block row-layout kernels start each chunk's sums from the activations' zero-point lanes
/// (`QuantActs::zcorr`): symmetric weights with scale groups, whose zero points would otherwise cost a dot
/// product of the row's scales per row. One scale per row adds its zero point for 16 rows in one multiply-add,
/// cheaper than a load per chunk; asymmetric minimums are no integer zero point.
pub(crate) fn block_zcorr(m: &PackedMatrix) -> bool {
    !m.asym && scale_mode(m) != ROW
}

/// Chunks per zero-point block of the row-layout kernels: the per-row-scale kernels' scale block, or each
/// chunk with per-block activations.
fn zcorr_block_chunks(m: &PackedMatrix, token: bool) -> usize {
    if token {
        token_block_chunks(m)
    } else {
        1
    }
}

/// Entries of `q.zcorr` per activation row.
fn zcorr_per_row(m: &PackedMatrix, token: bool) -> usize {
    if m.tiled {
        m.cols_pad / tile_segment(m, token)
    } else {
        16 * m.chunks() / zcorr_block_chunks(m, token)
    }
}

/// Fills `q.zcorr`: per activation row and zero-point block, the 16 lane sums `z · Σ x` (one `vpdpbusd` of the
/// broadcast zero point with each chunk's codes), which turn `Σ c·x` into `Σ q·x` lane by lane, exactly: the
/// per-row-scale kernels subtract them from a block's sums; with per-block activations they are stored negated,
/// `-z · Σ x`, and each chunk's sums start from them.
/// Tiled matrices, whose lanes are rows that each meet every column, take one `z · Σ x` per segment
/// ([`tile_segment`]), with per-block activations too: their chunk sums are then exact `Σ q·x` before any
/// rounding, and equal the AMX kernels' (`super::amx`), so a tiled matmul row is the same with either.
///
/// # Safety
/// The CPU must support AVX-512 VNNI; `q.xq` holds `q.k` rows of `m.cols_pad` codes.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(crate) unsafe fn zero_point_corrections(m: &PackedMatrix, q: &mut QuantActs) {
    if m.tiled {
        let (seg, per_row) = (tile_segment(m, q.token), zcorr_per_row(m, q.token));
        assert!(q.xq.len() == q.k * per_row * seg);
        q.zcorr = crate::kernels::aligned::Aligned::zeroed(q.k * per_row);
        let z = zero_point(m) as i32;
        for (codes, zc) in q.xq.chunks_exact(seg).zip(q.zcorr.iter_mut()) {
            *zc = z * codes.iter().map(|&c| c as i32).sum::<i32>();
        }
        return;
    }
    let (cp, sbc) = (m.cols_pad, zcorr_block_chunks(m, q.token));
    let blocks = m.chunks() / sbc;
    assert!(q.xq.len() == q.k * cp && blocks * sbc == m.chunks());
    q.zcorr = crate::kernels::aligned::Aligned::zeroed(q.k * blocks * 16);
    let z = _mm512_set1_epi8(zero_point(m) as i8);
    for a in 0..q.k {
        for b in 0..blocks {
            let mut v = _mm512_setzero_si512();
            for ch in b * sbc..(b + 1) * sbc {
                v = _mm512_dpbusd_epi32(v, z, _mm512_load_si512(q.xq.as_ptr().add(a * cp + ch * CHUNK) as *const _));
            }
            if !q.token {
                v = _mm512_sub_epi32(_mm512_setzero_si512(), v);
            }
            _mm512_store_si512(q.zcorr.as_mut_ptr().add((a * blocks + b) * 16) as *mut _, v);
        }
    }
}

/// Pointers to one activation row's codes, block scales and (per-row scales) zero-point
/// corrections.
struct ActRow {
    xq: *const i8,
    sx: *const f32,
    zc: *const i32,
}

/// Weight rows `g0[s]..g0[s] + n` (`n` at most [`BATCH`]) of each of the `S` batches (read in lockstep)
/// against activation rows `a0..a0+NR`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi,avx512vbmi2,avx512vnni,gfni,popcnt,bmi2,fma")]
unsafe fn batch<const NR: usize, const S: usize>(
    m: &PackedMatrix,
    g0: [usize; S],
    n: usize,
    q: &QuantActs,
    a0: usize,
    y: *mut f32,
) {
    let (cp, chunks) = (m.cols_pad, m.chunks());
    let zc_row = if q.zcorr.is_empty() { 0 } else { zcorr_per_row(m, q.token) };
    let act: [ActRow; NR] = core::array::from_fn(|a| ActRow {
        xq: q.xq.as_ptr().add((a0 + a) * cp),
        sx: q.sx.as_ptr().add((a0 + a) * chunks),
        zc: q.zcorr.as_ptr().wrapping_add((a0 + a) * zc_row),
    });
    let scaling = chunk_scaling(m);
    // sums[s][a][i]: row g0[s] + i against activation row a0 + a.
    let mut sums = [[[_mm512_setzero_ps(); BATCH]; NR]; S];
    // `$f::<NR, $r, format>` for the matrix's format (the per-block and per-row kernels share the signature).
    macro_rules! per_format {
        ($f:ident, $r:tt, $rows:expr) => {
            match m.format {
                Format::DenseInt8 => by_scaling!(scaling, $f::<NR, $r, DI8>(m, $rows, &act)),
                Format::SparseInt8 => by_scaling!(scaling, $f::<NR, $r, SI8>(m, $rows, &act)),
                Format::DenseInt4 => by_scaling!(scaling, $f::<NR, $r, DI4>(m, $rows, &act)),
                Format::SparseInt4 => by_scaling!(scaling, $f::<NR, $r, SI4>(m, $rows, &act)),
                Format::DenseF32 | Format::DenseBf16 | Format::SparseF32 | Format::SparseBf16 => {
                    unreachable!("vnni::supports admits integer formats only")
                }
            }
        };
    }
    macro_rules! rows {
        ($r:tt, $rows:expr, $slot:expr) => {{
            let rows: [usize; $r] = $rows;
            let accs: [Acc<NR>; $r] =
                if q.token { per_format!(token_rows, $r, rows) } else { per_format!(block_rows, $r, rows) };
            for (j, acc) in accs.into_iter().enumerate() {
                let (s, i) = $slot(j);
                for a in 0..NR {
                    sums[s][a][i] = _mm512_add_ps(acc[0][a], acc[1][a]);
                }
            }
        }};
    }
    if S > 1 {
        // One row of every batch at a time.
        for i in 0..n {
            rows!(S, core::array::from_fn(|s| g0[s] + i), |s| (s, i));
        }
    } else if NR == 1 && n == BATCH {
        // One activation row (decode) and one batch: rows a part of the batch apart in lockstep ([`STREAMS`]).
        for i in 0..BATCH / STREAMS {
            rows!(STREAMS, core::array::from_fn(|j| g0[0] + i + j * BATCH / STREAMS), |j| (0, i + j * BATCH / STREAMS));
        }
    } else {
        for i in 0..n {
            rows!(1, [g0[0] + i], |_| (0, i));
        }
    }
    for (s, sums) in sums.iter().enumerate() {
        finish(m, g0[s], n, q, &act, a0, sums, y);
    }
}

/// Writes rows `g0..g0 + n` of the output for activation rows `a0..a0 + NR` from their accumulator vectors
/// `sums[a][i]`: the horizontal sums, the row scale, the zero points.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn finish<const NR: usize>(
    m: &PackedMatrix,
    g0: usize,
    n: usize,
    q: &QuantActs,
    act: &[ActRow; NR],
    a0: usize,
    sums: &[[__m512; BATCH]; NR],
    y: *mut f32,
) {
    let mode = scale_mode(m);
    let lanes: __mmask16 = if n == BATCH { !0 } else { (1u16 << n) - 1 };
    let scale = if mode == ROW { _mm512_maskz_loadu_ps(lanes, m.scales.as_ptr().add(g0)) } else { _mm512_set1_ps(1.0) };
    for (a, rows) in sums.iter().enumerate() {
        let dst = y.add((a0 + a) * m.rows + g0);
        if q.token {
            // Per-row activation scales multiply the exact sums once, here.
            let scale = _mm512_mul_ps(scale, _mm512_set1_ps(*act[a].sx));
            _mm512_mask_storeu_ps(dst, lanes, _mm512_mul_ps(hsum16(rows), scale));
            continue;
        }
        if mode == ROW {
            // One group per row: the zero points `-z·d_r·Σx̂` of all the batch's rows in one multiply-add, and
            // one masked store. Short rows (a vocabulary head's) felt the per-row scalar epilogue below.
            debug_assert_eq!(m.groups(), 1);
            let zsum = _mm512_set1_ps(-(zero_point(m) as f32) * q.gsum[a0 + a]);
            _mm512_mask_storeu_ps(dst, lanes, _mm512_fmadd_ps(scale, zsum, _mm512_mul_ps(hsum16(rows), scale)));
            continue;
        }
        if !m.asym {
            // The zero points are in the sums already (`q.zcorr`).
            _mm512_mask_storeu_ps(dst, lanes, _mm512_mul_ps(hsum16(rows), scale));
            continue;
        }
        let mut out = [0.0f32; BATCH];
        _mm512_storeu_ps(out.as_mut_ptr(), _mm512_mul_ps(hsum16(rows), scale));
        for (i, o) in out[..n].iter_mut().enumerate() {
            *dst.add(i) = *o + zero_point_term(m, q, a0 + a, g0 + i);
        }
    }
}

/// The per-block kernels' minimums of asymmetric weight row `r` against activation row `a`: `ŵ = d·c + m` per
/// group, so the row adds `Σ_g m_g · Σx̂_g`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma")]
unsafe fn zero_point_term(m: &PackedMatrix, q: &QuantActs, a: usize, r: usize) -> f32 {
    let groups = m.groups();
    let gs = &q.gsum[a * groups..(a + 1) * groups];
    let row = r * groups..(r + 1) * groups;
    // A vector dot: a scalar loop is one long chain of dependent adds.
    if m.half {
        dot_f16(&m.mins16[row], gs)
    } else {
        dot(&m.mins[row], gs)
    }
}

/// `Σ f16(a[i]) · b[i]` (the half-scale twin of `vector::dot`).
#[inline]
#[target_feature(enable = "avx512f,fma")]
unsafe fn dot_f16(a: &[u16], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = _mm512_setzero_ps();
    for i in (0..a.len()).step_by(16) {
        let lanes: __mmask16 = if a.len() - i >= 16 { !0 } else { (1u16 << (a.len() - i)) - 1 };
        let h = _mm256_maskz_loadu_epi16(lanes, a.as_ptr().add(i) as *const i16);
        acc = _mm512_fmadd_ps(_mm512_cvtph_ps(h), _mm512_maskz_loadu_ps(lanes, b.as_ptr().add(i)), acc);
    }
    _mm512_reduce_add_ps(acc)
}

/// Lane `i` of the result is the sum of the 16 lanes of `v[i]`: a transposing tree of 45 shuffles and adds
/// over 16 rows, where 16 separate reductions would take ~160 dependent operations.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn hsum16(v: &[__m512; BATCH]) -> __m512 {
    // 16 -> 8: 128-bit blocks (0+2, 1+3) of two rows per vector: [a02, a13, b02, b13].
    let s1: [__m512; 8] = core::array::from_fn(|i| {
        let (a, b) = (v[2 * i], v[2 * i + 1]);
        _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(a, b), _mm512_shuffle_f32x4::<0xEE>(a, b))
    });
    // 8 -> 4: block j of s2[i] holds the 4-lane partial sum of row 4i + j.
    let s2: [__m512; 4] = core::array::from_fn(|i| {
        let (a, b) = (s1[2 * i], s1[2 * i + 1]);
        _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(a, b), _mm512_shuffle_f32x4::<0xDD>(a, b))
    });
    // 4 -> 2: within blocks, lanes (0+2, 1+3) of two vectors interleaved: [a02, b02, a13, b13].
    let s3: [__m512; 2] = core::array::from_fn(|i| {
        let (a, b) = (s2[2 * i], s2[2 * i + 1]);
        _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b))
    });
    // 2 -> 1: lane k of block j is row 4k + j.
    let (a, b) = (s3[0], s3[1]);
    let t = _mm512_add_ps(_mm512_shuffle_ps::<0x44>(a, b), _mm512_shuffle_ps::<0xEE>(a, b));
    // Lane i = row i: row i sits at lane 4·(i mod 4) + i/4.
    let idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    _mm512_permutexvar_ps(idx, t)
}

/// Broadcasts the f32 at `p` with a `vbroadcastss` of its own. LLVM would fold `_mm512_set1_ps(*p)` into
/// the FMA as an embedded `{1to16}` memory operand; in an L1-resident assembly model of the sparse int8
/// loop on AMD Zen 5 that form cost ~0.7 cycles per chunk more (3.9 against 3.2). From L2 and beyond the
/// difference drowns in the weight streaming.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn broadcast(p: *const f32) -> __m512 {
    let r: __m512;
    // SAFETY: the caller guarantees 4 readable bytes at p.
    core::arch::asm!(
        "vbroadcastss {r}, dword ptr [{p}]",
        r = out(zmm_reg) r,
        p = in(reg) p,
        options(pure, readonly, nostack, preserves_flags)
    );
    r
}

/// The f32 factor of chunk `ch`'s 16 i32 lanes: the activation block scale times the weight group scale
/// (lane `j` covers columns `4j..4j+4`, so a 32-column group splits the lanes 8/8).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn chunk_scale<const MODE: u8>(s: &RowScales, sx: *const f32, ch: usize) -> __m512 {
    if MODE == ROW {
        return broadcast(sx.add(ch));
    }
    // Group factors: LLVM folds one broadcast into the multiply, which measured ~3 % faster for int4 g128
    // than two separate broadcasts.
    let g = (ch * CHUNK) >> s.shift;
    let x = _mm512_set1_ps(*sx.add(ch));
    if MODE == GRP {
        _mm512_mul_ps(x, group_scale(s, g))
    } else {
        _mm512_mul_ps(x, group_pair(s, g))
    }
}

/// Scale `g` of a row in every lane. Half scales: a word broadcast and one conversion, where the scalar route
/// (load, move to a vector, convert, broadcast) takes a port-5 uop more.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn group_scale(s: &RowScales, g: usize) -> __m512 {
    if s.half {
        _mm512_cvtph_ps(_mm256_set1_epi16(*s.d16.add(g) as i16))
    } else {
        _mm512_set1_ps(*s.d.add(g))
    }
}

/// Scales `g` (lanes 0-7) and `g + 1` (lanes 8-15) of a row: a chunk's two 32-column groups. Half scales: the
/// pair's four bytes broadcast, one in-lane byte shuffle to eight copies of each, one conversion.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn group_pair(s: &RowScales, g: usize) -> __m512 {
    if s.half {
        let pair = _mm256_set1_epi32((s.d16.add(g) as *const i32).read_unaligned());
        let (lo, hi) = (0x0100_0100_0100_0100i64, 0x0302_0302_0302_0302i64);
        _mm512_cvtph_ps(_mm256_shuffle_epi8(pair, _mm256_setr_epi64x(lo, lo, hi, hi)))
    } else {
        _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(*s.d.add(g)), _mm512_set1_ps(*s.d.add(g + 1)))
    }
}

/// `acc[a] += cvt(Σ c·x + zc) · scale` for the unsigned weight codes `c` of chunk `ch`, the sums starting from
/// the chunk's zero-point lanes when `zc` is set ([`block_zcorr`]; otherwise `finish` adds the zero points).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma")]
unsafe fn unsigned_chunk<const NR: usize, const MODE: u8>(
    acc: &mut [__m512; NR],
    c: __m512i,
    act: &[ActRow; NR],
    s: &RowScales,
    ch: usize,
    zc: bool,
) {
    for (a, x) in act.iter().enumerate() {
        let xa = _mm512_loadu_si512(x.xq.add(ch * CHUNK) as *const _);
        let z = if zc { _mm512_load_si512(x.zc.add(16 * ch) as *const _) } else { _mm512_setzero_si512() };
        let dot = _mm512_dpbusd_epi32(z, c, xa);
        acc[a] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), chunk_scale::<MODE>(s, x.sx, ch), acc[a]);
    }
}

/// Tiled sparse int4 (`formats::tiles`): a tile with a quad of more than 32 values, and one without.
pub(super) const SI4_WIDE: u8 = KERNEL_CODES;
pub(super) const SI4_NARROW: u8 = KERNEL_CODES + 1;

/// Chunk `ch`'s unsigned weight codes `c = q + z` (see the module docs) in format `FMT`. Dense chunks are
/// read at their offset from the row start `*p`; sparse ones at `*p`, which then advances past the chunk's
/// values (chunks must come in order), and the pruned lanes get `z`, a zero weight.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vbmi2,gfni,popcnt")]
unsafe fn chunk_codes<const FMT: u8>(p: &mut *const u8, masks: *const u64, ch: usize) -> __m512i {
    let flip = _mm512_set1_epi8(-128);
    match FMT {
        DI8 => _mm512_xor_si512(_mm512_loadu_si512(p.add(ch * CHUNK) as *const _), flip),
        DI4 => dense_nibbles(p.add(ch * CHUNK / 2)),
        _ => {
            let mask = *masks.add(ch);
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH) as *const i8);
            if FMT == SI8 {
                // Pruned lanes expand to 0 and flip to 128.
                let c = _mm512_xor_si512(_mm512_maskz_expand_epi8(mask, load512_nofold!(*p)), flip);
                *p = p.add(mask.count_ones() as usize);
                c
            } else {
                let c = _mm512_mask_expand_epi8(_mm512_set1_epi8(8), mask, nibbles_to_bytes(*p));
                *p = p.add((mask.count_ones() as usize).div_ceil(2));
                c
            }
        }
    }
}

/// One weight row against per-block-scaled activations: per chunk, `Σ c·x` in i32 lanes (`Σ q·x` from the
/// zero-point lanes, [`block_zcorr`]), converted and multiply-added with the chunk scale (other zero points and
/// minimums are added per row, in `finish`).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vbmi2,avx512vnni,gfni,popcnt,fma")]
unsafe fn block_rows<const NR: usize, const R: usize, const FMT: u8, const MODE: u8>(
    m: &PackedMatrix,
    rows: [usize; R],
    act: &[ActRow; NR],
) -> [Acc<NR>; R] {
    let mut p: [*const u8; R] = core::array::from_fn(|i| m.data.as_ptr().add(m.row_start(rows[i])));
    let masks: [*const u64; R] = core::array::from_fn(|i| m.masks.as_ptr().wrapping_add(rows[i] * m.chunks()));
    let mut staged = [[core::mem::MaybeUninit::uninit(); STAGED_GROUPS]; R];
    let s: [RowScales; R] = core::array::from_fn(|i| staged_row_scales(m, rows[i], &mut staged[i]));
    let zc = block_zcorr(m);
    let (mut acc0, mut acc1) = ([[_mm512_setzero_ps(); NR]; R], [[_mm512_setzero_ps(); NR]; R]);
    for_chunks!(m.chunks(), acc0, acc1, |ch, acc| {
        for i in 0..R {
            let c = chunk_codes::<FMT>(&mut p[i], masks[i], ch);
            unsigned_chunk::<NR, MODE>(&mut acc[i], c, act, &s[i], ch, zc);
        }
    });
    core::array::from_fn(|i| [acc0[i], acc1[i]])
}

/// One weight row against per-row-scaled activations: `Σ c·x` in exact i32 lanes over each scale block
/// (the weight group, or the whole row), the block's zero-point correction subtracted lane by lane, then one
/// conversion and (for groups) one multiply-add with the group scale per block. Per chunk that is the codes
/// and one `vpdpbusd` per activation row; the per-block kernels also convert and scale every chunk.
/// The caller multiplies the row's sum by the activation scale (and the row scale).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vbmi2,avx512vnni,gfni,popcnt,fma")]
unsafe fn token_rows<const NR: usize, const R: usize, const FMT: u8, const MODE: u8>(
    m: &PackedMatrix,
    rows: [usize; R],
    act: &[ActRow; NR],
) -> [Acc<NR>; R] {
    let mut p: [*const u8; R] = core::array::from_fn(|i| m.data.as_ptr().add(m.row_start(rows[i])));
    let masks: [*const u64; R] = core::array::from_fn(|i| m.masks.as_ptr().wrapping_add(rows[i] * m.chunks()));
    let mut staged = [[core::mem::MaybeUninit::uninit(); STAGED_GROUPS]; R];
    let s: [RowScales; R] = core::array::from_fn(|i| staged_row_scales(m, rows[i], &mut staged[i]));
    let sbc = token_block_chunks(m);
    let (mut f0, mut f1) = ([[_mm512_setzero_ps(); NR]; R], [[_mm512_setzero_ps(); NR]; R]);
    // Alternating f32 accumulators by block: with 64- or 128-column groups, one accumulator would put an
    // FMA latency on every block.
    for_chunks!(m.chunks() / sbc, f0, f1, |b, accf| {
        let (mut i0, mut i1) = ([[_mm512_setzero_si512(); NR]; R], [[_mm512_setzero_si512(); NR]; R]);
        for_chunks!(sbc, i0, i1, |j, acci| {
            let ch = b * sbc + j;
            for i in 0..R {
                let c = chunk_codes::<FMT>(&mut p[i], masks[i], ch);
                for (a, x) in act.iter().enumerate() {
                    let xa = _mm512_load_si512(x.xq.add(ch * CHUNK) as *const _);
                    acci[i][a] = _mm512_dpbusd_epi32(acci[i][a], c, xa);
                }
            }
        });
        for i in 0..R {
            for (a, x) in act.iter().enumerate() {
                let zc = _mm512_load_si512(x.zc.add(16 * b) as *const _);
                let exact = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_add_epi32(i0[i][a], i1[i][a]), zc));
                let s = &s[i];
                accf[i][a] = match MODE {
                    ROW => _mm512_add_ps(accf[i][a], exact),
                    GRP => _mm512_fmadd_ps(exact, group_scale(s, b), accf[i][a]),
                    _ => _mm512_fmadd_ps(exact, group_pair(s, 2 * b), accf[i][a]),
                };
            }
        }
    });
    core::array::from_fn(|i| [f0[i], f1[i]])
}

/// Tiled matrices ([`crate::formats::tiles`]): weight rows `r0..r1` (`r0` a multiple of 16) against the `k`
/// activation rows of `q`, one tile of 16 rows at a time, sharing each tile's decoded codes between up to four
/// activation rows.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi,avx512vbmi2,avx512vnni,gfni,popcnt,bmi2,fma")]
unsafe fn tile_rows(m: &PackedMatrix, r0: usize, r1: usize, q: &QuantActs, k: usize, y: *mut f32) {
    debug_assert!(r0.is_multiple_of(TILE) && r1 <= m.rows);
    let (t0, t1) = (r0 / TILE, r1.div_ceil(TILE));
    if k == 1 {
        // Decode: the range's tiles in [`STREAMS`] parts, read in lockstep (an odd last tile alone).
        let part = (t1 - t0) / STREAMS;
        for t in t0..t0 + part {
            tile::<1, STREAMS>(m, core::array::from_fn(|i| t + i * part), r1, q, 0, y);
        }
        for t in t0 + STREAMS * part..t1 {
            tile::<1, 1>(m, [t], r1, q, 0, y);
        }
        return;
    }
    for t in t0..t1 {
        let mut a = 0;
        while a + 4 <= k {
            tile::<4, 1>(m, [t], r1, q, a, y);
            a += 4;
        }
        while a < k {
            tile::<1, 1>(m, [t], r1, q, a, y);
            a += 1;
        }
    }
}

/// Tiles `ts` (their rows below `r1`) against activation rows `a0..a0 + NR`, in lockstep ([`STREAMS`]).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi,avx512vbmi2,avx512vnni,gfni,popcnt,bmi2,fma")]
unsafe fn tile<const NR: usize, const T: usize>(
    m: &PackedMatrix,
    ts: [usize; T],
    r1: usize,
    q: &QuantActs,
    a0: usize,
    y: *mut f32,
) {
    let (cp, chunks) = (m.cols_pad, m.chunks());
    let zc_row = zcorr_per_row(m, q.token);
    let act: [ActRow; NR] = core::array::from_fn(|a| ActRow {
        xq: q.xq.as_ptr().add((a0 + a) * cp),
        sx: q.sx.as_ptr().add((a0 + a) * chunks),
        zc: q.zcorr.as_ptr().wrapping_add((a0 + a) * zc_row),
    });
    let grouped = scale_mode(m) != ROW;
    // Int4 tiles whose quads all fit 32 bytes load 32 per pair, the others 64 (which serves narrow tiles
    // too: the same codes): one branch per call.
    let fmt = match m.format {
        Format::SparseInt8 => SI8,
        Format::DenseInt8 => DI8,
        Format::DenseInt4 => DI4,
        _ if ts.iter().all(|&t| m.tile_narrow[t]) => SI4_NARROW,
        _ => SI4_WIDE,
    };
    macro_rules! by_fmt {
        ($token:literal, $grouped:literal) => {
            match fmt {
                SI8 => tile_acc::<NR, T, SI8, $token, $grouped>(m, ts, &act),
                DI8 => tile_acc::<NR, T, DI8, $token, $grouped>(m, ts, &act),
                DI4 => tile_acc::<NR, T, DI4, $token, $grouped>(m, ts, &act),
                SI4_WIDE => tile_acc::<NR, T, SI4_WIDE, $token, $grouped>(m, ts, &act),
                _ => tile_acc::<NR, T, SI4_NARROW, $token, $grouped>(m, ts, &act),
            }
        };
    }
    let accs = match (q.token, grouped) {
        (false, false) => by_fmt!(false, false),
        (false, true) => by_fmt!(false, true),
        (true, false) => by_fmt!(true, false),
        (true, true) => by_fmt!(true, true),
    };
    for (t, acc) in ts.into_iter().zip(accs) {
        let n = (r1 - t * TILE).min(TILE);
        let lanes: __mmask16 = if n == TILE { !0 } else { (1u16 << n) - 1 };
        // The zero points were subtracted from the exact sums (`q.zcorr`), so only the scales remain.
        for (a, v) in acc.into_iter().enumerate() {
            let mut v = v;
            if !grouped {
                v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(lanes, m.scales.as_ptr().add(t * TILE)));
            }
            if q.token {
                v = _mm512_mul_ps(v, _mm512_set1_ps(*act[a].sx));
            }
            _mm512_mask_storeu_ps(y.add((a0 + a) * m.rows + t * TILE), lanes, v);
        }
    }
}

/// The unsigned codes of one tiled int8 quad with mask `mask` at `*p` (the stored codes are already flipped,
/// so pruned lanes expand straight to the zero point), advancing `*p` past its values.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi2,popcnt")]
pub(super) unsafe fn int8_quad_codes(p: &mut *const u8, mask: u64) -> __m512i {
    let c = _mm512_mask_expand_epi8(_mm512_set1_epi8(-128), mask, load512_nofold!(*p));
    *p = p.add(mask.count_ones() as usize);
    c
}

/// The unsigned codes of a pair of tiled int4 quads with masks `m0` and `m1` at `*p`, advancing `*p` past
/// them: one load, a mask and [`high_nibbles`] for both quads (byte j holds value j of each, low and high nibble). A
/// narrow tile (`SI4_NARROW`: every quad holds at most 32 values, the usual case from ~70 % sparsity on)
/// loads 32 bytes, the others 64 (from DRAM on AMD Zen 4, 7-14 % faster at 50-60 % sparsity than unpacking
/// each quad's own nibbles, despite ~4 % more bytes; always loading 64 was 1-4 % slower at 80 %).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi2,gfni,popcnt")]
pub(super) unsafe fn int4_pair_codes<const FMT: u8>(p: &mut *const u8, m0: u64, m1: u64) -> (__m512i, __m512i) {
    let (n0, n1) = (m0.count_ones() as usize, m1.count_ones() as usize);
    let (eight, low) = (_mm512_set1_epi8(8), _mm512_set1_epi8(0x0F));
    let v = if FMT == SI4_NARROW {
        _mm512_zextsi256_si512(_mm256_loadu_si256(*p as *const __m256i))
    } else {
        load512_nofold!(*p)
    };
    let (c0, c1) = (_mm512_and_si512(v, low), high_nibbles(v));
    *p = p.add(n0.max(n1));
    (_mm512_mask_expand_epi8(eight, m0, c0), _mm512_mask_expand_epi8(eight, m1, c1))
}

/// The high nibble of every byte of `v` in its low four bits: one GF(2) affine transform (a bit matrix that
/// moves bits 4-7 to 0-3 and clears the rest), where a shift and a mask take two vector operations.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,gfni")]
unsafe fn high_nibbles(v: __m512i) -> __m512i {
    // Result bit i is the parity of `v` masked by byte 7 - i of the matrix: bit i + 4 for i < 4, none above.
    _mm512_gf2p8affine_epi64_epi8::<0>(v, _mm512_set1_epi64(0x1020_4080_0000_0000))
}

/// `acc[a] += Σ c·x` over quad `quad` for every activation row, the quad's four activations broadcast.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn quad_dot<const NR: usize>(acc: &mut [__m512i; NR], c: __m512i, act: &[ActRow; NR], quad: usize) {
    for (a, x) in act.iter().enumerate() {
        let xa = _mm512_set1_epi32((x.xq.add(quad * QUAD) as *const i32).read_unaligned());
        acc[a] = _mm512_dpbusd_epi32(acc[a], c, xa);
    }
}

/// Tile `t`'s 16 row sums (f32 lanes, before per-row weight scales and per-row activation scales) for `NR`
/// activation rows. The columns run in scale segments: per-block activations take 64-column chunks (32 for
/// 32-column groups), whose exact i32 lanes are converted and multiplied by the chunk's activation scale
/// (times the 16 rows' group scales, `GROUPED`); per-row activations (`TOKEN`) take whole groups (or the
/// whole row) and subtract the segment's zero-point correction before the conversion.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vbmi2,avx512vnni,gfni,popcnt,fma")]
unsafe fn tile_acc<const NR: usize, const T: usize, const FMT: u8, const TOKEN: bool, const GROUPED: bool>(
    m: &PackedMatrix,
    ts: [usize; T],
    act: &[ActRow; NR],
) -> [[__m512; NR]; T] {
    let masks: [*const u64; T] = core::array::from_fn(|i| m.tile_masks(ts[i]).as_ptr());
    let mut p: [*const u8; T] = core::array::from_fn(|i| m.data.as_ptr().add(m.row_offsets[ts[i]]));
    let d16: [*const f32; T] = core::array::from_fn(|i| m.tile_scales.as_ptr().wrapping_add(ts[i] * m.groups() * TILE));
    let h16: [*const u16; T] =
        core::array::from_fn(|i| m.tile_scales16.as_ptr().wrapping_add(ts[i] * m.groups() * TILE));
    let shift = m.group.trailing_zeros();
    let seg = tile_segment(m, TOKEN);
    // Every tile's stream is prefetched a line per step of four quads; a dense int4 one in a decode step on
    // Intel every line (`PREFETCH`).
    let every_line = FMT == DI4 && NR == 1 && !super::avx2_int::amd_tuning();
    let mut f = [[_mm512_setzero_ps(); NR]; T];
    for s in 0..m.cols_pad / seg {
        // Four i32 accumulators per tile and activation row: `vpdpbusd` latency would bind one.
        let mut ia = [[[_mm512_setzero_si512(); NR]; 4]; T];
        let mut quad = s * seg / QUAD;
        while quad < (s + 1) * seg / QUAD {
            for i in 0..T {
                let (p, masks, ia) = (&mut p[i], masks[i], &mut ia[i]);
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH) as *const i8);
                if every_line {
                    // A dense int4 step reads 128 bytes: its second line.
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH + 64) as *const i8);
                }
                if FMT == SI8 {
                    for (j, acc) in ia.iter_mut().enumerate() {
                        quad_dot(acc, int8_quad_codes(p, *masks.add(quad + j)), act, quad + j);
                    }
                } else if FMT == DI8 {
                    // Dense: every quad's 64 codes as stored (flipped), no mask.
                    for (j, acc) in ia.iter_mut().enumerate() {
                        quad_dot(acc, load512_nofold!(p.add(64 * j)), act, quad + j);
                    }
                    *p = p.add(4 * 64);
                } else if FMT == DI4 {
                    // Dense: each pair of quads in 64 bytes, the first's nibbles low, the second's high.
                    let low = _mm512_set1_epi8(0x0F);
                    for (j, pair) in ia.chunks_exact_mut(2).enumerate() {
                        let v = load512_nofold!(p.add(64 * j));
                        let (c0, c1) = (_mm512_and_si512(v, low), high_nibbles(v));
                        quad_dot(&mut pair[0], c0, act, quad + 2 * j);
                        quad_dot(&mut pair[1], c1, act, quad + 2 * j + 1);
                    }
                    *p = p.add(2 * 64);
                } else {
                    for (j, pair) in ia.chunks_exact_mut(2).enumerate() {
                        let q = quad + 2 * j;
                        let (c0, c1) = int4_pair_codes::<FMT>(p, *masks.add(q), *masks.add(q + 1));
                        quad_dot(&mut pair[0], c0, act, q);
                        quad_dot(&mut pair[1], c1, act, q + 1);
                    }
                }
            }
            quad += 4;
        }
        let col = s * seg;
        for i in 0..T {
            let ia = &ia[i];
            for (a, x) in act.iter().enumerate() {
                let mut sum =
                    _mm512_add_epi32(_mm512_add_epi32(ia[0][a], ia[1][a]), _mm512_add_epi32(ia[2][a], ia[3][a]));
                sum = _mm512_sub_epi32(sum, _mm512_set1_epi32(*x.zc.add(s)));
                let v = _mm512_cvtepi32_ps(sum);
                let d = || {
                    let at = (col >> shift) * TILE;
                    if m.half {
                        _mm512_cvtph_ps(_mm256_loadu_si256(h16[i].add(at) as *const __m256i))
                    } else {
                        _mm512_loadu_ps(d16[i].add(at))
                    }
                };
                f[i][a] = match (TOKEN, GROUPED) {
                    (true, false) => _mm512_add_ps(f[i][a], v),
                    (true, true) => _mm512_fmadd_ps(v, d(), f[i][a]),
                    (false, false) => _mm512_fmadd_ps(v, broadcast(x.sx.add(col / CHUNK)), f[i][a]),
                    (false, true) => _mm512_fmadd_ps(v, _mm512_mul_ps(broadcast(x.sx.add(col / CHUNK)), d()), f[i][a]),
                };
            }
        }
    }
    f
}
