"""Krea 2: Krea's 12.9B single-stream MMDiT (``Krea2Transformer2DModel``, 28 blocks, 6144 wide) over 2x2 patches of
Qwen-Image's 16-channel VAE latents, prompted by a stack of Qwen3-VL-4B's hidden states; base (``Krea-2-Raw``) and
step-distilled (``Krea-2-Turbo``).

Prompts, as ``Krea2Pipeline.get_text_hidden_states``: Qwen-Image's chat template (the "Describe the image ..." system
message) in a fixed-length block: the system prefix and the prompt padded to ``max_sequence_length`` + 29 tokens, then
the 5 tokens that close the user's turn and open the assistant's, so the padding sits *inside* the template. Qwen3-VL
(``Qwen3VLModel``) reads it with positions that count real tokens only (padding takes no position), and the hidden
states of the layers ``text_encoder_select_layers`` names (model_index.json; the 12 taps 2, 5, ..., 35 of the real
encoder) are stacked per token: (B, L, taps, 2560), the system prefix's 34 tokens dropped, with the mask of real
tokens (the closing tokens after the padding included). tuner caches exactly that; the transformer's text fusion
stage collapses the taps itself.

The transformer reads the packed latents, the time in [0, 1] (``timestep / 1000``, 1 is noise), the joint
sequence's RoPE coordinates (text at the origin, image tokens on their grid) and the text mask; it predicts flow
matching's ``noise - latents``, the target diffusers' DreamBooth script trains (over the plain schedule: its
scheduler's resolution-dependent shift is for sampling). Latents are per channel ``(z - latents_mean) /
latents_std``; the VAE encodes and decodes one frame.

Sampling: the pipeline's own CFG, ``cond + s * (cond - uncond)`` whenever ``guidance_scale > 0`` (Krea's
convention: 4.5 is the usual CFG's 5.5; 0 is one pass, Turbo's), the negative prompt "" unless given; ``mu`` from the
image's token count (the scheduler's exponential dynamic shift), or 1.15 for a distilled folder.

Krea-2-Turbo (``is_distilled`` in model_index.json, or named so) is refused as a training base: train on the base,
run on Turbo (a LoRA of the base loads onto Turbo, the same modules). ``Krea2TurboModularPipeline`` is a sampling
pipeline of the same checkpoint, nothing tuner trains.

Exports: the diffusers file (``Krea2LoraLoaderMixin``); kohya's ``lora_unet_`` names over Krea's original module
names (``blocks.0.attn.wq``, ``txtfusion.``, ``first``), which ComfyUI's Krea 2 model (``SingleStreamDiT``) has and
its LoRA loader maps; the single file in those names, as Comfy-Org ships it, which
``Krea2Transformer2DModel.from_single_file`` converts back.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from tuner.errors import ConfigError
from tuner.models.base import Components
from tuner.models.flow import FlowFamily
from tuner.models.qwen_image import TEMPLATE, _OneFrame
from tuner.models.qwen_image import tiny_tokenizer as qwen_tokenizer
from tuner.models.real import RealWidths, qwen3_vl

PREFIX, SUFFIX = TEMPLATE.split("{}")  # Krea2Pipeline's prompt_template_encode_prefix and _suffix
DROPPED, CLOSING = 34, 5  # their token counts (prompt_template_encode_start_idx, _num_suffix_tokens)
SCHEDULER = {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
             "max_image_seq_len": 6400, "time_shift_type": "exponential"}  # fmt: skip
DISTILLED = (
    "Krea-2-Turbo is step-distilled (8 steps, no CFG): a LoRA trained on it undoes the distillation. Train on the "
    "base (krea/Krea-2-Raw) and run on Turbo (recipe=generate model.path=<Turbo folder> generate.adapters=[...] at "
    "guidance 0): the LoRA loads onto Turbo unchanged"
)
# Krea's original names (ComfyUI's model, the single file) from diffusers': the inverse of diffusers'
# convert_krea2_transformer_checkpoint_to_diffusers, in an order where no rule undoes an earlier one
_NATIVE = (
    (r"^img_in(?=\.|$)", "first"),
    (r"^time_embed\.linear_1", "tmlp.0"),
    (r"^time_embed\.linear_2", "tmlp.2"),
    (r"^time_mod_proj", "tproj.1"),
    (r"^txt_in\.norm\.weight$", "txtmlp.0.scale"),
    (r"^txt_in\.linear_1", "txtmlp.1"),
    (r"^txt_in\.linear_2", "txtmlp.3"),
    (r"^text_fusion\.", "txtfusion."),
    (r"^transformer_blocks\.", "blocks."),
    (r"^final_layer\.linear", "last.linear"),
    (r"^final_layer\.norm\.weight$", "last.norm.scale"),
    (r"^final_layer\.scale_shift_table$", "last.modulation.lin"),
    (r"\.scale_shift_table$", ".mod.lin"),
    (r"\.attn\.to_([qkv])(?=\.|$)", r".attn.w\1"),
    (r"\.attn\.to_out\.0(?=\.|$)", ".attn.wo"),
    (r"\.attn\.to_gate(?=\.|$)", ".attn.gate"),
    (r"\.attn\.norm_([qk])\.weight$", r".attn.qknorm.\1norm.scale"),
    (r"\.ff\.", ".mlp."),
    (r"\.norm1\.weight$", ".prenorm.scale"),
    (r"\.norm2\.weight$", ".postnorm.scale"),
)


def native_name(name: str) -> str:
    """A diffusers module or parameter name of the transformer as Krea's original model (and ComfyUI) names it."""
    for ours, theirs in _NATIVE:
        name = re.sub(ours, theirs, name)
    return name


class Krea2(FlowFamily):
    NAME = "krea2"
    PIPELINE = "Krea2Pipeline"
    DENOISER_CLASS = "Krea2Transformer2DModel"
    IMG2IMG = None  # diffusers has no Krea 2 image-to-image pipeline
    TEXT_ENCODERS = ("text_encoder",)  # Qwen3-VL-4B (Qwen3VLModel), read at several layers
    LORA_TEXT_ENCODERS = ()  # frozen and cached: Krea2LoraLoaderMixin loads the transformer only
    EMBEDDINGS = {}
    EMBEDDING_REFUSAL = (
        "its prompts are a stack of a chat-templated Qwen3-VL's hidden states, and Krea2Pipeline has no "
        "textual-inversion loader to read an embedding"
    )
    # the single-stream blocks, and the text fusion stage's (across taps, then across tokens)
    BLOCKS = ("transformer_blocks.", "text_fusion.")
    PARTIAL_BLOCKS = ("transformer_blocks.*.attn.*",)
    OFFLOAD_BLOCKS = ("Krea2TransformerBlock",)
    TARGETS = {
        # what Krea's authors advise for long runs (attention with its output gate)
        "attn": ["to_q", "to_k", "to_v", "to_out.0", "to_gate"],
        # diffusers' DreamBooth script's default (the authors' recommended set; their MLP list has no ff.gate)
        "attn_ff": ["img_in", "final_layer.linear", "to_q", "to_k", "to_v", "to_out.0", "to_gate", "ff.up", "ff.down",
                    "text_fusion.projector", "txt_in.linear_1", "txt_in.linear_2", "time_embed.linear_1",
                    "time_embed.linear_2", "time_mod_proj"],
    }  # fmt: skip
    # the pipeline passes its sigmas and mu: FlowMatchHeun's and DPM-Solver's set_timesteps take no sigmas
    NO_SCHEDULERS = ("flow_heun", "flow_dpm++")
    EXPORTS = ("diffusers", "kohya", "peft", "merged", "single_file")
    DEFAULT_EXPORTS = ("diffusers", "kohya")
    # ComfyUI's names (Krea's original modules, none fused) under lora_unet_; diffusers' converter reads
    # diffusion_model.* lora_A/lora_B files of those names, not kohya's lora_down/lora_up
    KOHYA_PREFIXES = {"transformer": "lora_unet"}
    DIFFUSERS_READS_KOHYA = False
    KOHYA_READERS = "ComfyUI"
    SINGLE_FILE_TEXT = False  # the transformer alone, as Comfy-Org ships Krea-2's diffusion model
    BASE_VERSION = "krea2"
    MODELSPEC_ARCHITECTURE = "Krea-2"
    MAX_SEQUENCE_LENGTH = 512  # the pipeline's fixed text length
    DEFAULT_RESOLUTION = 1024
    WIDTHS = frozenset({6144})  # the transformer's (48 heads of 128)
    # diffusers' names (the gated attention, the text fusion stage) and Krea's own (wq / txtfusion / mlp_up)
    SIGNS = r"attn_to_gate|text_fusion|txtfusion|blocks_\d+_attn_w[qkvo]\b|blocks_\d+_mlp_(up|down|gate)\b"
    SAMPLE_FILES = (
        {"transformer.transformer_blocks.0.attn.to_q": (4, 6144),
         "transformer.transformer_blocks.0.attn.to_gate": (4, 6144)},
        {"lora_unet_blocks_0_attn_wq": (4, 6144), "lora_unet_blocks_0_mlp_up": (4, 6144)},
        {"diffusion_model.blocks.27.attn.wq": (4, 6144)},  # Krea's reference trainer's and ComfyUI's keys
    )  # fmt: skip
    TINY_OPTIONS = ("model.max_sequence_length=32",)
    # ComfyUI's model (comfy/ldm/krea2: SingleStreamDiT, Krea's names); InvokeAI 6.14's krea-2 base runs diffusers'
    # class and reads both LoRA files (tests/test_krea2.py; its real-width check: tests/clients/bases.py UNBUILT)
    CLIENTS = {
        "comfyui": {"model": "Krea2"},
        "invokeai": {"base": "krea-2", "runs": "diffusers", "loras": ("diffusers", "kohya")},
    }

    # --- tiny and real-width models --------------------------------------------------------------------------
    def build_tiny(self, seed: int = 0, size: str = "test") -> dict:
        """A tiny Krea 2: two blocks (32 wide, grouped-query), one text fusion block of each kind over two taps of a
        two-layer Qwen3VLModel, an x8 AutoencoderKLQwenImage, a byte-level tokenizer whose template prefix is the 34
        tokens the pipeline drops, Krea 2's scheduler."""
        from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, Krea2Transformer2DModel
        from transformers import Qwen3VLConfig, Qwen3VLModel

        width, taps = 32, (1, 2)
        torch.manual_seed(seed)
        transformer = Krea2Transformer2DModel(
            num_layers=2, attention_head_dim=8, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
            text_hidden_dim=width, num_text_layers=len(taps), text_num_attention_heads=2, text_num_key_value_heads=2,
            text_intermediate_size=64, num_layerwise_text_blocks=1, num_refiner_text_blocks=1, axes_dims_rope=(2, 2, 4),
        )  # fmt: skip
        with torch.no_grad():  # the zero-centred norms and tables as trained ones are (fresh ones: nothing to check)
            for name, p in transformer.named_parameters():
                if name.endswith("scale_shift_table") or "norm" in name:
                    p.normal_(std=0.1)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
        vae.register_to_config(sample_size=32)  # what tuner's data.resolution defaults to
        torch.manual_seed(seed + 2)
        tokenizer = qwen_tokenizer()
        text = {"vocab_size": len(tokenizer), "hidden_size": width, "intermediate_size": 2 * width,
                "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
                "max_position_embeddings": 2048, "pad_token_id": tokenizer.pad_token_id,
                "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 5e6,
                                    "mrope_interleaved": True}}  # fmt: skip
        vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": width,
                  "deepstack_visual_indexes": [0], "num_position_embeddings": 16}  # fmt: skip
        return {
            "transformer": transformer,
            "vae": vae,
            "text_encoder": Qwen3VLModel(Qwen3VLConfig(text_config=text, vision_config=vision)),
            "tokenizer": tokenizer,
            "scheduler": FlowMatchEulerDiscreteScheduler(**SCHEDULER),
            "text_encoder_select_layers": taps,
        }

    def real_widths(self, size: str | None = None) -> RealWidths:
        """Krea 2's transformer by single-stream blocks (28, 6144 wide; the text fusion stage always), Qwen3-VL-4B
        (2560 x 36), Qwen-Image's 16-channel VAE."""

        def transformer(units):
            from diffusers import Krea2Transformer2DModel

            return Krea2Transformer2DModel(num_layers=units)  # the config's defaults are Krea 2's

        def inputs(resolution, batch, dtype):
            side, text = resolution // 16, self.max_sequence_length
            return {
                "hidden_states": torch.randn(batch, side * side, 64, dtype=dtype),
                "encoder_hidden_states": torch.randn(batch, text, 12, 2560, dtype=dtype),
                "timestep": torch.rand(batch),
                "position_ids": torch.zeros(text + side * side, 3),
                "encoder_attention_mask": torch.ones(batch, text, dtype=torch.bool),
            }

        def text_encoders():
            return [qwen3_vl("4B")]

        def vae():
            from diffusers import AutoencoderKLQwenImage

            return _OneFrame(AutoencoderKLQwenImage())

        published = {
            "Krea 2 LoRA r16 1024 px target": "<= 16 GB NF4, <= 12 GB offloaded",  # the best published: 12 GB
            "Inline-Studio nf4 base (Krea 2 LoRA)": "16 GB card",
            "Inline-Studio nf4 base, 512 px": "12 GB card",
        }
        unit = "a single-stream block"
        return RealWidths(transformer, 28, inputs, text_encoders, vae, unit=unit, published=published)

    # --- loading ---------------------------------------------------------------------------------------------
    def check_trainable(self, folder: Path) -> None:
        """Refuse Krea-2-Turbo as a training base: ``is_distilled`` in its model_index.json, or its folder's name."""
        index = json.loads((Path(folder) / "model_index.json").read_text())
        if index.get("is_distilled") or re.search(r"turbo|distill", Path(folder).name, re.I):
            said = "is_distilled in its model_index.json" if index.get("is_distilled") else "its folder name"
            raise ConfigError(f"model.path={folder} is a distilled checkpoint ({said}): {DISTILLED}")

    # --- prompts ---------------------------------------------------------------------------------------------
    def tokenize(self, c: Components, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The pipeline's fixed-length block: prefix and prompt padded (or cut) to ``max_sequence_length`` + 29
        tokens, then the 5 closing tokens; the mask of real tokens."""
        tokenizer = c.tokenizer  # padding on its own side, as the pipeline's (Qwen's: the right)
        body = tokenizer(
            [PREFIX + p for p in prompts], truncation=True, padding="max_length", return_tensors="pt",
            max_length=self.max_sequence_length + DROPPED - CLOSING,
        )  # fmt: skip
        tail = tokenizer([SUFFIX] * len(prompts), return_tensors="pt")
        ids = torch.cat([body.input_ids, tail.input_ids], dim=1)
        mask = torch.cat([body.attention_mask, tail.attention_mask], dim=1)
        taps = c.extra.get("pipeline_config", {}).get("text_encoder_select_layers") or range(2, 36, 3)  # Krea 2's
        return {"text_encoder": ids, "text_mask": mask, "taps": torch.tensor(list(taps)).expand(len(prompts), -1)}

    def encode_ids(self, text_encoders: dict, ids: dict) -> dict[str, torch.Tensor]:
        """The tapped layers' states (the folder's ``text_encoder_select_layers``) stacked per token, read at
        positions that skip the padding, past the system prefix; zero where the mask is."""
        encoder = text_encoders["text_encoder"]
        device = next(encoder.parameters()).device
        mask = ids["text_mask"].to(device).bool()
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0).unsqueeze(0).expand(3, -1, -1)  # T, H, W alike
        out = encoder(input_ids=ids["text_encoder"].to(device), attention_mask=mask, position_ids=positions,
                      output_hidden_states=True)  # fmt: skip
        hidden = torch.stack([out.hidden_states[i] for i in ids["taps"][0].tolist()], dim=2)[:, DROPPED:]
        kept = mask[:, DROPPED:]
        embeds = hidden * kept[:, :, None, None].to(hidden.dtype)
        return {"prompt_embeds": embeds, "prompt_embeds_mask": kept.long()}

    # --- latents and training --------------------------------------------------------------------------------
    def encode_images(self, vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = vae.encode(images.unsqueeze(2)).latent_dist  # one frame
        return dist.mean[:, :, 0], dist.std[:, :, 0]

    def predict(self, denoiser, noisy, timesteps, cond):
        """The transformer as the pipeline calls it: 2x2-packed latents after the text, the RoPE grid, t / 1000."""
        from diffusers import Krea2Pipeline

        b, ch, h, w = noisy.shape
        packed = noisy.view(b, ch, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, ch * 4)
        embeds = cond["prompt_embeds"]
        positions = Krea2Pipeline.prepare_position_ids(embeds.shape[1], h // 2, w // 2, noisy.device)
        out = denoiser(
            hidden_states=packed,
            encoder_hidden_states=embeds,
            timestep=timesteps.to(noisy.dtype) / 1000,
            position_ids=positions,
            encoder_attention_mask=cond["prompt_embeds_mask"].bool(),
            return_dict=False,
        )[0]
        return out.view(b, h // 2, w // 2, ch, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, ch, h, w)

    # --- sampling --------------------------------------------------------------------------------------------
    def decode(self, pipe, latents, height, width):
        """The pipeline's decoding of its ``output_type="latent"`` (packed) latents: un-normalised, one frame."""
        vae = pipe.vae
        z = pipe._unpack_latents(latents, height, width).to(vae.dtype)
        scale, shift = (x.view(1, -1, 1, 1, 1).to(z) for x in self.latent_normalization(vae))
        return vae.decode(z / scale + shift).sample[:, :, 0]

    # --- exports ---------------------------------------------------------------------------------------------
    def kohya_module_name(self, component: str, name: str, config) -> str:
        return native_name(name)

    def single_file_state(self, modules: dict, vocab_sizes: dict[str, int]) -> dict:
        """The transformer in Krea's original names (each block's six modulation rows flattened into one), the
        single file ComfyUI loads and ``Krea2Transformer2DModel.from_single_file`` converts back."""
        out = {}
        for key, value in modules["transformer"].state_dict().items():
            if key.startswith("transformer_blocks.") and key.endswith(".scale_shift_table"):
                value = value.reshape(-1)
            out[native_name(key)] = value
        return out
