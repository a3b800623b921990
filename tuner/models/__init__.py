"""Model families behind one interface: each module provides check_folder, load, encode_prompts,
noise_target, pipeline, save_lora and load_pipeline (see sd15.py for the contract)."""

from types import ModuleType

from tuner.config import ConfigError

FAMILIES = ("sd15",)


def get_family(name: str) -> ModuleType:
    """The module of a model family by its config name (``model.family``)."""
    if name == "sd15":
        from tuner.models import sd15

        return sd15
    raise ConfigError(f"model.family={name}: unknown family; tuner supports {', '.join(FAMILIES)}")
