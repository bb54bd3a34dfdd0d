//! sparseinfer-core: sparse and quantized CPU kernels for LLM inference, in pure Rust.
//!
//! - [`formats`]: the packed weight formats ([`formats::Format`], [`formats::PackedMatrix`]).
//! - [`kernels`]: `matvec`/`matmul` with runtime ISA dispatch (AVX-512, AVX2, scalar reference).
//! - [`parallel`]: the persistent thread pool the kernels run on.
//! - [`runtime`]: the runtime (safetensors reader, Llama/OPT/GPT-2/MPT, T5, Whisper, KV cache, sampling).
//! - [`bandwidth`]: a memory read-bandwidth probe, the physical limit of memory-bound decoding.
//!
//! The Python binding (`sparseinfer._core`) is a separate crate; this one has no Python in it.
#![deny(missing_docs)]

pub mod bandwidth;
pub mod error;
pub mod formats;
pub mod kernels;
pub mod parallel;
pub mod runtime;

pub use error::{Error, Result};
pub use formats::{Format, Layout, PackOptions, PackedMatrix};
pub use kernels::Isa;

/// The crate version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Whether this is an optimised build (`release`) or not (`debug`).
pub fn build_profile() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
}
