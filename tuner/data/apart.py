"""Held-out images (``data.val_dir``) stay apart from the images a run trains on: not the same folder, neither
inside the other, and no file in both by content (sha256). Otherwise the "held-out" loss scores images the
run trains on: a training loss, and checkpoints.select and train.early_stop would judge by it. ``split`` chooses
the images ``data.val_split`` holds out of a set, as training and the pages that show held-out pairs choose them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tuner.errors import ConfigError
from tuner.files import file_sha256

# files a folder source reads beside its images (captions, metadata), not images trained on themselves
_SIDECARS = (".txt", ".caption", ".json", ".jsonl")
_MASK = ".mask.png"


def trained_inputs(d) -> list[tuple[str, str]]:
    """(key, path) of every input the run trains on: the instance and class folders and ``data.sources``."""
    out = [("data.instance_dir", d.instance_dir), ("data.class_dir", d.class_dir)]
    out += [(f"data.sources[{k}].path", x.path) for k, x in enumerate(d.sources)]
    return [(key, path) for key, path in out if path]


def _files(path: Path) -> list[Path]:
    """The files of an input that can be trained on: a file source itself, or a folder's files (not hidden ones,
    captions, metadata or loss masks)."""
    if path.is_file():
        return [path]
    found = []
    for file in sorted(path.rglob("*")):
        hidden = any(part.startswith(".") for part in file.relative_to(path).parts)
        sidecar = file.suffix.lower() in _SIDECARS or file.name.lower().endswith(_MASK)
        if file.is_file() and not hidden and not sidecar:
            found.append(file)
    return found


def _shared(held: list[Path], trained: list[Path]) -> list[tuple[Path, Path]]:
    """(held-out file, trained file) pairs of the same content; only files of a size both sides have are read."""
    sizes = {f.stat().st_size for f in trained}
    candidates = [f for f in held if f.stat().st_size in sizes]
    if not candidates:
        return []
    wanted = {f.stat().st_size for f in candidates}
    by_hash = {}
    for f in trained:
        if f.stat().st_size in wanted:
            by_hash.setdefault(file_sha256(f), f)
    return [(f, by_hash[h]) for f in candidates if (h := file_sha256(f)) in by_hash]


def _nesting(held: Path, path: Path) -> str | None:
    """How the held-out folder sits to a trained input: the same, inside it, holding it, or apart (None)."""
    if path == held:
        return "is"
    if held.is_relative_to(path):
        return "is inside"
    return "holds" if path.is_relative_to(held) else None


def check_apart(d) -> None:
    """``data.val_dir`` shares nothing with what the run trains on (``d``: the data section).

    Raises:
        ConfigError: naming both keys and, for files of the same content, the first such pair.
    """
    if not d.val_dir or not Path(d.val_dir).expanduser().is_dir():
        return
    held = Path(d.val_dir).expanduser().resolve()
    inputs = [(key, value, Path(value).expanduser().resolve()) for key, value in trained_inputs(d)]
    inputs = [(key, value, path) for key, value, path in inputs if path.exists()]
    for key, value, path in inputs:
        how = _nesting(held, path)
        if how:
            raise ConfigError(
                f"data.val_dir={d.val_dir} {how} {key}={value}: the held-out loss would score images the run trains "
                "on (a training loss); give data.val_dir a folder of other images of the subject, apart from "
                f"{key} (or hold some out with data.val_split)"
            )
    files = _files(held)
    for key, value, path in inputs:
        shared = _shared(files, _files(path))
        if shared:
            (a, b), more = shared[0], f" (and {len(shared) - 1} more)" if len(shared) > 1 else ""
            raise ConfigError(
                f"data.val_dir={d.val_dir} and {key}={value} hold the same image: {a} is {b} by content (sha256)"
                f"{more}, so the held-out loss would score images the run trains on; remove them from "
                "data.val_dir (or hold some out with data.val_split instead)"
            )


def split(n: int, share: float, seed: int, what: str) -> tuple[list[int], list[int]]:
    """The images of a set of ``n`` kept for training and those held out (``share`` of them, at least one, chosen
    by ``seed``), each in the set's order.

    Raises:
        ConfigError: the set is too small to keep an image on each side.
    """
    held = max(1, round(share * n))
    if held >= n:
        raise ConfigError(
            f"data.val_split={share}: the {what} set has {n} image(s), too few to hold {held} out and train on the "
            "rest; add images, lower data.val_split, or give held-out images in data.val_dir"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    out = set(order[:held])
    return [i for i in range(n) if i not in out], sorted(out)
