"""Flux.2 dev and klein with reference images, against diffusers' own pipelines on tiny pipelines of their real
classes: a reference is scaled and cropped as the pipelines prepare it (and refused where they refuse it), the
references' latents and position ids join the target's as the pipelines join them, and ``predict`` is the
pipelines' transformer call cut to the target's tokens."""

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import PROMPT, tiny_family
from tuner.models.flux2 import Flux2, Flux2References

NAMES = ("flux2", "flux2_klein")
LENGTH = 64  # the tiny tokenizers' system message and prompt fit in 64 tokens


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """``families(name)``: (family, components, pipeline, folder) of the tiny pipeline (once per module)."""
    made = {}

    def get(name):
        if name not in made:
            made[name] = tiny_family(tmp_path_factory, name, max_sequence_length=LENGTH, guidance=3.5)
        return made[name]

    return get


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    return Image.fromarray((base + rng.normal(0, 20, base.shape)).clip(0, 255).astype(np.uint8))


def pixels(image: Image.Image) -> torch.Tensor:
    """(1, 3, H, W) in [-1, 1], as the prepared dataset's images are read."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]


class _Stop(Exception):
    pass


def test_a_reference_is_scaled_and_cropped_as_the_pipeline_prepares_it(families, monkeypatch):
    """The pipeline's prepared reference (caught as its image processor returns it) is ``vae_image``'s pixels:
    over 1 MP scaled to 1 MP, center-cropped to multiples of 16; one the pipeline refuses, refused."""
    _, _, pipe, _ = families("flux2_klein")
    rule = Flux2.REFERENCES
    assert rule == Flux2References() and not rule.required and not rule.in_prompt
    seen = []
    preprocess = pipe.image_processor.preprocess

    def caught(*args, **kwargs):
        seen.append(preprocess(*args, **kwargs))
        raise _Stop

    monkeypatch.setattr(pipe.image_processor, "preprocess", caught)
    for size in [(64, 64), (100, 70), (77, 203), (1500, 1100)]:
        image = photo(*size)
        with pytest.raises(_Stop):
            pipe(**rule.call([image], 32, 32), prompt=PROMPT, num_inference_steps=1, max_sequence_length=LENGTH)
        ours, theirs = rule.vae_image(image), seen.pop()
        assert ours.size == (theirs.shape[3], theirs.shape[2]) and ours.width % 16 == ours.height % 16 == 0
        torch.testing.assert_close(pixels(ours), theirs, rtol=0, atol=1e-6)
        assert ours.width * ours.height <= 1024 * 1024
    for size in [(40, 80), (600, 70)]:  # under 64 px a side; beyond 8:1
        with pytest.raises(ValueError) as theirs:
            pipe(**rule.call([photo(*size)], 32, 32), prompt=PROMPT, num_inference_steps=1, max_sequence_length=LENGTH)
        with pytest.raises(ValueError) as ours:
            rule.vae_image(photo(*size))
        assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("name", NAMES)
def test_predict_is_the_pipelines_transformer_call_with_references(families, name):
    """The pipeline edits from two references (64x80, 96x64 px): the tokens it appends are tuner's control latents
    (``vae_image``, the VAE's mean in normalised patches) packed in order, with the same ids (time 10, 20);
    ``predict`` on the target's noisy latents with ``cond["control_0"]``, ``cond["control_1"]`` makes the same
    transformer call and returns the pipeline's prediction for the target's tokens."""
    family, c, pipe, _ = families(name)
    references = [photo(64, 80, seed=1), photo(96, 64, seed=2)]
    seen = []
    handle = pipe.transformer.register_forward_hook(lambda m, a, kw, out: seen.append((kw, out[0])), with_kwargs=True)
    try:
        pipe(**family.REFERENCES.call(references, 32, 32), prompt=PROMPT, num_inference_steps=1, guidance_scale=3.5,
             max_sequence_length=LENGTH, generator=torch.Generator().manual_seed(0), output_type="latent")  # fmt: skip
        kwargs, output = seen[0]  # klein's base draws with CFG: the prompt's call first
        target = (32 // 16) ** 2
        assert kwargs["hidden_states"].shape[1] == target + 4 * 5 + 6 * 4
        with torch.no_grad():
            scale, shift = family.latent_normalization(c.vae)
            controls = {
                f"control_{k}": (family.encode_images(c.vae, pixels(family.REFERENCES.vae_image(r)))[0] - shift) * scale
                for k, r in enumerate(references)
            }  # fmt: skip
        noisy = pipe._unpack_latents_with_ids(kwargs["hidden_states"][:, :target], kwargs["img_ids"][:, :target])
        cond = {"prompt_embeds": kwargs["encoder_hidden_states"]}
        seen.clear()
        with torch.no_grad():
            ours = family.predict(pipe.transformer, noisy, kwargs["timestep"] * 1000, {**cond, **controls})
        [(called, called_out)] = seen
    finally:
        handle.remove()
    for key in ("hidden_states", "img_ids", "txt_ids", "timestep"):
        torch.testing.assert_close(called[key], kwargs[key], rtol=0, atol=1e-5, msg=key)
    assert (called["guidance"] is None) == (kwargs["guidance"] is None)
    assert sorted(set(kwargs["img_ids"][0, :, 0].tolist())) == [0, 10, 20]  # the target, reference 1, reference 2
    torch.testing.assert_close(called_out, output, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pipe._pack_latents(ours), output[:, :target], rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        t = kwargs["timestep"] * 1000
        plain = family.predict(pipe.transformer, noisy, t, cond)
        one = family.predict(pipe.transformer, noisy, t, {**cond, "control_0": controls["control_0"]})
    assert (plain - ours).abs().max() > 1e-4 and (one - ours).abs().max() > 1e-4  # each reference matters
