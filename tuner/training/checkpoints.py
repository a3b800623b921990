"""Training checkpoints: everything a run needs to go on exactly where it stopped.

A checkpoint is a folder ``checkpoints/step-NNNNNNN/`` in the run folder, written whole or not at all
(a temp folder renamed into place), holding:

- ``trained.safetensors``: every trained tensor, in the order the optimizer holds them;
- ``state.pt``: optimizer, LR scheduler, EMA, loss scaler (fp16), the loop's random generator (the
  same on every rank), each rank's torch RNG and running loss, the data order still to come and the
  epochs started, the step and the losses so far;
- ``config.yaml``: the run's resolved configuration.

``state.pt`` is read back with ``weights_only=True``: tensors and plain containers only, nothing else
is ever unpickled.

Only the trained tensors are saved (a LoRA's few megabytes, not the frozen base), which is why this
is not accelerate's ``save_state``: that writes every prepared model whole.
"""

from __future__ import annotations

import re
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tuner.files import atomic_dir

PATTERN = re.compile(r"step-(\d+)")


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


class SaveError(RuntimeError):
    """A checkpoint could not be written (disk full, no permission); earlier ones are intact."""


class Stopped(Exception):
    """Training stopped early on a signal, after saving a checkpoint at a step boundary."""

    def __init__(self, step: int, path: Path, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint {path}")
        self.step, self.path, self.signum = step, path, signum


def find(folder: Path) -> list[Path]:
    """The complete checkpoints in ``folder``, oldest first (temp folders of an interrupted save are not)."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if PATTERN.fullmatch(p.name) and (p / "state.pt").is_file()]
    return sorted(found, key=lambda p: int(PATTERN.fullmatch(p.name)[1]))


def newest_intact(folder: Path) -> Path | None:
    """resume=auto: the newest complete checkpoint in ``folder``, or None (training starts at step 0)."""
    found = find(folder)
    if not found:
        print(f"[tuner] resume=auto: no checkpoint in {folder} yet; starting at step 0", flush=True)
    return found[-1] if found else None


def save(ck: Checkpointing, step: int, params: list[torch.nn.Parameter], state: dict) -> Path:
    """Write the checkpoint of ``step`` (steps done) and drop the oldest beyond ``keep``."""
    from safetensors.torch import save_file

    path = ck.folder / f"step-{step:07d}"
    try:
        with atomic_dir(path) as tmp:
            tensors = {str(i): p.detach().cpu().contiguous() for i, p in enumerate(params)}
            save_file(tensors, tmp / "trained.safetensors")
            torch.save({**state, "step": step, "data": ck.data_state()}, tmp / "state.pt")
            if ck.config:
                (tmp / "config.yaml").write_text(ck.config)
    except OSError as e:  # disk full, permission denied: say so; the earlier checkpoints are untouched
        earlier = [p for p in find(ck.folder) if p != path]
        kept = f"the checkpoint {earlier[-1]} is intact" if earlier else "no earlier checkpoint exists"
        raise SaveError(f"could not write the checkpoint {path}: {e.strerror or e}; {kept}") from e
    for old in find(ck.folder)[: -ck.keep] if ck.keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load(path: Path, params: list[torch.nn.Parameter]) -> dict:
    """Copy the trained tensors of checkpoint ``path`` into ``params``; returns its state (step, optimizer, ...)."""
    from safetensors.torch import load_file

    tensors = load_file(path / "trained.safetensors")
    if len(tensors) != len(params):
        raise ValueError(f"{path}: holds {len(tensors)} trained tensors, this run trains {len(params)}")
    with torch.no_grad():
        for i, p in enumerate(params):
            saved = tensors[str(i)]
            if saved.shape != p.shape:
                raise ValueError(f"{path}: tensor {i} has shape {tuple(saved.shape)}, this run's {tuple(p.shape)}")
            p.copy_(saved)
    return torch.load(path / "state.pt", weights_only=True)


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
