"""Composing one run's configuration: ``conf/`` (the config groups), a ``recipes/`` preset and the
user's ``key=value`` overrides, on the schema of tuner/config.py (hydra's compose API, offline).

With ``checkpoint=`` inside a tuner run and no model chosen, the run's own base model is taken.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from tuner.config import DIGIT_WORDS, TunerConfig
from tuner.errors import ConfigError

_HERE = Path(__file__).resolve().parent
_BASE = _HERE.parent if (_HERE.parent / "recipes").is_dir() else _HERE
CONF_DIR = Path(os.environ.get("TUNER_CONF_DIR", _BASE / "conf"))
RECIPES_DIR = Path(os.environ.get("TUNER_RECIPES_DIR", _BASE / "recipes"))


def _digit_word(k) -> str:
    if str(k) not in [str(d) for d in range(10)]:
        raise ValueError(f"${{digit_word:{k}}}: subject.digit must be 0..9")
    return DIGIT_WORDS[int(k)]


if not OmegaConf.has_resolver("digit_word"):
    # recipes write prompts like "a photo of the digit ${digit_word:${subject.digit}}"
    OmegaConf.register_new_resolver("digit_word", _digit_word)


def list_recipes() -> dict[str, str]:
    """Recipe names with the first line of each recipe's leading comment."""
    recipes = {}
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        first = next((line for line in path.read_text().splitlines() if line.startswith("#")), "#")
        recipes[path.stem] = first.lstrip("# ").strip()
    return recipes


def compose(recipe: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose the configuration of one recipe with the user's overrides.

    Raises:
        ConfigError: the recipe does not exist.
        hydra.errors.HydraException / omegaconf errors: an unknown key or a value of the wrong type.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore

    if not (RECIPES_DIR / f"{recipe}.yaml").is_file():
        known = ", ".join(list_recipes()) or "none"
        raise ConfigError(f"unknown recipe {recipe!r}: {RECIPES_DIR} has {known}")
    ConfigStore.instance().store(name="tuner_schema", node=TunerConfig)
    # recipes/ is searched as a config root, so `recipes` is a config group of _global_ presets
    search = f"hydra.searchpath=[file://{RECIPES_DIR.parent}]"
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(
            "config", overrides=[search, f"+{RECIPES_DIR.name}@_global_={recipe}"] + list(overrides or [])
        )
    cfg.recipe = recipe
    _inherit_model(cfg, list(overrides or []))
    if cfg.resume not in (None, "auto") and not cfg.output_dir:  # resume=PATH: the checkpoint's own run folder
        checkpoint = Path(cfg.resume).expanduser().resolve()
        if (checkpoint / "state.pt").is_file():
            cfg.output_dir = str(checkpoint.parent.parent)
    return cfg


def _inherit_model(cfg: DictConfig, overrides: list[str]) -> None:
    """With ``checkpoint=`` (or a generate adapter) inside a tuner run and no model chosen, take that run's
    base model and resolution; keys the user set stay as set."""
    first = cfg.checkpoint or next((a.path for a in cfg.generate.adapters), None)
    if not first or cfg.model.path or cfg.model.builtin:
        return
    folder = run_folder_of(first)
    if folder is not None:
        source = OmegaConf.load(folder / "config.yaml")
        given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
        for group in ("model", "base"):
            for key, value in source[group].items():
                if f"{group}.{key}" not in given:
                    cfg[group][key] = value
        if "data.resolution" not in given:
            cfg.data.resolution = source.data.resolution


def run_folder_of(path: str | Path) -> Path | None:
    """The tuner run folder ``path`` is (or lies in, up to three levels down), recognised by its config and summary."""
    path = Path(path).expanduser().resolve()
    for folder in [path, *path.parents][:4]:
        if (folder / "config.yaml").is_file() and (folder / "summary.json").is_file():
            return folder
    return None
