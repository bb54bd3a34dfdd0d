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
    /// Recognises the encoding by its tensors (`Ok(None)`: not this one) and reads them.
    pub decode: fn(&Target) -> Result<Option<Encoded>>,
}

/// Every encoding the runtime reads, tried in this order ([`dense`] last: it takes whatever tensor is left).
pub const ENCODINGS: &[Encoding] = &[
    Encoding { format: "sparse-bitmask", declared: &[Declared::Sparsity], decode: sparse_bitmask },
    Encoding { format: "pack-quantized", declared: &[Declared::Quantization], decode: pack_quantized },
    Encoding { format: "int-quantized", declared: &[Declared::Quantization], decode: int_quantized },
    Encoding { format: "dense", declared: &[Declared::Quantization, Declared::Sparsity], decode: dense },
];

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
}

/// Decodes `t` in whichever encoding of [`ENCODINGS`] its tensors are in; codes are dequantized with
/// `quant`, the checkpoint's declared scheme.
pub fn decode(t: &Target, quant: Option<QuantScheme>) -> Result<Decoded> {
    let mut found = None;
    for e in ENCODINGS {
        found = (e.decode)(t)?;
        if found.is_some() {
            break;
        }
    }
    let Encoded { values, sparse } = found.ok_or_else(|| t.bad("tensor is missing from the checkpoint"))?;
    match values {
        Values::Float { w, bf16 } => Ok(Decoded { w, scales: None, sparse, bf16 }),
        Values::Codes(codes) => dequantize(t, quant, &codes, sparse),
    }
}

/// `sparse-bitmask`: `<module>.bitmask` (a row-major bit per weight, `[rows, ceil(cols / 8)]` U8), the nonzeros
/// in `<module>.compressed` (floats, or int8 codes), `<module>.shape`. compressed-tensors up to 0.8 (and
/// sparseinfer before it) named them `<module>.weight.bitmask` etc.
fn sparse_bitmask(t: &Target) -> Result<Option<Encoded>> {
    let (st, rows, cols) = (t.store, t.rows, t.cols);
    let Some(base) = [t.module(), t.name].into_iter().find(|b| st.contains(&format!("{b}.bitmask"))) else {
        return Ok(None);
    };
    if t.orientation != Orientation::OutIn {
        return Err(t.bad("compressed Conv1D weights are not supported"));
    }
    t.expect_shape(&format!("{base}.shape"))?;
    let row_bytes = cols.div_ceil(8);
    let mask = st.tensor(&format!("{base}.bitmask"), &[rows, row_bytes])?;
    if mask.dtype != Dtype::U8 {
        return Err(t.bad(format!("{base}.bitmask has dtype {}, expected U8", mask.dtype.name())));
    }
    let values = st
        .get(&format!("{base}.compressed"))?
        .ok_or_else(|| t.bad(format!("{base}.compressed (the stored values) is missing")))?;
    let nnz: usize = mask.bytes.iter().map(|b| b.count_ones() as usize).sum::<usize>();
    // Bits past `cols` in the last byte of a row must be clear, or the count lies.
    let tail_ok = cols.is_multiple_of(8) || (0..rows).all(|r| mask.bytes[r * row_bytes + cols / 8] >> (cols % 8) == 0);
    if values.shape.len() != 1 || values.shape[0] != nnz || !tail_ok {
        return Err(t.bad(format!("bitmask has {nnz} set bits but .compressed holds {:?} values", values.shape)));
    }
    let flat: Vec<f32> = match values.dtype {
        Dtype::I8 => values.bytes.iter().map(|&b| b as i8 as f32).collect(),
        Dtype::F32 | Dtype::F16 | Dtype::BF16 => values.to_f32(t.name)?,
        d => return Err(t.bad(format!(".compressed has dtype {}", d.name()))),
    };
    let mut dense = zeros(t.name, rows * cols)?;
    let mut k = 0;
    for r in 0..rows {
        for c in 0..cols {
            if mask.bytes[r * row_bytes + c / 8] >> (c % 8) & 1 == 1 {
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

/// `pack-quantized`: int4 codes offset by 8, eight to a little-endian I32 word along each row
/// (`<module>.weight_packed` `[rows, ceil(cols / 8)]`), and `<module>.weight_shape`.
fn pack_quantized(t: &Target) -> Result<Option<Encoded>> {
    let (st, rows, cols, prefix) = (t.store, t.rows, t.cols, t.module());
    if !st.contains(&format!("{prefix}.weight_packed")) {
        return Ok(None);
    }
    t.expect_shape(&format!("{prefix}.weight_shape"))?;
    let words = cols.div_ceil(8);
    let packed = st.tensor(&format!("{prefix}.weight_packed"), &[rows, words])?;
    if packed.dtype != Dtype::I32 {
        return Err(t.bad("weight_packed must be I32"));
    }
    let mut c = zeros(t.name, rows * cols)?;
    for r in 0..rows {
        for j in 0..cols {
            let o = (r * words + j / 8) * 4;
            let word = u32::from_le_bytes(packed.bytes[o..o + 4].try_into().expect("4 bytes"));
            c[r * cols + j] = ((word >> (4 * (j % 8))) & 0xF) as f32 - 8.0;
        }
    }
    Ok(Some(Encoded { values: Values::Codes(c), sparse: false }))
}

/// `int-quantized`: int8 codes in `<module>.weight` itself (I8 `[rows, cols]`).
fn int_quantized(t: &Target) -> Result<Option<Encoded>> {
    if t.store.meta(t.name).is_none_or(|(dtype, _)| dtype != Dtype::I8) {
        return Ok(None);
    }
    let w = t.store.tensor(t.name, &[t.rows, t.cols])?;
    Ok(Some(Encoded { values: Values::Codes(w.bytes.iter().map(|&b| b as i8 as f32).collect()), sparse: false }))
}

/// Dense floats (F32, F16 or BF16) in `<module>.weight`, oriented as `t.orientation` says (a `Conv1D` weight
/// is transposed once here).
fn dense(t: &Target) -> Result<Option<Encoded>> {
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

/// `W = scale[r, c / G] · q` for codes `q[rows × cols]` with `<module>.weight_scale` `[rows, per_row]`; the
/// scales are kept beside the weights.
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
    let g = scheme.group_size.unwrap_or(cols);
    // compressed-tensors' symmetric range, whose rounding reaches -128 (-8): the kernels' symmetric grid stops
    // at -127 (-7), so packing with these scales stores such a code one step up (docs/FORMAT.md).
    let (lo, hi) = if scheme.bits == 8 { (-128.0, 127.0) } else { (-8.0, 7.0) };
    let mut w = zeros(t.name, rows * cols)?;
    for r in 0..rows {
        for c in 0..cols {
            let q = codes[r * cols + c];
            if !(lo..=hi).contains(&q) {
                return Err(t.bad(format!("code {q} at ({r}, {c}) is outside the {}-bit range", scheme.bits)));
            }
            w[r * cols + c] = scales[r * per_row + c / g] * q;
        }
    }
    Ok(Decoded { w, scales: Some((scales, per_row)), sparse, bf16: false })
}
