"""The stages people read (rank 0): the gallery (base against fine-tuned, fixed seeds) and the digits
evaluation (subject fidelity, class preservation).
"""

from __future__ import annotations

import json
import re

import numpy as np
import torch

from tuner.data import digits
from tuner.data.prepare import load_prepared
from tuner.errors import ConfigError
from tuner.files import write_atomic
from tuner.stages.context import Run, stage
from tuner.stages.data import images_of


def _with_and_without_adapter(run: Run, prompts, seeds, steps, guidance, desc):
    """Sample the same prompts and seeds from the base and from the fine-tuned model.

    With only peft adapters trained, the base is the same model with its adapters switched off; when
    base weights or the vocabulary changed, it is a fresh copy of the base, loaded for this and freed.
    """
    c = run.components
    adapted = [m for m in c.trainable().values() if getattr(m, "peft_config", None)]
    if not adapted and not run.base_weights_changed:
        raise ConfigError("gallery/evaluate need an adapter: put train or load_adapter (checkpoint=PATH) before them")
    if run.base_weights_changed:
        base = run.family.load(run.model_path, run.cfg.model.prediction_type, run.cfg.model.allow_pickle)
        base_pipe = run.family.pipeline(base)
        base_pipe.to(run.accelerator.device)
        base_images = run.sample(prompts, seeds, steps, guidance, desc=f"{desc} (base)", pipe=base_pipe)
        del base_pipe
    else:
        for module in adapted:
            module.disable_adapters()
        base_images = run.sample(prompts, seeds, steps, guidance, desc=f"{desc} (base)")
        for module in adapted:
            module.enable_adapters()
    tuned_images = run.sample(prompts, seeds, steps, guidance, desc=f"{desc} (fine-tuned)")
    return base_images, tuned_images


@stage(main_only=True, writes=("gallery",))
def gallery(run: Run) -> None:
    """Base vs fine-tuned, for the instance prompt and the class prompt, at fixed seeds."""
    from tuner.export.gallery import write_gallery

    d, s = run.cfg.data, run.cfg.sample
    seeds = list(s.seeds)
    prompts = list(s.prompts) or [p for p in (d.instance_prompt, d.class_prompt) if p]
    every_prompt = [prompt for prompt in prompts for _ in seeds]
    base_images, tuned_images = _with_and_without_adapter(
        run, every_prompt, seeds * len(prompts), s.steps, s.guidance_scale, "gallery"
    )
    rows = []
    for k, prompt in enumerate(prompts):
        cells = slice(k * len(seeds), (k + 1) * len(seeds))
        rows += [(f"base: {prompt}", base_images[cells]), (f"fine-tuned: {prompt}", tuned_images[cells])]
    run.outputs["gallery"] = str(write_gallery(run.dir / "gallery", rows, seeds, s.display_size))


def digit_in(prompt: str | None) -> int | None:
    """The digit a prompt names in words (``... digit seven`` -> 7), if any."""
    words = re.findall(r"[a-z]+", (prompt or "").lower())
    found = [digits.WORDS.index(w) for w in words if w in digits.WORDS]
    return found[-1] if found else None


@stage(main_only=True, writes=("metrics.json",))
def evaluate(run: Run) -> None:
    """Digits base: subject fidelity and class preservation, scored by an independent classifier.

    The classifier is an SVC fit on the real digits plus the instance images as an eleventh class.
    Subject fidelity is the share of instance-prompt samples classified as the subject; class
    preservation the share of class-prompt samples still classified as the digit the prompt names.
    """
    if run.cfg.model.path or run.cfg.model.builtin != "digits":
        print("[tuner] evaluate: digit metrics apply to the embedded digits base only; skipped")
        return
    d, e = run.cfg.data, run.cfg.eval
    instance = torch.stack(images_of(load_prepared(run.dir / "data" / "instance")))
    classifier = digits.DigitClassifier(d.resolution, extra_images=instance, extra_label=10)
    seeds = [e.seed + i for i in range(e.samples)]
    scored = [
        (name, prompt, label)
        for name, prompt, label in (
            ("subject_fidelity", d.instance_prompt, 10),
            ("class_preservation", d.class_prompt, digit_in(d.class_prompt)),
        )
        if prompt is not None and label is not None
    ]
    prompts = [prompt for _, prompt, _ in scored for _ in seeds]
    base_images, tuned_images = _with_and_without_adapter(
        run, prompts, seeds * len(scored), e.steps, e.guidance_scale, "evaluate"
    )
    metrics = {}
    for k, (name, _, label) in enumerate(scored):
        cells = slice(k * e.samples, (k + 1) * e.samples)
        metrics[name] = float(np.mean(classifier.predict(tuned_images[cells]) == label))
        metrics[f"{name}_base"] = float(np.mean(classifier.predict(base_images[cells]) == label))
    run.metrics.update(metrics)
    write_atomic(run.dir / "metrics.json", json.dumps(metrics, indent=2))
    run.outputs["metrics"] = str(run.dir / "metrics.json")
