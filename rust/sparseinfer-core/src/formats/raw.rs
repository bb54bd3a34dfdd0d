//! A packed matrix as its stored arrays, and the checks that make arrays read from outside the process (the
//! load cache, `runtime::pack_cache`) safe for the kernels. Only what cannot be derived is kept: values,
//! masks, scales and minimums. Row and tile offsets, the tiles' narrow flags and scales, and the stored count
//! are recomputed from the masks, and every length is checked against the shape before the matrix is built,
//! so a damaged or hostile file gives an error, never an out-of-bounds read in a kernel.

use super::tiles::{QUAD, TILE};
use super::{Elem, Format, PackedMatrix, CHUNK, VALUE_PAD};
use crate::error::{Error, Result};
use std::borrow::Cow;

/// The stored arrays and shape of a packed matrix ([`PackedMatrix::to_raw`], [`PackedMatrix::from_raw`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RawMatrix {
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// Columns after padding.
    pub cols_pad: usize,
    /// Index of the format in [`Format::ALL`].
    pub format: usize,
    /// Columns per scale group (integer formats), else 0.
    pub group: usize,
    /// Asymmetric int4.
    pub asym: bool,
    /// Tiled layout.
    pub tiled: bool,
    /// Weights that are nonzero (dense formats; sparse ones count their masks instead).
    pub nnz: usize,
    /// Packed values, ending with [`VALUE_PAD`] zero bytes.
    pub data: Vec<u8>,
    /// Mask words (sparse formats).
    pub masks: Vec<u64>,
    /// Scales (integer formats).
    pub scales: Vec<f32>,
    /// Minimums (asymmetric int4).
    pub mins: Vec<f32>,
}

/// [`PackedMatrix::raw_arrays`]: values, masks, scales, minimums.
pub type RawArrays<'a> = (&'a [u8], &'a [u64], Cow<'a, [f32]>, Cow<'a, [f32]>);

impl PackedMatrix {
    /// The stored arrays (copies), with the shape needed to rebuild the matrix.
    pub fn to_raw(&self) -> RawMatrix {
        let (data, masks, scales, mins) = self.raw_arrays();
        RawMatrix {
            data: data.to_vec(),
            masks: masks.to_vec(),
            scales: scales.into_owned(),
            mins: mins.into_owned(),
            ..self.raw_header()
        }
    }

    /// The shape and flags of [`PackedMatrix::to_raw`], with empty arrays.
    pub fn raw_header(&self) -> RawMatrix {
        RawMatrix {
            rows: self.rows,
            cols: self.cols,
            cols_pad: self.cols_pad,
            format: Format::ALL.iter().position(|f| *f == self.format).expect("every format is in ALL"),
            group: self.group,
            asym: self.asym,
            tiled: self.tiled,
            nnz: self.nnz,
            ..RawMatrix::default()
        }
    }

    /// The arrays [`PackedMatrix::to_raw`] copies: values, masks (none for a dense format: a tiled one's full
    /// words follow from its shape), scales, minimums; borrowed but for half scales, restated as f32.
    pub fn raw_arrays(&self) -> RawArrays<'_> {
        let masks: &[u64] = if self.format.is_sparse() { &self.masks } else { &[] };
        (&self.data, masks, self.scales_f32(), self.mins_f32())
    }

    /// Rebuilds a matrix from its stored arrays after checking every invariant a kernel relies on (see the
    /// module docs). `InvalidInput` names the first one that fails.
    pub fn from_raw(raw: RawMatrix) -> Result<PackedMatrix> {
        let bad = |msg: String| Error::invalid("packed matrix", msg);
        let format = *Format::ALL.get(raw.format).ok_or_else(|| bad(format!("format index {}", raw.format)))?;
        let (rows, cols, cols_pad) = (raw.rows, raw.cols, raw.cols_pad);
        let elem = format.elem();
        let int = elem.is_int();
        // Exactly the shapes `pack` produces: the kernels find a column's scale group by shifting with the
        // group's trailing zeros, so any other group or padding would index past the scales.
        let round_up = |n: usize, m: usize| n.div_ceil(m).checked_mul(m);
        let explicit = super::GROUP_SIZES.contains(&raw.group);
        let pad_ok = |unit: usize| rows > 0 && cols > 0 && round_up(cols, unit) == Some(cols_pad);
        let shape_ok = match elem {
            Elem::F32 | Elem::Bf16 => raw.group == 0 && pad_ok(CHUNK),
            Elem::I8 => (raw.group == cols_pad && pad_ok(CHUNK)) || (explicit && pad_ok(raw.group.max(CHUNK))),
            Elem::I4 => explicit && pad_ok(raw.group.max(CHUNK)),
        };
        if !shape_ok {
            return Err(bad(format!(
                "shape ({rows}, {cols}) padded to {cols_pad} columns with group {} for {}",
                raw.group,
                format.name()
            )));
        }
        rows.checked_mul(cols_pad).ok_or_else(|| bad(format!("{rows} x {cols_pad} overflows")))?;
        if raw.asym && elem != Elem::I4 || raw.tiled && !super::tiles::tileable(format, raw.asym) {
            return Err(bad(format!("asymmetric {} / tiled {} for {}", raw.asym, raw.tiled, format.name())));
        }
        let groups = if int { cols_pad / raw.group } else { 0 };
        let expect = |what: &str, got: usize, want: usize| {
            if got == want {
                Ok(())
            } else {
                Err(bad(format!("{what}: {got} entries, expected {want}")))
            }
        };
        expect("scales", raw.scales.len(), rows * groups)?;
        expect("minimums", raw.mins.len(), if raw.asym { rows * groups } else { 0 })?;
        if let Some(v) = raw.scales.iter().chain(&raw.mins).find(|v| !v.is_finite()) {
            return Err(bad(format!("non-finite scale or minimum {v}")));
        }
        if raw.data.len() < VALUE_PAD || raw.data[raw.data.len() - VALUE_PAD..].iter().any(|b| *b != 0) {
            return Err(bad("values do not end with the zero padding".into()));
        }
        let values = raw.data.len() - VALUE_PAD;
        // Float values must be finite, as `pack` requires of its weights.
        let finite = match elem {
            Elem::F32 => {
                raw.data[..values].chunks_exact(4).all(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite())
            }
            Elem::Bf16 => raw.data[..values].chunks_exact(2).all(|b| b[1] & 0x7F != 0x7F || b[0] & 0x80 == 0),
            Elem::I8 | Elem::I4 => true,
        };
        if !finite {
            return Err(bad("non-finite value".into()));
        }
        let mut m = PackedMatrix::unpacked(rows, cols, cols_pad, format, raw.group, raw.asym);
        if !format.is_sparse() {
            expect("masks", raw.masks.len(), 0)?;
            // A tiled dense matrix holds whole tiles (rows past the matrix as code 0).
            let stored = if raw.tiled { rows.div_ceil(TILE).checked_mul(TILE) } else { Some(rows) };
            // `cells · bits` may overflow for a hostile shape; the value bytes then cannot match.
            let want = stored
                .and_then(|r| r.checked_mul(cols_pad))
                .and_then(|c| c.checked_mul(elem.bits() as usize))
                .map_or(usize::MAX, |b| b.div_ceil(8));
            expect("value bytes", values, want)?;
            if raw.nnz > rows * cols {
                return Err(bad(format!("{} nonzeros in {rows} x {cols}", raw.nnz)));
            }
            m.nnz = raw.nnz;
            if raw.tiled {
                let (tiles_n, tile) = (rows.div_ceil(TILE), super::tiles::dense_tile_bytes(format, cols_pad));
                m.row_offsets = (0..=tiles_n).map(|t| t * tile).collect();
                m.masks = vec![u64::MAX; cols_pad / QUAD];
                m.tile_narrow = if elem == Elem::I4 { vec![false; tiles_n] } else { Vec::new() };
                m.tiled = true;
            }
        } else if raw.tiled {
            let (tiles_n, quads) = (rows.div_ceil(TILE), cols_pad / QUAD);
            expect("masks", raw.masks.len(), tiles_n * quads)?;
            let mut offsets = Vec::with_capacity(tiles_n + 1);
            let (mut pos, mut nnz) = (0usize, 0usize);
            for t in 0..tiles_n {
                offsets.push(pos);
                let live_rows = TILE.min(rows - t * TILE);
                let row_bits = if live_rows == TILE { u64::MAX } else { (1u64 << (QUAD * live_rows)) - 1 };
                let words = &raw.masks[t * quads..(t + 1) * quads];
                for (q, w) in words.iter().enumerate() {
                    let live_cols = QUAD.min(cols.saturating_sub(q * QUAD));
                    let col_bits = (0..TILE).fold(0u64, |a, i| a | (((1u64 << live_cols) - 1) << (QUAD * i)));
                    if w & !(row_bits & col_bits) != 0 {
                        return Err(bad(format!("tile {t} quad {q}: mask bits outside the matrix")));
                    }
                }
                let n = |q: usize| words[q].count_ones() as usize;
                nnz += (0..quads).map(n).sum::<usize>();
                if elem == Elem::I4 {
                    pos += (0..quads).step_by(2).map(|q| n(q).max(n(q + 1))).sum::<usize>();
                    m.tile_narrow.push((0..quads).all(|q| n(q) <= CHUNK / 2));
                } else {
                    pos += (0..quads).map(n).sum::<usize>();
                }
            }
            offsets.push(pos);
            expect("value bytes", values, pos)?;
            m.row_offsets = offsets;
            m.nnz = nnz;
            m.tiled = true;
        } else {
            let chunks = cols_pad / CHUNK;
            expect("masks", raw.masks.len(), rows * chunks)?;
            let mut offsets = Vec::with_capacity(rows + 1);
            let (mut pos, mut nnz) = (0usize, 0usize);
            for r in 0..rows {
                offsets.push(pos);
                for (ch, w) in raw.masks[r * chunks..(r + 1) * chunks].iter().enumerate() {
                    let live = CHUNK.min(cols.saturating_sub(ch * CHUNK));
                    if live < CHUNK && w >> live != 0 {
                        return Err(bad(format!("row {r} chunk {ch}: mask bits past column {cols}")));
                    }
                    let n = w.count_ones() as usize;
                    nnz += n;
                    pos += elem.bytes(n);
                }
            }
            offsets.push(pos);
            expect("value bytes", values, pos)?;
            m.row_offsets = offsets;
            m.nnz = nnz;
        }
        m.data = raw.data;
        if format.is_sparse() {
            m.masks = raw.masks;
        }
        m.scales = raw.scales;
        m.mins = raw.mins;
        m.derive_scales();
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::{Layout, PackOptions};

    /// A 37 x 150 matrix with ~60 % zeros (odd shapes: a partial last tile, padded columns).
    fn weights() -> Vec<f32> {
        (0..37 * 150).map(|i| if i % 5 < 3 { 0.0 } else { ((i * 7919) % 211) as f32 / 50.0 - 2.1 }).collect()
    }

    fn every_packing() -> Vec<PackedMatrix> {
        let w = weights();
        let mut out = Vec::new();
        for f in Format::ALL {
            let int = f.elem().is_int();
            for (group, asym, layout) in [
                (None, false, Layout::Rows),
                (Some(64), false, Layout::Rows),
                (Some(32), true, Layout::Rows),
                (None, false, Layout::Tiles),
                (Some(64), false, Layout::Tiles),
            ] {
                let tiles_ok = int && !asym;
                if (!int && group.is_some()) || (asym && f.elem() != Elem::I4) || (layout == Layout::Tiles && !tiles_ok)
                {
                    continue;
                }
                let opts = PackOptions { group_size: group, asymmetric: asym, layout };
                out.push(PackedMatrix::pack(&w, 37, 150, f, opts).unwrap());
            }
        }
        out
    }

    #[test]
    fn every_format_and_layout_survives_the_round_trip() {
        for m in every_packing() {
            let back = PackedMatrix::from_raw(m.to_raw()).unwrap();
            assert_eq!(back.to_dense(), m.to_dense(), "{:?} tiled {}", m.format, m.tiled);
            assert_eq!(
                (back.row_offsets.clone(), back.tile_narrow.clone()),
                (m.row_offsets.clone(), m.tile_narrow.clone())
            );
            assert_eq!((back.tile_scales.clone(), back.nnz), (m.tile_scales.clone(), m.nnz));
        }
    }

    #[test]
    fn damaged_arrays_are_refused_before_a_kernel_sees_them() {
        for m in every_packing() {
            let raw = m.to_raw();
            let mut cases: Vec<(&str, RawMatrix)> = Vec::new();
            let mut r = raw.clone();
            r.data.pop();
            cases.push(("short values", r));
            let mut r = raw.clone();
            r.data.insert(0, 1);
            cases.push(("long values", r));
            let mut r = raw.clone();
            *r.data.last_mut().unwrap() = 1;
            cases.push(("padding", r));
            let mut r = raw.clone();
            r.scales.push(1.0);
            cases.push(("scales", r));
            let mut r = raw.clone();
            r.rows += 1;
            cases.push(("rows", r));
            let mut r = raw.clone();
            r.cols_pad += 64;
            cases.push(("cols_pad", r));
            let mut r = raw.clone();
            r.format = 8;
            cases.push(("format", r));
            if !raw.masks.is_empty() {
                // More stored values than the values hold, inside the matrix (row 0's first chunk, or the
                // first tile's first quads), where they need one more byte: an int4 row chunk stores ceil(n/2)
                // bytes (two more bits when n is odd), a tiled int4 pair of quads the larger one's count.
                let mut r = raw.clone();
                let n = |i: usize| raw.masks[i].count_ones();
                let (i, add) = match (m.format.elem(), raw.tiled) {
                    (Elem::I4, true) => (usize::from(n(1) > n(0)), 1),
                    (Elem::I4, false) => (0, 1 + n(0) % 2),
                    _ => (0, 1),
                };
                for _ in 0..add {
                    let free = (!r.masks[i]).trailing_zeros();
                    r.masks[i] |= 1 << free;
                }
                cases.push(("extra mask bit", r));
                // A bit past the last column (or row) of the matrix.
                let mut r = raw.clone();
                *r.masks.last_mut().unwrap() |= 1 << 63;
                cases.push(("mask outside", r));
            }
            if !raw.scales.is_empty() {
                let mut r = raw.clone();
                r.scales[0] = f32::NAN;
                cases.push(("nan scale", r));
                // One group per row is int8's per-row mode only: the int4 kernels would take the column's
                // chunk for its group and read the next rows' scales.
                if m.format.elem() == Elem::I4 {
                    let mut r = raw.clone();
                    r.group = r.cols_pad;
                    r.scales.truncate(r.rows);
                    r.mins.truncate(if r.asym { r.rows } else { 0 });
                    cases.push(("int4 group of a whole row", r));
                }
            }
            if matches!(m.format.elem(), Elem::F32 | Elem::Bf16) {
                let mut r = raw.clone();
                let at = if m.format.is_sparse() { 0 } else { r.data.len() - VALUE_PAD - 4 };
                r.data[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
                cases.push(("nan value", r));
            }
            for (what, r) in cases {
                assert!(PackedMatrix::from_raw(r).is_err(), "{what}: {:?} tiled {}", m.format, m.tiled);
            }
        }
    }
}
