"""Reference images: how an edit family (Flux.1 Kontext, Qwen-Image-Edit, Flux.2 with references) reads the
images a sample is edited from, from the prepared pair to its denoiser and its pipeline.

A family that reads references sets ``Family.REFERENCES`` (in its ``__init__`` where the rule depends on the
``model`` section) to a ``References`` of its own subclass, which states its pipeline's rule:

- prepare (``data.controls``, ``data.pairs``) stores each control as ``vae_image`` makes it, and, for a family
  whose text encoder reads the references too (``in_prompt``), as ``prompt_image`` makes it;
- training encodes each stored control once into the latents cache (the VAE's mean, as the pipelines encode a
  reference, normalised as the family's latents), keyed by its bytes and ``rule()``;
- a batch carries reference ``k`` of its samples as ``cond[f"control_{k}"]`` (latents ``[B, C, h, w]``, or the
  family's own latent layout): the family's ``predict`` joins them to the target's tokens as its pipeline does
  and returns the prediction for the target alone;
- sampling (validation, the gallery, ``recipe=generate generate.controls=[...]``) passes ``call(...)`` to the
  pipeline with the controls as the user gave them: the pipeline applies its own rule.

Each family's rule is shown equal to its pipeline's own preprocessing in its tests.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from PIL import Image


@dataclass(frozen=True)
class References:
    """A family's reference images: how many, and its pipeline's rule for preparing them."""

    most: int  # the most references one sample may have (entries of data.controls, or of a pair's controls)
    required: bool = False  # its pipeline cannot draw without one: validation and generate must give one
    in_prompt: bool = False  # its text encoder reads them too: a prompt's embeddings depend on its references
    batch: int | None = None  # the most images its pipeline edits in one call (QwenImageEditPlusPipeline: 1); None: any

    def vae_image(self, image: Image.Image) -> Image.Image:
        """The control (RGB, as the user gave it) resized as the pipeline resizes a reference it VAE-encodes."""
        raise NotImplementedError(f"{type(self).__name__} states no rule for its references")

    def prompt_image(self, image: Image.Image) -> Image.Image | None:
        """The control as the pipeline gives it to its text encoder (``in_prompt`` families); None: not read."""
        return None

    def rule(self) -> dict:
        """What ``vae_image`` and ``prompt_image`` depend on, for the keys of cached latents and prompts."""
        return {"references": type(self).__name__, **dataclasses.asdict(self)}

    def call(self, controls: list[Image.Image], height: int, width: int) -> dict:
        """The pipeline's keyword arguments that hand it the controls for an image of ``height`` x ``width``."""
        return {"image": controls if len(controls) > 1 else controls[0], "height": height, "width": width}
