"""Write a tiny, randomly initialised pipeline of a model family with save_pretrained.

For tests and for trying tuner without a GPU or a model download:

    python tools/make_tiny.py --family sdxl /tmp/tiny-sdxl      # sd15 | sd2 | sdxl | flux | sd3
    python tools/make_tiny.py --family clip /tmp/tiny-clip      # clip | dino: feature models for eval.clip, eval.dino
    python -m tuner recipe=dreambooth_lora model=sdxl model.path=/tmp/tiny-sdxl data.resolution=32 ...
"""

import argparse
from pathlib import Path

from tuner.models import family_names
from tuner.models.tiny import SIZES, make_tiny_feature_model, make_tiny_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write the pipeline into")
    parser.add_argument("--family", default="sd15", choices=[*sorted(family_names()), "clip", "dino"])
    parser.add_argument(
        "--size", default="test", choices=[*sorted(SIZES), "schnell"], help="sd15/sd2 sizes; flux: schnell"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.family in ("clip", "dino"):
        print(make_tiny_feature_model(args.out, args.family, seed=args.seed))
    else:
        print(make_tiny_pipeline(args.out, size=args.size, seed=args.seed, family=args.family))


if __name__ == "__main__":
    main()
