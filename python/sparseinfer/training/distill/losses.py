"""The losses of sparse fine-tuning (Kurtic et al., arXiv 2310.06927, section 3): task cross-entropy, logit
distillation, and SquareHead feature distillation. Pure functions of tensors; shapes in comments.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def ce_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, shift: bool = True) -> torch.Tensor:
    """Next-token cross-entropy. logits: [B, S, V]; labels: [B, S] aligned with the inputs (shifted here), with
    ``ignore_index`` on tokens that do not count (padding, or the prompt for answer-only training). ``shift=False``
    for an encoder-decoder, whose decoder logits at position t already predict ``labels[:, t]``."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=ignore_index)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 2.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logit distillation (Hinton et al., arXiv 1503.02531): ``T² · KL(p_t ‖ p_s)`` with ``p = softmax(z / T)``,
    i.e. ``T² · Σ_v p_t(v) (log p_t(v) − log p_s(v))`` per token, averaged over tokens where ``mask`` is 1.

    student_logits, teacher_logits: [B, S, V]; mask: [B, S] (1 = real token) or None.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_ps = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_pt = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)  # [B, S]
    if mask is not None:
        m = mask.to(kl.dtype)
        kl = (kl * m).sum() / m.sum().clamp_min(1)
    else:
        kl = kl.mean()
    return kl * temperature**2


def squarehead_loss(
    student_hidden_states: Sequence[torch.Tensor],
    teacher_hidden_states: Sequence[torch.Tensor],
    attention_mask: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """SquareHead: for each layer, ``mean((h_s − h_t)²) / (mean(h_t²) + eps)`` over the non-padding tokens,
    summed over layers. The normalisation makes every layer count the same whatever its activation scale.

    Each hidden state: [B, S, D]; callers pass ``hidden_states[1:]`` (block outputs) so every one is compared.
    attention_mask: [B, S], 1 = real token, or None for all tokens.
    """
    if len(student_hidden_states) != len(teacher_hidden_states):
        raise ValueError(f"{len(student_hidden_states)} student layers vs {len(teacher_hidden_states)} teacher layers")
    if len(student_hidden_states) == 0:
        raise ValueError("no hidden states to compare")
    total = student_hidden_states[0].new_zeros((), dtype=torch.float32)
    keep = attention_mask.bool() if attention_mask is not None else None
    for hs, ht in zip(student_hidden_states, teacher_hidden_states):
        if hs.shape != ht.shape:
            raise ValueError(f"hidden state shapes differ: {tuple(hs.shape)} vs {tuple(ht.shape)}")
        hs, ht = hs.float(), ht.float()
        if keep is not None:
            hs, ht = hs[keep], ht[keep]  # [N, D] real tokens only
        total = total + ((hs - ht) ** 2).mean() / ((ht**2).mean() + eps)
    return total


def total_loss(ce: torch.Tensor | None, kd: torch.Tensor | None, sq: torch.Tensor | None, w_ce=1.0, w_kd=0.0, w_sq=1.0):
    """``w_ce·CE + w_kd·KD + w_sq·SquareHead`` over the terms that are present (the paper's recipe: 1, 0, 1)."""
    out = None
    for w, term in ((w_ce, ce), (w_kd, kd), (w_sq, sq)):
        if term is not None and w:
            out = w * term if out is None else out + w * term
    if out is None:
        raise ValueError("every loss weight is zero")
    return out
