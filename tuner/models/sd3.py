"""Stable Diffusion 3 / 3.5: an MMDiT transformer, two CLIP encoders and T5, flow matching.

Prompts, as ``StableDiffusion3Pipeline.encode_prompt``: both CLIPs' penultimate hidden states side by
side, zero-padded to T5's width, followed by T5's hidden states along the sequence; the pooled
conditioning is both CLIPs' projected outputs side by side. The transformer reads timesteps in
[0, 1000] and latents shifted and scaled by the VAE's factors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tuner.models.base import Components, FlowFamily, _ids


class SD3(FlowFamily):
    NAME = "sd3"
    PIPELINE = "StableDiffusion3Pipeline"
    IMG2IMG = "StableDiffusion3Img2ImgPipeline"
    TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")  # CLIP-L, CLIP-G, T5
    LORA_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # as diffusers' SD3 scripts: T5 stays frozen
    BLOCKS = ("transformer_blocks.",)
    PARTIAL_BLOCKS = ("transformer_blocks.*.attn.*",)
    TARGETS = {
        "attn": ["to_q", "to_k", "to_v", "to_out.0"],
        "attn_ff": [
            "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
            "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
        ],
    }  # fmt: skip
    BASE_VERSION = "sd3"
    MODELSPEC_ARCHITECTURE = "stable-diffusion-v3-medium"
    MAX_SEQUENCE_LENGTH = 256

    def tokenize(self, c: Components, prompts: list[str]) -> dict[str, torch.Tensor]:
        out = {}
        for name, tok in zip(self.TEXT_ENCODERS, ("tokenizer", "tokenizer_2", "tokenizer_3")):
            length = self.max_sequence_length if tok == "tokenizer_3" else c.tokenizers[tok].model_max_length
            out[name] = _ids(c.tokenizers[tok], list(prompts), length)
        return out

    def encode_ids(self, text_encoders: dict, ids: dict) -> dict[str, torch.Tensor]:
        hidden, pooled = [], []
        for name in self.TEXT_ENCODERS[:2]:
            encoder = text_encoders[name]
            out = encoder(ids[name].to(next(encoder.parameters()).device), output_hidden_states=True)
            pooled.append(out[0])  # text_embeds (projected)
            hidden.append(out.hidden_states[-2])
        t5 = text_encoders["text_encoder_3"]
        t5_hidden = t5(ids["text_encoder_3"].to(next(t5.parameters()).device))[0]
        clip = torch.cat(hidden, dim=-1)
        clip = F.pad(clip, (0, t5_hidden.shape[-1] - clip.shape[-1]))
        rest = {k: v for k, v in ids.items() if k not in self.TEXT_ENCODERS}
        return {**rest, "prompt_embeds": torch.cat([clip, t5_hidden], dim=-2), "pooled": torch.cat(pooled, dim=-1)}

    def predict(self, denoiser, noisy, timesteps, cond):
        return denoiser(
            hidden_states=noisy,
            timestep=timesteps.to(noisy.dtype),
            encoder_hidden_states=cond["prompt_embeds"],
            pooled_projections=cond["pooled"],
            return_dict=False,
        )[0]
