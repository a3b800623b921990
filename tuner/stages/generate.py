"""The generate stage (recipe=generate): prompt-file jobs drawn with the base and its adapters, written as
PNG files with A1111-style parameters. An edit family (tuner/models/references.py) edits ``generate.controls``:
its pipeline gets them as they are and prepares them by its own rule.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tuner import generation as gen
from tuner import run_folder
from tuner.errors import ConfigError, Interrupted
from tuner.export.fitting import check_adapter
from tuner.export.gallery import write_image_page
from tuner.export.loading import load_checkpoint
from tuner.files import write_atomic
from tuner.models import get_family, samplers
from tuner.sampling import edit_call, open_control
from tuner.stages.context import Run, stage


def _check(cfg) -> None:
    """generate's settings (tuner/generation.py) and its controls, then each adapter against the base from its
    header (family, shapes: tuner/export/fitting.py), then the user's callback, the only check that runs code of
    the user's."""
    gen.check(cfg)
    _check_controls(cfg)
    for k, a in enumerate(cfg.generate.adapters):
        check_adapter(cfg, a.path, f"generate.adapters[{k}]")
    if cfg.generate.callback:
        gen.user_callback(cfg.generate.callback)


@stage(main_only=True, after=("base",), writes=("images",), check=_check)
def generate(run: Run) -> None:
    """Images from the base plus ``generate.adapters`` (each at its weight, diffusers' ``set_adapters``),
    for ``generate.prompts`` and the lines of ``generate.prompt_file``; see tuner/generation.py.

    Writes ``images/NNNN-seedS.png`` (the settings in the PNG's ``parameters`` text, as A1111 does),
    ``images/images.jsonl`` (one line of settings per image) and ``images/index.html``; with
    ``generate.preview_every`` each image's decoded previews in ``images/previews/NNNN-seedS/``. Stopped by
    Ctrl-C, it writes the list and the page of the images made so far, then raises ``Interrupted``.
    """

    cfg, g = run.cfg, run.cfg.generate
    own = samplers.default(run.family, run.components)  # the sampler of images that name none
    jobs = gen.make_jobs(g, cfg.data.resolution, samplers.schedulers(run.family), own)
    run.metrics["sampler"] = "; ".join(dict.fromkeys(_sampler_used(job, own) for job in jobs))
    print(f"[tuner] generate: sampler {run.metrics['sampler']}", flush=True)
    folder, entries = run.dir / "images", []
    run_folder.remove(run.dir, "images")  # an earlier try's images in this run folder would mix with these
    try:
        pipe, refiner, user = _prepare(run)
        with tqdm(total=len(jobs), desc="generate") as bar:
            references = run.family.REFERENCES if g.controls else None
            most = references.batch if references is not None and references.batch else g.batch_size
            for batch in gen.batches(jobs, min(g.batch_size, most)):  # its pipeline's most images a call
                _draw(run, pipe, refiner, user, batch, folder, entries)
                bar.update(len(batch))
    except KeyboardInterrupt:
        _write_index(run, folder, entries)
        raise Interrupted(
            f"Ctrl-C after {len(entries)} of {len(jobs)} images; {folder / 'images.jsonl'} and index.html list "
            "those made"
        ) from None
    _write_index(run, folder, entries)


def _check_controls(cfg) -> None:
    """``generate.controls``: an edit family's, no more than it reads, files there, not with ``init_image``; a family
    whose pipeline only edits needs them."""
    g, name = cfg.generate, cfg.model.family
    references = get_family(name, cfg.model).REFERENCES
    if not g.controls:
        if references is not None and references.required:
            raise ConfigError(
                f"generate.controls: model={name}'s pipeline edits reference images and draws nothing without one; "
                "give generate.controls=[IMAGE]"
            )
        return
    if references is None:
        raise ConfigError(
            f"generate.controls: model={name} reads no reference images; edit with an edit family's base "
            "(model=flux_kontext, model=qwen_image_edit, or Flux.2's), or leave generate.controls empty"
        )
    if g.init_image:
        raise ConfigError(
            "generate.controls with generate.init_image: an edit starts from noise beside its references; choose "
            "one (leave generate.init_image empty to edit)"
        )
    if len(g.controls) > references.most:
        raise ConfigError(
            f"generate.controls: {len(g.controls)} images, and model={name} reads at most {references.most}"
        )
    for k, path in enumerate(g.controls):
        if not Path(path).expanduser().is_file():
            raise ConfigError(f"generate.controls[{k}]={path}: no such file")


def _controls(g) -> list:
    """``generate.controls`` as the pipeline is handed them (read, never resized nor modified)."""
    out = []
    for k, path in enumerate(g.controls):
        try:
            out.append(open_control(path))
        except OSError as e:
            raise ConfigError(f"generate.controls[{k}]={path}: not an image PIL can read ({e})") from None
    return out


def _sampler_used(job, own) -> str:
    """Which sampler drew ``job``'s image and where it came from, for the log and the summary."""
    if job.scheduler_from in ("base", "family"):
        return own.describe()
    return f"{job.scheduler} ({'a prompt line' if job.scheduler_from == '--ss' else job.scheduler_from})"


def _prepare(run: Run) -> tuple:
    """The pipeline with ``generate.adapters`` loaded at their weights (image-to-image when asked), the refiner
    (or None) and the user's callback (or None)."""
    g = run.cfg.generate
    names, weights = [], []
    for k, a in enumerate(g.adapters):
        name = f"adapter{k}"
        loaded = load_checkpoint(run, Path(a.path).expanduser(), adapter_name=name)
        print(f"[tuner] {name} = {a.path} at weight {a.weight}: {', '.join(loaded.names)}", flush=True)
        if any(name in adapters for adapters in run.pipe.get_list_adapters().values()):  # not only embeddings
            names.append(name)
            weights.append(a.weight)
    if names:
        run.pipe.set_adapters(names, weights)
    pipe = run.family.img2img(run.pipe) if g.init_image else run.pipe
    user = gen.user_callback(g.callback) if g.callback else None
    refiner = None
    if g.refiner:  # its scheduler is the base's sampler, from its own config
        refiner = run.family.refiner_pipeline(Path(g.refiner).expanduser(), run.accelerator.device, run.components)
    return pipe, refiner, user


def _write_index(run: Run, folder: Path, entries: list[dict]) -> None:
    """``images.jsonl`` (one line of settings per image) and ``index.html`` of the images in ``entries``."""
    write_atomic(folder / "images.jsonl", "".join(json.dumps(e) + "\n" for e in entries))
    run.outputs["images"] = str(write_image_page(folder, entries))


def _draw(run: Run, pipe, refiner, user, batch, folder: Path, entries: list[dict]) -> None:
    """One batch of jobs (same settings): drawn, post-processed, written with their settings; each image's
    entry is added to ``entries`` once its file is in place."""
    g = run.cfg.generate
    first = batch[0][1]
    pipe.scheduler = samplers.scheduler(first.scheduler, run.family, run.components.noise_scheduler.config)
    init, call = None, {}
    if g.init_image:
        init = gen.load_init_image(g.init_image, first.width, first.height)
        call = {"image": init, "strength": g.strength}
    if g.controls:  # the pipeline's references, drawn at the job's size (a copy of each beside the images)
        controls = _controls(g)
        for k, control in enumerate(controls):
            write_atomic(folder / "controls" / f"control{k}.png", control)
        call = edit_call(run.family.REFERENCES, controls, first.height, first.width)

    def preview(step: int, latents, batch=batch, first=first) -> None:
        """Each image of the batch as it stands after ``step`` denoising steps."""
        decoded = run.family.decode(pipe, latents, first.height, first.width).float().clamp(-1, 1).cpu()
        for (i, job), picture in zip(batch, gen.to_pil(decoded)):
            write_atomic(folder / "previews" / f"{i:04d}-seed{job.seed}" / f"step-{step:03d}.png", picture)

    call.update(gen.step_callbacks(g.preview_every, user, preview))
    if refiner is not None:
        refiner.scheduler = samplers.scheduler(first.scheduler, run.family, refiner.scheduler.config)
        with torch.no_grad(), run.accelerator.autocast():
            images = gen.refine(pipe, refiner, [j for _, j in batch], g.refiner_start, run.family.decode, **call)
    else:
        images = run.sample_with(pipe, [j for _, j in batch], call)
    for (i, job), image in zip(batch, gen.to_pil(images)):
        image = gen.post_process(image, g.post, init)
        settings = {**dataclasses.asdict(job), "adapters": [dict(a) for a in g.adapters]}
        if g.init_image:
            settings.update(init_image=Path(g.init_image).name, strength=g.strength)
        if g.controls:  # the files given, and the copies the page shows
            shown = [f"controls/control{k}.png" for k in range(len(g.controls))]
            settings.update(controls=[str(Path(c).expanduser()) for c in g.controls], control_files=shown)
        if g.refiner:
            settings.update(refiner=Path(g.refiner).name, refiner_start=g.refiner_start)
        name = f"{i:04d}-seed{job.seed}.png"
        write_atomic(folder / name, _png_with_parameters(image, job, g.post.upscale))
        entries.append({"file": name, **settings})


A1111_SAMPLERS = {
    "ddim": "DDIM",
    "ddpm": "DDPM",
    "euler": "Euler",
    "euler_a": "Euler a",
    "dpm++": "DPM++ 2M",
    "dpm++_karras": "DPM++ 2M Karras",
    "pndm": "PLMS",
    "heun": "Heun",
    "unipc": "UniPC",
    "flow_euler": "Euler",  # A1111/Forge name the flow-matching samplers as the others, the schedule says flow
    "flow_heun": "Heun",
    "flow_dpm++": "DPM++ 2M",
    "flow_unipc": "UniPC",
    # a base's own scheduler that tuner names by its class (samplers.default); others keep their class name
    "LMSDiscreteScheduler": "LMS",
    "KDPM2DiscreteScheduler": "DPM2",
    "KDPM2AncestralDiscreteScheduler": "DPM2 a",
}


def _png_with_parameters(image, job, upscale: int) -> bytes:
    """PNG bytes with A1111's ``parameters`` text chunk, so the settings travel with the image."""
    import io

    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    text = job.prompt + (f"\nNegative prompt: {job.negative}" if job.negative else "")
    sampler = A1111_SAMPLERS.get(job.scheduler, job.scheduler)
    text += (
        f"\nSteps: {job.steps}, Sampler: {sampler}, CFG scale: {job.guidance}, "
        f"Seed: {job.seed}, Size: {job.width}x{job.height}" + (f", Upscale: {upscale}" if upscale > 1 else "")
    )
    info.add_text("parameters", text)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()
