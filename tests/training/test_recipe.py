"""Recipes: validation errors, every stage through the CLI on a tiny model, staged gradual pruning of a tiny T5,
and fine-tuning under torchrun (DDP and FSDP, 2 CPU processes, gloo)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
tiny_models = pytest.importorskip("tiny_models")
yaml = pytest.importorskip("yaml")
import sparseinfer  # noqa: E402
from sparseinfer.training import recipe as R  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    tiny_models.build("llama", root / "model", scale=1.0, hidden_size=64, intermediate_size=128, eos_token_id=None)
    for split, n in (("train", 12), ("eval", 3)):
        (root / split).mkdir()
        (root / split / "a.txt").write_text(tiny_models.CORPUS * n)
    return root


def recipe(root, **over):
    r = {
        "model": str(root / "model"),
        "work_dir": str(root / "work"),
        "data": {"train": str(root / "train"), "eval": str(root / "eval"), "seq_len": 32, "calibration_samples": 4},
        "prune": {"method": "sparsegpt", "sparsity": 0.6},
        "finetune": {"steps": 3, "lr": 1e-4, "batch_size": 2, "w_ce": 1.0, "w_sq": 1.0, "warmup_steps": 1},
        "quantize": {"bits": 8, "method": "gptq"},
        "export": {"out_dir": str(root / "export")},
    }
    r.update(over)
    return r


def cli(*args, timeout=600, launcher=None):
    cmd = (launcher or [sys.executable, "-m"]) + ["sparseinfer", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"prune": {"method": "random"}}, "prune.method"),
        ({"prune": {"sparsity": 1.5}}, "sparsity"),
        ({"finetune": {"stepz": 3}}, "unknown"),
        ({"quantize": {"bits": 3}}, "bits"),
        ({"frobnicate": 1}, "unknown recipe sections"),
        ({"data": {"seq_len": 32}}, "data.train"),
    ],
)
def test_validation(setup, bad, match):
    with pytest.raises(R.RecipeError, match=match):
        R.validate(recipe(setup, **bad))
    with pytest.raises(R.RecipeError, match="model"):
        R.validate({"data": {}})


def test_every_stage_through_the_cli(setup):
    path = setup / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(setup)))
    for stage in ("prune", "finetune", "quantize"):
        r = cli(stage, str(path))
        assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads((setup / "work" / "metrics.json").read_text())
    assert abs(metrics["prune"]["sparsity"] - 0.6) < 0.02
    assert metrics["finetune"]["steps"] == 3 and metrics["finetune"]["final"]["sq"] > 0
    model = sparseinfer.load(setup / "export")
    info = model.info()
    assert info["format"] == "sparse-int8"
    assert max(layer["density"] for layer in info["linear"]) <= 0.41
    assert isinstance(model.generate("Once upon a time", max_new_tokens=8), str)
    exported = json.loads((setup / "export" / "sparseinfer.json").read_text())
    assert exported["recipe"]["prune"]["sparsity"] == 0.6 and exported["quantization"]["bits"] == 8
    # --dense: the same model without sparse-bitmask compression, for stacks that cannot read sparsity.
    r = cli("export", str(path), "--dense")
    assert r.returncode == 0, r.stderr[-2000:]
    config = json.loads((setup / "export" / "config.json").read_text())
    assert "sparsity_config" not in config.get("quantization_config", {})
    dense = sparseinfer.load(setup / "export")
    assert max(layer["density"] for layer in dense.info()["linear"]) <= 0.41  # the zeros are still zeros


def test_bad_recipe_is_a_one_line_error(setup):
    path = setup / "bad.yaml"
    path.write_text("model: x\nprune: {method: nope}\n")
    r = cli("prune", str(path))
    assert r.returncode == 2 and "prune.method" in r.stderr and "Traceback" not in r.stderr


def test_a_stage_whose_earlier_stage_has_not_run_refuses(setup, tmp_path):
    # A pruned recipe's export, quantize or finetune on a fresh work_dir must not fall back to the dense source.
    path = tmp_path / "recipe.yaml"
    r = recipe(setup, work_dir=str(tmp_path / "work"), export={"out_dir": str(tmp_path / "export")})
    path.write_text(yaml.safe_dump(r))
    for stage, missing in (("export", "finetune"), ("quantize", "finetune"), ("finetune", "prune")):
        out = cli(stage, str(path))
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
        assert f"has a {missing} stage" in out.stderr and f"sparseinfer {missing} RECIPE" in out.stderr
    assert not (tmp_path / "export").exists()


def test_finetune_under_torchrun_ddp(setup, tmp_path):
    r = recipe(setup, work_dir=str(tmp_path / "ddp"))
    r["finetune"]["steps"] = 2
    del r["prune"], r["quantize"]
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(r))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533", "-m"]
    out = cli("finetune", str(path), launcher=launcher, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["finetune"]["world_size"] == 2 and metrics["finetune"]["steps"] == 2
    assert (tmp_path / "ddp" / "finetuned" / "config.json").is_file()


def test_gradual_stages_on_t5_from_a_recipe(tmp_path):
    from sparseinfer.training import run as runner

    tiny_models.build("t5", tmp_path / "t5", scale=1.0)
    words = tiny_models.CORPUS.split()
    lines = [
        json.dumps({"prompt": " ".join(words[i : i + 8]), "answer": " ".join(words[i : i + 3])}) for i in range(24)
    ]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines))
    r = {
        "model": str(tmp_path / "t5"),
        "work_dir": str(tmp_path / "work"),
        "data": {"train": str(tmp_path / "pairs.jsonl"), "eval": str(tmp_path / "pairs.jsonl"), "seq_len": 16},
        "prune": {"method": "wanda", "stages": [0.5, 0.75], "steps_per_stage": 2, "allocation": "owl"},
        "finetune": {"steps": 2, "lr": 1e-3, "batch_size": 4, "w_ce": 1.0, "w_sq": 1.0, "warmup_steps": 1},
    }
    metrics = runner.run(R.validate(r), stages=("prune", "finetune"))
    stages = metrics["prune"]["stages"]
    assert [s["sparsity"] for s in stages] == [0.5, 0.75]
    # OWL gives each block its own sparsity; Wanda rounds each row's count down (rows of 64 or 128 inputs).
    assert all(abs(s["achieved"] - s["sparsity"]) < 1 / 64 and s["ppl"] > 1 and s["finetune"]["sq"] > 0 for s in stages)
    assert abs(metrics["prune"]["sparsity"] - 0.75) < 1 / 64
    assert metrics["finetune"]["sparsity"] == metrics["prune"]["sparsity"]
    assert (tmp_path / "work" / "gradual-ckpt" / "stage-1").is_dir()
    for bad, match in (
        ({"stages": [0.5, 0.4]}, "increasing"),
        ({"stages": [0.5], "sparsity": 0.5}, "not both"),
        ({"steps_per_stage": 3}, "needs prune.stages"),
        ({"allocation": "lumpy"}, "allocation"),
    ):
        with pytest.raises(R.RecipeError, match=match):
            R.validate({**r, "prune": bad})


def test_finetune_under_torchrun_fsdp_keeps_masks_and_matches_ddp(setup, tmp_path):
    import math

    import transformers as tf

    from sparseinfer.training import masks_from_zeros, prunable_linears, prune

    pruned = tf.AutoModelForCausalLM.from_pretrained(setup / "model")
    masks = prune(pruned, "magnitude", 0.6)
    weights = {}
    for parallel in ("fsdp", "ddp"):
        work = tmp_path / parallel
        pruned.save_pretrained(work / "pruned")  # the finetune stage starts from work_dir/pruned
        r = recipe(setup, work_dir=str(work))
        r["finetune"].update(steps=2, parallel=parallel, w_kd=1.0)
        del r["prune"], r["quantize"]
        path = tmp_path / f"{parallel}.yaml"
        path.write_text(yaml.safe_dump(r))
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29534"]
        out = cli("finetune", str(path), launcher=launcher + ["-m"], timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        metrics = json.loads((work / "metrics.json").read_text())["finetune"]
        assert metrics["world_size"] == 2 and metrics["steps"] == 2
        assert all(math.isfinite(metrics["final"][k]) and metrics["final"][k] > 0 for k in ("ce", "kd", "sq"))
        model = tf.AutoModelForCausalLM.from_pretrained(work / "finetuned")
        kept = masks_from_zeros(model, prunable_linears(model))
        for name, keep in masks.items():
            assert torch.equal(kept[name], keep), f"{parallel}: {name} mask changed"
        weights[parallel] = model.state_dict()
        state = torch.load(work / "finetune-ckpt" / "checkpoint.pt", weights_only=False)
        assert state["format"] == ("fsdp-full" if parallel == "fsdp" else "plain") and state["step"] == 2
    # The same gradient-averaged AdamW steps, sharded or not.
    for k, v in weights["ddp"].items():
        torch.testing.assert_close(weights["fsdp"][k], v, rtol=0, atol=1e-5, msg=k)


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[2] / "training" / "recipes").glob("*.yaml")))
def test_shipped_recipes_validate(path):
    R.load(path)
