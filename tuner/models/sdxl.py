"""Stable Diffusion XL: two CLIP text encoders and a U-Net with added conditioning.

The U-Net reads the penultimate hidden states of both encoders side by side, the second encoder's
pooled (projected) output, and six "time ids" per image: its original size, the top-left corner of
the crop and the target size, (h, w, top, left, h, w). tuner takes them from the prepare stage
(``original_size``, ``crop`` and ``bucket`` columns), as SDXL was trained; the pipeline computes the
same numbers at sampling time (``image_cond`` and the test against ``_get_add_time_ids``).
"""

from __future__ import annotations

import torch

from tuner.models.base import Components, Family, _ids
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
