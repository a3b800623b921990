"""The base model's diffusers folder, the one every stage loads: what the base stage resolves (and the inspect
stage, when it is given a base).

``model.path`` is a diffusers folder (checked against the family), or a single-file checkpoint converted once
by diffusers' own loader and kept under $TUNER_HOME/single_file/; with no path, ``model.builtin`` names an
embedded base (``tuner.runner.BUILTINS``: the digits demo's), built once and cached. The extract stage converts
its single-file ``extract.tuned`` the same way (``single_file_folder``).

``run`` is the stage's ``tuner.stages.context.Run``, read through its attributes (this layer does not import the
stages).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tuner.distributed import decide
from tuner.errors import ConfigError
from tuner.export.reading import check_header
from tuner.files import atomic_dir


def base_folder(run) -> Path:
    """Resolve ``model.path`` (or build the embedded base ``model.builtin`` names) to a diffusers folder, named
    in the run's outputs."""
    m = run.cfg.model
    if m.path and Path(m.path).expanduser().is_file():
        folder = Path(decide(run.accelerator, lambda: str(single_file_base(run))))
    elif m.path:
        folder = run.family.check_folder(m.path, m.allow_pickle)
    else:
        folder = run.builtins[m.builtin].ensure(run)
    run.outputs["base"] = str(folder)
    return folder


def single_file_base(run) -> Path:
    """``model.path`` is a single-file checkpoint: its diffusers folder (``single_file_folder``), described by
    ``model.config``'s configs and tokenizers."""
    m = run.cfg.model
    return single_file_folder(run, Path(m.path), run.family.check_config_folder(m.config))


def _key(*parts: str) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def single_file_folder(run, file: Path, config: Path, what: str = "base") -> Path:
    """A single-file checkpoint's diffusers folder, converted once by diffusers' own loader (with ``config``'s
    configs and tokenizers) and kept under $TUNER_HOME/single_file/, named by the file's path, size and
    modification time and by the config folder."""
    file = Path(file).expanduser().resolve()
    stat = file.stat()
    key = _key(str(file), str(stat.st_size), str(stat.st_mtime_ns), str(Path(config).expanduser().resolve()))
    folder = run.home / "single_file" / f"{file.stem}-{key}"
    if (folder / "model_index.json").is_file():
        print(f"[tuner] {what}: {file.name} as converted before, {folder}", flush=True)
        return folder
    check_header(file, f"a {what} model")
    print(f"[tuner] {what}: converting the single file {file} to a diffusers folder {folder}", flush=True)
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    try:
        with atomic_dir(folder) as tmp:
            run.family.from_single_file(file, config, tmp)
    except ConfigError:
        raise
    except (SingleFileComponentError, ValueError, KeyError) as e:  # a file of parts: diffusers says which is missing
        key = "model.path" if what == "base" else "extract.tuned"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"{key}={file}: diffusers cannot read it as a whole {run.family.PIPELINE} single-file checkpoint "
            f"({reason[:300]}); give a single file with every part of the model, or a diffusers pipeline folder"
        ) from None
    return folder
