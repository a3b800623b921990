"""Stable Diffusion 1.x: one CLIP text encoder, a U-Net, a KL VAE, a DDPM-type scheduler.

Everything the training loop needs to know about the family lives here, so the loop itself never
branches on the family: loading from a local diffusers folder, prompt encoding, the training
target, a sampling pipeline and saving LoRA weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tuner.config import ConfigError

PIPELINE_CLASSES = {"StableDiffusionPipeline"}
# how exports name this family: kohya's key prefixes, ss_base_model_version, modelspec.architecture
KOHYA_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te"}
BASE_VERSION = "sd_v1"
MODELSPEC_ARCHITECTURE = "stable-diffusion-v1"


@dataclass
class Components:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    noise_scheduler: object
    prediction_type: str


def check_folder(path: str | Path, allow_pickle: bool = False) -> Path:
    """Check that ``path`` is a local diffusers folder of this family, before anything loads.

    Raises:
        ConfigError: the folder is missing, is not a diffusers pipeline, is of another family, or
            holds a component only as pickled ``.bin`` weights (unless ``allow_pickle``).
    """
    folder = Path(path).expanduser()
    index = folder / "model_index.json"
    if not folder.is_dir():
        raise ConfigError(f"model.path={path}: no such folder. Point it at a local diffusers pipeline folder.")
    if not index.is_file():
        raise ConfigError(
            f"model.path={path}: no model_index.json, so this is not a diffusers pipeline folder. "
            "Single-file checkpoints are not supported yet: convert one with diffusers first."
        )
    name = json.loads(index.read_text()).get("_class_name")
    if name not in PIPELINE_CLASSES:
        raise ConfigError(
            f"model.path={path} holds a {name}, not a Stable Diffusion 1.x pipeline; "
            f"choose the matching model=... family."
        )
    for component in ("unet", "vae", "text_encoder"):
        files = list((folder / component).glob("*.safetensors"))
        if not files and not allow_pickle:
            raise ConfigError(
                f"model.path={path}: {component}/ has no .safetensors weights. tuner never unpickles a file you did "
                "not allow: convert it to safetensors, or pass model.allow_pickle=true (read with weights_only=True)"
            )
    return folder


def load(path: str | Path, prediction_type: str | None = None, allow_pickle: bool = False) -> Components:
    """Load the components from a local diffusers folder, offline, weights from safetensors only
    (``allow_pickle``: .bin where there is no .safetensors, which diffusers and transformers read with
    ``torch.load(weights_only=True)``)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = check_folder(path, allow_pickle)
    kwargs = {"use_safetensors": None if allow_pickle else True}
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", **kwargs)
    vae = AutoencoderKL.from_pretrained(folder / "vae", **kwargs)
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", **kwargs)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
    prediction_type = prediction_type or scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ConfigError(f"model.prediction_type={prediction_type}: use epsilon or v_prediction")
    scheduler.register_to_config(prediction_type=prediction_type)
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False).eval()
    return Components(unet, vae, text_encoder, tokenizer, scheduler, prediction_type)


def tokenize(c: Components, prompts: list[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's length; multi-vector embedding tokens expanded as diffusers does."""
    from diffusers.loaders.textual_inversion import TextualInversionLoaderMixin

    prompts = TextualInversionLoaderMixin().maybe_convert_prompt(list(prompts), c.tokenizer)
    return c.tokenizer(
        prompts,
        padding="max_length",
        max_length=c.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def encode_ids(text_encoder: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The text encoder's last hidden states, the U-Net's cross-attention input (with gradients)."""
    return text_encoder(ids.to(next(text_encoder.parameters()).device))[0]


@torch.no_grad()
def encode_prompts(c: Components, prompts: list[str]) -> torch.Tensor:
    return encode_ids(c.text_encoder, tokenize(c, prompts))


def noise_target(c: Components, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
    """What the U-Net is trained to predict at these timesteps."""
    if c.prediction_type == "v_prediction":
        return c.noise_scheduler.get_velocity(latents, noise, timesteps)
    return noise


def pipeline(c: Components):
    """A StableDiffusionPipeline over the in-memory components, sampling with DDIM."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        unet=c.unet,
        vae=c.vae,
        text_encoder=c.text_encoder,
        tokenizer=c.tokenizer,
        scheduler=DDIMScheduler.from_config(c.noise_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_lora(folder: Path, layers: dict[str, tuple[dict, dict]]) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` the way diffusers itself does, each LoRA config in its metadata.

    Args:
        layers: ``{"unet" | "text_encoder": (peft state dict, LoraConfig as a dict)}``.
    """
    from diffusers import StableDiffusionPipeline

    kwargs = {}
    for name, (state, config) in layers.items():
        kwargs[f"{name}_lora_layers"] = state
        kwargs[f"{name}_lora_adapter_metadata"] = config
    StableDiffusionPipeline.save_lora_weights(folder, safe_serialization=True, **kwargs)
    return folder / "pytorch_lora_weights.safetensors"


def img2img(pipe):
    """The image-to-image pipeline over the same modules."""
    from diffusers import StableDiffusionImg2ImgPipeline

    return StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)


def load_pipeline(path: str | Path):
    """The family's diffusers pipeline loaded from a folder, for serving and tests."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(check_folder(path), use_safetensors=True)


def kohya_module_name(component: str, name: str) -> str:
    """A module's name as kohya, A1111 and ComfyUI spell it for SD1.x: diffusers' U-Net names (kohya trains
    SD1.x on the diffusers U-Net) and CLIP names under ``text_model.`` (which transformers 5 dropped)."""
    if component == "text_encoder" and not name.startswith("text_model."):
        return f"text_model.{name}"
    return name


def pipeline_with(path: str | Path, **components):
    """The pipeline of the base folder ``path`` (its scheduler and extras) with the given modules in place."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(check_folder(path), use_safetensors=True, **components)


def single_file_state(modules: dict, vocab_size: int) -> dict:
    """unet, vae and text_encoder in the original single-file layout (the base's ``vocab_size`` rows only)."""
    from tuner.models.ldm_layout import to_original

    text = dict(modules["text_encoder"].state_dict())
    key = next(k for k in text if k.endswith("token_embedding.weight"))
    text[key] = text[key][:vocab_size]
    unet, vae = modules["unet"], modules["vae"]
    return to_original(unet.state_dict(), dict(unet.config), vae.state_dict(), dict(vae.config), text)
