"""Low-rank arithmetic on weight differences, the LoRA toolbox's mathematics (recipes lora_merge, lora_extract,
lora_resize): a module's LoRA as its two factors, LoRAs added exactly by stacking their ranks, a difference
of weights or a LoRA cut to a lower rank by its singular values, and the energy each cut keeps.

A ``Factors`` is one module's LoRA at scale 1: ``delta = up @ down`` (a convolution's down is a kernel
``(rank, in, k, k)`` and its up a 1x1 kernel ``(out, rank, 1, 1)``, as peft and kohya hold them). Energy is the
share of the squared Frobenius norm of the difference that a cut keeps: the sum of the kept squared singular
values over the sum of all of them, so a cut's error is ``sqrt(1 - energy) * ||delta||``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Factors:
    """One module's LoRA with its scale folded into ``up``: ``delta = up @ down``."""

    down: torch.Tensor  # (rank, in) or (rank, in, k, k)
    up: torch.Tensor  # (out, rank) or (out, rank, 1, 1)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> torch.Tensor:
        """The weight difference it adds, shaped as the module's weight."""
        flat = self.up.flatten(1) @ self.down.flatten(1)
        return flat.reshape(self.up.shape[0], *self.down.shape[1:])


@dataclass
class Cut:
    """A truncation: the factors kept, and what the cut kept and lost of the difference."""

    factors: Factors
    rank_before: int  # the rank of the difference (at most min(out, in * k * k))
    energy: float  # share of the squared Frobenius norm kept
    error: float  # ||delta - kept||_F
    norm: float  # ||delta||_F


def scaled(down: torch.Tensor, up: torch.Tensor, scale: float) -> Factors:
    """A LoRA's halves at scale ``scale`` (alpha / rank) as factors at scale 1."""
    return Factors(down.detach().float(), up.detach().float() * scale)


def stack(parts: list[tuple[Factors, float]]) -> Factors:
    """LoRAs on one module, each times its weight, as one LoRA whose difference is exactly their weighted sum:
    the downs stacked, the ups (times their weights) side by side; the rank is the sum of the ranks."""
    shapes = {_delta_shape(f) for f, _ in parts}
    if len(shapes) > 1:
        raise ValueError(f"LoRAs of different shapes on one module: {sorted(shapes)}")
    return Factors(torch.cat([f.down for f, _ in parts]), torch.cat([f.up * w for f, w in parts], dim=1))


def _delta_shape(f: Factors) -> tuple[int, ...]:
    return (f.up.shape[0], *f.down.shape[1:])


def singular_values(f: Factors) -> torch.Tensor:
    """The singular values of ``f.delta()`` from the factors alone (two QRs and an SVD of a rank x rank core)."""
    return _factored_svd(f)[1]


def _factored_svd(f: Factors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vh of ``up @ down`` (flattened) without forming it: up = Qu Ru, down^T = Qd Rd, so
    up @ down = Qu (Ru Rd^T) Qd^T and the small core's SVD gives the rest."""
    up, down = f.up.flatten(1).double(), f.down.flatten(1).double()
    qu, ru = torch.linalg.qr(up)
    qd, rd = torch.linalg.qr(down.T)
    u, s, vh = torch.linalg.svd(ru @ rd.T, full_matrices=False)
    return qu @ u, s, vh @ qd.T


def _rank_for(s: torch.Tensor, rank: int | None, energy: float | None) -> int:
    """The rank a cut keeps: ``rank``, or the fewest singular values keeping ``energy`` of the squared norm
    (never more than ``rank`` when both are given); at least 1 and at most the number of values."""
    count = len(s)
    if energy is not None:
        power = s.double() ** 2
        total = float(power.sum())
        share = torch.cumsum(power, 0) / total if total > 0 else torch.ones_like(power)
        needed = int(torch.searchsorted(share, torch.tensor(energy, dtype=share.dtype) - 1e-12)) + 1
        count = min(count, needed)
    if rank is not None:
        count = min(count, rank)
    return max(1, count)


def _cut(u, s, vh, rank: int | None, energy: float | None, shape, kernel, total: float | None = None) -> Cut:
    """Keep the leading singular triplets; ``total``: the difference's squared norm, when ``s`` holds only the
    leading values (a randomized SVD), else their sum of squares."""
    r = _rank_for(s, rank, energy)
    power = s.double() ** 2
    complete = total is None
    total = float(power.sum()) if complete else total
    kept = float(power[:r].sum())
    root = s[:r].sqrt()  # the singular values split evenly between the halves: neither half dwarfs the other
    up = (u[:, :r] * root).float()
    down = (root[:, None] * vh[:r]).float()
    factors = Factors(down.reshape(r, *shape[1:]), up.reshape(shape[0], r, *([1] * len(kernel))))
    significant = int((s > s[0] * 1e-5).sum()) if len(s) and s[0] > 0 else 0
    return Cut(
        factors,
        # a randomized SVD sees only its leading values: all of them significant, the rank is more (None)
        rank_before=significant if complete or significant < len(s) else None,
        energy=min(kept / total, 1.0) if total > 0 else 1.0,
        error=max(total - kept, 0.0) ** 0.5,
        norm=total**0.5,
    )


def cut_factors(f: Factors, rank: int | None = None, energy: float | None = None) -> Cut:
    """``f`` at a lower rank (``rank``, or by ``energy``): the best approximation of its difference at that rank
    (Eckart-Young), computed from the factors."""
    u, s, vh = _factored_svd(f)
    return _cut(u, s, vh, rank, energy, _delta_shape(f), f.down.shape[2:])


# a randomized SVD looks at this many more directions than it keeps, with this many power iterations
OVERSAMPLE, POWER_ITERATIONS = 16, 4


def cut_delta(delta: torch.Tensor, rank: int | None = None, energy: float | None = None) -> Cut:
    """A weight difference (a linear layer's ``(out, in)`` or a convolution's ``(out, in, k, k)``) as a LoRA of
    ``rank`` (or by ``energy``), by truncated SVD of the difference flattened to ``(out, in * k * k)``.

    At a fixed rank well below the matrix's, a randomized SVD (Halko et al.; ``torch.svd_lowrank``, seeded)
    finds the leading directions at a fraction of a full SVD's cost (30 to 50 times less at SD widths); the
    energy and error it reports are exact for the factors it returns, as the squared norm of the difference is
    computed whole. By energy the whole spectrum is needed: a full SVD.
    """
    flat = delta.detach().flatten(1).float()
    small = min(flat.shape)
    if energy is None and rank is not None and rank + OVERSAMPLE < small // 2:
        with torch.random.fork_rng(devices=[flat.device] if flat.device.type == "cuda" else []):
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(flat, q=rank + OVERSAMPLE, niter=POWER_ITERATIONS)
        total = float(flat.double().pow(2).sum())
        return _cut(u, s, v.T, rank, None, tuple(delta.shape), delta.shape[2:], total)
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    return _cut(u, s, vh, rank, energy, tuple(delta.shape), delta.shape[2:])
