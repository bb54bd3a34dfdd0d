//! Kernel correctness: every ISA path against the scalar reference, matmul against matvec, and every
//! format against the f32 weights it was packed from, each with a named budget (`formats::budget`).

use proptest::prelude::*;
use sparseinfer_core::formats::{budget, GivenScales, INT4_DEFAULT_GROUP};
use sparseinfer_core::kernels::{self, Activations, Isa};
use sparseinfer_core::{Format, Layout, PackOptions, PackedMatrix};

/// SplitMix64: a tiny deterministic generator so the tests need no RNG crate.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform().max(1e-7), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
    }
}

/// A matrix with roughly `density` nonzeros, plus an empty row, a full row and a row with one nonzero.
fn matrix(rows: usize, cols: usize, density: f32, seed: u64) -> Vec<f32> {
    let mut rng = Rng(seed);
    let mut w: Vec<f32> = (0..rows * cols).map(|_| if rng.uniform() < density { rng.normal() } else { 0.0 }).collect();
    if rows >= 4 {
        w[..cols].fill(0.0);
        for v in &mut w[cols..2 * cols] {
            *v = rng.normal() + 3.0f32.copysign(rng.normal());
        }
        w[2 * cols..3 * cols].fill(0.0);
        w[2 * cols + cols / 2] = 0.75;
    }
    w
}

fn activations(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng(seed ^ 0xABCD);
    (0..n).map(|_| rng.normal()).collect()
}

fn options(format: Format, group: Option<usize>, asym: bool) -> Option<PackOptions> {
    let int = matches!(format, Format::DenseInt8 | Format::SparseInt8 | Format::DenseInt4 | Format::SparseInt4);
    let int4 = matches!(format, Format::DenseInt4 | Format::SparseInt4);
    if (group.is_some() && !int) || (asym && !int4) {
        return None;
    }
    Some(PackOptions { group_size: group, asymmetric: asym, ..Default::default() })
}

/// Every format × group × symmetry combination that is valid, in the default layout; the integer formats that
/// can be tiled (symmetric) also in the layout the default does not pick here, so both are checked on every
/// machine (tiles without VNNI run on the row-layout twin).
fn all_variants() -> Vec<(Format, PackOptions)> {
    let mut v = Vec::new();
    for f in Format::ALL {
        for g in [None, Some(32), Some(64), Some(128)] {
            for asym in [false, true] {
                if let Some(o) = options(f, g, asym) {
                    v.push((f, o));
                    if f.elem().is_int() && !asym {
                        let other = if kernels::reads_tiles() { Layout::Rows } else { Layout::Tiles };
                        v.push((f, PackOptions { layout: other, ..o }));
                    }
                }
            }
        }
    }
    v
}

/// Per-element bound on |ŵ - w| from the named budgets, computed from `w` itself (not from the packing).
fn element_bounds(w: &[f32], rows: usize, cols: usize, f: Format, o: PackOptions) -> Vec<f32> {
    let group = match f {
        Format::DenseInt4 | Format::SparseInt4 => o.group_size.unwrap_or(INT4_DEFAULT_GROUP),
        Format::DenseInt8 | Format::SparseInt8 => o.group_size.unwrap_or(usize::MAX),
        _ => 0,
    };
    let mut out = vec![0.0f32; w.len()];
    for r in 0..rows {
        let row = &w[r * cols..(r + 1) * cols];
        for c in 0..cols {
            out[r * cols + c] = match f {
                Format::DenseF32 | Format::SparseF32 => 0.0,
                Format::DenseBf16 | Format::SparseBf16 => budget::BF16_REL * row[c].abs(),
                _ => {
                    let g0 = c / group.min(cols.max(1)) * group.min(cols.max(1));
                    let g0 = if group == usize::MAX { 0 } else { g0 };
                    let g1 = if group == usize::MAX { cols } else { (g0 + group).min(cols) };
                    let vals = row[g0..g1].iter().filter(|v| !f.is_sparse() || **v != 0.0);
                    let qmax = if matches!(f, Format::DenseInt8 | Format::SparseInt8) { 127.0 } else { 7.0 };
                    let d = if o.asymmetric {
                        let lo = vals.clone().fold(f32::INFINITY, |a, v| a.min(*v));
                        let hi = vals.fold(f32::NEG_INFINITY, |a, v| a.max(*v));
                        if lo.is_finite() {
                            (hi - lo) / 15.0
                        } else {
                            0.0
                        }
                    } else {
                        vals.fold(0.0f32, |a, v| a.max(v.abs())) / qmax
                    };
                    // int4 grids are fitted by a search that may clip a group's extremes (INT4_FIT).
                    let k = if matches!(f, Format::DenseInt4 | Format::SparseInt4) {
                        budget::INT4_FIT
                    } else if f.is_sparse() {
                        budget::SPARSE_ROUND
                    } else {
                        budget::ROUND
                    };
                    k * d * (1.0 + 1e-5) + 1e-6 * d.max(row[c].abs())
                }
            };
        }
    }
    out
}

fn check_matrix(rows: usize, cols: usize, density: f32, seed: u64, f: Format, o: PackOptions, k: usize) {
    let w = matrix(rows, cols, density, seed);
    check_weights(&w, rows, cols, &format!("density {density}"), seed, f, o, k);
}

/// [`check_matrix`] of the weights `w`, described by `what` in failures.
#[allow(clippy::too_many_arguments)]
fn check_weights(w: &[f32], rows: usize, cols: usize, what: &str, seed: u64, f: Format, o: PackOptions, k: usize) {
    let m = PackedMatrix::pack(w, rows, cols, f, o).unwrap();
    let ctx = format!("{} {:?} {rows}x{cols} {what} seed {seed}", f.name(), o);
    let tiled = match o.layout {
        Layout::Auto => f.elem().is_int() && !o.asymmetric && kernels::reads_tiles(),
        l => l == Layout::Tiles,
    };
    assert_eq!(m.layout(), if tiled { Layout::Tiles } else { Layout::Rows }, "{ctx}");

    // Format vs f32: every dequantized weight within its budget; sparse formats keep the zero pattern.
    let dense = m.to_dense();
    let bounds = element_bounds(w, rows, cols, f, o);
    for i in 0..w.len() {
        assert!((dense[i] - w[i]).abs() <= bounds[i], "{ctx}: w[{i}]={} ŵ={} bound {}", w[i], dense[i], bounds[i]);
        if matches!(f, Format::SparseF32 | Format::SparseBf16) {
            assert_eq!(w[i] == 0.0, dense[i] == 0.0, "{ctx}: zero pattern at {i}");
        }
        if f.is_sparse() && w[i] == 0.0 {
            assert_eq!(dense[i], 0.0, "{ctx}: pruned weight revived at {i}");
        }
    }

    let int4 = matches!(f, Format::DenseInt4 | Format::SparseInt4);
    let int = int4 || matches!(f, Format::DenseInt8 | Format::SparseInt8);
    // max|w| of each weight's scale group (asymmetric: max of |min|, |max|), the size of its zero point.
    // One maximum per (row, group), looked up per weight: a fold per weight would cost rows × cols × group.
    let group = o.group_size.unwrap_or(if int4 { INT4_DEFAULT_GROUP } else { cols });
    let groups = cols.div_ceil(group);
    let group_max: Vec<f32> = (0..rows * groups)
        .map(|i| {
            let (r, g0) = (i / groups, i % groups * group);
            w[r * cols + g0..r * cols + (g0 + group).min(cols)].iter().fold(0.0f32, |a, v| a.max(v.abs()))
        })
        .collect();
    // Every ISA against the scalar reference, in both activation modes; matmul rows against matvec exactly.
    let x = activations(k * cols, seed);
    for act in [Activations::F32, Activations::Int8, Activations::Int8Token] {
        // The reference runs on the activations the mode uses: x itself, or x̂ (checked against x below).
        let xhat = match act {
            Activations::F32 => x.clone(),
            _ => dequantized_activations(&m, &x, k, act == Activations::Int8Token),
        };
        let mut want = vec![0.0f32; k * rows];
        kernels::matmul_on(Isa::Scalar, &m, &x, k, &mut want, act).unwrap();
        // The exact sum and its tolerance do not depend on the ISA: computed once, checked against the
        // reference here and against every ISA below.
        let mut tols = vec![0.0f32; k * rows];
        for a in 0..k {
            let xh = &xhat[a * cols..(a + 1) * cols];
            for r in 0..rows {
                let i = a * rows + r;
                let exact: f64 = (0..cols).map(|c| dense[r * cols + c] as f64 * xh[c] as f64).sum();
                // The integer kernels with per-block int8 activations add each group's zero point
                // separately (Σ d·c·x̂ + Σ m·x̂; int8: m = -128·d), so their rounding scales with
                // |ŵ| + |zero point| <= |ŵ| + 1.2·max|w|.
                let zp = |c: usize| {
                    if int && act == Activations::Int8 {
                        1.2 * group_max[r * groups + c / group]
                    } else {
                        0.0
                    }
                };
                let scale: f32 = (0..cols).map(|c| (dense[r * cols + c].abs() + zp(c)) * xh[c].abs()).sum();
                tols[i] = budget::SUM_ORDER * scale + 1e-6;
                let (w, t) = (want[i] as f64, tols[i] as f64);
                assert!((w - exact).abs() <= t, "{ctx} {act:?}: y[{a},{r}]: reference {w} vs {exact}");
            }
        }
        for isa in kernels::available_isas() {
            let mut got = vec![0.0f32; k * rows];
            kernels::matmul_on(isa, &m, &x, k, &mut got, act).unwrap();
            // A matmul row is the matvec bit for bit where one kernel family serves both; the AMX kernels
            // (many rows) match the VNNI ones exactly on tiled matrices only (see `x86::amx`). The AVX2 gathers
            // (a sparse int8 or symmetric int4 matvec) add the same integer sums as the expansion in other f32 lanes.
            let (many, one) = (kernels::kernel_name_on(isa, &m, act, k), kernels::kernel_name_on(isa, &m, act, 1));
            let exact = many == one || (m.layout() == Layout::Tiles && isa == Isa::Avx512);
            for a in 0..k {
                let mut single = vec![0.0f32; rows];
                kernels::matmul_on(isa, &m, &x[a * cols..(a + 1) * cols], 1, &mut single, act).unwrap();
                for r in 0..rows {
                    let (i, tol) = (a * rows + r, tols[a * rows + r]);
                    let (g, w) = (got[i], want[i]);
                    assert!((g - w).abs() <= tol, "{ctx} {isa:?} {act:?}: y[{a},{r}]={g} ref {w} tol {tol}");
                    if exact {
                        assert_eq!(
                            g.to_bits(),
                            single[r].to_bits(),
                            "{ctx} {isa:?} {act:?}: y[{a},{r}]: matmul row != matvec"
                        );
                    } else {
                        let s = single[r];
                        assert!((s - w).abs() <= tol, "{ctx} {isa:?} {act:?}: matvec y[{a},{r}]={s} ref {w} tol {tol}");
                    }
                }
            }
        }
    }
}

/// x̂ of an int8 activation mode (per block, or per row with `token`), unpadded, after checking it against
/// the ACT_ROUND budget.
fn dequantized_activations(m: &PackedMatrix, x: &[f32], k: usize, token: bool) -> Vec<f32> {
    let (cols, cp) = (m.cols(), m.cols_pad());
    let mut xs = vec![0.0f32; k * cp];
    for a in 0..k {
        xs[a * cp..a * cp + cols].copy_from_slice(&x[a * cols..(a + 1) * cols]);
    }
    let q = kernels::quantize_activations(m, &xs, k, token);
    let mut out = Vec::with_capacity(k * cols);
    for a in 0..k {
        let amax = xs[a * cp..(a + 1) * cp].iter().fold(0.0f32, |m, v| m.max(v.abs()));
        for c in 0..cols {
            let (v, vh) = (xs[a * cp + c], q.xhat[a * cp + c]);
            let s = q.sx[a * (cp / 64) + c / 64];
            if token {
                assert!(s == amax / 127.0 || amax < 1e-36, "per-row scale {s} for max |x| {amax}");
            }
            // x/s is rounded to f32 before the code is chosen: up to 127·2^-23 of s past one half.
            assert!((v - vh).abs() <= (budget::ACT_ROUND + 2e-5) * s, "x̂ {vh} vs x {v} (s {s})");
            assert_eq!(q.xhat[a * cp + c], s * q.xq[a * cp + c] as f32);
            out.push(vh);
        }
    }
    out
}

#[test]
fn every_variant_on_odd_and_model_shapes() {
    for (f, o) in all_variants() {
        for &(rows, cols) in &[(1, 1), (5, 63), (17, 65), (33, 200), (64, 513), (130, 2048)] {
            for &density in densities(rows * cols) {
                check_matrix(rows, cols, density, (rows * 31 + cols) as u64, f, o, 1);
            }
        }
        check_matrix(96, 1000, 0.3, 7, f, o, 6);
        // Long rows (cols_pad >= 4096) at density ~0.3 (`matrix` makes rows empty, full or at the density): the
        // AVX-512 sparse float matvec takes its four-row groups here (`avx512::shares_x`), two groups and a tail.
        check_matrix(9, 4100, 0.3, 5, f, o, 2);
    }
}

/// Every AVX2-level path this CPU has runs `w`'s matvec by gathering, so the checks that follow test the gather.
fn assert_gathers(w: &[f32], rows: usize, cols: usize, f: Format, o: PackOptions) {
    #[cfg(target_arch = "x86_64")]
    {
        let m = PackedMatrix::pack(w, rows, cols, f, o).unwrap();
        for isa in [Isa::Avx2, Isa::AvxVnni].into_iter().filter(|i| i.is_supported()) {
            let name = kernels::kernel_name_on(isa, &m, Activations::Int8, 1);
            assert!(name.ends_with(&format!("({}, gather)", isa.name())), "{o:?}: {name}");
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (w, rows, cols, f, o);
}

/// The AVX2 sparse int8 matvec gathers activations where chunks hold few values (`x86::avx2_int::gathers`):
/// chunks of 0, 1, 31, 32, 33 and 64 values (one gather step or two, and the bytes past a chunk's count) among
/// chunks of 12, with per-row scales and groups of 64 and 128, under both vendor tunings, checked against the
/// reference in both activation modes and against the expansion (four activation rows) by `check_weights`.
#[test]
fn sparse_int8_gather_chunk_counts() {
    let (rows, cols) = (37, 64 * 9 + 13);
    let edge = [0, 1, 31, 32, 33, 64];
    let mut rng = Rng(17);
    let mut w = vec![0.0f32; rows * cols];
    for r in 0..rows {
        for c in 0..cols.div_ceil(64) {
            let width = (cols - 64 * c).min(64);
            let n = if (r + c) % 4 == 0 { edge[(r + c) / 4 % edge.len()] } else { 12 }.min(width);
            // n distinct columns of the chunk: a random rotation of the first n.
            let shift = (rng.uniform() * width as f32) as usize;
            for j in 0..n {
                w[r * cols + 64 * c + (j + shift) % width] = rng.normal() + 0.5f32.copysign(rng.normal());
            }
        }
    }
    for group in [None, Some(64), Some(128)] {
        let o = PackOptions { group_size: group, layout: Layout::Rows, ..Default::default() };
        assert_gathers(&w, rows, cols, Format::SparseInt8, o);
        // Under both vendor tunings: their gathers read the positions in different encodings.
        for amd in [false, true] {
            #[cfg(target_arch = "x86_64")]
            kernels::force_amd_tuning(Some(amd));
            check_weights(&w, rows, cols, &format!("chunk counts 0-64, amd {amd}"), 17, Format::SparseInt8, o, 1);
            check_weights(&w, rows, cols, "chunk counts 0-64", 17, Format::SparseInt8, o, 4);
        }
        #[cfg(target_arch = "x86_64")]
        kernels::force_amd_tuning(None);
    }
}

/// The AVX2 sparse int4 matvec gathers activations by the column stored beside each code
/// (`x86::avx2_int::gathers`, `ColumnCodes`): 16-column groups of 0, 1, 15 and 16 values, every pair of them in
/// the two lanes of a step (the lookups' 16-byte reads, and the lanes past a group's count), among groups of 4,
/// in a row whose last chunk is cut short, with scale groups of 32 (two per chunk, the default), 64 and 128,
/// checked against the reference in both activation modes and against the expansion (four activation rows) by
/// `check_weights`.
#[test]
fn sparse_int4_gather_group_counts() {
    let (rows, cols) = (37, 64 * 9 + 13);
    let edge = [0, 1, 15, 16];
    let mut rng = Rng(19);
    let mut w = vec![0.0f32; rows * cols];
    for r in 0..rows {
        for g in 0..cols.div_ceil(16) {
            let width = (cols - 16 * g).min(16);
            // The two groups of a step (2p, 2p + 1) take every pair of edge counts over the first 16 rows.
            let p = g / 2;
            let pick = if g % 2 == 0 { r % 4 } else { r / 4 % 4 };
            let n = if (r + p) % 3 == 0 { edge[pick] } else { 4 }.min(width);
            let shift = (rng.uniform() * width as f32) as usize;
            for j in 0..n {
                w[r * cols + 16 * g + (j + shift) % width] = rng.normal() + 0.5f32.copysign(rng.normal());
            }
        }
    }
    for group in [Some(32), Some(64), Some(128)] {
        let o = PackOptions { group_size: group, layout: Layout::Rows, ..Default::default() };
        assert_gathers(&w, rows, cols, Format::SparseInt4, o);
        check_weights(&w, rows, cols, "group counts 0-16", 19, Format::SparseInt4, o, 1);
        check_weights(&w, rows, cols, "group counts 0-16", 19, Format::SparseInt4, o, 4);
    }
}

/// The SIMD path of the architecture is detected, so the comparisons above really ran it.
#[test]
fn the_architecture_simd_path_is_available() {
    let isas = kernels::available_isas();
    #[cfg(target_arch = "aarch64")]
    assert!(isas.contains(&Isa::Neon), "{isas:?}");
    #[cfg(target_arch = "x86_64")]
    assert!(!isas.contains(&Isa::Neon), "{isas:?}");
    assert_eq!(isas[0], Isa::Scalar);
}

/// Every SIMD path runs symmetric integer weights on integer-activation kernels, so the comparisons above
/// cover them; `SPARSEINFER_EXPECT_KERNEL` (e.g. `neon smull` under an emulated CPU without dot products)
/// names the variant a run must take.
#[test]
fn integer_weights_take_the_integer_activation_kernels() {
    let w = matrix(8, 256, 0.3, 3);
    let want = std::env::var("SPARSEINFER_EXPECT_KERNEL").ok();
    for format in [Format::DenseInt8, Format::SparseInt8, Format::DenseInt4, Format::SparseInt4] {
        let o = PackOptions { layout: Layout::Rows, ..Default::default() };
        let m = PackedMatrix::pack(&w, 8, 256, format, o).unwrap();
        for isa in kernels::available_isas().into_iter().filter(|&i| i != Isa::Scalar) {
            for act in [Activations::Int8, Activations::Int8Token] {
                let name = kernels::kernel_name_on(isa, &m, act, 1);
                assert!(name.starts_with(&format!("{}_i8", format.name().replace('-', "_"))), "{isa:?}: {name}");
                if let Some(want) = &want {
                    assert!(name.contains(want.as_str()), "{isa:?}: {name}, expected {want}");
                }
            }
        }
    }
}

/// The densities a shape is checked at. The aarch64 tests run under emulation (about 40 times slower), where
/// the largest shapes, which add row length rather than new code paths, run at one density.
fn densities(elements: usize) -> &'static [f32] {
    if cfg!(target_arch = "aarch64") && elements > 100_000 {
        &[0.3]
    } else {
        &[0.0, 0.03, 0.3, 0.5, 1.0]
    }
}

#[test]
fn threaded_large_matrix_matches_reference() {
    // Large enough to be split over the pool; two tokens under emulation (see `densities`).
    let k = if cfg!(target_arch = "aarch64") { 2 } else { 5 };
    for (f, o) in all_variants() {
        check_matrix(520, 1536, 0.3, 11, f, o, k);
    }
}

/// Blocks of many activation rows (prefill, encoders), where AVX-512 CPUs with AMX take `tdpbssd` on tiled
/// matrices: full blocks of 16 rows and a tail, every format, against the reference and the matvec.
#[test]
fn many_activation_rows() {
    let shapes: &[(usize, usize, usize)] = if cfg!(target_arch = "aarch64") {
        &[(40, 200, 9)]
    } else {
        &[(40, 200, 9), (33, 1000, 16), (130, 512, 37), (20, 300, 70)]
    };
    for (f, o) in all_variants() {
        for &(rows, cols, k) in shapes {
            check_matrix(rows, cols, 0.3, (rows + k) as u64, f, o, k);
        }
    }
}

/// Rows of more scale groups than the kernels stage as f32 per row, so they read the half scales (int4's) in
/// place: at group 32 and 64, one and many activation rows.
#[test]
fn wide_rows_read_half_scales_in_place() {
    let cols = 513 * 32 + 64;
    for f in [Format::DenseInt4, Format::SparseInt4] {
        for g in [32, 64] {
            let o = options(f, Some(g), false).unwrap();
            let m = PackedMatrix::pack(&matrix(3, cols, 0.3, 5), 3, cols, f, o).unwrap();
            assert!(m.half_scales(), "{f:?} group {g}");
            for k in [1, 6] {
                check_matrix(3, cols, 0.3, 5, f, o, k);
            }
        }
    }
}

#[test]
fn the_format_table_is_consistent() {
    use sparseinfer_core::formats::Elem;
    let mut names: Vec<_> = Format::ALL.iter().map(|f| f.name()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), Format::ALL.len());
    for f in Format::ALL {
        let t = f.traits();
        assert_eq!(Format::from_name(t.name).unwrap(), f);
        assert_eq!(Format::of(t.elem, t.sparse), f);
        let (kind, elem) = t.name.split_once('-').unwrap();
        assert_eq!(kind == "sparse", t.sparse, "{}", t.name);
        let bits = match elem {
            "f32" => 32,
            "bf16" => 16,
            "int8" => 8,
            "int4" => 4,
            other => panic!("unknown element {other}"),
        };
        assert_eq!(t.elem.bits(), bits);
        assert_eq!(t.elem.bytes(3), (3 * bits as usize).div_ceil(8));
        // The head is dense, float beside float layers and int8 beside integer ones.
        assert!(!t.head.is_sparse());
        let want = if t.elem.is_int() { Elem::I8 } else { t.elem };
        assert_eq!(t.head.elem(), want, "{}", t.name);
        assert_eq!(Activations::default_for(f).is_int8(), t.elem.is_int());
    }
}

#[test]
fn bad_input_is_an_error_not_a_crash() {
    let opts = PackOptions::default();
    assert!(PackedMatrix::pack(&[], 0, 4, Format::DenseF32, opts).is_err());
    assert!(PackedMatrix::pack(&[1.0; 3], 2, 2, Format::DenseF32, opts).is_err());
    assert!(PackedMatrix::pack(&[1.0, f32::NAN], 1, 2, Format::SparseInt8, opts).is_err());
    assert!(PackedMatrix::pack(&[1.0, f32::INFINITY], 1, 2, Format::DenseInt4, opts).is_err());
    let g = PackOptions { group_size: Some(48), ..Default::default() };
    assert!(PackedMatrix::pack(&[1.0; 4], 2, 2, Format::DenseInt8, g).is_err());
    let g = PackOptions { group_size: Some(32), ..Default::default() };
    assert!(PackedMatrix::pack(&[1.0; 4], 2, 2, Format::DenseF32, g).is_err());
    let a = PackOptions { asymmetric: true, ..Default::default() };
    assert!(PackedMatrix::pack(&[1.0; 4], 2, 2, Format::SparseInt8, a).is_err());
    assert!(Format::from_name("sparse-int3").unwrap_err().to_string().contains("sparse-int8"));
    let t = PackOptions { layout: Layout::Tiles, ..Default::default() };
    assert!(PackedMatrix::pack(&[1.0; 4], 2, 2, Format::DenseF32, t).is_err());
    assert!(PackedMatrix::pack(&[1.0; 4], 2, 2, Format::DenseInt4, PackOptions { asymmetric: true, ..t }).is_err());
    assert!(PackedMatrix::pack(&[1.0; 4], 2, 2, Format::SparseInt4, PackOptions { asymmetric: true, ..t }).is_err());
    assert!(Layout::from_name("columns").unwrap_err().to_string().contains("tiles"));

    let m = PackedMatrix::pack(&[1.0; 4], 2, 2, Format::DenseF32, opts).unwrap();
    let mut y = vec![0.0; 2];
    assert!(kernels::matvec(&m, &[1.0], &mut y).is_err());
    assert!(kernels::matvec(&m, &[1.0, f32::NAN], &mut y).is_err());
    assert!(kernels::matmul(&m, &[], 0, &mut [], None).is_err());
    assert!(Activations::from_name("int4").is_err());
}

#[test]
fn sizes_follow_the_format_table() {
    let (rows, cols) = (256, 2048);
    let w = matrix(rows, cols, 0.3, 3);
    let bytes = |f: Format| PackedMatrix::pack(&w, rows, cols, f, PackOptions::default()).unwrap().nbytes() as f64;
    let per = |f| bytes(f) / (rows * cols) as f64;
    let d = 0.3;
    assert!((per(Format::DenseF32) - 4.0).abs() < 0.01);
    assert!((per(Format::DenseBf16) - 2.0).abs() < 0.01);
    assert!((per(Format::DenseInt8) - 1.0).abs() < 0.01);
    // int4 grids are fitted with f16 scales, two bytes per group, as Q4_0 keeps them.
    let g = INT4_DEFAULT_GROUP as f64;
    assert!((per(Format::DenseInt4) - (0.5 + 2.0 / g)).abs() < 0.01);
    assert!((per(Format::SparseF32) - (d * 4.0 + 0.125)).abs() < 0.02);
    assert!((per(Format::SparseInt8) - (d + 0.125)).abs() < 0.02);
    assert!((per(Format::SparseInt4) - (d * 0.5 + 0.125 + 2.0 / g)).abs() < 0.02);
    for (f, asym) in [(Format::DenseInt4, false), (Format::DenseInt4, true), (Format::SparseInt4, false)] {
        let o = PackOptions { asymmetric: asym, ..Default::default() };
        assert!(PackedMatrix::pack(&w, rows, cols, f, o).unwrap().half_scales(), "{f:?} asymmetric {asym}");
    }
    // int8 grids stay f32 (one per row by default).
    assert!(!PackedMatrix::pack(&w, rows, cols, Format::DenseInt8, PackOptions::default()).unwrap().half_scales());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn odd_shapes_and_densities(
        rows in 1usize..40,
        cols in 1usize..300,
        density in 0.01f32..1.0,
        seed in any::<u64>(),
        variant in 0usize..19,
        k in 1usize..7,
    ) {
        let variants = all_variants();
        let (f, o) = variants[variant % variants.len()];
        check_matrix(rows, cols, density, seed, f, o, k);
    }
}

/// Every ISA and int8 activation mode computes `Σ w·x̂` on `m`, the packed `rows × cols` matrix `w` (exactly on its
/// grid), within the summation-order budget.
fn check_given(m: &PackedMatrix, w: &[f32], format: Format) {
    let (rows, cols) = (m.rows(), m.cols());
    // 70 rows reach the prefill kernels (AMX where the CPU has it) as well as the decode ones.
    for k in [1, 3, 70] {
        let x = activations(k * cols, 9);
        for (isa, act) in kernels::available_isas()
            .into_iter()
            .flat_map(|isa| [(isa, Activations::Int8), (isa, Activations::Int8Token)])
        {
            let xhat = dequantized_activations(m, &x, k, act == Activations::Int8Token);
            let mut y = vec![0.0f32; k * rows];
            kernels::matmul_on(isa, m, &x, k, &mut y, act).unwrap();
            for (a, r) in (0..k).flat_map(|a| (0..rows).map(move |r| (a, r))) {
                let xa = &xhat[a * cols..(a + 1) * cols];
                let want: f32 = (0..cols).map(|c| w[r * cols + c] * xa[c]).sum();
                let mag: f32 = (0..cols).map(|c| (w[r * cols + c] * xa[c]).abs()).sum();
                let got = y[a * rows + r];
                assert!(
                    (got - want).abs() <= 1e-4 * mag + 1e-6,
                    "{isa:?} {act:?} {format:?} k={k} ({a}, {r}): {got} vs {want}"
                );
            }
        }
    }
}

/// Packing with given scales keeps the stored codes exactly: `to_dense` returns `scale · q` even when no group's
/// largest code reaches the grid's end (GPTQ output), where refitting the scales would change every code.
#[test]
fn pack_with_given_scales_keeps_codes() {
    use sparseinfer_core::PackOptions;
    let (rows, cols): (usize, usize) = (5, 200);
    for (format, group, qmax) in [
        (Format::DenseInt8, None, 127i32),
        (Format::SparseInt8, None, 127),
        (Format::DenseInt8, Some(64), 127),
        (Format::DenseInt4, Some(128), 7),
        (Format::SparseInt4, Some(32), 7),
    ] {
        let g = group.unwrap_or(cols);
        let per_row = cols.div_ceil(g);
        // Every third scale negative (llama.cpp's Q4_0 blocks have such scales): the kernels multiply by the sign.
        let sign = |i: usize| if i % 3 == 1 { -1.0 } else { 1.0 };
        let scales: Vec<f32> = (0..rows * per_row).map(|i| sign(i) * (0.01 + 0.003 * i as f32)).collect();
        let mut w = vec![0.0f32; rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                // Codes within ±(qmax - 1): a refit would rescale them.
                let q = ((r * 7 + c * 3) % (2 * qmax as usize - 1)) as i32 - (qmax - 1);
                let q = if format.is_sparse() && c % 3 == 0 { 0 } else { q };
                w[r * cols + c] = scales[r * per_row + c / g] * q as f32;
            }
        }
        let opts = PackOptions { group_size: group, ..Default::default() };
        let m = PackedMatrix::pack_with_scales(
            &w,
            rows,
            cols,
            format,
            opts,
            GivenScales { scales: &scales, mins: None, per_row },
        )
        .unwrap();
        assert_eq!(m.to_dense(), w, "{format:?} group {group:?}");
        // These scales are not f16 values, so the kernels read them as f32 (every layout below).
        assert!(!m.half_scales(), "{format:?} group {group:?}");
        let mut matrices = vec![m];
        if format.is_sparse() {
            let t = PackOptions { layout: Layout::Tiles, ..opts };
            let tiled = PackedMatrix::pack_with_scales(
                &w,
                rows,
                cols,
                format,
                t,
                GivenScales { scales: &scales, mins: None, per_row },
            )
            .unwrap();
            assert_eq!(tiled.to_dense(), w, "{format:?} group {group:?} tiled");
            matrices.push(tiled);
        }
        // Every ISA computes Σ ŵ·x̂ on these matrices too.
        for m in &matrices {
            check_given(m, &w, format);
        }
        let refit = PackedMatrix::pack(&w, rows, cols, format, opts).unwrap();
        assert_ne!(refit.to_dense(), w, "the test must exercise codes a refit would change");
        // The same codes under scales that are f16 values (multiples of 2⁻¹² below 2⁻¹), which grouped matrices
        // keep as half, still pack back exactly, and every kernel reads them (int8 ones too).
        let s16: Vec<f32> = (0..rows * per_row).map(|i| sign(i) * (40 + 3 * i) as f32 / 4096.0).collect();
        let at = |i: usize| i / cols * per_row + i % cols / g;
        let w16: Vec<f32> = w.iter().enumerate().map(|(i, &v)| (v / scales[at(i)]).round() * s16[at(i)]).collect();
        let grid = GivenScales { scales: &s16, mins: None, per_row };
        let h = PackedMatrix::pack_with_scales(&w16, rows, cols, format, opts, grid).unwrap();
        assert_eq!((h.half_scales(), h.to_dense() == w16), (group.is_some(), true), "{format:?} {group:?} f16 scales");
        check_given(&h, &w16, format);
        if format.is_sparse() {
            let t = PackOptions { layout: Layout::Tiles, ..opts };
            let grid = GivenScales { scales: &s16, mins: None, per_row };
            let tiled = PackedMatrix::pack_with_scales(&w16, rows, cols, format, t, grid).unwrap();
            assert!(tiled.half_scales() == group.is_some() && tiled.layout() == Layout::Tiles);
            check_given(&tiled, &w16, format);
        }
    }
    let opts = PackOptions::default();
    let given = |scales: &'static [f32]| GivenScales { scales, mins: None, per_row: 1 };
    assert!(PackedMatrix::pack_with_scales(&[1.0; 8], 2, 4, Format::DenseF32, opts, given(&[1.0, 1.0])).is_err());
    assert!(PackedMatrix::pack_with_scales(&[1.0; 8], 2, 4, Format::DenseInt8, opts, given(&[1.0])).is_err());
    assert!(PackedMatrix::pack_with_scales(&[1.0; 8], 2, 4, Format::DenseInt8, opts, given(&[f32::NAN, 1.0])).is_err());
}

/// Symmetric int4 uses all 16 nibbles, code -8 included: every ISA and activation mode computes Σ ŵ·x̂ on
/// matrices whose codes run over -8..=7 (many -8s, next to 7s), dense and sparse, rows and tiles, every group.
/// The fitted grid reaches -8 too: a group that already lies on the full grid packs back exactly.
#[test]
fn int4_code_minus_8_on_every_isa() {
    let (rows, cols): (usize, usize) = (19, 320);
    for (format, group, layout) in [
        (Format::DenseInt4, 32, Layout::Rows),
        (Format::DenseInt4, 128, Layout::Rows),
        (Format::SparseInt4, 64, Layout::Rows),
        (Format::SparseInt4, 32, Layout::Tiles),
        (Format::SparseInt4, 128, Layout::Tiles),
    ] {
        let per_row = cols.div_ceil(group);
        // Scales that are powers of two, so w = d·q is exact and the fit can find d again.
        let scales: Vec<f32> = (0..rows * per_row).map(|i| [0.125f32, 0.25, 0.0625][i % 3]).collect();
        let mut w = vec![0.0f32; rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                // Every third code is -8; the rest run over -8..=7. Sparse formats prune some weights.
                let q = if c % 3 == 0 { -8 } else { ((r * 5 + c * 7) % 16) as i32 - 8 };
                let pruned = format.is_sparse() && (r + c) % 5 == 0;
                w[r * cols + c] = if pruned { 0.0 } else { scales[r * per_row + c / group] * q as f32 };
            }
        }
        let opts = PackOptions { group_size: Some(group), layout, ..Default::default() };
        let given = GivenScales { scales: &scales, mins: None, per_row };
        let packed = PackedMatrix::pack_with_scales(&w, rows, cols, format, opts, given).unwrap();
        let fitted = PackedMatrix::pack(&w, rows, cols, format, opts).unwrap();
        assert_eq!(packed.layout(), layout);
        for (what, m) in [("given", &packed), ("fitted", &fitted)] {
            assert_eq!(m.to_dense(), w, "{format:?} g{group} {layout:?} {what}: codes -8..=7 must decode exactly");
            for k in [1, 4] {
                let x = activations(k * cols, 11);
                for isa in kernels::available_isas() {
                    for act in [Activations::F32, Activations::Int8, Activations::Int8Token] {
                        let xhat = match act {
                            Activations::F32 => x.clone(),
                            _ => dequantized_activations(m, &x, k, act == Activations::Int8Token),
                        };
                        let mut y = vec![0.0f32; k * rows];
                        kernels::matmul_on(isa, m, &x, k, &mut y, act).unwrap();
                        for (a, r) in (0..k).flat_map(|a| (0..rows).map(move |r| (a, r))) {
                            let xa = &xhat[a * cols..(a + 1) * cols];
                            let row = &w[r * cols..(r + 1) * cols];
                            let want: f64 = row.iter().zip(xa).map(|(w, x)| *w as f64 * *x as f64).sum();
                            let mag: f64 = row.iter().zip(xa).map(|(w, x)| (*w as f64 * *x as f64).abs()).sum();
                            let got = y[a * rows + r] as f64;
                            assert!(
                                (got - want).abs() <= 1e-4 * mag + 1e-6,
                                "{format:?} g{group} {layout:?} {what} {isa:?} {act:?} k={k} ({a}, {r}): {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn rows_too_wide_for_exact_lanes_take_the_f32_kernels() {
    // The VNNI per-row-scale kernels add whole rows in i32 lanes up to 2^20 columns; a wider row must fall
    // back to the f32 kernels on x̂ (same result up to summation order), never overflow. (The AVX2, AVX-VNNI and
    // NEON integer kernels convert every 64-column block, so they take any width.)
    let cols = (1 << 20) + 64;
    let w: Vec<f32> = (0..cols).map(|c| if c % 3 == 0 { 0.0 } else { ((c % 11) as f32 - 5.0) * 0.1 }).collect();
    let x: Vec<f32> = (0..cols).map(|c| ((c % 7) as f32 - 3.0) * 0.5).collect();
    for format in [Format::DenseInt8, Format::SparseInt8] {
        let m = PackedMatrix::pack(&w, 1, cols, format, PackOptions::default()).unwrap();
        let name = kernels::kernel_name(&m, Activations::Int8Token).unwrap();
        let any_width = name.ends_with("(avx2)") || name.ends_with("(avxvnni)") || name.contains("(neon");
        assert!(name.contains("_f32") || any_width, "{format:?}: {name}");
        let (xhat, dense) = (dequantized_activations(&m, &x, 1, true), m.to_dense());
        let want: f64 = dense.iter().zip(&xhat).map(|(a, b)| *a as f64 * *b as f64).sum();
        let mut y = [0.0f32];
        kernels::matmul(&m, &x, 1, &mut y, Some(Activations::Int8Token)).unwrap();
        let mag: f64 = dense.iter().zip(&xhat).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum();
        assert!((y[0] as f64 - want).abs() <= 1e-4 * mag, "{format:?}: {} vs {want}", y[0]);
    }
}

#[test]
fn tiled_rows_at_the_exact_lane_limit() {
    // Tiled per-row-scale kernels add a whole row in each i32 lane: up to 2^17 columns of the largest codes
    // must come out exact, and a wider row must fall back to the f32 kernels.
    for (cols, vnni) in [(1usize << 17, true), ((1 << 17) + 64, false)] {
        let w = vec![1.0f32; cols];
        let x = vec![1.0f32; cols];
        let opts = PackOptions { layout: Layout::Tiles, ..Default::default() };
        let m = PackedMatrix::pack(&w, 1, cols, Format::SparseInt8, opts).unwrap();
        let name = kernels::kernel_name(&m, Activations::Int8Token).unwrap();
        if kernels::reads_tiles() {
            assert_eq!(name.contains("tiles"), vnni, "{cols}: {name}");
        }
        let mut y = [0.0f32];
        kernels::matmul(&m, &x, 1, &mut y, Some(Activations::Int8Token)).unwrap();
        assert!((y[0] as f64 - cols as f64).abs() <= 1e-4 * cols as f64, "{cols}: {} vs {cols}", y[0]);
    }
}

/// The AVX2 kernels take some choices per CPU vendor (the sparse expansion's mask-byte reads, dense int4
/// decode's rows in lockstep, the sparse int8 gather's lookups); this CPU runs one set by default, so both are run here, and must agree bit for
/// bit (decode and prefill).
#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_vendor_tunings_agree() {
    if !kernels::available_isas().contains(&Isa::Avx2) {
        return;
    }
    for (f, o) in all_variants().into_iter().filter(|(f, o)| f.elem().is_int() && !o.asymmetric) {
        for &(rows, cols, k) in &[(17, 200, 1), (33, 1000, 3), (40, 513, 9), (37, 513, 9)] {
            let w = matrix(rows, cols, 0.3, (rows + cols + k) as u64);
            let m = PackedMatrix::pack(&w, rows, cols, f, o).unwrap();
            let x = activations(k * cols, k as u64);
            let run = |amd: bool| {
                kernels::force_amd_tuning(Some(amd));
                let mut y = vec![0.0f32; k * rows];
                kernels::matmul_on(Isa::Avx2, &m, &x, k, &mut y, Activations::Int8).unwrap();
                y.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            };
            let (intel, amd) = (run(false), run(true));
            kernels::force_amd_tuning(None);
            assert_eq!(intel, amd, "{f:?} {o:?} {rows}x{cols} k={k}");
        }
    }
}
