//! The operations blocks are built from, each over plain `[k × width]` row-major buffers: [`linear`] (the
//! kernels), [`conv`] (as im2col over a linear), [`norm`], [`rope`], [`relative`] position biases,
//! [`activations`], [`attention`] over a view of keys and values, and the [`embedding`] table.

pub mod activations;
pub mod attention;
pub mod conv;
pub mod embedding;
pub mod linear;
pub mod norm;
pub mod relative;
pub mod rope;

pub use embedding::Embedding;
pub use linear::Linear;
pub use norm::NormW;
