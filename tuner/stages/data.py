"""The data stages: the prepared datasets (``data/<role>``) and the class images generated from the base
for prior preservation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from pathlib import Path

from omegaconf import OmegaConf
from tqdm.auto import tqdm

from tuner.data.apart import check_apart
from tuner.data.prepare import Source
from tuner.data.prepare import prepare as prepare_sources
from tuner.data.video import check as check_video
from tuner.distributed import decide
from tuner.errors import ConfigError
from tuner.files import inside, write_atomic
from tuner.sampling import to_uint8
from tuner.stages.context import Run, Subject, stage


def _prepare(run: Run, role: str, folder: str | None, default_caption: str | None) -> None:
    """Prepare one role's dataset (``data/<role>``) from its folder plus the ``data.sources`` of that role.

    Rank 0 prepares; the other ranks wait, then read the same dataset (a ConfigError reaches them all).
    """

    decide(run.accelerator, lambda: _prepare_here(run, role, folder, default_caption))


def _prepare_here(run: Run, role: str, folder: str | None, default_caption: str | None) -> None:
    d = OmegaConf.to_object(run.cfg.data)  # the data section as its dataclass (tuner.config.DataConfig)
    sources = [Source(folder)] if folder else []
    for x in d.sources:
        if x.role == role:
            sources.append(Source(**{f.name: getattr(x, f.name) for f in dataclasses.fields(Source)}))
    if role == "class":  # class images keep their class prompt: no trigger word, never rejected for no caption
        d = dataclasses.replace(d, trigger=None, caption_missing="default")
    out = inside(run.dir, f"data/{role}/cache").parent  # what prepare deletes in there: never through a link
    references = run.family.REFERENCES if role == "instance" else None  # edit pairs: the instance images' own
    report = prepare_sources(
        sources, out, d, default_caption or "", run.cfg.seed, desc=f"prepare {role}", references=references
    )
    print(f"[tuner] {report.summary()}", flush=True)
    for reason, files in report.rejected.items():
        print(f"[tuner]   rejected ({reason}): {', '.join(files[:5])}{' ...' if len(files) > 5 else ''}")
    if not report.kept:
        raise ConfigError(f"{report.source}: no usable {role} image (see {out / 'report.json'})")


def _check_pairs(cfg) -> None:
    """Edit pairs (``data.controls``, ``data.pairs``) only for a family that reads references, no more of them than
    it reads, from folders and a file that exist; a family whose text encoder reads the references caches each
    prompt with its images, so its text encoder cannot run in the step."""
    from tuner.models import get_family

    d = cfg.data
    references = get_family(cfg.model.family, cfg.model).REFERENCES
    if (d.controls or d.pairs) and references is None:
        key = "data.controls" if d.controls else "data.pairs"
        raise ConfigError(
            f"{key}: model={cfg.model.family} reads no reference images (its pipeline edits nothing); train pairs "
            "with an edit family (model=flux_kontext, model=qwen_image_edit, model=flux2), or leave out the key"
        )
    if references is None:
        return
    if len(d.controls) > references.most:
        raise ConfigError(
            f"data.controls: {len(d.controls)} folders, but model={cfg.model.family} reads at most "
            f"{references.most} reference image(s) per sample; give at most {references.most}"
        )
    for k, folder in enumerate(d.controls):
        if not Path(folder).expanduser().is_dir():
            raise ConfigError(f"data.controls[{k}]={folder}: no such folder (reference images, named as the targets)")
    if d.pairs and not Path(d.pairs).expanduser().is_file():
        raise ConfigError(f"data.pairs={d.pairs}: no such file (a jsonl of {{target, controls, caption}} lines)")
    if references.in_prompt:
        why = f"model={cfg.model.family}'s text encoder reads the reference images: prompts are cached with them"
        if d.shuffle_tags:
            raise ConfigError(f"data.shuffle_tags=true: {why}, so tags cannot be shuffled in the step; set it false")
        if cfg.text_encoder.train != "none":
            raise ConfigError(f"text_encoder.train={cfg.text_encoder.train}: {why}; use text_encoder.train=none")
        if cfg.embedding.tokens:
            raise ConfigError(f"embedding.tokens: {why}, so new tokens cannot train in the step; leave them out")


def _check_prepare(cfg) -> None:
    """The inputs exist and the data settings fit together."""
    d = cfg.data
    _check_pairs(cfg)
    if "subject" not in cfg.stages and not d.pairs:  # the subject stage writes the instance images
        if not d.instance_dir and not any(x.role == "instance" for x in d.sources):
            raise ConfigError("data.instance_dir is not set: pass data.instance_dir=/path/to/your/images")
        if d.instance_dir and not Path(d.instance_dir).expanduser().exists():
            raise ConfigError(f"data.instance_dir={d.instance_dir}: no such folder")
    if d.val_dir and not Path(d.val_dir).expanduser().is_dir():
        raise ConfigError(f"data.val_dir={d.val_dir}: no such folder (held-out images for the validation loss)")
    check_apart(d)  # none of them trained on
    for k, x in enumerate(d.sources):
        if not Path(x.path).expanduser().exists():
            raise ConfigError(f"data.sources[{k}].path={x.path}: no such folder or file")
        if x.repeats < 1:
            raise ConfigError(f"data.sources[{k}].repeats={x.repeats}: at least 1")
    if len(d.background) != 3 or not all(0 <= v <= 255 for v in d.background):
        raise ConfigError(f"data.background={list(d.background)}: three values 0..255, e.g. [255,255,255]")
    if d.buckets and (d.bucket_step % 8 or d.bucket_step > d.resolution or not 0 < d.min_ratio <= 1 <= d.max_ratio):
        raise ConfigError(
            f"data.bucket_step={d.bucket_step}: a multiple of 8 up to data.resolution={d.resolution}, "
            "with data.min_ratio <= 1 <= data.max_ratio"
        )
    if problem := check_video(d.video):
        raise ConfigError(problem)
    if d.buckets and d.crop == "none":
        raise ConfigError("data.crop=none squashes to a square: with data.buckets=true choose center or random")


@stage(writes=("data", "report.json"), check=_check_prepare)
def prepare(run: Run) -> None:
    """Validate and standardize the instance images into an Arrow dataset with a report.

    The images are ``data.instance_dir`` (with the instance ``data.sources``), or the subject stage's.
    """
    subject = run.results.get(Subject)
    folder = str(subject.folder) if subject else run.cfg.data.instance_dir
    _prepare(run, "instance", folder, run.cfg.data.instance_prompt)
    if run.cfg.data.val_dir:  # held-out images for the validation loss, prepared as the instance images are
        _prepare(run, "val", run.cfg.data.val_dir, run.cfg.data.instance_prompt)
    # the run folder's report.json: every instance input with its status (the class data's is in data/class/)
    if run.is_main:
        write_atomic(run.dir / "report.json", (run.dir / "data" / "instance" / "report.json").read_text())
    run.outputs["dataset"] = str(run.dir / "data" / "instance")
    run.outputs["report"] = str(run.dir / "report.json")


@stage(after=("base",), writes=("class_images", "data"))
def class_images(run: Run) -> None:
    """DreamBooth prior: generate class images from the base until the class folder holds enough.

    With ``data.class_dir`` every image in it counts as a class image and missing ones are added to it.
    Without, generated images go to ``class_images/<key>`` in the run folder, the key naming the prompt,
    base model and sampling settings, so a changed prompt never reuses another prompt's images.
    """
    from PIL import Image

    d, s, prior = run.cfg.data, run.cfg.sample, run.cfg.prior
    if not prior.enabled:
        if not d.class_prompt:
            print(
                "[tuner] class_images: prior preservation is off, there is no data.class_prompt "
                '(set data.class_prompt="a photo of a dog" to keep what the class looks like)',
                flush=True,
            )
        return
    if d.class_dir:
        folder = Path(d.class_dir).expanduser()
    else:
        what = [d.class_prompt, str(run.base), d.resolution, s.steps, s.guidance_scale, prior.seed]
        folder = run.dir / "class_images" / hashlib.sha256(json.dumps(what).encode()).hexdigest()[:10]

    def missing_seeds() -> list[int]:
        folder.mkdir(parents=True, exist_ok=True)
        have = len([p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")])
        # the next seeds whose files are not there yet: never overwrite, always make progress
        free = (seed for seed in itertools.count(prior.seed) if not (folder / f"class_{seed:05d}.png").exists())
        return list(itertools.islice(free, max(0, prior.num_class_images - have)))

    # several processes: each generates its share of the seeds (files named by seed, so none collide)
    a = run.accelerator
    seeds = decide(a, missing_seeds)[a.process_index :: a.num_processes]
    bar = tqdm(total=len(seeds), desc="class images", disable=not seeds or not run.is_main)
    for start in range(0, len(seeds), prior.sample_batch_size):  # each batch is saved as soon as it exists
        chunk = seeds[start : start + prior.sample_batch_size]
        images = run.sample([d.class_prompt] * len(chunk), chunk, s.steps, s.guidance_scale)
        for seed, array in zip(chunk, to_uint8(images)):
            write_atomic(folder / f"class_{seed:05d}.png", Image.fromarray(array.numpy()))
        bar.update(len(chunk))
    bar.close()
    run.wait()
    _prepare(run, "class", str(folder), d.class_prompt)
    run.outputs["class_images"] = str(folder)
