//! Turning checkpoint tensors into runtime weights: packed linear layers (with fused projections), norms, and
//! embedding tables read straight from the memory map.

use super::safetensors::{f16_to_f32, Dtype, WeightStore};
use crate::error::{Error, Result};
use crate::formats::{Format, PackOptions, PackedMatrix};
use crate::kernels;

/// Which formats the linear layers and the output head are packed into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WeightPlan {
    /// Every transformer linear layer (q/k/v, o, MLP).
    pub linear: Format,
    /// The output head: never pruned, so a dense format (see [`WeightPlan::for_format`]).
    pub lm_head: Format,
    /// Group size and symmetry for integer formats.
    pub pack: PackOptions,
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
        WeightPlan { linear, lm_head, pack }
    }

    /// The plan that keeps a dense checkpoint's precision: bf16 stays bf16, f32 and f16 become f32.
    pub fn as_stored(dtype: Dtype) -> WeightPlan {
        let f = if dtype == Dtype::BF16 { Format::DenseBf16 } else { Format::DenseF32 };
        WeightPlan::for_format(f, PackOptions::default())
    }
}

/// A linear layer `y = W x (+ b)` with `W` packed.
pub struct Linear {
    /// The packed weight.
    pub w: PackedMatrix,
    /// Optional bias (`rows` values).
    pub bias: Option<Vec<f32>>,
}

impl Linear {
    /// `y[k × rows] = x[k × cols] Wᵀ (+ b)`.
    pub fn forward(&self, x: &[f32], k: usize, y: &mut [f32]) -> Result<()> {
        kernels::matmul(&self.w, x, k, y, None)?;
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

/// A `[V, D]` table read row by row from the memory map (never copied whole).
pub struct Embedding {
    store: WeightStore,
    name: String,
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
        let t = self.store.get(&self.name).expect("checked at load");
        let size = t.dtype.size();
        let bytes = &t.bytes[i * self.cols * size..(i + 1) * self.cols * size];
        match t.dtype {
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

    /// Bytes of the table in the file.
    pub fn nbytes(&self) -> usize {
        self.store.get(&self.name).map_or(0, |t| t.bytes.len())
    }
}

/// Reads tensors by Hugging Face name and builds runtime weights according to a [`WeightPlan`].
pub struct Loader<'a> {
    /// The checkpoint.
    pub store: &'a WeightStore,
    /// Target formats.
    pub plan: WeightPlan,
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

    /// One linear layer from one or more stacked projections (`parts`: weight names with their output rows,
    /// all with `cols` inputs), packed into `format`. Biases are read from `{name without .weight}.bias` when
    /// `bias` is set.
    pub fn linear(
        &self,
        parts: &[(&str, usize)],
        cols: usize,
        layout: Layout,
        bias: bool,
        format: Format,
    ) -> Result<Linear> {
        let rows: usize = parts.iter().map(|p| p.1).sum();
        let mut w = Vec::with_capacity(rows * cols);
        let mut b = Vec::with_capacity(rows);
        for &(name, r) in parts {
            match layout {
                Layout::OutIn => w.extend(self.f32(name, &[r, cols])?),
                Layout::InOut => {
                    let t = self.f32(name, &[cols, r])?;
                    let start = w.len();
                    w.resize(start + r * cols, 0.0);
                    for i in 0..cols {
                        for o in 0..r {
                            w[start + o * cols + i] = t[i * r + o];
                        }
                    }
                }
            }
            if bias {
                let bname = format!("{}.bias", name.strip_suffix(".weight").unwrap_or(name));
                b.extend(self.f32(&bname, &[r])?);
            }
        }
        let packed = PackedMatrix::pack(&w, rows, cols, format, self.plan.pack).map_err(|e| match e {
            Error::InvalidInput { msg, .. } => Error::invalid("load", format!("packing {}: {msg}", parts[0].0)),
            e => e,
        })?;
        Ok(Linear { w: packed, bias: bias.then_some(b) })
    }

    /// A transformer projection in the plan's linear format.
    pub fn proj(&self, parts: &[(&str, usize)], cols: usize, layout: Layout, bias: bool) -> Result<Linear> {
        self.linear(parts, cols, layout, bias, self.plan.linear)
    }

    /// An embedding table `[rows, cols]` left in the memory map.
    pub fn embedding(&self, name: &str, rows: usize, cols: usize) -> Result<Embedding> {
        let t = self.store.tensor(name, &[rows, cols])?;
        if !matches!(t.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
            return Err(Error::invalid("load", format!("embedding {name:?} has dtype {}", t.dtype.name())));
        }
        Ok(Embedding { store: self.store.clone(), name: name.to_string(), rows, cols })
    }
}
