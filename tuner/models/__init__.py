"""Model families behind one interface (``tuner.models.base.Family``), one module each."""

from __future__ import annotations

import importlib

from tuner.errors import ConfigError

# model.family -> (module, class)
FAMILIES = {
    "sd15": ("sd15", "SD15"),
    "sd2": ("sd2", "SD2"),
    "sdxl": ("sdxl", "SDXL"),
    "flux": ("flux", "Flux"),
    "sd3": ("sd3", "SD3"),
}


def get_family(name: str, model=None):
    """The family object of a config name (``model.family``), with the ``model`` section (its defaults if None)."""
    if name not in FAMILIES:
        raise ConfigError(f"model.family={name}: unknown family; tuner supports {', '.join(FAMILIES)}")
    module, cls = FAMILIES[name]
    return getattr(importlib.import_module(f"tuner.models.{module}"), cls)(model)


def family_of_pipeline(pipeline_class: str | None) -> str | None:
    """The first family whose pipeline class is ``pipeline_class`` (sd15 and sd2 share one)."""
    for name in FAMILIES:
        if get_family(name).PIPELINE == pipeline_class:
            return name
    return None
