"""Plan the device memory of a LoRA run, per family, at the real models' widths.

    python tools/bench_memory.py                       # the plan table of every registered family's targets
    python tools/bench_memory.py --check               # and the method's check: 3 units planned from 1 and 2
    python tools/bench_memory.py --family flux --resolution 512 --quantize nf4 --offload-blocks 0

How: each registered family's denoiser is built at its real widths (hidden sizes, heads, channels; the
family's ``real_widths()``) with its repeated unit cut to 1 and 2 (Flux: a double- and two single-stream
blocks, 19 of them in Flux.1; SDXL: one layer of each of the six 1280-wide transformers, 10 in SDXL; SD3: a
joint block, 24 in SD3-medium; SD1.5 and SD2 are measured whole). Its tensors are fake (PyTorch's
FakeTensorMode: shapes and dtypes, no memory, no compute), so the real widths cost nothing; one training
step runs on them (tuner's LoRA targets, bf16 autocast, the frozen base in bf16 or NF4, gradient
checkpointing) and every tensor the step creates is counted while it lives: the step's peak (activations,
transients, gradients, optimizer state) beyond the weights held. Weights and step peak are linear in the
unit count; the plan extrapolates them to the real depth. The rows: each family's published target
(``RealWidths.published``) and the ways around it (``settings``).

The planned peak is the larger of the two phases of a run with ``model.offload_frozen`` (on by default on
a GPU): the frozen encoders caching their outputs (text encoders and VAE as held; their activations are
not counted), then the steps (the denoiser as held, less the blocks ``train.offload_blocks`` keeps in host
memory plus the two it holds at a time (the blocks: ``family.OFFLOAD_BLOCKS``), its LoRA, the step's
peak). It is what
``torch.cuda.max_memory_allocated`` would report: the CUDA context (about 0.5 GB) and the allocator's
slack come on top. NF4 weights take the bytes bitsandbytes holds (measured on one layer here); a
dequantized NF4 weight lives only inside its layer's call, counted as one layer's bf16 weight.

On a GPU (``--gpu``) the same reduced models also run one real step there, and the table prints
``torch.cuda.max_memory_allocated`` of it beside the plan of that depth.

An edit family (``family.REFERENCES``) has rows with 1 and 3 reference images at 1024 px (as many as it takes):
each reference's tokens join the target's in the denoiser's sequence (``inputs(..., references=n)``), so the
step's activations grow with each (``--references N`` plans any row with N).
"""

from __future__ import annotations

import argparse
import re
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tuner.models import family_names, get_family  # noqa: E402  (after the path: the checkout's tuner)

GB = 1e9  # the published figures are in GB


class StepMemory(TorchDispatchMode):
    """Counts the bytes of every storage created inside it while the storage lives; ``peak`` is the most at
    once. Storages that existed before (weights, inputs, optimizer state) are not counted."""

    def __init__(self, existing: list[torch.Tensor]):
        super().__init__()
        self.known = {id(t.untyped_storage()) for t in existing}
        self.keep = [t.untyped_storage() for t in existing]  # their ids stay theirs
        self.refs: dict[int, weakref.ref] = {}
        self.live = self.peak = 0

    def _gone(self, key: int, size: int) -> None:
        self.live -= size
        self.refs.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in self.known or key in self.refs:
                continue
            size = storage.nbytes()
            self.refs[key] = weakref.ref(storage, lambda _, key=key, size=size: self._gone(key, size))
            self.live += size
            self.peak = max(self.peak, self.live)
        return out


@dataclass
class Setting:
    resolution: int
    batch: int = 1
    rank: int = 16
    quantize: str | None = None  # the denoiser's frozen linear layers: nf4 | int8 | None (bf16)
    quantize_text_encoders: str | None = None
    checkpointing: bool = True
    offload_blocks: int = 0
    targets: str = "attn_ff"
    references: int = 0  # reference images beside the target (edit families): their tokens join the sequence


def settings(family, rw) -> list[Setting]:
    """The family's rows: its published target's settings (``published``: "... N px target"; else its default
    resolution) in bf16 with checkpointing; for a model cut to units (a large one), its base and text encoders
    in NF4 too; for a target met by offloading, the whole ladder, from no checkpointing to every block of
    ``family.OFFLOAD_BLOCKS`` in host memory (with the text encoders in NF4)."""
    targets = {what: value for what, value in rw.published.items() if what.endswith(" target")}
    sizes = [int(m[1]) for m in (re.search(r"(\d+) px target$", what) for what in targets) if m]
    res = sizes[0] if sizes else family.DEFAULT_RESOLUTION
    rows = [Setting(res)]
    if rw.real is not None:
        rows.append(Setting(res, quantize="nf4", quantize_text_encoders="nf4"))
    if any("offload" in value for value in targets.values()):
        from tuner.training.offload import blocks_of

        with torch.device("meta"):
            every = len(blocks_of(rw.denoiser(rw.real), family.OFFLOAD_BLOCKS))
        rows = [
            Setting(res, checkpointing=False),
            *rows,
            Setting(res, quantize_text_encoders="nf4", offload_blocks=every),
        ]
    if family.REFERENCES is not None:  # edit rows: 1 and 3 references at 1024 px, bf16 and (a large model) NF4
        for n in (n for n in (1, 3) if n <= family.REFERENCES.most):
            rows.append(Setting(1024, references=n))
            if rw.real is not None:
                rows.append(Setting(1024, quantize="nf4", quantize_text_encoders="nf4", references=n))
    return rows


def quantized_bytes_per_value(kind: str) -> float:
    """The bytes bitsandbytes holds per weight value of a layer tuner quantizes (measured on a real layer)."""
    from tuner.models.quantize import quantize_linears

    layer = torch.nn.Sequential(torch.nn.Linear(1024, 1024, bias=False))
    quantize_linears(layer, kind, torch.device("cpu"), torch.bfloat16)
    held = layer[0].weight
    size = held.numel() * held.element_size()
    state = getattr(held, "quant_state", None) or getattr(layer[0].weight, "SCB", None)
    extra = [state.absmax] if hasattr(state, "absmax") else ([state] if isinstance(state, torch.Tensor) else [])
    if hasattr(state, "state2") and state.state2 is not None:  # nested (double) quantization of the scales
        extra += [state.state2.absmax, state.state2.code]
    size += sum(t.numel() * t.element_size() for t in extra)
    return size / (1024 * 1024)


def held_bytes(module: torch.nn.Module, kind: str | None, rates: dict) -> tuple[int, int]:
    """(bytes as the run holds them, the largest quantized layer's bf16 bytes) for a frozen module in bf16,
    its linear layers quantized to ``kind`` where tuner quantizes them."""
    from tuner.models.quantize import BLOCK

    total = biggest = 0
    for m in module.modules():
        for name, p in m.named_parameters(recurse=False):
            quantized = kind and type(m) is torch.nn.Linear and name == "weight" and p.numel() % BLOCK == 0
            total += p.numel() * (rates[kind] if quantized else 2)
            biggest = max(biggest, p.numel() * 2 if quantized else 0)
    return int(total), biggest


def _lora(denoiser, family, s: Setting):
    from peft import inject_adapter_in_model

    from tuner.compose import compose
    from tuner.training.trainables import denoiser_target_modules, peft_config

    a = compose("lora", [f"model={family.NAME}", f"adapter.rank={s.rank}", f"adapter.targets={s.targets}"]).adapter
    targets = denoiser_target_modules(denoiser, a, family)
    return inject_adapter_in_model(peft_config(a, targets, family.TARGETS_EXCLUDE), denoiser)


def _step(denoiser, rw, s: Setting, device_type: str) -> None:
    inputs = rw.inputs(s.resolution, s.batch, torch.bfloat16, **({"references": s.references} if s.references else {}))
    with torch.autocast(device_type, dtype=torch.bfloat16):
        out = denoiser(**inputs, return_dict=False)[0]
    out.float().square().mean().backward()


def _fake(module: torch.nn.Module, mode) -> None:
    """``module``'s meta tensors as fake CPU tensors of ``mode`` (in place: fake tensors cannot be ``.to``-ed)."""
    convert = mode.fake_tensor_converter.from_meta_and_device
    cpu = torch.device("cpu")
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None:
                with mode:
                    m._parameters[name] = torch.nn.Parameter(convert(mode, p, cpu), requires_grad=p.requires_grad)
        for name, b in m._buffers.items():
            if b is not None:
                m._buffers[name] = convert(mode, b, cpu)


def measure(family, rw, units: int, s: Setting, rates: dict) -> dict:
    """Bytes of one reduced model (``units`` of its unit) on fake tensors: weights as held, its LoRA, the
    step's peak beyond them, the largest offload block, and its dequantized-layer transient."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from tuner.training.offload import blocks_of

    with torch.device("meta"):  # built and adapted on the meta device, then made fake
        denoiser = rw.denoiser(units).to(torch.bfloat16).requires_grad_(False)
        weights, dequantized = held_bytes(denoiser, s.quantize, rates)
        blocks = blocks_of(denoiser, family.OFFLOAD_BLOCKS)
        block_bytes = [held_bytes(b, s.quantize, rates)[0] for b in blocks]
        denoiser = _lora(denoiser, family, s)
        for p in denoiser.parameters():
            if p.requires_grad:  # the adapters train in fp32
                p.data = p.data.float()
    lora = sum(p.numel() * 4 for p in denoiser.parameters() if p.requires_grad)
    if s.checkpointing:
        denoiser.enable_gradient_checkpointing()
    denoiser.train()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    _fake(denoiser, mode)
    with mode:
        trained = [p for p in denoiser.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trained, foreach=False)
        counter = StepMemory([*denoiser.parameters(), *denoiser.buffers()])
        with counter:
            _step(denoiser, rw, s, "cpu")
            optimizer.step()
    step = counter.peak + (dequantized if s.quantize else 0)
    return {"weights": weights, "lora": lora, "step": step, "blocks": sorted(block_bytes)}


def measure_gpu(family, rw, units: int, s: Setting) -> int:
    """``torch.cuda.max_memory_allocated`` of one real step of the reduced model (quantized as tuner does)."""
    from tuner.models.quantize import quantize_linears
    from tuner.training.offload import BlockOffload, blocks_of, largest

    device = torch.device("cuda")
    torch.cuda.empty_cache()
    baseline = torch.cuda.memory_allocated()
    denoiser = rw.denoiser(units).to(torch.bfloat16).requires_grad_(False)
    if s.quantize:
        quantize_linears(denoiser, s.quantize, device, torch.bfloat16)
    denoiser = _lora(denoiser.to(device), family, s)
    trained = [p for p in denoiser.parameters() if p.requires_grad]
    for p in trained:
        p.data = p.data.float()
    if s.checkpointing:
        denoiser.enable_gradient_checkpointing()
    denoiser.train()
    offload = None
    if s.offload_blocks:
        every = blocks_of(denoiser, family.OFFLOAD_BLOCKS)
        offload = BlockOffload(largest(every, min(s.offload_blocks, len(every))), device, s.checkpointing)
        offload.install()
    torch.cuda.reset_peak_memory_stats()  # from here: what the run holds (offloaded blocks already in host memory)
    optimizer = torch.optim.AdamW(trained)
    with torch.device(device):
        _step(denoiser, rw, s, "cuda")
    optimizer.step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - baseline
    if offload is not None:
        offload.remove()
    del denoiser, optimizer
    return peak


def encode_phase(rw, s: Setting, rates: dict) -> dict:
    """The frozen encoders while they cache: their weights as held (text encoders bf16 or quantized, the VAE in
    fp32), plus the larger of their activations, measured on fake tensors: the VAE encoding the images tuner
    encodes at once at this resolution, the text encoders a batch of captions at their lengths."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from tuner.stages.train_inputs import PROMPTS_AT_ONCE
    from tuner.training.batches import encode_batch

    with torch.device("meta"):
        texts, vae = rw.text_encoders(), rw.vae()
        for t in texts:
            t.to(torch.bfloat16)
    weights = sum(held_bytes(t, s.quantize_text_encoders, rates)[0] for t in texts)
    weights += sum(p.numel() * 4 for p in vae.parameters())  # tuner keeps the VAE in fp32
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    peaks = []
    for module in (*texts, vae):
        _fake(module, mode)
        with mode, torch.no_grad():
            counter = StepMemory([*module.parameters(), *module.buffers()])
            if module is vae:
                images = torch.randn(encode_batch(s.resolution, s.resolution), 3, s.resolution, s.resolution)
                with counter:
                    module.encode(images)
            else:
                t5 = module.config.model_type == "t5"  # at the pipelines' longest prompt, its last state read
                ids = torch.zeros(PROMPTS_AT_ONCE, 512 if t5 else 77, dtype=torch.long)
                with counter, torch.autocast("cpu", dtype=torch.bfloat16):
                    module(input_ids=ids, output_hidden_states=not t5)
        peaks.append(counter.peak)
    return {"weights": weights, "activations": max(peaks), "total": weights + max(peaks)}


def plan(family, s: Setting, rates: dict, check: bool = False, rw=None) -> dict:
    """The planned peak of ``family`` (its ``real_widths()``, or ``rw``) at the real depth, from 1 and 2 units (or
    the whole model); with ``check`` also the 3-unit plan and measurement."""
    rw = rw or family.real_widths()
    if rw.real is None:
        real = measure(family, rw, 1, s, rates)
        at = {"real": real}
    else:
        one, two = measure(family, rw, 1, s, rates), measure(family, rw, 2, s, rates)

        def line(n):  # n units: the sums on the line through 1 and 2 units, the unit's blocks n times
            out = {k: one[k] + (n - 1) * (two[k] - one[k]) for k in ("weights", "lora", "step")}
            unit = list(two["blocks"])
            for b in one["blocks"]:
                unit.remove(b)
            return out | {"blocks": sorted(one["blocks"] + unit * (n - 1))}

        real = line(rw.real)
        at = {"real": real, 1: one, 2: two}
        if check:
            at["planned 3"], at["measured 3"] = line(3), measure(family, rw, 3, s, rates)
    total = {}
    for key, m in at.items():
        # train.offload_blocks: the largest blocks in host memory, two of them on the device at a time
        offloaded = m["blocks"][::-1][: s.offload_blocks]
        resident = m["weights"] - sum(offloaded) + sum(offloaded[:2])
        total[key] = {"train": resident + m["lora"] + m["step"], **m, "resident": resident}
    encode = encode_phase(rw, s, rates)["total"]
    return {"at": total, "encode": encode, "peak": max(total["real"]["train"], encode)}


def describe(s: Setting) -> str:
    parts = [f"{s.resolution} px", f"b{s.batch}", f"r{s.rank}", s.quantize or "bf16"]
    if s.quantize_text_encoders:
        parts.append(f"text {s.quantize_text_encoders}")
    parts.append("ckpt" if s.checkpointing else "no ckpt")
    if s.offload_blocks:
        parts.append(f"offload {s.offload_blocks}")
    if s.references:
        parts.append(f"+ {s.references} reference{'s' if s.references > 1 else ''}")
    return " ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", action="append", choices=family_names(), help="default: every family")
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--quantize", choices=["nf4", "int8"])
    parser.add_argument("--quantize-text-encoders", choices=["nf4", "int8"])
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--offload-blocks", type=int, default=0)
    parser.add_argument("--references", type=int, default=0, help="reference images beside the target (edit families)")
    parser.add_argument("--check", action="store_true", help="plan 3 units from 1 and 2, measure 3 (within 10%%)")
    parser.add_argument("--gpu", action="store_true", help="also run the reduced models on CUDA")
    args = parser.parse_args()
    rates = {kind: quantized_bytes_per_value(kind) for kind in ("nf4", "int8")}
    names = args.family or family_names()
    print(f"bytes bitsandbytes holds per weight value: nf4 {rates['nf4']:.4f}, int8 {rates['int8']:.4f}")
    print("| family | settings | denoiser as held | on device | LoRA | step peak | encode phase | planned peak |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    checks, published = [], {}
    for name, size in ((n, size) for n in names for size in (None, *get_family(n).REAL_SIZES)):
        family = get_family(name)
        rw = family.real_widths(size) if size else family.real_widths()
        published |= rw.published
        rows = settings(family, rw)
        if args.resolution:
            rows = [Setting(
                args.resolution, args.batch, args.rank, args.quantize, args.quantize_text_encoders,
                not args.no_checkpointing, args.offload_blocks, references=args.references,
            )]  # fmt: skip
        if args.check and size:
            continue  # the check is the method's: each family's default size shows it
        label = f"{name} {size}" if size else name
        for i, s in enumerate(rows):
            p = plan(family, s, rates, check=args.check and i == 0 and rw.real is not None, rw=rw)
            r = p["at"]["real"]
            print(
                f"| {label} | {describe(s)} | {r['weights'] / GB:.2f} GB | {r['resident'] / GB:.2f} GB | "
                f"{r['lora'] / GB:.3f} GB | {r['step'] / GB:.2f} GB | {p['encode'] / GB:.2f} GB | "
                f"**{p['peak'] / GB:.2f} GB** |"
            )
            if "measured 3" in p["at"]:
                planned, measured = p["at"]["planned 3"]["train"], p["at"]["measured 3"]["train"]
                checks.append((name, rw.unit, s, planned, measured))
            if args.gpu and torch.cuda.is_available() and rw.real is not None:
                for units in (1, 2):
                    got = measure_gpu(family, rw, units, s)
                    want = p["at"][units]["train"]
                    print(f"|  | {units} unit(s) on {torch.cuda.get_device_name()} | max_memory_allocated "
                          f"{got / GB:.2f} GB | plan {want / GB:.2f} GB | | | | |")  # fmt: skip
    if published:
        print("\npublished figures (peak device memory, as their authors measured it):")
        for what, value in published.items():
            print(f"  {what}: {value}")
    failed = False
    for name, unit, s, planned, measured in checks:
        off = planned / measured - 1
        failed |= abs(off) > 0.10
        print(f"check {name} ({unit}, {describe(s)}): 3 units planned from 1 and 2 {planned / GB:.3f} GB, "
              f"measured {measured / GB:.3f} GB, {off:+.1%}")  # fmt: skip
    if failed:
        sys.exit("the plan is more than 10% off the measured figure")


if __name__ == "__main__":
    main()
