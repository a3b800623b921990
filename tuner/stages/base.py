"""The base stages: resolve the base model (building the embedded digits base when it is the one), and
score the digits base per digit.
"""

from __future__ import annotations

import json

import numpy as np

from tuner.data import digits
from tuner.files import write_atomic
from tuner.stages.context import Run, stage


@stage
def base(run: Run) -> None:
    """Build or reuse the base model (the embedded digits base when model.path is null)."""
    run.outputs["base"] = str(run.model_path)


@stage(main_only=True, writes=("gallery", "metrics.json"))
def evaluate_base(run: Run) -> None:
    """Digits base: per-digit share of samples an independent SVC classifies as the prompted digit."""
    from tuner.export.gallery import write_gallery

    e = run.cfg.eval
    prompts = [digits.caption(k) for k in range(10) for _ in range(e.samples)]
    seeds = [e.seed + i for k in range(10) for i in range(e.samples)]
    images = run.sample(prompts, seeds, e.steps, e.guidance_scale, desc="evaluate base")
    predicted = digits.DigitClassifier(run.cfg.data.resolution).predict(images).reshape(10, e.samples)
    accuracy = {digits.WORDS[k]: float(np.mean(predicted[k] == k)) for k in range(10)}
    run.metrics["digit_accuracy"] = accuracy
    run.metrics["min_digit_accuracy"] = min(accuracy.values())
    write_atomic(run.dir / "metrics.json", json.dumps(run.metrics, indent=2))
    n = len(run.cfg.sample.seeds)
    rows = [(digits.caption(k), images[k * e.samples : k * e.samples + n]) for k in range(10)]
    run.outputs["gallery"] = str(write_gallery(run.dir / "gallery", rows, seeds[:n], run.cfg.sample.display_size))
    run.outputs["metrics"] = str(run.dir / "metrics.json")
