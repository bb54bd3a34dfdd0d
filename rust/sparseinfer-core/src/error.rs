//! The one error type of the core crate. The binding maps [`Error::InvalidInput`] to
//! `sparseinfer.InvalidInputError` (a `ValueError`) and everything else to `sparseinfer.SparseInferError`.

/// Everything that can go wrong in the core. Each variant names the operation it came from.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The caller passed something unusable: a bad shape, a non-finite value, an unknown format name.
    #[error("{op}: {msg}")]
    InvalidInput {
        /// The operation that rejected the input (`pack`, `matvec`, ...).
        op: &'static str,
        /// What was wrong, with the offending values.
        msg: String,
    },
    /// The request is valid but this build or this CPU cannot serve it (e.g. forcing an ISA the CPU lacks).
    #[error("{op}: {msg}")]
    Unsupported {
        /// The operation that could not be served.
        op: &'static str,
        /// Why, and what is supported instead.
        msg: String,
    },
    /// An operating-system error (files, threads), with what we were doing.
    #[error("{op}: {source}")]
    Io {
        /// What we were doing.
        op: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// Shorthand for results of the core crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An [`Error::InvalidInput`] for `op`.
    pub fn invalid(op: &'static str, msg: impl Into<String>) -> Self {
        Error::InvalidInput { op, msg: msg.into() }
    }

    /// An [`Error::Unsupported`] for `op`.
    pub fn unsupported(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Unsupported { op, msg: msg.into() }
    }
}
