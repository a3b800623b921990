"""Stable Diffusion 3 / 3.5: an MMDiT transformer, two CLIP encoders and T5, flow matching.

SD3.5 is this family, not one of its own: its checkpoints are the same pipeline and transformer class with other
config values, the same encoders, VAE, objective and file layouts. SD3.5 Large (8B, 38 blocks 2432 wide) adds
RMS qk norm (``qk_norm="rms_norm"``: ``attn.norm_q``/``norm_k``, the original's ``ln_q``/``ln_k``); SD3.5 Medium
(2.5B, MMDiT-X) also a second image self-attention in its first 13 blocks (``dual_attention_layers``: ``attn2``,
the original's ``x_block.attn2``), which the LoRA presets reach (``to_q`` ... match ``attn2.to_q``). Its pipeline
draws with skip-layer guidance where ``model.skip_guidance_layers`` names blocks (Stability's advice for Medium:
[7, 8, 9]). SD3.5 Large Turbo (timestep-distilled, 4 steps, no CFG) is refused as a training base.

Prompts, as ``StableDiffusion3Pipeline.encode_prompt``: both CLIPs' penultimate hidden states side by
side, zero-padded to T5's width, followed by T5's hidden states along the sequence; the pooled
conditioning is both CLIPs' projected outputs side by side. The transformer reads timesteps in
[0, 1000] and latents shifted and scaled by the VAE's factors.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F

from tuner.errors import ConfigError
from tuner.models import real, tiny
from tuner.models.base import Components, _ids
from tuner.models.flow import FlowFamily
from tuner.models.mmdit_layout import mmdit_name, original_state, swapped
from tuner.models.real import RealWidths

DISTILLED = (
    "SD3.5 Large Turbo is timestep-distilled (4 steps, no CFG): a LoRA trained on it undoes the distillation. Train on "
    "the base (stable-diffusion-3.5-large) and draw with the LoRA on the Turbo checkpoint (recipe=generate "
    "model.path=TURBO generate.adapters=[...] generate.steps=4 generate.guidance_scale=0)"
)
# the tiny pipelines' variants (build_tiny's size): SD3's, SD3.5 Medium's (dual attention in its first block, qk
# norm) and SD3.5 Large's (qk norm)
TINY_SIZES = {"test": {}, "3.5-medium": {"qk_norm": "rms_norm", "dual_attention_layers": (0,)},
              "3.5-large": {"qk_norm": "rms_norm"}}  # fmt: skip


class SD3(FlowFamily):
    NAME = "sd3"
    PIPELINE = "StableDiffusion3Pipeline"
    DENOISER_CLASS = "SD3Transformer2DModel"
    IMG2IMG = "StableDiffusion3Img2ImgPipeline"
    TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")  # CLIP-L, CLIP-G, T5
    LORA_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # as diffusers' SD3 scripts: T5 stays frozen
    EMBEDDINGS = {}
    EMBEDDING_REFUSAL = "diffusers' StableDiffusion3Pipeline has no textual-inversion loader to read the embedding"
    BLOCKS = ("transformer_blocks.",)
    PARTIAL_BLOCKS = ("transformer_blocks.*.attn*",)  # the joint attention and SD3.5 Medium's attn2
    OFFLOAD_BLOCKS = ("JointTransformerBlock",)
    TARGETS = {
        "attn": ["to_q", "to_k", "to_v", "to_out.0"],
        "attn_ff": [
            "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
            "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
        ],
    }  # fmt: skip
    EXPORTS = ("diffusers", "kohya", "peft", "merged", "single_file")
    DEFAULT_EXPORTS = ("diffusers", "kohya")
    SINGLE_FILE_TEXT = False
    # kohya's SD3 LoRAs (sd-scripts; ComfyUI, Forge): the transformer's modules by their original MMDiT names,
    # the CLIPs as lora_te1 (L) and lora_te2 (G); q, k and v are one module there: LoRAs stack into one
    # exactly, a LoHa's or LoKr's products do not
    KOHYA_PREFIXES = {"transformer": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    DIFFUSERS_READS_KOHYA = False  # its kohya files are ComfyUI's; diffusers has no reader of them
    KOHYA_READERS = "ComfyUI"  # A1111 and InvokeAI read no SD3 LoRA
    FORMAT_LIMITS = {"kohya": {"loha", "lokr"}}
    BASE_VERSION = "sd3"
    MODELSPEC_ARCHITECTURE = "stable-diffusion-v3-medium"
    MAX_SEQUENCE_LENGTH = 256
    WIDTHS = frozenset({1536, 2432})  # SD3-medium's and SD3.5 Medium's transformer, SD3.5-large's
    SAMPLE_FILES = (
        {"lora_unet_joint_blocks_0_x_block_attn_qkv": (4, 1536), "lora_unet_x_embedder_proj": (4, 64)},
        {"transformer.transformer_blocks.0.attn.to_q": (4, 1536)},
        {"transformer.transformer_blocks.0.attn.to_q": (4, 2432)},  # SD3.5 Large
        {"lora_unet_joint_blocks_0_x_block_attn2_qkv": (4, 1536)},  # SD3.5 Medium's kohya file: its dual attention
    )
    # checked before Flux's (both have an x_embedder, with other names beside it)
    SIGNS = r"joint_blocks|context_block|x_block_|pos_embed|text_encoder_3"
    TINY_OPTIONS = ("model.max_sequence_length=32",)  # its tiny T5 reads 32 tokens
    CLIENTS = {"comfyui": {"model": "SD3"}}  # InvokeAI reads no SD3 LoRA

    def build_tiny(self, seed: int = 0, size: str = "test") -> dict:
        """A tiny SD3: an MMDiT of two joint blocks, two CLIP encoders with projections and a T5 (whose width
        is at least the CLIPs' together: SD3 pads their hidden states to it), shift 3 flow matching.
        ``size``: "3.5-medium" (qk norm, a dual-attention first block) or "3.5-large" (qk norm), SD3.5's shapes."""
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection

        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=16,
            patch_size=2,
            in_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=32,
            caption_projection_dim=16,
            pooled_projection_dim=32,
            out_channels=4,
            pos_embed_max_size=32,
            **TINY_SIZES[size],
        )
        torch.manual_seed(seed + 1)
        vae = tiny.tiny_vae(use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609)
        torch.manual_seed(seed + 2)
        clip = {"projection_dim": 16, "hidden_act": "gelu"}
        return {
            "transformer": transformer,
            "vae": vae,
            "text_encoder": tiny.clip_text(CLIPTextModelWithProjection, 16, 2, 32, **clip),
            "text_encoder_2": tiny.clip_text(CLIPTextModelWithProjection, 16, 2, 32, **clip),
            "text_encoder_3": tiny.t5_encoder(32),
            "tokenizer": tiny.char_tokenizer(32),
            "tokenizer_2": tiny.char_tokenizer(32),
            "tokenizer_3": tiny.t5_tokenizer(32),
            "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
        }

    REAL_SIZES = ("3.5-medium", "3.5-large")

    def real_widths(self, size: str | None = None) -> RealWidths:
        """SD3-medium's transformer by joint blocks (24 of 1536), CLIP-L, OpenCLIP-G, T5-XXL, its 16-channel VAE;
        ``size="3.5-large"``: SD3.5 Large's (38 blocks of 2432, qk norm); "3.5-medium": SD3.5 Medium's (24 of 1536, qk
        norm, dual attention in the first 13), built whole (its blocks differ, so no line through 1 and 2 of them)."""
        published, real_units, dual = {}, 24, None
        heads, pos, qk = 24, 192, None
        if size == "3.5-large":
            heads, real_units, qk = 38, 38, "rms_norm"
            published = {
                "SD3.5 Large LoRA nf4 512 px target": "10-12 GB (SimpleTuner's lowest-VRAM config: nf4, Lion 8-bit)",
            }
        elif size == "3.5-medium":
            pos, qk, dual, real_units = 384, "rms_norm", tuple(range(13)), None

        def transformer(units):
            from diffusers import SD3Transformer2DModel

            return SD3Transformer2DModel(
                sample_size=128, patch_size=2, in_channels=16, num_layers=units if real_units else 24,
                attention_head_dim=64, num_attention_heads=heads, joint_attention_dim=4096,
                caption_projection_dim=64 * heads, pooled_projection_dim=2048, out_channels=16,
                pos_embed_max_size=pos, qk_norm=qk,
                dual_attention_layers=dual or (),
            )  # fmt: skip

        def inputs(resolution, batch, dtype):
            side = resolution // 8
            return {
                "hidden_states": torch.randn(batch, 16, side, side, dtype=dtype),
                "encoder_hidden_states": torch.randn(batch, 333, 4096, dtype=dtype),
                "pooled_projections": torch.randn(batch, 2048, dtype=dtype),
                "timestep": torch.rand(batch) * 1000,
            }

        def text_encoders():
            return [real.clip(768, 12, 12), real.clip(1280, 32, 20, projection=True), real.t5_xxl()]

        unit = "a joint block" if real_units else "the whole denoiser"
        return RealWidths(transformer, real_units, inputs, text_encoders, lambda: real.vae(16), unit, published)

    def check_trainable(self, folder: Path) -> None:
        """Refuse SD3.5 Large Turbo (or another distilled SD3, by its folder's name) as a training base."""
        if re.search(r"turbo|distill", Path(folder).name, re.I):
            raise ConfigError(f"model.path={folder} is a distilled checkpoint (its folder name): {DISTILLED}")

    def call_kwargs(self) -> dict:
        """The T5 prompt length and, where ``model.skip_guidance_layers`` names blocks, the pipeline's skip-layer
        guidance (``skip_guidance_layers``: those blocks skipped in an extra pass over the first 1-20% of steps)."""
        layers = getattr(self.model, "skip_guidance_layers", None)
        return {**super().call_kwargs(), **({"skip_guidance_layers": list(layers)} if layers else {})}

    def tokenize(self, c: Components, prompts: list[str]) -> dict[str, torch.Tensor]:
        out = {}
        for name, tok in zip(self.TEXT_ENCODERS, ("tokenizer", "tokenizer_2", "tokenizer_3")):
            length = self.max_sequence_length if tok == "tokenizer_3" else c.tokenizers[tok].model_max_length
            out[name] = _ids(c.tokenizers[tok], list(prompts), length)
        return out

    def encode_ids(self, text_encoders: dict, ids: dict) -> dict[str, torch.Tensor]:
        hidden, pooled = [], []
        for name in self.TEXT_ENCODERS[:2]:
            encoder = text_encoders[name]
            out = encoder(ids[name].to(next(encoder.parameters()).device), output_hidden_states=True)
            pooled.append(out[0])  # text_embeds (projected)
            hidden.append(out.hidden_states[-2])
        t5 = text_encoders["text_encoder_3"]
        t5_hidden = t5(ids["text_encoder_3"].to(next(t5.parameters()).device))[0]
        clip = torch.cat(hidden, dim=-1)
        clip = F.pad(clip, (0, t5_hidden.shape[-1] - clip.shape[-1]))
        rest = {k: v for k, v in ids.items() if k not in self.TEXT_ENCODERS}
        return {**rest, "prompt_embeds": torch.cat([clip, t5_hidden], dim=-2), "pooled": torch.cat(pooled, dim=-1)}

    def kohya_module_name(self, component: str, name: str, config) -> str:
        if component == "transformer":
            return mmdit_name(name)[0]
        return name if name.startswith("text_model.") else f"text_model.{name}"

    def kohya_siblings(self, component: str, name: str) -> tuple[str, ...] | None:
        return mmdit_name(name)[1] if component == "transformer" else None

    def kohya_swapped(self, component: str, name: str, config) -> bool:
        return component == "transformer" and swapped(name, config.num_layers)

    def single_file_state(self, modules: dict, vocab_sizes: dict[str, int]) -> dict:
        """The transformer in the original MMDiT layout, which ComfyUI (diffusion model loader), Forge and
        ``SD3Transformer2DModel.from_single_file`` read; the text encoders and VAE stay the base's."""
        transformer = modules["transformer"]
        return original_state(transformer.state_dict(), transformer.config.num_layers)

    def predict(self, denoiser, noisy, timesteps, cond):
        return denoiser(
            hidden_states=noisy,
            timestep=timesteps.to(noisy.dtype),
            encoder_hidden_states=cond["prompt_embeds"],
            pooled_projections=cond["pooled"],
            return_dict=False,
        )[0]
