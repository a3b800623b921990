"""Stable Diffusion 2.x: SD1.x's pipeline with an OpenCLIP text encoder, trained at 768 px with
v-prediction (read from the scheduler config; ``model.prediction_type`` overrides it).

``model.zero_terminal_snr=true`` rescales the noise schedule so its last timestep is pure noise
(Lin et al. 2024, diffusers' ``rescale_betas_zero_snr``), for training and for sampling, whose
timesteps then start at the last one (``timestep_spacing="trailing"``); it needs v-prediction.
"""

from __future__ import annotations

from tuner.errors import ConfigError
from tuner.models import real, tiny
from tuner.models.ldm_layout import to_original
from tuner.models.real import RealWidths
from tuner.models.sd15 import SD15, base_vocabulary


class SD2(SD15):
    NAME = "sd2"
    EMBEDDINGS = {"text_encoder": "clip_h"}
    EXPORTS = ("diffusers", "kohya", "peft", "merged", "single_file")
    DEFAULT_EXPORTS = ("diffusers", "kohya")  # diffusers and peft load the first, A1111/ComfyUI the second
    BASE_VERSION = "sd_v2"
    KOHYA_V2 = True
    ZERO_TERMINAL_SNR = True
    MODELSPEC_ARCHITECTURE = "stable-diffusion-v2-768-v"
    DEFAULT_RESOLUTION = 768
    WIDTHS = frozenset({1024})  # OpenCLIP-H's
    SAMPLE_FILES = ({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (4, 1024)},)
    CLIENTS = {
        # besides CLIP's image-text head, the last text layer, which diffusers drops (SD2 reads the penultimate)
        "comfyui": {"model": "SD20", "clips": ("h",), "tokenizer": "text_encoders.sd2_clip.SD2Tokenizer",
                    "missing": r"clip_h\.((logit_scale|transformer\.text_projection\.weight)"
                               r"|transformer\.text_model\.encoder\.layers\.23\.\S+)"},
        "invokeai": {"base": "sd-2"},
    }  # fmt: skip

    def build_tiny(self, seed: int = 0, size: str = "test") -> dict:
        """SD1.x's tiny shapes with what SD2.x changes: linear projections, a GELU text encoder, v-prediction."""
        return tiny.build_components(
            tiny.SIZES[size], seed, linear_projection=True, text_act="gelu", prediction_type="v_prediction"
        )

    def real_widths(self) -> RealWidths:
        """SD2.x's U-Net (64-channel heads, linear projections, 1024-wide context), OpenCLIP-H, its VAE: whole."""

        def unet(units):
            from diffusers import UNet2DConditionModel

            return UNet2DConditionModel(
                cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True
            )

        return RealWidths(unet, None, real.unet_inputs(1024), lambda: [real.clip(1024, 23, 16)], real.vae)

    @property
    def zero_terminal_snr(self) -> bool:
        return bool(self.model.zero_terminal_snr)

    def load(self, path, prediction_type=None, allow_pickle=False):
        c = super().load(path, prediction_type, allow_pickle)
        if self.zero_terminal_snr:
            if c.prediction_type != "v_prediction":
                raise ConfigError(
                    "model.zero_terminal_snr=true needs v-prediction (epsilon cannot be predicted from pure noise); "
                    "set model.prediction_type=v_prediction"
                )
            c.noise_scheduler = type(c.noise_scheduler).from_config(
                c.noise_scheduler.config, rescale_betas_zero_snr=True
            )
        return c

    def single_file_state(self, modules: dict, vocab_sizes: dict[str, int]) -> dict:
        """SD1.x's layout with the text encoder in OpenCLIP's (tuner/models/ldm_layout.py)."""
        unet, vae = modules["unet"], modules["vae"]
        text = base_vocabulary(modules["text_encoder"], vocab_sizes["text_encoder"])
        return to_original(unet.state_dict(), dict(unet.config), vae.state_dict(), dict(vae.config), text, True)

    def sampling_settings(self) -> dict:
        """Zero terminal SNR samples from the last (pure-noise) timestep: trailing spacing (Lin et al. 2024)."""
        return {"timestep_spacing": "trailing"} if self.zero_terminal_snr else {}
