"""A prepared dataset (tuner/data/prepare.py) as the train and evaluate stages read it: its images as tensors, the
subject's real images, each image's key in the cache of latents, its loss masks on the latents' grid.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from tuner.data.prepare import load_prepared


def images_of(dataset, ids: list[int] | None = None) -> list[torch.Tensor]:
    """A prepared dataset's images (all, or those at ``ids``) as float tensors (3, H, W) in [-1, 1]; sizes differ
    with buckets."""
    rows = dataset.select_columns(["image"]) if ids is None else dataset.select_columns(["image"]).select(ids)
    return [
        torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1 for img in rows["image"]
    ]


def subject_images(run_dir: Path) -> list[torch.Tensor]:
    """The subject's real images that metrics compare samples with (tuner/scoring.py): the prepared instance
    images, held-out ones included (``data.val_split``'s, and ``data.val_dir``'s)."""
    images = []
    for role in ("instance", "val"):
        if (run_dir / "data" / role / "dataset").is_dir():
            images += images_of(load_prepared(run_dir / "data" / role))
    return images


def _undecoded(dataset, column: str):
    import datasets

    return dataset.select_columns([column]).cast_column(column, datasets.Image(decode=False))


def image_keys(dataset) -> list[str]:
    """Each image's key in the cache of latents: a hash of its standardized bytes, crop and sizes (read, not
    decoded)."""
    sizes = dataset.select_columns(["crop", "bucket", "original_size"])
    return [
        hashlib.sha256(row["image"]["bytes"] + json.dumps(size, sort_keys=True).encode()).hexdigest()
        for row, size in zip(_undecoded(dataset, "image"), sizes)
    ]


class LatentMasks:
    """Per-image loss masks (1, h, w) in [0, 1], area-averaged to each latent's grid, decoded when a batch
    draws the image (the dataset stays on disk)."""

    def __init__(self, dataset, latents):
        self.masks, self.latents = dataset.select_columns(["mask"]), latents

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, i: int) -> torch.Tensor:
        size = self.latents.shape(i)[-2:]
        mask = self.masks[int(i)]["mask"]
        if mask is None:
            return torch.ones(1, *size)
        pixels = torch.from_numpy(np.array(mask.convert("L"))).float()[None, None] / 255.0
        return torch.nn.functional.interpolate(pixels, size=size, mode="area")[0]


def latent_masks(dataset, latents) -> LatentMasks | None:
    """The images' loss masks (``LatentMasks``); None when no image has one."""
    if all(row["mask"] is None for row in _undecoded(dataset, "mask")):
        return None
    return LatentMasks(dataset, latents)
