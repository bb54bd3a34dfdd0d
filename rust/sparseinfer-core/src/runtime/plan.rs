//! Which kernel format each linear layer is packed into: the caller's choice for every layer, or "as stored",
//! where each compressed linear takes the format that matches its encoding (docs/FORMAT.md, "What the runtime
//! makes of it"). The head stays dense either way.

use super::checkpoint::{Dtype, QuantScheme};
use crate::formats::{Elem, Format, PackOptions};
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
    /// The plan for a requested linear format, with the head its table entry pairs with it
    /// ([`crate::formats::FormatTraits::head`]).
    pub fn for_format(linear: Format, pack: PackOptions) -> WeightPlan {
        WeightPlan { linear, stored: false, lm_head: linear.traits().head, pack, act: None }
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

    /// The kernel format of a linear layer the caller did not pin: the plan's linear format, or, loading as
    /// stored, the one matching its encoding (quantized bits, sparsity, bf16; docs/FORMAT.md).
    pub fn format_for(&self, stored: StoredAs) -> Format {
        if !self.stored {
            return self.linear;
        }
        let elem = match stored.quant.map(|q| q.bits) {
            Some(8) => Elem::I8,
            Some(_) => Elem::I4,
            None if !stored.sparse => return self.linear,
            None if stored.bf16 => Elem::Bf16,
            None => Elem::F32,
        };
        Format::of(elem, stored.sparse)
    }

    /// Pack options for a linear layer of `cols` inputs stored as `stored`: the plan's, with row layout when
    /// the activations stay f32 (only the int8-activation kernels read tiles, so no twin is built on first
    /// use), and, loading as stored, the checkpoint's scale groups.
    pub fn pack_options(&self, stored: StoredAs, format: Format, cols: usize) -> PackOptions {
        let mut opts = self.pack;
        if self.act == Some(kernels::Activations::F32) {
            opts.layout = crate::formats::Layout::Rows;
        }
        if self.stored {
            if let Some(q) = stored.quant {
                opts.group_size = if q.bits == 4 { Some(q.group_size.unwrap_or(cols)) } else { q.group_size };
            }
        } else if opts.group_size.is_none() && format.elem() == Elem::I4 {
            // An int4 checkpoint packed to an int4 format with no group named keeps its own groups, so its codes
            // and scales are used as they are (`same_grid`) instead of refitted at the default group.
            let group = stored.quant.filter(|q| q.bits == 4).and_then(|q| q.group_size);
            if let Some(g) = group.filter(|g| crate::formats::GROUP_SIZES.contains(g)) {
                opts.group_size = Some(g);
            }
        }
        // Asymmetry is an int4 grid: the caller's choice applies to the int4 layers (not to the int8 head), and
        // an asymmetric 4-bit checkpoint keeps its zero points on it; other formats fit their own (the int8
        // kernels are symmetric).
        let int4 = format.elem() == Elem::I4;
        opts.asymmetric = int4 && (opts.asymmetric || stored.quant.is_some_and(|q| q.asymmetric));
        // Likewise the tiled layout is for the symmetric integer formats.
        if opts.layout == crate::formats::Layout::Tiles && !crate::formats::tiles::tileable(format, opts.asymmetric) {
            opts.layout = crate::formats::Layout::Rows;
        }
        opts
    }
}

/// What the stacked parts of one linear layer were stored as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoredAs {
    /// The checkpoint's scheme, when every part is quantized with one scale grouping.
    pub quant: Option<QuantScheme>,
    /// Every part stored sparse.
    pub sparse: bool,
    /// Every part stored as bf16 floats.
    pub bf16: bool,
}

impl StoredAs {
    /// Whether packing into `format` with `opts` puts the codes on the checkpoint's grid (same bits, group
    /// size, symmetry), so its scales (and asymmetric int4 minimums) can be kept as they are.
    pub fn same_grid(&self, format: Format, opts: &PackOptions) -> bool {
        let elem = format.elem();
        let elem_bits = elem.is_int().then(|| elem.bits());
        self.quant.is_some_and(|q| {
            let target_group = if q.bits == 4 {
                Some(opts.group_size.unwrap_or(crate::formats::INT4_DEFAULT_GROUP))
            } else {
                opts.group_size
            };
            Some(q.bits) == elem_bits && opts.asymmetric == q.asymmetric && target_group == q.group_size
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_int4_checkpoint_keeps_its_groups_unless_the_caller_names_one() {
        let q = |group| QuantScheme {
            bits: 4,
            group_size: Some(group),
            token_acts: false,
            asymmetric: false,
            float_mins: false,
        };
        let stored = |group| StoredAs { quant: Some(q(group)), sparse: true, bf16: false };
        let plan = WeightPlan::for_format(Format::SparseInt4, PackOptions::default());
        for group in crate::formats::GROUP_SIZES {
            let opts = plan.pack_options(stored(group), Format::SparseInt4, 4096);
            assert_eq!(opts.group_size, Some(group));
            assert!(stored(group).same_grid(Format::SparseInt4, &opts));
        }
        // A group the kernels lack is refitted at the default, as is any int4 checkpoint the caller regroups.
        assert_eq!(plan.pack_options(stored(256), Format::SparseInt4, 4096).group_size, None);
        let regroup =
            WeightPlan::for_format(Format::DenseInt4, PackOptions { group_size: Some(64), ..Default::default() });
        let opts = regroup.pack_options(stored(128), Format::DenseInt4, 4096);
        assert_eq!(opts.group_size, Some(64));
        assert!(!stored(128).same_grid(Format::DenseInt4, &opts));
        // An int8 target fits its own grid.
        assert_eq!(plan.pack_options(stored(128), Format::DenseInt8, 4096).group_size, None);
    }
}
