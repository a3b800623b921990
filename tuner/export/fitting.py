"""Whether an adapter fits, read from its header (tuner/export/inspection.py) before any model loads: the LoRA
toolbox's inputs (merge, resize), generate's adapters, and the export formats a toolbox stage's result can be held in.
A missing, damaged or pickled file, one without LoRA keys, halves that do not pair, an unknown key style, or a LoRA
made for another family is refused by name.
"""

from __future__ import annotations

from pathlib import Path

from tuner.errors import ConfigError
from tuner.export import formats
from tuner.export.inspection import Described, describe, misfit
from tuner.models import get_family


def check_input(cfg, path: str, key: str, kinds=("lora", "loha", "lokr")) -> Described:
    """An input read from its header: an adapter of an allowed kind, for ``model.family``.

    Raises:
        ConfigError: naming ``key``, the file and what is wrong.
    """
    if not path:
        raise ConfigError(f"{key} is not set: pass a LoRA file, an export folder or a tuner run folder")
    try:
        described = describe(Path(path))
    except ConfigError as e:
        raise ConfigError(f"{key}: {e}") from None
    if described.kind not in kinds:
        raise ConfigError(f"{key}: {described.path} is {_a(described.kind)}, not {' / '.join(kinds)}")
    if described.format == "kohya" and described.kind in ("loha", "lokr"):
        raise ConfigError(
            f"{key}: {described.path} is a {described.kind} in kohya / LyCORIS keys, which diffusers cannot load; "
            "give the run's peft/ folder instead"
        )
    check_fit(cfg, described, key)
    return described


def check_adapter(cfg, path: str, key: str) -> None:
    """A generate adapter, from its header where ``describe`` reads it: a LoRA, LoHa or LoKr must fit the base
    (``check_fit``); an embedding is checked against the encoders when it loads, and what ``describe`` cannot
    read (a folder of several files, which loads whole) is left to the loader, which names what is wrong."""
    try:
        described = describe(Path(path))
    except ConfigError:
        return
    if described.kind != "embedding":
        check_fit(cfg, described, key)


def check_fit(cfg, described: Described, key: str) -> None:
    """An adapter against the base (``model.*``): a key style diffusers reads for this family, every module the
    base's folder names of the base's shape (from the headers of both: ``misfit``), names and widths of this
    family.

    Raises:
        ConfigError: naming ``key``, the file and the first thing that does not fit.
    """
    family = cfg.model.family
    if described.format == "kohya" and not get_family(family).DIFFUSERS_READS_KOHYA:
        raise ConfigError(
            f"{key}: {described.path} is a model={family} LoRA in kohya's keys, which diffusers cannot load (ComfyUI "
            "reads them); give the run's diffusers/ or peft/ export, or a diffusers-format file"
        )
    base = Path(cfg.model.path).expanduser() if cfg.model.path else None
    why = misfit(described, base, get_family(family, cfg.model).DENOISER) if base and base.is_dir() else None
    if why:
        made_for = " or ".join(f for f in described.families if f != family)
        raise ConfigError(
            f"{key}: {described.path} does not fit model.path={cfg.model.path}: {why}; "
            + (f"a LoRA for {made_for}" if made_for else "a LoRA for another model (family or size)")
            + (f" ({described.evidence})" if described.evidence else "")
        )
    if family not in described.families:
        made_for = " or ".join(described.families)
        raise ConfigError(
            f"{key}: {described.path} is a LoRA for {made_for} ({described.evidence}), but model.family={family}; "
            f"pass model={described.families[0]} with that family's model.path"
        )


def _a(kind: str) -> str:
    return {"embedding": "an embedding (textual inversion)", "dora": "a DoRA adapter"}.get(kind, f"a {kind}")


def check_formats(cfg, parts: set[str]) -> None:
    if cfg.export.formats is not None and "export" in cfg.stages:
        formats.check_held(parts, list(cfg.export.formats), get_family(cfg.model.family, cfg.model))
