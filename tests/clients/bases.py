"""Bases at the widths real clients recognise a family by, with the depth cut down, and the fixed inputs
every client is fed. Built in tuner's own environment and saved with ``save_pretrained``; SDXL's below.

ComfyUI and InvokeAI tell SD1.5 from SD2 by tensor shapes (320/640/1280 U-Net channels; a 768-wide CLIP-L or
a 1024-wide OpenCLIP-H text encoder, 64-channel attention heads in SD2), and ComfyUI builds its text encoder
from its own fixed config (12 or 24 layers, 49408 tokens), so the text encoder here is the real one's size
(123M parameters for SD1.5; SD2's is the 23 layers diffusers keeps, 340M); the U-Net keeps the real widths with
one ResNet per block. The VAE is tiny: no client check reads it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tuner.models import get_family

BOS, EOS, TOKENS = 49406, 49407, 77


@dataclass(frozen=True)
class RealWidths:
    context: int  # the text encoder's width: the U-Net's cross-attention input
    text_layers: int
    text_heads: int
    head_channels: int | None  # SD2's fixed 64-channel heads; SD1.5: 8 heads at every level
    sd2: bool  # linear projections in the transformers, GELU, v-prediction

    def text_config(self, layers: int | None = None, **extra):
        """The CLIP's config; ``layers`` cuts its depth (for InvokeAI alone, which reads the folder's configs)."""
        from transformers import CLIPTextConfig

        return CLIPTextConfig(
            vocab_size=49408,
            hidden_size=self.context,
            intermediate_size=4 * self.context,
            num_hidden_layers=layers or self.text_layers,
            num_attention_heads=self.text_heads,
            max_position_embeddings=TOKENS,
            bos_token_id=BOS,
            eos_token_id=EOS,
            pad_token_id=EOS,
            hidden_act="gelu" if self.sd2 else "quick_gelu",
            **extra,
        )


CLIP_L = RealWidths(context=768, text_layers=12, text_heads=12, head_channels=None, sd2=False)


def widths(family: str) -> RealWidths:
    """The family's real widths, read from its real-width model (``Family.real_widths``) built on the meta device:
    its first text encoder's width, depth and heads, its U-Net's head size and projections."""
    from accelerate import init_empty_weights

    real = get_family(family).real_widths()
    with init_empty_weights():
        text, unet = real.text_encoders()[0].config, real.denoiser(1).config
    heads = unet.attention_head_dim  # diffusers' name for a head count (SD1.5: 8 heads at every level)
    head_channels = None if isinstance(heads, int) else unet.block_out_channels[0] // heads[0]
    return RealWidths(
        text.hidden_size, text.num_hidden_layers, text.num_attention_heads, head_channels, unet.use_linear_projection
    )


def context_width(family: str) -> int:
    """The width of the family's U-Net's cross-attention input (SDXL's: both CLIPs side by side)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return get_family(family).real_widths().denoiser(1).config.cross_attention_dim


def tiny_vae():
    """A four-level VAE (the 8x downscale of the real ones) at tiny widths: no client check reads it."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
    )


def build(family: str, folder: Path, seed: int = 0, text_layers: int | None = None) -> Path:
    """The family's pipeline at real widths (one ResNet per U-Net block), a character tokenizer; the text
    encoders at their real depth, or ``text_layers`` deep where no client builds them from its own config
    (InvokeAI reads the folder's: only ComfyUI needs them whole)."""
    if family == "sdxl":
        return build_sdxl(folder, seed, text_layers)
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from tuner.export.formats import legacy_text_encoder_keys
    from tuner.models.tiny import char_tokenizer

    w, channels = widths(family), (320, 640, 1280, 1280)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=w.context,
        # diffusers' attention_head_dim is a head count: SD1.5 has 8 heads, SD2 64-channel heads
        attention_head_dim=tuple(c // w.head_channels for c in channels) if w.head_channels else 8,
        use_linear_projection=w.sd2,
    )
    vae = tiny_vae()
    scheduler = DDPMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        steps_offset=1,
        prediction_type="v_prediction" if w.sd2 else "epsilon",
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(w.text_config(text_layers)),
        tokenizer=char_tokenizer(TOKENS),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    legacy_text_encoder_keys(folder / "text_encoder")  # as the real folders have them: every reader reads these
    return folder


def inputs(family: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """What every client's denoiser and text encoder are fed: latents, a timestep, a context, token ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 49000, (1, TOKENS), generator=g)
    ids[0, 0], ids[0, 20:] = BOS, EOS  # a prompt of 19 tokens, padded with the end token
    out = {
        "latents": torch.randn(1, 4, 8, 8, generator=g),
        "timestep": torch.tensor([500.0]),
        "context": torch.randn(1, TOKENS, context_width(family), generator=g),
        "ids": ids,
    }
    if family == "sdxl":  # the pooled prompt and the size/crop ids of the added embedding
        out |= {"text_embeds": torch.randn(1, 1280, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    return out


def build_sdxl(folder: Path, seed: int = 0, text_layers: int | None = None) -> Path:
    """SDXL's U-Net at its real widths and block structure (two ResNets per block, no attention at the top
    level, 64-channel heads, 2048-wide context, the text_time embedding) with transformer depths 1 and 2 where
    SDXL has 2 and 10: the depths of Segmind's SDXL distillation Vega, which ComfyUI knows (``Segmind_Vega``, a
    subclass of its SDXL: the same model class, CLIPs and LoRA names). CLIP-L and OpenCLIP-bigG at their full
    size (ComfyUI builds its 12- and 32-layer text encoders from its own configs and reads SDXL's penultimate
    layer of each): 1.7 B parameters in all, 6.7 GB in fp32; or ``text_layers`` deep for InvokeAI alone."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from tuner.export.formats import legacy_text_encoder_keys
    from tuner.models.sdxl import real_unet as sdxl_unet
    from tuner.models.tiny import char_tokenizer

    torch.manual_seed(seed)
    unet = sdxl_unet((1, 1, 2), sample_size=8)
    vae = tiny_vae()
    clip_l = CLIP_L
    clip_g = RealWidths(context=1280, text_layers=32, text_heads=20, head_channels=None, sd2=True)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(clip_l.text_config(text_layers)),
        text_encoder_2=CLIPTextModelWithProjection(clip_g.text_config(text_layers, projection_dim=1280)),
        tokenizer=char_tokenizer(TOKENS),
        tokenizer_2=char_tokenizer(TOKENS),
        unet=unet,
        scheduler=EulerDiscreteScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1
        ),
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    legacy_text_encoder_keys(folder / "text_encoder")
    return folder


def build_flux(folder: Path, seed: int = 0) -> Path:
    """Flux.1-dev's transformer at the width ComfyUI requires (24 heads of 128 channels: 3072; it reads the
    context and pooled widths from the file) with one double- and one single-stream block, the guidance
    embedding; the real CLIP-L (ComfyUI's own 12-layer config reads its LoRA); a T5 at T5-XXL's 4096 width
    (the width ComfyUI reads a ``t5xxl`` embedding at) with tiny attention and feed-forward; 16 latent
    channels. 0.7 B parameters."""
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextModel

    from tuner.export.formats import legacy_text_encoder_keys
    from tuner.models.tiny import char_tokenizer, save_pipeline
    from tuner.models.tiny import t5_encoder as _t5
    from tuner.models.tiny import tiny_vae as _vae

    components = get_family("flux").build_tiny(seed)
    torch.manual_seed(seed)
    components["transformer"] = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )  # fmt: skip
    components["text_encoder"] = CLIPTextModel(CLIP_L.text_config())
    components["tokenizer"] = char_tokenizer(TOKENS)
    components["text_encoder_2"] = _t5(4096, d_ff=64)
    components["vae"] = _vae(
        latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159
    )
    save_pipeline(components, folder, "flux")
    legacy_text_encoder_keys(folder / "text_encoder")
    return folder


def flux_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    """Flux's transformer inputs: unpacked latents (ComfyUI packs them itself), sigma, guidance, T5's
    sequence, CLIP-L's pooled vector; ``ids`` for CLIP-L."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 49000, (1, TOKENS), generator=g)
    ids[0, 0], ids[0, 20:] = BOS, EOS
    return {
        "latents": torch.randn(1, 16, 8, 8, generator=g),
        "timestep": torch.tensor([0.6]),
        "guidance": torch.tensor([3.5]),
        "context": torch.randn(1, 16, 4096, generator=g),
        "y": torch.randn(1, 768, generator=g),
        "ids": ids,
    }


def build_sd3(folder: Path, seed: int = 0) -> Path:
    """SD3 at the shapes ComfyUI reads an MMDiT's configuration from: its width is 64 per block (two blocks
    of two 64-channel heads: 128), 16 latent channels; small text encoders (ComfyUI's diffusion-model loader
    reads the transformer alone)."""
    from diffusers import SD3Transformer2DModel

    from tuner.models.tiny import save_pipeline
    from tuner.models.tiny import tiny_vae as _vae

    components = get_family("sd3").build_tiny(seed)
    torch.manual_seed(seed)
    components["transformer"] = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=64,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=128, pooled_projection_dim=32,
        pos_embed_max_size=16,
    )  # fmt: skip
    components["vae"] = _vae(
        latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609
    )
    return save_pipeline(components, folder, "sd3")


def sd3_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "latents": torch.randn(1, 16, 8, 8, generator=g),
        "timestep": torch.tensor([500.0]),
        "context": torch.randn(1, 16, 32, generator=g),
        "y": torch.randn(1, 32, generator=g),
    }


def build_flux2_klein(folder: Path, seed: int = 0) -> Path:
    """Flux.2 klein 4B's transformer at its real widths (24 heads of 128 channels: 3072 wide, MLP ratio 3, the
    7680-wide context of three 2560-wide Qwen3-4B layers side by side: the shapes InvokeAI tells klein 4B from
    Flux.1 and the other Flux.2 by) with one double- and one single-stream block; a Qwen3 of the 28 layers the
    pipeline reads (9, 18, 27) at Qwen3-4B's 2560 width with tiny attention and MLP; the tiny VAE. 0.5 B
    parameters."""
    from diffusers import Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from tuner.models.tiny import save_pipeline

    components = get_family("flux2_klein").build_tiny(seed)
    torch.manual_seed(seed)
    components["transformer"] = Flux2Transformer2DModel(
        num_layers=1, num_single_layers=1, num_attention_heads=24, joint_attention_dim=3 * 2560, guidance_embeds=False
    )
    tokenizer = components["tokenizer"]
    components["text_encoder"] = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tokenizer), hidden_size=2560, intermediate_size=16, num_hidden_layers=28,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=128,
            tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        )
    )  # fmt: skip
    return save_pipeline(components, folder, "flux2_klein")


def build_qwen_image(folder: Path, seed: int = 0) -> Path:
    """Qwen-Image's transformer at its real widths (24 heads of 128 channels: 3072 wide, the 3584-wide context of
    Qwen2.5-VL-7B) with one MMDiT block of its 60; a two-layer Qwen2.5-VL at the 3584 width with a tiny MLP and
    vision tower; the tiny VAE and byte-level tokenizer of its tiny pipeline. 0.4 B parameters."""
    from diffusers import QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from tuner.models.qwen_image import DROPPED
    from tuner.models.tiny import save_pipeline

    components = get_family("qwen_image").build_tiny(seed)
    torch.manual_seed(seed)
    components["transformer"] = QwenImageTransformer2DModel(num_layers=1)  # the config's defaults are Qwen-Image's
    tokenizer = components["tokenizer"]
    text = {
        "vocab_size": len(tokenizer), "hidden_size": 3584, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 1024 + DROPPED,
        "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6},
        "pad_token_id": tokenizer.pad_token_id, "bos_token_id": None, "eos_token_id": tokenizer.pad_token_id,
    }  # fmt: skip
    vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 3584,
              "fullatt_block_indexes": [0]}  # fmt: skip
    components["text_encoder"] = Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(text_config=text, vision_config=vision)
    )
    save_pipeline(components, folder, "qwen_image")
    # the published folder's config (transformers 4.x's flat Qwen2.5-VL one) names its vocabulary at the top, where
    # tuner's single-file export reads it; transformers 5 writes it under text_config alone
    config = folder / "text_encoder" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "vocab_size": len(tokenizer)}, indent=2))
    return folder


def build_z_image(folder: Path, seed: int = 0) -> Path:
    """Z-Image's transformer at its real widths (3840 wide, Qwen3-4B's 2560-wide prompt states) with one main layer
    and one refiner of each kind; a two-layer Qwen3 at the 2560 width with a tiny MLP; the tiny VAE and tokenizer of
    its tiny pipeline. 0.55 B parameters."""
    from diffusers import ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from tuner.models.tiny import save_pipeline

    components = get_family("z_image").build_tiny(seed)
    torch.manual_seed(seed)
    components["transformer"] = ZImageTransformer2DModel(n_layers=1, n_refiner_layers=1)  # else Z-Image's config
    tokenizer = components["tokenizer"]
    components["text_encoder"] = Qwen3Model(
        Qwen3Config(
            vocab_size=len(tokenizer), hidden_size=2560, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=128,
            pad_token_id=tokenizer.pad_token_id,
        )
    )  # fmt: skip
    return save_pipeline(components, folder, "z_image")


def build_krea2(folder: Path, seed: int = 0) -> Path:
    """Not built: Krea 2's transformer at its real 6144 width is 1.10 B parameters with one block (its text fusion
    stage's four 2560-wide blocks, 0.34 B, and its shared modulation, 0.23 B, come whole): 4.4 GB per fp32 copy,
    five copies past the CPU tier's memory beside the rest. tests/test_krea2.py checks at tiny widths that InvokeAI's
    probe calls both default LoRA files krea-2 LoRAs and its LoRALoader reads them onto the same modules."""
    import pytest

    pytest.skip(" ".join(build_krea2.__doc__.split()).removeprefix("Not built: "))  # the docstring, one line


# the families InvokeAI runs whose base is not built here, and why
UNBUILT = {
    "flux2": "Flux.2 dev's transformer at its real 6144 width is 2.29 B parameters with one block of each kind "
    "(its shared modulations alone 0.57 B): 9.2 GB per fp32 copy (the base, the run's, peft's merge, InvokeAI's, "
    "its single file), past the CPU tier's memory and minutes. InvokeAI tells dev by the same rules as klein "
    "(a block width or context width that is not Flux.1's) and loads it by the same code",
}
