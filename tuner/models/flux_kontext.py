"""Flux.1 Kontext [dev]: Flux.1's transformer editing an image: the reference's latents ride in the same sequence.

``FluxKontextPipeline`` is Flux.1 with one reference image: its transformer (``FluxTransformer2DModel``, the same
class and shapes as Flux.1 dev's), CLIP and T5 prompts and guidance embedding unchanged. The reference never
reaches the text encoders. The pipeline:

- resizes the reference (``_auto_resize``, the default: to the size in ``PREFERRED_KONTEXT_RESOLUTIONS``, about
  1 MP, whose aspect is nearest the reference's; else its own size), each side floored to 16 px, squashed with
  LANCZOS (no crop);
- encodes it with the VAE's mean (argmax), ``(z - shift_factor) * scaling_factor`` as a target's latents;
- packs it 2x2 as the target and appends its tokens after the target's, with the target's position ids but the
  first axis set to 1 (the target's is 0);
- keeps the transformer's output for the target's tokens alone.

Training does the same with the target's noisy latents in front (``predict``), so a LoRA learns the edit the
pipeline draws. A sample without a reference is a plain Flux.1 text-to-image sample, as the pipeline draws without
``image``. The target's size: the pipeline recomputes it from ``max_area`` (1024 x 1024 unless given) at the asked
aspect: tuner's pipeline class defaults ``max_area`` to height x width, and its samples pass it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import FluxKontextPipeline as _DiffusersKontext
from PIL import Image

from tuner.models import tiny
from tuner.models.flux import Flux
from tuner.models.real import RealWidths
from tuner.models.references import References

MULTIPLE = 16  # the pipeline floors a reference's sides to 2 x the VAE's downsampling (x8: the real and tiny VAE)


@dataclass(frozen=True)
class KontextReferences(References):
    """Kontext's rule for its one reference (``FluxKontextPipeline.__call__``, "Preprocess image")."""

    most: int = 1
    auto_resize: bool = True  # model.control_auto_resize: the nearest preferred ~1 MP size; else its own size

    def size(self, image: Image.Image) -> tuple[int, int]:
        """(width, height) the pipeline resizes ``image`` to: its sides floored to 16 (the pipeline's image
        processor's), then the preferred resolution of the nearest aspect (auto), floored to 16."""
        from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

        width, height = image.width // MULTIPLE * MULTIPLE, image.height // MULTIPLE * MULTIPLE
        if width == 0 or height == 0:
            raise ValueError(f"a {image.width}x{image.height} reference: Kontext's sides are multiples of {MULTIPLE}")
        if self.auto_resize:
            ratio = width / height
            _, width, height = min((abs(ratio - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
        return width // MULTIPLE * MULTIPLE, height // MULTIPLE * MULTIPLE

    def vae_image(self, image: Image.Image) -> Image.Image:
        """The reference squashed to ``size`` with the pipeline's image processor (LANCZOS, no crop)."""
        from diffusers.image_processor import VaeImageProcessor

        width, height = self.size(image)
        return VaeImageProcessor(vae_scale_factor=MULTIPLE).resize(image, height, width)

    def call(self, controls: list[Image.Image], height: int, width: int) -> dict:
        """The reference, the target's size as ``max_area`` (which the pipeline's size comes from) and the rule."""
        image = {"image": controls[0]} if controls else {}
        return {**image, "height": height, "width": width, "max_area": height * width, "_auto_resize": self.auto_resize}


class FluxKontextPipeline(_DiffusersKontext):
    """diffusers' ``FluxKontextPipeline`` drawing at the height and width it is given (``max_area`` defaults to their
    product instead of 1024 x 1024, from which the pipeline would recompute the size), as every other family's
    pipeline draws: the pipeline ``load_pipeline`` and ``pipeline`` build. It loads and saves as diffusers' class
    (the same name in model_index.json); ``tuner.sampling`` passes ``max_area`` to diffusers' own class too."""

    def __call__(self, *args, height=None, width=None, max_area=None, **kwargs):
        if max_area is None:
            max_area = height * width if height and width else 1024**2
        return super().__call__(*args, height=height, width=width, max_area=max_area, **kwargs)


class FluxKontext(Flux):
    NAME = "flux_kontext"
    PIPELINE = "FluxKontextPipeline"
    IMG2IMG = None  # its pipeline takes a reference to edit, not an init image to noise
    # it always passes custom sigmas (and mu), which FlowMatchHeun's and DPM-Solver's set_timesteps lack
    NO_SCHEDULERS = ("flow_heun", "flow_dpm++")
    # its LoRA files are Flux.1 dev's (the same transformer): recipe=inspect names both families for one
    MODELSPEC_ARCHITECTURE = "flux-1-dev"
    TINY_OPTIONS = ("model.max_sequence_length=32", "model.control_auto_resize=false")  # a tiny reference stays tiny
    CLIENTS = {"comfyui": {"model": "Flux"}, "invokeai": {"base": "flux"}}  # both read Kontext as a Flux.1 variant
    REFERENCES = KontextReferences()  # the instance's follows model.control_auto_resize

    def __init__(self, model=None):
        super().__init__(model)
        self.REFERENCES = KontextReferences(auto_resize=self.model.control_auto_resize)

    def pipeline_class(self):
        return FluxKontextPipeline

    def build_tiny(self, seed: int = 0, size: str = "test") -> dict:
        """Flux.1's tiny pipeline (one double- and one single-stream block, CLIP + T5) with a VAE that downsamples
        x8 as Kontext's real one, so a reference's sides floor to 16 px as at full size."""
        parts = super().build_tiny(seed, size)
        torch.manual_seed(seed + 1)
        vae = tiny.tiny_vae(
            (8, 8, 16, 16), use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159
        )
        return {**parts, "vae": vae}

    def real_widths(self) -> RealWidths:
        """Flux.1 dev's widths (FLUX.1-Kontext-dev's transformer is the same shape, so the plan's first row and its
        pin are Flux.1's); a reference adds its tokens to the sequence (``inputs(..., references=1)``: a reference
        of the target's size, as a 1024 px target's auto-resized reference is)."""
        rw = super().real_widths()

        def inputs(resolution, batch, dtype, references: int = 0):
            out = rw.inputs(resolution, batch, dtype)
            tokens = out["hidden_states"].shape[1] * (1 + references)
            hidden = torch.randn(batch, tokens, 64, dtype=dtype)
            return {**out, "hidden_states": hidden, "img_ids": torch.zeros(tokens, 3)}

        return RealWidths(rw.denoiser, rw.real, inputs, rw.text_encoders, rw.vae, unit=rw.unit, published=rw.published)

    def predict(self, denoiser, noisy, timesteps, cond):
        """Flux.1's transformer call on the target's tokens followed by the reference's (``cond["control_0"]``, latents
        as the target's), their ids' first axis 1, as ``FluxKontextPipeline`` calls it; the target's prediction."""
        if "control_0" not in cond:
            return super().predict(denoiser, noisy, timesteps, cond)
        cond = dict(cond)
        reference = cond.pop("control_0")
        b, ch, h, w = noisy.shape
        rh, rw = reference.shape[-2:]
        pack, ids = _DiffusersKontext._pack_latents, _DiffusersKontext._prepare_latent_image_ids
        tokens = torch.cat([pack(noisy, b, ch, h, w), pack(reference.to(noisy.dtype), b, ch, rh, rw)], dim=1)
        reference_ids = ids(b, rh // 2, rw // 2, noisy.device, noisy.dtype)
        reference_ids[..., 0] = 1
        image_ids = torch.cat([ids(b, h // 2, w // 2, noisy.device, noisy.dtype), reference_ids])
        out = self.transformer_call(denoiser, tokens, image_ids, timesteps, cond)
        return _DiffusersKontext._unpack_latents(out[:, : (h // 2) * (w // 2)], h, w, 1)
