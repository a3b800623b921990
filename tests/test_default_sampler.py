"""With no sampler named, recipe=generate and the galleries draw with the scheduler the base folder saves, as the
family's own diffusers pipeline does (``pipe(prompt)``), where the family's pipeline drives it; otherwise with the
family's DEFAULT_SCHEDULER. A named sampler still overrides, and the log and the summary say which was used."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from PIL import Image

from tests.helpers import PROMPT, reference_call
from tuner.checks import validate
from tuner.compose import compose
from tuner.errors import ConfigError
from tuner.models import family_names, get_family, samplers
from tuner.runner import run_recipe

SIZE, STEPS = 32, 3


def generate(tmp_path, folder, family, *overrides, name="gen"):
    """(the first image in [0, 1], its images.jsonl entry, the run's summary); a family whose pipeline only edits
    edits a gray control (as ``reference_call``'s)."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    if reference_call(get_family(family)):
        Image.new("RGB", (SIZE, SIZE), (128, 128, 128)).save(tmp_path / "gray.png")
        overrides = (*overrides, f"generate.controls=[{tmp_path / 'gray.png'}]")
    cfg = compose(
        "generate",
        [
            f"model={family}",
            f"model.path={folder}",
            f"data.resolution={SIZE}",
            f"generate.prompts=[{PROMPT}]",
            "generate.guidance_scale=3.0",
            f"generate.steps={STEPS}",
            f"output_dir={tmp_path / name}",
            *overrides,
        ],
    )
    validate(cfg)
    run_recipe(cfg)
    images = tmp_path / name / "images"
    entry = json.loads((images / "images.jsonl").read_text().splitlines()[0])
    summary = json.loads((tmp_path / name / "summary.json").read_text())
    return np.asarray(Image.open(images / entry["file"]).convert("RGB")) / 255.0, entry, summary


def own_pipeline(folder, family, scheduler=None) -> np.ndarray:
    """What ``Pipeline.from_pretrained(folder)(prompt)`` draws at seed 0 (``scheduler``: a class set on it first)."""
    import diffusers

    f = get_family(family)
    pipe = f.load_pipeline(folder)  # as the family reads the folder (Qwen-Image 2.1's processor without torchvision)
    if scheduler is not None:
        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    call = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, **f.guidance_kwargs(3.0))
    generator = [torch.Generator().manual_seed(0)]
    call |= reference_call(f, SIZE)
    out = pipe(prompt=PROMPT, output_type="np", generator=generator, **call, **f.call_kwargs())
    image = out.frames[0, 0] if hasattr(out, "frames") else out.images[0]  # a video pipeline's: frame 0 of its clip
    return image[..., :3]  # Qwen-Image 2.1 draws RGBA


def resave(folder, family, scheduler: str, **config):
    """The pipeline folder saved again with another scheduler (its model_index.json and scheduler/ both)."""
    import diffusers

    pipe = get_family(family).load_pipeline(folder)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config, **config)
    pipe.save_pretrained(folder)
    return folder


def close(got, expected):
    assert np.abs(got - expected).max() <= 1 / 255 + 1e-5  # PNG rounding only


# the flow families' tiny folders save FlowMatchEuler, their DEFAULT_SCHEDULER already: -m e2e
CASES = [pytest.param(f, marks=pytest.mark.e2e if get_family(f).FLOW else ()) for f in family_names()]


@pytest.mark.parametrize("family", CASES)
def test_with_no_sampler_named_generate_draws_what_the_folders_own_pipeline_draws(tmp_path, tiny, family, capsys):
    """The tiny folders save their family's own scheduler: SD1.x and SD2 DDPM, SDXL Euler, Flux and SD3 FlowMatch
    Euler. Before, the U-Net families drew with DDIM (0.75 away for SD2, 0.54 for SDXL at these settings)."""
    folder = tiny(family)
    got, entry, summary = generate(tmp_path, folder, family)
    close(got, own_pipeline(folder, family))
    saved = json.loads((folder / "model_index.json").read_text())["scheduler"][1]
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())  # Wan's UniPC: flow sigmas
    offered = samplers.schedulers(get_family(family)).items()
    short = [n for n, (cls, extra) in offered if cls == saved and all(config.get(k) == v for k, v in extra.items())]
    assert (entry["scheduler"], entry["scheduler_from"]) == (short[0], "base")
    assert "the base's own scheduler" in summary["metrics"]["sampler"]
    assert f"[tuner] generate: sampler {short[0]} ({saved}), the base's own scheduler" in capsys.readouterr().out
    fallback = get_family(family).DEFAULT_SCHEDULER
    if fallback != short[0]:  # the family's default draws another image: the choice matters
        other = own_pipeline(folder, family, samplers.schedulers(get_family(family))[fallback][0])
        assert np.abs(other - got).max() > 0.1


def test_a_named_sampler_still_overrides_the_folders_own(tmp_path, tiny):
    folder = tiny("sd2")  # saves DDPM
    got, entry, summary = generate(tmp_path, folder, "sd2", "generate.scheduler=ddim")
    assert (entry["scheduler"], entry["scheduler_from"]) == ("ddim", "generate.scheduler")
    assert summary["metrics"]["sampler"] == "ddim (generate.scheduler)"
    close(got, own_pipeline(folder, "sd2", "DDIMScheduler"))
    assert np.abs(got - own_pipeline(folder, "sd2")).max() > 0.1
    prompts = tmp_path / "prompts.txt"  # a prompt line's --ss too, beside a line that names none
    prompts.write_text(f"{PROMPT} --ss ddim\n{PROMPT}\n")
    _, _, summary = generate(
        tmp_path, folder, "sd2", "generate.prompts=[]", f"generate.prompt_file={prompts}", name="f"
    )
    entries = [json.loads(line) for line in (tmp_path / "f" / "images" / "images.jsonl").read_text().splitlines()]
    assert [(e["scheduler"], e["scheduler_from"]) for e in entries] == [("ddim", "--ss"), ("ddpm", "base")]
    assert summary["metrics"]["sampler"] == "ddim (a prompt line); ddpm (DDPMScheduler), the base's own scheduler"


def test_a_saved_scheduler_tuner_has_no_name_for_draws_by_its_class(tmp_path, tiny):
    """SD2 saved with LMS (one of diffusers' schedulers interchangeable with the SD pipelines' own): drawn with it,
    named by its class, A1111's name in the PNG."""
    import shutil

    folder = resave(shutil.copytree(tiny("sd2"), tmp_path / "base"), "sd2", "LMSDiscreteScheduler")
    got, entry, _ = generate(tmp_path, folder, "sd2")
    assert (entry["scheduler"], entry["scheduler_from"]) == ("LMSDiscreteScheduler", "base")
    close(got, own_pipeline(folder, "sd2"))
    png = Image.open(tmp_path / "gen" / "images" / entry["file"])
    assert "Sampler: LMS," in png.text["parameters"]


def test_sdxl_saved_with_karras_dpm_is_named_dpm_karras_and_drawn_as_saved(tmp_path, tiny):
    import shutil

    base = shutil.copytree(tiny("sdxl"), tmp_path / "base")
    folder = resave(base, "sdxl", "DPMSolverMultistepScheduler", use_karras_sigmas=True)
    got, entry, _ = generate(tmp_path, folder, "sdxl")
    assert (entry["scheduler"], entry["scheduler_from"]) == ("dpm++_karras", "base")
    close(got, own_pipeline(folder, "sdxl"))


def _components(family: str, saved: str | None, **config):
    """What ``samplers.default`` reads of a loaded base: the class its model_index.json names, the run's config."""
    import diffusers

    training = getattr(diffusers, get_family(family).TRAINING_SCHEDULER).from_config(config)  # others' keys kept
    return SimpleNamespace(extra={"scheduler_class": saved}, noise_scheduler=training)


@pytest.mark.parametrize(
    "family, saved, expected",
    [
        ("sd15", "PNDMScheduler", ("pndm", True)),
        ("sd15", "EulerAncestralDiscreteScheduler", ("euler_a", True)),
        ("sd15", "FlowMatchEulerDiscreteScheduler", ("ddim", False)),  # not a noise schedule
        ("sd15", "DPMSolverSDEScheduler", ("ddim", False)),  # diffusers cannot build it without torchsde
        ("sd15", "NoSuchScheduler", ("ddim", False)),
        ("sd15", None, ("ddim", False)),
        ("sd3", "FlowMatchHeunDiscreteScheduler", ("flow_heun", True)),
        ("flux", "FlowMatchHeunDiscreteScheduler", ("flow_euler", False)),  # FluxPipeline cannot drive it
        ("flux", "DDIMScheduler", ("flow_euler", False)),
        ("sd3", "DPMSolverMultistepScheduler", ("flow_euler", False)),  # without flow sigmas: not a flow sampler
    ],
)
def test_the_default_is_the_saved_scheduler_only_where_the_familys_pipeline_drives_it(family, saved, expected):
    if saved == "DPMSolverSDEScheduler":
        try:
            import torchsde  # noqa: F401
        except ImportError:
            pass
        else:
            pytest.skip("torchsde is installed: diffusers builds DPMSolverSDEScheduler")
    got = samplers.default(get_family(family), _components(family, saved))
    assert (got.name, got.from_base) == expected
    if not got.from_base:
        assert "the family's default" in got.describe()


def test_a_base_whose_own_sampler_needs_more_steps_is_refused_naming_it():
    """PNDM without skip_prk_steps takes 4 steps at least; with them skipped (as SD1.5 saves it), any number."""
    from tuner.generation import make_jobs

    family = get_family("sd15")
    strict = samplers.default(family, _components("sd15", "PNDMScheduler"))
    skipping = samplers.default(family, _components("sd15", "PNDMScheduler", skip_prk_steps=True))
    assert (strict.name, strict.fewest_steps, skipping.fewest_steps) == ("pndm", 4, 1)
    g = compose("generate", ["generate.prompts=[x]", "generate.steps=3"]).generate
    with pytest.raises(ConfigError, match=r"the base's own sampler \(pndm\) takes at least 4 steps"):
        make_jobs(g, 16, samplers.schedulers(family), strict)
    assert make_jobs(g, 16, samplers.schedulers(family), skipping)[0].scheduler == "pndm"


def test_the_gallery_draws_with_the_folders_own_scheduler_and_says_so(tmp_path, tiny_pipeline_dir):
    """The base row of the gallery is what the folder's own pipeline draws (the tiny SD1.x saves DDPM)."""
    from diffusers import StableDiffusionPipeline

    from tests.helpers import gallery_cell, train_in_process

    run = train_in_process(
        tmp_path, tiny_pipeline_dir, "sample.seeds=[0]", "sample.steps=3", f"sample.prompts=[{PROMPT}]",
        stages="[base,prepare,train,gallery]",
    )  # fmt: skip
    assert run.metrics["sampler"] == "ddpm (DDPMScheduler), the base's own scheduler"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    own = pipe(PROMPT, height=16, width=16, num_inference_steps=3, guidance_scale=3.0, generator=generator).images[0]
    base_row = gallery_cell(run.dir / "gallery" / "cells" / "row0_seed0.png")
    assert np.abs(base_row - np.asarray(own) / 255.0).max() <= 2 / 255 + 1e-6
