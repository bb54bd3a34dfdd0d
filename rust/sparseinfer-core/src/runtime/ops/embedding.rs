//! The token embedding table: rows read by id and widened to f32.

use crate::error::{Error, Result};
use crate::runtime::checkpoint::safetensors::{f16_to_f32, Dtype};

/// A `[V, D]` table in its stored precision (f32, f16 or bf16), copied out of the checkpoint at load so that
/// the model does not depend on the file; rows are widened to f32 as tokens read them.
pub struct Embedding {
    dtype: Dtype,
    bytes: Vec<u8>,
    rows: usize,
    cols: usize,
}

impl Embedding {
    /// A table of `rows × cols` values stored little-endian as `dtype` (F32, F16 or BF16) in `bytes`.
    pub(crate) fn new(dtype: Dtype, bytes: Vec<u8>, rows: usize, cols: usize) -> Embedding {
        debug_assert!(matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16));
        debug_assert_eq!(bytes.len(), rows * cols * dtype.size());
        Embedding { dtype, bytes, rows, cols }
    }

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
        let size = self.dtype.size();
        let bytes = &self.bytes[i * self.cols * size..(i + 1) * self.cols * size];
        match self.dtype {
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

    /// Bytes of the table as stored.
    pub fn nbytes(&self) -> usize {
        self.bytes.len()
    }
}
