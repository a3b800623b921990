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

from tuner.models import family_names

pytestmark = pytest.mark.skipif("qwen_image_edit" not in family_names(), reason="qwen_image_edit is not registered")

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
