"""Which step was best, and when to stop: judged at validation steps from their metrics (tuner/scoring.py,
tuner/training/held_out.py).

``checkpoints.select=METRIC`` keeps the best ``checkpoints.best`` checkpoints besides the newest ones;
``train.early_stop.patience`` stops when that metric has not improved for so many validations;
``train.early_stop.max_drift`` stops when drift passes the bound, and the run keeps the weights of the last
validation step within it. Its state goes into every checkpoint, so a resumed run decides as the
uninterrupted one would.
"""

from __future__ import annotations

import math

from tuner.errors import ConfigError
from tuner.scoring import direction


class Selection:
    def __init__(
        self,
        metric: str | None,
        mode: str | None = None,
        best: int = 1,
        patience: int = 0,
        min_delta: float = 0.0,
        max_drift: float | None = None,
    ):
        self.metric, self.best = metric, best
        self.mode = direction(metric, mode) if metric else None
        self.patience, self.min_delta, self.max_drift = patience, min_delta, max_drift
        self.history: list[tuple[int, float]] = []  # (step, the metric's value) at each validation
        self.since = 0  # validations since the metric last improved
        self.within: int | None = None  # the last validation step whose drift was within max_drift
        self.stopped: dict | None = None  # {"step", "reason", "keep": the step whose weights the run keeps}

    @property
    def active(self) -> bool:
        """Checkpoints are saved at every validation step: something picks among them."""
        return bool(self.metric) or self.max_drift is not None

    def _better(self, a: float, b: float, delta: float = 0.0) -> bool:
        return a < b - delta if self.mode == "min" else a > b + delta

    def observe(self, step: int, values: dict[str, float]) -> None:
        """Take the metrics of validation step ``step``; may decide to stop (``stopped``; nothing changes after)."""
        if self.stopped is not None:
            return
        if self.metric:
            value = values.get(self.metric)
            if value is None or not math.isfinite(value):
                raise RuntimeError(f"checkpoints.select={self.metric}: validation step {step} gave {value} for it")
            best = self.best_step()
            improved = best is None or self._better(value, dict(self.history)[best], self.min_delta)
            self.history.append((step, float(value)))
            self.since = 0 if improved else self.since + 1
            if self.patience and self.since >= self.patience:
                best = self.best_step()
                self.stopped = {
                    "kind": "patience",
                    "step": step,
                    "reason": f"{self.metric} has not improved for {self.since} validations (best at step {best})",
                    "keep": None,
                }
        if self.max_drift is not None and "drift" in values:
            if values["drift"] <= self.max_drift:
                self.within = step
            else:
                self.stopped = {
                    "kind": "drift",
                    "step": step,
                    "reason": f"drift {values['drift']:.4g} passed train.early_stop.max_drift={self.max_drift}",
                    "keep": self.within,
                }

    def ranked(self, upto: int | None = None) -> list[int]:
        """The validation steps (up to step ``upto``), best first (the later of two equal ones first)."""
        sign = 1 if self.mode == "min" else -1
        history = [sv for sv in self.history if upto is None or sv[0] <= upto]
        return [step for step, _ in sorted(history, key=lambda sv: (sign * sv[1], -sv[0]))]

    def best_step(self, upto: int | None = None) -> int | None:
        ranked = self.ranked(upto)
        return ranked[0] if ranked else None

    def protected(self) -> set[int]:
        """The steps whose checkpoints pruning keeps besides the newest: the best ones, and the last within the
        drift bound."""
        keep = set(self.ranked()[: self.best]) if self.metric else set()
        if self.within is not None:  # after a drift stop, the best up to the last step within the bound is taken
            keep |= {self.within, *(self.ranked(self.within)[: self.best] if self.metric else [])}
        return keep

    def chosen(self, last: int, best: bool) -> tuple[int, str]:
        """The step whose weights the run keeps, and why: the ``last`` step's; when drift passed its bound, the last
        validation step within it; with ``best`` (export.from=best), the best step (up to that one)."""
        keep, why, limit, stopped = last, "the last step", None, self.stopped
        if stopped is not None:
            why = f"the last step (training stopped early: {stopped['reason']})"
            if stopped["keep"] is not None:  # drift passed its bound: back to the last step within it
                keep = limit = stopped["keep"]
                why = f"the last validation step within train.early_stop.max_drift (at step {stopped['step']} "
                why += f"{stopped['reason']})"
            elif stopped["kind"] == "drift":
                why = f"the last step: no earlier validation step was within the bound ({stopped['reason']})"
        if best and self.metric and self.best_step(limit) is not None:
            keep = self.best_step(limit)
            upto = f" up to step {limit} (at step {stopped['step']} {stopped['reason']})" if limit is not None else ""
            why = f"the best {self.metric} ({self.mode}imum) of the validation steps{upto}: {self.value(keep):.4g}"
        return keep, why

    def value(self, step: int) -> float | None:
        return dict(self.history).get(step)

    def state_dict(self) -> dict:
        return {"history": [list(x) for x in self.history], "since": self.since, "within": self.within,
                "stopped": self.stopped}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.history = [(int(s), float(v)) for s, v in state["history"]]
        self.since, self.within, self.stopped = state["since"], state["within"], state["stopped"]


def _provider(metric: str) -> str:
    """What a run needs for ``metric``, as the fix a message gives."""
    if metric.startswith("val_loss"):
        held = "held-out images: data.val_split=0.1 or data.val_dir=DIR"
        return held + (" (val_loss_class: data.val_split with prior.enabled=true)" if metric != "val_loss" else "")
    if metric in ("clip_i", "clip_t"):
        return "eval.clip=PATH (a local CLIP folder)"
    if metric == "dino":
        return "eval.dino=PATH (a local DINO / DINOv2 folder)"
    if metric in ("subject_fidelity", "class_preservation", "preservation"):
        return "an embedded base with a judge of its samples (model=digits), and a class prompt it can judge"
    if metric == "drift":
        return "data.class_prompt and a feature model (eval.dino=PATH or eval.clip=PATH, or the digits base)"
    return "a feature model: eval.dino=PATH or eval.clip=PATH (or the digits base), and data.instance_prompt"


def check(cfg, judged: set[str] = frozenset()) -> None:
    """checkpoints.select, train.early_stop and export.from fit the run: the metric exists, something measures
    it (``judged``: the metrics the embedded base's judge gives), and validation runs."""
    from tuner.scoring import METRICS, available
    from tuner.scoring import check as check_feature_models

    d, ck, stop, v = cfg.data, cfg.checkpoints, cfg.train.early_stop, cfg.validation
    if ck.select == "diversity" and v.samples < 2:
        raise ConfigError("checkpoints.select=diversity compares samples among themselves: validation.samples >= 2")
    check_feature_models(cfg)
    if d.val_split > 0 and d.val_dir:
        raise ConfigError("data.val_split and data.val_dir both hold images out: use one of them")
    if ck.select is not None and ck.select not in METRICS:
        raise ConfigError(f"checkpoints.select={ck.select}: choose one of {', '.join(METRICS)}, or null")
    if (d.val_split > 0 or d.val_dir) and not v.every:
        print(
            f"[tuner] {'data.val_split' if d.val_split > 0 else 'data.val_dir'} holds images out, and "
            "validation.every=0 never scores them: set validation.every=N for the held-out loss",
            flush=True,
        )
    if stop.patience and not ck.select:
        raise ConfigError("train.early_stop.patience needs checkpoints.select=METRIC, the metric it watches")
    if cfg.export.from_ == "best" and not ck.select:
        raise ConfigError("export.from=best needs checkpoints.select=METRIC (e.g. val_loss), which says what is best")
    wanted = ([f"checkpoints.select={ck.select}"] if ck.select else []) + (
        [f"train.early_stop.max_drift={stop.max_drift}"] if stop.max_drift is not None else []
    )
    if not wanted:
        return
    if not v.every:
        raise ConfigError(f"{wanted[0]} is judged at validation steps: set validation.every=N (e.g. 100)")
    have = available(cfg, judged)
    for metric, key in ((ck.select, "checkpoints.select"), ("drift" if stop.max_drift is not None else None, "")):
        if metric and metric not in have:
            name = key and f"{key}={metric}" or f"train.early_stop.max_drift={stop.max_drift}"
            raise ConfigError(f"{name}: nothing in this run measures {metric}; it needs {_provider(metric)}")
