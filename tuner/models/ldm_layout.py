"""Diffusers weights renamed into the original (CompVis / LDM) single-file layout of Stable Diffusion 1.x and 2.x.

A1111, ComfyUI and diffusers' ``from_single_file`` read one ``.safetensors`` file whose keys follow the
original training code: ``model.diffusion_model.*`` (U-Net), ``first_stage_model.*`` (VAE) and
``cond_stage_model.transformer.text_model.*`` (CLIP). The U-Net's numbering is flat: with ``L`` ResNets
per down block, ``input_blocks.0`` is ``conv_in``, down block ``i`` layer ``j`` is ``input_blocks.{i(L+1)+j+1}``
and its downsampler ``input_blocks.{(i+1)(L+1)}``; up blocks have ``L+1`` layers, numbered
``output_blocks.{i(L+1)+j}``. Inside a layer, ``.0`` is the ResNet and ``.1`` the transformer (the
upsampler follows them). The VAE's decoder counts its levels from the bottom up; its attention uses
1x1 convolutions where diffusers uses linear layers.

SD2's text encoder is OpenCLIP's, under ``cond_stage_model.model.``: ``token_embedding.weight``,
``positional_embedding`` (a bare tensor), ``transformer.resblocks.N.{ln_1, attn, ln_2, mlp.c_fc, mlp.c_proj}``
where ``attn.in_proj_*`` is q, k and v concatenated along the output dimension, and ``ln_final`` (SDXL's
second encoder adds ``text_projection``, the bare matrix that multiplies from the right).

A key that matches no rule raises: a layout this module does not know is never written half-renamed.
"""

from __future__ import annotations

import re

import torch

UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD2's text encoder

_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
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


_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_FIXED = {"conv_norm_out": "norm_out"}


def _resnet(rest: str, names: dict[str, str]) -> str:
    head, _, tail = rest.partition(".")
    return f"{names.get(head, head)}.{tail}"


def unet_key(key: str, layers_per_block: int, up_attention: list[bool]) -> str:
    """The original-layout name (without prefix) of one diffusers U-Net state-dict key."""
    n = layers_per_block + 1
    for diffusers, original in _UNET_FIXED.items():
        if key.startswith(diffusers + "."):
            return original + key[len(diffusers) :]
    if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        i, j, rest = int(m[1]), int(m[2]), m[3]
        return f"input_blocks.{i * n + j + 1}.0.{_resnet(rest, _UNET_RESNET)}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        return f"input_blocks.{int(m[1]) * n + int(m[2]) + 1}.1.{m[3]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * n}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2], _UNET_RESNET)}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"output_blocks.{int(m[1]) * n + int(m[2])}.0.{_resnet(m[3], _UNET_RESNET)}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        return f"output_blocks.{int(m[1]) * n + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        i = int(m[1])
        return f"output_blocks.{i * n + n - 1}.{2 if up_attention[i] else 1}.conv.{m[2]}"
    raise ValueError(f"U-Net key {key!r} has no place in the original SD1.x layout")


def vae_key(key: str, levels: int) -> str:
    """The original-layout name (without prefix) of one diffusers AutoencoderKL state-dict key."""
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return key
    part, _, key = key.partition(".")  # encoder | decoder
    for diffusers, original in _VAE_FIXED.items():
        if key.startswith(diffusers + "."):
            return f"{part}.{original}{key[len(diffusers) :]}"
    if key.startswith(("conv_in.", "conv_out.")):
        return f"{part}.{key}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"{part}.down.{m[1]}.block.{m[2]}.{_resnet(m[3], {'conv_shortcut': 'nin_shortcut'})}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"{part}.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        level = levels - 1 - int(m[1])
        return f"{part}.up.{level}.block.{m[2]}.{_resnet(m[3], {'conv_shortcut': 'nin_shortcut'})}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"{part}.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{part}.mid.block_{int(m[1]) + 1}.{_resnet(m[2], {'conv_shortcut': 'nin_shortcut'})}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
        if m[1] in _VAE_ATTENTION:
            return f"{part}.mid.attn_1.{_VAE_ATTENTION[m[1]]}.{m[2]}"
    raise ValueError(f"VAE key {part}.{key!r} has no place in the original SD1.x layout")


def open_clip_key(key: str) -> str:
    """The OpenCLIP name (without prefix) of one CLIP text encoder key other than q/k/v."""
    if key == "text_projection.weight":
        return "text_projection"
    name = key.removeprefix("text_model.")
    if name in _OPEN_CLIP_FIXED:
        return _OPEN_CLIP_FIXED[name]
    if m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", name):
        if m[2] in _OPEN_CLIP_LAYER:
            return f"transformer.resblocks.{m[1]}.{_OPEN_CLIP_LAYER[m[2]]}.{m[3]}"
    raise ValueError(f"text encoder key {key!r} has no place in the OpenCLIP layout")


def open_clip_state(text_encoder: dict, prefix: str, component: str = "text_encoder") -> dict:
    """A transformers CLIP text encoder's state dict in OpenCLIP's layout under ``prefix``: SD2's only encoder
    (``cond_stage_model.model.``) and SDXL's second."""
    out, qkv = {}, {}
    for k, v in text_encoder.items():
        if m := re.fullmatch(r"(?:text_model\.)?encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", k):
            qkv.setdefault((int(m[1]), m[3]), {})[m[2]] = v
        else:
            name = open_clip_key(k)  # OpenCLIP multiplies x @ text_projection: the Linear weight transposed
            out[prefix + name] = v.T if name == "text_projection" else v
    for (layer, kind), parts in sorted(qkv.items()):
        if sorted(parts) != ["k", "q", "v"]:
            raise ValueError(f"{component} layer {layer}: {kind} of q/k/v incomplete ({sorted(parts)})")
        name = f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def to_original(
    unet: dict, unet_config: dict, vae: dict, vae_config: dict, text_encoder: dict, open_clip: bool = False
) -> dict:
    """One original-layout state dict from the three components' diffusers/transformers state dicts;
    ``open_clip``: SD2's text encoder, in OpenCLIP's layout under ``cond_stage_model.model.``."""
    if unet_config.get("addition_embed_type") or unet_config.get("class_embed_type"):
        raise ValueError("only SD1.x/2.x U-Nets (no added conditioning) have this single-file layout")
    layers = unet_config["layers_per_block"]
    if not isinstance(layers, int):
        raise ValueError(f"layers_per_block={layers}: the original layout needs one count for every level")
    up_attention = ["CrossAttn" in name for name in unet_config["up_block_types"]]
    out = {UNET_PREFIX + unet_key(k, layers, up_attention): v for k, v in unet.items()}
    levels = len(vae_config["block_out_channels"])
    for k, v in vae.items():
        name = VAE_PREFIX + vae_key(k, levels)
        # the original VAE attention is 1x1 convolutions
        out[name] = v[:, :, None, None] if ".mid.attn_1." in name and v.ndim == 2 else v
    if open_clip:
        out.update(open_clip_state(text_encoder, OPEN_CLIP_PREFIX))
    else:
        for k, v in text_encoder.items():  # transformers 5 dropped the text_model. level the layout keeps
            out[TEXT_PREFIX + (k if k.startswith("text_model.") else f"text_model.{k}")] = v
    return {k: v.contiguous() for k, v in out.items() if isinstance(v, torch.Tensor)}
