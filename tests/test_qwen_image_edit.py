"""Qwen-Image-Edit-2509/2511 (model=qwen_image_edit): its references prepared, encoded and joined to the target as
QwenImageEditPlusPipeline does it, checked against the pipeline itself on tiny folders saved as a user's.

The pipeline's reference areas (1024² for the VAE, 384² for the text encoder) are its module's globals, which tuner
reads when it runs: these tests make them small (64², 56²) so the tiny references are a few tokens.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

VAE_AREA, PROMPT_AREA = 64 * 64, 56 * 56


@pytest.fixture(scope="module")
def small_references():
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plus, "VAE_IMAGE_SIZE", VAE_AREA)
        patch.setattr(plus, "CONDITION_IMAGE_SIZE", PROMPT_AREA)
        yield plus


def _folder(tmp_path_factory, size: str):
    from tuner.models import get_family
    from tuner.models.tiny import save_pipeline

    family = get_family("qwen_image_edit")
    folder = save_pipeline(family.build_tiny(0, size), tmp_path_factory.mktemp(f"qie-{size}") / "pipe", family.NAME)
    pipe = family.load_pipeline(folder)
    pipe.set_progress_bar_config(disable=True)
    return family, family.load(folder), pipe, folder


@pytest.fixture(scope="module")
def qie(tmp_path_factory, small_references):
    return _folder(tmp_path_factory, "test")


def _images(*sizes):
    rs = np.random.RandomState(0)
    return [Image.fromarray((rs.rand(h, w, 3) * 255).astype("uint8")) for w, h in sizes]


def test_references_are_prepared_by_the_pipelines_own_rule(small_references):
    """``vae_image`` then the pipeline's preprocessing is the pipeline's preprocessing of the original (squashed to
    the area's size at the image's aspect, sides of 32); ``prompt_image`` is the image its processor reads; the rule
    (in cache keys) follows the pipeline's areas."""
    from diffusers.image_processor import VaeImageProcessor

    from tuner.models import get_family

    plus, references = small_references, get_family("qwen_image_edit").REFERENCES
    assert (references.most, references.required, references.in_prompt) == (3, True, True)
    processor = VaeImageProcessor(vae_scale_factor=16)
    for image in _images((57, 41), (30, 77), (64, 64)):
        w, h = plus.calculate_dimensions(plus.VAE_IMAGE_SIZE, image.width / image.height)
        theirs = processor.preprocess(image, h, w)
        ours = references.vae_image(image)
        assert ours.size == (w, h) and w % 32 == 0 and h % 32 == 0
        torch.testing.assert_close(processor.preprocess(ours), theirs, rtol=0, atol=0)
        w, h = plus.calculate_dimensions(plus.CONDITION_IMAGE_SIZE, image.width / image.height)
        assert np.array_equal(np.asarray(references.prompt_image(image)), np.asarray(processor.resize(image, h, w)))
    assert references.rule()["vae_area"] == VAE_AREA and references.rule()["prompt_area"] == PROMPT_AREA


def test_prompts_with_references_are_the_pipelines(qie):
    """Each prompt with its pictures (two, one, none) is what ``pipe.encode_prompt(image=...)`` gives, padded with a
    mask to ``max_sequence_length``; a prompt past it keeps its pictures and the template's end."""
    family, c, pipe = qie[:3]
    refs = [family.REFERENCES.prompt_image(i) for i in _images((57, 41), (30, 77))]
    prompts, pictures = ["make it red", "add a hat", "a cat"], [refs, refs[:1], []]
    ours = family.encode_prompts_with_references(c, prompts, pictures)
    assert ours["prompt_embeds"].shape[:2] == (3, family.max_sequence_length)
    lengths = []
    for i, (prompt, images) in enumerate(zip(prompts, pictures)):
        embeds, mask = pipe.encode_prompt(prompt, image=images or None, device=torch.device("cpu"))
        n = embeds.shape[1]
        lengths.append(n)
        assert mask is None and int(ours["prompt_embeds_mask"][i].sum()) == n
        torch.testing.assert_close(ours["prompt_embeds"][i, :n], embeds[0], rtol=1e-5, atol=1e-6)
        assert not ours["prompt_embeds"][i, n:].any()
    assert lengths[0] > lengths[1] > lengths[2]  # the pictures are read
    plain = family.encode_prompts(c, ["a cat"])  # a plain sample: the edit template, no picture
    torch.testing.assert_close(plain["prompt_embeds"], ours["prompt_embeds"][2:])
    from tuner.config import ModelConfig

    short = type(family)(ModelConfig(max_sequence_length=64))  # a long prompt: its first tokens, the template's end
    long = short.encode_prompts_with_references(c, ["paint it " * 20], [refs])
    embeds, _ = pipe.encode_prompt("paint it " * 20, image=refs, device=torch.device("cpu"))
    assert long["prompt_embeds"].shape[1] == int(long["prompt_embeds_mask"].sum()) == 64 < embeds.shape[1]
    torch.testing.assert_close(long["prompt_embeds"][0, :59], embeds[0, :59], rtol=1e-5, atol=1e-6)


def _model_input(family, c, pipe, images):
    """The pipeline's transformer call (one step of two) on ``images``, and tuner's cond for the same sample."""
    seen = {}
    forward = pipe.transformer.forward

    def hook(*args, **kwargs):
        out = forward(*args, **kwargs)
        seen.setdefault("in", kwargs), seen.setdefault("out", out[0])
        return out

    pipe.transformer.forward = hook
    try:
        pipe(image=images, prompt="make it red", num_inference_steps=2, height=32, width=48, output_type="latent",
             generator=torch.Generator().manual_seed(0))  # fmt: skip
    finally:
        pipe.transformer.forward = forward
    from diffusers.image_processor import VaeImageProcessor

    cond = family.encode_prompts_with_references(
        c, ["make it red"], [[family.REFERENCES.prompt_image(i) for i in images]]
    )
    scale, shift = family.latent_normalization(c.vae)
    for k, image in enumerate(images):  # the stored control's pixels, the VAE's mean, normalised
        pixels = VaeImageProcessor(vae_scale_factor=16).preprocess(family.REFERENCES.vae_image(image))
        cond[f"control_{k}"] = (family.encode_images(c.vae, pixels)[0] - shift) * scale
    return seen, cond


def _check_model_input(family, c, pipe):
    images = _images((57, 41), (30, 77))
    seen, cond = _model_input(family, c, pipe, images)
    tokens, shapes = seen["in"]["hidden_states"], seen["in"]["img_shapes"]
    target = 2 * 3
    refs = [cond[f"control_{k}"] for k in range(2)]
    assert shapes == [[(1, 2, 3), *((1, x.shape[2] // 2, x.shape[3] // 2) for x in refs)]]
    packed = torch.cat([pipe._pack_latents(x, 1, 16, x.shape[2], x.shape[3]) for x in refs], dim=1)
    torch.testing.assert_close(tokens[:, target:], packed, rtol=1e-5, atol=1e-5)
    noisy = pipe._unpack_latents(tokens[:, :target], 32, 48, pipe.vae_scale_factor)[:, :, 0]
    with torch.no_grad():
        ours = family.predict(c.denoiser, noisy, seen["in"]["timestep"] * 1000, cond)
    theirs = pipe._unpack_latents(seen["out"][:, :target], 32, 48, pipe.vae_scale_factor)[:, :, 0]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    plain = {k: v for k, v in cond.items() if not k.startswith("control_")}
    with torch.no_grad():  # without references: Qwen-Image's call (the target's tokens alone)
        alone = family.predict(c.denoiser, noisy, seen["in"]["timestep"] * 1000, plain)
    assert alone.shape == ours.shape and not torch.allclose(alone, ours)


def test_the_transformer_reads_the_references_as_the_pipeline_gives_them(qie):
    """The references' tokens are tuner's control latents packed; ``img_shapes`` lists the target's grid then each
    reference's; ``predict`` with ``control_k`` is the pipeline's prediction cut to the target's tokens."""
    _check_model_input(*qie[:3])


def test_2511_reads_the_references_at_t0_from_the_same_inputs(tmp_path_factory, small_references):
    """2511's transformer (``zero_cond_t``) under the same call: tuner's prediction is the pipeline's."""
    family, c, pipe, _ = _folder(tmp_path_factory, "2511")
    assert c.denoiser.config.zero_cond_t
    _check_model_input(family, c, pipe)


def test_the_first_edit_is_refused_and_a_published_processor_folder_loads(qie, tmp_path):
    """A QwenImageEditPipeline folder is refused naming what to train; a processor folder as Qwen publishes it
    (preprocessor_config.json, a chat template) loads without torchvision, and saves as Qwen2VLProcessor."""
    from tuner.errors import ConfigError

    family, c, _, folder = qie
    first = tmp_path / "first"
    first.mkdir()
    (first / "model_index.json").write_text(json.dumps({"_class_name": "QwenImageEditPipeline"}))
    with pytest.raises(ConfigError, match="QwenImageEditPlusPipeline"):
        family.check_folder(first)
    processor = c.tokenizers["processor"]
    published = tmp_path / "processor"
    processor.image_processor.save_pretrained(published)
    processor.tokenizer.save_pretrained(published)
    (published / "chat_template.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    assert (published / "preprocessor_config.json").is_file()
    loaded = family.load_tokenizer(published, "transformers", "Qwen2VLProcessor")
    assert loaded.chat_template == "{{ messages }}" and loaded.image_processor.size == processor.image_processor.size
    loaded.save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "processor_config.json").read_text())
    assert saved["processor_class"] == "Qwen2VLProcessor"
    assert json.loads((folder / "model_index.json").read_text())["processor"] == ["transformers", "Qwen2VLProcessor"]


def _photo(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8"))


@pytest.mark.e2e
def test_edit_lora_on_qwen_image_edit_trains_shows_and_exports_the_edit(qie, tmp_path):
    """``recipe=edit_lora`` on pairs (one with two references), a plain image, one pair held out: the held-out loss
    is logged; the gallery's fine-tuned edit of the held-out pair at two seeds is what QwenImageEditPlusPipeline draws
    with the exported LoRA (diffusers' and kohya's files) and the same references; ``recipe=generate
    generate.controls=[...]`` draws that edit too."""
    from accelerate.state import AcceleratorState, GradientState

    from tuner.checks import validate
    from tuner.compose import compose
    from tuner.runner import run_recipe

    family, _, _, folder = qie
    targets, first, second = (tmp_path / n for n in ("targets", "first", "second"))
    for d in (targets, first, second):
        d.mkdir()
    for i in range(4):  # p0 held out (val_split 0.25, seed 0); p3 plain; p1 with two references
        _photo(32, 32, i).save(targets / f"p{i}.png")
        if i < 3:
            _photo(48, 32, 10 + i).save(first / f"p{i}.png")
    _photo(32, 48, 20).save(second / "p1.png")
    run = tmp_path / "run"
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    cfg = compose("edit_lora", [
        "model=qwen_image_edit", f"model.path={folder}", *family.TINY_OPTIONS, "data.resolution=32",
        "data.bucket_step=16", f"data.instance_dir={targets}", f"data.controls=[{first},{second}]",
        "data.instance_prompt=make it red",
        "data.val_split=0.25", "train.max_steps=3", "train.learning_rate=5e-2", "validation.every=3",
        "validation.pairs=1", "validation.steps=2", "validation.seeds=[0]", "sample.seeds=[0,1]", "sample.steps=2",
        "sample.display_size=32", "log.tensorboard=false", "export.formats=[diffusers,kohya]", f"output_dir={run}",
    ])  # fmt: skip
    validate(cfg)
    run_recipe(cfg)
    summary = json.loads((run / "summary.json").read_text())["metrics"]
    assert "val_loss" in summary["validation"]
    assert "p0.png (held out): make it red" in (run / "gallery" / "index.html").read_text()
    held_out = Image.open(first / "p0.png").convert("RGB")
    cell = np.asarray(Image.open(run / "gallery" / "cells" / "row0_tuned_seed1.png"), dtype=np.float32)

    def edit(pipe, seed):
        return pipe(prompt="make it red", image=held_out, height=32, width=32, num_inference_steps=2,
                    true_cfg_scale=cfg.sample.guidance_scale, generator=torch.Generator().manual_seed(seed),
                    output_type="np").images[0] * 255  # fmt: skip

    pipe = family.load_pipeline(folder)
    pipe.set_progress_bar_config(disable=True)
    base = edit(pipe, 1)
    for lora in (run / "diffusers" / "pytorch_lora_weights.safetensors", run / "kohya" / "run.safetensors"):
        pipe.load_lora_weights(lora.parent, weight_name=lora.name, adapter_name=lora.parent.name)
        tuned = edit(pipe, 1)
        assert np.abs(tuned - base).max() > 1 and np.abs(cell - tuned).max() <= 1, lora
        pipe.delete_adapters(lora.parent.name)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    made = compose("generate", [
        "model=qwen_image_edit", f"model.path={folder}", *family.TINY_OPTIONS, "data.resolution=32",
        f"generate.adapters=[{{path:{run}}}]", f"generate.controls=[{first / 'p0.png'}]",
        'generate.prompts=["make it red"]', "generate.steps=2", "generate.seed=1",
        f"generate.guidance_scale={cfg.sample.guidance_scale}", f"output_dir={tmp_path / 'edits'}",
    ])  # fmt: skip
    validate(made)
    run_recipe(made)
    drawn = np.asarray(Image.open(next((tmp_path / "edits" / "images").glob("*seed1.png"))), dtype=np.float32)
    assert np.abs(drawn - cell).max() <= 1
