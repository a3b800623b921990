"""The optimizer and the learning-rate schedule a run names (``train.optimizer``, ``train.lr_scheduler``)."""

from __future__ import annotations

import torch


def make_optimizer(name: str, groups: list[dict], learning_rate: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW (fused), 8-bit AdamW from bitsandbytes (runs on CPU too), Prodigy, or SGD with momentum.

    ``groups`` are torch parameter groups; each may carry its own ``lr`` and ``weight_decay``.
    """
    groups = [{k: v for k, v in g.items() if k != "name"} for g in groups]
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=learning_rate, weight_decay=weight_decay)
    if name == "prodigy":
        from prodigyopt import Prodigy

        # the learning rate is a multiplier of the step size Prodigy estimates: 1.0 is its default
        return Prodigy(groups, lr=learning_rate, weight_decay=weight_decay, safeguard_warmup=True)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=learning_rate, momentum=0.9, weight_decay=weight_decay)
    devices = {p.device.type for g in groups for p in g["params"]}
    fused = devices <= {"cpu", "cuda", "xpu", "mps"}  # one kernel per step; foreach elsewhere
    return torch.optim.AdamW(groups, lr=learning_rate, weight_decay=weight_decay, fused=fused)


def make_lr_scheduler(name: str, optimizer, warmup_steps: int, steps: int):
    """diffusers' schedulers (constant, constant_with_warmup, linear, cosine) or torch's OneCycle."""
    if name == "one_cycle":
        max_lr = [g["lr"] for g in optimizer.param_groups]
        pct_start = warmup_steps / steps if warmup_steps else 0.3
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=steps, pct_start=pct_start)
    from diffusers.optimization import get_scheduler

    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup_steps, num_training_steps=steps)
