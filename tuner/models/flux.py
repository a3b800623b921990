"""Flux.1 (dev and schnell): a rectified-flow transformer over 2x2-packed latents.

Prompts: CLIP's pooled output and T5's hidden states (``max_sequence_length`` tokens, 512 unless
``model.max_sequence_length`` says otherwise). The transformer reads timesteps in [0, 1], the
sequence positions of the text (zeros) and of the latent patches, and, in the dev shape, the guidance
it was distilled with (``model.guidance`` during training; the gallery's guidance_scale at sampling).
The VAE's latents are shifted and scaled, ``(z - shift_factor) * scaling_factor``.
"""

from __future__ import annotations

import torch

from tuner.models import real, tiny
from tuner.models.base import Components, _ids
from tuner.models.bfl_layout import SWAPPED_HALVES, bfl_name, original_state
from tuner.models.flow import FlowFamily
from tuner.models.real import RealWidths


class Flux(FlowFamily):
    NAME = "flux"
    PIPELINE = "FluxPipeline"
    DENOISER_CLASS = "FluxTransformer2DModel"
    IMG2IMG = "FluxImg2ImgPipeline"
    TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # CLIP, T5
    LORA_TEXT_ENCODERS = ("text_encoder",)  # as diffusers' Flux scripts: T5 stays frozen
    # a new token: a vector for CLIP (its pooled output) and one for T5 (the prompt the transformer reads);
    # ComfyUI names them clip_l and t5xxl
    EMBEDDINGS = {"text_encoder": "clip_l", "text_encoder_2": "t5xxl"}
    BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")
    PARTIAL_BLOCKS = ("transformer_blocks.*.attn.*", "single_transformer_blocks.*.attn.*")
    OFFLOAD_BLOCKS = ("FluxTransformerBlock", "FluxSingleTransformerBlock")
    TARGETS = {
        "attn": ["to_q", "to_k", "to_v", "to_out.0"],
        "attn_ff": [
            "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
            "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
        ],
    }  # fmt: skip
    # "proj_out" is each single-stream block's output, and also the transformer's last projection (BFL's
    # final_layer.linear), which kohya's Flux LoRAs never hold and InvokeAI drops from a LoRA without a word
    TARGETS_EXCLUDE = "proj_out"
    # FluxPipeline passes custom sigmas and the dynamic shift's mu, which FlowMatchHeun's set_timesteps lacks
    NO_SCHEDULERS = ("flow_heun",)
    EXPORTS = ("diffusers", "kohya", "peft", "merged", "single_file")
    SINGLE_FILE_TEXT = False
    # diffusers' Flux.1 converter has the 3072 width written in: tests/test_kohya_layouts.py reads a real-width one
    TINY_SINGLE_FILE = False
    # kohya's Flux LoRAs (ComfyUI, Forge): the transformer's modules by their original names, CLIP as lora_te1
    KOHYA_PREFIXES = {"transformer": "lora_unet", "text_encoder": "lora_te1"}
    # q, k and v are one module there: LoRAs stack into one exactly, a LoHa's or LoKr's products do not
    FORMAT_LIMITS = {"kohya": {"loha", "lokr"}}
    DEFAULT_EXPORTS = ("diffusers", "kohya")
    KOHYA_READERS = "Forge / ComfyUI / InvokeAI"  # A1111 reads no Flux LoRA
    BASE_VERSION = "flux1"
    MODELSPEC_ARCHITECTURE = "flux-1-dev"
    WIDTHS = frozenset({3072})  # the transformer's
    SIGNS = r"single_transformer_blocks|single_blocks_|double_blocks_|guidance_embedder|img_attn|txt_attn|proj_mlp"
    # Flux.2's names, and Chroma's approximator (a LoRA of the blocks alone fits Flux and Chroma alike)
    NEVER = r"to_qkv_mlp_proj|linear_in|linear_out|stream_modulation|time_guidance_embed|distilled_guidance_layer"
    # each with a modulation linear, which Chroma (the same blocks, modulated by its approximator) lacks
    SAMPLE_FILES = (
        {"transformer.transformer_blocks.0.attn.to_q": (4, 3072),
         "transformer.transformer_blocks.0.norm1.linear": (4, 3072)},
        {"lora_unet_double_blocks_0_img_attn_qkv": (4, 3072), "lora_unet_double_blocks_0_img_mod_lin": (4, 3072)},
        {"lora_transformer_single_transformer_blocks_0_attn_to_q": (4, 3072),
         "lora_transformer_single_transformer_blocks_0_norm_linear": (4, 3072)},
        {"diffusion_model.double_blocks.0.img_attn.qkv": (4, 3072),
         "diffusion_model.double_blocks.0.img_mod.lin": (4, 3072)},  # ComfyUI's own keys
    )  # fmt: skip
    TINY_OPTIONS = ("model.max_sequence_length=32",)  # its tiny T5 reads 32 tokens
    CLIENTS = {"comfyui": {"model": "Flux"}, "invokeai": {"base": "flux"}}  # dev (FluxSchnell: no guidance)

    def build_tiny(self, seed: int = 0, size: str = "test") -> dict:
        """A tiny Flux.1: one double-stream and one single-stream block over 2x2-packed latents of a
        4-channel VAE, CLIP (pooled) + T5 (sequence) text encoders, Flux's scheduler settings.
        ``size="schnell"``: the shape without dev's guidance embedding."""
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import CLIPTextModel

        guidance = size != "schnell"
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=16,
            guidance_embeds=guidance,
            axes_dims_rope=(2, 2, 4),
        )
        torch.manual_seed(seed + 1)
        vae = tiny.tiny_vae(use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
        torch.manual_seed(seed + 2)
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
        return {
            "transformer": transformer,
            "vae": vae,
            "text_encoder": tiny.clip_text(CLIPTextModel, 16, 2, 32),
            "text_encoder_2": tiny.t5_encoder(32),
            "tokenizer": tiny.char_tokenizer(32),
            "tokenizer_2": tiny.t5_tokenizer(32),
            "scheduler": scheduler,
        }

    def real_widths(self) -> RealWidths:
        """Flux.1-dev's transformer with one double- and two single-stream blocks per unit (19 units), CLIP-L,
        T5-XXL, its 16-channel VAE."""

        def transformer(units):
            from diffusers import FluxTransformer2DModel

            return FluxTransformer2DModel(
                in_channels=64, num_layers=units, num_single_layers=2 * units, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56),
            )  # fmt: skip

        def inputs(resolution, batch, dtype):
            tokens = (resolution // 16) ** 2
            return {
                "hidden_states": torch.randn(batch, tokens, 64, dtype=dtype),
                "encoder_hidden_states": torch.randn(batch, 512, 4096, dtype=dtype),
                "pooled_projections": torch.randn(batch, 768, dtype=dtype),
                "timestep": torch.rand(batch),
                "img_ids": torch.zeros(tokens, 3),
                "txt_ids": torch.zeros(512, 3),
                "guidance": torch.ones(batch),
            }

        published = {
            "Flux LoRA r16 512 px target": "<= 8 GB NF4, <= 5 GB offloaded",
            "diffusers QLoRA (4090)": "~9 GB", "diffusers bf16 LoRA": "~26 GB",
            "SimpleTuner bf16/int8/int4/nf4": ">30 / 18 / 13 / 9 GB", "kohya fp8 + 28 blocks swapped": "8 GB",
            "OneTrainer offloaded 512 px": "6 GB",
        }  # fmt: skip
        return RealWidths(
            transformer,
            19,
            inputs,
            lambda: [real.clip(768, 12, 12), real.t5_xxl()],
            lambda: real.vae(16),
            unit="1 double + 2 single blocks",
            published=published,
        )

    def tokenize(self, c: Components, prompts: list[str]) -> dict[str, torch.Tensor]:
        clip = c.tokenizers["tokenizer"]
        return {
            "text_encoder": _ids(clip, list(prompts), clip.model_max_length),
            "text_encoder_2": _ids(c.tokenizers["tokenizer_2"], list(prompts), self.max_sequence_length),
        }

    def encode_ids(self, text_encoders: dict, ids: dict) -> dict[str, torch.Tensor]:
        """As ``FluxPipeline.encode_prompt``: CLIP's pooled output, T5's last hidden states."""
        clip, t5 = text_encoders["text_encoder"], text_encoders["text_encoder_2"]
        device = next(clip.parameters()).device
        pooled = clip(ids["text_encoder"].to(device), output_hidden_states=False).pooler_output
        hidden = t5(ids["text_encoder_2"].to(device), output_hidden_states=False)[0]
        rest = {k: v for k, v in ids.items() if k not in self.TEXT_ENCODERS}
        return {**rest, "prompt_embeds": hidden, "pooled": pooled}

    def kohya_module_name(self, component: str, name: str, config) -> str:
        if component == "transformer":
            return bfl_name(name)[0]
        return name if name.startswith("text_model.") else f"text_model.{name}"

    def kohya_siblings(self, component: str, name: str) -> tuple[str, ...] | None:
        return bfl_name(name)[1] if component == "transformer" else None

    def kohya_swapped(self, component: str, name: str, config) -> bool:
        return component == "transformer" and name in SWAPPED_HALVES

    def single_file_state(self, modules: dict, vocab_sizes: dict[str, int]) -> dict:
        """The transformer in the original layout: the single file BFL ships, which ComfyUI (diffusion model
        loader), Forge and ``FluxTransformer2DModel.from_single_file`` read; the text encoders and VAE stay
        the base's (new tokens ship as embeddings)."""
        return original_state(modules["transformer"].state_dict())

    def predict(self, denoiser, noisy, timesteps, cond):
        from diffusers import FluxPipeline

        b, ch, h, w = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, b, ch, h, w)
        image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
        out = self.transformer_call(denoiser, packed, image_ids, timesteps, cond)
        return FluxPipeline._unpack_latents(out, h, w, 1)  # (latent h, w) with a scale factor of 1

    def transformer_call(self, denoiser, tokens, image_ids, timesteps, cond) -> torch.Tensor:
        """The transformer on packed image tokens and their ids, as FluxPipeline calls it: the prompt's T5 states
        with zero text ids, CLIP's pooled vector, ``timesteps / 1000``, the guidance embedding at
        ``model.guidance`` where the model has one (dev; schnell has none); its output for every image token."""
        text = cond["prompt_embeds"]
        config = getattr(denoiser, "module", denoiser).config  # DistributedDataParallel wraps it
        guidance = None
        if config.guidance_embeds:
            guidance = torch.full((tokens.shape[0],), float(self.model.guidance), device=tokens.device)
        return denoiser(
            hidden_states=tokens,
            timestep=timesteps.to(tokens.dtype) / 1000,
            guidance=guidance,
            pooled_projections=cond["pooled"],
            encoder_hidden_states=text,
            txt_ids=torch.zeros(text.shape[1], 3, device=tokens.device, dtype=tokens.dtype),
            img_ids=image_ids,
            return_dict=False,
        )[0]

    def decode(self, pipe, latents, height, width):
        return super().decode(pipe, pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor), height, width)
