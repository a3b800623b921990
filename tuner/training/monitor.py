"""What a training run shows while it runs.

- Logged values (loss, learning rate, gradient norm, samples/s) go to TensorBoard in ``RUN/logs/``
  (``tensorboard --logdir runs``) and, with ``log.wandb=true``, to Weights & Biases; accelerate's
  tracker classes do the writing.
- Every ``validation.every`` steps rank 0 samples fixed prompts at fixed seeds with the weights of that
  step and adds a row to ``RUN/validation/index.html`` (a grid PNG per step; the trackers get the grid).
  Training is the same with or without it: the models' modes and the RNG are put back afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from tuner.distributed import barrier
from tuner.export.validation import ValidationGallery


def _flat(tree: dict, prefix: str = "") -> dict:
    """A nested config as one level of ``a.b.c`` keys, values TensorBoard's hparams accept."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


class Monitor:
    def __init__(
        self,
        accelerator,
        trackers: list,
        every: int = 0,
        sample: Callable[[], torch.Tensor] | None = None,
        gallery=None,
        modules: list[torch.nn.Module] = (),
        parked=None,
        collective: bool = False,
    ):
        self.accelerator = accelerator
        # FSDP: every rank runs the sampling (each forward gathers the sharded weights), rank 0 keeps the images
        self.collective = collective
        self.trackers = trackers  # started accelerate trackers (rank 0 only)
        self.every = every if sample is not None else 0
        self.sample, self.gallery, self.modules = sample, gallery, list(modules)
        self.parked = parked  # modules in host memory while training (tuner/training/offload.py): back to sample

    def log(self, step: int, values: dict[str, float]) -> None:
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def due(self, step: int, total: int) -> bool:
        return self.every > 0 and (step % self.every == 0 or step == total)

    def validate(self, step: int) -> None:
        """Rank 0 samples and writes the row of ``step``; the other ranks wait for it (under FSDP they sample
        with it)."""
        main = self.accelerator.is_main_process
        if self.every and (main or self.collective):
            modes = [m.training for m in self.modules]
            rng = torch.get_rng_state()
            cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
            try:
                for module in self.modules:
                    module.eval()
                with self.parked.on_device() if self.parked is not None else contextlib.nullcontext():
                    images = self.sample()
                grid = self.gallery.add(step, images) if main else None
            finally:
                for module, mode in zip(self.modules, modes):
                    module.train(mode)
                torch.set_rng_state(rng)
                if cuda_rng is not None:
                    torch.cuda.set_rng_state_all(cuda_rng)
            if main:
                self._log_grid(step, grid)
        if self.every:
            barrier(self.accelerator)

    def _log_grid(self, step: int, path: Path) -> None:
        from PIL import Image

        with Image.open(path) as image:
            grid = np.asarray(image.convert("RGB"))
        for tracker in self.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({"validation": grid[None]}, step=step, dataformats="NHWC")
            elif hasattr(tracker, "log_images"):
                tracker.log_images({"validation": [grid]}, step=step)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()


def start_trackers(cfg, run_dir: Path, accelerator) -> list:
    """TensorBoard (``log.tensorboard``) and W&B (``log.wandb``) trackers, on rank 0; none elsewhere."""
    if not accelerator.is_main_process:
        return []
    from accelerate.tracking import TensorBoardTracker, WandBTracker
    from omegaconf import OmegaConf

    trackers = []
    if cfg.log.tensorboard:
        trackers.append(TensorBoardTracker("train", run_dir / "logs"))
    if cfg.log.wandb:
        trackers.append(WandBTracker(cfg.log.wandb_project, name=run_dir.name, dir=str(run_dir)))
    values = _flat(OmegaConf.to_container(cfg, resolve=True))
    for tracker in trackers:
        tracker.start()
        tracker.store_init_configuration(values)
    return trackers


def start(run, modules: list[torch.nn.Module], captions: list[str], parked=None) -> Monitor:
    """The train stage's monitor: trackers as configured, validation sampling as ``validation.*`` asks
    (``captions``: the training captions, the prompts when no other is given; ``parked``: the modules
    ``model.offload_frozen`` holds in host memory, brought back to sample)."""

    cfg = run.cfg
    v = cfg.validation
    trackers = start_trackers(cfg, run.dir, run.accelerator)
    if not v.every:
        return Monitor(run.accelerator, trackers)
    d, s = cfg.data, cfg.sample
    prompts = list(v.prompts) or list(s.prompts) or [p for p in (d.instance_prompt, d.class_prompt) if p]
    prompts = prompts or [c for c in captions if c][:2]
    if not prompts:
        print("[tuner] validation: no prompt (every caption is empty); set validation.prompts=[...]", flush=True)
        return Monitor(run.accelerator, trackers)
    seeds = list(v.seeds)
    steps = v.steps or s.steps
    guidance = s.guidance_scale if v.guidance_scale is None else v.guidance_scale
    every_prompt = [p for p in prompts for _ in seeds]

    def sample() -> torch.Tensor:
        desc = "validation" if run.is_main else None
        return run.sample(every_prompt, seeds * len(prompts), steps, guidance, desc=desc)

    gallery = ValidationGallery(run.dir / "validation", prompts, seeds, s.display_size)
    run.outputs["validation"] = str(run.dir / "validation" / "index.html")
    collective = run.strategy == "fsdp" and run.accelerator.num_processes > 1
    return Monitor(run.accelerator, trackers, v.every, sample, gallery, modules, parked, collective)
