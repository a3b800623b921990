"""Dataset inputs: the ``Source`` a user names and the readers that list its images as ``Item``s.

Kinds: a folder of images with sidecar captions (``photo.jpg`` + ``photo.txt``) and loss masks
(``photo.mask.png``); a folder with ``metadata.jsonl``; kohya-style ``N_concept`` folders; a
``datasets`` dataset saved on disk; a parquet file. A reader never decodes an image: it finds
inputs, their captions and repeats, and rejects what it can tell from names alone.

Edit families (``Family.REFERENCES``) train on pairs: a target and the reference images ("controls") it is edited
from. ``attach_controls`` finds each target's controls in ``data.controls``' folders by relative path without the
extension; ``pairs_items`` reads a jsonl of ``{"target", "controls", "caption"}`` (``data.pairs``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from tuner.data_config import Source

CAPTION_SUFFIXES = (".txt", ".caption")
# photo.jpg's loss mask is photo.mask.png: white where the loss counts, black where it does not
MASK_SUFFIX = ".mask.png"
CAPTION_COLUMNS = ("text", "caption", "prompt")
KOHYA_FOLDER = re.compile(r"^(\d+)_(.*)$")


@dataclass
class Item:
    """One input image, found by a source reader; decoded and standardized by ``process``."""

    name: str  # how the report names it: its path relative to its root, or "row N"
    path: Path | None = None  # the file, for file sources
    data: bytes | None = None  # the bytes, for table sources
    root: Path | None = None  # files must resolve inside it
    caption: str | None = None  # a caption given by the source (metadata, table column)
    caption_path: Path | None = None  # a sidecar caption file
    mask_path: Path | None = None
    repeats: int = 1
    weight: float = 1.0
    default_caption: str | None = None  # the source's own default (kohya folder name, source.caption)
    rejected: str | None = None  # known before reading (hidden file, outside the root, ...)
    # an edit pair's references, in order: each a Control (its file missing when the target has none there)
    controls: list[Control] = field(default_factory=list)


@dataclass
class Control:
    """One reference image of a target: where it should be, and how the report names it."""

    name: str  # "data.controls[0]:photo.png", or the path the pairs file gives
    path: Path | None  # None: no such control for this target (an optional control)
    root: Path  # it must resolve inside it


def inside_root(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root)


FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
_DIGITS = re.compile(r"(\d+)")


def _natural(path: Path) -> list:
    """frame_2 before frame_10."""
    return [int(x) if x.isdigit() else x.lower() for x in _DIGITS.split(path.name)]


def frame_files(folder: Path) -> list[Path]:
    """A folder's frames (image files, hidden ones left out) in natural order."""
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    return sorted((p for p in files if p.suffix.lower() in FRAME_SUFFIXES), key=_natural)


def is_frame_folder(folder: Path) -> bool:
    """A folder of frames: no subfolders, at least two images, each name ending in a number (frame_0001.png);
    captions beside them are allowed. Other folders stay folders of images."""
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if any(p.is_dir() for p in entries):
        return False
    frames = frame_files(folder)
    others = [p for p in entries if p not in frames and p.suffix.lower() not in (".txt", ".caption")]
    return len(frames) >= 2 and not others and all(p.stem[-1:].isdigit() for p in frames)


def _frame_folders(root: Path) -> list[Path]:
    """The folders of frames under ``root`` (``is_frame_folder``), each one clip (``tuner.data.video`` reads it)."""
    return sorted(p for p in root.rglob("*") if p.is_dir() and not p.is_symlink() and is_frame_folder(p))


def _folder_items(
    root: Path, repeats: int, default_caption: str | None, prefix: str = "", clips: bool = False
) -> list[Item]:
    """Images under ``root`` with their sidecar captions and masks; stray sidecars and hidden files rejected.
    With ``clips`` (``data.video.frames`` set) a folder of frames is one input, its caption ``folder.txt`` beside
    it or ``caption.txt`` in it."""
    folders = _frame_folders(root) if clips else []
    files = sorted(
        p for p in root.rglob("*") if (p.is_file() or p.is_symlink()) and not any(p.is_relative_to(f) for f in folders)
    )
    masks = {p for p in files if p.name.lower().endswith(MASK_SUFFIX)}
    images = [p for p in files if p not in masks and p.suffix.lower() not in CAPTION_SUFFIXES]
    stems = {p.with_suffix("") for p in images} | set(folders)
    items = []
    for folder in folders:
        inner = [folder / f"caption{x}" for x in CAPTION_SUFFIXES] + [folder.with_suffix(x) for x in CAPTION_SUFFIXES]
        caption_path = next((p for p in inner if p.is_file()), None)
        name = prefix + str(folder.relative_to(root)) + "/"
        items.append(Item(name, path=folder, root=root, caption_path=caption_path, repeats=repeats,
                          default_caption=default_caption))  # fmt: skip
    for path in files:
        name = prefix + str(path.relative_to(root))
        if path in masks or path.suffix.lower() in CAPTION_SUFFIXES:
            stem = path.parent / path.name[: -len(MASK_SUFFIX)] if path in masks else path.with_suffix("")
            if stem not in stems:
                kind = "mask" if path in masks else "caption"
                items.append(Item(name, rejected=f"{kind} file without an image"))
            continue  # sidecar captions and masks are read with their image
        caption_path = next((path.with_suffix(x) for x in CAPTION_SUFFIXES if path.with_suffix(x).is_file()), None)
        mask_path = path.with_name(path.stem + MASK_SUFFIX)
        items.append(
            Item(
                name,
                path=path,
                root=root,
                caption_path=caption_path,
                mask_path=mask_path if mask_path.is_file() else None,
                repeats=repeats,
                default_caption=default_caption,
                rejected="hidden file" if path.name.startswith(".") else None,
            )
        )
    return items


def _kohya_items(root: Path, source: Source, clips: bool = False) -> list[Item]:
    """kohya's layout: ``root/10_sks dog/*.png``: 10 repeats, "sks dog" the caption of uncaptioned images."""
    items = []
    for entry in sorted(root.iterdir()):
        match = KOHYA_FOLDER.match(entry.name)
        if entry.is_dir() and match:
            caption = source.caption or match.group(2).replace("_", " ").strip() or None
            items += _folder_items(entry, int(match.group(1)), caption, prefix=f"{entry.name}/", clips=clips)
        elif not entry.name.startswith("."):
            items.append(Item(entry.name, rejected="not in an N_concept folder (kohya layout)"))
    return items


def _imagefolder_items(root: Path, source: Source) -> list[Item]:
    """``metadata.jsonl``: one JSON object per line with ``file_name`` and a caption column."""
    items, listed = [], set()
    lines = (root / "metadata.jsonl").read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            file_name = str(record["file_name"])
        except (json.JSONDecodeError, KeyError, TypeError):
            items.append(Item(f"metadata.jsonl:{number}", rejected="metadata line without a file_name"))
            continue
        path = root / file_name
        listed.add(path.resolve())
        column = source.caption_column or next((c for c in CAPTION_COLUMNS if c in record), None)
        caption = record.get(column) if column else None  # a non-string caption is rejected later, by name
        escapes = Path(file_name).is_absolute() or not inside_root(path, root)
        items.append(
            Item(
                file_name,
                path=path,
                root=root,
                caption=caption,
                repeats=source.repeats,
                default_caption=source.caption,
                rejected="outside the dataset root" if escapes else None,
            )
        )
    for item in _folder_items(root, source.repeats, source.caption):
        if item.path is not None and item.path.resolve() not in listed and item.path.name != "metadata.jsonl":
            items.append(item)  # an image the metadata does not list: kept, without a caption of its own
    return items


def _table_items(source: Source, root: Path) -> list[Item]:
    """Rows of a ``datasets`` dataset saved on disk, or of a parquet file: an image and a caption column."""
    import datasets

    if root.is_file():
        import pyarrow.parquet as pq

        rows = pq.read_table(root).to_pylist()
        base = root.parent
    else:
        dataset = datasets.load_from_disk(str(root))
        if source.image_column in dataset.column_names:
            dataset = dataset.cast_column(source.image_column, datasets.Image(decode=False))
        rows, base = dataset, root
    items = []
    for number, record in enumerate(rows):
        name = f"row {number}"
        if source.image_column not in record:
            raise ValueError(f"{root}: no image column {source.image_column!r} (set the source's image_column)")
        image = record[source.image_column]
        column = source.caption_column or next((c for c in CAPTION_COLUMNS if c in record), None)
        caption = record.get(column) if column else None
        item = Item(name, caption=caption, repeats=source.repeats, default_caption=source.caption)
        if isinstance(image, dict) and image.get("bytes"):
            item.data = image["bytes"]
        elif isinstance(image, (bytes, bytearray)):
            item.data = bytes(image)
        elif isinstance(image, dict) and image.get("path"):  # a path stored in the table: only inside its folder
            item.path, item.root = base / image["path"], base
        else:
            item.rejected = "no image in the row"
        items.append(item)
    return items


def _control_files(folder: Path) -> dict[Path, Path]:
    """A control folder's images by relative path without the extension (the first, sorted, of several)."""
    found: dict[Path, Path] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() or p.is_symlink()):
        if path.name.startswith(".") or path.suffix.lower() in CAPTION_SUFFIXES or path.name.endswith(MASK_SUFFIX):
            continue
        found.setdefault(path.relative_to(folder).with_suffix(""), path)
    return found


def attach_controls(items: list[Item], folders: list[str]) -> list[Item]:
    """Give each file target its control in each of ``folders`` (``data.controls``), matched by its path relative
    to its own root without the extension; returns a rejected item for each control that matches no target."""
    roots = [Path(f).expanduser().resolve() for f in folders]
    files = [_control_files(root) for root in roots]
    matched: set[tuple[int, Path]] = set()
    for item in items:
        if item.path is None or item.root is None or item.rejected:
            continue
        stem = item.path.relative_to(item.root).with_suffix("") if item.path.is_relative_to(item.root) else None
        item.controls = []
        for k, (root, found) in enumerate(zip(roots, files)):
            path = found.get(stem) if stem is not None else None
            name = f"data.controls[{k}]:{path.relative_to(root) if path else stem}"
            item.controls.append(Control(name, path, root))
            matched.add((k, stem))
    return [
        Item(f"data.controls[{k}]:{path.relative_to(roots[k])}", rejected="control without a target")
        for k, found in enumerate(files)
        for stem, path in found.items()
        if (k, stem) not in matched
    ]


def pairs_items(path: Path, repeats: int = 1) -> list[Item]:
    """``data.pairs``: one JSON object a line, ``{"target": ..., "controls": [...], "caption": ...}``, paths relative
    to the file's folder (and inside it); a caption missing there comes from the target's sidecar, then the
    default."""
    root = path.parent.resolve()
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            target, controls = str(record["target"]), record.get("controls") or []
            if isinstance(controls, str):
                controls = [controls]
            controls = [str(c) for c in controls]
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            items.append(Item(f"{path.name}:{number}", rejected="pairs line without a target"))
            continue
        file = root / target
        caption_path = next((file.with_suffix(x) for x in CAPTION_SUFFIXES if file.with_suffix(x).is_file()), None)
        item = Item(target, path=file, root=root, caption=record.get("caption"), caption_path=caption_path,
                    repeats=repeats)  # fmt: skip
        if Path(target).is_absolute() or not inside_root(file, root):
            item.rejected = "outside the dataset root"
        for c in controls:
            escapes = Path(c).is_absolute() or not inside_root(root / c, root)
            if escapes:
                item.rejected = item.rejected or "control outside the dataset root"
            item.controls.append(Control(c, None if escapes else root / c, root))
        items.append(item)
    return items


def detect_kind(path: Path) -> str:
    if path.is_file():
        return "parquet"
    if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
        return "hf"
    if (path / "metadata.jsonl").is_file():
        return "imagefolder"
    folders = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if folders and all(KOHYA_FOLDER.match(p.name) for p in folders):
        return "kohya"
    return "folder"


def read_source(source: Source, clips: bool = False) -> list[Item]:
    """The inputs of one source, each with its repeats and weight; with ``clips`` a folder of frames is one input.

    Raises:
        FileNotFoundError: the source's path does not exist.
    """
    root = Path(source.path).expanduser().resolve()
    if not root.exists():
        raise FileNotFoundError(f"{source.path}: no such folder or file of images")
    kind = detect_kind(root) if source.kind == "auto" else source.kind
    if kind == "kohya":
        items = _kohya_items(root, source, clips)
    elif kind == "imagefolder":
        items = _imagefolder_items(root, source)
    elif kind in ("hf", "parquet"):
        items = _table_items(source, root)
    else:
        items = _folder_items(root, source.repeats, source.caption, clips=clips)
    for item in items:
        item.weight = source.weight
    return items
