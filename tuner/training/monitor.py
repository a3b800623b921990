"""What a training run shows while it runs.

- Logged values (loss, learning rate, gradient norm, samples/s) go to TensorBoard in ``RUN/logs/``
  (``tensorboard --logdir runs``) and, with ``log.wandb=true``, to Weights & Biases; accelerate's
  tracker classes do the writing.
- Every ``validation.every`` steps rank 0 samples fixed prompts at fixed seeds with the weights of that
  step and adds a row to ``RUN/validation/index.html`` (a grid PNG per step; the trackers get the grid).
  It also measures the step (``Measures``): the held-out loss (tuner/training/held_out.py) and the metrics of
  samples of the instance and class prompts (tuner/scoring.py), logged as ``val/...``, shown in the page's
  charts, and returned to the loop, which picks the best step and stops early on them
  (tuner/training/selection.py). Training is the same with or without validation: the models' modes and the
  RNG are put back afterwards, and the held-out loss draws from a generator of its own.
- An edit run (``Edits``: its data has pairs) samples ``validation.pairs`` fixed pairs instead of prompts, the
  held-out ones first: each row of the page shows every pair's edits at the fixed seeds, beside its control(s) and
  target (tuner/export/validation.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tuner import scoring
from tuner.distributed import decide
from tuner.errors import ConfigError
from tuner.export.validation import ValidationGallery


def _raise(error: Exception):
    raise error


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
        measure=None,
    ):
        self.accelerator = accelerator
        # FSDP: every rank runs the sampling (each forward gathers the sharded weights), rank 0 keeps the images
        self.collective = collective
        self.trackers = trackers  # started accelerate trackers (rank 0 only)
        self.every = every if sample is not None else 0
        self.sample, self.gallery, self.modules = sample, gallery, list(modules)
        self.parked = parked  # modules in host memory while training (tuner/training/offload.py): back to sample
        self.measure = measure  # a ``Measures``: the step's held-out loss and metrics
        self.last_loss: float | None = None  # the last logged training loss (the page charts it)

    def log(self, step: int, values: dict[str, float]) -> None:
        if "train/loss" in values:
            self.last_loss = values["train/loss"]
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def due(self, step: int, total: int) -> bool:
        return self.every > 0 and (step % self.every == 0 or step == total)

    def validate(self, step: int) -> dict[str, float]:
        """Rank 0 samples and writes the row of ``step``; the other ranks wait for it (under FSDP they sample
        with it). Returns the step's numbers (held-out losses, metrics), the same on every rank."""
        main, values, failed = self.accelerator.is_main_process, {}, None
        if self.every and (main or self.collective):
            try:
                values = self._validate_here(step, main)
            except Exception as e:  # every rank hears of it (below), none waits for rank 0 until the timeout
                failed = e
        if self.every:  # rank 0's numbers (and a barrier: the others wait for its page)
            values = decide(self.accelerator, lambda: _raise(failed) if failed is not None else values)
        if failed is not None:  # (under FSDP, another rank's own error)
            raise failed
        return values

    def _validate_here(self, step: int, main: bool) -> dict[str, float]:
        """Sample, measure and (rank 0) write the row of ``step``, the models' modes and the RNG put back."""
        modes = [m.training for m in self.modules]
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        try:
            for module in self.modules:
                module.eval()
            with self.parked.on_device() if self.parked is not None else contextlib.nullcontext():
                images = self.sample()
                values = self.measure(step) if self.measure is not None else {}
            shown = values | ({"train_loss": self.last_loss} if self.last_loss is not None and step else {})
            grid = self.gallery.add(step, images, shown) if main else None
        finally:
            for module, mode in zip(self.modules, modes):
                module.train(mode)
            torch.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
        if main:
            self._log_grid(step, grid)
            if values:
                self.log(step, {f"val/{k}": v for k, v in values.items()})
                print(f"[tuner] validation step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
        return values

    def state_dict(self) -> dict:
        return self.measure.state_dict() if self.measure is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.measure is not None and state:
            self.measure.load_state_dict(state)

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


@dataclass
class Edits:
    """An edit family's validation: the pairs it edits (``tuner.sampling.Pair``), how it draws them, and whether
    its pipeline draws nothing else (then a run without pairs samples no prompts)."""

    pairs: list
    sample: Callable[..., list[torch.Tensor]]  # (pairs, seeds, steps, guidance, desc=...) -> a tensor per pair
    required: bool = False


class Measures:
    """The numbers of a validation step: the held-out losses and the metrics of ``validation.samples`` samples of
    the instance and the class prompt (tuner/scoring.py; rank 0 scores them). Drift is measured from the untrained
    model's samples at step 0 (kept in checkpoints, so a resumed run measures from the same zero).

    Args:
        cfg: the run's config (the data's prompts, ``validation.*``, ``sample.*``, ``eval.*``).
        accelerator: accelerate's ``Accelerator`` (the device, autocast, which rank is the main one).
        sample: ``sample(prompts, seeds, steps, guidance, desc=...)``: images of the model as it is now.
        denoiser: the model the held-out loss runs.
        held_out: a ``HeldOutLoss`` (tuner/training/held_out.py), or None.
        encode: the conditioning of token ids, when the text encoder trains (None: captions are embeddings).
        scorer: makes the ``Scorer`` (``tuner.scoring.scorer`` of the subject's real images) on first use.
        judged: the metrics the embedded base's judge gives, if it has one.
    """

    def __init__(self, cfg, accelerator, sample, denoiser, held_out=None, encode=None, scorer=None, judged=frozenset()):
        self.cfg, self.accelerator, self.sample, self.denoiser = cfg, accelerator, sample, denoiser
        self.held_out, self.encode, self._make_scorer = held_out, encode, scorer
        self.scores = bool(scoring.available(cfg, judged) - {"val_loss", "val_loss_class"})
        self.seeds = [cfg.eval.seed + i for i in range(cfg.validation.samples)]
        self.reference: float | None = None  # the base's class similarity: drift's zero
        self._scorer, self._loaded, self._said = None, False, False

    def scorer(self):
        if not self._loaded:
            self._loaded = True
            self._scorer = self._make_scorer() if self._make_scorer is not None else None
        return self._scorer

    def __call__(self, step: int) -> dict[str, float]:
        a, out = self.accelerator, {}
        if self.held_out is not None:
            out |= self.held_out(self.denoiser, a.device, a.autocast, self.encode)
        if not self.scores:
            return out
        d, v, s = self.cfg.data, self.cfg.validation, self.cfg.sample
        prompts = [p for p in (d.instance_prompt, d.class_prompt) if p]
        n = len(self.seeds)
        guidance = s.guidance_scale if v.guidance_scale is None else v.guidance_scale
        desc = "validation metrics" if a.is_main_process else None
        images = self.sample([p for p in prompts for _ in self.seeds], self.seeds * len(prompts), v.steps or s.steps,
                             guidance, desc=desc)  # fmt: skip
        if not a.is_main_process:
            return out
        scorer = self.scorer()
        instance, classes = images[:n], (images[n:] if d.class_prompt else None)
        if classes is not None and step == 0:
            self.reference = scorer.class_similarity(classes)
        elif classes is not None and self.reference is None and not self._said:
            self._said = True
            print("[tuner] validation: no step-0 samples of the untrained model in this run: drift is not measured")
        return out | scorer.score(instance, classes, self.reference)

    def state_dict(self) -> dict:
        return {"reference": self.reference}

    def load_state_dict(self, state: dict) -> None:
        self.reference = state.get("reference")


def start(
    cfg,
    folder: Path,
    accelerator,
    sample: Callable[..., torch.Tensor],
    modules: list[torch.nn.Module] = (),
    captions: list[str] = (),
    parked=None,
    measure: Measures | None = None,
    collective: bool = False,
    edits: Edits | None = None,
) -> Monitor:
    """The train stage's monitor: trackers as configured (in ``folder/logs``), validation sampling as
    ``validation.*`` asks, its page in ``folder/validation``.

    Args:
        cfg: the run's config (``log.*``, ``validation.*``, ``sample.*``, the data's prompts).
        folder: the run folder.
        accelerator: accelerate's ``Accelerator``.
        sample: ``sample(prompts, seeds, steps, guidance, desc=...)``: images of the model as it is now.
        modules: the modules sampling puts in eval mode (and back in their mode afterwards).
        captions: the training captions, the prompts when no other is given.
        parked: the modules ``model.offload_frozen`` holds in host memory (``Parked``), brought back to sample.
        measure: the step's numbers (``Measures``).
        collective: FSDP with several processes: every rank samples (each forward gathers the sharded weights).
        edits: an edit family's pairs: sampled instead of prompts where there are any.

    Raises:
        ConfigError: ``checkpoints.select`` or ``train.early_stop`` and no prompt to validate with.
    """
    v = cfg.validation
    trackers = start_trackers(cfg, folder, accelerator)
    if not v.every:
        return Monitor(accelerator, trackers)
    d, s = cfg.data, cfg.sample
    if edits is not None and (edits.pairs or edits.required):
        return _edit_monitor(cfg, folder, accelerator, trackers, edits, modules, parked, collective, measure)
    prompts = list(v.prompts) or list(s.prompts) or [p for p in (d.instance_prompt, d.class_prompt) if p]
    prompts = prompts or [c for c in captions if c][:2]
    if not prompts:
        if cfg.checkpoints.select or cfg.train.early_stop.max_drift is not None:
            raise ConfigError(
                "checkpoints.select / train.early_stop judge validation steps, and this run has no prompt to validate "
                "with (every caption is empty): set validation.prompts=[...]"
            )
        print("[tuner] validation: no prompt (every caption is empty); set validation.prompts=[...]", flush=True)
        return Monitor(accelerator, trackers)
    seeds = list(v.seeds)
    steps = v.steps or s.steps
    guidance = s.guidance_scale if v.guidance_scale is None else v.guidance_scale
    every_prompt = [p for p in prompts for _ in seeds]

    def sample_prompts() -> torch.Tensor:
        desc = "validation" if accelerator.is_main_process else None
        return sample(every_prompt, seeds * len(prompts), steps, guidance, desc=desc)

    gallery = ValidationGallery(folder / "validation", prompts, seeds, s.display_size)
    return Monitor(accelerator, trackers, v.every, sample_prompts, gallery, modules, parked, collective, measure)


def _edit_monitor(cfg, folder, accelerator, trackers, edits: Edits, modules, parked, collective, measure) -> Monitor:
    """``start``'s monitor of an edit run: the fixed pairs edited at ``validation.seeds`` every step."""
    v, s = cfg.validation, cfg.sample
    if edits.required and measure is not None and measure.scores:  # they sample the prompts alone
        measure.scores = False
        print("[tuner] validation: this family only edits: no sample metrics (the held-out loss stays)", flush=True)
    if not edits.pairs:
        print("[tuner] validation: no pair to edit (the prepared data has no control); no samples", flush=True)
        return Monitor(accelerator, trackers, measure=measure)
    seeds, steps = list(v.seeds), v.steps or s.steps
    guidance = s.guidance_scale if v.guidance_scale is None else v.guidance_scale

    def sample_pairs() -> list[torch.Tensor]:
        desc = "validation" if accelerator.is_main_process else None
        return edits.sample(edits.pairs, seeds, steps, guidance, desc=desc)

    labels = [f"{p.label}: {p.prompt}" if p.label else p.prompt for p in edits.pairs]
    gallery = ValidationGallery(folder / "validation", labels, seeds, s.display_size, edits.pairs)
    return Monitor(accelerator, trackers, v.every, sample_pairs, gallery, modules, parked, collective, measure)
