"""Model families behind one interface (``tuner.models.base.Family``), one module each, listed in one registry.

Adding a family is its module (a ``Family`` subclass that provides every member ``KIT`` names), one
``conf/model/NAME.yaml`` and one entry in ``FAMILIES``; nothing else in tuner, its tests or its tools
names a family (tests/test_kit.py checks both). A family outside tuner joins while a program runs:
``register(cls)``, or ``TUNER_FAMILIES=package.module:Class[,...]`` in the environment (which the processes
a run starts inherit), with its YAML in a ``TUNER_CONF_DIR``.
"""

from __future__ import annotations

import importlib
import os

from tuner.errors import ConfigError

# model.family -> "module:Class" under tuner.models (or a full module path)
FAMILIES = {
    "sd15": "sd15:SD15",
    "sd2": "sd2:SD2",
    "sdxl": "sdxl:SDXL",
    "flux": "flux:Flux",
    "sd3": "sd3:SD3",
    "flux2": "flux2:Flux2",
    "flux2_klein": "flux2:Flux2Klein",
    "qwen_image": "qwen_image:QwenImage",
    "chroma": "chroma:Chroma",
    "z_image": "z_image:ZImage",
    "qwen_image21": "qwen_image21:QwenImage21",
    "lumina2": "lumina2:Lumina2",
    "krea2": "krea2:Krea2",
    "hidream": "hidream:HiDream",
    "ideogram4": "ideogram4:Ideogram4",
    "flux_kontext": "flux_kontext:FluxKontext",
    "qwen_image_edit": "qwen_image_edit:QwenImageEdit",
    "wan": "wan:Wan",
}
_REGISTERED: dict[str, type] = {}  # families added by register(), by name

# what every family provides beyond the shared interface's methods: tests/test_kit.py checks each registered
# family sets each of these itself or inherits a value that is not empty
KIT = (
    "NAME", "PIPELINE", "DENOISER", "TEXT_ENCODERS", "EXPORTS", "DEFAULT_EXPORTS", "DEFAULT_RESOLUTION",
    "RESOLUTION_MULTIPLE", "TARGETS", "BLOCKS", "PARTIAL_BLOCKS", "OFFLOAD_BLOCKS", "WIDTHS", "MODELSPEC_ARCHITECTURE",
    "SAMPLE_FILES", "build_tiny", "real_widths",
)  # fmt: skip


_IMPORTING: set[str] = set()  # TUNER_FAMILIES modules being imported (one may build on a registered family)


def _from_environment() -> None:
    """Register the classes ``TUNER_FAMILIES`` names (``module:Class``, comma-separated), once each. A module
    that asks the registry for a family while it is being imported (to subclass it) gets the registry without
    itself, instead of importing itself again."""
    for entry in filter(None, os.environ.get("TUNER_FAMILIES", "").split(",")):
        module, _, cls = entry.strip().partition(":")
        if module in _IMPORTING:
            continue
        _IMPORTING.add(module)
        try:
            found = getattr(importlib.import_module(module), cls)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"TUNER_FAMILIES={entry}: cannot import {cls} from {module} ({e})") from None
        finally:
            _IMPORTING.discard(module)
        if _REGISTERED.get(found.NAME) is not found:
            register(found)


def family_names() -> list[str]:
    """Every family tuner knows, in registry order (those added at run time last)."""
    _from_environment()
    return [*FAMILIES, *(n for n in _REGISTERED if n not in FAMILIES)]


def family_class(name: str) -> type:
    """The ``Family`` subclass of a registered name."""
    _from_environment()
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in FAMILIES:
        raise ConfigError(f"model.family={name}: unknown family; tuner supports {', '.join(family_names())}")
    module, cls = FAMILIES[name].split(":")
    return getattr(importlib.import_module(module if "." in module else f"tuner.models.{module}"), cls)


def register(cls: type) -> type:
    """Add a ``Family`` subclass under its ``NAME`` (usable as a class decorator); replaces one of that name."""
    if not cls.NAME:
        raise ValueError(f"{cls.__name__}.NAME is empty: a family registers under its name")
    _REGISTERED[cls.NAME] = cls
    return cls


def unregister(name: str) -> None:
    """Take a family ``register`` added out again."""
    _REGISTERED.pop(name, None)


def get_family(name: str, model=None):
    """The family object of a config name (``model.family``), with the ``model`` section (its defaults if None)."""
    return family_class(name)(model)


def families(model=None) -> list:
    """One object of every registered family."""
    return [get_family(name, model) for name in family_names()]


def family_of_pipeline(pipeline_class: str | None) -> str | None:
    """The first family whose pipeline class is ``pipeline_class`` (two families may share one)."""
    return next((name for name in family_names() if family_class(name).PIPELINE == pipeline_class), None)
