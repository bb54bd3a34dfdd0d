"""The exceptions sparseinfer raises. The Rust core maps its one error type onto these."""


class SparseInferError(Exception):
    """Base class of every sparseinfer error."""


class InvalidInputError(SparseInferError, ValueError):
    """Bad input: wrong dtype or shape, non-finite values, unknown names, empty arrays."""


class UnsupportedError(SparseInferError, NotImplementedError):
    """A valid request this CPU or build cannot serve (e.g. forcing an ISA the CPU lacks)."""
