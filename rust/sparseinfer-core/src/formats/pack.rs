//! Packing a dense f32 matrix into each format (the quantizers). Decoding lives in `kernels::reference`.

use super::{budget, f16_round, f16_to_f32, f32_to_bf16, tiles, Elem, Format, PackedMatrix, CHUNK, F16_MAX, VALUE_PAD};
use crate::error::{Error, Result};

/// The in-memory layout of a packed matrix.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Layout {
    /// Tiles where the kernels that would run read them (the symmetric integer formats with AVX-512 VNNI the
    /// active path), else rows.
    #[default]
    Auto,
    /// One row after another (every format, every kernel).
    Rows,
    /// 16 rows interleaved per 4 columns (the symmetric integer formats only; see `formats::tiles`).
    /// Kernels other than AVX-512 VNNI with int8 activations run on a row-layout twin built on first use.
    Tiles,
}

impl Layout {
    /// The stable name (`"auto"`, `"rows"`, `"tiles"`).
    pub fn name(self) -> &'static str {
        match self {
            Layout::Auto => "auto",
            Layout::Rows => "rows",
            Layout::Tiles => "tiles",
        }
    }

    /// Parses a name from [`Layout::name`].
    pub fn from_name(name: &str) -> Result<Layout> {
        match name {
            "auto" => Ok(Layout::Auto),
            "rows" => Ok(Layout::Rows),
            "tiles" => Ok(Layout::Tiles),
            _ => Err(Error::invalid("layout", format!("unknown layout {name:?}; expected auto, rows or tiles"))),
        }
    }
}

/// Options for [`PackedMatrix::pack`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PackOptions {
    /// Columns per scale group: 32, 64 or 128. `None`: one scale per row for int8, [`INT4_DEFAULT_GROUP`] for
    /// int4.
    /// Must be `None` for float formats.
    pub group_size: Option<usize>,
    /// Asymmetric int4 (`ŵ = d·q + m`, q in 0..=15). Only valid for int4 formats.
    pub asymmetric: bool,
    /// The in-memory layout.
    pub layout: Layout,
}

/// The scale groups (columns per scale) the integer kernels serve.
pub const GROUP_SIZES: [usize; 3] = [32, 64, 128];

/// Default columns per group for int4 formats: the group chosen by perplexity against llama.cpp's int4 on the
/// same weights (docs/benchmarks/int4-quality.md). The coarser groups read fewer scale bytes but lose more
/// accuracy than llama.cpp's Q4_0 does.
pub const INT4_DEFAULT_GROUP: usize = 32;

fn round_up(n: usize, m: usize) -> usize {
    n.div_ceil(m) * m
}

/// Per-group quantization parameters and the code of one weight.
#[derive(Clone, Copy)]
struct Quant {
    /// Scale `d`. Fitted symmetric int4 scales may be negative: the sign picks which side of zero gets code
    /// -8's extra step.
    d: f32,
    /// Minimum `m` (asymmetric) or 0.
    m: f32,
    /// `1/d`, or 0 when `d == 0`.
    inv: f32,
    /// The code range: -127..=127 (int8), -8..=7 (symmetric int4) or 0..=15 (asymmetric int4).
    lo: f32,
    hi: f32,
    asym: bool,
}

/// The symmetric int4 code range: the nibble `q + 8` holds all 16 codes.
const I4_LO: f32 = -8.0;
const I4_HI: f32 = 7.0;
/// The asymmetric int4 code range.
const I4_LEVELS: f32 = 15.0;
/// int4 groups are 32, 64 or 128 columns.
const I4_MAX_GROUP: usize = 128;

/// Scale divisors the symmetric int4 search tries beside the max-based `absmax / 7`, `|d| = absmax / k`, with
/// either sign of `d`: 8 puts the extreme on code -8, larger ones clip it a little.
const SYM_DIVISORS: [f32; 4] = [7.5, 8.0, 8.5, 9.0];
/// How far the asymmetric int4 search pulls each end of the range in, in max-based steps `(max - min)/15`.
const ASYM_SHRINK: [f32; 3] = [0.0, 1.0 / 3.0, 2.0 / 3.0];

/// The error of one candidate grid over a group: squared sum and worst weight, plus the sums a least-squares
/// refit of the grid to its own codes needs.
#[derive(Clone, Copy)]
struct Trial {
    q: Quant,
    sse: f32,
    worst: f32,
    /// Σq, Σq², Σw·q over the group's codes.
    sq: f32,
    sqq: f32,
    swq: f32,
}

impl Trial {
    /// The trial of grid `q` over `v`. The codes round half to even (an add and a subtract of 1.5·2²³, exact
    /// for the clamped range) where [`Quant::code`] rounds half away from zero: they differ only on exact
    /// ties, whose two codes are equally far from the weight. Eight independent partial sums and no branches,
    /// so the loop vectorizes; this search is most of the time int4 packing takes.
    fn of(q: Quant, v: &[f32]) -> Trial {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            return unsafe { Trial::of_avx2(q, v) };
        }
        Trial::of_any(q, v)
    }

    /// [`Trial::of`] compiled for AVX2: eight lanes a step instead of the baseline's four. The same operations
    /// in the same order on each lane (no contraction into FMAs), so the same trial to the bit.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn of_avx2(q: Quant, v: &[f32]) -> Trial {
        Trial::of_any(q, v)
    }

    /// The body of [`Trial::of`], inlined into each CPU path.
    #[inline(always)]
    fn of_any(q: Quant, v: &[f32]) -> Trial {
        const L: usize = 8;
        const ROUND: f32 = 12_582_912.0;
        let (d, inv, lo, hi) = (q.d, q.inv, q.lo, q.hi);
        let m = if q.asym { q.m } else { 0.0 };
        let (mut sse, mut worst, mut sq, mut sqq, mut swq) =
            ([0.0f32; L], [0.0f32; L], [0.0f32; L], [0.0f32; L], [0.0f32; L]);
        let mut add = |l: usize, w: f32| {
            let x = (w - m) * inv;
            let x = if x < lo {
                lo
            } else if x > hi {
                hi
            } else {
                x
            };
            let c = (x + ROUND) - ROUND;
            let e = w - (d * c + m);
            let a = if e < 0.0 { -e } else { e };
            sse[l] += e * e;
            worst[l] = if a > worst[l] { a } else { worst[l] };
            sq[l] += c;
            sqq[l] += c * c;
            swq[l] += w * c;
        };
        let mut chunks = v.chunks_exact(L);
        for ch in &mut chunks {
            for (l, &w) in ch.iter().enumerate() {
                add(l, w);
            }
        }
        for (l, &w) in chunks.remainder().iter().enumerate() {
            add(l, w);
        }
        let sum = |a: [f32; L]| a.iter().sum::<f32>();
        Trial {
            q,
            sse: sum(sse),
            worst: worst.iter().fold(0.0f32, |a, b| a.max(*b)),
            sq: sum(sq),
            sqq: sum(sqq),
            swq: sum(swq),
        }
    }

    /// This trial if it keeps every weight within `limit`, its step within `step` (no coarser than the
    /// max-based grid, which also bounds the zero points the int8-activation kernels add) and beats `best`,
    /// else `best`.
    fn keep_better(self, best: Trial, limit: f32, step: f32) -> Trial {
        if self.worst <= limit && self.q.d.abs() <= step && self.sse < best.sse {
            self
        } else {
            best
        }
    }
}

impl Quant {
    /// A grid with scale `d` and minimum `m` over codes `lo..=hi`.
    fn grid(d: f32, m: f32, lo: f32, hi: f32, asym: bool) -> Quant {
        let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
        Quant { d, m, inv, lo, hi, asym }
    }

    /// Parameters from the values that the group stores. int8: `d = absmax / 127`. int4: the grid with the
    /// least squared error over the group among a few candidates around the max-based one, then refitted by
    /// least squares to its own codes, provided no weight ends up further than `budget::INT4_FIT` max-based
    /// steps from its value (so a group's extremes may be clipped a little, never far).
    /// `stored_only`: fit the nonzero values alone (a sparse format stores only those).
    fn fit(values: &[f32], stored_only: bool, elem: Elem, asym: bool) -> Quant {
        if elem == Elem::I8 {
            // Zeros do not move the largest magnitude.
            let d = values.iter().fold(0.0f32, |a, v| a.max(v.abs())) / 127.0;
            return Quant::grid(d, 0.0, -127.0, 127.0, false);
        }
        // int4 groups are at most I4_MAX_GROUP columns. The nonzeros are kept without a branch per value:
        // which of a pruned group's values are zero is anyone's guess.
        let mut buf = [0.0f32; I4_MAX_GROUP];
        let mut n = 0;
        for &v in values {
            buf[n] = v;
            n += usize::from(!stored_only || v != 0.0);
        }
        if asym {
            Quant::fit_int4_asym(&buf[..n], true)
        } else {
            Quant::fit_int4_sym(&buf[..n], true)
        }
    }

    /// Symmetric int4 (codes -8..=7): [`SYM_DIVISORS`] with both signs of `d`, then a refit. With `half`, every
    /// candidate's `d` is the nearest f16 (see [`to_half`]); should that rounding put a weight outside the budget,
    /// the group is fitted again in f32.
    fn fit_int4_sym(v: &[f32], half: bool) -> Quant {
        let amax = v.iter().fold(0.0f32, |a, w| a.max(w.abs()));
        let at = |d: f32| Trial::of(Quant::grid(if half { to_half(d) } else { d }, 0.0, I4_LO, I4_HI, false), v);
        let mut best = at(amax / 7.0); // the max-based grid: every weight within half a step
        if amax == 0.0 || !best.q.inv.is_finite() {
            return best.q; // all zeros, or too small to invert: the max-based grid, as before the search
        }
        let step = amax / 7.0;
        let limit = budget::INT4_FIT * step;
        for k in SYM_DIVISORS {
            for d in [amax / k, -amax / k] {
                best = at(d).keep_better(best, limit, step);
            }
        }
        // Least squares over the chosen codes: d = Σw·q / Σq², which re-rounding can only improve on.
        if best.sqq > 0.0 {
            best = at(best.swq / best.sqq).keep_better(best, limit, step);
        }
        if half && best.worst > limit {
            return Quant::fit_int4_sym(v, false);
        }
        best.q
    }

    /// Asymmetric int4 (`ŵ = d·q + m`, codes 0..=15): the range pulled in by [`ASYM_SHRINK`] at either end,
    /// then a refit of `d` and `m`. `half` as in [`Quant::fit_int4_sym`], for `d` and `m`.
    fn fit_int4_asym(v: &[f32], half: bool) -> Quant {
        // `+ 0.0` makes a zero end of the range +0 whichever zero the fold kept (the stored minimum's bits then
        // do not depend on how a build orders the fold).
        let lo = v.iter().copied().fold(f32::INFINITY, f32::min) + 0.0;
        let hi = v.iter().copied().fold(f32::NEG_INFINITY, f32::max) + 0.0;
        if !lo.is_finite() {
            return Quant::grid(0.0, 0.0, 0.0, I4_LEVELS, true);
        }
        let step = (hi - lo) / I4_LEVELS;
        let r = |x: f32| if half { to_half(x) } else { x };
        let at =
            |d: f32, m: f32| Trial::of(Quant::grid(if half { to_half(d) } else { d }, r(m), 0.0, I4_LEVELS, true), v);
        let mut best = at(step, lo); // the min/max grid
        let limit = budget::INT4_FIT * step;
        if hi == lo || !best.q.inv.is_finite() {
            // One value (`d = 0`, `ŵ = m`), or a range too small to invert: the min/max grid, which must hold
            // the value exactly (or within the budget) to keep a rounded minimum.
            if half && best.worst > limit {
                return Quant::fit_int4_asym(v, false);
            }
            return best.q;
        }
        for a in ASYM_SHRINK {
            for b in ASYM_SHRINK {
                if a == 0.0 && b == 0.0 {
                    continue;
                }
                let (l, h) = (lo + a * step, hi - b * step);
                best = at((h - l) / I4_LEVELS, l).keep_better(best, limit, step);
            }
        }
        // Least squares of w on the chosen codes: d = cov(q, w) / var(q), m = mean(w) - d·mean(q).
        let n = v.len() as f32;
        let sw: f32 = v.iter().sum();
        let den = n * best.sqq - best.sq * best.sq;
        if den > 0.0 {
            let d = (n * best.swq - best.sq * sw) / den;
            if d > 0.0 && d.is_finite() {
                best = at(d, (sw - d * best.sq) / n).keep_better(best, limit, step);
            }
        }
        if half && best.worst > limit {
            return Quant::fit_int4_asym(v, false);
        }
        best.q
    }

    /// Parameters with a given scale `d` (and, asymmetric int4, minimum `m`).
    fn given(d: f32, m: Option<f32>, elem: Elem) -> Quant {
        match (elem, m) {
            (Elem::I8, _) => Quant::grid(d, 0.0, -127.0, 127.0, false),
            (_, Some(m)) => Quant::grid(d, m, 0.0, I4_LEVELS, true),
            _ => Quant::grid(d, 0.0, I4_LO, I4_HI, false),
        }
    }

    /// The integer code of `w`, rounded to nearest within the code range: signed for symmetric, 0..=15 for
    /// asymmetric. A stored weight of a sparse format may round to code 0: it stays in the mask and decodes
    /// to 0. (Forcing it to `|q| = 1` instead kept the zero pattern, but pushed every weight below `d/2` to
    /// `±d`: on an unpruned model packed as sparse-int4 that turned the output into nonsense.)
    fn code(&self, w: f32) -> i32 {
        // `m` is 0 for symmetric grids, and `w - 0.0` is `w` exactly.
        round_clamped((w - self.m) * self.inv, self.lo, self.hi)
    }

    /// The 4-bit storage of a code: `q + 8` symmetric, `q` asymmetric.
    fn nibble(&self, q: i32) -> u8 {
        (if self.asym { q } else { q + 8 }) as u8
    }
}

/// A fitted int4 scale or minimum as the nearest f16, so the matrix's scales are half (two bytes each for the
/// kernels, like llama.cpp's Q4_0 and Q4_1; [`super::PackedMatrix::half_scales`]); one past the largest f16 stays f32.
/// The rounding moves a normal value by at most 2⁻¹¹ of itself, far inside the half step every weight rounds by;
/// a subnormal one by up to 2⁻²⁵, which the fits check against the budget (a group of a few tiny weights, as
/// a sparse row may hold, then keeps f32 and so does its matrix).
fn to_half(v: f32) -> f32 {
    let h = f16_to_f32(f16_round(v));
    if h.abs() <= F16_MAX {
        h
    } else {
        v
    }
}

/// `x.round().clamp(lo, hi) as i32` (round half away from zero) without libm's `roundf`, which baseline x86-64
/// calls out of line for every weight: clamp first (the bounds are integers, so the order does not matter),
/// truncate, then step away from zero when the exact remainder is at least one half. NaN gives 0, as before.
#[inline]
fn round_clamped(x: f32, lo: f32, hi: f32) -> i32 {
    let x = x.clamp(lo, hi);
    let t = x as i32;
    let r = x - t as f32;
    t + (r >= 0.5) as i32 - (r <= -0.5) as i32
}

/// A quantization grid given by the caller instead of fitted ([`super::PackedMatrix::pack_with_scales`]).
/// Groups past `per_row` (column padding) get scale 0.
pub struct GivenScales<'a> {
    /// `rows × per_row` scales.
    pub scales: &'a [f32],
    /// As many minimums (`ŵ = d·q + m`), for asymmetric int4 and only there.
    pub mins: Option<&'a [f32]>,
    /// Groups per row: 1 for int8 per row, else `ceil(cols / group)`.
    pub per_row: usize,
}

pub(super) fn pack(w: &[f32], rows: usize, cols: usize, format: Format, opts: PackOptions) -> Result<PackedMatrix> {
    pack_impl(w, rows, cols, format, opts, None)
}

pub(super) fn pack_impl(
    w: &[f32],
    rows: usize,
    cols: usize,
    format: Format,
    opts: PackOptions,
    given: Option<GivenScales>,
) -> Result<PackedMatrix> {
    let threads = if ALONE.with(|a| a.get()) { 1 } else { crate::parallel::num_threads() };
    pack_on(crate::parallel::global(), threads, w, rows, cols, format, opts, given)
}

thread_local! {
    /// Set while this thread packs on its own ([`packing_alone`]).
    static ALONE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with every matrix this thread packs packed on this thread alone, for callers that already pack
/// several matrices at once on their own threads (the loader's layers): the pool's workers would only add
/// threads to busy cores, and keep it from the kernels.
pub(crate) fn packing_alone<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            ALONE.with(|a| a.set(self.0));
        }
    }
    let _restore = Restore(ALONE.with(|a| a.replace(true)));
    f()
}

/// [`pack_impl`] on up to `threads` threads of `pool`.
#[allow(clippy::too_many_arguments)]
fn pack_on(
    pool: &crate::parallel::ThreadPool,
    threads: usize,
    w: &[f32],
    rows: usize,
    cols: usize,
    format: Format,
    opts: PackOptions,
    given: Option<GivenScales>,
) -> Result<PackedMatrix> {
    const OP: &str = "pack";
    if rows == 0 || cols == 0 {
        return Err(Error::invalid(OP, format!("empty matrix: shape ({rows}, {cols})")));
    }
    if w.len() != rows * cols {
        return Err(Error::invalid(OP, format!("{} values for shape ({rows}, {cols})", w.len())));
    }
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
        return Err(Error::invalid(OP, format!("non-finite weight {} at ({}, {})", w[i], i / cols, i % cols)));
    }
    let elem = format.elem();
    let quantized = elem.is_int();
    if let Some(g) = opts.group_size {
        if !quantized {
            return Err(Error::invalid(OP, format!("group_size applies to integer formats, not {}", format.name())));
        }
        if !GROUP_SIZES.contains(&g) {
            return Err(Error::invalid(OP, format!("group_size must be 32, 64 or 128, got {g}")));
        }
    }
    if opts.asymmetric && elem != Elem::I4 {
        return Err(Error::invalid(OP, format!("asymmetric applies to int4 formats, not {}", format.name())));
    }
    let explicit_group = match elem {
        Elem::I4 => Some(opts.group_size.unwrap_or(INT4_DEFAULT_GROUP)),
        Elem::I8 => opts.group_size,
        _ => None,
    };
    let cols_pad = round_up(cols, explicit_group.unwrap_or(CHUNK).max(CHUNK));
    let group = if quantized { explicit_group.unwrap_or(cols_pad) } else { 0 };

    let mut m = PackedMatrix {
        nnz: w.iter().filter(|v| **v != 0.0).count(),
        ..PackedMatrix::unpacked(rows, cols, cols_pad, format, group, opts.asymmetric)
    };
    let sparse = format.is_sparse();
    let groups = m.groups();
    if let Some(g) = &given {
        if !quantized || m.asym != g.mins.is_some() {
            return Err(Error::invalid(
                OP,
                "given scales need an integer format, and minimums exactly when asymmetric",
            ));
        }
        if g.mins.is_some_and(|v| v.len() != g.scales.len() || v.iter().any(|v| !v.is_finite())) {
            return Err(Error::invalid(OP, "given minimums must be finite, one per scale"));
        }
        if g.per_row == 0 || g.per_row > groups || g.scales.len() != rows * g.per_row {
            return Err(Error::invalid(
                OP,
                format!("{} scales for {rows} rows of {} groups (format has {groups})", g.scales.len(), g.per_row),
            ));
        }
        // A negative scale is a grid like any other (llama.cpp's Q4_0 blocks have them: d = max / −8 keeps code
        // −8 for the largest magnitude whatever its sign, which no positive scale can hold on −8..=7).
        if let Some(v) = g.scales.iter().find(|v| !v.is_finite()) {
            return Err(Error::invalid(OP, format!("scale {v} is not a finite number")));
        }
    }
    // Rows are independent: they are packed in runs on the thread pool (the quantizers' fits dominate a model's
    // first load) and joined in order, so the result is the same on any number of threads.
    let row_bytes = m.dense_row_bytes();
    let packer = RowPacker { w, cols, cols_pad, group, groups, chunks: m.chunks(), elem, sparse, asym: m.asym, given };
    let threads = threads.min(rows / crate::parallel::MIN_ROWS_PER_TASK).max(1);
    // A few runs per thread, so uneven rows (sparse ones) balance.
    let runs = if threads > 1 { (4 * threads).min(rows) } else { 1 };
    let per = rows.div_ceil(runs);
    let parts: Vec<std::sync::Mutex<Rows>> = (0..rows.div_ceil(per)).map(|_| Default::default()).collect();
    pool.run(parts.len(), threads, &|t| {
        let (r0, r1) = (t * per, ((t + 1) * per).min(rows));
        let mut part = packer.with_room(r0, r1, row_bytes);
        let mut codes = vec![0i32; cols_pad];
        for r in r0..r1 {
            packer.row(r, &mut part, &mut codes);
        }
        *parts[t].lock().unwrap_or_else(|e| e.into_inner()) = part;
    });
    let mut parts = parts.into_iter().map(|p| p.into_inner().unwrap_or_else(|e| e.into_inner()));
    if runs == 1 {
        // One run: its buffers become the matrix's as they are.
        let part = parts.next().unwrap_or_default();
        (m.scales, m.mins, m.masks, m.data, m.row_offsets) =
            (part.scales, part.mins, part.masks, part.data, part.starts);
    } else {
        let parts: Vec<Rows> = parts.collect();
        let total = |f: fn(&Rows) -> usize| parts.iter().map(f).sum::<usize>();
        m.scales.reserve_exact(total(|p| p.scales.len()));
        m.mins.reserve_exact(total(|p| p.mins.len()));
        m.masks.reserve_exact(total(|p| p.masks.len()));
        m.data.reserve_exact(total(|p| p.data.len()) + VALUE_PAD);
        if sparse {
            m.row_offsets.reserve_exact(rows + 1);
        }
        for part in parts {
            let base = m.data.len();
            m.row_offsets.extend(part.starts.iter().map(|s| base + s));
            m.scales.extend_from_slice(&part.scales);
            m.mins.extend_from_slice(&part.mins);
            m.masks.extend_from_slice(&part.masks);
            m.data.extend_from_slice(&part.data);
        }
    }
    if sparse {
        m.row_offsets.push(m.data.len());
    }
    m.data.extend_from_slice(&[0u8; VALUE_PAD]);
    let tile = match opts.layout {
        Layout::Rows => false,
        Layout::Auto => tiles::can_tile(&m) && crate::kernels::reads_tiles(),
        Layout::Tiles if tiles::can_tile(&m) => true,
        Layout::Tiles => {
            return Err(Error::invalid(
                OP,
                format!("the tiled layout takes the symmetric integer formats, not {}", format.name()),
            ))
        }
    };
    if tile {
        return Ok(tiles::tile(&m));
    }
    m.derive_scales();
    Ok(m)
}

/// What packing a row needs, shared by the runs of rows packed at once ([`pack_impl`]).
struct RowPacker<'a> {
    w: &'a [f32],
    cols: usize,
    cols_pad: usize,
    group: usize,
    groups: usize,
    chunks: usize,
    elem: Elem,
    sparse: bool,
    asym: bool,
    given: Option<GivenScales<'a>>,
}

/// A run of packed rows: the parts of [`PackedMatrix`] they add, and (sparse) where each row's bytes start in
/// `data`.
#[derive(Default)]
struct Rows {
    scales: Vec<f32>,
    mins: Vec<f32>,
    masks: Vec<u64>,
    data: Vec<u8>,
    starts: Vec<usize>,
}

impl RowPacker<'_> {
    /// Empty buffers with room for rows `r0..r1` (and the matrix's padding and final row offset, should they
    /// become its own), so they grow without reallocating: dense rows take `row_bytes` each, a sparse row at
    /// most its stored values' bytes and an int4 chunk's odd nibble.
    fn with_room(&self, r0: usize, r1: usize, row_bytes: usize) -> Rows {
        let n = r1 - r0;
        let scales = if self.elem.is_int() { n * self.groups } else { 0 };
        let data = if self.sparse {
            let stored = self.w[r0 * self.cols..r1 * self.cols].iter().filter(|v| **v != 0.0).count();
            self.elem.bytes(stored) + n * self.chunks
        } else {
            n * row_bytes
        };
        Rows {
            scales: Vec::with_capacity(scales),
            mins: Vec::with_capacity(if self.asym { scales } else { 0 }),
            masks: Vec::with_capacity(if self.sparse { n * self.chunks } else { 0 }),
            data: Vec::with_capacity(data + VALUE_PAD),
            starts: Vec::with_capacity(if self.sparse { n + 1 } else { 0 }),
        }
    }

    /// Packs row `r` onto `part`; `codes` is scratch of `cols_pad` values.
    fn row(&self, r: usize, part: &mut Rows, codes: &mut [i32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            return unsafe { self.row_avx2(r, part, codes) };
        }
        self.row_any(r, part, codes)
    }

    /// [`RowPacker::row`] compiled for AVX2 (the codes, masks and nibbles; the int4 fits' trials take their own
    /// AVX2 path, [`Trial::of`]): the same operations in the same order (no contraction into FMAs), so the same
    /// bytes as the baseline build.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn row_avx2(&self, r: usize, part: &mut Rows, codes: &mut [i32]) {
        self.row_any(r, part, codes)
    }

    /// The body of [`RowPacker::row`], inlined into each CPU path.
    #[inline(always)]
    fn row_any(&self, r: usize, part: &mut Rows, codes: &mut [i32]) {
        let (w, cols, cols_pad, group, elem) = (self.w, self.cols, self.cols_pad, self.group, self.elem);
        let row = &w[r * cols..(r + 1) * cols];
        // Fit one set of parameters per group and turn the row into integer codes.
        if self.elem.is_int() {
            for g in 0..self.groups {
                let (c0, c1) = (g * group, ((g + 1) * group).min(cols));
                let vals = row.get(c0..c1).unwrap_or(&[]);
                let q = match &self.given {
                    Some(gs) if g < gs.per_row => {
                        let i = r * gs.per_row + g;
                        Quant::given(gs.scales[i], gs.mins.map(|v| v[i]), elem)
                    }
                    Some(gs) => Quant::given(0.0, gs.mins.map(|_| 0.0), elem),
                    None => Quant::fit(vals, self.sparse, elem, self.asym),
                };
                part.scales.push(q.d);
                if self.asym {
                    part.mins.push(q.m);
                }
                let c1 = c1.max(c0);
                for (code, &v) in codes[c0..c1].iter_mut().zip(vals) {
                    let k = q.code(v);
                    *code = if elem == Elem::I4 { q.nibble(k) as i32 } else { k };
                }
                // Padding columns: a code that decodes to zero for symmetric formats.
                let pad = if elem == Elem::I4 && !self.asym { 8 } else { 0 };
                codes[c1..(g + 1) * group].fill(pad);
            }
        }
        if self.sparse {
            part.starts.push(part.data.len());
            for ch in 0..self.chunks {
                // The mask first, without a branch per column (which of a pruned row's columns are zero is
                // anyone's guess), then a pass over its set bits.
                let first = ch * CHUNK;
                let cells = row.get(first..((ch + 1) * CHUNK).min(cols)).unwrap_or(&[]);
                let mask = cells.iter().enumerate().fold(0u64, |m, (j, &v)| m | ((v != 0.0) as u64) << j);
                // An int4 chunk's stored codes go two to a byte, low nibble first; an odd last one gets a byte.
                let mut low: Option<u8> = None;
                let mut bits = mask;
                while bits != 0 {
                    let c = first + bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    let v = row[c];
                    match elem {
                        Elem::F32 => part.data.extend_from_slice(&v.to_le_bytes()),
                        Elem::Bf16 => {
                            let mut h = f32_to_bf16(v);
                            if h & 0x7FFF == 0 {
                                h |= 1; // keep a nonzero that bf16 would flush
                            }
                            part.data.extend_from_slice(&h.to_le_bytes());
                        }
                        Elem::I8 => part.data.push(codes[c] as i8 as u8),
                        Elem::I4 => match low.take() {
                            Some(lo) => part.data.push(lo | (codes[c] as u8) << 4),
                            None => low = Some(codes[c] as u8),
                        },
                    }
                }
                if let Some(lo) = low {
                    part.data.push(lo);
                }
                part.masks.push(mask);
            }
        } else {
            let val = |c: usize| row.get(c).copied().unwrap_or(0.0);
            match elem {
                Elem::F32 => part.data.extend((0..cols_pad).flat_map(|c| val(c).to_le_bytes())),
                Elem::Bf16 => part.data.extend((0..cols_pad).flat_map(|c| f32_to_bf16(val(c)).to_le_bytes())),
                Elem::I8 => part.data.extend(codes.iter().map(|&q| q as i8 as u8)),
                Elem::I4 => {
                    let nibbles: Vec<u8> = codes.iter().map(|&q| q as u8).collect();
                    part.data.extend(super::dense_int4_bytes(&nibbles));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Uniform values in [0, 1) from a xorshift stream seeded with `s`.
    fn uniform(mut s: u64) -> impl FnMut() -> f32 {
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f32 / (1u64 << 53) as f32
        }
    }

    /// `n` weights, a fraction `zeros` of them pruned, the rest `u · 4 - shift` for the draw `u`.
    fn pruned(n: usize, zeros: f32, shift: f32) -> Vec<f32> {
        let mut u = uniform(0x9E37_79B9_7F4A_7C15);
        (0..n).map(|_| u()).map(|u| if u < zeros { 0.0 } else { u * 4.0 - shift }).collect()
    }

    #[test]
    fn every_cpu_path_of_a_trial_gives_the_same_sums() {
        let mut rnd = uniform(0x2545_F491_4F6C_DD1D);
        for n in [1, 7, 8, 9, 31, 32, 33, 64, 127, 128] {
            // A third zeros, as a pruned group holds.
            let v: Vec<f32> = (0..n).map(|_| if rnd() < 0.33 { 0.0 } else { rnd() * 3.0 - 1.2 }).collect();
            for q in [
                Quant::grid(0.11, 0.0, I4_LO, I4_HI, false),
                Quant::grid(to_half(-0.0937), 0.0, I4_LO, I4_HI, false),
                Quant::grid(to_half(0.2), to_half(-1.2), 0.0, I4_LEVELS, true),
                Quant::grid(0.0, 0.0, I4_LO, I4_HI, false),
                Quant::grid(1e-30, 0.0, I4_LO, I4_HI, false),
            ] {
                let (a, b) = (Trial::of(q, &v), Trial::of_any(q, &v));
                let bits = |t: Trial| [t.sse, t.worst, t.sq, t.sqq, t.swq].map(f32::to_bits);
                assert_eq!(bits(a), bits(b), "{n} values");
            }
        }
    }

    #[test]
    fn every_cpu_path_of_a_row_packs_the_same_bytes() {
        let (rows, cols) = (8, 300);
        let w = pruned(rows * cols, 0.5, 2.9);
        for elem in [Elem::F32, Elem::Bf16, Elem::I8, Elem::I4] {
            for (sparse, asym, group) in [(false, false, 32), (true, false, 32), (true, true, 64), (false, false, 128)]
            {
                let int = elem.is_int();
                let group = if int { group } else { 0 };
                let cols_pad = round_up(cols, group.max(CHUNK));
                let (asym, groups) = (asym && elem == Elem::I4, if int { cols_pad / group } else { 1 });
                let chunks = cols_pad / CHUNK;
                let p = RowPacker { w: &w, cols, cols_pad, group, groups, chunks, elem, sparse, asym, given: None };
                let (mut a, mut b) = (Rows::default(), Rows::default());
                let mut codes = vec![0i32; cols_pad];
                for r in 0..rows {
                    p.row(r, &mut a, &mut codes);
                    p.row_any(r, &mut b, &mut codes);
                }
                let what = format!("{elem:?} sparse {sparse} asym {asym} group {group}");
                assert_eq!((&a.data, &a.masks, &a.starts), (&b.data, &b.masks, &b.starts), "{what}");
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!((bits(&a.scales), bits(&a.mins)), (bits(&b.scales), bits(&b.mins)), "{what}");
                assert_eq!(a.scales.len(), if int { rows * groups } else { 0 }, "{what}");
            }
        }
    }

    #[test]
    fn packing_on_many_threads_gives_the_same_matrix_as_on_one() {
        let pool = crate::parallel::ThreadPool::new(3);
        // 280 columns: the last 32-column group lies wholly in the padding, and given grids cover 9 of 10 groups.
        let (rows, cols) = (203, 280);
        let w = pruned(rows * cols, 0.6, 2.5);
        let scales: Vec<f32> = (0..rows * 9).map(|i| 0.01 + (i % 7) as f32 * 0.003).collect();
        let mins: Vec<f32> = (0..rows * 9).map(|i| -0.05 - (i % 5) as f32 * 0.01).collect();
        for format in Format::ALL {
            let int4 = format.elem() == Elem::I4;
            let cases = [
                (false, None, false),
                (int4, Some(32), false),
                (false, Some(32), true),
                (int4, Some(32), true),
                (false, Some(64), false),
            ];
            for (asymmetric, group_size, given) in cases {
                if given && !format.elem().is_int() || (asymmetric || group_size.is_some()) && !format.elem().is_int() {
                    continue;
                }
                let opts = PackOptions { asymmetric, group_size, layout: Layout::Rows };
                let grid = || {
                    given.then(|| GivenScales { scales: &scales, mins: asymmetric.then_some(&mins[..]), per_row: 9 })
                };
                let one = pack_on(&pool, 1, &w, rows, cols, format, opts, grid()).expect("packs");
                let four = pack_on(&pool, 4, &w, rows, cols, format, opts, grid()).expect("packs");
                let what = format!("{} asymmetric {asymmetric} group {group_size:?} given {given}", format.name());
                assert_eq!(one.data, four.data, "{what}");
                assert_eq!(one.masks, four.masks, "{what}");
                assert_eq!(one.row_offsets, four.row_offsets, "{what}");
                assert_eq!(
                    one.scales_f32().iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    four.scales_f32().iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{what}"
                );
                assert_eq!(
                    one.mins_f32().iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    four.mins_f32().iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{what}"
                );
                assert_eq!(
                    (one.nnz, one.half, &one.scales16, &one.mins16),
                    (four.nnz, four.half, &four.scales16, &four.mins16),
                    "{what}"
                );
                if format.is_sparse() {
                    assert_eq!(one.row_offsets.len(), rows + 1, "{what}");
                }
            }
        }
    }
}
