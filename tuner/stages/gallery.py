"""The gallery stage (rank 0): samples of the base against the fine-tuned model, at fixed seeds (drawn as the
evaluate stage draws its own: tuner/export/live.py's ``with_and_without_adapter``). An edit run's gallery (its
prepared data has pairs) edits ``validation.pairs`` pairs, the held-out ones first: control(s) | base | fine-tuned
| target per row.

(The digits demo's evaluation, which scores such samples, is in tuner/digits/stages.py.)
"""

from __future__ import annotations

from tuner.errors import ConfigError
from tuner.export.gallery import write_edit_gallery, write_gallery
from tuner.export.live import with_and_without_adapter
from tuner.generation import check_refiner
from tuner.models import get_family, samplers
from tuner.sampling import edit_pairs
from tuner.stages.context import Run, stage


def _edits(cfg) -> bool:
    """The run trains pairs: its gallery edits them."""
    return bool(cfg.data.controls or cfg.data.pairs) and get_family(cfg.model.family, cfg.model).REFERENCES is not None


def _check_gallery(cfg) -> None:
    if not (_edits(cfg) or cfg.sample.prompts or cfg.data.instance_prompt or cfg.data.class_prompt):
        raise ConfigError('gallery: no prompt to sample; set sample.prompts=["a photo of ..."]')
    if cfg.sample.refiner:
        check_refiner(cfg.model.family, cfg.sample.refiner, "sample.refiner")


@stage(main_only=True, after=("base", "train|load_adapter"), writes=("gallery",), check=_check_gallery)
def gallery(run: Run) -> None:
    """Base vs fine-tuned, for the instance prompt and the class prompt, at fixed seeds, with the base's sampler
    (``samplers.default``: its own scheduler where the family's pipeline draws with it), named in the log and
    the summary."""
    d, s = run.cfg.data, run.cfg.sample
    run.metrics["sampler"] = samplers.default(run.family, run.components).describe()
    print(f"[tuner] gallery: sampler {run.metrics['sampler']}", flush=True)
    seeds = list(s.seeds)
    pairs = edit_pairs(run.dir, run.cfg, run.cfg.validation.pairs) if run.family.REFERENCES is not None else []
    if pairs or (run.family.REFERENCES is not None and run.family.REFERENCES.required):
        return _edit_gallery(run, pairs, seeds)
    prompts = list(s.prompts) or [p for p in (d.instance_prompt, d.class_prompt) if p]
    every_prompt = [prompt for prompt in prompts for _ in seeds]
    base_images, tuned_images = with_and_without_adapter(
        run, every_prompt, seeds * len(prompts), s.steps, s.guidance_scale, "gallery"
    )
    rows, refined = [], " + refiner" if s.refiner else ""
    for k, prompt in enumerate(prompts):
        cells = slice(k * len(seeds), (k + 1) * len(seeds))
        rows += [
            (f"base{refined}: {prompt}", base_images[cells]),
            (f"fine-tuned{refined}: {prompt}", tuned_images[cells]),
        ]
    run.outputs["gallery"] = str(write_gallery(run.dir / "gallery", rows, seeds, s.display_size))


def _edit_gallery(run: Run, pairs: list, seeds: list[int]) -> None:
    """Each pair's control(s), the base's edit and the fine-tuned edit at ``seeds``, and its target."""
    s = run.cfg.sample
    if not pairs:  # (after training: its results stand; the gallery says why it is not there)
        print(
            f"[tuner] no gallery: model={run.cfg.model.family}'s pipeline ({run.family.PIPELINE}) only edits, and the "
            "prepared data has no pair to edit (data.controls=[DIR] or data.pairs=FILE give pairs)",
            flush=True,
        )
        return
    base, tuned = with_and_without_adapter(run, [], seeds, s.steps, s.guidance_scale, "gallery", pairs=pairs)
    rows = [(f"{p.label}: {p.prompt}", p.controls, b, t, p.target) for p, b, t in zip(pairs, base, tuned)]
    run.outputs["gallery"] = str(write_edit_gallery(run.dir / "gallery", rows, seeds, s.display_size))
