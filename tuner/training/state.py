"""A training run's state in its checkpoints: what the loop saves at a step, resumes from, and restores.

The files themselves (written whole, checked, pruned, sharded) are tuner/training/checkpoints.py's; here is what
of a ``TrainingSetup`` (tuner/training/setup.py) and of the loop goes into them, and back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tuner.distributed import decide, gather
from tuner.training import checkpoints
from tuner.training.setup import TrainingSetup


@dataclass
class Resumed:
    """Where a resumed run goes on: the next step, the losses logged so far, this rank's running loss."""

    start: int
    losses: list[float]
    running: torch.Tensor | float


def save(s: TrainingSetup, step: int, running: float, losses: list[float]) -> Path:
    """Every rank calls it (their RNG states are gathered); rank 0 writes (each rank its shards under FSDP)."""
    a = s.accelerator
    ranks = gather(a, {"torch_rng": torch.get_rng_state(), "running": torch.as_tensor(running).cpu()})
    state = {
        "optimizer": s.optimizer.state_dict(),
        "lr_scheduler": s.lr_scheduler.state_dict(),
        "ema": s.ema.state_dict() if s.ema is not None else None,
        "generator": s.generator.get_state(),
        "scaler": a.scaler.state_dict() if a.scaler is not None else None,
        "ranks": ranks,
        "losses": losses,
        "selection": s.selection.state_dict() if s.selection is not None else None,
        "monitor": s.monitor.state_dict() if s.monitor is not None else None,
    }
    if s.sharded_checkpoints:  # the tensors go sharded; state.pt keeps the rest (settings, counters)
        state["optimizer"] = {"param_groups": state["optimizer"]["param_groups"]}
        if s.ema is not None:
            state["ema"] = {k: v for k, v in state["ema"].items() if k != "shadow_params"}
        return checkpoints.save_sharded(s.checkpointing, step, sharded_state(s)[0], state, a)
    return Path(decide(a, lambda: str(checkpoints.save(s.checkpointing, step, s.params, state))))


def resume(s: TrainingSetup) -> Resumed:
    """Continue from ``checkpointing.resume``: weights, optimizer, schedule, EMA, RNGs, data order, selection,
    the monitor's reference, losses."""
    a, ck, t = s.accelerator, s.checkpointing, s.t
    # rank 0 vets the checkpoint (whole, made with this run's settings, not past its steps); a refusal
    # reaches every rank
    names = s.names if s.sharded_checkpoints else None
    decide(
        a,
        lambda: checkpoints.check_resume(
            ck.resume, s.params, t.max_steps, ck.config, s.optimizer, s.ema is not None, names
        ),
    )
    if s.sharded_checkpoints:  # each rank reads its shards (resharded for another number of processes)
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        tensors, optimizer_state = sharded_state(s)
        state = checkpoints.load_sharded(ck.resume, tensors, a.num_processes == 1, verify=False)
        groups = zip(state["optimizer"]["param_groups"], optimizer_state["param_groups"])
        optimizer_state["param_groups"] = [{**saved, "params": now["params"]} for saved, now in groups]
        set_optimizer_state_dict(s.trained_box, s.optimizer.optimizer, optimizer_state)
    else:
        state = checkpoints.load(ck.resume, s.params, verify=False)
        s.optimizer.load_state_dict(state["optimizer"])
    s.lr_scheduler.load_state_dict(state["lr_scheduler"])
    if s.ema is not None:  # sharded: its averages were read in place above, the rest is here
        s.ema.load_state_dict(state["ema"])
    s.generator.set_state(state["generator"])
    if a.scaler is not None and state.get("scaler"):
        a.scaler.load_state_dict(state["scaler"])
    ranks = state["ranks"]  # each rank's torch RNG and running loss; a new world size starts from rank 0's
    mine = ranks[a.process_index] if len(ranks) == a.num_processes else ranks[0]
    torch.set_rng_state(mine["torch_rng"])
    ck.set_data_state(state["data"])
    if s.selection is not None and state.get("selection"):
        s.selection.load_state_dict(state["selection"])
    if s.monitor is not None:
        s.monitor.load_state_dict(state.get("monitor") or {})
    start = state["step"]
    if a.is_main_process:
        print(f"[tuner] resumed from {ck.resume} at step {start} of {t.max_steps}", flush=True)
        if start == t.max_steps:  # e.g. stopped in the export after the last step: later stages run
            print(
                f"[tuner] training is already complete (step {start} = train.max_steps); the stages "
                "after it run on the checkpoint's weights (raise train.max_steps to train on)",
                flush=True,
            )
    return Resumed(start, list(state["losses"]), mine["running"])


def restore(s: TrainingSetup, path: Path) -> None:
    """The trained tensors (and the EMA's averages) of checkpoint ``path``, in place of the current ones: the
    weights the run keeps when an earlier step was best (``export.from=best``, ``train.early_stop``)."""
    if s.sharded_checkpoints:
        tensors = sharded_state(s)[0]
        tensors.pop("optimizer")
        state = checkpoints.load_sharded(path, tensors, s.accelerator.num_processes == 1)
    else:
        state = checkpoints.load(path, s.params)
    if s.ema is not None:  # sharded: the averages were read in place above
        s.ema.load_state_dict(state["ema"])


def sharded_state(s: TrainingSetup) -> tuple[dict, dict]:
    """What a sharded checkpoint holds (each rank's shards under FSDP): the trained tensors, the optimizer
    state's tensors (keyed by parameter name) and the EMA; tensors only, so reading it unpickles nothing.
    Also the optimizer state they belong to (torch.distributed.checkpoint's form, sharing those tensors)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    optimizer_state = get_optimizer_state_dict(s.trained_box, s.optimizer.optimizer)
    moments = {
        name: {k: v for k, v in entry.items() if isinstance(v, torch.Tensor)}
        for name, entry in optimizer_state["state"].items()
    }
    tensors = {"trained": {name: p.detach() for name, p in zip(s.names, s.params)}, "optimizer": moments}
    if s.ema is not None:
        tensors["ema"] = dict(zip(s.names, s.ema.shadow_params))
    return tensors, optimizer_state
