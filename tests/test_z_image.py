"""What Z-Image alone does, against ZImagePipeline on a tiny pipeline of its real classes: prompts as
``_encode_prompt`` encodes them (each prompt's own tokens of Qwen3's second-to-last states), the transformer called
as the pipeline calls it (lists, the reversed time, its output negated), the pipeline's CFG at the sampling's
guidance, Turbo refused as a training base; the kohya file is ComfyUI's names for Comfy-Org's single file (q, k, v
fused exactly), which diffusers' converter reads back. What every family does is in tests/test_conformance.py."""

import pytest
import torch

from tests.helpers import patched_as_comfyui, tiny_family, train_in_process
from tuner.models.z_image import DISTILLED, ZImage

NAME = ZImage.NAME
LENGTH = 64  # the tiny pipeline's model.max_sequence_length (TINY_OPTIONS)


@pytest.fixture(scope="module")
def zimage(tmp_path_factory):
    """(the family at the tiny options, its components loaded as a user's folder, the folder's pipeline, folder)."""
    return tiny_family(tmp_path_factory, NAME, "Z-Image", max_sequence_length=LENGTH)


def test_prompts_are_encoded_as_the_pipeline_encodes_them(zimage):
    """Each prompt's tokens of the second-to-last layer, in the chat template with thinking on; zero and masked
    past them; a prompt past max_sequence_length cut where the pipeline cuts it."""
    family, c, pipe, _ = zimage
    prompts = ["a cat", "a photo of a dog on a beach, 35mm", "", "a very long prompt " * 20]
    ours = family.encode_prompts(c, prompts)
    theirs = pipe._encode_prompt(list(prompts), device=torch.device("cpu"), max_sequence_length=LENGTH)
    assert ours["prompt_embeds"].shape[:2] == (4, LENGTH) and len(theirs[-1]) == LENGTH
    for embeds, mask, their in zip(ours["prompt_embeds"], ours["prompt_mask"].bool(), theirs):
        torch.testing.assert_close(embeds[mask], their, rtol=1e-5, atol=1e-6)
        assert not embeds[~mask].any()
    text = c.tokenizer.apply_chat_template(
        [{"role": "user", "content": "a cat"}], tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    assert text == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"  # no empty think block


def test_the_transformer_is_called_as_the_pipeline_calls_it(zimage):
    """Lists of one-frame latents and of each prompt's tokens, t = (1000 - timestep) / 1000, the output negated:
    the padded, masked batch tuner caches gives what the pipeline's unpadded lists give."""
    family, c, pipe, _ = zimage
    prompts = ["a cat", "a photo of a dog on a beach"]
    cond = family.encode_prompts(c, prompts)
    theirs_prompts = pipe._encode_prompt(list(prompts), device=torch.device("cpu"), max_sequence_length=LENGTH)
    torch.manual_seed(0)
    noisy, t = torch.randn(2, 16, 4, 6), torch.tensor([900.0, 250.0])
    with torch.no_grad():
        ours = family.predict(c.denoiser, noisy, t, cond)
        out = pipe.transformer(list(noisy.unsqueeze(2).unbind(0)), (1000 - t) / 1000, theirs_prompts, return_dict=False)
        one = family.predict(c.denoiser, noisy[:1], t[:1], {k: v[:1] for k, v in cond.items()})
    torch.testing.assert_close(ours, -torch.stack(out[0]).squeeze(2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(one, ours[:1], rtol=1e-4, atol=1e-5)  # the shorter prompt alone: the same


def test_cfg_is_the_pipelines_at_the_samplings_guidance(zimage):
    """Guidance 0 is one pass per step (Turbo's); above it, the pipeline's ``pos + s * (pos - neg)`` at that scale."""
    from tuner.sampling import sample_images

    family, c, pipe, _ = zimage

    def draw(guidance, negative=None):
        kwargs = family.call_kwargs() | {"guidance": family.guidance_kwargs}
        return sample_images(pipe, ["a cat"], [0], 32, 2, guidance, negative_prompts=negative, decode=family.decode,
                             **kwargs)  # fmt: skip

    plain, guided = draw(0.0), draw(3.0)
    assert (guided - plain).abs().max() > 1e-3 and (draw(5.0) - guided).abs().max() > 1e-3
    assert (draw(3.0, ["blurry"]) - guided).abs().max() > 1e-3  # the negative prompt is read
    image = pipe("a cat", height=32, width=32, num_inference_steps=2, guidance_scale=3.0, max_sequence_length=LENGTH,
                 generator=torch.Generator().manual_seed(0), output_type="pt").images  # fmt: skip
    torch.testing.assert_close(guided / 2 + 0.5, image, rtol=0, atol=1e-5)  # sample_images' are in [-1, 1]


def test_turbo_is_refused_as_a_training_base_and_takes_a_lora_trained_on_the_base(tmp_path, zimage):
    """A folder named as Turbo (or distilled) stops before anything loads with the advice to train on the base; the
    base passes; a LoRA of the base loads onto the Turbo transformer whole (the same modules)."""
    import shutil

    from tests.test_toolbox import random_lora
    from tuner.errors import ConfigError
    from tuner.export.tensors import tuner_layers

    family, c, pipe, base = zimage
    family.check_trainable(base)
    turbo = shutil.copytree(base, tmp_path / "Z-Image-Turbo")
    with pytest.raises(ConfigError, match="distilled checkpoint") as refused:
        family.check_trainable(turbo)
    assert DISTILLED in str(refused.value)
    lora = random_lora(base, tmp_path / "lora", rank=2, alpha=2.0, seed=1, family=NAME)
    distilled = family.load_pipeline(turbo)
    distilled.load_lora_weights(lora.parent, weight_name=lora.name)
    layers = distilled.transformer.config.n_layers + 2 * distilled.transformer.config.n_refiner_layers
    assert len(tuner_layers(distilled.transformer)) == 4 * layers  # q, k, v, out of every block


@pytest.mark.e2e
def test_the_kohya_file_patches_comfy_orgs_single_file_to_the_merged_transformer(tmp_path, zimage):
    """ComfyUI reads a Z-Image LoRA key ``lora_unet_<its module, dots as _>`` onto ``<module>.weight`` of its model
    (comfy/lora.py, every model): each module of tuner's kohya file is one of the single file's (Comfy-Org's
    layout: q, k, v fused in ``qkv``). Adding each ``up @ down * alpha / rank`` there, as ComfyUI patches, and
    reading the file back with diffusers' Z-Image converter gives the merged folder's transformer."""
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    from tuner.models.base import Family

    family, c, pipe, base = zimage
    run = train_in_process(
        tmp_path, base, f"model={NAME}", "data.resolution=32", f"model.max_sequence_length={LENGTH}",
        "train.learning_rate=5e-2", "adapter.targets=attn_ff", "export.formats=[kohya,merged]",
    )  # fmt: skip
    state, modules = patched_as_comfyui(family, c, run.dir / "kohya" / f"{run.dir.name}.safetensors")
    assert {"lora_unet_layers_0_attention_qkv", "lora_unet_noise_refiner_0_feed_forward_w2"} <= modules
    back = convert_z_image_transformer_checkpoint_to_diffusers(dict(state))
    merged = Family.load(family, run.dir / "merged").denoiser.state_dict()
    assert back.keys() == merged.keys()
    for key, value in merged.items():
        torch.testing.assert_close(back[key], value, rtol=0, atol=1e-5, msg=key)
    assert any((merged[k] - v).abs().max() > 1e-4 for k, v in c.denoiser.state_dict().items())  # it trained
