//! Models assembled from blocks: [`decoder`], the decoder-only language model (every architecture today).

pub mod decoder;

pub use decoder::Model;
