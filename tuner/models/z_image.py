"""Z-Image: Tongyi's 6B single-stream DiT (``ZImageTransformer2DModel``, "S3-DiT") over 2x2 patches of Flux's
16-channel VAE latents, prompted by Qwen3-4B; base (``Z-Image``) and step-distilled (``Z-Image-Turbo``).

Prompts, as ``ZImagePipeline._encode_prompt``: the prompt as the user's turn of Qwen3's chat template (generation
prompt added, ``enable_thinking=True``: no empty think block), padded to ``max_sequence_length``, and the text
encoder's second-to-last hidden states (``hidden_states[-2]``). The pipeline keeps each prompt's own tokens only (a
list of tensors of different lengths); tuner caches them padded with zeros and a mask, and hands the transformer
each prompt's unpadded tokens again (``predict``), so the transformer sees exactly what the pipeline gives it.

The transformer takes lists (one (C, 1, H, W) latent and one (L, D) prompt per image) and a time running the other
way from diffusers' flow schedulers: ``t = (1000 - timestep) / 1000`` (1 is the clean image). It predicts
``latents - noise``, which the pipeline negates before its scheduler steps; ``predict`` negates it too, so the
family trains on flow matching's usual ``noise - latents`` target, as diffusers' DreamBooth script does. Latents
are ``(z - shift_factor) * scaling_factor`` from the VAE's config, as Flux's.

Sampling: the pipeline's own CFG, ``pos + guidance_scale * (pos - neg)`` (guidance 0: one pass per step; the base
samples at 3-5, Turbo at 0), the negative prompt "" unless given; ``cfg_normalization`` / ``cfg_truncation`` keep
the pipeline's defaults (off). The pipeline passes its sigmas (and ``mu``) to the scheduler.

Z-Image-Turbo is refused as a training base: a LoRA trained on a step-distilled model undoes the distillation
(ai-toolkit trains Turbo only with ostris' de-distillation "training adapter" merged in, a separate download tuner
does not have); Tongyi released the base for fine-tuning, and a LoRA of the base loads onto Turbo (same modules).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from tuner.errors import ConfigError
from tuner.models import tiny
from tuner.models.base import Components
from tuner.models.flow import FlowFamily
from tuner.models.real import RealWidths
from tuner.models.tiny import qwen3_tokenizer

DISTILLED = (
    "Z-Image-Turbo is step-distilled (8 steps, no CFG): a LoRA trained on it undoes the distillation. Train on the "
    "base Z-Image (Tongyi-MAI/Z-Image) and draw with the LoRA on Turbo (recipe=generate model.path=<Turbo folder> "
    "generate.adapters=[...] at guidance 0); ai-toolkit's alternative, ostris' de-distillation training adapter "
    "merged into Turbo while training, is not in tuner"
)
# Comfy-Org's single file (ComfyUI's NextDiT names) from diffusers' names: q, k and v fused into qkv
_NATIVE = (
    (".attention.norm_q.", ".attention.q_norm."),
    (".attention.norm_k.", ".attention.k_norm."),
    ("all_final_layer.2-1.", "final_layer."),
    ("all_x_embedder.2-1.", "x_embedder."),
)
_QKV = re.compile(r"^(.*\.attention)\.to_([qkv])$")


def native_name(name: str) -> str:
    """A diffusers module or parameter name as ComfyUI's Z-Image (and Comfy-Org's single file) names it."""
    name = re.sub(r"\.attention\.to_[qkv](?=\.|$)", ".attention.qkv", name)
    name = re.sub(r"\.attention\.to_out\.0(?=\.|$)", ".attention.out", name)
    for ours, theirs in _NATIVE:
        name = name.replace(ours, theirs)
    return name


class ZImage(FlowFamily):
    NAME = "z_image"
    PIPELINE = "ZImagePipeline"
    DENOISER_CLASS = "ZImageTransformer2DModel"
    IMG2IMG = "ZImageImg2ImgPipeline"
    TEXT_ENCODERS = ("text_encoder",)  # Qwen3-4B (Qwen3Model)
    LORA_TEXT_ENCODERS = ()  # the language model stays frozen: ZImagePipeline loads LoRAs into its transformer only
    EMBEDDINGS = {}
    EMBEDDING_REFUSAL = (
        "its text encoder is a language model read at its second-to-last hidden layer, and ZImagePipeline has no "
        "textual-inversion loader to read an embedding"
    )
    # the main layers, and the refiners that read the image (noise_refiner) and the prompt (context_refiner) first
    BLOCKS = ("layers.", "noise_refiner.", "context_refiner.")
    PARTIAL_BLOCKS = ("layers.*.attention.*",)
    OFFLOAD_BLOCKS = ("ZImageTransformerBlock",)
    TARGETS = {
        "attn": ["to_q", "to_k", "to_v", "to_out.0"],  # diffusers' DreamBooth script's default
        "attn_ff": ["to_q", "to_k", "to_v", "to_out.0", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"],
    }
    # the pipeline passes its sigmas as a list (and mu): FlowMatchHeun's and DPM-Solver's set_timesteps take no
    # sigmas, UniPC's cannot scale a list
    NO_SCHEDULERS = ("flow_heun", "flow_dpm++", "flow_unipc")
    EXPORTS = ("diffusers", "kohya", "peft", "merged", "single_file")
    DEFAULT_EXPORTS = ("diffusers", "kohya")
    # ComfyUI's own names (its Lumina2 / NextDiT model) under lora_unet_: q, k and v are one qkv module there, so
    # LoRAs stack exactly and LoHa / LoKr do not (the diffusers and peft files hold them; ComfyUI reads those too)
    KOHYA_PREFIXES = {"transformer": "lora_unet"}
    FORMAT_LIMITS = {"kohya": {"loha", "lokr"}}
    DIFFUSERS_READS_KOHYA = False  # diffusers' Z-Image converter reads lora_unet_ files of its own names only
    KOHYA_READERS = "ComfyUI"
    SINGLE_FILE_TEXT = False  # the transformer alone, as Comfy-Org ships z_image_turbo_bf16.safetensors
    BASE_VERSION = "z_image"
    MODELSPEC_ARCHITECTURE = "Z-Image"
    DEFAULT_RESOLUTION = 1024
    WIDTHS = frozenset({3840})  # the transformer's (30 heads of 128)
    # diffusers' names and ComfyUI's (Lumina 2 shares ComfyUI's, and its refiners' names: its 2304 width tells it
    # apart)
    SIGNS = r"attention_to_[qkv]|attention_to_out|attention_qkv|feed_forward_w[123]"
    SAMPLE_FILES = (
        {"transformer.layers.0.attention.to_q": (4, 3840), "transformer.layers.0.feed_forward.w1": (4, 3840)},
        {"lora_unet_layers_0_attention_qkv": (4, 3840), "lora_unet_layers_0_feed_forward_w1": (4, 3840)},
        {"diffusion_model.layers.29.attention.to_q": (4, 3840)},  # ai-toolkit's keys, which ComfyUI reads
    )  # fmt: skip
    TINY_OPTIONS = ("model.max_sequence_length=64",)
    # ComfyUI's model class (its Lumina2 / NextDiT); InvokeAI 6.14's base (it runs diffusers' class too, but takes
    # only the diffusers file: tests/test_clients_z_image.py checks it, not tests/test_clients_2026.py)
    # InvokeAI 6.14 runs it as diffusers' class and reads its LoRAs by diffusers' names only (not ComfyUI's kohya file)
    CLIENTS = {
        "comfyui": {"model": "Lumina2"},
        "invokeai": {"base": "z-image", "runs": "diffusers", "loras": ("diffusers",)},
    }

    # --- tiny and real-width models --------------------------------------------------------------------------
    def build_tiny(self, seed: int = 0, size: str = "test") -> dict:
        """A tiny Z-Image: two main layers and one of each refiner, 32 wide, over a 16-channel x8 AutoencoderKL
        (Flux's scaling and shift), a two-layer Qwen3Model, a character tokenizer with Qwen3's chat template, and
        Z-Image-Turbo's published scheduler (a fixed shift of 3)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
        from transformers import Qwen3Config, Qwen3Model

        width = 16
        torch.manual_seed(seed)
        transformer = ZImageTransformer2DModel(
            dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=width,
            axes_dims=[4, 6, 6], axes_lens=[256, 32, 32],
        )  # fmt: skip
        with torch.no_grad():  # padding tokens as trained ones are (fresh ones are zero: nothing to check)
            transformer.x_pad_token.normal_()
            transformer.cap_pad_token.normal_()
        torch.manual_seed(seed + 1)
        vae = tiny.tiny_vae(  # Flux's 16-channel VAE at tiny widths (its factors)
            (8, 8, 16, 16), 16, scaling_factor=0.3611, shift_factor=0.1159, mid_block_add_attention=False
        )
        torch.manual_seed(seed + 2)
        tokenizer = qwen3_tokenizer()
        config = Qwen3Config(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=128,
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        return {
            "transformer": transformer,
            "vae": vae,
            "text_encoder": Qwen3Model(config),
            "tokenizer": tokenizer,
            "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False),
        }

    def real_widths(self) -> RealWidths:
        """Z-Image's transformer by main layers (30, 3840 wide; the two refiners of each kind always), Qwen3-4B
        (2560 x 36), Flux's 16-channel VAE."""
        from diffusers import ZImageTransformer2DModel

        class Stacked(ZImageTransformer2DModel):
            """The transformer's list of outputs as one tensor (the memory plan backpropagates through it)."""

            def forward(self, *args, **kwargs):
                return (torch.stack(super().forward(*args, **kwargs)[0]),)

        def transformer(units):
            return Stacked(n_layers=units)  # the config's defaults are Z-Image's

        def inputs(resolution, batch, dtype):
            side = resolution // 8
            return {
                "x": [torch.randn(16, 1, side, side, dtype=dtype) for _ in range(batch)],
                "t": torch.rand(batch),
                "cap_feats": [torch.randn(self.max_sequence_length, 2560, dtype=dtype) for _ in range(batch)],
            }

        def text_encoders():
            from transformers import Qwen3Config, Qwen3Model

            config = Qwen3Config(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, head_dim=128,
                                 num_attention_heads=32, num_key_value_heads=8, vocab_size=151936)  # fmt: skip
            return [Qwen3Model(config)]

        def vae():
            from tuner.models.real import vae

            return vae(16)

        published = {"SimpleTuner (int8)": "9.7 GiB", "Z-Image LoRA r16 1024 px target": "<= 9.7 GiB"}
        return RealWidths(transformer, 30, inputs, text_encoders, vae, unit="a main layer", published=published)

    # --- loading ---------------------------------------------------------------------------------------------
    def check_trainable(self, folder: Path) -> None:
        """Refuse Z-Image-Turbo (or another distilled Z-Image, by its folder's name) as a training base."""
        if re.search(r"turbo|distill", Path(folder).name, re.I):
            raise ConfigError(f"model.path={folder} is a distilled checkpoint (its folder name): {DISTILLED}")

    # --- prompts ---------------------------------------------------------------------------------------------
    def tokenize(self, c: Components, prompts: list[str]) -> dict[str, torch.Tensor]:
        """As ``ZImagePipeline._encode_prompt``: the user's turn of the chat template, thinking on, padded."""
        return self.chat_ids(c.tokenizer, prompts, enable_thinking=True)

    def encode_ids(self, text_encoders: dict, ids: dict) -> dict[str, torch.Tensor]:
        """The second-to-last hidden states, zero past each prompt's tokens, and the mask of those tokens."""
        encoder = text_encoders["text_encoder"]
        device = next(encoder.parameters()).device
        mask = ids["text_encoder_mask"].to(device).bool()
        out = encoder(input_ids=ids["text_encoder"].to(device), attention_mask=mask, output_hidden_states=True)
        hidden = out.hidden_states[-2]
        rest = {k: v for k, v in ids.items() if k not in ("text_encoder", "text_encoder_mask")}
        return {**rest, "prompt_embeds": hidden * mask.unsqueeze(-1).to(hidden.dtype), "prompt_mask": mask.long()}

    # --- training --------------------------------------------------------------------------------------------
    def predict(self, denoiser, noisy, timesteps, cond):
        """The transformer as the pipeline calls it: a list of one-frame latents, each prompt's own tokens, the
        reversed time in [0, 1]; its output negated (flow matching's ``noise - latents``)."""
        mask = cond["prompt_mask"].bool()
        prompts = [e[m] for e, m in zip(cond["prompt_embeds"], mask)]
        out = denoiser(
            list(noisy.unsqueeze(2).unbind(0)), (1000 - timesteps.to(noisy.dtype)) / 1000, prompts, return_dict=False
        )[0]
        return -torch.stack(out).squeeze(2)

    # --- exports ---------------------------------------------------------------------------------------------
    def kohya_module_name(self, component: str, name: str, config) -> str:
        return native_name(name)

    def kohya_siblings(self, component: str, name: str) -> tuple[str, ...] | None:
        found = _QKV.match(name)
        return tuple(f"{found.group(1)}.to_{x}" for x in "qkv") if found else None

    def single_file_state(self, modules: dict, vocab_sizes: dict[str, int]) -> dict:
        """The transformer by ComfyUI's names (q, k, v fused into qkv), the single file Comfy-Org ships, which
        ComfyUI's Load Diffusion Model and ``ZImageTransformer2DModel.from_single_file`` read."""
        state = dict(modules["transformer"].state_dict())
        out = {}
        for key, value in state.items():
            if re.search(r"\.attention\.to_[kv]\.", key):
                continue
            if ".attention.to_q." in key:
                parts = [state[key.replace(".to_q.", f".to_{x}.")] for x in "qkv"]
                value = torch.cat(parts)
            out[native_name(key)] = value
        return out
