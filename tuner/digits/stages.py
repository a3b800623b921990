"""The digits demo's stages: the quickstart's synthetic subject, the base's per-digit score, and the
evaluation of a fine-tune (subject fidelity, class preservation) by an independent classifier.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from omegaconf import DictConfig

from tuner.digits import data as digits
from tuner.errors import ConfigError
from tuner.export.gallery import write_gallery
from tuner.files import atomic_dir, write_atomic
from tuner.stages.context import Run, Subject, stage


def _check_subject(cfg: DictConfig) -> None:
    s = cfg.subject
    if s.transform not in digits.TRANSFORMS:
        raise ConfigError(f"subject.transform={s.transform}: choose one of {', '.join(digits.TRANSFORMS)}")
    if not 0 <= s.digit <= 9 or not 1 <= s.count <= 50:
        raise ConfigError("subject.digit must be 0..9 and subject.count 1..50")


@stage(writes=("instance_images",), check=_check_subject)
def subject(run: Run) -> Subject:
    """Quickstart: write the synthetic subject as PNG files, the way a user's photos would arrive."""
    s = run.cfg.subject
    folder = run.dir / "instance_images"
    if run.is_main:
        with atomic_dir(folder) as tmp:  # a rerun with other subject settings leaves no stale images
            digits.write_subject_images(tmp, s.digit, s.transform, s.count, s.seed, s.image_size)
    run.wait()
    run.outputs["instance"] = str(folder)
    return Subject(folder)


@stage(main_only=True, after=("base",), writes=("gallery", "metrics.json"))
def evaluate_base(run: Run) -> None:
    """Digits base: per-digit share of samples an independent SVC classifies as the prompted digit."""
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


class DigitJudge:
    """The digits base's judge of samples (tuner/scoring.py's ``Judge``): an SVC fit on the real digits plus the
    subject's images as an eleventh class, independent of any model that trained."""

    SUBJECT = 10

    def __init__(self, cfg: DictConfig, subject_images: list):
        size = cfg.data.resolution  # images of other sizes (aspect-ratio buckets, data.val_dir) resized to it
        area = torch.nn.functional.interpolate
        same = [area(x[None].float(), size=(size, size), mode="area")[0] for x in subject_images]
        self.classifier = digits.DigitClassifier(size, extra_images=torch.stack(same), extra_label=self.SUBJECT)
        self.digit = digits.digit_in(cfg.data.class_prompt)

    def is_subject(self, images) -> np.ndarray:
        return self.classifier.predict(images) == self.SUBJECT

    def is_class(self, images) -> np.ndarray | None:
        return None if self.digit is None else self.classifier.predict(images) == self.digit


def judged(cfg: DictConfig) -> set[str]:
    """What the digits judge gives: subject fidelity, and class preservation when the class prompt names a digit."""
    return {"subject_fidelity"} | (
        {"class_preservation"} if digits.digit_in(cfg.data.class_prompt) is not None else set()
    )
