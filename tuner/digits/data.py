"""scikit-learn's handwritten digits: the data of the embedded base, of the quickstart's subject and
of the independent classifier that scores samples.

The 1,797 digits are 8x8 grayscale images with values 0..16 (ink is high). tuner draws them as dark
ink on white paper, like a photo of a handwritten digit, upscaled to the base's resolution.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tuner.config import DIGIT_WORDS

WORDS = DIGIT_WORDS
TRANSFORMS = {
    "mirror": lambda a: a[:, ::-1],
    "flip": lambda a: a[::-1, :],
    "rot90": lambda a: np.rot90(a, 1),
    "rot180": lambda a: np.rot90(a, 2),
    "rot270": lambda a: np.rot90(a, 3),
    "transpose": lambda a: a.T,
}


def caption(label: int) -> str:
    """The caption the base is trained on, e.g. ``a photo of the digit seven``."""
    return f"a photo of the digit {WORDS[label]}"


@lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64)


def ink_to_pixels(ink: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """Ink maps (N, h, w) in [0, 1] to RGB images (N, 3, size, size) in [-1, 1], dark ink on white."""
    ink = torch.as_tensor(np.ascontiguousarray(ink), dtype=torch.float32)[:, None]
    ink = F.interpolate(ink, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return (1 - 2 * ink).expand(-1, 3, -1, -1).contiguous()


def load_images(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All digits as images (N, 3, size, size) in [-1, 1] and their labels (N,)."""
    ink, labels = _raw()
    return ink_to_pixels(ink, size), torch.from_numpy(labels)


def features(images: torch.Tensor) -> np.ndarray:
    """Classifier features of images in [-1, 1]: mean over channels, area-downsampled to the 8x8 grid."""
    ink = (1 - images.float().mean(1, keepdim=True)) / 2
    return F.adaptive_avg_pool2d(ink, 8).flatten(1).clamp(0, 1).numpy()


def subject_ink(digit: int, transform: str, count: int, seed: int) -> np.ndarray:
    """``count`` real samples of ``digit``, transformed so they are no longer any digit's shape."""
    if transform not in TRANSFORMS:
        raise ValueError(f"subject.transform={transform}: choose one of {', '.join(TRANSFORMS)}")
    ink, labels = _raw()
    candidates = np.flatnonzero(labels == digit)
    chosen = np.random.default_rng(seed).choice(candidates, size=count, replace=False)
    return np.stack([TRANSFORMS[transform](ink[i]) for i in sorted(chosen)])


def write_subject_images(folder: Path, digit: int, transform: str, count: int, seed: int, size: int) -> list[Path]:
    """Write the subject as real RGB PNG files, as a user's photos would arrive."""
    folder.mkdir(parents=True, exist_ok=True)
    pixels = ink_to_pixels(subject_ink(digit, transform, count, seed), size)
    paths = []
    for i, image in enumerate(pixels):
        array = ((image.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        path = folder / f"subject_{i:02d}.png"
        Image.fromarray(array).save(path)
        paths.append(path)
    return paths


def digit_in(prompt: str | None) -> int | None:
    """The digit a prompt names in words (``... digit seven`` -> 7), if any."""
    words = re.findall(r"[a-z]+", (prompt or "").lower())
    found = [WORDS.index(w) for w in words if w in WORDS]
    return found[-1] if found else None


class DigitClassifier:
    """An SVC fit on the real digits (optionally plus extra labelled images): independent of any model.

    Labels 0..9 are the digits; extra classes get the labels given with them (e.g. 10 for a subject).
    """

    def __init__(self, size: int, extra_images: torch.Tensor | None = None, extra_label: int = 10):
        from sklearn.svm import SVC

        images, labels = load_images(size)
        x, y = features(images), labels.numpy()
        if extra_images is not None and len(extra_images):
            x = np.concatenate([x, features(extra_images)])
            y = np.concatenate([y, np.full(len(extra_images), extra_label)])
        self.svc = SVC(gamma="scale", C=10.0).fit(x, y)

    def predict(self, images: torch.Tensor) -> np.ndarray:
        """Labels of images (N, 3, H, W) in [-1, 1]."""
        return self.svc.predict(features(images))
