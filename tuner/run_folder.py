"""The run folder: what tuner may write into, and what it may delete there (only what it wrote itself)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig


def check_output_dir(cfg: DictConfig) -> None:
    """Refuse an ``output_dir`` tuner must not write into, before anything runs."""
    from tuner.config import ConfigError

    if (
        cfg.output_dir
        and cfg.resume is None
        and not cfg.overwrite
        and (Path(cfg.output_dir).expanduser() / "config.yaml").is_file()
    ):
        raise ConfigError(
            f"output_dir={cfg.output_dir} holds another run already; choose a new folder, continue it with "
            "resume=auto, or pass overwrite=true to write over it"
        )
