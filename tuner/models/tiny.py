"""Tiny pipelines of the model families, built from the real diffusers and transformers classes.

Each family builds its own (``Family.build_tiny`` in its module) from the parts here: text encoders over a
character-level vocabulary that tuner writes itself (any lower-case prompt can be tokenized, and no
tokenizer files come from a hub), a small VAE, a small T5, and the SD1.x shapes (SIZES) the embedded
``digits`` base uses too. They are saved with ``save_pretrained`` and loaded back through exactly the code
path a user's checkpoint takes, so tests and the embedded base exercise the real loaders.
"""

from __future__ import annotations

import json
import string
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CHARACTERS = string.ascii_lowercase + string.digits + ".,:;!?'\"-_()[]/&+*#%@=<>"


@dataclass(frozen=True)
class TinySize:
    """Widths of a tiny SD1.x pipeline. ``image_size`` is the pixel resolution it is meant for."""

    unet_channels: tuple[int, ...] = (64, 128)
    vae_channels: tuple[int, ...] = (32, 64)
    text_width: int = 64
    text_layers: int = 2
    max_tokens: int = 48
    image_size: int = 16
    layers_per_block: int = 1  # ResNets per down block (up blocks have one more), U-Net and VAE
    attention_levels: int = 1  # how many of the U-Net's levels, from the top, have cross-attention


SIZES = {
    # the embedded default: ~3M-parameter U-Net, 16 px images, 8x8 latents
    "digits": TinySize(),
    # for unit tests: builds and runs in a blink
    "test": TinySize(unet_channels=(16, 32), vae_channels=(8, 16), text_width=16, text_layers=1),
    # SD1.5's block structure (four levels, cross-attention on the first three, two ResNets per down
    # block, four-level VAE) at small widths: what the original single-file layout assumes
    "layout": TinySize(
        unet_channels=(16, 16, 32, 32),
        vae_channels=(8, 8, 16, 16),
        text_width=16,
        text_layers=2,
        image_size=32,
        layers_per_block=2,
        attention_levels=3,
    ),
    # tools/bench.py: SD1.5's block structure at 64 px (8x8 latents) and widths at which the U-Net, the
    # VAE and the text encoder cost about what they cost relative to each other in SD1.5 at 512 px
    "bench": TinySize(
        unet_channels=(32, 64, 128, 128),
        vae_channels=(16, 32, 64, 64),
        text_width=64,
        text_layers=4,
        max_tokens=77,
        image_size=64,
        layers_per_block=2,
        attention_levels=3,
    ),
}


def write_char_tokenizer(folder: Path, max_tokens: int) -> None:
    """Write a CLIPTokenizer whose vocabulary is single characters (BPE with no merges)."""
    folder.mkdir(parents=True, exist_ok=True)
    tokens = [BOS, EOS] + list(CHARACTERS) + [c + "</w>" for c in CHARACTERS]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_tokens, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


def char_tokenizer(max_tokens: int):
    """A CLIPTokenizer over the character vocabulary, loaded the way a pipeline folder's would be."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as folder:
        write_char_tokenizer(Path(folder), max_tokens)
        return CLIPTokenizer.from_pretrained(folder)


def build_components(
    size: TinySize,
    seed: int = 0,
    linear_projection: bool = False,
    text_act: str = "quick_gelu",
    prediction_type: str = "epsilon",
) -> dict:
    """Build freshly initialised SD1.x-shaped pipeline components of the given size (deterministic for a seed);
    the keywords: what SD2.x changes (linear projections in the transformers, GELU text encoder, v-prediction)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab_size = 2 + 2 * len(CHARACTERS)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=size.image_size // 2 ** (len(size.vae_channels) - 1),
        in_channels=4,
        out_channels=4,
        block_out_channels=size.unet_channels,
        layers_per_block=size.layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * size.attention_levels
        + ("DownBlock2D",) * (len(size.unet_channels) - size.attention_levels),
        up_block_types=("UpBlock2D",) * (len(size.unet_channels) - size.attention_levels)
        + ("CrossAttnUpBlock2D",) * size.attention_levels,
        cross_attention_dim=size.text_width,
        attention_head_dim=8,
        norm_num_groups=8,
        use_linear_projection=linear_projection,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=size.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(size.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(size.vae_channels),
        latent_channels=4,
        layers_per_block=size.layers_per_block,
        norm_num_groups=8,
        sample_size=size.image_size,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=size.text_width,
            intermediate_size=size.text_width * 2,
            num_hidden_layers=size.text_layers,
            num_attention_heads=4,
            max_position_embeddings=size.max_tokens,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_act=text_act,
        )
    )
    # Stable Diffusion's own schedule; clip_sample=False matters for latent diffusion
    scheduler = DDPMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        num_train_timesteps=1000,
        clip_sample=False,
        prediction_type=prediction_type,
        steps_offset=1,
    )
    tokenizer = char_tokenizer(size.max_tokens)
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }


def clip_text(cls, width: int, layers: int, max_tokens: int, **extra):
    from transformers import CLIPTextConfig

    config = CLIPTextConfig(
        vocab_size=2 + 2 * len(CHARACTERS),
        hidden_size=width,
        intermediate_size=width * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=max_tokens,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        **extra,
    )
    return cls(config)


def tiny_vae(channels=(8, 16), latent_channels=4, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
        **extra,
    )


def t5_tokenizer(max_tokens: int = 32):
    """A T5Tokenizer (the class Flux and SD3 pipelines name) over single characters: a unigram model with
    SentencePiece's word-start marker, built with the tokenizers library, nothing downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(c, -1.0) for c in CHARACTERS] + [("\u2581" + c, -1.0) for c in CHARACTERS]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5Tokenizer(
        tokenizer_object=backend,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=max_tokens,
    )


def t5_encoder(width: int = 32, layers: int = 1, d_ff: int | None = None):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=4 + 2 * len(CHARACTERS) + 4,  # spare rows past the tokenizer's, as T5's 32128 for 32100 tokens
        d_model=width,
        d_kv=8,
        d_ff=d_ff or width * 2,
        num_layers=layers,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        pad_token_id=0,
        eos_token_id=1,
        dropout_rate=0.0,
    )
    return T5EncoderModel(config)


def save_pipeline(components: dict, folder: Path, family: str | None = None) -> Path:
    """Save components as a diffusers pipeline folder of ``family`` (the first registered one when None)."""
    from tuner.models import family_names, get_family

    f = get_family(family or family_names()[0])
    for module in components.values():  # built modules start in train mode (dropout): save them as loaded
        if isinstance(module, torch.nn.Module):
            module.eval()
    pipe = f.pipeline_class()(**components, **f.pipeline_extras())
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def make_tiny_pipeline(folder: Path, size: str = "test", seed: int = 0, family: str | None = None) -> Path:
    """Build a tiny randomly initialised pipeline of ``family`` (its ``build_tiny``) and save it to ``folder``.

    ``size`` picks a variant where the family has several (the SD1.x shapes: SIZES); ``family`` None: the first
    registered one (the SD1.x shape)."""
    from tuner.models import family_names, get_family

    family = family or family_names()[0]
    return save_pipeline(get_family(family).build_tiny(seed, size), Path(folder), family)


def make_tiny_feature_model(folder: Path, kind: str, seed: int = 0, image_size: int = 32) -> Path:
    """A randomly initialised CLIP (``kind="clip"``: CLIPModel, its image processor and a character tokenizer) or
    DINOv2 (``kind="dino"``: Dinov2Model and its image processor) folder, as ``eval.clip`` / ``eval.dino`` take
    them (tests and trying the metrics without a download)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, Dinov2Config, Dinov2Model

    folder = Path(folder)
    torch.manual_seed(seed)
    size = {"shortest_edge": image_size}
    crop = {"height": image_size, "width": image_size}
    if kind == "clip":
        vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                  "image_size": image_size, "patch_size": 8}  # fmt: skip
        text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                "vocab_size": 2 + 2 * len(CHARACTERS), "max_position_embeddings": 32, "bos_token_id": 0,
                "eos_token_id": 1, "pad_token_id": 1}  # fmt: skip
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
        processor = CLIPImageProcessor(size=size, crop_size=crop)
        write_char_tokenizer(folder, 32)
    else:
        config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                              image_size=image_size, patch_size=8)  # fmt: skip
        model = Dinov2Model(config)
        processor = CLIPImageProcessor(size=size, crop_size=crop, image_mean=[0.485, 0.456, 0.406],
                                       image_std=[0.229, 0.224, 0.225])  # fmt: skip
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# the tiny language-model tokenizers' vocabulary: single characters, with and without SentencePiece's word-start marker
PIECE_CHARACTERS = string.ascii_letters + string.digits + ".,:;!?'\"-_()[]/&+*#%@=<>\n"
WORD_START = "\u2581"
# Qwen3's chat template (its user and assistant turns, thinking switched off or on)
QWEN3_TEMPLATE = (
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
    "{%- endif %}"
)


def unigram_tokenizer(cls, specials: list[str], words: str, template: str, **tokens):
    """A tokenizer of class ``cls`` over single characters and the words of ``words`` (a system message: a few tokens
    instead of hundreds), special tokens split out: a unigram model built with the tokenizers library, offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    pieces = [(s, 0.0) for s in specials] + [(WORD_START, -2.0)]
    pieces += [(c, -2.0) for c in PIECE_CHARACTERS] + [(WORD_START + c, -2.0) for c in PIECE_CHARACTERS]
    pieces += [(WORD_START + w, -1.0) for w in sorted({w for w in words.split() if len(w) > 1})]
    backend = Tokenizer(models.Unigram(pieces, unk_id=0))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    named = set(tokens.values())
    extra = [s for s in specials if s not in named]
    return cls(tokenizer_object=backend, additional_special_tokens=extra, chat_template=template, **tokens)


def qwen3_tokenizer():
    """A tiny Qwen3 tokenizer (Qwen2TokenizerFast, the class Qwen3's folders name) with its special tokens and chat
    template."""
    from transformers import Qwen2TokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    return unigram_tokenizer(
        Qwen2TokenizerFast, specials, "", QWEN3_TEMPLATE, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )  # fmt: skip
