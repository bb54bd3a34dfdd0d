"""Quantization keeps zeros, stays on the grid, and GPTQ beats round-to-nearest on the calibration data."""

import pytest

torch = pytest.importorskip("torch")
from sparseinfer.training.quant import algorithms as Q  # noqa: E402


def layer(seed=0, out=32, inp=256, tokens=512, sparsity=0.5):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(inp, inp, generator=g) / inp**0.5
    x = (torch.randn(tokens, inp, generator=g) @ mix) * torch.logspace(-1, 1, inp)
    w = torch.randn(out, inp, generator=g)
    w[torch.rand(out, inp, generator=g) < sparsity] = 0
    return w, x


@pytest.mark.parametrize("bits,group", [(8, None), (8, 64), (4, 128), (4, 32)])
def test_grid_and_zeros(bits, group):
    w, x = layer()
    for deq, codes, scales in (Q.rtn(w, bits, group), Q.gptq(w, x.t().double() @ x.double(), bits, group)):
        assert (deq[w == 0] == 0).all() and (codes[w == 0] == 0).all()
        assert codes.abs().max() <= Q.qmax(bits)
        g = group or w.shape[1]
        assert scales.shape == (w.shape[0], -(-w.shape[1] // g))
        rebuilt = codes.float() * scales.repeat_interleave(g, 1)[:, : w.shape[1]]
        assert torch.allclose(rebuilt, deq.float(), atol=1e-6)


@pytest.mark.parametrize("bits,group", [(8, None), (4, 128)])
def test_gptq_beats_rtn_on_outputs(bits, group):
    w, x = layer(1)
    y = x @ w.t()
    e_rtn = ((x @ Q.rtn(w, bits, group)[0].t() - y).norm() / y.norm()).item()
    e_gptq = ((x @ Q.gptq(w, x.t().double() @ x.double(), bits, group)[0].t() - y).norm() / y.norm()).item()
    assert e_gptq < e_rtn, (e_gptq, e_rtn)


def test_bad_arguments():
    w, _ = layer()
    with pytest.raises(ValueError):
        Q.rtn(w, 3)
    with pytest.raises(ValueError):
        Q.rtn(w, 8, 48)
