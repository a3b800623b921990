"""The evaluate stage (rank 0): what the fine-tune learned and what it broke, in numbers (tuner/scoring.py).

The base and the fine-tuned model sample ``eval.samples`` images of the instance prompt and of the class prompt at
the same seeds; each set is scored against the subject's real images: subject fidelity (the digits classifier on
the embedded base; ``eval.dino`` and ``eval.clip`` on any base), prompt fidelity (CLIP-T), diversity, and drift
(the class-prompt samples' move toward the subject). Each number is written for the fine-tune and, as
``NAME_base``, for the base, into ``metrics.json`` and the summary.
"""

from __future__ import annotations

import json

from tuner import scoring
from tuner.data.prepared import subject_images
from tuner.errors import ConfigError
from tuner.export.live import with_and_without_adapter
from tuner.files import write_atomic
from tuner.models import get_family
from tuner.stages.context import Run, stage


def _check_evaluate(cfg) -> None:
    scoring.check(cfg)
    references = get_family(cfg.model.family).REFERENCES if cfg.model.family else None
    if references is not None and references.required:
        raise ConfigError(
            f"stages: evaluate samples prompts alone, and model={cfg.model.family}'s pipeline only edits reference "
            "images: its edits are scored by the held-out loss (data.val_split) and shown on the validation page and "
            "in the gallery (recipe=edit_lora); drop evaluate from stages"
        )


@stage(main_only=True, after=("base", "prepare", "train|load_adapter"), writes=("metrics.json",), check=_check_evaluate)
def evaluate(run: Run) -> None:
    """Score base and fine-tune on the same seeds; skipped (said once) when nothing can score them."""
    d, e = run.cfg.data, run.cfg.eval
    subject = subject_images(run.dir)
    scorer = scoring.scorer(run.cfg, subject, run.accelerator.device, run.feature_models, run.judge(subject))
    if scorer is None:
        print("[tuner] evaluate: skipped (no metric applies; see above)", flush=True)
        return
    seeds = [e.seed + i for i in range(e.samples)]
    prompts = [p for p in (d.instance_prompt, d.class_prompt) if p]
    base_images, tuned_images = with_and_without_adapter(
        run, [p for p in prompts for _ in seeds], seeds * len(prompts), e.steps, e.guidance_scale, "evaluate"
    )
    n = len(seeds)
    base_class, tuned_class = (base_images[n:], tuned_images[n:]) if d.class_prompt else (None, None)
    reference = scorer.class_similarity(base_class) if base_class is not None else None  # drift's zero
    tuned = scorer.score(tuned_images[:n], tuned_class, reference)
    base = scorer.score(base_images[:n], base_class, reference)
    metrics = tuned | {f"{k}_base": v for k, v in base.items() if k != "drift"}
    run.metrics.update(metrics)
    write_atomic(run.dir / "metrics.json", json.dumps(metrics, indent=2))
    run.outputs["metrics"] = str(run.dir / "metrics.json")
