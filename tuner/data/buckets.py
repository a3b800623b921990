"""Aspect-ratio buckets: every image lands in exactly one bucket, and a batch never mixes buckets.

A bucket is a (width, height) whose area is at most the training resolution squared, both sides
multiples of ``step`` (64 as kohya and SimpleTuner use, or the model's own factor, 8 for SD VAEs).
An image goes to the bucket nearest its aspect ratio and is scaled to cover it, then cropped; so
nothing is squashed and at most a sliver of the long side is lost.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BucketSettings:
    # target area is resolution ** 2
    resolution: int
    step: int = 64
    min_ratio: float = 0.5
    max_ratio: float = 2.0
    # False: an image smaller than the target area keeps its size (rounded down to the step)
    upscale: bool = True


def bucket_sizes(s: BucketSettings) -> list[tuple[int, int]]:
    """Every (width, height) of area at most resolution^2, sides multiples of step, ratio in range."""
    area = s.resolution**2
    sizes = []
    for width in range(s.step, area // s.step + 1, s.step):
        height = area // width // s.step * s.step
        if height >= s.step and s.min_ratio <= width / height <= s.max_ratio:
            sizes.append((width, height))
    # for each ratio keep the biggest; several widths can round to the same height
    best: dict[int, tuple[int, int]] = {}
    for width, height in sizes:
        if height not in best or width > best[height][0]:
            best[height] = (width, height)
    return sorted(best.values())


def assign(size: tuple[int, int], s: BucketSettings, sizes: list[tuple[int, int]] | None = None) -> tuple[int, int]:
    """The bucket of an image of ``size`` (width, height): the nearest aspect ratio in log space."""
    width, height = size
    sizes = sizes or bucket_sizes(s)
    if not s.upscale and width * height < s.resolution**2:
        # keep the image's own scale: its size rounded down to the step, the ratio clamped to the range
        ratio = min(max(width / height, s.min_ratio), s.max_ratio)
        side = math.sqrt(width * height)
        w = max(s.step, int(side * math.sqrt(ratio)) // s.step * s.step)
        h = max(s.step, int(side / math.sqrt(ratio)) // s.step * s.step)
        return min(w, width // s.step * s.step or s.step), min(h, height // s.step * s.step or s.step)
    target = math.log(width / height)
    return min(sizes, key=lambda b: (abs(math.log(b[0] / b[1]) - target), -b[0] * b[1]))


class BucketSampler:
    """Epochs of batches: each image ``repeats[i]`` times per epoch, each batch from one bucket.

    A bucket holding fewer images than the batch size gives a smaller batch rather than being
    dropped or padded with repeats, so every image is seen exactly once per repeat.
    """

    def __init__(self, buckets: list[tuple], repeats: list[int]):
        self.by_bucket: dict[tuple, list[int]] = defaultdict(list)
        for index, (bucket, r) in enumerate(zip(buckets, repeats)):
            self.by_bucket[tuple(bucket)] += [index] * r
        self.pending: list[list[int]] = []
        self.epochs = 0  # epochs started so far

    def epoch(self, generator: torch.Generator, batch_size: int) -> list[list[int]]:
        """One epoch: every image ``repeats`` times, in shuffled batches of one bucket each."""
        batches = []
        for bucket in sorted(self.by_bucket):
            items = self.by_bucket[bucket]
            order = [items[i] for i in torch.randperm(len(items), generator=generator).tolist()]
            batches += [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

    def next(self, generator: torch.Generator, batch_size: int) -> list[int]:
        """The next batch of indices; a new shuffled epoch starts when one runs out."""
        if not self.pending:
            self.pending = self.epoch(generator, batch_size)
            self.epochs += 1
        return self.pending.pop(0)
