"""The run folder: which folder tuner may write a run into, and what it may delete there.

The rule: tuner deletes or replaces only what it wrote itself. Its manifest, ``tuner-run.json`` in the
run folder, names the entries (top-level files and folders) a run writes; they are declared before the
first stage runs, so a crash never leaves an entry tuner wrote but did not list. So:

- ``output_dir`` may be a new folder, an empty one, or a run tuner wrote (it has the manifest);
  a folder holding anything else (a dataset, a model, someone's files) is refused by name before
  anything runs, and so is a folder inside one of the run's inputs.
- ``overwrite=true`` clears the previous run's listed entries, completely, and nothing else: files a
  person put beside them stay.
- The same command run again into its own unfinished run (killed during export, say) goes on there:
  tuner's stale temporary files are removed, and each stage writes its outputs anew.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from tuner.errors import ConfigError
from tuner.files import inside, write_atomic

MANIFEST = "tuner-run.json"
ALWAYS = ("config.yaml", "summary.json")  # every run writes these
# what atomic writes leave beside their target while they work: .NAME.XXXXXXXX.tmp / .old (tempfile's 8)
TEMP = re.compile(r"\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.(?P<kind>tmp|old)")
# keys whose change does not make another run: how the run is continued, not what it computes
RUN_CONTROL = ("output_dir", "overwrite", "resume")


def read_manifest(folder: Path, known: set[str] | None = None) -> dict | None:
    """The manifest of a run folder, or None when tuner did not write the folder.

    Its entries are what overwrite deletes, so each must be a plain top-level name inside the folder (never
    ``..``, ``.``, a path or a link's way out) and, given ``known`` (every name a stage may write), one of those.

    Raises:
        ConfigError: the manifest lists anything else (it is damaged, or was edited), naming the entry.
    """
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not (isinstance(manifest, dict) and isinstance(manifest.get("entries"), list)):
        return None
    for entry in manifest["entries"]:
        inside(folder, entry, folder / MANIFEST)
        if "/" in entry or (known is not None and entry not in {*known, *ALWAYS}):
            raise ConfigError(
                f"{folder / MANIFEST} is damaged: it lists {entry!r}, which no tuner stage writes; tuner deletes "
                "only what it wrote: remove that entry from the file (or the file), or choose another output_dir"
            )
    return manifest


def _inputs(cfg: DictConfig) -> list[tuple[str, str]]:
    """The folders and files a run reads, by key."""
    d, m = cfg.data, cfg.model
    found = [("data.instance_dir", d.instance_dir), ("data.class_dir", d.class_dir)]
    found += [(f"data.sources[{k}].path", x.path) for k, x in enumerate(d.sources)]
    found += [("model.path", m.path), ("model.config", m.config), ("checkpoint", cfg.checkpoint)]
    found += [(f"generate.adapters[{k}].path", a.path) for k, a in enumerate(cfg.generate.adapters)]
    found += [("generate.prompt_file", cfg.generate.prompt_file), ("generate.init_image", cfg.generate.init_image)]
    return [(key, value) for key, value in found if value]


def refuse_inside_inputs(cfg: DictConfig, folder: Path, what: str) -> None:
    """Refuse a folder tuner writes and deletes in (``what``: its key and value) that is one of the run's input
    folders or lies inside one (a run folder of tuner's own excepted).

    Raises:
        ConfigError: naming both keys.
    """
    folder = folder.expanduser().resolve()
    for key, value in _inputs(cfg):
        source = Path(value).expanduser().resolve()
        if source.is_dir() and (folder == source or source in folder.parents) and read_manifest(source) is None:
            raise ConfigError(
                f"{what} is inside {key}={value}: tuner never writes into the folders it reads; choose a folder "
                "outside it"
            )


def _own_temp(name: str) -> bool:
    """A temporary file of what every run writes first (the manifest, the config)."""
    match = TEMP.fullmatch(name)
    return bool(match) and match["name"] in (MANIFEST, *ALWAYS)


def _describe(folder: Path, names: list[str]) -> str:
    if (folder / "model_index.json").is_file():
        return "a diffusers model folder"
    if any(Path(n).suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".txt", ".parquet", ".arrow") for n in names):
        return "a folder of images or data"
    return "a folder"


def _comparable(config_yaml: str) -> dict:
    config = OmegaConf.to_container(OmegaConf.create(config_yaml), resolve=False)
    return {k: v for k, v in config.items() if k not in RUN_CONTROL}


def _same_config(cfg: DictConfig, folder: Path) -> bool:
    """Whether ``folder``'s run was started with this configuration (the same command)."""
    try:
        before = _comparable((folder / "config.yaml").read_text())
    except (OSError, ValueError):
        return False
    return before == _comparable(OmegaConf.to_yaml(cfg, resolve=True))


def check_output_dir(cfg: DictConfig, declared: list[str], known: set[str] | None = None) -> None:
    """Refuse an ``output_dir`` tuner must not write into, naming it and the way out, before anything runs.

    Args:
        declared: the entries this run writes (``run.entries(cfg)``), so foreign files at those names are found.
        known: every entry any stage may write: a manifest listing another name is refused as damaged.

    Raises:
        ConfigError: the folder is a file, lies inside one of the run's inputs, holds files tuner did not
            write, or holds another run (without ``resume`` or ``overwrite=true``).
    """
    if not cfg.output_dir:
        return
    folder = Path(cfg.output_dir).expanduser().resolve()
    refuse_inside_inputs(cfg, folder, f"output_dir={cfg.output_dir}")
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"output_dir={cfg.output_dir} is a file; choose a folder (new or empty)")
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    names = [n for n in names if not _own_temp(n)]  # killed as it started: only its first temp file is there
    if not names:
        return
    manifest = read_manifest(folder, known)
    if manifest is None:
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        raise ConfigError(
            f"output_dir={cfg.output_dir} is {_describe(folder, names)} tuner did not write (it holds {shown}); "
            "tuner writes only into a new or empty folder or one of its own runs (overwrite=true does not change "
            "that): choose another output_dir"
        )
    ours = set(manifest["entries"]) | {MANIFEST}
    clash = sorted(set(declared) & (set(names) - ours) - {n for n in names if TEMP.fullmatch(n)})
    if clash:
        raise ConfigError(
            f"output_dir={cfg.output_dir}: {', '.join(clash)} in it were not written by tuner, and this run "
            "would write there; move them, or choose another output_dir"
        )
    if cfg.overwrite:
        for key, value in _inputs(cfg):
            source = Path(value).expanduser().resolve()
            inside = [e for e in manifest["entries"] if source == folder / e or folder / e in source.parents]
            if inside:
                raise ConfigError(
                    f"overwrite=true would delete {folder / inside[0]}, which {key}={value} reads; "
                    "choose another output_dir"
                )
        return
    if cfg.resume is not None:
        return
    if not manifest.get("finished") and _same_config(cfg, folder):
        if (folder / "checkpoints").is_dir() and any((folder / "checkpoints").iterdir()) and "train" in cfg.stages:
            raise ConfigError(
                f"output_dir={cfg.output_dir} holds this run, stopped with training checkpoints; continue "
                "it with resume=auto, or start it over with overwrite=true"
            )
        return  # the same command again, into its own unfinished run: it goes on there
    resume = ", continue it with resume=auto" if "train" in cfg.stages else ""
    raise ConfigError(
        f"output_dir={cfg.output_dir} holds another run already; choose a new folder{resume}, or pass "
        "overwrite=true to replace that run's outputs"
    )


def claim(folder: Path, cfg: DictConfig, declared: tuple[str, ...]) -> None:
    """Make ``folder`` this run's (rank 0, after ``check_output_dir``): clear the previous run's entries when
    overwriting, remove tuner's stale temporary files, and list what this run writes in the manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    before = read_manifest(folder)
    kept = list(before["entries"]) if before else []
    if before and cfg.overwrite and cfg.resume is None:
        for name in kept:
            _remove(folder / name)
        kept = []
    remove_stale_temps(folder, [*kept, *declared, *ALWAYS, MANIFEST])
    write_manifest(folder, cfg.recipe, [*kept, *ALWAYS, *declared])


def write_manifest(folder: Path, recipe: str, entries: list[str]) -> None:
    """List ``entries`` as what tuner writes in ``folder``, the run unfinished."""
    from importlib.metadata import version

    entries = sorted(set(entries))
    manifest = {"tuner": version("tuner"), "recipe": recipe, "finished": False, "entries": entries}
    write_atomic(folder / MANIFEST, json.dumps(manifest, indent=2))


def finish(folder: Path) -> None:
    """Mark the run complete: the same command again is then another run, not this one going on."""
    manifest = read_manifest(folder)
    if manifest is not None:
        write_atomic(folder / MANIFEST, json.dumps({**manifest, "finished": True}, indent=2))


def remove(folder: Path, name: str) -> None:
    """Delete the entry ``name`` of a run folder, only if the manifest says tuner wrote it."""
    manifest = read_manifest(folder)
    if manifest is not None and name in manifest["entries"]:
        _remove(folder / name)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def remove_stale_temps(folder: Path, entries: list[str]) -> list[Path]:
    """Remove what an interrupted atomic write left (``.NAME.XXXXXXXX.tmp``/``.old``) beside tuner's entries
    and anywhere inside them; an ``.old`` folder whose target is missing is put back in its place."""
    removed = []

    def sweep(parent: Path, top: bool) -> None:
        for path in list(parent.iterdir()):
            match = TEMP.fullmatch(path.name)
            if match and (not top or match["name"] in entries):
                target = parent / match["name"]
                if match["kind"] == "old" and not target.exists() and (path / match["name"]).exists():
                    os.replace(path / match["name"], target)  # killed between the two renames: undo the first
                _remove(path)
                removed.append(path)
            elif path.is_dir() and not path.is_symlink() and (not top or path.name in entries):
                sweep(path, top=False)

    sweep(folder, top=True)
    if removed:
        print(f"[tuner] removed {len(removed)} temporary file(s) an interrupted run left in {folder}", flush=True)
    return removed
