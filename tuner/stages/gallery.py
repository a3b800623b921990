"""The gallery stage (rank 0): samples of the base against the fine-tuned model, at fixed seeds.

(The digits demo's evaluation, which scores such samples, is in tuner/digits/stages.py.)
"""

from __future__ import annotations

from tuner.errors import ConfigError
from tuner.export.gallery import write_gallery
from tuner.generation import check_refiner
from tuner.models import samplers
from tuner.stages.context import Run, stage


def with_and_without_adapter(run: Run, prompts, seeds, steps, guidance, desc):
    """Sample the same prompts and seeds from the base and from the fine-tuned model (each followed by
    ``sample.refiner``, an SDXL refiner, when set).

    With only peft adapters trained, the base is the same model with its adapters switched off; when
    base weights or the vocabulary changed, it is a fresh copy of the base, loaded for this and freed (with a
    refiner of its own: a refiner reads the prompt with the base's CLIP-G, new tokens and all).
    """
    c = run.components
    adapted = [m for m in c.trainable().values() if getattr(m, "peft_config", None)]
    changed = run.adapted.base_weights_changed
    if not adapted and not changed:
        raise ConfigError("gallery/evaluate need an adapter: put train or load_adapter (checkpoint=PATH) before them")
    if changed:
        base = run.family.load(run.base, run.cfg.model.prediction_type, run.cfg.model.allow_pickle)
        base_pipe = run.family.pipeline(base)
        base_pipe.to(run.accelerator.device)
        base_images = run.sample(prompts, seeds, steps, guidance, f"{desc} (base)", base_pipe, run.load_refiner(base))
        del base_pipe
    refiner = run.load_refiner()
    if not changed:
        for module in adapted:
            module.disable_adapters()
        base_images = run.sample(prompts, seeds, steps, guidance, f"{desc} (base)", refiner=refiner)
        for module in adapted:
            module.enable_adapters()
    tuned_images = run.sample(prompts, seeds, steps, guidance, f"{desc} (fine-tuned)", refiner=refiner)
    return base_images, tuned_images


def _check_gallery(cfg) -> None:
    if not (cfg.sample.prompts or cfg.data.instance_prompt or cfg.data.class_prompt):
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
