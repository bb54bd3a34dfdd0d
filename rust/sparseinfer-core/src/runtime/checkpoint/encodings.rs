//! One decoder per stored encoding of a `[rows, cols]` weight (docs/FORMAT.md, "Tensors of one compressed
//! linear"), bound in [`ENCODINGS`] to the compressed-tensors format name that declares it. A new encoding is
//! one function and one row there.
//!
//! A decoder recognises its encoding by the tensors present (`Ok(None)`: not this one) and returns either float
//! values or integer codes; [`decode`] then dequantizes codes with the checkpoint's scales. Every lie (a shape,
//! a count, a dtype, a code out of range, a non-finite value) is an error naming the tensor.

use super::quant_scheme::QuantScheme;
use super::safetensors::{Dtype, WeightStore};
use super::{finite_f32, zeros};
use crate::error::{Error, Result};

/// How a projection matrix is oriented in the checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Orientation {
    /// `nn.Linear`: `[out, in]`.
    OutIn,
    /// GPT-2's `Conv1D`: `[in, out]`.
    InOut,
}

/// The weight being decoded: its tensor name and the shape `[rows, cols]` the config implies.
pub struct Target<'a> {
    /// The checkpoint.
    pub store: &'a WeightStore,
    /// `<module>.weight`.
    pub name: &'a str,
    /// Output rows.
    pub rows: usize,
    /// Input columns.
    pub cols: usize,
    /// How the dense tensor is oriented.
    pub orientation: Orientation,
}

impl Target<'_> {
    fn bad(&self, m: impl std::fmt::Display) -> Error {
        Error::invalid("load", format!("{}: {m}", self.name))
    }

    /// `<module>`, the prefix of the module's other tensors.
    fn module(&self) -> &str {
        self.name.strip_suffix(".weight").unwrap_or(self.name)
    }

    /// A shape stored as a tensor must be the one the config implies.
    fn expect_shape(&self, tensor: &str) -> Result<()> {
        let shape = self.store.int_values(tensor)?;
        if shape != [self.rows as i64, self.cols as i64] {
            return Err(self.bad(format!("{tensor} is {shape:?}, the config implies [{}, {}]", self.rows, self.cols)));
        }
        Ok(())
    }
}

/// What an encoding's tensors hold, `rows × cols` row-major.
pub enum Values {
    /// Weights (finite).
    Float {
        /// The values.
        w: Vec<f32>,
        /// Whether they were stored as bf16.
        bf16: bool,
    },
    /// Integer codes, to be scaled by `<module>.weight_scale`.
    Codes(Vec<f32>),
}

/// One encoding's reading of a weight.
pub struct Encoded {
    /// The values or codes.
    pub values: Values,
    /// Whether the encoding stores only the nonzeros (the kernels then keep the pattern).
    pub sparse: bool,
}

/// Where config.json declares an encoding's format name (docs/FORMAT.md, "`quantization_config`").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Declared {
    /// `quantization_config.format` and each config group's `format`.
    Quantization,
    /// `quantization_config.sparsity_config.format`.
    Sparsity,
}

/// One stored encoding.
pub struct Encoding {
    /// The compressed-tensors format name that declares it.
    pub format: &'static str,
    /// Where that name may stand.
    pub declared: &'static [Declared],
    /// Recognises the encoding by its tensors (`Ok(None)`: not this one) and reads them; the declared scheme
    /// says how wide packed codes are.
    pub decode: fn(&Target, Option<QuantScheme>) -> Result<Option<Encoded>>,
}

/// Every encoding the runtime reads, tried in this order ([`dense`] last: it takes whatever tensor is left).
pub const ENCODINGS: &[Encoding] = &[
    Encoding { format: "sparse-24-bitmask", declared: &[Declared::Sparsity], decode: sparse_24_bitmask },
    Encoding { format: "sparse-bitmask", declared: &[Declared::Sparsity], decode: sparse_bitmask },
    Encoding { format: "pack-quantized", declared: &[Declared::Quantization], decode: pack_quantized },
    Encoding { format: PACK_QUANTIZED_MIN, declared: &[Declared::Quantization], decode: pack_quantized },
    Encoding { format: "int-quantized", declared: &[Declared::Quantization], decode: int_quantized },
    Encoding { format: "dense", declared: &[Declared::Quantization, Declared::Sparsity], decode: dense },
];

/// sparseinfer's extension of `pack-quantized` for asymmetric 4-bit grids whose minimums are floats (llama.cpp's
/// Q4_1: `W = d · u + m`, `u` in 0..=15), which compressed-tensors' integer zero points cannot hold: the codes and
/// `weight_scale` of `pack-quantized`, and `<module>.weight_min` in place of `weight_zero_point`. A name of its own,
/// so that compressed-tensors refuses the checkpoint instead of loading it without its minimums.
pub const PACK_QUANTIZED_MIN: &str = "sparseinfer-pack-quantized-min";

/// The format names that may be declared at `kind`, sorted.
pub fn format_names(kind: Declared) -> Vec<&'static str> {
    let mut v: Vec<&str> = ENCODINGS.iter().filter(|e| e.declared.contains(&kind)).map(|e| e.format).collect();
    v.sort_unstable();
    v
}

/// One stored weight, decoded: dequantized values, and the codes' scales when it was quantized.
pub struct Decoded {
    /// `rows × cols` values.
    pub w: Vec<f32>,
    /// `rows × per_row` scales and `per_row`, when quantized.
    pub scales: Option<(Vec<f32>, usize)>,
    /// Stored sparse.
    pub sparse: bool,
    /// Stored as bf16 floats.
    pub bf16: bool,
    /// Asymmetric 4-bit codes only: `rows × per_row` minimums, so that with `scales` the codes `q + 8` (0..=15)
    /// are `ŵ = scale · (q + 8) + m`, the grid of the asymmetric int4 kernels: `m = −scale · (zero_point + 8)`
    /// from zero points, or `<module>.weight_min` as stored ([`PACK_QUANTIZED_MIN`]).
    pub mins: Option<Vec<f32>>,
}

/// Decodes `t` in whichever encoding of [`ENCODINGS`] its tensors are in; codes are dequantized with
/// `quant`, the checkpoint's declared scheme.
pub fn decode(t: &Target, quant: Option<QuantScheme>) -> Result<Decoded> {
    let mut found = None;
    for e in ENCODINGS {
        found = (e.decode)(t, quant)?;
        if found.is_some() {
            break;
        }
    }
    let Encoded { values, sparse } = found.ok_or_else(|| t.bad("tensor is missing from the checkpoint"))?;
    match values {
        Values::Float { w, bf16 } => Ok(Decoded { w, scales: None, sparse, bf16, mins: None }),
        Values::Codes(codes) => dequantize(t, quant, &codes, sparse),
    }
}

/// `sparse-bitmask`: `<module>.bitmask` (a row-major bit per weight, `[rows, ceil(cols / 8)]` U8), the nonzeros
/// in `<module>.compressed` (floats, or int8 codes) as one `[nnz]` tensor, `<module>.shape`. compressed-tensors
/// up to 0.8 (and sparseinfer before it) named them `<module>.weight.bitmask` etc.
fn sparse_bitmask(t: &Target, _: Option<QuantScheme>) -> Result<Option<Encoded>> {
    bitmask(t, false)
}

/// `sparse-24-bitmask` (2:4, compressed-tensors 0.9-0.14): the tensors of `sparse-bitmask`, but
/// `<module>.compressed` is `[rows, cols / 2]`: two of every four weights of a row, in column order, as
/// compressed-tensors keeps them (the two largest magnitudes of each group of four, which may include a zero).
fn sparse_24_bitmask(t: &Target, _: Option<QuantScheme>) -> Result<Option<Encoded>> {
    bitmask(t, true)
}

/// Reads a bitmask encoding: the 2:4 one (`two_four`, recognised by a 2-D `.compressed`) or the general one.
fn bitmask(t: &Target, two_four: bool) -> Result<Option<Encoded>> {
    let (st, rows, cols) = (t.store, t.rows, t.cols);
    let Some(base) = [t.module(), t.name].into_iter().find(|b| st.contains(&format!("{b}.bitmask"))) else {
        return Ok(None);
    };
    let cname = format!("{base}.compressed");
    if st.meta(&cname).is_some_and(|(_, shape)| shape.len() == 2) != two_four {
        return Ok(None);
    }
    if t.orientation != Orientation::OutIn {
        return Err(t.bad("compressed Conv1D weights are not supported"));
    }
    t.expect_shape(&format!("{base}.shape"))?;
    let row_bytes = cols.div_ceil(8);
    let mask = st.tensor(&format!("{base}.bitmask"), &[rows, row_bytes])?;
    if mask.dtype != Dtype::U8 {
        return Err(t.bad(format!("{base}.bitmask has dtype {}, expected U8", mask.dtype.name())));
    }
    let values = st.get(&cname)?.ok_or_else(|| t.bad(format!("{cname} (the stored values) is missing")))?;
    let bit = |r: usize, c: usize| mask.bytes[r * row_bytes + c / 8] >> (c % 8) & 1 == 1;
    let nnz: usize = mask.bytes.iter().map(|b| b.count_ones() as usize).sum::<usize>();
    // Bits past `cols` in the last byte of a row must be clear, or the count lies.
    let tail_ok = cols.is_multiple_of(8) || (0..rows).all(|r| mask.bytes[r * row_bytes + cols / 8] >> (cols % 8) == 0);
    if two_four {
        if !cols.is_multiple_of(4) || values.shape != [rows, cols / 2] || !tail_ok {
            return Err(t.bad(format!(
                "{cname} is {:?}, 2:4 of [{rows}, {cols}] is [{rows}, {}]",
                values.shape,
                cols / 2
            )));
        }
        // Exactly two of every four: the count then matches the values too.
        if let Some((r, c)) = (0..rows)
            .flat_map(|r| (0..cols / 4).map(move |g| (r, 4 * g)))
            .find(|&(r, c)| (c..c + 4).filter(|&c| bit(r, c)).count() != 2)
        {
            return Err(t.bad(format!("{base}.bitmask is not 2:4: columns {c}..{} of row {r}", c + 4)));
        }
    } else if values.shape.len() != 1 || values.shape[0] != nnz || !tail_ok {
        return Err(t.bad(format!("bitmask has {nnz} set bits but {cname} holds {:?} values", values.shape)));
    }
    let flat: Vec<f32> = match values.dtype {
        Dtype::I8 => values.bytes.iter().map(|&b| b as i8 as f32).collect(),
        Dtype::F32 | Dtype::F16 | Dtype::BF16 => values.to_f32(t.name)?,
        d => return Err(t.bad(format!("{cname} has dtype {}", d.name()))),
    };
    let mut dense = zeros(t.name, rows * cols)?;
    let mut k = 0;
    for r in 0..rows {
        for c in 0..cols {
            if bit(r, c) {
                dense[r * cols + c] = flat[k];
                k += 1;
            }
        }
    }
    let values = if values.dtype == Dtype::I8 {
        Values::Codes(dense)
    } else {
        if let Some(i) = dense.iter().position(|x| !x.is_finite()) {
            return Err(t.bad(format!("non-finite value at {i}")));
        }
        Values::Float { w: dense, bf16: values.dtype == Dtype::BF16 }
    };
    Ok(Some(Encoded { values, sparse: true }))
}

/// `pack-quantized`: `bits`-bit codes offset by `2^(bits-1)`, `32 / bits` to a little-endian I32 word along
/// each row, code `j` at bit `bits · j` (`<module>.weight_packed` `[rows, ceil(cols · bits / 32)]`), and
/// `<module>.weight_shape`. 4 and 8 bits (the widths that tile a word, so no code straddles two).
fn pack_quantized(t: &Target, quant: Option<QuantScheme>) -> Result<Option<Encoded>> {
    let (st, rows, cols, prefix) = (t.store, t.rows, t.cols, t.module());
    if !st.contains(&format!("{prefix}.weight_packed")) {
        return Ok(None);
    }
    let bits = quant.ok_or_else(|| t.bad("packed integer weights but no quantization_config in config.json"))?.bits;
    t.expect_shape(&format!("{prefix}.weight_shape"))?;
    let words = (cols * bits as usize).div_ceil(32);
    let packed = st.tensor(&format!("{prefix}.weight_packed"), &[rows, words])?;
    if packed.dtype != Dtype::I32 {
        return Err(t.bad("weight_packed must be I32"));
    }
    let mut c = zeros(t.name, rows * cols)?;
    for (r, row) in c.chunks_exact_mut(cols).enumerate() {
        for (j, code) in row.iter_mut().enumerate() {
            let bit = j * bits as usize;
            *code = packed_code(&packed.bytes, bits, r * words + bit / 32, bit % 32);
        }
    }
    Ok(Some(Encoded { values: Values::Codes(c), sparse: false }))
}

/// The signed `bits`-bit code at bit `shift` of little-endian I32 word `word` (stored offset by `2^(bits-1)`).
fn packed_code(bytes: &[u8], bits: u32, word: usize, shift: usize) -> f32 {
    let w = u32::from_le_bytes(bytes[4 * word..4 * word + 4].try_into().expect("4 bytes"));
    ((w >> shift) & ((1 << bits) - 1)) as f32 - (1u32 << (bits - 1)) as f32
}

/// `int-quantized`: int8 codes in `<module>.weight` itself (I8 `[rows, cols]`).
fn int_quantized(t: &Target, _: Option<QuantScheme>) -> Result<Option<Encoded>> {
    if t.store.meta(t.name).is_none_or(|(dtype, _)| dtype != Dtype::I8) {
        return Ok(None);
    }
    let w = t.store.tensor(t.name, &[t.rows, t.cols])?;
    Ok(Some(Encoded { values: Values::Codes(w.bytes.iter().map(|&b| b as i8 as f32).collect()), sparse: false }))
}

/// Dense floats (F32, F16 or BF16) in `<module>.weight`, oriented as `t.orientation` says (a `Conv1D` weight
/// is transposed once here).
fn dense(t: &Target, _: Option<QuantScheme>) -> Result<Option<Encoded>> {
    let Some((dtype, _)) = t.store.meta(t.name) else { return Ok(None) };
    let bf16 = dtype == Dtype::BF16;
    let (rows, cols) = (t.rows, t.cols);
    let w = match t.orientation {
        Orientation::OutIn => finite_f32(t.store, t.name, &[rows, cols])?,
        Orientation::InOut => {
            let stored = finite_f32(t.store, t.name, &[cols, rows])?;
            let mut w = zeros(t.name, rows * cols)?;
            for i in 0..cols {
                for o in 0..rows {
                    w[o * cols + i] = stored[i * rows + o];
                }
            }
            w
        }
    };
    Ok(Some(Encoded { values: Values::Float { w, bf16 }, sparse: false }))
}

/// `W = scale[r, c / G] · (q − zero_point[r, c / G])` for codes `q[rows × cols]` with `<module>.weight_scale`
/// `[rows, per_row]` (and, asymmetric, `<module>.weight_zero_point`), or `W = scale · (q + 8) + min` with
/// `<module>.weight_min` ([`PACK_QUANTIZED_MIN`]); the scales (and the minimums of the asymmetric int4 grid)
/// are kept beside the weights.
fn dequantize(t: &Target, quant: Option<QuantScheme>, codes: &[f32], sparse: bool) -> Result<Decoded> {
    let (st, rows, cols) = (t.store, t.rows, t.cols);
    let scheme = quant.ok_or_else(|| t.bad("integer weights but no quantization_config in config.json"))?;
    let sname = format!("{}.weight_scale", t.module());
    let scale_t = st.get(&sname)?.ok_or_else(|| t.bad(format!("{sname} is missing")))?;
    let per_row = match scheme.group_size {
        None => 1,
        Some(g) if g > 0 => cols.div_ceil(g),
        Some(_) => return Err(t.bad("group_size 0")),
    };
    if !matches!(scale_t.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
        return Err(
            t.bad(format!("{sname} has dtype {}: scales must be floats (F32, F16 or BF16)", scale_t.dtype.name()))
        );
    }
    if scale_t.shape != [rows, per_row] {
        return Err(t.bad(format!("{sname} has shape {:?}, expected [{rows}, {per_row}]", scale_t.shape)));
    }
    let scales = scale_t.to_f32(&sname)?;
    if let Some(i) = scales.iter().position(|x| !x.is_finite()) {
        return Err(t.bad(format!(
            "{sname} holds a non-finite scale {} at [{}, {}]",
            scales[i],
            i / per_row,
            i % per_row
        )));
    }
    let given_mins = float_mins(t, scheme, per_row)?;
    let zero_points = match (&given_mins, scheme.asymmetric) {
        (None, true) => Some(zero_points(t, scheme, per_row)?),
        _ => None,
    };
    let g = scheme.group_size.unwrap_or(cols);
    // compressed-tensors' symmetric range, whose rounding reaches -128 (-8): the int8 kernels' grid stops at
    // -127, so packing with these scales stores such an int8 code one step up; int4's -8 is kept (docs/FORMAT.md).
    let (lo, hi) = if scheme.bits == 8 { (-128.0, 127.0) } else { (-8.0, 7.0) };
    let mut w = zeros(t.name, rows * cols)?;
    for r in 0..rows {
        for c in 0..cols {
            let q = codes[r * cols + c];
            if !(lo..=hi).contains(&q) {
                return Err(t.bad(format!("code {q} at ({r}, {c}) is outside the {}-bit range", scheme.bits)));
            }
            let i = r * per_row + c / g;
            w[r * cols + c] = match &given_mins {
                // As llama.cpp dequantizes Q4_1 (`d · u + m` in f32), so both read the same values.
                Some(m) => scales[i] * (q + 8.0) + m[i],
                None => scales[i] * (q - zero_points.as_ref().map_or(0.0, |z| z[i])),
            };
        }
    }
    let mins = match (given_mins, &zero_points) {
        (Some(m), _) => Some(m),
        (None, Some(z)) if scheme.bits == 4 => Some(z.iter().zip(&scales).map(|(z, s)| -s * (z + 8.0)).collect()),
        _ => None,
    };
    Ok(Decoded { w, scales: Some((scales, per_row)), sparse, bf16: false, mins })
}

/// `<module>.weight_min` `[rows, per_row]`: the float minimums of a [`PACK_QUANTIZED_MIN`] checkpoint, finite,
/// required there and refused anywhere else (another reader would run the codes without them); `Ok(None)` for
/// the other asymmetric formats, whose zero points are read instead.
fn float_mins(t: &Target, scheme: QuantScheme, per_row: usize) -> Result<Option<Vec<f32>>> {
    let name = format!("{}.weight_min", t.module());
    let zp = format!("{}.weight_zero_point", t.module());
    let got = t.store.get(&name)?;
    if !scheme.float_mins {
        return match got {
            Some(_) => Err(t.bad(format!("{name} needs quantization format {PACK_QUANTIZED_MIN:?}"))),
            None => Ok(None),
        };
    }
    if t.store.contains(&zp) {
        return Err(t.bad(format!("{zp} beside float minimums ({PACK_QUANTIZED_MIN:?} has none)")));
    }
    let m = got.ok_or_else(|| t.bad(format!("{name} is missing (format {PACK_QUANTIZED_MIN:?})")))?;
    if !matches!(m.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
        return Err(t.bad(format!("{name} has dtype {}: minimums must be floats (F32, F16 or BF16)", m.dtype.name())));
    }
    if m.shape != [t.rows, per_row] {
        return Err(t.bad(format!("{name} has shape {:?}, expected [{}, {per_row}]", m.shape, t.rows)));
    }
    let v = m.to_f32(&name)?;
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(t.bad(format!("{name} holds a non-finite minimum {} at [{}, {}]", v[i], i / per_row, i % per_row)));
    }
    Ok(Some(v))
}

/// `<module>.weight_zero_point` `[rows, per_row]`: I8, or (`pack-quantized`) packed like the codes but along
/// the rows, I32 `[ceil(rows · bits / 32), per_row]`; each within the codes' range.
fn zero_points(t: &Target, scheme: QuantScheme, per_row: usize) -> Result<Vec<f32>> {
    let name = format!("{}.weight_zero_point", t.module());
    let (dtype, _) = t.store.meta(&name).ok_or_else(|| t.bad(format!("{name} is missing (asymmetric scheme)")))?;
    let rows = t.rows;
    let z: Vec<f32> = match dtype {
        Dtype::I8 => t.store.tensor(&name, &[rows, per_row])?.bytes.iter().map(|&b| b as i8 as f32).collect(),
        Dtype::I32 => {
            let words = (rows * scheme.bits as usize).div_ceil(32);
            let packed = t.store.tensor(&name, &[words, per_row])?;
            // Row r's zero point of group g is in word (r · bits / 32, g).
            let mut z = vec![0.0; rows * per_row];
            for (i, z) in z.iter_mut().enumerate() {
                let (bit, g) = ((i / per_row) * scheme.bits as usize, i % per_row);
                *z = packed_code(&packed.bytes, scheme.bits, (bit / 32) * per_row + g, bit % 32);
            }
            z
        }
        d => return Err(t.bad(format!("{name} has dtype {}: zero points are I8, or I32 packed", d.name()))),
    };
    let half = (1u32 << (scheme.bits - 1)) as f32;
    if let Some(i) = z.iter().position(|v| !(-half..half).contains(v)) {
        return Err(t.bad(format!(
            "{name}: zero point {} at [{}, {}] is outside the {}-bit range",
            z[i],
            i / per_row,
            i % per_row,
            scheme.bits
        )));
    }
    Ok(z)
}
