"""What HiDream-I1 alone does, against HiDreamImagePipeline on a tiny pipeline of its real classes (a mixture of two
experts per image feed-forward, a two-layer Llama): prompts as ``encode_prompt`` encodes them (both CLIPs' pooled
projections, T5, every Llama state after the embeddings), the transformer called as the pipeline calls it (Llama's
layers first, its output negated) and trained through its experts, the planning stand-in's dense experts equal to
diffusers' routing, the pipeline's CFG and its own resolution rule, Dev and Fast refused as training bases, the kohya
file in ComfyUI's names (the single file's). What every family does is in tests/test_conformance.py."""

import pytest
import torch

from tests.helpers import patched_as_comfyui, tiny_family, train_in_process
from tuner.models.hidream import DISTILLED, NO_LLAMA, HiDream, _planned

NAME = HiDream.NAME
CPU = torch.device("cpu")
LENGTH = 32  # the tiny pipeline's model.max_sequence_length (TINY_OPTIONS)


@pytest.fixture(scope="module")
def hidream(tmp_path_factory):
    """(the family, its components loaded as a user's folder, the folder's pipeline, folder)."""
    return tiny_family(tmp_path_factory, NAME, "HiDream-I1-Full", max_sequence_length=LENGTH)


def _theirs(pipe, prompts):
    """The pipeline's (t5, llama3 (layers, B, ...), pooled) of ``prompts``."""
    out = pipe.encode_prompt(list(prompts), device=CPU, do_classifier_free_guidance=False, max_sequence_length=LENGTH)
    return out[0], out[2], out[4]


def test_prompts_are_encoded_as_the_pipeline_encodes_them(hidream):
    """Pooled: CLIP-L's and CLIP-G's projections side by side; T5's states; each Llama state after the embeddings
    (batch first in tuner's cache); a prompt past max_sequence_length cut where the pipeline cuts it; Llama's prompt
    starts with its begin token and pads with its end token (the pipeline's pad)."""
    family, c, pipe, _ = hidream
    prompts = ["a cat", "a photo of a dog on a beach, 35mm", "", "a very long prompt " * 20]
    ours = family.encode_prompts(c, prompts)
    t5, llama, pooled = _theirs(pipe, prompts)
    layers = c.text_encoders["text_encoder_4"].config.num_hidden_layers
    assert ours["llama"].shape[:3] == (4, layers, LENGTH) and ours["t5"].shape[:2] == (4, LENGTH)
    torch.testing.assert_close(ours["t5"], t5, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours["llama"].transpose(0, 1), llama, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours["pooled"], pooled, rtol=1e-5, atol=1e-6)
    ids = family.tokenize(c, ["a cat"])["text_encoder_4"][0]
    tok = c.tokenizers["tokenizer_4"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id == pipe.tokenizer_4.pad_token_id


def test_the_transformer_is_called_as_the_pipeline_calls_it_and_trains_through_its_experts(hidream):
    """Llama's layers first, T5 and the pooled prompt as given, the output negated; in training mode (the experts
    routed with gradients, the patches in another layout) the same prediction, square or not."""
    family, c, pipe, _ = hidream
    prompts = ["a cat", "a photo of a dog on a beach"]
    cond = family.encode_prompts(c, prompts)
    t5, llama, pooled = _theirs(pipe, prompts)
    torch.manual_seed(0)
    t = torch.tensor([900.0, 250.0])
    for noisy in (torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 2)):
        with torch.no_grad():
            ours = family.predict(c.denoiser, noisy, t, cond)
            theirs = pipe.transformer(
                hidden_states=noisy, timesteps=t, encoder_hidden_states_t5=t5, encoder_hidden_states_llama3=llama,
                pooled_embeds=pooled, return_dict=False,
            )[0]  # fmt: skip
            torch.testing.assert_close(ours, -theirs, rtol=1e-5, atol=1e-6)
            c.denoiser.train()
            try:
                trained = family.predict(c.denoiser, noisy, t, cond)
            finally:
                c.denoiser.eval()
        torch.testing.assert_close(trained, ours, rtol=1e-5, atol=1e-6)


def test_lora_reaches_the_experts_and_they_get_gradients(hidream):
    """attn_ff's names wrap every SwiGLU (the shared and each routed expert, the text stream's); in training mode
    a loss reaches the chosen experts' LoRA (diffusers' force_inference_output would run them under no_grad)."""
    from peft import LoraConfig

    family, c, pipe, folder = hidream
    model = family.load(folder).denoiser
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=family.TARGETS["attn_ff"], init_lora_weights=False))
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A" in n}
    assert {
        "double_stream_blocks.0.block.ff_i.experts.1.w2", "double_stream_blocks.0.block.ff_i.shared_experts.w1",
        "single_stream_blocks.0.block.ff_i.experts.0.w3", "double_stream_blocks.0.block.ff_t.w1",
        "double_stream_blocks.0.block.attn1.to_q_t", "single_stream_blocks.0.block.attn1.to_out",
    } <= wrapped  # fmt: skip
    assert not any("gate" in n for n in wrapped)
    model.train()
    cond = family.encode_prompts(c, ["a cat", "a dog"])
    torch.manual_seed(1)
    family.predict(model, torch.randn(2, 16, 4, 4), torch.tensor([500.0, 100.0]), cond).square().mean().backward()
    for block in ("double_stream_blocks.0", "single_stream_blocks.0"):
        grads = [p.grad for n, p in model.named_parameters() if f"{block}.block.ff_i.experts." in n and "lora_" in n]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), block


def test_the_plans_dense_experts_equal_diffusers_routing(hidream):
    """The memory plan's stand-in (every routed expert over every token, weighted by the gate's top-k) gives
    diffusers' transformer's output in training mode (its routed path) and in eval mode, from the same weights."""
    family, c, pipe, _ = hidream
    planned = _planned()(**c.denoiser.config)
    planned.load_state_dict(c.denoiser.state_dict())
    cond = family.encode_prompts(c, ["a cat", "a dog on a beach"])
    torch.manual_seed(2)
    noisy, t = torch.randn(2, 16, 4, 4), torch.tensor([700.0, 30.0])
    with torch.no_grad():
        for mode in (False, True):
            c.denoiser.train(mode), planned.train(mode)
            try:
                theirs = family.predict(c.denoiser, noisy, t, cond)
                ours = family.predict(planned, noisy, t, cond)
            finally:
                c.denoiser.eval()
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_cfg_and_size_are_the_pipelines(hidream):
    """Guidance 1 or less is one pass per step, above it the pipeline's CFG with the negative prompt read; the image
    is the pipeline's at the same seed, drawn at the transformer's max_resolution area (32 px here) as asked."""
    from tuner.sampling import sample_images

    family, c, pipe, _ = hidream
    assert pipe.default_sample_size == 4 and family.pipeline(c).default_sample_size == 4

    def draw(guidance, negative=None):
        kwargs = family.call_kwargs() | {"guidance": family.guidance_kwargs}
        return sample_images(pipe, ["a cat"], [0], 32, 2, guidance, negative_prompts=negative, decode=family.decode,
                             **kwargs)  # fmt: skip

    plain, guided = draw(1.0), draw(3.0)
    assert (guided - plain).abs().max() > 1e-3 and (draw(3.0, ["blurry"]) - guided).abs().max() > 1e-3
    image = pipe("a cat", height=32, width=32, num_inference_steps=2, guidance_scale=3.0, max_sequence_length=LENGTH,
                 generator=torch.Generator().manual_seed(0), output_type="pt").images  # fmt: skip
    assert image.shape[-2:] == (32, 32)
    torch.testing.assert_close(guided / 2 + 0.5, image, rtol=0, atol=1e-5)  # sample_images' are in [-1, 1]


def test_dev_and_fast_are_refused_as_training_bases(tmp_path, hidream):
    """Folders named as Dev or Fast (or distilled) stop before anything loads with the advice to train on Full; Full
    and names that merely contain the letters pass; training scheduler at the script's shift of 3."""
    from tuner.errors import ConfigError

    family, c, _, base = hidream
    family.check_trainable(base)
    family.check_trainable(tmp_path / "my-fastidious-model")
    for name in ("HiDream-I1-Dev", "HiDream-I1-Fast", "hidream_fast", "hidream-distilled"):
        with pytest.raises(ConfigError, match="distilled checkpoint") as refused:
            family.check_trainable(tmp_path / name)
        assert DISTILLED in str(refused.value) and "train on full, run on dev/fast" in str(refused.value).lower()
    assert c.noise_scheduler.config.shift == 3.0


def test_a_folder_without_llama_is_refused_with_how_to_save_one(tmp_path, hidream):
    """HiDream-ai's folders leave Llama out: such a folder stops before anything loads, saying how to put it in."""
    import shutil

    from tuner.errors import ConfigError

    family, _, _, base = hidream
    folder = shutil.copytree(base, tmp_path / "HiDream-I1-Full")
    shutil.rmtree(folder / "text_encoder_4")
    with pytest.raises(ConfigError, match="no text_encoder_4/") as refused:
        family.check_folder(folder)
    assert NO_LLAMA in str(refused.value)


@pytest.mark.e2e
def test_the_kohya_file_patches_the_single_file_to_the_merged_transformer(tmp_path, hidream):
    """ComfyUI reads a HiDream LoRA key ``lora_unet_<module, dots as _>`` onto ``<module>.weight`` of its model,
    whose names are the single file's (diffusers' own): each module of tuner's kohya file, the experts' among them,
    is one of the single file's; adding each ``up @ down * alpha / rank`` as ComfyUI patches gives the merged
    folder's transformer, which ``from_single_file`` reads back."""

    from tuner.models.base import Family

    family, c, pipe, base = hidream
    run = train_in_process(
        tmp_path, base, f"model={NAME}", "data.resolution=32", f"model.max_sequence_length={LENGTH}",
        "train.learning_rate=5e-2", "adapter.targets=attn_ff", "export.formats=[kohya,merged]",
    )  # fmt: skip
    state, modules = patched_as_comfyui(family, c, run.dir / "kohya" / f"{run.dir.name}.safetensors")
    expected = {
        "lora_unet_double_stream_blocks_0_block_ff_i_experts_1_w2",
        "lora_unet_single_stream_blocks_0_block_attn1_to_q",
    }
    assert expected <= modules
    merged = Family.load(family, run.dir / "merged").denoiser.state_dict()
    assert state.keys() == merged.keys()
    for key, value in merged.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=1e-5, msg=key)
    assert any((merged[k] - v).abs().max() > 1e-4 for k, v in c.denoiser.state_dict().items())  # it trained
