"""One-shot pruning of one weight matrix: magnitude, Wanda and SparseGPT. Pure functions of tensors.

Every function takes ``W: [out, in]`` and returns ``(W_pruned, keep_mask)``; only SparseGPT changes the kept
weights (it compensates the pruning error with the inverse Hessian of the layer's inputs). ``prior``, a keep mask
from an earlier pruning stage, makes the new mask nested in it: what it pruned is pruned first and stays pruned
(staged gradual pruning, where each stage raises the sparsity of an already sparse model).
"""

from __future__ import annotations

import torch

from ..masks import mask_from_scores, parse_structure


def _prior_first(scores: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
    """Scores (all >= 0) with the weights ``prior`` pruned moved below every other one."""
    return scores if prior is None else scores.masked_fill(~prior, -1.0)


def _nested(keep: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
    return keep if prior is None else keep & prior


def magnitude(w: torch.Tensor, sparsity: float, structure: str = "unstructured", prior: torch.Tensor | None = None):
    """Prune the smallest ``|W|`` over the whole matrix (or per group of M for N:M)."""
    keep = _nested(mask_from_scores(_prior_first(w.abs().float(), prior), sparsity, structure), prior)
    return w * keep, keep


def wanda(
    w: torch.Tensor,
    x_norm: torch.Tensor,
    sparsity: float,
    structure: str = "unstructured",
    prior: torch.Tensor | None = None,
):
    """Wanda (Sun et al., arXiv 2306.11695): score ``|W_ij| · ‖X_j‖₂``, compared within each output row.

    x_norm: [in], the L2 norm of each input feature over the calibration tokens."""
    scores = _prior_first(w.abs().float() * x_norm.float().reshape(1, -1), prior)
    keep = _nested(mask_from_scores(scores, sparsity, structure, per_row=True), prior)
    return w * keep, keep


def _damped_inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` with ``λ = damp · mean(diag H)``, retrying with more damping if
    ``H`` is not positive definite in floating point."""
    n = h.shape[0]
    lam = damp * torch.diag(h).mean().clamp_min(1e-8)
    for _ in range(6):
        try:
            l_ = torch.linalg.cholesky(h + lam * torch.eye(n, dtype=h.dtype))
            hinv = torch.cholesky_inverse(l_)
            return torch.linalg.cholesky(hinv, upper=True)
        except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
            lam = lam * 10
    raise RuntimeError("the calibration Hessian is not positive definite even with heavy damping")


@torch.no_grad()
def sparsegpt(
    w: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    structure: str = "unstructured",
    block_size: int = 128,
    damp: float = 0.01,
    prior: torch.Tensor | None = None,
):
    """SparseGPT (Frantar & Alistarh, arXiv 2301.00774): prune column block by column block, choosing the mask
    inside each block by ``w² / [H⁻¹]_jj²`` and spreading each pruned weight's error over the not-yet-visited
    columns with the Cholesky factor of ``H⁻¹``, so the layer's output on the calibration inputs changes least.

    w: [out, in]; hessian: [in, in] = Σ x xᵀ over calibration tokens. Returns (W_pruned, keep_mask)."""
    nm = parse_structure(structure)
    rows, cols = w.shape
    W = w.detach().double().clone()
    H = hessian.detach().double().clone()
    dead = torch.diag(H) == 0  # inputs that never fire: their weights cannot matter
    H[dead, dead] = 1
    W[:, dead] = 0
    U = _damped_inverse_cholesky(H, damp)  # upper factor of H⁻¹
    keep = torch.ones(rows, cols, dtype=torch.bool)
    for b0 in range(0, cols, block_size):
        b1 = min(b0 + block_size, cols)
        Wb = W[:, b0:b1].clone()
        Ub = U[b0:b1, b0:b1]
        d = torch.diag(Ub)  # [bs]
        err = torch.zeros_like(Wb)
        prior_b = None if prior is None else prior[:, b0:b1]
        if nm is None:
            # Adaptive mask for the whole block: the sparsity fraction of lowest w²/d² in it.
            prune_b = ~mask_from_scores(_prior_first((Wb**2) / (d.reshape(1, -1) ** 2), prior_b), sparsity)
        else:
            prune_b = torch.zeros_like(Wb, dtype=torch.bool)
        if prior_b is not None:
            # Earlier compensation may have made a previously pruned weight nonzero: it is pruned again here and
            # its error spread like any other's.
            prune_b |= ~prior_b
        for j in range(b1 - b0):
            if nm is not None and j % nm[1] == 0:
                n, m = nm
                s = (Wb[:, j : j + m] ** 2) / (d[j : j + m].reshape(1, -1) ** 2)
                if prior_b is not None:
                    s = _prior_first(s, prior_b[:, j : j + m])
                prune_b[:, j : j + m].scatter_(1, s.topk(m - n, dim=1, largest=False).indices, True)
            col = Wb[:, j]
            q = torch.where(prune_b[:, j], torch.zeros_like(col), col)
            e = (col - q) / Ub[j, j]  # [out]
            Wb[:, j:] -= e.reshape(-1, 1) * Ub[j, j:].reshape(1, -1)
            Wb[:, j] = q
            err[:, j] = e
        W[:, b0:b1] = Wb
        W[:, b1:] -= err @ U[b0:b1, b1:]
        keep[:, b0:b1] = ~prune_b
    keep &= ~dead.reshape(1, -1)
    W = W * keep
    return W.to(w.dtype), keep
