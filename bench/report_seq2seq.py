"""Turns a pytest-benchmark JSON of bench/test_seq2seq_bench.py into a markdown table and a plot.

python bench/report_seq2seq.py bench/results/seq2seq.json docs/benchmarks
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def label(r):
    if r["runtime"] == "transformers":
        return f"transformers {r['format']}"
    return r["format"] + (f" {r['sparsity']:.0%}" if r["sparsity"] else "")


def machine(data, rows) -> str:
    """The CPU's brand string, with its family, model and L3 where the run recorded them."""
    cpu = data.get("machine_info", {}).get("cpu", {}).get("brand_raw", "?")
    details = rows[0].get("cpu", {})
    if details:
        cpu += f" (family {details.get('cpu_family', '?')} model {details.get('model', '?')}"
        cpu += f", L3 {details['l3_mib']:g} MiB)" if isinstance(details.get("l3_mib"), (int, float)) else ")"
    return cpu


def table(data, rows):
    bw = rows[0]["read_bandwidth_gbs"]
    cpu = machine(data, rows)
    out = [
        "# Encoder-decoder benchmark (T5, Whisper)",
        "",
        f"Machine: {cpu}, {rows[0]['threads']} threads on both sides, ISA {rows[0]['isa']}. Read bandwidth "
        f"measured in the same run: **{bw:.1f} GB/s**. Random-weight models of the released shapes; sparse "
        "variants zero a random fraction of every block linear. One example: a 64-token input (T5) or 30 s of "
        f"audio features (Whisper), then {rows[0]['new_tokens']} greedy decoder tokens, batch 1. Encoder: one "
        "encoder pass. Decode tok/s: tokens after the first. Example: encoder + every decoder token, end to end. "
        "MB/token: decoder linear layers + head read per decoded token (transformers: the decoder's fp32 "
        "parameters and head); cross K/V: the cross-attention keys and values every decoding step also reads "
        "(fp32 in transformers; int8 codes with a scale per position in sparseinfer where the decoder takes int8 "
        "activations); GB/s counts both; a step whose bytes partly stay in the last-level cache can read "
        "faster than the DRAM probe (over 100 %). Cases run one after another (best of 2 examples for both "
        "runtimes), not interleaved.",
        "",
    ]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        rs = [r for r in rows if r["shape"] == shape]
        base = next((r for r in rs if r["runtime"] == "transformers"), None)
        out += [
            f"## {shape}",
            "",
            "| runtime / format | encoder s | decode tok/s | example s | MB/token | cross K/V MB | GB/s "
            "| % of bandwidth | decode vs transformers | example vs transformers |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rs:
            dv = f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x" if base else "-"
            ev = f"{base['example_s'] / r['example_s']:.2f}x" if base else "-"
            out.append(
                f"| {label(r)} | {r['encoder_s']:.3f} | {r['decode_tok_s']:.1f} | {r['example_s']:.2f} | "
                f"{r['bytes_per_token'] / 1e6:.1f} | {r.get('cross_kv_bytes', 0) / 1e6:.1f} | {r['gbs']:.1f} | "
                f"{100 * r['fraction_of_bandwidth']:.0f} % | "
                f"{dv} | {ev} |"
            )
        out.append("")
    return "\n".join(out)


def plot(data, rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(2, len(shapes), figsize=(4.2 * len(shapes), 7.5), squeeze=False)
    cpu = machine(data, rows)
    for j, shape in enumerate(shapes):
        rs = [r for r in rows if r["shape"] == shape]
        base = next((r for r in rs if r["runtime"] == "transformers"), None)
        names = [label(r) for r in rs]
        colors = ["tab:gray" if r["runtime"] == "transformers" else "tab:blue" for r in rs]
        for i, (key, title) in enumerate([("decode_tok_s", "decoder tokens/s"), ("example_s", "speedup per example")]):
            ax = axes[i][j]
            vals = [r[key] for r in rs] if key == "decode_tok_s" else [base["example_s"] / r["example_s"] for r in rs]
            ax.barh(names, vals, color=colors)
            ax.invert_yaxis()
            ax.set_xlabel(title if key == "decode_tok_s" else "transformers fp32 time / this time (x)")
            ax.set_title(f"{shape}: {title}", fontsize=10)
            if j:
                ax.set_yticklabels([])
    fig.suptitle(f"Encoder-decoders, batch 1, {rows[0]['threads']} threads - {cpu}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(src, out_dir):
    data = json.loads(Path(src).read_text())
    rows = [b["extra_info"] for b in data["benchmarks"]]
    out = Path(out_dir)
    (out / "seq2seq.md").write_text(table(data, rows) + "\n")
    (out / "seq2seq.json").write_text(json.dumps({"machine_info": data.get("machine_info"), "rows": rows}, indent=1))
    plot(data, rows, out / "seq2seq.png")


if __name__ == "__main__":
    main(*sys.argv[1:3])
