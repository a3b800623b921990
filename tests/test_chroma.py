"""What Chroma alone does, against diffusers' ChromaPipeline: prompts as ``encode_prompt`` encodes them (T5 under
its mask, the transformer's mask keeping one pad token), the transformer called as the pipeline calls it, real
CFG on a negative prompt, and its files at the real widths diffusers' converters split by: the kohya file through
``ChromaPipeline.lora_state_dict`` and the single file, as lodestones ship it, through
``ChromaTransformer2DModel.from_single_file``. What every family does is in tests/test_conformance.py."""

from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig

from tests.helpers import tiny_family
from tests.test_kohya_layouts import deltas_of, random_weights
from tuner.export.tensors import Trained, kohya_state, tuner_layers, write_safetensors
from tuner.models import get_family
from tuner.models.chroma import Chroma

NAME = Chroma.NAME
LENGTH = 32  # the tiny pipeline's model.max_sequence_length (TINY_OPTIONS)


@pytest.fixture(scope="module")
def chroma(tmp_path_factory):
    """(the family at the tiny options, its components loaded as a user's folder, the folder's own pipeline)."""
    return tiny_family(tmp_path_factory, NAME, "pipe", max_sequence_length=LENGTH)[:3]


def test_prompts_encode_as_the_pipeline_with_one_pad_token_unmasked(chroma):
    family, c, pipe = chroma
    prompts = ["a cat", "a photo of a dog on a beach, 35mm", "x" * 80]  # the last one past LENGTH tokens
    ours = family.encode_prompts(c, prompts)
    embeds, _, mask, *_ = pipe.encode_prompt(prompts, device=torch.device("cpu"), max_sequence_length=LENGTH)
    torch.testing.assert_close(ours["prompt_embeds"], embeds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours["prompt_mask"], mask)
    tokens = family.tokenize(c, prompts)["text_mask"].sum(1)
    assert mask.sum(1).tolist() == [tokens[0] + 1, tokens[1] + 1, LENGTH]  # the prompt and one pad token


def test_the_transformer_is_called_as_the_pipeline_calls_it(chroma):
    family, c, pipe = chroma
    prompts = ["a cat", "a photo of a dog on a beach"]
    cond = family.encode_prompts(c, prompts)
    embeds, text_ids, mask, *_ = pipe.encode_prompt(prompts, device=torch.device("cpu"), max_sequence_length=LENGTH)
    torch.manual_seed(0)
    noisy, t = torch.randn(2, 4, 4, 6), torch.tensor([900.0, 250.0])
    packed = pipe._pack_latents(noisy, 2, 4, 4, 6)
    with torch.no_grad():
        ours = family.predict(c.denoiser, noisy, t, cond)
        theirs = pipe.transformer(
            hidden_states=packed,
            timestep=t / 1000,
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=pipe._prepare_latent_image_ids(2, 2, 3, noisy.device, noisy.dtype),
            attention_mask=pipe._prepare_attention_mask(2, packed.shape[1], packed.dtype, mask),
            return_dict=False,
        )[0]
        unmasked = family.predict(c.denoiser, noisy, t, {**cond, "prompt_mask": torch.ones_like(mask)})
    f = pipe.vae_scale_factor
    torch.testing.assert_close(ours, pipe._unpack_latents(theirs, 4 * f, 6 * f, f), rtol=1e-4, atol=1e-5)
    assert (unmasked - ours).abs().max() > 1e-4  # the mask reaches the transformer


def test_guidance_is_real_cfg_on_the_negative_prompt(chroma):
    """Guidance 1 is one pass; above it the pipeline guides away from the negative prompt ("" unless given)."""
    from tuner.sampling import sample_images

    family, c, pipe = chroma

    def draw(guidance, negative=None):
        kwargs = family.call_kwargs() | {"guidance": family.guidance_kwargs}
        return sample_images(pipe, ["a cat"], [0], 32, 2, guidance, negative_prompts=negative, decode=family.decode,
                             **kwargs)  # fmt: skip

    plain, guided = draw(1.0), draw(4.0)
    assert (guided - plain).abs().max() > 1e-3
    assert (draw(4.0, ["blurry"]) - guided).abs().max() > 1e-3


@pytest.mark.e2e  # real-width LoRA factors and deltas: a few seconds
def test_kohya_file_reads_back_through_chromas_lora_loader_at_real_widths(tmp_path):
    """BFL's names (ComfyUI's for Chroma), q/k/v and a single block's MLP fused: diffusers' converter, which
    splits them by the real widths, gives back each module's weight change (meta-device base, real LoRA)."""
    from accelerate import init_empty_weights
    from diffusers import ChromaPipeline, ChromaTransformer2DModel

    with init_empty_weights():
        model = ChromaTransformer2DModel(num_layers=1, num_single_layers=1, joint_attention_dim=64,
                                         approximator_hidden_dim=64, approximator_layers=1)  # fmt: skip
    targets = ["to_q", "to_k", "to_v", "add_k_proj", "proj_mlp", "to_out.0"]  # fused in BFL's layout, and not
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="gaussian"))
    g = torch.Generator().manual_seed(0)
    for layer in tuner_layers(model).values():
        for linear in (*layer.lora_A.values(), *layer.lora_B.values()):
            linear.weight = torch.nn.Parameter(torch.randn(linear.weight.shape, generator=g) / 8)
    trained = Trained(SimpleNamespace(trainable=lambda: {"transformer": model}), "lora")
    state = kohya_state(trained, get_family(NAME), torch.float32)
    assert "lora_unet_single_blocks_0_linear1.lora_down.weight" in state
    assert "lora_unet_double_blocks_0_txt_attn_qkv.lora_down.weight" in state
    converted = ChromaPipeline.lora_state_dict(write_safetensors(tmp_path / "chroma.safetensors", state))
    converted = converted[0] if isinstance(converted, tuple) else converted
    got = {
        k.removeprefix("transformer.").removesuffix(".lora_A.weight"): converted[k.replace(".lora_A.", ".lora_B.")] @ v
        for k, v in converted.items()
        if k.endswith(".lora_A.weight")
    }
    expected = deltas_of(model)
    assert set(got) >= set(expected)  # and an untrained sibling of a fused module (add_q, add_v) at zero
    for name, delta in expected.items():
        torch.testing.assert_close(got[name], delta, atol=1e-5, rtol=1e-4, msg=name)
    assert all(not got[name].any() for name in set(got) - set(expected))


@pytest.mark.e2e  # a 0.35 B-parameter transformer, built and read back
def test_single_file_is_lodestones_layout_and_reads_back_through_from_single_file(tmp_path):
    """The transformer in BFL's names with the approximator (``distilled_guidance_layer.*``, its norms' ``scale``:
    the key ComfyUI tells Chroma by), read by diffusers' converter (3072 wide, written in) to the same weights."""
    from diffusers import ChromaTransformer2DModel

    with torch.device("meta"):
        model = ChromaTransformer2DModel(num_layers=1, num_single_layers=1, joint_attention_dim=64,
                                         approximator_hidden_dim=64, approximator_layers=2)  # fmt: skip
    model = model.to_empty(device="cpu")
    random_weights(model)
    model.save_config(tmp_path / "base" / "transformer")
    state = get_family(NAME).single_file_state({"transformer": model}, {})
    assert {"distilled_guidance_layer.norms.0.scale", "distilled_guidance_layer.layers.1.out_layer.weight",
            "double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"} <= set(state)  # fmt: skip
    assert not [k for k in state if "to_q" in k or "mod" in k or "guidance_in" in k]
    path = write_safetensors(tmp_path / "chroma-unlocked.safetensors", state)
    del state
    loaded = ChromaTransformer2DModel.from_single_file(
        path, config=str(tmp_path / "base"), subfolder="transformer", local_files_only=True
    )
    mine, theirs = model.state_dict(), loaded.state_dict()
    assert set(mine) == set(theirs)
    for name, value in mine.items():
        assert torch.equal(theirs[name], value), name


@pytest.mark.e2e  # a training run
def test_a_new_token_trains_a_t5_vector_that_chromas_own_loader_reads_to_the_trained_image(tmp_path, chroma):
    """Textual inversion beside the LoRA: one T5 vector, in diffusers' file ({token: vectors}) and A1111's /
    ComfyUI's (``emb_params``); ChromaPipeline's load_textual_inversion with the LoRA draws the run's image."""
    from safetensors.torch import load_file

    from tests.helpers import image_of, train_in_process
    from tuner.sampling import sample_images

    family, c, pipe = chroma
    folder, prompt = pipe.config._name_or_path, "a photo of <sks>"
    run = train_in_process(tmp_path, folder, f"model={NAME}", "data.resolution=32", "embedding.tokens=['<sks>']",
                           f"data.instance_prompt='{prompt}'", "export.formats=[diffusers,kohya]",
                           *Chroma.TINY_OPTIONS)  # fmt: skip
    expected = image_of(run, prompt)
    ours, theirs = (load_file(run.dir / f / "embeddings" / "sks.safetensors") for f in ("diffusers", "kohya"))
    assert torch.equal(ours["<sks>"], theirs["emb_params"]) and ours["<sks>"].shape == (1, 32)  # T5's width
    loaded = family.load_pipeline(folder)
    loaded.set_progress_bar_config(disable=True)
    loaded.scheduler = run.family.sampling_scheduler(run.family.load(folder))
    loaded.load_lora_weights(run.dir / "diffusers")

    def draw():
        image = sample_images(loaded, [prompt], [0], 32, 3, 3.0, decode=family.decode, **family.call_kwargs())[0]
        return ((image + 1) / 2).permute(1, 2, 0).numpy()

    assert abs(draw() - expected).max() > 2e-3  # the LoRA alone, the token unknown: another image
    loaded.load_textual_inversion(ours, token="<sks>", text_encoder=loaded.text_encoder, tokenizer=loaded.tokenizer)
    assert abs(draw() - expected).max() <= 1e-3
