"""What Ideogram 4 alone does, against Ideogram4Pipeline on a tiny pipeline of its real classes: prompts as
``encode_prompt`` encodes them (13 of Qwen3-VL's layers, left-padded), the packed ``[text][image]`` transformer call
(cut to the batch's longest prompt, output negated), Ideogram's patch order and batch-norm latents, the DreamBooth
script's sigma draws, asymmetric CFG with the base's frozen unconditional transformer at the sampling's guidance, a
distilled folder refused as a training base. What every family does is in tests/test_conformance.py."""

import math

import pytest
import torch

from tests.helpers import tiny_family, train_in_process
from tuner.models.ideogram4 import DISTILLED, UNCONDITIONAL, Ideogram4

NAME = Ideogram4.NAME
LENGTH = 64  # the tiny pipeline's model.max_sequence_length (TINY_OPTIONS)


@pytest.fixture(scope="module")
def ideogram(tmp_path_factory):
    """(the family at the tiny options, its components loaded as a user's folder, the folder's pipeline, folder)."""
    return tiny_family(tmp_path_factory, NAME, "Ideogram-4", max_sequence_length=LENGTH)


def test_prompts_are_encoded_as_the_pipeline_encodes_them(ideogram):
    """The pipeline's text region, token for token: 13 layers side by side, left-padded, zero on the padding."""
    family, c, pipe, _ = ideogram
    prompts = ["a cat", '{"high_level_description":"a dog on a beach"}', ""]
    ours = family.encode_prompts(c, prompts)
    theirs = pipe.encode_prompt(prompts, 2, 2, LENGTH, torch.device("cpu"))[0][:, :LENGTH]
    assert ours["prompt_embeds"].shape == (3, LENGTH, 13 * 16)
    torch.testing.assert_close(ours["prompt_embeds"], theirs, rtol=1e-5, atol=1e-6)
    assert not ours["prompt_embeds"][~ours["prompt_mask"].bool()].any()
    long = family.encode_prompts(c, ["a very long prompt " * 20])["prompt_mask"]
    assert long.all()  # cut to the length, the template's end kept (the pipeline refuses such a prompt)


def test_the_transformer_is_called_as_the_pipeline_calls_it(ideogram):
    """The packed sequence at the pipeline's full text length and tuner's cut to the longest prompt give the same
    image tokens; t = 1 - sigma; the output negated; a prompt alone gives what it gives in the batch."""
    family, c, pipe, _ = ideogram
    prompts = ["a cat", "a photo of a dog on a beach"]
    cond = family.encode_prompts(c, prompts)
    embeds, position_ids, segment_ids, indicator = pipe.encode_prompt(prompts, 2, 3, LENGTH, torch.device("cpu"))
    torch.manual_seed(0)
    noisy, t = torch.randn(2, 32, 2, 3), torch.tensor([900.0, 250.0])
    tokens = noisy.flatten(2).transpose(1, 2)
    with torch.no_grad():
        ours = family.predict(c.denoiser, noisy, t, cond)
        out = pipe.transformer(
            hidden_states=torch.cat([torch.zeros(2, LENGTH, 32), tokens], 1), timestep=1 - t / 1000,
            encoder_hidden_states=embeds, position_ids=position_ids, segment_ids=segment_ids, indicator=indicator,
            return_dict=False,
        )[0][:, LENGTH:]  # fmt: skip
        one = family.predict(c.denoiser, noisy[:1], t[:1], {k: v[:1] for k, v in cond.items()})
    torch.testing.assert_close(ours, -out.transpose(1, 2).reshape(noisy.shape), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one, ours[:1], rtol=1e-4, atol=1e-5)


def test_latents_are_the_pipelines_patches_and_batch_norm(ideogram):
    """``decode`` of normalised patches is the pipeline's decode; encoding then decoding a latent round-trips
    through Ideogram's patch order (channel fastest)."""
    from tuner.models.ideogram4 import _patchify, _unpatchify

    family, c, pipe, _ = ideogram
    z = torch.randn(2, 8, 4, 6)
    assert torch.equal(_unpatchify(_patchify(z)), z)
    assert torch.equal(_patchify(z)[:, :8, 0, 0], z[:, :, 0, 0])  # the first 8 channels: the patch's top left
    scale, shift = family.latent_normalization(c.vae)
    tokens = ((_patchify(z) - shift) * scale).flatten(2).transpose(1, 2)
    with torch.no_grad():
        ours = family.decode(pipe, tokens, 32, 48)
        theirs = pipe.vae.decode(z).sample
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_sigmas_are_drawn_as_the_dreambooth_script_draws_them(ideogram):
    """Logit-normal around ``0.5 * log(pixels / 512**2)`` (std 1.5 from the YAML) on the plain schedule: at 1024 px
    the median sigma is sigmoid(log 2) = 2/3, more noise than at 512 px (1/2)."""
    from tuner.compose import compose
    from tuner.models import get_family

    _, c, _, _ = ideogram
    for resolution, median in ((1024, 2 / 3), (512, 0.5)):
        model = compose("lora", [f"model={NAME}", f"model.resolution={resolution}"]).model
        assert (model.weighting_scheme, model.logit_std) == ("logit_normal", 1.5)
        objective = get_family(NAME, model).objective(c)
        steps = objective.draw(4000, None, torch.Generator().manual_seed(0))
        sigma = objective.sigmas[steps]
        assert abs(float(sigma.median()) - median) < 0.03, (resolution, float(sigma.median()))
    assert math.isclose(float(objective.sigmas[0]), 1.0)  # plain, not the scheduler's shift


def test_sampling_is_the_pipelines_asymmetric_cfg_with_the_bases_unconditional_transformer(ideogram):
    """The in-memory pipeline holds the base's unconditional transformer (frozen, not the trained one) and draws
    what the folder's pipeline draws at a constant guidance; guidance 1 is the conditional transformer alone."""
    from tuner.sampling import sample_images

    family, c, pipe, _ = ideogram
    ours = family.pipeline(c)
    held = getattr(ours, UNCONDITIONAL)
    assert held is not c.denoiser and not any(p.requires_grad for p in held.parameters())
    for key, value in pipe.unconditional_transformer.state_dict().items():
        assert torch.equal(held.state_dict()[key], value), key

    def draw(guidance):
        return sample_images(ours, ["a cat"], [0], 32, 2, guidance, decode=family.decode,
                             guidance=family.guidance_kwargs, **family.call_kwargs())  # fmt: skip

    guided, plain = draw(4.0), draw(1.0)
    assert (guided - plain).abs().max() > 1e-3
    image = pipe(
        "a cat", height=32, width=32, num_inference_steps=2, guidance_scale=4.0, guidance_schedule=None,
        max_sequence_length=LENGTH, generator=torch.Generator().manual_seed(0), output_type="pt",
    ).images  # fmt: skip
    torch.testing.assert_close(guided / 2 + 0.5, image, rtol=0, atol=1e-5)


def test_a_distilled_folder_is_refused_as_a_training_base_and_the_unconditional_transformer_is_needed(
    tmp_path, ideogram
):
    import shutil

    from tuner.errors import ConfigError

    family, _, _, base = ideogram
    family.check_trainable(base)
    turbo = shutil.copytree(base, tmp_path / "Ideogram-4-Turbo")
    with pytest.raises(ConfigError, match="distilled checkpoint") as refused:
        family.check_trainable(turbo)
    assert DISTILLED in str(refused.value)
    for weights in (turbo / UNCONDITIONAL).glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ConfigError, match=f"{UNCONDITIONAL}/ has no .safetensors"):
        family.check_folder(turbo)


@pytest.mark.e2e
def test_the_lora_trains_the_conditional_transformer_only_and_the_merged_folder_keeps_the_unconditional(
    tmp_path, ideogram
):
    """attn_ff (the script's targets) trains; the diffusers file holds transformer keys only and loads whole; the
    merged folder's unconditional transformer is the base's."""
    from safetensors.torch import load_file

    from tuner.export.tensors import tuner_layers

    family, c, pipe, base = ideogram
    run = train_in_process(
        tmp_path, base, f"model={NAME}", "data.resolution=32", f"model.max_sequence_length={LENGTH}",
        "train.learning_rate=5e-2", "adapter.targets=attn_ff", "export.formats=[diffusers,merged]",
    )  # fmt: skip
    lora = load_file(next((run.dir / "diffusers").glob("*.safetensors")))
    assert lora and all(k.startswith("transformer.layers.") for k in lora)
    assert {k.split(".")[-3] for k in lora} >= {"to_q", "w1", "w2", "w3"}
    loaded = family.load_pipeline(base)
    loaded.load_lora_weights(run.dir / "diffusers")
    assert len(tuner_layers(loaded.transformer)) == 7 * 2 and not tuner_layers(loaded.unconditional_transformer)
    merged = family.load_pipeline(run.dir / "merged")
    for key, value in pipe.unconditional_transformer.state_dict().items():
        assert torch.equal(merged.unconditional_transformer.state_dict()[key], value), key
    moved = [
        k
        for k, v in pipe.transformer.state_dict().items()
        if (merged.transformer.state_dict()[k] - v).abs().max() > 1e-4
    ]
    assert moved  # it trained


def test_a_negative_prompt_is_refused_before_anything_loads_naming_the_key(ideogram, tmp_path):
    """Ideogram4Pipeline takes no negative prompt: generate.negative_prompt (or a prompt line's --negative) stops at
    the config's check, naming the key and why, instead of a TypeError inside the pipeline; without one it passes."""
    from tuner.checks import validate
    from tuner.compose import compose
    from tuner.errors import ConfigError

    *_, folder = ideogram
    args = [f"model={NAME}", f"model.path={folder}", "generate.prompts=[a photo of sks ball]"]
    args.append(f"output_dir={tmp_path}/o")
    validate(compose("generate", args))
    with pytest.raises(ConfigError, match=r"generate\.negative_prompt .*Ideogram4Pipeline\) takes no negative prompt"):
        validate(compose("generate", [*args, "generate.negative_prompt=blurry"]))
    assert not (tmp_path / "o").exists()
