//! Pieces every SIMD path shares (x86 and aarch64): the scale mode a kernel is compiled for, a row's scale
//! pointers, the chunk-scale mode of the integer-activation kernels, and the per-mask-byte lookup tables of
//! the paths without an expand instruction.

use crate::formats::PackedMatrix;

/// Scale handling, chosen per matrix and compiled into the kernel: one scale per row (applied once to the
/// final sum; also used for float formats with scale 1), per group symmetric (`ŵ = d·q`), or per group
/// asymmetric (`ŵ = d·q + m`, masked so pruned lanes stay zero).
pub(crate) const ROW: u8 = 0;
pub(crate) const GRP: u8 = 1;
pub(crate) const ASYM: u8 = 2;

/// The scale mode of `m`.
pub(crate) fn scale_mode(m: &PackedMatrix) -> u8 {
    if m.asym {
        ASYM
    } else if m.group != 0 && m.group != m.cols_pad {
        GRP
    } else {
        ROW
    }
}

/// Scale parameters of one row: its scales and mins (f32, or f16 when the matrix's scales are half, see
/// [`PackedMatrix::half_scales`]), and log2 of the group size. The SIMD paths read them through [`RowScales::d`]
/// and [`RowScales::m`], or (x86) `x86::scale`, which converts with F16C.
pub(crate) struct RowScales {
    pub(crate) d: *const f32,
    pub(crate) m: *const f32,
    pub(crate) d16: *const u16,
    pub(crate) m16: *const u16,
    pub(crate) half: bool,
    pub(crate) shift: u32,
}

impl RowScales {
    pub(crate) fn of(m: &PackedMatrix, r: usize) -> RowScales {
        let g = m.groups();
        debug_assert!(m.group == 0 || m.group.is_power_of_two() || m.group == m.cols_pad);
        RowScales {
            d: m.scales.as_ptr().wrapping_add(r * g),
            m: m.mins.as_ptr().wrapping_add(r * g),
            d16: m.scales16.as_ptr().wrapping_add(r * g),
            m16: m.mins16.as_ptr().wrapping_add(r * g),
            half: m.half,
            shift: m.group.trailing_zeros(),
        }
    }

    /// Scale `g` of the row (the caller keeps `g` inside the row's groups).
    #[inline(always)]
    #[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
    pub(crate) unsafe fn d(&self, g: usize) -> f32 {
        if self.half {
            crate::formats::f16_to_f32(*self.d16.add(g))
        } else {
            *self.d.add(g)
        }
    }

    /// Minimum `g` of the row (asymmetric matrices).
    #[inline(always)]
    #[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
    pub(crate) unsafe fn m(&self, g: usize) -> f32 {
        if self.half {
            crate::formats::f16_to_f32(*self.m16.add(g))
        } else {
            *self.m.add(g)
        }
    }
}

/// The integer weight formats as the integer-activation kernels' const parameters (stable Rust takes no enum
/// there), one code per integer [`crate::Format`], chosen by an exhaustive `match` on the format where a kernel
/// dispatches; a kernel's own row sources (expanded or unpacked copies of a row) take codes from
/// [`KERNEL_CODES`] up.
pub(crate) const DI8: u8 = 0;
pub(crate) const SI8: u8 = 1;
pub(crate) const DI4: u8 = 2;
// The NEON kernels unpack sparse int4 rows before reading them, so only the x86 ones read this code.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) const SI4: u8 = 3;
/// The first code a kernel may give its own row sources.
pub(crate) const KERNEL_CODES: u8 = 4;

/// Chunk scales from two 32-column weight groups: the third chunk-scale mode of the integer-activation kernels.
pub(crate) const GRP32: u8 = 3;

/// How the integer-activation kernels form a chunk's scale, fixed per kernel instantiation (so the chunk loop
/// carries no run-time test): per row (`ROW`), per group of >= 64 columns (`GRP`), or two 32-column groups per chunk
/// ([`GRP32`]).
#[cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(dead_code))]
pub(crate) fn chunk_scaling(m: &PackedMatrix) -> u8 {
    match scale_mode(m) {
        ROW => ROW,
        _ if m.group >= crate::formats::CHUNK => GRP,
        _ => GRP32,
    }
}

/// Calls a kernel with the chunk-scale mode `$scaling` (`ROW`, `GRP` or [`GRP32`], see [`chunk_scaling`]) as its
/// last const parameter.
macro_rules! by_scaling {
    ($scaling:expr, $f:ident::<$($g:tt),*>($($arg:expr),*)) => {
        match $scaling {
            crate::kernels::simd::ROW => $f::<$($g,)* { crate::kernels::simd::ROW }>($($arg),*),
            crate::kernels::simd::GRP => $f::<$($g,)* { crate::kernels::simd::GRP }>($($arg),*),
            _ => $f::<$($g,)* { crate::kernels::simd::GRP32 }>($($arg),*),
        }
    };
}
pub(crate) use by_scaling;

/// The stored bytes of sparse int4 row `r` (row layout): `⌈count / 2⌉` per chunk, the nibble unpackers' length.
#[cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(dead_code))]
pub(crate) fn sparse_int4_row_bytes(m: &PackedMatrix, r: usize) -> usize {
    // Row layouts end with the offset past the last row.
    let bytes = m.row_offsets[r + 1] - m.row_offsets[r];
    debug_assert_eq!(
        bytes,
        m.masks[r * m.chunks()..(r + 1) * m.chunks()]
            .iter()
            .map(|w| (w.count_ones() as usize).div_ceil(2))
            .sum::<usize>()
    );
    bytes
}

/// Row `[c][b]`: per mask byte `b`, `c` plus the rank of each set bit among the byte's set bits, and 0xC0 in the
/// clear lanes: the byte-shuffle control (`pshufb` / `tbl`) of eight columns whose values start `c` (0-8) values
/// into their 16-column half. Both instructions give 0 for the clear marker.
#[repr(align(8))]
pub(crate) struct RanksAfter(pub(crate) [[[u8; 8]; 256]; 9]);

pub(crate) static RANKS_AFTER: RanksAfter = RanksAfter(ranks_after());

const fn ranks_after() -> [[[u8; 8]; 256]; 9] {
    let mut t = [[[0xC0u8; 8]; 256]; 9];
    let mut c = 0;
    while c < 9 {
        let mut b = 0;
        while b < 256 {
            let (mut lane, mut rank) = (0, 0);
            while lane < 8 {
                if b >> lane & 1 == 1 {
                    t[c][b][lane] = (c + rank) as u8;
                    rank += 1;
                }
                lane += 1;
            }
            b += 1;
        }
        c += 1;
    }
    t
}

/// For each mask byte, a byte-shuffle control (`pshufb` / `tbl`) that moves packed value `rank` (of `width`
/// bytes) into each set lane of 8. Unused and clear lanes hold 0xFF, which both instructions turn into zero.
pub(crate) const fn expand_table<const N: usize>(width: usize) -> [[u8; N]; 256] {
    let mut t = [[0xFFu8; N]; 256];
    let mut b = 0;
    while b < 256 {
        let (mut lane, mut rank) = (0, 0);
        while lane < 8 {
            if b >> lane & 1 == 1 {
                let mut k = 0;
                while k < width {
                    t[b][lane * width + k] = (rank * width + k) as u8;
                    k += 1;
                }
                rank += 1;
            }
            lane += 1;
        }
        b += 1;
    }
    t
}

/// Defines an f32-activation path's entry point `rows` and its per-row dispatch `row` over every format and
/// scale mode, for the kernels the path defines under the shared names (`dense_f32_f32`, ...,
/// `sparse_int4_f32::<NR, MODE>`, each returning the path's `Acc<NR>`). `$features` are the path's target
/// features; `|$acc| $sum` reduces one activation row's accumulators to its dot product.
macro_rules! f32_row_kernels {
    ($features:literal, |$acc:ident| $sum:expr) => {
        /// Computes rows `r0..r1` for `k` activation rows: four at a time, then one at a time.
        ///
        /// # Safety
        /// The CPU must support the enabled features; `xs` holds `k × cols_pad` floats; `y` is valid for
        /// writes at `a·rows + r` for every `a < k` and `r0 <= r < r1`.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn rows(m: &PackedMatrix, r0: usize, r1: usize, xs: &[f32], k: usize, y: *mut f32) {
            debug_assert!(xs.len() >= k * m.cols_pad);
            for r in r0..r1 {
                let mut a = 0;
                while a + 4 <= k {
                    row::<4>(m, r, xs, a, y);
                    a += 4;
                }
                while a < k {
                    row::<1>(m, r, xs, a, y);
                    a += 1;
                }
            }
        }

        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn row<const NR: usize>(m: &PackedMatrix, r: usize, xs: &[f32], a0: usize, y: *mut f32) {
            let xp: [*const f32; NR] = core::array::from_fn(|a| xs.as_ptr().add((a0 + a) * m.cols_pad));
            let mode = scale_mode(m);
            let acc: Acc<NR> = match (m.format, mode) {
                (Format::DenseF32, _) => dense_f32_f32(m, r, &xp),
                (Format::DenseBf16, _) => dense_bf16_f32(m, r, &xp),
                (Format::DenseInt8, ROW) => dense_int8_f32::<NR, ROW>(m, r, &xp),
                (Format::DenseInt8, _) => dense_int8_f32::<NR, GRP>(m, r, &xp),
                (Format::DenseInt4, ROW) => dense_int4_f32::<NR, ROW>(m, r, &xp),
                (Format::DenseInt4, GRP) => dense_int4_f32::<NR, GRP>(m, r, &xp),
                (Format::DenseInt4, _) => dense_int4_f32::<NR, ASYM>(m, r, &xp),
                (Format::SparseF32, _) => sparse_f32_f32(m, r, &xp),
                (Format::SparseBf16, _) => sparse_bf16_f32(m, r, &xp),
                (Format::SparseInt8, ROW) => sparse_int8_f32::<NR, ROW>(m, r, &xp),
                (Format::SparseInt8, _) => sparse_int8_f32::<NR, GRP>(m, r, &xp),
                (Format::SparseInt4, ROW) => sparse_int4_f32::<NR, ROW>(m, r, &xp),
                (Format::SparseInt4, GRP) => sparse_int4_f32::<NR, GRP>(m, r, &xp),
                (Format::SparseInt4, _) => sparse_int4_f32::<NR, ASYM>(m, r, &xp),
            };
            let scale = if mode == ROW && m.group != 0 { m.scales[r] } else { 1.0 };
            for (a, $acc) in acc.iter().enumerate() {
                *y.add((a0 + a) * m.rows + r) = $sum * scale;
            }
        }
    };
}
pub(crate) use f32_row_kernels;
