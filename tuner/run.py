"""A run: one folder, the stages of one recipe, in order.

A recipe (``recipes/NAME.yaml``) lists its ``stages``; each is a function below that reads the
config, does one job and records what it wrote in ``run.outputs`` and ``run.metrics``. Read them
top to bottom, then tuner/outputs.py, to follow ``python -m tuner recipe=quickstart`` from the base
model to the gallery:

    base -> subject -> prepare -> class_images -> train    (here)
    export -> gallery -> evaluate                         (tuner/outputs.py)
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import time
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from tuner import run_folder, sampling
from tuner.data import digits
from tuner.data.prepare import PrepareSettings, Source, load_prepared
from tuner.data.prepare import prepare as prepare_sources
from tuner.errors import ConfigError
from tuner.files import atomic_dir, write_atomic
from tuner.models import get_family
from tuner.models.base import tree_map

STAGES = {}
MAIN_ONLY = set()  # stages rank 0 runs alone (several processes): sampling for people, and exports
WRITES: dict[str, tuple[str, ...]] = {}  # the entries of the run folder each stage writes (see run_folder.py)


def stage(fn=None, *, main_only: bool = False, writes: tuple[str, ...] = ()):
    def register(fn):
        STAGES[fn.__name__] = fn
        WRITES[fn.__name__] = tuple(writes)
        if main_only:
            MAIN_ONLY.add(fn.__name__)
        return fn

    return register(fn) if fn is not None else register


def entries(cfg: DictConfig) -> tuple[str, ...]:
    """Every entry of the run folder that the stages of ``cfg`` may write (the manifest lists them)."""
    return tuple(sorted({name for s in cfg.stages for name in WRITES.get(s, ())}))


class Run:
    """The state one recipe's stages share: config, run folder, accelerator, loaded model."""

    def __init__(self, cfg: DictConfig):
        from tuner import distributed

        self.cfg = cfg
        self.family = get_family(cfg.model.family, cfg.model)
        t = cfg.train
        self.accelerator = distributed.make_accelerator(t.mixed_precision, t.gradient_accumulation_steps)
        if self.accelerator.mixed_precision != "no" and not self.accelerator.native_amp:
            raise ConfigError(
                f"train.mixed_precision={cfg.train.mixed_precision}: accelerate cannot autocast to it on "
                f"{self.accelerator.device.type}; use bf16 (CPUs) or no"
            )
        # the run folder is rank 0's: a timestamp (or ${now:...} in output_dir) differs from rank to rank
        self.dir = Path(distributed.decide(self.accelerator, lambda: self._new_folder(cfg)))
        if self.dir != Path(cfg.output_dir or self.dir).expanduser().resolve():
            print(f"[tuner] output_dir resolved differently on this rank; using rank 0's {self.dir}", flush=True)
        cfg.output_dir = str(self.dir)
        distributed.check_visible(self.accelerator, self.dir / "config.yaml", "the run folder's config")
        self.outputs: dict[str, str] = {}
        self.metrics: dict[str, object] = {}
        # the train or load_adapter stage changed base weights or the vocabulary (not just peft adapters),
        # so "base" samples need a fresh copy of the base rather than adapters switched off
        self.base_weights_changed = False
        self.trainables = None  # set by the train stage: what trained
        self.new_tokens: list[str] = []  # tokens added to the vocabulary (trained or loaded), in order
        self.files: dict[str, dict] = {}  # set by the export stage: every file written, with its sha256
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    @staticmethod
    def _new_folder(cfg: DictConfig) -> str:
        """Rank 0 names and claims the run folder (see tuner/run_folder.py) and writes its config."""
        if cfg.output_dir:
            folder = Path(cfg.output_dir).expanduser().resolve()
        else:  # a new folder: never one that exists (two runs started in the same second)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            names = (f"{cfg.recipe}-{stamp}{f'-{k}' if k else ''}" for k in itertools.count())
            folder = next(f for f in (Path("runs").resolve() / n for n in names) if not f.exists())
        run_folder.claim(folder, cfg, entries(cfg))
        write_atomic(folder / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        return str(folder)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def wait(self) -> None:
        """Every rank waits here for the others (rank 0 has written what they read next)."""
        from tuner.distributed import barrier

        barrier(self.accelerator)

    @property
    def home(self) -> Path:
        return Path(self.cfg.home or os.environ.get("TUNER_HOME") or "~/.cache/tuner").expanduser()

    @cached_property
    def model_path(self) -> Path:
        """The base model folder: ``model.path`` (a single file converted once), or the embedded digits
        base (built on first use)."""
        if self.cfg.model.path and Path(self.cfg.model.path).expanduser().is_file():
            from tuner.distributed import decide

            return Path(decide(self.accelerator, lambda: str(single_file_base(self))))
        if self.cfg.model.path:
            return self.family.check_folder(self.cfg.model.path, self.cfg.model.allow_pickle)
        if self.cfg.model.builtin == "digits":
            return ensure_digits_base(self)
        raise ConfigError("model.path is not set: pass model.path=/path/to/a/diffusers/pipeline/folder")

    @cached_property
    def components(self):
        c = self.family.load(self.model_path, self.cfg.model.prediction_type, self.cfg.model.allow_pickle)
        for module in c.modules().values():
            module.to(self.accelerator.device)
        return c

    @cached_property
    def pipe(self):
        return self.family.pipeline(self.components)

    def sample_with(self, pipe, jobs, call: dict) -> torch.Tensor:
        """Images for ``generate`` jobs that share their settings (one pipeline call)."""
        first = jobs[0]
        prompts, seeds = [j.prompt for j in jobs], [j.seed for j in jobs]
        negative = [j.negative for j in jobs] if any(j.negative for j in jobs) else None
        return sampling.generate(
            pipe, prompts, seeds, first.height, first.steps, first.guidance, len(jobs), None,
            self.accelerator.autocast, negative_prompts=negative, width=first.width, decode=self.family.decode,
            **self.family.call_kwargs(), **call,
        )  # fmt: skip

    def sample(self, prompts: list[str], seeds: list[int], steps: int, guidance: float, desc=None, pipe=None):
        resolution, batch = self.cfg.data.resolution, self.cfg.sample.batch_size
        pipe = pipe or self.pipe
        return sampling.generate(
            pipe, prompts, seeds, resolution, steps, guidance, batch, desc, self.accelerator.autocast,
            decode=self.family.decode, **self.family.call_kwargs(),
        )  # fmt: skip


def run_recipe(cfg: DictConfig) -> Run:
    """Run every stage of ``cfg.stages`` in order and print the summary.

    With several processes every rank runs the stages that need them all (base, data, class images,
    training); rank 0 alone runs the others (export, gallery, evaluate, generate). Once no stage
    left needs them, the other ranks are done and exit.
    """
    from tuner import distributed

    run = Run(cfg)
    start = time.time()
    stages = list(cfg.stages)
    last_shared = max((i for i, name in enumerate(stages) if name not in MAIN_ONLY), default=-1)
    for i, name in enumerate(stages):
        if i > last_shared and run.accelerator.num_processes > 1:
            if not run.is_main:
                rest = ", ".join(stages[i:])
                print(f"[tuner] rank {run.accelerator.process_index}: done; rank 0 goes on with {rest}", flush=True)
                return run
            distributed.go_alone()  # what is left runs on rank 0 only: no collective may wait for the others
        t = time.time()
        if run.is_main:
            print(f"[tuner] stage {name}", flush=True)
        if name in MAIN_ONLY:
            if run.is_main:
                STAGES[name](run)
            if i < last_shared:  # a later stage on every rank may read what this one wrote
                run.wait()
        else:
            STAGES[name](run)
        run.metrics.setdefault("seconds", {})[name] = round(time.time() - t, 1)
    if not run.is_main:
        return run
    run.metrics["seconds"]["total"] = round(time.time() - start, 1)
    write_atomic(run.dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))  # with what stages filled in
    summary = {"recipe": cfg.recipe, "run_dir": str(run.dir), "outputs": run.outputs, "metrics": run.metrics}
    if run.accelerator.num_processes > 1:
        summary["processes"] = run.accelerator.num_processes
    if run.files:
        summary["files"] = run.files
    write_atomic(run.dir / "summary.json", json.dumps(summary, indent=2))
    run_folder.finish(run.dir)
    print(format_summary(summary), flush=True)
    return run


def format_summary(summary: dict) -> str:
    lines = [f"\n== tuner {summary['recipe']}: done in {summary['metrics']['seconds']['total']} s =="]
    lines.append(f"run folder   {summary['run_dir']}")
    lines += [f"{name:<12} {path}" for name, path in summary["outputs"].items()]
    for name, value in summary["metrics"].items():
        if name != "seconds":
            lines.append(f"{name:<12} {json.dumps(value)}")
    for path, entry in summary.get("files", {}).items():
        lines.append(f"{'file':<12} {path}  sha256 {entry['sha256'][:16]}  {entry['bytes']:,} bytes")
    return "\n".join(lines)


# ---------------------------------------------------------------- the base
def single_file_base(run: Run) -> Path:
    """``model.path`` is a single-file checkpoint: its diffusers folder, converted once by diffusers'
    own loader (with ``model.config``'s configs and tokenizers) and kept under $TUNER_HOME/single_file/,
    named by the file's path, size and modification time and by the config folder."""
    from tuner.files import atomic_dir

    m = run.cfg.model
    file = Path(m.path).expanduser().resolve()
    stat = file.stat()
    key = _key(str(file), str(stat.st_size), str(stat.st_mtime_ns), str(Path(m.config).expanduser().resolve()))
    folder = run.home / "single_file" / f"{file.stem}-{key}"
    if (folder / "model_index.json").is_file():
        print(f"[tuner] base: {file.name} as converted before, {folder}", flush=True)
        return folder
    from tuner.export.reading import check_header

    check_header(file, "a base model")
    print(f"[tuner] base: converting the single file {file} to a diffusers folder {folder}", flush=True)
    with atomic_dir(folder) as tmp:
        run.family.from_single_file(file, run.family.check_config_folder(m.config), tmp)
    return folder


def digits_base_folder(run: Run) -> Path:
    """Where the base built with these ``base`` settings is cached: a new setting, a new build."""
    from tuner.models.tiny import SIZES

    settings = json.dumps(OmegaConf.to_container(run.cfg.base, resolve=True), sort_keys=True)
    architecture = repr(SIZES.get(run.cfg.base.size))
    key = hashlib.sha256(f"digits-v1|{settings}|{architecture}".encode()).hexdigest()[:12]
    return run.home / "bases" / f"digits-{key}"


def ensure_digits_base(run: Run) -> Path:
    """The cached digits base, built first if missing: by every rank together, saved by rank 0."""
    from tuner import distributed
    from tuner.training import digits_base

    folder = digits_base_folder(run)
    if distributed.decide(run.accelerator, lambda: (folder / "model_index.json").is_file()):
        print(f"[tuner] digits base: cached at {folder}", flush=True)
        distributed.check_visible(run.accelerator, folder / "model_index.json", "the digits base")
        return folder
    print(f"[tuner] digits base: training it once, into {folder}", flush=True)
    start = time.time()
    if run.is_main:
        with atomic_dir(folder) as tmp:
            stats = digits_base.build(run.cfg.base, tmp, run.accelerator)
            stats["build_seconds"] = round(time.time() - start, 1)
            write_atomic(tmp / "tuner_base.json", json.dumps(stats, indent=2))
    else:  # the same training, its slice of every batch; rank 0 saves
        stats = digits_base.build(run.cfg.base, None, run.accelerator)
    run.accelerator.free_memory()  # drop the base's optimizer and EMA before anything else trains
    run.wait()
    distributed.check_visible(run.accelerator, folder / "model_index.json", "the digits base")
    run.metrics["base_build"] = stats
    return folder


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


# ---------------------------------------------------------------- data


@stage(writes=("instance_images",))
def subject(run: Run) -> None:
    """Quickstart: write the synthetic subject as PNG files, the way a user's photos would arrive."""
    s = run.cfg.subject
    folder = run.dir / "instance_images"
    if run.is_main:
        with atomic_dir(folder) as tmp:  # a rerun with other subject settings leaves no stale images
            digits.write_subject_images(tmp, s.digit, s.transform, s.count, s.seed, s.image_size)
    run.wait()
    run.cfg.data.instance_dir = str(folder)
    run.outputs["instance"] = str(folder)


def _prepare(run: Run, role: str, folder: str | None, default_caption: str | None) -> None:
    """Prepare one role's dataset (``data/<role>``) from its folder plus the ``data.sources`` of that role.

    Rank 0 prepares; the other ranks wait, then read the same dataset (a ConfigError reaches them all).
    """
    from tuner.distributed import decide

    decide(run.accelerator, lambda: _prepare_here(run, role, folder, default_caption))


def _prepare_here(run: Run, role: str, folder: str | None, default_caption: str | None) -> None:
    d = run.cfg.data
    sources = [Source(folder)] if folder else []
    for x in d.sources:
        if x.role == role:
            sources.append(Source(**{k: v for k, v in OmegaConf.to_container(x, resolve=True).items() if k != "role"}))
    known = {f.name for f in dataclasses.fields(PrepareSettings)}
    same_names = {k: v for k, v in OmegaConf.to_container(d, resolve=True).items() if k in known}
    if role == "class":  # class images keep their class prompt: no trigger word, never rejected for no caption
        same_names.update(trigger=None, caption_missing="default")
    settings = PrepareSettings(**same_names, default_caption=default_caption or "", seed=run.cfg.seed)
    out = run.dir / "data" / role
    report = prepare_sources(sources, out, settings, desc=f"prepare {role}")
    print(f"[tuner] {report.summary()}", flush=True)
    for reason, files in report.rejected.items():
        print(f"[tuner]   rejected ({reason}): {', '.join(files[:5])}{' ...' if len(files) > 5 else ''}")
    if not report.kept:
        raise ConfigError(f"{report.source}: no usable {role} image (see {out / 'report.json'})")


@stage(writes=("data", "report.json"))
def prepare(run: Run) -> None:
    """Validate and standardize the instance images into an Arrow dataset with a report."""
    _prepare(run, "instance", run.cfg.data.instance_dir, run.cfg.data.instance_prompt)
    # the run folder's report.json: every instance input with its status (the class data's is in data/class/)
    if run.is_main:
        write_atomic(run.dir / "report.json", (run.dir / "data" / "instance" / "report.json").read_text())
    run.outputs["dataset"] = str(run.dir / "data" / "instance")
    run.outputs["report"] = str(run.dir / "report.json")


@stage(writes=("class_images", "data"))
def class_images(run: Run) -> None:
    """DreamBooth prior: generate class images from the base until the class folder holds enough.

    With ``data.class_dir`` every image in it counts as a class image and missing ones are added to it.
    Without, generated images go to ``class_images/<key>`` in the run folder, the key naming the prompt,
    base model and sampling settings, so a changed prompt never reuses another prompt's images.
    """
    from PIL import Image

    from tuner.distributed import decide
    from tuner.sampling import to_uint8

    d, s, prior = run.cfg.data, run.cfg.sample, run.cfg.prior
    if not prior.enabled:
        return
    if d.class_dir:
        folder = Path(d.class_dir).expanduser()
    else:
        what = [d.class_prompt, str(run.model_path), d.resolution, s.steps, s.guidance_scale, prior.seed]
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


# ---------------------------------------------------------------- training


def _images(dataset) -> list[torch.Tensor]:
    """A prepared dataset's images as float tensors (3, H, W) in [-1, 1]; sizes differ with buckets."""
    return [
        torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1 for img in dataset["image"]
    ]


def _latent_masks(dataset, latents) -> list[torch.Tensor] | None:
    """Per-image loss masks (1, h, w) in [0, 1], area-averaged to each latent's grid; None when no image has one."""
    if all(m is None for m in dataset["mask"]):
        return None
    masks = []
    for i, mask in enumerate(dataset["mask"]):
        size = latents.shape(i)[-2:]
        if mask is None:
            masks.append(torch.ones(1, *size))
            continue
        pixels = torch.from_numpy(np.array(mask.convert("L"))).float()[None, None] / 255.0
        masks.append(torch.nn.functional.interpolate(pixels, size=size, mode="area")[0])
    return masks


def _resume_from(run: Run) -> Path | None:
    """The checkpoint ``resume=`` names: a folder, or with ``auto`` the newest complete one of this run."""
    from tuner.training import checkpoints

    if run.cfg.resume is None:
        return None
    if run.cfg.resume != "auto":
        return Path(run.cfg.resume).expanduser()
    return checkpoints.newest_intact(run.dir / "checkpoints")


def _key(*parts: str) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


MIXED_PRECISION_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _channels_last_pays(cfg, accelerator, trained) -> bool:
    """train.channels_last=null: on for float32 LoRA training on a CPU (faster there, see tools/bench.py)
    when no convolution weight trains; not under peft's DoRA, LoHa and LoKr, whose convolution code
    assumes the default layout."""
    a = cfg.adapter
    convs_train = any(p.dim() == 4 for p in trained)
    layout_safe = a.type == "lora" and not a.use_dora and not convs_train
    return layout_safe and accelerator.device.type == "cpu" and accelerator.mixed_precision == "no"


@stage(writes=("cache", "checkpoints", "logs", "validation"))
def train(run: Run) -> None:
    """Train what the config names (see tuner/training/trainables.py) on instance plus prior batches.

    Frozen work happens once, before the loop: images become latent distributions, captions become
    embeddings (or token ids, when the text encoder runs in the step because it or a new token trains).
    """
    from tuner.distributed import decide
    from tuner.training import trainables
    from tuner.training.batches import Captions, LatentCache, SampleSet, draw_batch, encode_latent_dist
    from tuner.training.cache import shared as shared_cache
    from tuner.training.checkpoints import Checkpointing
    from tuner.training.loop import LoopSettings, timestep_weights, train_denoiser
    from tuner.training.monitor import start as start_monitor
    from tuner.training.objectives import LossSettings

    cfg, c, accelerator = run.cfg, run.components, run.accelerator
    t = cfg.train
    torch.manual_seed(cfg.seed)
    what = trainables.setup(cfg, c, run.family)
    run.base_weights_changed = what.base_weights_train or bool(what.new_tokens)
    run.trainables = what
    run.new_tokens += list(cfg.embedding.tokens)
    if t.gradient_checkpointing:
        c.denoiser.enable_gradient_checkpointing()
        for te in c.text_encoders.values() if what.text_encoder_trains else ():  # transformers 5 renamed it
            enable = getattr(te, "activation_checkpointing_enable", None) or te.gradient_checkpointing_enable
            enable()
    if not what.base_weights_train:  # a pipeline export must hold the frozen modules at full precision
        trainables.cast_frozen(c, what, MIXED_PRECISION_DTYPES[accelerator.mixed_precision])
    if t.vae_dtype != "float32":
        c.vae.to(getattr(torch, t.vae_dtype))

    roles = [("instance", 1.0)] + ([("class", cfg.prior.loss_weight)] if cfg.prior.enabled else [])
    loaded = []
    caption_ids: dict[str, int] = {}  # each distinct caption is encoded once
    # frozen outputs are cached in the run folder, keyed by what they depend on (see tuner/training/cache.py)
    depends = [str(run.model_path), accelerator.mixed_precision, t.vae_dtype]
    for role, weight in roles:
        if not (run.dir / "data" / role / "dataset").is_dir():
            raise ConfigError(f"train: no prepared {role} data in {run.dir / 'data'}; add the prepare stage first")
        dataset = load_prepared(run.dir / "data" / role)
        data_key = (run.dir / "data" / role / "fingerprint").read_text()
        images, desc = _images(dataset), f"encode {role}" if run.is_main else None
        latents = LatentCache.from_items(
            shared_cache(
                run.dir / "cache" / f"latents-{role}-{_key(data_key, *depends)}",
                len(images),
                lambda ids: encode_latent_dist(c.vae, [images[i] for i in ids], desc=desc).items(),  # noqa: B023
                accelerator,
            ),
            c.vae.config.scaling_factor,
            c.vae.config.get("shift_factor") or 0.0,
        )
        captions = torch.tensor([caption_ids.setdefault(text, len(caption_ids)) for text in dataset["caption"]])
        per_image = (list(dataset["repeats"]), torch.tensor(dataset["weight"]), _latent_masks(dataset, latents))
        loaded.append((latents, captions, weight, *per_image, run.family.image_cond(dataset)))
    d = cfg.data
    texts = list(caption_ids) + [""]  # the empty caption last, for caption dropout
    in_step = what.text_encoder_trains or d.shuffle_tags  # the text encoder runs in every training step
    if in_step:
        rows = run.family.tokenize(c, texts)
    else:

        def encode_rows(ids):
            with accelerator.autocast():
                rows = tree_map(lambda x: x.cpu(), run.family.encode_prompts(c, [texts[i] for i in ids]))
            if isinstance(rows, torch.Tensor):
                return [{"embeds": row} for row in rows]
            return [{k: v[i] for k, v in rows.items()} for i in range(len(ids))]

        folder = run.dir / "cache" / f"prompts-{_key(*texts, *depends)}"
        items = shared_cache(folder, len(texts), encode_rows, accelerator)
        rows = {k: torch.stack([item[k] for item in items]) for k in items[0]}
        rows = rows["embeds"] if list(rows) == ["embeds"] else rows
    cond = Captions(
        texts, rows, d.caption_dropout, d.shuffle_tags, d.keep_tags, tokenize=lambda t: run.family.tokenize(c, t)
    )
    sets = [
        SampleSet(latents, cond, captions, weight, mask, repeats, image_weight, image_cond=image_cond)
        for latents, captions, weight, repeats, image_weight, mask, image_cond in loaded
    ]

    learning_rate = t.learning_rate
    if t.scale_lr:
        scale = t.batch_size * t.gradient_accumulation_steps * accelerator.num_processes
        learning_rate *= scale
        for group in what.groups:
            group["lr"] *= scale
    loss = LossSettings(
        kind=t.loss,
        huber_delta=t.huber_delta,
        snr_gamma=t.snr_gamma,
        noise_offset=t.noise_offset,
        input_perturbation=t.input_perturbation,
        min_timestep=t.min_timestep,
        max_timestep=t.max_timestep,
        timestep_weights=timestep_weights(
            c.noise_scheduler.config.num_train_timesteps,
            t.timestep_bias,
            t.timestep_bias_multiplier,
            t.timestep_bias_portion,
        ),
    )
    stop = cfg.text_encoder.stop_at
    checkpointing = Checkpointing(
        folder=run.dir / "checkpoints",
        every=cfg.checkpoints.every,
        keep=cfg.checkpoints.keep,
        resume=decide(accelerator, lambda: _resume_from(run)),
        data_state=lambda: [{"pending": s.sampler.pending, "epochs": s.sampler.epochs} for s in sets],
        set_data_state=lambda state: [s.sampler.__dict__.update(x) for s, x in zip(sets, state)],
        config=OmegaConf.to_yaml(cfg, resolve=True),
    )
    settings = LoopSettings(
        steps=t.max_steps,
        learning_rate=learning_rate,
        lr_scheduler=t.lr_scheduler,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        log_every=t.log_every,
        optimizer=t.optimizer,
        loss=loss,
        ema_decay=t.ema_decay,
        text_encoder_steps=round(stop * t.max_steps) if stop < 1 else None,
        nonfinite=t.nonfinite,
        profile=t.profile,
        channels_last=_channels_last_pays(cfg, accelerator, what.params)
        if t.channels_last is None
        else t.channels_last,
    )
    monitor = start_monitor(run, [c.denoiser, *c.text_encoders.values()], texts)
    try:
        result = train_denoiser(
            accelerator,
            c.denoiser,
            what.groups,
            run.family.objective(c),
            # train.batch_size is each process's: every rank draws the global batch and trains on its slice
            next_batch=lambda generator: draw_batch(sets, t.batch_size * accelerator.num_processes, generator),
            settings=settings,
            seed=cfg.seed,
            desc=f"train {', '.join(g['name'] for g in what.groups)}",
            text_encoders=c.text_encoders if in_step else None,
            encode=run.family.encode_ids,
            checkpointing=checkpointing,
            monitor=monitor,
        )
    finally:  # also when training stops: the logs so far are complete
        monitor.finish()
    if result.steps_run:
        run.metrics["step_seconds"] = round(result.step_seconds / result.steps_run, 4)
        run.metrics["samples_per_s"] = round(result.samples / result.step_seconds, 2)
    if result.phases:  # the share of the steps' time each phase took
        run.metrics["step_phases"] = {k: round(v / result.step_seconds, 3) for k, v in result.phases.items()}
    run.metrics["train_loss"] = {"first": round(result.losses[0], 5), "last": round(result.losses[-1], 5)}
    run.metrics["trained_parameters"] = sum(p.numel() for p in what.params)
    run.metrics["epochs"] = sets[0].sampler.epochs  # of the instance images (started, counting the last)
    if result.skipped:
        run.metrics["skipped_steps"] = result.skipped
        print(f"[tuner] train: skipped {result.skipped} micro-batches with a non-finite loss", flush=True)
    if result.ema is not None:  # the gallery, evaluation and export use the averaged weights
        result.ema.copy_to(what.params)
    if t.gradient_checkpointing:
        c.denoiser.disable_gradient_checkpointing()
    accelerator.free_memory()  # the optimizer state goes before the gallery loads anything


# the stages that use the trained model (export, load_adapter, gallery, evaluate, generate)
import tuner.outputs  # noqa: E402, F401  (registers them)
