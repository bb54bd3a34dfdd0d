"""What the attention cache's format costs and saves: decode tokens/s of one model with an f32, f16 and int8 cache
at a short and a long context (the formats alternate round by round, each round with its own read-bandwidth
probe), and the perplexity of the default model's own logits on a text it never saw with each format.

    python bench/kv_cache_ab.py --model DIR --weights sparse-int4 --prompts 16 1024 --rounds 4 \\
        --report docs/benchmarks

Every decoded token reads the whole cache: at position p a Llama-shaped model reads 2 · layers · kv_heads ·
head_dim · p values, which the weight bytes per token leave out; the table adds them (mean over the decoded
positions) to say how much of the read bandwidth a case used.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import harness
import numpy as np
from int4_quality import nll_and_top1, text

FORMATS = ("f32", "f16", "int8")
NEW_TOKENS = 128


def kv_bytes(info: dict, kv: str, prompt: int) -> float:
    """Mean cache bytes one decoded token reads over positions prompt .. prompt + NEW_TOKENS - 1."""
    shape = (info["num_layers"], info["num_kv_heads"], info["head_dim"])
    return harness.cache_bytes_per_token(*shape, kv, prompt, NEW_TOKENS)


def decode_rounds(model_dir: str, weights: str, prompts: list[int], rounds: int) -> dict:
    import sparseinfer
    from sparseinfer.kernels import measure_read_bandwidth

    models = {kv: sparseinfer.load(model_dir, weights=weights, kv_cache=kv) for kv in FORMATS}
    info = models["f32"].info()
    vocab = info["vocab_size"]
    out = {"info": {k: info[k] for k in ("bytes_per_token", "kernel", "num_layers", "num_kv_heads", "head_dim")}}
    for prompt in prompts:
        ids = [(i * 37 + 11) % vocab for i in range(prompt)]
        for m in models.values():
            m.generate_ids(ids[:16], max_new_tokens=4)  # warm up: page in the weights

        def run(kv, m, ids=ids):
            m.generate_ids(ids, max_new_tokens=NEW_TOKENS)
            return {"decode_tok_s": m.last_stats.decode_tokens_per_s}

        recs = harness.interleave(
            list(models.items()),
            rounds,
            run,
            probe=lambda: measure_read_bandwidth(repeats=3),
            log=lambda s, p=prompt: print(f"prompt {p}: {s}", flush=True),
        )
        out[str(prompt)] = recs
    return out


def perplexities(weights: str, tokens: int) -> dict:
    import sparseinfer

    res = {}
    for kv in FORMATS:
        m = sparseinfer.load(None, weights=weights, kv_cache=kv)
        ids = np.asarray(m.encode(text()), dtype=np.int64)[:tokens]
        nll, top = nll_and_top1(m.logits([int(i) for i in ids]), ids)
        res[kv] = {"ppl": float(np.exp(nll.mean())), "top": top}
    base = res["f32"]["top"]
    return {kv: {"ppl": r["ppl"], "top1_agreement_with_f32": float((r["top"] == base).mean())} for kv, r in res.items()}


def report(dec: dict, ppl: dict, args) -> str:
    info = dec["info"]
    lines = [
        "# Attention cache formats: decode speed and accuracy",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {info['kernel']}. `python bench/kv_cache_ab.py "
        f"--model {Path(args.model).name} --weights {args.weights} --prompts {' '.join(map(str, args.prompts))} "
        f"--rounds {args.rounds}`. Decode tok/s of {NEW_TOKENS} new tokens after a prompt of the given length, "
        "the three cache formats alternating round by round (median over rounds; ratios per round, then their "
        "median). GB/s counts the weights (bytes per token) and the cache a decoded token reads at the mean "
        "position; % against the round's read-bandwidth probe.",
        "",
        "| prompt | cache | decode tok/s | vs f32 | MB/token (weights + cache) | GB/s | % of bandwidth |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in args.prompts:
        recs = dec[str(p)]
        bw = statistics.median(r["read_bandwidth_gbs"] for r in recs)
        for kv in FORMATS:
            tok = harness.per_round(recs, kv, "decode_tok_s")
            ratio = harness.ratios(recs, kv, "f32", "decode_tok_s")
            mb = (info["bytes_per_token"] + kv_bytes(info, kv, p)) / 1e6
            gbs = statistics.median(tok) * mb / 1e3
            lines.append(
                f"| {p} | {kv} | {statistics.median(tok):.1f} | {harness.fmt_spread(ratio)} | "
                f"{info['bytes_per_token'] / 1e6:.0f} + {kv_bytes(info, kv, p) / 1e6:.1f} | {gbs:.1f} | "
                f"{100 * gbs / bw:.0f}% ({bw:.1f} GB/s) |"
            )
    if ppl:
        lines += [
            "",
            f"Perplexity of the default model ({args.weights}) from the runtime's own logits over the first "
            f"{args.ppl_tokens} tokens of `pydoc_data.topics` (as bench/int4_quality.py), one prompt:",
            "",
            "| cache | perplexity | top-1 agreement with the f32 cache |",
            "|---|---|---|",
        ]
        for kv, r in ppl.items():
            lines.append(f"| {kv} | {r['ppl']:.3f} | {100 * r['top1_agreement_with_f32']:.1f} % |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a model directory (e.g. a bench model)")
    ap.add_argument("--weights", default="sparse-int4")
    ap.add_argument("--prompts", type=int, nargs="+", default=[16, 1024])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--ppl-tokens", type=int, default=1024, help="0 skips the perplexity")
    ap.add_argument("--report", type=Path, help="write kv-cache.md and kv-cache.json here")
    args = ap.parse_args()
    dec = decode_rounds(args.model, args.weights, args.prompts, args.rounds)
    ppl = perplexities(args.weights, args.ppl_tokens) if args.ppl_tokens else {}
    md = report(dec, ppl, args)
    print(md)
    if args.report:
        args.report.mkdir(parents=True, exist_ok=True)
        (args.report / "kv-cache.md").write_text(md)
        (args.report / "kv-cache.json").write_text(json.dumps({"decode": dec, "perplexity": ppl}, indent=1))


if __name__ == "__main__":
    main()
