"""The denoiser training loop, shared by every recipe that trains a denoiser (full or adapter) and by the
digits base.

Frozen work is done once, before the loop: images are encoded to latent distributions and prompts to
embeddings (see tuner/training/batches.py and the family's ``encode_prompts``). ``Training`` then sets
up once (the optimizer and schedule, accelerate's wrapping, the EMA, a resumed state) and its ``train``
reads top to bottom: each optimizer step draws its micro-batches, runs the denoiser forward and backward,
steps the optimizer, then logs, samples validation images and saves checkpoints on their schedules. A
NaN or infinite loss is caught in one place, ``NonFiniteGuard`` (tuner/training/watch.py); the loss
itself is the objective's (``tuner.models.objectives.diffusion_loss``).

The settings are the ``train`` section of the config (``tuner.config.TrainConfig``), as given.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from tuner.config import TrainConfig
from tuner.distributed import decide, gather
from tuner.errors import ConfigError
from tuner.models.objectives import diffusion_loss
from tuner.training import checkpoints
from tuner.training.batches import Batch, merge_by_shape
from tuner.training.optim import FusedBackward, make_lr_scheduler, make_optimizer
from tuner.training.watch import NonFiniteGuard, PhaseTimer


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    # steps (or, checked on the host, micro-batches) skipped for a non-finite loss (train.nonfinite=skip)
    skipped: int = 0
    ema: object | None = None
    # seconds per phase of the steps (see PhaseTimer); empty on a GPU unless profiling
    phases: dict[str, float] = field(default_factory=dict)
    # seconds of the steps themselves (from the first step's start to the last's end) and how many ran
    step_seconds: float = 0.0
    steps_run: int = 0
    samples: int = 0  # images trained on, all sets (instance and prior) and all ranks
    last_step: int = 0  # the step training ended at (train.max_steps, or where it stopped early)


def parameter_groups(groups: list[dict] | Iterable[torch.nn.Parameter]) -> list[dict]:
    """Optimizer groups of the parameters that require a gradient (a plain iterable is one group)."""
    groups = list(groups)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in groups]
    return [g for g in groups if g["params"]]


class Training:
    """One training run of a denoiser (and, when they train, text encoders): ``Training(...).train()``.

    Args:
        accelerator: accelerate's ``Accelerator`` (devices, processes, mixed precision, accumulation).
        groups: optimizer parameter groups (``params`` plus optional ``lr``, ``weight_decay``), or parameters.
        objective: noising, target, loss weights and the denoiser call (``tuner.models.objectives``).
        next_batch: draws a ``Batch`` or a list of them (one denoiser call each: images of different sizes);
            the caller decides how instance and prior samples are weighed.
        t: the ``train`` settings (steps, optimizer, schedule, loss, EMA, logging, non-finite policy).
        seed: the generator every rank draws the same global batches from.
        text_encoders, encode: when a text encoder (or an embedding in one) trains, batches carry token
            ids and ``encode(text_encoders, ids)`` (the family's ``encode_ids``) turns them into the
            conditioning inside the step.
        text_encoder_steps: the text encoder freezes after this many steps (``text_encoder.stop_at``).
        channels_last: the denoiser's convolutions in channels-last layout; on a CPU, when no convolution
            weight trains, they then run on PyTorch's own kernels (about 1.2x faster for small latents here).
        checkpointing: where and how often to save, and a checkpoint to resume from
            (``tuner.training.checkpoints.Checkpointing``); a resumed run ends as the uninterrupted one.
        monitor: receives the logged values (loss, lr, grad norm, samples/s) and samples validation images
            on its schedule (``tuner.training.monitor.Monitor``); the training itself is the same without it.
        shard: ``distributed.strategy=fsdp`` with several processes: shards the modules that train
            (name -> module) and returns the ``tuner.training.sharding.Sharded``; their parameters are replaced
            by their shards before the optimizer is made.
        sharded_checkpoints: ``distributed.strategy=fsdp`` (any number of processes): checkpoints are saved with
            torch.distributed.checkpoint, each rank its shards, and resume onto any number of processes.

    Raises:
        ValueError: nothing in ``groups`` requires a gradient.
    """

    def __init__(
        self,
        accelerator,
        denoiser,
        groups: list[dict] | Iterable[torch.nn.Parameter],
        objective,
        next_batch: Callable[[torch.Generator], Batch | list[Batch]],
        t: TrainConfig,
        seed: int,
        desc: str = "train",
        text_encoders: dict[str, torch.nn.Module] | None = None,
        encode: Callable | None = None,
        text_encoder_steps: int | None = None,
        channels_last: bool = False,
        checkpointing: checkpoints.Checkpointing | None = None,
        monitor=None,
        offload=None,
        shard: Callable[[dict[str, torch.nn.Module]], object] | None = None,
        sharded_checkpoints: bool = False,
        selection=None,
    ):
        from diffusers.training_utils import EMAModel

        # the settings as a plain dataclass: the step reads them often, and a DictConfig read costs microseconds
        t = OmegaConf.to_object(t) if isinstance(t, DictConfig) else t
        self.accelerator, self.objective, self.next_batch, self.t = accelerator, objective, next_batch, t
        self.desc, self.encode, self.text_encoder_steps, self.monitor = desc, encode, text_encoder_steps, monitor
        self.ck = checkpointing or checkpoints.Checkpointing()
        self.selection = selection if selection is not None and selection.active else None
        if self.selection is not None:  # pruning keeps the best checkpoints besides the newest
            self.ck.protect = self.selection.protected
        self.channels_last = channels_last
        groups = parameter_groups(groups)
        if not groups:
            raise ValueError(f"{desc}: nothing to train (no parameter requires a gradient)")
        modules = {"denoiser": denoiser, **(text_encoders or {})}
        self.trains = {name: any(p.requires_grad for p in m.parameters()) for name, m in modules.items()}
        trained = {name: m for name, m in modules.items() if self.trains[name]}
        self.sharded = shard(trained) if shard is not None else None
        if self.sharded is not None:  # FSDP2: the optimizer steps the shards
            groups = [{**g, "params": self.sharded.parameters(g["params"])} for g in groups]
        self.groups = groups  # under FSDP the caller drops its own groups for these: nothing holds the originals
        self.params = [p for g in groups for p in g["params"]]
        # the trained tensors by name (module.parameter), as sharded checkpoints key them, and their modules
        name_of = {id(p): f"{mod}.{n}" for mod, m in trained.items() for n, p in m.named_parameters()}
        self.names = [name_of[id(p)] for p in self.params]
        self.sharded_checkpoints, self.trained_box = sharded_checkpoints, torch.nn.ModuleDict(trained)
        if t.fused_backward and accelerator.num_processes > 1:
            raise ConfigError(
                f"train.fused_backward=true with {accelerator.num_processes} processes: each weight would step on its "
                "own rank's gradient before the ranks average them; use one process, or train.fused_backward=false"
            )
        self.fused = FusedBackward(t.optimizer, groups, t.learning_rate, t.weight_decay) if t.fused_backward else None
        optimizer = self.fused or make_optimizer(t.optimizer, groups, t.learning_rate, t.weight_decay)
        lr_scheduler = make_lr_scheduler(t.lr_scheduler, optimizer, t.warmup_steps, t.max_steps)
        if channels_last:  # before DDP wraps it: its gradient buckets follow the parameters' layout
            denoiser.to(memory_format=torch.channels_last)
        self._wrap(denoiser, text_encoders, optimizer, lr_scheduler)
        self.offload = offload  # a BlockOffload (tuner/training/offload.py), installed for the steps
        self.ema = EMAModel(self.params, decay=t.ema_decay) if t.ema_decay else None
        self.generator = torch.Generator().manual_seed(seed)  # the same on every rank: the same global batches
        self.guard = NonFiniteGuard(accelerator, self.optimizer, t.nonfinite, desc)
        self.timer = PhaseTimer(accelerator.device, t.profile)
        self.result = TrainResult(ema=self.ema)
        self.start, self.running = 0, 0.0  # the first step, and the loss summed since the last log
        if self.ck.resume is not None:
            self._resume()
        # PyTorch's own channels-last kernels crashed computing convolution weight gradients here: only for
        # frozen convolutions (adapters on linear layers)
        native = channels_last and accelerator.device.type == "cpu" and all(p.dim() != 4 for p in self.params)
        self.kernels = (lambda: torch.backends.mkldnn.flags(enabled=False)) if native else contextlib.nullcontext
        self.stop_asked = False
        self.grad_norm = None  # the last clipped step's gradient norm, a device tensor: read at log intervals
        self.samples = 0  # images trained on (all ranks) since the last log

    def _wrap(self, denoiser, text_encoders, optimizer, lr_scheduler) -> None:
        """accelerate wraps (for several processes) only the modules with something to train."""
        modules = {"denoiser": denoiser, **(text_encoders or {})}
        names = [name for name in modules if self.trains[name]] if self.sharded is None else []  # FSDP: sharded
        wrapped = list(self.accelerator.prepare(*[modules[name] for name in names], optimizer, lr_scheduler))
        self.lr_scheduler, self.optimizer = wrapped.pop(), wrapped.pop()
        modules.update(zip(names, wrapped))
        self.denoiser = modules.pop("denoiser")
        self.text_encoders = modules if text_encoders is not None else None
        self.trained_modules = [self.denoiser] * self.trains["denoiser"] + [
            m for name, m in modules.items() if self.trains[name]
        ]
        self.text_encoder_params = set()
        for name, module in modules.items():
            module.train(self.trains[name])
            self.text_encoder_params |= {id(p) for p in module.parameters() if p.requires_grad}
        self.denoiser.train(self.trains["denoiser"])

    def _resume(self) -> None:
        """Continue from ``checkpointing.resume``: weights, optimizer, schedule, EMA, RNGs, data order, losses."""
        a, ck, t = self.accelerator, self.ck, self.t
        # rank 0 vets the checkpoint (whole, made with this run's settings, not past its steps); a refusal
        # reaches every rank
        names = self.names if self.sharded_checkpoints else None
        decide(
            a,
            lambda: checkpoints.check_resume(
                ck.resume, self.params, t.max_steps, ck.config, self.optimizer, self.ema is not None, names
            ),
        )
        if self.sharded_checkpoints:  # each rank reads its shards (resharded for another number of processes)
            from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

            tensors, optimizer_state = self._sharded_state()
            state = checkpoints.load_sharded(ck.resume, tensors, a.num_processes == 1, verify=False)
            groups = zip(state["optimizer"]["param_groups"], optimizer_state["param_groups"])
            optimizer_state["param_groups"] = [{**saved, "params": now["params"]} for saved, now in groups]
            set_optimizer_state_dict(self.trained_box, self.optimizer.optimizer, optimizer_state)
        else:
            state = checkpoints.load(ck.resume, self.params, verify=False)
            self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.ema is not None:  # sharded: its averages were read in place above, the rest is here
            self.ema.load_state_dict(state["ema"])
        self.generator.set_state(state["generator"])
        if a.scaler is not None and state.get("scaler"):
            a.scaler.load_state_dict(state["scaler"])
        ranks = state["ranks"]  # each rank's torch RNG and running loss; a new world size starts from rank 0's
        mine = ranks[a.process_index] if len(ranks) == a.num_processes else ranks[0]
        torch.set_rng_state(mine["torch_rng"])
        ck.set_data_state(state["data"])
        if self.selection is not None and state.get("selection"):
            self.selection.load_state_dict(state["selection"])
        if self.monitor is not None:
            self.monitor.load_state_dict(state.get("monitor") or {})
        self.start, self.result.losses, self.running = state["step"], list(state["losses"]), mine["running"]
        if a.is_main_process:
            print(f"[tuner] resumed from {ck.resume} at step {self.start} of {t.max_steps}", flush=True)
            if self.start == t.max_steps:  # e.g. stopped in the export after the last step: later stages run
                print(
                    f"[tuner] training is already complete (step {self.start} = train.max_steps); the stages "
                    "after it run on the checkpoint's weights (raise train.max_steps to train on)",
                    flush=True,
                )

    def train(self) -> TrainResult:
        """The optimizer steps from the first (or the resumed one) to ``train.max_steps``.

        Raises:
            checkpoints.Stopped: SIGTERM or SIGINT arrived; a checkpoint of the last whole step was saved.
            FloatingPointError: a non-finite loss with ``train.nonfinite=stop``.

        Returns:
            The logged losses, timings, skipped steps and, when ``train.ema_decay`` is set, the EMA.
        """
        t, a = self.t, self.accelerator
        bar = tqdm(range(self.start, t.max_steps), desc=self.desc, disable=not a.is_main_process, initial=self.start)
        bar.total = t.max_steps
        signals = checkpoints.StopSignals() if self.ck.folder is not None else contextlib.nullcontext()
        self.result.last_step = self.start
        self.began = self.logged_at = time.perf_counter()
        if self.selection is not None and self.selection.stopped:  # resumed at the step it stopped early at
            bar.close()
            if a.is_main_process:
                print(f"[tuner] training stopped early at step {self.start}: {self.selection.stopped['reason']}")
            return self._finish()
        if self.monitor is not None and self.start == 0:
            self.monitor.validate(0)  # the row of the untrained model
        self.began = self.logged_at = time.perf_counter()
        with signals, self._installed():
            for step in bar:  # one optimizer step, made of gradient_accumulation_steps micro-batches
                self._freeze_text_encoder_at(step)
                for _ in range(a.gradient_accumulation_steps):
                    self._micro_step(step, signals)
                if self.ema is not None:
                    with self.timer("optimizer"):
                        self.ema.step(self.params)
                done = step + 1
                if done % t.log_every == 0 or done == t.max_steps:
                    self._log(done, bar)
                validated = self.monitor is not None and self.monitor.due(done, t.max_steps)
                if validated:
                    values = self._validate(done)
                    if self.selection is not None:
                        self.selection.observe(done, values)
                self.result.steps_run += 1
                self.result.last_step = done
                if self.ck.folder is not None:
                    self._checkpoint(done, signals, validated)
                if self.selection is not None and self.selection.stopped:
                    if done % t.log_every:  # the loss of the steps since the last log
                        self._log(done, bar)
                    bar.close()
                    if a.is_main_process:
                        print(f"[tuner] train: stopped early at step {done}: {self.selection.stopped['reason']}")
                    break
        self.guard.read(self.result.last_step)
        return self._finish()

    @contextlib.contextmanager
    def _installed(self):
        """For the steps only, however they end: ``train.offload_blocks`` (the blocks' weights in host memory,
        once accelerate placed the model) and ``train.fused_backward`` (the optimizer's gradient hooks)."""
        if self.offload is not None:
            self.offload.install()
        try:
            yield
        finally:
            if self.offload is not None:
                self.offload.remove()
            if self.fused is not None:
                self.fused.remove()

    def _freeze_text_encoder_at(self, step: int) -> None:
        """``text_encoder.stop_at``: from this step on the text encoder is frozen."""
        stop = self.text_encoder_steps
        if self.text_encoders is not None and stop is not None and step == max(self.start, stop):
            for p in self.params:
                if id(p) in self.text_encoder_params:
                    p.requires_grad_(False)

    def _micro_step(self, step: int, signals) -> None:
        """One micro-batch: draw, forward, the non-finite guard, backward, and (on the last) the update."""
        a, t, timer = self.accelerator, self.t, self.timer
        with a.accumulate(*self.trained_modules):
            with timer("data"):
                batches = self._draw()
            loss = self._loss(batches)
            signalled = self.ck.folder is not None and signals.signum is not None
            skip, signalled = self.guard.check(loss, step, signalled)
            self.stop_asked = self.stop_asked or signalled
            if skip:  # this step's gradients so far are dropped, the LR schedule moves on
                self.optimizer.zero_grad(set_to_none=True)
                self.lr_scheduler.step()
                return
            with timer("backward"), self.kernels():
                a.backward(loss)  # accelerate divides by the accumulation steps
            with timer("optimizer"):
                if a.sync_gradients and t.max_grad_norm > 0:
                    self.grad_norm = a.clip_grad_norm_(self.params, t.max_grad_norm)
                self.guard.arm()
                self.optimizer.step()  # a no-op until the last micro-batch
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                if a.sync_gradients:
                    self.guard.step_done(step)
        self.running += self.guard.finite(loss) / a.gradient_accumulation_steps

    def _draw(self) -> list[Batch]:
        """This rank's share of the global batch, noised, on the device, one batch per latent size."""
        a = self.accelerator
        parts = self.next_batch(self.generator)  # the global batch: every rank draws the same
        parts = [parts] if isinstance(parts, Batch) else parts
        drawn = sum(len(p.latents) for p in parts)
        self.samples, self.result.samples = self.samples + drawn, self.result.samples + drawn
        parts = [
            p.with_noise(self.generator, self.t, self.objective).shard(a.process_index, a.num_processes) for p in parts
        ]
        return [batch.to(a.device) for batch in merge_by_shape(parts)]

    def _loss(self, batches: list[Batch]) -> torch.Tensor:
        """The micro-batch's weighted loss: one denoiser call per latent size."""
        loss = 0.0
        for batch in batches:
            with self.accelerator.autocast(), self.kernels():
                cond = batch.cond
                if self.text_encoders is not None:
                    with self.timer("text_encoder"):
                        cond = self.encode(self.text_encoders, batch.cond)
                with self.timer("forward"):
                    draws = (batch.noise, batch.input_noise, batch.timesteps)
                    per_sample = diffusion_loss(
                        self.denoiser, self.objective, batch.latents, cond, t=self.t, mask=batch.mask, draws=draws
                    )
            loss = loss + (per_sample * batch.weights).sum()
        return loss

    def _log(self, done: int, bar) -> None:
        """The mean loss since the last log (this syncs with the device: only at log intervals). With several
        processes the mean of the ranks' losses is the global batch's loss (see Batch.shard)."""
        a, t = self.accelerator, self.t
        self.guard.read(done)
        n = ((done - 1) % t.log_every) + 1
        value = float(a.reduce(torch.as_tensor(self.running, device=a.device), "mean")) / n
        if not math.isfinite(value):
            raise FloatingPointError(f"{self.desc}: loss became {value} at step {done}")
        self.result.losses.append(value)
        lr = self.lr_scheduler.get_last_lr()[0]
        bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.1e}")
        now = time.perf_counter()
        if self.monitor is not None:
            values = {"train/loss": value, "train/lr": lr, "train/samples_per_s": self.samples / (now - self.logged_at)}
            if self.grad_norm is not None:
                values["train/grad_norm"] = float(self.grad_norm)
            self.monitor.log(done, values)
        self.running, self.samples, self.logged_at = 0.0, 0, now

    def _validate(self, done: int) -> dict[str, float]:
        """Rank 0 samples with the weights of this step; the time it takes is not the steps' time. Returns the
        step's numbers (held-out losses, metrics)."""
        paused = time.perf_counter()
        with self._averaged():
            values = self.monitor.validate(done)
        pause = time.perf_counter() - paused
        self.began, self.logged_at = self.began + pause, self.logged_at + pause
        return values

    @contextlib.contextmanager
    def _averaged(self):
        """With ``train.ema_decay``, the EMA's averages in place of the trained weights (what the run exports, so
        what validation measures and selects on); the trained weights exactly as they were afterwards."""
        if self.ema is None:
            yield
            return
        # plain tensors wait in host memory; a DTensor's local shard (1/N of it) where it is
        sharded = [hasattr(p, "device_mesh") for p in self.params]
        kept = [p.detach().clone() if d else p.detach().to("cpu", copy=True) for p, d in zip(self.params, sharded)]
        self.ema.copy_to(self.params)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, saved in zip(self.params, kept):
                    p.copy_(saved)

    def _checkpoint(self, done: int, signals, validated: bool = False) -> None:
        """Save on ``checkpoints.every``, at the end and, when a selection picks among them, at every validation
        step; on a stop signal save this step and stop.

        Raises:
            checkpoints.Stopped: a stop signal arrived (SIGTERM, SIGINT, SIGUSR1 on any rank).
        """
        due = self.ck.every and (done % self.ck.every == 0 or done == self.t.max_steps)
        due = due or (validated and self.selection is not None)
        if self.stop_asked or due:
            self.guard.read(done)  # a checkpoint never holds a step that should have stopped the run
        if self.stop_asked:  # every rank saves this step and stops
            raise checkpoints.Stopped(done, self._save(done), signals.signum or signal.SIGTERM)
        if due:
            self._save(done)

    def _save(self, step: int) -> Path:
        """Every rank calls it (their RNG states are gathered); rank 0 writes."""
        a = self.accelerator
        ranks = gather(a, {"torch_rng": torch.get_rng_state(), "running": torch.as_tensor(self.running).cpu()})
        state = {
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "generator": self.generator.get_state(),
            "scaler": a.scaler.state_dict() if a.scaler is not None else None,
            "ranks": ranks,
            "losses": self.result.losses,
            "selection": self.selection.state_dict() if self.selection is not None else None,
            "monitor": self.monitor.state_dict() if self.monitor is not None else None,
        }
        if self.sharded_checkpoints:  # the tensors go sharded; state.pt keeps the rest (settings, counters)
            state["optimizer"] = {"param_groups": state["optimizer"]["param_groups"]}
            if self.ema is not None:
                state["ema"] = {k: v for k, v in state["ema"].items() if k != "shadow_params"}
            return checkpoints.save_sharded(self.ck, step, self._sharded_state()[0], state, a)
        return Path(decide(a, lambda: str(checkpoints.save(self.ck, step, self.params, state))))

    def _sharded_state(self) -> tuple[dict, dict]:
        """What a sharded checkpoint holds (each rank's shards under FSDP): the trained tensors, the optimizer
        state's tensors (keyed by parameter name) and the EMA; tensors only, so reading it unpickles nothing.
        Also the optimizer state they belong to (torch.distributed.checkpoint's form, sharing those tensors)."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        optimizer_state = get_optimizer_state_dict(self.trained_box, self.optimizer.optimizer)
        moments = {
            name: {k: v for k, v in entry.items() if isinstance(v, torch.Tensor)}
            for name, entry in optimizer_state["state"].items()
        }
        tensors = {"trained": {name: p.detach() for name, p in zip(self.names, self.params)}, "optimizer": moments}
        if self.ema is not None:
            tensors["ema"] = dict(zip(self.names, self.ema.shadow_params))
        return tensors, optimizer_state

    def restore(self, path: Path) -> None:
        """The trained tensors (and the EMA's averages) of checkpoint ``path``, in place of the current ones: the
        weights the run keeps when an earlier step was best (``export.from=best``, ``train.early_stop``)."""
        if self.sharded_checkpoints:
            tensors = self._sharded_state()[0]
            tensors.pop("optimizer")
            state = checkpoints.load_sharded(path, tensors, self.accelerator.num_processes == 1)
        else:
            state = checkpoints.load(path, self.params)
        if self.ema is not None:  # sharded: the averages were read in place above
            self.ema.load_state_dict(state["ema"])

    def _finish(self) -> TrainResult:
        """The result, with every module left as it was given (layout, eval mode, trained tensors trainable)."""
        result = self.result
        result.step_seconds = time.perf_counter() - self.began
        result.skipped = self.guard.skipped
        if self.channels_last:
            self.denoiser.to(memory_format=torch.contiguous_format)
        result.phases = {k: round(v, 4) for k, v in self.timer.seconds.items()}
        self.denoiser.eval()
        for module in (self.text_encoders or {}).values():
            module.eval()
        for p in self.params:  # what was frozen mid-run trained before
            p.requires_grad_(True)
        return result
