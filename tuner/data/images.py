"""One input image of a dataset: reading, checking and standardizing it with the ``data`` settings.

``process`` turns one input (``tuner/data/sources.py``) into a row of the prepared dataset or a named
reason it is rejected; ``tuner/data/prepare.py`` runs it over every input and writes the dataset.

An edit pair's controls are read and checked as images are, then resized by the family's rule (``References``,
tuner/models/references.py: its pipeline's own resize), never by the data settings: the target's bucket decides
the batch, each control keeps the size its pipeline gives it.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import random
from pathlib import Path

from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from tuner.data.buckets import BucketSettings, assign, bucket_sizes
from tuner.data.sources import Control, Item, inside_root
from tuner.data_config import DataConfig
from tuner.files import write_atomic
from tuner.models.references import References

MAX_FILE_BYTES = 256 << 20
# what PIL may decode; anything else it recognises (PSD, ICO, EPS, ...) is an unsupported format
FORMATS = {"PNG", "JPEG", "MPO", "WEBP", "BMP", "TIFF", "GIF"}
# video files, read as clips when data.video.frames is set (tuner/data/video.py), as is an animated GIF
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".m4v", ".avi")


def bucket_settings(d: DataConfig) -> BucketSettings:
    """The aspect-ratio buckets of ``data.buckets`` (area resolution^2, sides multiples of bucket_step)."""
    return BucketSettings(d.resolution, d.bucket_step, d.min_ratio, d.max_ratio, d.upscale)


def image_key(d: DataConfig, seed: int) -> str:
    """What a processed image depends on besides its bytes: the data settings that shape it, and the seed
    of a random crop."""
    fields = ("resolution", "crop", "min_side", "background", "max_pixels", "buckets")
    fields += ("bucket_step", "min_ratio", "max_ratio", "upscale")
    return json.dumps({"seed": seed} | {k: getattr(d, k) for k in fields}, sort_keys=True, default=list)


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
    image: Image.Image, s: DataConfig, rng, mask: Image.Image | None = None
) -> tuple[Image.Image, tuple[int, int], tuple[int, int], Image.Image | None]:
    """Scale to cover the target size and crop it; returns the image, crop (top, left), bucket, mask.

    The target is the square resolution, or with buckets the image's aspect-ratio bucket. The crop is
    taken from the source in one resize (``box=``), so a long panorama is never upscaled whole first.
    The crop offset is in the scaled image's pixels, as SDXL's crop conditioning expects. A mask
    gets exactly the image's resize and crop.
    """
    w, h = image.size
    if s.buckets:
        bw, bh = assign((w, h), bucket_settings(s), _bucket_list(bucket_settings(s)))
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


def _decode(data: bytes, s: DataConfig) -> Image.Image:
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


def _control_bytes(control: Control) -> bytes | None:
    """A control's bytes; None where the target has no control there (optional)."""
    if control.path is None:
        return None
    try:
        return _read(Item(control.name, path=control.path, root=control.root))
    except Rejected as why:
        raise Rejected(f"control unreadable ({why})") from why


def _controls(data: list[bytes | None], image_size, s: DataConfig, references: References) -> dict:
    """The controls of one target, each as the family's pipeline prepares it (``references.vae_image``, and
    ``prompt_image`` for a family whose text encoder reads them), as PNG bytes."""
    vae, prompt, found = [], [], []
    for k, blob in enumerate(data):
        if blob is None:
            continue
        try:
            image = _to_srgb_rgb(_decode(blob, s), s.background)
        except Rejected as why:
            raise Rejected(f"control unreadable ({why})") from why
        ratio = (image.width / image.height) / (image_size[0] / image_size[1])
        if max(ratio, 1 / ratio) > s.max_ratio:  # the pipeline squashes a reference: a far aspect would be distorted
            raise Rejected("control aspect far from the target's (over data.max_ratio)")
        try:  # a pipeline's own refusal (Flux.2's of a reference under 64 px): the reason its rule gives
            vae.append(_png(references.vae_image(image)))
            shown = references.prompt_image(image) if references.in_prompt else None
        except ValueError as why:
            raise Rejected(f"control refused by the family's rule ({why})") from why
        if shown is not None:
            prompt.append(_png(shown))
        found.append(k)
    return {"controls": vae, "control_prompts": prompt, "control_found": found}


def process(
    item: Item, s: DataConfig, seed: int, cache: Path | None = None, references: References | None = None
) -> dict:
    """Read, check and standardize one input (runs in a worker process); never raises.

    Returns ``{"name", "reason"}`` for a rejected input, else the row's fields with the image as PNG
    bytes (a clip, with ``data.video.frames`` set, is ``tuner.data.video.process_input``'s).

    A processed image is cached under ``cache`` by its content hash and the settings. An edit pair's
    controls (``item.controls``, prepared by ``references``' rule) come as ``controls``, ``control_prompts`` (PNG
    bytes) and ``control_found`` (which of the item's controls exist); one unreadable control rejects the pair.
    """
    try:
        if item.rejected:
            raise Rejected(item.rejected)
        if not s.video.frames and item.path is not None and item.path.suffix.lower() in VIDEO_SUFFIXES:
            raise Rejected("a video (data.video.frames=0 reads images only)")
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
        controls = [_control_bytes(c) for c in item.controls] if references is not None else []
        control_shas = [hashlib.sha256(c).hexdigest() if c is not None else "" for c in controls]
        if controls:
            mask_sha += "|" + json.dumps([control_shas, references.rule(), s.max_ratio], sort_keys=True)
        key = hashlib.sha256(f"{sha}|{mask_sha}|{image_key(s, seed)}".encode()).hexdigest()
        cached = cache / f"{key}.json" if cache else None
        if cached is not None and cached.is_file():
            row = json.loads(cached.read_text())
            row["png"] = base64.b64decode(row["png"])
            row["mask"] = base64.b64decode(row["mask"]) if row["mask"] else None
            for name in ("controls", "control_prompts"):
                row[name] = [base64.b64decode(x) for x in row.get(name, [])]
        else:
            image = _decode(data, s)
            mask = _mask(item, image.size)
            rng = random.Random(f"{seed}:{sha}")  # a random crop depends on the image, not on the order
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
            if controls:
                row |= _controls(controls, original_size, s, references)
            if cached is not None:
                text = {**row, "png": base64.b64encode(row["png"]).decode()}
                text["mask"] = base64.b64encode(row["mask"]).decode() if row["mask"] else None
                for name in ("controls", "control_prompts"):
                    text[name] = [base64.b64encode(x).decode() for x in row.get(name, [])]
                write_atomic(cached, json.dumps(text))
        row.setdefault("controls", []), row.setdefault("control_prompts", []), row.setdefault("control_found", [])
        return {**row, "name": item.name, "sha256": sha, "caption": caption, "key": key, "control_shas": control_shas}
    except Rejected as why:
        return {"name": item.name, "reason": str(why)}
    except Exception as e:  # one odd file must never abort the whole dataset
        return {"name": item.name, "reason": f"unreadable ({type(e).__name__})"}


class NearDuplicates:
    """dHashes kept so far, and whether a new one is within ``bits`` differing bits of any of them.

    Two 64-bit hashes that differ in at most ``bits`` bits agree exactly on at least one of ``bits + 1``
    disjoint bands of their bits (pigeonhole), so each kept hash is filed under each band's value and a new
    one is compared only with those sharing a band: the same answer as comparing every pair, without
    comparing every pair.
    """

    def __init__(self, bits: int):
        self.bits = bits
        n = min(bits + 1, 64)
        edges = [64 * k // n for k in range(n + 1)]
        self.bands = [(lo, (1 << (hi - lo)) - 1) for lo, hi in zip(edges, edges[1:])]
        self.tables: list[dict[int, list[int]]] = [{} for _ in self.bands]
        self.kept = 0

    def near(self, h: int) -> bool:
        """Whether ``h`` is within ``bits`` of a kept hash."""
        if self.bits >= 64:
            return self.kept > 0
        for (lo, mask), table in zip(self.bands, self.tables):
            for other in table.get((h >> lo) & mask, ()):
                if (other ^ h).bit_count() <= self.bits:
                    return True
        return False

    def keep(self, h: int) -> None:
        """File ``h`` among the kept hashes (the caller has asked ``near`` first)."""
        for (lo, mask), table in zip(self.bands, self.tables):
            table.setdefault((h >> lo) & mask, []).append(h)
        self.kept += 1
