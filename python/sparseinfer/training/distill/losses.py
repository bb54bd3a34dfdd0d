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


class _HeadLosses(torch.autograd.Function):
    """``w_ce·CE + w_kd·KD`` of the output head, a token chunk at a time: the [N, V] logits of neither model are
    ever held whole. The gradients are computed in the forward pass (each chunk's softmax is needed for them and
    is dropped after), kept as dh [N, D] and dW [V, D], and scaled by the incoming gradient in backward."""

    @staticmethod
    def forward(ctx, h, weight, labels, h_t, weight_t, w_ce, w_kd, temperature, chunk, dtype):
        n = h.shape[0]
        w = weight.detach().to(dtype)  # [V, D]
        wt = weight_t.detach().to(dtype) if h_t is not None else None
        dh = torch.zeros(h.shape, dtype=torch.float32, device=h.device)  # [N, D]
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device)  # [V, D]
        n_ce = int((labels != -100).sum()) if w_ce else 0
        ce_sum = torch.zeros((), dtype=torch.float64, device=h.device)
        kd_sum = torch.zeros((), dtype=torch.float64, device=h.device)
        for i in range(0, n, chunk):
            hc = h[i : i + chunk].detach().to(dtype)  # [c, D]
            z = (hc @ w.t()).float()  # [c, V] student logits
            g = None  # [c, V] d loss / d z
            if w_ce and n_ce:
                y = labels[i : i + chunk]
                valid = y != -100
                rows = torch.arange(len(y), device=z.device)
                yv = y.clamp_min(0)
                p = torch.softmax(z, dim=-1)
                # -log p(y); p(y) is floored at the smallest normal float (a token loss of ~87 nats at most).
                nll = -torch.log(p[rows, yv].clamp_min(torch.finfo(p.dtype).tiny))
                ce_sum += nll[valid].double().sum()
                p[rows, yv] -= 1.0
                g = p.mul_(valid[:, None].to(p.dtype) * (w_ce / n_ce))
            if w_kd and h_t is not None:
                zt = (h_t[i : i + chunk].detach().to(dtype) @ wt.t()).float()  # [c, V] teacher logits
                log_pt = F.log_softmax(zt.div_(temperature), dim=-1)
                log_ps = F.log_softmax(z.div_(temperature), dim=-1)
                pt = log_pt.exp()
                kd_sum += (pt * (log_pt - log_ps)).sum().double()
                # d/dz_s of T²·KL(p_t ‖ p_s) with p = softmax(z / T): T·(p_s − p_t), averaged over the N tokens.
                gk = log_ps.exp_().sub_(pt).mul_(w_kd * temperature / n)
                g = gk if g is None else g.add_(gk)
                del zt, log_pt, log_ps, pt, gk
            if g is None:
                continue
            gd = g.to(dtype)
            dh[i : i + chunk] = (gd @ w).float()
            dw += (gd.t() @ hc).float()
            del z, g, gd
        ce = (ce_sum / max(n_ce, 1)).float()
        kd = (kd_sum / n).float() * temperature**2
        loss = (w_ce * ce if w_ce else 0) + (w_kd * kd if w_kd and h_t is not None else 0)
        loss = torch.as_tensor(loss, dtype=torch.float32, device=h.device)
        ctx.save_for_backward(dh.to(h.dtype), dw.to(weight.dtype))
        ctx.mark_non_differentiable(ce, kd)
        return loss, ce, kd

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):
        dh, dw = ctx.saved_tensors
        return dh * grad_loss, dw * grad_loss, None, None, None, None, None, None, None, None


def head_losses(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    w_ce: float = 1.0,
    w_kd: float = 0.0,
    temperature: float = 2.0,
    chunk: int = 1024,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(w_ce·CE + w_kd·KD, CE, KD)`` straight from the final hidden states and a bias-free output head, in
    token chunks, so no [N, V] logits tensor outlives its chunk. Equal to ``ce_loss`` / ``kd_loss`` on the
    logits ``hidden @ weight.T`` (within the rounding of ``dtype``, the dtype the head's matmuls run in); only
    the first term carries a gradient (to ``hidden`` and ``weight``).

    hidden: [N, D] student, one row per counted token; weight: [V, D]; labels: [N] the target of each row (already
    shifted for a causal LM), -100 where CE does not count; teacher_hidden: [N, D] and teacher_weight: [V, D] for
    KD (every row counts). CE averages over the labelled rows, KD over all N rows.
    """
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be [N, D] and labels [N], got {tuple(hidden.shape)} and {tuple(labels.shape)}")
    if w_kd and (teacher_hidden is None or teacher_weight is None):
        raise ValueError("KD needs the teacher's hidden states and head weight")
    if w_kd and teacher_hidden.shape != hidden.shape:
        raise ValueError(f"teacher hidden {tuple(teacher_hidden.shape)} vs student {tuple(hidden.shape)}")
    if temperature <= 0 or chunk < 1:
        raise ValueError("temperature must be > 0 and chunk >= 1")
    return _HeadLosses.apply(
        hidden, weight, labels, teacher_hidden if w_kd else None, teacher_weight, w_ce, w_kd, temperature, chunk, dtype
    )
