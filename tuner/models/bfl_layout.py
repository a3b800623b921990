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


# RMSNorm scales on q and k: diffusers' ``norm_q.weight`` is the original's ``query_norm.scale``
_DOUBLE_NORMS = {
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
}
_SINGLE_NORMS = {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}


def _norm_name(module: str) -> str | None:
    match = _BLOCK.fullmatch(module)
    if not match:
        return None
    kind, n, rest = match.groups()
    norms = _DOUBLE_NORMS if kind == "transformer_blocks" else _SINGLE_NORMS
    block = f"{'double' if kind == 'transformer_blocks' else 'single'}_blocks.{n}"
    return f"{block}.{norms[rest]}" if rest in norms else None


def original_state(state: dict, name_of=None, model: str = "Flux") -> dict:
    """A FluxTransformer2DModel state dict in the original layout, the single file BFL ships
    (``flux1-dev.safetensors``) that ComfyUI, Forge and diffusers' ``from_single_file`` read: fused modules
    concatenated in order along the output dimension, ``norm_out``'s halves swapped back.

    ``name_of``: a module's original name and fused parts (``bfl_name``, Flux.1's; Flux.2 passes its own,
    whose q/k norms and swapped halves are named as Flux.1's), ``model`` the name errors give.

    Raises:
        ValueError: a key has no place in the original layout, or a fused module lacks one of its parts.
    """
    import torch

    out, fused = {}, {}
    for key, value in state.items():
        module, _, kind = key.rpartition(".")
        if norm := _norm_name(module):
            out[f"{norm}.scale"] = value
            continue
        name, parts = (name_of or bfl_name)(module)
        if parts is not None:
            fused.setdefault(f"{name}.{kind}", {})[module] = (parts, value)
        elif module in SWAPPED_HALVES:
            first, second = value.chunk(2, dim=0)
            out[f"{name}.{kind}"] = torch.cat([second, first])
        else:
            out[f"{name}.{kind}"] = value
    return {**out, **concat_fused(fused, model)}


def concat_fused(fused: dict, model: str) -> dict:
    """``{original key: {diffusers module: (its fused module's parts, tensor)}}`` -> each fused key's tensor,
    its parts concatenated in order along the output dimension (shared with SD3's MMDiT layout).

    Raises:
        ValueError: a fused module lacks one of its parts.
    """
    import torch

    out = {}
    for key, got in fused.items():
        parts = next(iter(got.values()))[0]
        if set(got) != set(parts):
            raise ValueError(f"{model} {key}: fused from {list(parts)}, but the state has only {sorted(got)}")
        out[key] = torch.cat([got[p][1] for p in parts])
    return out
