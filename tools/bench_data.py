"""Benchmark data at scale: prepare, encode, the shared cache, training memory, near-duplicates.

    python tools/bench_data.py                       # 2,000 and 20,000 images
    python tools/bench_data.py --sizes 500 5000 --steps 20

For each size it writes a synthetic captioned image set (small pixels, so it fits one machine: random
32 px patterns, one distinct caption per image) and a tiny SD1.5 pipeline, then prints one row per size:

    prepare 1w / 2w     images/s of ``recipe=prepare`` with data.workers=1 and 2
    encode              seconds of the first training run's encode phase (latents and captions)
    2nd run encoded     entries the second run (another run folder, same cache) encoded: must be 0
    train RSS           peak resident memory of the second training process (MiB)
    near-dup            seconds to find near-duplicates among the set's dHashes: banded, and the exact
                        comparison of every pair (at most 2,000 images: it is quadratic)

The 20,000-image training process should stay within 1.3x of the 2,000-image one: it holds an index
of the cache, not the data.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORDS = "red green blue small large round square bright dark striped dotted old new".split()


def make_set(folder: Path, n: int, seed: int = 0) -> None:
    """``n`` 32 px images of random 4x4 patterns, each with a caption file of its own words."""
    folder.mkdir(parents=True, exist_ok=True)
    rng, noise = random.Random(seed), np.random.default_rng(seed)
    for i in range(n):
        small = noise.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(small).resize((32, 32), Image.Resampling.BILINEAR).save(folder / f"{i:06d}.png")
        words = " ".join(rng.choice(WORDS) for _ in range(4))
        (folder / f"{i:06d}.txt").write_text(f"a photo of sks {words} {i}")


def tuner(args: list[str], cwd: Path, home: Path) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (KiB) and output of ``python -m tuner ARGS`` in a process of its own."""
    probe = (
        "import resource, subprocess, sys; "
        "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); print(r.returncode); "
        "sys.stdout.write(r.stdout + r.stderr)"
    )
    env = {**os.environ, "TUNER_HOME": str(home)}
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", probe, sys.executable, "-m", "tuner", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    seconds = time.perf_counter() - start
    rss, code, text = out.split("\n", 2)
    if int(code) != 0:
        raise SystemExit(f"python -m tuner {' '.join(args)} failed:\n{text[-3000:]}")
    return seconds, int(rss), text


def near_duplicate_times(folder: Path, bits: int, exact_up_to: int) -> tuple[float, float | None]:
    from tuner.data.images import NearDuplicates, dhash

    hashes = [dhash(Image.open(p)) for p in sorted(folder.glob("*.png"))]
    start = time.perf_counter()
    found, banded = NearDuplicates(bits), []
    for h in hashes:
        banded.append(found.near(h))
        if not banded[-1]:
            found.keep(h)
    banded_s = time.perf_counter() - start
    if len(hashes) > exact_up_to:
        return banded_s, None
    start = time.perf_counter()
    kept: list[int] = []
    exact = []
    for h in hashes:
        near = any(bin(k ^ h).count("1") <= bits for k in kept)
        exact.append(near)
        if not near:
            kept.append(h)
    exact_s = time.perf_counter() - start
    assert exact == banded, "banded near-duplicate search differs from the exact one"
    return banded_s, exact_s


def bench(size: int, tmp: Path, steps: int) -> dict:
    from tuner.models.tiny import make_tiny_pipeline

    work = tmp / f"n{size}"
    images, pipe, home = work / "images", tmp / "pipe", work / "home"  # a cold cache per size
    make_set(images, size)
    if not (pipe / "model_index.json").exists():
        make_tiny_pipeline(pipe, size="layout")
    common = [
        f"model.path={pipe}",
        f"data.instance_dir={images}",
        "data.instance_prompt=a photo of sks",
        "model.resolution=32",
        "data.resolution=32",
    ]
    row: dict = {"images": size}
    for workers in (1, 2):
        seconds, _, _ = tuner(
            ["recipe=prepare", *common, f"data.workers={workers}", f"output_dir={work / f'prep{workers}'}"], work, home
        )
        row[f"prepare_{workers}w"] = size / seconds
    train = [
        "recipe=lora",
        *common,
        "stages=[base,prepare,train]",
        f"train.max_steps={steps}",
        "train.batch_size=4",
        "validation.every=0",
    ]
    # the training runs use the prepared folders (prepared again they would be timed again): the first
    # encodes into the cache, the second, in another folder, finds every entry there
    _, _, first = tuner([*train, f"output_dir={work / 'prep1'}", "overwrite=true"], work, home)
    summary = json.loads((work / "prep1" / "summary.json").read_text())
    row["encode_s"] = summary["metrics"]["cache"]["seconds"]
    row["encoded_1st"] = sum(summary["metrics"]["cache"]["encoded"].values())
    _, rss, _ = tuner([*train, f"output_dir={work / 'prep2'}", "overwrite=true"], work, home)
    second = json.loads((work / "prep2" / "summary.json").read_text())
    row["encoded_2nd"] = sum(second["metrics"]["cache"]["encoded"].values())
    row["train_rss_mib"] = rss / 1024
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--bits", type=int, default=4, help="near-duplicate distance in dHash bits")
    parser.add_argument("--exact-up-to", type=int, default=2000, help="largest set compared pair by pair")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            row = bench(size, Path(tmp), args.steps)
            folder = Path(tmp) / f"n{size}" / "images"
            row["neardup_banded_s"], row["neardup_exact_s"] = near_duplicate_times(folder, args.bits, args.exact_up_to)
            rows.append(row)
            print(json.dumps(row), flush=True)
    header = (
        f"{'images':>7} {'prep 1w/s':>9} {'prep 2w/s':>9} {'encode s':>8} {'encoded':>8} {'2nd run':>7} "
        f"{'train RSS MiB':>13} {'near-dup s':>10} {'exact s':>8}"
    )
    print(header)
    for r in rows:
        exact = f"{r['neardup_exact_s']:.2f}" if r["neardup_exact_s"] is not None else "-"
        print(
            f"{r['images']:>7} {r['prepare_1w']:>9.0f} {r['prepare_2w']:>9.0f} {r['encode_s']:>8.1f} "
            f"{r['encoded_1st']:>8} {r['encoded_2nd']:>7} {r['train_rss_mib']:>13.0f} "
            f"{r['neardup_banded_s']:>10.3f} {exact:>8}"
        )
    if len(rows) > 1:
        print(f"train RSS, largest / smallest set: {rows[-1]['train_rss_mib'] / rows[0]['train_rss_mib']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
