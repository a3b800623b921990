"""Textual inversion and pivotal tuning on the two-encoder families (SDXL: CLIP-L and CLIP-G; Flux: CLIP-L and
T5): a new token gets a vector in each text encoder, both train, and every file it ships in reloads to the
trained image: diffusers' file through the model card's own lines, the merged folder, and tuner's generate.
The A1111/ComfyUI side (the ``clip_l``/``clip_g`` file in InvokeAI's and ComfyUI's own code) is in
tests/test_clients.py."""

import json
import re

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from PIL import Image
from safetensors.torch import load_file

from tests.helpers import image_of, train_in_process
from tuner.checks import validate
from tuner.compose import compose
from tuner.errors import ConfigError
from tuner.models import family_names, get_family
from tuner.runner import run_recipe

PROMPT = "a photo of <sks>"
SIZE = 32
# the families whose new tokens get a vector in each of several text encoders (pivotal tuning); in the fast tier
# the first whose encoders are of different kinds (a CLIP and a T5: Flux, the stricter case, and a third of SDXL's
# seconds), the others -m e2e
SEVERAL = [name for name in family_names() if len(get_family(name).EMBEDDINGS) > 1]
FAST = next((n for n in SEVERAL if len({k[:4] for k in get_family(n).EMBEDDINGS.values()}) > 1), SEVERAL[0])
CASES = [n if n == FAST else pytest.param(n, marks=pytest.mark.e2e) for n in SEVERAL]


def draw(family, pipe, prompt=PROMPT):
    """The gallery's image for ``prompt`` at seed 0 (3 steps, guidance 3), in [0, 1] (H, W, 3)."""
    from tuner.sampling import sample_images

    image = sample_images(pipe, [prompt], [0], SIZE, 3, 3.0, decode=family.decode, **family.call_kwargs())[0]
    return ((image + 1) / 2).permute(1, 2, 0).numpy()


def card_pipeline(run, folder, monkeypatch):
    """The pipeline the model card's diffusers lines build, run as written from the run folder (the base
    loaded from ``folder``, where the card names it), sampling with the gallery's scheduler."""
    card = (run.dir / "README.md").read_text()
    code = card.split("### diffusers", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    code = re.sub(r'from_pretrained\("[^"]*"\)', f'from_pretrained("{folder}")', code)
    code = "\n".join(line for line in code.splitlines() if not line.startswith("image = "))
    monkeypatch.chdir(run.dir)
    scope = {}
    exec(code, scope)  # noqa: S102 - the card's own lines, written by this run
    pipe = scope["pipe"]
    pipe.scheduler = run.family.sampling_scheduler(run.family.load(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe, code


def generate(tmp_path, folder, name, adapter, *overrides):
    """recipe=generate's image for PROMPT with ``adapter`` (a run or format folder) loaded, in [0, 1]."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    given = [f"model={name}", f"model.path={folder}", f"data.resolution={SIZE}", f"generate.prompts=['{PROMPT}']"]
    given += ["generate.guidance_scale=3.0", "generate.steps=3", f"output_dir={tmp_path / 'gen'}"]
    given += [f"generate.adapters=[{{path:{adapter}}}]", *get_family(name).TINY_OPTIONS, *overrides]
    cfg = compose("generate", given)
    validate(cfg)
    run_recipe(cfg)
    images = tmp_path / "gen" / "images"
    entry = json.loads((images / "images.jsonl").read_text().splitlines()[0])
    return np.asarray(Image.open(images / entry["file"]).convert("RGB")) / 255.0


@pytest.mark.parametrize("name", CASES)
def test_pivotal_tuning_trains_a_vector_per_text_encoder_and_every_file_reloads_to_the_trained_image(
    tmp_path, tiny, name, monkeypatch
):
    folder = tiny(name)
    run = train_in_process(
        tmp_path,
        folder,
        f"model={name}",
        f"data.resolution={SIZE}",
        "embedding.tokens=['<sks>']",
        "embedding.vectors=2",
        f"data.instance_prompt='{PROMPT}'",
        "export.formats=[diffusers,kohya,merged]",
        *get_family(name).TINY_OPTIONS,
    )
    family, base = run.family, get_family(name).load(folder)
    expected = image_of(run, PROMPT)

    diffusers_file = load_file(run.dir / "diffusers" / "embeddings" / "sks.safetensors")
    kohya_file = load_file(run.dir / "kohya" / "embeddings" / "sks.safetensors")
    assert set(diffusers_file) == set(kohya_file) == set(family.EMBEDDINGS.values())  # clip_l + clip_g / t5xxl
    for encoder, key in family.EMBEDDINGS.items():
        rows = base.text_encoders[encoder].get_input_embeddings().weight
        start = rows[: len(base.tokenizer_of(encoder))].mean(0)  # no init word: the vocabulary's mean
        assert diffusers_file[key].shape == (2, rows.shape[1]), key  # two vectors as wide as this encoder's
        assert torch.equal(kohya_file[key], diffusers_file[key])
        assert (diffusers_file[key] - start).abs().max() > 1e-3, f"{key} did not train"

    pipe, code = card_pipeline(run, folder, monkeypatch)
    assert "load_lora_weights" in code and code.count("load_textual_inversion") == 2
    np.testing.assert_allclose(draw(family, pipe), expected, atol=1e-3)
    other = get_family(name).load_pipeline(folder)  # the LoRA alone, token unknown: another image
    other.load_lora_weights(run.dir / "diffusers")
    other.scheduler = pipe.scheduler
    assert np.abs(draw(family, other) - expected).max() > 2e-3

    merged = family.load_pipeline(run.dir / "merged")  # tokenizers with the token, each encoder's rows with it
    merged.scheduler = pipe.scheduler
    merged.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(draw(family, merged), expected, atol=1e-3)
    for encoder in family.EMBEDDINGS:  # a merged T5 keeps its size: the token took one of its spare rows
        assert getattr(merged, encoder).get_input_embeddings().weight.shape[0] >= len(base.tokenizer_of(encoder)) + 2

    got = generate(tmp_path, folder, name, run.dir)  # tuner's own loader, the run folder as the adapter
    assert np.abs(got - expected).max() <= 1 / 255 + 1e-3


def test_sd3_refuses_new_tokens_before_loading_saying_why(tmp_path, tiny):
    cfg = compose("textual_inversion", ["model=sd3", f"model.path={tiny('sd3')}", f"data.instance_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"embedding.tokens: no textual inversion for model=sd3 \(diffusers' "):
        validate(cfg)


@pytest.mark.e2e  # a refiner's runs: -m e2e keeps the default tier under 3 minutes
def test_an_sdxl_embedding_conditions_the_refiner_too(tmp_path, tiny):
    """Textual inversion alone (adapter=none), generated with generate.refiner: the refiner's CLIP-G (the base's)
    reads the token with its clip_g vectors, as diffusers draws it with the file's clip_g loaded into both."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    from tuner.models.sdxl import make_tiny_refiner as make_tiny_sdxl_refiner

    base = tiny("sdxl")
    refiner = make_tiny_sdxl_refiner(tmp_path / "refiner", base)
    run = train_in_process(
        tmp_path, base, "model=sdxl", "adapter=none", "embedding.tokens=['<sks>']", "embedding.learning_rate=0.5",
        f"data.instance_prompt='{PROMPT}'", "export.formats=[kohya]",
    )  # fmt: skip
    got = generate(
        tmp_path,
        base,
        "sdxl",
        run.dir / "kohya",
        "generate.steps=5",
        f"generate.refiner={refiner}",
        "generate.refiner_start=0.4",
    )

    state = load_file(run.dir / "kohya" / "embeddings" / "sks.safetensors")
    first = StableDiffusionXLPipeline.from_pretrained(base)
    second = StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner)
    first.load_textual_inversion(
        state["clip_l"], token="<sks>", text_encoder=first.text_encoder, tokenizer=first.tokenizer
    )
    for pipe in (first, second):
        pipe.load_textual_inversion(
            state["clip_g"], token="<sks>", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
        )
        pipe.set_progress_bar_config(disable=True)

    def drawn(second):
        settings = dict(num_inference_steps=5, guidance_scale=3.0, generator=[torch.Generator().manual_seed(0)])
        latents = first(PROMPT, height=SIZE, width=SIZE, denoising_end=0.4, output_type="latent", **settings).images
        settings["generator"] = [torch.Generator().manual_seed(0)]
        return second(PROMPT, image=latents, denoising_start=0.4, output_type="np", **settings).images[0]

    expected = drawn(second)
    assert np.abs(got - expected).max() <= 1 / 255 + 1e-5
    unaware = StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner)  # a refiner without the token
    unaware.scheduler = second.scheduler
    unaware.set_progress_bar_config(disable=True)
    assert np.abs(drawn(unaware) - expected).max() > 2e-3


@pytest.mark.e2e  # a refiner's runs: -m e2e keeps the default tier under 3 minutes
def test_the_gallerys_base_row_with_a_refiner_reads_the_prompt_without_the_new_token(tmp_path, tiny):
    """sample.refiner after textual inversion: the fine-tuned row's refiner reads the token (its CLIP-G gets the
    clip_g vectors), the base row's does not, each as diffusers draws base + refiner with and without the file."""
    import shutil

    from diffusers import DDIMScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    from tests.helpers import gallery_cell
    from tuner.models.sdxl import make_tiny_refiner as make_tiny_sdxl_refiner

    base = shutil.copytree(tiny("sdxl"), tmp_path / "base")
    refiner = make_tiny_sdxl_refiner(tmp_path / "refiner", base)
    for folder, cls in ((base, StableDiffusionXLPipeline), (refiner, StableDiffusionXLImg2ImgPipeline)):
        # saved with DDIM, whose last steps show what the refiner reads (Euler's, from small sigmas, barely move it)
        pipe = cls.from_pretrained(folder)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.save_pretrained(folder)
    run = train_in_process(
        tmp_path, base, "model=sdxl", "adapter=none", "embedding.tokens=['<sks>']", "embedding.learning_rate=0.5",
        f"data.instance_prompt='{PROMPT}'", "export.formats=[kohya]", f"sample.refiner={refiner}",
        "sample.refiner_start=0.4", "sample.seeds=[0]", "sample.steps=5", f"sample.prompts=['{PROMPT}']",
        stages="[base,prepare,train,export,gallery]",
    )  # fmt: skip
    state = load_file(run.dir / "kohya" / "embeddings" / "sks.safetensors")

    def pipes(with_token: bool):
        first = StableDiffusionXLPipeline.from_pretrained(base)
        second = StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner)
        for pipe in (first, second):
            if with_token:
                for encoder, key in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g")):
                    if getattr(pipe, encoder) is not None:
                        tokenizer = getattr(pipe, encoder.replace("text_encoder", "tokenizer"))
                        pipe.load_textual_inversion(
                            state[key], token="<sks>", text_encoder=getattr(pipe, encoder), tokenizer=tokenizer
                        )
            pipe.set_progress_bar_config(disable=True)
        return first, second

    def drawn(first, second):
        settings = dict(num_inference_steps=5, guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
        latents = first(PROMPT, height=16, width=16, denoising_end=0.4, output_type="latent", **settings).images
        settings["generator"] = torch.Generator().manual_seed(0)
        return second(PROMPT, image=latents, denoising_start=0.4, output_type="np", **settings).images[0]

    (plain, plain_refiner), (aware, aware_refiner) = pipes(False), pipes(True)
    cells = run.dir / "gallery" / "cells"
    base_row = drawn(plain, plain_refiner)
    assert np.abs(gallery_cell(cells / "row0_seed0.png") - base_row).max() <= 2 / 255 + 1e-6
    assert np.abs(gallery_cell(cells / "row1_seed0.png") - drawn(aware, aware_refiner)).max() <= 2 / 255 + 1e-6
    assert np.abs(drawn(plain, aware_refiner) - base_row).max() > 0.02  # a refiner that knew the token would show
