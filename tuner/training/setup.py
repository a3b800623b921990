"""The setup of a training run: everything the loop (tuner/training/loop.py) reads, in one ``TrainingSetup``.

The caller decides the model, what of it trains, the batches and the ``train`` settings, and what goes around the
steps (checkpointing, a monitor, a selection of the best step, block offload, sharding); ``set_up`` then builds the
rest in dependency order:

    the trained modules sharded (FSDP) -> the optimizer's groups -> the optimizer -> its LR schedule
    -> the denoiser's memory layout -> accelerate's wrapping -> the EMA -> the batches' generator

The train stage (tuner/stages/train.py) decides each input from the config; the digits base passes a denoiser, its
parameters and its batches (``plain``).
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from tuner.config import TrainConfig
from tuner.errors import ConfigError
from tuner.training.batches import Batch, SampleSet
from tuner.training.checkpoints import Checkpointing
from tuner.training.held_out import HeldOutSet
from tuner.training.optim import FusedBackward, make_lr_scheduler, make_optimizer


@dataclass
class SampleSets:
    """The train stage's data, encoded once: what batches draw from, and what validation scores."""

    sets: list[SampleSet]  # the instance set, and the class set with prior preservation
    captions: list[str]  # the distinct captions, the empty one last (caption dropout)
    held_out: list[HeldOutSet]  # data.val_split's images of each set, and data.val_dir's
    rows: object  # each caption's conditioning (embeddings), or its token ids when the text encoder runs in the step


@dataclass
class StepModel:
    """What runs in each step.

    Args:
        denoiser: the U-Net or transformer.
        objective: noising, target, loss weights and the denoiser call (``tuner.models.objectives``).
        text_encoders: when a text encoder (or an embedding in one) trains, the text encoders: batches then carry
            token ids and ``encode(text_encoders, ids)`` (the family's ``encode_ids``) conditions inside the step.
        text_encoder_steps: the text encoder freezes after this many steps (``text_encoder.stop_at``).
        channels_last: the denoiser's convolutions in channels-last layout; on a CPU, when no convolution weight
            trains, they then run on PyTorch's own kernels (about 1.2x faster for small latents here).
    """

    denoiser: torch.nn.Module
    objective: object
    text_encoders: dict[str, torch.nn.Module] | None = None
    encode: Callable | None = None
    text_encoder_steps: int | None = None
    channels_last: bool = False


def channels_last_pays(adapter, accelerator, trained: list[torch.nn.Parameter]) -> bool:
    """``train.channels_last=null``: on for float32 LoRA training on a CPU (faster there, see tools/bench.py) when
    no convolution weight trains; not under peft's DoRA, LoHa and LoKr, whose convolution code assumes the default
    layout. ``adapter``: the config's ``adapter`` section."""
    convs_train = any(p.dim() == 4 for p in trained)
    layout_safe = adapter.type == "lora" and not adapter.use_dora and not convs_train
    return layout_safe and accelerator.device.type == "cpu" and accelerator.mixed_precision == "no"


class LeanLora:
    """peft's LoRA linear layers without peft's per-call bookkeeping, for the steps only (``install``/``remove``).

    peft's ``Linear.forward`` checks its arguments, adapters, variants and dtypes in Python and calls dropout,
    ``lora_A`` and ``lora_B`` as modules on every call: with the 128 LoRA layers of SD1.5's attention that was about
    5% of a step's CPU time at the bench's size (README, "Performance"). In place of it each layer computes what
    peft computes for vanilla LoRA, ``base_layer(x) + lora_B(lora_A(dropout(x))) * scaling``, with the two small
    linears called as functions and the product by a scaling of 1 left out (exact): the same operations, so the
    same numbers. Every other call goes to peft's own forward: adapters disabled or merged, several active
    adapters, a variant (DoRA), extra arguments, an input of another dtype than the adapter's (so, under mixed
    precision, most calls). Only layers of peft's own ``Linear`` class whose adapter linears are plain
    ``nn.Linear`` and whose adapter modules carry no hooks are taken; ``remove`` leaves nothing on them.
    """

    def __init__(self, modules: Iterable[torch.nn.Module]):
        try:
            from peft.tuners.lora.layer import Linear
        except ImportError:  # no peft: no LoRA layers
            Linear = None
        self.layers = [m for module in modules for m in module.modules() if type(m) is Linear and _lean_ok(m)]

    def install(self) -> None:
        for layer in self.layers:
            layer.forward = types.MethodType(_lean_forward, layer)

    def remove(self) -> None:
        for layer in self.layers:
            layer.__dict__.pop("forward", None)


def _lean_ok(layer) -> bool:
    """Whether ``layer`` can take ``_lean_forward``: peft's attributes as this version has them, nothing patched in."""
    linears = [*layer.lora_A.values(), *layer.lora_B.values()]
    plain = all(type(m) is torch.nn.Linear for m in linears)
    hooked = any(m._forward_hooks or m._forward_pre_hooks for m in [*linears, *layer.lora_dropout.values()])
    plain = plain and not hooked
    return plain and "forward" not in layer.__dict__ and hasattr(layer, "lora_variant") and hasattr(layer, "scaling")


def _lean_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's vanilla LoRA forward (``LeanLora``), or peft's own for anything else. (Submodules and parameters are
    read from their dicts: nn.Module's ``__getattr__`` costs a microsecond a read, here many times a step.)"""
    name = self._active_adapter
    if type(name) is list and len(name) == 1:
        name = name[0]
    modules = self._modules
    a = modules["lora_A"]._modules.get(name) if type(name) is str else None
    weight = a._parameters["weight"] if a is not None else None
    if (
        weight is None
        or args
        or kwargs
        or self._disable_adapters
        or self.merged_adapters
        or name in self.lora_variant
        or x.dtype != weight.dtype
    ):
        return type(self).forward(self, x, *args, **kwargs)
    b, dropout = modules["lora_B"]._modules[name], modules["lora_dropout"]._modules[name]
    result = modules["base_layer"](x)
    h = x if type(dropout) is torch.nn.Identity else dropout(x)
    lora = F.linear(F.linear(h, weight, a._parameters["bias"]), b._parameters["weight"], b._parameters["bias"])
    scaling = self.scaling[name]
    out = result + (lora if isinstance(scaling, (int, float)) and scaling == 1 else lora * scaling)
    return out if out.dtype == result.dtype else out.to(result.dtype)


class LeanAttention:
    """diffusers' ``AttnProcessor2_0`` without its per-call extras, for the steps only (``install``/``remove``).

    ``Attention.forward`` reads its processor's signature with ``inspect`` on every call (about 30 us, 32 calls a
    step in SD1.5), and the processor divides by a ``rescale_output_factor`` of 1 and calls a dropout of p=0. The
    lean processor (``lean_attention_processor``) gives ``inspect`` its signature ready made and leaves out those
    two no-ops (exact); every other case (a mask, spatial or group norm, query/key norms, cross-attention norm,
    extra arguments) is ``AttnProcessor2_0``'s own code. Only attention modules with that exact processor class are
    taken, and ``remove`` puts their own processor back.
    """

    def __init__(self, modules: Iterable[torch.nn.Module]):
        try:
            from diffusers.models.attention_processor import Attention, AttnProcessor2_0
        except ImportError:
            self.kept = {}
            return
        found = [m for module in modules for m in module.modules() if isinstance(m, Attention)]
        self.kept = {m: m.processor for m in found if type(m.processor) is AttnProcessor2_0}

    def install(self) -> None:
        if self.kept:
            lean = lean_attention_processor()
            for attention in self.kept:
                attention.processor = lean

    def remove(self) -> None:
        for attention, processor in self.kept.items():
            attention.processor = processor


@functools.cache
def lean_attention_processor():
    """One instance of ``AttnProcessor2_0`` whose call skips its no-ops in the plain case (``LeanAttention``)."""
    import inspect

    from diffusers.models.attention_processor import AttnProcessor2_0

    class LeanAttnProcessor(AttnProcessor2_0):
        def __call__(
            self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kw
        ):
            cross = encoder_hidden_states is not None
            if (
                args
                or kw
                or attention_mask is not None
                or hidden_states.ndim != 3
                or attn.spatial_norm is not None
                or attn.group_norm is not None
                or attn.norm_q is not None
                or attn.norm_k is not None
                or (cross and attn.norm_cross)
                or attn.residual_connection
            ):
                return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kw)
            context = encoder_hidden_states if cross else hidden_states
            batch_size, heads = context.shape[0], attn.heads
            query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
            head_dim = key.shape[-1] // heads
            query = query.view(batch_size, -1, heads, head_dim).transpose(1, 2)
            key = key.view(batch_size, -1, heads, head_dim).transpose(1, 2)
            value = value.view(batch_size, -1, heads, head_dim).transpose(1, 2)
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False)
            out = out.transpose(1, 2).reshape(batch_size, -1, heads * head_dim).to(query.dtype)
            project, dropout = attn.to_out[0], attn.to_out[1]
            out = project(out)
            if not (type(dropout) is torch.nn.Dropout and dropout.p == 0):
                out = dropout(out)
            return out if attn.rescale_output_factor == 1 else out / attn.rescale_output_factor

    # Attention.forward keeps the keyword arguments this signature names: the same as AttnProcessor2_0's
    LeanAttnProcessor.__call__.__signature__ = inspect.signature(AttnProcessor2_0.__call__)
    return LeanAttnProcessor()


@dataclass
class TrainingSetup:
    """Everything one training run is made of, built once by ``set_up``; ``Training(setup).train()`` runs it."""

    accelerator: object  # accelerate's Accelerator: devices, processes, mixed precision, accumulation
    t: TrainConfig  # the train settings, as a plain dataclass (the step reads them often)
    desc: str  # the progress bar's label, and the start of the loop's errors
    # the model, wrapped by accelerate where it trains
    model: StepModel
    trains: dict[str, bool]  # denoiser / each text encoder -> whether anything in it trains
    trained_modules: list[torch.nn.Module]  # the wrapped modules that train (gradient accumulation syncs them)
    text_encoder_params: set[int]  # ids of the trained tensors in text encoders (``text_encoder.stop_at``)
    # what trains: the optimizer's groups (under FSDP, of the shards), their tensors and those tensors' names
    groups: list[dict]
    params: list[torch.nn.Parameter]
    names: list[str]  # module.parameter, as sharded checkpoints key them
    trained_box: torch.nn.ModuleDict  # the trained modules by name (torch.distributed.checkpoint's state dicts)
    sharded: object | None  # distributed.strategy=fsdp with several processes: the Sharded modules
    # the optimizer, its schedule and the average of the weights
    optimizer: object  # wrapped by accelerate; the FusedBackward itself with train.fused_backward
    lr_scheduler: object
    fused: FusedBackward | None
    ema: object | None  # diffusers' EMAModel with train.ema_decay
    # the data: the global batch of each micro-step, drawn from a generator the same on every rank
    next_batch: Callable[[torch.Generator], Batch | list[Batch]]
    generator: torch.Generator
    # around the steps
    checkpointing: Checkpointing
    selection: object | None  # a Selection (tuner/training/selection.py) with something to select or stop on
    monitor: object | None  # a Monitor (tuner/training/monitor.py): logs, validation
    offload: object | None  # a BlockOffload (tuner/training/offload.py), installed for the steps
    sharded_checkpoints: bool  # checkpoints through torch.distributed.checkpoint, each rank its shards


def parameter_groups(groups: list[dict] | Iterable[torch.nn.Parameter]) -> list[dict]:
    """Optimizer groups of the parameters that require a gradient (a plain iterable is one group)."""
    groups = list(groups)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in groups]
    return [g for g in groups if g["params"]]


def set_up(
    accelerator,
    model: StepModel,
    groups: list[dict] | Iterable[torch.nn.Parameter],
    t: TrainConfig | DictConfig,
    next_batch: Callable[[torch.Generator], Batch | list[Batch]],
    seed: int,
    *,
    desc: str = "train",
    checkpointing: Checkpointing | None = None,
    monitor=None,
    selection=None,
    offload=None,
    shard: Callable[[dict[str, torch.nn.Module]], object] | None = None,
    sharded_checkpoints: bool = False,
) -> TrainingSetup:
    """Build the optimizer, its schedule, accelerate's wrapping and the EMA around what the caller decided.

    Args:
        accelerator: accelerate's ``Accelerator``.
        model: what runs in each step (``StepModel``).
        groups: optimizer parameter groups (``params`` plus optional ``lr``, ``weight_decay``), or parameters.
        t: the ``train`` settings (steps, optimizer, schedule, loss, EMA, logging, non-finite policy).
        next_batch: draws a ``Batch`` or a list of them (one denoiser call each: images of different sizes); the
            caller decides how instance and prior samples are weighed.
        seed: the generator every rank draws the same global batches from.
        desc: the progress bar's label.
        checkpointing: where and how often to save, and a checkpoint to resume from
            (``tuner.training.checkpoints.Checkpointing``); a resumed run ends as the uninterrupted one.
        monitor: receives the logged values (loss, lr, grad norm, samples/s) and samples validation images on its
            schedule (``tuner.training.monitor.Monitor``); the training itself is the same without it.
        selection: picks the best step and stops early on the validation's numbers (``Selection``).
        offload: ``train.offload_blocks``: a ``BlockOffload``, installed for the steps only.
        shard: ``distributed.strategy=fsdp`` with several processes: shards the modules that train (name ->
            module) and returns the ``tuner.training.sharding.Sharded``; their parameters are replaced by their
            shards before the optimizer is made.
        sharded_checkpoints: ``distributed.strategy=fsdp`` (any number of processes): checkpoints are saved with
            torch.distributed.checkpoint, each rank its shards, and resume onto any number of processes.

    Raises:
        ValueError: nothing in ``groups`` requires a gradient.
        ConfigError: ``train.fused_backward`` with several processes.
    """
    from diffusers.training_utils import EMAModel

    # the settings as a plain dataclass: the step reads them often, and a DictConfig read costs microseconds
    t = OmegaConf.to_object(t) if isinstance(t, DictConfig) else t
    checkpointing = checkpointing or Checkpointing()
    selection = selection if selection is not None and selection.active else None
    if selection is not None:  # pruning keeps the best checkpoints besides the newest
        checkpointing.protect = selection.protected
    groups = parameter_groups(groups)
    if not groups:
        raise ValueError(f"{desc}: nothing to train (no parameter requires a gradient)")
    modules = {"denoiser": model.denoiser, **(model.text_encoders or {})}
    trains = {name: any(p.requires_grad for p in m.parameters()) for name, m in modules.items()}
    trained = {name: m for name, m in modules.items() if trains[name]}
    sharded = shard(trained) if shard is not None else None
    if sharded is not None:  # FSDP2: the optimizer steps the shards
        groups = [{**g, "params": sharded.parameters(g["params"])} for g in groups]
    params = [p for g in groups for p in g["params"]]
    name_of = {id(p): f"{mod}.{n}" for mod, m in trained.items() for n, p in m.named_parameters()}
    if t.fused_backward and accelerator.num_processes > 1:
        raise ConfigError(
            f"train.fused_backward=true with {accelerator.num_processes} processes: each weight would step on its "
            "own rank's gradient before the ranks average them; use one process, or train.fused_backward=false"
        )
    fused = FusedBackward(t.optimizer, groups, t.learning_rate, t.weight_decay) if t.fused_backward else None
    optimizer = fused or make_optimizer(t.optimizer, groups, t.learning_rate, t.weight_decay)
    lr_scheduler = make_lr_scheduler(t.lr_scheduler, optimizer, t.warmup_steps, t.max_steps)
    # before DDP wraps it: its gradient buckets follow the parameters' layout; a video denoiser's 3D convolutions
    # (Wan's patch embedding) have no channels-last layout of four dimensions, so it keeps the default one
    if model.channels_last and all(p.dim() != 5 for p in model.denoiser.parameters()):
        model.denoiser.to(memory_format=torch.channels_last)
    # accelerate wraps (for several processes) only the modules with something to train; FSDP's are sharded
    names = [name for name in modules if trains[name]] if sharded is None else []
    wrapped = list(accelerator.prepare(*[modules[name] for name in names], optimizer, lr_scheduler))
    lr_scheduler, optimizer = wrapped.pop(), wrapped.pop()
    modules.update(zip(names, wrapped))
    for name, module in modules.items():
        module.train(trains[name])
    denoiser = modules.pop("denoiser")
    return TrainingSetup(
        accelerator=accelerator,
        t=t,
        desc=desc,
        model=dataclasses.replace(
            model, denoiser=denoiser, text_encoders=modules if model.text_encoders is not None else None
        ),
        trains=trains,
        trained_modules=[denoiser] * trains["denoiser"] + [m for name, m in modules.items() if trains[name]],
        text_encoder_params={id(p) for m in modules.values() for p in m.parameters() if p.requires_grad},
        groups=groups,  # under FSDP the caller drops its own groups for these: nothing holds the originals
        params=params,
        names=[name_of[id(p)] for p in params],
        trained_box=torch.nn.ModuleDict(trained),
        sharded=sharded,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        fused=fused,
        ema=EMAModel(params, decay=t.ema_decay) if t.ema_decay else None,
        next_batch=next_batch,
        generator=torch.Generator().manual_seed(seed),  # the same on every rank: the same global batches
        checkpointing=checkpointing,
        selection=selection,
        monitor=monitor,
        offload=offload,
        sharded_checkpoints=sharded_checkpoints,
    )


def plain(accelerator, denoiser, groups, objective, next_batch, t, seed, desc="train", shard=None) -> TrainingSetup:
    """A denoiser trained on its own batches, nothing around the steps (the digits base, tests, benchmarks)."""
    return set_up(accelerator, StepModel(denoiser, objective), groups, t, next_batch, seed, desc=desc, shard=shard)
