//! Pieces every SIMD path shares (x86 and aarch64): the scale mode a kernel is compiled for, a row's scale
//! pointers, and the per-mask-byte lookup tables of the paths without an expand instruction.

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

/// Scale parameters of one row: its scales and mins, and log2 of the group size.
pub(crate) struct RowScales {
    pub(crate) d: *const f32,
    pub(crate) m: *const f32,
    pub(crate) shift: u32,
}

impl RowScales {
    pub(crate) fn of(m: &PackedMatrix, r: usize) -> RowScales {
        let g = m.groups();
        debug_assert!(m.group == 0 || m.group.is_power_of_two() || m.group == m.cols_pad);
        RowScales {
            d: m.scales.as_ptr().wrapping_add(r * g),
            m: m.mins.as_ptr().wrapping_add(r * g),
            shift: m.group.trailing_zeros(),
        }
    }
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
