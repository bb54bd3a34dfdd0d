//! Kernel dispatch: pick an ISA once, split rows over the thread pool, call the ISA's row kernel.
//!
//! Every ISA implements one entry point, `rows(m, r0, r1, xs, k, y)`, that computes `k` activation rows
//! against weight rows `r0..r1` for every format. The scalar [`reference`] is always compiled; the SIMD
//! variants live in `#[target_feature]` functions and are only called after runtime detection, so the
//! crate builds for baseline x86-64.
//!
//! `SPARSEINFER_ISA=scalar|avx2|avxvnni|avx512|neon` (or [`set_isa`]) forces a path, so tests can run all of them.

/// `fn $name(args) $body`, with the body compiled for the active x86 SIMD path (AVX-512 or AVX2, as
/// [`active_isa`] says; elsewhere the portable build): plain Rust whose loops then vectorize for the CPU the kernels
/// run on. The same operations on every path (Rust never fuses a multiply and an add on its own), so the same
/// bits. For row-wise work beside the kernels: activations, the KV cache's quantizer.
macro_rules! on_active_isa {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl")]
                unsafe fn avx512($($arg: $ty),*) {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) {
                    body($($arg),*)
                }
                use $crate::kernels::{active_isa, Isa};
                match active_isa() {
                    // SAFETY: the active path's features were detected.
                    Ok(Isa::Avx512) => return unsafe { avx512($($arg),*) },
                    Ok(Isa::Avx2 | Isa::AvxVnni) => return unsafe { avx2($($arg),*) },
                    _ => {}
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use on_active_isa;

#[cfg(target_arch = "aarch64")]
mod aarch64;
pub mod aligned;
pub mod reference;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
mod simd;
pub mod vector;
#[cfg(target_arch = "x86_64")]
mod x86;
/// AMX for the runtime's attention (bf16 scores and weighted sums).
#[cfg(target_arch = "x86_64")]
pub(crate) use x86::amx;
/// The AVX2 kernels' choices per CPU vendor (see `x86::avx2_int::amd_tuning`); tests run both.
#[cfg(target_arch = "x86_64")]
#[doc(hidden)]
pub use x86::avx2_int::force_amd_tuning;

use crate::error::{Error, Result};
use crate::formats::{PackedMatrix, CHUNK};
use crate::parallel;
use aligned::Aligned;
use std::sync::atomic::{AtomicU8, Ordering};

/// An instruction-set path of the kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// The portable reference ([`reference`]).
    Scalar,
    /// x86-64 AVX2 + FMA + F16C + BMI2 + POPCNT.
    Avx2,
    /// The AVX2 path whose integer-activation kernels add their products with AVX-VNNI's `vpdpbusd` on ymm
    /// (Intel since Alder Lake without AVX-512, and CPUs with both); the same results bit for bit.
    AvxVnni,
    /// x86-64 AVX-512 F/BW/DQ/VL + VBMI2 (`vpexpandb`/`vpexpandw`).
    Avx512,
    /// aarch64 NEON (Advanced SIMD).
    Neon,
}

impl Isa {
    /// Every path, slowest first.
    pub const ALL: [Isa; 5] = [Isa::Scalar, Isa::Avx2, Isa::AvxVnni, Isa::Avx512, Isa::Neon];

    /// The stable name used by `SPARSEINFER_ISA` and `build_info()`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::AvxVnni => "avxvnni",
            Isa::Avx512 => "avx512",
            Isa::Neon => "neon",
        }
    }

    /// Parses a name from [`Isa::name`].
    pub fn from_name(name: &str) -> Result<Isa> {
        Isa::ALL.into_iter().find(|i| i.name() == name.trim().to_ascii_lowercase()).ok_or_else(|| {
            Error::invalid(
                "isa",
                format!("unknown ISA {name:?}; expected one of {}, auto", names(&Isa::ALL).join(", ")),
            )
        })
    }

    /// Whether the path is AVX2's (plain, or with AVX-VNNI for the integer dot products): everything but those
    /// dot products runs the same AVX2 code.
    pub fn avx2_level(self) -> bool {
        matches!(self, Isa::Avx2 | Isa::AvxVnni)
    }

    /// Whether this CPU (and this build) can run the path.
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => x86::avx2_supported(),
            #[cfg(target_arch = "x86_64")]
            Isa::AvxVnni => x86::avxvnni_supported(),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => x86::avx512_supported(),
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => aarch64::neon_supported(),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }
}

/// The paths this CPU supports, slowest first.
pub fn available_isas() -> Vec<Isa> {
    Isa::ALL.into_iter().filter(|i| i.is_supported()).collect()
}

/// The fastest supported path.
pub fn best_isa() -> Isa {
    *available_isas().last().unwrap_or(&Isa::Scalar)
}

/// CPU features relevant to the kernels that this CPU has.
pub fn cpu_features() -> Vec<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        x86::features()
    }
    #[cfg(target_arch = "aarch64")]
    {
        aarch64::features()
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        Vec::new()
    }
}

const UNSET: u8 = u8::MAX;
static ACTIVE: AtomicU8 = AtomicU8::new(UNSET);

fn isa_from_env() -> Result<Isa> {
    match std::env::var("SPARSEINFER_ISA") {
        Ok(v) if !v.trim().is_empty() && v.trim() != "auto" => {
            let isa = Isa::from_name(&v)?;
            if !isa.is_supported() {
                return Err(Error::unsupported(
                    "isa",
                    format!("SPARSEINFER_ISA={v} but this CPU supports only {:?}", names(&available_isas())),
                ));
            }
            Ok(isa)
        }
        _ => Ok(best_isa()),
    }
}

fn names(isas: &[Isa]) -> Vec<&'static str> {
    isas.iter().map(|i| i.name()).collect()
}

/// The path in use: chosen once (from `SPARSEINFER_ISA`, else the best supported) and cached.
pub fn active_isa() -> Result<Isa> {
    match ACTIVE.load(Ordering::Relaxed) {
        UNSET => {
            let isa = isa_from_env()?;
            ACTIVE.store(isa as u8, Ordering::Relaxed);
            Ok(isa)
        }
        v => Ok(Isa::ALL[v as usize]),
    }
}

/// Forces a path for later calls (`None`: back to the environment / best). Errors if unsupported here.
pub fn set_isa(isa: Option<Isa>) -> Result<()> {
    let isa = match isa {
        Some(isa) if !isa.is_supported() => {
            return Err(Error::unsupported(
                "set_isa",
                format!("{} is not supported on this CPU; available: {:?}", isa.name(), names(&available_isas())),
            ))
        }
        Some(isa) => isa,
        None => isa_from_env()?,
    };
    ACTIVE.store(isa as u8, Ordering::Relaxed);
    Ok(())
}

/// Builds ahead what the active path's one-row calls on `m` with activations `act` will read besides the
/// packed matrix (the AVX2 gathers' positions or column codes), so a model's first decode step does not pay for it.
pub fn prepare(m: &PackedMatrix, act: Activations) {
    // `gathers` reads only the format, the grouping and the density, the same on a tiled matrix's twin, on
    // which the positions or column codes live (built here then).
    #[cfg(target_arch = "x86_64")]
    if let Some(isa) = active_isa().ok().filter(|i| i.avx2_level()) {
        if act.is_int8() && x86::avx2_int::gathers(m) {
            x86::avx2_int::prepare_gather(m.row_major(), isa);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (m, act);
}

/// Whether the active path reads tiles (AVX-512 VNNI), so that `Layout::Auto` tiles the formats that can be
/// tiled (`formats::tiles`).
pub fn reads_tiles() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        active_isa().is_ok_and(|i| i == Isa::Avx512) && x86::vnni_supported()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

type RowsFn = unsafe fn(&PackedMatrix, usize, usize, &[f32], usize, *mut f32);

fn rows_fn(isa: Isa) -> RowsFn {
    match isa {
        Isa::Scalar => reference::rows,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::AvxVnni => x86::avx2::rows,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => x86::avx512::rows_shared_x,
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => aarch64::neon::rows,
        #[allow(unreachable_patterns)]
        _ => reference::rows,
    }
}

/// Activation rows per prefill step of a model: enough to amortise reading the weights. The AVX-512 VNNI and
/// NEON kernels read each weight once per four rows whatever the call, so a short step keeps its activations in
/// cache. The AVX2 and AVX-VNNI ones expand a sparse or int4 weight row to a byte per column once per call, so a
/// step of 64 spreads that over twice the rows of 32, at 64 bytes of activation codes per column (256 KiB for
/// 4K columns) read from L2 by every weight row. AMX expands each weight tile once per call, so longer steps
/// spread that over more rows.
pub fn prefill_rows() -> usize {
    #[cfg(target_arch = "x86_64")]
    match active_isa() {
        Ok(Isa::Avx512) if x86::amx::supported() => return 128,
        Ok(i) if i.avx2_level() => return 64,
        _ => {}
    }
    32
}

/// Below this many multiply-adds a call stays on one thread.
const PARALLEL_MIN_WORK: usize = 1 << 15;

/// How activations meet integer weights.
///
/// - `F32`: the f32 activations are used as they are; only the weights carry quantization error.
/// - `Int8`: each activation row is quantized per 64-column block (`s = max|x| / 127`, `x̂ = s·round(x / s)`),
///   the way llama.cpp pairs its weight formats with q8 activations. Where the CPU has AVX-512 VNNI the
///   integer dot products run on `vpdpbusd`, on AVX2 on `vpmaddubsw` (symmetric weights); elsewhere the f32
///   kernels run on `x̂`, so every ISA computes the same `Σ ŵ·x̂` up to summation order. The default for
///   integer weight formats.
/// - `Int8Token`: the same with one scale per activation row (per token; `s = max|x| / 127` over the row),
///   as W8A8 "dynamic per-token" schemes (compressed-tensors, vLLM) do. Coarser than `Int8` where a row
///   mixes large and small values, but the VNNI kernels then add whole rows (or weight groups) in exact
///   integers and convert once, instead of converting and scaling every 64 columns: fewer instructions per
///   weight, which is what the sparse kernels are short of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Activations {
    /// f32 activations.
    F32,
    /// int8 activations per 64-column block.
    Int8,
    /// int8 activations with one scale per row.
    Int8Token,
}

impl Activations {
    /// The stable name (`"f32"`, `"int8"`, `"int8-token"`).
    pub fn name(self) -> &'static str {
        match self {
            Activations::F32 => "f32",
            Activations::Int8 => "int8",
            Activations::Int8Token => "int8-token",
        }
    }

    /// Whether the activations are quantized to int8.
    pub fn is_int8(self) -> bool {
        matches!(self, Activations::Int8 | Activations::Int8Token)
    }

    /// Parses a name from [`Activations::name`].
    pub fn from_name(name: &str) -> Result<Activations> {
        match name {
            "f32" => Ok(Activations::F32),
            "int8" => Ok(Activations::Int8),
            "int8-token" => Ok(Activations::Int8Token),
            _ => Err(Error::invalid(
                "activations",
                format!("unknown activations {name:?}; expected f32, int8 or int8-token"),
            )),
        }
    }

    /// `Int8` for integer weight formats, `F32` for float ones.
    pub fn default_for(format: crate::Format) -> Activations {
        if format.elem().is_int() {
            Activations::Int8
        } else {
            Activations::F32
        }
    }
}

/// Activations quantized per 64-column block or per row, padded to `cols_pad`, for `k` rows.
pub struct QuantActs {
    /// Activation rows.
    pub k: usize,
    /// One scale per row ([`Activations::Int8Token`]) instead of per 64-column block; `sx` then repeats the
    /// row's scale in every block.
    pub token: bool,
    /// `k × cols_pad` codes.
    pub xq: Aligned<i8>,
    /// `k × chunks` block scales.
    pub sx: Vec<f32>,
    /// The VNNI per-row-scale kernels, every VNNI kernel on tiled matrices, and the per-block ones on symmetric
    /// weights with scale groups: per activation row and zero-point block (a chunk with per-block activations,
    /// stored negated; the weight scale block with per-row ones), per i32 lane `j`, the zero point times the sum of
    /// the codes the lane meets (`z · Σ x` over columns `64c + 4j..64c + 4j + 4` of every chunk `c` in the block;
    /// tiled: one `z · Σ x` per segment), taken from the exact integer sums; empty otherwise.
    pub zcorr: Aligned<i32>,
    /// `k × groups` sums of `x̂` per weight scale group (the VNNI per-block row-layout kernels' zero points on
    /// per-row scales, and asymmetric minimums: `Σ m·x̂`); empty otherwise.
    pub gsum: Vec<f32>,
    /// `k × cols_pad` dequantized activations `x̂`, for the f32 kernels (empty on the VNNI path).
    pub xhat: Aligned<f32>,
}

/// Quantizes `k` zero-padded activation rows of `m.cols_pad()` as [`Activations::Int8`] (`token: false`) or
/// [`Activations::Int8Token`] (`token: true`) describes.
pub fn quantize_activations(m: &PackedMatrix, xs: &[f32], k: usize, token: bool) -> QuantActs {
    quantize_activations_for(m, xs, k, Consumer::F32, token)
}

/// Which kernels read a [`QuantActs`], and so what it holds besides the codes and block scales.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Consumer {
    /// The f32 kernels: `x̂`.
    F32,
    /// The AVX-512 VNNI kernels: group sums, or per-row-scale corrections.
    Vnni,
    /// The AVX2 and NEON integer kernels: nothing more.
    #[cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(dead_code))]
    Codes,
}

/// [`quantize_activations`] for one [`Consumer`]: `x̂` for the f32 kernels, what the VNNI kernels read besides
/// the codes (group sums, or per-row-scale corrections), or (AVX2 integer kernels) only the codes and scales.
/// The per-block work is written out for AVX-512 and compiled for AVX2 as well, where the CPU has them: every
/// copy computes the same codes bit for bit (the rounding below is exact), so the ISA never changes a result.
fn quantize_activations_for(m: &PackedMatrix, xs: &[f32], k: usize, to: Consumer, token: bool) -> QuantActs {
    let (cp, chunks, groups) = (m.cols_pad, m.chunks(), m.groups());
    // A real assert: the AVX-512 copy below writes through raw pointers sized by these buffers.
    assert_eq!(xs.len(), k * cp, "activations must be k × cols_pad");
    // The VNNI per-row-scale kernels read the codes and corrections; the per-block ones the group sums.
    let (xhat, vnni) = (to == Consumer::F32, to == Consumer::Vnni);
    #[cfg(target_arch = "x86_64")]
    let vnni_zcorr = vnni && (token || m.tiled || vnni_block_zcorr(m));
    let mut q = QuantActs {
        k,
        token,
        xq: Aligned::zeroed(k * cp),
        sx: vec![0.0; k * chunks],
        zcorr: Aligned::empty(),
        gsum: if vnni && !token && !m.tiled && !vnni_block_zcorr(m) { vec![0.0; k * groups] } else { Vec::new() },
        xhat: if xhat { Aligned::zeroed(k * cp) } else { Aligned::empty() },
    };
    quantize_rows(parallel::num_threads(), xs, q.rows(), cp);
    if !q.gsum.is_empty() {
        group_sums(&mut q, m.group);
    }
    #[cfg(target_arch = "x86_64")]
    if vnni_zcorr && x86::vnni_supported() {
        // SAFETY: the features were detected.
        unsafe { x86::vnni::zero_point_corrections(m, &mut q) };
    }
    q
}

/// Whether the VNNI per-block row-layout kernels take their zero points from `zcorr` rather than `gsum`.
fn vnni_block_zcorr(m: &PackedMatrix) -> bool {
    #[cfg(target_arch = "x86_64")]
    return x86::vnni::block_zcorr(m);
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = m; // no VNNI kernels here
        false
    }
}

/// The rows of a [`QuantActs`] that the block quantizers write: all of them, or a run of them.
pub(crate) struct QuantRows<'a> {
    /// Rows.
    pub k: usize,
    /// As [`QuantActs::token`].
    pub token: bool,
    /// `k × cols_pad` codes.
    pub xq: &'a mut [i8],
    /// `k × chunks` block scales.
    pub sx: &'a mut [f32],
    /// `k × cols_pad` dequantized activations, or empty.
    pub xhat: &'a mut [f32],
}

impl QuantActs {
    pub(crate) fn rows(&mut self) -> QuantRows<'_> {
        QuantRows { k: self.k, token: self.token, xq: &mut self.xq, sx: &mut self.sx, xhat: &mut self.xhat }
    }
}

/// Quantizes the `q.k` rows of `cp` values in `xs` into `q` with the active ISA's copy of [`quantize_blocks`],
/// runs of rows on the thread pool when there are many (every row's codes are the same on any thread).
fn quantize_rows(threads: usize, xs: &[f32], q: QuantRows, cp: usize) {
    let threads = threads.min(q.k / parallel::MIN_ROWS_PER_TASK);
    if threads <= 1 {
        return quantize_blocks_here(xs, q);
    }
    let per = q.k.div_ceil(threads);
    let chunks = q.sx.len() / q.k;
    let QuantRows { k, token, mut xq, mut sx, mut xhat } = q;
    let xhat_width = if xhat.is_empty() { 0 } else { cp };
    let mut parts = Vec::with_capacity(threads);
    for r0 in (0..k).step_by(per) {
        let rows = per.min(k - r0);
        let (a, rest) = std::mem::take(&mut xq).split_at_mut(rows * cp);
        xq = rest;
        let (b, rest) = std::mem::take(&mut sx).split_at_mut(rows * chunks);
        sx = rest;
        let (c, rest) = std::mem::take(&mut xhat).split_at_mut(rows * xhat_width);
        xhat = rest;
        let part = QuantRows { k: rows, token, xq: a, sx: b, xhat: c };
        parts.push(std::sync::Mutex::new((&xs[r0 * cp..(r0 + rows) * cp], Some(part))));
    }
    parallel::global().run(parts.len(), threads, &|t| {
        let mut part = parts[t].lock().unwrap_or_else(|e| e.into_inner());
        let xs = part.0;
        quantize_blocks_here(xs, part.1.take().expect("each part runs once"));
    });
}

/// [`quantize_blocks`] compiled for the active ISA (not the best the CPU has: a run forced to AVX2 measures
/// what an AVX2-only CPU runs; every copy gives the same codes).
fn quantize_blocks_here(xs: &[f32], q: QuantRows) {
    #[cfg(target_arch = "x86_64")]
    match active_isa().unwrap_or(Isa::Scalar) {
        // SAFETY: the active ISA is one this CPU supports (`isa_from_env`, `set_isa`).
        Isa::Avx512 => unsafe { x86::avx512::quantize_blocks(xs, q) },
        // SAFETY: as above; the AVX2 paths need AVX2.
        isa if isa.avx2_level() => unsafe { x86::avx2::quantize_blocks(xs, q) },
        _ => quantize_blocks(xs, q),
    }
    #[cfg(not(target_arch = "x86_64"))]
    quantize_blocks(xs, q);
}

/// The largest magnitude of a 64-value block, as every quantizer copy forms it: lane maxima over the four
/// 16-value parts (`a > l ? a : l`), then their maximum (max is exact, so the reduction order is free).
#[inline(always)]
fn block_amax(block: &[f32; CHUNK]) -> f32 {
    let mut lanes = [0.0f32; 16];
    for part in block.chunks_exact(16) {
        for (l, v) in lanes.iter_mut().zip(part) {
            let a = v.abs();
            *l = if a > *l { a } else { *l };
        }
    }
    lanes.iter().fold(0.0f32, |a, &v| if v > a { v } else { a })
}

/// Per-row quantization: replaces the block maxima in `q.sx` (row-major, `q.k` rows) by their row's maximum.
pub(crate) fn spread_row_maxima(q: &mut QuantRows) {
    let per_row = q.sx.len() / q.k.max(1);
    for row in q.sx.chunks_exact_mut(per_row.max(1)) {
        let amax = row.iter().fold(0.0f32, |a, &v| if v > a { v } else { a });
        row.fill(amax);
    }
}

/// The VNNI per-block kernels' zero-point sums `gsum = Σ x̂` per weight group of `group` (32, or a multiple of 64)
/// columns, from the codes (`x̂ = s·code`): exact integer sums per 32 columns, then one product per block.
/// A scalar f32 sum over every column was a chain of dependent adds, ~1 µs per 2048 columns.
fn group_sums(q: &mut QuantActs, group: usize) {
    let halves: Vec<f32> =
        q.xq.chunks_exact(CHUNK / 2)
            .enumerate()
            .map(|(h, codes)| {
                let codes: &[i8; CHUNK / 2] = codes.try_into().expect("32 codes");
                q.sx[h / 2] * codes.iter().map(|&c| c as i32).sum::<i32>() as f32
            })
            .collect();
    for (g, out) in halves.chunks_exact(group / (CHUNK / 2)).zip(q.gsum.iter_mut()) {
        *out = g.iter().sum();
    }
}

/// A block's scale and its reciprocal from its largest magnitude. A block whose reciprocal would overflow
/// (largest magnitude below ~3.7e-37) quantizes to zeros with scale 0: an absolute error below 4e-37, where a
/// capped reciprocal would give codes too small for the 0.5-step rounding bound.
#[inline(always)]
pub(crate) fn block_scale(amax: f32) -> (f32, f32) {
    let s = amax / 127.0;
    let inv = 1.0 / s;
    if s > 0.0 && inv.is_finite() {
        (s, inv)
    } else {
        (0.0, 0.0)
    }
}

/// Quantizes every 64-value block of `xs` into `q` (codes, scales, and `x̂` if it is allocated).
/// Written so LLVM vectorizes it: fixed-size blocks (no bounds checks in the loops), branch-free selects, a
/// 16-lane max, an exact round half away from zero.
#[inline(always)]
pub(crate) fn quantize_blocks(xs: &[f32], mut q: QuantRows) {
    let with_xhat = !q.xhat.is_empty();
    for (block, amax) in xs.chunks_exact(CHUNK).zip(q.sx.iter_mut()) {
        *amax = block_amax(block.try_into().expect("64 values"));
    }
    if q.token {
        spread_row_maxima(&mut q);
    }
    for (b, (block, codes)) in xs.chunks_exact(CHUNK).zip(q.xq.chunks_exact_mut(CHUNK)).enumerate() {
        let block: &[f32; CHUNK] = block.try_into().expect("64 values");
        let codes: &mut [i8; CHUNK] = codes.try_into().expect("64 codes");
        let (s, inv) = block_scale(q.sx[b]);
        q.sx[b] = s;
        for (c, v) in codes.iter_mut().zip(block) {
            // Round half away from zero without libm (baseline x86-64 has no roundss): truncate, then step
            // away from zero when the exact remainder (r - t is exact below 2^23) is at least one half.
            // min/max rather than clamp: a NaN (callers reject them; this keeps a slip from being UB) becomes
            // 127, as the AVX-512 copy's vminps/vmaxps make it.
            #[allow(clippy::manual_clamp)]
            let r = (v * inv).min(127.0).max(-127.0);
            // SAFETY: r is within ±127 (not NaN: min and max return the other operand for one).
            let t = unsafe { r.to_int_unchecked::<i32>() };
            let step = if r < 0.0 { -1 } else { 1 };
            *c = (t + if (r - t as f32).abs() >= 0.5 { step } else { 0 }) as i8;
        }
        if with_xhat {
            let xhat: &mut [f32; CHUNK] = (&mut q.xhat[b * CHUNK..(b + 1) * CHUNK]).try_into().expect("64 values");
            for (h, &c) in xhat.iter_mut().zip(codes.iter()) {
                *h = s * c as f32;
            }
        }
    }
}

/// `y = W @ x` with the format's default [`Activations`]: `x` has `cols` values, `y` has `rows`.
pub fn matvec(m: &PackedMatrix, x: &[f32], y: &mut [f32]) -> Result<()> {
    matmul(m, x, 1, y, None)
}

/// `Y = X @ Wᵀ` for `k` activation rows: `x` is `k × cols` row-major, `y` is `k × rows` row-major.
/// `act: None` uses [`Activations::default_for`] the format.
pub fn matmul(m: &PackedMatrix, x: &[f32], k: usize, y: &mut [f32], act: Option<Activations>) -> Result<()> {
    const OP: &str = "matmul";
    if k == 0 {
        return Err(Error::invalid(OP, "no activation rows"));
    }
    if x.len() != k * m.cols {
        return Err(Error::invalid(OP, format!("activations hold {} values, expected {k} × {}", x.len(), m.cols)));
    }
    if y.len() != k * m.rows {
        return Err(Error::invalid(OP, format!("output holds {} values, expected {k} × {}", y.len(), m.rows)));
    }
    matmul_on(active_isa()?, m, x, k, y, act.unwrap_or(Activations::default_for(m.format)))
}

/// An error naming the first non-finite activation, if any (`cols` per activation row).
fn check_finite(op: &'static str, x: &[f32], cols: usize) -> Result<()> {
    check_finite_on(parallel::num_threads(), op, x, cols)
}

/// [`check_finite`] on up to `threads` threads.
fn check_finite_on(threads: usize, op: &'static str, x: &[f32], cols: usize) -> Result<()> {
    // Branch-free and vectorizable (SSE2 has no unsigned max): an all-ones exponent carries into bit 31.
    // The position is only looked up on failure. Many rows (an encoder's) are checked in runs on the pool.
    let flags = |x: &[f32]| x.iter().fold(0u32, |a, v| a | ((v.to_bits() & 0x7F80_0000) + 0x0080_0000) >> 31);
    let rows = x.len() / cols.max(1);
    let threads = threads.min(rows / parallel::MIN_ROWS_PER_TASK);
    let bad = if threads > 1 {
        let per = rows.div_ceil(threads) * cols;
        let found = AtomicU8::new(0);
        parallel::global().run(x.len().div_ceil(per), threads, &|t| {
            if flags(&x[t * per..((t + 1) * per).min(x.len())]) != 0 {
                found.store(1, Ordering::Relaxed);
            }
        });
        found.load(Ordering::Relaxed) != 0
    } else {
        flags(x) != 0
    };
    if bad {
        let i = x.iter().position(|v| !v.is_finite()).expect("a non-finite value");
        return Err(Error::invalid(op, format!("non-finite activation {} at ({}, {})", x[i], i / cols, i % cols)));
    }
    Ok(())
}

/// [`matmul`] on a given ISA, ignoring the active one (tests compare paths with it). The ISA must be
/// supported.
pub fn matmul_on(isa: Isa, m: &PackedMatrix, x: &[f32], k: usize, y: &mut [f32], act: Activations) -> Result<()> {
    if !isa.is_supported() {
        return Err(Error::unsupported("matmul", format!("{} is not supported on this CPU", isa.name())));
    }
    if k == 0 || x.len() != k * m.cols || y.len() != k * m.rows {
        return Err(Error::invalid("matmul", "activation or output length does not match the matrix"));
    }
    check_finite("matmul", x, m.cols)?;
    // Zero-pad each activation row to cols_pad so no kernel needs a column tail (rows already that long are
    // used in place: the f32 kernels and the quantizers load them unaligned).
    let padded;
    let xs: &[f32] = if m.cols == m.cols_pad {
        x
    } else {
        let mut p = Aligned::<f32>::zeroed(k * m.cols_pad);
        for a in 0..k {
            p[a * m.cols_pad..a * m.cols_pad + m.cols].copy_from_slice(&x[a * m.cols..(a + 1) * m.cols]);
        }
        padded = p;
        &padded[..]
    };
    // Only the VNNI kernels read tiles; the rest run on the row-layout twin.
    match act {
        Activations::F32 => run_rows(m.row_major(), k, y, rows_fn(isa), &f32_operand(isa, m, xs)),
        Activations::Int8 | Activations::Int8Token => {
            let token = act == Activations::Int8Token;
            #[cfg(target_arch = "x86_64")]
            if isa == Isa::Avx512 && k >= x86::amx::min_rows(m) && x86::amx::supports(m, token) {
                let q = quantize_activations_for(m, xs, k, Consumer::Codes, token);
                run_rows(m, k, y, x86::amx::rows, &q);
                return Ok(());
            }
            #[cfg(target_arch = "x86_64")]
            if isa == Isa::Avx512 && x86::vnni::supports(m, token) {
                let q = quantize_activations_for(m, xs, k, Consumer::Vnni, token);
                run_rows(m, k, y, x86::vnni::rows, &q);
                return Ok(());
            }
            #[cfg(target_arch = "x86_64")]
            if isa.avx2_level() && x86::avx2_int::supports(m) {
                let m = m.row_major();
                if k == 1 && x86::avx2_int::gathers(m) {
                    // Built here once, before the tasks share it.
                    x86::avx2_int::prepare_gather(m, isa);
                }
                let q = quantize_activations_for(m, xs, k, Consumer::Codes, token);
                let rows = if isa == Isa::AvxVnni { x86::avx2_int::rows_avxvnni } else { x86::avx2_int::rows };
                run_rows(m, k, y, rows, &q);
                return Ok(());
            }
            #[cfg(target_arch = "aarch64")]
            if isa == Isa::Neon && aarch64::neon_int::supports(m) {
                let m = m.row_major();
                let q = quantize_activations_for(m, xs, k, Consumer::Codes, token);
                run_rows(m, k, y, aarch64::neon_int::rows, &q);
                return Ok(());
            }
            let m = m.row_major();
            let q = quantize_activations(m, xs, k, token);
            run_rows(m, k, y, rows_fn(isa), &f32_operand(isa, m, &q.xhat));
        }
    }
    Ok(())
}

/// Activation rows as the f32 kernels of `isa` read them for `m`: as they are, except for AVX-512 sparse bf16,
/// which multiplies each 32-column block's even columns, then its odd ones.
fn f32_operand<'a>(isa: Isa, m: &PackedMatrix, xs: &'a [f32]) -> std::borrow::Cow<'a, [f32]> {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 && x86::avx512::wants_bf16_pair_order(m) {
        return std::borrow::Cow::Owned(x86::avx512::bf16_pair_order(xs));
    }
    let _ = (isa, m);
    std::borrow::Cow::Borrowed(xs)
}

/// The ISA a one-row call (a matvec) would run on and whether it takes the integer-activation kernels
/// (AVX-512 VNNI, AVX2 or NEON), for reports.
pub fn kernel_name(m: &PackedMatrix, act: Activations) -> Result<String> {
    Ok(kernel_name_on(active_isa()?, m, act, 1))
}

/// [`kernel_name`] for a call on `isa` with `k` activation rows: from 16 rows on (tiled) or 64 (dense rows), AVX-512
/// CPUs with AMX take the formats it serves (`x86::amx`).
pub fn kernel_name_on(isa: Isa, m: &PackedMatrix, act: Activations, k: usize) -> String {
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (act, k);
    #[cfg(target_arch = "x86_64")]
    if act.is_int8() && isa == Isa::Avx512 {
        let token = act == Activations::Int8Token;
        let per = if token { "_token" } else { "" };
        let tiles = if m.tiled { ", tiles" } else { "" };
        let name = m.format.name().replace('-', "_");
        if k >= x86::amx::min_rows(m) && x86::amx::supports(m, token) {
            return format!("{name}_i8{per} (amx{tiles})");
        }
        if x86::vnni::supports(m, token) {
            return format!("{name}_i8{per} (avx512vnni{tiles})");
        }
    }
    #[cfg(target_arch = "x86_64")]
    if act.is_int8() && isa.avx2_level() && x86::avx2_int::supports(m) {
        let per = if act == Activations::Int8Token { "_token" } else { "" };
        let gather = if k == 1 && x86::avx2_int::gathers(m) { ", gather" } else { "" };
        return format!("{}_i8{per} ({}{gather})", m.format.name().replace('-', "_"), isa.name());
    }
    #[cfg(target_arch = "aarch64")]
    if act.is_int8() && isa == Isa::Neon && aarch64::neon_int::supports(m) {
        let per = if act == Activations::Int8Token { "_token" } else { "" };
        let how = if aarch64::neon_int::has_dotprod() { "neon sdot" } else { "neon smull" };
        return format!("{}_i8{per} ({how})", m.format.name().replace('-', "_"));
    }
    format!("{}_f32 ({})", m.format.name().replace('-', "_"), isa.name())
}

/// Splits weight rows over the pool and runs `f(m, r0, r1, acts, y)` on each span; `y` is `k × rows`.
fn run_rows<A: ?Sized + Sync>(
    m: &PackedMatrix,
    k: usize,
    y: &mut [f32],
    f: unsafe fn(&PackedMatrix, usize, usize, &A, usize, *mut f32),
    acts: &A,
) {
    debug_assert!(y.len() == k * m.rows);
    let threads = parallel::num_threads();
    let out = SendPtr(y.as_mut_ptr());
    if threads <= 1 || m.rows * m.cols_pad * k < PARALLEL_MIN_WORK {
        // SAFETY: y has k × rows elements; acts were built for k rows of cols_pad.
        unsafe { f(m, 0, m.rows, acts, k, out.0) };
        return;
    }
    // Guided scheduling: each task takes 1/(2·threads) of the rows not yet handed out (a multiple of 16), so
    // the first tasks are long sequential streams (the hardware prefetchers ramp up again at every task start;
    // 8 equal tasks per thread were ~10-20 % slower from DRAM) and the short tail still balances a slow thread.
    let mut bounds = vec![0];
    while let Some(&r) = bounds.last().filter(|&&r| r < m.rows) {
        let size = (m.rows - r).div_ceil(2 * threads).div_ceil(16) * 16;
        bounds.push((r + size).min(m.rows));
    }
    parallel::global().run(bounds.len() - 1, threads, &|t| {
        let (r0, r1) = (bounds[t], bounds[t + 1]);
        let out = &out;
        // SAFETY: tasks write disjoint row ranges of y.
        unsafe { f(m, r0, r1, acts, k, out.0) };
    });
}

struct SendPtr(*mut f32);
// SAFETY: used only for disjoint writes from pool tasks while the owner waits.
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

#[cfg(test)]
mod tests {
    use super::*;

    /// Activation rows that hit every rounding edge: exact halves, the ±127 clamp, zeros, all-zero and
    /// subnormal-scale blocks, mixed magnitudes, and a few NaNs.
    fn edge_rows(cp: usize, k: usize) -> Vec<f32> {
        let mut s = 0x9E37_79B9u32;
        let mut rnd = move || {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            s
        };
        (0..k * cp)
            .map(|i| match (i / CHUNK) % 6 {
                0 => 0.0,
                1 => 1e-38 * ((rnd() % 7) as f32 - 3.0),
                2 => ((rnd() % 255) as f32 - 127.0) * 0.5, // many exact halves after scaling
                3 => f32::from_bits(rnd() & 0xFF7F_FFFF),  // an even exponent below 255: finite, any magnitude
                4 if i % 9 == 0 => f32::NAN,               // rejected by matmul, but defined here: code 127
                _ => ((rnd() % 20001) as f32 - 10000.0) * 1e-3,
            })
            .collect()
    }

    fn quantized(xs: &[f32], cp: usize, k: usize, simd: bool, token: bool) -> QuantActs {
        let chunks = cp / CHUNK;
        let mut q = QuantActs {
            k,
            token,
            zcorr: Aligned::empty(),
            xq: Aligned::zeroed(k * cp),
            sx: vec![0.0; k * chunks],
            gsum: Vec::new(),
            xhat: Aligned::zeroed(k * cp),
        };
        if simd {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: only called when AVX-512 is supported.
            unsafe {
                x86::avx512::quantize_blocks(xs, q.rows())
            };
        } else {
            quantize_blocks(xs, q.rows());
        }
        q
    }

    #[test]
    fn every_activation_quantizer_gives_identical_bits() {
        if !Isa::Avx512.is_supported() {
            eprintln!("skipped: no AVX-512");
            return;
        }
        let (cp, k) = (CHUNK * 37, 3);
        let xs = edge_rows(cp, k);
        for token in [false, true] {
            let (a, b) = (quantized(&xs, cp, k, false, token), quantized(&xs, cp, k, true, token));
            assert_eq!(&a.xq[..], &b.xq[..]);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a.sx), bits(&b.sx));
            assert_eq!(bits(&a.xhat), bits(&b.xhat));
            assert!(a.xhat.iter().all(|v| v.is_finite()));
            // Per row: one scale repeated over the row's blocks.
            assert_eq!(token, a.sx.chunks(37).all(|row| row.iter().all(|&s| s == row[0])));
        }
    }

    /// A non-finite value in any run of rows is found, and named by its row and column.
    #[test]
    fn check_finite_finds_a_value_in_any_run_of_rows() {
        let (rows, cols) = (5 * parallel::MIN_ROWS_PER_TASK + 1, 37);
        let mut x = vec![1.0f32; rows * cols];
        assert!(check_finite_on(4, "t", &x, cols).is_ok());
        for (at, bad) in [(0, f32::NAN), (rows * cols - 1, f32::INFINITY), (3 * cols * 16 + 5, f32::NEG_INFINITY)] {
            x[at] = bad;
            let e = check_finite_on(4, "t", &x, cols).expect_err("found").to_string();
            assert!(e.contains(&format!("({}, {})", at / cols, at % cols)), "{e}");
            x[at] = 1.0;
        }
    }

    /// Rows quantized in runs on the thread pool give the bits of one pass over every row.
    #[test]
    fn quantizing_rows_in_parallel_gives_the_same_bits() {
        let (cp, k) = (CHUNK * 5, 4 * parallel::MIN_ROWS_PER_TASK + 3);
        let xs = edge_rows(cp, k);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for (token, xhat) in [(false, true), (true, true), (false, false), (true, false)] {
            let fresh = || QuantActs {
                k,
                token,
                zcorr: Aligned::empty(),
                xq: Aligned::zeroed(k * cp),
                sx: vec![0.0; k * 5],
                gsum: Vec::new(),
                xhat: if xhat { Aligned::zeroed(k * cp) } else { Aligned::empty() },
            };
            let (mut a, mut b) = (fresh(), fresh());
            quantize_blocks_here(&xs, a.rows());
            quantize_rows(4, &xs, b.rows(), cp);
            assert_eq!(&a.xq[..], &b.xq[..], "token {token}");
            assert_eq!(bits(&a.sx), bits(&b.sx));
            assert_eq!(bits(&a.xhat), bits(&b.xhat));
        }
    }

    #[test]
    fn quantization_rounds_half_away_from_zero_and_zeroes_vanishing_blocks() {
        // 63.5 → 64, -63.5 → -64 in a block whose maximum is 127.
        let mut xs = vec![0.0f32; 2 * CHUNK];
        xs[..3].copy_from_slice(&[127.0, 63.5, -63.5]);
        // A block below ~3.7e-37 has no finite 1/s: zeros with scale 0, not codes off by up to 117 steps.
        xs[CHUNK] = 3e-38;
        let q = quantized(&xs, 2 * CHUNK, 1, false, false);
        assert_eq!(&q.xq[..3], &[127, 64, -64]);
        assert_eq!((q.sx[1], q.xq[CHUNK]), (0.0, 0));
        assert_eq!(block_scale(127.0), (1.0, 1.0));
    }

    /// Which float matvecs take the AVX-512 four-row groups: the density rule of `avx512::shares_x`.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn float_matvecs_share_activations_by_density_and_row_length() {
        use crate::formats::{Format, PackOptions};
        let pack = |rows: usize, cols: usize, density: f64, f: Format| {
            // Every `step`-th weight nonzero.
            let step = (1.0 / density).round() as usize;
            let w: Vec<f32> = (0..rows * cols).map(|i| if i % step == 0 { 1.0 } else { 0.0 }).collect();
            PackedMatrix::pack(&w, rows, cols, f, PackOptions::default()).unwrap()
        };
        for (rows, cols, density, f, shares) in [
            (8, 256, 0.1, Format::DenseF32, true),
            (8, 256, 0.1, Format::DenseBf16, true),
            (8, 2048, 0.5, Format::SparseF32, true),
            (8, 2048, 0.5, Format::SparseBf16, true),
            (8, 2048, 1.0 / 3.0, Format::SparseF32, false),
            (8, 4096, 1.0 / 3.0, Format::SparseBf16, true),
            (8, 4096, 0.2, Format::SparseF32, false),
            (8, 4096, 0.5, Format::SparseInt8, false),
        ] {
            let m = pack(rows, cols, density, f);
            assert_eq!(x86::avx512::shares_x(&m), shares, "{} {rows}x{cols} density {}", f.name(), m.density());
        }
    }

    /// The AMX kernels called directly (so this runs them wherever the CPU has AMX, whatever the dispatch
    /// threshold), full 16-row blocks and tails, both activation modes: within the summation-order budget of
    /// the exact `Σ ŵ·x̂`, and on tiled matrices the same bits as the VNNI kernels (the same exact integer sums
    /// and the same scaling).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn amx_rows_against_exact_sums_and_vnni() {
        use crate::formats::{Format, Layout, PackOptions};
        if !x86::amx::supported() {
            eprintln!("no AMX here: skipped");
            return;
        }
        let (rows, cols) = (70, 700);
        let mut s = 0x1234_5678u32;
        let mut rnd = move || {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            s as f32 / u32::MAX as f32 - 0.5
        };
        let w: Vec<f32> = (0..rows * cols).map(|_| if rnd() > 0.2 { 0.0 } else { rnd() }).collect();
        for (format, group) in [
            (Format::SparseInt8, None),
            (Format::SparseInt8, Some(64)),
            (Format::SparseInt8, Some(32)),
            (Format::SparseInt4, None),
            (Format::SparseInt4, Some(64)),
            (Format::SparseInt4, Some(128)),
            (Format::DenseInt8, None),
            (Format::DenseInt8, Some(128)),
            (Format::DenseInt8, Some(32)),
            (Format::DenseInt4, None),
            (Format::DenseInt4, Some(64)),
            (Format::DenseInt4, Some(32)),
            (Format::DenseInt4, Some(128)),
        ] {
            // Dense formats in both layouts: AMX gathers row-layout quads and expands tiled ones.
            let layouts: &[Layout] = if format.is_sparse() { &[Layout::Tiles] } else { &[Layout::Rows, Layout::Tiles] };
            for &layout in layouts {
                let opts = PackOptions { group_size: group, layout, ..Default::default() };
                let m = PackedMatrix::pack(&w, rows, cols, format, opts).unwrap();
                let dense = m.to_dense();
                for token in [false, true] {
                    assert!(x86::amx::supports(&m, token), "{format:?} {group:?}");
                    for k in [1, 8, 16, 21, 40] {
                        let xs: Vec<f32> =
                            (0..k * m.cols_pad).map(|i| if i % m.cols_pad < cols { rnd() } else { 0.0 }).collect();
                        let mut amx = vec![f32::NAN; k * rows];
                        let mut vnni = vec![f32::NAN; k * rows];
                        let q = quantize_activations_for(&m, &xs, k, Consumer::Codes, token);
                        run_rows(&m, k, &mut amx, x86::amx::rows, &q);
                        let q = quantize_activations_for(&m, &xs, k, Consumer::Vnni, token);
                        run_rows(&m, k, &mut vnni, x86::vnni::rows, &q);
                        let xhat = quantize_activations(&m, &xs, k, token).xhat;
                        for (i, (a, v)) in amx.iter().zip(&vnni).enumerate() {
                            let ctx = format!("{format:?} {group:?} {layout:?} token {token} k {k}: y[{i}]");
                            let (x, r) = (&xhat[i / rows * m.cols_pad..], i % rows);
                            let exact: f64 = (0..cols).map(|c| dense[r * cols + c] as f64 * x[c] as f64).sum();
                            let scale: f32 = (0..cols).map(|c| (dense[r * cols + c] * x[c]).abs()).sum();
                            let tol = crate::formats::budget::SUM_ORDER * scale + 1e-6;
                            assert!((*a as f64 - exact).abs() <= tol as f64, "{ctx}: {a} vs exact {exact} (tol {tol})");
                            if m.tiled {
                                assert_eq!(a.to_bits(), v.to_bits(), "{ctx}: {a} vs VNNI {v}");
                            }
                        }
                    }
                }
            }
        }
    }
}
