"""What a run's stages share: ``Run`` (the read-only config, the run folder, the accelerator, the
results of the stages so far, the model loaded from the base stage's folder), the results stages
return (``Base``, ``Subject``, ``Adapted``), and the ``stage`` declaration (which processes run it,
which stages must come before it, which entries of the run folder it writes).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import NamedTuple, TypeVar

import torch
from omegaconf import DictConfig, OmegaConf

from tuner import distributed, run_folder, sampling
from tuner.errors import ConfigError
from tuner.files import write_atomic
from tuner.generation import Job, refine
from tuner.models import get_family, samplers
from tuner.training.trainables import Trainables


def stage(
    fn=None,
    *,
    main_only: bool = False,
    after: tuple[str, ...] = (),
    writes: tuple[str, ...] = (),
    check: Callable[[DictConfig], None] | None = None,
):
    """Declare a stage.

    Args:
        main_only: rank 0 runs it alone (sampling for people, exports).
        after: stages that must come before it in ``stages:``; ``"train|load_adapter"`` means either
            (``tuner.checks`` refuses a recipe that breaks this, naming the stage to add).
        writes: the entries of the run folder it writes (the manifest lists them before the run
            starts, see run_folder.py).
        check: the stage's own checks of a composed config, run before anything loads when the
            recipe names the stage; raises ``ConfigError`` naming the key and the fix.

    The stages a recipe may name are listed in tuner/runner.py (STAGES).
    """

    def declare(fn):
        fn.main_only, fn.after, fn.writes, fn.check = main_only, tuple(after), tuple(writes), check
        return fn

    return declare(fn) if fn is not None else declare


@dataclass(frozen=True)
class Base:
    """The base stage's result: the diffusers folder every later stage loads the base model from."""

    folder: Path


@dataclass(frozen=True)
class Subject:
    """The subject stage's result: the folder of instance images it wrote (the prepare stage reads it)."""

    folder: Path


@dataclass(frozen=True)
class Adapted:
    """What the train or load_adapter stage put on the base model.

    ``trainables`` is what trained (None when loaded from a checkpoint); ``new_tokens`` the tokens added
    to the vocabulary, in order; ``base_weights_changed`` says base weights or the vocabulary changed
    (not only peft adapters), so "base" samples need a fresh copy of the base rather than the adapters
    switched off.
    """

    trainables: Trainables | None = None
    new_tokens: tuple[str, ...] = ()
    base_weights_changed: bool = False
    fused: bool = False  # an adapter was fused into the base weights (recipe=lora_merge merge.into_base=true)


@dataclass(frozen=True)
class Made:
    """How a LoRA toolbox stage (tuner/stages/toolbox.py) made what the export stage writes: the model card's
    account of it."""

    description: str  # the card's first sentence ends with it, e.g. "merged by tuner from 2 LoRAs"
    lines: tuple[str, ...]  # markdown: the card's "How it was made" section
    triggers: tuple[str, ...] = ()
    gallery: str = ""  # what the gallery's rows are


@dataclass(frozen=True)
class Exported:
    """The export stage's result: every file written (path in the run folder -> bytes, sha256, model hash)."""

    files: dict[str, dict] = field(default_factory=dict)


Result = TypeVar("Result")


class Builtin(NamedTuple):
    """An embedded base (``model.builtin=NAME``): ``ensure(run)`` builds or reuses it and returns its
    folder; ``check(cfg)`` checks its settings before anything loads. It may bring a judge of its samples
    (tuner/scoring.py's ``Judge``): ``judge(cfg, subject_images)`` makes it, ``judged(cfg)`` names the metrics it
    gives for ``cfg``'s prompts."""

    ensure: Callable[[Run], Path]
    check: Callable[[DictConfig], None]
    judge: Callable[[DictConfig, list], object] | None = None
    judged: Callable[[DictConfig], set[str]] = lambda cfg: set()


class Run:
    """The state one recipe's stages share: config, run folder, accelerator, loaded model."""

    def __init__(self, cfg: DictConfig, declared: tuple[str, ...], builtins: dict[str, Builtin] | None = None):
        """Name and claim the run folder, then make ``cfg`` read-only: stages read the configuration,
        they never write it.

        Args:
            cfg: the checked configuration (``tuner.checks.validate``).
            declared: the entries of the run folder this run's stages write (``tuner.runner.entries``).
            builtins: the embedded bases ``model.builtin`` may name (``tuner.runner.BUILTINS``).
        """

        self.family = get_family(cfg.model.family, cfg.model)
        self.builtins = builtins or {}
        t = cfg.train
        # FSDP2 or DDP (tuner/training/sharding.py): read before accelerate starts, which must not shard itself
        self.strategy, self.reshard_after_forward = distributed.sharding(
            cfg.distributed.strategy, cfg.distributed.reshard_after_forward
        )
        cfg.distributed.strategy, cfg.distributed.reshard_after_forward = self.strategy, self.reshard_after_forward
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
        OmegaConf.set_readonly(cfg, True)
        self.cfg = cfg
        distributed.check_visible(self.accelerator, self.dir / "config.yaml", "the run folder's config")
        self.results: dict[type, object] = {}  # each stage's result, by its type (see ``result``)
        # the run's report (summary.json): what each stage wrote where, and what it measured
        self.outputs: dict[str, str] = {}
        self.metrics: dict[str, object] = {}
        self.feature_models: dict = {}  # eval.clip / eval.dino, loaded once for validation and evaluate
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    def result(self, kind: type[Result]) -> Result:
        """The result of the stage that returns ``kind`` (``tuner.checks`` made sure that stage ran first)."""
        if kind not in self.results:
            raise ConfigError(f"no earlier stage produced a {kind.__name__}; see the stage order in tuner/runner.py")
        return self.results[kind]  # type: ignore[return-value]

    @property
    def adapted(self) -> Adapted:
        """What the train or load_adapter stage put on the base (nothing, if neither ran)."""
        return self.results.get(Adapted, Adapted())  # type: ignore[return-value]

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
        as_run = OmegaConf.merge(cfg, {"output_dir": str(folder)})
        write_atomic(folder / "config.yaml", OmegaConf.to_yaml(as_run, resolve=True))
        return str(folder)

    def _builtin(self) -> Builtin | None:
        m = self.cfg.model
        return self.builtins.get(m.builtin) if m.builtin and not m.path else None

    def judged(self) -> set[str]:
        """The metrics the embedded base's judge gives (none on a user's base)."""
        builtin = self._builtin()
        return builtin.judged(self.cfg) if builtin is not None else set()

    def judge(self, subject_images: list):
        """The embedded base's judge of samples, fit to the subject's images; None on a user's base."""
        builtin = self._builtin()
        return builtin.judge(self.cfg, subject_images) if builtin is not None and builtin.judge else None

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def wait(self) -> None:
        """Every rank waits here for the others (rank 0 has written what they read next)."""
        distributed.barrier(self.accelerator)

    @property
    def home(self) -> Path:
        return home_of(self.cfg)

    @property
    def cache_dir(self) -> Path:
        return cache_dir_of(self.cfg)

    @property
    def base(self) -> Path:
        """The base model's diffusers folder, as the base stage resolved it."""
        return self.result(Base).folder

    @property
    def offload_frozen(self) -> bool:
        """``model.offload_frozen``, resolved: null is on where the device is an accelerator."""
        m = self.cfg.model
        return self.accelerator.device.type != "cpu" if m.offload_frozen is None else m.offload_frozen

    @cached_property
    def components(self):
        """The base model, on the device; with ``model.offload_frozen`` in host memory until a stage asks for
        parts of it (the train stage: the encoders to cache their outputs, then the denoiser), so the denoiser
        and the text encoders are never on the device together before sampling needs them."""
        c = self.family.load(self.base, self.cfg.model.prediction_type, self.cfg.model.allow_pickle)
        self._quantize(c)
        for module in c.modules().values():
            module.to("cpu" if self.offload_frozen else self.accelerator.device)
        return c

    def _quantize(self, c) -> None:
        """``model.quantize`` / ``quantize_text_encoders``: the frozen linear layers as bitsandbytes' layers,
        quantized as they move to the device (QLoRA); they compute in the run's mixed precision."""
        from tuner.models.quantize import quantize_linears
        from tuner.training.trainables import MIXED_PRECISION_DTYPES

        m = self.cfg.model
        kinds = {c.denoiser_name: m.quantize} | {name: m.quantize_text_encoders for name in c.text_encoders}
        dtype = MIXED_PRECISION_DTYPES[self.cfg.train.mixed_precision]
        for name, module in c.modules().items():
            if kinds.get(name):
                keep = self.family.QUANTIZE_KEEP if name == c.denoiser_name else ()
                count = quantize_linears(module, kinds[name], self.accelerator.device, dtype, keep)
                if self.accelerator.is_main_process:
                    print(f"[tuner] model: {name}'s {count} linear layers held as {kinds[name]}", flush=True)

    @cached_property
    def pipe(self):
        """The family's pipeline of the run's modules, all of them on the device."""
        for module in self.components.modules().values():
            module.to(self.accelerator.device)
        return self.family.pipeline(self.components)

    def replaced_modules(self) -> None:
        """A stage put other modules into ``components`` (after FSDP, the whole ones gathered from the shards):
        the next ``pipe`` is built around them."""
        self.__dict__.pop("pipe", None)

    def sample_with(self, pipe, jobs, call: dict) -> torch.Tensor:
        """Images for ``generate`` jobs that share their settings (one pipeline call)."""
        first = jobs[0]
        prompts, seeds = [j.prompt for j in jobs], [j.seed for j in jobs]
        negative = [j.negative for j in jobs] if any(j.negative for j in jobs) else None
        return sampling.sample_images(
            pipe, prompts, seeds, first.height, first.steps, first.guidance, len(jobs), None,
            self.accelerator.autocast, negative_prompts=negative, width=first.width, decode=self.family.decode,
            guidance=self.family.guidance_kwargs, **self.family.call_kwargs(), **call,
        )  # fmt: skip

    def sample(
        self, prompts: list[str], seeds: list[int], steps: int, guidance: float, desc=None, pipe=None, refiner=None
    ):
        """Images (N, 3, H, W) in [-1, 1] at the base's sampler (``samplers.default``: its own scheduler where the
        family's pipeline draws with it); ``refiner``: an SDXL refiner draws the last steps after the base's first
        ``sample.refiner_start`` (the gallery's ``sample.refiner``), with the same sampler."""
        resolution, batch = self.cfg.data.resolution, self.cfg.sample.batch_size
        pipe = pipe or self.pipe
        if refiner is not None:
            return self._refined(pipe, refiner, prompts, seeds, steps, guidance, desc)
        return sampling.sample_images(
            pipe, prompts, seeds, resolution, steps, guidance, batch, desc, self.accelerator.autocast,
            decode=self.family.decode, guidance=self.family.guidance_kwargs, **self.family.call_kwargs(),
        )  # fmt: skip

    def _refined(self, pipe, refiner, prompts, seeds, steps, guidance, desc) -> torch.Tensor:
        from tqdm.auto import tqdm

        name, size = samplers.default(self.family, self.components).name, self.cfg.data.resolution  # the base's
        refiner.scheduler = samplers.scheduler(name, self.family, refiner.scheduler.config)
        jobs = [Job(p, "", size, size, seed, guidance, steps, name) for p, seed in zip(prompts, seeds)]
        images, batch = [], self.cfg.sample.batch_size
        for start in tqdm(range(0, len(jobs), batch), desc=desc, disable=desc is None):
            with torch.no_grad(), self.accelerator.autocast():
                chunk = jobs[start : start + batch]
                images.append(refine(pipe, refiner, chunk, self.cfg.sample.refiner_start, self.family.decode))
        return torch.cat(images)

    def load_refiner(self, components=None):
        """``sample.refiner``'s pipeline on this process's device, or None. Its CLIP-G is the base's: it gets the
        new tokens of ``components`` (the run's own when None)."""
        path = self.cfg.sample.refiner
        if not path:
            return None
        return self.family.refiner_pipeline(
            Path(path).expanduser(), self.accelerator.device, components or self.components
        )


def home_of(cfg: DictConfig) -> Path:
    """Tuner's own folder: ``home``, else $TUNER_HOME, else ~/.cache/tuner (embedded bases, the cache)."""
    return Path(cfg.home or os.environ.get("TUNER_HOME") or "~/.cache/tuner").expanduser()


def cache_dir_of(cfg: DictConfig) -> Path:
    """Where frozen outputs are cached for every run (``cache.dir``, else $TUNER_HOME/cache)."""
    return Path(cfg.cache.dir).expanduser() if cfg.cache.dir else home_of(cfg) / "cache"
