"""SD3's transformer modules by their names in the original (Stability MMDiT) layout, the names of SD3's
single files and of kohya's SD3 LoRAs, which ComfyUI and Forge read: ``joint_blocks.N.x_block.attn.qkv``,
``joint_blocks.N.context_block.mlp.fc1``, ``final_layer.linear``, ...

Each joint block has an image stream (``x_block``) and a text stream (``context_block``); the original fuses
q, k and v into ``attn.qkv``, which ``mmdit_name`` names with the diffusers modules in it, in order (a LoRA
on them is written as one LoRA on the fused module, see tuner/export/tensors.py). The last block's text
stream stops after its attention's input (no projection, no MLP), and its modulation, like the final
layer's, holds diffusers' two halves swapped.
"""

from __future__ import annotations

import re

from .bfl_layout import concat_fused

_STREAMS = {  # diffusers' names in a block -> (stream, the original's name in it)
    "attn.to_out.0": ("x_block", "attn.proj"),
    "attn.to_add_out": ("context_block", "attn.proj"),
    "ff.net.0.proj": ("x_block", "mlp.fc1"),
    "ff.net.2": ("x_block", "mlp.fc2"),
    "ff_context.net.0.proj": ("context_block", "mlp.fc1"),
    "ff_context.net.2": ("context_block", "mlp.fc2"),
    "norm1.linear": ("x_block", "adaLN_modulation.1"),
    "norm1_context.linear": ("context_block", "adaLN_modulation.1"),
    "attn.norm_q": ("x_block", "attn.ln_q"),
    "attn.norm_k": ("x_block", "attn.ln_k"),
    "attn.norm_added_q": ("context_block", "attn.ln_q"),
    "attn.norm_added_k": ("context_block", "attn.ln_k"),
    "attn2.to_out.0": ("x_block", "attn2.proj"),  # SD3.5's second image self-attention (MMDiT-X)
    "attn2.norm_q": ("x_block", "attn2.ln_q"),
    "attn2.norm_k": ("x_block", "attn2.ln_k"),
}
_FUSED = {
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
}
_TOP = {
    "pos_embed.proj": "x_embedder.proj",
    "context_embedder": "context_embedder",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.(.+)")


def mmdit_name(name: str) -> tuple[str, tuple[str, ...] | None]:
    """(the original module name, and for a fused one the diffusers modules in it, in order, else None).

    Raises:
        ValueError: ``name`` has no place in the original layout.
    """
    if name in _TOP:
        return _TOP[name], None
    if match := _BLOCK.fullmatch(name):
        n, rest = match.groups()
        if rest in _STREAMS:
            stream, original = _STREAMS[rest]
            return f"joint_blocks.{n}.{stream}.{original}", None
        for original, parts in _FUSED.items():
            if rest in parts:
                return f"joint_blocks.{n}.{original}", tuple(f"transformer_blocks.{n}.{p}" for p in parts)
    raise ValueError(f"SD3 module {name!r} has no place in the original MMDiT layout")


def swapped(name: str, num_layers: int) -> bool:
    """Whether the original holds this module's output halves swapped: (shift, scale) for diffusers'
    (scale, shift), in the final layer's modulation and the last block's text-stream modulation."""
    return name in ("norm_out.linear", f"transformer_blocks.{num_layers - 1}.norm1_context.linear")


def original_state(state: dict, num_layers: int) -> dict:
    """An SD3Transformer2DModel state dict in the original layout (the transformer of SD3's single files,
    which ComfyUI, Forge and ``SD3Transformer2DModel.from_single_file`` read): q, k and v concatenated in order
    along the output dimension, swapped halves swapped back, the positional table as ``pos_embed``.

    Raises:
        ValueError: a key has no place in the original layout, or a fused module lacks one of its parts.
    """
    import torch

    out, fused = {}, {}
    for key, value in state.items():
        if key == "pos_embed.pos_embed":
            out["pos_embed"] = value
            continue
        module, _, kind = key.rpartition(".")
        name, parts = mmdit_name(module)
        if parts is not None:
            fused.setdefault(f"{name}.{kind}", {})[module] = (parts, value)
        elif swapped(module, num_layers):
            first, second = value.chunk(2, dim=0)
            out[f"{name}.{kind}"] = torch.cat([second, first])
        else:
            out[f"{name}.{kind}"] = value
    return {**out, **concat_fused(fused, "SD3")}
