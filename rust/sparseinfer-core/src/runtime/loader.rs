//! Building the model's weights from a checkpoint by Hugging Face name: linear layers (projections stacked
//! into one packed matrix) in the formats of a [`WeightPlan`], norms, and the embedding table.

use super::checkpoint::{self, out_of_memory, Dtype, Orientation, QuantScheme, WeightStore};
use super::ops::{Embedding, Linear, NormW};
use super::pack_cache::{Expect, PackCache};
use super::plan::{StoredAs, WeightPlan};
use crate::error::{Error, Result};
use crate::formats::{Format, GivenScales, PackedMatrix};

/// Reads tensors by Hugging Face name and builds runtime weights according to a [`WeightPlan`].
pub struct Loader<'a> {
    /// The checkpoint.
    pub store: &'a WeightStore,
    /// Target formats.
    pub plan: WeightPlan,
    /// The checkpoint's weight quantization scheme, from `quantization_config` (docs/FORMAT.md).
    pub quant: Option<QuantScheme>,
    /// The load cache, when one is used: packed layers come from it, or go into it.
    pub cache: Option<&'a PackCache>,
}

impl Loader<'_> {
    /// A float tensor of an exact shape, as f32 (finite values only).
    pub fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        checkpoint::finite_f32(self.store, name, shape)
    }

    /// A norm of width `d` (`{prefix}.weight`, and `{prefix}.bias` when `bias`).
    pub fn norm(&self, prefix: &str, d: usize, bias: bool) -> Result<NormW> {
        Ok(NormW {
            w: self.f32(&format!("{prefix}.weight"), &[d])?,
            b: if bias { Some(self.f32(&format!("{prefix}.bias"), &[d])?) } else { None },
        })
    }

    /// One linear layer from one or more stacked projections (`parts`: weight names with their output rows,
    /// all with `cols` inputs), packed into `format` (`None`: the plan's, or as stored). Biases are read from
    /// `{name without .weight}.bias` when `bias` is set. Quantized checkpoints keep their codes and scales
    /// when the target format has the same bits and group.
    pub fn linear(
        &self,
        parts: &[(&str, usize)],
        cols: usize,
        orientation: Orientation,
        bias: bool,
        format: Option<Format>,
    ) -> Result<Linear> {
        self.build(parts, cols, orientation, &vec![bias; parts.len()], format)
    }

    /// A transformer projection in the plan's linear format.
    pub fn proj(&self, parts: &[(&str, usize)], cols: usize, orientation: Orientation, bias: bool) -> Result<Linear> {
        self.linear(parts, cols, orientation, bias, None)
    }

    /// A projection in the plan's linear format whose parts differ in having a bias (`biases[i]` for
    /// `parts[i]`; a part without one adds zeros), as Whisper's attention, whose key projection has none.
    pub fn proj_biases(
        &self,
        parts: &[(&str, usize)],
        biases: &[bool],
        cols: usize,
        orientation: Orientation,
    ) -> Result<Linear> {
        self.build(parts, cols, orientation, biases, None)
    }

    /// A 1-D convolution of kernel `width` (`{prefix}.weight` `[out, channels, width]`, `{prefix}.bias`) as
    /// the linear layer of its im2col form (`channels · width` inputs, index `c · width + j`), packed in the
    /// head's format: convolutions are not pruned, so they take the dense format of the plan.
    pub fn conv1d(&self, prefix: &str, out: usize, channels: usize, width: usize) -> Result<Linear> {
        let key = format!("conv1d {prefix} {out} {channels} {width}");
        let expect = Expect { rows: out, cols: channels * width, bias: true };
        let (w, bias) = self.cached(&key, expect, || {
            let name = format!("{prefix}.weight");
            let w = self.f32(&name, &[out, channels, width])?;
            let b = self.f32(&format!("{prefix}.bias"), &[out])?;
            let cols = channels * width;
            let stored = StoredAs { quant: None, sparse: false, bf16: false };
            let packed = PackedMatrix::pack(
                &w,
                out,
                cols,
                self.plan.lm_head,
                self.plan.pack_options(stored, self.plan.lm_head, cols),
            )
            .map_err(|e| match e {
                Error::InvalidInput { msg, .. } => Error::invalid("load", format!("packing {name}: {msg}")),
                e => e,
            })?;
            Ok((packed, Some(b)))
        })?;
        Ok(Linear { w, bias, act: self.plan.act })
    }

    /// A packed layer from the load cache under `key` (the layer's names, shape and requested format; the
    /// cache's own key covers the checkpoint and the options), or from `make`. Float dense layers are plain
    /// conversions of the checkpoint, as fast to redo as to read, so they are not written.
    fn cached(
        &self,
        key: &str,
        expect: Expect,
        make: impl FnOnce() -> Result<(PackedMatrix, Option<Vec<f32>>)>,
    ) -> Result<(PackedMatrix, Option<Vec<f32>>)> {
        match self.cache {
            None => make(),
            Some(c) => c.layer(key, expect, make, |m| !matches!(m.format(), Format::DenseF32 | Format::DenseBf16)),
        }
    }

    fn build(
        &self,
        parts: &[(&str, usize)],
        cols: usize,
        orientation: Orientation,
        biases: &[bool],
        format: Option<Format>,
    ) -> Result<Linear> {
        let key = format!("linear {parts:?} {cols} {orientation:?} {biases:?} {format:?}");
        let rows = parts.iter().map(|p| p.1).sum();
        let expect = Expect { rows, cols, bias: biases.iter().any(|&b| b) };
        let (w, bias) = self.cached(&key, expect, || self.build_fresh(parts, cols, orientation, biases, format))?;
        let layer = Linear { w, bias, act: self.plan.act };
        crate::kernels::prepare(&layer.w, layer.activations());
        Ok(layer)
    }

    /// [`Loader::build`] from the checkpoint: decode every part, pack.
    fn build_fresh(
        &self,
        parts: &[(&str, usize)],
        cols: usize,
        orientation: Orientation,
        biases: &[bool],
        format: Option<Format>,
    ) -> Result<(PackedMatrix, Option<Vec<f32>>)> {
        debug_assert_eq!(parts.len(), biases.len());
        let bias = biases.iter().any(|&b| b);
        let rows: usize = parts.iter().map(|p| p.1).sum();
        // Grown part by part: each part's size is checked against its tensor before it is decoded, so nothing
        // is sized from the config alone.
        let mut w: Vec<f32> = Vec::new();
        let mut b = Vec::new();
        let mut scales: Vec<f32> = Vec::new();
        let mut mins: Vec<f32> = Vec::new();
        let mut per_row: Option<usize> = None;
        let mut all_quant = true;
        let (mut sparse, mut bf16) = (true, true);
        for (&(name, r), &has_bias) in parts.iter().zip(biases) {
            let target = checkpoint::encodings::Target { store: self.store, name, rows: r, cols, orientation };
            let s = checkpoint::decode(&target, self.quant)?;
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
                    mins.extend(s.mins.unwrap_or_default());
                }
                _ => all_quant = false,
            }
            if has_bias {
                let bname = format!("{}.bias", name.strip_suffix(".weight").unwrap_or(name));
                b.extend(self.f32(&bname, &[r])?);
            } else if bias {
                b.resize(b.len() + r, 0.0);
            }
        }
        let stored = StoredAs { quant: if all_quant { self.quant } else { None }, sparse, bf16 };
        let format = format.unwrap_or_else(|| self.plan.format_for(stored));
        let opts = self.plan.pack_options(stored, format, cols);
        let ctx = |e: Error| match e {
            Error::InvalidInput { msg, .. } => Error::invalid("load", format!("packing {}: {msg}", parts[0].0)),
            e => e,
        };
        let packed = if stored.same_grid(format, &opts) {
            let mins = opts.asymmetric.then_some(&mins[..]);
            let grid = GivenScales { scales: &scales, mins, per_row: per_row.unwrap_or(1) };
            PackedMatrix::pack_with_scales(&w, rows, cols, format, opts, grid).map_err(ctx)?
        } else {
            PackedMatrix::pack(&w, rows, cols, format, opts).map_err(ctx)?
        };
        Ok((packed, bias.then_some(b)))
    }

    /// An embedding table `[rows, cols]`, kept in its stored precision.
    pub fn embedding(&self, name: &str, rows: usize, cols: usize) -> Result<Embedding> {
        let t = self.store.tensor(name, &[rows, cols])?;
        if !matches!(t.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
            return Err(Error::invalid("load", format!("embedding {name:?} has dtype {}", t.dtype.name())));
        }
        Ok(Embedding::new(t.dtype, t.bytes, rows, cols))
    }
}
