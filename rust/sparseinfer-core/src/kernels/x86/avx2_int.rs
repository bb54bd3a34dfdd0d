//! AVX2 kernels for symmetric integer weights with int8 activations: per 64-column block
//! (`Activations::Int8`, kernel names `<weight format>_i8 (avx2)`) or per row (`Activations::Int8Token`,
//! `<weight format>_i8_token (avx2)`, whose block scales are the row's scale repeated; `(avxvnni)` on AVX-VNNI).
//!
//! Per 64-column chunk the weight codes sit in two 32-byte vectors: int8 codes `q` as signed bytes, int4 ones
//! as their nibbles `n = q + 8` (unsigned; pruned lanes 8). A sparse chunk is expanded 32 columns at a time
//! ([`expand32`]: one `vpshufb` whose control is built from four per-mask-byte table rows, the second of each
//! 16-column half already offset by the first's count), once per weight row for up to four activation rows.
//! Sparse int4 rows are first unpacked to bytes ([`unpack_row_int4`]), and their chunks then expand as int8
//! ones do. A sparse matvec with few values per chunk ([`gathers`]) expands nothing: sparse int8 reads each
//! value's position in its chunk ([`crate::formats::Positions`]) and looks the activations up at those
//! positions, 32 values a step ([`gather_rows`]); sparse int4 reads each value's code beside its column in its
//! 16-column group ([`ColumnCodes`]) and looks its activation up within the group's 16, two groups a step
//! ([`gather4_rows`]). The products `Σ q·x` are exact:
//!
//! ```text
//! int8:  vpsignb     x' = x · sign(q)                     (0 where q = 0)
//!        vpmaddubsw  |q| (unsigned) · x' (signed), adjacent pairs added into i16: |sum| <= 2·128·127 < 2^15
//!        vpmaddwd    with ones: adjacent i16 pairs into i32
//! int4:  vpmaddubsw  n (unsigned) · x (signed), |sum| <= 2·15·127; vpmaddwd with ones
//!        vpaddd      + the activations' zero-point lane -8·Σx over the lane's columns (`zero_point_lanes`)
//! ```
//! or, where the CPU has AVX-VNNI (`rows_avxvnni`, ISA `avxvnni`), one `vpdpbusd` in place of `vpmaddubsw` and
//! `vpmaddwd` (adding the same four products per i32 lane; int4 lanes start from the zero-point lane). An int4
//! lane so holds `Σ (n - 8)·x`, the same integer the signed codes give. Each chunk's eight i32 lanes are
//! converted once and multiply-added with the chunk scale `s_x · d`. Over 32-column weight groups a chunk's
//! codes and activations are read in paired order ([`paired`]: each 128-bit lane one group's columns), so the
//! low four lanes hold one group's sums and the high four the other's, and one conversion and one multiply by
//! both group scales ([`pair_scales`]) serve both groups. So every product and every block sum is exact, as in the
//! AVX-512 VNNI kernels; only the f32 sum over chunks differs from the scalar reference in order, and the
//! budget is `SUM_ORDER · Σ|ŵ·x̂|` with nothing added for zero points.

use super::avx2::{dense_nibbles, hsum};
use super::vnni::PREFETCH;
use super::{scale, staged_row_scales, STAGED_GROUPS};
use crate::formats::{ColumnCodes, Elem, Format, PackedMatrix, Positions, CHUNK, CODE_GROUP};
use crate::kernels::simd::{
    by_scaling, chunk_scaling, sparse_int4_row_bytes, RowScales, DI4, DI8, GRP32, KERNEL_CODES, RANKS_AFTER, ROW, SI8,
};
use crate::kernels::QuantActs;
use core::arch::x86_64::*;
use core::sync::atomic::{AtomicU8, Ordering};

/// Whether these kernels serve `m` (symmetric int8 and int4, dense or sparse) on this CPU.
pub(crate) fn supports(m: &PackedMatrix) -> bool {
    m.format.elem().is_int() && !m.asym && super::avx2_supported()
}

/// Signed codes already expanded to one byte per column (in [`chunk_codes`]'s order for the chunk-scale mode):
/// a weight row's copy made once for many activation rows.
const EXP: u8 = KERNEL_CODES;
/// The same for int4 rows: their unsigned codes.
const EXP4: u8 = KERNEL_CODES + 2;
/// A sparse int4 row's stored nibbles unpacked to bytes `n ^ 8`, chunk padding included ([`unpack_row_int4`]):
/// its chunks then expand as sparse int8 ones do.
const U4: u8 = KERNEL_CODES + 1;

/// Whether a format's chunks come as unsigned int4 codes `n = q + 8` (pruned lanes 8), whose products need
/// the activations' zero-point lanes ([`zero_point_lanes`]).
const fn unsigned(fmt: u8) -> bool {
    matches!(fmt, DI4 | U4 | EXP4)
}

/// Dense weight rows a decode step reads in lockstep, from as many parts of its range: four rows in flight
/// hide the latency of each row's chain of dependent steps (int4 most), except dense int4 on AMD cores
/// ([`amd_tuning`]), whose four streams spill registers: there two.
const DECODE_STREAMS: usize = 4;

/// Weight rows a prefill step keeps expanded at a time and passes every group of activation rows over
/// ([`rows_with`]).
const PREFILL_ROWS: usize = 8;

/// Mean stored values per chunk up to which a sparse matvec gathers activations instead of expanding masks.
/// Sparse int8 ([`gather_rows`]): a gather step takes 32 values, so denser chunks often need two, and the
/// positions it reads (a byte per value) outweigh the mask bits they replace. Sparse int4 ([`gather4_rows`])
/// costs the same per chunk at any density, but its column codes take half a byte per value more than the
/// nibbles and a sixteenth per column less than the masks, so the bytes it reads grow with density faster.
const GATHER_MAX_MEAN: f64 = 24.0;

/// Whether a one-row call on `m` gathers activations: sparse int8 ([`gather_rows`]) at [`GATHER_MAX_MEAN`] or
/// below, with scales per row or per group of 64 columns or more (two 32-column groups in a chunk would need
/// their sums apart), or symmetric sparse int4 ([`gather4_rows`]) at [`GATHER_MAX_MEAN`] or below, reading a
/// byte per value with its column ([`ColumnCodes`]).
pub(crate) fn gathers(m: &PackedMatrix) -> bool {
    let sparse_enough = m.mean_chunk_count() <= GATHER_MAX_MEAN;
    match m.format {
        Format::SparseInt8 => chunk_scaling(m) != GRP32 && sparse_enough,
        Format::SparseInt4 => !m.asym && sparse_enough,
        _ => false,
    }
}

/// Builds what a gathering one-row call on `m` (row layout) reads besides its values, so the tasks that share
/// it find it built: the positions of sparse int8 ([`Positions`], in `isa`'s encoding), the column codes of
/// sparse int4 ([`ColumnCodes`]).
pub(crate) fn prepare_gather(m: &PackedMatrix, isa: crate::kernels::Isa) {
    if m.format == Format::SparseInt4 {
        m.column_codes();
    } else {
        m.positions(gather_blend(isa));
    }
}

/// Whether the gather on `isa` reads its positions in the blend encoding ([`Positions`], [`lookup64`]): on
/// `avx2` with [`amd_tuning`]; [`rows_avxvnni`] keeps Intel's lookups, which read them plain.
pub(crate) fn gather_blend(isa: crate::kernels::Isa) -> bool {
    isa == crate::kernels::Isa::Avx2 && amd_tuning()
}

/// Whether [`rows`] takes the choices that measure faster on AMD cores than on Intel ones: the sparse expansion
/// shifts a chunk's four mask bytes out of one load ([`mask_bytes`]) rather than loading each (AMD's integer
/// ALUs are apart from its vector pipes and the loop is bound by its loads; Intel's ALU ports are shared with
/// the vector work), dense int4 decode reads two rows in lockstep rather than [`DECODE_STREAMS`], and the
/// sparse int8 gather picks its lookups' blocks with blends ([`lookup64`]) on positions stored for them
/// ([`gather_blend`]); and the AVX-512 dense int4 tiles prefetch a line per step rather than every line
/// (`super::vnni::PREFETCH`). None changes a result: the bytes and each row's integer sums are the same.
/// [`rows_avxvnni`] (Intel only) keeps Intel's.
pub(crate) fn amd_tuning() -> bool {
    match TUNING.load(Ordering::Relaxed) {
        UNSET => {
            let id = __cpuid(0);
            let vendor: Vec<u8> = [id.ebx, id.edx, id.ecx].iter().flat_map(|r| r.to_le_bytes()).collect();
            // Hygon's cores are AMD's Zen.
            let amd = vendor == b"AuthenticAMD" || vendor == b"HygonGenuine";
            // A value forced meanwhile stays.
            match TUNING.compare_exchange(UNSET, amd as u8, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => amd,
                Err(v) => v == 1,
            }
        }
        v => v == 1,
    }
}

const UNSET: u8 = 2;
static TUNING: AtomicU8 = AtomicU8::new(UNSET);

/// Overrides [`amd_tuning`]'s choice (`None`: back to the vendor's), so tests and benchmarks run both on one
/// machine.
pub fn force_amd_tuning(amd: Option<bool>) {
    TUNING.store(amd.map_or(UNSET, u8::from), Ordering::Relaxed);
}

/// Computes rows `r0..r1` (row layout) for the `k` quantized activation rows in `q`: four activation rows
/// share each decoded weight row, then one at a time. With more than four activation rows (prefill), a weight
/// row that is not already one byte per column (sparse, or int4) is expanded to one byte per column once (as
/// [`chunk_codes`] gives them), and every
/// group of activation rows reads that copy instead of expanding it again; the rows go in blocks of
/// [`PREFILL_ROWS`], every group of activation rows over a whole block before the next. Every activation row
/// goes through the same operations (the same exact products, summed in the same order) in any blocking, so a
/// matmul row equals the matvec bit for bit, except where the matvec gathers ([`gathers`]): the same integer
/// sums per chunk, in other i32 lanes, so scaled and added in f32 in another order.
///
/// # Safety
/// The CPU must support the enabled features and [`supports`] must hold for `m` (row layout); `q` holds `k`
/// rows of `m.cols_pad` codes and their block scales; `y` is valid for writes at `a·rows + r` for every
/// `a < k` and `r0 <= r < r1`.
#[target_feature(enable = "avx2,fma,f16c,popcnt,bmi2")]
pub(crate) unsafe fn rows(m: &PackedMatrix, r0: usize, r1: usize, q: &QuantActs, k: usize, y: *mut f32) {
    if amd_tuning() {
        rows_with::<false, true>(m, r0, r1, q, k, y)
    } else {
        rows_with::<false, false>(m, r0, r1, q, k, y)
    }
}

/// [`rows`] with the products added by AVX-VNNI's `vpdpbusd` ([`dot32`]): the same integer sums, so the same
/// results bit for bit.
///
/// # Safety
/// As [`rows`], and the CPU must support AVX-VNNI.
#[target_feature(enable = "avx2,fma,f16c,popcnt,bmi2")]
pub(crate) unsafe fn rows_avxvnni(m: &PackedMatrix, r0: usize, r1: usize, q: &QuantActs, k: usize, y: *mut f32) {
    rows_with::<true, false>(m, r0, r1, q, k, y)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt,bmi2")]
unsafe fn rows_with<const VNNI: bool, const AMD: bool>(
    m: &PackedMatrix,
    r0: usize,
    r1: usize,
    q: &QuantActs,
    k: usize,
    y: *mut f32,
) {
    debug_assert!(!m.tiled && q.k == k && q.xq.len() == k * m.cols_pad && q.sx.len() == k * m.chunks());
    let scaling = chunk_scaling(m);
    if k == 1 && gathers(m) {
        // Two rows in lockstep, from the two halves of the range, then the row left over.
        let half = (r1 - r0) / 2;
        if m.format == Format::SparseInt4 {
            let (codes, xq, sx) = (m.column_codes(), q.xq.as_ptr(), q.sx.as_ptr());
            for r in r0..r0 + half {
                by_scaling!(scaling, gather4_rows::<2>(m, codes, [r, r + half], xq, sx, y));
            }
            for r in r0 + 2 * half..r1 {
                by_scaling!(scaling, gather4_rows::<1>(m, codes, [r], xq, sx, y));
            }
            return;
        }
        let (pos, tabs) = (m.positions(AMD), gather_tables::<AMD>(&q.xq));
        for r in r0..r0 + half {
            by_scaling!(scaling, gather_rows::<VNNI, AMD, 2>(m, pos, [r, r + half], &tabs, q.sx.as_ptr(), y));
        }
        for r in r0 + 2 * half..r1 {
            by_scaling!(scaling, gather_rows::<VNNI, AMD, 1>(m, pos, [r], &tabs, q.sx.as_ptr(), y));
        }
        return;
    }
    let once = k > 4 && m.format != Format::DenseInt8;
    // Over 32-column groups every chunk's weight codes and activation codes come in paired order
    // ([`paired`]): its products then sum into i32 lanes of one group each.
    let grp32 = scaling == GRP32;
    let unpack = !once && m.format == Format::SparseInt4;
    // Room for every column, and for `expand32`'s 16-byte reads past a row's last value; unpacked int4 rows
    // alternate between two such buffers (below).
    let room = m.cols_pad + 64;
    let mut copy = vec![
        0u8;
        if unpack {
            2 * room
        } else if once {
            // A sparse int4 row is unpacked to the last `room` before its expansion.
            (PREFILL_ROWS + 1) * room
        } else {
            0
        }
    ];
    // The row the `EXP`, `EXP4` and `U4` instantiations read (only they do).
    let mut codes = copy.as_ptr();
    let int4 = m.format.elem() == Elem::I4;
    let xp = if grp32 { paired_order(&q.xq) } else { Vec::new() };
    let xq: &[i8] = if grp32 { &xp } else { &q.xq };
    let zc = if int4 { zero_point_lanes(xq) } else { Vec::new() };
    // The first activation row's codes, scales and zero-point lanes; row `a`'s follow at `a` times a row's.
    let acts = ActRow { xq: xq.as_ptr(), sx: q.sx.as_ptr(), zc: zc.as_ptr() };
    let fmt = if once {
        if int4 {
            EXP4
        } else {
            EXP
        }
    } else if unpack {
        U4
    } else {
        match m.format {
            Format::DenseInt8 => DI8,
            Format::SparseInt8 => SI8,
            Format::DenseInt4 => DI4,
            // Sparse int4 rows are unpacked (`U4`) first, and in prefill then expanded (`EXP4`).
            Format::SparseInt4 | Format::DenseF32 | Format::DenseBf16 | Format::SparseF32 | Format::SparseBf16 => {
                unreachable!("avx2_int::supports admits integer formats only")
            }
        }
    };
    macro_rules! by_format {
        ($nr:tt, $nrows:tt, $r:expr, $a:expr) => {{
            let rows: [usize; $nrows] = $r;
            match fmt {
                DI8 => {
                    by_scaling!(scaling, row::<VNNI, AMD, $nr, $nrows, DI8>(m, rows, &acts, $a, y, codes))
                }
                SI8 => {
                    by_scaling!(scaling, row::<VNNI, AMD, $nr, $nrows, SI8>(m, rows, &acts, $a, y, codes))
                }
                DI4 => {
                    by_scaling!(scaling, row::<VNNI, AMD, $nr, $nrows, DI4>(m, rows, &acts, $a, y, codes))
                }
                U4 => {
                    by_scaling!(scaling, row::<VNNI, AMD, $nr, $nrows, U4>(m, rows, &acts, $a, y, codes))
                }
                EXP4 => {
                    by_scaling!(scaling, row::<VNNI, AMD, $nr, $nrows, EXP4>(m, rows, &acts, $a, y, codes))
                }
                _ => {
                    by_scaling!(scaling, row::<VNNI, AMD, $nr, $nrows, EXP>(m, rows, &acts, $a, y, codes))
                }
            }
        }};
    }
    if k == 1 && !m.format.is_sparse() {
        // Decode of dense rows: the range's [`DECODE_STREAMS`] parts in lockstep, the rows left over alone. The
        // sparse kernels here are bound by their expansion, not by memory: pairs or fours were no faster.
        macro_rules! streams {
            ($n:tt) => {{
                let part = (r1 - r0) / $n;
                for r in r0..r0 + part {
                    by_format!(1, $n, core::array::from_fn(|i| r + i * part), 0);
                }
                for r in r0 + $n * part..r1 {
                    by_format!(1, 1, [r], 0);
                }
            }};
        }
        if AMD && m.format == Format::DenseInt4 {
            streams!(2);
        } else {
            streams!(DECODE_STREAMS);
        }
        return;
    }
    if k > 4 {
        // Prefill: weight rows in blocks of PREFILL_ROWS (expanded once each where they are not bytes already),
        // each group of four activation rows meeting the whole block before the next group: the group's codes
        // are read from L1 (L2 for the widest rows) across the block, where a pass of every activation row per
        // weight row would stream all k of them from L2 or L3 again for each weight row.
        let mut b0 = r0;
        while b0 < r1 {
            let b1 = (b0 + PREFILL_ROWS).min(r1);
            if once {
                let base = copy.as_mut_ptr();
                for r in b0..b1 {
                    let out = base.add((r - b0) * room);
                    match m.format {
                        Format::SparseInt8 => {
                            by_scaling!(scaling, expand_row::<AMD, SI8>(m, r, m.data.as_ptr().add(m.row_start(r)), out))
                        }
                        Format::DenseInt4 => {
                            by_scaling!(scaling, expand_row::<AMD, DI4>(m, r, m.data.as_ptr().add(m.row_start(r)), out))
                        }
                        Format::SparseInt4 => {
                            // Unpacked first, as in decode: the expansion then reads its chunks as bytes.
                            let bytes = base.add(PREFILL_ROWS * room);
                            unpack_row_int4(m, r, bytes);
                            by_scaling!(scaling, expand_row::<AMD, U4>(m, r, bytes, out))
                        }
                        Format::DenseInt8
                        | Format::DenseF32
                        | Format::DenseBf16
                        | Format::SparseF32
                        | Format::SparseBf16 => unreachable!("dense int8 rows are read as they are"),
                    }
                }
            }
            let mut a = 0;
            while a < k {
                let four = k - a >= 4;
                for r in b0..b1 {
                    codes = copy.as_ptr().wrapping_add((r - b0) * room);
                    if four {
                        by_format!(4, 1, [r], a);
                    } else {
                        by_format!(1, 1, [r], a);
                    }
                }
                a += if four { 4 } else { 1 };
            }
            b0 = b1;
        }
        return;
    }
    if unpack && r0 < r1 {
        unpack_row_int4(m, r0, copy.as_mut_ptr());
    }
    for r in r0..r1 {
        if unpack {
            // Row r + 1 is unpacked before row r is read, so row r's stores have left the store buffer by then:
            // the expansion's unaligned loads, straddling them, would otherwise wait for each one.
            let (this, next) =
                (copy.as_mut_ptr().add((r - r0) % 2 * room), copy.as_mut_ptr().add((r - r0 + 1) % 2 * room));
            if r + 1 < r1 {
                unpack_row_int4(m, r + 1, next);
            }
            codes = this;
        }
        if k == 4 {
            by_format!(4, 1, [r], 0);
        } else {
            for a in 0..k {
                by_format!(1, 1, [r], a);
            }
        }
    }
}

/// One activation row's codes as [`lookup64`] reads them: per chunk its four 16-column blocks `a0..a3`, as they
/// are (`AMD`) or as `a0, a0 ^ a1, a1 ^ a2, a2 ^ a3`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt,bmi2")]
unsafe fn gather_tables<const AMD: bool>(xq: &[i8]) -> Vec<u8> {
    let mut out = vec![0u8; xq.len()];
    for (x, o) in xq.chunks_exact(CHUNK).zip(out.chunks_exact_mut(CHUNK)) {
        let a: [__m128i; 4] = core::array::from_fn(|j| _mm_loadu_si128(x.as_ptr().add(16 * j) as *const __m128i));
        let t = if AMD {
            a
        } else {
            [a[0], _mm_xor_si128(a[0], a[1]), _mm_xor_si128(a[1], a[2]), _mm_xor_si128(a[2], a[3])]
        };
        for (j, t) in t.iter().enumerate() {
            _mm_storeu_si128(o.as_mut_ptr().add(16 * j) as *mut __m128i, *t);
        }
    }
    out
}

/// Rows `rows` (in lockstep) of a sparse int8 matrix against one activation row, by gathering: each chunk's
/// stored values are multiplied as they are stored, 32 at a time, with the activations at their positions
/// ([`Positions`]), looked up from the chunk's tables `tabs` ([`gather_tables`], [`lookup64`]). A chunk of
/// 70 % sparsity holds ~19 values: one 32-byte step with no mask decoding, where the expansion builds and
/// multiplies two vectors of 32 columns. The sums of a chunk are the same exact integers as the expansion's,
/// in other i32 lanes, so a result differs from [`row`]'s by the rounding of its f32 scaling and additions.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt,bmi2")]
unsafe fn gather_rows<const VNNI: bool, const AMD: bool, const R: usize, const MODE: u8>(
    m: &PackedMatrix,
    pos: &Positions,
    rows: [usize; R],
    tabs: &[u8],
    sx: *const f32,
    y: *mut f32,
) {
    // Two 32-column groups in a chunk would need their sums apart ([`gathers`] leaves them out).
    debug_assert!(MODE != GRP32);
    let chunks = m.chunks();
    let mut o: [usize; R] = rows.map(|r| m.row_start(r));
    let counts: [*const u8; R] = rows.map(|r| pos.counts.as_ptr().add(r * chunks));
    let (vals, at) = (m.data.as_ptr(), pos.at.as_ptr());
    let mut staged = [[core::mem::MaybeUninit::uninit(); STAGED_GROUPS]; R];
    let s: [RowScales; R] = core::array::from_fn(|i| staged_row_scales(m, rows[i], &mut staged[i]));
    // Chunk `ch` of every row into `acc` (its rows' f32 lanes); `fetch`: prefetch both streams of each row
    // (as the other sparse kernels do, see `PREFETCH`), every other chunk, as ~19-byte chunks of 70 %
    // sparsity need no more.
    let step = |acc: &mut [__m256; R], o: &mut [usize; R], ch: usize, fetch: bool| {
        let t = tabs.as_ptr().add(ch * CHUNK);
        let d: [__m256i; 4] =
            core::array::from_fn(|j| _mm256_broadcastsi128_si256(_mm_loadu_si128(t.add(16 * j) as *const __m128i)));
        let x = *sx.add(ch);
        for i in 0..R {
            if fetch {
                _mm_prefetch::<_MM_HINT_T0>(vals.wrapping_add(o[i] + PREFETCH) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(o[i] + PREFETCH) as *const i8);
            }
            let c = *counts[i].add(ch) as usize;
            let sum = gather_dot::<VNNI, AMD>(vals.add(o[i]), at.add(o[i]), c, &d);
            o[i] += c;
            let scale = if MODE == ROW { x } else { x * scale(&s[i], (ch * CHUNK) >> s[i].shift) };
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(scale), acc[i]);
        }
    };
    // Two f32 accumulators per row, alternating by chunk, so FMA latency does not bind.
    let (mut acc0, mut acc1) = ([_mm256_setzero_ps(); R], [_mm256_setzero_ps(); R]);
    let mut ch = 0;
    while ch + 2 <= chunks {
        step(&mut acc0, &mut o, ch, true);
        step(&mut acc1, &mut o, ch + 1, false);
        ch += 2;
    }
    if ch < chunks {
        step(&mut acc0, &mut o, ch, true);
    }
    for (i, &r) in rows.iter().enumerate() {
        let scale = if MODE == ROW { *s[i].d } else { 1.0 };
        *y.add(r) = hsum(_mm256_add_ps(acc0[i], acc1[i])) * scale;
    }
}

/// `Σ q·x` over one chunk's `c` (<= 64) stored values at `v` (positions at `at`) as eight exact i32 lanes, 32
/// values a step: the bytes past `c` (the next chunk's or row's values, or the padding) are zeroed ([`TAIL`]).
#[inline(always)]
unsafe fn gather_dot<const VNNI: bool, const AMD: bool>(
    v: *const u8,
    at: *const u8,
    c: usize,
    d: &[__m256i; 4],
) -> __m256i {
    let sum = gather_step::<VNNI, AMD>(_mm256_setzero_si256(), v, at, c.min(32), d);
    if c > 32 {
        gather_step::<VNNI, AMD>(sum, v.add(32), at.add(32), c - 32, d)
    } else {
        sum
    }
}

/// `sum +` the products of the first `n` (<= 32) values at `v` with the activations at their positions `at`.
#[inline(always)]
unsafe fn gather_step<const VNNI: bool, const AMD: bool>(
    sum: __m256i,
    v: *const u8,
    at: *const u8,
    n: usize,
    d: &[__m256i; 4],
) -> __m256i {
    debug_assert!(n <= 32);
    // SAFETY: n <= 32 (a chunk holds at most 64 values, 32 a step), so row n exists.
    let keep = _mm256_load_si256(TAIL.0.get_unchecked(n).as_ptr() as *const __m256i);
    // The values past `n` are zeroed, and `vpsignb` zeroes their activations.
    let w = _mm256_and_si256(_mm256_loadu_si256(v as *const __m256i), keep);
    let x = lookup64::<AMD>(d, _mm256_loadu_si256(at as *const __m256i));
    let (w_abs, x) = (_mm256_abs_epi8(w), _mm256_sign_epi8(x, w));
    if VNNI {
        vpdpbusd(sum, w_abs, x)
    } else {
        _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_maddubs_epi16(w_abs, x), _mm256_set1_epi16(1)))
    }
}

/// The activation codes at 32 positions `p` of one chunk, from its tables `d` ([`gather_tables`]). `vpshufb`
/// looks up within 16 bytes by a control byte's low four bits, and gives 0 where its top bit is set. `AMD`:
/// the positions in the blend encoding ([`Positions`]: bit 4 of the column at bit 6, bit 5 at bit 7), so the
/// first two blocks are looked up at `p` (0 where bit 7 says the column is in the last two) and the last two
/// at `p ^ 0x80`, a `vpblendvb` on bit 6 (shifted to 7) chooses within each pair, and an OR joins the pairs
/// (`vpblendvb` is one operation on AMD's cores, two on Intel's). Else `p` is the column as it is, and table
/// `j` is looked up at `p - 16j`, which is negative (0) for positions before block `j`; each block's table is
/// the XOR of its codes with the block before's, so the lookups XOR-ed together leave the codes of the
/// position's own block. Lanes past a chunk's count look up whatever their bytes say; their values are 0.
#[inline(always)]
unsafe fn lookup64<const AMD: bool>(d: &[__m256i; 4], p: __m256i) -> __m256i {
    if AMD {
        let (sel, q) = (_mm256_slli_epi16::<1>(p), _mm256_xor_si256(p, _mm256_set1_epi8(0x80u8 as i8)));
        let lo = _mm256_blendv_epi8(_mm256_shuffle_epi8(d[0], p), _mm256_shuffle_epi8(d[1], p), sel);
        let hi = _mm256_blendv_epi8(_mm256_shuffle_epi8(d[2], q), _mm256_shuffle_epi8(d[3], q), sel);
        return _mm256_or_si256(lo, hi);
    }
    let (mut x, mut p) = (_mm256_shuffle_epi8(d[0], p), p);
    for d in &d[1..] {
        p = _mm256_sub_epi8(p, _mm256_set1_epi8(16));
        x = _mm256_xor_si256(x, _mm256_shuffle_epi8(*d, p));
    }
    x
}

/// Rows `rows` (in lockstep) of a symmetric sparse int4 matrix against one activation row `xq` (block scales
/// `sx`), from its column codes ([`ColumnCodes`]): per chunk two steps of two 16-column groups, one per 128-bit
/// lane ([`gather4_step`]). The sums per 32 columns are the same exact integers as the expansion's, so a result
/// differs from [`row`]'s by the rounding of its f32 scaling and additions.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt,bmi2")]
unsafe fn gather4_rows<const R: usize, const MODE: u8>(
    m: &PackedMatrix,
    codes: &ColumnCodes,
    rows: [usize; R],
    xq: *const i8,
    sx: *const f32,
    y: *mut f32,
) {
    const GROUPS: usize = CHUNK / CODE_GROUP;
    let chunks = m.chunks();
    let mut o: [usize; R] = rows.map(|r| codes.starts[r]);
    let counts: [*const u8; R] = rows.map(|r| codes.counts.as_ptr().add(r * chunks * GROUPS));
    let at = codes.at.as_ptr();
    let mut staged = [[core::mem::MaybeUninit::uninit(); STAGED_GROUPS]; R];
    let s: [RowScales; R] = core::array::from_fn(|i| staged_row_scales(m, rows[i], &mut staged[i]));
    // Two f32 accumulators per row, alternating by chunk, so FMA latency does not bind.
    let (mut acc0, mut acc1) = ([_mm256_setzero_ps(); R], [_mm256_setzero_ps(); R]);
    let mut ch = 0;
    while ch + 2 <= chunks {
        gather4_chunk::<R, MODE>(&mut acc0, &mut o, &counts, at, &s, xq, sx, ch, true);
        gather4_chunk::<R, MODE>(&mut acc1, &mut o, &counts, at, &s, xq, sx, ch + 1, false);
        ch += 2;
    }
    if ch < chunks {
        gather4_chunk::<R, MODE>(&mut acc0, &mut o, &counts, at, &s, xq, sx, ch, true);
    }
    for (i, &r) in rows.iter().enumerate() {
        let scale = if MODE == ROW { *s[i].d } else { 1.0 };
        *y.add(r) = hsum(_mm256_add_ps(acc0[i], acc1[i])) * scale;
    }
}

/// Chunk `ch` of [`gather4_rows`]'s rows into their f32 lanes `acc`, their codes read from `o` on (moved past
/// the chunk); `fetch`: prefetch each row's codes (see `PREFETCH`), every other chunk, as chunks of at most
/// [`GATHER_MAX_MEAN`] bytes on average need no more. A function rather than a closure, so that it is always inlined: called, it would
/// keep `acc` and `o` in memory.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn gather4_chunk<const R: usize, const MODE: u8>(
    acc: &mut [__m256; R],
    o: &mut [usize; R],
    counts: &[*const u8; R],
    at: *const u8,
    s: &[RowScales; R],
    xq: *const i8,
    sx: *const f32,
    ch: usize,
    fetch: bool,
) {
    const GROUPS: usize = CHUNK / CODE_GROUP;
    let xc = xq.add(ch * CHUNK);
    let (x0, x1) = (_mm256_loadu_si256(xc as *const __m256i), _mm256_loadu_si256(xc.add(32) as *const __m256i));
    let x = *sx.add(ch);
    for i in 0..R {
        if fetch {
            _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(o[i] + PREFETCH) as *const i8);
        }
        let c = counts[i].add(ch * GROUPS);
        let (c0, c1, c2, c3) = (*c as usize, *c.add(1) as usize, *c.add(2) as usize, *c.add(3) as usize);
        let lo = gather4_step(at.add(o[i]), c0, c1, x0);
        let hi = gather4_step(at.add(o[i] + c0 + c1), c2, c3, x1);
        o[i] += c0 + c1 + c2 + c3;
        if MODE == GRP32 {
            // Each half is one scale group: their lanes interleaved and added in pairs, the first group's sums
            // fall in the even lanes and the second's in the odd, one conversion and one scaling for both.
            let both = _mm256_add_epi32(_mm256_unpacklo_epi32(lo, hi), _mm256_unpackhi_epi32(lo, hi));
            let d = _mm256_mul_ps(alternate_scales(&s[i], (ch * CHUNK) >> s[i].shift), _mm256_set1_ps(x));
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(both), d, acc[i]);
        } else {
            let scale = if MODE == ROW { x } else { x * scale(&s[i], (ch * CHUNK) >> s[i].shift) };
            let sum = _mm256_add_epi32(lo, hi);
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(scale), acc[i]);
        }
    }
}

/// `Σ q·x` over two 16-column groups as eight exact i32 lanes (four per group): the `c0` column codes at `v`
/// in the low 128-bit lane against the activations in `x`'s low lane, the `c1` after them in the high lane
/// against its high lane. `vpshufb` looks each value's activation up by its column (the high nibble); the
/// lanes past a group's count (the next group's codes, or padding) are zeroed ([`KEEP2`]), and with them
/// their products. `Σ (n - 8)·x` is `Σ n·x - Σ 8·x` of two unsigned-by-signed products (each pair's i16 sum
/// at most 2·15·127 in size, so neither saturates). AVX-VNNI takes the same steps: two `vpdpbusd` and a
/// subtraction in their place measured slower.
#[inline(always)]
unsafe fn gather4_step(v: *const u8, c0: usize, c1: usize, x: __m256i) -> __m256i {
    debug_assert!(c0 <= CODE_GROUP && c1 <= CODE_GROUP);
    let low = _mm256_set1_epi8(0x0F);
    let w = _mm256_loadu2_m128i(v.add(c0) as *const __m128i, v as *const __m128i);
    // SAFETY: c0, c1 <= 16 (a group's count), so the row exists.
    let keep = _mm256_load_si256(KEEP2.0.get_unchecked(c0 * (CODE_GROUP + 1) + c1).as_ptr() as *const __m256i);
    let (col, n) = (_mm256_and_si256(_mm256_srli_epi16::<4>(w), low), _mm256_and_si256(w, low));
    let x = _mm256_and_si256(_mm256_shuffle_epi8(x, col), keep);
    let p = _mm256_sub_epi16(_mm256_maddubs_epi16(n, x), _mm256_maddubs_epi16(_mm256_set1_epi8(8), x));
    _mm256_madd_epi16(p, _mm256_set1_epi16(1))
}

/// Row `17·a + b` of [`KEEP2`]: 0xFF in the first `a` bytes of the low 128-bit lane and the first `b` of the
/// high one, 0 elsewhere.
#[repr(C, align(64))]
struct Keep2([[u8; 32]; (CODE_GROUP + 1) * (CODE_GROUP + 1)]);

static KEEP2: Keep2 = Keep2({
    let mut t = [[0u8; 32]; (CODE_GROUP + 1) * (CODE_GROUP + 1)];
    let mut a = 0;
    while a <= CODE_GROUP {
        let mut b = 0;
        while b <= CODE_GROUP {
            let mut j = 0;
            while j < CODE_GROUP {
                t[a * (CODE_GROUP + 1) + b][j] = if j < a { 0xFF } else { 0 };
                t[a * (CODE_GROUP + 1) + b][CODE_GROUP + j] = if j < b { 0xFF } else { 0 };
                j += 1;
            }
            b += 1;
        }
        a += 1;
    }
    t
});

/// Row `n` of [`TAIL`]: 0xFF in its first `n` bytes and 0 after, AND-ed into a gather step's values.
#[repr(C, align(64))]
struct Tail([[u8; 32]; 33]);

static TAIL: Tail = Tail({
    let mut t = [[0u8; 32]; 33];
    let mut n = 0;
    while n < 33 {
        let mut j = 0;
        while j < n {
            t[n][j] = 0xFF;
            j += 1;
        }
        n += 1;
    }
    t
});

/// One activation row's codes, block scales and (int4 weights) zero-point lanes.
struct ActRow {
    xq: *const i8,
    sx: *const f32,
    zc: *const __m256i,
}

/// Per activation row and chunk of the codes `xq`, the int4 kernels' zero-point lanes `-8 · Σ x` over the
/// columns whose products each i32 lane of [`chunk_dot`] adds (four of each 32-byte half). Added to the lanes
/// of `Σ n·x` they give `Σ (n - 8)·x = Σ q·x` lane for lane, the same integers as signed codes would, so the
/// unsigned form changes no bit of a result. Once per task and activation row, for all of the task's weight
/// rows.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt,bmi2")]
unsafe fn zero_point_lanes(xq: &[i8]) -> Vec<__m256i> {
    let (eight, ones) = (_mm256_set1_epi8(8), _mm256_set1_epi16(1));
    let lanes = |x: *const i8| {
        let x = _mm256_loadu_si256(x as *const __m256i);
        // |8·(x_a + x_b)| <= 2032: no i16 saturation.
        _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_madd_epi16(_mm256_maddubs_epi16(eight, x), ones))
    };
    xq.chunks_exact(CHUNK).map(|x| _mm256_add_epi32(lanes(x.as_ptr()), lanes(x.as_ptr().add(32)))).collect()
}

/// A chunk's two 32-column halves `[lo, hi]` in paired order: columns 0-15 and 32-47, then 16-31 and 48-63,
/// so that the low 128-bit lane of both vectors holds the first 32-column group and the high lane the second.
/// The products of two such chunks (weights and activations), added, so give i32 lanes of one group each
/// ([`chunk_dot`]).
#[inline(always)]
unsafe fn paired(lo: __m256i, hi: __m256i) -> [__m256i; 2] {
    [_mm256_permute2x128_si256::<0x20>(lo, hi), _mm256_permute2x128_si256::<0x31>(lo, hi)]
}

/// The activation codes `xq` with every chunk in [`paired`] order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt,bmi2")]
unsafe fn paired_order(xq: &[i8]) -> Vec<i8> {
    let mut out = vec![0i8; xq.len()];
    for (x, o) in xq.chunks_exact(CHUNK).zip(out.chunks_exact_mut(CHUNK)) {
        let p = x.as_ptr() as *const __m256i;
        let [a, b] = paired(_mm256_loadu_si256(p), _mm256_loadu_si256(p.add(1)));
        _mm256_storeu_si256(o.as_mut_ptr() as *mut __m256i, a);
        _mm256_storeu_si256(o.as_mut_ptr().add(32) as *mut __m256i, b);
    }
    out
}

/// Weight row `r`'s codes ([`chunk_codes`] of `FMT`, in its order for `MODE`), read from `src` (the row's
/// stored bytes, or for `U4` its unpacked ones), one byte per column, written to `out` (`m.cols_pad` bytes).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt,bmi2")]
unsafe fn expand_row<const AMD: bool, const FMT: u8, const MODE: u8>(
    m: &PackedMatrix,
    r: usize,
    src: *const u8,
    out: *mut u8,
) {
    let mut p = src;
    let masks = m.masks.as_ptr().wrapping_add(r * m.chunks());
    for ch in 0..m.chunks() {
        let [lo, hi] = chunk_codes::<AMD, FMT, MODE>(&mut p, masks, ch);
        _mm256_storeu_si256(out.add(ch * CHUNK) as *mut __m256i, lo);
        _mm256_storeu_si256(out.add(ch * CHUNK + 32) as *mut __m256i, hi);
    }
}

/// Sparse int4 row `r`'s stored nibbles `n` as bytes `n ^ 8` in order, written to `out`, two per stored byte
/// (a chunk with an odd count keeps its pad nibble, so every chunk starts at an even index). After the
/// expansion (pruned lanes 0) one `^ 8` gives `n` in the stored lanes and 8, the zero code, in the pruned ones
/// ([`chunk_codes`]). One sequential pass per row, read back from L1 by the sparse int8 expansion
/// ([`expand64`]), so no chunk's nibbles need aligning in registers where its halves start at odd nibbles.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt,bmi2")]
unsafe fn unpack_row_int4(m: &PackedMatrix, r: usize, out: *mut u8) {
    let p = m.data.as_ptr().add(m.row_start(r));
    let bytes = sparse_int4_row_bytes(m, r);
    let (flip, low) = (_mm256_set1_epi8(0x88u8 as i8), _mm256_set1_epi8(0x0F));
    // 32 bytes at a time: the last step reads up to 31 bytes past the row, within the next row or `VALUE_PAD`,
    // and writes up to 62 bytes past its codes, within the buffer's room.
    let mut i = 0;
    while i < bytes {
        if i % 64 == 0 {
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(i + PREFETCH) as *const i8);
        }
        let v = _mm256_xor_si256(_mm256_loadu_si256(p.add(i) as *const __m256i), flip);
        let (lo, hi) = (_mm256_and_si256(v, low), _mm256_and_si256(_mm256_srli_epi16::<4>(v), low));
        // Per 128-bit lane: the low then the high nibble of each byte, bytes 0-7 then 8-15 of the lane.
        let (a, b) = (_mm256_unpacklo_epi8(lo, hi), _mm256_unpackhi_epi8(lo, hi));
        _mm256_storeu_si256(out.add(2 * i) as *mut __m256i, _mm256_permute2x128_si256::<0x20>(a, b));
        _mm256_storeu_si256(out.add(2 * i + 32) as *mut __m256i, _mm256_permute2x128_si256::<0x31>(a, b));
        i += 32;
    }
}

/// Weight rows `rows` (in lockstep, [`DECODE_STREAMS`]) against activation rows `a0..a0 + NR`: writes
/// `y[a, r]`. `acts`: activation row 0's codes (in [`paired`] order over 32-column groups), scales and
/// zero-point lanes. `codes`: the row expanded by [`expand_row`] (`FMT` `EXP` or `EXP4`) or unpacked by
/// [`unpack_row_int4`] (`U4`); then `R` is 1. Else unused.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt,bmi2")]
unsafe fn row<const VNNI: bool, const AMD: bool, const NR: usize, const R: usize, const FMT: u8, const MODE: u8>(
    m: &PackedMatrix,
    rows: [usize; R],
    acts: &ActRow,
    a0: usize,
    y: *mut f32,
    codes: *const u8,
) {
    let (cp, chunks) = (m.cols_pad, m.chunks());
    let act: [ActRow; NR] = core::array::from_fn(|a| ActRow {
        xq: acts.xq.add((a0 + a) * cp),
        sx: acts.sx.add((a0 + a) * chunks),
        zc: acts.zc.wrapping_add((a0 + a) * chunks),
    });
    let mut p: [*const u8; R] = core::array::from_fn(|i| {
        if matches!(FMT, EXP | EXP4 | U4) {
            codes
        } else {
            m.data.as_ptr().add(m.row_start(rows[i]))
        }
    });
    let masks: [*const u64; R] = core::array::from_fn(|i| m.masks.as_ptr().wrapping_add(rows[i] * chunks));
    let mut staged = [[core::mem::MaybeUninit::uninit(); STAGED_GROUPS]; R];
    let s: [RowScales; R] = core::array::from_fn(|i| staged_row_scales(m, rows[i], &mut staged[i]));
    // Two f32 accumulators per activation row, alternating by chunk, so FMA latency does not bind.
    let (mut acc0, mut acc1) = ([[_mm256_setzero_ps(); NR]; R], [[_mm256_setzero_ps(); NR]; R]);
    let mut ch = 0;
    while ch + 2 <= chunks {
        for i in 0..R {
            let w = chunk_codes::<AMD, FMT, MODE>(&mut p[i], masks[i], ch);
            chunk_dot::<VNNI, NR, MODE, FMT>(&mut acc0[i], w, &act, &s[i], ch);
        }
        for i in 0..R {
            let w = chunk_codes::<AMD, FMT, MODE>(&mut p[i], masks[i], ch + 1);
            chunk_dot::<VNNI, NR, MODE, FMT>(&mut acc1[i], w, &act, &s[i], ch + 1);
        }
        ch += 2;
    }
    if ch < chunks {
        for i in 0..R {
            let w = chunk_codes::<AMD, FMT, MODE>(&mut p[i], masks[i], ch);
            chunk_dot::<VNNI, NR, MODE, FMT>(&mut acc0[i], w, &act, &s[i], ch);
        }
    }
    for (i, &r) in rows.iter().enumerate() {
        let scale = if MODE == ROW { *s[i].d } else { 1.0 };
        for a in 0..NR {
            *y.add((a0 + a) * m.rows + r) = hsum(_mm256_add_ps(acc0[i][a], acc1[i][a])) * scale;
        }
    }
}

/// Chunk `ch`'s weight codes, columns 0-31 and 32-63, or (`MODE` `GRP32`) the same in [`paired`] order: signed
/// for int8 formats, unsigned `n = q + 8` for int4 ones ([`unsigned`]; pruned lanes 8). Dense chunks are read
/// at their offset from the row start `*p`; sparse ones at `*p`, which then advances past the chunk's values
/// (chunks come in order). Expanded rows (`EXP`, `EXP4`) are read as [`expand_row`] stored them.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt,bmi2")]
unsafe fn chunk_codes<const AMD: bool, const FMT: u8, const MODE: u8>(
    p: &mut *const u8,
    masks: *const u64,
    ch: usize,
) -> [__m256i; 2] {
    let pair = MODE == GRP32;
    match FMT {
        EXP | EXP4 => {
            let w = p.add(ch * CHUNK);
            [_mm256_loadu_si256(w as *const __m256i), _mm256_loadu_si256(w.add(32) as *const __m256i)]
        }
        DI8 => {
            let w = p.add(ch * CHUNK);
            let halves = |a: usize, b: usize| {
                _mm256_inserti128_si256::<1>(
                    _mm256_castsi128_si256(_mm_loadu_si128(w.add(a) as *const __m128i)),
                    _mm_loadu_si128(w.add(b) as *const __m128i),
                )
            };
            if pair {
                [halves(0, 32), halves(16, 48)]
            } else {
                [_mm256_loadu_si256(w as *const __m256i), _mm256_loadu_si256(w.add(32) as *const __m256i)]
            }
        }
        DI4 if pair => paired_nibbles(p.add(ch * CHUNK / 2)),
        DI4 => dense_nibbles(p.add(ch * CHUNK / 2)),
        U4 => {
            // Expanded as `n ^ 8` (pruned lanes 0), then flipped back: `n`, and 8 in the pruned lanes.
            let eight = _mm256_set1_epi8(8);
            let [lo, hi] = expand64::<AMD, MODE>(*p, masks.add(ch));
            *p = p.add(((*masks.add(ch)).count_ones() as usize + 1) & !1);
            [_mm256_xor_si256(lo, eight), _mm256_xor_si256(hi, eight)]
        }
        SI8 => {
            // The sparse streams prefetch ahead as the VNNI kernels do (see `PREFETCH`).
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH) as *const i8);
            let w = expand64::<AMD, MODE>(*p, masks.add(ch));
            *p = p.add((*masks.add(ch)).count_ones() as usize);
            w
        }
        _ => unreachable!("sparse int4 rows are unpacked (`U4`) first"),
    }
}

/// A dense int4 chunk's codes (as [`dense_nibbles`]) in [`paired`] order, without a lane crossing: each 16-byte
/// half of the chunk in both 128-bit lanes, the high lane's bytes shifted down a nibble, then masked.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn paired_nibbles(p: *const u8) -> [__m256i; 2] {
    let (shift, low) = (_mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4), _mm256_set1_epi8(0x0F));
    let half = |q: *const u8| {
        let both = _mm256_broadcastsi128_si256(_mm_loadu_si128(q as *const __m128i));
        _mm256_and_si256(_mm256_srlv_epi32(both, shift), low)
    };
    [half(p), half(p.add(16))]
}

/// The 64 signed bytes of a sparse chunk whose mask word is at `mask` and stored bytes start at `p`, pruned
/// lanes 0: columns 0-31 and 32-63, or (`MODE` `GRP32`) in [`paired`] order, which takes the same loads and
/// shuffles with the halves' sources and mask bytes swapped.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt,bmi2")]
unsafe fn expand64<const AMD: bool, const MODE: u8>(p: *const u8, mask: *const u64) -> [__m256i; 2] {
    let mb = mask as *const u8;
    if MODE == GRP32 {
        // The mask word once for the counts (and on AMD cores its bytes, as [`mask_bytes`]).
        let w = mask.read_unaligned();
        let b: [usize; 8] = if AMD {
            core::array::from_fn(|i| (w >> (8 * i) & 0xFF) as usize)
        } else {
            core::array::from_fn(|i| core::ptr::read_volatile(mb.add(i)) as usize)
        };
        let (c16, c32) = ((w as u16).count_ones() as usize, (w as u32).count_ones() as usize);
        let c48 = c32 + ((w >> 32) as u16).count_ones() as usize;
        return [
            expand32([p, p.add(c32)], [b[0], b[1], b[4], b[5]]),
            expand32([p.add(c16), p.add(c48)], [b[2], b[3], b[6], b[7]]),
        ];
    }
    let lo = (mask as *const u32).read().count_ones() as usize;
    let half = |p: *const u8, mb: *const u8| {
        let c01 = (mb as *const u16).read_unaligned().count_ones() as usize;
        expand32([p, p.add(c01)], mask_bytes::<AMD>(mb))
    };
    [half(p, mb), half(p.add(lo), mb.add(4))]
}

/// 32 columns from two 16-column halves, half `i` from the 16 bytes at `v[i]` (its stored values) under its two
/// mask bytes `b[2i]`, `b[2i + 1]`: one `vpshufb` whose control holds, in each half, the rank of every stored
/// column among that half's stored columns and the clear marker (top bit set) in the pruned ones ([`ranks`]).
/// This is fewer instructions per column than one 8-byte shuffle per mask byte (which the f32 kernels use, and
/// which the dispatch-bound sparse integer kernels felt); the 16-byte loads stay within the row's values and
/// `VALUE_PAD` (or the int4 unpack buffer).
#[inline(always)]
unsafe fn expand32(v: [*const u8; 2], b: [usize; 4]) -> __m256i {
    let src = _mm256_inserti128_si256::<1>(
        _mm256_castsi128_si256(_mm_loadu_si128(v[0] as *const __m128i)),
        _mm_loadu_si128(v[1] as *const __m128i),
    );
    _mm256_shuffle_epi8(src, ranks(b))
}

/// The four mask bytes at `mb`. `AMD` ([`amd_tuning`]): shifted out of one load; else one byte load each
/// (volatile, so they are not merged into one load and shifts), for cores whose load ports have room and
/// whose ALU ports, shared with the vector work, do not.
#[inline(always)]
unsafe fn mask_bytes<const AMD: bool>(mb: *const u8) -> [usize; 4] {
    if AMD {
        let w = (mb as *const u32).read_unaligned();
        [0, 1, 2, 3].map(|i| (w >> (8 * i) & 0xFF) as usize)
    } else {
        [0, 1, 2, 3].map(|i| core::ptr::read_volatile(mb.add(i)) as usize)
    }
}

/// The `pshufb` control of two 16-column halves under mask bytes `b` (two per half, as [`expand32`]): the
/// second mask byte of each half takes its row of [`RANKS_AFTER`] at the first byte's popcount, the first at 0.
#[inline(always)]
unsafe fn ranks(b: [usize; 4]) -> __m256i {
    let (c0, c2) = (b[0].count_ones() as usize, b[2].count_ones() as usize);
    let pair = |first: usize, second: &[u8; 8]| {
        let lo = _mm_loadl_epi64(RANKS_AFTER.0[0][first].as_ptr() as *const __m128i);
        _mm_castpd_si128(_mm_loadh_pd(_mm_castsi128_pd(lo), second.as_ptr() as *const f64))
    };
    _mm256_set_m128i(pair(b[2], &RANKS_AFTER.0[c2][b[3]]), pair(b[0], &RANKS_AFTER.0[c0][b[1]]))
}

/// `acc + Σ q·x` of 32 signed weight codes `w` (and their magnitudes `w_abs`) against 32 activation codes at
/// `x`, as eight exact i32 lanes: `vpmaddubsw` and `vpmaddwd`, or AVX-VNNI's `vpdpbusd` (`VNNI`), which adds
/// the same four products per lane without the i16 step. Neither saturates (see the module docs), so both
/// give the same sums.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt,bmi2")]
unsafe fn dot32<const VNNI: bool>(acc: __m256i, w: __m256i, w_abs: __m256i, x: *const i8) -> __m256i {
    let x = _mm256_sign_epi8(_mm256_loadu_si256(x as *const __m256i), w);
    if VNNI {
        vpdpbusd(acc, w_abs, x)
    } else {
        _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w_abs, x), _mm256_set1_epi16(1)))
    }
}

/// `acc + Σ n·x` of 32 unsigned int4 codes `n` (0-15) against 32 activation codes at `x`, as eight exact i32
/// lanes: `vpmaddubsw` takes `n` as its unsigned operand as it is (|pair| <= 2·15·127, no saturation), so no
/// sign or magnitude is needed; or AVX-VNNI's `vpdpbusd`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt,bmi2")]
unsafe fn dot32u<const VNNI: bool>(acc: __m256i, n: __m256i, x: *const i8) -> __m256i {
    let x = _mm256_loadu_si256(x as *const __m256i);
    if VNNI {
        vpdpbusd(acc, n, x)
    } else {
        _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(n, x), _mm256_set1_epi16(1)))
    }
}

/// AVX-VNNI's `acc + Σ u·s` per i32 lane over four unsigned bytes `u` and signed bytes `s`, in its VEX form by
/// the encoding prefix: the intrinsic would need `avxvnni` enabled on every function of the walk, which a const
/// parameter cannot switch. Reached only where AVX-VNNI was detected.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt,bmi2")]
unsafe fn vpdpbusd(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
    let mut acc = acc;
    core::arch::asm!(
        "{{vex}} vpdpbusd {acc}, {u}, {s}",
        acc = inout(ymm_reg) acc,
        u = in(ymm_reg) u,
        s = in(ymm_reg) s,
        options(pure, nomem, nostack, preserves_flags)
    );
    acc
}

/// Scales `g` and `g + 1` of a row, the first in the low four lanes and the second in the high four (the
/// two groups of a chunk in [`paired`] order).
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn pair_scales(s: &RowScales, g: usize) -> __m256 {
    if s.half {
        // The two half words, each repeated four times, then converted.
        let both = _mm_cvtsi32_si128((s.d16.add(g) as *const i32).read_unaligned());
        _mm256_cvtph_ps(_mm_shuffle_epi8(both, _mm_set_epi8(3, 2, 3, 2, 3, 2, 3, 2, 1, 0, 1, 0, 1, 0, 1, 0)))
    } else {
        _mm256_insertf128_ps::<1>(_mm256_castps128_ps256(_mm_set1_ps(*s.d.add(g))), _mm_set1_ps(*s.d.add(g + 1)))
    }
}

/// Scales `g` and `g + 1` of a row in alternate lanes, the first in the even ones.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn alternate_scales(s: &RowScales, g: usize) -> __m256 {
    if s.half {
        _mm256_cvtph_ps(_mm_set1_epi32((s.d16.add(g) as *const i32).read_unaligned()))
    } else {
        _mm256_castpd_ps(_mm256_set1_pd((s.d.add(g) as *const f64).read_unaligned()))
    }
}

/// `acc[a] += cvt(Σ q·x) · s_x · d` over chunk `ch` for every activation row; `FMT` says whether the codes
/// `w` are signed or unsigned int4 ([`unsigned`]). Over 32-column groups the codes and activations come in
/// [`paired`] order, so the low four i32 lanes hold the first group's sums and the high four the second's,
/// each scaled by its group's scale ([`pair_scales`]).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,popcnt,bmi2")]
unsafe fn chunk_dot<const VNNI: bool, const NR: usize, const MODE: u8, const FMT: u8>(
    acc: &mut [__m256; NR],
    w: [__m256i; 2],
    act: &[ActRow; NR],
    s: &RowScales,
    ch: usize,
) {
    let abs = if unsigned(FMT) { w } else { [_mm256_abs_epi8(w[0]), _mm256_abs_epi8(w[1])] };
    let zero = _mm256_setzero_si256();
    // The group scales are the same for every activation row: one vector per chunk.
    let e = if MODE == GRP32 { pair_scales(s, (ch * CHUNK) >> s.shift) } else { _mm256_setzero_ps() };
    for (acc, x) in acc.iter_mut().zip(act) {
        let xq = x.xq.add(ch * CHUNK);
        let sx = *x.sx.add(ch);
        // Both halves into one set of lanes: i32 adds are exact, so the sum is the same in any order.
        let d = if !unsigned(FMT) {
            dot32::<VNNI>(dot32::<VNNI>(zero, w[0], abs[0], xq), w[1], abs[1], xq.add(32))
        } else if VNNI {
            dot32u::<true>(dot32u::<true>(*x.zc.add(ch), w[0], xq), w[1], xq.add(32))
        } else {
            // The halves' pairs add in i16 (|sum| <= 4·15·127) before one `vpmaddwd`.
            let (x0, x1) = (xq as *const __m256i, xq.add(32) as *const __m256i);
            let pairs = _mm256_add_epi16(
                _mm256_maddubs_epi16(w[0], _mm256_loadu_si256(x0)),
                _mm256_maddubs_epi16(w[1], _mm256_loadu_si256(x1)),
            );
            _mm256_add_epi32(*x.zc.add(ch), _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
        };
        if MODE == GRP32 {
            *acc = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(d), e), _mm256_set1_ps(sx), *acc);
        } else {
            let scale = if MODE == ROW { sx } else { sx * scale(s, (ch * CHUNK) >> s.shift) };
            *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(scale), *acc);
        }
    }
}
