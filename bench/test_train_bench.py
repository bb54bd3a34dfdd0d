"""Training-step throughput: the plain fp32 fine-tuning step against the fast one (bf16 autocast, bf16 teacher
under inference_mode, fused head losses, fused AdamW), for CE, CE + KD and CE + SquareHead, in one run.

On the default model (SmolLM2-135M), one process with the kernels' thread count, micro-batches of
``BATCH x SEQ`` tokens. The rounds alternate between the cases (one step of each case per round) so a drift of
the machine hits every case alike; each case reports the median step time over its rounds, training tokens/s
and the achieved GFLOPS of the work the step needs (``step_flops``), and every fast case its speedup over the
plain case of the same loss.

    make bench-train   # JSON in bench/results/train.json, table in docs/benchmarks/train.md

With timing disabled (``make test``) a tiny random model runs one round as a smoke test.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")

LOSSES = {
    "ce": dict(w_ce=1.0, w_kd=0.0, w_sq=0.0),
    "kd": dict(w_ce=1.0, w_kd=1.0, w_sq=0.0),
    "squarehead": dict(w_ce=1.0, w_kd=0.0, w_sq=1.0),
}
PATHS = {
    "plain fp32": dict(bf16=False, fused_head=False, fused_optimizer=False),
    "fast bf16": dict(bf16=True, fused_head=True, fused_optimizer=True),
}
ROUNDS = 5
SHAPES = [(4, 128), (2, 512)]  # (batch, sequence length) of one micro-batch


def step_flops(cfg, n_linear: int, n_head: int, layers: int, dim: int, batch: int, seq: int) -> float:
    """FLOPs a step needs: the student's forward and backward (3x a forward) through the linears, attention
    (4 * seq * dim per token and layer, forward) and, for CE or KD, the head; the teacher's forward through the
    linears and attention, and its head only for KD."""
    tokens = batch * seq
    fwd_body = 2 * n_linear + 4 * seq * dim * layers  # per token
    head = 2 * n_head
    student = 3 * (fwd_body + (head if (cfg["w_ce"] or cfg["w_kd"]) else 0))
    teacher = (fwd_body + (head if cfg["w_kd"] else 0)) if (cfg["w_kd"] or cfg["w_sq"]) else 0
    return float(tokens * (student + teacher))


def _model(benchmark_on: bool):
    if benchmark_on:
        import sparseinfer

        path = sparseinfer.models.default_model_dir()
    else:
        torch.manual_seed(0)
        cfg = tf.LlamaConfig(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
        )
        return tf.LlamaForCausalLM(cfg)
    return tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def test_training_step_throughput(benchmark):
    from sparseinfer import kernels
    from sparseinfer.training.finetune import FinetuneConfig, Parallel, _adamw, _Step, train_step
    from sparseinfer.training.masks import prunable_linears

    on = not benchmark.disabled
    torch.set_num_threads(kernels.num_threads())
    base = _model(on)
    c = base.config
    n_linear = sum(m.weight.numel() for m in prunable_linears(base).values())
    n_head = base.get_output_embeddings().weight.numel()
    rounds, shapes = (ROUNDS, SHAPES) if on else (1, [(2, 16)])
    teachers = {"plain fp32": copy.deepcopy(base).eval(), "fast bf16": copy.deepcopy(base).eval().to(torch.bfloat16)}
    for t in teachers.values():
        t.requires_grad_(False)
    student = base
    cases = []
    for b, s in shapes:
        for loss, w in LOSSES.items():
            for path, p in PATHS.items():
                cfg = FinetuneConfig(**w, **p, lr=1e-6)
                teacher = None if loss == "ce" else teachers[path]
                step = _Step(Parallel(student, "ddp"), teacher, cfg, seq2seq=False)
                opt = _adamw(list(student.parameters()), cfg, fused=cfg.fused_optimizer)
                flops = step_flops(w, n_linear, n_head, c.num_hidden_layers, c.hidden_size, b, s)
                cases.append(
                    dict(
                        shape=(b, s),
                        loss=loss,
                        path=path,
                        cfg=cfg,
                        teacher=teacher,
                        step=step,
                        opt=opt,
                        flops=flops,
                        times=[],
                    )
                )
    g = torch.Generator().manual_seed(0)
    for r in range(rounds + 1):  # round 0 warms up every case
        for case in cases:
            b, s = case["shape"]
            ids = torch.randint(0, c.vocab_size, (b, s), generator=g)
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
            case["step"].check(student, case["teacher"], batch)
            t0 = time.perf_counter()
            terms = train_step(student, case["teacher"], batch, case["step"], 1.0)
            case["opt"].step()
            case["opt"].zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            assert all(v == v for v in terms.values()) and terms["loss"] > 0
            if r > 0:
                case["times"].append(dt)
    rows = []
    for case in cases:
        b, s = case["shape"]
        t = statistics.median(case["times"])
        rows.append(
            {
                "batch": b,
                "seq_len": s,
                "loss": case["loss"],
                "path": case["path"],
                "fused_head": case["step"].head is not None,
                "seconds_per_step": t,
                "step_times": case["times"],
                "tokens_per_s": b * s / t,
                "gflops": case["flops"] / t / 1e9,
            }
        )
    for row in rows:
        plain = next(
            x
            for x in rows
            if x["path"] == "plain fp32"
            and (x["batch"], x["seq_len"], x["loss"]) == (row["batch"], row["seq_len"], row["loss"])
        )
        row["speedup"] = plain["seconds_per_step"] / row["seconds_per_step"]
    benchmark.extra_info["rows"] = rows
    benchmark.extra_info["threads"] = kernels.num_threads()
    benchmark.extra_info["model"] = {"linear_params": n_linear, "head_params": n_head, "layers": c.num_hidden_layers}
    benchmark.extra_info["torch"] = torch.__version__
    benchmark(lambda: None)  # the timings are in extra_info (rounds alternate between cases)
    if on:
        out = Path(__file__).parent / "results" / "train.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(benchmark.extra_info, indent=1))
