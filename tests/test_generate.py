"""recipe=generate against diffusers itself: the same adapters at the same weights (set_adapters), the same
scheduler, prompt options, image-to-image and post-processing give the same pixels."""

import json

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from PIL import Image

from tests.helpers import PROMPT, train_in_process
from tuner.checks import validate
from tuner.compose import compose
from tuner.errors import ConfigError
from tuner.models import family_names, get_family
from tuner.runner import run_recipe

SIZE = 16


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory, tiny_pipeline_dir):
    """Two LoRAs on the tiny pipeline: one with its text encoder, alpha 1 != rank 4; one U-Net only."""
    tmp = tmp_path_factory.mktemp("adapters")
    a = train_in_process(
        tmp, tiny_pipeline_dir, "adapter.rank=4", "adapter.alpha=1", "text_encoder.train=lora", name="a"
    )
    b = train_in_process(
        tmp, tiny_pipeline_dir, "seed=5", "train.learning_rate=3e-2", "export.formats=[kohya]", name="b"
    )
    return a.dir, b.dir / "kohya" / "b.safetensors"


def generate(tmp_path, tiny, *overrides, name="gen"):
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    cfg = compose(
        "generate",
        [
            f"model.path={tiny}",
            f"data.resolution={SIZE}",
            "generate.steps=3",
            "generate.guidance_scale=3.0",
            f"output_dir={tmp_path / name}",
            *overrides,
        ],
    )
    validate(cfg)
    run_recipe(cfg)
    folder = tmp_path / name / "images"
    return folder, [json.loads(line) for line in (folder / "images.jsonl").read_text().splitlines()]


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")) / 255.0


def reference(pipe, prompt, seed, scheduler=None, **call):
    """What diffusers draws with these settings (one generator per image, as tuner seeds them); ``scheduler``: a
    diffusers class set on the pipeline, None: the one it loaded from its folder (what tuner draws with when no
    sampler is named)."""
    import diffusers

    if scheduler is not None:
        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    call = {"num_inference_steps": 3, "guidance_scale": 3.0, **call}
    if "image" not in call:
        call = {"height": SIZE, "width": SIZE, **call}
    generator = [torch.Generator().manual_seed(seed)]
    return pipe(prompt, generator=generator, output_type="np", **call).images[0]


def close(got, expected):
    assert np.abs(got - expected).max() <= 1 / 255 + 1e-6  # PNG rounding only


def test_two_adapters_at_their_weights_equal_diffusers_set_adapters(two_adapters, tiny_pipeline_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    run_a, file_b = two_adapters
    folder, entries = generate(
        tmp_path,
        tiny_pipeline_dir,
        f"generate.adapters=[{{path:{run_a},weight:1.0}},{{path:{file_b},weight:0.5}}]",
        f"generate.prompts=['{PROMPT}']",
        "generate.scheduler=euler_a",
        "generate.images_per_prompt=2",
        "generate.seed=11",
    )
    assert [e["seed"] for e in entries] == [11, 12]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    pipe.load_lora_weights(run_a / "diffusers", adapter_name="a")
    pipe.load_lora_weights(file_b.parent, weight_name=file_b.name, adapter_name="b")
    pipe.set_adapters(["a", "b"], [1.0, 0.5])
    for entry in entries:
        expected = reference(pipe, PROMPT, entry["seed"], "EulerAncestralDiscreteScheduler")
        close(pixels(folder / entry["file"]), expected)
    pipe.set_adapters(["a", "b"], [1.0, 1.0])  # the weight matters: at 1.0 the image is another
    other = reference(pipe, PROMPT, entries[0]["seed"], "EulerAncestralDiscreteScheduler")
    assert np.abs(pixels(folder / entries[0]["file"]) - other).max() > 2 / 255
    page = (folder / "index.html").read_text()
    assert all(e["file"] in page for e in entries) and "b.safetensors x 0.5" in page


def test_prompt_file_options_are_honoured(tiny_pipeline_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        f"{PROMPT} --n blurry, dark --w 24 --h 16 --d 7 --l 5.5 --s 2 --ss dpm++\n"
        "# a comment line\n\n"
        "a photo of a ball --d 3\n"
        "a red ball\n"
    )
    folder, entries = generate(tmp_path, tiny_pipeline_dir, f"generate.prompt_file={prompts}", "generate.seed=100")
    assert [(e["prompt"], e["seed"]) for e in entries] == [(PROMPT, 7), ("a photo of a ball", 3), ("a red ball", 100)]
    first = entries[0]
    assert (
        first["negative"],
        first["width"],
        first["height"],
        first["guidance"],
        first["steps"],
        first["scheduler"],
    ) == (
        "blurry, dark",
        24,
        16,
        5.5,
        2,
        "dpm++",
    )
    image = Image.open(folder / first["file"])
    assert image.size == (24, 16) and "Seed: 7" in image.text["parameters"]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    expected = reference(
        pipe,
        PROMPT,
        7,
        "DPMSolverMultistepScheduler",
        negative_prompt="blurry, dark",
        width=24,
        height=16,
        guidance_scale=5.5,
        num_inference_steps=2,
    )
    close(pixels(folder / first["file"]), expected)
    assert [e["scheduler_from"] for e in entries] == ["--ss", "base", "base"]
    assert entries[1]["scheduler"] == "ddpm"  # no sampler named: the folder's own (the tiny pipeline saves DDPM)
    own = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    close(pixels(folder / entries[1]["file"]), reference(own, "a photo of a ball", 3))

    for line, message in [
        ("--x 3", r"prompts\.txt:1: unknown option --x"),
        ("--d abc", r"prompts\.txt:1: invalid"),
        ("--w 0", r"prompts\.txt:1: width and height"),
    ]:
        prompts.write_text(f"{PROMPT} {line}\n")
        with pytest.raises(ConfigError, match=message):
            generate(tmp_path, tiny_pipeline_dir, f"generate.prompt_file={prompts}", name="bad")


def test_image_to_image_strength_and_post_processing(tiny_pipeline_dir, tmp_path):
    from diffusers import StableDiffusionImg2ImgPipeline

    from tests.helpers import make_photos

    photo = make_photos(tmp_path / "photos", n=1) / "photo_0.png"
    before = photo.read_bytes()
    common = [f"generate.init_image={photo}", f"generate.prompts=['{PROMPT}']", "generate.strength=0.6"]
    folder, entries = generate(tmp_path, tiny_pipeline_dir, *common)
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(tiny_pipeline_dir)
    init = Image.open(photo).convert("RGB").resize((SIZE, SIZE), Image.Resampling.LANCZOS)
    expected = reference(pipe, PROMPT, 0, image=init, strength=0.6)
    close(pixels(folder / entries[0]["file"]), expected)
    assert photo.read_bytes() == before  # the user's image is never modified

    post = ["generate.post.upscale=2", "generate.post.color_correct=true", "generate.post.sharpen=0.5"]
    folder, entries = generate(tmp_path, tiny_pipeline_dir, *common, *post, name="post")
    image = np.asarray(Image.open(folder / entries[0]["file"]).convert("RGB"), dtype=np.float32)
    assert image.shape == (2 * SIZE, 2 * SIZE, 3)
    target = np.asarray(init.resize((2 * SIZE, 2 * SIZE), Image.Resampling.LANCZOS), dtype=np.float32)
    # colour correction matched each channel's mean to the init image (sharpening keeps means)
    np.testing.assert_allclose(image.mean((0, 1)), target.mean((0, 1)), atol=4)
    plain = np.asarray(Image.fromarray((expected * 255).round().astype(np.uint8)), dtype=np.float32)
    assert np.abs(plain.mean((0, 1)) - target.mean((0, 1))).max() > 4  # and that was a change


def test_bad_generate_settings_are_refused_by_name(tiny_pipeline_dir, tmp_path):
    for override, key in [
        ("generate.scheduler=heun9", "generate.scheduler"),
        ("generate.prompts=[]", "generate.prompts"),
        ("generate.strength=1.5", "generate.strength"),
        ("generate.post.color_correct=true", "generate.init_image"),
        (f"generate.adapters=[{{path:{tmp_path / 'nope'},weight:1}}]", r"generate.adapters\[0\].path"),
    ]:
        with pytest.raises(ConfigError, match=key):
            validate(compose("generate", [f"model.path={tiny_pipeline_dir}", "generate.prompts=[a ball]", override]))


# a U-Net family and a flow family, the first of each in the registry
ONE_OF_EACH_KIND = list({get_family(name).FLOW: name for name in reversed(family_names())}.values())


@pytest.mark.parametrize("family", ONE_OF_EACH_KIND)
def test_previews_every_n_steps_end_at_the_image_and_a_user_callback_sees_every_step(tmp_path, family):
    from tuner.generation import user_callback
    from tuner.models.tiny import make_tiny_pipeline

    folder = make_tiny_pipeline(tmp_path / "pipe", family=family)
    hook = tmp_path / "record.py"  # a user's callback file, named on the command line
    hook.write_text("SEEN = []\n\n\ndef record_step(pipe, step, timestep, kwargs):\n    SEEN.append(int(step))\n")
    images, entries = generate(
        tmp_path, folder, f"model={family}", "data.resolution=32", "generate.prompts=[a photo of a dog]",
        "generate.images_per_prompt=2", "generate.steps=4", "generate.preview_every=2",
        f"generate.callback={hook}:record_step",
        *get_family(family).TINY_OPTIONS,
    )  # fmt: skip
    seen = user_callback(f"{hook}:record_step").__globals__["SEEN"]  # the file ran once: the check's is the run's
    assert seen == [0, 1, 2, 3]  # every step of the one pipeline call that drew both images
    for entry in entries:
        previews = sorted((images / "previews" / entry["file"].removesuffix(".png")).glob("*.png"))
        assert [p.name for p in previews] == ["step-002.png", "step-004.png"]
        final = pixels(images / entry["file"])
        assert np.abs(pixels(previews[-1]) - final).max() <= 1 / 255 + 1e-6  # the last preview is the image
        assert np.abs(pixels(previews[0]) - final).max() > 0.01  # the halfway one is not yet


def test_a_callback_that_is_not_there_is_refused_before_loading(tiny_pipeline_dir, tmp_path):
    cfg = compose(
        "generate",
        [f"model.path={tiny_pipeline_dir}", "generate.prompts=[x]", "generate.callback=json.no_such_function"],
    )
    with pytest.raises(ConfigError, match="generate.callback=json.no_such_function: no function no_such_function"):
        validate(cfg)
