"""Encoder-decoders (T5, Whisper) as a second target: sequential calibration through the encoder then the
decoder, exact per-layer sparsity, masks kept by fine-tuning, SquareHead over both stacks, staged gradual pruning
with nested masks."""

import copy
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
tiny_models = pytest.importorskip("tiny_models")
from sparseinfer import training as T  # noqa: E402
from sparseinfer.training import data as D  # noqa: E402
from sparseinfer.training.finetune import FinetuneConfig, loss_terms  # noqa: E402
from sparseinfer.training.pruning.calibrate import block_stacks, sequential  # noqa: E402


def examples(kind, n=16, seed=0):
    """Prompt/answer pairs of varying lengths (so padding is exercised); the answer repeats part of the prompt, a
    learnable mapping. Whisper gets random log-mel frames instead of a prompt."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        if kind == "whisper":
            out.append(
                {"input_features": torch.randn(16, 32, generator=g), "labels": torch.randint(2, 320, (6,), generator=g)}
            )
            continue
        k = int(torch.randint(6, 12, (1,), generator=g))
        prompt = torch.randint(2, tiny_models.VOCAB, (k,), generator=g)
        out.append({"input_ids": prompt, "labels": torch.cat([prompt[: k // 2], torch.tensor([1])])})
    return out


def build(kind, path):
    return tiny_models.build(kind, path, scale=1.0)


def linear_input_norms(model, batches, names):
    """Σ x² per input feature of each named linear over a plain forward pass (the reference for calibration)."""
    stats, mods = {}, dict(model.named_modules())

    def hook(name):
        def f(_mod, inp):
            x = inp[0].double().reshape(-1, inp[0].shape[-1])
            stats[name] = stats.get(name, 0) + (x**2).sum(0)

        return f

    handles = [mods[n].register_forward_pre_hook(hook(n)) for n in names]
    with torch.no_grad():
        for b in batches:
            model(**b, use_cache=False)
    for h in handles:
        h.remove()
    return stats


@pytest.mark.parametrize("kind", ["t5", "whisper"])
def test_sequential_calibration_sees_what_the_model_sees(tmp_path, kind):
    model = build(kind, tmp_path)
    assert [len(b) for b in block_stacks(model)] == ([2, 3] if kind == "t5" else [2, 2])
    batches = D.calibration_batches(examples(kind), 8, 4, D.seq2seq_ids(model))
    modules = T.prunable_linears(model)
    # Unchanged weights: block by block (T5's shared position bias, the decoder's cross-attention to the encoder's
    # output and both masks carried along) the linears see exactly their inputs in a full forward pass.
    got = {}
    sequential(model, batches, "norm", lambda n, m, s: got.__setitem__(n, s), modules)
    ref = linear_input_norms(model, batches, modules)
    assert got.keys() == ref.keys()
    for name in modules:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-9, atol=1e-9)
    # Changing each layer once it is processed: a block's first linears (and the decoder's cross-attention keys,
    # which read the encoder's output) see the already-changed earlier blocks, as the final model does.
    got = {}

    def halve(name, mod, s):
        got[name] = s
        mod.weight.mul_(0.5)

    sequential(model, batches, "norm", halve, modules)
    ref = linear_input_norms(model, batches, modules)
    first = [n for n in modules if n.endswith(("SelfAttention.q", "EncDecAttention.k", "self_attn.q_proj"))]
    first += [n for n in modules if n.endswith("encoder_attn.k_proj")]
    assert len(first) == (2 + 3 + 3 if kind == "t5" else 2 + 2 + 2)
    for name in first:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["t5", "whisper"])
def test_prune_sparsegpt_exact_and_mask_survives_finetuning(tmp_path, kind):
    model = build(kind, tmp_path)
    teacher = copy.deepcopy(model)
    data = examples(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks = T.prune(model, "sparsegpt", 0.5, calibration=D.calibration_batches(data, 8, 4, D.seq2seq_ids(model)))
    assert len(masks) == (2 * 6 + 3 * 10 if kind == "t5" else 2 * 6 + 2 * 10)  # + cross-attention in the decoder
    report = T.sparsity_report(model, masks)
    assert all(v == 0.5 for v in report.values()), report
    head = "lm_head.weight" if kind == "t5" else "proj_out.weight"
    assert torch.equal(model.state_dict()[head], before[head]), "the output head is not pruned"
    cfg = dict(steps=12, lr=2e-3, warmup_steps=1, batch_size=4, w_ce=1, w_kd=1, w_sq=1)
    r = T.finetune(model, teacher, data, cfg, progress=False)
    mods = dict(model.named_modules())
    for name, keep in masks.items():
        assert torch.equal(mods[name].weight != 0, keep), f"{name}: mask changed"
    hist = r["history"]
    assert all(h["ce"] > 0 and h["kd"] > 0 and h["sq"] > 0 for h in hist)
    assert sum(h["loss"] for h in hist[-3:]) < sum(h["loss"] for h in hist[:3])


def test_seq2seq_squarehead_sums_encoder_and_decoder_blocks(tmp_path):
    # Hand-checked: a student whose block outputs are all zero scores mean(h²)/(mean(h²)+eps) ≈ 1 per block, so
    # SquareHead counts the blocks: 2 encoder + 3 decoder. Embedding outputs (index 0) and padding are excluded.
    g = torch.Generator().manual_seed(0)
    enc_t = [torch.randn(2, 5, 8, generator=g) for _ in range(3)]
    dec_t = [torch.randn(2, 4, 8, generator=g) for _ in range(4)]
    enc_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    dec_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    enc_t[1][0, 3:] = 1e6  # padding: must not count
    teacher = SimpleNamespace(encoder_hidden_states=enc_t, decoder_hidden_states=dec_t, logits=None)
    student = SimpleNamespace(
        encoder_hidden_states=[h * 0 for h in enc_t], decoder_hidden_states=[h * 0 for h in dec_t], logits=None
    )
    batch = {"attention_mask": enc_mask, "decoder_attention_mask": dec_mask, "labels": None}
    cfg = FinetuneConfig(w_ce=0, w_kd=0, w_sq=1)
    ce, kd, sq = loss_terms(student, teacher, batch, cfg, seq2seq=True)
    assert ce is None and kd is None
    assert abs(float(sq) - 5.0) < 1e-4
    # On a real model: exactly the two squarehead_loss calls, each over its own stack and mask.
    model = build("t5", tmp_path)
    student_model = copy.deepcopy(model)
    T.prune(student_model, "magnitude", 0.5)
    b = D.collate(examples("t5")[:4], *D.seq2seq_ids(model))
    inputs = {k: v for k, v in b.items() if k != "labels"}
    with torch.no_grad():
        out_s = student_model(**inputs, output_hidden_states=True, use_cache=False)
        out_t = model(**inputs, output_hidden_states=True, use_cache=False)
    assert len(out_s.encoder_hidden_states) == 3 and len(out_s.decoder_hidden_states) == 4
    _, _, sq = loss_terms(out_s, out_t, b, cfg, seq2seq=True)
    want = T.squarehead_loss(out_s.encoder_hidden_states[1:], out_t.encoder_hidden_states[1:], b["attention_mask"])
    want = want + T.squarehead_loss(
        out_s.decoder_hidden_states[1:], out_t.decoder_hidden_states[1:], b["decoder_attention_mask"]
    )
    assert torch.equal(sq, want) and float(sq) > 0


def test_gradual_prune_reaches_each_stage_with_nested_masks(tmp_path):
    model = build("t5", tmp_path)
    teacher = copy.deepcopy(model)
    data = examples("t5")
    stages = [0.5, 0.67, 0.75, 0.8]
    seen = []
    mods = dict(model.named_modules())

    def on_stage(i, sparsity, masks):
        report = T.sparsity_report(model, masks)
        for name, keep in masks.items():
            # Exact per layer (up to rounding of the count), kept through the stage's fine-tuning.
            assert abs(report[name] - sparsity) < 2e-3, (name, report[name], sparsity)
            assert torch.equal(mods[name].weight != 0, keep), f"stage {i}: {name} mask changed"
            if seen:
                assert not (keep & ~seen[-1][name]).any(), f"stage {i}: {name} revived a pruned weight"
        seen.append({n: k.clone() for n, k in masks.items()})

    r = T.gradual_prune(
        model,
        teacher,
        data,
        stages=stages,
        method="sparsegpt",
        calibration=lambda m: D.calibration_batches(data, 8, 4, D.seq2seq_ids(m)),
        steps_per_stage=3,
        finetune_config={"lr": 1e-3, "warmup_steps": 1, "batch_size": 4, "w_ce": 1, "w_sq": 1},
        progress=False,
        on_stage=on_stage,
    )
    assert len(seen) == 4 and [h["sparsity"] for h in r["stages"]] == stages
    assert all(h["finetune"]["sq"] > 0 for h in r["stages"])
    assert abs(T.sparsity_report(model, r["masks"])["global"] - 0.8) < 2e-3
    with pytest.raises(ValueError, match="increasing"):
        T.gradual_prune(model, teacher, data, stages=[0.5, 0.5], method="magnitude", progress=False)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_prior_masks_are_nested(method):
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(32, 64, generator=g), torch.randn(256, 64, generator=g)
    from sparseinfer.training.pruning import algorithms as A

    def run(s, prior=None):
        if method == "magnitude":
            return A.magnitude(w, s, prior=prior)
        if method == "wanda":
            return A.wanda(w, x.norm(dim=0), s, prior=prior)
        return A.sparsegpt(w, x.t().double() @ x.double(), s, block_size=16, prior=prior)

    _, k1 = run(0.5)
    # A prior unrelated to this matrix's scores, so nesting is forced rather than a coincidence.
    prior = torch.rand(32, 64, generator=g) > 0.3
    w2, k2 = run(0.75, prior)
    assert not (k2 & ~prior).any() and (w2[~k2] == 0).all()
    assert abs((~k2).float().mean().item() - 0.75) < 0.02
    assert not torch.equal(k1, k2)
