"""The other shipped recipes end to end on tiny models, as a user runs them."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from tests.helpers import SMALL, gallery_cell, make_photos, run_tuner, sample_like_the_gallery

pytestmark = pytest.mark.e2e  # runs `python -m tuner` in processes: `pytest -m e2e`


def test_dreambooth_lora_on_a_user_model_folder(tmp_path, tiny_pipeline_dir):
    from diffusers import StableDiffusionPipeline

    photos = make_photos(tmp_path / "photos")
    result = run_tuner(
        "recipe=dreambooth_lora",
        f"model.path={tiny_pipeline_dir}",
        "data.resolution=16",
        f"data.instance_dir={photos}",
        "data.instance_prompt=a photo of sks ball",
        "data.class_prompt=a photo of a ball",
        "prior.num_class_images=3",
        "train.max_steps=5",
        "train.batch_size=2",
        "train.ema_decay=0.5",  # the averaged adapter must be what the gallery shows and the file holds
        "sample.seeds=[0,1]",
        "sample.steps=3",
        f"output_dir={tmp_path / 'run'}",
        home=tmp_path / "home",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    report = json.loads((run / "data" / "instance" / "report.json").read_text())
    assert sorted(report["kept"]) == ["photo_0.png", "photo_1.png", "photo_2.png"]
    assert (run / "gallery" / "grid.png").is_file()
    assert not (tmp_path / "home" / "bases").exists()  # a user's model: no embedded base was built
    assert list((tmp_path / "home" / "cache").glob("latents-*/*.safetensors"))  # its latents in the shared cache
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    pipe.load_lora_weights(run / "diffusers")
    with safe_open(str(run / "diffusers" / "pytorch_lora_weights.safetensors"), "pt") as f:
        n_tensors = len(list(f.keys()))
    peft_params = [n for n, _ in pipe.unet.named_parameters() if "lora_" in n]
    assert len(peft_params) == n_tensors  # every key in the file was loaded into a LoRA layer
    image = sample_like_the_gallery(pipe, "a photo of sks ball", seed=0, steps=3)
    assert np.abs(gallery_cell(run / "gallery" / "cells" / "row1_seed0.png") - image).max() < 2 / 255 + 1e-6


def test_prepare_recipe_writes_dataset_and_report(tmp_path):
    photos = make_photos(tmp_path / "photos", n=2)
    (photos / "notes.txt").write_text("stray")
    result = run_tuner(
        "recipe=prepare",
        f"data.instance_dir={photos}",
        "data.resolution=32",
        f"output_dir={tmp_path / 'run'}",
        home=tmp_path / "home",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "data" / "instance" / "report.json").read_text())
    assert report["rejected"] == {"caption file without an image": ["notes.txt"]}
    assert "2 kept" in result.stdout and "caption file without an image" in result.stdout


def test_digits_base_recipe_scores_every_digit(tmp_path):
    result = run_tuner(
        "recipe=digits_base",
        *SMALL,
        "eval.samples=3",
        f"output_dir={tmp_path / 'run'}",
        home=tmp_path / "home",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["digit_accuracy"]) == {
        "zero",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
    }
    assert metrics["min_digit_accuracy"] == min(metrics["digit_accuracy"].values())
    base = next((tmp_path / "home" / "bases").glob("digits-*"))
    assert json.loads((base / "tuner_base.json").read_text())["build_seconds"] > 0
    grid = np.asarray(Image.open(tmp_path / "run" / "gallery" / "grid.png"))
    assert grid.shape[0] > 10 * 16  # ten rows, one per digit


def test_lora_recipe_trains_on_captions(tmp_path, tiny_pipeline_dir):
    photos = make_photos(tmp_path / "photos", n=3)
    for i, caption in enumerate(["a red disc", "a red ball", "a red circle"]):
        (photos / f"photo_{i}.txt").write_text(caption)
    result = run_tuner(
        "recipe=lora",
        f"model.path={tiny_pipeline_dir}",
        "data.resolution=16",
        f"data.instance_dir={photos}",
        "sample.prompts=[a red disc,a blue disc]",
        "sample.seeds=[0]",
        "sample.steps=2",
        "train.max_steps=3",
        f"output_dir={tmp_path / 'run'}",
        home=tmp_path / "home",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    assert not (run / "class_images").exists() and not (run / "data" / "class").exists()
    from tuner.data.prepare import load_prepared

    assert sorted(load_prepared(run / "data" / "instance")["caption"]) == ["a red ball", "a red circle", "a red disc"]
    assert len(list((run / "gallery" / "cells").glob("*.png"))) == 4  # 2 prompts x base/fine-tuned x 1 seed
    assert "a blue disc" in (run / "gallery" / "index.html").read_text()
    assert (run / "diffusers" / "pytorch_lora_weights.safetensors").is_file()
    assert (run / "kohya" / "run.safetensors").is_file() and (run / "README.md").is_file()


def test_partial_unet_and_textual_inversion_recipes(tmp_path, tiny_pipeline_dir):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    photos = make_photos(tmp_path / "photos", n=2)
    common = [f"model.path={tiny_pipeline_dir}", "data.resolution=16", f"data.instance_dir={photos}"]
    common += ["train.max_steps=2", "sample.seeds=[0]", "sample.steps=2"]
    partial = run_tuner(
        "recipe=dreambooth_partial_unet",
        *common,
        "data.instance_prompt=a photo of sks ball",
        "data.class_prompt=a photo of a ball",
        "prior.num_class_images=2",
        f"output_dir={tmp_path / 'partial'}",
        home=tmp_path / "home",
        cwd=tmp_path,
    )
    assert partial.returncode == 0, partial.stderr[-3000:]
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "partial" / "merged")
    base = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    changed = {n for n, p in pipe.unet.named_parameters() if not torch.equal(p, dict(base.unet.named_parameters())[n])}
    assert changed and all(n.startswith(("up_blocks", "mid_block")) for n in changed)
    assert any(".attentions." in n and n.startswith("up_blocks") for n in changed)

    inversion = run_tuner(
        "recipe=textual_inversion", *common, f"output_dir={tmp_path / 'ti'}", home=tmp_path / "home", cwd=tmp_path
    )
    assert inversion.returncode == 0, inversion.stderr[-3000:]
    vectors = load_file(tmp_path / "ti" / "diffusers" / "embeddings" / "sks.safetensors")
    assert list(vectors) == ["<sks>"] and vectors["<sks>"].shape == (1, base.text_encoder.config.hidden_size)
    assert (tmp_path / "ti" / "gallery" / "grid.png").is_file()
    assert load_file(tmp_path / "ti" / "kohya" / "embeddings" / "sks.safetensors")["emb_params"].shape == (1, 16)
    assert not (tmp_path / "ti" / "merged").exists()  # every model weight stayed frozen: nothing else to ship
