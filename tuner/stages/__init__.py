"""The stages a recipe's ``stages:`` may name, in the order a training recipe runs them.

    base -> subject -> prepare -> class_images -> train -> export -> gallery -> evaluate
    load_adapter -> gallery, evaluate       recipe=evaluate
    generate                                recipe=generate
    evaluate_base                           recipe=digits_base

Each is a function ``stage(run)`` in a module of this package; ``context.py`` holds the ``Run`` they
share. Adding a stage is one function with its ``@stage`` declaration, and one line here.
"""

from __future__ import annotations

from omegaconf import DictConfig

from tuner.stages import adapters, base, data, export, generate, reports, train

STAGES = {
    fn.__name__: fn
    for fn in (
        base.base,
        base.evaluate_base,
        data.subject,
        data.prepare,
        data.class_images,
        train.train,
        export.export,
        adapters.load_adapter,
        reports.gallery,
        reports.evaluate,
        generate.generate,
    )
}


def entries(cfg: DictConfig) -> tuple[str, ...]:
    """Every entry of the run folder that the stages of ``cfg`` may write (the manifest lists them)."""
    return tuple(sorted({name for s in cfg.stages if s in STAGES for name in STAGES[s].writes}))
