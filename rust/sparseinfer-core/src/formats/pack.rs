//! Packing a dense f32 matrix into each format (the quantizers). Decoding lives in `kernels::reference`.

use super::{f32_to_bf16, tiles, Elem, Format, PackedMatrix, CHUNK, VALUE_PAD};
use crate::error::{Error, Result};

/// The in-memory layout of a packed matrix.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Layout {
    /// Tiles where the kernels that would run read them (sparse int8 and symmetric int4 with AVX-512 VNNI
    /// the active path), else rows.
    #[default]
    Auto,
    /// One row after another (every format, every kernel).
    Rows,
    /// 16 rows interleaved per 4 columns (sparse int8 and symmetric sparse int4 only; see `formats::tiles`).
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
    /// Columns per scale group: 32, 64 or 128. `None`: one scale per row for int8, 128 for int4.
    /// Must be `None` for float formats.
    pub group_size: Option<usize>,
    /// Asymmetric int4 (`ŵ = d·q + m`, q in 0..=15). Only valid for int4 formats.
    pub asymmetric: bool,
    /// The in-memory layout.
    pub layout: Layout,
}

/// Default columns per group for int4 formats.
pub const INT4_DEFAULT_GROUP: usize = 128;

fn round_up(n: usize, m: usize) -> usize {
    n.div_ceil(m) * m
}

/// Per-group quantization parameters and the code of one weight.
#[derive(Clone, Copy)]
struct Quant {
    /// Scale `d`.
    d: f32,
    /// Minimum `m` (asymmetric) or 0.
    m: f32,
    /// `1/d`, or 0 when `d == 0`.
    inv: f32,
    /// Largest code magnitude (symmetric) or 15 (asymmetric).
    qmax: f32,
    asym: bool,
}

impl Quant {
    /// Parameters from the values that the group stores.
    fn fit(values: impl Iterator<Item = f32> + Clone, elem: Elem, asym: bool) -> Quant {
        let qmax = if elem == Elem::I8 {
            127.0
        } else if asym {
            15.0
        } else {
            7.0
        };
        let (d, m) = if asym {
            let lo = values.clone().fold(f32::INFINITY, f32::min);
            let hi = values.fold(f32::NEG_INFINITY, f32::max);
            if lo.is_finite() {
                ((hi - lo) / qmax, lo)
            } else {
                (0.0, 0.0)
            }
        } else {
            (values.fold(0.0f32, |a, v| a.max(v.abs())) / qmax, 0.0)
        };
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        Quant { d, m, inv, qmax, asym }
    }

    /// Parameters with a given scale `d` (and, asymmetric int4, minimum `m`).
    fn given(d: f32, m: Option<f32>, elem: Elem) -> Quant {
        let qmax = match (elem, m) {
            (Elem::I8, _) => 127.0,
            (_, Some(_)) => 15.0,
            _ => 7.0,
        };
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        Quant { d, m: m.unwrap_or(0.0), inv, qmax, asym: m.is_some() }
    }

    /// The integer code of `w`, rounded to nearest: signed for symmetric, 0..=15 for asymmetric. A stored
    /// weight of a sparse format may round to code 0: it stays in the mask and decodes to 0. (Forcing it to
    /// `|q| = 1` instead kept the zero pattern, but pushed every weight below `d/2` to `±d`: on an unpruned
    /// model packed as sparse-int4, where `d = max/7`, that turned the output into nonsense.)
    fn code(&self, w: f32) -> i32 {
        if self.asym {
            round_clamped((w - self.m) * self.inv, 0.0, self.qmax)
        } else {
            round_clamped(w * self.inv, -self.qmax, self.qmax)
        }
    }

    /// The 4-bit storage of a code: `q + 8` symmetric, `q` asymmetric.
    fn nibble(&self, q: i32) -> u8 {
        (if self.asym { q } else { q + 8 }) as u8
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
    let quantized = matches!(elem, Elem::I8 | Elem::I4);
    if let Some(g) = opts.group_size {
        if !quantized {
            return Err(Error::invalid(OP, format!("group_size applies to integer formats, not {}", format.name())));
        }
        if ![32, 64, 128].contains(&g) {
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
        if let Some(v) = g.scales.iter().find(|v| !(v.is_finite() && **v >= 0.0)) {
            return Err(Error::invalid(OP, format!("scale {v} is not a finite non-negative number")));
        }
    }
    if quantized {
        m.scales.reserve(rows * groups);
    }
    if sparse {
        m.masks.reserve(rows * m.chunks());
        m.row_offsets.reserve(rows + 1);
    } else {
        m.data.reserve(rows * m.dense_row_bytes() + VALUE_PAD);
    }

    let mut codes = vec![0i32; cols_pad];
    for r in 0..rows {
        let row = &w[r * cols..(r + 1) * cols];
        // Fit one set of parameters per group and turn the row into integer codes.
        if quantized {
            for g in 0..groups {
                let (c0, c1) = (g * group, ((g + 1) * group).min(cols));
                let vals = row.get(c0..c1).unwrap_or(&[]);
                let q = match &given {
                    Some(gs) if g < gs.per_row => {
                        let i = r * gs.per_row + g;
                        Quant::given(gs.scales[i], gs.mins.map(|v| v[i]), elem)
                    }
                    Some(gs) => Quant::given(0.0, gs.mins.map(|_| 0.0), elem),
                    None if sparse => Quant::fit(vals.iter().copied().filter(|v| *v != 0.0), elem, m.asym),
                    None => Quant::fit(vals.iter().copied(), elem, m.asym),
                };
                m.scales.push(q.d);
                if m.asym {
                    m.mins.push(q.m);
                }
                for (c, code) in codes.iter_mut().enumerate().take((g + 1) * group).skip(c0) {
                    *code = match row.get(c) {
                        Some(&v) if c < c1 => {
                            let code = q.code(v);
                            if elem == Elem::I4 {
                                q.nibble(code) as i32
                            } else {
                                code
                            }
                        }
                        // Padding columns: a code that decodes to zero for symmetric formats.
                        _ => {
                            if elem == Elem::I4 && !m.asym {
                                8
                            } else {
                                0
                            }
                        }
                    };
                }
            }
        }
        if sparse {
            m.row_offsets.push(m.data.len());
            for ch in 0..m.chunks() {
                let mut mask = 0u64;
                let mut nibbles: Vec<u8> = Vec::new();
                for j in 0..CHUNK {
                    let c = ch * CHUNK + j;
                    let v = match row.get(c) {
                        Some(&v) if v != 0.0 => v,
                        _ => continue,
                    };
                    mask |= 1 << j;
                    match elem {
                        Elem::F32 => m.data.extend_from_slice(&v.to_le_bytes()),
                        Elem::Bf16 => {
                            let mut h = f32_to_bf16(v);
                            if h & 0x7FFF == 0 {
                                h |= 1; // keep a nonzero that bf16 would flush
                            }
                            m.data.extend_from_slice(&h.to_le_bytes());
                        }
                        Elem::I8 => m.data.push(codes[c] as i8 as u8),
                        Elem::I4 => nibbles.push(codes[c] as u8),
                    }
                }
                for pair in nibbles.chunks(2) {
                    m.data.push(pair[0] | (pair.get(1).copied().unwrap_or(0) << 4));
                }
                m.masks.push(mask);
            }
        } else {
            let val = |c: usize| row.get(c).copied().unwrap_or(0.0);
            match elem {
                Elem::F32 => m.data.extend((0..cols_pad).flat_map(|c| val(c).to_le_bytes())),
                Elem::Bf16 => m.data.extend((0..cols_pad).flat_map(|c| f32_to_bf16(val(c)).to_le_bytes())),
                Elem::I8 => m.data.extend(codes.iter().map(|&q| q as i8 as u8)),
                // Per 64-column chunk, byte j holds column j (low nibble) and column j + 32 (high nibble).
                Elem::I4 => m.data.extend(codes.chunks_exact(CHUNK).flat_map(|ch| {
                    let (lo, hi) = ch.split_at(CHUNK / 2);
                    lo.iter().zip(hi).map(|(&l, &h)| l as u8 | ((h as u8) << 4))
                })),
            }
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
                format!("the tiled layout takes sparse-int8 and symmetric sparse-int4, not {}", format.name()),
            ))
        }
    };
    Ok(if tile { tiles::tile(&m) } else { m })
}
