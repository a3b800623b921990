"""Flux.2: dev (``Flux2Pipeline``, a Mistral 3 text encoder) and klein (``Flux2KleinPipeline``, a Qwen3 text encoder).

Prompts, as the pipelines' ``encode_prompt``: the chat template around the prompt (dev: BFL's system message
first), padded to ``max_sequence_length`` (512 unless ``model.max_sequence_length`` says otherwise), and the
language model's hidden states at three layers (dev 10, 20, 30; klein 9, 18, 27) side by side. The
transformer reads 2x2 patches of the 32-channel VAE latents (128 channels) as a sequence, 4-axis position ids
(t, h, w, l) of the patches and of the text tokens, timesteps in [0, 1], and (dev) the guidance it was distilled
with (``model.guidance`` during training; the gallery's guidance_scale at sampling). Klein has no guidance
embedding: its base checkpoints sample with true CFG, its step-distilled ones without.

Latents, as the pipelines hold them: the VAE's 32 x h x w latents in 2x2 patches (128 x h/2 x w/2), each patch
channel normalised by the VAE's batch-norm statistics, ``(patch - mean) / std`` (``encode_images``,
``latent_normalization``); the transformer reads them as a sequence of h/2 * w/2 tokens.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from tuner.errors import ConfigError
from tuner.models.base import Components
from tuner.models.bfl_layout import SWAPPED_HALVES
from tuner.models.flow import FlowFamily
from tuner.models.flux2_layout import flux2_name, original_state
from tuner.models.real import RealWidths
from tuner.models.references import References
from tuner.models.tiny import qwen3_tokenizer, unigram_tokenizer

# Mistral 3's chat template as Flux2Pipeline applies it (system, then user: text parts only)
_MISTRAL_TEMPLATE = (
    "{{- bos_token }}{%- for m in messages %}{%- if m['content'] is string %}{%- set text = m['content'] %}"
    "{%- else %}{%- set text = m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text')"
    " | join('') %}"
    "{%- endif %}{%- if m['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif m['role'] == 'user' %}{{- '[INST]' + text + '[/INST]' }}{%- else %}{{- text + eos_token }}{%- endif %}"
    "{%- endfor %}"
)


@dataclass(frozen=True)
class Flux2References(References):
    """Flux.2's rule for its references (the pipelines' "process images"): a reference over 1024 x 1024 px scaled
    to that area (LANCZOS), then center-cropped to sides that are multiples of 16; one smaller is only cropped. The
    pipelines refuse one under 64 px a side or of an aspect beyond 8:1 (``vae_image`` raises ValueError, as they)."""

    most: int = 10  # BFL's figure for FLUX.2's multi-reference editing; the pipelines take any number

    def vae_image(self, image: Image.Image) -> Image.Image:
        from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

        processor = Flux2ImageProcessor(vae_scale_factor=16)
        processor.check_image_input(image)
        if image.width * image.height > 1024 * 1024:
            image = processor._resize_to_target_area(image, 1024 * 1024)
        return processor.resize(image, image.height // 16 * 16, image.width // 16 * 16, resize_mode="crop")


def _batch_norm(vae) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and std (128, 1, 1) the VAE's batch norm holds for each of the 128 channels of a 2x2 patch."""
    mean, var = vae.bn.running_mean.detach().float().cpu(), vae.bn.running_var.detach().float().cpu()
    return mean.view(-1, 1, 1), torch.sqrt(var + vae.config.batch_norm_eps).view(-1, 1, 1)


class _Flux2(FlowFamily):
    """What Flux.2 dev and klein share: the transformer, the VAE, the prompt's hidden-state taps."""

    DENOISER_CLASS = "Flux2Transformer2DModel"
    IMG2IMG = None  # Flux.2's pipelines take reference images (editing), not an init image to noise
    TEXT_ENCODERS = ("text_encoder",)
    LORA_TEXT_ENCODERS = ()  # the language model stays frozen, as in diffusers' Flux.2 scripts (their LoRA files
    # hold the transformer only)
    EMBEDDINGS = {}
    EMBEDDING_REFUSAL = (
        "its text encoder is a language model read at three hidden layers, and diffusers' Flux.2 pipelines have no "
        "textual-inversion loader to read an embedding"
    )
    TAPS: tuple[int, ...] = ()  # the text encoder's hidden states the pipeline reads (text_encoder_out_layers)
    BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")
    PARTIAL_BLOCKS = ("transformer_blocks.*.attn.*", "single_transformer_blocks.*.attn.*")
    OFFLOAD_BLOCKS = ("Flux2TransformerBlock", "Flux2SingleTransformerBlock")
    # a single-stream block has two linear layers: to_qkv_mlp_proj (q, k, v and the MLP's input, BFL's linear1) and
    # to_out (the attention's and the MLP's output, linear2); the double-stream blocks' to_out is a ModuleList
    TARGETS = {
        "attn": ["to_q", "to_k", "to_v", "to_out.0", "to_qkv_mlp_proj", "to_out"],
        "attn_ff": [
            "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
            "ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out", "to_qkv_mlp_proj",
            "to_out",
        ],
    }  # fmt: skip
    TARGETS_EXCLUDE = r"transformer_blocks\.\d+\.attn\.to_out"  # the ModuleList "to_out" reaches (fullmatch)
    NO_SCHEDULERS = ("flow_heun",)  # the pipelines pass custom sigmas and mu, which FlowMatchHeun cannot take
    EXPORTS = ("diffusers", "kohya", "peft", "merged", "single_file")
    DEFAULT_EXPORTS = ("diffusers", "kohya")
    SINGLE_FILE_TEXT = False
    # kohya-style Flux.2 LoRAs: the transformer's modules by BFL's names (diffusers' _convert_kohya_flux2_lora_to_
    # diffusers and ComfyUI read them); q, k and v are one module there: LoRAs stack exactly, LoHa / LoKr do not
    KOHYA_PREFIXES = {"transformer": "lora_unet"}
    FORMAT_LIMITS = {"kohya": {"loha", "lokr"}}
    KOHYA_READERS = "ComfyUI / diffusers"
    # names only Flux.2 has (diffusers') and BFL's block names, which Flux.1 shares (widths tell them apart)
    SIGNS = r"to_qkv_mlp_proj|linear_in|linear_out|stream_modulation|time_guidance_embed|double_blocks_|single_blocks_"
    TINY_OPTIONS = ("model.max_sequence_length=64",)  # its tiny tokenizer's system message and prompt fit 64 tokens
    REFERENCES = Flux2References()  # reference images (editing): cond["control_k"] in predict

    # --- tiny and real-width models ------------------------------------------------------------------------
    def _tiny_parts(self, seed: int, guidance: bool, joint: int) -> dict:
        """The tiny transformer (one double-, one single-stream block over 128 patch channels), a 32-channel VAE
        that downsamples x8 as the real one, and Flux.2's scheduler settings."""
        from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

        torch.manual_seed(seed)
        transformer = Flux2Transformer2DModel(
            in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=joint, timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2),
            guidance_embeds=guidance,
        )  # fmt: skip
        torch.manual_seed(seed + 1)
        blocks = 4
        vae = AutoencoderKLFlux2(
            down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
            block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=32, norm_num_groups=8,
            sample_size=32, mid_block_add_attention=False,
        )  # fmt: skip
        # batch-norm statistics as a trained VAE has them (a fresh one has mean 0, var 1: nothing to check)
        vae.bn.running_mean.copy_(torch.randn(128) * 0.2)
        vae.bn.running_var.copy_(torch.rand(128) + 0.5)
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
            max_image_seq_len=4096, time_shift_type="exponential",
        )  # fmt: skip
        torch.manual_seed(seed + 2)
        return {"transformer": transformer, "vae": vae, "scheduler": scheduler}

    # --- prompts -------------------------------------------------------------------------------------------
    def encode_ids(self, text_encoders: dict, ids: dict) -> dict[str, torch.Tensor]:
        """As the pipelines' ``encode_prompt``: the hidden states at ``TAPS``, side by side per token."""
        encoder = text_encoders["text_encoder"]
        device = next(encoder.parameters()).device
        out = encoder(
            input_ids=ids["text_encoder"].to(device),
            attention_mask=ids["text_encoder_mask"].to(device),
            output_hidden_states=True,
            use_cache=False,
        )
        hidden = torch.stack([out.hidden_states[k] for k in self.TAPS], dim=1)  # (B, taps, L, D)
        b, taps, length, width = hidden.shape
        embeds = hidden.permute(0, 2, 1, 3).reshape(b, length, taps * width)
        rest = {k: v for k, v in ids.items() if k not in ("text_encoder", "text_encoder_mask")}
        return {**rest, "prompt_embeds": embeds}

    # --- training ------------------------------------------------------------------------------------------
    def encode_images(self, vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior's mean and std in 2x2 patches (B, 128, h/2, w/2): the pipelines' latent layout."""
        from diffusers import Flux2Pipeline

        dist = vae.encode(images).latent_dist
        return Flux2Pipeline._patchify_latents(dist.mean), Flux2Pipeline._patchify_latents(dist.std)

    def latent_normalization(self, vae) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) per patch channel: the VAE's batch-norm statistics, as the pipelines normalise."""
        mean, std = _batch_norm(vae)
        return 1.0 / std, mean

    def predict(self, denoiser, noisy, timesteps, cond):
        """The transformer on ``noisy`` (normalised patches, B x 128 x h/2 x w/2) as a sequence, as the pipelines
        call it; its output in the same shape. References (``cond["control_0"]``, ... in the same layout): their
        tokens follow the target's, reference k's position ids at time 10 + 10 k (``_prepare_image_ids``), and the
        output is the target's tokens alone, as the pipelines draw an edit."""
        from diffusers import Flux2Pipeline

        cond, references = dict(cond), []
        while f"control_{len(references)}" in cond:
            references.append(cond.pop(f"control_{len(references)}").to(noisy.dtype))
        text = cond["prompt_embeds"]
        config = getattr(denoiser, "module", denoiser).config  # DistributedDataParallel wraps it
        guidance = None
        if config.guidance_embeds:
            guidance = torch.full((len(noisy),), float(self.model.guidance), device=noisy.device)
        tokens = [Flux2Pipeline._pack_latents(x) for x in (noisy, *references)]
        ids = Flux2Pipeline._prepare_latent_ids(noisy)
        if references:
            shown = Flux2Pipeline._prepare_image_ids([r[:1] for r in references]).repeat(len(noisy), 1, 1)
            ids = torch.cat([ids, shown.to(ids)], dim=1)
        out = denoiser(
            hidden_states=torch.cat(tokens, dim=1),
            timestep=timesteps.to(noisy.dtype) / 1000,
            guidance=guidance,
            encoder_hidden_states=text,
            txt_ids=Flux2Pipeline._prepare_text_ids(text).to(noisy.device),
            img_ids=ids.to(noisy.device),
            return_dict=False,
        )[0]
        return out[:, : tokens[0].shape[1]].transpose(1, 2).reshape(noisy.shape)

    # --- exports -------------------------------------------------------------------------------------------
    def kohya_module_name(self, component: str, name: str, config) -> str:
        return flux2_name(name)[0]

    def kohya_siblings(self, component: str, name: str) -> tuple[str, ...] | None:
        return flux2_name(name)[1]

    def kohya_swapped(self, component: str, name: str, config) -> bool:
        return name in SWAPPED_HALVES

    def single_file_state(self, modules: dict, vocab_sizes: dict[str, int]) -> dict:
        """The transformer in BFL's original layout, the single file ComfyUI (diffusion model loader) and
        ``Flux2Transformer2DModel.from_single_file`` read; the text encoder and VAE stay the base's."""
        return original_state(modules["transformer"].state_dict())

    # --- real widths ---------------------------------------------------------------------------------------
    def _real(self, heads, double, single, text, text_layers, guidance, published) -> RealWidths:
        """A Flux.2 transformer of ``heads`` x 128 wide with ``double`` double- and ``single`` single-stream blocks
        (the unit: one double-stream block and single / double single-stream ones), a ``text``-wide encoder; the
        inputs of a step with ``references`` images of the target's size (1 MP at 1024 px) beside the target."""
        per = single // double

        def transformer(n):
            from diffusers import Flux2Transformer2DModel

            return Flux2Transformer2DModel(
                num_layers=n, num_single_layers=per * n, num_attention_heads=heads, joint_attention_dim=3 * text,
                guidance_embeds=guidance,
            )  # fmt: skip

        def inputs(resolution, batch, dtype, references: int = 0):  # each reference of the target's size
            tokens, length = (resolution // 16) ** 2 * (1 + references), 512
            return {
                "hidden_states": torch.randn(batch, tokens, 128, dtype=dtype),
                "encoder_hidden_states": torch.randn(batch, length, 3 * text, dtype=dtype),
                "timestep": torch.rand(batch),
                "img_ids": torch.zeros(batch, tokens, 4),
                "txt_ids": torch.zeros(batch, length, 4),
                "guidance": torch.ones(batch) if guidance else None,
            }

        return RealWidths(
            transformer, double, inputs, lambda: [self._real_text_encoder(text, text_layers)], _real_vae,
            unit=f"1 double + {per} single blocks", published=published,
        )  # fmt: skip


def _real_vae():
    from diffusers import AutoencoderKLFlux2

    return AutoencoderKLFlux2()


class Flux2(_Flux2):
    NAME = "flux2"
    PIPELINE = "Flux2Pipeline"
    TAPS = (10, 20, 30)
    MODELSPEC_ARCHITECTURE = "flux-2-dev"
    BASE_VERSION = "flux2"
    WIDTHS = frozenset({6144})  # the transformer's (48 heads of 128)
    SAMPLE_FILES = (
        {"transformer.transformer_blocks.0.attn.to_q": (4, 6144),
         "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj": (4, 6144)},
        {"lora_unet_double_blocks_0_img_attn_qkv": (4, 6144), "lora_unet_single_blocks_0_linear1": (4, 6144)},
        {"diffusion_model.double_blocks.0.img_attn.qkv": (4, 6144)},  # ComfyUI's own keys
    )  # fmt: skip
    # InvokeAI 6.14's base for FLUX.2 klein and dev alike; it runs the transformer as diffusers' class
    CLIENTS = {"comfyui": {"model": "Flux2"}, "invokeai": {"base": "flux2", "runs": "diffusers"}}

    def build_tiny(self, seed: int = 0, size: str = "test") -> dict:
        """A tiny Flux.2 dev: the transformer with its guidance embedding, a Mistral 3 text encoder of 31 layers (the
        pipeline reads layers 10, 20, 30) with a one-layer Pixtral vision tower, a character tokenizer with Mistral's
        chat template (Flux2Pipeline calls the tokenizer's apply_chat_template only: PixtralProcessor's images are
        for caption upsampling)."""
        from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
        from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PreTrainedTokenizerFast

        width = 16
        parts = self._tiny_parts(seed, guidance=True, joint=3 * width)
        specials = [
            "<unk>",
            "<s>",
            "</s>",
            "<pad>",
            "[INST]",
            "[/INST]",
            "[SYSTEM_PROMPT]",
            "[/SYSTEM_PROMPT]",
            "[IMG]",
        ]
        tokenizer = unigram_tokenizer(
            PreTrainedTokenizerFast, specials, SYSTEM_MESSAGE, _MISTRAL_TEMPLATE,
            bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        )  # fmt: skip
        text = {"vocab_size": len(tokenizer), "hidden_size": width, "intermediate_size": 2 * width,
                "num_hidden_layers": max(self.TAPS) + 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                "head_dim": 8, "max_position_embeddings": 128, "pad_token_id": tokenizer.pad_token_id,
                "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}  # fmt: skip
        vision = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 1,
                  "image_size": 32, "patch_size": 8}  # fmt: skip
        config = Mistral3Config(
            text_config={"model_type": "mistral", **text}, vision_config={"model_type": "pixtral", **vision},
            image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2,
        )  # fmt: skip
        encoder = Mistral3ForConditionalGeneration(config)
        return {**parts, "text_encoder": encoder, "tokenizer": tokenizer}

    def real_widths(self) -> RealWidths:
        """Flux.2 dev's 32B transformer (8 double-stream blocks, 48 single-stream, 6144 wide, guidance embedding)
        by units of one double- and six single-stream blocks, Mistral Small 3.1 (5120 x 40), its 32-channel VAE."""
        published = {
            "Flux.2 dev LoRA r16 1024 px target": "<= 20 GB offloaded",
            "SimpleTuner (int8 model, int4 text encoder)": "~22 GB",
            "diffusion-pipe without block swap": ">= 48 GB",
        }
        return self._real(48, 8, 48, 5120, 40, True, published)

    def _real_text_encoder(self, width, layers):
        from transformers import MistralConfig, MistralModel

        config = MistralConfig(hidden_size=width, intermediate_size=32768, num_hidden_layers=layers, head_dim=128,
                               num_attention_heads=32, num_key_value_heads=8, vocab_size=131072)  # fmt: skip
        return MistralModel(config)

    def load_tokenizer(self, folder: Path, library: str, cls: str):
        """FLUX.2-dev's folder names a PixtralProcessor, which cannot be built without torchvision; the pipeline uses
        its image half only to upsample captions with images. Without torchvision: the folder's tokenizer with the
        processor's chat template, which is all ``encode_prompt`` calls."""
        if cls != "PixtralProcessor" or importlib.util.find_spec("torchvision") is not None:
            return super().load_tokenizer(folder, library, cls)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        if tokenizer.chat_template is None and (folder / "chat_template.jinja").is_file():
            tokenizer.chat_template = (folder / "chat_template.jinja").read_text()
        if tokenizer.chat_template is None and (folder / "chat_template.json").is_file():
            tokenizer.chat_template = json.loads((folder / "chat_template.json").read_text())["chat_template"]
        return tokenizer

    def pipeline_with(self, path: str | Path, **components):
        """The pipeline of the base folder ``path``, its tokenizer as ``load_tokenizer`` reads it."""
        folder = self.check_folder(path)
        library, cls = json.loads((folder / "model_index.json").read_text())["tokenizer"]
        if "tokenizer" in components or cls != "PixtralProcessor" or importlib.util.find_spec("torchvision"):
            return super().pipeline_with(folder, **components)
        pipe = super().pipeline_with(folder, **components, tokenizer=None)  # diffusers checks a passed one's class
        pipe.tokenizer = self.load_tokenizer(folder / "tokenizer", library, cls)
        return pipe

    def tokenize(self, c: Components, prompts: list[str]) -> dict[str, torch.Tensor]:
        """As ``Flux2Pipeline``: BFL's system message and the prompt in Mistral's chat template, padded."""
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input
        from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

        inputs = c.tokenizer.apply_chat_template(
            format_input(list(prompts), SYSTEM_MESSAGE), add_generation_prompt=False, tokenize=True,
            return_dict=True, return_tensors="pt", padding="max_length", truncation=True,
            max_length=self.max_sequence_length,
        )  # fmt: skip
        return {"text_encoder": inputs["input_ids"], "text_encoder_mask": inputs["attention_mask"]}

    def decode(self, pipe, latents, height, width):
        """The pipeline's ``output_type="latent"``: the packed, normalised patch sequence."""
        from diffusers import Flux2Pipeline

        vae, side = pipe.vae, pipe.vae_scale_factor * 2
        patches = latents.transpose(1, 2).reshape(len(latents), -1, height // side, width // side)
        mean, std = _batch_norm(vae)
        patches = patches.float() * std.to(patches.device) + mean.to(patches.device)
        return vae.decode(Flux2Pipeline._unpatchify_latents(patches).to(vae.dtype)).sample


class Flux2Klein(_Flux2):
    NAME = "flux2_klein"
    PIPELINE = "Flux2KleinPipeline"
    TAPS = (9, 18, 27)
    MODELSPEC_ARCHITECTURE = "flux-2-klein"
    BASE_VERSION = "flux2_klein"
    WIDTHS = frozenset({3072, 4096})  # 4B's transformer (24 heads of 128), 9B's (32)
    # Flux.1's width is 4B's too: a file is klein's only when it has a name only Flux.2 has (a BFL-named klein 4B
    # LoRA cannot be told from Flux.1's by names and widths, and is taken for the far more common Flux.1)
    NEVER = r"^(?!.*(?:to_qkv_mlp_proj|linear_in|linear_out|stream_modulation|time_guidance_embed))"
    SAMPLE_FILES = (
        {"transformer.transformer_blocks.0.attn.to_q": (4, 3072),
         "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj": (4, 3072)},
        {"transformer.transformer_blocks.0.ff.linear_in": (4, 4096),
         "transformer.transformer_blocks.0.attn.to_q": (4, 4096)},  # 9B
        {"diffusion_model.single_transformer_blocks.0.attn.to_qkv_mlp_proj": (4, 3072),
         "diffusion_model.transformer_blocks.0.attn.to_q": (4, 3072)},  # ComfyUI reads diffusers' names too
    )  # fmt: skip
    CLIENTS = {"comfyui": {"model": "Flux2"}, "invokeai": {"base": "flux2", "runs": "diffusers"}}

    def build_tiny(self, seed: int = 0, size: str = "test") -> dict:
        """A tiny Flux.2 klein: the transformer without guidance embedding, a Qwen3 of 28 layers (the pipeline reads
        9, 18, 27), a character tokenizer with Qwen3's chat template. ``size="distilled"``: the step-distilled
        checkpoint's pipeline (``is_distilled``: no CFG)."""
        from transformers import Qwen3Config, Qwen3ForCausalLM

        width = 16
        parts = self._tiny_parts(seed, guidance=False, joint=3 * width)
        tokenizer = qwen3_tokenizer()
        config = Qwen3Config(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
            num_hidden_layers=max(self.TAPS) + 1, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
            max_position_embeddings=128, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        out = {**parts, "text_encoder": Qwen3ForCausalLM(config), "tokenizer": tokenizer}
        return {**out, "is_distilled": True} if size == "distilled" else out

    REAL_SIZES = ("9B",)

    def real_widths(self, size: str | None = None) -> RealWidths:
        """Flux.2 klein 4B's transformer (5 double-stream blocks, 20 single-stream, 3072 wide) by units of one
        double- and four single-stream blocks, Qwen3-4B (2560 x 36), the 32-channel VAE; ``size="9B"``: 9B's
        (8 double, 24 single, 4096 wide; units of one double and three single) and Qwen3-8B (4096 x 36)."""
        if size == "9B":
            published = {"klein 9B LoRA r16 1024 px target": "<= 10 GB NF4", "klein 9B LoRA (int8)": "~14 GB"}
            return self._real(32, 8, 24, 4096, 36, False, published)
        published = {"klein 4B LoRA r16 1024 px target": "<= 6 GB NF4", "klein 4B LoRA (int8)": "~8 GB"}
        return self._real(24, 5, 20, 2560, 36, False, published)

    def _real_text_encoder(self, width, layers):
        """Qwen3-4B (2560 wide) or Qwen3-8B (4096): 32 query heads of 128, 8 key-value heads."""
        from transformers import Qwen3Config, Qwen3Model

        config = Qwen3Config(hidden_size=width, intermediate_size={2560: 9728, 4096: 12288}[width], head_dim=128,
                             num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8,
                             vocab_size=151936)  # fmt: skip
        return Qwen3Model(config)

    def tokenize(self, c: Components, prompts: list[str]) -> dict[str, torch.Tensor]:
        """As ``Flux2KleinPipeline``: the prompt as the user's turn of Qwen3's chat template, thinking off, padded."""
        return self.chat_ids(c.tokenizer, prompts, enable_thinking=False)

    def decode(self, pipe, latents, height, width):
        """The pipeline's ``output_type="latent"``: the VAE's own latents (klein un-normalises before returning)."""
        return pipe.vae.decode(latents.to(pipe.vae.dtype)).sample

    def check_trainable(self, folder: Path) -> None:
        """Refuse a step-distilled klein as a training base: a LoRA trained on it undoes the distillation (images
        collapse in few steps); trained on the base checkpoint it runs on the distilled one."""
        index = json.loads((Path(folder).expanduser() / "model_index.json").read_text())
        if index.get("is_distilled"):
            raise ConfigError(
                f"model.path={folder} is a step-distilled FLUX.2 klein (is_distilled in its model_index.json): "
                "training on it undoes the distillation. Train on the base checkpoint (FLUX.2-klein-base-4B or "
                "-base-9B) and draw with the LoRA on the distilled one (recipe=generate model.path=DISTILLED)"
            )
