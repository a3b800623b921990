"""The denoiser training loop, shared by every recipe that trains a U-Net (full or adapter).

Frozen work is done once, before the loop: images are encoded to latent distributions and prompts
to embeddings (see tuner/training/batches.py and the family's ``encode_prompts``). Each step then only
samples latents, adds noise, runs the denoiser forward and backward, and steps the optimizer.
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
import torch.nn.functional as F
from tqdm.auto import tqdm

from tuner.distributed import any_rank
from tuner.models.base import Cond
from tuner.models.objectives import LossSettings, draw_noise
from tuner.training.batches import Batch, merge_by_shape
from tuner.training.optim import make_lr_scheduler, make_optimizer


@dataclass
class LoopSettings:
    steps: int
    learning_rate: float
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    log_every: int = 50
    ema_decay: float | None = None
    # adamw | adamw8bit (bitsandbytes) | prodigy | sgd
    optimizer: str = "adamw"
    loss: LossSettings = field(default_factory=LossSettings)
    # the text encoder (when it trains) freezes after this many steps; None: never
    text_encoder_steps: int | None = None
    # a NaN or infinite loss: stop (raise) or skip the step (no update)
    nonfinite: str = "stop"
    # time each phase of the step; on a GPU this waits for the device at each phase's end (slower)
    profile: bool = False
    # the denoiser's convolutions in channels-last layout; on a CPU, when no convolution weight trains, they
    # then run on PyTorch's own kernels, not oneDNN's (about 1.2x faster for small latents here)
    channels_last: bool = False


def timestep_weights(num_timesteps: int, bias: str, multiplier: float, portion: float) -> torch.Tensor | None:
    """Sampling weights that draw the earliest or latest ``portion`` of timesteps ``multiplier`` times as often."""
    if bias == "none":
        return None
    weights = torch.ones(num_timesteps)
    n = max(1, round(portion * num_timesteps))
    if bias == "earlier":
        weights[:n] *= multiplier
    else:
        weights[-n:] *= multiplier
    return weights


def diffusion_loss(
    denoiser,
    objective,
    latents,
    cond: Cond,
    generator=None,
    loss: LossSettings | None = None,
    mask: torch.Tensor | None = None,
    draws: tuple | None = None,
) -> torch.Tensor:
    """Per-sample denoising loss at drawn timesteps, against the objective's target
    (``tuner.models.objectives``; ``objective.predict`` calls the family's denoiser).

    ``draws``: (noise, input_noise, timesteps) from ``draw_noise``; drawn here from ``generator`` when None.
    """
    loss = loss or LossSettings()
    if draws is None:
        draws = draw_noise(latents, generator, loss, objective)
    noise, input_noise, timesteps = (t.to(latents.device) for t in draws)
    noisy = objective.noisy(latents, input_noise, timesteps)
    prediction = objective.predict(denoiser, noisy, objective.model_timesteps(timesteps), cond).float()
    target = objective.target(latents, noise, timesteps).float()
    if loss.kind == "l1":
        per_element = (prediction - target).abs()
    elif loss.kind == "huber":
        per_element = F.huber_loss(prediction, target, delta=loss.huber_delta, reduction="none")
    else:
        per_element = F.mse_loss(prediction, target, reduction="none")
    if mask is None:
        per_sample = per_element.mean(dim=(1, 2, 3))
    else:  # the mean over the masked area only
        covered = (mask.sum(dim=(1, 2, 3)) * per_element.shape[1]).clamp_min(1e-6)
        per_sample = (per_element * mask).sum(dim=(1, 2, 3)) / covered
    weights = objective.weights(timesteps, loss)
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample.device)
    return per_sample


class PhaseTimer:
    """Seconds spent in each phase of the training steps (data, text_encoder, forward, backward, optimizer).

    On a CPU the clock reads true times at no cost. A GPU runs ahead of the host, so there a phase's
    time is only true when ``sync`` waits for the device at its end: only when profiling.
    """

    def __init__(self, device: torch.device, sync: bool):
        self.sync = sync and device.type == "cuda"
        self.enabled = device.type == "cpu" or self.sync
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        if not self.enabled:
            yield
            return
        start = time.perf_counter()
        yield
        if self.sync:
            torch.cuda.synchronize()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


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


def train_denoiser(
    accelerator,
    denoiser,
    groups: list[dict] | Iterable[torch.nn.Parameter],
    objective,
    next_batch: Callable[[torch.Generator], Batch | list[Batch]],
    settings: LoopSettings,
    seed: int,
    desc: str = "train",
    text_encoders: dict[str, torch.nn.Module] | None = None,
    encode: Callable | None = None,
    checkpointing=None,
    monitor=None,
) -> TrainResult:
    """Train the parameters in ``groups`` for ``settings.steps`` optimizer steps.

    Args:
        groups: optimizer parameter groups (``params`` plus optional ``lr``, ``weight_decay``), or parameters.
        objective: noising, target, loss weights and the denoiser call (``tuner.models.objectives``).
        next_batch: draws a ``Batch`` or a list of them (one denoiser call each: images of different sizes);
            the caller decides how instance and prior samples are weighed.
        text_encoders, encode: when a text encoder (or an embedding in one) trains, batches carry token
            ids and ``encode(text_encoders, ids)`` (the family's ``encode_ids``) turns them into the
            conditioning inside the step.
        checkpointing: where and how often to save, and a checkpoint to resume from
            (``tuner.training.checkpoints.Checkpointing``); a resumed run ends as the uninterrupted one.
        monitor: receives the logged values (loss, lr, grad norm, samples/s) and samples validation images
            on its schedule (``tuner.training.monitor.Monitor``); the training itself is the same without it.

    Raises:
        checkpoints.Stopped: SIGTERM or SIGINT arrived; a checkpoint of the last whole step was saved.

    Returns:
        The logged losses and, when ``settings.ema_decay`` is set, the EMA of the trained parameters.
    """
    from diffusers.training_utils import EMAModel

    from tuner.training import checkpoints

    ck = checkpointing or checkpoints.Checkpointing()

    groups = list(groups)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in groups]
    groups = [g for g in groups if g["params"]]
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise ValueError(f"{desc}: nothing to train (no parameter requires a gradient)")
    optimizer = make_optimizer(settings.optimizer, groups, settings.learning_rate, settings.weight_decay)
    lr_scheduler = make_lr_scheduler(settings.lr_scheduler, optimizer, settings.warmup_steps, settings.steps)
    if settings.channels_last:  # before DDP wraps it: its gradient buckets follow the parameters' layout
        denoiser.to(memory_format=torch.channels_last)
    # accelerate wraps (for several processes) only the modules with something to train
    modules = {"denoiser": denoiser, **(text_encoders or {})}
    trains = {name: any(p.requires_grad for p in m.parameters()) for name, m in modules.items()}
    names = [name for name in modules if trains[name]]
    wrapped = list(accelerator.prepare(*[modules[name] for name in names], optimizer, lr_scheduler))
    lr_scheduler, optimizer = wrapped.pop(), wrapped.pop()
    modules.update(zip(names, wrapped))
    denoiser = modules.pop("denoiser")
    text_encoders = modules if text_encoders is not None else None
    trained_modules = [denoiser] * trains["denoiser"] + [m for name, m in modules.items() if trains[name]]
    text_encoder_params = set()
    for name, module in modules.items():
        module.train(trains[name])
        text_encoder_params |= {id(p) for p in module.parameters() if p.requires_grad}
    ema = EMAModel(params, decay=settings.ema_decay) if settings.ema_decay else None
    generator = torch.Generator().manual_seed(seed)  # the same on every rank: they draw the same global batches
    rank, world = accelerator.process_index, accelerator.num_processes
    result = TrainResult(ema=ema)
    start = 0
    if ck.resume is not None:
        from tuner.distributed import decide

        # rank 0 vets the checkpoint (whole, made with this run's settings, not past its steps); a refusal
        # reaches every rank
        decide(
            accelerator,
            lambda: checkpoints.check_resume(
                ck.resume, params, settings.steps, ck.config, optimizer, ema=ema is not None
            ),
        )
        state = checkpoints.load(ck.resume, params)
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        generator.set_state(state["generator"])
        if accelerator.scaler is not None and state.get("scaler"):
            accelerator.scaler.load_state_dict(state["scaler"])
        ranks = state["ranks"]  # each rank's torch RNG and running loss; a new world size starts from rank 0's
        mine = ranks[rank] if len(ranks) == world else ranks[0]
        torch.set_rng_state(mine["torch_rng"])
        ck.set_data_state(state["data"])
        start, result.losses, resumed_running = state["step"], list(state["losses"]), mine["running"]
        if accelerator.is_main_process:
            print(f"[tuner] resumed from {ck.resume} at step {start} of {settings.steps}", flush=True)
            if start == settings.steps:  # e.g. stopped in the export after the last step: the later stages run
                print(
                    f"[tuner] training is already complete (step {start} = train.max_steps); the stages after it "
                    "run on the checkpoint's weights (raise train.max_steps to train on)",
                    flush=True,
                )

    def save(step: int, running) -> Path:
        """Every rank calls it (their RNG states are gathered); rank 0 writes."""
        from tuner.distributed import decide, gather

        ranks = gather(accelerator, {"torch_rng": torch.get_rng_state(), "running": torch.as_tensor(running).cpu()})
        state = {
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "generator": generator.get_state(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            "ranks": ranks,
            "losses": result.losses,
        }
        return Path(decide(accelerator, lambda: str(checkpoints.save(ck, step, params, state))))

    denoiser.train(trains["denoiser"])
    # PyTorch's own channels-last kernels crashed computing convolution weight gradients here: only for
    # frozen convolutions (adapters on linear layers)
    native_convs = settings.channels_last and accelerator.device.type == "cpu" and all(p.dim() != 4 for p in params)
    kernels = (lambda: torch.backends.mkldnn.flags(enabled=False)) if native_convs else contextlib.nullcontext
    running = resumed_running if ck.resume is not None else 0.0
    bar = tqdm(range(start, settings.steps), desc=desc, disable=not accelerator.is_main_process, initial=start)
    bar.total = settings.steps
    micro_steps = accelerator.gradient_accumulation_steps
    signals = checkpoints.StopSignals() if ck.folder is not None else contextlib.nullcontext()
    te_stop = settings.text_encoder_steps
    stop_asked = False
    timer = PhaseTimer(accelerator.device, settings.profile)
    grad_norm = None  # the last clipped step's gradient norm, a device tensor: read at log intervals only
    # One process with the fused AdamW: a non-finite loss is caught on the device. The fused step skips the
    # update (its found_inf), and the host reads the count with the loss at log intervals, before a
    # checkpoint and at the end, so the step never waits for the device. Otherwise each micro-batch checks
    # on the host (one small all-reduce with several processes; free on a CPU).
    inner = getattr(optimizer, "optimizer", optimizer)
    on_device = world == 1 and accelerator.scaler is None and getattr(inner, "defaults", {}).get("fused") is True
    device = accelerator.device
    step_bad = torch.zeros((), dtype=torch.bool, device=device)
    bad_steps = torch.zeros((), dtype=torch.int64, device=device)
    first_bad = torch.full((), -1, dtype=torch.int64, device=device)

    def read_device_flags(at: int) -> None:
        """What the device counted (this syncs): stop on a non-finite loss, or count the skipped steps."""
        if not on_device:
            return
        skipped, first = int(bad_steps), int(first_bad)
        if skipped and settings.nonfinite == "stop":
            more = f" (and {skipped - 1} more step(s) up to step {at})" if skipped > 1 else ""
            raise FloatingPointError(
                f"{desc}: the loss is not finite at step {first}{more}; nothing of that step was applied "
                "(train.nonfinite=skip skips such steps; a lower learning rate may help)"
            )
        result.skipped = skipped

    samples = 0  # images trained on (all ranks) since the last log
    if monitor is not None and start == 0:
        monitor.validate(0)  # the row of the untrained model
    began = logged_at = time.perf_counter()
    with signals:
        for step in bar:  # one optimizer step, made of gradient_accumulation_steps micro-batches
            if text_encoders is not None and te_stop is not None and step == max(start, te_stop):
                for p in params:  # text_encoder.stop_at: from here on the text encoder is frozen
                    if id(p) in text_encoder_params:
                        p.requires_grad_(False)
            for _ in range(micro_steps):
                with accelerator.accumulate(*trained_modules):
                    with timer("data"):
                        parts = next_batch(generator)  # the global batch: every rank draws the same
                        parts = [parts] if isinstance(parts, Batch) else parts
                        drawn = sum(len(p.latents) for p in parts)
                        samples, result.samples = samples + drawn, result.samples + drawn
                        parts = [p.with_noise(generator, settings.loss, objective).shard(rank, world) for p in parts]
                        batches = [batch.to(accelerator.device) for batch in merge_by_shape(parts)]
                    loss = 0.0
                    for batch in batches:  # one denoiser call per latent size
                        with accelerator.autocast(), kernels():
                            cond = batch.cond
                            if text_encoders is not None:
                                with timer("text_encoder"):
                                    cond = encode(text_encoders, batch.cond)
                            with timer("forward"):
                                per_sample = diffusion_loss(
                                    denoiser,
                                    objective,
                                    batch.latents,
                                    cond,
                                    loss=settings.loss,
                                    mask=batch.mask,
                                    draws=(batch.noise, batch.input_noise, batch.timesteps),
                                )
                        loss = loss + (per_sample * batch.weights).sum()
                    signalled = ck.folder is not None and signals.signum is not None
                    if on_device:
                        bad = ~torch.isfinite(loss.detach())
                        step_bad |= bad
                        nonfinite = False
                    else:  # a bad step never reaches the weights; a stop signal reaches every rank at one step
                        nonfinite, signalled = any_rank(accelerator, not torch.isfinite(loss), signalled)
                    stop_asked = stop_asked or signalled
                    if nonfinite:
                        if settings.nonfinite == "stop":
                            value = float(loss.detach()) if not torch.isfinite(loss) else float("nan")
                            raise FloatingPointError(
                                f"{desc}: the loss is {value} at step {step + 1}"
                                + (" (on another rank)" if torch.isfinite(loss) else "")
                                + "; nothing of that step was applied (train.nonfinite=skip skips such steps; "
                                "a lower learning rate may help)"
                            )
                        # skip: this step's gradients so far are dropped, the LR schedule moves on
                        result.skipped += 1
                        optimizer.zero_grad(set_to_none=True)
                        lr_scheduler.step()
                        continue
                    with timer("backward"), kernels():
                        accelerator.backward(loss)  # accelerate divides by the accumulation steps
                    with timer("optimizer"):
                        if accelerator.sync_gradients and settings.max_grad_norm > 0:
                            grad_norm = accelerator.clip_grad_norm_(params, settings.max_grad_norm)
                        if on_device:
                            inner.found_inf = step_bad.float()  # 1: the fused step leaves everything as it was
                        optimizer.step()  # a no-op until the last micro-batch
                        lr_scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                        if on_device and accelerator.sync_gradients:
                            first_bad = torch.where(step_bad & (first_bad < 0), step + 1, first_bad)
                            bad_steps += step_bad
                            step_bad = torch.zeros_like(step_bad)
                running += (torch.where(bad, 0.0, loss.detach()) if on_device else loss.detach()) / micro_steps
            if ema is not None:
                with timer("optimizer"):
                    ema.step(params)
            done = step + 1
            if done % settings.log_every == 0 or done == settings.steps:
                # reading the loss syncs with the device: only at log intervals. With several processes
                # the mean of the ranks' losses is the global batch's loss (see Batch.shard)
                read_device_flags(done)
                n = (step % settings.log_every) + 1
                value = float(accelerator.reduce(torch.as_tensor(running, device=accelerator.device), "mean")) / n
                if not math.isfinite(value):
                    raise FloatingPointError(f"{desc}: loss became {value} at step {done}")
                result.losses.append(value)
                lr = lr_scheduler.get_last_lr()[0]
                bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.1e}")
                now = time.perf_counter()
                if monitor is not None:
                    values = {"train/loss": value, "train/lr": lr, "train/samples_per_s": samples / (now - logged_at)}
                    if grad_norm is not None:
                        values["train/grad_norm"] = float(grad_norm)
                    monitor.log(done, values)
                running, samples, logged_at = 0.0, 0, now
            if monitor is not None and monitor.due(done, settings.steps):
                paused = time.perf_counter()
                monitor.validate(done)  # rank 0 samples with the weights of this step; training goes on as if not
                pause = time.perf_counter() - paused
                began, logged_at = began + pause, logged_at + pause
            result.steps_run += 1
            if ck.folder is None:
                continue
            if stop_asked or (ck.every and (done % ck.every == 0 or done == settings.steps)):
                read_device_flags(done)  # a checkpoint never holds a step that should have stopped the run
            if stop_asked:  # SIGTERM / SIGINT / SIGUSR1 on any rank: every rank saves this step and stops
                raise checkpoints.Stopped(done, save(done, running), signals.signum or signal.SIGTERM)
            if ck.every and (done % ck.every == 0 or done == settings.steps):
                save(done, running)
    read_device_flags(settings.steps)
    result.step_seconds = time.perf_counter() - began
    if settings.channels_last:
        denoiser.to(memory_format=torch.contiguous_format)
    result.phases = {k: round(v, 4) for k, v in timer.seconds.items()}
    denoiser.eval()
    for module in (text_encoders or {}).values():
        module.eval()
    for p in params:  # what was frozen mid-run trained before: leave every trained tensor as it was given
        p.requires_grad_(True)
    return result
