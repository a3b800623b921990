"""Flux's transformer modules by their names in the original (Black Forest Labs) layout, the names kohya's
Flux LoRAs, ComfyUI and Forge use: ``double_blocks.N.img_attn.qkv``, ``single_blocks.N.linear1``, ...

Where the original fuses modules diffusers keeps apart (q, k and v into ``qkv``; q, k, v and the MLP's
input into a single block's ``linear1``), ``bfl_name`` names the fused module and the diffusers modules
in it, in order: a LoRA on them is written as one LoRA on the fused module (see tuner/export/tensors.py).
``final_layer.adaLN_modulation.1`` holds diffusers' ``norm_out.linear`` with its two halves swapped.
"""

from __future__ import annotations

import re

_DOUBLE = {
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
}
_DOUBLE_FUSED = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_SINGLE = {"proj_out": "linear2", "norm.linear": "modulation.lin"}
_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
}
SWAPPED_HALVES = {"norm_out.linear"}  # diffusers stores (scale, shift), the original (shift, scale)
_BLOCK = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)")


def bfl_name(name: str) -> tuple[str, tuple[str, ...] | None]:
    """(the original module name, and for a fused one the diffusers modules in it, in order, else None).

    Raises:
        ValueError: ``name`` has no place in the original layout.
    """
    if name in _TOP:
        return _TOP[name], None
    match = _BLOCK.fullmatch(name)
    if match:
        kind, n, rest = match.groups()
        plain, fused = (_DOUBLE, _DOUBLE_FUSED) if kind == "transformer_blocks" else (_SINGLE, _SINGLE_FUSED)
        block = f"{'double' if kind == 'transformer_blocks' else 'single'}_blocks.{n}"
        if rest in plain:
            return f"{block}.{plain[rest]}", None
        for original, parts in fused.items():
            if rest in parts:
                return f"{block}.{original}", tuple(f"{kind}.{n}.{p}" for p in parts)
    raise ValueError(f"Flux module {name!r} has no place in the original layout")
