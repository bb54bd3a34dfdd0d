//! A linear layer `y = W x (+ b)` over a packed weight: the one place the model meets the kernels.

use crate::error::Result;
use crate::formats::PackedMatrix;
use crate::kernels;

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
    /// The activation mode the layer runs with.
    pub fn activations(&self) -> kernels::Activations {
        self.act.unwrap_or(kernels::Activations::default_for(self.w.format))
    }

    /// `y[k × rows] = x[k × cols] Wᵀ (+ b)`.
    pub fn forward(&self, x: &[f32], k: usize, y: &mut [f32]) -> Result<()> {
        kernels::matmul(&self.w, x, k, y, self.act)?;
        if let Some(b) = &self.bias {
            crate::parallel::for_rows(y, self.w.rows(), |_, y| {
                for row in y.chunks_exact_mut(b.len()) {
                    row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
                }
            });
        }
        Ok(())
    }
}
