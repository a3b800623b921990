"""The held-out loss: images never trained on (``data.val_split``, ``data.val_dir``), scored at validation steps.

Every image is noised at the same ``validation.loss_timesteps`` timesteps, spread evenly over the range training
draws from, with noise drawn once from a generator of its own: the number depends on the weights alone, so it
is the same with or without a resume in between and comparable from step to step, and computing it draws
nothing from the training's random generators.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tuner.models.base import tree_map
from tuner.models.objectives import diffusion_loss
from tuner.training.batches import ControlLatents, LatentCache, take


@dataclass
class HeldOutSet:
    """One set of held-out images: their latents, the index of each one's caption in ``rows`` (embeddings, or
    token ids when the text encoder trains), and per-image conditioning (SDXL's sizes), masks and an edit pair's
    references (``cond["control_k"]``, as ``draw_batch`` gives them), if any."""

    name: str  # the metric: val_loss (instance images), val_loss_class (class images)
    latents: LatentCache
    caption: torch.Tensor
    image_cond: dict[str, torch.Tensor] | None = None
    mask: object | None = None
    controls: ControlLatents | None = None


class HeldOutLoss:
    """The mean denoising loss of each held-out set at fixed timesteps and noise (the training's loss function).

    Args:
        sets: the held-out sets.
        rows: each distinct caption's conditioning (or token ids), as the training's ``Captions.rows``.
        objective: the family's objective; t: the ``train`` settings (the loss, its weighting, the timestep range).
        timesteps: how many timesteps each image is scored at.
        seed: the noise's generator seed.
        batch_size: samples per denoiser call.
    """

    def __init__(self, sets: list[HeldOutSet], rows, objective, t, timesteps: int, seed: int, batch_size: int):
        self.rows, self.objective, self.t, self.batch_size = rows, objective, t, batch_size
        flow = getattr(objective, "prediction_type", None) == "flow"
        n = objective.num_timesteps
        low, high = (0, n) if flow else (t.min_timestep, t.max_timestep or n)
        # the midpoints of ``timesteps`` equal parts of [low, high): the same schedule positions at every step
        self.steps = (low + (torch.arange(timesteps) + 0.5) * (high - low) / timesteps).long()
        generator = torch.Generator().manual_seed(seed)
        self.items: dict[str, list[dict]] = {}
        for s in sets:
            items = []
            for i in range(len(s.latents)):
                latent = s.latents.sample(torch.tensor([i]), generator)[0]
                for step in self.steps:
                    noise = torch.randn(latent.shape, generator=generator, dtype=latent.dtype)
                    items.append({"image": i, "latent": latent, "noise": noise, "step": step})
            self.items[s.name] = items
        self.sets = {s.name: s for s in sets}

    @torch.no_grad()
    def __call__(self, denoiser, device, autocast, encode: Callable | None = None) -> dict[str, float]:
        """Each set's mean loss with ``denoiser`` as it is now (``encode(ids)``: the conditioning of token ids,
        when the text encoder trains)."""
        out = {}
        for name, items in self.items.items():
            s = self.sets[name]
            by_shape: dict[tuple, list[dict]] = {}
            for item in items:  # one call per latent size and references' shapes
                shapes = s.controls.shapes(item["image"]) if s.controls is not None else ()
                by_shape.setdefault((tuple(item["latent"].shape), shapes), []).append(item)
            total, count = 0.0, 0
            for group in by_shape.values():
                for start in range(0, len(group), self.batch_size):
                    chunk = group[start : start + self.batch_size]
                    total += float(self._loss(s, chunk, denoiser, device, autocast, encode).sum())
                    count += len(chunk)
            out[name] = total / count
        return out

    def _loss(self, s: HeldOutSet, chunk: list[dict], denoiser, device, autocast, encode) -> torch.Tensor:
        index = torch.tensor([item["image"] for item in chunk])
        latents = torch.stack([item["latent"] for item in chunk]).to(device)
        noise = torch.stack([item["noise"] for item in chunk])
        steps = torch.stack([item["step"] for item in chunk])
        cond = tree_map(lambda rows: take(rows, s.caption[index]), self.rows)
        if s.image_cond is not None:  # as draw_batch: beside the caption's rows (the text encoders pass it on)
            cond = {**cond, **{k: v[index] for k, v in s.image_cond.items()}}
        if s.controls is not None:
            cond = {**cond, **s.controls.take(index)}
        cond = tree_map(lambda x: x.to(device), cond)
        mask = torch.stack([s.mask[int(i)] for i in index]).to(device) if s.mask is not None else None
        with autocast():
            if encode is not None:
                cond = encode(cond)
            draws = (noise, noise, steps)
            return diffusion_loss(denoiser, self.objective, latents, cond, t=self.t, mask=mask, draws=draws)
