"""The installed wheel runs on its own: ``python tools/wheel_smoke.py`` with the interpreter of an environment
where tuner was installed from its wheel (not editable), from any folder. In a temporary folder it lists the
recipes, builds a tiny SD1.5 pipeline and a few photos, trains a LoRA for two steps with ``python -m tuner``,
and checks the exported file and that the ``tuner`` imported is the installed one, not a checkout's.
CI runs it (.ci/run); it prints one line per check and exits non-zero on the first that fails."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path


def run(*args: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "tuner", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"wheel smoke: python -m tuner {' '.join(args)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return done.stdout


def main() -> None:
    from PIL import Image

    import tuner
    from tuner.models.tiny import make_tiny_pipeline

    installed = Path(tuner.__file__).resolve()
    if "site-packages" not in installed.parts:
        sys.exit(f"wheel smoke: tuner was imported from {installed}, not from an installed wheel")
    print(f"wheel smoke: tuner from {installed.parent}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        listed = run(cwd=tmp)
        if "quickstart" not in listed or "lora" not in listed:
            sys.exit(f"wheel smoke: python -m tuner lists no recipes:\n{listed}")
        print("wheel smoke: python -m tuner lists the recipes")
        base = make_tiny_pipeline(tmp / "base", size="test")
        photos = tmp / "photos"
        photos.mkdir()
        for i in range(3):
            Image.new("RGB", (40 + 8 * i, 32), (40 * i, 120, 200)).save(photos / f"p{i}.png")
        run("recipe=lora", f"model.path={base}", f"data.instance_dir={photos}", "data.instance_prompt=a sks thing",
            "data.resolution=16", "train.max_steps=2", "train.batch_size=1", "validation.every=0",
            "log.tensorboard=false", "export.formats=[diffusers]", "stages=[base,prepare,train,export]",
            f"output_dir={tmp / 'run'}", f"home={tmp / 'home'}", cwd=tmp)  # fmt: skip
        lora = tmp / "run" / "diffusers" / "pytorch_lora_weights.safetensors"
        if not lora.is_file():
            sys.exit(f"wheel smoke: recipe=lora wrote no {lora}")
        print(f"wheel smoke: recipe=lora trained and exported {lora.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
