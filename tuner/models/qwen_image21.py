"""Qwen-Image 2.1: a single-stream, block-causal transformer over 64-channel latents of its own x16 VAE, prompted by
Qwen3-VL.

Prompts, as ``QwenImage21Pipeline._get_qwen_prompt_embeds``: the prompt in the pipeline's chat template (system
message "Comprehend and analyze the provided prompt."), Qwen3-VL's last decoder layer's states *before* its final
norm (the pipeline hooks the norm out: transformers 5 ties ``hidden_states[-1]`` to the normed state), the system
message's tokens dropped. The pipeline keeps each prompt at its own length; tuner caches it at
``model.max_sequence_length`` tokens with a mask and cuts the batch back to its longest prompt before the
transformer, whose RoPE places the image after the text it reads (padding would move it).

The transformer reads one joint sequence: the text, then the target latents unpatched (one token per 16x16 pixels,
so sides divide by 32: the image slots stand for 2x2 latent tokens), ``img_mask`` marking those slots, text modulated
from t = 0 (``causal_condition``), timesteps in [0, 1]. Latents are per channel ``(z - latents_mean) / latents_std``
of an RGBA one-frame video VAE: an image trains as opaque RGBA (alpha 1), as the pipeline encodes a condition
image, and decodes to its RGB. Sampling: ``sample_sigmas`` from the folder when it ships them (Turbo), else
``linspace(1, 1/steps)`` shifted by the image's length (``mu``); true CFG only with a negative prompt, at the
sampling's guidance (``true_cfg_scale``). Training: flow matching on the plain schedule (``model.timestep_shift``
and ``model.weighting_scheme`` shift it), the text encoder frozen and its prompts cached.

The folder names a ``Qwen3VLProcessor``, whose video processor needs torchvision: tuner builds the processor from the
folder's tokenizer and chat template (``TextProcessor``: what a prompt-only pipeline calls), with or without it.
Turbo (the folder ships ``sample_sigmas``, or is named so) is refused as a training base: train on the base.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from tuner.errors import ConfigError
from tuner.models.base import Components
from tuner.models.flow import FlowFamily, StandInProcessor
from tuner.models.real import RealWidths

SYSTEM = "Comprehend and analyze the provided prompt."  # QwenImage21Pipeline.sys_prompt
PREFIX = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"  # the tokens the pipeline drops (its _drop_idx)
TEMPLATE = PREFIX + "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"  # its prompt_template_t2i
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>")  # fmt: skip
# Qwen3-VL's chat template for text turns (system messages and prompts as the pipeline renders them)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SCHEDULER = {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
             "max_image_seq_len": 4096, "time_shift_type": "exponential"}  # fmt: skip
DISTILLED = (
    "a step-distilled Qwen-Image 2.1 (Turbo: its sampling grid fixed, no CFG) trains badly; train the LoRA on the base "
    "Qwen-Image 2.1 and apply it to the Turbo checkpoint at sampling"
)


def _processor_class():
    """``Qwen3VLProcessor`` for prompts alone, built without torchvision: its tokenizer and chat template, no image or
    video processor. It saves and registers as the class it stands in for, so a folder tuner writes names
    ``Qwen3VLProcessor`` as a published one does (and holds its tokenizer and chat template)."""
    from transformers import Qwen3VLProcessor

    class TextProcessor(StandInProcessor, Qwen3VLProcessor):
        @classmethod
        def get_attributes(cls):
            return ["tokenizer"]

        def __init__(self, tokenizer, chat_template=None, source=None, **_):
            self.source = source  # the folder read: its image and video processors' configs are saved again
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            self.vision_start_token, self.vision_end_token = "<|vision_start|>", "<|vision_end|>"
            self.image_processor = self.video_processor = None
            self.tokenizer, self.chat_template = tokenizer, chat_template or tokenizer.chat_template

        def __call__(self, text=None, images=None, videos=None, audio=None, **kwargs):
            if images is not None or videos is not None:
                raise ConfigError("Qwen-Image 2.1's condition images need Qwen3VLProcessor, which needs torchvision")
            out = self.tokenizer([text] if isinstance(text, str) else text, **kwargs)  # as Qwen3VLProcessor
            if torch.is_tensor(out["input_ids"]):  # every token is text
                out["mm_token_type_ids"] = torch.zeros_like(out["input_ids"])
            return out

    return StandInProcessor.stand_in(TextProcessor, Qwen3VLProcessor)


def text_processor(tokenizer, chat_template: str | None = None, source: Path | None = None):
    """A ``TextProcessor`` of a tokenizer and chat template (``source``: the processor folder they came from)."""
    return _processor_class()(tokenizer, chat_template, source)


def tiny_tokenizer():
    """A Qwen2 byte-level tokenizer (every byte one token) with Qwen3-VL's special tokens and chat template."""
    from tokenizers import AddedToken, pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {t: i for i, t in enumerate([*SPECIAL, *sorted(pre_tokenizers.ByteLevel.alphabet())])}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=4096, chat_template=CHAT_TEMPLATE)
    tokenizer.add_tokens([AddedToken(s, special=True) for s in SPECIAL], special_tokens=True)
    return tokenizer


def _qwen3_vl(text: dict, vision: dict, tokenizer=None):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    ids = {}
    if tokenizer is not None:
        ids = {f"{k}_token_id": tokenizer.convert_tokens_to_ids(f"<|{k}|>") for k in ("vision_start", "vision_end")}
        ids |= {"image_token_id": tokenizer.convert_tokens_to_ids("<|image_pad|>"),
                "video_token_id": tokenizer.convert_tokens_to_ids("<|video_pad|>")}  # fmt: skip
    return Qwen3VLForConditionalGeneration(Qwen3VLConfig(text_config=text, vision_config=vision, **ids))


class QwenImage21(FlowFamily):
    NAME = "qwen_image21"
    PIPELINE = "QwenImage21Pipeline"
    DENOISER_CLASS = "QwenImage21Transformer2DModel"
    IMG2IMG = None  # its image input is reference conditioning (editing), not image-to-image
    TEXT_ENCODERS = ("text_encoder",)  # Qwen3-VL-8B, read through its processor
    TOKENIZERS = ("processor",)  # the folder's Qwen3VLProcessor: its tokenizer and chat template (load_tokenizer)
    LORA_TEXT_ENCODERS = ()  # frozen and cached: the pipeline loads LoRAs into its transformer only
    EMBEDDINGS = {}
    EMBEDDING_REFUSAL = (
        "QwenImage21Pipeline has no textual-inversion loader, and its prompts are a chat-templated Qwen3-VL's "
        "hidden states, where a new token's vector would not load in any client"
    )
    BLOCKS = ("transformer_blocks.",)
    PARTIAL_BLOCKS = ("transformer_blocks.*.attn.*",)
    OFFLOAD_BLOCKS = ("QwenImage21TransformerBlock",)
    TARGETS = {
        "attn": ["to_q", "to_k", "to_v", "to_out.0"],
        "attn_ff": ["to_q", "to_k", "to_v", "to_out.0", "img_mlp.proj", "img_mlp.gate_layer", "img_mlp.out"],
    }
    # the pipeline always passes sigmas (and mu), which FlowMatchHeun's and DPM-Solver's set_timesteps do not take
    NO_SCHEDULERS = ("flow_heun", "flow_dpm++")
    EXPORTS = ("diffusers", "peft", "merged", "single_file")
    DEFAULT_EXPORTS = ("diffusers",)
    SINGLE_FILE_TEXT = False  # the transformer alone, in ComfyUI's layout (diffusers' from_single_file reads it)
    BASE_VERSION = "qwen_image21"
    MODELSPEC_ARCHITECTURE = "Qwen-Image-2.1"
    MAX_SEQUENCE_LENGTH = 512  # tuner's cache length (the pipeline keeps every prompt whole)
    DEFAULT_RESOLUTION = 1024  # the pipeline's output_resolution
    RESOLUTION_MULTIPLE = 32  # a 16x VAE, and each image slot holds 2x2 latent tokens
    # its attention is 4096 wide (as Flux.2 klein 9B's and SD3.5-large's are not); its MLP names are its own
    WIDTHS = frozenset({4096})
    SIGNS = r"img_mlp[._](gate_layer|proj|out|gate_up)\b|txt_in[._](in|out)_layer"
    SAMPLE_FILES = (
        {"transformer.transformer_blocks.0.img_mlp.gate_layer": (4, 4096),
         "transformer.transformer_blocks.0.attn.to_q": (4, 4096)},
    )  # fmt: skip
    TINY_OPTIONS = ("model.max_sequence_length=64",)  # its tiny tokenizer: a token a byte
    # InvokeAI 6.14 has no Qwen-Image 2.1 base; ComfyUI's loader for it is not checked here
    CLIENTS = {}

    def build_tiny(self, seed: int = 0, size: str = "test") -> dict:
        """A tiny Qwen-Image 2.1: two single-stream blocks over 64-channel latents of an x16 RGBA
        AutoencoderKLQwenImage21, a two-layer Qwen3-VL, a byte-level tokenizer with Qwen3-VL's specials."""
        from diffusers import AutoencoderKLQwenImage21, FlowMatchEulerDiscreteScheduler, QwenImage21Transformer2DModel

        torch.manual_seed(seed)
        transformer = QwenImage21Transformer2DModel(
            num_layers=2, attention_head_dim=8, num_attention_heads=2, context_in_dim=32, axes_dims_rope=(2, 2, 4),
        )  # fmt: skip
        with torch.no_grad():  # gates (tanh of the shared modulation) near 1, not 0.2: the tiny blocks' updates show
            transformer.modulation[1].weight.mul_(4)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLQwenImage21(base_dim=8, decoder_base_dim=8, dim_mult=[1, 1, 1, 1, 1], num_res_blocks=1)
        vae.register_to_config(sample_size=32)  # what tuner's data.resolution defaults to (Flux's VAE has one)
        torch.manual_seed(seed + 2)
        tokenizer = tiny_tokenizer()
        text = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 4096,
                "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 5e6,
                                    "mrope_interleaved": True},
                "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
        vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 32,
                  "deepstack_visual_indexes": [0], "num_position_embeddings": 16}  # fmt: skip
        return {
            "transformer": transformer,
            "vae": vae,
            "text_encoder": _qwen3_vl(text, vision, tokenizer),
            "processor": text_processor(tokenizer),
            "scheduler": FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        }

    def real_widths(self) -> RealWidths:
        """Qwen-Image 2.1's transformer by single-stream blocks (32, 4096 wide), Qwen3-VL-8B, its x16 RGBA VAE."""

        def transformer(units):
            return _planned()(num_layers=units)  # the config's defaults are 2.1's

        def inputs(resolution, batch, dtype):
            side, text = resolution // 16, self.max_sequence_length
            return {
                "hidden_states": torch.randn(batch, side * side, 64, dtype=dtype),
                "encoder_hidden_states": torch.randn(batch, text, 4096, dtype=dtype),
                "timestep": torch.rand(batch),
                "layout": _layout(text, side),
            }

        def text_encoders():
            rope = {"rope_type": "default", "mrope_section": [24, 20, 20], "rope_theta": 5e6, "mrope_interleaved": True}
            text = {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                    "rope_parameters": rope}  # fmt: skip
            vision = {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16,
                      "out_hidden_size": 4096}  # fmt: skip
            return [_qwen3_vl(text, vision)]

        def vae():
            from diffusers import AutoencoderKLQwenImage21

            return _OneFrame(AutoencoderKLQwenImage21())

        # issue #37 sets Qwen-Image's targets for 2.1 too; no peer has published 2.1 figures yet
        published = {"Qwen-Image 2.1 LoRA r16 1024 px target": "<= 16 GB NF4, <= 10 GB offloaded"}
        unit = "a single-stream block"
        return RealWidths(transformer, 32, inputs, text_encoders, vae, unit=unit, published=published)

    # --- loading ---------------------------------------------------------------------------------
    def load_tokenizer(self, folder: Path, library: str, cls: str):
        """The folder's Qwen3VLProcessor as ``TextProcessor``: its tokenizer and chat template, all a prompt needs,
        with or without torchvision (a merged folder saves the image and video processors' configs again)."""
        if cls != "Qwen3VLProcessor":
            return super().load_tokenizer(folder, library, cls)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        template = None
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        elif (folder / "chat_template.json").is_file():
            template = json.loads((folder / "chat_template.json").read_text())["chat_template"]
        return text_processor(tokenizer, template, folder)

    def pipeline_with(self, path, **components):
        """The pipeline of the base folder ``path``, its processor as ``load_tokenizer`` reads it."""
        folder = self.check_folder(path)
        if "processor" not in components:
            components["processor"] = self.load_tokenizer(
                folder / "processor", *json.loads((folder / "model_index.json").read_text())["processor"]
            )
        return super().pipeline_with(folder, **components)

    def check_trainable(self, folder: Path) -> None:
        """Refuse Turbo as a training base: it ships its few-step grid as ``sample_sigmas``, or is named so."""
        index = json.loads((Path(folder) / "model_index.json").read_text())
        if index.get("sample_sigmas") or re.search(r"turbo|lightning|distill", Path(folder).name, re.I):
            said = "its model_index.json's sample_sigmas (Turbo's)" if index.get("sample_sigmas") else "its name"
            raise ConfigError(f"model.path={folder} is a distilled checkpoint ({said}): {DISTILLED}")

    # --- prompts ---------------------------------------------------------------------------------
    def tokenize(self, c: Components, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The templated prompts' ids and mask, ``max_sequence_length`` tokens after the dropped system message (a
        longer prompt loses its end, not the template's)."""
        tokenizer = c.tokenizers["processor"].tokenizer
        drop, tail = (len(tokenizer(s).input_ids) for s in (PREFIX, TEMPLATE.split("{}")[1]))
        length = drop + self.max_sequence_length
        rows = [tokenizer(TEMPLATE.format(p or " ")).input_ids for p in prompts]  # the pipeline's " " for ""
        rows = [r if len(r) <= length else r[: length - tail] + r[-tail:] for r in rows]
        ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
        return {"text_encoder": ids, "text_mask": mask, "drop": torch.full((len(rows),), drop)}

    def encode_ids(self, text_encoders: dict, ids: dict) -> dict[str, torch.Tensor]:
        """Qwen3-VL's last decoder layer's states (its final norm skipped, as the pipeline does) past the system
        message, zero after the prompt, and the prompt's mask."""
        encoder = text_encoders["text_encoder"]
        device = next(encoder.parameters()).device
        mask, drop = ids["text_mask"].to(device), int(ids["drop"][0])
        model = getattr(encoder, "model", encoder)
        language = getattr(model, "language_model", model)
        handle = language.norm.register_forward_hook(lambda module, args, output: args[0])
        try:
            hidden = language(input_ids=ids["text_encoder"].to(device), attention_mask=mask).last_hidden_state
        finally:
            handle.remove()
        kept = mask[:, drop:]
        embeds = hidden[:, drop:] * kept.unsqueeze(-1).to(hidden.dtype)
        return {"prompt_embeds": embeds, "prompt_embeds_mask": kept}

    # --- latents ---------------------------------------------------------------------------------
    def encode_images(self, vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images as opaque RGBA one-frame videos (the pipeline's own encoding of a condition image)."""
        rgba = torch.cat([images, torch.ones_like(images[:, :1])], dim=1)
        dist = vae.encode(rgba.unsqueeze(2)).latent_dist
        return dist.mean[:, :, 0], dist.std[:, :, 0]

    def predict(self, denoiser, noisy, timesteps, cond):
        """The transformer as the pipeline calls it, on the batch's prompts cut back to the longest of them."""
        b, ch, h, w = noisy.shape
        n = int(cond["prompt_embeds_mask"].sum(1).max())
        embeds, mask = cond["prompt_embeds"][:, :n], cond["prompt_embeds_mask"][:, :n].bool()
        out = denoiser(
            hidden_states=noisy.flatten(2).transpose(1, 2),
            timestep=timesteps.to(noisy.dtype) / 1000,
            encoder_hidden_states=embeds,
            encoder_hidden_states_mask=None if mask.all() else mask,
            img_shapes=[[(1, h, w)]] * b,
            img_mask=_img_mask(b, n, h * w).to(noisy.device),
            return_dict=False,
        )[0]
        return out[:, -h * w :].transpose(1, 2).reshape(b, ch, h, w)  # the joint sequence's image tokens

    # --- sampling --------------------------------------------------------------------------------
    def call_kwargs(self) -> dict:
        return {}  # the pipeline takes no max_sequence_length: it encodes each prompt whole

    def guidance_kwargs(self, scale: float) -> dict:
        """True CFG's scale (the pipeline runs it only with a negative prompt; it has no guidance embedding)."""
        return {"true_cfg_scale": scale}

    def decode(self, pipe, latents, height, width):
        """The RGB of the RGBA the VAE decodes (the pipeline's image before postprocessing)."""
        vae = pipe.vae
        z = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor).to(vae.dtype)
        scale, shift = (x.view(1, -1, 1, 1, 1).to(z) for x in self.latent_normalization(vae))
        return vae.decode(z / scale + shift).sample[:, :3, 0]

    # --- exports ---------------------------------------------------------------------------------
    def single_file_state(self, modules: dict, vocab_sizes: dict[str, int]) -> dict:
        """The transformer in ComfyUI's layout: diffusers' names under ``model.diffusion_model.``, each SwiGLU's
        gate and up projections fused into ``img_mlp.gate_up`` (gate rows first), which
        ``QwenImage21Transformer2DModel.from_single_file`` splits back."""
        state = dict(modules["transformer"].state_dict())
        for key in [k for k in state if k.endswith("img_mlp.gate_layer.weight")]:
            up = key.replace("gate_layer", "proj")
            state[key.replace("gate_layer", "gate_up")] = torch.cat([state.pop(key), state.pop(up)])
        return {f"model.diffusion_model.{k}": v for k, v in state.items()}


def _img_mask(batch: int, text: int, tokens: int) -> torch.Tensor:
    """The pipeline's ``img_mask`` of a text-to-image call: no image slot in the text, one per 2x2 target tokens."""
    return torch.cat([torch.zeros(batch, text, dtype=torch.bool), torch.ones(batch, tokens // 4, dtype=torch.bool)], 1)


def _layout(text: int, side: int) -> tuple:
    """The joint sequence's RoPE, target-token mask and attention segments of a text-to-image call, worked out on
    real tensors as ``QwenImage21Transformer2DModel.forward`` does from ``img_mask`` (the memory plan's fake tensors
    cannot run that index arithmetic)."""
    from diffusers.models.transformers import transformer_qwenimage21 as q
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily(), torch.device("cpu"):
        pad = torch.cat([torch.zeros(text, dtype=torch.bool), torch.ones(side * side, dtype=torch.bool)])
        rotary = q.QwenImage21Rope(theta=10000, axes_dim=[16, 56, 56])([(1, side, side)], pad, torch.device("cpu"))
        ids, target = q.QwenImage21Transformer2DModel.build_token_metadata(pad, [(1, side, side)])
        return rotary, target, q._qwenimage21_prefix_segments(ids, text)


def _planned():
    """``QwenImage21Transformer2DModel`` whose forward takes that layout instead of ``img_mask``: the memory plan's
    (``real_widths``) text-to-image step through the same modules and blocks, on fake tensors."""
    from diffusers import QwenImage21Transformer2DModel

    class Planned(QwenImage21Transformer2DModel):
        def forward(self, hidden_states, encoder_hidden_states, timestep, layout, return_dict=False):
            rotary, target, segments = layout
            joint = torch.cat([self.txt_in(encoder_hidden_states), self.img_in(hidden_states)], dim=1)
            timestep = torch.cat([timestep, timestep.new_zeros(1)]).to(joint.dtype)  # causal_condition's t = 0 row
            temb = self.time_text_embed(timestep, joint)
            modulation = self.modulation(temb)
            for block in self.transformer_blocks:
                args = (joint, modulation, rotary, None, target, None, None, None, segments, None)
                if torch.is_grad_enabled() and self.gradient_checkpointing:
                    joint = self._gradient_checkpointing_func(block, *args)
                else:
                    joint = block(*args)
            return (self.proj_out(self.norm_out(joint, temb, target)),)

    return Planned


class _OneFrame(torch.nn.Module):
    """The 2.1 VAE encoding images (B, 3, H, W) as opaque RGBA one-frame videos, as tuner encodes them."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def encode(self, images):
        return self.vae.encode(torch.cat([images, torch.ones_like(images[:, :1])], 1).unsqueeze(2))
