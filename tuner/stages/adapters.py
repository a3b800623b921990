"""The load_adapter stage (``checkpoint=``, recipe=evaluate and generate's adapters): a run folder, a
diffusers/kohya/peft file or folder, or an embedding, read whole and checked before it is applied
(tuner/export/loading.py).
"""

from __future__ import annotations

from pathlib import Path

from tuner.errors import ConfigError
from tuner.export.loading import load_configured
from tuner.stages.context import Adapted, Run, stage


def _check_load_adapter(cfg) -> None:
    if not cfg.checkpoint or not Path(cfg.checkpoint).expanduser().exists():
        raise ConfigError(
            f"checkpoint={cfg.checkpoint}: pass a run folder, an export folder (diffusers/, kohya/, peft/) "
            "or an adapter file, e.g. checkpoint=runs/lora-20260101-120000"
        )


@stage(main_only=True, after=("base",), check=_check_load_adapter)
def load_adapter(run: Run) -> Adapted:
    """Load an adapter made by tuner or another trainer (``checkpoint=PATH``) onto the base."""
    loaded = load_configured(run)
    return Adapted(None, tuple(loaded.tokens), base_weights_changed=bool(loaded.tokens))
