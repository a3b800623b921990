"""What Lumina 2 alone does, against Lumina2Pipeline on a tiny pipeline of its real classes: prompts as
``encode_prompt`` encodes them (the system prompt, Gemma 2's second-to-last states, the mask), the transformer
called as the pipeline calls it (the reversed time, its output negated), the pipeline's normalized CFG at the
sampling's guidance; the single file in the original NextDiT names at real widths through diffusers' converter, and
the kohya file in ComfyUI's names patching that file to the merged transformer. What every family does is in
tests/test_conformance.py."""

import pytest
import torch

from tests.helpers import patched_as_comfyui, tiny_family, train_in_process
from tuner.models.lumina2 import SYSTEM_PROMPT, Lumina2, _planned, native_name

NAME = Lumina2.NAME
CPU = torch.device("cpu")
LENGTH = 64  # the tiny pipeline's model.max_sequence_length (TINY_OPTIONS)


@pytest.fixture(scope="module")
def lumina(tmp_path_factory):
    """(the family, its components loaded as a user's folder, the folder's pipeline, folder)."""
    return tiny_family(tmp_path_factory, NAME, "Lumina-Image-2.0", max_sequence_length=LENGTH)


def test_prompts_are_encoded_as_the_pipeline_encodes_them(lumina):
    """The pipeline's system prompt before each prompt, Gemma 2's second-to-last layer over the padded batch and
    the tokenizer's mask; a prompt past max_sequence_length cut where the pipeline cuts it."""
    family, c, pipe, _ = lumina
    assert pipe.system_prompt == SYSTEM_PROMPT
    prompts = ["a cat", "a photo of a dog on a beach, 35mm", "", "a very long prompt " * 20]
    ours = family.encode_prompts(c, prompts)
    embeds, mask, *_ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=CPU,
                                          max_sequence_length=LENGTH)  # fmt: skip
    assert ours["prompt_embeds"].shape[:2] == (4, LENGTH) == mask.shape
    torch.testing.assert_close(ours["prompt_embeds"], embeds, rtol=0, atol=0)
    assert torch.equal(ours["prompt_mask"], mask.long())
    lengths = mask.sum(1).tolist()
    assert lengths[0] < lengths[1] < lengths[3] == LENGTH and lengths[2] == 26  # the system prompt: 25 words and "▁"


def test_the_transformer_is_called_as_the_pipeline_calls_it(lumina):
    """t = 1 - timestep / 1000, the padded prompt and its mask, the output negated; a prompt alone in its batch
    gives what it gives beside a longer one."""
    family, c, pipe, _ = lumina
    cond = family.encode_prompts(c, ["a cat", "a photo of a dog on a beach"])
    lengths = cond["prompt_mask"].sum(1).tolist()
    assert 26 < lengths[0] < lengths[1] < LENGTH  # prompts of two lengths, padded
    torch.manual_seed(0)
    noisy, t = torch.randn(2, 16, 4, 6), torch.tensor([900.0, 250.0])
    with torch.no_grad():
        ours = family.predict(c.denoiser, noisy, t, cond)
        theirs = pipe.transformer(noisy, 1 - t / 1000, cond["prompt_embeds"], cond["prompt_mask"], return_dict=False)
        one = family.predict(c.denoiser, noisy[:1], t[:1], {k: v[:1] for k, v in cond.items()})
    torch.testing.assert_close(ours, -theirs[0], rtol=0, atol=0)
    torch.testing.assert_close(one, ours[:1], rtol=1e-4, atol=1e-5)


def test_cfg_is_the_pipelines_at_the_samplings_guidance(lumina):
    """Guidance 1 or less is one pass per step; above it the pipeline's CFG rescaled to the conditional
    prediction's norm, the negative prompt read; the same image as the pipeline's at that scale."""
    from tuner.sampling import sample_images

    family, c, pipe, _ = lumina

    def draw(guidance, negative=None):
        kwargs = family.call_kwargs() | {"guidance": family.guidance_kwargs}
        assert kwargs["max_sequence_length"] == LENGTH
        return sample_images(pipe, ["a cat"], [0], 32, 2, guidance, negative_prompts=negative, decode=family.decode,
                             **kwargs)  # fmt: skip

    plain, guided = draw(1.0), draw(4.0)
    assert (guided - plain).abs().max() > 1e-3 and (draw(6.0) - guided).abs().max() > 1e-3
    assert (draw(4.0, ["blurry"]) - guided).abs().max() > 1e-3
    image = pipe("a cat", height=32, width=32, num_inference_steps=2, guidance_scale=4.0, max_sequence_length=LENGTH,
                 generator=torch.Generator().manual_seed(0), output_type="pt").images  # fmt: skip
    torch.testing.assert_close(guided / 2 + 0.5, image, rtol=0, atol=1e-5)
    unnormalized = pipe("a cat", height=32, width=32, num_inference_steps=2, guidance_scale=4.0,
                        cfg_normalization=False, max_sequence_length=LENGTH, generator=torch.Generator().manual_seed(0),
                        output_type="pt").images  # fmt: skip
    assert (unnormalized - image).abs().max() > 1e-4  # the pipeline's default (normalized) is the one drawn


def test_the_memory_plans_transformer_is_diffusers_on_full_length_prompts(lumina):
    """The memory plan's transformer (its rotary layout worked out without reading the mask) predicts what
    diffusers' does when every prompt fills max_sequence_length."""
    family, c, _, _ = lumina
    planned = _planned()(**c.denoiser.config)
    planned.load_state_dict(c.denoiser.state_dict())
    torch.manual_seed(0)
    x, text = torch.randn(2, 16, 4, 6), torch.randn(2, 12, 16)
    mask, t = torch.ones(2, 12, dtype=torch.long), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        torch.testing.assert_close(planned(x, t, text, mask, return_dict=False)[0],
                                   c.denoiser(x, t, text, mask, return_dict=False)[0], rtol=0, atol=1e-6)  # fmt: skip


def test_the_single_file_at_real_widths_is_what_diffusers_converter_reads():
    """The single file (the original names, q, k, v fused) of a real-width transformer at reduced depth: diffusers'
    Lumina 2 converter (which has the 2304 / 768 / 768 split written in) gives back every key at its shape; every
    module of the kohya file is one of its weights."""
    from diffusers import Lumina2Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_lumina2_to_diffusers

    with torch.device("meta"):
        model = Lumina2Transformer2DModel(num_layers=2, cap_feat_dim=2304)
    state = Lumina2().single_file_state({"transformer": model}, {})
    assert state["layers.1.attention.qkv.weight"].shape == (2304 + 2 * 768, 2304)
    native = ("cap_embedder.1", "t_embedder.mlp.0", "final_layer.adaLN_modulation.1",
              "context_refiner.1.attention_norm1", "noise_refiner.0.adaLN_modulation.1")  # fmt: skip
    assert {f"{n}.weight" for n in native} <= set(state)
    back = convert_lumina2_to_diffusers(dict(state))
    ours = model.state_dict()
    assert back.keys() == ours.keys()
    assert all(back[k].shape == v.shape for k, v in ours.items())
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert {native_name(n) + ".weight" for n in linear} <= set(state)


@pytest.mark.e2e
def test_the_kohya_file_patches_the_single_file_to_the_merged_transformer(tmp_path, lumina):
    """ComfyUI reads a Lumina 2 LoRA key ``lora_unet_<its module, dots as _>`` onto ``<module>.weight`` of its model
    (comfy/lora.py, every model): adding each ``up @ down * alpha / rank`` to the single file's weights, as
    ComfyUI patches, gives the single file of the merged folder's transformer."""

    from tuner.models.base import Family

    family, c, pipe, base = lumina
    run = train_in_process(
        tmp_path, base, f"model={NAME}", "data.resolution=32", f"model.max_sequence_length={LENGTH}",
        "train.learning_rate=5e-2", "adapter.targets=attn_ff",
        "export.formats=[kohya,merged]",
    )  # fmt: skip
    state, modules = patched_as_comfyui(family, c, run.dir / "kohya" / f"{run.dir.name}.safetensors")
    assert {"lora_unet_layers_0_attention_qkv", "lora_unet_context_refiner_0_feed_forward_w2"} <= modules
    merged = Family.load(family, run.dir / "merged").denoiser
    theirs = family.single_file_state({"transformer": merged}, {})
    assert theirs.keys() == state.keys()
    for key, value in theirs.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=1e-5, msg=key)
    assert any((merged.state_dict()[k] - v).abs().max() > 1e-4 for k, v in c.denoiser.state_dict().items())
