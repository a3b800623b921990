"""Prepare image sources into a standardized dataset: every file accounted for, sources untouched.

Several sources (``tuner/data/sources.py`` lists their inputs) may feed one dataset.

Each input is either kept (EXIF orientation applied, converted to RGB in sRGB, scaled and cropped to
the resolution or to its aspect-ratio bucket) or rejected with a named reason. Kept images are
written with ``datasets`` (Arrow on disk) with caption, bucket, original size, crop, source path
relative to its root and content hash; ``report.json`` lists every input with its status. Running
again with the same inputs does nothing; changed inputs are the only ones processed again (a cache
keyed by content hash and settings keeps the rest).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from tuner.data.buckets import BucketSettings, assign, bucket_sizes
from tuner.data.sources import Item, Source, inside_root, read_source
from tuner.files import atomic_dir, write_atomic

REPORT = "report.json"
FINGERPRINT = "fingerprint"
MAX_FILE_BYTES = 256 << 20
# what PIL may decode; anything else it recognises (PSD, ICO, EPS, ...) is an unsupported format
FORMATS = {"PNG", "JPEG", "MPO", "WEBP", "BMP", "TIFF", "GIF"}


@dataclass
class PrepareSettings:
    resolution: int
    # center | random | none (none squashes the image to the square; not with buckets)
    crop: str = "center"
    # the caption of an image with no caption of its own
    default_caption: str = ""
    # default: an image without a caption gets default_caption | reject: it is rejected
    caption_missing: str = "default"
    # replaces [trigger] in captions; with trigger_policy=prefix it also starts captions that lack it
    trigger: str | None = None
    trigger_policy: str = "replace"
    min_side: int = 8
    background: tuple[int, int, int] = (255, 255, 255)
    max_pixels: int = 178_956_970
    seed: int = 0
    # aspect-ratio buckets instead of one square size
    buckets: bool = False
    bucket_step: int = 64
    min_ratio: float = 0.5
    max_ratio: float = 2.0
    upscale: bool = True
    # reject images whose 64-bit difference hash is within this many bits of a kept one (0: off)
    near_duplicate_bits: int = 0
    # processes decoding and resizing images in parallel
    workers: int = 1

    def bucket_settings(self) -> BucketSettings:
        return BucketSettings(self.resolution, self.bucket_step, self.min_ratio, self.max_ratio, self.upscale)

    def image_key(self) -> str:
        """What a processed image depends on besides its bytes."""
        fields = ("resolution", "crop", "min_side", "background", "max_pixels", "seed", "buckets")
        fields += ("bucket_step", "min_ratio", "max_ratio", "upscale")
        return json.dumps({k: getattr(self, k) for k in fields}, sort_keys=True, default=list)


@dataclass
class Report:
    source: str
    kept: list[str] = field(default_factory=list)
    rejected: dict[str, list[str]] = field(default_factory=dict)
    # every input: {"file", "status": kept|rejected, "reason" | "bucket"}
    files: list[dict] = field(default_factory=list)
    buckets: dict[str, int] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)

    def reject(self, path: str, reason: str) -> None:
        self.rejected.setdefault(reason, []).append(path)
        self.files.append({"file": path, "status": "rejected", "reason": reason})

    def keep(self, path: str, bucket: tuple[int, int], original_size: tuple[int, int]) -> None:
        self.kept.append(path)
        self.files.append({"file": path, "status": "kept", "bucket": list(bucket)})
        name = f"{bucket[0]}x{bucket[1]}"
        self.buckets[name] = self.buckets.get(name, 0) + 1
        side = min(original_size)
        bin_ = next((f"<{b}" for b in (64, 256, 512, 1024, 2048) if side < b), ">=2048")
        self.sizes[bin_] = self.sizes.get(bin_, 0) + 1

    def summary(self) -> str:
        parts = [f"{len(self.kept)} kept"]
        parts += [f"{len(files)} {reason}" for reason, files in sorted(self.rejected.items())]
        lines = [f"{self.source}: " + ", ".join(parts)]
        if self.buckets:
            lines.append("  buckets: " + ", ".join(f"{k} {v}" for k, v in sorted(self.buckets.items())))
            lines.append("  shorter side: " + ", ".join(f"{k} {v}" for k, v in self.sizes.items()))
        return "\n".join(lines)


class Rejected(Exception):
    """An input that cannot be used; the message is the reason recorded in the report."""


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
) -> tuple[Image.Image, tuple[int, int], tuple[int, int], Image.Image | None]:
    """Scale to cover the target size and crop it; returns the image, crop (top, left), bucket, mask.

    The target is the square resolution, or with buckets the image's aspect-ratio bucket. The crop is
    taken from the source in one resize (``box=``), so a long panorama is never upscaled whole first.
    The crop offset is in the scaled image's pixels, as SDXL's crop conditioning expects. A mask
    gets exactly the image's resize and crop.
    """
    w, h = image.size
    if s.buckets:
        bw, bh = assign((w, h), s.bucket_settings(), _bucket_list(s.bucket_settings()))
    else:
        bw = bh = s.resolution
    if s.crop == "none":
        box, crop = (0, 0, w, h), (0, 0)
    else:
        scale = max(bw / w, bh / h)
        scaled_w, scaled_h = max(bw, round(w * scale)), max(bh, round(h * scale))
        if s.crop == "random":
            top, left = rng.randint(0, scaled_h - bh), rng.randint(0, scaled_w - bw)
        else:
            top, left = (scaled_h - bh) // 2, (scaled_w - bw) // 2
        box = (left / scale, top / scale, min(w, (left + bw) / scale), min(h, (top + bh) / scale))
        crop = (top, left)
    image = image.resize((bw, bh), Image.Resampling.LANCZOS, box=box)
    if mask is not None:
        mask = mask.resize((bw, bh), Image.Resampling.BILINEAR, box=box)
    return image, crop, (bw, bh), mask


_BUCKETS: dict[BucketSettings, list[tuple[int, int]]] = {}


def _bucket_list(b: BucketSettings) -> list[tuple[int, int]]:
    if b not in _BUCKETS:
        _BUCKETS[b] = bucket_sizes(b)
    return _BUCKETS[b]


def _read(item: Item) -> bytes:
    if item.path is None:
        return item.data or b""
    if not inside_root(item.path, item.root):
        raise Rejected("outside the dataset root")
    if not item.path.is_file():
        raise Rejected("missing file")
    if item.path.stat().st_size > MAX_FILE_BYTES:
        raise Rejected(f"file too large (over {MAX_FILE_BYTES >> 20} MiB)")
    return item.path.read_bytes()


def _decode(data: bytes, s: PrepareSettings) -> Image.Image:
    if not data:
        raise Rejected("zero-byte file")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            if probe.format not in FORMATS:
                raise Rejected(f"unsupported format ({probe.format})")
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
    return image


def _mask(item: Item, size: tuple[int, int]) -> Image.Image | None:
    """The image's loss mask (grayscale), if it has one."""
    if item.mask_path is None:
        return None
    try:
        with Image.open(item.mask_path) as probe:
            mask = ImageOps.exif_transpose(probe).convert("L")
    except (OSError, SyntaxError, ValueError) as e:
        raise Rejected("mask unreadable") from e
    if mask.size != size:
        raise Rejected(f"mask size {mask.size} differs from the image's {size}")
    return mask


def _png(image: Image.Image) -> bytes:
    """Lossless, and fast: zlib level 1 encodes several times faster than the default for a few % more bytes."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def dhash(image: Image.Image) -> int:
    """A 64-bit difference hash: near-identical pictures differ in few bits whatever their size."""
    small = image.convert("L").resize((9, 8), Image.Resampling.BILINEAR).tobytes()
    return sum(1 << i for i in range(64) if small[i // 8 * 9 + i % 8] > small[i // 8 * 9 + i % 8 + 1])


def process(item: Item, s: PrepareSettings, cache: Path | None = None) -> dict:
    """Read, check and standardize one input (runs in a worker process); never raises.

    Returns ``{"name", "reason"}`` for a rejected input, else the row's fields with the image as PNG
    bytes. A processed image is cached under ``cache`` by its content hash and the settings.
    """
    try:
        if item.rejected:
            raise Rejected(item.rejected)
        data = _read(item)
        sha = hashlib.sha256(data).hexdigest()
        caption = item.caption
        for sidecar in (item.caption_path, item.mask_path):  # sidecars obey the same rules as images
            if sidecar is not None and (not inside_root(sidecar, item.root) or sidecar.stat().st_size > MAX_FILE_BYTES):
                raise Rejected("sidecar outside the dataset root or too large")
        if caption is None and item.caption_path is not None:
            try:
                caption = item.caption_path.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise Rejected("caption not UTF-8") from e
        mask_sha = hashlib.sha256(item.mask_path.read_bytes()).hexdigest() if item.mask_path else ""
        key = hashlib.sha256(f"{sha}|{mask_sha}|{s.image_key()}".encode()).hexdigest()
        cached = cache / f"{key}.json" if cache else None
        if cached is not None and cached.is_file():
            row = json.loads(cached.read_text())
            row["png"] = base64.b64decode(row["png"])
            row["mask"] = base64.b64decode(row["mask"]) if row["mask"] else None
        else:
            image = _decode(data, s)
            mask = _mask(item, image.size)
            rng = random.Random(f"{s.seed}:{sha}")  # a random crop depends on the image, not on the order
            original_size = image.size
            image, crop, bucket, mask = standardize(_to_srgb_rgb(image, s.background), s, rng, mask)
            row = {
                "png": _png(image),
                "mask": _png(mask) if mask is not None else None,
                "original_size": list(original_size),
                "crop": list(crop),
                "bucket": list(bucket),
                "dhash": dhash(image),
            }
            if cached is not None:
                text = {**row, "png": base64.b64encode(row["png"]).decode()}
                text["mask"] = base64.b64encode(row["mask"]).decode() if row["mask"] else None
                write_atomic(cached, json.dumps(text))
        return {**row, "name": item.name, "sha256": sha, "caption": caption, "key": key}
    except Rejected as why:
        return {"name": item.name, "reason": str(why)}
    except Exception as e:  # one odd file must never abort the whole dataset
        return {"name": item.name, "reason": f"unreadable ({type(e).__name__})"}


# ---------------------------------------------------------------- the dataset


def _caption_text(caption: str | None, item_default: str | None, s: PrepareSettings) -> str:
    """Whitespace normalized, the default where there is none (or rejected), the trigger word put in."""
    if caption is not None and not isinstance(caption, str):
        raise Rejected("caption not text")
    # a source's own default (kohya folder name, source caption) counts as a caption
    text = " ".join((caption or "").split()) or " ".join((item_default or "").split())
    if not text:
        if s.caption_missing == "reject":
            raise Rejected("caption missing")
        text = " ".join((s.default_caption or "").split())
    if s.trigger:
        if "[trigger]" in text:
            text = text.replace("[trigger]", s.trigger)
        elif s.trigger_policy == "prefix" and s.trigger not in text:
            text = f"{s.trigger}, {text}" if text else s.trigger
    return text


def _fingerprint(sources: list[Source], s: PrepareSettings) -> str:
    digest = hashlib.sha256(json.dumps([asdict(x) for x in sources] + [asdict(s)], sort_keys=True).encode())
    for source in sources:
        root = Path(source.path).expanduser().resolve()
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.exists())
        for path in files:
            stat = path.stat()
            digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def prepare(sources: list[Source], out: str | Path, settings: PrepareSettings, desc: str = "prepare") -> Report:
    """Standardize every source's images into ``out/dataset`` and write ``out/report.json``.

    Raises:
        FileNotFoundError: a source does not exist.
    """
    import datasets

    out = Path(out)
    fingerprint = _fingerprint(sources, settings)
    if (out / FINGERPRINT).is_file() and (out / FINGERPRINT).read_text() == fingerprint:
        return Report(**json.loads((out / REPORT).read_text()))

    items = []
    for k, source in enumerate(sources):
        found = read_source(source)
        if len(sources) > 1:  # name each input by its source too
            for item in found:
                item.name = f"{k}:{item.name}"
        items += found
    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    if settings.workers > 1:
        with ProcessPoolExecutor(settings.workers) as pool:
            results = pool.map(process, items, [settings] * len(items), [cache] * len(items), chunksize=8)
            results = list(tqdm(results, total=len(items), desc=desc, leave=False))
    else:
        results = [process(item, settings, cache) for item in tqdm(items, desc=desc, leave=False)]

    used = {f"{r['key']}.json" for r in results if "key" in r}
    for stale in cache.glob("*.json"):  # images no longer in the sources
        if stale.name not in used:
            stale.unlink()

    report = Report(source=", ".join(str(Path(x.path).expanduser().resolve()) for x in sources))
    columns = ("image", "caption", "source", "sha256", "original_size", "crop", "bucket", "mask", "repeats", "weight")
    rows: dict[str, list] = {k: [] for k in columns}
    seen: dict[str, str] = {}
    kept_hashes: list[tuple[int, str]] = []
    for item, result in zip(items, results):
        try:
            if "reason" in result:
                raise Rejected(result["reason"])
            if result["sha256"] in seen:
                raise Rejected("duplicate")
            if settings.near_duplicate_bits:
                near = next(
                    (n for h, n in kept_hashes if bin(h ^ result["dhash"]).count("1") <= settings.near_duplicate_bits),
                    None,
                )
                if near is not None:
                    raise Rejected("near-duplicate")
            caption = _caption_text(result["caption"], item.default_caption, settings)
        except Rejected as why:
            report.reject(item.name, str(why))
            continue
        seen[result["sha256"]] = item.name
        kept_hashes.append((result["dhash"], item.name))
        mask = {"bytes": result["mask"], "path": None} if result["mask"] else None
        values = (
            {"bytes": result["png"], "path": None},
            caption,
            item.name,
            result["sha256"],
            result["original_size"],
            result["crop"],
            result["bucket"],
            mask,
            item.repeats,
            item.weight,
        )
        for key, value in zip(columns, values):
            rows[key].append(value)
        report.keep(item.name, tuple(result["bucket"]), tuple(result["original_size"]))

    pair = datasets.Sequence(datasets.Value("int32"), length=2)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "caption": datasets.Value("string"),
            "source": datasets.Value("string"),
            "sha256": datasets.Value("string"),
            "original_size": pair,
            "crop": pair,
            "bucket": pair,
            "mask": datasets.Image(),
            "repeats": datasets.Value("int32"),
            "weight": datasets.Value("float32"),
        }
    )
    (out / FINGERPRINT).unlink(missing_ok=True)  # until the new dataset and report are whole
    with atomic_dir(out / "dataset") as tmp:
        datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp))
    write_atomic(out / REPORT, json.dumps(asdict(report), indent=2))
    write_atomic(out / FINGERPRINT, fingerprint)
    return report


def prepare_folder(source: str | Path, out: str | Path, settings: PrepareSettings, desc: str = "prepare") -> Report:
    """``prepare`` for one folder of images (sidecar captions and masks)."""
    return prepare([Source(str(source), kind="folder")], out, settings, desc)


def load_prepared(out: str | Path):
    """The prepared ``datasets.Dataset`` written by ``prepare``."""
    import datasets

    return datasets.load_from_disk(str(Path(out) / "dataset"))
