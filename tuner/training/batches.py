"""What a training step is made of, drawn from what was computed once before the loop.

Images are encoded to latent distributions once (``encode_latent_dist``) and captions to
conditioning once (the family's ``encode_prompts``); a ``SampleSet`` holds them with how its images
are drawn, and ``draw_batch`` makes a step's ``Batch``es from them, with the step's random draws
(``draw_noise``) made on the CPU from one generator, so every device and rank draws the same.

An edit pair's references (tuner/models/references.py) ride in its conditioning: ``cond["control_k"]`` holds the
latents of reference k of each sample (``ControlLatents``), and a batch's samples share the number of references
and their shapes (the sampler's buckets say so).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from tuner.config import TrainConfig
from tuner.data.buckets import BucketSampler
from tuner.models.base import Cond, Family, tree_cat, tree_map
from tuner.models.objectives import draw_noise
from tuner.training.cache import Column


@dataclass
class Batch:
    latents: torch.Tensor
    # prompt conditioning (a tensor or named tensors), or token ids when the text encoder runs in the step
    cond: Cond
    # per-sample loss weights; the loss is sum(weights * per_sample_loss)
    weights: torch.Tensor
    # (B, 1, h, w) in [0, 1] at latent resolution: where the loss counts; None: everywhere
    mask: torch.Tensor | None = None
    # the step's random draws (``draw_noise``), made for the whole global batch before it is sharded
    noise: torch.Tensor | None = None
    input_noise: torch.Tensor | None = None
    timesteps: torch.Tensor | None = None

    FIELDS = ("latents", "cond", "weights", "mask", "noise", "input_noise", "timesteps")

    def _map(self, fn) -> Batch:
        return Batch(**{k: tree_map(fn, getattr(self, k)) for k in self.FIELDS})

    def to(self, device) -> Batch:
        return self._map(lambda t: t.to(device))

    def with_noise(self, generator: torch.Generator, t: TrainConfig, objective) -> Batch:
        """This batch with its noise and timesteps drawn (``draw_noise``, with the ``train`` settings ``t``)."""
        noise, input_noise, timesteps = draw_noise(self.latents, generator, t, objective)
        return Batch(self.latents, self.cond, self.weights, self.mask, noise, input_noise, timesteps)

    def shard(self, rank: int, world: int) -> Batch:
        """This rank's contiguous slice of a global batch, its loss weights times ``world``.

        DistributedDataParallel averages the ranks' gradients, so with the weights scaled the update is
        the gradient of the whole global batch's weighted loss: N processes train as one process with
        the N times larger batch. A rank left with no sample (a global batch smaller than the world)
        gets the first one at weight 0, so every rank still runs the step the others run.
        """
        if world == 1:
            return self
        n = len(self.latents)
        rows = rows_of(n, rank, world)
        part = self._map(lambda t: t[rows.start : rows.stop])
        has_rows = rank * n // world < (rank + 1) * n // world  # else row 0 stands in, at weight 0
        part.weights = part.weights * world if has_rows else torch.zeros_like(part.weights)
        return part


def rows_of(n: int, rank: int, world: int) -> range:
    """The rows of a global batch of ``n`` that ``Batch.shard`` gives this rank (row 0 when it has none)."""
    start, stop = rank * n // world, (rank + 1) * n // world
    return range(start, stop) if stop > start else range(0, 1)


def take(rows, index: torch.Tensor, keep: range | None = None) -> torch.Tensor:
    """``rows[index]`` stacked, from a tensor or from the cache (tuner/training/cache.py); with ``keep`` only
    those positions are read and the others are zeros: another rank's rows, which ``Batch.shard`` drops."""
    if isinstance(rows, torch.Tensor):
        return rows[index]
    ids = index.tolist()
    read = {k: rows[ids[k]] for k in (range(len(ids)) if keep is None else keep)}
    first = next(iter(read.values()))
    out = torch.zeros((len(ids), *first.shape), dtype=first.dtype)
    for k, row in read.items():
        out[k] = row
    return out


def control_shapes(cond: Cond) -> dict[str, tuple]:
    """The shapes of a batch's references (``cond["control_k"]``), per sample; empty for plain samples."""
    if not isinstance(cond, dict):
        return {}
    return {k: tuple(v.shape[1:]) for k, v in cond.items() if k.startswith("control_")}


def merge_by_shape(parts: list[Batch]) -> list[Batch]:
    """Batches of the same latent size (and the same references' shapes) joined into one (one denoiser call each)."""
    merged: list[Batch] = []
    for part in parts:
        shapes = part.latents.shape[1:], control_shapes(part.cond)
        same = next((m for m in merged if (m.latents.shape[1:], control_shapes(m.cond)) == shapes), None)
        if same is None:
            merged.append(part)
            continue
        i = merged.index(same)
        merged[i] = Batch(**{k: tree_cat([getattr(same, k), getattr(part, k)]) for k in Batch.FIELDS})
    return merged


@dataclass
class LatentCache:
    """Posterior mean and std of each image; a training latent is a fresh sample of it, scaled.

    ``mean`` and ``std`` are (N, C, h, w) tensors, lists of per-image tensors when images come in several
    sizes (aspect-ratio buckets), or columns of the cache, read when a batch draws them.
    """

    mean: torch.Tensor | list[torch.Tensor] | Column
    std: torch.Tensor | list[torch.Tensor] | Column
    scaling_factor: float | torch.Tensor  # a float, or per channel (C, 1, 1): ``Family.latent_normalization``
    shift_factor: float | torch.Tensor = 0.0  # the VAE's (Flux, SD3): latents are (sample - shift) * scale

    def sample(self, index: torch.Tensor, generator: torch.Generator | None = None, keep: range | None = None):
        """Latents of the images at ``index``; with ``keep``, only those rows are read (see ``take``)."""
        mean, std = take(self.mean, index, keep), take(self.std, index, keep)
        eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        shift, scale = self.shift_factor, self.scaling_factor
        if isinstance(scale, torch.Tensor):
            shift, scale = torch.as_tensor(shift).to(mean), scale.to(mean)
        return (mean + std * eps - shift) * scale

    def shape(self, i: int) -> tuple[int, ...]:
        return self.mean.shape(i) if isinstance(self.mean, Column) else tuple(self.mean[i].shape)

    def items(self) -> list[dict[str, torch.Tensor]]:
        """Per image: {"mean", "std"} (to store, see tuner/training/cache.py)."""
        return [{"mean": self.mean[i], "std": self.std[i]} for i in range(len(self))]

    def __len__(self) -> int:
        return len(self.mean)


@dataclass
class ControlLatents:
    """The reference latents of a set's samples (an edit family's): each the posterior MEAN of a prepared control,
    as the pipelines encode references (``sample_mode="argmax"``), normalised as the target latents are.

    ``mean`` holds each distinct control once (a cache column, or tensors); ``rows[i]`` lists sample i's controls'
    positions in it, in order (empty for a plain text-to-image sample).
    """

    mean: list[torch.Tensor] | Column
    rows: list[list[int]]
    scaling_factor: float | torch.Tensor
    shift_factor: float | torch.Tensor = 0.0

    def shapes(self, i: int) -> tuple[tuple[int, ...], ...]:
        """Sample i's references' shapes (they join its bucket: a batch shares them)."""
        get = self.mean.shape if isinstance(self.mean, Column) else lambda j: tuple(self.mean[j].shape)
        return tuple(get(j) for j in self.rows[i])

    def take(self, index: torch.Tensor, keep: range | None = None) -> dict[str, torch.Tensor]:
        """``{"control_k": latents}`` of the samples at ``index`` (which share their references' count and shapes)."""
        picked = [self.rows[i] for i in index.tolist()]
        out = {}
        for k in range(len(picked[0])):
            mean = take(self.mean, torch.tensor([row[k] for row in picked]), keep)
            shift, scale = self.shift_factor, self.scaling_factor
            if isinstance(scale, torch.Tensor):
                shift, scale = torch.as_tensor(shift).to(mean), scale.to(mean)
            out[f"control_{k}"] = (mean - shift) * scale
        return out

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class Captions:
    """The distinct captions of a training run and what a batch gets for them.

    ``rows`` holds each caption's prompt embeddings, or its token ids when the text encoder runs in
    the step. Caption dropout swaps a caption for the empty one (the last row) with probability
    ``dropout``; tag shuffling reorders a caption's comma-separated tags after the first ``keep``,
    which needs the text encoder in the step (``tokenize`` turns the new texts into ids). Where a prompt's
    embeddings depend on its references too (``References.in_prompt``), each row's empty caption is a row of its
    own, with the same references: ``empty[row]``.
    """

    texts: list[str]
    rows: Cond
    dropout: float = 0.0
    shuffle: bool = False
    keep: int = 1
    tokenize: Callable[[list[str]], torch.Tensor] | None = None
    empty: torch.Tensor | None = None  # per row: its empty caption's row; None: the last row

    def lookup(self, index: torch.Tensor, generator: torch.Generator, keep: range | None = None) -> Cond:
        if self.dropout:
            dropped = torch.rand(len(index), generator=generator) < self.dropout
            empty = torch.full_like(index, len(self.texts) - 1) if self.empty is None else self.empty[index]
            index = torch.where(dropped, empty, index)
        if not self.shuffle:
            return tree_map(lambda rows: take(rows, index, keep), self.rows)
        return self.tokenize([self._shuffled(self.texts[i], generator) for i in index.tolist()])

    def _shuffled(self, text: str, generator: torch.Generator) -> str:
        tags = [t.strip() for t in text.split(",") if t.strip()]
        kept, rest = tags[: self.keep], tags[self.keep :]
        return ", ".join(kept + [rest[i] for i in torch.randperm(len(rest), generator=generator).tolist()])


@dataclass
class SampleSet:
    """One set of training images (instance, or class images for the prior) and how it is drawn."""

    latents: LatentCache
    # per distinct caption: its conditioning or token ids (one row each), or a ``Captions``
    cond: Cond | Captions
    # per image: the index of its caption in ``cond``
    caption: torch.Tensor
    # the set's share of the loss: its samples' mean loss is multiplied by it
    weight: float = 1.0
    # per image: (1, h, w) loss mask at latent resolution (a tensor, or a list when sizes differ); None: none
    mask: torch.Tensor | list[torch.Tensor] | None = None
    # per image: times it appears per epoch (None: once) and its own loss weight (None: 1)
    repeats: list[int] | None = None
    image_weight: torch.Tensor | None = None
    sampler: BucketSampler | None = None
    # per image: conditioning of its own, joined to its caption's (SDXL's sizes and crop); None: none
    image_cond: dict[str, torch.Tensor] | None = None
    # an edit family's pairs: each image's references' latents (``cond["control_k"]``); None: none
    controls: ControlLatents | None = None

    def __post_init__(self):
        if self.sampler is None:  # batches group images of one latent size: the aspect-ratio bucket
            n = len(self.latents)
            shapes = [self.latents.shape(i) for i in range(n)]
            if self.controls is not None:  # and of the same references: their count and shapes
                shapes = [(shape, self.controls.shapes(i)) for i, shape in enumerate(shapes)]
            self.sampler = BucketSampler(shapes, self.repeats or [1] * n)


def draw_batch(
    sets: list[SampleSet], batch_size: int, generator: torch.Generator, rank: int = 0, world: int = 1
) -> list[Batch]:
    """The next ``batch_size`` images of each set's epoch: one ``Batch`` per set, instance first.

    Each set draws from its own shuffled epochs, one bucket per batch, so every image appears once
    per repeat. A sample's loss weight is its set's weight times its own over the batch it came in,
    so the loss is ``mean(instance losses) + prior_weight * mean(class losses)``, DreamBooth's
    prior-preserving loss. With several processes ``batch_size`` is the global batch (every rank draws
    the same, then trains on its slice, ``rank`` of ``world``: only that slice's latents and captions are
    read from the cache); ``merge_by_shape`` joins sets of one size for one U-Net call.
    """
    parts = []
    with_masks = any(s.mask is not None for s in sets)
    for s in sets:
        pick = torch.tensor(s.sampler.next(generator, batch_size))
        keep = rows_of(len(pick), rank, world) if world > 1 else None
        latents = s.latents.sample(pick, generator, keep)
        weights = torch.full((len(pick),), s.weight / len(pick))
        if s.image_weight is not None:
            weights = weights * s.image_weight[pick]
        mask = None
        if with_masks:  # a set without masks counts everywhere
            mask = torch.ones_like(latents[:, :1]) if s.mask is None else take(s.mask, pick, keep)
        index = s.caption[pick]
        if isinstance(s.cond, Captions):
            cond = s.cond.lookup(index, generator, keep)
        else:
            cond = tree_map(lambda rows, index=index, keep=keep: take(rows, index, keep), s.cond)
        if s.image_cond is not None:
            cond = {**cond, **{k: v[pick] for k, v in s.image_cond.items()}}
        if s.controls is not None:
            cond = {**cond, **s.controls.take(pick, keep)}
        parts.append(Batch(latents, cond, weights, mask))
    return parts


ENCODE_PIXELS = 512 * 512  # pixels the VAE encodes at once: one 512 px image, 4 at 256, at most 64


def encode_batch(height: int, width: int) -> int:
    """How many images of this size the VAE encodes at once: its activations grow with the pixels (0.7 GB for
    one 512 px image in fp32, 2.7 GB at 1024 px), so images of 512 px and more go alone, which keeps a small
    GPU's encode phase small (see tools/bench_memory.py)."""
    return max(1, min(64, ENCODE_PIXELS // (height * width)))


@torch.no_grad()
def encode_latent_dist(vae, images, batch_size: int | None = None, desc: str | None = None, family=None) -> LatentCache:
    """Encode images in [-1, 1] once; the VAE never runs inside the training loop.

    ``images``: an (N, 3, H, W) tensor, or a list of (3, H, W) tensors of several sizes (encoded in
    batches of one size each, ``batch_size`` or ``encode_batch``'s for the size). ``family``: how its VAE
    encodes and scales (``Family.encode_images``, ``latent_normalization``); the KL VAE's way when None.
    """
    family = family or Family()
    device = next(vae.parameters()).device
    images = list(images)
    by_size: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        by_size.setdefault(tuple(image.shape), []).append(i)
    means, stds = [None] * len(images), [None] * len(images)
    chunks = [
        ids[k : k + n]
        for size, ids in by_size.items()
        for n in [batch_size or encode_batch(*size[-2:])]
        for k in range(0, len(ids), n)
    ]
    for chunk in tqdm(chunks, desc=desc, disable=desc is None, leave=False):
        batch = torch.stack([images[i] for i in chunk]).to(device, vae.dtype)
        mean, std = family.encode_images(vae, batch)
        for i, m, s in zip(chunk, mean.float().cpu(), std.float().cpu()):
            means[i], stds[i] = m, s
    scaling = family.latent_normalization(vae)
    if len(by_size) == 1:  # one size: keep whole tensors
        return LatentCache(torch.stack(means), torch.stack(stds), *scaling)
    return LatentCache(means, stds, *scaling)
