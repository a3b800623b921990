"""Ideogram 4: a single-stream flow-matching transformer (``Ideogram4Transformer2DModel``) over 2x2 patches of
Flux.2's 32-channel VAE latents, prompted by Qwen3-VL-8B, sampled with *asymmetric* CFG: a second, separately
trained ``unconditional_transformer`` predicts the branch without text.

Prompts, as ``Ideogram4Pipeline.encode_prompt``: the prompt as the user's turn of the chat template (text parts,
generation prompt added), left-padded to ``max_sequence_length``, run through Qwen3-VL's decoder layers with
position ids counted from each prompt's first token, and the states of 13 layers (0, 3, ..., 33, 35:
``QWEN3_VL_ACTIVATION_LAYERS``) side by side per token (53248 wide), zero on the padding. tuner calls the
pipeline's own static helper for those layers. The pipeline refuses a prompt longer than ``max_sequence_length``;
tuner cuts its text and keeps the template's end. Ideogram trains on structured JSON captions: plain prompts work,
JSON ones are its native form (diffusers' README).

The transformer reads one packed sequence, ``[text][image]``: zeros in the text slots of ``hidden_states`` and the
features in its ``encoder_hidden_states`` (zero over the image), 3-axis position ids, ``segment_ids`` (padding in
its own block) and per-token ``indicator`` roles (``Ideogram4Pipeline._prepare_ids``). Its time runs from 0 (noise)
to 1 (data): ``t = 1 - sigma``; it predicts ``latents - noise``, which ``predict`` negates to flow matching's usual
``noise - latents`` target, as diffusers' DreamBooth script trains it (its target is ``model_input - noise``).
Padding is its own attention segment, so ``predict`` cuts the batch's text to its longest prompt (the image tokens'
output does not change). Latents: the VAE's 32 x h x w latents in 2x2 patches, each token's 128 channels in
Ideogram's order (row, column, channel: channel fastest, not Flux.2's), normalised by the VAE's batch-norm
statistics.

Training, as the DreamBooth script: sigma drawn logit-normal with std 1.5 and a mean shifted by
``0.5 * log(pixels / 512**2)`` at ``model.resolution`` (the pipeline's resolution-aware schedule; train at another
size with ``model.resolution``, which ``data.resolution`` follows), on the plain (unshifted) sigmas; only
``transformer`` takes the LoRA. Sampling: the pipeline's logit-normal sigma schedule (it
passes ``sigmas`` to the scheduler) and ``v = s * v_text + (1 - s) * v_uncond`` at the sampling's guidance
(``guidance_scale`` with ``guidance_schedule=None``), the unconditional transformer frozen and loaded from the base
folder when a pipeline is first built (never trained; not in the memory plan, which is the training step's).
``prompt_enhancer_head`` (the optional LM head for prompt upsampling) is left as the folder has it.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from tuner.errors import ConfigError
from tuner.models.base import Components, _class
from tuner.models.flow import FlowFamily
from tuner.models.objectives import FlowObjective
from tuner.models.real import RealWidths, qwen3_vl
from tuner.models.tiny import unigram_tokenizer

UNCONDITIONAL = "unconditional_transformer"
# Qwen3-VL's chat template for text turns, with the content as a list of parts (how the pipeline passes a prompt)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DISTILLED = (
    "a step-distilled Ideogram 4 samples on a fixed few-step grid: a LoRA trained on it undoes the distillation. "
    "Train on the base Ideogram 4 and apply the LoRA to the distilled checkpoint at sampling"
)


class Ideogram4(FlowFamily):
    NAME = "ideogram4"
    PIPELINE = "Ideogram4Pipeline"
    NEGATIVE_PROMPT_REFUSAL = "its branch without text is a transformer of its own, trained to draw without a prompt"
    DENOISER_CLASS = "Ideogram4Transformer2DModel"
    IMG2IMG = None  # diffusers has no Ideogram 4 image-to-image pipeline
    TEXT_ENCODERS = ("text_encoder",)  # Qwen3-VL-8B (Qwen3VLModel, headless)
    LORA_TEXT_ENCODERS = ()  # frozen and cached: Ideogram4LoraLoaderMixin loads LoRAs into the transformer only
    EMBEDDINGS = {}
    EMBEDDING_REFUSAL = (
        "its prompts are 13 of Qwen3-VL's hidden layers side by side, and Ideogram4Pipeline has no textual-inversion "
        "loader to read an embedding"
    )
    BLOCKS = ("layers.",)
    PARTIAL_BLOCKS = ("layers.*.attention.*",)
    OFFLOAD_BLOCKS = ("Ideogram4TransformerBlock",)
    TARGETS = {
        "attn": ["to_q", "to_k", "to_v", "to_out.0"],
        # diffusers' DreamBooth script's default: attention and the SwiGLU
        "attn_ff": ["to_q", "to_k", "to_v", "to_out.0", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"],
    }
    # the pipeline passes its sigmas as a list: FlowMatchHeun's and DPM-Solver's set_timesteps take none, UniPC's
    # cannot scale a list
    NO_SCHEDULERS = ("flow_heun", "flow_dpm++", "flow_unipc")
    # no kohya file: ComfyUI has no Ideogram 4 model in its readable sources; no single file: diffusers has no
    # converter for Ideogram4Transformer2DModel.from_single_file
    EXPORTS = ("diffusers", "peft", "merged")
    DEFAULT_EXPORTS = ("diffusers",)
    BASE_VERSION = "ideogram4"
    MODELSPEC_ARCHITECTURE = "Ideogram-4"
    MAX_SEQUENCE_LENGTH = 512  # tuner's cache length (the pipeline's default is 2048: long JSON captions)
    DEFAULT_RESOLUTION = 1024  # the DreamBooth script's (the pipeline draws at 2048 by default)
    RESOLUTION_MULTIPLE = 16  # x8 VAE, 2x2 patches
    WIDTHS = frozenset({4608})  # the transformer's (18 heads of 256); Z-Image and Lumina 2 share its module names
    SIGNS = r"attention_to_[qkv]|attention_to_out|feed_forward_w[123]|adaln_modulation"
    SAMPLE_FILES = (
        {"transformer.layers.0.attention.to_q": (4, 4608), "transformer.layers.0.feed_forward.w1": (4, 4608)},
    )  # fmt: skip
    TINY_OPTIONS = ("model.max_sequence_length=64",)  # its tiny tokenizer: a token a character
    CLIENTS = {}  # InvokeAI 6.14 has no Ideogram 4 base; ComfyUI has no Ideogram 4 model

    # --- tiny and real-width models ----------------------------------------------------------------------
    def build_tiny(self, seed: int = 0, size: str = "test") -> dict:
        """A tiny Ideogram 4: two blocks over 32 patch channels (an 8-channel x8 AutoencoderKLFlux2 with trained-
        looking batch-norm statistics), the same class again as the unconditional transformer (its own weights), a
        36-layer, 16-wide Qwen3-VL (the pipeline taps layers up to 35), a character tokenizer with Qwen3-VL's
        specials and chat template, and a plain flow-matching scheduler."""
        from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Ideogram4Transformer2DModel
        from diffusers.pipelines.ideogram4.pipeline_ideogram4 import QWEN3_VL_ACTIVATION_LAYERS
        from transformers import Qwen2TokenizerFast, Qwen3VLConfig, Qwen3VLModel

        width = 16

        def transformer():
            return Ideogram4Transformer2DModel(
                in_channels=32, num_layers=2, attention_head_dim=8, num_attention_heads=2, intermediate_size=32,
                adaln_dim=16, llm_features_dim=len(QWEN3_VL_ACTIVATION_LAYERS) * width, rope_theta=10_000,
                mrope_section=(2, 1, 1),
            )  # fmt: skip

        torch.manual_seed(seed)
        conditional = transformer()
        torch.manual_seed(seed + 3)
        unconditional = transformer()
        torch.manual_seed(seed + 1)
        blocks = 4
        vae = AutoencoderKLFlux2(
            down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
            block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=8, norm_num_groups=8,
            sample_size=32, mid_block_add_attention=False,
        )  # fmt: skip
        vae.bn.running_mean.copy_(torch.randn(32) * 0.2)  # as a trained VAE has them (fresh: mean 0, var 1)
        vae.bn.running_var.copy_(torch.rand(32) + 0.5)
        torch.manual_seed(seed + 2)
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        tokenizer = unigram_tokenizer(
            Qwen2TokenizerFast, specials, "user assistant", CHAT_TEMPLATE, eos_token="<|im_end|>",
            pad_token="<|endoftext|>", unk_token="<|endoftext|>",
        )  # fmt: skip
        text = {"vocab_size": len(tokenizer), "hidden_size": width, "intermediate_size": 2 * width,
                "num_hidden_layers": max(QWEN3_VL_ACTIVATION_LAYERS) + 1, "num_attention_heads": 2,
                "num_key_value_heads": 1, "head_dim": 8, "max_position_embeddings": 256,
                "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e4,
                                    "mrope_interleaved": True}}  # fmt: skip
        vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": width,
                  "deepstack_visual_indexes": [0], "num_position_embeddings": 16}  # fmt: skip
        return {
            "transformer": conditional,
            UNCONDITIONAL: unconditional,
            "vae": vae,
            "text_encoder": Qwen3VLModel(Qwen3VLConfig(text_config=text, vision_config=vision)),
            "tokenizer": tokenizer,
            "scheduler": FlowMatchEulerDiscreteScheduler(),
        }

    def real_widths(self, size: str | None = None) -> RealWidths:
        """The transformer by blocks (34, 4608 wide, 12288 SwiGLU, 53248-wide text features), Qwen3-VL-8B (4096 x
        36), Flux.2's VAE. The unconditional transformer runs only at sampling and is not in the plan."""

        from diffusers import Ideogram4Transformer2DModel

        def transformer(units):
            return Ideogram4Transformer2DModel(num_layers=units)  # the config's defaults are Ideogram 4's

        def inputs(resolution, batch, dtype):
            side, text = resolution // 16, self.max_sequence_length
            ids = _layout([text] * batch, side, side, text, "cpu")
            return {
                "hidden_states": torch.randn(batch, text + side * side, 128, dtype=dtype),
                "timestep": torch.rand(batch),
                "encoder_hidden_states": torch.randn(batch, text + side * side, 53248, dtype=dtype),
                **ids,
            }

        def text_encoders():
            return [qwen3_vl("8B")]

        def vae():
            from diffusers import AutoencoderKLFlux2

            return AutoencoderKLFlux2()

        # no trainer has published an Ideogram 4 figure; diffusers' README trains it from an nf4 checkpoint (or fp8)
        published = {"Ideogram 4 LoRA r16 1024 px target": "none published (diffusers: nf4 or fp8 base); nf4, offload"}
        return RealWidths(transformer, 34, inputs, text_encoders, vae, unit="a block", published=published)

    # --- loading -----------------------------------------------------------------------------------------
    def check_trainable(self, folder: Path) -> None:
        """Refuse a distilled Ideogram 4 (by its folder's name: turbo, lightning, distilled) as a training base."""
        if re.search(r"turbo|lightning|distill", Path(folder).name, re.I):
            raise ConfigError(f"model.path={folder} is a distilled checkpoint (its folder name): {DISTILLED}")

    def check_folder(self, path, allow_pickle: bool = False) -> Path:
        """A diffusers folder of Ideogram4Pipeline whose unconditional transformer has safetensors weights too."""
        folder = super().check_folder(path, allow_pickle)
        if not allow_pickle and not list((folder / UNCONDITIONAL).glob("*.safetensors")):
            raise ConfigError(
                f"model.path={path}: {UNCONDITIONAL}/ has no .safetensors weights; Ideogram 4 samples with it (its "
                "CFG's branch without text): give the whole pipeline folder, or model.allow_pickle=true for .bin"
            )
        return folder

    def load(self, path, prediction_type=None, allow_pickle=False) -> Components:
        """The components, and where the unconditional transformer is (loaded when a pipeline is first built)."""
        c = super().load(path, prediction_type, allow_pickle)
        c.extra[UNCONDITIONAL] = (Path(path).expanduser(), allow_pickle)
        return c

    def objective(self, c: Components):
        """Flow matching on the plain sigmas, drawn as the DreamBooth script draws them: logit-normal around
        ``model.logit_mean + 0.5 * log(pixels / 512**2)`` at ``model.resolution``. tuner draws an index into the
        descending sigmas (sigma ~ 1 - u), so the mean goes in with its sign flipped."""
        m = self.model
        mean = m.logit_mean + 0.5 * math.log(m.resolution**2 / 512**2)
        shift = 1.0 if m.timestep_shift is None else m.timestep_shift
        return FlowObjective(c.noise_scheduler, self.predict, weighting=m.weighting_scheme, logit_mean=-mean,
                             logit_std=m.logit_std, mode_scale=m.mode_scale, shift=shift)  # fmt: skip

    # --- prompts -----------------------------------------------------------------------------------------
    def tokenize(self, c: Components, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The chat-templated prompts' ids left-padded to ``max_sequence_length`` (a longer prompt loses its
        text's end, not the template's), and their mask."""
        tokenizer, length = c.tokenizer, self.max_sequence_length
        tail = len(tokenizer("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).input_ids)
        ids = torch.full((len(prompts), length), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(prompts), length, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            messages = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            row = tokenizer(text, add_special_tokens=False).input_ids
            row = row if len(row) <= length else row[: length - tail] + row[-tail:]
            ids[i, length - len(row) :], mask[i, length - len(row) :] = torch.tensor(row), 1
        return {"text_encoder": ids, "text_encoder_mask": mask}

    def encode_ids(self, text_encoders: dict, ids: dict) -> dict[str, torch.Tensor]:
        """The 13 tapped layers' states side by side (the pipeline's helper), zero on the padding, and the mask."""
        from diffusers import Ideogram4Pipeline

        encoder = text_encoders["text_encoder"]
        device = next(encoder.parameters()).device
        mask = ids["text_encoder_mask"].to(device)
        positions = (mask.cumsum(1) - 1).clamp_min(0) * mask  # each prompt's tokens from 0, as the pipeline counts
        taps = Ideogram4Pipeline._get_text_encoder_hidden_states(encoder, ids["text_encoder"].to(device), mask,
                                                                 positions)  # fmt: skip
        b, length = mask.shape
        features = torch.stack(taps, dim=0).permute(1, 2, 3, 0).reshape(b, length, -1)
        return {"prompt_embeds": features * mask.unsqueeze(-1).to(features.dtype), "prompt_mask": mask}

    # --- latents -----------------------------------------------------------------------------------------
    def encode_images(self, vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior's mean and std in Ideogram's 2x2 patches (B, 128, h/2, w/2)."""
        dist = vae.encode(images).latent_dist
        return _patchify(dist.mean), _patchify(dist.std)

    def latent_normalization(self, vae) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) per patch channel: the VAE's batch-norm statistics, as the pipeline denormalises."""
        mean, var = vae.bn.running_mean.detach().float().cpu(), vae.bn.running_var.detach().float().cpu()
        return 1.0 / torch.sqrt(var + vae.config.batch_norm_eps).view(-1, 1, 1), mean.view(-1, 1, 1)

    # --- training ----------------------------------------------------------------------------------------
    def predict(self, denoiser, noisy, timesteps, cond):
        """The transformer on the packed ``[text][image]`` sequence as the pipeline calls it, the text cut to the
        batch's longest prompt; its image tokens' output negated (flow matching's ``noise - latents``)."""
        b, ch, h, w = noisy.shape
        mask = cond["prompt_mask"]
        n = int(mask.sum(1).max())
        text = cond["prompt_embeds"][:, mask.shape[1] - n :]
        ids = _layout(mask.sum(1).tolist(), h, w, n, noisy.device)
        tokens = noisy.flatten(2).transpose(1, 2)
        out = denoiser(
            hidden_states=torch.cat([tokens.new_zeros(b, n, ch), tokens], dim=1),
            timestep=1 - timesteps.to(noisy.dtype) / 1000,
            encoder_hidden_states=torch.cat([text, text.new_zeros(b, h * w, text.shape[-1])], dim=1).to(noisy.dtype),
            return_dict=False,
            **ids,
        )[0]
        return -out[:, n:].transpose(1, 2).reshape(b, ch, h, w)

    # --- sampling ----------------------------------------------------------------------------------------
    def pipeline_modules(self, c: Components) -> dict:
        """The run's modules and the base's unconditional transformer (loaded once, frozen), beside the run's
        transformer on its device and in the VAE's dtype."""
        held = c.extra.get(UNCONDITIONAL)
        if isinstance(held, tuple):
            folder, allow_pickle = held
            library, cls = json.loads((folder / "model_index.json").read_text())[UNCONDITIONAL]
            safetensors = None if allow_pickle else True
            held = _class(library, cls).from_pretrained(folder / UNCONDITIONAL, use_safetensors=safetensors)
            c.extra[UNCONDITIONAL] = held.requires_grad_(False).eval()
        device = next(c.denoiser.parameters()).device
        if held.device != device or held.dtype != c.vae.dtype:
            held.to(device, c.vae.dtype)
        return {**super().pipeline_modules(c), UNCONDITIONAL: held}

    def guidance_kwargs(self, scale: float) -> dict:
        """A constant scale in place of the pipeline's default schedule (7.0, then 3.0 for the last 3 steps)."""
        return {"guidance_scale": scale, "guidance_schedule": None}

    def decode(self, pipe, latents, height, width):
        """The pipeline's ``output_type="latent"`` (normalised patch tokens) decoded as the pipeline decodes it."""
        vae = pipe.vae
        side = pipe.vae_scale_factor * pipe.patch_size
        patches = latents.transpose(1, 2).reshape(len(latents), -1, height // side, width // side).float()
        scale, shift = self.latent_normalization(vae)
        patches = patches / scale.to(patches.device) + shift.to(patches.device)
        return vae.decode(_unpatchify(patches).to(vae.dtype)).sample


def _patchify(z: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents as (B, 4C, H/2, W/2) patches, each patch's channels (row, column, channel) with the
    channel fastest: the order the pipeline's decode undoes."""
    b, c, h, w = z.shape
    z = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 3, 5, 1, 2, 4)
    return z.reshape(b, 4 * c, h // 2, w // 2)


def _unpatchify(p: torch.Tensor) -> torch.Tensor:
    b, c4, gh, gw = p.shape
    z = p.view(b, 2, 2, c4 // 4, gh, gw).permute(0, 3, 4, 1, 5, 2)
    return z.reshape(b, c4 // 4, gh * 2, gw * 2)


def _layout(lengths, grid_h: int, grid_w: int, text: int, device) -> dict:
    """The pipeline's position ids, segments and roles (``Ideogram4Pipeline._prepare_ids``) of a ``[text][image]``
    sequence whose prompts have the given lengths, built on real tensors (the memory plan runs on fake ones)."""
    from diffusers import Ideogram4Pipeline
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily(), torch.device("cpu"):
        ids = Ideogram4Pipeline._prepare_ids([int(n) for n in lengths], grid_h, grid_w, text, torch.device("cpu"))
    return {k: v.to(device) for k, v in zip(("position_ids", "segment_ids", "indicator"), ids)}
