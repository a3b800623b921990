"""Loading an adapter made by tuner or another trainer onto a run's model: a run folder, a diffusers/kohya/peft file
or folder, or an embedding, read whole and checked (tuner/export/reading.py) before it is applied.

The stages that load adapters call ``load_checkpoint``: load_adapter (``checkpoint=``), export (recipe=export),
generate, inspect and the LoRA toolbox.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import NamedTuple, Protocol

from omegaconf import DictConfig

from tuner.errors import ConfigError
from tuner.export import reading
from tuner.export.reading import PICKLE_SUFFIXES, unexpected_keys
from tuner.export.tensors import tuner_layers


class Onto(Protocol):
    """What the loader reads of the run it loads onto (a ``tuner.stages.context.Run``): its modules, its model
    family, its pipeline (built on first use), the config (``checkpoint``; ``model.path``, to name the base in errors)
    and the outputs the run's summary lists."""

    components: object
    family: object
    cfg: DictConfig
    outputs: dict[str, str]

    @property
    def pipe(self): ...


def load_configured(run: Onto) -> Loaded:
    """``checkpoint=PATH`` onto the run's model, said in the log and in the run's outputs."""
    path = Path(run.cfg.checkpoint).expanduser()
    loaded = load_checkpoint(run, path)
    print(f"[tuner] loaded {', '.join(loaded.names)} from {path}", flush=True)
    run.outputs["checkpoint"] = str(path)
    return loaded


class Loaded(NamedTuple):
    """What ``load_checkpoint`` put on the pipeline: the files and folders, and the new tokens in order."""

    names: list[str]
    tokens: list[str]


def load_checkpoint(run: Onto, path: Path, adapter_name: str | None = None) -> Loaded:
    """Load what ``path`` holds onto the run's pipeline; returns what was loaded.

    ``path`` may be a run folder (its diffusers/ export, else peft/, else kohya/), a format folder
    (diffusers/, kohya/, peft/), a LoRA ``.safetensors`` in diffusers' or kohya's keys, or an
    embedding ``.safetensors`` (diffusers' ``{token: vectors}`` or A1111's ``emb_params``). Adapters
    load under ``adapter_name`` (diffusers picks one when it is None).
    """

    folders = [path]
    if path.is_dir() and (path / "summary.json").is_file():  # a run: its diffusers/ export, with peft/ for
        folders = [path / x for x in ("diffusers", "peft") if (path / x).is_dir()]  # what diffusers cannot hold
        if (path / "diffusers" / "pytorch_lora_weights.safetensors").is_file():
            folders = [path / "diffusers"]
        folders = folders or [path / "kohya"]
    loaded = Loaded([], [])
    for folder in folders:
        _load_folder(run, folder, adapter_name, loaded)
    if not loaded.names:
        raise ConfigError(
            f"{path}: no adapter in it (a LoRA or embedding .safetensors, a diffusers/, kohya/ or peft/ "
            "folder, or a run folder)"
        )
    return loaded


def _candidates(path: Path) -> list[Path]:
    """The adapter and embedding files of a folder (or the file itself): its .safetensors, else any file
    that may hold tensors under another name (a safetensors named .bin loads; a pickle is refused)."""

    if path.is_file():
        return [path]
    files = sorted(path.glob("*.safetensors")) + sorted(path.glob("embeddings/*.safetensors"))
    return files or sorted(p for p in path.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)


def _load_folder(run: Onto, path: Path, adapter_name: str | None, loaded: Loaded) -> None:

    for file in _candidates(path):
        tensors, meta = reading.read_tensors(file)
        keys = list(tensors)
        if reading.lora_modules(tensors) or any(k.endswith(up) for _, up in reading.LORA_PAIRS for k in keys):
            _load_lora(run, file, reading.check_lora(file, tensors, meta), adapter_name)
        elif any(k.startswith(("hada_", "lokr_")) or ".hada_" in k or ".lokr_" in k for k in keys):
            raise ConfigError(
                f"{file}: a LoHa/LoKr file in kohya's keys; diffusers cannot load it, load the run's peft/ folder"
            )
        else:
            loaded.tokens.append(_load_embedding(run, file, tensors, meta))
        loaded.names.append(file.name)
    for component, module in run.components.trainable().items():
        if (path / component / "adapter_config.json").is_file():
            _load_peft(module, path / component, adapter_name or "default")
            loaded.names.append(f"{component} (peft)")


def _load_embedding(run: Onto, file: Path, tensors: dict, meta: dict) -> str:
    """An embedding: diffusers' ``{token: vectors}`` or A1111's ``emb_params`` (one text encoder), or a vector per
    encoder under the family's keys (SDXL's ``clip_l``/``clip_g``), each into its encoder; returns its token,
    the one its metadata names, else its key (diffusers'), else its file name (as A1111 and ComfyUI call it)."""
    c, family = run.components, run.family
    if not family.EMBEDDINGS:
        raise ConfigError(f"{file}: no textual inversion for model={family.NAME} ({family.EMBEDDING_REFUSAL})")
    if len(family.EMBEDDINGS) == 1:
        parts = {next(iter(family.EMBEDDINGS)): tensors}  # the file whole, in any one-encoder layout
    else:
        parts = {e: {key: tensors[key]} for e, key in family.EMBEDDINGS.items() if key in tensors}
        if not parts:
            raise ConfigError(
                f"{file}: holds {', '.join(tensors)}; an embedding for model={family.NAME} has a vector per text "
                f"encoder under {' and '.join(family.EMBEDDINGS.values())}"
            )
    names = list(tensors)
    token = meta.get("token") or (names[0] if len(names) == 1 and names[0] != "emb_params" else file.stem)
    for encoder, part in parts.items():
        text_encoder, tokenizer = c.text_encoders[encoder], c.tokenizer_of(encoder)
        reading.check_embedding(file, part, [text_encoder.get_input_embeddings().weight.shape[1]])
        if token in tokenizer.get_vocab():
            raise ConfigError(f"{file}: its token {token} is in the vocabulary already (another adapter's?)")
        vectors = file if len(family.EMBEDDINGS) == 1 else next(iter(part.values()))
        with _named_failures(file, "an embedding"):
            run.pipe.load_textual_inversion(vectors, token=token, text_encoder=text_encoder, tokenizer=tokenizer)
    return token


@contextlib.contextmanager
def _named_failures(file: Path, what: str):
    """A loader's failure on a file that passed the checks (a shape that fits no module of this base, ...)
    as one line naming the file."""
    try:
        yield
    # (AssertionError: diffusers' Flux kohya reader asserts FLUX.1's own widths)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError, OSError, AssertionError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{file}: does not load as {what} onto this base ({reason[:300]})") from None


def _adapter_layers(run: Onto) -> int:
    """How many (module, adapter) pairs of LoRA layers the run's modules hold."""

    return sum(
        len(getattr(layer, "lora_A", {}))
        for module in run.components.trainable().values()
        for layer in tuner_layers(module).values()
    )


def _load_lora(run: Onto, file: Path, modules: int, adapter_name: str | None) -> None:
    """Load a LoRA file through the pipeline's own ``load_lora_weights``; every module of the file must land.

    Raises:
        ConfigError: the file does not load, or some of its modules name modules this base does not have
            (a LoRA for another model), listing them.
    """
    landed, keys = apply_lora(run, file, adapter_name)
    if landed < modules:
        shown = f": {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}" if keys else ""
        raise ConfigError(
            f"{file}: {modules - landed} of its {modules} LoRA modules name modules this base does not have"
            f"{shown}; is it a LoRA for another model (model.path={run.cfg.model.path or 'the digits base'})?"
        )


def apply_lora(run: Onto, file: Path, adapter_name: str | None) -> tuple[int, list[str]]:
    """Load a LoRA file through the pipeline's own ``load_lora_weights``: how many modules landed, and the keys
    diffusers said fit no module of this base.

    Raises:
        ConfigError: the file does not load at all (naming it and the loader's reason).
    """
    import logging

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    before, keep = _adapter_layers(run), Keep()
    watched = [logging.getLogger(name) for name in ("diffusers", "peft")]
    saved = [(logger.level, logger.handlers, logger.propagate) for logger in watched]
    for logger in watched:  # diffusers names the keys it could not place only in a warning: kept, not printed
        logger.setLevel(logging.WARNING)
        logger.handlers, logger.propagate = [keep], False
    try:
        with _named_failures(file, "a LoRA"), tempfile.TemporaryDirectory() as named:
            source = file
            if file.suffix != ".safetensors":  # diffusers picks its reader by the name: a link named as it is
                source = Path(named) / "lora.safetensors"
                source.symlink_to(file.resolve())
            run.pipe.load_lora_weights(source.parent, weight_name=source.name, adapter_name=adapter_name)
    finally:
        for logger, (level, handlers, propagate) in zip(watched, saved):
            logger.setLevel(level)
            logger.handlers, logger.propagate = handlers, propagate
    return _adapter_layers(run) - before, unexpected_keys(keep.messages)


def _load_peft(module, folder: Path, adapter_name: str) -> None:
    """A peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) onto ``module``."""
    from peft import PeftConfig, set_peft_model_state_dict

    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        pickled = [p for p in folder.iterdir() if p.suffix in reading.PICKLE_SUFFIXES]
        if pickled and reading.is_pickle(pickled[0]):
            reading.refuse_pickle(pickled[0])
        if not pickled:
            raise ConfigError(f"{folder}: adapter_config.json without adapter_model.safetensors beside it")
        weights = pickled[0]  # a safetensors file under a .bin name
    tensors, _ = reading.read_tensors(weights)
    reading.peft_config(folder)  # a readable object with its type, targets and rank, or one line naming the file
    try:
        config = PeftConfig.from_pretrained(folder)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"{folder / 'adapter_config.json'}: not a peft adapter config ({e})") from None
    state = {k.removeprefix("base_model.model."): v for k, v in tensors.items()}
    with _named_failures(weights, "a peft adapter"):
        module.add_adapter(config, adapter_name=adapter_name)
        result = set_peft_model_state_dict(module, state, adapter_name=adapter_name)
    unused = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k or "hada_" in k or "lokr_" in k]
    if unused:
        raise ConfigError(f"{weights}: {len(unused)} adapter tensors fit no module, e.g. {unused[:3]}")
