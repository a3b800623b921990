"""Stable Diffusion 1.x: one CLIP text encoder, a U-Net, a KL VAE, a DDPM-type scheduler.

What differs from the shared behaviour in base.py: the kohya names of its modules, and the original
single-file layout (tuner/models/ldm_layout.py).
"""

from __future__ import annotations

from tuner.models import real, tiny
from tuner.models.base import Family
from tuner.models.ldm_layout import to_original
from tuner.models.real import RealWidths


class SD15(Family):
    NAME = "sd15"
    EXPORTS = ("diffusers", "kohya", "peft", "merged", "single_file")
    DEFAULT_EXPORTS = ("diffusers", "kohya")  # diffusers and peft load the first, A1111/ComfyUI the second
    KOHYA_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te"}
    BASE_VERSION = "sd_v1"
    MODELSPEC_ARCHITECTURE = "stable-diffusion-v1"
    WIDTHS = frozenset({768})  # CLIP-L's, the U-Net's cross-attention input
    SAMPLE_FILES = (
        {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (4, 768)},
        {"lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k": (4, 768)},  # original (LDM) names
    )
    CLIENTS = {
        "comfyui": {"model": "SD15", "clips": ("l",), "tokenizer": "sd1_clip.SD1Tokenizer",
                    "missing": r"clip_l\.(logit_scale|transformer\.text_projection\.weight)"},  # CLIP's image-text head
        "invokeai": {"base": "sd-1"},
    }  # fmt: skip

    def build_tiny(self, seed: int = 0, size: str = "test") -> dict:
        """SD1.x's classes at one of ``tiny.SIZES`` (``test``, ``layout``: SD1.5's block structure, ...)."""
        return tiny.build_components(tiny.SIZES[size], seed)

    def real_widths(self) -> RealWidths:
        """SD1.5's U-Net (diffusers' defaults are its shape), CLIP-L, its VAE: built whole."""

        def unet(units):
            from diffusers import UNet2DConditionModel

            return UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)

        return RealWidths(
            unet, None, real.unet_inputs(768), lambda: [real.clip(768, 12, 12)], real.vae,
            published={"SD1.5 LoRA 512 px target": "<= 3 GB"},
        )  # fmt: skip

    def pipeline_extras(self) -> dict:
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def img2img(self, pipe):
        from diffusers import StableDiffusionImg2ImgPipeline

        return StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)

    def kohya_module_name(self, component: str, name: str, config) -> str:
        """A module's name as kohya, A1111 and ComfyUI spell it for SD1.x: diffusers' U-Net names (kohya trains
        SD1.x on the diffusers U-Net) and CLIP names under ``text_model.`` (which transformers 5 dropped)."""
        if component.startswith("text_encoder") and not name.startswith("text_model."):
            return f"text_model.{name}"
        return name

    def single_file_state(self, modules: dict, vocab_sizes: dict[str, int]) -> dict:
        """unet, vae and text_encoder in the original single-file layout (the base's vocabulary rows only)."""

        unet, vae = modules["unet"], modules["vae"]
        text = base_vocabulary(modules["text_encoder"], vocab_sizes["text_encoder"])
        return to_original(unet.state_dict(), dict(unet.config), vae.state_dict(), dict(vae.config), text)


def base_vocabulary(text_encoder, vocab_size: int) -> dict:
    """A text encoder's state dict with only the base's ``vocab_size`` token rows (new tokens ship as embeddings)."""
    text = dict(text_encoder.state_dict())
    key = next(k for k in text if k.endswith("token_embedding.weight"))
    text[key] = text[key][:vocab_size]
    return text
