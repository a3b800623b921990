"""kohya-format LoRA files in each family's original module names, read back by diffusers' own converters
(the code that loads kohya, ComfyUI and Forge files into diffusers), weight change by weight change.

Flux's converter splits a fused module by the real model's widths (q, k, v and the MLP of a single block:
3072, 3072, 3072, 12288), so the Flux base is built at those widths, with one block of each kind, on the
meta device: the LoRA's own weights are the only real tensors.
"""

from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig

from tuner.export.tensors import Trained, kohya_state, tuner_layers, write_safetensors
from tuner.models import get_family

FLUX_LINEAR = [
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
    "norm1.linear", "norm1_context.linear", "norm.linear", "norm_out.linear", "x_embedder", "context_embedder",
]  # fmt: skip


def real_width_flux(targets: list[str]):
    """Flux's transformer at its real widths (one double, one single block) on the meta device, with a rank-4
    LoRA (alpha 8) on ``targets`` whose weights are real and random."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with init_empty_weights():
        model = FluxTransformer2DModel(
            num_layers=1, num_single_layers=1, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True
        )
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="gaussian"))
    g = torch.Generator().manual_seed(0)
    for layer in tuner_layers(model).values():
        for linear in (*layer.lora_A.values(), *layer.lora_B.values()):
            shape = linear.weight.shape
            linear.weight = torch.nn.Parameter(torch.randn(shape, generator=g) / shape[1] ** 0.5)
    return model


def deltas_of(model) -> dict[str, torch.Tensor]:
    """Each LoRA module's weight change, up @ down x alpha / rank, by its diffusers name."""
    out = {}
    for name, layer in tuner_layers(model).items():
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        out[name] = (b @ a) * layer.scaling["default"]
    return out


@pytest.mark.parametrize(
    "targets",
    [pytest.param(FLUX_LINEAR, marks=pytest.mark.e2e), ["to_q", "to_v", "proj_out"]],  # every linear: 20 s
    ids=["all_linear", "some_of_qkv"],
)
def test_flux_kohya_file_reads_back_through_diffusers_converter_to_the_same_weight_changes(tmp_path, targets):
    from diffusers import FluxPipeline

    flux = get_family("flux")
    model = real_width_flux(targets)
    trained = Trained(SimpleNamespace(trainable=lambda: {"transformer": model}), "lora")
    state = kohya_state(trained, flux, torch.float32)
    assert "lora_unet_single_blocks_0_linear1.lora_down.weight" in state  # q, k, v and the MLP fused
    assert not [k for k in state if "to_q" in k or "add_q_proj" in k]  # only original names
    path = write_safetensors(tmp_path / "flux.safetensors", state)

    converted = FluxPipeline.lora_state_dict(path)
    converted = converted[0] if isinstance(converted, tuple) else converted
    expected = deltas_of(model)
    got = {}
    for key, down in converted.items():
        if key.startswith("transformer.") and key.endswith(".lora_A.weight"):
            name = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
            got[name] = converted[key.replace(".lora_A.", ".lora_B.")] @ down  # alpha folded in by the converter
    in_blocks = {name for name in expected if "blocks." in name}
    assert set(got) >= in_blocks  # every trained block module arrives (an untrained sibling of a fused one: zero)
    for name in in_blocks:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)
    for name in set(got) - set(expected):
        assert got[name].abs().max() == 0, name
    # outside the blocks diffusers' converter leaves the prefix and alpha off: kohya's formula, as ComfyUI applies it
    outside = {"proj_out": ("final_layer_linear", False), "norm_out.linear": ("final_layer_adaLN_modulation_1", True)}
    for name, (original, swapped) in outside.items():
        if name in expected:
            key = f"lora_unet_{original}"
            up, down, alpha = state[f"{key}.lora_up.weight"], state[f"{key}.lora_down.weight"], state[f"{key}.alpha"]
            delta = up @ down * alpha / down.shape[0]
            if swapped:  # the original holds (shift, scale) where diffusers holds (scale, shift)
                delta = torch.cat(delta.chunk(2)[::-1])
            torch.testing.assert_close(delta, expected[name], atol=1e-5, rtol=1e-4, msg=name)


def test_sdxl_kohya_names_are_the_original_unet_layout():
    """Block by block, as kohya's SDXL trainer names them (diffusers' down_blocks.1 = input_blocks 4 and 5)."""
    sdxl = get_family("sdxl")
    config = {"layers_per_block": 2, "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}
    names = {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q":
            "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
        "down_blocks.2.attentions.1.proj_in": "input_blocks.8.1.proj_in",
        "mid_block.attentions.0.transformer_blocks.3.ff.net.2": "middle_block.1.transformer_blocks.3.ff.net.2",
        "up_blocks.0.attentions.2.transformer_blocks.9.attn2.to_out.0":
            "output_blocks.2.1.transformer_blocks.9.attn2.to_out.0",
    }  # fmt: skip
    for diffusers, original in names.items():
        assert sdxl.kohya_module_name("unet", diffusers, config) == original
    assert (
        sdxl.kohya_module_name("text_encoder_2", "encoder.layers.0.mlp.fc1", {})
        == "text_model.encoder.layers.0.mlp.fc1"
    )


@pytest.mark.e2e  # a 0.5 B-parameter transformer, built and read back: about 40 s
def test_flux_single_file_reads_back_through_from_single_file_to_the_same_weights(tmp_path):
    """Flux's single file (the transformer in BFL's layout), read by diffusers' own single-file converter,
    which splits fused q/k/v/MLP by Flux's real widths: so a real-width transformer, one block of each kind."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(
            num_layers=1, num_single_layers=1, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True
        )
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    model.save_config(tmp_path / "base" / "transformer")
    state = get_family("flux").single_file_state({"transformer": model}, {})
    assert "double_blocks.0.img_attn.qkv.weight" in state and "single_blocks.0.linear1.weight" in state
    assert "final_layer.adaLN_modulation.1.weight" in state and not [k for k in state if "to_q" in k]
    path = write_safetensors(tmp_path / "flux1.safetensors", state)
    del state
    loaded = FluxTransformer2DModel.from_single_file(
        path, config=str(tmp_path / "base"), subfolder="transformer", local_files_only=True
    )
    mine, theirs = model.state_dict(), loaded.state_dict()
    assert set(mine) == set(theirs)
    for name, value in mine.items():
        assert torch.equal(theirs[name], value), name


def random_weights(model, seed: int = 0) -> None:
    """Every parameter random (no zero-initialised modulation), so a swapped or misplaced tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))


def test_sd3_single_file_reads_back_through_from_single_file_to_the_same_weights(tmp_path, tiny):
    """SD3's single file (the transformer in the original MMDiT layout), read by diffusers' own converter."""
    from diffusers import SD3Transformer2DModel

    folder = tiny("sd3")
    model = SD3Transformer2DModel.from_pretrained(folder / "transformer")
    random_weights(model)
    state = get_family("sd3").single_file_state({"transformer": model}, {})
    assert "joint_blocks.0.x_block.attn.qkv.weight" in state and "joint_blocks.1.context_block.attn.qkv.weight" in state
    assert "final_layer.adaLN_modulation.1.weight" in state and not [k for k in state if "to_q" in k]
    path = write_safetensors(tmp_path / "sd3.safetensors", state)
    loaded = SD3Transformer2DModel.from_single_file(
        path, config=str(folder), subfolder="transformer", local_files_only=True
    )
    mine, theirs = model.state_dict(), loaded.state_dict()
    assert set(mine) == set(theirs)
    for name, value in mine.items():
        assert torch.equal(theirs[name], value), name


def test_sd3_kohya_file_holds_each_modules_weight_change_under_its_original_name(tiny):
    """kohya's SD3 keys: q, k, v stacked into qkv exactly (a sibling without a LoRA: zero rows), the last
    block's text modulation and the final modulation with their halves swapped, as the original holds them.
    ComfyUI reads this file back (tests/test_clients.py); here, its numbers against peft's own deltas."""
    from diffusers import SD3Transformer2DModel

    sd3 = get_family("sd3")
    model = SD3Transformer2DModel.from_pretrained(tiny("sd3") / "transformer")
    last = model.config.num_layers - 1
    targets = ["to_q", "to_v", "add_k_proj", "to_out.0", "ff.net.0.proj", "norm_out.linear", "norm1_context.linear"]
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="gaussian"))
    g = torch.Generator().manual_seed(0)
    for layer in tuner_layers(model).values():
        for linear in layer.lora_B.values():
            linear.weight = torch.nn.Parameter(torch.randn(linear.weight.shape, generator=g))
    state = kohya_state(Trained(SimpleNamespace(trainable=lambda: {"transformer": model}), "lora"), sd3, torch.float32)
    expected = deltas_of(model)

    def delta(key: str) -> torch.Tensor:
        down, up = state[f"lora_unet_{key}.lora_down.weight"], state[f"lora_unet_{key}.lora_up.weight"]
        return up @ down * float(state[f"lora_unet_{key}.alpha"]) / down.shape[0]

    def swap(t):
        first, second = t.chunk(2, dim=0)
        return torch.cat([second, first])

    for n in range(model.config.num_layers):
        block = f"transformer_blocks.{n}"
        qkv = delta(f"joint_blocks_{n}_x_block_attn_qkv")
        no_k = torch.zeros_like(qkv[: qkv.shape[0] // 3])  # to_k has no LoRA: zero rows
        torch.testing.assert_close(
            qkv, torch.cat([expected[f"{block}.attn.to_q"], no_k, expected[f"{block}.attn.to_v"]])
        )
        context = delta(f"joint_blocks_{n}_context_block_attn_qkv")
        third = context.shape[0] // 3
        torch.testing.assert_close(context[third : 2 * third], expected[f"{block}.attn.add_k_proj"])
        assert not context[:third].any() and not context[2 * third :].any()
        torch.testing.assert_close(delta(f"joint_blocks_{n}_x_block_attn_proj"), expected[f"{block}.attn.to_out.0"])
        torch.testing.assert_close(delta(f"joint_blocks_{n}_x_block_mlp_fc1"), expected[f"{block}.ff.net.0.proj"])
        modulation = delta(f"joint_blocks_{n}_context_block_adaLN_modulation_1")
        want = expected[f"{block}.norm1_context.linear"]
        torch.testing.assert_close(modulation, swap(want) if n == last else want)
    torch.testing.assert_close(delta("final_layer_adaLN_modulation_1"), swap(expected["norm_out.linear"]))
