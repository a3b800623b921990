"""Reading adapter and embedding files made by tuner or by another trainer, checked whole before they load.

Every file is read by its content, not its name: a safetensors file named ``.bin`` loads, a pickle named
anything is refused (tuner never unpickles an adapter). A file that is truncated, has a damaged header,
holds no tensors, holds NaN or infinite values, or whose LoRA pairs do not fit together is refused with
one line naming the file and the key, before anything is applied to the model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from tuner.errors import ConfigError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# a LoRA module's down (A) and up (B) halves, in the key styles loaders meet: kohya, peft / diffusers, and
# diffusers' older attention-processor names
LORA_PAIRS = (
    (".lora_down.weight", ".lora_up.weight"),
    (".lora_A.weight", ".lora_B.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    ("_lora.down.weight", "_lora.up.weight"),
)


def is_pickle(path: Path) -> bool:
    """Whether ``path`` holds a pickle (torch's zip archive, or a bare pickle stream)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[8:9] == b"{":  # safetensors: its header's length (8 bytes, whose first may be 0x80), then the JSON
        return False
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def refuse_pickle(path: Path, what: str = "an adapter") -> None:
    raise ConfigError(
        f"{path}: a pickle file, refused (tuner reads {what} only as .safetensors, since loading a pickle can "
        "run code); ask for a .safetensors version of it, or convert it where you trust its source"
    )


def _unreadable(path: Path, error: Exception) -> ConfigError:
    reason = str(error).removeprefix("Error while deserializing header: ")
    return ConfigError(f"{path}: not a readable safetensors file ({reason}); is it truncated or damaged?")


def check_header(path: Path, what: str = "an adapter") -> None:
    """A cheap look at a safetensors file, its header only: refuse a pickle, a damaged file or an empty one.

    Raises:
        ConfigError: naming the file and what is wrong with it.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    if path.stat().st_size and is_pickle(path):
        refuse_pickle(path, what)
    try:
        with safe_open(path, "pt") as handle:
            empty = not list(handle.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise _unreadable(path, e) from None
    if empty:
        raise ConfigError(f"{path}: holds no tensors")


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor and the metadata of a safetensors file, checked.

    Raises:
        ConfigError: ``path`` is a pickle, not a readable safetensors file (truncated, damaged header,
            offsets past its end), holds no tensors, or holds a NaN or infinite value (naming the key).
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    check_header(path)
    try:
        with safe_open(path, "pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise _unreadable(path, e) from None
    for key, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ConfigError(f"{path}: {key} holds NaN or infinite values; refusing to load it")
    return tensors, metadata


def lora_modules(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    """The LoRA modules of a state dict: module key -> (down key, up key)."""
    found = {}
    for key in tensors:
        for down, up in LORA_PAIRS:
            if key.endswith(down):
                module = key[: -len(down)]
                found[module] = (key, module + up)
    return found


def check_lora(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> int:
    """Check that a LoRA file's halves pair up and their shapes agree; returns its number of modules.

    Raises:
        ConfigError: naming the file and the first key that does not fit.
    """
    modules = lora_modules(tensors)
    ups = {up for _, up in modules.values()}
    for key in tensors:
        if any(key.endswith(up) for _, up in LORA_PAIRS) and key not in ups:
            raise ConfigError(f"{path}: {key} has no matching down (lora_A / lora_down) weight")
    for module, (down, up) in modules.items():
        if up not in tensors:
            raise ConfigError(f"{path}: {down} has no matching up weight ({up} is missing)")
        a, b = tensors[down], tensors[up]
        if a.dim() not in (2, 4) or b.dim() != a.dim() or a.shape[0] != b.shape[1] or a.shape[0] == 0:
            raise ConfigError(
                f"{path}: {module}: down {tuple(a.shape)} and up {tuple(b.shape)} do not form a LoRA "
                "(down is (rank, in), up is (out, rank))"
            )
        alpha = tensors.get(f"{module}.alpha")
        if alpha is not None and alpha.numel() != 1:
            raise ConfigError(f"{path}: {module}.alpha has shape {tuple(alpha.shape)}; an alpha is one number")
    if "lora_adapter_metadata" in metadata:
        try:
            configs = json.loads(metadata["lora_adapter_metadata"])
        except ValueError:
            configs = None
        if not isinstance(configs, dict):
            raise ConfigError(f"{path}: its lora_adapter_metadata is not the JSON object of LoRA settings (diffusers')")
    return len(modules)


def check_embedding(path: Path, tensors: dict[str, torch.Tensor], widths: list[int]) -> None:
    """An embedding's vectors (``(n, width)`` or ``(width,)``) must be as wide as one of the text encoders'."""
    for key, value in tensors.items():
        if value.dim() not in (1, 2) or value.shape[-1] not in widths:
            raise ConfigError(
                f"{path}: {key} has shape {tuple(value.shape)}, but this base's text encoder embeds tokens in "
                f"{' or '.join(map(str, widths))} numbers; is the embedding for another model?"
            )


PEFT_RANKED = ("LORA", "LOHA", "LOKR")  # the peft types tuner writes and loads: each has a rank r


def peft_config(folder: Path) -> dict:
    """A peft adapter folder's ``adapter_config.json``, read and checked: a JSON object naming its ``peft_type``
    (one tuner loads), its ``target_modules`` and its rank ``r``.

    Raises:
        ConfigError: naming the file, what is wrong and the fix.
    """
    file = Path(folder) / "adapter_config.json"
    fix = "a peft adapter_config.json is the JSON object peft's save_pretrained writes; export the adapter again"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{file}: not text, so not JSON; {fix}") from None
    except ValueError as e:
        raise ConfigError(f"{file}: not valid JSON ({e}); {fix}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{file}: a JSON {type(config).__name__}, not an object of settings; {fix}")
    missing = [k for k in ("peft_type", "target_modules", "r") if k not in config]
    if missing:
        raise ConfigError(f"{file}: no {', '.join(missing)} in it; {fix}")
    kind, targets, rank = config["peft_type"], config["target_modules"], config["r"]
    if kind not in PEFT_RANKED:
        raise ConfigError(f"{file}: peft_type={kind!r}; tuner loads peft adapters of type {', '.join(PEFT_RANKED)}")
    if not (isinstance(targets, str) or isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise ConfigError(f"{file}: target_modules={targets!r}; peft takes a list of module names or a regex; {fix}")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ConfigError(f"{file}: r={rank!r}; the rank is a whole number of at least 1; {fix}")
    return config


def peft_folders(path: Path) -> list[Path]:
    """The peft adapter folders (each with an ``adapter_config.json``) an adapter input names: itself, its
    components (``unet/``, ``text_encoder/``, ...), or a run folder's ``peft/`` export where that is what loads
    (a run with a diffusers file loads that)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return []
    if (path / "summary.json").is_file():  # a run folder: its diffusers/ file, else its peft/ export
        if (path / "diffusers" / "pytorch_lora_weights.safetensors").is_file():
            return []
        path = path / "peft"
    return sorted({config.parent for config in [path / "adapter_config.json", *path.glob("*/adapter_config.json")]
                   if config.is_file()})  # fmt: skip


def check_peft_folders(path: Path, key: str) -> None:
    """Every peft ``adapter_config.json`` of the adapter input ``key`` names, checked before anything loads.

    Raises:
        ConfigError: ``KEY: FILE: what is wrong and the fix``.
    """
    for folder in peft_folders(path):
        try:
            peft_config(folder)
        except ConfigError as e:
            raise ConfigError(f"{key}: {e}") from None


def unexpected_keys(messages: list[str]) -> list[str]:
    """The keys diffusers' or peft's loader reported as fitting no module, from their log messages."""
    keys = []
    for message in messages:
        found = re.search(r"unexpected keys[^:]*:\s*(.*)", message, re.S)
        if found:
            keys += [k.strip().rstrip(".") for k in found[1].split(",") if k.strip()]
    return keys
