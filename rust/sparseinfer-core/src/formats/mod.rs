//! Weight formats: how a 2-D weight `W[out, in]` (row-major, `y = W @ x`) is packed in memory.
//!
//! Every format stores rows padded to `cols_pad` columns (a multiple of 64, and of the scale group) so the
//! SIMD kernels never need a column tail; the activation vector is zero-padded to match.
//!
//! ```text
//! dense-f32   row r: cols_pad × f32                      (4 B/weight)
//! dense-bf16  row r: cols_pad × bf16 (upper half of f32)  (2 B/weight)
//! dense-int8  row r: cols_pad × i8,  scales[r, g] f32      (1 B/weight + 4/G)
//! dense-int4  row r: cols_pad/2 bytes, 32 per 64-column chunk c:
//!               byte 32c + j = col 64c + j (low nibble) | col 64c + 32 + j (high nibble), j < 32
//!             nibble = q + 8 (symmetric, q in -8..=7) or q (asymmetric, q in 0..=15, w = d·q + m)
//!             scales[r, g] (and mins[r, g]) f32, and as f16 for the kernels when every one is an f16 value
//!             (halves rather than neighbours: a chunk decodes with one broadcast and one GF2P8AFFINEQB on
//!             AVX-512, and with an AND and a shift on AVX2 and NEON, without interleaving shuffles)
//!
//! sparse-*    masks[r, c]: u64, bit j set  <=>  column 64c + j is stored (nonzero)
//!             values: the stored weights of row r, in column order, starting at byte row_offsets[r]
//!               f32 / bf16 / i8: one element per set bit, back to back
//!               int4: per 64-column chunk, ceil(n/2) bytes (n = popcount of that chunk's mask), low nibble
//!                     first, so every chunk starts on a byte boundary
//! ```
//! The symmetric integer formats, dense and sparse, may instead be tiled: 16 rows interleaved per 4 columns,
//! for the AVX-512 VNNI and AMX kernels ([`tiles`] has the diagram). [`Layout`] picks one at pack time; a tiled matrix builds its row-layout
//! twin ([`PackedMatrix::row_major`]) the first time a kernel that reads rows needs it.
//!
//! A sparse int8 matrix that the AVX2 matvec reads by gathering also keeps, beside its masks, each value's
//! position in its chunk and each chunk's count (`Positions`, built on first use, or ahead by `kernels::prepare`,
//! which loading calls). A sparse int4 one keeps each value's code beside its column in its 16-column group
//! instead (`ColumnCodes`, built the same way).
//!
//! The sparse mask is bit-compatible with the on-disk `bitmask` (uint8 `[rows, ceil(cols/8)]`, little-endian
//! bit order): byte `k` of mask word `c` is on-disk byte `8c + k`. `values` ends with [`VALUE_PAD`] zero bytes
//! so kernels may load a full vector past a row's last value.
//!
//! Quantization is round-to-nearest on a grid fitted per group. int8: `d = absmax / 127`, `q = round(w / d)`
//! in -127..=127. int4 searches a few grids around the max-based one (symmetric: `|d| = absmax / 7 ... / 9`
//! with either sign of `d`, so the group's extreme may take code -8; asymmetric: `d = (max - min) / 15`,
//! `m = min` with either end pulled in by a fraction of a step), refits the best by least squares to its own
//! codes, and keeps the grid with the least squared error whose worst weight stays within
//! [`budget::INT4_FIT`] max-based steps; `ŵ = d·q` or `d·q + m`. Statistics use the real columns only (and,
//! for sparse formats, only the stored nonzeros). A stored weight that rounds to code 0 stays in the mask and
//! decodes to 0 (symmetric), so a pruned weight always decodes to 0 but a stored one may too (as in the
//! checkpoints `sparseinfer.training` exports, which drop such weights from the mask).

mod pack;
mod raw;
pub mod tiles;

pub(crate) use pack::packing_alone;
pub use pack::{GivenScales, Layout, PackOptions, GROUP_SIZES, INT4_DEFAULT_GROUP};
pub use raw::RawMatrix;

use crate::error::{Error, Result};

/// Bytes of zeros after the last stored value, so a kernel may read one full 64-byte vector past it.
pub const VALUE_PAD: usize = 64;

/// Columns per mask word, and the unit every row is padded to.
pub const CHUNK: usize = 64;

/// The weight formats. Names (see [`Format::name`]) are the stable strings used by Python and the CLI.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    /// Every weight as f32.
    DenseF32,
    /// Every weight as bf16.
    DenseBf16,
    /// Every weight as symmetric int8 with an f32 scale per row or per group.
    DenseInt8,
    /// Every weight as int4 per group, symmetric or asymmetric, f16 scales (f32 where a checkpoint's scales need
    /// them; [`PackedMatrix::half_scales`]).
    DenseInt4,
    /// 1-bit mask + nonzero f32 values.
    SparseF32,
    /// 1-bit mask + nonzero bf16 values.
    SparseBf16,
    /// 1-bit mask + nonzero symmetric int8 values with per-row or per-group scales.
    SparseInt8,
    /// 1-bit mask + nonzero int4 values per group.
    SparseInt4,
}

/// The element encoding of a format, independent of sparsity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Elem {
    /// 32-bit float.
    F32,
    /// bfloat16.
    Bf16,
    /// Signed 8-bit integer with scales.
    I8,
    /// 4-bit integer with scales (and mins when asymmetric).
    I4,
}

/// What the crate needs to know of one format: its name, element, sparsity, and what the runtime pairs with
/// it. The table of formats is [`Format::traits`]: a new format is a variant and one entry there (the match
/// fails to compile without it), and the `match`es on [`Format`] and [`Elem`] elsewhere (kernel dispatch,
/// value decoding) are exhaustive too, so no case is left to a catch-all.
#[derive(Debug)]
pub struct FormatTraits {
    /// The stable name used by Python and the CLI, e.g. `"sparse-int8"`.
    pub name: &'static str,
    /// The element encoding of its values.
    pub elem: Elem,
    /// Whether it stores a mask and only the nonzeros.
    pub sparse: bool,
    /// The format of the head (lm_head) beside linear layers in this one: dense, as the paper keeps it; f32/bf16
    /// for float formats, int8 per row for integer ones (an int4 head costs more accuracy than it saves time on
    /// small models).
    pub head: Format,
}

impl Format {
    /// Every format, in a fixed order.
    pub const ALL: [Format; 8] = [
        Format::DenseF32,
        Format::DenseBf16,
        Format::DenseInt8,
        Format::DenseInt4,
        Format::SparseF32,
        Format::SparseBf16,
        Format::SparseInt8,
        Format::SparseInt4,
    ];

    /// The format's entry in the table of formats.
    pub fn traits(self) -> &'static FormatTraits {
        use Elem::*;
        match self {
            Format::DenseF32 => &FormatTraits { name: "dense-f32", elem: F32, sparse: false, head: Format::DenseF32 },
            Format::DenseBf16 => {
                &FormatTraits { name: "dense-bf16", elem: Bf16, sparse: false, head: Format::DenseBf16 }
            }
            Format::DenseInt8 => &FormatTraits { name: "dense-int8", elem: I8, sparse: false, head: Format::DenseInt8 },
            Format::DenseInt4 => &FormatTraits { name: "dense-int4", elem: I4, sparse: false, head: Format::DenseInt8 },
            Format::SparseF32 => &FormatTraits { name: "sparse-f32", elem: F32, sparse: true, head: Format::DenseF32 },
            Format::SparseBf16 => {
                &FormatTraits { name: "sparse-bf16", elem: Bf16, sparse: true, head: Format::DenseBf16 }
            }
            Format::SparseInt8 => {
                &FormatTraits { name: "sparse-int8", elem: I8, sparse: true, head: Format::DenseInt8 }
            }
            Format::SparseInt4 => {
                &FormatTraits { name: "sparse-int4", elem: I4, sparse: true, head: Format::DenseInt8 }
            }
        }
    }

    /// The format with this element and sparsity.
    pub fn of(elem: Elem, sparse: bool) -> Format {
        Format::ALL.into_iter().find(|f| f.elem() == elem && f.is_sparse() == sparse).expect("one format per pair")
    }

    /// The stable name, e.g. `"sparse-int8"`.
    pub fn name(self) -> &'static str {
        self.traits().name
    }

    /// Parses a stable name; the error lists every valid name.
    pub fn from_name(name: &str) -> Result<Format> {
        Format::ALL.into_iter().find(|f| f.name() == name).ok_or_else(|| {
            let names: Vec<_> = Format::ALL.iter().map(|f| f.name()).collect();
            Error::invalid("format", format!("unknown format {name:?}; expected one of {}", names.join(", ")))
        })
    }

    /// Whether the format stores a mask and only the nonzeros.
    pub fn is_sparse(self) -> bool {
        self.traits().sparse
    }

    /// The element encoding.
    pub fn elem(self) -> Elem {
        self.traits().elem
    }
}

impl Elem {
    /// Bits of one stored value.
    pub fn bits(self) -> u32 {
        match self {
            Elem::F32 => 32,
            Elem::Bf16 => 16,
            Elem::I8 => 8,
            Elem::I4 => 4,
        }
    }

    /// Whether values are integer codes with scales (int8, int4), which the int8-activation kernels read.
    pub fn is_int(self) -> bool {
        matches!(self, Elem::I8 | Elem::I4)
    }

    /// Bytes of `n` values stored back to back (int4: two per byte, the last byte padded).
    pub fn bytes(self, n: usize) -> usize {
        (n * self.bits() as usize).div_ceil(8)
    }
}

/// A dense int4 row's bytes from its `cols_pad` nibbles in column order: per 64-column chunk, byte j holds
/// column j (low nibble) and column j + 32 (high nibble).
pub(crate) fn dense_int4_bytes(nibbles: &[u8]) -> impl Iterator<Item = u8> + '_ {
    nibbles.chunks_exact(CHUNK).flat_map(|ch| {
        let (lo, hi) = ch.split_at(CHUNK / 2);
        lo.iter().zip(hi).map(|(&l, &h)| l | (h << 4))
    })
}

/// Column `c`'s nibble of a dense int4 row's bytes `row` ([`dense_int4_bytes`]).
pub(crate) fn dense_int4_nibble(row: &[u8], c: usize) -> u8 {
    let b = row[c / CHUNK * (CHUNK / 2) + c % (CHUNK / 2)];
    if c % CHUNK < CHUNK / 2 {
        b & 0xF
    } else {
        b >> 4
    }
}

/// A packed weight matrix, ready for the kernels. Immutable once built; cheap to share behind an `Arc`.
#[derive(Clone, Debug)]
pub struct PackedMatrix {
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) cols_pad: usize,
    pub(crate) format: Format,
    /// Columns per scale group for integer formats (`cols_pad` means one scale per row); 0 for float formats.
    pub(crate) group: usize,
    pub(crate) asym: bool,
    /// Packed values (dense: `rows × row_bytes`, tiled: whole tiles of 16 rows; sparse: see module docs), then
    /// [`VALUE_PAD`] zero bytes.
    pub(crate) data: Vec<u8>,
    /// Sparse: `rows × cols_pad/64` mask words (tiled: `tiles × cols_pad/4`, [`PackedMatrix::tile_masks`]). A
    /// tiled dense matrix keeps one tile's, every bit set; a dense row-layout one none.
    pub(crate) masks: Vec<u64>,
    /// Sparse: `rows + 1` byte offsets into `data`; tiled (sparse or dense): one per tile, plus one.
    pub(crate) row_offsets: Vec<usize>,
    /// Whether `data`, `masks` and `row_offsets` hold the tiled layout ([`tiles`]) instead of rows.
    pub(crate) tiled: bool,
    /// Tiled with scale groups: each tile's scales, group by group, 16 rows each ([`tiles`]); empty when the
    /// scales are half ([`PackedMatrix::half_scales`]), which keeps them in `tile_scales16` instead.
    pub(crate) tile_scales: Vec<f32>,
    /// Tiled with half scales: `tile_scales` as f16.
    pub(crate) tile_scales16: Vec<u16>,
    /// Tiled int4: per tile, whether every quad holds <= 32 values (its pairs load 32 bytes; [`tiles`]).
    pub(crate) tile_narrow: Vec<bool>,
    /// Tiled only: the row-layout copy, built on first use by a kernel that reads rows.
    pub(crate) row_twin: std::sync::OnceLock<Box<PackedMatrix>>,
    /// Sparse int8, row layout: where each stored value sits in its chunk ([`Positions`]), in each encoding
    /// (plain, blend), built on first use by a kernel that gathers activations instead of expanding masks.
    pub(crate) positions: [std::sync::OnceLock<Positions>; 2],
    /// Sparse int4, row layout: each stored value's code beside its column ([`ColumnCodes`]), built on first use
    /// by a kernel that gathers activations instead of expanding masks.
    pub(crate) column_codes: std::sync::OnceLock<ColumnCodes>,
    /// Integer formats: `rows × groups` scales, unless they are half (then empty: [`PackedMatrix::scale_at`]
    /// reads the f16 copy, and [`PackedMatrix::scales_f32`] restates them all).
    pub(crate) scales: Vec<f32>,
    /// Asymmetric only: `rows × groups` minimums (`ŵ = d·q + m`); empty when half, as `scales`.
    pub(crate) mins: Vec<f32>,
    /// Whether the scales (and minimums) are half: the matrix has scale groups and every scale and minimum is
    /// an f16 value (as packing fits int4 grids). They are then kept as f16 alone (`scales16`/`mins16`, or
    /// `tile_scales16` and `mins16` when tiled), which the integer-activation kernels read directly: an f32 copy
    /// beside them would take twice their bytes again (an eighth of a byte per weight at 32-column groups) and
    /// hold nothing more. A checkpoint's scales that f16 cannot hold exactly stay f32 throughout.
    pub(crate) half: bool,
    /// Half scales: `rows × groups` scales as f16 (row layout; a tiled matrix keeps `tile_scales16` instead)
    /// and minimums (both layouts); empty otherwise.
    pub(crate) scales16: Vec<u16>,
    pub(crate) mins16: Vec<u16>,
    pub(crate) nnz: usize,
}

impl PackedMatrix {
    /// Packs a dense row-major `rows × cols` f32 matrix. Zeros are the pruned weights for sparse formats.
    pub fn pack(w: &[f32], rows: usize, cols: usize, format: Format, opts: PackOptions) -> Result<Self> {
        pack::pack(w, rows, cols, format, opts)
    }

    /// Packs with scales given per (row, group) instead of fitted ones ([`GivenScales`]). A checkpoint that
    /// stores `W = scale · q` packs back to exactly its codes `q`. Integer formats.
    pub fn pack_with_scales(
        w: &[f32],
        rows: usize,
        cols: usize,
        format: Format,
        opts: PackOptions,
        grid: GivenScales,
    ) -> Result<Self> {
        pack::pack_impl(w, rows, cols, format, opts, Some(grid))
    }

    /// Output features (rows of `W`).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features (columns of `W`).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Columns after padding; activations are zero-padded to this length.
    pub fn cols_pad(&self) -> usize {
        self.cols_pad
    }

    /// The format.
    pub fn format(&self) -> Format {
        self.format
    }

    /// Columns per scale group (`None` for float formats and for per-row scales).
    pub fn group_size(&self) -> Option<usize> {
        (self.group != 0 && self.group != self.cols_pad).then_some(self.group)
    }

    /// Whether int4 values are asymmetric (`ŵ = d·q + m`).
    pub fn asymmetric(&self) -> bool {
        self.asym
    }

    /// The in-memory layout: [`Layout::Rows`] or [`Layout::Tiles`].
    pub fn layout(&self) -> Layout {
        if self.tiled {
            Layout::Tiles
        } else {
            Layout::Rows
        }
    }

    /// Tile `t`'s mask words, one per quad (tiled only): a sparse matrix's own, a dense one's every bit set.
    pub(crate) fn tile_masks(&self, t: usize) -> &[u64] {
        debug_assert!(self.tiled);
        let quads = self.cols_pad / tiles::QUAD;
        let at = if self.format.is_sparse() { t * quads } else { 0 };
        &self.masks[at..at + quads]
    }

    /// This matrix in the row layout: itself, or (tiled) its row-layout twin, built once on first use.
    pub fn row_major(&self) -> &PackedMatrix {
        if self.tiled {
            self.row_twin.get_or_init(|| Box::new(tiles::untile(self)))
        } else {
            self
        }
    }

    /// Each stored value's position in its chunk and each chunk's count ([`Positions`]; sparse int8, row
    /// layout), in the plain or the `blend` encoding, built once on first use.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn positions(&self, blend: bool) -> &Positions {
        debug_assert!(!self.tiled && self.format == Format::SparseInt8);
        self.positions[blend as usize].get_or_init(|| Positions::of(self, blend))
    }

    /// Each stored value's code beside its column in its 16-column group ([`ColumnCodes`]; sparse int4, row
    /// layout), built once on first use.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn column_codes(&self) -> &ColumnCodes {
        debug_assert!(!self.tiled && self.format == Format::SparseInt4 && !self.asym);
        self.column_codes.get_or_init(|| ColumnCodes::of(self))
    }

    /// Mean stored values per 64-column chunk (sparse formats).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn mean_chunk_count(&self) -> f64 {
        self.nnz as f64 / (self.rows * self.chunks()).max(1) as f64
    }

    /// A matrix of this shape, format and scale grouping with nothing packed yet.
    pub(crate) fn unpacked(
        rows: usize,
        cols: usize,
        cols_pad: usize,
        format: Format,
        group: usize,
        asym: bool,
    ) -> Self {
        PackedMatrix {
            rows,
            cols,
            cols_pad,
            format,
            group,
            asym,
            data: Vec::new(),
            masks: Vec::new(),
            row_offsets: Vec::new(),
            tiled: false,
            tile_scales: Vec::new(),
            tile_scales16: Vec::new(),
            tile_narrow: Vec::new(),
            row_twin: Default::default(),
            positions: Default::default(),
            column_codes: Default::default(),
            scales: Vec::new(),
            mins: Vec::new(),
            half: false,
            scales16: Vec::new(),
            mins16: Vec::new(),
            nnz: 0,
        }
    }

    /// Everything but the packed values, masks, offsets and tile data (which are left empty), the scales as
    /// f32 (`derive_scales` makes them half again).
    pub(crate) fn clone_meta(&self) -> PackedMatrix {
        PackedMatrix {
            scales: self.scales_f32().into_owned(),
            mins: self.mins_f32().into_owned(),
            nnz: self.nnz,
            ..Self::unpacked(self.rows, self.cols, self.cols_pad, self.format, self.group, self.asym)
        }
    }

    /// Stored (nonzero for sparse formats) weights divided by `rows × cols`.
    pub fn density(&self) -> f64 {
        self.nnz as f64 / (self.rows as f64 * self.cols as f64)
    }

    /// Bytes a matvec with integer activations reads: values, masks, row (or tile) offsets (as u32, as on
    /// disk), scales and mins (a tiled matrix with scale groups reads its tile scales instead; half scales
    /// take two bytes each). Where the matrix's `Positions` have been built, a matvec reads them and the
    /// chunk counts instead of the masks; where its `ColumnCodes` have, it reads them and their counts instead
    /// of the values and the masks. Excludes the trailing pad, which is never multiplied, and a tiled
    /// matrix's row-layout twin.
    pub fn nbytes(&self) -> usize {
        // A tiled dense matrix's offsets and full masks follow from its shape; its kernels read neither.
        // A gathering kernel reads one encoding of the positions in place of the masks.
        // One restating its values with their columns reads them in place of the values and the masks.
        let (offsets, masks) = match self.positions.iter().find_map(|p| p.get()) {
            Some(p) => (4 * self.row_offsets.len(), p.at.len() - VALUE_PAD + p.counts.len()),
            None if self.format.is_sparse() => (4 * self.row_offsets.len(), 8 * self.masks.len()),
            None => (0, 0),
        };
        let (values, offsets, masks) = match self.column_codes.get() {
            Some(c) => (c.at.len() - VALUE_PAD, 4 * c.starts.len(), c.counts.len()),
            None => (self.data.len() - VALUE_PAD, offsets, masks),
        };
        let scales = if self.tiled && self.groups() > 1 {
            4 * self.tile_scales.len() + 2 * self.tile_scales16.len()
        } else if self.half {
            2 * (self.scales16.len() + self.mins16.len())
        } else {
            4 * (self.scales.len() + self.mins.len())
        };
        values + masks + offsets + scales
    }

    /// Whether the scales are half: the matrix has scale groups and every scale and minimum is an f16 value, so
    /// the kernels read them in two bytes each (the `half` field says more).
    pub fn half_scales(&self) -> bool {
        self.half
    }

    /// Derives what the kernels read from the scales and minimums: whether they are half, their f16 copies
    /// (which then replace the f32 ones), and (tiled) the tile scales. Every constructor ends with it; it may
    /// run again on a matrix whose scales are half already.
    pub(crate) fn derive_scales(&mut self) {
        let (scales, mins) = if self.half {
            (self.scales_f32().into_owned(), self.mins_f32().into_owned())
        } else {
            (std::mem::take(&mut self.scales), std::mem::take(&mut self.mins))
        };
        let halves = |v: &[f32]| v.iter().map(|&x| f16_of(x)).collect::<Option<Vec<u16>>>();
        let grouped = self.format.elem().is_int() && self.groups() > 1;
        let half = if grouped { halves(&scales).zip(halves(&mins)) } else { None };
        self.half = half.is_some();
        (self.scales16, self.mins16, self.tile_scales, self.tile_scales16) = Default::default();
        let tile = if self.tiled { tiles::tile_scales(self, &scales) } else { Vec::new() };
        match half {
            Some((d, m)) => {
                if self.tiled {
                    self.tile_scales16 = tile.iter().map(|&x| f16_round(x)).collect();
                } else {
                    self.scales16 = d;
                }
                self.mins16 = m;
                (self.scales, self.mins) = Default::default();
            }
            None => (self.scales, self.mins, self.tile_scales) = (scales, mins, tile),
        }
    }

    /// Scale `i` (`r · groups + g`: row `r`, group `g`) of an integer matrix, from whichever copy it keeps.
    pub(crate) fn scale_at(&self, i: usize) -> f32 {
        if !self.half {
            self.scales[i]
        } else if self.tiled {
            let (groups, r) = (self.groups(), i / self.groups());
            f16_to_f32(self.tile_scales16[((r / tiles::TILE) * groups + i % groups) * tiles::TILE + r % tiles::TILE])
        } else {
            f16_to_f32(self.scales16[i])
        }
    }

    /// Minimum `i` (as [`PackedMatrix::scale_at`]) of an asymmetric integer matrix.
    pub(crate) fn min_at(&self, i: usize) -> f32 {
        if self.half {
            f16_to_f32(self.mins16[i])
        } else {
            self.mins[i]
        }
    }

    /// Every scale as f32, `rows × groups` (borrowed unless they are half).
    pub(crate) fn scales_f32(&self) -> std::borrow::Cow<'_, [f32]> {
        if self.half {
            let n = self.rows * self.groups();
            std::borrow::Cow::Owned((0..n).map(|i| self.scale_at(i)).collect())
        } else {
            std::borrow::Cow::Borrowed(&self.scales)
        }
    }

    /// Every minimum as f32 (asymmetric; empty otherwise), as [`PackedMatrix::scales_f32`].
    pub(crate) fn mins_f32(&self) -> std::borrow::Cow<'_, [f32]> {
        if self.half {
            std::borrow::Cow::Owned(self.mins16.iter().map(|&h| f16_to_f32(h)).collect())
        } else {
            std::borrow::Cow::Borrowed(&self.mins)
        }
    }

    /// Scale groups per row.
    pub(crate) fn groups(&self) -> usize {
        self.cols_pad.checked_div(self.group).unwrap_or(0)
    }

    /// Mask words per row.
    pub(crate) fn chunks(&self) -> usize {
        self.cols_pad / CHUNK
    }

    /// Bytes of one dense row.
    pub(crate) fn dense_row_bytes(&self) -> usize {
        self.format.elem().bytes(self.cols_pad)
    }

    /// Byte offset of row `r`'s values in `data` (row layout only).
    pub(crate) fn row_start(&self, r: usize) -> usize {
        debug_assert!(!self.tiled);
        if self.format.is_sparse() {
            self.row_offsets[r]
        } else {
            r * self.dense_row_bytes()
        }
    }

    /// Dequantizes the whole matrix to row-major `rows × cols` f32 (the reference decoder).
    pub fn to_dense(&self) -> Vec<f32> {
        let mut out = vec![0.0f32; self.rows * self.cols];
        let mut row = vec![0.0f32; self.cols_pad];
        for r in 0..self.rows {
            crate::kernels::reference::decode_row(self, r, &mut row);
            out[r * self.cols..(r + 1) * self.cols].copy_from_slice(&row[..self.cols]);
        }
        out
    }
}

/// A sparse int8 matrix's masks restated for kernels that gather activations by position (decode on AVX2):
/// `at[o]` is the column `p` within its chunk (0-63) of the value at `data[o]`, so both are read at one
/// offset, and `counts[r · chunks + c]` is chunk `c`'s popcount. `at` holds `p` as it is, or (`blend`) with
/// bits 4 and 5 moved to 6 and 7: `(p & 15) | (p & 0x30) << 2`, the form the blend lookups read
/// (`x86::avx2_int::lookup64`). It costs a byte per stored value and one per chunk
/// beside the masks (which the other kernels keep reading). `at` ends with [`VALUE_PAD`] zeros, as `data`.
#[derive(Clone, Debug)]
pub(crate) struct Positions {
    pub(crate) at: Vec<u8>,
    pub(crate) counts: Vec<u8>,
}

impl Positions {
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn of(m: &PackedMatrix, blend: bool) -> Positions {
        let chunks = m.chunks();
        let mut at = vec![0u8; m.data.len()];
        let mut counts = vec![0u8; m.masks.len()];
        for (r, (masks, counts)) in m.masks.chunks_exact(chunks).zip(counts.chunks_exact_mut(chunks)).enumerate() {
            let mut o = m.row_start(r);
            for (&mask, count) in masks.iter().zip(counts) {
                let mut w = mask;
                *count = w.count_ones() as u8;
                while w != 0 {
                    let p = w.trailing_zeros() as u8;
                    at[o] = if blend { (p & 15) | (p & 0x30) << 2 } else { p };
                    o += 1;
                    w &= w - 1;
                }
            }
        }
        Positions { at, counts }
    }
}

/// Columns per group of [`ColumnCodes`]: the activations one 128-bit `vpshufb` looks up from.
pub(crate) const CODE_GROUP: usize = 16;

/// A symmetric sparse int4 matrix restated for kernels that gather activations (decode on AVX2): one byte per
/// stored value, its column within its [`CODE_GROUP`]-column group in the high nibble and its code `n = q + 8`
/// in the low, each group's values in column order and the groups in order; `counts[r · cols_pad / 16 + g]`
/// is group `g`'s count (0-16) and `starts[r]` row `r`'s first byte. A lookup of a group's 16 activations by
/// the high nibbles finds every value's activation with no mask decoded and nothing unpacked, for a byte per
/// value and one per 16 columns in place of the half byte per value and the bit per column that the
/// expanding kernels (which keep reading those) take. `at` ends with [`VALUE_PAD`] zeros.
#[derive(Clone, Debug)]
pub(crate) struct ColumnCodes {
    pub(crate) at: Vec<u8>,
    pub(crate) counts: Vec<u8>,
    pub(crate) starts: Vec<usize>,
}

impl ColumnCodes {
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn of(m: &PackedMatrix) -> ColumnCodes {
        let (chunks, per_chunk) = (m.chunks(), CHUNK / CODE_GROUP);
        let mut at = Vec::with_capacity(m.nnz + VALUE_PAD);
        let mut counts = vec![0u8; m.rows * chunks * per_chunk];
        let mut starts = Vec::with_capacity(m.rows + 1);
        for r in 0..m.rows {
            starts.push(at.len());
            let mut pos = m.row_start(r);
            for ch in 0..chunks {
                let (mut w, mut k) = (m.masks[r * chunks + ch], 0);
                while w != 0 {
                    let j = w.trailing_zeros() as usize;
                    // The k-th stored nibble of the chunk, low nibble first.
                    let n = m.data[pos + k / 2] >> (4 * (k % 2)) & 0xF;
                    at.push(((j % CODE_GROUP) as u8) << 4 | n);
                    counts[(r * chunks + ch) * per_chunk + j / CODE_GROUP] += 1;
                    k += 1;
                    w &= w - 1;
                }
                pos += Elem::I4.bytes(k);
            }
        }
        starts.push(at.len());
        at.resize(at.len() + VALUE_PAD, 0);
        ColumnCodes { at, counts, starts }
    }
}

/// f32 -> bf16 with round-to-nearest-even (inputs are finite; overflow saturates to the largest bf16).
#[inline]
pub(crate) fn f32_to_bf16(v: f32) -> u16 {
    let bits = v.to_bits();
    let rounded = bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) >> 16;
    let h = rounded as u16;
    if h & 0x7FFF == 0x7F80 {
        (h & 0x8000) | 0x7F7F
    } else {
        h
    }
}

/// f32 -> the nearest f16 (round to nearest even; beyond the largest f16 gives infinity). NaN is not expected.
pub(crate) fn f16_round(v: f32) -> u16 {
    let b = v.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let a = f32::from_bits(b & 0x7FFF_FFFF);
    if a < F16_MIN_NORMAL {
        // Subnormal range: a multiple of 2⁻²⁴, rounded to nearest even by adding and taking away 2²³ (exact:
        // a·2²⁴ < 2¹⁰ is exact, and the sum rounds once).
        const ROUND: f32 = 8_388_608.0;
        return sign | ((a * 16_777_216.0 + ROUND) - ROUND) as u16;
    }
    // Normal: drop 13 mantissa bits rounding to nearest even (a carry into the exponent is right), rebias.
    let bits = a.to_bits();
    let r = (bits + 0x0FFF + ((bits >> 13) & 1)) >> 13;
    sign | (r - ((127 - 15) << 10)).min(0x7C00) as u16
}

/// IEEE half to single, exactly (subnormals, infinities and NaN included). Branch-free, so LLVM vectorizes
/// loops over it (a `match` on the exponent does not vectorize, and f16 checkpoints convert every weight): the
/// exponent and mantissa shifted into place are the f32 with the same bits scaled by 2^-112 (subnormal
/// halves become f32 subnormals), so one exact multiply by 2^112 rebiases both; infinities and NaNs only
/// need the exponent set to all ones.
#[inline]
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h & 0x8000) as u32) << 16;
    let body = ((h & 0x7fff) as u32) << 13;
    let scaled = (f32::from_bits(body) * f32::from_bits(0x7780_0000)).to_bits(); // × 2^112
    let bits = if h & 0x7c00 == 0x7c00 { body | 0x7f80_0000 } else { scaled };
    f32::from_bits(sign | bits)
}

/// The f16 that holds exactly `v`, if one does (finite `v` only).
pub(crate) fn f16_of(v: f32) -> Option<u16> {
    let h = f16_round(v);
    (h & 0x7FFF <= 0x7BFF && f16_to_f32(h).to_bits() == v.to_bits()).then_some(h)
}

/// The smallest normal f16, 2⁻¹⁴.
pub(crate) const F16_MIN_NORMAL: f32 = 6.103_515_6e-5;
/// The largest finite f16.
pub(crate) const F16_MAX: f32 = 65504.0;

/// bf16 -> f32 (exact).
#[inline]
pub(crate) fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// Named error budgets. Tests in Rust and Python hold every kernel and format to these.
pub mod budget {
    /// A SIMD path against the scalar reference on the same packed matrix (summation order and the
    /// placement of the per-row scale only): `|Δy| <= SUM_ORDER · Σ|ŵ·x|`. The int4 kernels with int8
    /// activations add each group's zero point separately, so for them `|ŵ|` becomes `|ŵ| + |zero point|`.
    pub const SUM_ORDER: f32 = 3e-5;
    /// bf16 round-to-nearest-even: `|ŵ - w| <= BF16_REL · |w|`.
    pub const BF16_REL: f32 = 1.0 / 256.0;
    /// Integer round-to-nearest: `|ŵ - w| <= ROUND · d` (d the group's scale).
    pub const ROUND: f32 = 0.5;
    /// Fitted int4 grids (the scale search of `PackedMatrix::pack`): `|ŵ - w| <= INT4_FIT · d₀`, with `d₀` the
    /// max-based step, `absmax / 7` (symmetric) or `(max - min) / 15` (asymmetric) of the group's stored
    /// values. The search may clip a group's extremes by up to one such step when that lowers its squared
    /// error; in-range weights stay within half a step of the grid it picks.
    pub const INT4_FIT: f32 = 1.0;
    /// Sparse integer formats round their stored values to nearest too (a stored value may round to code 0):
    /// `|ŵ - w| <= SPARSE_ROUND · d`, the same as [`ROUND`]. Kept as its own name for the budget tables.
    pub const SPARSE_ROUND: f32 = ROUND;
    /// int8 activations: `|x̂ - x| <= ACT_ROUND · s`, s the 64-column block scale (`Activations::Int8`) or the
    /// row's (`Activations::Int8Token`), plus the f32 rounding of `x / s`, at most 127·2⁻²³·s.
    pub const ACT_ROUND: f32 = 0.5;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_conversions_are_exact_and_round_to_nearest_even() {
        // Every finite f16 goes to f32 and back unchanged, and is the f16 of its own value.
        let finite = (0u16..=u16::MAX).filter(|h| h & 0x7C00 != 0x7C00);
        for h in finite.clone() {
            let v = f16_to_f32(h);
            assert_eq!(f16_round(v), h, "{h:#06x}");
            assert_eq!(f16_of(v), Some(h), "{h:#06x}");
        }
        // Between two neighbouring positive f16s: below the midpoint rounds down, above rounds up, the midpoint
        // goes to the even one, and none of them is an f16 value.
        for h in finite.filter(|h| *h < 0x7BFF) {
            let (a, b) = (f16_to_f32(h) as f64, f16_to_f32(h + 1) as f64);
            let mid = (a + b) / 2.0;
            let even = if h % 2 == 0 { h } else { h + 1 };
            for (v, want) in [(mid - (b - a) / 8.0, h), (mid, even), (mid + (b - a) / 8.0, h + 1)] {
                assert_eq!(f16_round(v as f32), want, "{v} between {a} and {b}");
                assert_eq!(f16_of(v as f32), None, "{v}");
            }
        }
        assert_eq!(f16_round(65520.0), 0x7C00, "past the largest f16: infinity");
        assert_eq!((f16_to_f32(0x7C00), f16_to_f32(0xFC00)), (f32::INFINITY, f32::NEG_INFINITY));
        assert!(f16_to_f32(0x7E00).is_nan() && f16_to_f32(0x7C01).is_nan());
        assert_eq!((f16_of(65520.0), f16_of(1e9), f16_of(-0.0)), (None, None, Some(0x8000)));
    }

    #[test]
    fn half_scales_are_kept_once_and_read_back_exactly() {
        // 37 rows (a partial last tile) of 200 columns: 7 groups of 32, each (row, group) its own f16 scale, and
        // an eighth in the padding (to 256 columns), whose scale is 0.
        let (rows, cols, groups) = (37, 200, 7);
        let w: Vec<f32> =
            (0..rows * cols).map(|i| if i % 3 == 0 { 0.0 } else { ((i * 7919) % 13) as f32 - 6.0 }).collect();
        let scales: Vec<f32> = (0..rows * groups).map(|i| f16_to_f32(0x2000 + (i as u16 * 37) % 0x1800)).collect();
        let mins: Vec<f32> = (0..rows * groups).map(|i| -f16_to_f32(0x2400 + i as u16 % 0x800)).collect();
        for (format, layout, asym) in [
            (Format::SparseInt4, Layout::Rows, false),
            (Format::SparseInt4, Layout::Tiles, false),
            (Format::DenseInt4, Layout::Tiles, false),
            (Format::DenseInt4, Layout::Rows, true),
        ] {
            let opts = PackOptions { asymmetric: asym, group_size: Some(32), layout };
            let grid = GivenScales { scales: &scales, mins: asym.then_some(&mins[..]), per_row: groups };
            let m = PackedMatrix::pack_with_scales(&w, rows, cols, format, opts, grid).unwrap();
            let what = format!("{format:?} {layout:?} asymmetric {asym}");
            assert!(m.half && m.tiled == (layout == Layout::Tiles), "{what}");
            assert!(m.scales.is_empty() && m.mins.is_empty(), "{what}: an f32 copy beside the f16 one");
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let padded =
                |v: &[f32]| bits(&v.chunks(groups).flat_map(|r| r.iter().copied().chain([0.0])).collect::<Vec<_>>());
            let (scales, mins_want) = (padded(&scales), if asym { padded(&mins) } else { Vec::new() });
            assert_eq!((bits(&m.scales_f32()), bits(&m.mins_f32())), (scales.clone(), mins_want.clone()), "{what}");
            let raw = m.to_raw();
            assert_eq!((bits(&raw.scales), bits(&raw.mins)), (scales.clone(), mins_want), "{what}: to_raw");
            // Rebuilt from its arrays (the pack cache), and as the row-layout twin of a tiled matrix: the same
            // grid, half again, and the same weights.
            let back = PackedMatrix::from_raw(raw).unwrap();
            assert!(back.half && back.scales.is_empty(), "{what}: from_raw");
            assert_eq!(bits(&back.scales_f32()), scales, "{what}: from_raw");
            let twin = m.row_major();
            assert!(twin.half && twin.scales.is_empty() && !twin.tiled, "{what}: twin");
            assert_eq!(bits(&twin.scales_f32()), scales, "{what}: twin");
            assert_eq!(bits(&back.to_dense()), bits(&m.to_dense()), "{what}");
        }
    }
}
