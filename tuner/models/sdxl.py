"""Stable Diffusion XL: two CLIP text encoders and a U-Net with added conditioning.

The U-Net reads the penultimate hidden states of both encoders side by side, the second encoder's
pooled (projected) output, and six "time ids" per image: its original size, the top-left corner of
the crop and the target size, (h, w, top, left, h, w). tuner takes them from the prepare stage
(``original_size``, ``crop`` and ``bucket`` columns), as SDXL was trained; the pipeline computes the
same numbers at sampling time (``image_cond`` and the test against ``_get_add_time_ids``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from tuner.models import real, tiny
from tuner.models.base import Components, Family, _ids
from tuner.models.real import RealWidths
from tuner.models.sd15 import base_vocabulary
from tuner.models.sgm_layout import sdxl_unet_key, to_original


class SDXL(Family):
    NAME = "sdxl"
    PIPELINE = "StableDiffusionXLPipeline"
    IMG2IMG = "StableDiffusionXLImg2ImgPipeline"
    TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
    LORA_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
    EMBEDDINGS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}  # one vector per encoder per token
    EXPORTS = ("diffusers", "kohya", "peft", "merged", "single_file")
    DEFAULT_EXPORTS = ("diffusers", "kohya")  # diffusers and peft load the first, A1111/ComfyUI the second
    KOHYA_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    BASE_VERSION = "sdxl_base_v1-0"
    MODELSPEC_ARCHITECTURE = "stable-diffusion-xl-v1-base"
    DEFAULT_RESOLUTION = 1024
    WIDTHS = frozenset({2048})  # CLIP-L's and OpenCLIP-G's side by side
    NEVER = r"down_blocks_0_attentions"  # its first down block has no attention
    SAMPLE_FILES = (
        {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (4, 2048)},
        {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (4, 1280),
         "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (4, 640)},
    )  # fmt: skip
    CLIENTS = {
        "comfyui": {"model": "SDXL", "clips": ("l", "g"), "tokenizer": "sdxl_clip.SDXLTokenizer",
                    "missing": r"clip_[lg]\.(logit_scale|transformer\.text_projection\.weight)", "penultimate": True},
        "invokeai": {"base": "sdxl"},
    }  # fmt: skip

    def build_tiny(self, seed: int = 0, size: str = "test") -> dict:
        """A tiny SDXL: SDXL's U-Net layout (no attention at the top level, two ResNets per block, deeper
        transformers lower down, linear projections, text_time added embedding) over two CLIP encoders."""
        from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16,
            block_out_channels=(16, 32),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            cross_attention_dim=16 + 24,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 24,
            norm_num_groups=8,
        )
        torch.manual_seed(seed + 1)
        vae = tiny.tiny_vae()
        torch.manual_seed(seed + 2)
        text_encoder = tiny.clip_text(CLIPTextModel, 16, 2, 32)
        # the widths differ, as in SDXL: diffusers' single-file loader tells the two encoders apart by width
        text_encoder_2 = tiny.clip_text(CLIPTextModelWithProjection, 24, 2, 32, projection_dim=24, hidden_act="gelu")
        scheduler = EulerDiscreteScheduler(  # SDXL's own
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
            timestep_spacing="leading",
        )  # fmt: skip
        return {
            "unet": unet,
            "vae": vae,
            "text_encoder": text_encoder,
            "text_encoder_2": text_encoder_2,
            "tokenizer": tiny.char_tokenizer(32),
            "tokenizer_2": tiny.char_tokenizer(32),
            "scheduler": scheduler,
        }

    def real_widths(self) -> RealWidths:
        """SDXL's U-Net with one layer in each of its 1280-wide transformers (10 in SDXL), CLIP-L, OpenCLIP-G,
        its VAE."""
        return RealWidths(
            lambda units: real_unet((1, 2, units)), 10, real.unet_inputs(2048, added=1280),
            lambda: [real.clip(768, 12, 12), real.clip(1280, 32, 20, projection=True)], real.vae,
            unit="a layer of each 1280-wide transformer", published={"SDXL LoRA 1024 px target": "<= 6 GB"},
        )  # fmt: skip

    def tokenize(self, c: Components, prompts: list[str]) -> dict[str, torch.Tensor]:
        return {
            name: _ids(c.tokenizers[tok], list(prompts), c.tokenizers[tok].model_max_length)
            for name, tok in zip(self.TEXT_ENCODERS, ("tokenizer", "tokenizer_2"))
        }

    def encode_ids(self, text_encoders: dict, ids: dict) -> dict[str, torch.Tensor]:
        """As ``StableDiffusionXLPipeline.encode_prompt``: penultimate hidden states of both encoders,
        concatenated, and the last encoder's pooled output. Other entries (time ids) pass through."""
        hidden = []
        for name in self.TEXT_ENCODERS:
            encoder = text_encoders[name]
            out = encoder(ids[name].to(next(encoder.parameters()).device), output_hidden_states=True)
            pooled = out[0]  # CLIPTextModelWithProjection's text_embeds (the last encoder's)
            hidden.append(out.hidden_states[-2])
        rest = {k: v for k, v in ids.items() if k not in self.TEXT_ENCODERS}
        return {**rest, "prompt_embeds": torch.cat(hidden, dim=-1), "pooled": pooled}

    def image_cond(self, dataset) -> dict[str, torch.Tensor]:
        """Per image (original h, w, crop top, left, target h, w): PIL sizes are (w, h), crops (top, left)."""
        rows = [
            [size[1], size[0], crop[0], crop[1], bucket[1], bucket[0]]
            for size, crop, bucket in zip(dataset["original_size"], dataset["crop"], dataset["bucket"])
        ]
        return {"time_ids": torch.tensor(rows, dtype=torch.float32)}

    def predict(self, denoiser, noisy, timesteps, cond):
        added = {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"].to(cond["pooled"].dtype)}
        return denoiser(noisy, timesteps, encoder_hidden_states=cond["prompt_embeds"], added_cond_kwargs=added).sample

    def pipeline_extras(self) -> dict:
        return {"add_watermarker": False}

    REFINER_PIPELINE = "StableDiffusionXLImg2ImgPipeline"  # what a refiner folder's model_index.json names
    # what the refiner's pipeline is built from (its first encoder and tokenizer are null in a refiner): the classes
    # each component's entry of model_index.json may name (tuner/generation.py's check_refiner)
    REFINER_COMPONENTS = {
        "unet": ("UNet2DConditionModel",),
        "vae": ("AutoencoderKL",),
        "text_encoder_2": ("CLIPTextModelWithProjection",),
        "tokenizer_2": ("CLIPTokenizer", "CLIPTokenizerFast"),
        "scheduler": None,  # any scheduler: tuner sets the base's sampler on it
    }

    def refiner_pipeline(self, folder, device, c: Components):
        """An SDXL refiner (``StableDiffusionXLImg2ImgPipeline``) from a local folder, on ``device``. Its CLIP-G
        is the base's: the new tokens of the base's (``c``) go into it too, with their vectors."""
        from diffusers import StableDiffusionXLImg2ImgPipeline

        refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(folder, use_safetensors=True, add_watermarker=False)
        refiner.set_progress_bar_config(disable=True)
        tokenizer, vocab = c.tokenizers["tokenizer_2"], refiner.tokenizer_2.get_vocab()
        new = [token for token in tokenizer.added_tokens_encoder if token not in vocab]
        if new:
            rows = c.text_encoders["text_encoder_2"].get_input_embeddings().weight
            vectors = list(rows[tokenizer.convert_tokens_to_ids(new)].detach().float().cpu())
            refiner.load_textual_inversion(
                vectors, token=new, text_encoder=refiner.text_encoder_2, tokenizer=refiner.tokenizer_2
            )
        return refiner.to(device)

    def kohya_module_name(self, component: str, name: str, config) -> str:
        """A module's name as kohya, A1111 and ComfyUI spell it for SDXL: the U-Net's in the original SGM
        layout (``input_blocks.4.1.transformer_blocks.0.attn1.to_q``), both CLIP encoders' in transformers'
        names under ``text_model.``."""
        if component.startswith("text_encoder"):
            return name if name.startswith("text_model.") else f"text_model.{name}"
        up_attention = ["CrossAttn" in block for block in config["up_block_types"]]
        return sdxl_unet_key(f"{name}.weight", config["layers_per_block"], up_attention).removesuffix(".weight")

    def single_file_state(self, modules: dict, vocab_sizes: dict[str, int]) -> dict:
        """The four modules in the original (SGM) single-file layout of SDXL (tuner/models/sgm_layout.py)."""

        unet, vae = modules["unet"], modules["vae"]
        texts = [base_vocabulary(modules[name], vocab_sizes[name]) for name in self.TEXT_ENCODERS]
        return to_original(unet.state_dict(), dict(unet.config), vae.state_dict(), dict(vae.config), *texts)


def real_unet(transformer_layers: tuple[int, int, int] = (1, 2, 10), **extra):
    """SDXL's U-Net at its real widths and block structure (no attention at the 320-wide level, 64-channel
    heads, the 2048-wide context, the text_time embedding), ``transformer_layers`` deep per level (SDXL's
    own: 2 and 10 at the two attention levels). For the clients' bases and the memory plan."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=transformer_layers,
        attention_head_dim=(5, 10, 20),
        use_linear_projection=True,
        cross_attention_dim=2048,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        **extra,
    )


def make_tiny_refiner(folder: Path, base: Path, seed: int = 0) -> Path:
    """A tiny SDXL refiner beside a tiny SDXL base (``base``, its VAE, second encoder and tokenizer): a U-Net
    over the second encoder only, with SDXL-refiner's five time ids (sizes, crop, aesthetic score)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel

    torch.manual_seed(seed + 7)
    unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=(16, 32), layers_per_block=2, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, cross_attention_dim=24,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=5 * 8 + 24,
    )  # fmt: skip
    source = StableDiffusionXLImg2ImgPipeline.from_pretrained(base, use_safetensors=True)
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=source.vae, text_encoder=None, text_encoder_2=source.text_encoder_2, tokenizer=None,
        tokenizer_2=source.tokenizer_2, unet=unet.eval(), scheduler=source.scheduler,
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
    )  # fmt: skip
    refiner.save_pretrained(folder, safe_serialization=True)
    return Path(folder)
