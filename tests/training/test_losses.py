"""SquareHead and KD against hand-computed values."""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from sparseinfer import training as T  # noqa: E402


def test_squarehead_hand_computed():
    # Two layers, one sequence of three tokens, the third is padding (its huge values must not count).
    s1 = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    t1 = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [0.0, 0.0]]])
    s2 = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [5.0, 5.0]]])
    t2 = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0]])
    # Layer 1: mean((s-t)²) over real tokens = (0+1+1+4)/4 = 1.5; mean(t²) = (1+1+4+4)/4 = 2.5 -> 0.6.
    # Layer 2: (1+0+0+1)/4 = 0.5; mean(t²) = 2/4 = 0.5 -> 1.0.  Sum: 1.6.
    got = T.squarehead_loss([s1, s2], [t1, t2], mask, eps=0.0)
    assert got.item() == pytest.approx(1.6, rel=1e-6)
    # Without a mask the padding token counts.
    assert T.squarehead_loss([s1], [t1], None, eps=0.0).item() != pytest.approx(0.6)


def test_squarehead_is_zero_for_identical_states_and_checks_shapes():
    h = [torch.randn(2, 5, 8) for _ in range(3)]
    assert T.squarehead_loss(h, h).item() == 0.0
    with pytest.raises(ValueError):
        T.squarehead_loss(h, h[:2])
    with pytest.raises(ValueError):
        T.squarehead_loss([torch.randn(2, 5, 8)], [torch.randn(2, 5, 4)])


def test_kd_matches_the_formula_at_t2():
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(2, 3, 7, generator=g), torch.randn(2, 3, 7, generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    T_ = 2.0

    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    ps, pt = softmax(zs.numpy() / T_), softmax(zt.numpy() / T_)
    kl = (pt * (np.log(pt) - np.log(ps))).sum(-1)  # [2, 3]
    m = mask.numpy().astype(bool)
    want = kl[m].mean() * T_**2
    assert T.kd_loss(zs, zt, temperature=T_, mask=mask).item() == pytest.approx(want, rel=1e-5)
    assert T.kd_loss(zt, zt, temperature=T_).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        T.kd_loss(zs, zt, temperature=0.0)


def test_ce_and_total():
    logits = torch.zeros(1, 4, 5)
    labels = torch.tensor([[1, 2, -100, 3]])
    # Uniform logits: CE = log(5) over the two counted next tokens.
    assert T.ce_loss(logits, labels).item() == pytest.approx(math.log(5))
    one = torch.tensor(1.0)
    assert T.total_loss(one, None, 2 * one, w_ce=1, w_kd=0, w_sq=1).item() == 3.0
    with pytest.raises(ValueError):
        T.total_loss(None, None, None)


@pytest.mark.parametrize("w_ce,w_kd", [(1.0, 0.0), (0.0, 1.0), (1.0, 0.5)])
def test_head_losses_match_the_losses_of_the_full_logits(w_ce, w_kd):
    """``head_losses`` against ``ce_loss`` / ``kd_loss`` of the whole logits: values and both gradients, with
    unlabelled rows and a short last chunk (23 rows in chunks of 8)."""
    from sparseinfer.training.distill.losses import ce_loss, head_losses, kd_loss

    g = torch.Generator().manual_seed(3)
    n, d, v, temp = 23, 16, 40, 2.0
    h = torch.randn(n, d, generator=g, requires_grad=True)
    w = torch.randn(v, d, generator=g, requires_grad=True)
    h_t, w_t = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g)
    y = torch.randint(0, v, (n,), generator=g)
    y[[2, 11, 22]] = -100
    loss, ce, kd = head_losses(h, w, y, h_t, w_t, w_ce=w_ce, w_kd=w_kd, temperature=temp, chunk=8)
    loss.backward()
    got = (float(ce), float(kd), h.grad.clone(), w.grad.clone())
    h.grad, w.grad = None, None
    z, zt = (h @ w.t())[None], (h_t @ w_t.t())[None]
    ref_ce, ref_kd = ce_loss(z, y[None], shift=False), kd_loss(z, zt, temperature=temp)
    (w_ce * ref_ce + w_kd * ref_kd).backward()
    if w_ce:
        assert got[0] == pytest.approx(float(ref_ce.detach()), rel=1e-5)
    if w_kd:
        assert got[1] == pytest.approx(float(ref_kd.detach()), rel=1e-5)
    assert torch.allclose(got[2], h.grad, rtol=1e-4, atol=1e-6)
    assert torch.allclose(got[3], w.grad, rtol=1e-4, atol=1e-6)
