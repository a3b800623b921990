"""Training checkpoints: everything a run needs to go on exactly where it stopped.

A checkpoint is a folder ``checkpoints/step-NNNNNNN/`` in the run folder, written whole or not at all
(a temp folder renamed into place), holding:

- ``trained.safetensors``: every trained tensor, in the order the optimizer holds them;
- ``state.pt``: optimizer, LR scheduler, EMA, loss scaler (fp16), the loop's random generator (the
  same on every rank), each rank's torch RNG and running loss, the data order still to come and the
  epochs started, the step and the losses so far;
- ``config.yaml``: the run's resolved configuration;
- ``sha256.json``: the sha256 of each file above, checked before the checkpoint is used.

Under ``distributed.strategy=fsdp`` the tensors are saved sharded instead (``save_sharded``): ``sharded/``
holds torch.distributed.checkpoint's files (one per rank, and ``.metadata``) with the trained tensors, the
optimizer state and the EMA by parameter name; ``state.pt`` keeps the rest. They load back onto any number
of processes (``load_sharded``), each rank reading its new shards.

``state.pt`` is read back with ``weights_only=True``: tensors and plain containers only, nothing else
is ever unpickled.

A checkpoint is resumed from only when it is whole and was made with the settings of this run (see
``check_resume``): a truncated, unreadable or altered file, a checkpoint of another adapter or optimizer, or one
past ``train.max_steps`` is refused with a ``ConfigError`` naming the file or the settings. ``resume=auto``
skips damaged checkpoints (saying so) and takes the newest intact one; nothing damaged is ever deleted.
Finding checkpoints and telling intact ones from damaged ones is ``tuner.training.checkpoint_files``.

Only the trained tensors are saved (a LoRA's few megabytes, not the frozen base), which is why this
is not accelerate's ``save_state``: that writes every prepared model whole (also the frozen base
weights inside a sharded module).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tuner.errors import ConfigError
from tuner.files import atomic_dir, put_in_place
from tuner.training.checkpoint_files import (
    PATTERN,
    SHARDED,
    damage,
    find,
    hash_damage,
    safetensors_header,
    sharded_header,
    sharded_reader,
    state_header,
    step_number,
    write_hashes,
)


@dataclass
class Checkpointing:
    """Where and how often the loop saves, what it resumes from, and how the data order is read and set."""

    folder: Path | None = None  # None: never save
    every: int = 0  # 0: only when stopped early
    keep: int = 2
    resume: Path | None = None  # a checkpoint folder to continue from
    data_state: Callable[[], object] = lambda: None
    set_data_state: Callable[[object], None] = lambda state: None
    config: str = ""  # the run's resolved config, saved beside each checkpoint
    # steps whose checkpoints pruning keeps besides the newest ``keep`` (the best ones by checkpoints.select)
    protect: Callable[[], set[int]] = lambda: set()


class SaveError(RuntimeError):
    """A checkpoint could not be written (disk full, no permission); earlier ones are intact."""


class Stopped(Exception):
    """Training stopped early on a signal, after saving a checkpoint at a step boundary."""

    def __init__(self, step: int, path: Path, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint {path}")
        self.step, self.path, self.signum = step, path, signum


def save(ck: Checkpointing, step: int, params: list[torch.nn.Parameter], state: dict) -> Path:
    """Write the checkpoint of ``step`` (steps done) and drop the oldest beyond ``keep``."""
    from safetensors.torch import save_file

    path = ck.folder / f"step-{step:07d}"
    _set_aside_damaged(path)
    try:
        with atomic_dir(path) as tmp:
            tensors = {str(i): p.detach().cpu().contiguous() for i, p in enumerate(params)}
            save_file(tensors, tmp / "trained.safetensors")
            torch.save({**state, "step": step, "data": ck.data_state()}, tmp / "state.pt")
            if ck.config:
                (tmp / "config.yaml").write_text(ck.config)
            write_hashes(tmp)
    except OSError as e:  # disk full, permission denied: say so; the earlier checkpoints are untouched
        raise _save_error(ck, path, e) from e
    _prune(ck)
    return path


def save_sharded(ck: Checkpointing, step: int, tensors: dict, state: dict, accelerator) -> Path:
    """``distributed.strategy=fsdp``: every rank writes its shards of ``tensors`` (the trained tensors, the
    optimizer state, the EMA: {section: {name: tensor}}) with torch.distributed.checkpoint into ``sharded/``;
    rank 0 writes ``state.pt`` and ``config.yaml`` and renames the whole folder into place.

    Every rank calls it; with one process it writes the same files (which reload onto any number).
    """
    import tempfile

    import torch.distributed.checkpoint as dcp

    from tuner.distributed import decide

    path = ck.folder / f"step-{step:07d}"

    def begin() -> str:  # rank 0: the temp folder every rank writes into
        ck.folder.mkdir(parents=True, exist_ok=True)
        _set_aside_damaged(path)
        return tempfile.mkdtemp(dir=ck.folder, prefix=f".{path.name}.", suffix=".tmp")

    tmp = Path(decide(accelerator, begin))
    failed = None
    try:
        with _one_process_quiet():
            dcp.save(tensors, checkpoint_id=tmp / SHARDED, no_dist=accelerator.num_processes == 1)
    except Exception as e:  # raised on every rank when any rank failed to write
        failed = e

    def finish() -> str:
        try:
            if failed is not None:
                raise failed
            # every rank's files are here (several machines: only when they share the filesystem)
            sharded_header(tmp / SHARDED)
            torch.save({**state, "step": step, "data": ck.data_state()}, tmp / "state.pt")
            if ck.config:
                (tmp / "config.yaml").write_text(ck.config)
            write_hashes(tmp)
            put_in_place(tmp, path)  # an intact checkpoint of this step (resumed at it) is replaced whole
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if not isinstance(e, Exception):  # KeyboardInterrupt: as it is
                raise
            cause = getattr(e, "__cause__", None) or e
            raise _save_error(ck, path, cause if isinstance(cause, OSError) else OSError(str(e))) from e
        _prune(ck)
        return str(path)

    return Path(decide(accelerator, finish))


def load_sharded(path: Path, tensors: dict, one_process: bool, verify: bool = True) -> dict:
    """Read a sharded checkpoint's tensors into ``tensors`` (in place, each rank its shards, resharded when the
    number of processes changed); returns its state (step, scheduler, generator, ...). ``verify``: every file
    against its sha256 first (``check_resume`` did that already for a resumed one)."""
    import torch.distributed.checkpoint as dcp

    if verify and (problem := hash_damage(path)) is not None:
        raise _damaged(path, *problem)
    try:
        with _one_process_quiet():
            dcp.load(tensors, storage_reader=sharded_reader(path / SHARDED), no_dist=one_process)
    except Exception as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"resume={path}: its sharded tensors ({path / SHARDED}) cannot be read into this run ({reason}); "
            "resume=auto takes the newest intact checkpoint, or name an earlier step-N folder"
        ) from e
    return torch.load(path / "state.pt", weights_only=True)


@contextlib.contextmanager
def _one_process_quiet():
    """torch.distributed.checkpoint in one process warns that it assumes one process: that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _set_aside_damaged(path: Path) -> None:
    """A damaged checkpoint of this step is kept beside, never written over."""
    if not (path.is_dir() and damage(path, thorough=True) is not None):
        return
    aside = path.with_name(f"{path.name}.damaged")
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.damaged-{n}")
    os.replace(path, aside)
    step = step_number(path)
    print(f"[tuner] the damaged checkpoint {path} is kept as {aside.name}; saving step {step} anew", flush=True)


def _save_error(ck: Checkpointing, path: Path, e: OSError) -> SaveError:
    earlier = [p for p in find(ck.folder) if p != path]
    kept = f"the checkpoint {earlier[-1]} is intact" if earlier else "no earlier checkpoint exists"
    return SaveError(f"could not write the checkpoint {path}: {e.strerror or e}; {kept}")


def _prune(ck: Checkpointing) -> None:
    """Remove the checkpoints older than the newest ``keep``, but those of protected steps (the best ones)."""
    protected = ck.protect()
    for old in find(ck.folder)[: -ck.keep] if ck.keep > 0 else []:
        if step_number(old) not in protected:
            shutil.rmtree(old, ignore_errors=True)


def _show(value) -> str:
    """A setting's value as it is written on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_show(v)}" for k, v in value.items()) + "}"
    return str(value)


def _get(cfg: dict, key: str):
    for part in key.split("."):
        if not isinstance(cfg, dict) or part not in cfg:
            return KeyError
        cfg = cfg[part]
    return cfg


def _same_path(a, b) -> bool:
    if a == b or a is None or b is None:
        return a == b
    return Path(str(a)).expanduser().resolve() == Path(str(b)).expanduser().resolve()


def _resume_keys(cfg: dict) -> list[str]:
    """The settings of ``cfg`` that the trained tensors (their number, shapes and meaning) and the optimizer,
    scheduler and EMA state depend on. The optimizer's learning rate and weight decay are part of its state:
    a resumed optimizer would keep the checkpoint's, whatever the run asks for."""
    a, te, emb = cfg.get("adapter", {}), cfg.get("text_encoder", {}), cfg.get("embedding", {})
    keys = ["model.family", "model.path", "model.builtin", "adapter.type", "text_encoder.train", "embedding.tokens"]
    if not _get(cfg, "model.path") and _get(cfg, "model.builtin"):  # the embedded base, built from these
        keys += [f"base.{k}" for k in cfg.get("base", {})]
    if a.get("type") in ("lora", "loha", "lokr") or te.get("train") == "lora":
        keys += ["adapter.rank", "adapter.alpha"]
    if a.get("type") in ("lora", "loha", "lokr"):
        keys += ["adapter.target_modules"] + (["adapter.targets"] if not a.get("target_modules") else [])
    if a.get("type") == "lora":
        keys += ["adapter.use_dora", "adapter.use_rslora"]
    if a.get("type") == "partial_unet":
        keys += ["adapter.blocks"]
    if te.get("train") == "lora":
        keys += ["text_encoder.target_modules"]
    if te.get("train") not in (None, "none"):
        keys += ["text_encoder.learning_rate"]
    if emb.get("tokens"):
        keys += ["embedding.vectors", "embedding.learning_rate"]
    keys += ["train.optimizer", "train.learning_rate", "train.weight_decay", "train.scale_lr"]
    keys += ["train.lr_scheduler", "train.ema_decay", "train.fused_backward"]
    if _get(cfg, "train.lr_scheduler") == "one_cycle":  # its length is part of its state
        keys += ["train.max_steps"]
    return keys


def config_differences(saved: dict, current: dict) -> list[tuple[str, object, object]]:
    """(key, the checkpoint's value, this run's) for each setting resuming needs unchanged (``_resume_keys``)."""
    keys = [k for k in _resume_keys(current) if k in _resume_keys(saved)]
    out = []
    for key in keys:
        old, new = _get(saved, key), _get(current, key)
        if old is KeyError or new is KeyError:  # a setting the checkpoint's version did not have
            continue
        if old != new and not (key == "model.path" and _same_path(old, new)):
            out.append((key, old, new))
    return out


def _refuse(path: Path, what: str) -> ConfigError:
    return ConfigError(f"resume={path}: {what}; resume with the same settings, or start a new run without resume=")


def check_resume(
    path: Path,
    params: list[torch.nn.Parameter],
    steps: int,
    config: str = "",
    optimizer=None,
    ema: bool = False,
    names: list[str] | None = None,
) -> None:
    """Refuse, before anything is loaded, a checkpoint this run cannot continue from: a damaged one, one
    made under settings that shape the trained tensors or the optimizer state differently (from its
    ``config.yaml``, else from the tensors' shapes and the state itself), or one past ``steps``.

    ``names``: this run saves sharded (``distributed.strategy=fsdp``), its trained tensors by these names.

    Raises:
        ConfigError: naming the damaged file, or each differing setting with both values, and the fix.
    """
    import yaml

    problem = damage(path, thorough=True)
    if problem is not None:
        raise _damaged(path, *problem)
    saved_config = path / "config.yaml"
    if config and saved_config.is_file():
        try:
            saved = yaml.safe_load(saved_config.read_text())
        except (yaml.YAMLError, OSError, UnicodeDecodeError):
            saved = None
            print(f"[tuner] resume: {saved_config} does not parse; checking the trained tensors only", flush=True)
        if isinstance(saved, dict):
            differ = config_differences(saved, yaml.safe_load(config))
            if differ:
                was = " and ".join(f"{k}={_show(old)}" for k, old, _ in differ)
                now = " and ".join(f"{k}={_show(new)}" for k, _, new in differ)
                raise _refuse(path, f"the checkpoint was trained with {was}, this run has {now}")
    _check_tensors(path, params, names)
    file = path / "state.pt"
    state = state_header(file)
    if optimizer is not None:
        saved_groups, groups = state["optimizer"].get("param_groups", []), optimizer.param_groups
        if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in groups]:
            raise _refuse(path, f"{file} holds the optimizer state of other trained parameter groups")
        kind = [sorted(k for k in ("betas", "momentum", "d", "optim_bits") if k in g) for g in saved_groups]
        if kind != [sorted(k for k in ("betas", "momentum", "d", "optim_bits") if k in g) for g in groups]:
            raise _refuse(path, f"{file} holds the state of another optimizer (train.optimizer)")
    if (state.get("ema") is not None) != ema:
        had, has = ("no", "one") if ema else ("an", "none")
        raise _refuse(path, f"{file} holds {had} EMA of the trained weights, this run keeps {has} (train.ema_decay)")
    step = int(state["step"])
    if step > steps:
        raise ConfigError(
            f"resume={path}: the checkpoint is at step {step}, past train.max_steps={steps}; raise train.max_steps "
            f"to {step} or more to continue it, or start a new run without resume="
        )


def _check_tensors(path: Path, params: list[torch.nn.Parameter], names: list[str] | None) -> None:
    """The checkpoint's trained tensors are this run's: the same layout, number, names and shapes."""
    sharded = (path / SHARDED).is_dir()
    if sharded and names is None:
        raise _refuse(path, "it was saved sharded (distributed.strategy=fsdp), this run does not shard")
    if not sharded and names is not None:
        raise _refuse(path, "it was saved whole (distributed.strategy=ddp), this run saves sharded (fsdp)")
    if sharded:
        file = path / SHARDED
        shapes = {k.removeprefix("trained."): v for k, v in sharded_header(file).items() if k.startswith("trained.")}
        if sorted(shapes) != sorted(names):
            other = sorted(set(shapes) ^ set(names))[:3]
            raise _refuse(path, f"{file} holds {len(shapes)} trained tensors, this run trains {len(names)} ({other})")
        for name, p in zip(names, params):
            if shapes[name] != tuple(p.shape):
                raise _refuse(path, f"{file}: {name} has the shape {shapes[name]}, this run's {tuple(p.shape)}")
        return
    file = path / "trained.safetensors"
    tensors = safetensors_header(file)
    if len(tensors) != len(params) or any(str(i) not in tensors for i in range(len(params))):
        raise _refuse(path, f"{file} holds {len(tensors)} trained tensors, this run trains {len(params)}")
    for i, p in enumerate(params):
        shape = tuple(int(d) for d in tensors[str(i)]["shape"])
        if shape != tuple(p.shape):
            raise _refuse(path, f"{file}: trained tensor {i} has the shape {shape}, this run's {tuple(p.shape)}")


def _damaged(path: Path, file: Path, reason: str) -> ConfigError:
    """The refusal of a damaged checkpoint, naming the file and the fixes: resume=auto, or an earlier one."""
    step = step_number(path) if PATTERN.fullmatch(path.name) else None
    earlier = [p for p in find(path.parent) if step is not None and step_number(p) < step]
    hint = f", or name an earlier one: resume={earlier[-1]}" if earlier else ""
    return ConfigError(
        f"resume={path}: the checkpoint is damaged: {file} {reason}. resume=auto (with output_dir=RUN) takes the "
        f"newest intact checkpoint{hint}"
    )


def load(path: Path, params: list[torch.nn.Parameter], verify: bool = True) -> dict:
    """Copy the trained tensors of checkpoint ``path`` into ``params``; returns its state (step, optimizer, ...).

    ``verify``: every file against its sha256 first (``check_resume`` did that for a resumed checkpoint).

    Raises:
        ConfigError: a file of the checkpoint is altered or cannot be read, or its tensors do not fit ``params``.
    """
    from safetensors.torch import load_file

    def damaged(file: Path, e: Exception) -> ConfigError:
        return _damaged(path, file, f"cannot be read ({str(e).splitlines()[0] if str(e) else type(e).__name__})")

    if verify and (problem := hash_damage(path)) is not None:  # every file as it was saved (its sha256)
        raise _damaged(path, *problem)
    file = path / "trained.safetensors"
    try:
        tensors = load_file(file)
    except Exception as e:  # safetensors' own errors are not one type
        raise damaged(file, e) from e
    if len(tensors) != len(params) or any(str(i) not in tensors for i in range(len(params))):
        raise _refuse(path, f"{file} holds {len(tensors)} trained tensors, this run trains {len(params)}")
    for i, p in enumerate(params):
        if tensors[str(i)].shape != p.shape:
            shape = tuple(tensors[str(i)].shape)
            raise _refuse(path, f"{file}: trained tensor {i} has the shape {shape}, this run's {tuple(p.shape)}")
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(tensors[str(i)])
    file = path / "state.pt"
    try:
        return torch.load(file, weights_only=True)
    except Exception as e:  # a corrupt zip member, an unpickling error
        raise damaged(file, e) from e


class StopSignals:
    """Within the block, SIGTERM, SIGINT and SIGUSR1 (SLURM's warning before a time limit) only set
    ``.signum``: the loop saves and stops at the end of the step (with several processes, every rank at
    the same step)."""

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            try:
                self._old[s] = signal.signal(s, self._note)
            except ValueError:  # not the main thread: signals stay as they were
                pass
        return self

    def _note(self, signum, frame):
        if self.signum is not None:
            # a second Ctrl-C stops at once; a repeated SIGTERM is not asked twice (a cluster may signal
            # both the launcher, which passes it on, and the worker itself)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signum = signum
        print(f"\n[tuner] {signal.Signals(signum).name}: saving at the end of this step, then stopping", flush=True)

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)
        return False
