"""OWL, outlier-weighed layerwise sparsity (Yin et al., arXiv 2310.05175): blocks whose Wanda scores hold more
outliers keep more of their weights. Pure functions of tensors and numbers; ``prune(..., allocation="owl")`` wires
them to the calibration pass.

The outlier ratio of a block is the fraction of its Wanda scores ``|W_ij| · ‖X_j‖₂`` (all its linear layers
together) above ``m`` times their mean. With ``r̂_l`` the ratios min-max scaled to [0, 1] and ``r̄`` their mean
(weighted by block size when given), block ``l`` gets ``s_l = target − 2λ (r̂_l − r̄)``: the (weighted) mean
sparsity is the target and the spread is at most ``2λ``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def outlier_ratio(scores: Sequence[torch.Tensor], m: float = 5.0) -> float:
    """Fraction of all entries of ``scores`` (one block's Wanda score matrices, any shapes) above ``m`` × the
    mean of those entries."""
    if m <= 0:
        raise ValueError(f"the outlier multiple m must be > 0, got {m}")
    if not scores:
        raise ValueError("no scores")
    scores = [s.detach().double() for s in scores]
    total = sum(s.numel() for s in scores)
    mean = sum(float(s.sum()) for s in scores) / total
    above = sum(int((s > m * mean).sum()) for s in scores)
    return above / total


def owl_sparsities(
    ratios: Sequence[float],
    target: float,
    lam: float = 0.08,
    sizes: Sequence[int] | None = None,
) -> list[float]:
    """Per-block sparsities from outlier ratios: ``target − 2λ (r̂_l − mean r̂)``, ``r̂`` the min-max scaled
    ratios; the mean is weighted by ``sizes`` (weights per block) when given, so the global sparsity is the
    target. Equal ratios give the uniform allocation."""
    if not ratios:
        raise ValueError("no blocks")
    if not 0.0 <= target < 1.0:
        raise ValueError(f"target sparsity must be in [0, 1), got {target}")
    if lam < 0:
        raise ValueError(f"lambda must be >= 0, got {lam}")
    r = torch.tensor([float(x) for x in ratios], dtype=torch.float64)
    w = torch.ones_like(r) if sizes is None else torch.tensor([float(x) for x in sizes], dtype=torch.float64)
    if len(w) != len(r) or (w <= 0).any():
        raise ValueError("sizes must be one positive number per block")
    w = w / w.sum()
    spread = r.max() - r.min()
    if spread == 0:
        return [target] * len(r)
    scaled = (r - r.min()) / spread  # [L] in [0, 1]
    s = target - 2 * lam * (scaled - (w * scaled).sum())
    if s.min() < 0 or s.max() >= 1:
        raise ValueError(f"lambda {lam} moves some block's sparsity out of [0, 1) around the target {target}")
    return s.tolist()
