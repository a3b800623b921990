"""Stable Diffusion 2.x: SD1.x's pipeline with an OpenCLIP text encoder, trained at 768 px with
v-prediction (read from the scheduler config; ``model.prediction_type`` overrides it).

``model.zero_terminal_snr=true`` rescales the noise schedule so its last timestep is pure noise
(Lin et al. 2024, diffusers' ``rescale_betas_zero_snr``), for training and for sampling, whose
timesteps then start at the last one (``timestep_spacing="trailing"``); it needs v-prediction.
"""

from __future__ import annotations

from tuner.errors import ConfigError
from tuner.models.ldm_layout import to_original
from tuner.models.sd15 import SD15, base_vocabulary


class SD2(SD15):
    NAME = "sd2"
    EMBEDDINGS = {"text_encoder": "clip_h"}
    EXPORTS = ("diffusers", "kohya", "peft", "merged", "single_file")
    DEFAULT_EXPORTS = ("diffusers", "kohya")  # diffusers and peft load the first, A1111/ComfyUI the second
    BASE_VERSION = "sd_v2"
    KOHYA_V2 = True
    MODELSPEC_ARCHITECTURE = "stable-diffusion-v2-768-v"
    DEFAULT_RESOLUTION = 768

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
