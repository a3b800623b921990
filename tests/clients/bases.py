"""Bases at the widths real clients recognise a family by, with the depth cut down, and the fixed inputs
every client is fed. Built in tuner's own environment and saved with ``save_pretrained``.

ComfyUI and InvokeAI tell SD1.5 from SD2 and SDXL by tensor shapes (320/640/1280 U-Net channels, a 768-wide
text encoder), and ComfyUI builds its CLIP text encoder from its own fixed config (12 layers, 49408 tokens),
so the text encoder here is CLIP-L's full size (123M parameters); the U-Net keeps SD1.5's widths with one
ResNet per block. The VAE is tiny: no client check reads it.
"""

from __future__ import annotations

from pathlib import Path

import torch

CLIP_L_BOS, CLIP_L_EOS, CLIP_L_TOKENS = 49406, 49407, 77


def build_sd15(folder: Path, seed: int = 0) -> Path:
    """SD1.5 at real widths, one ResNet per U-Net block, CLIP-L full size, a character tokenizer."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tuner.export.formats import legacy_text_encoder_keys
    from tuner.models.tiny import char_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=CLIP_L_TOKENS,
            bos_token_id=CLIP_L_BOS,
            eos_token_id=CLIP_L_EOS,
            pad_token_id=CLIP_L_EOS,
            hidden_act="quick_gelu",
        )
    )
    scheduler = DDPMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=char_tokenizer(CLIP_L_TOKENS),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    legacy_text_encoder_keys(folder / "text_encoder")  # as the real SD1.5 folder has them: every reader reads these
    return folder


def inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    """What every client's denoiser and text encoder are fed: latents, a timestep, a context, token ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 49000, (1, CLIP_L_TOKENS), generator=g)
    ids[0, 0], ids[0, 20:] = CLIP_L_BOS, CLIP_L_EOS  # a prompt of 19 tokens, padded with the end token
    return {
        "latents": torch.randn(1, 4, 8, 8, generator=g),
        "timestep": torch.tensor([500.0]),
        "context": torch.randn(1, CLIP_L_TOKENS, 768, generator=g),
        "ids": ids,
    }
