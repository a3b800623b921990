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
from pathlib import Path

from omegaconf import DictConfig

from tuner.distributed import barrier_timeout
from tuner.errors import ConfigError
from tuner.export.reading import check_peft_folders
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
    """Every stage is known, listed once, and comes after the stages it needs (``@stage(after=...)``)."""
    stages = list(cfg.stages)
    if not stages:
        example = ",".join(_recipe_stages(cfg))
        raise ConfigError(f"stages=[] runs nothing: list the stages to run, e.g. stages=[{example}]")
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"stages: unknown stage(s) {unknown}; known: {', '.join(STAGES)}")
    twice = [s for s in dict.fromkeys(stages) if stages.count(s) > 1]
    if twice:
        raise ConfigError(
            f"stages=[{','.join(stages)}]: {', '.join(twice)} listed more than once; each stage runs once, "
            f"e.g. stages=[{','.join(stage_order(stages))}]"
        )
    for i, name in enumerate(stages):
        for need in STAGES[name].after:
            choices = need.split("|")
            if not any(c in stages[:i] for c in choices):
                need = " or ".join(choices)
                raise ConfigError(
                    f"stages=[{','.join(stages)}]: {name} needs {need} before it; "
                    f"e.g. stages=[{','.join(stage_order(stages))}]"
                )


def stage_order(stages: list[str]) -> list[str]:
    """``stages`` each once, with the stages they need and lack (the first of ``a|b``, unless one is listed), in
    the order of the registry (tuner/runner.py's ``STAGES``: each after the stages it needs)."""
    wanted = list(dict.fromkeys(stages))
    for name in list(wanted):
        _add_needs(name, wanted)
    return sorted(wanted, key=list(STAGES).index)


def _add_needs(name: str, wanted: list[str]) -> None:
    for need in STAGES[name].after:
        choices = need.split("|")
        if not any(c in wanted for c in choices):
            wanted.append(choices[0])
            _add_needs(choices[0], wanted)


def _recipe_stages(cfg: DictConfig) -> list[str]:
    """The stages the recipe itself lists (its preset, without the command line's overrides)."""
    from tuner.compose import compose

    try:
        return list(compose(cfg.recipe).stages) or ["base"]
    except ConfigError:
        return ["base"]


def _check_every_run(cfg: DictConfig) -> None:
    """Settings every run reads: logging, validation sampling, the adapter's shape."""
    if not cfg.validation.seeds:
        raise ConfigError("validation.seeds is empty: give the seeds validation samples at, e.g. [0,1]")
    if cfg.log.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("log.wandb=true needs the wandb package: pip install wandb (or log.wandb=false)")
    if cfg.log.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("log.tensorboard=true needs the tensorboard package: pip install tensorboard")
    barrier_timeout()  # TUNER_BARRIER_TIMEOUT, read by every run with several processes
    # the peft configs of the adapters a run loads (merge.inputs: read whole by the merge stage's check)
    if cfg.checkpoint:
        check_peft_folders(Path(cfg.checkpoint), "checkpoint")
    if "generate" in cfg.stages:
        for k, a in enumerate(cfg.generate.adapters):
            check_peft_folders(Path(a.path), f"generate.adapters[{k}].path")


def _check_resume(cfg: DictConfig) -> None:
    """resume=auto needs the run folder (output_dir); resume=PATH names its own (see tuner/compose.py)."""
    if "train" not in cfg.stages:
        raise ConfigError(f"resume={cfg.resume}: recipe {cfg.recipe} does not train")
    if cfg.resume == "auto" and not cfg.output_dir:
        raise ConfigError("resume=auto continues the run in output_dir: pass output_dir=RUN_FOLDER too")
