"""FSDP2 (``distributed.strategy=fsdp``): the modules that train, sharded over the ranks.

With plain data parallelism (DDP) every rank holds the whole model, its gradients and its optimizer
state; a full fine-tune of SDXL (2.6B parameters x 16 bytes under AdamW) fits no single GPU that way.
FSDP2 (torch's ``fully_shard``) splits every parameter, gradient and optimizer state along its first
dimension over the ranks; each repeated block gathers its whole weights just before it runs and frees
them after. The parameters become ``DTensor``s (a rank's shard plus the global shape), so:

- the trained tensors and the optimizer state are saved sharded, with ``torch.distributed.checkpoint``
  (tuner/training/checkpoints.py), which also reloads them onto another number of processes;
- after training, ``Sharded.gather`` brings each module back whole on rank 0 only, one tensor at a time,
  into a copy of its structure made before sharding; the other ranks keep nothing. The stages after
  training (gallery, export) then run on rank 0 as they do after DDP.

tuner shards with ``fully_shard`` itself rather than through ``accelerator.prepare``: accelerate's FSDP2
preparation takes one model (a denoiser and a text encoder may train together) and is only switched on
for GPUs, so the path would differ from the one tested here on CPUs. accelerate still starts the
processes, places the devices, autocasts, accumulates, clips (DTensor-aware) and steps the optimizer;
an accelerate config of ``distributed_type: FSDP`` is read as ``distributed.strategy=fsdp``
(``tuner.distributed.sharding``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch

MIXED_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _meta_copy(module: torch.nn.Module) -> torch.nn.Module:
    """The module's structure with every parameter and buffer on the meta device (no memory): what
    ``gather`` fills with the whole tensors after training."""
    memo = {}
    for p in module.parameters():
        memo[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo)


def units(module: torch.nn.Module, classes: Iterable[str]) -> list[torch.nn.Module]:
    """The submodules sharded as units of their own (each gathered whole only while it runs): instances of
    the classes named, outermost first, none inside another."""
    names = set(classes)
    found, inside = [], set()
    for name, m in module.named_modules():
        if any(name.startswith(f"{outer}.") for outer in inside):
            continue
        if type(m).__name__ in names:
            found.append(m)
            inside.add(name)
    return found


class Sharded:
    """The trained modules under FSDP2, and the way back to whole modules on rank 0.

    Args:
        modules: name -> module (on its device), each sharded in place: its ``classes[name]`` blocks as units,
            then the module itself.
        classes: name -> the class names of that module's repeated blocks.
        mixed_precision: accelerate's setting; bf16/fp16 gather the weights in that dtype for compute and
            reduce the gradients in float32 (the sharded weights stay as they are).
        reshard_after_forward: free each block's gathered weights after its forward (gathered again for the
            backward): less memory, more communication.
        is_main: this rank keeps the whole modules ``gather`` returns.
    """

    def __init__(
        self,
        modules: dict[str, torch.nn.Module],
        classes: dict[str, Iterable[str]],
        mixed_precision: str,
        reshard_after_forward: bool,
        is_main: bool,
    ):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        dtype = MIXED_PRECISION.get(mixed_precision)
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
        self.modules = modules
        # (module name, parameter name) of each parameter, by id: before sharding (only while those live: once
        # nothing holds them their memory is freed, which is the point), and of each shard
        self.names = {}
        self.skeletons = {}  # rank 0: module name -> its structure on the meta device
        for name, module in modules.items():
            self.names |= {id(p): (name, n) for n, p in module.named_parameters()}
            if is_main:
                self.skeletons[name] = _meta_copy(module)
            for unit in units(module, classes.get(name, ())):
                fully_shard(unit, mp_policy=policy, reshard_after_forward=reshard_after_forward)
            fully_shard(module, mp_policy=policy, reshard_after_forward=reshard_after_forward)
        for name, module in modules.items():  # the shards, written last: a freed original's id may be reused
            self.names |= {id(p): (name, n) for n, p in module.named_parameters()}
        params = [p for m in modules.values() for p in m.parameters()]
        # the weights' bytes this rank holds, and the whole modules' (gradients and optimizer state follow suit)
        self.bytes = sum(p.to_local().numel() * p.element_size() for p in params)
        self.whole_bytes = sum(p.numel() * p.element_size() for p in params)

    def parameters(self, params: Iterable[torch.nn.Parameter], modules=None) -> list[torch.nn.Parameter]:
        """The parameters of ``modules`` (the sharded ones by default; the whole ones ``gather`` returned) that
        stand for ``params`` (the modules' parameters before sharding, or their shards)."""
        named = {name: dict(m.named_parameters()) for name, m in (modules or self.modules).items()}
        return [named[module][n] for module, n in (self.names[id(p)] for p in params)]

    def gather(self, device) -> dict[str, torch.nn.Module]:
        """Every rank: each module's whole tensors, one at a time (a collective); rank 0 keeps them in its
        copy of the module, on ``device`` (host memory: the training state may still be on the accelerator),
        and returns those copies; the other ranks return nothing.

        Buffers are not sharded: rank 0's own are taken.
        """
        from torch.distributed.tensor import DTensor

        whole = {}
        for name, module in self.modules.items():
            skeleton = self.skeletons.get(name)
            ours = list(skeleton.named_parameters()) if skeleton is not None else None
            for i, (n, p) in enumerate(module.named_parameters()):
                full = p.full_tensor() if isinstance(p, DTensor) else p.detach()
                if ours is None:
                    continue
                if ours[i][0] != n:
                    raise RuntimeError(f"FSDP gather: parameter {n} of {name} is {ours[i][0]} in its copy")
                _set(skeleton, n, torch.nn.Parameter(full.to(device), requires_grad=p.requires_grad))
                del full
            if skeleton is None:
                continue
            for n, b in module.named_buffers():
                _set(skeleton, n, b.to(device), buffer=True)
            whole[name] = skeleton
        self.modules = {}
        return whole


def _set(module: torch.nn.Module, name: str, value: torch.Tensor, buffer: bool = False) -> None:
    """Put ``value`` as the parameter (or buffer) ``name`` of ``module``, and of every module sharing it."""
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    table = owner._buffers if buffer else owner._parameters
    old = table[leaf]
    for m in module.modules():  # tied weights (T5's shared embedding) are one tensor under several names
        t = m._buffers if buffer else m._parameters
        for k, v in t.items():
            if v is old:
                t[k] = value
