"""The state a run's stages share (``Run``: config, run folder, accelerator, the loaded model) and
the ``stage`` declaration (which processes run it, which entries of the run folder it writes).

The base model is resolved here: ``model.path`` (a folder, or a single file converted once) or the
embedded digits base, built once and cached under $TUNER_HOME.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from functools import cached_property
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from tuner import run_folder, sampling
from tuner.errors import ConfigError
from tuner.files import atomic_dir, write_atomic
from tuner.models import get_family


def stage(fn=None, *, main_only: bool = False, writes: tuple[str, ...] = ()):
    """Declare a stage: ``main_only``, rank 0 runs it alone (sampling for people, exports); ``writes``, the
    entries of the run folder it writes (the manifest lists them before the run starts, see run_folder.py).
    The stages a recipe may name are listed in tuner/stages/__init__.py."""

    def declare(fn):
        fn.main_only, fn.writes = main_only, tuple(writes)
        return fn

    return declare(fn) if fn is not None else declare


class Run:
    """The state one recipe's stages share: config, run folder, accelerator, loaded model."""

    def __init__(self, cfg: DictConfig, declared: tuple[str, ...]):
        """``declared``: the entries of the run folder this run's stages write (``tuner.stages.entries``)."""
        from tuner import distributed

        self.cfg = cfg
        self.family = get_family(cfg.model.family, cfg.model)
        t = cfg.train
        self.accelerator = distributed.make_accelerator(t.mixed_precision, t.gradient_accumulation_steps)
        if self.accelerator.mixed_precision != "no" and not self.accelerator.native_amp:
            raise ConfigError(
                f"train.mixed_precision={cfg.train.mixed_precision}: accelerate cannot autocast to it on "
                f"{self.accelerator.device.type}; use bf16 (CPUs) or no"
            )
        # the run folder is rank 0's: a timestamp (or ${now:...} in output_dir) differs from rank to rank
        self.dir = Path(distributed.decide(self.accelerator, lambda: self._new_folder(cfg, declared)))
        if self.dir != Path(cfg.output_dir or self.dir).expanduser().resolve():
            print(f"[tuner] output_dir resolved differently on this rank; using rank 0's {self.dir}", flush=True)
        cfg.output_dir = str(self.dir)
        distributed.check_visible(self.accelerator, self.dir / "config.yaml", "the run folder's config")
        self.outputs: dict[str, str] = {}
        self.metrics: dict[str, object] = {}
        # the train or load_adapter stage changed base weights or the vocabulary (not just peft adapters),
        # so "base" samples need a fresh copy of the base rather than adapters switched off
        self.base_weights_changed = False
        self.trainables = None  # set by the train stage: what trained
        self.new_tokens: list[str] = []  # tokens added to the vocabulary (trained or loaded), in order
        self.files: dict[str, dict] = {}  # set by the export stage: every file written, with its sha256
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    @staticmethod
    def _new_folder(cfg: DictConfig, declared: tuple[str, ...]) -> str:
        """Rank 0 names and claims the run folder (see tuner/run_folder.py) and writes its config."""
        if cfg.output_dir:
            folder = Path(cfg.output_dir).expanduser().resolve()
        else:  # a new folder: never one that exists (two runs started in the same second)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            names = (f"{cfg.recipe}-{stamp}{f'-{k}' if k else ''}" for k in itertools.count())
            folder = next(f for f in (Path("runs").resolve() / n for n in names) if not f.exists())
        run_folder.claim(folder, cfg, declared)
        write_atomic(folder / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        return str(folder)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def wait(self) -> None:
        """Every rank waits here for the others (rank 0 has written what they read next)."""
        from tuner.distributed import barrier

        barrier(self.accelerator)

    @property
    def home(self) -> Path:
        return Path(self.cfg.home or os.environ.get("TUNER_HOME") or "~/.cache/tuner").expanduser()

    @cached_property
    def model_path(self) -> Path:
        """The base model folder: ``model.path`` (a single file converted once), or the embedded digits
        base (built on first use)."""
        if self.cfg.model.path and Path(self.cfg.model.path).expanduser().is_file():
            from tuner.distributed import decide

            return Path(decide(self.accelerator, lambda: str(single_file_base(self))))
        if self.cfg.model.path:
            return self.family.check_folder(self.cfg.model.path, self.cfg.model.allow_pickle)
        if self.cfg.model.builtin == "digits":
            return ensure_digits_base(self)
        raise ConfigError("model.path is not set: pass model.path=/path/to/a/diffusers/pipeline/folder")

    @cached_property
    def components(self):
        c = self.family.load(self.model_path, self.cfg.model.prediction_type, self.cfg.model.allow_pickle)
        for module in c.modules().values():
            module.to(self.accelerator.device)
        return c

    @cached_property
    def pipe(self):
        return self.family.pipeline(self.components)

    def sample_with(self, pipe, jobs, call: dict) -> torch.Tensor:
        """Images for ``generate`` jobs that share their settings (one pipeline call)."""
        first = jobs[0]
        prompts, seeds = [j.prompt for j in jobs], [j.seed for j in jobs]
        negative = [j.negative for j in jobs] if any(j.negative for j in jobs) else None
        return sampling.generate(
            pipe, prompts, seeds, first.height, first.steps, first.guidance, len(jobs), None,
            self.accelerator.autocast, negative_prompts=negative, width=first.width, decode=self.family.decode,
            **self.family.call_kwargs(), **call,
        )  # fmt: skip

    def sample(self, prompts: list[str], seeds: list[int], steps: int, guidance: float, desc=None, pipe=None):
        resolution, batch = self.cfg.data.resolution, self.cfg.sample.batch_size
        pipe = pipe or self.pipe
        return sampling.generate(
            pipe, prompts, seeds, resolution, steps, guidance, batch, desc, self.accelerator.autocast,
            decode=self.family.decode, **self.family.call_kwargs(),
        )  # fmt: skip


def cache_key(*parts: str) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def single_file_base(run: Run) -> Path:
    """``model.path`` is a single-file checkpoint: its diffusers folder, converted once by diffusers'
    own loader (with ``model.config``'s configs and tokenizers) and kept under $TUNER_HOME/single_file/,
    named by the file's path, size and modification time and by the config folder."""
    from tuner.files import atomic_dir

    m = run.cfg.model
    file = Path(m.path).expanduser().resolve()
    stat = file.stat()
    key = cache_key(str(file), str(stat.st_size), str(stat.st_mtime_ns), str(Path(m.config).expanduser().resolve()))
    folder = run.home / "single_file" / f"{file.stem}-{key}"
    if (folder / "model_index.json").is_file():
        print(f"[tuner] base: {file.name} as converted before, {folder}", flush=True)
        return folder
    from tuner.export.reading import check_header

    check_header(file, "a base model")
    print(f"[tuner] base: converting the single file {file} to a diffusers folder {folder}", flush=True)
    with atomic_dir(folder) as tmp:
        run.family.from_single_file(file, run.family.check_config_folder(m.config), tmp)
    return folder


def digits_base_folder(run: Run) -> Path:
    """Where the base built with these ``base`` settings is cached: a new setting, a new build."""
    from tuner.models.tiny import SIZES

    settings = json.dumps(OmegaConf.to_container(run.cfg.base, resolve=True), sort_keys=True)
    architecture = repr(SIZES.get(run.cfg.base.size))
    key = hashlib.sha256(f"digits-v1|{settings}|{architecture}".encode()).hexdigest()[:12]
    return run.home / "bases" / f"digits-{key}"


def ensure_digits_base(run: Run) -> Path:
    """The cached digits base, built first if missing: by every rank together, saved by rank 0."""
    from tuner import distributed
    from tuner.training import digits_base

    folder = digits_base_folder(run)
    if distributed.decide(run.accelerator, lambda: (folder / "model_index.json").is_file()):
        print(f"[tuner] digits base: cached at {folder}", flush=True)
        distributed.check_visible(run.accelerator, folder / "model_index.json", "the digits base")
        return folder
    print(f"[tuner] digits base: training it once, into {folder}", flush=True)
    start = time.time()
    if run.is_main:
        with atomic_dir(folder) as tmp:
            stats = digits_base.build(run.cfg.base, tmp, run.accelerator)
            stats["build_seconds"] = round(time.time() - start, 1)
            write_atomic(tmp / "tuner_base.json", json.dumps(stats, indent=2))
    else:  # the same training, its slice of every batch; rank 0 saves
        stats = digits_base.build(run.cfg.base, None, run.accelerator)
    run.accelerator.free_memory()  # drop the base's optimizer and EMA before anything else trains
    run.wait()
    distributed.check_visible(run.accelerator, folder / "model_index.json", "the digits base")
    run.metrics["base_build"] = stats
    return folder
