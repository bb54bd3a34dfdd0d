"""Fine-tuning keeps masks exactly, lowers the loss, is reproducible and resumable, and validates its config."""

import copy

import pytest

torch = pytest.importorskip("torch")
tiny_models = pytest.importorskip("tiny_models")
from sparseinfer import training as T  # noqa: E402


def examples(n=24, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    # A learnable pattern: repeated short motifs.
    out = []
    for _ in range(n):
        motif = torch.randint(2, tiny_models.VOCAB, (4,), generator=g)
        out.append({"input_ids": motif.repeat(length // 4)})
    return out


@pytest.fixture
def pruned(tmp_path):
    model = tiny_models.build("llama", tmp_path, scale=1.0, hidden_size=64, intermediate_size=128)
    teacher = copy.deepcopy(model)
    masks = T.prune(model, "magnitude", 0.7)
    return model, teacher, masks


@pytest.mark.parametrize("weights", [dict(w_ce=1, w_kd=0, w_sq=0), dict(w_ce=1, w_kd=1, w_sq=0), dict(w_ce=1, w_sq=1)])
def test_masks_stay_exact_and_loss_drops(pruned, weights):
    model, teacher, masks = pruned
    cfg = dict(steps=20, lr=1e-3, warmup_steps=2, batch_size=4, **weights)
    r = T.finetune(model, teacher, examples(), cfg, progress=False)
    assert r["steps"] == 20
    mods = dict(model.named_modules())
    for name, keep in masks.items():
        w = mods[name].weight
        assert torch.equal(w != 0, keep), f"{name}: mask changed"
        assert (w[~keep] == 0).all()
    first = sum(h["loss"] for h in r["history"][:3]) / 3
    last = sum(h["loss"] for h in r["history"][-3:]) / 3
    assert last < first, (first, last)
    for term in ("ce", "kd", "sq"):
        w = {"ce": "w_ce", "kd": "w_kd", "sq": "w_sq"}[term]
        assert (r["final"][term] != 0) == bool(weights.get(w, 0))


def test_seeded_and_resumable(tmp_path):
    base = tiny_models.build("llama", tmp_path / "m", scale=1.0, hidden_size=64, intermediate_size=128)
    T.prune(base, "magnitude", 0.5)
    teacher = copy.deepcopy(base)
    cfg = dict(steps=6, lr=1e-3, batch_size=4, w_ce=1, w_sq=1, seed=3)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    T.finetune(a, teacher, examples(), cfg, progress=False)
    T.finetune(b, teacher, examples(), cfg, progress=False)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    # Interrupted after 3 steps (the callback raises as a kill would), resumed to 6: the same weights as the
    # unbroken run.
    c = copy.deepcopy(base)
    out = str(tmp_path / "run")

    def kill_at_3(step, terms):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        T.finetune(c, teacher, examples(), {**cfg, "out_dir": out, "save_every": 1}, progress=False, on_step=kill_at_3)
    d = copy.deepcopy(base)
    r = T.finetune(d, teacher, examples(), {**cfg, "out_dir": out, "save_every": 1}, progress=False)
    assert r["steps"] == 6 and len(r["history"]) == 3
    for (k, va), vd in zip(a.state_dict().items(), d.state_dict().values()):
        assert torch.allclose(va, vd, atol=1e-6), k
    # Resuming with other training settings is refused, unless forced.
    e = copy.deepcopy(base)
    with pytest.raises(ValueError, match="lr: 0.001 -> 0.002"):
        T.finetune(e, teacher, examples(), {**cfg, "lr": 2e-3, "steps": 7, "out_dir": out}, progress=False)
    r = T.finetune(e, teacher, examples(), {**cfg, "steps": 7, "out_dir": out, "resume": "force"}, progress=False)
    assert r["steps"] == 7 and len(r["history"]) == 1


def test_config_is_validated(pruned):
    model, teacher, _ = pruned
    with pytest.raises(ValueError, match="unknown"):
        T.finetune(model, teacher, examples(), {"stepz": 3})
    with pytest.raises(ValueError, match="teacher"):
        T.finetune(model, None, examples(), {"w_sq": 1.0})
    with pytest.raises(ValueError, match="lr"):
        T.finetune(model, teacher, examples(), {"lr": 0})
    with pytest.raises(ValueError, match="examples"):
        T.finetune(model, teacher, [], {})
    with pytest.raises(ValueError, match="parallel"):
        T.finetune(model, teacher, examples(), {"parallel": "zero3"})
