"""Weight quantization of one matrix, keeping pruned weights at zero: round-to-nearest and GPTQ. Pure functions.

Symmetric integer grids: int8 per output channel (``group_size=None``) or per group of columns; int4 per group.
``q ∈ [-qmax, qmax]`` with ``qmax = 127`` (int8) or ``7`` (int4), ``W ≈ scale[r, c // G] · q``. Every function
returns ``(W_dequantized, codes int8 [out, in], scales [out, groups])``; codes are 0 exactly where the weight is
pruned (or rounds to zero).
"""

from __future__ import annotations

import torch

from ..pruning.algorithms import _damped_inverse_cholesky


def qmax(bits: int) -> int:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    return 127 if bits == 8 else 7


def _group(cols: int, group_size: int | None) -> int:
    g = cols if group_size is None else group_size
    if group_size is not None and group_size not in (32, 64, 128):
        raise ValueError(f"group_size must be 32, 64, 128 or None (per channel), got {group_size}")
    return g


def group_scales(w: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """``absmax / qmax`` per (row, group); zero groups get scale 0. w: [out, in] → [out, ceil(in / G)]."""
    rows, cols = w.shape
    g = _group(cols, group_size)
    pad = (-cols) % g
    a = torch.nn.functional.pad(w.abs().float(), (0, pad)).reshape(rows, -1, g).amax(-1)
    return a / qmax(bits)


def _quant(w: torch.Tensor, s: torch.Tensor, bits: int) -> torch.Tensor:
    # w: [out, n]; s: [out, n] or broadcastable. Round half away from zero, like the runtime's packer.
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    r = w * inv
    return (torch.sign(r) * torch.floor(r.abs() + 0.5)).clamp(-qmax(bits), qmax(bits))


@torch.no_grad()
def rtn(w: torch.Tensor, bits: int = 8, group_size: int | None = None):
    """Round-to-nearest with absmax scales."""
    rows, cols = w.shape
    g = _group(cols, group_size)
    s = group_scales(w, bits, group_size)  # [out, groups]
    se = s.repeat_interleave(g, dim=1)[:, :cols]
    q = _quant(w.float(), se, bits)
    return (q * se).to(w.dtype), q.to(torch.int8), s


@torch.no_grad()
def gptq(
    w: torch.Tensor,
    hessian: torch.Tensor,
    bits: int = 8,
    group_size: int | None = None,
    block_size: int = 128,
    damp: float = 0.01,
):
    """GPTQ (Frantar et al., arXiv 2210.17323): quantize column by column and spread each column's rounding error
    over the later columns with the Cholesky factor of ``H⁻¹``. Pruned weights (zeros in ``w``) are held at zero
    and their drift is compensated too, as in SparseGPT's joint sparsify-and-quantize. Scales are taken from the
    (updated) weights of a group when the sweep enters it."""
    rows, cols = w.shape
    g = _group(cols, group_size)
    keep = w != 0
    W = w.detach().double().clone()
    H = hessian.detach().double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    U = _damped_inverse_cholesky(H, damp)
    Q = torch.zeros_like(W)
    scales = torch.zeros(rows, -(-cols // g), dtype=torch.float64)
    for b0 in range(0, cols, block_size):
        b1 = min(b0 + block_size, cols)
        Wb = W[:, b0:b1].clone()
        Ub = U[b0:b1, b0:b1]
        err = torch.zeros_like(Wb)
        for j in range(b1 - b0):
            c = b0 + j
            if c % g == 0:
                # Scale of the group starting here, from its current (error-compensated) kept weights.
                cols_g = slice(c, min(c + g, cols))
                cur = torch.cat([Wb[:, j:], W[:, b1:]], dim=1)[:, : cols_g.stop - c]
                scales[:, c // g] = (cur * keep[:, cols_g]).abs().amax(1) / qmax(bits)
            s = scales[:, c // g]
            col = Wb[:, j]
            q = _quant(col.reshape(-1, 1), s.reshape(-1, 1), bits).reshape(-1) * keep[:, c]
            deq = q * s
            e = (col - deq) / Ub[j, j]
            Wb[:, j:] -= e.reshape(-1, 1) * Ub[j, j:].reshape(1, -1)
            Q[:, c] = q
            err[:, j] = e
        W[:, b1:] -= err @ U[b0:b1, b1:]
    se = scales.repeat_interleave(g, dim=1)[:, :cols]
    return (Q * se).to(w.dtype), Q.to(torch.int8), scales.float()
