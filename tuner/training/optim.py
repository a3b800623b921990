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


class FusedBackward(torch.optim.Optimizer):
    """``train.fused_backward``: each trained tensor takes its optimizer step as soon as its gradient is
    complete in the backward pass, and the gradient is freed then, so a full or partial fine-tune never
    holds every gradient at once (a model's size in memory, in fp32).

    One optimizer per tensor (``make_optimizer``'s, so every kind behaves as it does unfused), stepped
    from the tensor's post-accumulate-grad hook. ``step`` and ``zero_grad`` have nothing left to do.
    ``param_groups`` are the per-tensor optimizers' own groups, so an LR schedule reaches them.
    """

    def __init__(self, name: str, groups: list[dict], learning_rate: float, weight_decay: float):
        self.each = {
            p: make_optimizer(name, [{**g, "params": [p]}], learning_rate, weight_decay)
            for g in groups
            for p in g["params"]
        }
        per_tensor = [group for opt in self.each.values() for group in opt.param_groups]
        super().__init__(per_tensor, {})
        self.hooks = [p.register_post_accumulate_grad_hook(self._step_one) for p in self.each]

    def _step_one(self, p: torch.Tensor) -> None:
        self.each[p].step()
        p.grad = None

    @torch.no_grad()
    def step(self, closure=None):
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def state_dict(self) -> dict:
        groups = [
            {k: v for k, v in g.items() if k != "params"} | {"params": [i]} for i, g in enumerate(self.param_groups)
        ]
        return {"state": {}, "param_groups": groups, "per_tensor": [opt.state_dict() for opt in self.each.values()]}

    def load_state_dict(self, state_dict: dict) -> None:
        for opt, state in zip(self.each.values(), state_dict["per_tensor"], strict=True):
            opt.load_state_dict(state)

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


def make_lr_scheduler(name: str, optimizer, warmup_steps: int, steps: int):
    """diffusers' schedulers (constant, constant_with_warmup, linear, cosine) or torch's OneCycle."""
    if name == "one_cycle":
        max_lr = [g["lr"] for g in optimizer.param_groups]
        pct_start = warmup_steps / steps if warmup_steps else 0.3
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=steps, pct_start=pct_start)
    from diffusers.optimization import get_scheduler

    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup_steps, num_training_steps=steps)
