"""Prepare a folder of images into a standardized dataset: every file accounted for, sources untouched.

Each file under the source folder is either kept (converted to RGB in sRGB, EXIF orientation
applied, resized and cropped to the training resolution) or rejected with a named reason. The kept
images are written with ``datasets`` (Arrow on disk) together with their caption, source path
relative to the root, original size, crop and content hash; ``report.json`` lists both sides.
Running again with the same files and settings does nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from tuner.files import atomic_dir, write_atomic

CAPTION_SUFFIXES = (".txt", ".caption")
# photo.jpg's loss mask is photo.mask.png: white where the loss counts, black where it does not
MASK_SUFFIX = ".mask.png"
REPORT = "report.json"
FINGERPRINT = "fingerprint"
MAX_FILE_BYTES = 256 << 20


@dataclass
class PrepareSettings:
    resolution: int
    # center | random | none
    crop: str = "center"
    # the caption of an image with no sidecar caption file
    default_caption: str = ""
    min_side: int = 8
    background: tuple[int, int, int] = (255, 255, 255)
    max_pixels: int = 178_956_970
    seed: int = 0


@dataclass
class Report:
    source: str
    kept: list[str] = field(default_factory=list)
    rejected: dict[str, list[str]] = field(default_factory=dict)

    def reject(self, path: str, reason: str) -> None:
        self.rejected.setdefault(reason, []).append(path)

    def summary(self) -> str:
        parts = [f"{len(self.kept)} kept"]
        parts += [f"{len(files)} {reason}" for reason, files in sorted(self.rejected.items())]
        return f"{self.source}: " + ", ".join(parts)


class Rejected(Exception):
    """An input file that cannot be used; the message is the reason recorded in the report."""


def _to_srgb_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any mode to RGB: ICC profile converted to sRGB, transparency composited on ``background``."""
    icc = image.info.get("icc_profile")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode.startswith("I;16"):
        image = image.convert("I")
    if image.mode == "I":
        image = image.point(lambda v: v / 256).convert("L")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, tuple(background))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        image = flat
    if icc and image.mode in ("RGB", "CMYK", "L"):
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            image = ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError):
            pass  # a broken profile: keep the pixels as they are rather than drop the image
    return image.convert("RGB")


def standardize(
    image: Image.Image, s: PrepareSettings, rng, mask: Image.Image | None = None
) -> tuple[Image.Image, tuple[int, int], Image.Image | None]:
    """Scale the short side to the resolution and crop a square; returns the image, crop (top, left), mask.

    The crop is taken from the source in one resize (``box=``), so a long panorama is never upscaled
    whole first. The crop offset is in the scaled image's pixels, as SDXL's crop conditioning expects.
    A mask gets exactly the image's resize and crop.
    """
    size = s.resolution
    w, h = image.size
    if s.crop == "none":
        box, crop = (0, 0, w, h), (0, 0)
    else:
        scale = size / min(w, h)
        scaled_w, scaled_h = max(size, round(w * scale)), max(size, round(h * scale))
        if s.crop == "random":
            top, left = rng.randint(0, scaled_h - size), rng.randint(0, scaled_w - size)
        else:
            top, left = (scaled_h - size) // 2, (scaled_w - size) // 2
        box = (left / scale, top / scale, min(w, (left + size) / scale), min(h, (top + size) / scale))
        crop = (top, left)
    image = image.resize((size, size), Image.Resampling.LANCZOS, box=box)
    if mask is not None:
        mask = mask.resize((size, size), Image.Resampling.BILINEAR, box=box)
    return image, crop, mask


def _mask(path: Path, size: tuple[int, int]) -> Image.Image | None:
    """The image's loss mask (grayscale), if it has one."""
    sidecar = path.with_name(path.stem + MASK_SUFFIX)
    if not sidecar.is_file():
        return None
    try:
        with Image.open(sidecar) as probe:
            mask = ImageOps.exif_transpose(probe).convert("L")
    except (OSError, SyntaxError, ValueError) as e:
        raise Rejected("mask unreadable") from e
    if mask.size != size:
        raise Rejected(f"mask size {mask.size} differs from the image's {size}")
    return mask


def _load(path: Path, root: Path, s: PrepareSettings) -> tuple[Image.Image, bytes]:
    if not path.resolve().is_relative_to(root):
        raise Rejected("outside the dataset root")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise Rejected(f"file too large (over {MAX_FILE_BYTES >> 20} MiB)")
    data = path.read_bytes()
    if not data:
        raise Rejected("zero-byte file")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            w, h = probe.size
            if w * h > s.max_pixels:
                raise Rejected("decompression bomb (too many pixels)")
            image = ImageOps.exif_transpose(probe)
            image.load()
    except Rejected:
        raise
    except UnidentifiedImageError as e:
        raise Rejected("not an image") from e
    except Image.DecompressionBombError as e:
        raise Rejected("decompression bomb (too many pixels)") from e
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as e:
        raise Rejected("truncated or corrupt") from e
    if min(image.size) < s.min_side:
        raise Rejected(f"smaller than min_side={s.min_side}")
    return image, data


def _caption(path: Path, default: str) -> str:
    for suffix in CAPTION_SUFFIXES:
        sidecar = path.with_suffix(suffix)
        if sidecar.is_file():
            try:
                return " ".join(sidecar.read_text(encoding="utf-8").split())
            except UnicodeDecodeError as e:
                raise Rejected("caption not UTF-8") from e
    return default


def _fingerprint(files: list[Path], root: Path, s: PrepareSettings) -> str:
    digest = hashlib.sha256(json.dumps(asdict(s), sort_keys=True).encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def prepare_folder(source: str | Path, out: str | Path, settings: PrepareSettings, desc: str = "prepare") -> Report:
    """Standardize the images under ``source`` into ``out/dataset`` and write ``out/report.json``.

    Raises:
        FileNotFoundError: ``source`` is not a folder.
    """
    import datasets

    root, out = Path(source).expanduser().resolve(), Path(out)
    if not root.is_dir():
        raise FileNotFoundError(f"{source}: no such folder of images")
    files = sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink())
    fingerprint = _fingerprint([f for f in files if f.exists()], root, settings)
    if (out / FINGERPRINT).is_file() and (out / FINGERPRINT).read_text() == fingerprint:
        saved = json.loads((out / REPORT).read_text())
        return Report(saved["source"], saved["kept"], saved["rejected"])

    report = Report(source=str(root))
    rng = random.Random(settings.seed)
    columns = ("image", "caption", "source", "sha256", "original_size", "crop", "mask")
    rows: dict[str, list] = {k: [] for k in columns}
    seen: dict[str, str] = {}
    masks = [p for p in files if p.name.lower().endswith(MASK_SUFFIX)]
    stems = {p.with_suffix("") for p in files if p.suffix.lower() not in CAPTION_SUFFIXES and p not in masks}
    for path in tqdm(files, desc=desc, leave=False):
        rel = str(path.relative_to(root))
        if path in masks or path.suffix.lower() in CAPTION_SUFFIXES:
            stem = path.parent / path.name[: -len(MASK_SUFFIX)] if path in masks else path.with_suffix("")
            if stem not in stems:
                report.reject(rel, f"{'mask' if path in masks else 'caption'} file without an image")
            continue  # sidecar captions and masks are read with their image
        if path.name.startswith("."):
            report.reject(rel, "hidden file")
            continue
        try:
            image, data = _load(path, root, settings)
            sha = hashlib.sha256(data).hexdigest()
            if sha in seen:
                raise Rejected(f"duplicate of {seen[sha]}")
            caption = _caption(path, settings.default_caption)
            original_size = image.size
            mask = _mask(path, image.size)
            image, crop, mask = standardize(_to_srgb_rgb(image, settings.background), settings, rng, mask)
        except Rejected as why:
            reason = str(why)
            report.reject(rel, "duplicate" if reason.startswith("duplicate") else reason)
            continue
        except Exception as e:  # one odd file must never abort the whole dataset
            report.reject(rel, f"unreadable ({type(e).__name__})")
            continue
        seen[sha] = rel
        for key, value in zip(columns, (image, caption, rel, sha, list(original_size), list(crop), mask)):
            rows[key].append(value)
        report.kept.append(rel)

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "caption": datasets.Value("string"),
            "source": datasets.Value("string"),
            "sha256": datasets.Value("string"),
            "original_size": datasets.Sequence(datasets.Value("int32"), length=2),
            "crop": datasets.Sequence(datasets.Value("int32"), length=2),
            "mask": datasets.Image(),
        }
    )
    (out / FINGERPRINT).unlink(missing_ok=True)  # until the new dataset and report are whole
    with atomic_dir(out / "dataset") as tmp:
        datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp))
    write_atomic(out / REPORT, json.dumps(asdict(report), indent=2))
    write_atomic(out / FINGERPRINT, fingerprint)
    return report


def load_prepared(out: str | Path):
    """The prepared ``datasets.Dataset`` written by ``prepare``."""
    import datasets

    return datasets.load_from_disk(str(Path(out) / "dataset"))
