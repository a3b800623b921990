"""How long the LoRA toolbox's arithmetic takes at the real models' widths, on this machine.

    python tools/bench_toolbox.py                          # the U-Net families (every family with --family all)
    python tools/bench_toolbox.py --family flux --rank 32  # one family

For each family the denoiser (and the text encoders recipe=lora_extract reads: ``LORA_TEXT_ENCODERS``) is built
on the meta device at its real widths and depth (the family's ``real_widths()``: no memory, no weights), and the
modules ``extract.targets=locon`` puts a LoRA into are listed. Each distinct weight shape is timed once on random
tensors, then counted as often as it occurs:

- extract: the truncated SVD of a whole difference of that shape (``lowrank.cut_delta``), the heavy part of
  lora_extract (loading the two models and writing the files come on top);
- merge / resize: a rank-64 LoRA (two rank-32 inputs stacked) cut to --rank from its factors
  (``lowrank.cut_factors``), what lora_merge with merge.rank and lora_resize do per module.

The table's totals are estimates (the sum over shapes of one timing times the count), printed with the
number of modules and of distinct shapes. On a GPU (CUDA present) the SVDs run there.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tuner.export.lowrank import Factors, cut_delta, cut_factors, stack  # noqa: E402  (the checkout's tuner)
from tuner.models import family_names, get_family  # noqa: E402
from tuner.stages.extract import extract_targets  # noqa: E402


def shapes(name: str) -> Counter:
    """The weight shapes of every module lora_extract reads (locon targets, text encoders' linear layers)."""
    family = get_family(name)
    rw = family.real_widths()
    with torch.device("meta"):
        encoders = dict(zip(family.TEXT_ENCODERS, rw.text_encoders()))
        modules = [(rw.denoiser(rw.real), True)]
        modules += [(encoders[e], False) for e in family.LORA_TEXT_ENCODERS]
    found = Counter()
    for module, denoiser in modules:
        for target in extract_targets(family, "locon", module, denoiser):
            found[tuple(module.get_submodule(target).weight.shape)] += 1
    return found


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", help="comma-separated, or all (default: the families whose denoiser is a U-Net)")
    parser.add_argument("--rank", type=int, default=32)
    args = parser.parse_args()
    if args.family is None:  # the quicker ones on a CPU
        names = [name for name in family_names() if get_family(name).DENOISER == "unet"]
    else:
        names = family_names() if args.family == "all" else args.family.split(",")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    print(f"| family | modules | shapes | extract at rank {args.rank} (s) | merge/resize to rank {args.rank} (s) |")
    print("|---|---|---|---|---|")
    for name in names:
        found = shapes(name)
        extract = merge = 0.0
        for shape, count in found.items():
            delta = torch.randn(shape, device=device)
            extract += count * timed(lambda d=delta: cut_delta(d, args.rank), device)
            out, inner = shape[0], shape[1:]
            parts = [
                (
                    Factors(
                        torch.randn(32, *inner, device=device),
                        torch.randn(out, 32, *[1] * (len(shape) - 2), device=device),
                    ),
                    1.0,
                )
                for _ in range(2)
            ]
            stacked = stack(parts)
            merge += count * timed(lambda f=stacked: cut_factors(f, args.rank), device)
        print(f"| {name} | {sum(found.values())} | {len(found)} | {extract:.1f} | {merge:.1f} |", flush=True)
    print(f"\n{device}: {torch.get_num_threads()} threads, torch {torch.__version__}")


if __name__ == "__main__":
    main()
