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


# ---------------------------------------------------------------- edit pairs (tuner/models/references.py)


def has_controls(dataset) -> bool:
    """Whether any row of a prepared dataset is an edit pair (a dataset prepared before pairs has no column)."""
    return "control_sources" in dataset.column_names and any(dataset["control_sources"])


def control_keys(dataset, rule: dict) -> list[list[str]]:
    """Each row's controls' keys in the cache of latents: a hash of the prepared control's bytes and the family's
    rule for its references (``References.rule``), so equal controls are encoded once, across pairs and runs."""
    suffix = json.dumps(rule, sort_keys=True).encode()
    return [
        [hashlib.sha256(image["bytes"] + suffix).hexdigest() for image in row["controls"]]
        for row in _undecoded_list(dataset, "controls")
    ]


def control_pixels(dataset, row: int, k: int) -> torch.Tensor:
    """Control ``k`` of row ``row`` as the VAE encodes it: a (3, H, W) float tensor in [-1, 1]."""
    image = dataset.select_columns(["controls"])[int(row)]["controls"][k]
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1


def control_prompt_images(dataset) -> list[list]:
    """Each row's controls as its family's text encoder reads them (``References.prompt_image``), as PIL images."""
    return [[image.convert("RGB") for image in row] for row in dataset["control_prompts"]]


def prompt_reference_keys(dataset) -> list[str]:
    """Each row's references' identity for its cached prompt: the hashes of its ``control_prompts`` bytes."""
    return [
        ",".join(hashlib.sha256(image["bytes"]).hexdigest() for image in row["control_prompts"])
        for row in _undecoded_list(dataset, "control_prompts")
    ]


def _undecoded_list(dataset, column: str):
    import datasets

    return dataset.select_columns([column]).cast_column(column, datasets.Sequence(datasets.Image(decode=False)))
