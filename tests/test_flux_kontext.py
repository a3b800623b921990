"""Flux.1 Kontext against diffusers' own ``FluxKontextPipeline``, on a tiny pipeline of its real classes: a reference
is resized as the pipeline resizes it (auto and own size), its latents and position ids join the target's as the
pipeline joins them, ``predict`` is the pipeline's transformer call cut to the target's tokens, a sample without a
reference is Flux.1's, and tuner's samples draw at the size they are asked (with or without a reference)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import PROMPT, tiny_family
from tuner.config import ModelConfig
from tuner.models import register, unregister
from tuner.models.flux import Flux
from tuner.models.flux_kontext import FluxKontext, KontextReferences

LENGTH = 32  # the tiny T5's prompt length


@pytest.fixture(scope="module")
def kontext(tmp_path_factory):
    """(family with control_auto_resize=false, its components, its pipeline, the folder)."""
    register(FluxKontext)
    try:
        yield tiny_family(tmp_path_factory, FluxKontext.NAME, max_sequence_length=LENGTH, control_auto_resize=False)
    finally:
        unregister(FluxKontext.NAME)


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth RGB image of odd size (a gradient and noise: LANCZOS has something to differ on)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    return Image.fromarray((base + rng.normal(0, 20, base.shape)).clip(0, 255).astype(np.uint8))


def pixels(image: Image.Image) -> torch.Tensor:
    """(1, 3, H, W) in [-1, 1], as the prepared dataset's images are read."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]


class _Stop(Exception):
    pass


@pytest.mark.parametrize("auto", [True, False])
def test_the_reference_is_resized_as_the_pipeline_resizes_it(kontext, monkeypatch, auto):
    """The pipeline's preprocessed reference (caught as its image processor returns it) is ``vae_image``'s pixels,
    for references of odd sizes and aspects: the preferred ~1 MP size of the nearest aspect, or the own size floored
    to 16."""
    _, _, pipe, _ = kontext
    rule = KontextReferences(auto_resize=auto)
    seen = []
    preprocess = pipe.image_processor.preprocess

    def caught(*args, **kwargs):
        seen.append(preprocess(*args, **kwargs))
        raise _Stop  # the pipeline's rule is applied: no need to encode a 1 MP reference with the tiny VAE

    monkeypatch.setattr(pipe.image_processor, "preprocess", caught)
    for size in [(37, 53), (200, 70), (64, 64), (1500, 1100)]:
        image = photo(*size)
        with pytest.raises(_Stop):
            pipe(**rule.call([image], 32, 32), prompt=PROMPT, num_inference_steps=1, max_sequence_length=LENGTH)
        ours = rule.vae_image(image)
        theirs = seen.pop()
        assert ours.size == (theirs.shape[3], theirs.shape[2]) and ours.width % 16 == ours.height % 16 == 0
        torch.testing.assert_close(pixels(ours), theirs, rtol=0, atol=1e-6)
        if auto:
            assert 0.9e6 < ours.width * ours.height < 1.1e6
        else:
            assert ours.size == (size[0] // 16 * 16, size[1] // 16 * 16)
    assert rule.rule() != KontextReferences(auto_resize=not auto).rule()  # cached latents keyed apart
    with pytest.raises(ValueError, match="multiples of 16"):
        rule.vae_image(photo(12, 40))


def _calls(transformer, run) -> list[tuple[dict, torch.Tensor]]:
    """Each call of ``transformer`` during ``run()``: its keyword arguments and output."""
    seen = []
    handle = transformer.register_forward_hook(lambda m, a, kw, out: seen.append((kw, out[0])), with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return seen


def test_predict_is_the_pipelines_transformer_call_with_the_reference(kontext):
    """The pipeline edits a 40x56 reference (its own size: 32x48): the reference tokens it appends are tuner's
    control latents (``vae_image``, the VAE's mean, normalised as a target's) packed, with the same position ids;
    ``predict`` on the target's noisy latents with ``cond["control_0"]`` makes the same transformer call and
    returns the pipeline's prediction for the target's tokens."""
    family, c, pipe, _ = kontext
    family.model.guidance = 3.5
    reference = photo(40, 56, seed=1)
    call = family.REFERENCES.call([reference], 32, 32)
    [(kwargs, output)] = _calls(pipe.transformer, lambda: pipe(
        **call, prompt=PROMPT, num_inference_steps=1, guidance_scale=3.5, max_sequence_length=LENGTH,
        generator=torch.Generator().manual_seed(0), output_type="latent",
    ))  # fmt: skip
    target = (32 // 16) ** 2  # tokens of a 32 px target
    assert kwargs["hidden_states"].shape[1] == target + (32 // 16) * (48 // 16)
    with torch.no_grad():
        mean, _ = family.encode_images(c.vae, pixels(family.REFERENCES.vae_image(reference)))
        scale, shift = family.latent_normalization(c.vae)
    control = (mean - shift) * scale  # (1, 4, 6, 4): the reference's latents, laid out as a target's
    noisy = pipe._unpack_latents(kwargs["hidden_states"][:, :target], 32, 32, pipe.vae_scale_factor)
    cond = {"prompt_embeds": kwargs["encoder_hidden_states"], "pooled": kwargs["pooled_projections"]}
    timesteps = kwargs["timestep"] * 1000
    predicted = []
    with torch.no_grad():
        [(ours, ours_out)] = _calls(pipe.transformer, lambda: predicted.append(
            family.predict(pipe.transformer, noisy, timesteps, {**cond, "control_0": control})))  # fmt: skip
    for key in ("hidden_states", "img_ids", "txt_ids", "guidance", "timestep"):
        torch.testing.assert_close(ours[key], kwargs[key], rtol=0, atol=1e-5, msg=key)
    assert (kwargs["img_ids"][target:, 0] == 1).all() and (kwargs["img_ids"][:target, 0] == 0).all()
    torch.testing.assert_close(ours_out, output, rtol=0, atol=1e-5)
    torch.testing.assert_close(pipe._pack_latents(predicted[0], 1, 4, 4, 4), output[:, :target], rtol=0, atol=1e-5)
    with torch.no_grad():  # without a reference: Flux.1's call (a plain text-to-image sample in the same run)
        plain = family.predict(pipe.transformer, noisy, timesteps, cond)
        flux = Flux(family.model).predict(pipe.transformer, noisy, timesteps, cond)
    torch.testing.assert_close(plain, flux, rtol=0, atol=0)
    assert (plain - predicted[0]).abs().max() > 1e-4  # the reference matters


def test_tuners_samples_draw_at_the_asked_size(kontext):
    """The pipeline recomputes its size from max_area (1 MP unless given): tuner's samples, with or without a
    reference, through tuner's pipeline class or diffusers' own, draw at the asked height x width; tuner's class is
    saved as diffusers' and draws the asked size when called without max_area."""
    from diffusers import FluxKontextPipeline

    from tuner.sampling import sample_images

    family, _, pipe, folder = kontext
    for call in ({"width": 48}, family.REFERENCES.call([photo(48, 32)], 32, 48)):
        for pipeline in (pipe, FluxKontextPipeline.from_pipe(pipe)):  # tuner's class, diffusers' own
            images = sample_images(pipeline, [PROMPT], [0], 32, 1, 3.0, decode=family.decode, **family.call_kwargs(),
                                   **call)  # fmt: skip
            assert images.shape == (1, 3, 32, 48)
    assert type(pipe).__name__ == "FluxKontextPipeline" and type(pipe).__module__ == "tuner.models.flux_kontext"
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "FluxKontextPipeline"
    image = pipe(prompt=PROMPT, height=32, width=48, num_inference_steps=1, max_sequence_length=LENGTH).images[0]
    assert image.size == (48, 32)  # tuner's class without max_area


def test_the_rule_follows_the_model_section():
    assert FluxKontext().REFERENCES == KontextReferences(auto_resize=True)
    assert FluxKontext(ModelConfig(control_auto_resize=False)).REFERENCES.auto_resize is False
    assert FluxKontext.REFERENCES.most == 1 and not FluxKontext.REFERENCES.required
