"""Prepare image sources into a standardized dataset: every file accounted for, sources untouched.

Several sources (``tuner/data/sources.py`` lists their inputs) may feed one dataset.

Each input is either kept (EXIF orientation applied, converted to RGB in sRGB, scaled and cropped to
the resolution or to its aspect-ratio bucket) or rejected with a named reason. Kept images are
written with ``datasets`` (Arrow on disk) with caption, bucket, original size, crop, source path
relative to its root and content hash; ``report.json`` lists every input with its status. Running
again with the same inputs does nothing; changed inputs are the only ones processed again (a cache
keyed by content hash and settings keeps the rest).

The work on each input (reading, checking, standardizing) is in ``tuner/data/images.py``.

Edit pairs (``references``, an edit family's ``Family.REFERENCES``): each target's controls from ``data.controls``'
folders or ``data.pairs``' jsonl are prepared by the family's rule into the columns ``controls`` (what its VAE
encodes), ``control_prompts`` (what its text encoder reads, for the families whose does) and ``control_sources``
(the files as given, which sampling opens); a plain image has empty lists. The report's ``pairs`` names every
pair: kept, kept without a control, or rejected with the reason, and every control that matches no target.

Clips (``data.video.frames`` set; ``tuner/data/video.py``): a video file, an animated GIF or a folder of frames is
one input, resampled to ``data.video.fps`` and cut into windows; each window is one row (named ``clip.mp4#START``)
with the columns ``frames`` (every frame of the window, standardized as images are), ``fps`` and ``window``, and
its first frame as ``image``. An image in such a dataset is a one-frame clip (``frames`` holds it, ``fps`` 0).
The report's ``clips`` names every clip: kept (rates, frames, windows, variable rate) or rejected with the reason.
An image dataset (``data.video.frames=0``) has exactly the columns it had.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from tuner.data.images import NearDuplicates, Rejected, image_key
from tuner.data.sources import Source, attach_controls, pairs_items, read_source
from tuner.data.video import process_input, video_key
from tuner.data_config import DataConfig
from tuner.files import atomic_dir, inside, write_atomic
from tuner.models.references import References

REPORT = "report.json"
FINGERPRINT = "fingerprint"
KEY_FILE = re.compile(r"[0-9a-f]{64}\.json")  # a processed image in the cache (tuner/data/images.py)


@dataclass
class Report:
    source: str
    kept: list[str] = field(default_factory=list)
    rejected: dict[str, list[str]] = field(default_factory=dict)
    # every input: {"file", "status": kept|rejected, "reason" | "bucket"}
    files: list[dict] = field(default_factory=list)
    buckets: dict[str, int] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    # edit pairs: {"target", "controls": [names], "status": kept|plain|rejected, "reason"?, "missing"?: [names]}
    pairs: list[dict] = field(default_factory=list)
    # clips (data.video): {"file", "status": kept|rejected, "reason"? | "source_fps", "fps", "frames" (after
    # resampling), "windows": [[start, length]], "variable_rate"}
    clips: list[dict] = field(default_factory=list)

    def clip(self, path: str, entry: dict | None, reason: str | None = None) -> None:
        status = {"status": "rejected", "reason": reason} if reason else {"status": "kept"}
        self.clips.append({"file": path, **status, **{k: v for k, v in (entry or {}).items() if k != "decoded"}})

    def pair(self, target: str, controls: list[str], status: str, reason: str | None = None, missing=()) -> None:
        entry = {"target": target, "controls": controls, "status": status}
        entry |= {"reason": reason} if reason else {}
        entry |= {"missing": list(missing)} if missing else {}
        self.pairs.append(entry)

    def reject(self, path: str, reason: str) -> None:
        self.rejected.setdefault(reason, []).append(path)
        self.files.append({"file": path, "status": "rejected", "reason": reason})

    def keep(self, path: str, bucket: tuple[int, int], original_size: tuple[int, int], frames: int = 0) -> None:
        """One kept row; ``frames``: a clip window's frame count (1 for an image of a dataset with clips), which
        the bucket's name then gives: 64x64x17."""
        self.kept.append(path)
        self.files.append(
            {"file": path, "status": "kept", "bucket": list(bucket)} | ({"frames": frames} if frames else {})
        )
        name = f"{bucket[0]}x{bucket[1]}" + (f"x{frames}" if frames else "")
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
        if self.pairs:
            counts: dict[str, int] = {}
            for p in self.pairs:
                what = p["status"] + (" without a control" if p.get("missing") and p["status"] == "kept" else "")
                counts[what] = counts.get(what, 0) + 1
            lines.append("  pairs: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
        if self.clips:
            kept = [c for c in self.clips if c["status"] == "kept"]
            parts = [f"{len(kept)} kept ({sum(len(c['windows']) for c in kept)} windows)"]
            variable = sum(c["variable_rate"] for c in kept)
            parts += [f"{variable} of variable frame rate resampled"] if variable else []
            reasons: dict[str, int] = {}
            for c in self.clips:
                if c["status"] == "rejected":
                    reasons[c["reason"]] = reasons.get(c["reason"], 0) + 1
            lines.append("  clips: " + ", ".join(parts + [f"{v} {k}" for k, v in sorted(reasons.items())]))
        return "\n".join(lines)


# ---------------------------------------------------------------- the dataset


def _caption_text(caption: str | None, item_default: str | None, s: DataConfig, default_caption: str) -> str:
    """Whitespace normalized, the default where there is none (or rejected), the trigger word put in."""
    if caption is not None and not isinstance(caption, str):
        raise Rejected("caption not text")
    # a source's own default (kohya folder name, source caption) counts as a caption
    text = " ".join((caption or "").split()) or " ".join((item_default or "").split())
    if not text:
        if s.caption_missing == "reject":
            raise Rejected("caption missing")
        text = " ".join((default_caption or "").split())
    if s.trigger:
        if "[trigger]" in text:
            text = text.replace("[trigger]", s.trigger)
        elif s.trigger_policy == "prefix" and s.trigger not in text:
            text = f"{s.trigger}, {text}" if text else s.trigger
    return text


def _fingerprint(
    sources: list[Source], s: DataConfig, default_caption: str, seed: int, references: References | None = None
) -> str:
    """The sources (their settings, files, sizes and times) and every setting the dataset depends on; for an edit
    family also its controls (folders, pairs file) and its rule for them."""
    captions = {k: getattr(s, k) for k in ("caption_missing", "trigger", "trigger_policy", "near_duplicate_bits")}
    settings = [image_key(s, seed), captions, default_caption]
    if s.video.frames:  # an image dataset's fingerprint stays what it was
        settings.append(video_key(s.video))
    paths = [Path(x.path).expanduser().resolve() for x in sources]
    if references is not None:
        settings += [references.rule(), list(s.controls), s.pairs, s.require_controls]
        # a pairs file names files in its folder: the whole folder counts
        paths += [Path(x).expanduser().resolve() for x in s.controls] + (
            [Path(s.pairs).expanduser().resolve().parent] if s.pairs else []
        )
    digest = hashlib.sha256(json.dumps([asdict(x) for x in sources] + settings, sort_keys=True).encode())
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.exists())
        for path in files:
            stat = path.stat()
            digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _features(video: bool = False):
    """The dataset's columns; with clips (``video``) also ``frames`` (every frame of the window, an image's one
    frame), ``fps`` (0 for an image) and ``window`` (the window's first frame on the resampled timeline)."""
    import datasets

    pair = datasets.Sequence(datasets.Value("int32"), length=2)
    clips = {"frames": datasets.Sequence(datasets.Image()), "fps": datasets.Value("float32"),
             "window": datasets.Value("int32")}  # fmt: skip
    return datasets.Features(
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
            "controls": datasets.Sequence(datasets.Image()),
            "control_prompts": datasets.Sequence(datasets.Image()),
            "control_sources": datasets.Sequence(datasets.Value("string")),
        }
        | (clips if video else {})
    )


def prepare(
    sources: list[Source],
    out: str | Path,
    d: DataConfig,
    default_caption: str = "",
    seed: int = 0,
    desc: str = "prepare",
    references: References | None = None,
) -> Report:
    """Standardize every source's images into ``out/dataset`` and write ``out/report.json``.

    Args:
        d: the ``data`` settings (resolution, crop, buckets, captions and trigger, checks, workers; and with
            ``references`` the pairs: ``controls``, ``pairs``, ``require_controls``).
        default_caption: the caption of an image with none of its own (the role's prompt).
        seed: random crops depend on it and on each image's bytes.
        references: an edit family's rule for its reference images; None: no controls are read.

    Raises:
        FileNotFoundError: a source does not exist.
    """
    import datasets

    out = Path(out)
    fingerprint = _fingerprint(sources, d, default_caption, seed, references)
    if (out / FINGERPRINT).is_file() and (out / FINGERPRINT).read_text() == fingerprint:
        return Report(**json.loads((out / REPORT).read_text()))

    items = []
    for k, source in enumerate(sources):
        found = read_source(source, clips=bool(d.video.frames))
        if len(sources) > 1:  # name each input by its source too
            for item in found:
                item.name = f"{k}:{item.name}"
        items += found
    if references is not None:
        items += attach_controls(items, list(d.controls)) if d.controls else []
        if d.pairs:
            items += pairs_items(Path(d.pairs).expanduser())
    cache = inside(out.parent, f"{out.name}/cache")  # its stale files are deleted: never through a link
    cache.mkdir(parents=True, exist_ok=True)
    report = Report(
        source=", ".join([str(Path(x.path).expanduser().resolve()) for x in sources] + ([d.pairs] if d.pairs else []))
    )
    used: set[str] = set()
    video = bool(d.video.frames)

    def processed():
        """Each input's result, in order, one at a time (never all of them in memory)."""
        if d.workers > 1:
            with ProcessPoolExecutor(d.workers) as pool:
                n = len(items)
                yield from tqdm(
                    pool.map(process_input, items, [d] * n, [seed] * n, [cache] * n, [references] * n, chunksize=8),
                    total=n,
                    desc=desc,
                    leave=False,
                )
        else:
            yield from (process_input(item, d, seed, cache, references) for item in tqdm(items, desc=desc, leave=False))

    def rows():
        """The kept images' rows; the report records each input kept or rejected, with its reason."""
        seen: set[str] = set()
        near = NearDuplicates(d.near_duplicate_bits)  # banded: not every pair compared
        for item, result in zip(items, processed()):
            if "key" in result:
                used.add(f"{result['key']}.json")
            names = [c.name for c in item.controls]
            found = result.get("control_found", [])
            missing = [names[k] for k in range(len(names)) if k not in found]
            try:
                if "reason" in result:
                    if "clip" in result:
                        report.clip(item.name, None, result["reason"])
                    raise Rejected(result["reason"])
                if references is not None and len(names) > references.most:
                    raise Rejected(f"more controls than the family reads ({references.most})")
                if references is not None and d.require_controls and (missing or not names):
                    raise Rejected("missing control (data.require_controls)")
                # a pair is a duplicate when its target and its controls are: one target may have several edits
                identity = "|".join([result["sha256"], *(result["control_shas"][k] for k in found)])
                if identity in seen:
                    raise Rejected("duplicate pair" if found else "duplicate")
                if d.near_duplicate_bits and not found and near.near(result["dhash"]):
                    raise Rejected("near-duplicate")
                caption = _caption_text(result["caption"], item.default_caption, d, default_caption)
            except Rejected as why:
                report.reject(item.name, str(why))
                if names or str(why) == "control without a target":
                    report.pair(item.name, names, "rejected", str(why))
                continue
            seen.add(identity)
            if not found:
                near.keep(result["dhash"])
            if names:
                report.pair(item.name, [names[k] for k in found], "kept" if found else "plain", missing=missing)
            if "windows" in result:
                report.clip(item.name, result["clip"])
                yield from _window_rows(item, result, caption, report)
                continue
            report.keep(item.name, tuple(result["bucket"]), tuple(result["original_size"]), 1 if video else 0)
            image = {"bytes": result["png"], "path": None}
            yield {
                "image": image,
                "caption": caption,
                "source": item.name,
                "sha256": result["sha256"],
                "original_size": result["original_size"],
                "crop": result["crop"],
                "bucket": result["bucket"],
                "mask": {"bytes": result["mask"], "path": None} if result["mask"] else None,
                "repeats": item.repeats,
                "weight": item.weight,
                "controls": [{"bytes": png, "path": None} for png in result["controls"]],
                "control_prompts": [{"bytes": png, "path": None} for png in result["control_prompts"]],
                "control_sources": [str(item.controls[k].path.resolve()) for k in found],
            } | ({"frames": [image], "fps": 0.0, "window": 0} if video else {})

    (out / FINGERPRINT).unlink(missing_ok=True)  # until the new dataset and report are whole
    scratch = Path(tempfile.mkdtemp(dir=out, prefix=".rows-"))  # the Arrow writer's own files
    try:
        with atomic_dir(out / "dataset") as tmp:
            # rows written as they come (datasets' Arrow writer): the images are never all in memory
            try:
                written = datasets.Dataset.from_generator(
                    rows, features=_features(video), cache_dir=str(scratch), fingerprint=fingerprint
                )
            except ValueError:  # datasets' generator refuses to write no rows: every input was rejected
                if report.kept:
                    raise
                features = _features(video)
                written = datasets.Dataset.from_dict({k: [] for k in features}, features=features)
            written.save_to_disk(str(tmp))
            del written
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for stale in cache.iterdir():  # images no longer in the sources: only files of the names tuner gives them
        if KEY_FILE.fullmatch(stale.name) and stale.name not in used and stale.is_file() and not stale.is_symlink():
            stale.unlink()
    write_atomic(out / REPORT, json.dumps(asdict(report), indent=2))
    write_atomic(out / FINGERPRINT, fingerprint)
    return report


def _window_rows(item, result: dict, caption: str, report: Report):
    """A clip's rows, one per window: its frames, the poster (its first frame) as the image, named clip.mp4#START."""
    for window in result["windows"]:
        name = f"{item.name}#{window['start']}"
        report.keep(name, tuple(result["bucket"]), tuple(result["original_size"]), len(window["frames"]))
        frames = [{"bytes": png, "path": None} for png in window["frames"]]
        yield {
            "image": frames[0], "caption": caption, "source": name, "sha256": result["sha256"],
            "original_size": result["original_size"], "crop": result["crop"], "bucket": result["bucket"],
            "mask": None, "repeats": item.repeats, "weight": item.weight,
            "controls": [], "control_prompts": [], "control_sources": [],
            "frames": frames, "fps": result["clip"]["fps"], "window": window["start"],
        }  # fmt: skip


def prepare_folder(
    source: str | Path, out: str | Path, d: DataConfig, default_caption: str = "", seed: int = 0
) -> Report:
    """``prepare`` for one folder of images (sidecar captions and masks)."""
    return prepare([Source(str(source), kind="folder")], out, d, default_caption, seed)


def load_prepared(out: str | Path):
    """The prepared ``datasets.Dataset`` written by ``prepare``."""
    import datasets

    return datasets.load_from_disk(str(Path(out) / "dataset"))
