"""Flux.2 dev and klein with reference images, against diffusers' own pipelines on tiny pipelines of their real
classes: a reference is scaled and cropped as the pipelines prepare it (and refused where they refuse it), the
references' latents and position ids join the target's as the pipelines join them, and ``predict`` is the
pipelines' transformer call cut to the target's tokens."""

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import PROMPT, tiny_family
from tuner.models import family_names, get_family
from tuner.models.flux2 import Flux2, Flux2References

NAMES = [n for n in family_names() if isinstance(get_family(n), Flux2)]  # dev and klein
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


@pytest.mark.e2e
def test_edit_lora_on_flux2_klein_trains_references_and_its_adapter_changes_an_edit(tmp_path, monkeypatch):
    """recipe=edit_lora on a tiny Flux.2 klein: pairs with one or two references (64 px and more, as the pipeline
    takes) and a plain image train and validate; each sample reaches predict with its references (their patches:
    64x64 px -> 4x4, 80x64 -> 4x5) and the plain one without; the exported adapter, loaded by Flux2KleinPipeline,
    changes an edit drawn from references."""
    from accelerate.state import AcceleratorState, GradientState

    from tuner.checks import validate
    from tuner.compose import compose
    from tuner.models.flux2 import Flux2Klein
    from tuner.models.tiny import make_tiny_pipeline
    from tuner.runner import run_recipe

    calls = []
    original = Flux2Klein.predict

    def predict(self, denoiser, noisy, timesteps, cond):  # the family's own, with what it was given noted
        calls.append(tuple(tuple(v.shape[-2:]) for k, v in sorted(cond.items()) if k.startswith("control_")))
        return original(self, denoiser, noisy, timesteps, cond)

    monkeypatch.setattr(Flux2Klein, "predict", predict)
    tiny = make_tiny_pipeline(tmp_path / "pipe", family="flux2_klein")
    targets, first, second = tmp_path / "after", tmp_path / "before", tmp_path / "style"
    for folder in (targets, first, second):
        folder.mkdir()
    for i, color in enumerate([(220, 30, 30), (30, 220, 30), (30, 30, 220), (200, 200, 30)]):
        Image.new("RGB", (32, 32), color).save(targets / f"p{i}.png")
        if i < 3:
            photo(64, 64, seed=i).save(first / f"p{i}.png")
        if i < 2:
            photo(80, 64, seed=10 + i).save(second / f"p{i}.png")
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    cfg = compose("edit_lora", [
        "model=flux2_klein", f"model.path={tiny}", f"model.max_sequence_length={LENGTH}", "data.resolution=32",
        "data.bucket_step=16",
        f"data.instance_dir={targets}", f"data.controls=[{first},{second}]", "data.instance_prompt=make it odd",
        "data.val_split=0.25", "train.max_steps=4", "train.learning_rate=5e-2", "validation.every=4",
        "validation.pairs=1", "sample.steps=2", "log.tensorboard=false", "export.formats=[diffusers]",
        f"output_dir={tmp_path / 'run'}", "stages=[base,prepare,train,export]",
    ])  # fmt: skip
    validate(cfg)
    run = run_recipe(cfg)
    assert set(calls) == {(), ((4, 4),), ((4, 4), (4, 5))}, calls  # trained or held out, each sample
    assert (run.dir / "validation" / "index.html").is_file()
    family = Flux2Klein(run.cfg.model)
    pipe = family.load_pipeline(tiny)
    pipe.set_progress_bar_config(disable=True)
    references = [photo(64, 64, seed=0), photo(80, 64, seed=10)]

    def edit():
        call = family.REFERENCES.call(references, 32, 32)
        generator = torch.Generator().manual_seed(0)
        return pipe(**call, prompt="make it odd", num_inference_steps=2, guidance_scale=1.0, generator=generator,
                    output_type="np").images[0]  # fmt: skip

    before = edit()
    pipe.load_lora_weights(str(run.dir / "diffusers"))
    assert np.abs(edit() - before).max() > 1e-3
