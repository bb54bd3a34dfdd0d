"""The accuracy study's driver end to end on a tiny local model: every cell (teacher, one-shot pruners, the four
fine-tuning recipes at both sparsities, GPTQ INT8/INT4 exports read back by the runtime, speed), the report, the
resume from finished cells, and the guard against resuming a study of another model."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

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
