"""Every check of a composed configuration, before anything loads. Each check sits beside what it checks;
``validate`` runs them in order:

1. the numbers, by key (tuner/numbers.py's rule table), and the settings every run reads;
2. the recipe's stages: known, in an order where each comes after the stages it needs, then each stage's
   own ``check`` (tuner/stages/*, tuner/digits/stages.py);
3. the embedded base (``model.builtin``), the model family (tuner/models/checks.py), resume;
4. the run folder (tuner/run_folder.py), on rank 0.

Closed vocabularies are Enums in the schema (tuner/choices.py): a value outside one fails at compose time.
A check raises ``ConfigError`` naming the key, the value and the fix. This module sits above the runner,
whose registry says what each stage needs and writes, and below the command line.
"""

from __future__ import annotations

import importlib.util
import os

from omegaconf import DictConfig

from tuner.errors import ConfigError
from tuner.models import checks as family_checks
from tuner.numbers import check_numbers
from tuner.run_folder import check_output_dir, refuse_inside_inputs
from tuner.runner import BUILTINS, STAGES, entries
from tuner.stages.context import cache_dir_of
from tuner.training import selection
from tuner.training.cache import check_cache_dir


def validate(cfg: DictConfig) -> None:
    """Check what the schema cannot, before anything heavy loads.

    Raises:
        ConfigError: naming the key and the fix.
    """
    check_numbers(cfg)
    _check_every_run(cfg)
    _check_stages(cfg)
    for name in cfg.stages:
        if STAGES[name].check is not None:
            STAGES[name].check(cfg)
    if not cfg.model.path and cfg.model.builtin:
        if cfg.model.builtin not in BUILTINS:
            raise ConfigError(f"model.builtin={cfg.model.builtin}: choose one of {', '.join(BUILTINS)}, or null")
        BUILTINS[cfg.model.builtin].check(cfg)
    family_checks.check(cfg)
    if "train" in cfg.stages:  # the metrics it selects and stops on exist in this run
        builtin = BUILTINS.get(cfg.model.builtin) if cfg.model.builtin and not cfg.model.path else None
        selection.check(cfg, builtin.judged(cfg) if builtin is not None else set())
    if cfg.resume is not None:
        _check_resume(cfg)
    if "train" in cfg.stages:  # its encoders' outputs go to the shared cache, where old entries are evicted
        key = f"cache.dir={cfg.cache.dir}" if cfg.cache.dir else "the cache ($TUNER_HOME/cache)"
        refuse_inside_inputs(cfg, cache_dir_of(cfg), key)
        check_cache_dir(cache_dir_of(cfg), key)
    if os.environ.get("RANK", "0") == "0":  # several processes: rank 0's check, before it writes the folder
        check_output_dir(cfg, entries(cfg), {name for s in STAGES.values() for name in s.writes})


def _check_stages(cfg: DictConfig) -> None:
    """Every stage is known and comes after the stages it needs (``@stage(after=...)``)."""
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"stages: unknown stage(s) {unknown}; known: {', '.join(STAGES)}")
    stages = list(cfg.stages)
    for i, name in enumerate(stages):
        for need in STAGES[name].after:
            choices = need.split("|")
            if not any(c in stages[:i] for c in choices):
                fixed = ",".join([*stages[:i], choices[0], *stages[i:]])
                need = " or ".join(choices)
                raise ConfigError(f"stages=[{','.join(stages)}]: {name} needs {need} before it; e.g. stages=[{fixed}]")


def _check_every_run(cfg: DictConfig) -> None:
    """Settings every run reads: logging, validation sampling, the adapter's shape."""
    if not cfg.validation.seeds:
        raise ConfigError("validation.seeds is empty: give the seeds validation samples at, e.g. [0,1]")
    if cfg.log.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("log.wandb=true needs the wandb package: pip install wandb (or log.wandb=false)")
    if cfg.log.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("log.tensorboard=true needs the tensorboard package: pip install tensorboard")


def _check_resume(cfg: DictConfig) -> None:
    """resume=auto needs the run folder (output_dir); resume=PATH names its own (see tuner/compose.py)."""
    if "train" not in cfg.stages:
        raise ConfigError(f"resume={cfg.resume}: recipe {cfg.recipe} does not train")
    if cfg.resume == "auto" and not cfg.output_dir:
        raise ConfigError("resume=auto continues the run in output_dir: pass output_dir=RUN_FOLDER too")
