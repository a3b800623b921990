import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_tuner(*args: str, home: Path, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run ``python -m tuner ...`` as a user would, in a fresh process."""
    env = {**os.environ, "TUNER_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "tuner", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    """A randomly initialised tiny SD1.x pipeline saved with save_pretrained."""
    from tuner.models.tiny import make_tiny_pipeline

    return make_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipe", size="test")


def sample_like_the_gallery(pipe, prompt: str, seed: int, steps: int, size: int = 16):
    """One image as tuner's gallery samples it (DDIM, guidance 3, one generator per image), in [0, 1]."""
    import torch
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(seed)
    return pipe(
        prompt,
        height=size,
        width=size,
        num_inference_steps=steps,
        guidance_scale=3.0,
        generator=generator,
        output_type="np",
    ).images[0]


def gallery_cell(path: Path, size: int = 16):
    """A gallery cell PNG scaled back down (it is upscaled with nearest) to ``size``, in [0, 1]."""
    import numpy as np
    from PIL import Image

    cell = np.asarray(Image.open(path).convert("RGB"))
    step = cell.shape[0] // size
    return cell[::step, ::step] / 255.0


def make_photos(folder: Path, n: int = 3) -> Path:
    """A few 'photos' of a subject: a red disc on grey, at sizes that need resizing."""
    from PIL import Image

    folder.mkdir(parents=True)
    for i in range(n):
        image = Image.new("RGB", (48 + 8 * i, 40), (128, 128, 128))
        for y in range(40):
            for x in range(48 + 8 * i):
                if (x - 24) ** 2 + (y - 20) ** 2 < 100:
                    image.putpixel((x, y), (220, 30, 30))
        image.save(folder / f"photo_{i}.png")
    return folder


# the quickstart at a small setting: the tiny base trained briefly, few steps, few samples
SMALL = [
    "base.size=test",
    "base.vae_steps=60",
    "base.unet_steps=60",
    "base.unet_batch_size=16",
    "train.max_steps=30",
    "train.learning_rate=5e-3",
    "prior.num_class_images=8",
    "eval.samples=8",
    "sample.seeds=[0,1,2]",
    "sample.steps=10",
    "eval.steps=10",
]


@pytest.fixture(scope="session")
def quickstart(tmp_path_factory):
    """`python -m tuner recipe=quickstart` at the SMALL setting, once per session: (its root, the result)."""
    root = tmp_path_factory.mktemp("quickstart")
    result = run_tuner("recipe=quickstart", f"output_dir={root / 'run'}", *SMALL, home=root / "home", cwd=root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root, result
