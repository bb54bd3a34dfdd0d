//! Turning checkpoint tensors into runtime weights: packed linear layers (with fused projections), norms, and
//! embedding tables read straight from the memory map.

use super::safetensors::{f16_to_f32, Dtype, WeightStore};
use crate::error::{Error, Result};
use crate::formats::{Format, PackOptions, PackedMatrix};
use crate::kernels;

/// Which formats the linear layers and the output head are packed into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WeightPlan {
    /// Every transformer linear layer (q/k/v, o, MLP), unless `stored`.
    pub linear: Format,
    /// "As stored": each compressed linear takes the kernel format that matches its encoding (docs/FORMAT.md);
    /// `linear` applies to the dense float ones.
    pub stored: bool,
    /// The output head: never pruned, so a dense format (see [`WeightPlan::for_format`]).
    pub lm_head: Format,
    /// Group size and symmetry for integer formats.
    pub pack: PackOptions,
    /// How every linear layer meets its activations; `None`: [`kernels::Activations::default_for`] its format.
    pub act: Option<kernels::Activations>,
}

impl WeightPlan {
    /// The plan for a requested linear format. The head stays dense, as the paper keeps it: f32/bf16 heads for
    /// float formats, int8 per row for integer ones (an int4 head costs more accuracy than it saves time on
    /// small models).
    pub fn for_format(linear: Format, pack: PackOptions) -> WeightPlan {
        let lm_head = match linear {
            Format::DenseF32 | Format::SparseF32 => Format::DenseF32,
            Format::DenseBf16 | Format::SparseBf16 => Format::DenseBf16,
            Format::DenseInt8 | Format::SparseInt8 | Format::DenseInt4 | Format::SparseInt4 => Format::DenseInt8,
        };
        WeightPlan { linear, stored: false, lm_head, pack, act: None }
    }

    /// The plan that keeps a dense checkpoint's precision: bf16 stays bf16, f32 and f16 become f32.
    pub fn as_stored(dtype: Dtype, quantized: bool) -> WeightPlan {
        let f = if dtype == Dtype::BF16 { Format::DenseBf16 } else { Format::DenseF32 };
        let mut plan = WeightPlan::for_format(f, PackOptions::default());
        plan.stored = true;
        if quantized {
            plan.lm_head = Format::DenseInt8;
        }
        plan
    }
}

/// A linear layer `y = W x (+ b)` with `W` packed.
pub struct Linear {
    /// The packed weight.
    pub w: PackedMatrix,
    /// Optional bias (`rows` values).
    pub bias: Option<Vec<f32>>,
    /// The activation mode (`None`: the format's default).
    pub act: Option<kernels::Activations>,
}

impl Linear {
    /// `y[k × rows] = x[k × cols] Wᵀ (+ b)`.
    pub fn forward(&self, x: &[f32], k: usize, y: &mut [f32]) -> Result<()> {
        kernels::matmul(&self.w, x, k, y, self.act)?;
        if let Some(b) = &self.bias {
            for row in y.chunks_exact_mut(self.w.rows()) {
                row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
            }
        }
        Ok(())
    }
}

/// Norm weights (`D` values each).
pub struct NormW {
    /// Scale.
    pub w: Vec<f32>,
    /// Shift (LayerNorm with bias only).
    pub b: Option<Vec<f32>>,
}

/// A `[V, D]` table in its stored precision (f32, f16 or bf16), copied out of the checkpoint at load so that
/// the model does not depend on the mapped file; rows are widened to f32 as tokens read them.
pub struct Embedding {
    dtype: Dtype,
    bytes: Vec<u8>,
    rows: usize,
    cols: usize,
}

impl Embedding {
    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Writes row `i` as f32 into `out` (`D` values).
    pub fn row(&self, i: usize, out: &mut [f32]) -> Result<()> {
        if i >= self.rows {
            return Err(Error::invalid(
                "embedding",
                format!("token id {i} is outside the vocabulary of {}", self.rows),
            ));
        }
        let size = self.dtype.size();
        let bytes = &self.bytes[i * self.cols * size..(i + 1) * self.cols * size];
        match self.dtype {
            Dtype::F32 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            Dtype::BF16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
                }
            }
            Dtype::F16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f16_to_f32(u16::from_le_bytes([c[0], c[1]]));
                }
            }
            _ => unreachable!("checked at load"),
        }
        Ok(())
    }

    /// Bytes of the table as stored.
    pub fn nbytes(&self) -> usize {
        self.bytes.len()
    }
}

fn out_of_memory(name: &str, n: usize) -> Error {
    Error::invalid("load", format!("{name}: not enough memory for {n} values"))
}

/// `n` zeros, or an error naming `name` when the memory is not there (`vec!` would abort the process).
fn zeros(name: &str, n: usize) -> Result<Vec<f32>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| out_of_memory(name, n))?;
    v.resize(n, 0.0);
    Ok(v)
}

/// Reads tensors by Hugging Face name and builds runtime weights according to a [`WeightPlan`].
pub struct Loader<'a> {
    /// The checkpoint.
    pub store: &'a WeightStore,
    /// Target formats.
    pub plan: WeightPlan,
    /// The checkpoint's weight quantization scheme, from `quantization_config` (docs/FORMAT.md).
    pub quant: Option<QuantScheme>,
}

/// Symmetric integer weight quantization as a compressed checkpoint declares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuantScheme {
    /// 4 or 8.
    pub bits: u32,
    /// Columns per scale group; `None` = one scale per output channel.
    pub group_size: Option<usize>,
    /// `input_activations` declares int8 per-token dynamic quantization (compressed-tensors' W8A8 scheme):
    /// the model then runs with [`kernels::Activations::Int8Token`] unless the caller asks otherwise. Other
    /// activation schemes (static per tensor, ...) run with the default per-64-column dynamic scales, which
    /// are at least as fine.
    pub token_acts: bool,
}

impl QuantScheme {
    /// Reads `quantization_config.config_groups.*.weights` of a config.json; `Ok(None)` when absent.
    pub fn from_config(config: &serde_json::Value) -> Result<Option<QuantScheme>> {
        let bad = |m: String| Error::invalid("load", format!("quantization_config: {m}"));
        let Some(qc) = config.get("quantization_config").filter(|q| q.is_object()) else { return Ok(None) };
        let method = qc.get("quant_method").and_then(|m| m.as_str()).unwrap_or("");
        if method != "compressed-tensors" {
            return Err(Error::unsupported(
                "load",
                format!("quantization method {method:?} is not supported (compressed-tensors)"),
            ));
        }
        if let Some(v) = qc.get("sparseinfer_format_version").and_then(|v| v.as_u64()) {
            if v > 1 {
                return Err(Error::unsupported(
                    "load",
                    format!("checkpoint format version {v} is newer than this sparseinfer (1)"),
                ));
            }
        }
        check_format(qc.get("format"), "quantization_config.format", QUANT_FORMATS)?;
        if let Some(sc) = qc.get("sparsity_config").filter(|s| s.as_object().is_some_and(|o| !o.is_empty())) {
            check_format(sc.get("format"), "quantization_config.sparsity_config.format", SPARSITY_FORMATS)?;
        }
        let Some(groups) = qc.get("config_groups").and_then(|g| g.as_object()) else { return Ok(None) };
        let mut scheme = None;
        for (gname, g) in groups {
            check_format(g.get("format"), &format!("quantization_config.config_groups.{gname}.format"), QUANT_FORMATS)?;
            let w = g.get("weights").ok_or_else(|| bad("a config group has no \"weights\"".into()))?;
            let bits = w
                .get("num_bits")
                .and_then(|b| b.as_u64())
                .and_then(|b| u32::try_from(b).ok())
                .ok_or_else(|| bad("no usable num_bits".into()))?;
            if bits != 4 && bits != 8 {
                return Err(Error::unsupported("load", format!("{bits}-bit weights are not supported (4, 8)")));
            }
            if w.get("type").and_then(|t| t.as_str()).unwrap_or("int") != "int" {
                return Err(Error::unsupported("load", "only integer weight quantization is supported"));
            }
            if !w.get("symmetric").and_then(|t| t.as_bool()).unwrap_or(true) {
                return Err(Error::unsupported("load", "asymmetric checkpoint quantization is not supported"));
            }
            let group_size = w.get("group_size").and_then(|g| g.as_u64()).map(|g| g as usize);
            let token_acts = g.get("input_activations").is_some_and(|a| {
                a.get("num_bits").and_then(|b| b.as_u64()) == Some(8)
                    && a.get("type").and_then(|t| t.as_str()).unwrap_or("int") == "int"
                    && a.get("strategy").and_then(|s| s.as_str()) == Some("token")
                    && a.get("dynamic").and_then(|d| d.as_bool()) == Some(true)
            });
            let s = QuantScheme { bits, group_size, token_acts };
            if scheme.is_some_and(|x| x != s) {
                return Err(Error::unsupported("load", "mixed quantization schemes are not supported"));
            }
            scheme = Some(s);
        }
        Ok(scheme)
    }
}

/// compressed-tensors quantization formats whose tensors [`Loader`] decodes (docs/FORMAT.md).
const QUANT_FORMATS: &[&str] = &["dense", "int-quantized", "pack-quantized"];
/// compressed-tensors sparsity formats whose tensors [`Loader`] decodes.
const SPARSITY_FORMATS: &[&str] = &["dense", "sparse-bitmask"];

/// Refuses a compressed-tensors format (a string at `field` of config.json, absent or null: not declared) that
/// is not one of `known`: its tensors would be read as something they are not.
fn check_format(v: Option<&serde_json::Value>, field: &str, known: &[&str]) -> Result<()> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(()),
        Some(serde_json::Value::String(f)) if known.contains(&f.as_str()) => Ok(()),
        Some(serde_json::Value::String(f)) => Err(Error::unsupported(
            "load",
            format!("config.json {field}: compressed-tensors format {f:?} is not supported ({})", known.join(", ")),
        )),
        Some(other) => Err(Error::invalid("load", format!("config.json {field}: {other} is not a format name"))),
    }
}

/// One stored weight matrix, decoded: dequantized values, and the codes' scales when it was quantized.
struct Stored {
    w: Vec<f32>,
    /// `rows × per_row` scales and `per_row`, when quantized.
    scales: Option<(Vec<f32>, usize)>,
    sparse: bool,
    bf16: bool,
}

/// How a projection is stored in the checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `nn.Linear`: `[out, in]`.
    OutIn,
    /// GPT-2's `Conv1D`: `[in, out]`.
    InOut,
}

impl Loader<'_> {
    /// A float tensor of an exact shape, as f32.
    pub fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let v = self.store.f32(name, shape)?;
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(Error::invalid("load", format!("tensor {name:?} holds a non-finite value {} at {i}", v[i])));
        }
        Ok(v)
    }

    /// A norm of width `d` (`{prefix}.weight`, and `{prefix}.bias` when `bias`).
    pub fn norm(&self, prefix: &str, d: usize, bias: bool) -> Result<NormW> {
        Ok(NormW {
            w: self.f32(&format!("{prefix}.weight"), &[d])?,
            b: if bias { Some(self.f32(&format!("{prefix}.bias"), &[d])?) } else { None },
        })
    }

    /// Decodes one `[rows, cols]` weight in any encoding of docs/FORMAT.md (dense float, int8, packed int4,
    /// sparse bitmask over floats or codes), dequantized, with its scales when quantized.
    fn stored(&self, name: &str, rows: usize, cols: usize, layout: Layout) -> Result<Stored> {
        let bad = |m: String| Error::invalid("load", format!("{name}: {m}"));
        let prefix = name.strip_suffix(".weight").unwrap_or(name);
        let st = self.store;
        // A shape stored as a tensor must be the one the config implies.
        let expect_shape = |tensor: String| -> Result<()> {
            let shape = st.int_values(&tensor)?;
            if shape != [rows as i64, cols as i64] {
                return Err(bad(format!("{tensor} is {shape:?}, the config implies [{rows}, {cols}]")));
            }
            Ok(())
        };
        let codes: Option<Vec<f32>>;
        let mut sparse = false;
        let mut bf16 = false;
        // sparse-bitmask tensors sit beside the module's other tensors: `<module>.bitmask` (compressed-tensors
        // 0.9 on), or `<module>.weight.bitmask` (compressed-tensors up to 0.8, and sparseinfer before it).
        let sparse_base = [prefix, name].into_iter().find(|b| st.contains(&format!("{b}.bitmask")));
        if let Some(base) = sparse_base {
            if layout != Layout::OutIn {
                return Err(bad("compressed Conv1D weights are not supported".into()));
            }
            sparse = true;
            expect_shape(format!("{base}.shape"))?;
            let mask = st.tensor(&format!("{base}.bitmask"), &[rows, cols.div_ceil(8)])?;
            if mask.dtype != Dtype::U8 {
                return Err(bad(format!("{base}.bitmask has dtype {}, expected U8", mask.dtype.name())));
            }
            let values = st
                .get(&format!("{base}.compressed"))
                .ok_or_else(|| bad(format!("{base}.compressed (the stored values) is missing")))?;
            let nnz: usize = mask.bytes.iter().map(|b| b.count_ones() as usize).sum::<usize>();
            // Bits past `cols` in the last byte of a row must be clear, or the count lies.
            let tail_ok = cols.is_multiple_of(8)
                || (0..rows).all(|r| mask.bytes[r * cols.div_ceil(8) + cols / 8] >> (cols % 8) == 0);
            if values.shape.len() != 1 || values.shape[0] != nnz || !tail_ok {
                return Err(bad(format!("bitmask has {nnz} set bits but .compressed holds {:?} values", values.shape)));
            }
            let flat: Vec<f32> = match values.dtype {
                Dtype::I8 => values.bytes.iter().map(|&b| b as i8 as f32).collect(),
                Dtype::F32 | Dtype::F16 | Dtype::BF16 => {
                    bf16 = values.dtype == Dtype::BF16;
                    values.to_f32(name)?
                }
                d => return Err(bad(format!(".compressed has dtype {}", d.name()))),
            };
            let mut dense = zeros(name, rows * cols)?;
            let mut k = 0;
            for r in 0..rows {
                for c in 0..cols {
                    if mask.bytes[r * cols.div_ceil(8) + c / 8] >> (c % 8) & 1 == 1 {
                        dense[r * cols + c] = flat[k];
                        k += 1;
                    }
                }
            }
            if values.dtype == Dtype::I8 {
                codes = Some(dense);
            } else {
                if let Some(i) = dense.iter().position(|x| !x.is_finite()) {
                    return Err(bad(format!("non-finite value at {i}")));
                }
                return Ok(Stored { w: dense, scales: None, sparse, bf16 });
            }
        } else if st.contains(&format!("{prefix}.weight_packed")) {
            expect_shape(format!("{prefix}.weight_shape"))?;
            let packed = st.tensor(&format!("{prefix}.weight_packed"), &[rows, cols.div_ceil(8)])?;
            if packed.dtype != Dtype::I32 {
                return Err(bad("weight_packed must be I32".into()));
            }
            let words = cols.div_ceil(8);
            let mut c = zeros(name, rows * cols)?;
            for r in 0..rows {
                for j in 0..cols {
                    let o = (r * words + j / 8) * 4;
                    let word = u32::from_le_bytes(packed.bytes[o..o + 4].try_into().expect("4 bytes"));
                    c[r * cols + j] = ((word >> (4 * (j % 8))) & 0xF) as f32 - 8.0;
                }
            }
            codes = Some(c);
        } else {
            let t = st.get(name).ok_or_else(|| bad("tensor is missing from the checkpoint".into()))?;
            if t.dtype == Dtype::I8 {
                let t = st.tensor(name, &[rows, cols])?;
                codes = Some(t.bytes.iter().map(|&b| b as i8 as f32).collect());
            } else {
                let w = match layout {
                    Layout::OutIn => self.f32(name, &[rows, cols])?,
                    Layout::InOut => {
                        let t = self.f32(name, &[cols, rows])?;
                        let mut w = zeros(name, rows * cols)?;
                        for i in 0..cols {
                            for o in 0..rows {
                                w[o * cols + i] = t[i * rows + o];
                            }
                        }
                        w
                    }
                };
                return Ok(Stored {
                    w,
                    scales: None,
                    sparse: false,
                    bf16: st.get(name).is_some_and(|t| t.dtype == Dtype::BF16),
                });
            }
        }
        // Quantized: W = scale[r, c / G] · q.
        let codes = codes.expect("set above");
        let scheme =
            self.quant.ok_or_else(|| bad("integer weights but no quantization_config in config.json".into()))?;
        let sname = format!("{prefix}.weight_scale");
        let scale_t = st.get(&sname).ok_or_else(|| bad(format!("{sname} is missing")))?;
        let per_row = match scheme.group_size {
            None => 1,
            Some(g) if g > 0 => cols.div_ceil(g),
            Some(_) => return Err(bad("group_size 0".into())),
        };
        if !matches!(scale_t.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
            return Err(bad(format!(
                "{sname} has dtype {}: scales must be floats (F32, F16 or BF16)",
                scale_t.dtype.name()
            )));
        }
        if scale_t.shape != [rows, per_row] {
            return Err(bad(format!("{sname} has shape {:?}, expected [{rows}, {per_row}]", scale_t.shape)));
        }
        let scales = scale_t.to_f32(&sname)?;
        if let Some(i) = scales.iter().position(|x| !x.is_finite()) {
            return Err(bad(format!(
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
        let mut w = zeros(name, rows * cols)?;
        for r in 0..rows {
            for c in 0..cols {
                let q = codes[r * cols + c];
                if !(lo..=hi).contains(&q) {
                    return Err(bad(format!("code {q} at ({r}, {c}) is outside the {}-bit range", scheme.bits)));
                }
                w[r * cols + c] = scales[r * per_row + c / g] * q;
            }
        }
        Ok(Stored { w, scales: Some((scales, per_row)), sparse, bf16: false })
    }

    /// One linear layer from one or more stacked projections (`parts`: weight names with their output rows,
    /// all with `cols` inputs), packed into `format` (`None`: the plan's, or as stored). Biases are read from
    /// `{name without .weight}.bias` when `bias` is set. Quantized checkpoints keep their codes and scales
    /// when the target format has the same bits and group.
    pub fn linear(
        &self,
        parts: &[(&str, usize)],
        cols: usize,
        layout: Layout,
        bias: bool,
        format: Option<Format>,
    ) -> Result<Linear> {
        let rows: usize = parts.iter().map(|p| p.1).sum();
        // Grown part by part: each part's size is checked against its tensor before it is decoded, so nothing
        // is sized from the config alone.
        let mut w: Vec<f32> = Vec::new();
        let mut b = Vec::new();
        let mut scales: Vec<f32> = Vec::new();
        let mut per_row: Option<usize> = None;
        let mut all_quant = true;
        let (mut sparse, mut bf16) = (true, true);
        for &(name, r) in parts {
            let s = self.stored(name, r, cols, layout)?;
            if w.is_empty() {
                w = s.w;
            } else {
                w.try_reserve_exact(s.w.len()).map_err(|_| out_of_memory(name, s.w.len()))?;
                w.extend(s.w);
            }
            sparse &= s.sparse;
            bf16 &= s.bf16;
            match s.scales {
                Some((sc, n)) if per_row.is_none_or(|p| p == n) => {
                    per_row = Some(n);
                    scales.extend(sc);
                }
                _ => all_quant = false,
            }
            if bias {
                let bname = format!("{}.bias", name.strip_suffix(".weight").unwrap_or(name));
                b.extend(self.f32(&bname, &[r])?);
            }
        }
        let quant = if all_quant { self.quant } else { None };
        let format = match format {
            Some(f) => f,
            None if !self.plan.stored => self.plan.linear,
            None => match (quant.map(|q| q.bits), sparse) {
                (Some(8), true) => Format::SparseInt8,
                (Some(8), false) => Format::DenseInt8,
                (Some(_), true) => Format::SparseInt4,
                (Some(_), false) => Format::DenseInt4,
                (None, true) if bf16 => Format::SparseBf16,
                (None, true) => Format::SparseF32,
                (None, false) => self.plan.linear,
            },
        };
        let mut opts = self.plan.pack;
        if self.plan.act == Some(kernels::Activations::F32) {
            // Only the int8-activation kernels read tiles: keep rows rather than build a twin on first use.
            opts.layout = crate::formats::Layout::Rows;
        }
        if self.plan.stored {
            if let Some(q) = quant {
                opts.group_size = if q.bits == 4 { Some(q.group_size.unwrap_or(cols)) } else { q.group_size };
            }
        }
        let ctx = |e: Error| match e {
            Error::InvalidInput { msg, .. } => Error::invalid("load", format!("packing {}: {msg}", parts[0].0)),
            e => e,
        };
        let elem_bits = match format.elem() {
            crate::formats::Elem::I8 => Some(8),
            crate::formats::Elem::I4 => Some(4),
            _ => None,
        };
        let same_grid = quant.is_some_and(|q| {
            let target_group = if q.bits == 4 { Some(opts.group_size.unwrap_or(128)) } else { opts.group_size };
            Some(q.bits) == elem_bits && !opts.asymmetric && target_group == q.group_size
        });
        let packed = if same_grid {
            PackedMatrix::pack_with_scales(&w, rows, cols, format, opts, &scales, per_row.unwrap_or(1)).map_err(ctx)?
        } else {
            PackedMatrix::pack(&w, rows, cols, format, opts).map_err(ctx)?
        };
        Ok(Linear { w: packed, bias: bias.then_some(b), act: self.plan.act })
    }

    /// A transformer projection in the plan's linear format.
    pub fn proj(&self, parts: &[(&str, usize)], cols: usize, layout: Layout, bias: bool) -> Result<Linear> {
        self.linear(parts, cols, layout, bias, None)
    }

    /// An embedding table `[rows, cols]`, copied in its stored precision.
    pub fn embedding(&self, name: &str, rows: usize, cols: usize) -> Result<Embedding> {
        let t = self.store.tensor(name, &[rows, cols])?;
        if !matches!(t.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
            return Err(Error::invalid("load", format!("embedding {name:?} has dtype {}", t.dtype.name())));
        }
        let mut bytes = Vec::new();
        bytes.try_reserve_exact(t.bytes.len()).map_err(|_| out_of_memory(name, t.bytes.len()))?;
        bytes.extend_from_slice(t.bytes);
        Ok(Embedding { dtype: t.dtype, bytes, rows, cols })
    }
}
