"""Chroma: lodestones' 8.9B rework of Flux.1-schnell (``ChromaPipeline``, ``ChromaTransformer2DModel``).

What differs from Flux.1 (``tuner.models.flux``, which this family builds on):

- One text encoder, T5-XXL, read with its attention mask (no CLIP, no pooled prompt). As
  ``ChromaPipeline._get_t5_prompt_embeds``: the prompt padded to ``max_sequence_length`` tokens, T5's last
  states under the tokenizer's mask, and a mask for the transformer that keeps the prompt's tokens and ONE pad
  token after them (``position <= length``: Chroma was trained so). The transformer reads that mask extended by
  ones over the image tokens (``_prepare_attention_mask``).
- No per-block modulation linears, no guidance or pooled embedder: a small MLP (``distilled_guidance_layer``, the
  "approximator") maps the timestep to every block's shift/scale/gate. The LoRA presets reach the same attention
  and MLP modules as Flux's; the approximator trains only in a partial or full fine-tune.
- Real classifier-free guidance: the pipeline runs a second pass on the negative prompt ("" unless given) when
  its guidance scale is above 1 (default 5), so ``model.guidance`` does nothing here (nothing to embed).

Latents, packing, position ids, the flow-matching objective and samplers are Flux.1's. Exports: diffusers
(``ChromaPipeline.load_lora_weights``: Flux's loader), kohya in BFL's names under ``lora_unet_`` (ComfyUI's Chroma
model is a subclass of its Flux model and keys LoRAs by the checkpoint's BFL names), and the single file as
lodestones ship it (``chroma-unlocked-v*.safetensors`` / ``Chroma1-HD.safetensors``: the transformer alone in BFL's
names with ``distilled_guidance_layer.*``), read by ``ChromaTransformer2DModel.from_single_file``.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from functools import partial

import torch

from tuner.models.base import Components, _ids
from tuner.models.bfl_layout import bfl_name, original_state
from tuner.models.flux import Flux
from tuner.models.real import RealWidths, t5_xxl, vae

# the approximator's modules: diffusers' names -> BFL's (its RMSNorms' ``weight`` is the original's ``scale``)
_APPROXIMATOR = re.compile(r"distilled_guidance_layer\.(in_proj|out_proj|layers\.\d+\.linear_[12]|norms\.\d+)")
_LAYER = {"linear_1": "in_layer", "linear_2": "out_layer"}


def chroma_name(name: str) -> tuple[str, tuple[str, ...] | None]:
    """A Chroma transformer module's name in BFL's layout (the published file's), with the diffusers modules a
    fused one holds (``bfl_layout.bfl_name``; the approximator keeps its names, its layers' linears renamed)."""
    if not _APPROXIMATOR.fullmatch(name):
        return bfl_name(name)
    head, _, last = name.rpartition(".")
    return (f"{head}.{_LAYER[last]}" if last in _LAYER else name), None


@contextmanager
def _checkpointed_with_mask(model, mask: torch.Tensor):
    """Under gradient checkpointing, ChromaTransformer2DModel (diffusers 0.42) calls its single-stream blocks
    without the attention mask it gives them otherwise: while the denoiser runs, its checkpointing function gets
    the mask to them, so a checkpointed step computes what the pipeline computes (the recomputation in the
    backward pass keeps the function it was given)."""
    from diffusers.models.transformers.transformer_chroma import ChromaSingleTransformerBlock

    inner = getattr(model, "_gradient_checkpointing_func", None)
    if not getattr(model, "gradient_checkpointing", False) or inner is None:
        yield
        return

    def checkpoint(block, *args):
        if isinstance(block, ChromaSingleTransformerBlock) and len(args) == 3:  # (hidden, temb, rotary): no mask
            return inner(partial(block, attention_mask=mask), *args)
        return inner(block, *args)

    model._gradient_checkpointing_func = checkpoint
    try:
        yield
    finally:
        model._gradient_checkpointing_func = inner


class Chroma(Flux):
    NAME = "chroma"
    PIPELINE = "ChromaPipeline"
    DENOISER_CLASS = "ChromaTransformer2DModel"
    IMG2IMG = "ChromaImg2ImgPipeline"
    TEXT_ENCODERS = ("text_encoder",)  # T5-XXL
    LORA_TEXT_ENCODERS = ()  # T5 stays frozen and cached, as in every Chroma trainer
    # a new token gets a T5 vector: ChromaPipeline has diffusers' textual-inversion loader on its T5 tokenizer
    EMBEDDINGS = {"text_encoder": "t5xxl"}
    OFFLOAD_BLOCKS = ("ChromaTransformerBlock", "ChromaSingleTransformerBlock")
    KOHYA_PREFIXES = {"transformer": "lora_unet"}
    KOHYA_READERS = "ComfyUI"
    BASE_VERSION = "chroma"
    MODELSPEC_ARCHITECTURE = "chroma"  # sd-scripts' sai_model_spec (ARCH_FLUX_1_CHROMA)
    # a LoRA of the blocks has Flux.1's names and widths (recipe=inspect names both): only the approximator is
    # Chroma's alone, and Flux's modulation, guidance and CLIP modules are never Chroma's
    SIGNS = (
        r"distilled_guidance_layer|single_transformer_blocks|single_blocks_|double_blocks_|img_attn|txt_attn|proj_mlp"
    )
    NEVER = (
        r"img_mod|txt_mod|modulation_lin|norm1_linear|norm1_context_linear|norm_linear|norm_out_linear|time_in_|"
        r"vector_in_|guidance_in_|time_text_embed|lora_te1_|text_encoder_|to_qkv_mlp_proj|stream_modulation"
    )
    SAMPLE_FILES = (
        {"transformer.distilled_guidance_layer.layers.0.linear_1": (4, 5120),
         "transformer.transformer_blocks.0.attn.to_q": (4, 3072)},
        {"lora_unet_distilled_guidance_layer_layers_0_in_layer": (4, 5120)},
        {"diffusion_model.distilled_guidance_layer.in_proj": (4, 64)},  # ComfyUI's own keys
    )  # fmt: skip
    # ChromaPipeline always passes sigmas (and mu), which FlowMatchHeun's and DPM-Solver's set_timesteps do not take
    NO_SCHEDULERS = ("flow_heun", "flow_dpm++")
    TINY_OPTIONS = ("model.max_sequence_length=32",)
    CLIENTS = {"comfyui": {"model": "Chroma"}}  # InvokeAI 6.14 has no Chroma

    def build_tiny(self, seed: int = 0, size: str = "test") -> dict:
        """A tiny Chroma: one double- and one single-stream block over 2x2-packed latents of a 16-channel VAE,
        a one-layer approximator, a T5 encoder and tokenizer, Flux's scheduler settings."""
        from diffusers import ChromaTransformer2DModel

        parts = super().build_tiny(seed, "schnell")
        torch.manual_seed(seed)
        parts["transformer"] = ChromaTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(2, 2, 4), approximator_num_channels=16,
            approximator_hidden_dim=32, approximator_layers=1,
        )  # fmt: skip
        return {
            "transformer": parts["transformer"],
            "vae": parts["vae"],
            "text_encoder": parts["text_encoder_2"],
            "tokenizer": parts["tokenizer_2"],
            "scheduler": parts["scheduler"],
        }

    def real_widths(self) -> RealWidths:
        """Chroma's transformer with one double- and two single-stream blocks per unit (19 units) and its
        approximator, T5-XXL, Flux's 16-channel VAE; the prompt's mask passed as the pipeline passes it."""

        def transformer(units):
            from diffusers import ChromaTransformer2DModel

            return ChromaTransformer2DModel(num_layers=units, num_single_layers=2 * units)  # Chroma's defaults

        def inputs(resolution, batch, dtype):
            tokens, text = (resolution // 16) ** 2, self.max_sequence_length
            return {
                "hidden_states": torch.randn(batch, tokens, 64, dtype=dtype),
                "encoder_hidden_states": torch.randn(batch, text, 4096, dtype=dtype),
                "timestep": torch.rand(batch),
                "img_ids": torch.zeros(tokens, 3),
                "txt_ids": torch.zeros(text, 3),
                "attention_mask": torch.ones(batch, text + tokens, dtype=dtype),
            }

        published = {
            "Chroma LoRA r16 1024 px target": "<= 8 GB NF4",
            "SimpleTuner r16 bf16/int8/int4/nf4": "~28 / 16 / 11 / 8 GB",
            "ai-toolkit r8 qfloat8 (16gb example)": "16 GB", "ai-toolkit qfloat8 (24gb example)": "24 GB",
        }  # fmt: skip
        return RealWidths(transformer, 19, inputs, lambda: [t5_xxl()], lambda: vae(16),
                          unit="1 double + 2 single blocks", published=published)  # fmt: skip

    # --- prompts ---------------------------------------------------------------------------------
    def tokenize(self, c: Components, prompts: list[str]) -> dict[str, torch.Tensor]:
        """T5's ids at ``max_sequence_length`` and the tokenizer's mask."""
        tokenizer = c.tokenizer
        ids = _ids(tokenizer, list(prompts), self.max_sequence_length)
        return {"text_encoder": ids, "text_mask": (ids != tokenizer.pad_token_id).long()}

    def encode_ids(self, text_encoders: dict, ids: dict) -> dict[str, torch.Tensor]:
        """As ``ChromaPipeline._get_t5_prompt_embeds``: T5's last states under the tokenizer's mask, and the
        transformer's mask: the prompt's tokens and the first pad token after them."""
        t5 = text_encoders["text_encoder"]
        device = next(t5.parameters()).device
        mask = ids["text_mask"].to(device)
        hidden = t5(ids["text_encoder"].to(device), attention_mask=mask, output_hidden_states=False)[0]
        positions = torch.arange(mask.shape[1], device=device).unsqueeze(0)
        kept = (positions <= mask.sum(1, keepdim=True)).to(hidden.dtype)
        rest = {k: v for k, v in ids.items() if k not in ("text_encoder", "text_mask")}
        return {**rest, "prompt_embeds": hidden, "prompt_mask": kept}

    # --- training --------------------------------------------------------------------------------
    def predict(self, denoiser, noisy, timesteps, cond):
        """The transformer called as ``ChromaPipeline`` calls it: packed latents, timesteps / 1000, zero text
        ids, the prompt's mask extended by ones over the image tokens."""
        from diffusers import ChromaPipeline

        b, ch, h, w = noisy.shape
        packed = ChromaPipeline._pack_latents(noisy, b, ch, h, w)
        image_ids = ChromaPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
        text, mask = cond["prompt_embeds"], cond["prompt_mask"]
        image = torch.ones(b, packed.shape[1], device=noisy.device, dtype=torch.bool)
        mask = torch.cat([mask.to(noisy.dtype), image], 1)  # float and bool: float, as the pipeline's
        with _checkpointed_with_mask(getattr(denoiser, "module", denoiser), mask):  # DDP wraps it
            out = denoiser(
                hidden_states=packed,
                timestep=timesteps.to(noisy.dtype) / 1000,
                encoder_hidden_states=text,
                txt_ids=torch.zeros(text.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
                img_ids=image_ids,
                attention_mask=mask,
                return_dict=False,
            )[0]
        return ChromaPipeline._unpack_latents(out, h, w, 1)

    # --- exports ---------------------------------------------------------------------------------
    def kohya_module_name(self, component: str, name: str, config) -> str:
        return chroma_name(name)[0]

    def kohya_siblings(self, component: str, name: str) -> tuple[str, ...] | None:
        return chroma_name(name)[1]

    def single_file_state(self, modules: dict, vocab_sizes: dict[str, int]) -> dict:
        """The transformer in BFL's layout with the approximator, as lodestones ship Chroma: the file ComfyUI
        (Load Diffusion Model) and ``ChromaTransformer2DModel.from_single_file`` read."""
        state = original_state(modules["transformer"].state_dict(), chroma_name, "Chroma")
        return {re.sub(r"(\.norms\.\d+)\.weight$", r"\1.scale", k): v for k, v in state.items()}
