"""The denoiser training loop, shared by every recipe that trains a denoiser (full or adapter) and by the
digits base.

Frozen work is done once, before the loop: images are encoded to latent distributions and prompts to
embeddings (see tuner/training/batches.py and the family's ``encode_prompts``). ``set_up``
(tuner/training/setup.py) then builds the optimizer and schedule, accelerate's wrapping and the EMA into a
``TrainingSetup``; ``Training(setup)`` resumes a checkpoint if one is named (tuner/training/state.py), and its
``train`` reads top to bottom: each optimizer step draws its micro-batches, runs the denoiser forward and backward,
steps the optimizer, then logs, samples validation images and saves checkpoints on their schedules. A NaN or
infinite loss is caught in one place, ``NonFiniteGuard`` (tuner/training/watch.py); the loss itself is the
objective's (``tuner.models.objectives.diffusion_loss``).

The settings are the ``train`` section of the config (``tuner.config.TrainConfig``), as given.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tuner.models.objectives import diffusion_loss
from tuner.training import checkpoints, state
from tuner.training.batches import Batch, merge_by_shape
from tuner.training.setup import LeanAttention, LeanLora, TrainingSetup, plain
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


class Training:
    """One training run of a denoiser (and, when they train, text encoders): ``Training(setup).train()``.

    Args:
        setup: everything the run is made of (``tuner.training.setup.set_up``). The plain form
            ``Training(accelerator, denoiser, groups, objective, next_batch, t, seed, desc="train", shard=None)``
            trains a denoiser on its own batches with nothing around the steps (``tuner.training.setup.plain``).

    Raises:
        ConfigError: the checkpoint to resume from is damaged or was made with other settings.
        ValueError: (the plain form) nothing in ``groups`` requires a gradient.
    """

    def __init__(self, setup: TrainingSetup, *args, **kwargs):
        s = setup if isinstance(setup, TrainingSetup) else plain(setup, *args, **kwargs)
        self.setup, self.params = s, s.params  # (the trained tensors: what benchmarks and tests read)
        self.guard = NonFiniteGuard(s.accelerator, s.optimizer, s.t.nonfinite, s.desc)
        self.timer = PhaseTimer(s.accelerator.device, s.t.profile)
        self.result = TrainResult(ema=s.ema)
        self.start, self.running = 0, 0.0  # the first step, and the loss summed since the last log
        if s.checkpointing.resume is not None:
            resumed = state.resume(s)
            self.start, self.result.losses, self.running = resumed.start, resumed.losses, resumed.running
        # PyTorch's own channels-last kernels crashed computing convolution weight gradients here: only for
        # frozen convolutions (adapters on linear layers)
        native = s.model.channels_last and s.accelerator.device.type == "cpu" and all(p.dim() != 4 for p in s.params)
        self.kernels = (lambda: torch.backends.mkldnn.flags(enabled=False)) if native else contextlib.nullcontext
        modules = [s.model.denoiser, *(s.model.text_encoders or {}).values()]
        self.lean = [LeanLora(modules), LeanAttention(modules)]  # peft's LoRA layers and diffusers' attention, leaner
        self.stop_asked = False
        self.grad_norm = None  # the last clipped step's gradient norm, a device tensor: read at log intervals
        self.samples = 0  # images trained on (all ranks) since the last log

    def train(self) -> TrainResult:
        """The optimizer steps from the first (or the resumed one) to ``train.max_steps``.

        Raises:
            checkpoints.Stopped: SIGTERM or SIGINT arrived; a checkpoint of the last whole step was saved.
            FloatingPointError: a non-finite loss with ``train.nonfinite=stop``.

        Returns:
            The logged losses, timings, skipped steps and, when ``train.ema_decay`` is set, the EMA.
        """
        s = self.setup
        t, a, monitor, selection = s.t, s.accelerator, s.monitor, s.selection
        bar = tqdm(range(self.start, t.max_steps), desc=s.desc, disable=not a.is_main_process, initial=self.start)
        bar.total = t.max_steps
        signals = checkpoints.StopSignals() if s.checkpointing.folder is not None else contextlib.nullcontext()
        self.result.last_step = self.start
        self.began = self.logged_at = time.perf_counter()
        if selection is not None and selection.stopped:  # resumed at the step it stopped early at
            bar.close()
            if a.is_main_process:
                print(f"[tuner] training stopped early at step {self.start}: {selection.stopped['reason']}")
            return self._finish()
        if monitor is not None and self.start == 0:
            monitor.validate(0)  # the row of the untrained model
        self.began = self.logged_at = time.perf_counter()
        with signals, self._installed():
            for step in bar:  # one optimizer step, made of gradient_accumulation_steps micro-batches
                self._freeze_text_encoder_at(step)
                for _ in range(a.gradient_accumulation_steps):
                    self._micro_step(step, signals)
                if s.ema is not None:
                    with self.timer("optimizer"):
                        s.ema.step(s.params)
                done = step + 1
                if done % t.log_every == 0 or done == t.max_steps:
                    self._log(done, bar)
                validated = monitor is not None and monitor.due(done, t.max_steps)
                if validated:
                    values = self._validate(done)
                    if selection is not None:
                        selection.observe(done, values)
                self.result.steps_run += 1
                self.result.last_step = done
                if s.checkpointing.folder is not None:
                    self._checkpoint(done, signals, validated)
                if selection is not None and selection.stopped:
                    if done % t.log_every:  # the loss of the steps since the last log
                        self._log(done, bar)
                    bar.close()
                    if a.is_main_process:
                        print(f"[tuner] train: stopped early at step {done}: {selection.stopped['reason']}")
                    break
        self.guard.read(self.result.last_step)
        return self._finish()

    @contextlib.contextmanager
    def _installed(self):
        """For the steps only, however they end: ``train.offload_blocks`` (the blocks' weights in host memory,
        once accelerate placed the model), ``train.fused_backward`` (the optimizer's gradient hooks) and the LoRA
        layers' and attention's lean calls (``LeanLora``, ``LeanAttention``)."""
        s = self.setup
        if s.offload is not None:
            s.offload.install()
        for lean in self.lean:
            lean.install()
        try:
            yield
        finally:
            for lean in self.lean:
                lean.remove()
            if s.offload is not None:
                s.offload.remove()
            if s.fused is not None:
                s.fused.remove()

    def _freeze_text_encoder_at(self, step: int) -> None:
        """``text_encoder.stop_at``: from this step on the text encoder is frozen."""
        s = self.setup
        stop = s.model.text_encoder_steps
        if s.model.text_encoders is not None and stop is not None and step == max(self.start, stop):
            for p in s.params:
                if id(p) in s.text_encoder_params:
                    p.requires_grad_(False)

    def _micro_step(self, step: int, signals) -> None:
        """One micro-batch: draw, forward, the non-finite guard, backward, and (on the last) the update."""
        s, timer = self.setup, self.timer
        a, t, optimizer, lr_scheduler = s.accelerator, s.t, s.optimizer, s.lr_scheduler
        with a.accumulate(*s.trained_modules):
            with timer("data"):
                batches = self._draw()
            loss = self._loss(batches)
            signalled = s.checkpointing.folder is not None and signals.signum is not None
            skip, signalled = self.guard.check(loss, step, signalled)
            self.stop_asked = self.stop_asked or signalled
            if skip:  # this step's gradients so far are dropped, the LR schedule moves on
                optimizer.zero_grad(set_to_none=True)
                lr_scheduler.step()
                return
            with timer("backward"), self.kernels():
                a.backward(loss)  # accelerate divides by the accumulation steps
            with timer("optimizer"):
                if a.sync_gradients and t.max_grad_norm > 0:
                    self.grad_norm = a.clip_grad_norm_(s.params, t.max_grad_norm)
                self.guard.arm()
                optimizer.step()  # a no-op until the last micro-batch
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if a.sync_gradients:
                    self.guard.step_done(step)
        self.running += self.guard.finite(loss) / a.gradient_accumulation_steps

    def _draw(self) -> list[Batch]:
        """This rank's share of the global batch, noised, on the device, one batch per latent size."""
        s = self.setup
        a, generator = s.accelerator, s.generator
        parts = s.next_batch(generator)  # the global batch: every rank draws the same
        parts = [parts] if isinstance(parts, Batch) else parts
        drawn = sum(len(p.latents) for p in parts)
        self.samples, self.result.samples = self.samples + drawn, self.result.samples + drawn
        parts = [p.with_noise(generator, s.t, s.model.objective).shard(a.process_index, a.num_processes) for p in parts]
        return [batch.to(a.device) for batch in merge_by_shape(parts)]

    def _loss(self, batches: list[Batch]) -> torch.Tensor:
        """The micro-batch's weighted loss: one denoiser call per latent size."""
        s, m = self.setup, self.setup.model
        loss = 0.0
        for batch in batches:
            with s.accelerator.autocast(), self.kernels():
                cond = batch.cond
                if m.text_encoders is not None:
                    with self.timer("text_encoder"):
                        cond = m.encode(m.text_encoders, batch.cond)
                with self.timer("forward"):
                    draws = (batch.noise, batch.input_noise, batch.timesteps)
                    per_sample = diffusion_loss(
                        m.denoiser, m.objective, batch.latents, cond, t=s.t, mask=batch.mask, draws=draws
                    )
            loss = loss + (per_sample * batch.weights).sum()
        return loss

    def _log(self, done: int, bar) -> None:
        """The mean loss since the last log (this syncs with the device: only at log intervals). With several
        processes the mean of the ranks' losses is the global batch's loss (see Batch.shard)."""
        s = self.setup
        a, t = s.accelerator, s.t
        self.guard.read(done)
        n = ((done - 1) % t.log_every) + 1
        value = float(a.reduce(torch.as_tensor(self.running, device=a.device), "mean")) / n
        if not math.isfinite(value):
            raise FloatingPointError(f"{s.desc}: loss became {value} at step {done}")
        self.result.losses.append(value)
        lr = s.lr_scheduler.get_last_lr()[0]
        bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.1e}")
        now = time.perf_counter()
        if s.monitor is not None:
            values = {"train/loss": value, "train/lr": lr, "train/samples_per_s": self.samples / (now - self.logged_at)}
            if self.grad_norm is not None:
                values["train/grad_norm"] = float(self.grad_norm)
            s.monitor.log(done, values)
        self.running, self.samples, self.logged_at = 0.0, 0, now

    def _validate(self, done: int) -> dict[str, float]:
        """Rank 0 samples with the weights of this step; the time it takes is not the steps' time. Returns the
        step's numbers (held-out losses, metrics)."""
        paused = time.perf_counter()
        with self._averaged():
            values = self.setup.monitor.validate(done)
        pause = time.perf_counter() - paused
        self.began, self.logged_at = self.began + pause, self.logged_at + pause
        return values

    @contextlib.contextmanager
    def _averaged(self):
        """With ``train.ema_decay``, the EMA's averages in place of the trained weights (what the run exports, so
        what validation measures and selects on); the trained weights exactly as they were afterwards."""
        s = self.setup
        if s.ema is None:
            yield
            return
        # plain tensors wait in host memory; a DTensor's local shard (1/N of it) where it is
        sharded = [hasattr(p, "device_mesh") for p in s.params]
        kept = [p.detach().clone() if d else p.detach().to("cpu", copy=True) for p, d in zip(s.params, sharded)]
        s.ema.copy_to(s.params)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, saved in zip(s.params, kept):
                    p.copy_(saved)

    def _checkpoint(self, done: int, signals, validated: bool = False) -> None:
        """Save on ``checkpoints.every``, at the end and, when a selection picks among them, at every validation
        step; on a stop signal save this step and stop.

        Raises:
            checkpoints.Stopped: a stop signal arrived (SIGTERM, SIGINT, SIGUSR1 on any rank).
        """
        s = self.setup
        ck = s.checkpointing
        due = ck.every and (done % ck.every == 0 or done == s.t.max_steps)
        due = due or (validated and s.selection is not None)
        if self.stop_asked or due:
            self.guard.read(done)  # a checkpoint never holds a step that should have stopped the run
        if self.stop_asked:  # every rank saves this step and stops
            raise checkpoints.Stopped(done, self._save(done), signals.signum or signal.SIGTERM)
        if due:
            self._save(done)

    def _save(self, step: int) -> Path:
        return state.save(self.setup, step, self.running, self.result.losses)

    def restore(self, path: Path) -> None:
        """The weights of checkpoint ``path`` in place of the current ones (``tuner.training.state.restore``)."""
        state.restore(self.setup, path)

    def _finish(self) -> TrainResult:
        """The result, with every module left as it was given (layout, eval mode, trained tensors trainable)."""
        s, result = self.setup, self.result
        result.step_seconds = time.perf_counter() - self.began
        result.skipped = self.guard.skipped
        if s.model.channels_last:
            s.model.denoiser.to(memory_format=torch.contiguous_format)
        result.phases = {k: round(v, 4) for k, v in self.timer.seconds.items()}
        s.model.denoiser.eval()
        for module in (s.model.text_encoders or {}).values():
            module.eval()
        for p in s.params:  # what was frozen mid-run trained before
            p.requires_grad_(True)
        return result
