"""What a run shows while it trains, end to end: TensorBoard logs, the growing validation gallery (checked
against diffusers sampling the exported adapter, and in Chromium), training unchanged by it, and a sweep."""

import json
import re

import numpy as np
import pytest
from safetensors.torch import load_file

from tests.helpers import broken, gallery_cell, images, make_photos, run_tuner, sample_like_the_gallery, serve

pytestmark = pytest.mark.e2e  # runs `python -m tuner` in processes: `pytest -m e2e`

PROMPT = "a photo of sks ball"


def train_args(photos, out, *extra):
    return [
        "recipe=dreambooth_lora",
        "data.resolution=16",
        f"data.instance_dir={photos}",
        f"data.instance_prompt={PROMPT}",
        "prior.enabled=false",
        "stages=[base,prepare,train,export]",
        "export.formats=[diffusers]",
        "train.max_steps=4",
        "train.batch_size=2",
        "train.log_every=2",
        "train.learning_rate=1e-2",  # large, so that 4 steps visibly change the samples
        f"output_dir={out}",
        *extra,
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_pipeline_dir):
    """The same training twice: with validation every 2 steps, and without any."""
    tmp = tmp_path_factory.mktemp("observe")
    photos = make_photos(tmp / "photos")
    done = {}
    for name, extra in {
        "validated": ["validation.every=2", "validation.seeds=[0,1]", "validation.steps=2"],
        "plain": ["log.tensorboard=false", "validation.every=0"],
    }.items():
        out = tmp / name
        result = run_tuner(*train_args(photos, out, f"model.path={tiny_pipeline_dir}", *extra), home=tmp, cwd=tmp)
        assert result.returncode == 0, result.stderr[-3000:]
        done[name] = out
    return done


def test_validation_rows_are_the_adapter_of_each_step(runs, tiny_pipeline_dir):
    from diffusers import StableDiffusionPipeline

    folder = runs["validated"] / "validation"
    record = json.loads((folder / "steps.json").read_text())
    assert [s["step"] for s in record["steps"]] == [0, 2, 4]  # the untrained model, then every 2 steps
    assert record["prompts"] == [PROMPT] and record["seeds"] == [0, 1]
    for step in (0, 2, 4):
        assert (folder / f"step_{step:06d}.png").is_file()
    # the last row is what diffusers draws with the exported adapter; the first, with the base alone
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    base = sample_like_the_gallery(pipe, PROMPT, seed=1, steps=2)
    assert np.abs(gallery_cell(folder / "cells" / "step_000000_p0_s1.png") - base).max() < 2 / 255 + 1e-6
    pipe.load_lora_weights(runs["validated"] / "diffusers")
    tuned = sample_like_the_gallery(pipe, PROMPT, seed=1, steps=2)
    assert np.abs(gallery_cell(folder / "cells" / "step_000004_p0_s1.png") - tuned).max() < 2 / 255 + 1e-6
    assert np.abs(tuned - base).max() > 2 / 255  # the adapter changed what is drawn


def test_validation_does_not_change_training(runs):
    validated = load_file(runs["validated"] / "diffusers" / "pytorch_lora_weights.safetensors")
    plain = load_file(runs["plain"] / "diffusers" / "pytorch_lora_weights.safetensors")
    assert validated.keys() == plain.keys()
    assert all((validated[k] == plain[k]).all() for k in plain)
    assert not (runs["plain"] / "validation").exists() and not (runs["plain"] / "logs").exists()


def test_tensorboard_logs(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(runs["validated"] / "logs" / "train"), size_guidance={"images": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/samples_per_s"):
        assert tag in scalars, scalars
        assert [e.step for e in events.Scalars(tag)] == [2, 4]
    summary = json.loads((runs["validated"] / "summary.json").read_text())
    assert events.Scalars("train/loss")[-1].value == pytest.approx(summary["metrics"]["train_loss"]["last"], abs=1e-5)
    assert all(e.value == pytest.approx(1e-2) for e in events.Scalars("train/lr"))
    assert all(e.value > 0 for e in events.Scalars("train/samples_per_s") + events.Scalars("train/grad_norm"))
    assert [e.step for e in events.Images("validation")] == [0, 2, 4]
    assert set(summary["metrics"]["step_phases"]) >= {"data", "forward", "backward", "optimizer"}


def test_validation_page_loads_in_chromium(runs, browser):
    with serve(runs["validated"]) as base:
        found, _ = images(browser, f"{base}/validation/index.html")
    assert len(found) == 3 * 2 and broken(found) == []


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_pipeline_dir):
    """`python -m tuner -m ... adapter.rank=2,4`: two runs of 2 steps and the page comparing them."""
    tmp = tmp_path_factory.mktemp("sweep")
    photos = make_photos(tmp / "photos")
    sweep = tmp / "sweep"
    args = train_args(photos, sweep, f"model.path={tiny_pipeline_dir}", "validation.seeds=[0]", "validation.steps=2")
    result = run_tuner("-m", *[a for a in args if not a.startswith("train.max_steps")], "train.max_steps=2",
                       "adapter.rank=2,4", home=tmp, cwd=tmp)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep


def test_multirun_sweep_writes_a_comparison_page(sweep):
    record = json.loads((sweep / "multirun.json").read_text())
    assert [r["label"] for r in record] == ["adapter.rank=2", "adapter.rank=4"]
    for i, rank in enumerate((2, 4)):  # each run is its own, with its own rank
        lora = load_file(sweep / str(i) / "diffusers" / "pytorch_lora_weights.safetensors")
        assert {t.shape[0] for k, t in lora.items() if "lora_A" in k} == {rank}
        steps = json.loads((sweep / str(i) / "validation" / "steps.json").read_text())["steps"]
        assert [s["step"] for s in steps] == [0, 2]  # a sweep samples each run's start and end by default
    page = (sweep / "index.html").read_text()
    assert "adapter.rank=2" in page and "adapter.rank=4" in page
    for src in re.findall(r'src="([^"]+)"', page):  # every image the page shows is there
        assert (sweep / src).is_file(), src


def test_the_sweep_page_loads_in_chromium(sweep, browser):
    with serve(sweep) as base:
        found, _ = images(browser, f"{base}/index.html")
    assert len(found) == 2 and broken(found) == []


def test_logging_settings_are_checked_before_anything_loads(tmp_path, tiny_pipeline_dir):
    import importlib.util

    from tuner.checks import validate
    from tuner.compose import compose
    from tuner.errors import ConfigError

    common = [f"model.path={tiny_pipeline_dir}", f"data.instance_dir={tmp_path}", f"data.instance_prompt={PROMPT}"]
    common.append("prior.enabled=false")
    with pytest.raises(ConfigError, match="validation.every"):
        validate(compose("dreambooth_lora", [*common, "validation.every=-1"]))
    with pytest.raises(ConfigError, match="validation.seeds"):
        validate(compose("dreambooth_lora", [*common, "validation.seeds=[]"]))
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ConfigError, match="pip install wandb"):
            validate(compose("dreambooth_lora", [*common, "log.wandb=true"]))
    validate(compose("dreambooth_lora", [*common, "validation.every=10"]))  # a good config passes
