"""The accuracy study's driver end to end on a tiny local model: every cell (teacher, one-shot pruners, the four
fine-tuning recipes at both sparsities, GPTQ INT8/INT4 exports read back by the runtime, speed), the report, the
resume from finished cells, and the guard against resuming a study of another model."""

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tiny_models = pytest.importorskip("tiny_models")

STUDY = Path(__file__).resolve().parents[2] / "training" / "study.py"


def run_study(*args, check=True):
    return subprocess.run(
        [sys.executable, str(STUDY), "--budget", "smoke", *map(str, args)],
        capture_output=True,
        text=True,
        check=check,
        timeout=1200,
    )


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    tiny_models.build("llama", root / "model", scale=1.0, max_position_embeddings=128)
    work, out = root / "work", root / "out"
    r = run_study("--model", root / "model", "--work", work, "--out", out)
    return root, work, out, r


def test_every_cell_runs_and_reports(study):
    root, work, out, r = study
    cells = {p.stem: json.loads(p.read_text()) for p in (work / "cells").glob("*.json")}
    expected = {"dense-ft", "speed"}
    expected |= {f"oneshot-{m}-{s}" for m in ("magnitude", "wanda", "sparsegpt") for s in (50, 70)}
    expected |= {f"ft-{r}-{s}" for r in ("ce", "kd", "squarehead", "kd+squarehead") for s in (50, 70)}
    assert expected <= set(cells), r.stdout[-2000:]
    quant = {n for n in cells if n.startswith("quant-")}
    assert len(quant) == 4 and {n.rsplit("-", 1)[1] for n in quant} == {"int8", "int4"}

    for s in (50, 70):
        for name in (f"oneshot-sparsegpt-{s}", f"ft-ce-{s}", f"ft-kd+squarehead-{s}"):
            assert abs(cells[name]["measured_sparsity"] - s / 100) < 0.02, name
    for name, c in cells.items():
        if "ppl" in c:
            assert c["ppl"] > 1 and c["ci95"][0] <= c["ppl"] <= c["ci95"][1], name
            assert len(c["chunk_nll"]) == 4, name
    # The recipes differ in their losses, not in their data: the KD + SquareHead run logged both distillation
    # terms, CE alone neither.
    assert {"kd", "sq"} <= set(cells["ft-kd+squarehead-70"]["final_loss"])
    assert not {"kd", "sq"} & set(cells["ft-ce-70"]["final_loss"])
    # Every export was loaded by the runtime, its perplexity from the runtime's logits near torch's (INT8).
    for name in quant:
        c = cells[name]
        assert Path(c["export"], "config.json").is_file()
        if c["bits"] == 8:
            assert c["ppl"] == pytest.approx(c["torch"]["ppl"], rel=0.05), name
    speed = cells["speed"]
    assert len(speed["rows"]) == 6 and all(row["decode_tok_s"] > 0 for row in speed["rows"])

    # Finished cells leave no training state behind.
    assert not any((work / "checkpoints").iterdir())
    text = (out / "study.md").read_text()
    assert "# Study: sparse fine-tuning of model on Shakespeare" in text
    assert (out / "study.png").stat().st_size > 10_000
    assert json.loads((out / "study.json").read_text())["cells"].keys() == cells.keys()


def test_resume_reads_finished_cells_and_refuses_another_model(study, tmp_path):
    root, work, out, _ = study
    before = {p.name: p.stat().st_mtime_ns for p in (work / "cells").glob("*.json")}
    r = run_study("--model", root / "model", "--work", work, "--out", tmp_path / "again")
    assert "== " not in r.stdout  # nothing re-ran
    assert before == {p.name: p.stat().st_mtime_ns for p in (work / "cells").glob("*.json")}
    r = run_study("--model", tmp_path / "other", "--work", work, "--out", tmp_path / "x", check=False)
    assert r.returncode != 0 and "holds a study of model" in r.stderr


def test_the_learning_rate_sweep_scores_each_rate_on_the_validation_plays(study, tmp_path):
    root, work, _, _ = study
    mine = tmp_path / "work"
    shutil.copytree(work, mine)
    r = run_study("--model", root / "model", "--work", mine, "--out", tmp_path / "out", "--sweep")
    cells = {p.stem: json.loads(p.read_text()) for p in (mine / "cells").glob("sweep-*.json")}
    assert set(cells) == {"sweep-ce-70-lr0.0001", "sweep-ce-70-lr0.001"}, r.stdout[-2000:]
    for c in cells.values():
        assert c["kind"] == "lr-sweep" and c["steps"] >= 2
        assert [p["step"] for p in c["curve"]] == [c["steps"] // 2, c["steps"]]
        assert c["validation"]["ppl"] == c["curve"][-1]["ppl"] > 1
        assert "chunk_nll" not in c  # held-out figures are never part of the sweep
        # The validation chunks' NLL is kept, so rates compare by a paired interval.
        v = c["validation"]
        assert len(v["chunk_nll"]) == len(v["chunk_tokens"]) > 1
    # Same model, data and seed: only the rate differs, and it moves the result.
    a, b = (cells[n]["validation"]["ppl"] for n in sorted(cells))
    assert a != b
    # The full study's cells were not touched, and the sweep left no training state behind.
    assert {p.name for p in (work / "cells").glob("*.json")} | {f"{n}.json" for n in cells} == {
        p.name for p in (mine / "cells").glob("*.json")
    }
    assert not any((mine / "checkpoints").iterdir())
    text = (tmp_path / "out" / "study.md").read_text()
    assert "## Learning-rate sweep" in text and "| 70% | 0.0001 (the study's) |" in text
    assert re.search(r"- 70%: best rate 0\.00?1 ", text)


def test_sweep_rates_compare_by_a_paired_interval_over_the_same_chunks():
    S = _study_module()
    rng = np.random.default_rng(0)
    base = rng.uniform(300.0, 400.0, 64)  # per-chunk NLL, 128 tokens each: the chunks differ a lot
    tokens = [128] * 64

    def cell(lr, nll):
        ppl = float(np.exp(nll.sum() / (128 * 64)))
        v = {"ppl": ppl, "ci95": [ppl * 0.9, ppl * 1.1], "chunk_nll": list(nll), "chunk_tokens": tokens}
        return {
            "kind": "lr-sweep",
            "sparsity": 0.7,
            "lr": lr,
            "training_tokens": 1000,
            "curve": [v, v],
            "validation": v,
        }

    cells = {
        "a": cell(1e-4, base),
        # 1 % less NLL on every chunk: far inside each run's own interval, resolved by pairing.
        "b": cell(1e-3, base * 0.99),
    }
    text = "\n".join(S.sweep_lines(cells, {"lr": {0.7: 1e-4}}))
    m = re.search(r"best rate 0\.001 .*study's 0\.0001 \(paired ratio (0\.\d+) \[(\S+), (\S+)\]: resolved\)", text)
    assert m, text
    assert float(m[3]) < 1
    # Without per-chunk NLL (runs from before it was kept) the line has no paired interval.
    for c in cells.values():
        del c["validation"]["chunk_nll"]
    assert "paired ratio" not in "\n".join(S.sweep_lines(cells, {"lr": {0.7: 1e-4}}))


def test_a_study_seeded_from_another_reuses_its_teacher_and_one_shot_models(study, tmp_path):
    root, work, _, _ = study
    mine = tmp_path / "work"
    r = run_study("--model", root / "model", "--work", mine, "--out", tmp_path / "out", "--seed-from", work)
    ran = set(re.findall(r"^== (\S+)", r.stdout, flags=re.M))
    assert not any(n == "dense-ft" or n.startswith("oneshot-") for n in ran), ran
    assert {f"ft-ce-{s}" for s in (50, 70)} <= ran
    for name in ("dense-ft", "dense-ft-best", "oneshot-sparsegpt-70"):
        a, b = (w / "models" / name for w in (work, mine))
        files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
        assert files and all((a / f).read_bytes() == (b / f).read_bytes() for f in files), name
    # The seeded records are the other study's; the sparse cells start from the same one-shot model.
    theirs, ours = (json.loads((w / "cells" / "oneshot-sparsegpt-70.json").read_text()) for w in (work, mine))
    assert theirs == ours
    first = {w: json.loads((w / "cells" / "ft-ce-70.json").read_text())["curve"][0]["ppl"] for w in (work, mine)}
    assert first[work] == first[mine]


def test_a_lost_cache_is_restored_from_the_published_records(study, tmp_path):
    """A new machine: the work directory is empty and only the repository's copy of the records is there. Finished
    cells are not trained again; the cells whose models a missing cell needs are re-run and must reproduce their
    records, or every cell built on them runs again."""
    root, work, out, _ = study
    first = {p.stem: json.loads(p.read_text()) for p in (work / "cells").glob("*.json")}
    published = tmp_path / "out" / "study-smoke"
    shutil.copytree(out / "study-smoke", published)
    quant = {s: next(n for n in first if n.startswith("quant-") and n.endswith(f"-{s}-int8")) for s in (50, 70)}
    for s in (50, 70):
        (published / f"{quant[s]}.json").unlink()  # an unfinished cell that needs the best recipe's model
    # The INT4 export is not on the new machine: that cell is made again from the same model.
    int4 = next(n for n in first if n.startswith("quant-") and n.endswith("-50-int4"))
    rec = json.loads((published / f"{int4}.json").read_text())
    rec["export"] = str(tmp_path / "gone")
    (published / f"{int4}.json").write_text(json.dumps(rec))
    # A record the re-run will not reproduce: the cells built on the 70 % SparseGPT model must all run again.
    rec = json.loads((published / "oneshot-sparsegpt-70.json").read_text())
    rec["ppl"] *= 1.5
    (published / "oneshot-sparsegpt-70.json").write_text(json.dumps(rec))

    # A re-run interrupted before it finished (its earlier record set aside): it runs to its end, is checked
    # against that record (which it does not reproduce here) and is not restored from the published one.
    new_work = tmp_path / "work"
    (new_work / "rerun").mkdir(parents=True)
    rec = json.loads((published / "oneshot-wanda-50.json").read_text())
    rec["ppl"] *= 1.5
    (new_work / "rerun" / "oneshot-wanda-50.json").write_text(json.dumps(rec))
    r = run_study("--model", root / "model", "--work", new_work, "--out", tmp_path / "out")
    cells = {p.stem: json.loads(p.read_text()) for p in (new_work / "cells").glob("*.json")}
    assert cells.keys() == first.keys(), r.stdout[-2000:]
    ran = set(re.findall(r"^== (\S+)$", r.stdout, re.M))
    best50 = quant[50].removeprefix("quant-").removesuffix("-50-int8")
    rebuilt = {"dense-ft", "oneshot-sparsegpt-50", f"ft-{best50}-50", "oneshot-sparsegpt-70", "speed"}
    rebuilt |= {n for n in first if n.endswith("-70") and n.startswith("ft-")} | {quant[50]}
    rebuilt |= {n for n in first if n.startswith("quant-") and "-70-" in n}
    rebuilt |= {int4, "oneshot-wanda-50"}
    assert ran == rebuilt, r.stdout[-3000:]
    assert "oneshot-sparsegpt-70 did not reproduce" in r.stdout
    assert "oneshot-wanda-50 did not reproduce" in r.stdout
    assert cells["oneshot-wanda-50"]["rerun_of"]["rel_diff"] == pytest.approx(1 / 1.5 - 1, abs=1e-3)
    assert (new_work / "rerun" / "done" / "oneshot-wanda-50.json").is_file()
    # Training on the same machine with the same threads repeats itself; the study's own bar is REPRODUCE_TOL.
    for name in rebuilt - {"speed"}:
        assert cells[name]["ppl"] == pytest.approx(first[name]["ppl"], rel=1e-4), name
        if name in ("dense-ft", "oneshot-sparsegpt-50", f"ft-{best50}-50", int4):
            assert abs(cells[name]["rerun_of"]["rel_diff"]) < 1e-4, name
    # Cells that needed nothing lost were taken from the records as they are.
    for name in set(first) - rebuilt:
        assert cells[name] == first[name], name


def test_records_of_another_precision_are_neither_restored_nor_overwritten(study, tmp_path):
    """The repository holds a study trained in the other precision (bf16 autocast against fp32): this machine's
    study publishes beside it, under the precision's name, and leaves those records as they are."""
    root, work, out, _ = study
    meta = json.loads((work / "study.json").read_text())
    ours = meta["bf16"]
    theirs = tmp_path / "out" / "study-smoke"
    shutil.copytree(out / "study-smoke", theirs)
    (theirs / "study-config.json").write_text(json.dumps({**meta, "bf16": not ours}))
    before = {p.name: p.read_bytes() for p in theirs.iterdir()}
    run_study("--model", root / "model", "--work", work, "--out", tmp_path / "out", "--report")
    assert {p.name: p.read_bytes() for p in theirs.iterdir()} == before
    mine = tmp_path / "out" / f"study-smoke-{'bf16' if ours else 'fp32'}"
    assert {p.stem for p in mine.glob("*.json")} >= {p.stem for p in (work / "cells").glob("*.json")}
    assert json.loads((mine / "study-config.json").read_text())["bf16"] == ours
    assert (tmp_path / "out" / f"study-{'bf16' if ours else 'fp32'}.md").is_file()
    assert not (tmp_path / "out" / "study.md").exists()


def _study_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("study", STUDY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_published_directory_follows_model_and_precision(tmp_path):
    S = _study_module()
    work, out = tmp_path / "work", tmp_path / "out"
    with pytest.raises(SystemExit, match="no study"):
        S.published_dir(out, "full", work)
    work.mkdir()
    (work / "study.json").write_text(json.dumps({"bf16": False, "model": "default"}))
    assert S.published_dir(out, "full", work) == out / "study-full"  # nothing published yet
    (out / "study-full").mkdir(parents=True)
    config = out / "study-full" / "study-config.json"
    config.write_text(json.dumps({"bf16": False, "model": "default"}))
    assert S.published_dir(out, "full", work) == out / "study-full"
    config.write_text(json.dumps({"bf16": True, "model": "default"}))
    assert S.published_dir(out, "full", work) == out / "study-full-fp32"
    (work / "study.json").write_text(json.dumps({"bf16": True, "model": "default"}))
    assert S.published_dir(out, "full", work) == out / "study-full"
    config.write_text(json.dumps({"bf16": False, "model": "/some/other/model"}))
    with pytest.raises(SystemExit, match="another --out"):
        S.published_dir(out, "full", work)


def test_the_curve_floor_is_recovered_and_answers_whether_budget_closes_a_gap():
    S = _study_module()
    tokens = [0, 2e5, 4e5, 6e5, 8e5, 1e6]
    curve = [40.0] + [20.0 + 3.0 * (t / 1e6) ** -0.7 for t in tokens[1:]]
    a, b, c = S.fit_floor(tokens, curve)
    assert (
        a == pytest.approx(20.0, abs=0.05) and b == pytest.approx(3.0, rel=0.05) and c == pytest.approx(0.7, abs=0.02)
    )
    # 21 lies above the floor: reached where 3·t^-0.7 = 1, i.e. t = 3^(1/0.7) million tokens; 19.9 never.
    assert S.tokens_to_reach((a, b, c), 21.0) == pytest.approx(1e6 * 3 ** (1 / 0.7), rel=0.05)
    assert S.tokens_to_reach((a, b, c), 19.9) is None
    with pytest.raises(ValueError):
        S.fit_floor([0, 1e5, 2e5], [30.0, 25.0, 24.0])


def test_a_curve_without_a_visible_floor_fits_at_the_bound_not_below_any_perplexity():
    S = _study_module()
    # A power law falling toward a negative "floor": unconstrained least squares would return it.
    tokens = [0, 2e5, 4e5, 6e5, 8e5, 1e6]
    curve = [45.0] + [30.0 * (t / 1e6) ** -0.3 - 10.0 for t in tokens[1:]]
    a, b, c = S.fit_floor(tokens, curve)
    assert S.FLOOR_MIN <= a < S.FLOOR_SEEN * 17.0 and b > 0
    fitted = [a + b * (t / 1e6) ** -c for t in tokens[1:]]
    assert max(abs(f / y - 1) for f, y in zip(fitted, curve[1:])) < 0.02
    assert S.floor_label(a, 17.0) == ("none visible (power law)", "-")
    assert S.floor_label(20.0, 16.0) == ("20.00", "+25.0%")
    # A floor below the teacher is an extrapolation of a curve still falling, not one it shows.
    assert S.floor_label(9.7, 17.5) == ("none visible (power law)", "-")
    # Reaching a target is still answered on the bounded fit.
    assert S.tokens_to_reach((a, b, c), fitted[-1] - 1.0) > 1e6


def test_goal_lines_say_met_or_why_not():
    S = _study_module()
    tokens = [0, 2e5, 4e5, 6e5, 8e5, 1e6]

    def cell(name, floor, scale):
        pts = [{"tokens": t, "ppl": floor + scale * (max(t, 1e4) / 1e6) ** -0.5} for t in tokens]
        return {"name": name, "kind": "sparse-ft", "ppl": pts[-1]["ppl"]}, pts

    dense = 10.0
    cells, curves = {}, {}
    # 50 %: CE levels off at 10.3 (within 5 % of 10.0) but ends above it; 70 %: KD 12 % better than CE, flat.
    for name, floor, scale in [("ft-ce-50", 10.3, 0.5), ("ft-ce-70", 20.0, 1.0), ("ft-kd-70", 17.6, 0.88)]:
        cells[name], curves[name] = cell(name, floor, scale)
    text = "\n".join(S.goal_lines(cells, curves, dense))
    assert "50% + INT8 within 5% of the teacher (<= 10.50): not measured yet" in text
    assert re.search(r"levels off at 10\.3\d \(\+3\.\d%\): it would reach the target after ~\d+\.\dM tokens", text)
    assert "70% + INT8 within 15% of the teacher (<= 11.50)" in text and "would not close the gap" in text
    assert re.search(r"beats CE alone by >= 10%: met: CE \+ KD 18\.\d\d against CE 21\.\d\d, 12\.\d% better", text)
    lines = "\n".join(S.curve_lines(cells, curves, dense))
    assert re.search(r"70%: CE \+ KD / CE along the curve: (0\.880, ){4}0\.880; .* moved \+0\.000 \(flat\)", lines)
    # A quantized cell answers its goal directly.
    cells["quant-ce-50-int8"] = {"kind": "quantized", "sparsity": 0.5, "bits": 8, "recipe": "ce", "ppl": 10.4}
    assert "50% + INT8 within 5% of the teacher (<= 10.50): met: CE + INT8 10.40 (+4.0%)" in "\n".join(
        S.goal_lines(cells, curves, dense)
    )


def test_a_ratio_to_ce_moving_toward_1_is_a_narrowing_gap_on_either_side():
    S = _study_module()
    assert S.gap_trend(0.97, 0.95) == "widening"  # better than CE, more so
    assert S.gap_trend(0.95, 0.97) == "narrowing"
    assert S.gap_trend(1.039, 1.005) == "narrowing"  # worse than CE, less so
    assert S.gap_trend(1.01, 1.03) == "widening"
    assert S.gap_trend(1.02, 0.98) == "crossed 1"
    assert S.gap_trend(0.960, 0.958) == "flat"


def test_the_ordering_steps_from_best_to_worst_with_paired_intervals():
    S = _study_module()
    tokens = [512] * 40
    rng = __import__("random").Random(0)
    base = [rng.uniform(1400, 1800) for _ in tokens]

    def cell(shift, jitter):
        nll = [b + shift + rng.uniform(-jitter, jitter) for b in base]
        return {"ppl": math.exp(sum(nll) / sum(tokens)), "chunk_nll": nll, "chunk_tokens": tokens}

    # KD clearly below CE; SquareHead within noise of CE.
    cells = {"ft-ce-70": cell(0.0, 1.0), "ft-kd-70": cell(-50.0, 1.0), "ft-squarehead-70": cell(0.2, 5.0)}
    order = S.ordering(cells, 0.7)
    first, rest = order.split(" < ", 1)
    assert first.startswith("CE + KD ") and re.fullmatch(
        r"CE \d.* ~ CE \+ SquareHead .*|CE \+ SquareHead .* ~ CE .*", rest
    )
    assert S.ordering({"ft-ce-70": cells["ft-ce-70"]}, 0.7) is None
    # An end that three decimals would round to 1.000 gets a fourth.
    assert S._ratio(0.9952, 0.9911, 0.99996) == "0.9952 [0.9911, 1.0000]"
    assert S._ratio(0.898, 0.890, 0.905) == "0.898 [0.890, 0.905]"
    goals = "\n".join(S.goal_lines(cells, {}, 10.0))
    assert "The ordering of CE, KD and SquareHead with its interval, at every sparsity: pending" in goals
    assert "70%: 3 of 4 recipes finished" in goals
