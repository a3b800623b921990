"""What the tests share: running tuner as a user does, small inputs, the in-process training run, and
reading pages in a browser. Fixtures are in conftest.py; test modules import from here, never each other."""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

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


def sample_like_the_gallery(pipe, prompt: str, seed: int, steps: int, size: int = 16):
    """One image as tuner's gallery samples it with no sampler named (the pipeline's own scheduler, the one saved in
    its folder; guidance 3, one generator per image), in [0, 1]."""
    import torch

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


PROMPT = "a photo of sks ball"


def tiny_family(tmp_path_factory, name: str, folder: str = "pipe", **model) -> tuple:
    """A family module's fixture: (the registered family ``name`` with the ``model`` section's options, its
    components loaded from its tiny pipeline saved as a user's folder named ``folder``, that folder's own diffusers
    pipeline, the folder)."""
    from tuner.config import ModelConfig
    from tuner.models import get_family
    from tuner.models.tiny import make_tiny_pipeline

    path = make_tiny_pipeline(tmp_path_factory.mktemp(name) / folder, family=name)
    family = get_family(name, ModelConfig(**model))
    pipe = family.load_pipeline(path)
    pipe.set_progress_bar_config(disable=True)
    return family, family.load(path), pipe, path


def patched_as_comfyui(family, components, kohya_file: Path) -> tuple[dict, set[str]]:
    """The family's single file of ``components`` with each module of a kohya file added as ComfyUI patches a LoRA
    (``lora_unet_<key, dots as _>`` onto ``<key>.weight`` of its model: ``up @ down * alpha / rank``), and the
    file's module names; every module must name a weight of the single file."""
    from safetensors.torch import load_file

    lora = load_file(kohya_file)
    state = family.single_file_state(components.modules(), {})
    comfy = {"lora_unet_" + k.removesuffix(".weight").replace(".", "_"): k for k in state if k.endswith(".weight")}
    modules = {k.split(".")[0] for k in lora}
    assert modules <= set(comfy), sorted(modules - set(comfy))
    for module in modules:
        down, up = lora[f"{module}.lora_down.weight"].float(), lora[f"{module}.lora_up.weight"].float()
        state[comfy[module]] = state[comfy[module]] + (up @ down) * (float(lora[f"{module}.alpha"]) / down.shape[0])
    return state, modules


def train_in_process(tmp_path, tiny, *overrides, stages="[base,prepare,train,export]", name="run", unchecked=None):
    """The lora recipe on the tiny pipeline, in this process (3 steps, no validation samples, no TensorBoard),
    with the given overrides.

    ``unchecked``: {dotted key: value} set after ``validate``, for values it refuses (the loop's own guards)."""
    from accelerate.state import AcceleratorState, GradientState
    from omegaconf import OmegaConf

    from tuner.checks import validate
    from tuner.compose import compose
    from tuner.runner import run_recipe

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    photos = tmp_path / "photos"
    if not photos.exists():
        make_photos(photos)
    cfg = compose(
        "lora",
        [
            f"model.path={tiny}",
            "data.resolution=16",
            f"data.instance_dir={photos}",
            f"data.instance_prompt={PROMPT}",
            "train.max_steps=3",
            "train.batch_size=2",
            "train.learning_rate=1e-2",
            "train.log_every=1",
            "validation.every=0",  # sampling and TensorBoard have tests of their own (test_observability)
            "log.tensorboard=false",
            f"output_dir={tmp_path / name}",
            f"stages={stages}",
            *overrides,
            *([] if any(o.startswith("export.formats") for o in overrides) else [FORMATS]),
        ],
    )
    validate(cfg)
    for key, value in (unchecked or {}).items():
        OmegaConf.update(cfg, key, value)
    return run_recipe(cfg)


# what train_in_process exports unless told otherwise: every method has a format that holds it
FORMATS = "export.formats=[diffusers,peft,merged]"


def reference_call(family, size: int = 32) -> dict:
    """The pipeline call's arguments that give a family whose pipeline only edits (``REFERENCES.required``) a gray
    control of ``size`` px; none for the others."""
    from PIL import Image

    references = family.REFERENCES
    if references is None or not references.required:
        return {}
    return references.call([Image.new("RGB", (size, size), (128, 128, 128))], size, size)


def image_of(run, prompt):
    """The run's own sample (in memory), as the gallery makes it, in [0, 1] (H, W, 3); a family that only edits
    edits a gray control."""
    if reference_call(run.family):
        from tuner.sampling import sample_images

        f, size = run.family, run.cfg.data.resolution
        image = sample_images(run.pipe, [prompt], [0], size, 3, 3.0, decode=f.decode, guidance=f.guidance_kwargs,
                              **f.call_kwargs(), **reference_call(f, size))[0]  # fmt: skip
    else:
        image = run.sample([prompt], [0], steps=3, guidance=3.0)[0]
    return ((image + 1) / 2).permute(1, 2, 0).numpy()


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
IMAGES_JS = "() => [...document.images].map(i => ({src: i.src, complete: i.complete, width: i.naturalWidth}))"


@contextlib.contextmanager
def serve(root: Path):
    """Serve ``root`` over HTTP on 127.0.0.1 from a thread; yields the base URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def images(browser, url: str) -> tuple[list[dict], list[str]]:
    """Every <img> on the page (src, complete, naturalWidth) and its alt text; a fresh context, so nothing is cached."""
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(url, wait_until="load")
        return page.evaluate(IMAGES_JS), page.eval_on_selector_all("img", "all => all.map(i => i.alt)")
    finally:
        context.close()


def broken(found: list[dict]) -> list[str]:
    return [i["src"] for i in found if not (i["complete"] and i["width"] > 0)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launch:
    """One launcher (``torchrun``) in a child process, its output in a file."""

    def __init__(self, launcher_args, tuner_args, cwd: Path, name: str):
        self.log = cwd / f"{name}.log"
        env = {**os.environ, "TUNER_HOME": str(cwd / "home"), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", *launcher_args, "-m", "tuner", *tuner_args],
                cwd=cwd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def wait(self, timeout=600) -> int:
        return self.process.wait(timeout=timeout)

    @property
    def text(self) -> str:
        return self.log.read_text().replace("\r", "\n")


def torchrun(tuner_args, cwd, name, nproc=2) -> Launch:
    return Launch(["--standalone", f"--nproc_per_node={nproc}"], tuner_args, cwd, name)


def accelerate_launch(config: str, tuner_args, cwd: Path, output_dir: Path) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file tools/launch/CONFIG`` with 2 processes (the config's count cut to 2)."""
    env = {**os.environ, "TUNER_HOME": str(cwd / "home"), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "tools" / "launch" / config),
         "--num_processes", "2", "-m", "tuner", *tuner_args, f"output_dir={output_dir}"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def adapter(run_dir: Path) -> dict:
    """A run's exported LoRA, diffusers format."""
    from safetensors.torch import load_file

    return load_file(run_dir / "diffusers" / "pytorch_lora_weights.safetensors")


def assert_same(a: dict, b: dict) -> None:
    """The same tensor names, each bit-identical."""
    import torch

    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
