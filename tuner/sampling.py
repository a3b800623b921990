"""Sampling with fixed seeds: one generator per image, so an image depends only on its prompt and
seed, never on what else shares its batch. Used by the gallery, class images and evaluation."""

from __future__ import annotations

import contextlib
import inspect

import torch
from tqdm.auto import tqdm

from tuner.models.base import Family


@torch.no_grad()
def sample_images(
    pipe,
    prompts: list[str],
    seeds: list[int],
    resolution: int,
    steps: int = 25,
    guidance_scale: float = 3.0,
    batch_size: int = 64,
    desc: str | None = None,
    autocast=contextlib.nullcontext,
    negative_prompts: list[str] | None = None,
    width: int | None = None,
    decode=None,
    guidance=None,
    **call,
) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] for ``prompts[i]`` sampled from ``seeds[i]``.

    ``resolution`` is the height (and the width unless ``width`` is given); ``call`` goes to the
    pipeline as is (an image-to-image pipeline's ``image`` and ``strength``, which take no size).
    The denoising runs under ``autocast`` (mixed precision); the VAE decodes outside it, in its own
    dtype (float32 unless asked), since half-precision VAE decoding is known to produce NaNs.
    ``decode(pipe, latents, height, width)``: the family's (``Family.decode``: Flux's latents come packed);
    ``guidance(scale)``: the call's guidance arguments (``Family.guidance_kwargs``), ``guidance_scale`` if None.
    """

    decode = decode or Family().decode
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=desc is None, leave=False):
        chunk = slice(start, start + batch_size)
        with autocast():
            size = {"height": resolution, "width": width or resolution}
            if "image" in call:  # the given image's size, where the pipeline takes one (else it draws 1024 px)
                takes = "height" in inspect.signature(pipe.__call__).parameters
                size = {"height": call["image"].height, "width": call["image"].width} if takes else {}
            negative = {"negative_prompt": negative_prompts[chunk]} if negative_prompts else {}
            latents = pipe(
                prompt=prompts[chunk],  # by name: Flux.2's pipelines take reference images first
                num_inference_steps=steps,
                **(guidance(guidance_scale) if guidance else {"guidance_scale": guidance_scale}),
                generator=[torch.Generator().manual_seed(s) for s in seeds[chunk]],
                output_type="latent",
                **size,
                **negative,
                **call,
            ).images
        # image-to-image: the size of the given (PIL) image
        height, width_ = call["image"].size[::-1] if "image" in call else (resolution, width or resolution)
        images = decode(pipe, latents, height, width_)
        out.append(images.float().clamp(-1, 1).cpu())
    return torch.cat(out)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (N, 3, H, W) to uint8 (N, H, W, 3)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
