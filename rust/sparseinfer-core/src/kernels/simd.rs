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
