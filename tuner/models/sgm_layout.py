"""Diffusers SDXL weights renamed into the original (Stability "SGM" / generative-models) single-file layout.

A1111, ComfyUI and diffusers' ``StableDiffusionXLPipeline.from_single_file`` read one ``.safetensors``
file whose keys follow Stability's training code:

    model.diffusion_model.*                        U-Net: SD1.x's flat numbering (see ``ldm_layout``), plus
                                                   the added time/pooled-text embedding ``label_emb.0.{0,2}``
    first_stage_model.*                            VAE, exactly as in SD1.x
    conditioner.embedders.0.transformer.text_model.*   CLIP ViT-L, transformers' own names
    conditioner.embedders.1.model.*                OpenCLIP ViT-bigG, OpenCLIP's names

The second encoder is stored the OpenCLIP way: ``token_embedding.weight``, ``positional_embedding`` (a bare
tensor), ``transformer.resblocks.N.{ln_1, attn, ln_2, mlp.c_fc, mlp.c_proj}`` where ``attn.in_proj_*`` is
q, k and v concatenated along the output dimension, ``ln_final`` and ``text_projection``, the bare
``[width, projection]`` matrix that multiplies from the right (the transpose of the Linear weight).

A key that matches no rule raises: a layout this module does not know is never written half-renamed.
"""

from __future__ import annotations

import re

import torch

from .ldm_layout import UNET_PREFIX, VAE_PREFIX, unet_key, vae_key

CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

_UNET_ADDED = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
_CLIP_L_KEY = re.compile(
    r"embeddings\.(token|position)_embedding\.weight|final_layer_norm\.(weight|bias)"
    r"|encoder\.layers\.\d+\.(self_attn\.[qkv]_proj|self_attn\.out_proj|layer_norm[12]|mlp\.fc[12])\.(weight|bias)"
)
_OPEN_CLIP_FIXED = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


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


def open_clip_key(key: str) -> str:
    """The OpenCLIP name (without prefix) of one CLIPTextModelWithProjection key other than q/k/v."""
    if key == "text_projection.weight":
        return "text_projection"
    name = key.removeprefix("text_model.")
    if name in _OPEN_CLIP_FIXED:
        return _OPEN_CLIP_FIXED[name]
    if m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", name):
        if m[2] in _OPEN_CLIP_LAYER:
            return f"transformer.resblocks.{m[1]}.{_OPEN_CLIP_LAYER[m[2]]}.{m[3]}"
    raise ValueError(f"text_encoder_2 key {key!r} has no place in the OpenCLIP layout")


def _open_clip(text_encoder_2: dict) -> dict:
    out, qkv = {}, {}
    for k, v in text_encoder_2.items():
        if m := re.fullmatch(r"(?:text_model\.)?encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", k):
            qkv.setdefault((int(m[1]), m[3]), {})[m[2]] = v
        else:
            name = open_clip_key(k)  # OpenCLIP multiplies x @ text_projection: the Linear weight transposed
            out[OPEN_CLIP_PREFIX + name] = v.T if name == "text_projection" else v
    for (layer, kind), parts in sorted(qkv.items()):
        if sorted(parts) != ["k", "q", "v"]:
            raise ValueError(f"text_encoder_2 layer {layer}: {kind} of q/k/v incomplete ({sorted(parts)})")
        name = f"{OPEN_CLIP_PREFIX}transformer.resblocks.{layer}.attn.in_proj_{kind}"
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
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
