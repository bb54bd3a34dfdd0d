//! Reading a checkpoint: the safetensors files ([`safetensors`]), the weight quantization scheme `config.json`
//! declares ([`quant_scheme`]), and one decoder per stored weight encoding ([`encodings`],
//! docs/FORMAT.md). What comes out is plain f32 values and, for quantized weights, their scales; which kernel
//! format they are packed into is [`super::plan`]'s choice.

pub mod encodings;
pub mod quant_scheme;
pub mod safetensors;

pub use encodings::{decode, Decoded, Orientation};
pub use quant_scheme::QuantScheme;
pub use safetensors::{Dtype, WeightStore};

use crate::error::{Error, Result};

/// The error for a buffer of `n` values for `name` that cannot be had.
pub(crate) fn out_of_memory(name: &str, n: usize) -> Error {
    Error::invalid("load", format!("{name}: not enough memory for {n} values"))
}

/// `n` zeros, or an error naming `name` when the memory is not there (`vec!` would abort the process).
pub(crate) fn zeros(name: &str, n: usize) -> Result<Vec<f32>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| out_of_memory(name, n))?;
    v.resize(n, 0.0);
    Ok(v)
}

/// A float tensor of an exact shape, as f32, refused when it holds NaN or an infinity.
pub fn finite_f32(store: &WeightStore, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
    let v = store.f32(name, shape)?;
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(Error::invalid("load", format!("tensor {name:?} holds a non-finite value {} at {i}", v[i])));
    }
    Ok(v)
}
