"""recipe=generate on every family with every sampler it offers, against the family's own diffusers pipeline
with the same scheduler, seed and steps (built here the way diffusers' documentation builds it)."""

import json

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from PIL import Image

from tests.helpers import PROMPT, reference_call
from tuner.checks import validate
from tuner.compose import compose
from tuner.errors import ConfigError
from tuner.models import family_names, get_family
from tuner.runner import run_recipe

SIZE = 32
STEPS = {"pndm": 4}  # its warm-up takes 4 (tuner refuses fewer); the others 3
# what each kind of family offers (its DEFAULT_SCHEDULER first): pinned here, so a change to the offer is a visible
# change; a family leaves out those its pipeline cannot drive (NO_SCHEDULERS: Flux's flow_heun)
NOISE_OFFER = ["ddim", "ddpm", "euler", "euler_a", "heun", "dpm++", "dpm++_karras", "unipc", "pndm"]
FLOW_OFFER = ["flow_euler", "flow_heun", "flow_dpm++", "flow_unipc"]
OFFERED = {
    name: [s for s in (FLOW_OFFER if f.FLOW else NOISE_OFFER) if s not in f.NO_SCHEDULERS]
    for name, f in ((name, get_family(name)) for name in family_names())
}
FLOW_SIGMAS = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
# the diffusers scheduler a user sets for each name
REFERENCE = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {}),
    "dpm++_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "flow_euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "flow_heun": ("FlowMatchHeunDiscreteScheduler", {}),
    "flow_dpm++": ("DPMSolverMultistepScheduler", FLOW_SIGMAS),
    "flow_unipc": ("UniPCMultistepScheduler", FLOW_SIGMAS),
}
# the default tier draws each family's first sampler (its DEFAULT_SCHEDULER) and one other (about 6 s), each named;
# -m e2e draws the rest. With none named tuner draws with the base's own scheduler: tests/test_default_sampler.py
QUICK = {("sd3", "flow_heun")}  # beside each family's first: the rest of the matrix is -m e2e
CASES = [
    pytest.param(f, s, marks=() if s == OFFERED[f][0] or (f, s) in QUICK else pytest.mark.e2e)
    for f in OFFERED
    for s in OFFERED[f]
]


def generate(tmp_path, folder, family, *overrides):
    """recipe=generate; a family whose pipeline only edits edits a gray control (as ``reference_call``'s)."""
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
            f"output_dir={tmp_path / 'gen'}",
            *overrides,
        ],
    )
    validate(cfg)
    run_recipe(cfg)
    images = tmp_path / "gen" / "images"
    entry = json.loads((images / "images.jsonl").read_text().splitlines()[0])
    return np.asarray(Image.open(images / entry["file"]).convert("RGB")) / 255.0, entry


def reference(folder, family, scheduler: str, steps: int, **settings) -> np.ndarray:
    """``settings``: more scheduler config (SD2 zero terminal SNR's). The pipeline as the family loads its class from a
    folder (a processor that needs torchvision read without it: Qwen-Image 2.1's), called with the family's guidance
    arguments (``true_cfg_scale`` where the pipeline takes no ``guidance_scale``)."""
    import diffusers

    f = get_family(family)
    pipe = f.load_pipeline(folder)
    cls, extra = REFERENCE[scheduler]
    # the flow schedule's shift: a FlowMatch scheduler's, or the flow sigmas' of a folder saved with UniPC (Wan's)
    shift = pipe.scheduler.config.get("shift") or pipe.scheduler.config.get("flow_shift", 1.0)
    if extra.get("use_flow_sigmas"):
        extra = {**extra, "flow_shift": shift}
    elif cls.startswith("FlowMatch"):
        extra = {**extra, "shift": shift}
    pipe.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler.config, **extra, **settings)
    pipe.set_progress_bar_config(disable=True)
    generator = [torch.Generator().manual_seed(0)]
    call = dict(height=SIZE, width=SIZE, num_inference_steps=steps, generator=generator, **f.guidance_kwargs(3.0))
    call |= reference_call(f, SIZE)
    out = pipe(prompt=PROMPT, output_type="np", **call, **f.call_kwargs())
    images = out.frames[:, 0] if hasattr(out, "frames") else out.images  # a video pipeline's: frame 0 of each clip
    return images[0][..., :3]  # 2.1's is RGBA


@pytest.mark.parametrize("family, scheduler", CASES)
def test_every_sampler_of_every_family_draws_what_its_diffusers_pipeline_draws(tmp_path, tiny, family, scheduler):
    folder = tiny(family)
    steps = STEPS.get(scheduler, 3)
    got, entry = generate(tmp_path, folder, family, f"generate.steps={steps}", f"generate.scheduler={scheduler}")
    assert (entry["scheduler"], entry["scheduler_from"]) == (scheduler, "generate.scheduler")  # and recorded
    expected = reference(folder, family, scheduler, steps)
    assert expected.std() > 0.01
    assert np.abs(got - expected).max() <= 1 / 255 + 1e-5  # PNG rounding only


@pytest.mark.parametrize("family", list(OFFERED))
def test_each_family_offers_its_samplers_and_refuses_the_others_before_loading(tmp_path, family):
    from tuner.generation import schedulers

    assert list(schedulers(get_family(family))) == OFFERED[family]
    wrong = "ddim" if get_family(family).FLOW else "flow_euler"
    cfg = compose(
        "generate",
        [f"model={family}", f"model.path={tmp_path}", "generate.prompts=[x]", f"generate.scheduler={wrong}"],
    )
    with pytest.raises(
        ConfigError, match=f"generate.scheduler={wrong}: model={family} samples with {OFFERED[family][0]}"
    ):
        validate(cfg)


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_sd2_zero_terminal_snr_samples_from_pure_noise_with_trailing_timesteps(tmp_path, tiny, scheduler):
    folder = tiny("sd2")
    zero = ["model.zero_terminal_snr=true", "model.prediction_type=v_prediction", f"generate.scheduler={scheduler}"]
    got, _ = generate(tmp_path, folder, "sd2", "generate.steps=3", *zero)
    settings = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}
    expected = reference(folder, "sd2", scheduler, 3, **settings)
    assert np.abs(got - expected).max() <= 1 / 255 + 1e-5
    plain = reference(folder, "sd2", scheduler, 3, prediction_type="v_prediction")
    assert np.abs(plain - expected).max() > 0.01  # the settings matter: without them another image


def test_a_sampler_given_too_few_steps_is_refused_before_loading(tmp_path):
    cfg = compose(
        "generate",
        [f"model.path={tmp_path}", "generate.prompts=[x]", "generate.scheduler=pndm", "generate.steps=3"],
    )
    with pytest.raises(ConfigError, match="the pndm sampler takes at least 4 steps"):
        validate(cfg)


@pytest.mark.e2e  # the SDXL refiner
def test_sdxl_base_then_refiner_draws_what_diffusers_two_pipelines_draw(tmp_path, tiny):
    """generate.refiner: the base draws the first generate.refiner_start of the steps, the refiner the rest
    (diffusers' own split); no sampler named: both with the base's own scheduler (the tiny refiner saves the base's
    Euler), as diffusers' two pipelines draw without a scheduler set. Half the steps each: Euler's last fifth
    (one step, from a small sigma) changes too little to show the refiner drew it."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    from tuner.models.sdxl import make_tiny_refiner as make_tiny_sdxl_refiner

    base = tiny("sdxl")
    refiner = make_tiny_sdxl_refiner(tmp_path / "refiner", base)
    start = 0.6
    got, entry = generate(
        tmp_path, base, "sdxl", "generate.steps=5", f"generate.refiner={refiner}", f"generate.refiner_start={start}"
    )
    assert entry["refiner"] == "refiner" and entry["refiner_start"] == start

    first = StableDiffusionXLPipeline.from_pretrained(base)
    second = StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner)
    settings = dict(num_inference_steps=5, guidance_scale=3.0)
    for pipe in (first, second):
        pipe.set_progress_bar_config(disable=True)
    latents = first(
        PROMPT, height=SIZE, width=SIZE, denoising_end=start, output_type="latent",
        generator=[torch.Generator().manual_seed(0)], **settings,
    ).images  # fmt: skip
    expected = second(
        PROMPT, image=latents, denoising_start=start, output_type="np", generator=[torch.Generator().manual_seed(0)],
        **settings,
    ).images[0]  # fmt: skip
    assert np.abs(got - expected).max() <= 1 / 255 + 1e-5
    alone, _ = generate(tmp_path / "alone", base, "sdxl", "generate.steps=5")
    assert np.abs(alone - expected).max() > 0.01  # the refiner did something


def test_a_refiner_is_refused_before_loading_where_it_cannot_apply(tmp_path):
    given = [f"model.path={tmp_path}", "generate.prompts=[x]", f"generate.refiner={tmp_path}"]
    with pytest.raises(ConfigError, match="generate.refiner: a refiner follows a base of model=sdxl, not model=sd15"):
        validate(compose("generate", given))
    with pytest.raises(ConfigError, match="not a local SDXL refiner folder"):
        validate(compose("generate", ["model=sdxl", *given]))
    gallery = [
        f"model.path={tmp_path}",
        f"data.instance_dir={tmp_path}",
        "data.instance_prompt=x",
        f"sample.refiner={tmp_path}",
    ]
    with pytest.raises(ConfigError, match="sample.refiner: a refiner follows a base of model=sdxl, not model=sd15"):
        validate(compose("lora", gallery))


@pytest.mark.e2e  # the SDXL refiner
def test_previews_of_a_refined_image_count_on_through_the_refiner(tmp_path, tiny):
    """Base and refiner draw one image: its previews are numbered over both, the last is the image."""
    from tuner.models.sdxl import make_tiny_refiner as make_tiny_sdxl_refiner

    base = tiny("sdxl")
    refiner = make_tiny_sdxl_refiner(tmp_path / "refiner", base)
    got, entry = generate(
        tmp_path, base, "sdxl", "generate.steps=5", f"generate.refiner={refiner}", "generate.preview_every=1"
    )
    previews = sorted((tmp_path / "gen" / "images" / "previews" / entry["file"].removesuffix(".png")).glob("*.png"))
    assert [p.name for p in previews] == [f"step-00{k}.png" for k in range(1, 6)]  # 4 base steps, 1 refiner step
    last = np.asarray(Image.open(previews[-1]).convert("RGB")) / 255.0
    assert np.abs(last - got).max() <= 1 / 255 + 1e-6


@pytest.mark.e2e  # the SDXL refiner
def test_the_gallery_with_a_refiner_draws_what_diffusers_base_lora_and_refiner_draw(tmp_path, tiny):
    """sample.refiner: each gallery image, base and fine-tuned, is the SDXL base's first 80% of the steps and
    the refiner's rest, with the base's own scheduler (Euler); the fine-tuned row as diffusers draws it with the
    exported LoRA."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    from tests.helpers import gallery_cell, train_in_process
    from tuner.models.sdxl import make_tiny_refiner as make_tiny_sdxl_refiner

    base = tiny("sdxl")
    refiner = make_tiny_sdxl_refiner(tmp_path / "refiner", base)
    run = train_in_process(
        tmp_path, base, "model=sdxl", f"sample.refiner={refiner}", "sample.seeds=[0]", "sample.steps=5",
        f"sample.prompts=[{PROMPT}]", "export.formats=[diffusers]", stages="[base,prepare,train,export,gallery]",
    )  # fmt: skip
    first = StableDiffusionXLPipeline.from_pretrained(base)
    second = StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner)
    for pipe in (first, second):
        pipe.set_progress_bar_config(disable=True)

    def drawn():
        settings = dict(num_inference_steps=5, guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
        latents = first(PROMPT, height=16, width=16, denoising_end=0.8, output_type="latent", **settings).images
        settings["generator"] = torch.Generator().manual_seed(0)
        return second(PROMPT, image=latents, denoising_start=0.8, output_type="np", **settings).images[0]

    cells = run.dir / "gallery" / "cells"
    before = drawn()
    assert np.abs(gallery_cell(cells / "row0_seed0.png") - before).max() <= 2 / 255 + 1e-6
    first.load_lora_weights(run.dir / "diffusers")
    after = drawn()
    assert np.abs(gallery_cell(cells / "row1_seed0.png") - after).max() <= 2 / 255 + 1e-6
    assert np.abs(after - before).max() > 0.02  # the fine-tuned row is not the base's
    assert "fine-tuned + refiner" in (run.dir / "gallery" / "index.html").read_text()
