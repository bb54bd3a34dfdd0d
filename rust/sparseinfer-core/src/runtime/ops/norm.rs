//! Layer normalisation: RMSNorm (Zhang & Sennrich, arXiv 1910.07467) and LayerNorm (Ba et al., arXiv
//! 1607.06450), row by row over the residual stream.

/// Norm weights (`D` values each).
pub struct NormW {
    /// Scale.
    pub w: Vec<f32>,
    /// Shift (LayerNorm with bias only).
    pub b: Option<Vec<f32>>,
}
