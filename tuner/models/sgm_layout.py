"""Diffusers SDXL weights renamed into the original (Stability "SGM" / generative-models) single-file layout.

A1111, ComfyUI and diffusers' ``StableDiffusionXLPipeline.from_single_file`` read one ``.safetensors``
file whose keys follow Stability's training code:

    model.diffusion_model.*                        U-Net: SD1.x's flat numbering (see ``ldm_layout``), plus
                                                   the added time/pooled-text embedding ``label_emb.0.{0,2}``
    first_stage_model.*                            VAE, exactly as in SD1.x
    conditioner.embedders.0.transformer.text_model.*   CLIP ViT-L, transformers' own names
    conditioner.embedders.1.model.*                OpenCLIP ViT-bigG, OpenCLIP's names

The second encoder is stored the OpenCLIP way, as SD2's (``ldm_layout.open_clip_state``), with its
``text_projection``.

A key that matches no rule raises: a layout this module does not know is never written half-renamed.
"""

from __future__ import annotations

import re

import torch

from .ldm_layout import UNET_PREFIX, VAE_PREFIX, open_clip_state, unet_key, vae_key

CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

_UNET_ADDED = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
_CLIP_L_KEY = re.compile(
    r"embeddings\.(token|position)_embedding\.weight|final_layer_norm\.(weight|bias)"
    r"|encoder\.layers\.\d+\.(self_attn\.[qkv]_proj|self_attn\.out_proj|layer_norm[12]|mlp\.fc[12])\.(weight|bias)"
)


def sdxl_unet_key(key: str, layers_per_block: int, up_attention: list[bool]) -> str:
    """The SGM-layout name (without prefix) of one diffusers SDXL U-Net state-dict key."""
    for diffusers, original in _UNET_ADDED.items():
        if key.startswith(diffusers + "."):
            return original + key[len(diffusers) :]
    try:
        return unet_key(key, layers_per_block, up_attention)
    except ValueError:
        raise ValueError(f"U-Net key {key!r} has no place in the original SDXL layout") from None


def _unet(unet: dict, config: dict) -> dict:
    if config.get("addition_embed_type") != "text_time" or config.get("class_embed_type"):
        raise ValueError("only SDXL U-Nets (addition_embed_type='text_time', no class embedding) have this layout")
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise ValueError(f"layers_per_block={layers}: the original layout needs one count for every level")
    up_attention = ["CrossAttn" in name for name in config["up_block_types"]]
    return {UNET_PREFIX + sdxl_unet_key(k, layers, up_attention): v for k, v in unet.items()}


def _vae(vae: dict, config: dict) -> dict:
    levels = len(config["block_out_channels"])
    out = {}
    for k, v in vae.items():
        name = VAE_PREFIX + vae_key(k, levels)
        # the original VAE attention is 1x1 convolutions
        out[name] = v[:, :, None, None] if ".mid.attn_1." in name and v.ndim == 2 else v
    return out


def _clip_l(text_encoder: dict) -> dict:
    out = {}
    for k, v in text_encoder.items():
        name = k.removeprefix("text_model.")  # transformers 5 dropped the level that the layout keeps
        if not _CLIP_L_KEY.fullmatch(name):
            raise ValueError(f"text_encoder key {k!r} has no place in the CLIP ViT-L layout")
        out[f"{CLIP_L_PREFIX}text_model.{name}"] = v
    return out


def _open_clip(text_encoder_2: dict) -> dict:
    out = open_clip_state(text_encoder_2, OPEN_CLIP_PREFIX, "text_encoder_2")
    if OPEN_CLIP_PREFIX + "text_projection" not in out:
        raise ValueError("text_encoder_2 has no text_projection: SDXL's second encoder is CLIPTextModelWithProjection")
    return out


def to_original(
    unet: dict, unet_config: dict, vae: dict, vae_config: dict, text_encoder: dict, text_encoder_2: dict
) -> dict:
    """One SGM-layout state dict from the four components' diffusers/transformers state dicts."""
    out = {}
    for part in (_unet(unet, unet_config), _vae(vae, vae_config), _clip_l(text_encoder), _open_clip(text_encoder_2)):
        if clash := out.keys() & part.keys():
            raise ValueError(f"two weights map to the same key: {sorted(clash)[:3]}")
        out.update(part)
    return {k: v.contiguous() for k, v in out.items() if isinstance(v, torch.Tensor)}
