"""Pruners: SparseGPT beats magnitude and Wanda on a synthetic layer; masks have the asked structure; the model
driver prunes every block in place."""

import copy

import pytest

torch = pytest.importorskip("torch")
tiny_models = pytest.importorskip("tiny_models")
from sparseinfer import training as T  # noqa: E402
from sparseinfer.training.pruning import algorithms as A  # noqa: E402


def synthetic_layer(seed=0, out=64, inp=128, tokens=512):
    g = torch.Generator().manual_seed(seed)
    # Correlated inputs with uneven feature scales, the case where the Hessian matters.
    mix = torch.randn(inp, inp, generator=g) / inp**0.5
    scale = torch.logspace(-1, 1, inp)
    x = (torch.randn(tokens, inp, generator=g) @ mix) * scale
    w = torch.randn(out, inp, generator=g)
    return w, x


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_sparsegpt_reconstructs_best(sparsity):
    w, x = synthetic_layer()
    y = x @ w.t()

    def err(wp):
        return ((x @ wp.t() - y).norm() / y.norm()).item()

    wm, km = A.magnitude(w, sparsity)
    ww, kw = A.wanda(w, x.norm(dim=0), sparsity)
    ws, ks = A.sparsegpt(w, x.t().double() @ x.double(), sparsity)
    for keep in (km, kw, ks):
        assert abs((~keep).float().mean().item() - sparsity) < 0.02
    assert ((ws == 0) | ks).all() and (ws[~ks] == 0).all()
    e = {"magnitude": err(wm), "wanda": err(ww), "sparsegpt": err(ws)}
    assert e["sparsegpt"] < e["wanda"] < e["magnitude"], e


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_n_m_structure(method):
    w, x = synthetic_layer(1)
    if method == "magnitude":
        _, keep = A.magnitude(w, 0.0, "2:4")
    elif method == "wanda":
        _, keep = A.wanda(w, x.norm(dim=0), 0.0, "2:4")
    else:
        _, keep = A.sparsegpt(w, x.t().double() @ x.double(), 0.0, "2:4")
    groups = keep.reshape(w.shape[0], -1, 4).sum(-1)
    assert (groups == 2).all()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_prune_tiny_model(tmp_path, method):
    model = tiny_models.build("llama", tmp_path, scale=1.0, hidden_size=64, intermediate_size=128)
    batches = [
        {"input_ids": torch.randint(0, tiny_models.VOCAB, (2, 24), generator=torch.Generator().manual_seed(i))}
        for i in range(3)
    ]
    before = copy.deepcopy(model.state_dict())
    masks = T.prune(model, method, 0.6, calibration=batches)
    assert len(masks) == 3 * 7  # q k v o gate up down per block
    report = T.sparsity_report(model, masks)
    assert abs(report["global"] - 0.6) < 0.02
    state = model.state_dict()
    for k in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(state[k], before[k]), f"{k} must not be pruned"
    with torch.no_grad():
        assert torch.isfinite(model(batches[0]["input_ids"]).logits).all()


def test_prune_rejects_bad_arguments(tmp_path):
    model = tiny_models.build("llama", tmp_path, hidden_size=64, intermediate_size=128)
    with pytest.raises(ValueError, match="method"):
        T.prune(model, "random", 0.5)
    with pytest.raises(ValueError, match="sparsity"):
        T.prune(model, "magnitude", 1.0)
    with pytest.raises(ValueError, match="calibration"):
        T.prune(model, "sparsegpt", 0.5)
    with pytest.raises(ValueError, match="N:M"):
        T.prune(model, "magnitude", 0.5, structure="4:2")
