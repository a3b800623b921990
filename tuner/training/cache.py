"""Frozen outputs (image latents, caption embeddings) in one content-addressed store, shared by runs and ranks.

Where: ``cache.dir``, by default ``$TUNER_HOME/cache`` (a filesystem every machine mounts, for several).
One folder per encoder: ``latents-<VAE fingerprint>``, ``prompts-<text encoders fingerprint>`` (their
weights, dtype and settings, ``fingerprint``). In it, shards: safetensors files of many entries, each entry
named by the hash of its input (an image's standardized bytes, crop and size; a caption's text), so a
second run on the same images encodes nothing, wherever its run folder is, and one changed image encodes
only itself.

A shard is written whole and renamed into place, and named by the entries it holds, so runs writing the
same entries at once write the same file: a reader sees a whole shard or none. Its header keeps each entry's
sha256; a run checks the entries it uses once, and an entry that fails its hash (or a shard that cannot be
read) is encoded again, never a crash. ``cache.max_gb`` evicts the least recently used shards.

The training process holds an index (entry -> file, offset), not the data: a batch reads its entries from
the files (``Entries``), each rank only the rows of its own slice.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tuner.distributed import barrier, decide
from tuner.errors import ConfigError
from tuner.files import write_atomic

SHARD = re.compile(r"[0-9a-f]{32}\.safetensors")
STORE = re.compile(r"(latents|prompts)-[0-9a-f]{32}")  # one encoder's folder (``fingerprint``)
MARKER = "tuner-cache.json"  # in ``cache.dir``: tuner made this folder its cache
SHARD_BYTES = 256 * 2**20  # an encoding process writes a shard each time this much is encoded
ITEMS_AT_ONCE = 64  # items handed to the encoder per call (it batches them further itself)
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def fingerprint(*parts, modules: Iterable[torch.nn.Module] = ()) -> str:
    """A hash of ``parts`` (JSON) and of the modules' weights: every byte of tensors up to 4M values, an even
    sample of 64K values of larger ones (a fine-tune or merge moves all of a matrix's values; hashing T5-XXL's
    9.5 GB whole would take 15 s of every run)."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    for module in modules:
        for name, t in module.state_dict().items():
            if not isinstance(t, torch.Tensor):
                continue
            t = t.detach().reshape(-1)
            digest.update(f"{name}|{t.dtype}|{t.numel()}".encode())
            if t.numel() > 4 * 2**20:
                t = t[:: t.numel() // 2**16]
            digest.update(_bytes(t))
    return digest.hexdigest()[:32]


def _bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def entry_hash(item: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(item):
        digest.update(_bytes(item[name]))
    return digest.hexdigest()


@dataclass(frozen=True)
class Slot:
    """Where one tensor of an entry lies: a shard file, its byte range, dtype and shape."""

    shard: Path
    start: int
    stop: int
    dtype: torch.dtype
    shape: tuple[int, ...]


class NotAShard(ValueError):
    """A file whose header does not show that tuner wrote it: never read as a shard, never deleted."""


def _header(shard: Path) -> tuple[dict, int, int]:
    """A shard's safetensors header with tuner's cache metadata, its length and the file's size.

    Raises:
        NotAShard: the file does not carry tuner's header (someone else's file, or damage before the metadata).
    """
    try:
        size = shard.stat().st_size
        with open(shard, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else size
            if n > size - 8:
                raise NotAShard("no whole safetensors header")
            header = json.loads(f.read(n))
        meta = header.pop("__metadata__", None) or {}
    except (ValueError, UnicodeDecodeError, AttributeError, IsADirectoryError) as e:
        raise NotAShard(f"no safetensors header: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != "tuner-cache":
        raise NotAShard("not a tuner cache shard")
    return header | {"__metadata__": meta}, n, size


def is_shard(path: Path) -> bool:
    """Whether ``path`` is a plain file (no link) carrying a tuner cache shard's header: only such files are ever
    deleted from the cache."""
    if not (path.is_file() and not path.is_symlink() and SHARD.fullmatch(path.name)):
        return False
    try:
        _header(path)
    except (NotAShard, OSError):
        return False
    return True


def read_index(shard: Path) -> tuple[dict[str, dict[str, Slot]], dict[str, str]]:
    """A shard's entries (key -> name -> Slot) and their hashes, from its header.

    Raises:
        NotAShard: the file does not carry tuner's header.
        ValueError, KeyError: it does, and it is damaged (tuner wrote it: it may be removed).
    """
    header, n, size = _header(shard)
    meta = header.pop("__metadata__")
    hashes = json.loads(meta["hashes"])
    entries: dict[str, dict[str, Slot]] = {}
    for full, info in header.items():
        key, name = full.split("/", 1)
        start, stop = info["data_offsets"]
        if 8 + n + stop > size:
            raise ValueError("truncated")
        slot = Slot(shard, 8 + n + start, 8 + n + stop, DTYPES[info["dtype"]], tuple(info["shape"]))
        entries.setdefault(key, {})[name] = slot
    if set(entries) != set(hashes):
        raise ValueError("entries and hashes disagree")
    return entries, hashes


class Entries:
    """Read access to stored entries, in the order of the keys asked for: ``entries[i]`` is item i's tensors,
    read from its shard when asked (file reads, nothing mapped into the process)."""

    def __init__(self, slots: list[dict[str, Slot]]):
        self.slots = slots
        self._files: dict[Path, int] = {}
        for shard in self.shards:  # open now: a shard another run evicts later stays readable here
            self._files[shard] = os.open(shard, os.O_RDONLY)

    @property
    def shards(self) -> set[Path]:
        return {slot.shard for slots in self.slots for slot in slots.values()}

    def __len__(self) -> int:
        return len(self.slots)

    def shape(self, i: int, name: str) -> tuple[int, ...]:
        return self.slots[i][name].shape

    def read(self, slot: Slot) -> torch.Tensor:
        fd = self._files.get(slot.shard)
        if fd is None:
            fd = self._files[slot.shard] = os.open(slot.shard, os.O_RDONLY)
        data = bytearray(os.pread(fd, slot.stop - slot.start, slot.start))
        if not data:
            return torch.empty(slot.shape, dtype=slot.dtype)
        return torch.frombuffer(data, dtype=slot.dtype).reshape(slot.shape)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {name: self.read(slot) for name, slot in self.slots[i].items()}

    def column(self, name: str) -> Column:
        return Column(self, name)

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()

    def __del__(self):
        self.close()


@dataclass
class Column:
    """One named tensor of every entry (``column[i]``, ``column[index_tensor]`` stacked), read when indexed."""

    entries: Entries
    name: str

    def __len__(self) -> int:
        return len(self.entries)

    def shape(self, i: int) -> tuple[int, ...]:
        return self.entries.shape(i, self.name)

    def __getitem__(self, i):
        if isinstance(i, torch.Tensor) and i.ndim:
            return torch.stack([self[j] for j in i.tolist()])
        return self.entries.read(self.entries.slots[int(i)][self.name])


class Store:
    """One encoder's folder of shards (``root/name``)."""

    def __init__(self, root: Path, name: str):
        self.root, self.dir = Path(root), Path(root) / name

    def shards(self) -> list[Path]:
        if not self.dir.is_dir() or self.dir.is_symlink():
            return []
        return sorted(p for p in self.dir.iterdir() if SHARD.fullmatch(p.name) and p.is_file() and not p.is_symlink())

    def index(self) -> dict[str, tuple[dict[str, Slot], str]]:
        """Every readable entry: key -> (its slots, its hash). Damaged shards are removed when their header shows
        tuner wrote them; a file without it is left as it is and not read."""
        found: dict[str, tuple[dict[str, Slot], str]] = {}
        for shard in self.shards():
            try:
                entries, hashes = read_index(shard)
            except NotAShard as e:
                print(f"[tuner] cache: {shard} is not a shard tuner can read ({e}); left as it is", flush=True)
                continue
            except (ValueError, KeyError, json.JSONDecodeError, UnicodeDecodeError) as e:
                print(f"[tuner] cache: {shard} is damaged ({e}); removed, its entries are encoded again", flush=True)
                shard.unlink(missing_ok=True)
                continue
            except FileNotFoundError:  # evicted by another run meanwhile
                continue
            for key, slots in entries.items():
                found[key] = (slots, hashes[key])
        return found

    def check(self, keys: list[str], desc: str | None = None) -> list[int]:
        """The positions of the keys with no sound entry: missing, or failing their hash (then removed)."""
        index, missing, bad = self.index(), [], set()
        reader = Entries([])
        try:
            for i, key in enumerate(tqdm(keys, desc=desc, disable=desc is None or not keys, leave=False)):
                if key not in index:
                    missing.append(i)
                    continue
                slots, expected = index[key]
                item = {name: reader.read(slot) for name, slot in slots.items()}
                if entry_hash(item) != expected:
                    bad.add(next(iter(slots.values())).shard)
                    missing.append(i)
        finally:
            reader.close()
        for shard in bad:
            print(f"[tuner] cache: {shard} holds entries that fail their hash; removed, encoded again", flush=True)
            shard.unlink(missing_ok=True)
        if bad:  # the removed shards' other entries are needed again too
            have = self.index()
            missing = sorted({*missing, *(i for i, k in enumerate(keys) if k not in have)})
        return missing

    def open(self, keys: list[str]) -> Entries:
        index = self.index()
        lost = [k for k in keys if k not in index]
        if lost:
            raise RuntimeError(f"{self.dir}: {len(lost)} cache entries vanished while the run read them (evicted?)")
        entries = Entries([index[k][0] for k in keys])
        for shard in entries.shards:  # used now: the last to be evicted
            try:
                os.utime(shard)
            except OSError:  # a cache on a read-only mount
                pass
        return entries

    def write(self, items: dict[str, dict[str, torch.Tensor]]) -> Path:
        """One shard of these entries, written whole and renamed; named by its keys, so equal writes are equal."""
        from safetensors.torch import save

        tensors = {f"{k}/{name}": t.contiguous() for k, item in items.items() for name, t in item.items()}
        hashes = {k: entry_hash(item) for k, item in items.items()}
        name = hashlib.sha256("\n".join(sorted(items)).encode()).hexdigest()[:32]
        path = self.dir / f"{name}.safetensors"
        mark_cache_dir(self.root)  # later runs know the folder for tuner's cache (check_cache_dir)
        write_atomic(path, save(tensors, metadata={"format": "tuner-cache", "hashes": json.dumps(hashes)}))
        return path


def evict(root: Path, max_gb: float, keep: set[Path]) -> list[Path]:
    """Remove the least recently used shards under ``root`` until they hold at most ``max_gb`` (never ``keep``,
    the shards the run has open). Only files that carry a shard's header in an encoder's folder count: anything
    else in the cache folder is neither counted nor deleted."""
    folders = [f for f in Path(root).iterdir() if STORE.fullmatch(f.name) and f.is_dir() and not f.is_symlink()]
    shards = [p for f in folders for p in Store(root, f.name).shards() if is_shard(p)]
    stats = {}
    for p in shards:
        try:
            stats[p] = p.stat()
        except FileNotFoundError:
            pass
    total = sum(s.st_size for s in stats.values())
    removed = []
    for p in sorted(stats, key=lambda p: stats[p].st_mtime):
        if total <= max_gb * 2**30:
            break
        if p in keep:
            continue
        p.unlink(missing_ok=True)
        total -= stats[p].st_size
        removed.append(p)
    return removed


def check_cache_dir(root: Path, key: str) -> None:
    """Refuse a cache folder tuner did not make: it must be new, empty, hold tuner's marker (``MARKER``), or hold
    only encoders' folders (a cache from before the marker). Eviction deletes in it.

    Raises:
        ConfigError: naming ``key`` and what the folder holds.
    """
    if not root.exists():
        return
    if not root.is_dir():
        raise ConfigError(f"{key}: {root} is a file; give a folder for the cache (new, empty, or tuner's cache)")
    names = sorted(p.name for p in root.iterdir())
    if (root / MARKER).is_file() or all(STORE.fullmatch(n) for n in names):
        return
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    raise ConfigError(
        f"{key}: {root} holds files tuner did not write ({shown}) and is not a tuner cache (no {MARKER}); tuner "
        "deletes old entries in its cache: give a new or empty folder, or tuner's own cache"
    )


def mark_cache_dir(root: Path) -> None:
    """Make ``root`` tuner's cache folder: its marker says so to later runs (``check_cache_dir``)."""
    if not (root / MARKER).is_file():
        write_atomic(root / MARKER, json.dumps({"tuner": "cache", "stores": STORE.pattern}, indent=2))


def cached(
    store: Store,
    keys: list[str],
    compute: Callable[[list[int]], list[dict[str, torch.Tensor]]],
    accelerator,
    desc: str,
) -> tuple[Entries, int]:
    """Items ``0 .. len(keys)-1`` from the store, encoding (``compute(positions)``) only the missing ones.

    Rank 0 checks which are missing; each rank encodes its share of those (positions r, r+N, ...), writing a
    shard every ``SHARD_BYTES``; then every rank opens the index. Returns the entries and how many were encoded.
    """
    main = accelerator.is_main_process
    missing = decide(accelerator, lambda: store.check(keys, f"check {desc}" if main else None))
    mine = missing[accelerator.process_index :: accelerator.num_processes]
    pending: dict[str, dict[str, torch.Tensor]] = {}
    size = 0
    with tqdm(total=len(missing), desc=f"encode {desc}", disable=not main or not missing, leave=False) as bar:
        for start in range(0, len(mine), ITEMS_AT_ONCE):
            chunk = mine[start : start + ITEMS_AT_ONCE]
            for i, item in zip(chunk, compute(chunk)):
                pending[keys[i]] = item
                size += sum(t.numel() * t.element_size() for t in item.values())
            if size >= SHARD_BYTES:
                store.write(pending)
                pending, size = {}, 0
            bar.update(min(len(chunk) * accelerator.num_processes, bar.total - bar.n))  # every rank's share
        if pending:
            store.write(pending)
    barrier(accelerator)
    return store.open(keys), len(missing)
