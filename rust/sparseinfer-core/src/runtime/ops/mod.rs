//! The operations blocks are built from, each over plain `[k × width]` row-major buffers: [`linear`] (the
//! kernels), [`norm`], [`embedding`] lookups.

pub mod embedding;
pub mod linear;
pub mod norm;

pub use embedding::Embedding;
pub use linear::Linear;
pub use norm::NormW;
