"""Qwen-Image: a 20B MMDiT over 2x2-packed latents of a 16-channel video-style VAE, prompted by Qwen2.5-VL.

Prompts, as ``QwenImagePipeline.encode_prompt``: the prompt in the pipeline's chat template, the text encoder's
last hidden states with the template's system prefix (``prompt_template_encode_start_idx``, 34 tokens) dropped;
each prompt keeps its own length there, which tuner holds at ``model.max_sequence_length`` tokens with zeros
after the prompt and a mask the transformer reads (the pipeline's ``encoder_hidden_states_mask``: a masked key
changes nothing the image stream sees). The transformer reads timesteps in [0, 1] and the latents' grid
(``img_shapes``) for its RoPE. Latents are per channel ``(z - latents_mean) / latents_std``; the VAE encodes and
decodes one frame (B, C, 1, H, W). Sampling: true classifier-free guidance runs only with a negative prompt, at
the sampling's guidance scale (``true_cfg_scale``; a negative prompt of " " turns it on, as Qwen's examples do);
without one, one pass per step and the guidance scale does nothing (the transformer has no guidance embedding).
Training: flow matching over the plain schedule (as diffusers' DreamBooth script; ``model.timestep_shift`` and
``model.weighting_scheme`` shift it), the text encoder frozen and its prompts cached.

Qwen-Image 2.1 (``QwenImage21Pipeline``) is another architecture (a Qwen3-VL encoder read through its processor,
a single-stream block-causal transformer over unpatched 64-channel latents of a x16 VAE): not this family.
A step-distilled checkpoint (Lightning and the like: a few steps, no CFG) is refused as a training base with the
advice to train on the base Qwen-Image; it samples as a base, and a LoRA trained on the base loads onto it (the
same modules).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from tuner.errors import ConfigError
from tuner.models.base import Components
from tuner.models.flow import FlowFamily
from tuner.models.real import RealWidths

# QwenImagePipeline's prompt template and the tokens of its system prefix it drops (prompt_template_encode...)
TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
DROPPED = 34
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
SCHEDULER = {  # Qwen/Qwen-Image's scheduler_config.json
    "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 8192, "max_shift": 0.9, "shift": 1.0,
    "shift_terminal": 0.02, "time_shift_type": "exponential", "use_dynamic_shifting": True,
}  # fmt: skip
DISTILLED = (
    "a distilled Qwen-Image (Lightning and the like: few steps, no CFG) trains badly; train the LoRA on the base "
    "Qwen-Image and apply it to the distilled checkpoint at sampling"
)


def tiny_tokenizer():
    """A Qwen2Tokenizer (byte-level BPE, as Qwen's) built in code: every byte is a token, and merges make each
    word of the prompt template one token, so its system prefix is the 34 tokens the pipeline drops."""
    from tokenizers import AddedToken, pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {t: i for i, t in enumerate([*SPECIAL, *sorted(pre_tokenizers.ByteLevel.alphabet())])}
    splitter = Qwen2Tokenizer(vocab=dict(vocab), merges=[])._tokenizer.pre_tokenizer
    text = [s for s in re.split("|".join(map(re.escape, SPECIAL)), TEMPLATE.replace("{}", "")) if s]
    merges = []
    for word in (w for s in text for w, _ in splitter.pre_tokenize_str(s)):
        for i in range(1, len(word)):
            if (word[:i], word[i]) not in merges:
                merges.append((word[:i], word[i]))
            vocab.setdefault(word[: i + 1], len(vocab))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=1024 + DROPPED)
    tokenizer.add_tokens([AddedToken(s, special=True) for s in SPECIAL], special_tokens=True)
    prefix = tokenizer(TEMPLATE.split("{}")[0]).input_ids
    assert len(prefix) == DROPPED, f"the tiny tokenizer reads the template's prefix as {len(prefix)} tokens"
    return tokenizer


def tiny_text_encoder(vocab_size: int, pad_token_id: int, width: int = 32):
    """Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration, the class the pipeline names) at tiny widths."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = {
        "vocab_size": vocab_size, "hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 1024 + DROPPED,
        "rope_parameters": {"rope_type": "default", "mrope_section": [2, 2, 4], "rope_theta": 1e6},
        "pad_token_id": pad_token_id, "bos_token_id": None, "eos_token_id": pad_token_id,
    }  # fmt: skip
    vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": width,
              "fullatt_block_indexes": [0]}  # fmt: skip
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision))


class QwenImage(FlowFamily):
    NAME = "qwen_image"
    PIPELINE = "QwenImagePipeline"
    DENOISER_CLASS = "QwenImageTransformer2DModel"
    IMG2IMG = "QwenImageImg2ImgPipeline"
    TEXT_ENCODERS = ("text_encoder",)  # Qwen2.5-VL-7B
    LORA_TEXT_ENCODERS = ()  # the LLM stays frozen: QwenImagePipeline loads LoRAs into its transformer only
    EMBEDDINGS = {}
    EMBEDDING_REFUSAL = (
        "QwenImagePipeline has no textual-inversion loader, and a new token in Qwen2.5-VL's chat vocabulary "
        "would not load in ComfyUI either"
    )
    BLOCKS = ("transformer_blocks.",)
    PARTIAL_BLOCKS = ("transformer_blocks.*.attn.*",)
    OFFLOAD_BLOCKS = ("QwenImageTransformerBlock",)
    TARGETS = {
        "attn": ["to_q", "to_k", "to_v", "to_out.0"],
        "attn_ff": [
            "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
            "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
        ],
    }  # fmt: skip
    # the pipeline always passes sigmas (and mu), which FlowMatchHeun's and DPM-Solver's set_timesteps do not take
    NO_SCHEDULERS = ("flow_heun", "flow_dpm++")
    EXPORTS = ("diffusers", "kohya", "peft", "merged", "single_file")
    # kohya's names are the diffusers module names under lora_unet_ (musubi-tuner's files), which ComfyUI and
    # diffusers' QwenImageLoraLoaderMixin both read, with each module's alpha
    DEFAULT_EXPORTS = ("diffusers", "kohya")
    KOHYA_PREFIXES = {"transformer": "lora_unet"}
    KOHYA_READERS = "ComfyUI / musubi-tuner"
    SINGLE_FILE_TEXT = False  # the transformer alone, as Comfy-Org ships qwen_image_bf16.safetensors
    BASE_VERSION = "qwen_image"
    MODELSPEC_ARCHITECTURE = "Qwen-Image"  # musubi-tuner's (modelspec.architecture)
    MAX_SEQUENCE_LENGTH = 512  # QwenImagePipeline's default (1024 at most)
    DEFAULT_RESOLUTION = 1024  # 1328 px is its native square; 1024 is what its trainers default to
    # its attention is 3072 wide, as Flux.1's: names tell them apart (SIGNS); the width kept here is the text
    # stream's input (Qwen2.5-VL-7B's), which no attention projection of another family reads
    WIDTHS = frozenset({3584})
    # its MLPs and modulations by these names, and blocks past SD3.5-large's 38 outside Flux's single stream
    SIGNS = r"img_mlp_net|txt_mlp_net|img_mod_1|txt_mod_1|(?<!single_)transformer_blocks_(3[89]|[45]\d)_"
    SAMPLE_FILES = (
        {"transformer.transformer_blocks.0.img_mlp.net.0.proj": (4, 3072)},
        {"lora_unet_transformer_blocks_0_img_mod_1": (4, 3072), "lora_unet_transformer_blocks_0_attn_to_q": (4, 3072)},
        {"diffusion_model.transformer_blocks.59.attn.to_q": (4, 3072)},  # ComfyUI's own keys
    )
    TINY_OPTIONS = ("model.max_sequence_length=32",)
    # InvokeAI (6.14) reads its LoRAs (kohya's and diffusers' names) and single file into diffusers' class
    CLIENTS = {"comfyui": {"model": "QwenImage"}, "invokeai": {"base": "qwen-image", "runs": "diffusers"}}

    def build_tiny(self, seed: int = 0, size: str = "test") -> dict:
        """A tiny Qwen-Image: two MMDiT blocks over 2x2-packed 16-channel latents of an x8 AutoencoderKLQwenImage,
        a two-layer Qwen2.5-VL, a byte-level tokenizer whose template prefix is 34 tokens, Qwen-Image's scheduler."""
        from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

        torch.manual_seed(seed)
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=32, axes_dims_rope=(2, 2, 4),
        )  # fmt: skip
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
        vae.register_to_config(sample_size=32)  # what data.resolution defaults to on the tiny folder (Qwen's: 1024)
        torch.manual_seed(seed + 2)
        tokenizer = tiny_tokenizer()
        return {
            "transformer": transformer,
            "vae": vae,
            "text_encoder": tiny_text_encoder(len(tokenizer), tokenizer.pad_token_id),
            "tokenizer": tokenizer,
            "scheduler": FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        }

    def real_widths(self) -> RealWidths:
        """Qwen-Image's transformer by MMDiT blocks (60, 3072 wide), Qwen2.5-VL-7B, its 16-channel VAE."""

        def transformer(units):
            from diffusers import QwenImageTransformer2DModel

            return QwenImageTransformer2DModel(num_layers=units)  # the config's defaults are Qwen-Image's

        def inputs(resolution, batch, dtype):
            side = resolution // 16
            return {
                "hidden_states": torch.randn(batch, side * side, 64, dtype=dtype),
                "encoder_hidden_states": torch.randn(batch, self.max_sequence_length, 3584, dtype=dtype),
                "encoder_hidden_states_mask": torch.ones(batch, self.max_sequence_length, dtype=torch.long),
                "timestep": torch.rand(batch),
                "img_shapes": [[(1, side, side)]] * batch,
            }

        def text_encoders():
            from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

            rope = {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6}
            text = {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                    "num_attention_heads": 28, "num_key_value_heads": 4, "rope_parameters": rope}  # fmt: skip
            vision = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                      "out_hidden_size": 3584}  # fmt: skip
            return [Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision))]

        def vae():
            from diffusers import AutoencoderKLQwenImage

            return _OneFrame(AutoencoderKLQwenImage())

        published = {
            "Qwen-Image LoRA r16 1024 px target": "<= 16 GB NF4, <= 10 GB offloaded",
            "musubi-tuner bf16": "42 GB", "musubi-tuner fp8": "30 GB", "musubi-tuner fp8 + 16 blocks swapped": "24 GB",
            "musubi-tuner fp8 + 45 blocks swapped": "12 GB",
        }  # fmt: skip
        return RealWidths(transformer, 60, inputs, text_encoders, vae, unit="an MMDiT block", published=published)

    # --- prompts ---------------------------------------------------------------------------------
    def tokenize(self, c: Components, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The templated prompts' ids and mask, ``max_sequence_length`` tokens after the dropped prefix."""
        tokens = c.tokenizer(
            [TEMPLATE.format(p) for p in prompts], padding="max_length", truncation=True, return_tensors="pt",
            max_length=self.max_sequence_length + DROPPED, padding_side="right",
        )  # fmt: skip
        return {"text_encoder": tokens.input_ids, "text_mask": tokens.attention_mask}

    def encode_ids(self, text_encoders: dict, ids: dict) -> dict[str, torch.Tensor]:
        """As ``QwenImagePipeline._get_qwen_prompt_embeds``: the last hidden states past the system prefix, zero
        where the prompt has ended, and the mask of its tokens."""
        encoder = text_encoders["text_encoder"]
        device = next(encoder.parameters()).device
        mask = ids["text_mask"].to(device)
        model = getattr(encoder, "model", encoder)  # the LLM without its vocabulary head
        # the pipeline's hidden_states[-1], which transformers 5 ties to last_hidden_state: read without keeping
        # every layer's states (tests/test_qwen_image.py holds the two encodings equal)
        hidden = model(input_ids=ids["text_encoder"].to(device), attention_mask=mask).last_hidden_state
        kept = mask[:, DROPPED:]
        embeds = hidden[:, DROPPED:] * kept.unsqueeze(-1).to(hidden.dtype)
        rest = {k: v for k, v in ids.items() if k not in (*self.TEXT_ENCODERS, "text_mask")}
        return {**rest, "prompt_embeds": embeds, "prompt_embeds_mask": kept}

    def check_folder(self, path, allow_pickle: bool = False) -> Path:
        """As every family's, and a Qwen-Image 2.1 folder refused saying what it is."""
        index = Path(path).expanduser() / "model_index.json"
        if index.is_file() and json.loads(index.read_text()).get("_class_name") == "QwenImage21Pipeline":
            raise ConfigError(
                f"model.path={path} holds Qwen-Image 2.1 (QwenImage21Pipeline), another architecture than Qwen-Image's "
                "(a Qwen3-VL encoder read through its processor, a single-stream transformer over the 64-channel "
                "latents of a x16 VAE): model=qwen_image trains QwenImagePipeline folders; use model=qwen_image21"
            )
        return super().check_folder(path, allow_pickle)

    def guidance_kwargs(self, scale: float) -> dict:
        """True CFG's scale (the pipeline runs it only with a negative prompt; it has no guidance embedding)."""
        return {"true_cfg_scale": scale}

    def check_trainable(self, folder: Path) -> None:
        """Refuse a step-distilled Qwen-Image as a training base: named so, or saved with Lightning's sampler (a
        fixed shift, ``base_shift == max_shift``, no terminal stretch)."""
        file = Path(folder) / "scheduler" / "scheduler_config.json"
        config = json.loads(file.read_text()) if file.is_file() else {}
        fixed = "max_shift" in config and config.get("base_shift") == config["max_shift"]
        fixed = fixed and not config.get("shift_terminal")
        if fixed or re.search(r"lightning|turbo|distill", Path(folder).name, re.I):
            said = "its scheduler's fixed shift (Lightning's)" if fixed else "its folder name"
            raise ConfigError(f"model.path={folder} is a distilled checkpoint ({said}): {DISTILLED}")

    # --- latents ---------------------------------------------------------------------------------
    def encode_images(self, vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = vae.encode(images.unsqueeze(2)).latent_dist  # one frame
        return dist.mean[:, :, 0], dist.std[:, :, 0]

    def predict(self, denoiser, noisy, timesteps, cond):
        b, ch, h, w = noisy.shape
        packed = noisy.view(b, ch, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, ch * 4)
        out = denoiser(
            hidden_states=packed,
            timestep=timesteps.to(noisy.dtype) / 1000,
            encoder_hidden_states=cond["prompt_embeds"],
            encoder_hidden_states_mask=cond["prompt_embeds_mask"],
            img_shapes=[[(1, h // 2, w // 2)]] * b,
            return_dict=False,
        )[0]
        return out.view(b, h // 2, w // 2, -1, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, -1, h, w)

    def decode(self, pipe, latents, height, width):
        vae = pipe.vae
        z = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor).to(vae.dtype)
        scale, shift = (x.view(1, -1, 1, 1, 1).to(z) for x in self.latent_normalization(vae))
        return vae.decode(z / scale + shift).sample[:, :, 0]

    # --- exports ---------------------------------------------------------------------------------
    def single_file_state(self, modules: dict, vocab_sizes: dict[str, int]) -> dict:
        """The transformer by its diffusers names, Qwen-Image's native ones: the single file Comfy-Org ships,
        which ComfyUI (Load Diffusion Model) and ``QwenImageTransformer2DModel.from_single_file`` read."""
        return dict(modules["transformer"].state_dict())


class _OneFrame(torch.nn.Module):
    """The Qwen VAE encoding images (B, 3, H, W) as one-frame videos, as tuner encodes them (the memory plan)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def encode(self, images):
        return self.vae.encode(images.unsqueeze(2))
