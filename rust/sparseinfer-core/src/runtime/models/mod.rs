//! Models assembled from blocks: [`decoder`], the decoder-only language model, and [`seq2seq`], the
//! encoder-decoder (T5).

pub mod decoder;
pub mod seq2seq;

pub use decoder::Model;
pub use seq2seq::Seq2Seq;
