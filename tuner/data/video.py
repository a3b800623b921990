"""Clips as training samples: decoding a video (or a folder of frames), resampling it to a frame rate and cutting
it into windows of the frame counts a video VAE takes (``k * data.video.frame_step + 1``: Wan's 4k+1).

``process_clip`` is the clip's counterpart of ``tuner/data/images.py``'s ``process``: it turns one input into the
rows of its windows, or a named reason it is rejected, and never raises. Each window's frames get exactly an
image's treatment (sRGB RGB, scaled and cropped to the resolution or to the clip's bucket, one crop for every
frame) and are stored as PNG bytes: a clip is stored as its frames, and an image is a one-frame clip.

How a clip is read, without ever holding all its frames:

1. ``probe`` demuxes the first video stream's packets (no decoding) for their presentation times: the clip's
   length, its average rate, and whether the rate varies (a variable-rate phone clip, a GIF with uneven delays).
2. ``timeline`` places the output frames at ``t0 + k / fps`` and gives each the source frame on screen then (the
   last one shown at or before it): resampling by timestamps, so a variable-rate clip comes out even.
3. ``windows`` chooses where the windows start on that timeline; ``Clip.frames`` decodes in order and keeps, as
   PNG of the final size, only the source frames a window shows, and stops after the last one it needs.

Reported per clip (``Report.clips``): kept (with its source rate, output rate, frame count, windows, and whether
the rate varied), or rejected: too short, no video stream, unreadable stream.
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from tuner.data.images import VIDEO_SUFFIXES, Rejected, _png, _to_srgb_rgb, dhash, image_key, process, standardize
from tuner.data.sources import Item, frame_files, inside_root
from tuner.files import write_atomic

FOLDER_FPS = 24.0  # a folder of frames with neither data.video.folder_fps nor data.video.fps
SEEK_GAP = 48  # wanted frames further apart than this are read in separate runs, seeking to the second
VFR_TOLERANCE = 0.1  # frame intervals differing by more than this share of the mean: a variable frame rate


# ---------------------------------------------------------------- timing


@dataclass
class Timing:
    """A clip's presentation times (seconds from its first frame, sorted) and its end."""

    times: list[float]
    end: float  # the last frame's time plus one frame's duration

    @property
    def rate(self) -> float:
        return len(self.times) / self.end if self.end > 0 else 0.0

    @property
    def variable(self) -> bool:
        gaps = [b - a for a, b in zip(self.times, self.times[1:])]
        if len(gaps) < 2:
            return False
        mean = sum(gaps) / len(gaps)
        return max(abs(g - mean) for g in gaps) > VFR_TOLERANCE * mean


def timeline(timing: Timing, fps: float | None) -> list[int]:
    """For each output frame at ``k / fps`` the index of the source frame shown then; ``fps=None``: every frame."""
    if fps is None:
        return list(range(len(timing.times)))
    count = int(timing.end * fps + 1e-6)
    return [max(0, bisect.bisect_right(timing.times, k / fps + 1e-9) - 1) for k in range(count)]


def windows(available: int, frames: int, step: int, min_frames: int, count: int) -> list[tuple[int, int]]:
    """(start, length) of the windows cut from ``available`` output frames: ``count`` of ``frames`` each, spread
    evenly from the start to the end without overlapping (fewer where fewer fit); a shorter clip gives one window
    of the longest ``k * step + 1`` frames it has if that is at least ``min_frames``.

    Raises:
        Rejected: shorter than ``min_frames`` (after resampling).
    """
    if available < frames:
        length = (available - 1) // step * step + 1 if available else 0
        if length < max(1, min_frames):
            raise Rejected("too short")
        return [(0, length)]
    n = max(1, min(count, available // frames))
    if n == 1:
        return [(0, frames)]
    return [(round(j * (available - frames) / (n - 1)), frames) for j in range(n)]


# ---------------------------------------------------------------- reading


class Clip:
    """One clip: a video file (PyAV) or a folder of frames, its timing, and its frames decoded on demand."""

    def __init__(self, path: Path, folder_fps: float = FOLDER_FPS):
        self.path = path
        self.folder = path.is_dir()
        self.decoded = 0  # source frames decoded so far (the test of "never all of them")
        self._first: int | None = None  # the first frame's presentation stamp, in the stream's time base
        if self.folder:
            self.files = frame_files(path)
            self.timing = Timing([k / folder_fps for k in range(len(self.files))], len(self.files) / folder_fps)
        else:
            self.timing = self._probe()

    def _open(self):
        import av

        try:
            container = av.open(str(self.path))
        except av.error.FFmpegError as e:
            raise Rejected("unreadable stream") from e
        if not container.streams.video:
            container.close()
            raise Rejected("no video stream")
        return container

    def _probe(self) -> Timing:
        """Demux (never decode) the first video stream: its packets' presentation times."""
        import av

        with self._open() as container:
            stream = container.streams.video[0]
            base = float(stream.time_base) if stream.time_base else 0.0
            stamps, durations = [], []
            try:
                for packet in container.demux(stream):
                    if packet.size == 0:  # the demuxer's flush packet
                        continue
                    stamp = packet.pts if packet.pts is not None else packet.dts
                    stamps.append(stamp)
                    durations.append(packet.duration or 0)
            except av.error.FFmpegError as e:
                raise Rejected("unreadable stream") from e
            if not stamps:
                raise Rejected("unreadable stream")
            if any(s is None for s in stamps) or not base:  # no timestamps: the stream's declared rate
                rate = float(stream.average_rate or stream.guessed_rate or FOLDER_FPS)
                return Timing([k / rate for k in range(len(stamps))], len(stamps) / rate)
            order = sorted(range(len(stamps)), key=stamps.__getitem__)
            first = stamps[order[0]]
            times = [(stamps[k] - first) * base for k in order]
            last = durations[order[-1]] * base or (times[-1] / (len(times) - 1) if len(times) > 1 else 0.0)
            if not last and stream.average_rate:
                last = 1 / float(stream.average_rate)
            self._first = first
            return Timing(times, times[-1] + (last or 1.0))

    def frames(self, wanted: set[int], convert: Callable[[Image.Image], bytes]) -> dict[int, bytes]:
        """``convert`` of each wanted source frame (by index in presentation order): only the converted frames are
        kept. The wanted frames are read in runs (a window each, unless windows touch); a video seeks to the
        keyframe before a run that starts past the beginning and decodes up to the run's last frame.

        Raises:
            Rejected: the stream breaks off before a wanted frame ("unreadable stream").
        """
        out: dict[int, bytes] = {}
        runs: list[list[int]] = []
        for index in sorted(wanted):
            if runs and index - runs[-1][-1] <= SEEK_GAP:
                runs[-1].append(index)
            else:
                runs.append([index])
        for run in runs:
            needed = set(run)
            for index, image in self._decode(run[0], run[-1]):
                if index in needed:
                    out[index] = convert(image())
        if len(out) < len(wanted):
            raise Rejected("unreadable stream")
        return out

    def _decode(self, first: int, last: int) -> Iterator[tuple[int, Callable[[], Image.Image]]]:
        """Source frames ``first``..``last`` (and, for a video, those from the keyframe before ``first``) as
        (index, a function giving the image): a frame nobody wants is never converted."""
        if self.folder:
            for index in range(first, min(last + 1, len(self.files))):
                self.decoded += 1
                try:
                    with Image.open(self.files[index]) as image:
                        image.load()
                except (OSError, SyntaxError, ValueError) as e:
                    raise Rejected("unreadable frame") from e
                yield index, lambda image=image: image
            return
        import av

        times = self.timing.times
        with self._open() as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            base = float(stream.time_base or 0)
            timed = self._first is not None and base > 0
            try:
                if first and timed:
                    container.seek(self._first + int(times[first] / base), stream=stream, backward=True)
                count = 0
                for frame in container.decode(stream):
                    self.decoded += 1
                    if timed and frame.pts is not None:
                        # by its time: a frame that failed to decode before it does not shift the others
                        index = max(0, bisect.bisect_right(times, (frame.pts - self._first) * base + 1e-9) - 1)
                    else:
                        index = count
                    if count == 0 and index > first:  # the seek went past the run: read it from the start
                        yield from self._decode_from_start(first, last)
                        return
                    count += 1
                    if index >= first:
                        yield index, frame.to_image
                    if index >= last:
                        return
            except av.error.FFmpegError as e:
                raise Rejected("unreadable stream") from e

    def _decode_from_start(self, first: int, last: int) -> Iterator[tuple[int, Callable[[], Image.Image]]]:
        first_stamp, self._first = self._first, None  # untimed: count frames from the start
        try:
            yield from self._decode(first, last)
        finally:
            self._first = first_stamp


def clip_sha(path: Path) -> str:
    """The clip's content hash, read in chunks: a video file's bytes, or a folder's frames' names and bytes."""
    digest = hashlib.sha256()
    for file in frame_files(path) if path.is_dir() else [path]:
        if path.is_dir():
            digest.update(f"{file.name}\n".encode())
        with open(file, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def animated_gif(path: Path) -> bool:
    """Whether a .gif has more than one frame (a still GIF stays an image)."""
    try:
        with Image.open(path) as image:
            return getattr(image, "n_frames", 1) > 1
    except (OSError, SyntaxError, ValueError):
        return True  # let the video reader name what is wrong with it


def _is_clip(path: Path) -> bool:
    """A video file, or an animated GIF (a still GIF stays an image)."""
    suffix = path.suffix.lower()
    return suffix in VIDEO_SUFFIXES or (suffix == ".gif" and animated_gif(path))


def process_input(item: Item, s, seed: int, cache: Path | None = None, references=None) -> dict:
    """One input of prepare (runs in a worker process; never raises): with ``data.video.frames`` set, a clip (a
    video file, an animated GIF, a folder of frames) is ``process_clip``'s, its windows' frames; anything else is
    an image (``tuner.data.images.process``)."""
    if s.video.frames and item.path is not None and (item.path.is_dir() or _is_clip(item.path)):
        return process_clip(item, s, seed, cache)
    return process(item, s, seed, cache, references)


# ---------------------------------------------------------------- a clip's rows


def video_key(v) -> dict:
    """The ``data.video`` settings a prepared clip depends on."""
    keys = ("frames", "frame_step", "min_frames", "fps", "windows", "folder_fps")
    return {k: getattr(v, k) for k in keys}


def read_clip(path: Path, d, seed: int, sha: str) -> dict:
    """The windows of one clip, each frame standardized as an image is (one crop for all of them).

    Returns ``{"windows": [{"start", "frames": [png bytes]}], "bucket", "crop", "original_size", "dhash", "clip"}``
    with ``clip`` what the report says of it: source rate, output rate, output frames, windows, variable rate.

    Raises:
        Rejected: too short, no video stream, unreadable stream, smaller than min_side.
    """
    v = d.video
    clip = Clip(path, v.folder_fps or v.fps or FOLDER_FPS)
    shown = timeline(clip.timing, v.fps)
    cuts = windows(len(shown), v.frames, v.frame_step, v.min_frames or v.frames, v.windows)
    wanted = {shown[k] for start, length in cuts for k in range(start, start + length)}
    first: dict = {}

    def convert(image: Image.Image) -> bytes:
        if image.width * image.height > d.max_pixels:
            raise Rejected("decompression bomb (too many pixels)")
        if min(image.size) < d.min_side:
            raise Rejected(f"smaller than min_side={d.min_side}")
        rng = random.Random(f"{seed}:{sha}")  # the same crop for every frame of the clip
        frame, crop, bucket, _ = standardize(_to_srgb_rgb(image, d.background), d, rng)
        first.setdefault("shape", (image.size, crop, bucket, dhash(frame)))
        return _png(frame)

    pngs = clip.frames(wanted, convert)
    original, crop, bucket, hashed = first["shape"]
    rows = [
        {"start": start, "frames": [pngs[shown[k]] for k in range(start, start + length)]} for start, length in cuts
    ]
    report = {
        "source_fps": round(clip.timing.rate, 3),
        "fps": round(v.fps or clip.timing.rate, 3),
        "frames": len(shown),
        "windows": [[start, length] for start, length in cuts],
        "variable_rate": clip.timing.variable,
        "decoded": clip.decoded,
    }
    return {"windows": rows, "bucket": list(bucket), "crop": list(crop), "original_size": list(original),
            "dhash": hashed, "clip": report}  # fmt: skip


def process_clip(item: Item, d, seed: int, cache: Path | None = None) -> dict:
    """``tuner/data/images.py``'s ``process`` for a clip (a video file or a folder of frames); never raises.

    Returns ``{"name", "reason"}`` (and ``clip``) for a rejected clip, else the fields of an image's row with
    ``windows`` (each window's ``start`` and PNG ``frames``) and ``clip`` (its report entry). The result is cached
    under ``cache`` by the clip's bytes, the data settings and the ``data.video`` settings.
    """
    try:
        if item.rejected:
            raise Rejected(item.rejected)
        if item.path is None or item.root is None:
            raise Rejected("a clip in a table (give clips as files)")
        if not inside_root(item.path, item.root):
            raise Rejected("outside the dataset root")
        if not item.path.exists():
            raise Rejected("missing file")
        if item.path.is_file() and item.path.stat().st_size == 0:
            raise Rejected("zero-byte file")
        sha = clip_sha(item.path)
        caption = item.caption
        if caption is None and item.caption_path is not None:
            if not inside_root(item.caption_path, item.root):
                raise Rejected("sidecar outside the dataset root or too large")
            try:
                caption = item.caption_path.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise Rejected("caption not UTF-8") from e
        settings = json.dumps(video_key(d.video), sort_keys=True)
        key = hashlib.sha256(f"{sha}|clip|{image_key(d, seed)}|{settings}".encode()).hexdigest()
        cached = cache / f"{key}.json" if cache else None
        if cached is not None and cached.is_file():
            row = json.loads(cached.read_text())
            for window in row["windows"]:
                window["frames"] = [base64.b64decode(x) for x in window["frames"]]
        else:
            row = read_clip(item.path, d, seed, sha)
            if cached is not None:
                text = {**row, "windows": [{**w, "frames": [base64.b64encode(x).decode() for x in w["frames"]]}
                                           for w in row["windows"]]}  # fmt: skip
                write_atomic(cached, json.dumps(text))
        row["png"] = row["windows"][0]["frames"][0]  # the poster: the first window's first frame
        return {**row, "mask": None, "name": item.name, "sha256": sha, "caption": caption, "key": key,
                "controls": [], "control_prompts": [], "control_found": [], "control_shas": []}  # fmt: skip
    except Rejected as why:
        return {"name": item.name, "reason": str(why), "clip": None}
    except Exception as e:  # one odd clip must never abort the whole dataset
        return {"name": item.name, "reason": f"unreadable ({type(e).__name__})", "clip": None}


def check(v) -> str | None:
    """What is wrong with the ``data.video`` settings, or None."""
    if v.frames < 0 or v.frame_step < 1:
        return f"data.video.frames={v.frames}, frame_step={v.frame_step}: frames 0 (images only) or more, step >= 1"
    if v.frames and (v.frames - 1) % v.frame_step:
        return (
            f"data.video.frames={v.frames}: a count the VAE takes, k * data.video.frame_step + 1 "
            f"(frame_step={v.frame_step}: e.g. {v.frames - 1 - (v.frames - 1) % v.frame_step + 1})"
        )
    if v.min_frames is not None and not 1 <= v.min_frames <= max(v.frames, 1):
        return f"data.video.min_frames={v.min_frames}: 1 up to data.video.frames={v.frames}, or null"
    if v.windows < 1:
        return f"data.video.windows={v.windows}: at least 1 window per clip"
    for key in ("fps", "folder_fps"):
        value = getattr(v, key)
        if value is not None and not value > 0:
            return f"data.video.{key}={value}: a positive frame rate, e.g. 16, or null"
    return None
