"""Lumina 2 (Lumina-Image-2.0): Alpha-VLLM's 2.6B NextDiT (``Lumina2Transformer2DModel``, 26 main layers, 2304
wide) over 2x2 patches of Flux's 16-channel VAE latents, prompted by Gemma 2 (2B).

Prompts, as ``Lumina2Pipeline.encode_prompt``: each prompt after the pipeline's system prompt and
`` <Prompt Start> `` (``SYSTEM_PROMPT``; the negative prompt gets none), padded on the right to
``max_sequence_length`` (256), and Gemma 2's second-to-last hidden states (``hidden_states[-2]``) with the
tokenizer's mask. The transformer takes the padded batch and the mask as they are: it keeps each prompt's own
tokens in its joint sequence.

The transformer's time runs the other way from diffusers' flow schedulers: ``t = 1 - timestep / 1000`` (1 is the
clean image). It predicts ``latents - noise``, which the pipeline negates before its scheduler steps; ``predict``
negates it too, so the family trains on flow matching's usual ``noise - latents`` target (diffusers' DreamBooth
script trains the same prediction through a reversed interpolation). Latents are ``(z - shift_factor) *
scaling_factor`` from the VAE's config, as Flux's. The scheduler is the folder's: Lumina-Image-2.0 ships a fixed
shift of 6 (no resolution-dependent shift; ComfyUI samples it at 6 too).

Sampling: the pipeline's own CFG, run when ``guidance_scale > 1``: ``neg + s * (pos - neg)`` rescaled to the
conditional prediction's norm (``cfg_normalization``, on by default) over every step (``cfg_trunc_ratio`` 1.0):
tuner keeps the pipeline's defaults. The pipeline passes its sigmas (and ``mu``) to the scheduler.

Exports: diffusers' names (``layers.N.attn.to_q``) for the diffusers file; ComfyUI's Lumina 2 model (and
Alpha-VLLM's and Comfy-Org's single file) names the modules as the original NextDiT does (``attention.qkv``,
``feed_forward.w1``, ``adaLN_modulation.1``), which the kohya file and the single file use.
"""

from __future__ import annotations

import re

import torch

from tuner.models import tiny
from tuner.models.base import Components
from tuner.models.flow import FlowFamily
from tuner.models.real import RealWidths
from tuner.models.tiny import PIECE_CHARACTERS, WORD_START

# Lumina2Pipeline's system prompt (its __init__ sets it on the instance), before " <Prompt Start> " and the prompt
SYSTEM_PROMPT = (
    "You are an assistant designed to generate superior images with the superior degree of image-text alignment "
    "based on textual prompts or user prompts."
)
PROMPT_START = " <Prompt Start> "
# the original NextDiT's names (ComfyUI's Lumina2 model, the single file) from diffusers': the inverse of
# diffusers' convert_lumina2_to_diffusers, in an order where no rule undoes an earlier one
_NATIVE = (
    (r"^time_caption_embed\.caption_embedder", "cap_embedder"),
    (r"^time_caption_embed\.timestep_embedder\.linear_1", "t_embedder.mlp.0"),
    (r"^time_caption_embed\.timestep_embedder\.linear_2", "t_embedder.mlp.2"),
    (r"^norm_out\.linear_1", "final_layer.adaLN_modulation.1"),
    (r"^norm_out\.linear_2", "final_layer.linear"),
    (r"\.attn\.to_[qkv](?=\.|$)", ".attention.qkv"),
    (r"\.attn\.to_out\.0(?=\.|$)", ".attention.out"),
    (r"\.attn\.norm_q(?=\.|$)", ".attention.q_norm"),
    (r"\.attn\.norm_k(?=\.|$)", ".attention.k_norm"),
    (r"\.feed_forward\.linear_([123])(?=\.|$)", r".feed_forward.w\1"),
    (r"\.norm1\.linear(?=\.|$)", ".adaLN_modulation.1"),
    (r"\.norm1(\.norm)?(?=\.|$)", ".attention_norm1"),
    (r"\.norm2(?=\.|$)", ".attention_norm2"),
)
_QKV = re.compile(r"^(.*\.attn)\.to_([qkv])$")


def native_name(name: str) -> str:
    """A diffusers module or parameter name of the transformer as the original NextDiT (ComfyUI) names it."""
    for ours, theirs in _NATIVE:
        name = re.sub(ours, theirs, name)
    return name


class Lumina2(FlowFamily):
    NAME = "lumina2"
    PIPELINE = "Lumina2Pipeline"
    DENOISER_CLASS = "Lumina2Transformer2DModel"
    IMG2IMG = None  # diffusers has no Lumina 2 img2img pipeline
    TEXT_ENCODERS = ("text_encoder",)  # Gemma 2 2B (Gemma2Model)
    LORA_TEXT_ENCODERS = ()  # the language model stays frozen: Lumina2LoraLoaderMixin loads the transformer only
    EMBEDDINGS = {}
    EMBEDDING_REFUSAL = (
        "its text encoder is a language model read at its second-to-last hidden layer, and Lumina2Pipeline has no "
        "textual-inversion loader to read an embedding"
    )
    # the main layers, and the refiners that read the image (noise_refiner) and the prompt (context_refiner) first
    BLOCKS = ("layers.", "noise_refiner.", "context_refiner.")
    PARTIAL_BLOCKS = ("layers.*.attn.*",)
    OFFLOAD_BLOCKS = ("Lumina2TransformerBlock",)
    TARGETS = {
        "attn": ["to_q", "to_k", "to_v", "to_out.0"],  # diffusers' DreamBooth script's default
        "attn_ff": ["to_q", "to_k", "to_v", "to_out.0", "feed_forward.linear_1", "feed_forward.linear_2",
                    "feed_forward.linear_3"],
    }  # fmt: skip
    # the pipeline passes its sigmas (and mu): FlowMatchHeun's and DPM-Solver's set_timesteps take no sigmas
    NO_SCHEDULERS = ("flow_heun", "flow_dpm++")
    MAX_SEQUENCE_LENGTH = 256  # the pipeline's default (it refuses more than 512)
    EXPORTS = ("diffusers", "kohya", "peft", "merged", "single_file")
    DEFAULT_EXPORTS = ("diffusers", "kohya")
    # ComfyUI's own names (its Lumina2 model) under lora_unet_: q, k and v are one qkv module there, so LoRAs stack
    # exactly and LoHa / LoKr do not (the diffusers and peft files hold them)
    KOHYA_PREFIXES = {"transformer": "lora_unet"}
    FORMAT_LIMITS = {"kohya": {"loha", "lokr"}}
    # diffusers' Lumina 2 converter reads diffusion_model.* lora_A/lora_B files with the 2304 width written in
    DIFFUSERS_READS_KOHYA = False
    KOHYA_READERS = "ComfyUI"
    SINGLE_FILE_TEXT = False  # the transformer alone, as Comfy-Org ships lumina_2_model_bf16.safetensors
    # diffusers' converter splits qkv at 2304 / 768 / 768: tests/test_lumina2.py reads a real-width file instead
    TINY_SINGLE_FILE = False
    BASE_VERSION = "lumina2"
    MODELSPEC_ARCHITECTURE = "Lumina-Image-2.0"
    DEFAULT_RESOLUTION = 1024
    WIDTHS = frozenset({2304})  # the transformer's (24 heads of 96), Gemma 2's
    # diffusers' names (Z-Image's diffusers names say attention.to_q, its feed forward w1) and ComfyUI's (which
    # Z-Image shares: the 2304 width tells them apart); never Z-Image's diffusers names
    SIGNS = r"feed_forward_linear_[123]|(^|_)(layers|noise_refiner|context_refiner)_\d+_attn_|attention_qkv"
    NEVER = r"attention_to_[qkv]|attention_to_out"
    SAMPLE_FILES = (
        {"transformer.layers.0.attn.to_q": (4, 2304), "transformer.layers.0.feed_forward.linear_1": (4, 2304)},
        {"lora_unet_layers_0_attention_qkv": (4, 2304), "lora_unet_layers_0_feed_forward_w1": (4, 2304)},
        {"diffusion_model.layers.25.attention.qkv": (4, 2304)},  # ComfyUI's own file's keys
    )  # fmt: skip
    TINY_OPTIONS = ("model.max_sequence_length=64",)
    CLIENTS = {"comfyui": {"model": "Lumina2"}}  # InvokeAI 6.14 has no Lumina 2 base

    # --- tiny and real-width models --------------------------------------------------------------------------
    def build_tiny(self, seed: int = 0, size: str = "test") -> dict:
        """A tiny Lumina 2: two main layers and one of each refiner, 32 wide (2 query heads, 1 key/value head),
        sampling 32 px by default, over a 16-channel x8 AutoencoderKL (Flux's scaling and shift), a two-layer
        Gemma2Model, a Gemma tokenizer over characters and the system prompt's words, and Lumina-Image-2.0's
        scheduler (a fixed shift of 6)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Transformer2DModel
        from transformers import Gemma2Config, Gemma2Model

        width = 16
        torch.manual_seed(seed)
        transformer = Lumina2Transformer2DModel(
            sample_size=4, hidden_size=32, num_layers=2, num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1,
            multiple_of=16, axes_dim_rope=(4, 6, 6), axes_lens=(300, 64, 64), cap_feat_dim=width,
        )  # fmt: skip
        torch.manual_seed(seed + 1)
        vae = tiny.tiny_vae(  # Flux's 16-channel VAE at tiny widths (its factors)
            (8, 8, 16, 16), 16, scaling_factor=0.3611, shift_factor=0.1159, mid_block_add_attention=False
        )
        torch.manual_seed(seed + 2)
        tokenizer = _gemma_tokenizer()
        config = Gemma2Config(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=256, sliding_window=64,
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        return {
            "transformer": transformer,
            "vae": vae,
            "text_encoder": Gemma2Model(config),
            "tokenizer": tokenizer,
            "scheduler": FlowMatchEulerDiscreteScheduler(shift=6.0, use_dynamic_shifting=False),
        }

    def real_widths(self) -> RealWidths:
        """Lumina 2's transformer by main layers (26, 2304 wide; the two refiners of each kind always), Gemma 2 2B
        (2304 x 26), Flux's 16-channel VAE; every prompt at full length (the plan's rotary embedding is laid out
        beforehand: diffusers' reads the mask's lengths, which fake tensors do not have)."""

        def transformer(units):
            return _planned()(num_layers=units, cap_feat_dim=2304)  # the other defaults are Lumina 2's

        def inputs(resolution, batch, dtype):
            side, text = resolution // 8, self.max_sequence_length
            return {
                "hidden_states": torch.randn(batch, 16, side, side, dtype=dtype),
                "timestep": torch.rand(batch),
                "encoder_hidden_states": torch.randn(batch, text, 2304, dtype=dtype),
                "encoder_attention_mask": torch.ones(batch, text, dtype=torch.long),
            }

        def text_encoders():
            from transformers import Gemma2Config, Gemma2Model

            config = Gemma2Config(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, head_dim=256,
                                  num_attention_heads=8, num_key_value_heads=4, vocab_size=256000)  # fmt: skip
            return [Gemma2Model(config)]

        def vae():
            from tuner.models.real import vae

            return vae(16)

        published = {
            "SimpleTuner r16 LoRA (int8 base)": "~12-14 GB",
            "SimpleTuner full fine-tune": "~16-20 GB",
            "Lumina 2 LoRA r16 1024 px target": "<= 12 GB",
        }
        return RealWidths(transformer, 26, inputs, text_encoders, vae, unit="a main layer", published=published)

    # --- prompts ---------------------------------------------------------------------------------------------
    def tokenize(self, c: Components, prompts: list[str]) -> dict[str, torch.Tensor]:
        """As ``Lumina2Pipeline._get_gemma_prompt_embeds``: the system prompt before each, padded on the right."""
        texts = [SYSTEM_PROMPT + PROMPT_START + p for p in prompts]
        inputs = c.tokenizer(
            texts, padding="max_length", max_length=self.max_sequence_length, truncation=True, return_tensors="pt",
            padding_side="right",
        )  # fmt: skip
        return {"text_encoder": inputs.input_ids, "text_encoder_mask": inputs.attention_mask}

    def encode_ids(self, text_encoders: dict, ids: dict) -> dict[str, torch.Tensor]:
        """Gemma 2's second-to-last hidden states under the tokenizer's mask, and that mask."""
        encoder = text_encoders["text_encoder"]
        device = next(encoder.parameters()).device
        mask = ids["text_encoder_mask"].to(device)
        out = encoder(ids["text_encoder"].to(device), attention_mask=mask, output_hidden_states=True)
        rest = {k: v for k, v in ids.items() if k not in ("text_encoder", "text_encoder_mask")}
        return {**rest, "prompt_embeds": out.hidden_states[-2], "prompt_mask": mask.long()}

    # --- training --------------------------------------------------------------------------------------------
    def predict(self, denoiser, noisy, timesteps, cond):
        """The transformer as the pipeline calls it: the reversed time in [0, 1], the prompt and its mask; its
        output negated (flow matching's ``noise - latents``)."""
        out = denoiser(
            hidden_states=noisy,
            timestep=1 - timesteps.float() / 1000,  # in float32, as the pipeline's
            encoder_hidden_states=cond["prompt_embeds"],
            encoder_attention_mask=cond["prompt_mask"],
            return_dict=False,
        )[0]
        return -out

    # --- exports ---------------------------------------------------------------------------------------------
    def kohya_module_name(self, component: str, name: str, config) -> str:
        return native_name(name)

    def kohya_siblings(self, component: str, name: str) -> tuple[str, ...] | None:
        found = _QKV.match(name)
        return tuple(f"{found.group(1)}.to_{x}" for x in "qkv") if found else None

    def single_file_state(self, modules: dict, vocab_sizes: dict[str, int]) -> dict:
        """The transformer by the original names (q, k, v fused into qkv), as Comfy-Org ships it, which ComfyUI's
        Load Diffusion Model and ``Lumina2Transformer2DModel.from_single_file`` read; with the original's unused
        ``norm_final`` (ones), which diffusers' converter drops."""
        state = dict(modules["transformer"].state_dict())
        out = {}
        for key, value in state.items():
            if re.search(r"\.attn\.to_[kv]\.", key):
                continue
            if ".attn.to_q." in key:
                value = torch.cat([state[key.replace(".to_q.", f".to_{x}.")] for x in "qkv"])
            out[native_name(key)] = value
        width = modules["transformer"].config.hidden_size
        out["norm_final.weight"] = torch.ones(width, dtype=state["x_embedder.weight"].dtype)
        return out


def _gemma_tokenizer():
    """Gemma's tokenizer class over single characters and the system prompt's words (a few tokens instead of ~170,
    so the tiny pipeline's prompts fit 64 tokens), built offline: Gemma's byte-pair model (spaces as ``▁``), each
    word merged from its characters left to right."""
    from transformers import GemmaTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    vocab = {t: i for i, t in enumerate([*specials, WORD_START, *PIECE_CHARACTERS])}
    merges = []
    first, *rest = (SYSTEM_PROMPT + PROMPT_START).split()
    for pieces in [list(first), *([WORD_START, *w] for w in dict.fromkeys(rest))]:  # no word but the first without "▁"
        merged = pieces[0]
        for piece in pieces[1:]:
            if merged + piece not in vocab:
                vocab[merged + piece] = len(vocab)
                merges.append((merged, piece))
            merged += piece
    return GemmaTokenizerFast(vocab=vocab, merges=merges)


def _planned():
    """``Lumina2Transformer2DModel`` whose rotary embedding takes every prompt at its full length, as the memory
    plan's inputs are (diffusers' reads the lengths off the mask with ``tolist``, which fake tensors cannot);
    tests/test_lumina2.py holds it equal to diffusers' on a full mask."""
    from diffusers import Lumina2Transformer2DModel
    from diffusers.models.transformers.transformer_lumina2 import Lumina2RotaryPosEmbed

    class FullLength(Lumina2RotaryPosEmbed):
        def forward(self, hidden_states, attention_mask):
            batch, channels, height, width = hidden_states.shape
            p, text = self.patch_size, attention_mask.shape[1]
            rows, cols = height // p, width // p
            ids = torch.zeros(batch, text + rows * cols, 3, dtype=torch.int32, device=hidden_states.device)
            ids[:, :text, 0] = torch.arange(text, dtype=torch.int32)
            ids[:, text:, 0] = text
            ids[:, text:, 1] = torch.arange(rows, dtype=torch.int32).repeat_interleave(cols)
            ids[:, text:, 2] = torch.arange(cols, dtype=torch.int32).repeat(rows)
            freqs = self._get_freqs_cis(ids)
            patches = hidden_states.view(batch, channels, rows, p, cols, p).permute(0, 2, 4, 3, 5, 1)
            lengths = [text] * batch
            joint = [text + rows * cols] * batch
            return patches.flatten(3).flatten(1, 2), freqs[:, :text], freqs[:, text:], freqs, lengths, joint

    class Planned(Lumina2Transformer2DModel):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            old = self.rope_embedder
            self.rope_embedder = FullLength(old.theta, old.axes_dim, old.axes_lens, old.patch_size)

    return Planned
