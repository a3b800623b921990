"""Frozen weights in host memory while training, for models larger than the device.

- ``Parked`` (``model.offload_frozen``): the text encoders and the VAE leave the device once their
  outputs are cached, and come back for validation sampling and for the stages after training.
- ``BlockOffload`` (``train.offload_blocks=N``): the frozen weights of N of the denoiser's blocks live
  in host memory (pinned on CUDA). Each block gets a device copy of them just before it runs, made on a
  side stream while the block before it computes, and drops it after. In the backward pass the copies
  come back the same way, in reverse order:
  - with gradient checkpointing the block's forward is recomputed there, so its hooks load it again;
  - without it, the tensors autograd saves that are (views of) a block's device copy are saved as a
    note of which block and where, and fetched again when the backward pass reads them.
  Either way no block's copy outlives its use, and the gradients are the same as without offloading:
  the backward pass reads the same values, only fetched again. Trained tensors (adapters) stay on the
  device. On a CPU the "device copy" is a real copy too, so the same path runs (and is tested) there.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass

import torch


def module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


class Parked:
    """Modules held in host memory while the loop runs; ``on_device()`` brings them back for a while."""

    def __init__(self, modules: dict[str, torch.nn.Module], device: torch.device):
        self.modules, self.device = modules, device
        self.bytes = sum(module_bytes(m) for m in modules.values())
        self.brought: set[str] = set()

    def park(self) -> None:
        for module in self.modules.values():
            module.to("cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def unpark(self, *names: str) -> None:
        """The modules named (all when none are) on the device; each name brought once is in ``brought``."""
        for name in names or tuple(self.modules):
            if name in self.modules:
                self.modules[name].to(self.device)
                self.brought.add(name)

    @contextlib.contextmanager
    def on_device(self):
        self.unpark()
        try:
            yield
        finally:
            self.park()


@dataclass(frozen=True)
class _Saved:
    """A tensor autograd saved that is a view of block ``block``'s device copy number ``index``."""

    block: int
    index: int
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


class BlockOffload:
    """``train.offload_blocks``: see the module's docstring. ``install()`` after accelerate placed the
    model, ``remove()`` before anything else uses it (it puts every weight back on the device)."""

    WINDOW = 2  # device copies held at once: the block running and the one being fetched

    def __init__(self, blocks: list[torch.nn.Module], device: torch.device, checkpointed: bool):
        self.blocks, self.device, self.checkpointed = blocks, device, checkpointed
        # each block's frozen tensors: (module, parameter name)
        self.slots = [
            [
                (m, name)
                for m in block.modules()
                for name, p in m._parameters.items()
                if p is not None and not p.requires_grad
            ]
            for block in blocks
        ]
        self.host: list[list[torch.Tensor]] = []
        self.resident: OrderedDict[int, tuple[list[torch.Tensor], object]] = OrderedDict()
        self.storages: dict[int, tuple[int, int]] = {}  # a device copy's storage -> (block, index)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.handles, self.saving, self.last = [], None, None
        self.order: list[int] = []  # the blocks in the order they ran in the first forward pass
        # blocks whose modules hold their device copies; a recomputation that checkpointing stops early leaves
        # its block here (its forward hook never runs): the next block's hook puts it back
        self.swapped: set[int] = set()
        self.loads: list[int] = []  # which block each fetch was for, in order (the tests read it)

    @property
    def bytes(self) -> int:
        """The frozen bytes the blocks hold (in host memory once installed)."""
        return sum(m._parameters[n].numel() * m._parameters[n].element_size() for s in self.slots for m, n in s)

    def install(self) -> None:
        for i, (block, slots) in enumerate(zip(self.blocks, self.slots)):
            host = []
            for module, name in slots:
                p = module._parameters[name]
                p.data = p.data.to("cpu").pin_memory() if self.stream is not None else p.data.to("cpu")
                host.append(p)
            self.host.append(host)
            self.handles.append(block.register_forward_pre_hook(lambda m, args, i=i: self._before(i)))
            self.handles.append(block.register_forward_hook(lambda m, args, out, i=i: self._after(i)))
        if self.stream is not None:
            torch.cuda.empty_cache()

    def remove(self) -> None:
        for i in list(self.swapped):
            self._swap_out(i)
        for handle in self.handles:
            handle.remove()
        for host in self.host:
            for p in host:
                p.data = p.data.to(self.device)
        self.handles, self.host, self.resident, self.storages = [], [], OrderedDict(), {}

    def _fetch(self, i: int) -> None:
        """Start copying block ``i``'s frozen tensors to the device (if they are not there)."""
        if i in self.resident:
            self.resident.move_to_end(i)
            return
        self.loads.append(i)
        stream = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        with stream, torch.no_grad():
            copies = [
                p.detach().to(self.device, non_blocking=True) if self.stream is not None else p.detach().clone()
                for p in self.host[i]
            ]
            event = torch.cuda.Event() if self.stream is not None else None
            if event is not None:
                event.record(self.stream)
        self.resident[i] = (copies, event)
        for k, t in enumerate(copies):
            self.storages[t.untyped_storage().data_ptr()] = (i, k)
        while len(self.resident) > self.WINDOW:
            old, (gone, _) = self.resident.popitem(last=False)
            for t in gone:
                self.storages.pop(t.untyped_storage().data_ptr(), None)

    def _ready(self, i: int) -> list[torch.Tensor]:
        """Block ``i``'s device copies, once the copy has arrived (the compute stream waits for it)."""
        self._fetch(i)
        copies, event = self.resident[i]
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in copies:
                t.record_stream(current)
        return copies

    def _before(self, i: int) -> None:
        for j in list(self.swapped - {i}):
            self._swap_out(j)
        copies = self._ready(i)
        for (module, name), t in zip(self.slots[i], copies):
            module._parameters[name] = t
        self.swapped.add(i)
        # fetch the block that runs next: the following one going forward, the one before in a recomputation
        if i not in self.order:
            self.order.append(i)
        at = self.order.index(i)
        backward = self.last is not None and at < self.order.index(self.last)
        self.last = i
        following = at - 1 if backward else at + 1
        if 0 <= following < len(self.order):
            self._fetch(self.order[following])
        if torch.is_grad_enabled() and not self.checkpointed:
            self.saving = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            self.saving.__enter__()

    def _after(self, i: int) -> None:
        if self.saving is not None:
            self.saving.__exit__(None, None, None)
            self.saving = None
        self._swap_out(i)

    def _swap_out(self, i: int) -> None:
        for (module, name), p in zip(self.slots[i], self.host[i]):
            module._parameters[name] = p
        self.swapped.discard(i)

    def _pack(self, t: torch.Tensor):
        found = self.storages.get(t.untyped_storage().data_ptr()) if t.device.type == self.device.type else None
        if found is None:
            return t
        return _Saved(*found, t.size(), t.stride(), t.storage_offset())

    def _unpack(self, saved):
        if not isinstance(saved, _Saved):
            return saved
        copies = self._ready(saved.block)
        at = self.order.index(saved.block)
        if at > 0:  # the backward pass goes on to the block that ran before
            self._fetch(self.order[at - 1])
            self.resident.move_to_end(saved.block)
        return copies[saved.index].as_strided(saved.size, saved.stride, saved.offset)


def blocks_of(denoiser: torch.nn.Module, classes: tuple[str, ...]) -> list[torch.nn.Module]:
    """The denoiser's blocks: its modules of the family's block classes (``Family.OFFLOAD_BLOCKS``)."""
    return [m for m in denoiser.modules() if type(m).__name__ in classes]


def largest(blocks: list[torch.nn.Module], n: int) -> list[torch.nn.Module]:
    """The ``n`` blocks holding the most frozen bytes (the later one of equals), in their order."""
    frozen = [sum(p.numel() * p.element_size() for p in b.parameters() if not p.requires_grad) for b in blocks]
    ranked = sorted(range(len(blocks)), key=lambda i: (-frozen[i], -i))[:n]
    return [blocks[i] for i in sorted(ranked)]
