"""Flux.2's transformer modules by their names in the original (Black Forest Labs) layout: the names of BFL's
single file, of kohya-style Flux.2 LoRAs (``lora_unet_double_blocks_0_img_attn_qkv``) and of ComfyUI
(``diffusion_model.double_blocks.0.img_attn.qkv``), as diffusers' ``convert_flux2_transformer_checkpoint_to_diffusers``
and ``_convert_kohya_flux2_lora_to_diffusers`` read them.

Flux.1's layout (bfl_layout.py) with Flux.2's differences: the feed-forwards are ``ff.linear_in`` / ``linear_out``,
a single-stream block is one ``linear1`` (``attn.to_qkv_mlp_proj``) and one ``linear2`` (``attn.to_out``), and
the modulations are shared by all blocks (``double_stream_modulation_img.lin``, ...). Only q, k and v of the
double-stream blocks are fused (``img_attn.qkv``, ``txt_attn.qkv``).
"""

from __future__ import annotations

import re

from tuner.models import bfl_layout

_DOUBLE = {
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.linear_in": "img_mlp.0",
    "ff.linear_out": "img_mlp.2",
    "ff_context.linear_in": "txt_mlp.0",
    "ff_context.linear_out": "txt_mlp.2",
}
_DOUBLE_FUSED = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}
_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
}
_BLOCK = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)")


def _block(name: str) -> tuple[str, str, str] | None:
    """(double | single, the original block's name, the module's name inside it), or None outside the blocks."""
    match = _BLOCK.fullmatch(name)
    if not match:
        return None
    kind, n, rest = match.groups()
    kind = "double" if kind == "transformer_blocks" else "single"
    return kind, f"{kind}_blocks.{n}", rest


def flux2_name(name: str) -> tuple[str, tuple[str, ...] | None]:
    """(the original module name, and for a fused one the diffusers modules in it, in order, else None).

    Raises:
        ValueError: ``name`` has no place in the original layout.
    """
    if name in _TOP:
        return _TOP[name], None
    found = _block(name)
    if found:
        kind, block, rest = found
        plain = _DOUBLE if kind == "double" else _SINGLE
        if rest in plain:
            return f"{block}.{plain[rest]}", None
        prefix = name[: -len(rest)]
        for original, parts in _DOUBLE_FUSED.items() if kind == "double" else ():
            if rest in parts:
                return f"{block}.{original}", tuple(prefix + p for p in parts)
    raise ValueError(f"Flux.2 module {name!r} has no place in the original layout")


def original_state(state: dict) -> dict:
    """A Flux2Transformer2DModel state dict in BFL's original layout (the single file ComfyUI and
    ``Flux2Transformer2DModel.from_single_file`` read): q, k and v concatenated in order along the output
    dimension, ``norm_out``'s halves swapped back, the q/k norms' weights as ``scale`` (as Flux.1's, whose
    conversion this is with Flux.2's names).

    Raises:
        ValueError: a key has no place in the original layout, or a fused module lacks one of its parts.
    """
    return bfl_layout.original_state(state, flux2_name, "Flux.2")
