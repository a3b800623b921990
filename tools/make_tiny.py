"""Write a tiny, randomly initialised pipeline of a model family with save_pretrained.

For tests and for trying tuner without a GPU or a model download:

    python tools/make_tiny.py --family sd15 /tmp/tiny-sd15
    python -m tuner recipe=dreambooth_lora model=sd15 model.path=/tmp/tiny-sd15 data.resolution=16 ...
"""

import argparse
from pathlib import Path

from tuner.models.tiny import SIZES, make_tiny_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write the pipeline into")
    parser.add_argument("--family", default="sd15", choices=["sd15"])
    parser.add_argument("--size", default="test", choices=sorted(SIZES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(make_tiny_pipeline(args.out, size=args.size, seed=args.seed))


if __name__ == "__main__":
    main()
