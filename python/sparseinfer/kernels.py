"""Sparse and quantized matvec/matmul kernels.

>>> import numpy as np
>>> from sparseinfer import kernels
>>> w = np.random.randn(256, 512).astype(np.float32)
>>> w[np.random.rand(*w.shape) < 0.7] = 0          # 70 % unstructured sparsity
>>> m = kernels.pack(w, format="sparse-int8")
>>> y = m.matvec(np.ones(512, np.float32))          # (256,) float32

Formats (``FORMATS``): dense-f32, dense-bf16, dense-int8, dense-int4, sparse-f32, sparse-bf16, sparse-int8,
sparse-int4. Zeros in ``w`` are the pruned weights of the sparse formats. Integer formats take
``group_size`` (32, 64 or 128; int8 defaults to one scale per row, int4 to ``INT4_DEFAULT_GROUP``, 32) and int4 takes
``asymmetric``. The memory layouts are documented in ``rust/sparseinfer-core/src/formats/mod.rs``.

The ISA path is picked once from the CPU (``build_info()["isa"]``); ``SPARSEINFER_ISA`` or
:func:`set_isa` forces one. ``SPARSEINFER_NUM_THREADS`` or :func:`set_num_threads` sets the threads.
"""

from __future__ import annotations

from ._core import (
    ERROR_BUDGETS,
    FORMATS,
    INT4_DEFAULT_GROUP,
    BandwidthProbe,
    PackedMatrix,
    active_isa,
    available_isas,
    measure_read_bandwidth,
    num_threads,
    set_isa,
    set_num_threads,
)
from ._core import pack as _pack

__all__ = [
    "ERROR_BUDGETS",
    "FORMATS",
    "INT4_DEFAULT_GROUP",
    "BandwidthProbe",
    "PackedMatrix",
    "active_isa",
    "available_isas",
    "measure_read_bandwidth",
    "num_threads",
    "pack",
    "set_isa",
    "set_num_threads",
]


def pack(
    w,
    format: str = "sparse-int8",
    group_size: int | None = None,
    asymmetric: bool = False,
    scales=None,
    layout: str = "auto",
) -> PackedMatrix:
    """Packs a C-contiguous float32 ``(out, in)`` matrix into ``format``.

    ``scales``: a float32 ``(out, groups)`` array that fixes a symmetric integer grid instead of fitting one
    (``w`` should then hold ``scale · code`` values, as a quantized checkpoint does).

    ``layout``: ``"auto"`` (the default) tiles the symmetric integer formats (dense and sparse) where the
    AVX-512 VNNI kernels will read them (16 rows interleaved per 4 columns), else keeps rows; ``"rows"`` or
    ``"tiles"`` force one. A tiled matrix builds a row-layout copy the first time another kernel (f32 activations, or a
    forced ISA) needs it. ``m.layout`` says which one a matrix has.

    Raises :class:`sparseinfer.InvalidInputError` (a ``ValueError``) for a wrong dtype, shape or layout,
    an empty or non-finite matrix, or an unknown format or group size.
    """
    return _pack(w, format, group_size, asymmetric, scales, layout)
