"""Stable Diffusion 1.x: one CLIP text encoder, a U-Net, a KL VAE, a DDPM-type scheduler.

What differs from the shared behaviour in base.py: the kohya names of its modules, and the original
single-file layout (tuner/models/ldm_layout.py).
"""

from __future__ import annotations

from tuner.models.base import Family
from tuner.models.ldm_layout import to_original


class SD15(Family):
    NAME = "sd15"
    EXPORTS = ("diffusers", "kohya", "peft", "merged", "single_file")
    DEFAULT_EXPORTS = ("diffusers", "kohya")  # diffusers and peft load the first, A1111/ComfyUI the second
    KOHYA_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te"}
    BASE_VERSION = "sd_v1"
    MODELSPEC_ARCHITECTURE = "stable-diffusion-v1"

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
