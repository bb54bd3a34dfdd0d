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
    # The callback runs before step 3's checkpoint, so the run resumes from step 2 and redoes step 3.
    assert r["steps"] == 6 and len(r["history"]) == 4
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


def _one_step_grads(model, teacher, batch, **cfg):
    from sparseinfer.training.finetune import FinetuneConfig, Parallel, _Step, train_step

    m = copy.deepcopy(model)
    t = copy.deepcopy(teacher)
    config = FinetuneConfig(**cfg)
    if config.bf16:
        t.to(torch.bfloat16)
    step = _Step(Parallel(m, "ddp"), t, config, seq2seq=False)
    step.check(m, t, batch)
    terms = train_step(m, t, batch, step, 1.0)
    return terms, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}, step.head is not None


# bf16 budget of the fast path against the fp32 reference: each loss term within 2 % (bf16 keeps 8 bits of
# mantissa; the errors of ~4 layers' matmuls add up), each gradient within 10 % of its norm.
BF16_LOSS_RTOL = 2e-2
BF16_GRAD_RTOL = 0.1


@pytest.mark.parametrize("weights", [dict(w_ce=1, w_kd=0, w_sq=0), dict(w_ce=1, w_kd=1, w_sq=0), dict(w_ce=1, w_sq=1)])
@pytest.mark.parametrize("tied", [True, False])
def test_fused_head_and_bf16_match_the_plain_fp32_step(tmp_path, weights, tied):
    model = tiny_models.build("llama", tmp_path, scale=1.0, hidden_size=64, intermediate_size=128)
    if tied:  # one tensor is the embedding and the head: both gradients land in it
        model.lm_head.weight = model.model.embed_tokens.weight
    teacher = copy.deepcopy(model)
    T.prune(model, "magnitude", 0.5)
    ex = examples(n=4, length=24)
    ex[3] = {"input_ids": ex[3]["input_ids"][:16]}  # padding in the batch
    from sparseinfer.training.data import collate

    batch = collate(ex)
    ref, g_ref, fused = _one_step_grads(model, teacher, batch, fused_head=False, **weights)
    assert not fused
    got, g_got, fused = _one_step_grads(model, teacher, batch, fused_head=True, **weights)
    assert fused, "the tiny llama's head should take the fused path"
    for k in ref:
        assert got[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-6), k
    for n, g in g_ref.items():
        assert torch.allclose(g_got[n], g, rtol=1e-4, atol=1e-6), n
    fast, g_fast, _ = _one_step_grads(model, teacher, batch, fused_head=True, bf16=True, **weights)
    for k in ref:
        assert fast[k] == pytest.approx(ref[k], rel=BF16_LOSS_RTOL, abs=1e-4), k
    for n, g in g_ref.items():
        assert (g_fast[n] - g).norm() <= BF16_GRAD_RTOL * g.norm() + 1e-6, n


def test_bf16_fast_path_keeps_masks_exact(pruned):
    model, teacher, masks = pruned
    cfg = dict(steps=5, lr=1e-3, warmup_steps=1, batch_size=4, w_ce=1, w_kd=1, w_sq=1, bf16=True)
    r = T.finetune(model, teacher, examples(), cfg, progress=False)
    assert r["fused_head"] and next(teacher.parameters()).dtype == torch.bfloat16
    mods = dict(model.named_modules())
    for name, keep in masks.items():
        w = mods[name].weight
        assert w.dtype == torch.float32 and torch.equal(w != 0, keep), name


def test_an_early_stop_is_kept_by_the_checkpoint(pruned, tmp_path):
    model, teacher, _ = pruned
    cfg = dict(steps=6, lr=1e-3, warmup_steps=1, batch_size=4, w_ce=1, w_sq=0, save_every=3, out_dir=str(tmp_path))
    r = T.finetune(model, None, examples(), cfg, progress=False, on_step=lambda step, terms: step == 2)
    assert r["steps"] == 2 and r["stopped_early"]
    again = T.finetune(copy.deepcopy(model), None, examples(), cfg, progress=False)
    assert again["steps"] == 2 and again["stopped_early"] and again["history"] == []


def test_compiled_run_matches_the_eager_run_and_keeps_masks(pruned):
    """``compile=True`` runs the same training: per-step losses as the eager run's within fp32 reordering, masks
    exact. Both the student and the teacher (SquareHead, KD) go through torch.compile."""
    pytest.importorskip("torch._dynamo")
    model, teacher, masks = pruned
    cfg = dict(steps=3, lr=1e-3, warmup_steps=1, batch_size=4, w_ce=1, w_kd=1, w_sq=1, seed=1)
    eager, compiled = copy.deepcopy(model), copy.deepcopy(model)
    a = T.finetune(eager, copy.deepcopy(teacher), examples(), cfg, progress=False)
    b = T.finetune(compiled, copy.deepcopy(teacher), examples(), {**cfg, "compile": True}, progress=False)
    for ha, hb in zip(a["history"], b["history"]):
        for k in ("ce", "kd", "sq", "loss"):
            assert hb[k] == pytest.approx(ha[k], rel=1e-4, abs=1e-6), (ha["step"], k)
    mods = dict(compiled.named_modules())
    for name, keep in masks.items():
        assert torch.equal(mods[name].weight != 0, keep), name
