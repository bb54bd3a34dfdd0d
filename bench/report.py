"""Turns a pytest-benchmark JSON of bench/test_kernels_bench.py into a markdown table and a plot.

python bench/report.py bench/results/kernels.json docs/benchmarks
"""

import json
import sys
from collections import defaultdict
from pathlib import Path


def load(path):
    """The per-case rows (time, GB/s) and the paired, interleaved measurements, apart."""
    data = json.loads(Path(path).read_text())
    rows, paired = [], []
    for b in data["benchmarks"]:
        e = b["extra_info"]
        if e.get("kind") == "paired":
            paired.append(e)
            continue
        if "time_us" in e:  # timed by the test itself, round by round
            t = e["time_us"] / 1e6
        else:  # older runs: pytest-benchmark timed the whole rotation per round
            t = b["stats"]["median"] / e["copies"]  # seconds per matvec
        rows.append({**e, "time_us": t * 1e6, "gbs": e["nbytes"] / t / 1e9})
    return data, rows, paired


def paired_table(paired):
    """Speedups over numpy measured back to back, round by round (test_paired_vs_numpy)."""
    if not paired:
        return ""
    names = [n for n in paired[0]["median_speedup"] if n != "numpy-f32"]
    out = [
        "## Paired speedups over numpy f32 (interleaved)",
        "",
        "Each round times numpy and every format back to back, one DRAM-sized rotation each, after its own "
        "bandwidth probe. Median over the rounds, with the range in brackets.",
        "",
        "| shape | rounds | bandwidth (GB/s) | " + " | ".join(names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for p in paired:
        rs = p["rounds"]
        bws = [r["read_bandwidth_gbs"] for r in rs]
        cells = []
        for n in names:
            s = [r["time_us"]["numpy-f32"] / r["time_us"][n] for r in rs]
            cells.append(f"{p['median_speedup'][n]:.2f}x ({min(s):.2f}-{max(s):.2f})")
        out.append(f"| {p['shape']} | {len(rs)} | {min(bws):.0f}-{max(bws):.0f} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def fraction(r):
    """A case's fraction of the bandwidth: the median over its kept rounds of GB/s over the mean of the probes
    before and after the round (older runs: median GB/s over the median probe)."""
    return r.get("bandwidth_fraction") or r["gbs"] / case_bw(r)


def fraction_cell(r):
    lo_hi = r.get("bandwidth_fraction_range")
    cell = f"{fraction(r):.0%}" + (f" ({lo_hi[0]:.0%}-{lo_hi[1]:.0%})" if lo_hi else "")
    return cell + (" unsteady" if r.get("unsteady") else "")


def case_bw(r):
    """The bandwidth a case is judged against: the median of its kept rounds' probes (older runs: of the probes
    before its rounds, or the run's single probe)."""
    return r.get("case_read_bandwidth_gbs") or r["read_bandwidth_gbs"]


def table(data, rows):
    base = {r["shape"]: r["time_us"] for r in rows if r["format"] == "numpy-f32"}

    def speedup(r):
        return f"{base[r['shape']] / r['time_us']:.2f}x" if r["shape"] in base else "?"

    bw = rows[0]["read_bandwidth_gbs"]
    info = data.get("machine_info", {})
    out = [
        "# Kernel benchmark",
        "",
        f"Machine: {info.get('cpu', {}).get('brand_raw', '?')}, {rows[0]['threads']} threads, ISA {rows[0]['isa']}. "
        f"Sustained read bandwidth (the median of 15 probes at the start of the run): **{bw:.1f} GB/s**. "
        "Working set per case >= 1.2 GB (4x+ L3), so every read comes from DRAM. A round runs the next 256 MB "
        "of that rotation between two bandwidth probes, each over four times the last-level cache (at least "
        "1 GiB), so the probe reads DRAM too. This VM's read bandwidth jumps between "
        "~32 and ~55 GB/s, for seconds to minutes at a time, so a round counts only if its two probes agree "
        "within 10 % (the bandwidth held steady); each case keeps 9 such rounds (the rounds column: kept/run; "
        "unsteady: fewer than 3 held, all rounds shown). Time is the median over them per matvec, GB/s = packed "
        "bytes / time, the bandwidth column the median of the kept rounds' probes, and % of bandwidth the median "
        "of each round's GB/s over the mean of its two probes (range in brackets).",
        "",
        "Reading it: a memory-bound kernel sits near 100 % of the bandwidth, and its speedup over numpy grows with "
        "sparsity as its bytes shrink. A sparse kernel whose GB/s falls as sparsity rises is compute-bound: it "
        "pays per 64-column chunk (load the mask, expand or gather, multiply, scale) however few values the chunk "
        "holds. What a chunk costs depends on the CPU (`cargo run --release -p sparseinfer-core --example "
        "isa_probe` measures the instructions):",
        "",
        "- AMD Zen 5 (4.2 GHz, full-width AVX-512; `vpexpandb` 1.5 cycles; row layout, measured before tiles): "
        "sparse int8 ~3.2 cycles per chunk and "
        "core in L1, bound by the loads (mask, values, activations, scale), ~4 from L2/L3, ~5 from DRAM with both "
        "cores streaming: ~20 GB/s per core of 70 %-sparse int8.",
        "- AMD Zen 4 (3.7 GHz, AVX-512 on 256-bit units; `vpexpandb` 2.6 cycles, `vpdpbusd` and 64-byte loads "
        "1.0), one thread from L2, per 64 weights at 70 %: in the row layout sparse int8 took ~6-7.5 cycles "
        "(one row's chunk per vector: expand, `vpdpbusd`, then convert and scale every chunk) and sparse int4 "
        "~7.5; in the tiled layout (`kernels` `tiles`: 16 rows per vector, the conversion and scaling once per "
        "16 rows) ~3.5-4.1 and ~3.8 (int4 quads in pairs that share bytes), `vpexpandb` + `vpdpbusd` being most of "
        "it. That is ~26 GB/s per core of 70 %-sparse int8 and ~17 of int4: two cores read more than this VM "
        "usually gives, so what is left below 100 % is memory stalls and, on the 2048x2048 shape, per-call costs.",
        "- Intel Xeon (Sapphire Rapids class, ~3.2 GHz; `cargo run --release -p sparseinfer-core --example "
        "chunk_cost`: one thread, the matrix in L2, cycles per 64-column chunk), the paths a CPU without AVX-512 "
        "runs: dense int8 ~6.2 (AVX2) and ~5 (AVX-VNNI), sparse int8 13.6-15.4 at 50, 70 and 90 % alike (AVX-VNNI "
        "the same: the products are not what binds), sparse int4 ~18; the AVX-512 tiles take 3.1-3.7 for the same "
        "chunks. An AVX2 sparse chunk is ~80 instructions (143 per two chunks in the decode loop), most of them "
        "building the two 16-column shuffle controls from four mask bytes (byte loads, popcounts, four table rows, "
        "the inserts that join them): ~5.5 per cycle, near the core's issue width. So two cores stream 70 %-sparse "
        "int8 at ~13-14 GB/s whatever the bandwidth, while dense int8 at ~6 cycles per chunk is bound by memory "
        "(~25 GB/s here): on this VM's 2 cores, which have ~12 GB/s of bandwidth each, AVX2 sparse int8 decodes at "
        "about dense int8's rate; 1.8x would need <= ~8.5 cycles per chunk. Where cores have less bandwidth each "
        "(a desktop's 8 cores on ~60 GB/s: ~7.5), the same kernel is memory-bound and reads 2.3x fewer bytes than "
        "dense. Tried without gain: the control from broadcast loads and blends instead of inserts (6-10 % slower), "
        "a 1 MiB table of 16-column controls (one load per half; faster at 90 %, slower at 50 %: the lookups miss "
        "L1).",
        "- AMD Zen 3 (EPYC, ~3.2 GHz, AVX2 only, 512 KiB L2 per core; `chunk_cost avx2`, its 1024x2048 matrices from "
        "L3): dense int8 ~5.2 and dense int4 ~8.5-9 cycles per chunk, sparse int8 ~15.2 at 50-90 % and sparse int4 "
        "~19.7. This core's integer ALUs are apart from its vector pipes, and the sparse loop is bound by its loads "
        "(`llvm-mca -mcpu=znver3` on the decode loop: the load/store units are its busiest resource), so taking the "
        "four mask bytes from one load and shifts instead of a load each is ~9 % faster here (and ~6 % slower on the "
        "Xeon): the AVX2 kernels choose by vendor. A table of row pointers that saves a popcount, shift and add per "
        "control row but adds a dependent load was ~9 % slower. Two cores stream 70 %-sparse int8 at ~11 GB/s against"
        " probes of 30-37 GB/s, so on this 2-vCPU VM sparse int8 decodes at ~0.75x dense int8 "
        "(docs/benchmarks/llamacpp-native-avx2.md).",
        "",
        "Sparse f32 and bf16 (f32 activations, row layout) are compute-bound from ~70 % sparsity on this Zen 4: "
        "a `vexpandps` and an FMA take 3.0 cycles together (`isa_probe`: they share ports), so a 64-column chunk "
        "costs >= ~12 cycles in f32 and ~10 in bf16 however few values it holds. At 80 % that caps two cores at "
        "~35 GB/s (f32) and ~25 GB/s (bf16) before any memory stall. Dense f32/bf16 and the denser sparse f32/bf16 "
        "matrices compute four rows per pass over the activations, so a long f32 activation row is read from L1 "
        "once per four rows (`avx512::rows_shared_x`). "
        '`+token` rows run the same matrices with `activations="int8-token"`.',
        "",
        "| shape | format | sparsity | bytes/weight | time (us) | GB/s | bandwidth (GB/s) | % of bandwidth | "
        "rounds | vs numpy f32 | kernel |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rows_, cols = (int(v) for v in r["shape"].split()[-1].split("x"))
        out.append(
            f"| {r['shape']} | {r['format']} | {r['sparsity']:.0%} | {r['nbytes'] / (rows_ * cols):.3f} | "
            f"{r['time_us']:.0f} | {r['gbs']:.1f} | {case_bw(r):.1f} | {fraction_cell(r)} | "
            f"{r.get('rounds_kept', '?')}/{r.get('rounds_seen', '?')} | "
            f"{speedup(r)} | "
            f"{r['kernel']} |"
        )
    return "\n".join(out) + "\n"


def plot(rows, out_png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(2, len(shapes), figsize=(4.2 * len(shapes), 7.5), sharex=True, squeeze=False)
    bw = rows[0]["read_bandwidth_gbs"]
    for j, shape in enumerate(shapes):
        sub = [r for r in rows if r["shape"] == shape]
        base = next((r["time_us"] for r in sub if r["format"] == "numpy-f32"), None)
        if base is None:
            continue
        lines = defaultdict(list)
        for r in sub:
            lines[r["format"]].append((r["sparsity"], r["gbs"], base / r["time_us"]))
        for fmt, pts in lines.items():
            pts.sort()
            xs = [p[0] * 100 for p in pts]
            if len(pts) == 1:  # dense formats and baselines do not depend on sparsity: a flat line
                xs, pts = [0, 90], pts * 2
            style = "--" if fmt.startswith(("dense", "numpy", "torch")) else "-o"
            axes[0][j].plot(xs, [p[1] for p in pts], style, label=fmt, markersize=3)
            axes[1][j].plot(xs, [p[2] for p in pts], style, label=fmt, markersize=3)
        axes[0][j].axhline(bw, color="k", lw=0.8)
        axes[0][j].axhline(0.75 * bw, color="k", lw=0.5, ls=":")
        axes[0][j].set_title(shape)
        axes[1][j].set_xlabel("sparsity (%)")
        axes[1][j].set_yscale("log")
    axes[0][0].set_ylabel("effective GB/s (line: measured bandwidth)")
    axes[1][0].set_ylabel("speedup vs numpy dense f32")
    axes[1][-1].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)


def main():
    src, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    data, rows, paired = load(src)
    (out_dir / "kernels.md").write_text(table(data, rows) + "\n" + paired_table(paired) + "\n![kernels](kernels.png)\n")
    (out_dir / "kernels.json").write_text(json.dumps(rows + paired, indent=1))
    plot(rows, out_dir / "kernels.png")
    print(f"wrote {out_dir}/kernels.md, kernels.json, kernels.png")


if __name__ == "__main__":
    main()
