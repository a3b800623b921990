"""Frozen outputs (image latents, prompt embeddings) computed once per run, shared through a folder.

With several processes each rank computes its share of the items (rank r takes items r, r+N, ...),
writes them to its own file ``part-R-of-N.safetensors`` (written whole, then renamed), and after a
barrier every rank reads every part: no rank computes another's items and no two ranks write one
file. The folder is named by what the items depend on, so a resumed run (or a rerun on the same
data and model) reads it back instead of computing again.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch

from tuner.distributed import barrier, decide
from tuner.files import write_atomic

PART = re.compile(r"part-(\d+)-of-(\d+)\.safetensors")


def complete_parts(folder: Path) -> list[Path] | None:
    """The part files of one complete write (all N parts of some N), or None."""
    if not folder.is_dir():
        return None
    by_world: dict[int, dict[int, Path]] = {}
    for path in folder.iterdir():
        match = PART.fullmatch(path.name)
        if match:
            by_world.setdefault(int(match[2]), {})[int(match[1])] = path
    for world, parts in sorted(by_world.items()):
        if len(parts) == world:
            return [parts[r] for r in range(world)]
    return None


def shared(
    folder: Path, count: int, compute: Callable[[list[int]], list[dict[str, torch.Tensor]]], accelerator
) -> list[dict[str, torch.Tensor]]:
    """Items ``0 .. count-1``, each a dict of tensors, from ``folder`` or computed by ``compute(indices)``."""
    from safetensors.torch import load_file, save

    parts = decide(accelerator, lambda: complete_parts(folder))
    if parts is None:
        rank, world = accelerator.process_index, accelerator.num_processes
        mine = list(range(rank, count, world))
        tensors = {}
        for i, item in zip(mine, compute(mine) if mine else []):
            tensors.update({f"{i}/{name}": t.contiguous() for name, t in item.items()})
        path = folder / f"part-{rank:03d}-of-{world:03d}.safetensors"
        write_atomic(path, save(tensors, metadata={"count": str(count)}))
        barrier(accelerator)
        parts = [folder / f"part-{r:03d}-of-{world:03d}.safetensors" for r in range(world)]
    items: list[dict[str, torch.Tensor]] = [{} for _ in range(count)]
    for part in parts:
        for key, tensor in load_file(part).items():
            i, name = key.split("/", 1)
            items[int(i)][name] = tensor
    if any(not item for item in items):
        raise RuntimeError(f"{folder}: the cache misses items; delete the folder to compute them again")
    return items
