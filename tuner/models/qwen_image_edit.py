"""Qwen-Image-Edit-2509 and 2511 (``QwenImageEditPlusPipeline``): Qwen-Image's MMDiT editing from one to three
reference images, which both its transformer and its text encoder read.

References, as the pipeline prepares each image it is given: for the VAE, squashed (LANCZOS, no crop) to the size of
its aspect ratio with about ``VAE_IMAGE_SIZE`` pixels (1024², sides multiples of 32), encoded to the posterior mean
and normalised as the target's latents, 2x2-packed and appended to the target's tokens (``img_shapes`` lists the
target's grid, then each reference's, for the RoPE); the transformer's output is cut back to the target's tokens.
2511's transformer (``zero_cond_t``) reads the references at t = 0 from the same inputs. For the text encoder, each
reference squashed to about ``CONDITION_IMAGE_SIZE`` pixels (384²) is read by Qwen2.5-VL through its processor, in
the edit prompt template (``Picture k: <|vision_start|><|image_pad|><|vision_end|>`` per reference, then the
prompt), the template's system prefix (64 tokens) dropped: a caption's embeddings depend on its references, so
they are cached per (caption, references), and the text encoder is never trained. tuner reads both sizes from the
pipeline's module when it runs, so the two stay the same rule.

A sample without references trains as text-to-image under the edit template (no picture); the pipeline cannot draw
without one, so validation, the gallery and ``recipe=generate`` give it a control. The first Qwen-Image-Edit
(``QwenImageEditPipeline``: one reference, read at the target's own size) is refused with advice.

The folder's processor (``Qwen2VLProcessor``) needs torchvision for its video processor: tuner reads it as
``EditProcessor``, its tokenizer, chat template and PIL image processor (``Qwen2VLImageProcessorPil``), all an image
prompt needs, with or without torchvision; it saves as the class it stands in for.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus
from PIL import Image

from tuner.errors import ConfigError
from tuner.models.base import Components
from tuner.models.flow import StandInProcessor
from tuner.models.qwen_image import SCHEDULER, SPECIAL, QwenImage, tiny_text_encoder
from tuner.models.references import References

# QwenImageEditPlusPipeline's prompt template, the tokens of its system prefix it drops, and a reference's place
TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new image "
    "that meets the user's requirements while maintaining consistency with the original input where appropriate."
    "<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
DROPPED = 64
PICTURE = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"
VISION = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")
FIRST_EDIT = (
    "the first Qwen-Image-Edit (QwenImageEditPipeline: one reference, VAE-encoded at the target's size) is not "
    "trained by tuner; train Qwen-Image-Edit-2509 or 2511 (QwenImageEditPlusPipeline) with model=qwen_image_edit"
)


def _resize(image: Image.Image, area: int) -> Image.Image:
    """The pipeline's resize of a reference to about ``area`` pixels at its aspect ratio (sides multiples of 32)."""
    from diffusers.image_processor import VaeImageProcessor

    width, height = plus.calculate_dimensions(area, image.width / image.height)
    return VaeImageProcessor().resize(image.convert("RGB"), height, width)


@dataclass(frozen=True)
class EditReferences(References):
    """Qwen-Image-Edit-Plus's rule: up to three references, required to draw, read by the text encoder too."""

    most: int = 3
    required: bool = True
    in_prompt: bool = True
    batch: int | None = 1  # the pipeline edits one image a call

    def vae_image(self, image: Image.Image) -> Image.Image:
        return _resize(image, plus.VAE_IMAGE_SIZE)

    def prompt_image(self, image: Image.Image) -> Image.Image:
        return _resize(image, plus.CONDITION_IMAGE_SIZE)

    def rule(self) -> dict:
        return {**super().rule(), "vae_area": plus.VAE_IMAGE_SIZE, "prompt_area": plus.CONDITION_IMAGE_SIZE}


def _processor_class():
    """``Qwen2VLProcessor`` with its image processor and tokenizer only (no video processor, which needs
    torchvision). It saves and registers as the class it stands in for, so a folder tuner writes names
    ``Qwen2VLProcessor`` as a published one does."""
    from transformers import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class EditProcessor(StandInProcessor, Qwen2VLProcessor):
        def __init__(self, image_processor, tokenizer, chat_template=None, source=None, **_):
            self.source = source  # the folder read: its video processor's config is saved again
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            self.video_processor = None
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return StandInProcessor.stand_in(EditProcessor, Qwen2VLProcessor)


def edit_processor(tokenizer, image_processor, chat_template: str | None = None, source: Path | None = None):
    """An ``EditProcessor`` of a tokenizer and a PIL image processor (``source``: the folder they came from)."""
    return _processor_class()(image_processor, tokenizer, chat_template, source)


def tiny_tokenizer():
    """A Qwen2Tokenizer (byte-level BPE) built in code: every byte a token, each word of the edit template one token
    (so its system prefix is the 64 tokens the pipeline drops, as Qwen's own), Qwen's special and vision tokens."""
    from tokenizers import AddedToken, pre_tokenizers
    from transformers import Qwen2Tokenizer

    specials = (*SPECIAL, *VISION, "<|video_pad|>")
    vocab = {t: i for i, t in enumerate([*specials, *sorted(pre_tokenizers.ByteLevel.alphabet())])}
    splitter = Qwen2Tokenizer(vocab=dict(vocab), merges=[])._tokenizer.pre_tokenizer
    text = [s for s in re.split("|".join(map(re.escape, specials)), TEMPLATE.replace("{}", "")) if s]
    merges = []
    words = dict.fromkeys(w for s in text for w, _ in splitter.pre_tokenize_str(s))
    for word in sorted(words, key=len, reverse=True):  # a longer word's merges first: no shorter word's splits it
        for i in range(1, len(word)):
            if (word[:i], word[i]) not in merges:
                merges.append((word[:i], word[i]))
            vocab.setdefault(word[: i + 1], len(vocab))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=4096)
    tokenizer.add_tokens([AddedToken(s, special=True) for s in specials], special_tokens=True)
    prefix = tokenizer(TEMPLATE.split("{}")[0]).input_ids
    assert len(prefix) == DROPPED, f"the tiny tokenizer reads the template's prefix as {len(prefix)} tokens"
    return tokenizer


class QwenImageEdit(QwenImage):
    NAME = "qwen_image_edit"
    PIPELINE = "QwenImageEditPlusPipeline"
    IMG2IMG = None  # its image input is the reference it edits, not an image-to-image start
    TOKENIZERS = ("tokenizer", "processor")  # the processor reads the references for Qwen2.5-VL (load_tokenizer)
    MAX_SEQUENCE_LENGTH = 1024  # tuner's cache length after the prefix: the pictures' tokens and the prompt's
    # its adapter files are Qwen-Image's (the same modules, names and widths: SIGNS, WIDTHS, SAMPLE_FILES inherited),
    # which recipe=inspect names as either family
    BASE_VERSION = "qwen_image_edit"
    MODELSPEC_ARCHITECTURE = "Qwen-Image-Edit-Plus"  # musubi-tuner's for 2509 (its 2511: Qwen-Image-Edit-2511)
    TINY_OPTIONS = ("model.max_sequence_length=128",)
    # ComfyUI reads it as Qwen-Image (its edit prompts: TextEncodeQwenImageEditPlus); InvokeAI is not checked with it
    CLIENTS = {"comfyui": {"model": "QwenImage"}}

    def __init__(self, model=None):
        super().__init__(model)
        self.REFERENCES = EditReferences()

    def build_tiny(self, seed: int = 0, size: str = "test") -> dict:
        """Qwen-Image's tiny transformer (``size="2511"``: with ``zero_cond_t``, as 2511's), VAE and scheduler, a
        two-layer Qwen2.5-VL with a one-block vision tower, the edit template's tokenizer and the processor over it
        (its image processor reads 4 to 16 merged patches, so a reference is a few tokens of the prompt)."""
        from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
        from transformers import Qwen2VLImageProcessorPil

        torch.manual_seed(seed)
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=32, axes_dims_rope=(2, 2, 4), zero_cond_t=size == "2511",
        )  # fmt: skip
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
        vae.register_to_config(sample_size=32)  # what data.resolution defaults to on the tiny folder (Qwen's: 1024)
        torch.manual_seed(seed + 2)
        tokenizer = tiny_tokenizer()
        encoder = tiny_text_encoder(len(tokenizer), tokenizer.pad_token_id)
        ids = {f"{k[2:-2]}_token_id": tokenizer.convert_tokens_to_ids(k) for k in VISION}
        encoder.config.update({"image_token_id": ids["image_pad_token_id"], **ids})
        images = Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)
        return {
            "transformer": transformer,
            "vae": vae,
            "text_encoder": encoder,
            "tokenizer": tokenizer,
            "processor": edit_processor(tokenizer, images),
            "scheduler": FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        }

    def real_widths(self, size: str | None = None):
        """Qwen-Image's widths (2509 and 2511 are its transformer), each reference's ~1024² latents (4,096 tokens)
        beside the target's and its ~384² picture (188 tokens) in the prompt (``inputs(..., references=n)``)."""
        widths = super().real_widths()
        plain = widths.inputs

        def inputs(resolution, batch, dtype, references: int = 0):
            x = plain(resolution, batch, dtype)
            side, text = resolution // 16, x["encoder_hidden_states"].shape[1] + 188 * references
            x["hidden_states"] = torch.randn(batch, side * side + 4096 * references, 64, dtype=dtype)
            x["encoder_hidden_states"] = torch.randn(batch, text, 3584, dtype=dtype)
            x["encoder_hidden_states_mask"] = torch.ones(batch, text, dtype=torch.long)
            x["img_shapes"] = [[(1, side, side), *[(1, 64, 64)] * references]] * batch
            return x

        return dataclasses.replace(widths, inputs=inputs)  # Qwen-Image's published figures and target

    # --- loading ---------------------------------------------------------------------------------
    def check_folder(self, path, allow_pickle: bool = False) -> Path:
        """As Qwen-Image's, and the first Qwen-Image-Edit refused saying what to train instead."""
        index = Path(path).expanduser() / "model_index.json"
        if index.is_file() and json.loads(index.read_text()).get("_class_name") == "QwenImageEditPipeline":
            raise ConfigError(f"model.path={path}: {FIRST_EDIT}")
        return super().check_folder(path, allow_pickle)

    def load_tokenizer(self, folder: Path, library: str, cls: str):
        """The folder's Qwen2VLProcessor as ``EditProcessor`` (its tokenizer, chat template and image processor's
        settings), with or without torchvision."""
        if cls != "Qwen2VLProcessor":
            return super().load_tokenizer(folder, library, cls)
        from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

        template = None
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        elif (folder / "chat_template.json").is_file():
            template = json.loads((folder / "chat_template.json").read_text())["chat_template"]
        images = Qwen2VLImageProcessorPil.from_pretrained(folder)
        return edit_processor(AutoTokenizer.from_pretrained(folder), images, template, folder)

    def pipeline_with(self, path, **components):
        """The pipeline of the base folder ``path``, its processor as ``load_tokenizer`` reads it."""
        folder = self.check_folder(path)
        if "processor" not in components:
            entry = json.loads((folder / "model_index.json").read_text())["processor"]
            components["processor"] = self.load_tokenizer(folder / "processor", *entry)
        return super().pipeline_with(folder, **components)

    # --- prompts ---------------------------------------------------------------------------------
    def tokenize(self, c: Components, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The prompts without references, as ``_rows`` tokenizes them (the text encoder in the step)."""
        return self._rows(c, prompts, [[] for _ in prompts])

    def encode_ids(self, text_encoders: dict, ids: dict) -> dict[str, torch.Tensor]:
        """As ``QwenImageEditPlusPipeline._get_qwen_prompt_embeds``: Qwen2.5-VL's last hidden states (reading the
        pictures' pixels where the row has them) past the system prefix, zero where the row has ended, its mask."""
        encoder = text_encoders["text_encoder"]
        device = next(encoder.parameters()).device
        mask = ids["text_mask"].to(device)
        model = getattr(encoder, "model", encoder)  # without the vocabulary head: its last_hidden_state
        pictures = {k: ids[k].to(device) for k in ("pixel_values", "image_grid_thw") if k in ids}
        if "pixel_values" in pictures:
            pictures["pixel_values"] = pictures["pixel_values"].to(next(encoder.parameters()).dtype)
        hidden = model(input_ids=ids["text_encoder"].to(device), attention_mask=mask, **pictures).last_hidden_state
        kept = mask[:, DROPPED:]
        embeds = hidden[:, DROPPED:] * kept.unsqueeze(-1).to(hidden.dtype)
        return {"prompt_embeds": embeds, "prompt_embeds_mask": kept}

    @torch.no_grad()
    def encode_prompts(self, c: Components, prompts: list[str]) -> dict[str, torch.Tensor]:
        return self.encode_prompts_with_references(c, prompts, [[] for _ in prompts])

    @torch.no_grad()
    def encode_prompts_with_references(self, c: Components, prompts: list[str], references: list[list]) -> dict:
        """Each prompt with its references (as ``prompt_image`` made them) encoded alone, as the pipeline encodes its
        one prompt, then padded to ``max_sequence_length`` tokens with a mask."""
        rows = [
            self.encode_ids(c.text_encoders, self._rows(c, [prompt], [images]))
            for prompt, images in zip(prompts, references, strict=True)
        ]
        return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}

    def _rows(self, c: Components, prompts: list[str], references: list[list]) -> dict[str, torch.Tensor]:
        """The processor's ids of each templated prompt (its pictures' image tokens in place), cut to the prefix and
        ``max_sequence_length`` tokens (a longer prompt loses its end, not the template's), padded, with its mask; the
        pictures' pixels and grids (``pixel_values``, ``image_grid_thw``) where it has references."""
        processor, length = c.tokenizers["processor"], DROPPED + self.max_sequence_length
        tail = len(processor.tokenizer(TEMPLATE.split("{}")[1]).input_ids)
        ids = torch.full((len(prompts), length), processor.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(prompts), length, dtype=torch.long)
        out = {}
        for i, (prompt, images) in enumerate(zip(prompts, references, strict=True)):
            text = TEMPLATE.format("".join(PICTURE.format(k + 1) for k in range(len(images))) + prompt)
            row = processor(text=[text], images=list(images) or None, return_tensors="pt")
            tokens = row["input_ids"][0]
            if len(tokens) > length:
                pictured = tokens == processor.image_token_id
                if pictured[length - tail :].any():
                    raise ConfigError(
                        f"model.max_sequence_length={self.max_sequence_length}: the prompt's {len(images)} "
                        "reference(s) alone take more tokens; raise it (the pipeline reads up to 1024)"
                    )
                tokens = torch.cat([tokens[: length - tail], tokens[-tail:]])
            ids[i, : len(tokens)], mask[i, : len(tokens)] = tokens, 1
            for k in ("pixel_values", "image_grid_thw"):
                if k in row:
                    out.setdefault(k, []).append(row[k])
        return {"text_encoder": ids, "text_mask": mask, **{k: torch.cat(v) for k, v in out.items()}}

    # --- training --------------------------------------------------------------------------------
    def predict(self, denoiser, noisy, timesteps, cond):
        """The target's tokens, then each reference's (``cond["control_k"]``, latents like the target's), packed as
        the pipeline packs them and listed in ``img_shapes``; the prediction for the target's tokens."""
        controls = []
        while f"control_{len(controls)}" in cond:
            controls.append(cond[f"control_{len(controls)}"])
        if not controls:
            return super().predict(denoiser, noisy, timesteps, cond)
        b, ch, h, w = noisy.shape

        def pack(x):
            _, _, hx, wx = x.shape
            return x.reshape(b, ch, hx // 2, 2, wx // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, ch * 4)

        tokens = torch.cat([pack(noisy), *(pack(x.to(noisy.dtype)) for x in controls)], dim=1)
        shapes = [(1, h // 2, w // 2), *((1, x.shape[2] // 2, x.shape[3] // 2) for x in controls)]
        out = denoiser(
            hidden_states=tokens,
            timestep=timesteps.to(noisy.dtype) / 1000,
            encoder_hidden_states=cond["prompt_embeds"],
            encoder_hidden_states_mask=cond["prompt_embeds_mask"],
            img_shapes=[shapes] * b,
            return_dict=False,
        )[0][:, : h * w // 4]
        return out.reshape(b, h // 2, w // 2, ch, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, ch, h, w)
