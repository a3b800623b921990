"""What Qwen-Image 2.1 alone does, against its diffusers pipeline: the processor read without torchvision, prompts as
``encode_prompt`` encodes them (Qwen3-VL's pre-norm states, the system message dropped), the single-stream transformer
called as the pipeline calls it (joint sequence, ``img_mask``, text cut to the batch's longest prompt), the RGBA
one-frame VAE's per-channel latents, true CFG only with a negative prompt, Turbo refused as a training base, and
``model=qwen_image`` sending a 2.1 folder here. What every family does is in tests/test_conformance.py."""

import json
import shutil

import pytest
import torch

from tests.helpers import tiny_family
from tuner.errors import ConfigError
from tuner.models import get_family
from tuner.models.qwen_image21 import DISTILLED, PREFIX, QwenImage21

NAME = QwenImage21.NAME
LENGTH = 64  # the tiny pipeline's model.max_sequence_length (TINY_OPTIONS)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """(the family at the tiny options, its components loaded as a user's folder, the folder's own pipeline, the
    folder)."""
    return tiny_family(tmp_path_factory, NAME, "pipe", max_sequence_length=LENGTH)


def test_the_folder_names_qwen3vl_processor_and_loads_without_torchvision_as_the_pipeline_reads_it(qwen):
    """model_index.json names Qwen3VLProcessor as a published folder does; its processor/ holds the tokenizer and the
    chat template, from which the pipeline derives the system tokens it drops (tuner's PREFIX)."""
    family, c, pipe, folder = qwen
    index = json.loads((folder / "model_index.json").read_text())
    assert index["processor"] == ["transformers", "Qwen3VLProcessor"] and index["sample_sigmas"] is None
    assert {"tokenizer.json", "chat_template.jinja"} <= {p.name for p in (folder / "processor").iterdir()}
    assert type(pipe.processor).__name__ == "Qwen3VLProcessor"
    assert pipe._drop_idx == len(c.tokenizers["processor"].tokenizer(PREFIX).input_ids)


def test_prompts_are_encoded_as_the_pipeline_encodes_them(qwen):
    """Pre-norm last states past the system message, each prompt at its length, zeros and mask after it."""
    family, c, pipe, _ = qwen
    prompts = ["a cat", "a dog, 35mm", ""]
    ours = family.encode_prompts(c, prompts)
    embeds, mask, image_pad = pipe.encode_prompt(prompts, device=CPU)
    n = embeds.shape[1]
    assert ours["prompt_embeds"].shape == (3, LENGTH, embeds.shape[2]) and n < LENGTH and not image_pad.any()
    torch.testing.assert_close(ours["prompt_embeds"][:, :n], embeds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours["prompt_embeds_mask"][:, :n], mask)
    assert not ours["prompt_embeds"][:, n:].any() and not ours["prompt_embeds_mask"][:, n:].any()
    # the states are the last layer's before the final norm: the normed ones differ
    ids = family.tokenize(c, prompts[:1])
    normed = c.text_encoder.model.language_model(input_ids=ids["text_encoder"]).last_hidden_state
    n = int(mask[0].sum())
    assert (normed[:, pipe._drop_idx :][:, :n] - embeds[:1, :n]).abs().max() > 1e-3


def test_the_transformer_is_called_as_the_pipeline_calls_it(qwen):
    """Unpatched latents after the text, img_mask's slots, timesteps / 1000: the padded, masked prompts tuner caches
    give the pipeline's prediction, one prompt alone and a batch of two."""
    family, c, pipe, _ = qwen
    for prompts in (["a cat"], ["a cat", "a photo of a dog on a beach"]):
        b = len(prompts)
        cond = family.encode_prompts(c, prompts)
        embeds, mask, image_pad = pipe.encode_prompt(prompts, device=CPU)
        torch.manual_seed(0)
        noisy, t = torch.randn(b, 64, 2, 4), torch.tensor([900.0, 250.0][:b])
        with torch.no_grad():
            ours = family.predict(c.denoiser, noisy, t, cond)
            theirs = pipe.transformer(
                hidden_states=pipe._pack_latents(noisy, b, 64, 2, 4), timestep=t / 1000, encoder_hidden_states=embeds,
                encoder_hidden_states_mask=mask, img_shapes=[[(1, 2, 4)]] * b,
                img_mask=torch.cat([image_pad, image_pad.new_ones(b, 2)], 1), return_dict=False,
            )[0][:, -8:]  # fmt: skip
        theirs = pipe._unpack_latents(theirs, 2 * pipe.vae_scale_factor, 4 * pipe.vae_scale_factor, 16)[:, :, 0]
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_latents_are_the_pipelines_rgba_encoding_and_decode_as_the_pipeline_decodes(qwen):
    """A cached latent's mean is the pipeline's encoding of the image as an opaque RGBA condition image (per-channel
    mean and std); decoding the latents a call returns gives the RGB of the image the call returns."""
    from tuner.training.batches import encode_latent_dist

    family, c, pipe, _ = qwen
    images = torch.rand(2, 3, 32, 64) * 2 - 1
    cache = encode_latent_dist(c.vae, images, family=family)
    rgba = torch.cat([images, torch.ones_like(images[:, :1])], 1).unsqueeze(2)
    theirs = pipe._encode_vae_image(rgba, None)[:, :, 0]
    scale, shift = family.latent_normalization(c.vae)
    torch.testing.assert_close((cache.mean - shift) * scale, theirs, rtol=1e-4, atol=1e-5)
    assert theirs.shape == (2, 64, 2, 4)
    call = {"height": 32, "width": 64, "num_inference_steps": 2}
    latents = pipe("a cat", generator=torch.Generator().manual_seed(0), output_type="latent", **call).images
    image = pipe("a cat", generator=torch.Generator().manual_seed(0), output_type="pt", **call).images
    decoded = family.decode(pipe, latents, 32, 64)
    assert image.shape[1] == 4  # RGBA
    torch.testing.assert_close((decoded / 2 + 0.5).clamp(0, 1), image[:, :3], rtol=0, atol=1e-5)


def test_true_cfg_runs_only_with_a_negative_prompt_at_the_samplings_guidance(qwen):
    from tuner.sampling import sample_images

    family, c, pipe, _ = qwen

    def draw(guidance, negative=None):
        return sample_images(pipe, ["a cat"], [0], 32, 2, guidance, negative_prompts=negative, decode=family.decode,
                             guidance=family.guidance_kwargs, **family.call_kwargs())  # fmt: skip

    plain = draw(3.0)
    torch.testing.assert_close(draw(7.0), plain)
    guided = draw(3.0, [" "])
    assert (guided - plain).abs().max() > 1e-3
    assert (draw(7.0, [" "]) - guided).abs().max() > 1e-3


def test_turbo_is_refused_as_a_training_base_and_samples_on_its_own_grid(tmp_path, qwen):
    """A folder shipping sample_sigmas (Turbo's few-step grid) or named Turbo is refused before anything loads, with
    the advice to train on the base; tuner's pipeline of a Turbo folder samples its grid, as the folder's own does."""
    from tuner.sampling import sample_images

    family, c, pipe, folder = qwen
    family.check_trainable(folder)
    named = shutil.copytree(folder, tmp_path / "Qwen-Image-2.1-Turbo")
    with pytest.raises(ConfigError, match="its name") as refused:
        family.check_trainable(named)
    assert DISTILLED in str(refused.value)
    turbo = shutil.copytree(folder, tmp_path / "fast")
    index = json.loads((turbo / "model_index.json").read_text()) | {"sample_sigmas": [1.0, 0.6]}
    (turbo / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="sample_sigmas"):
        family.check_trainable(turbo)
    own = family.load_pipeline(turbo)
    ours = family.pipeline(family.load(turbo))
    assert ours.config.sample_sigmas == [1.0, 0.6]
    draws = [sample_images(p, ["a cat"], [0], 32, 5, 1.0, decode=family.decode, guidance=family.guidance_kwargs)
             for p in (own, ours)]  # fmt: skip
    torch.testing.assert_close(*draws)


def test_qwen_image_sends_a_2_1_folder_here_and_the_registry_finds_it(qwen):
    from tuner.models import family_of_pipeline

    _, _, _, folder = qwen
    assert family_of_pipeline("QwenImage21Pipeline") == NAME
    with pytest.raises(ConfigError, match="model=qwen_image21"):
        get_family("qwen_image").check_folder(folder)


def test_the_memory_plans_transformer_computes_what_diffusers_computes():
    """The memory plan runs 2.1's transformer on fake tensors, which cannot do the index arithmetic its forward does
    on img_mask: the plan's class takes that layout worked out beforehand and predicts what diffusers' class does."""
    from diffusers import QwenImage21Transformer2DModel

    from tuner.models.qwen_image21 import _img_mask, _layout, _planned

    config = {"num_layers": 2, "attention_head_dim": 128, "num_attention_heads": 2, "context_in_dim": 32}
    torch.manual_seed(0)
    real, planned = QwenImage21Transformer2DModel(**config), _planned()(**config)
    planned.load_state_dict(real.state_dict())
    text, side = 7, 4
    h, e, t = torch.randn(2, side * side, 64), torch.randn(2, text, 32), torch.rand(2)
    with torch.no_grad():
        theirs = real(hidden_states=h, encoder_hidden_states=e, timestep=t, img_shapes=[[(1, side, side)]] * 2,
                      img_mask=_img_mask(2, text, side * side), return_dict=False)[0]  # fmt: skip
        torch.testing.assert_close(planned(h, e, t, _layout(text, side))[0], theirs, rtol=0, atol=0)


def test_a_saved_pipeline_keeps_the_folders_image_and_video_processor_configs(tmp_path, qwen):
    """The processor tuner reads (tokenizer and chat template) saves the folder's image and video processors' configs
    again, so a merged folder still loads in diffusers where torchvision is installed."""
    family, _, _, folder = qwen
    base = shutil.copytree(folder, tmp_path / "base")
    configs = {"preprocessor_config.json": '{"merge_size": 2}', "video_preprocessor_config.json": '{"fps": 2}'}
    for name, text in configs.items():
        (base / "processor" / name).write_text(text)
    family.load_pipeline(base).save_pretrained(tmp_path / "saved")
    for name, text in configs.items():
        assert (tmp_path / "saved" / "processor" / name).read_text() == text
    assert json.loads((tmp_path / "saved" / "model_index.json").read_text())["processor"][1] == "Qwen3VLProcessor"
