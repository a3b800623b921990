"""Parts at the real models' widths, which the families' ``real_widths`` build their models from: CLIP and T5
text encoders, the KL VAE, the U-Net families' inputs. Nothing here reads a weight: the memory plan builds
them under a fake-tensor mode, the clients' bases with random weights at reduced depth.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class RealWidths:
    """A family's real model at its real widths and a chosen depth, built on whatever device or fake-tensor mode
    is current: ``denoiser(units)`` with ``units`` of its repeated unit (``real``: how many the real model has;
    None: built whole, ``units`` ignored), ``inputs(resolution, batch, dtype)`` the keyword arguments of one
    denoiser call, ``text_encoders()`` and ``vae()`` its frozen encoders. ``published``: other trainers' memory
    figures, for the plan's table."""

    denoiser: object  # (units: int | None) -> torch.nn.Module
    real: int | None
    inputs: object  # (resolution: int, batch: int, dtype) -> dict of the denoiser's keyword arguments
    text_encoders: object  # () -> list[torch.nn.Module]
    vae: object  # () -> torch.nn.Module
    unit: str = "the whole denoiser"
    published: dict = field(default_factory=dict)


def clip(width: int, layers: int, heads: int, projection: bool = False, projection_dim: int = 1280):
    """A CLIP text encoder of ``width`` x ``layers`` (CLIP-L 768 x 12, OpenCLIP-G 1280 x 32, OpenCLIP-H 1024 x 23)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                            num_attention_heads=heads, projection_dim=projection_dim)  # fmt: skip
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def t5_xxl(layers: int = 24):
    """T5-XXL's encoder (4096 wide, 24 layers): Flux's and SD3's long-prompt encoder."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=layers, vocab_size=32128,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False)  # fmt: skip
    return T5EncoderModel(config)


def qwen3_vl(size: str):
    """Qwen3-VL's model (``Qwen3VLModel``: its language model and vision tower, no LM head) at ``size`` "4B" (2560
    wide, Krea 2's encoder) or "8B" (4096 wide, Ideogram 4's), 36 layers of 32 query and 8 key-value heads of 128."""
    from transformers import Qwen3VLConfig, Qwen3VLModel

    width, mlp, depth, vision_width, vision_mlp = {
        "4B": (2560, 9728, 24, 1024, 4096),
        "8B": (4096, 12288, 27, 1152, 4304),
    }[size]
    rope = {"rope_type": "default", "mrope_section": [24, 20, 20], "rope_theta": 5e6, "mrope_interleaved": True}
    text = {"vocab_size": 151936, "hidden_size": width, "intermediate_size": mlp, "num_hidden_layers": 36,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "rope_parameters": rope}  # fmt: skip
    vision = {"depth": depth, "hidden_size": vision_width, "intermediate_size": vision_mlp, "num_heads": 16,
              "out_hidden_size": width}  # fmt: skip
    return Qwen3VLModel(Qwen3VLConfig(text_config=text, vision_config=vision))


def vae(latent_channels: int = 4):
    """Stable Diffusion's KL VAE (x8 down, four levels), with 4 latent channels (SD1.x, SDXL) or 16 (Flux, SD3)."""
    from diffusers import AutoencoderKL

    blocks = 4
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=latent_channels,
    )  # fmt: skip


def unet_inputs(context: int, added: int | None = None):
    """``inputs(resolution, batch, dtype)`` of a U-Net: 4-channel latents at 1/8 the pixels, 77 tokens of
    ``context`` width, and (``added``: the pooled width) SDXL's pooled prompt and six time ids."""

    def make(resolution: int, batch: int, dtype) -> dict:
        side = resolution // 8
        x = {
            "sample": torch.randn(batch, 4, side, side, dtype=dtype),
            "timestep": torch.randint(0, 1000, (batch,)),
            "encoder_hidden_states": torch.randn(batch, 77, context, dtype=dtype),
        }
        if added:
            x["added_cond_kwargs"] = {
                "text_embeds": torch.randn(batch, added, dtype=dtype),
                "time_ids": torch.randn(batch, 6, dtype=dtype),
            }
        return x

    return make
