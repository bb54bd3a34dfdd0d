//! The tiled layout of the symmetric integer formats, read by the AVX-512 VNNI and AMX kernels, and its
//! conversions from and to the row layout every other kernel reads.
//!
//! ```text
//! tile t = weight rows 16t..16t+16 (the last tile padded with empty rows), quad q = columns 4q..4q+4
//! masks[t, q]: u64, bit 4i + j set  <=>  weight (16t + i, 4q + j) is stored
//!   byte 4i + j of a 64-byte vector = row i, column j: the operand order of `vpdpbusd`, whose i32 lane i
//!   then adds row i's four products against the four activations of the quad broadcast to every lane
//! values: the stored codes of tile t, quad after quad, in bit order, from byte tile_offsets[t]
//!   int8: the code with its top bit flipped (`q ^ 0x80`, the unsigned operand: pruned lanes expand to 0x80)
//!   int4: per pair of quads (2k, 2k + 1), with n0 and n1 values, each nibble `q + 8`: max(n0, n1) bytes,
//!     byte j = value j of quad 2k (low nibble) | value j of quad 2k + 1 (high nibble)
//!     (a kernel loads 64 bytes and takes both quads' values with one AND and one shift + AND; a tile whose
//!     quads all hold <= 32 values, tile_narrow[t], loads 32: the usual case from ~70 % sparsity on)
//! tile_scales (groups of >= 64 or 32 columns): tiles × groups × 16 f32, the 16 rows' scales of each group
//! dense-int8 / dense-int4: the same encoding with every bit of every mask set (rows past the matrix hold
//!   code 0), so the masks are not stored: one tile's worth of full words stands for all ([`PackedMatrix::
//!   tile_masks`]), and tile t starts at byte t · 16 · cols_pad (int8) or t · 8 · cols_pad (int4)
//! ```
//! In the row layout a 64-column chunk of one row is one vector, and every chunk's i32 lanes have to be
//! converted and scaled on their own (per-block activation scales), nine instructions for ~19 stored values
//! at 70 % sparsity. In the tiled layout one vector holds 16 rows: a chunk of 64 columns takes 16 vectors
//! that add into the same i32 lanes, and the conversion and scaling happen once per 16 × 64 weights. The
//! activation is a broadcast memory operand of `vpdpbusd`, so a 64-weight vector costs a mask load, its
//! popcount, the values load, one `vpexpandb` and one `vpdpbusd` (dense: the load and the `vpdpbusd`, and for
//! int4 an AND or a shift).

use super::{dense_int4_bytes, dense_int4_nibble, Elem, Format, PackedMatrix, CHUNK, VALUE_PAD};

/// Weight rows per tile: the i32 lanes of one 512-bit vector.
pub const TILE: usize = 16;

/// Columns per quad: the four bytes `vpdpbusd` adds into one lane.
pub const QUAD: usize = 4;

/// Whether every int4 quad of a tile holds at most 32 values, so that a kernel may load 32 bytes per pair.
fn int4_quads_narrow(nibbles: &[Vec<u8>]) -> bool {
    nibbles.iter().all(|q| q.len() <= CHUNK / 2)
}

/// Appends one pair of int4 quads' nibbles (`a`, `b`: 0..=15 each) in the tiled encoding.
fn push_int4_pair(data: &mut Vec<u8>, a: &[u8], b: &[u8]) {
    let nib = |v: &[u8], j: usize| v.get(j).copied().unwrap_or(0);
    data.extend((0..a.len().max(b.len())).map(|j| nib(a, j) | (nib(b, j) << 4)));
}

/// Reads one pair of int4 quads with `n0` and `n1` values at `data[pos..]`: the nibbles and the bytes used.
fn read_int4_pair(data: &[u8], pos: usize, n0: usize, n1: usize) -> (Vec<u8>, Vec<u8>, usize) {
    let a = (0..n0).map(|j| data[pos + j] & 0xF).collect();
    let b = (0..n1).map(|j| data[pos + j] >> 4).collect();
    (a, b, n0.max(n1))
}

/// The stored units (int8 bytes as stored in the row layout, int4 nibbles) of one tile's 16 rows, spread over
/// `cols_pad` columns each, and whether each is stored; rows past the matrix stay empty.
struct Block {
    units: Vec<u8>,
    present: Vec<bool>,
}

impl Block {
    fn new(cols_pad: usize) -> Block {
        Block { units: vec![0; TILE * cols_pad], present: vec![false; TILE * cols_pad] }
    }

    fn clear(&mut self) {
        self.units.fill(0);
        self.present.fill(false);
    }
}

/// Whether `m` (row layout) can be tiled: see [`tileable`].
pub(crate) fn can_tile(m: &PackedMatrix) -> bool {
    tileable(m.format, m.asym)
}

/// Whether matrices of `format` (asymmetric or not) have a tiled layout: the integer formats, symmetric.
pub(crate) fn tileable(format: Format, asym: bool) -> bool {
    format.elem().is_int() && !asym
}

/// Bytes of one tile of a dense format (`cols_pad` columns): 16 rows of codes.
pub(crate) fn dense_tile_bytes(format: Format, cols_pad: usize) -> usize {
    TILE * format.elem().bytes(cols_pad)
}

/// The tiled copy of a dense row-layout matrix: every quad's 64 codes in bit order, as a sparse tile with
/// every bit set would hold them.
fn tile_dense(m: &PackedMatrix) -> PackedMatrix {
    let (cp, tiles, int4) = (m.cols_pad, m.rows.div_ceil(TILE), m.format.elem() == Elem::I4);
    let quads = cp / QUAD;
    let mut out = PackedMatrix {
        data: Vec::with_capacity(tiles * dense_tile_bytes(m.format, cp) + VALUE_PAD),
        masks: vec![u64::MAX; quads],
        row_offsets: Vec::with_capacity(tiles + 1),
        tiled: true,
        ..m.clone_meta()
    };
    // Row r's stored unit at column c (int8: the code's byte; int4: the nibble `q + 8`); code 0 past the rows.
    let unit = |r: usize, c: usize| -> u8 {
        match (r < m.rows, int4) {
            (false, true) => 8,
            (false, false) => 0,
            (true, false) => m.data[r * cp + c],
            (true, true) => dense_int4_nibble(&m.data[r * cp / 2..], c),
        }
    };
    let quad_units = |t: usize, q: usize| (0..TILE * QUAD).map(move |j| unit(t * TILE + j / QUAD, q * QUAD + j % QUAD));
    let (mut a, mut b) = (Vec::with_capacity(TILE * QUAD), Vec::with_capacity(TILE * QUAD));
    for t in 0..tiles {
        out.row_offsets.push(out.data.len());
        if int4 {
            for q in (0..quads).step_by(2) {
                a.clear();
                a.extend(quad_units(t, q));
                b.clear();
                b.extend(quad_units(t, q + 1));
                push_int4_pair(&mut out.data, &a, &b);
            }
            out.tile_narrow.push(false);
        } else {
            for q in 0..quads {
                out.data.extend(quad_units(t, q).map(|u| u ^ 0x80));
            }
        }
    }
    out.row_offsets.push(out.data.len());
    out.data.extend_from_slice(&[0u8; VALUE_PAD]);
    out.derive_scales();
    out
}

/// The tiled copy of a row-layout matrix (see [`can_tile`]). Each quad takes a 4-bit slice of 16 rows' mask
/// words and the next values of each row in turn, so the stored values are copied, never spread out.
pub(crate) fn tile(m: &PackedMatrix) -> PackedMatrix {
    debug_assert!(can_tile(m) && !m.tiled);
    if !m.format.is_sparse() {
        return tile_dense(m);
    }
    let (chunks, tiles, int4) = (m.chunks(), m.rows.div_ceil(TILE), m.format.elem() == Elem::I4);
    let mut out = PackedMatrix {
        data: Vec::with_capacity(m.data.len()),
        masks: Vec::with_capacity(tiles * m.cols_pad / QUAD),
        row_offsets: Vec::with_capacity(tiles + 1),
        tiled: true,
        ..m.clone_meta()
    };
    // int4: the nibbles of each quad of the tile, written once the tile's encoding is known.
    let quads = m.cols_pad / QUAD;
    let mut nibbles: Vec<Vec<u8>> = if int4 { vec![Vec::with_capacity(CHUNK); quads] } else { Vec::new() };
    for t in 0..tiles {
        let (r0, nr) = (t * TILE, TILE.min(m.rows - t * TILE));
        // Per row: where its current chunk's values start, and how many of them the quads took so far.
        let mut pos: [usize; TILE] = core::array::from_fn(|i| if i < nr { m.row_offsets[r0 + i] } else { 0 });
        let mut taken = [0usize; TILE];
        out.row_offsets.push(out.data.len());
        for ch in 0..chunks {
            for (p, k) in pos.iter_mut().zip(taken.iter_mut()) {
                *p += if int4 { k.div_ceil(2) } else { *k };
                *k = 0;
            }
            for qq in 0..CHUNK / QUAD {
                let mut mask = 0u64;
                let q = ch * (CHUNK / QUAD) + qq;
                if int4 {
                    nibbles[q].clear();
                }
                for i in 0..nr {
                    let bits = (m.masks[(r0 + i) * chunks + ch] >> (QUAD * qq)) & 0xF;
                    mask |= bits << (QUAD * i);
                    let (p, k, c) = (pos[i], taken[i], bits.count_ones() as usize);
                    if int4 {
                        nibbles[q].extend((k..k + c).map(|j| (m.data[p + j / 2] >> (4 * (j % 2))) & 0xF));
                    } else {
                        out.data.extend(m.data[p + k..p + k + c].iter().map(|b| b ^ 0x80));
                    }
                    taken[i] += c;
                }
                out.masks.push(mask);
            }
        }
        if int4 {
            for pair in nibbles.chunks_exact(2) {
                push_int4_pair(&mut out.data, &pair[0], &pair[1]);
            }
            out.tile_narrow.push(int4_quads_narrow(&nibbles));
        }
    }
    out.row_offsets.push(out.data.len());
    out.data.extend_from_slice(&[0u8; VALUE_PAD]);
    out.derive_scales();
    out
}

/// Per tile and scale group, the 16 rows' scales (0 for padding rows); empty for one scale per row, which
/// the kernels apply to the finished sums instead.
pub(super) fn tile_scales(m: &PackedMatrix, scales: &[f32]) -> Vec<f32> {
    let groups = m.groups();
    if groups <= 1 {
        return Vec::new();
    }
    let tiles = m.rows.div_ceil(TILE);
    let mut s = vec![0.0f32; tiles * groups * TILE];
    for r in 0..m.rows {
        let (t, i) = (r / TILE, r % TILE);
        for g in 0..groups {
            s[(t * groups + g) * TILE + i] = scales[r * groups + g];
        }
    }
    s
}

/// The row-layout copy of a tiled matrix, for the kernels that read rows.
pub(crate) fn untile(m: &PackedMatrix) -> PackedMatrix {
    debug_assert!(m.tiled);
    let (cp, chunks, int4) = (m.cols_pad, m.chunks(), m.format.elem() == Elem::I4);
    // A dense matrix's row layout has neither masks nor row offsets.
    let dense = !m.format.is_sparse();
    let mut out = PackedMatrix {
        data: Vec::with_capacity(m.data.len()),
        masks: Vec::with_capacity(if dense { 0 } else { m.rows * chunks }),
        row_offsets: Vec::with_capacity(if dense { 0 } else { m.rows + 1 }),
        ..m.clone_meta()
    };
    let mut b = Block::new(cp);
    let mut nibbles = Vec::with_capacity(CHUNK);
    for t in 0..m.rows.div_ceil(TILE) {
        b.clear();
        read_tile(m, t, &mut b);
        for i in 0..TILE.min(m.rows - t * TILE) {
            if dense {
                let row = &b.units[i * cp..(i + 1) * cp];
                if int4 {
                    out.data.extend(dense_int4_bytes(row));
                } else {
                    out.data.extend_from_slice(row);
                }
                continue;
            }
            out.row_offsets.push(out.data.len());
            for ch in 0..chunks {
                let mut mask = 0u64;
                nibbles.clear();
                for j in 0..CHUNK {
                    let at = i * cp + ch * CHUNK + j;
                    if b.present[at] {
                        mask |= 1 << j;
                        if int4 {
                            nibbles.push(b.units[at]);
                        } else {
                            out.data.push(b.units[at]);
                        }
                    }
                }
                out.data.extend(nibbles.chunks(2).map(|p| p[0] | (p.get(1).copied().unwrap_or(0) << 4)));
                out.masks.push(mask);
            }
        }
    }
    if !dense {
        out.row_offsets.push(out.data.len());
    }
    out.data.extend_from_slice(&[0u8; VALUE_PAD]);
    out.derive_scales();
    out
}

/// Spreads tile `t` of a tiled matrix into `b` (row-layout units: int8 codes unflipped).
fn read_tile(m: &PackedMatrix, t: usize, b: &mut Block) {
    let (cp, int4) = (m.cols_pad, m.format.elem() == Elem::I4);
    let quads = cp / QUAD;
    let masks = m.tile_masks(t);
    let mut spread = |q: usize, units: &mut dyn Iterator<Item = u8>| {
        for bit in (0..CHUNK).filter(|bit| masks[q] >> bit & 1 == 1) {
            let at = bit / QUAD * cp + q * QUAD + bit % QUAD;
            b.units[at] = units.next().expect("a value per set bit");
            b.present[at] = true;
        }
    };
    let mut pos = m.row_offsets[t];
    if int4 {
        for q in (0..quads).step_by(2) {
            let n = |q: usize| masks[q].count_ones() as usize;
            let (a, c, used) = read_int4_pair(&m.data, pos, n(q), n(q + 1));
            spread(q, &mut a.into_iter());
            spread(q + 1, &mut c.into_iter());
            pos += used;
        }
    } else {
        for (q, mask) in masks.iter().enumerate() {
            let n = mask.count_ones() as usize;
            spread(q, &mut m.data[pos..pos + n].iter().map(|v| v ^ 0x80));
            pos += n;
        }
    }
}
