"""The base stage: resolve the base model's diffusers folder, the one every later stage loads
(tuner/base_model.py).

``model.path`` is a diffusers folder (checked against the family), or a single-file checkpoint
converted once by diffusers' own loader and kept under $TUNER_HOME/single_file/; with no path,
``model.builtin`` names an embedded base (``tuner.runner.BUILTINS``: the digits demo's), built once
and cached.
"""

from __future__ import annotations

from tuner.base_model import base_folder
from tuner.errors import ConfigError
from tuner.stages.context import Base, Run, stage


def _check_base(cfg) -> None:
    m = cfg.model
    if not m.path and not m.builtin:
        raise ConfigError(
            "model.path is not set: pass model.path=/path/to/a/diffusers/pipeline/folder "
            "(or model=digits for the embedded base)"
        )


@stage(check=_check_base)
def base(run: Run) -> Base:
    """Resolve ``model.path`` (or build the embedded base ``model.builtin`` names) to a diffusers folder."""
    return Base(base_folder(run))
