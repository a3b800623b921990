"""Atomic writes: a file or folder appears whole at its final path or not at all; names read from files
confined to their folder; a safetensors file's header read and checked without its data."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from tuner.errors import ConfigError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_error(error: BaseException, path: Path, tmp: Path | None = None) -> OSError | None:
    """A failed write (disk full, no permission, a read-only or missing folder) as an OSError naming ``path``,
    whichever writer failed: Python's own, safetensors' (``I/O error: ... (os error 28)``) or torch.save's.
    A file inside the temp folder ``tmp`` is named by where it was going to be."""
    if isinstance(error, OSError):
        where = Path(error.filename or path)
        if tmp is not None and where.is_relative_to(tmp):
            where = path / where.relative_to(tmp)
        return OSError(error.errno, error.strerror or str(error), str(where))
    text = str(error)
    found = re.search(r"os error (\d+)", text)
    if found:
        return OSError(int(found[1]), os.strerror(int(found[1])), str(path))
    if "PytorchStreamWriter failed" in text or "file write failed" in text:
        return OSError(errno.EIO, "the write failed (is the disk full?)", str(path))
    return None


def write_atomic(path: Path, content: str | bytes | Image.Image) -> Path:
    """Write text, bytes or a PIL image (as PNG) to a temp file beside ``path``, then rename it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(content, Image.Image):
                content.save(f, format="PNG")
            else:
                f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private; give them the usual mode
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        failed = _write_error(e, path)
        if failed is None:
            raise
        raise failed from e
    return path


def _usual_modes(folder: Path) -> None:
    """Files and folders as the user's umask makes them: some writers (safetensors) create files private."""
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def put_in_place(tmp: Path, path: Path) -> None:
    """Rename the finished folder ``tmp`` to ``path`` (modes as the umask makes them); an existing ``path`` is
    renamed aside first and deleted after, so at every moment one whole version sits at ``path`` or beside it."""
    _usual_modes(tmp)
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
        os.replace(path, old / path.name)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temp folder beside ``path``; on success it replaces ``path``, on error it is removed.

    An existing ``path`` is renamed aside before the new folder takes its place and deleted after,
    so at every moment one whole version sits at ``path`` or beside it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        put_in_place(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        failed = _write_error(e, path, tmp)
        if failed is None:
            raise
        raise failed from e


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp file path beside ``path`` for a writer that wants a path; renamed to ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        failed = _write_error(e, path)
        if failed is None:
            raise
        raise failed from e


def inside(folder: Path, name: object, source: Path | str | None = None) -> Path:
    """``folder / name`` for a ``name`` read from the file ``source`` (a manifest, an index; None: a name of
    tuner's own), when it is a plain relative name (no ``..``, ``.``, absolute path, empty part or NUL) that stays
    inside ``folder`` without passing through a link. Tuner reads and deletes by such names, so anything else
    makes ``source`` damaged.

    Raises:
        ConfigError: naming ``source`` (or the link) and the name.
    """
    text = name if isinstance(name, str) else None
    parts = text.split("/") if text else []
    if not parts or "\x00" in text or any(part in ("", ".", "..") for part in parts):
        raise ConfigError(
            f"{source or folder} is damaged: it names {name!r}, not a plain name inside {folder}; tuner reads and "
            "deletes only by such names: restore the file from tuner's own copy or remove it"
        )
    path = Path(folder)
    for part in parts:
        path = path / part
        if path.is_symlink():
            named = f"{source} names {text!r}, and " if source else ""
            raise ConfigError(
                f"{named}{path} is a link: tuner does not follow links out of the folders it writes and deletes "
                "in; put the folder itself there, or remove the link"
            )
    return path


_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2}
_DTYPE_BYTES |= {"U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}


def safetensors_header(path: Path) -> dict:
    """The tensors a safetensors file holds ({name: {dtype, shape, data_offsets}}), read from its header alone.

    Raises:
        ValueError: the file is shorter or longer than its header says, or the header does not parse.
    """
    size = path.stat().st_size
    if size < 8:
        raise ValueError(f"is truncated ({size} bytes, not even a header)")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 100_000_000:  # safetensors' own limit: the first bytes are not a header's length
            raise ValueError("is not a safetensors file (its header does not parse)")
        if n > size - 8:
            raise ValueError(f"is truncated ({size:,} bytes; its header alone says {n + 8:,})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            header = None
    if not isinstance(header, dict):
        raise ValueError("is not a safetensors file (its header does not parse)")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    end = 0
    for name, t in tensors.items():
        try:
            begin, stop = (int(x) for x in t["data_offsets"])
            count = math.prod(int(d) for d in t["shape"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"is not a safetensors file (its header's entry {name!r} does not parse)") from None
        width = _DTYPE_BYTES.get(t.get("dtype"))
        if not 0 <= begin <= stop or (width is not None and stop - begin != count * width):
            raise ValueError(f"is damaged (its header's entry {name!r} is inconsistent)")
        end = max(end, stop)
    if size - 8 - n != end:
        short = size - 8 - n < end
        raise ValueError(f"is {'truncated' if short else 'damaged'} ({size:,} bytes; its header says {8 + n + end:,})")
    return tensors


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read a MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
