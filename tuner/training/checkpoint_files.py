"""Reading checkpoint folders back: which exist, which are intact, and the newest intact one.

A checkpoint (see ``tuner.training.checkpoints``) is checked without loading it: the header of
``trained.safetensors`` against the file's size (or, saved sharded, torch.distributed.checkpoint's
metadata against its data files' sizes), ``state.pt``'s zip directory and pickle, and ``sha256.json``
(``HASHES``: the sha256 of every file, written with the checkpoint) listing each file that is read. With
``thorough`` (the checkpoint about to be resumed), also ``state.pt``'s checksums and every file's sha256:
bytes altered in place, whatever the format, are found. Nothing damaged is ever deleted here.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from pathlib import Path

import torch

from tuner.errors import ConfigError
from tuner.files import file_sha256, inside, safetensors_header

PATTERN = re.compile(r"step-(\d+)")
# the sha256 of every file of a checkpoint, by its path in the checkpoint folder, written with it
HASHES = "sha256.json"


def _steps(folder: Path) -> list[Path]:
    """Every checkpoint folder in ``folder`` (whole or not), oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if PATTERN.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    return sorted(found, key=lambda p: int(PATTERN.fullmatch(p.name)[1]))


def find(folder: Path) -> list[Path]:
    """The intact checkpoints in ``folder``, oldest first: not the temp folders of an interrupted save, nor
    a checkpoint with a missing, truncated or unreadable file (see ``damage``)."""
    return [p for p in _steps(folder) if damage(p) is None]


def newest_intact(folder: Path) -> Path | None:
    """resume=auto: the newest intact checkpoint in ``folder``, or None when there is none yet (training
    starts at step 0). Damaged ones are skipped, each with a line saying why, and left as they are.

    Raises:
        ConfigError: checkpoints exist but none is intact (starting over would throw their steps away).
    """
    found = _steps(folder)
    if not found:
        print(f"[tuner] resume=auto: no checkpoint in {folder} yet; starting at step 0", flush=True)
        return None
    skipped = []
    for path in reversed(found):
        problem = damage(path, thorough=True)
        if problem is None:
            return path
        why = f"{problem[0].relative_to(path).as_posix()} {problem[1]}"
        skipped.append(f"{path.name} ({why})")
        print(f"[tuner] resume=auto: skipping the damaged checkpoint {path}: {why}", flush=True)
    raise ConfigError(
        f"resume=auto: no intact checkpoint in {folder}: {'; '.join(skipped)}. Restore one from a backup, or start "
        "the run over without resume= in a new output_dir (these are left as they are)"
    )


# bytes per element of the safetensors dtypes
# what every state.pt holds (``ema`` and ``scaler`` may be None)
# the folder of a checkpoint saved sharded (distributed.strategy=fsdp), in place of trained.safetensors
SHARDED = "sharded"
_STATE_KEYS = ("step", "optimizer", "lr_scheduler", "generator", "ranks", "losses", "data")


def state_header(path: Path, thorough: bool = False) -> dict:
    """``state.pt`` read without its tensors' data (memory-mapped): the zip's directory and the pickle checked;
    ``thorough``: every byte too, against the checksums torch.save wrote (one read of the file).

    Raises:
        ValueError: the file is empty, truncated, altered, not a torch file, or not a tuner checkpoint's state.
    """
    size = path.stat().st_size
    if size == 0:
        raise ValueError("is empty (0 bytes)")
    try:
        with zipfile.ZipFile(path) as z:  # the directory sits at the end: a truncated file has none
            for info in z.infolist():
                if info.header_offset + info.compress_size > size:
                    raise ValueError(f"is truncated ({size:,} bytes)")
            bad = z.testzip() if thorough else None
        if bad is not None:
            raise ValueError(f"is damaged (its record {bad} fails its checksum)")
    except (zipfile.BadZipFile, OSError, EOFError):
        raise ValueError(f"is truncated or not a torch file ({size:,} bytes, no readable zip directory)") from None
    try:
        state = torch.load(path, weights_only=True, mmap=True, map_location="cpu")
    except Exception as e:  # any unpickling error: the file is damaged
        raise ValueError(f"is damaged (torch.load: {str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    missing = [k for k in _STATE_KEYS if k not in state] if isinstance(state, dict) else list(_STATE_KEYS)
    if missing:
        raise ValueError(f"is not a tuner checkpoint's state (it lacks {', '.join(missing)})")
    return state


class _MetadataUnpickler(pickle.Unpickler):
    """torch.distributed.checkpoint's ``.metadata`` is a pickle: only its own record classes, shapes, dtypes and
    paths are let through, so a planted file cannot run code when a checkpoint folder is listed or read."""

    MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
    NAMES = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}

    def find_class(self, module: str, name: str):
        import torch

        if (module, name) == ("builtins", "getattr"):  # Python before 3.11.5 pickles an enum member so
            return _enum_member
        allowed = module in self.MODULES or (module, name) in self.NAMES
        allowed = allowed or (module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout)))
        allowed = allowed or (module == "pathlib" and name in ("PosixPath", "PurePosixPath", "WindowsPath"))
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")
        return super().find_class(module, name)


def _enum_member(cls, name: str):
    """``getattr(cls, name)`` as an older Python's pickle of an enum member asks for it, for an enum class the
    unpickler let through and one of its members only (never an attribute of anything else)."""
    import enum

    if not (isinstance(cls, type) and issubclass(cls, enum.Enum) and isinstance(name, str) and name in cls.__members__):
        raise pickle.UnpicklingError(f"getattr({cls!r}, {name!r}) is not an enum member of a checkpoint's metadata")
    return cls.__members__[name]


def read_sharded_metadata(folder: Path):
    """The ``.metadata`` of a sharded checkpoint, unpickled with only its record classes allowed."""
    with open(folder / ".metadata", "rb") as f:
        return _MetadataUnpickler(f).load()


def sharded_reader(folder: Path):
    """torch.distributed.checkpoint's file reader for ``folder``, reading ``.metadata`` the restricted way."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata = read_sharded_metadata(folder)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader(str(folder))


def sharded_header(folder: Path) -> dict[str, tuple[int, ...]]:
    """A sharded checkpoint's tensors (torch.distributed.checkpoint's ``.metadata``): name -> global shape,
    each of its data files checked to hold the bytes the metadata points into.

    Raises:
        ValueError: the metadata is missing or unreadable, or a data file is missing or too short.
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if not (folder / ".metadata").is_file():
        raise ValueError("has no .metadata (an interrupted save)")
    try:
        metadata = read_sharded_metadata(folder)
    except Exception as e:  # an unpickling error of any kind, a class not allowed
        raise ValueError(f"has an unreadable .metadata ({type(e).__name__}: {e})") from None
    ends: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in ends.items():
        try:  # torch reads the files the metadata names: only plain names in this folder, no link
            file = inside(folder, name, folder / ".metadata")
            if "/" in name:
                raise ConfigError(name)
        except ConfigError:
            raise ValueError(f"names a data file {name!r} that is not a plain file name in its folder") from None
        if not file.is_file():
            raise ValueError(f"lacks its data file {name}")
        if file.stat().st_size < end:
            raise ValueError(f"has a truncated data file {name} ({file.stat().st_size:,} bytes of {end:,})")
    return {
        k: tuple(int(d) for d in v.size)
        for k, v in metadata.state_dict_metadata.items()
        if isinstance(v, TensorStorageMetadata)
    }


def damage(path: Path, thorough: bool = False) -> tuple[Path, str] | None:
    """Why checkpoint ``path`` cannot be resumed from, as (file, reason), or None when it is intact.

    Cheap: the safetensors header against the file's size, ``state.pt``'s zip directory and pickle (its
    tensors memory-mapped, not read), ``sha256.json`` listing every file read. ``thorough`` (the checkpoint
    about to be resumed) also reads ``state.pt`` against its checksums and every file against its sha256.
    """
    if (path / SHARDED).is_dir():  # distributed.strategy=fsdp
        try:
            sharded_header(path / SHARDED)
        except ValueError as e:
            return path / SHARDED, str(e)
        except OSError as e:
            return path / SHARDED, f"cannot be read ({e.strerror or e})"
    for name, read in (("trained.safetensors", safetensors_header), ("state.pt", state_header)):
        file = path / name
        if name == "trained.safetensors" and (path / SHARDED).is_dir():
            continue
        if not file.is_file():
            return file, "is missing"
        try:
            read(file, thorough) if name == "state.pt" else read(file)
        except ValueError as e:
            return file, str(e)
        except OSError as e:
            return file, f"cannot be read ({e.strerror or e})"
    return hash_damage(path, thorough)


def _read_files(path: Path) -> list[Path]:
    """The files of checkpoint ``path`` that resuming reads (config.yaml only when there: it is optional)."""
    files = [path / "state.pt", *([path / "config.yaml"] if (path / "config.yaml").is_file() else [])]
    if (path / SHARDED).is_dir():
        return files + sorted(p for p in (path / SHARDED).rglob("*") if p.is_file())
    return [*files, path / "trained.safetensors"]


def write_hashes(path: Path) -> None:
    """Write ``sha256.json`` into the checkpoint folder ``path`` (still its temp folder: it is renamed into place
    with the files it lists)."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != HASHES)
    hashes = {p.relative_to(path).as_posix(): file_sha256(p) for p in files}
    (path / HASHES).write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")


def hash_damage(path: Path, thorough: bool = True) -> tuple[Path, str] | None:
    """A file of checkpoint ``path`` that ``sha256.json`` does not list or (``thorough``) whose bytes differ
    from the sha256 saved with it, as (file, reason); None when every file read is as it was saved."""
    listing = path / HASHES
    if not listing.is_file():
        return listing, "is missing (the sha256 of its files, saved with every checkpoint)"
    try:
        hashes = json.loads(listing.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        hashes = None
    if not isinstance(hashes, dict) or not all(isinstance(v, str) for v in hashes.values()):
        return listing, "is damaged (it does not parse)"
    for file in _read_files(path):
        name = file.relative_to(path).as_posix()
        if name not in hashes:
            return file, f"is not listed in {HASHES} (not saved with the checkpoint)"
        try:
            if thorough and file_sha256(file) != hashes[name]:
                return file, f"is damaged: its sha256 differs from the one saved with the checkpoint ({HASHES})"
        except OSError as e:
            return file, f"cannot be read ({e.strerror or e})"
    return None


def step_number(path: Path) -> int:
    """The step of checkpoint folder ``path`` (``step-NNNNNNN``)."""
    return int(PATTERN.fullmatch(path.name)[1])
