"""What watches the training steps: the non-finite guard (the one place a NaN or infinite loss is caught)
and the timer of each phase of a step. Used by the loop (tuner/training/loop.py).
"""

from __future__ import annotations

import contextlib
import time

import torch

from tuner.distributed import any_rank


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


class NonFiniteGuard:
    """The one place a NaN or infinite loss is caught, so that it never reaches the weights.

    With one process and the fused AdamW it is caught on the device: the fused step skips the update (its
    ``found_inf``), and the host reads the count with the loss at log intervals, before a checkpoint and at
    the end (``read``), so a step never waits for the device. Otherwise each micro-batch checks on the host
    (one small all-reduce with several processes; free on a CPU). ``train.nonfinite`` says what happens:
    stop (raise, naming the step) or skip the step.
    """

    def __init__(self, accelerator, optimizer, policy: str, desc: str):
        self.inner = getattr(optimizer, "optimizer", optimizer)
        self.policy, self.desc, self.accelerator = policy, desc, accelerator
        fused = getattr(self.inner, "defaults", {}).get("fused") is True
        self.on_device = accelerator.num_processes == 1 and accelerator.scaler is None and fused
        device = accelerator.device
        self.bad = torch.zeros((), dtype=torch.bool, device=device)  # this micro-batch's loss
        self.step_bad = torch.zeros((), dtype=torch.bool, device=device)  # any micro-batch of this step
        self.bad_steps = torch.zeros((), dtype=torch.int64, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.skipped = 0  # steps (on the device) or micro-batches (on the host) skipped

    def check(self, loss: torch.Tensor, step: int, signalled: bool) -> tuple[bool, bool]:
        """(skip this micro-batch, a stop signal arrived on any rank) for a micro-batch's ``loss``.

        Raises:
            FloatingPointError: the loss is not finite (checked on the host) and the policy is stop.
        """
        if self.on_device:
            self.bad = ~torch.isfinite(loss.detach())
            self.step_bad |= self.bad
            return False, signalled
        # a stop signal reaches every rank at the same step
        nonfinite, signalled = any_rank(self.accelerator, not torch.isfinite(loss), signalled)
        if nonfinite and self.policy == "stop":
            value = float(loss.detach()) if not torch.isfinite(loss) else float("nan")
            raise FloatingPointError(
                f"{self.desc}: the loss is {value} at step {step + 1}"
                + (" (on another rank)" if torch.isfinite(loss) else "")
                + "; nothing of that step was applied (train.nonfinite=skip skips such steps; "
                "a lower learning rate may help)"
            )
        self.skipped += nonfinite
        return nonfinite, signalled

    def arm(self) -> None:
        """Before the optimizer step: on the device, a bad step leaves every weight as it was."""
        if self.on_device:
            self.inner.found_inf = self.step_bad.float()

    def step_done(self, step: int) -> None:
        """After a whole step's update: count it if it was bad, and start the next one clean."""
        if self.on_device:
            self.first_bad = torch.where(self.step_bad & (self.first_bad < 0), step + 1, self.first_bad)
            self.bad_steps += self.step_bad
            self.step_bad = torch.zeros_like(self.step_bad)

    def finite(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss as the running mean counts it: 0 for a micro-batch caught on the device."""
        return torch.where(self.bad, 0.0, loss.detach()) if self.on_device else loss.detach()

    def read(self, at: int) -> None:
        """What the device counted (this syncs): stop on a non-finite loss, or count the skipped steps."""
        if not self.on_device:
            return
        skipped, first = int(self.bad_steps), int(self.first_bad)
        if skipped and self.policy == "stop":
            more = f" (and {skipped - 1} more step(s) up to step {at})" if skipped > 1 else ""
            raise FloatingPointError(
                f"{self.desc}: the loss is not finite at step {first}{more}; nothing of that step was applied "
                "(train.nonfinite=skip skips such steps; a lower learning rate may help)"
            )
        self.skipped = skipped
