"""Several processes (``torchrun``, ``accelerate launch``): what a run adds on top of accelerate.

accelerate is the engine: it starts the process group (gloo on CPUs, NCCL on GPUs), wraps the trained
modules in DistributedDataParallel and averages their gradients. This module holds the few rules a
run follows on top of it, so that N processes behave as one:

- one rank decides (the run folder, whether a cached base exists, which checkpoint to resume) and the
  others take its answer, errors included (``decide``);
- rank 0 alone writes the run's outputs; the others wait at ``barrier`` when they need what it wrote;
- every rank draws the same global batch from the same generator and trains on its own slice of it
  (``Batch.shard`` in tuner/training/batches.py), so N processes with batch B train exactly as one
  process with batch N x B;
- a stop signal or a non-finite loss on any rank stops every rank at the same step (``any_rank``).
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from tuner.errors import ConfigError

T = TypeVar("T")

# set on rank 0 once the other ranks have left (no stage left needs them): from then on it acts alone
_alone = False


def go_alone() -> None:
    global _alone
    _alone = True


def _solo(accelerator) -> bool:
    return accelerator.num_processes == 1 or _alone


def launched_world_size() -> int:
    """The number of processes the launcher (torchrun, accelerate launch, mpirun) started, from its variables."""
    for name in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if os.environ.get(name):
            return int(os.environ[name])
    return 1


BARRIER_TIMEOUT = 7200  # seconds a rank waits for the others at a barrier or collective (TUNER_BARRIER_TIMEOUT)


def barrier_timeout() -> float:
    """``TUNER_BARRIER_TIMEOUT``: the seconds a rank waits for the others (rank 0 alone writes galleries and
    exports while they wait), a positive number; 7200 when unset.

    Raises:
        ConfigError: naming the variable, its value and what it takes.
    """
    text = os.environ.get("TUNER_BARRIER_TIMEOUT", "").strip()
    if not text:
        return BARRIER_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(
            f"TUNER_BARRIER_TIMEOUT={text}: the seconds a rank waits for the others at a barrier, a positive number "
            f"(default {BARRIER_TIMEOUT}); set it so, or unset it"
        )
    return seconds


def make_accelerator(mixed_precision: str, gradient_accumulation_steps: int):
    """accelerate's Accelerator, on the CPUs with gloo when several processes run on a machine with no GPU.

    accelerate only picks its multi-CPU mode when asked (``accelerate launch --cpu``); under plain
    torchrun on a CPU machine it would silently give each process a world of its own. So a launched
    world with no GPU asks for it, and a world accelerate did not join is refused.
    """
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    world = launched_world_size()
    cpu = world > 1 and not torch.cuda.is_available()
    # rank 0 alone writes galleries and exports while the others wait: give barriers time
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=barrier_timeout()))
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        kwargs_handlers=[timeout],
    )
    check_engine(accelerator.distributed_type)
    if accelerator.num_processes != world:
        raise RuntimeError(
            f"the launcher started {world} processes but accelerate joined {accelerator.num_processes} "
            f"({accelerator.distributed_type}); check the launcher's settings (accelerate config)"
        )
    return accelerator


# accelerate's engines and how tuner trains with each (README "Several GPUs and machines" shows this table)
ENGINES = {
    "DDP (MULTI_GPU, MULTI_CPU)": "every adapter type, full and partial U-Net, textual inversion; no | fp16 | bf16",
    "FSDP2 (distributed.strategy=fsdp)": "full and partial fine-tunes, full text encoders, LoRA; sharded "
    "checkpoints; no | fp16 | bf16",
    "DeepSpeed": "refused: its engine owns the model, optimizer and checkpoints, where tuner's loop, sharded "
    "checkpoints and exports need them; FSDP2 shards the same state",
}


# what the launcher's accelerate config said about FSDP, read once per process (a sweep runs several recipes)
_accelerate_fsdp: tuple[str, bool] | None = None


def sharding(configured: str, reshard_after_forward: bool) -> tuple[str, bool]:
    """``distributed.strategy`` and ``reshard_after_forward``, or what the launcher's accelerate config says when
    it is ``distributed_type: FSDP`` (its ``fsdp_version`` must be 2).

    tuner shards with FSDP2 itself (tuner/training/sharding.py explains why); once read, accelerate's own FSDP
    mode is switched off for this process (its variable set to false), so accelerate runs as for DDP.
    """
    global _accelerate_fsdp
    if _accelerate_fsdp is not None:
        return _accelerate_fsdp
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return configured, reshard_after_forward
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise ConfigError(
            f"accelerate is set up for FSDP version {version}; tuner shards with FSDP2: set fsdp_version: 2 in the "
            "accelerate config (tools/launch/accelerate_fsdp.yaml), or launch with torchrun and "
            "distributed.strategy=fsdp"
        )
    if os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true":
        raise ConfigError(
            "the accelerate config sets fsdp_offload_params: true, which tuner does not do under FSDP; set it to "
            "false (sharding over more GPUs, train.gradient_checkpointing and bf16 save memory instead)"
        )
    os.environ["ACCELERATE_USE_FSDP"] = "false"
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", str(reshard_after_forward)).lower()
    _accelerate_fsdp = "fsdp", reshard in ("true", "1", "full_shard", "hybrid_shard")
    return _accelerate_fsdp


def check_engine(distributed_type) -> None:
    """Refuse, before anything loads, an engine tuner does not train with."""
    from accelerate.utils import DistributedType

    if distributed_type == DistributedType.DEEPSPEED:
        raise ConfigError(
            f"accelerate is set up for DeepSpeed ({ENGINES['DeepSpeed'].removeprefix('refused: ')}), which tuner does "
            "not support. To shard a full or partial fine-tune over the GPUs use FSDP2: distributed.strategy=fsdp "
            "(or tools/launch/accelerate_fsdp.yaml); adapters train well with plain data parallelism "
            "(tools/launch/accelerate_multi_gpu.yaml, distributed_type MULTI_GPU, or torchrun)"
        )


def decide(accelerator, fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0, its result taken by every rank; an error there is raised on every rank.

    The other ranks wait here until rank 0 is done, so it doubles as a barrier after rank 0's writes.
    """
    if _solo(accelerator):
        return fn()
    from accelerate.utils import broadcast_object_list

    answer, error = [None], None
    if accelerator.is_main_process:
        try:
            answer = [("ok", fn())]
        except Exception as e:  # every rank must hear of it, or they would wait for rank 0 forever
            error = e
            answer = [("error", (type(e), str(e)))]
    broadcast_object_list(answer, from_process=0)
    kind, value = answer[0]
    if error is not None:
        raise error
    if kind == "error":
        cls, message = value
        try:
            raised = cls(message)
        except Exception:
            raised = RuntimeError(message)
        raised.told_by_rank0 = True  # rank 0 reports it; the others need not repeat it
        raise raised
    return value


def barrier(accelerator) -> None:
    if not _solo(accelerator):
        accelerator.wait_for_everyone()


def any_rank(accelerator, *flags: bool) -> list[bool]:
    """Each flag, true if it is true on any rank (one small all-reduce; no communication in one process)."""
    if _solo(accelerator):
        return list(flags)
    t = torch.tensor([float(f) for f in flags], device=accelerator.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return [bool(x) for x in t.tolist()]


def gather(accelerator, value):
    """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
    if _solo(accelerator):
        return [value]
    out = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(out, value)
    return out


def check_visible(accelerator, path: Path, what: str) -> None:
    """After rank 0 wrote ``path`` and a barrier: every rank must see it (the run needs a shared filesystem)."""
    seen = gather(accelerator, Path(path).exists())
    if not all(seen):
        hosts = gather(accelerator, socket.gethostname())
        blind = sorted({hosts[r] for r, s in enumerate(seen) if not s})
        raise ConfigError(
            f"{what} {path} was written by rank 0 but is not visible on {', '.join(blind)}: with several "
            "machines, output_dir (and TUNER_HOME, model.path) must be on a filesystem every machine mounts"
        )


# what gloo and NCCL say when a peer went away mid-collective, and when one did not come in time
_GONE = ("connection closed by peer", "connection reset by peer", "broken pipe", "remote process exited",
         "communicator was aborted", "socket closed", "econnreset", "connection refused")  # fmt: skip
_LATE = ("timed out", "timeout", "deadline exceeded")

# set once a collective failed: the process group is broken, so ``end`` leaves it to the process's exit
_broken = False


def peer_failure(error: BaseException) -> str | None:
    """One line saying which rank stopped or did not come when a collective failed on this rank (gloo's or NCCL's
    error from a barrier, broadcast or all-reduce); None when ``error`` is not such a failure."""
    global _broken
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    text = str(error).lower()
    late = any(word in text for word in _LATE)
    if not (late or any(word in text for word in _GONE)) and not isinstance(error, _backend_errors()):
        return None
    _broken = True
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    others = [r for r in range(world) if r != rank]
    who = f"rank {others[0]}" if len(others) == 1 else f"another rank (of {', '.join(map(str, others))})"
    if late:
        return (
            f"{who} did not reach the barrier within TUNER_BARRIER_TIMEOUT={barrier_timeout():g} s (stuck, stopped "
            "or still busy); see its log, and raise TUNER_BARRIER_TIMEOUT if it was only slow"
        )
    return f"{who} stopped (killed or crashed) while this rank waited for it; see its log"


def _backend_errors() -> tuple[type, ...]:
    return tuple(e for e in (getattr(torch.distributed, "DistBackendError", None),) if e is not None)


def end() -> None:
    """Destroy the process group, if one was started, so every rank exits cleanly (no hang, no warning); after a
    failed collective it is left to the exit (destroying a group whose peer is gone can wait for it)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and not _broken:
        torch.distributed.destroy_process_group()
