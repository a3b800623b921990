"""Every check of a composed configuration, before anything loads. Each check sits beside what it checks;
``validate`` runs them in order:

1. the numbers, by key (tuner/numbers.py's rule table);
2. the closed vocabularies not yet in the schema, and the choices that apply to every run;
3. the recipe's stages: known, in an order where each comes after the stages it needs, then each stage's
   own ``check`` (tuner/stages/*, tuner/digits/stages.py);
4. the embedded base (``model.builtin``), the model family (tuner/models/checks.py), resume;
5. the run folder (tuner/run_folder.py), on rank 0.

A check raises ``ConfigError`` naming the key, the value and the fix. This module sits above the runner,
whose registry says what each stage needs and writes, and below the command line.
"""

from __future__ import annotations

import importlib.util
import os

from omegaconf import DictConfig

from tuner.config import ADAPTER_TYPES, LR_SCHEDULERS, OPTIMIZERS, SOURCE_KINDS, TARGET_PRESETS
from tuner.errors import ConfigError
from tuner.export.formats import DTYPES, FORMATS
from tuner.generate import SCHEDULERS
from tuner.models import checks as family_checks
from tuner.numbers import check_numbers
from tuner.run_folder import check_output_dir
from tuner.runner import BUILTINS, STAGES, entries


def validate(cfg: DictConfig) -> None:
    """Check what the schema cannot, before anything heavy loads.

    Raises:
        ConfigError: naming the key and the fix.
    """
    check_numbers(cfg)
    _check_vocabularies(cfg)
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
    if cfg.resume is not None:
        _check_resume(cfg)
    if os.environ.get("RANK", "0") == "0":  # several processes: rank 0's check, before it writes the folder
        check_output_dir(cfg, entries(cfg))


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
                raise ConfigError(f"stages={stages}: {name} needs {need} before it; e.g. stages=[{fixed}]")


def _check_every_run(cfg: DictConfig) -> None:
    """Settings every run reads: logging, validation sampling, the adapter's shape."""
    v = cfg.validation
    if v.every < 0 or not v.seeds or (v.steps is not None and v.steps < 1):
        raise ConfigError("validation.every must be 0 (never) or more, validation.seeds not empty, steps >= 1")
    if cfg.log.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("log.wandb=true needs the wandb package: pip install wandb (or log.wandb=false)")
    if cfg.log.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("log.tensorboard=true needs the tensorboard package: pip install tensorboard")


def _check_vocabularies(cfg: DictConfig) -> None:
    d, t, a, te = cfg.data, cfg.train, cfg.adapter, cfg.text_encoder
    for key, value, choices in (
        ("data.crop", d.crop, ("center", "random", "none")),
        ("data.caption_missing", d.caption_missing, ("default", "reject")),
        ("data.trigger_policy", d.trigger_policy, ("replace", "prefix")),
        ("train.lr_scheduler", t.lr_scheduler, LR_SCHEDULERS),
        ("train.optimizer", t.optimizer, OPTIMIZERS),
        ("train.loss", t.loss, ("l2", "l1", "huber")),
        ("train.mixed_precision", t.mixed_precision, ("no", "fp16", "bf16")),
        ("train.vae_dtype", t.vae_dtype, ("float32", "float16", "bfloat16")),
        ("train.timestep_bias", t.timestep_bias, ("none", "earlier", "later")),
        ("train.nonfinite", t.nonfinite, ("stop", "skip")),
        ("model.prediction_type", cfg.model.prediction_type, (None, "epsilon", "v_prediction")),
        ("model.weighting_scheme", cfg.model.weighting_scheme, WEIGHTING_SCHEMES),
        ("adapter.type", a.type, ADAPTER_TYPES),
        ("adapter.targets", a.targets, TARGET_PRESETS),
        ("adapter.init", a.init, ("gaussian", "default")),
        ("text_encoder.train", te.train, ("none", "lora", "full")),
        ("export.dtype", cfg.export.dtype, tuple(DTYPES)),
        ("export.single_file_dtype", cfg.export.single_file_dtype, tuple(DTYPES)),
        ("export.variant", cfg.export.variant, (None, "fp16", "bf16")),
        ("generate.scheduler", cfg.generate.scheduler, tuple(SCHEDULERS)),
        *((f"export.formats[{k}]", x, FORMATS) for k, x in enumerate(cfg.export.formats)),
        *((f"data.sources[{k}].kind", x.kind, SOURCE_KINDS) for k, x in enumerate(d.sources)),
        *((f"data.sources[{k}].role", x.role, ("instance", "class")) for k, x in enumerate(d.sources)),
    ):
        if value not in choices:
            raise ConfigError(f"{key}={value}: choose one of {', '.join(str(c) for c in choices)}")


WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "sigma_sqrt", "cosmap")


def _check_resume(cfg: DictConfig) -> None:
    """resume=auto needs the run folder (output_dir); resume=PATH names its own (see tuner/compose.py)."""
    if "train" not in cfg.stages:
        raise ConfigError(f"resume={cfg.resume}: recipe {cfg.recipe} does not train")
    if cfg.resume == "auto" and not cfg.output_dir:
        raise ConfigError("resume=auto continues the run in output_dir: pass output_dir=RUN_FOLDER too")
