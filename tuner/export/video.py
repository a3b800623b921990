"""Writing generated clips: mp4 (H.264, what every browser's ``<video>`` and TensorBoard's readers play), animated
WebP and GIF (pages that show clips as images), at the family's frame rate.

``write_video`` takes the frames as a pipeline returns them (PIL images, or an array ``[F, H, W, 3]`` of uint8 or
of floats in 0..1, as ``output_type="np"`` gives) and writes the file its suffix names, atomically: a reader never
sees half a clip. H.264 in 4:2:0 needs even sides: an odd side is padded by repeating its last row or column
(never scaled, so the pixels are the pipeline's). ``poster`` is the frame a page shows before the clip plays.
"""

from __future__ import annotations

import os
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

SUFFIXES = (".mp4", ".webp", ".gif")


def _arrays(frames) -> list[np.ndarray]:
    """Each frame as uint8 [H, W, 3]."""
    out = []
    for frame in frames:
        if isinstance(frame, Image.Image):
            out.append(np.asarray(frame.convert("RGB")))
            continue
        a = np.asarray(frame)
        if a.dtype != np.uint8:
            a = (np.clip(a.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
        out.append(a[..., :3] if a.ndim == 3 else np.repeat(a[..., None], 3, axis=2))
    if not out:
        raise ValueError("no frames to write")
    if len({a.shape for a in out}) > 1:
        raise ValueError(f"frames of different sizes: {sorted({a.shape for a in out})}")
    return out


def _even(a: np.ndarray) -> np.ndarray:
    """Pad an odd side by repeating its last row or column (H.264 in 4:2:0 halves both sides)."""
    h, w = a.shape[:2]
    return np.pad(a, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def _mp4(frames: list[np.ndarray], path: Path, fps: float, crf: int) -> None:
    import av

    with av.open(str(path), "w", format="mp4") as container:
        rate = Fraction(fps).limit_denominator(1001)
        stream = container.add_stream("libx264", rate=rate, options={"crf": str(crf), "preset": "medium"})
        first = _even(frames[0])
        stream.height, stream.width = first.shape[:2]
        stream.pix_fmt = "yuv420p"
        for a in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(_even(a), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _animated(frames: list[np.ndarray], path: Path, fps: float, fmt: str) -> None:
    images = [Image.fromarray(a) for a in frames]
    duration = round(1000 / fps)  # milliseconds per frame (GIF keeps hundredths of a second)
    extra = {"lossless": False, "quality": 90} if fmt == "WEBP" else {"disposal": 1}
    images[0].save(path, format=fmt, save_all=True, append_images=images[1:], duration=duration, loop=0, **extra)


def write_video(frames, path: str | Path, fps: float, crf: int = 18) -> Path:
    """Write ``frames`` at ``fps`` frames a second to ``path`` (.mp4, .webp or .gif, by its suffix).

    Raises:
        ValueError: no frames, frames of different sizes, a rate that is not positive, or another suffix.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"{path.name}: a clip is written as {', '.join(SUFFIXES)}")
    if not fps > 0:
        raise ValueError(f"fps={fps}: a positive frame rate")
    arrays = _arrays(frames)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=suffix)
    os.close(fd)
    try:
        if suffix == ".mp4":
            _mp4(arrays, Path(tmp), fps, crf)
        else:
            _animated(arrays, Path(tmp), fps, "WEBP" if suffix == ".webp" else "GIF")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def poster(frames) -> Image.Image:
    """The frame a page shows before its clip plays: the first."""
    return Image.fromarray(_arrays(frames[:1])[0])
