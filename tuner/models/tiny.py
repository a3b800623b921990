"""Tiny Stable Diffusion 1.x pipelines built from the real diffusers and transformers classes.

They are saved with ``save_pretrained`` and loaded back through exactly the code path a user's
SD1.5 checkpoint takes, so tests and the embedded ``digits`` base exercise the real loaders.
The text side is a frozen CLIP text encoder over a character-level vocabulary that tuner writes
itself: any lower-case prompt can be tokenized, and no tokenizer files come from a hub.
"""

from __future__ import annotations

import json
import string
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CHARACTERS = string.ascii_lowercase + string.digits + ".,:;!?'\"-_()[]/&+*#%@=<>"


@dataclass(frozen=True)
class TinySize:
    """Widths of a tiny SD1.x pipeline. ``image_size`` is the pixel resolution it is meant for."""

    unet_channels: tuple[int, ...] = (64, 128)
    vae_channels: tuple[int, ...] = (32, 64)
    text_width: int = 64
    text_layers: int = 2
    max_tokens: int = 48
    image_size: int = 16
    layers_per_block: int = 1  # ResNets per down block (up blocks have one more), U-Net and VAE
    attention_levels: int = 1  # how many of the U-Net's levels, from the top, have cross-attention


SIZES = {
    # the embedded default: ~3M-parameter U-Net, 16 px images, 8x8 latents
    "digits": TinySize(),
    # for unit tests: builds and runs in a blink
    "test": TinySize(unet_channels=(16, 32), vae_channels=(8, 16), text_width=16, text_layers=1),
    # SD1.5's block structure (four levels, cross-attention on the first three, two ResNets per down
    # block, four-level VAE) at small widths: what the original single-file layout assumes
    "sd15": TinySize(
        unet_channels=(16, 16, 32, 32),
        vae_channels=(8, 8, 16, 16),
        text_width=16,
        text_layers=2,
        image_size=32,
        layers_per_block=2,
        attention_levels=3,
    ),
}


def write_char_tokenizer(folder: Path, max_tokens: int) -> None:
    """Write a CLIPTokenizer whose vocabulary is single characters (BPE with no merges)."""
    folder.mkdir(parents=True, exist_ok=True)
    tokens = [BOS, EOS] + list(CHARACTERS) + [c + "</w>" for c in CHARACTERS]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_tokens, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


def char_tokenizer(max_tokens: int):
    """A CLIPTokenizer over the character vocabulary, loaded the way a pipeline folder's would be."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as folder:
        write_char_tokenizer(Path(folder), max_tokens)
        return CLIPTokenizer.from_pretrained(folder)


def build_components(size: TinySize, seed: int = 0) -> dict:
    """Build freshly initialised SD1.x pipeline components of the given size (deterministic for a seed)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab_size = 2 + 2 * len(CHARACTERS)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=size.image_size // 2 ** (len(size.vae_channels) - 1),
        in_channels=4,
        out_channels=4,
        block_out_channels=size.unet_channels,
        layers_per_block=size.layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * size.attention_levels
        + ("DownBlock2D",) * (len(size.unet_channels) - size.attention_levels),
        up_block_types=("UpBlock2D",) * (len(size.unet_channels) - size.attention_levels)
        + ("CrossAttnUpBlock2D",) * size.attention_levels,
        cross_attention_dim=size.text_width,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=size.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(size.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(size.vae_channels),
        latent_channels=4,
        layers_per_block=size.layers_per_block,
        norm_num_groups=8,
        sample_size=size.image_size,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=size.text_width,
            intermediate_size=size.text_width * 2,
            num_hidden_layers=size.text_layers,
            num_attention_heads=4,
            max_position_embeddings=size.max_tokens,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    # Stable Diffusion's own schedule; clip_sample=False matters for latent diffusion
    scheduler = DDPMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        num_train_timesteps=1000,
        clip_sample=False,
        prediction_type="epsilon",
        steps_offset=1,
    )
    tokenizer = char_tokenizer(size.max_tokens)
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }


def save_pipeline(components: dict, folder: Path) -> Path:
    """Save components as a diffusers StableDiffusionPipeline folder (safetensors weights)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        **components,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def make_tiny_pipeline(folder: Path, size: str = "test", seed: int = 0) -> Path:
    """Build a tiny randomly initialised SD1.x pipeline and save it to ``folder``."""
    return save_pipeline(build_components(SIZES[size], seed), Path(folder))
