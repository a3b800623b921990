"""Benchmark the prepare stage: images/s on mixed images with 1 and 2 workers, and the cached paths.

    python tools/bench_prepare.py                 # 1,000 images, 512 px buckets
    python tools/bench_prepare.py --images 200 --resolution 256

Writes a synthetic corpus (random sizes, ratios and modes, some JPEG with EXIF rotation) into a
temporary folder, then prints one row per case:

    cold, 1 worker        every image decoded, standardized, cached
    cold, 2 workers       the same in two processes
    rerun, same inputs    the fingerprint matches: nothing is read
    rerun, 1 file changed every other image comes from the cache
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tuner.data.prepare import Source, prepare  # noqa: E402
from tuner.data_config import DataConfig


def make_corpus(folder: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    noise = np.random.default_rng(seed)
    for i in range(n):
        w, h = rng.randint(200, 1400), rng.randint(200, 1400)
        small = noise.integers(0, 256, (max(2, h // 64), max(2, w // 64), 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)
        kind = i % 4
        if kind == 0:
            image.save(folder / f"{i:05d}.png")
        elif kind == 1:
            exif = Image.Exif()
            exif[0x0112] = 6
            image.save(folder / f"{i:05d}.jpg", quality=90, exif=exif)
        elif kind == 2:
            image.convert("L").save(folder / f"{i:05d}.png")
        else:
            buf = io.BytesIO()
            image.convert("RGBA").save(buf, format="WEBP")
            (folder / f"{i:05d}.webp").write_bytes(buf.getvalue())
        if i % 3 == 0:
            (folder / f"{i:05d}.txt").write_text(f"caption {i}")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--resolution", type=int, default=512)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "src"
        src.mkdir()
        print(f"writing {args.images} images ...", flush=True)
        make_corpus(src, args.images)
        sources = [Source(str(src))]

        def settings(workers):
            return DataConfig(resolution=args.resolution, buckets=True, workers=workers)

        rows = []
        for workers in (1, 2):
            seconds = timed(lambda w=workers: prepare(sources, tmp / f"out{w}", settings(w)))
            rows.append((f"cold, {workers} worker{'s' if workers > 1 else ''}", seconds))
        rows.append(("rerun, same inputs", timed(lambda: prepare(sources, tmp / "out1", settings(1)))))
        first = sorted(src.glob("*.png"))[0]
        Image.new("RGB", (300, 200), (1, 2, 3)).save(first)
        rows.append(("rerun, 1 file changed", timed(lambda: prepare(sources, tmp / "out1", settings(1)))))
        report = prepare(sources, tmp / "out1", settings(1))

    print(f"\n{args.images} images -> {len(report.kept)} kept, buckets at {args.resolution} px: {len(report.buckets)}")
    print(f"{'case':<24} {'seconds':>9} {'images/s':>10}")
    for name, seconds in rows:
        print(f"{name:<24} {seconds:>9.2f} {args.images / seconds:>10.1f}")


if __name__ == "__main__":
    main()
