"""Turns a pytest-benchmark JSON of bench/test_e2e_bench.py into a markdown table and a plot.

python bench/report_e2e.py bench/results/e2e.json docs/benchmarks
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(path):
    """The per-case rows and the paired (interleaved) measurements, apart."""
    data = json.loads(Path(path).read_text())
    infos = [b["extra_info"] for b in data["benchmarks"]]
    return data, [i for i in infos if i.get("kind") != "paired"], [i for i in infos if i.get("kind") == "paired"]


def paired_table(paired):
    out = []
    for p in paired:
        out += [
            f"## Paired: {p['sparse']} against {p['dense']} ({p['size']}, interleaved)",
            "",
            "The two models alternate round by round (ABBA), each round with its own bandwidth probe, so both "
            "see the same VM bandwidth. The ideal ratio is the bytes per token (dense / sparse); where the sparse "
            "kernels stop keeping up with the memory, the ratio falls as the bandwidth rises.",
            "",
            "| round | read bandwidth (GB/s) | dense tok/s | sparse tok/s | sparse / dense |",
            "|---|---|---|---|---|",
        ]
        for i, r in enumerate(p["rounds"]):
            out.append(
                f"| {i + 1} | {r['read_bandwidth_gbs']:.1f} | {r['dense_tok_s']:.1f} | {r['sparse_tok_s']:.1f} | "
                f"{r['sparse_tok_s'] / r['dense_tok_s']:.2f}x |"
            )
        out += ["", f"Median ratio: **{p['median_ratio']:.2f}x**.", ""]
    return "\n".join(out)


def label(r):
    if r["runtime"] == "transformers":
        return f"transformers {r['format']}"
    return r["format"] + (f" {r['sparsity']:.0%}" if r["sparsity"] else "")


def probes(r):
    """The bandwidth probes around a case (runs before they were taken: the run's start figure)."""
    p = r.get("case_probes_gbs")
    return " / ".join(f"{v:.1f}" for v in p) if p else f"{r['read_bandwidth_gbs']:.1f}"


def table(data, rows):
    if not rows:
        return "# End-to-end decode benchmark\n"
    bw = rows[0]["read_bandwidth_gbs"]
    cpu = data.get("machine_info", {}).get("cpu", {}).get("brand_raw", "?")
    out = [
        "# End-to-end decode benchmark",
        "",
        f"Machine: {cpu}, {rows[0]['threads']} threads on both sides, ISA {rows[0]['isa']}. Read bandwidth "
        f"at the start of the run: **{bw:.1f} GB/s**; each case's `% of bandwidth` is against the mean of two "
        "probes taken just before and just after it (`probes`), since the bandwidth drifts during the run. "
        f"Random Llama-shaped models; prompt {rows[0]['prompt_tokens']} "
        f"tokens, {rows[0]['new_tokens']} new tokens, batch 1, greedy. Decode tok/s excludes the prompt. "
        "Bytes/token: packed linear layers + head read once per decoded token (for transformers, every parameter "
        "at its dtype), plus the attention cache a decoded token reads at the mean decoded position (f32 for "
        "transformers fp32, bf16 for its bf16 run, the load's `kv_cache` for ours: f16 with int8 activations, "
        "else f32). Best of 2 runs for sparseinfer, 1 for transformers. Integer formats take int8 "
        "activations per 64-column block; `+token` rows scale them per token instead (fewer instructions per "
        "weight, coarser activations), and compare with dense-int8+token.",
        "",
    ]
    for size in dict.fromkeys(r["size"] for r in rows):
        rs = [r for r in rows if r["size"] == size]
        base = next((r["decode_tok_s"] for r in rs if label(r) == "transformers fp32"), None)
        dense8 = {
            token: next((r["decode_tok_s"] for r in rs if label(r) == "dense-int8" + token), None)
            for token in ("", "+token")
        }
        out += [
            f"## {size} ({rs[0]['parameters'] / 1e6:.0f}M parameters)",
            "",
            "| runtime / format | MB/token (weights + cache) | prefill tok/s | decode tok/s | GB/s | probes (GB/s) "
            "| % of bandwidth | vs transformers fp32 | vs our dense-int8 |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rs:
            vs = f"{r['decode_tok_s'] / base:.2f}x" if base else "-"
            d8 = dense8["+token" if r["format"].endswith("+token") else ""]
            vs8 = f"{r['decode_tok_s'] / d8:.2f}x" if d8 and r["runtime"] == "sparseinfer" else "-"
            out.append(
                f"| {label(r)} | {mb_per_token(r)} | {r['prefill_tok_s']:.1f} | "
                f"{r['decode_tok_s']:.1f} | {r['gbs']:.1f} | {probes(r)} | {r['fraction_of_bandwidth']:.0%} | "
                f"{vs} | {vs8} |"
            )
        out.append("")
    return "\n".join(out)


def mb_per_token(r: dict) -> str:
    """The weights' and the cache's megabytes per decoded token (runs before the cache was counted: weights)."""
    weights = f"{r['bytes_per_token'] / 1e6:.0f}"
    return f"{weights} + {r['cache_bytes_per_token'] / 1e6:.1f}" if "cache_bytes_per_token" in r else weights


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(dict.fromkeys(r["size"] for r in rows))
    fig, axes = plt.subplots(1, len(sizes), figsize=(7 * len(sizes), 5), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        rs = [r for r in rows if r["size"] == size]
        labels = [label(r) for r in rs]
        colors = ["#999999" if r["runtime"] == "transformers" else "#1f77b4" for r in rs]
        ax.barh(labels, [r["decode_tok_s"] for r in rs], color=colors)
        ax.invert_yaxis()
        ax.set_xlabel("decode tokens/s (batch 1)")
        ax.set_title(f"{size} Llama-shaped model, {rs[0]['threads']} threads")
        for i, r in enumerate(rs):
            ax.text(
                r["decode_tok_s"], i, f" {r['decode_tok_s']:.1f} ({r['fraction_of_bandwidth']:.0%} bw)", va="center"
            )
        ax.set_xlim(0, max(r["decode_tok_s"] for r in rs) * 1.35)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(src, dst):
    data, rows, paired = load(src)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "e2e.md").write_text(table(data, rows) + "\n" + paired_table(paired))
    (dst / "e2e.json").write_text(json.dumps(rows + paired, indent=1))
    if rows:
        plot(rows, dst / "e2e.png")
    print((dst / "e2e.md").read_text())


if __name__ == "__main__":
    main(*sys.argv[1:3])
