"""End to end: `python -m tuner recipe=quickstart` at a small setting (tiny base, few steps), as a
user runs it, then the artefacts are checked and the exported adapter is reloaded through diffusers."""

import json

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from tests.helpers import SMALL, gallery_cell, run_tuner, sample_like_the_gallery

pytestmark = pytest.mark.e2e  # runs `python -m tuner` in processes: `pytest -m e2e`


def test_run_folder_holds_every_artefact(quickstart):
    root, result = quickstart
    run = root / "run"
    for name in (
        "config.yaml",
        "summary.json",
        "metrics.json",
        "diffusers/pytorch_lora_weights.safetensors",
        "kohya/run.safetensors",
        "README.md",
        "gallery/grid.png",
        "gallery/index.html",
        "data/instance/report.json",
        "data/class/report.json",
    ):
        assert (run / name).is_file(), name
    assert len(list((run / "instance_images").glob("*.png"))) == 5
    assert len(list((run / "class_images").glob("*/*.png"))) == 8
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["metrics"]) >= {"subject_fidelity", "class_preservation", "train_loss"}
    metrics = json.loads((run / "metrics.json").read_text())
    assert {k: summary["metrics"][k] for k in metrics} == metrics
    assert "subject_fidelity" in result.stdout  # the summary is printed
    validation = summary["metrics"]["validation"]  # the digits base's judge at each validation step: 0 and the last
    assert set(validation["subject_fidelity"]) == {"0", "30"} and validation["drift"]["0"] == 0.0
    assert {"score", "fidelity", "class_preservation"} <= set(validation)
    assert "val/subject_fidelity" not in result.stdout and "validation step 30: subject_fidelity" in result.stdout
    # the base is cached in TUNER_HOME, not in the run folder
    assert list((root / "home" / "bases").glob("digits-*/model_index.json"))
    grid = Image.open(run / "gallery" / "grid.png")
    assert grid.height >= 4 * 64 and grid.width >= 3 * 64  # 4 rows (base/tuned x 2 prompts), 3 seeds, 64 px cells
    assert len(list((run / "gallery" / "cells").glob("*.png"))) == 4 * 3


def test_adapter_holds_only_lora_keys_with_its_config(quickstart):
    root, _ = quickstart
    path = root / "run" / "diffusers" / "pytorch_lora_weights.safetensors"
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert keys and all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    assert meta["unet.r"] == 8 and meta["unet.lora_alpha"] == 8


def test_second_run_reuses_the_cached_base(quickstart):
    root, _ = quickstart
    again = run_tuner(
        "recipe=quickstart",
        f"output_dir={root / 'run2'}",
        *SMALL,
        "train.max_steps=2",
        "stages=[base]",
        home=root / "home",
        cwd=root,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert "cached at" in again.stdout
    assert len(list((root / "home" / "bases").iterdir())) == 1


def test_exported_adapter_reloads_in_diffusers_and_reproduces_the_gallery(quickstart):
    from diffusers import StableDiffusionPipeline

    root, _ = quickstart
    base = next((root / "home" / "bases").glob("digits-*"))
    pipe = StableDiffusionPipeline.from_pretrained(base, use_safetensors=True)
    prompt = "a photo of sks digit seven"
    before = sample_like_the_gallery(pipe, prompt, seed=1, steps=10)
    pipe.load_lora_weights(root / "run" / "diffusers")
    after = sample_like_the_gallery(pipe, prompt, seed=1, steps=10)
    assert np.abs(after - before).max() > 0.01  # the adapter changes the image (same seed: 0 otherwise)
    # and it is the same image the in-memory trained model drew into the gallery (row 1, seed 1)
    drawn = gallery_cell(root / "run" / "gallery" / "cells" / "row1_seed1.png")
    assert np.abs(drawn - after).max() < 2 / 255 + 1e-6


def test_evaluate_recipe_scores_the_exported_adapter_like_the_run_did(quickstart):
    root, _ = quickstart
    run = root / "run"
    result = run_tuner(
        "recipe=evaluate",
        f"checkpoint={run}",  # a run folder: its diffusers/ export
        f"data.instance_dir={run / 'instance_images'}",
        f"output_dir={root / 'eval'}",
        *SMALL,
        home=root / "home",
        cwd=root,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reloaded = json.loads((root / "eval" / "metrics.json").read_text())
    in_memory = json.loads((run / "metrics.json").read_text())
    assert set(reloaded) == set(in_memory)
    for key, value in in_memory.items():
        assert abs(reloaded[key] - value) <= 1 / 8 + 1e-9, key  # at most one of 8 samples differs
    assert (root / "eval" / "gallery" / "grid.png").is_file()
