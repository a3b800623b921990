"""A run: one folder, the stages of one recipe, in order.

A recipe (``recipes/NAME.yaml``) lists its ``stages``; each is a function below that reads the
config, does one job and records what it wrote in ``run.outputs`` and ``run.metrics``. Read them
top to bottom to follow ``python -m tuner recipe=quickstart`` from the base model to the gallery:

    base -> subject -> prepare -> class_images -> train -> export -> gallery -> evaluate
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import time
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from tuner.config import ConfigError
from tuner.data import digits
from tuner.data.prepare import PrepareSettings, load_prepared, prepare_folder
from tuner.files import atomic_dir, write_atomic
from tuner.models import get_family
from tuner.sampling import generate

STAGES = {}


def stage(fn):
    STAGES[fn.__name__] = fn
    return fn


class Run:
    """The state one recipe's stages share: config, run folder, accelerator, loaded model."""

    def __init__(self, cfg: DictConfig):
        from accelerate import Accelerator

        self.cfg = cfg
        self.family = get_family(cfg.model.family)
        self.accelerator = Accelerator(
            mixed_precision=cfg.train.mixed_precision,
            gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        )
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.dir = Path(cfg.output_dir or Path("runs") / f"{cfg.recipe}-{stamp}").expanduser().resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        self.outputs: dict[str, str] = {}
        self.metrics: dict[str, object] = {}

    @property
    def home(self) -> Path:
        return Path(self.cfg.home or os.environ.get("TUNER_HOME") or "~/.cache/tuner").expanduser()

    @cached_property
    def model_path(self) -> Path:
        """The base model folder: ``model.path``, or the embedded digits base (built on first use)."""
        if self.cfg.model.path:
            return self.family.check_folder(self.cfg.model.path)
        if self.cfg.model.builtin == "digits":
            return ensure_digits_base(self)
        raise ConfigError("model.path is not set: pass model.path=/path/to/a/diffusers/pipeline/folder")

    @cached_property
    def components(self):
        c = self.family.load(self.model_path, self.cfg.model.prediction_type)
        for module in (c.unet, c.vae, c.text_encoder):
            module.to(self.accelerator.device)
        return c

    @cached_property
    def pipe(self):
        return self.family.pipeline(self.components)

    def sample(self, prompts: list[str], seeds: list[int], steps: int, guidance: float, desc=None):
        resolution, batch = self.cfg.data.resolution, self.cfg.sample.batch_size
        return generate(self.pipe, prompts, seeds, resolution, steps, guidance, batch, desc=desc)


def run_recipe(cfg: DictConfig) -> Run:
    """Run every stage of ``cfg.stages`` in order and print the summary."""
    run = Run(cfg)
    start = time.time()
    for name in cfg.stages:
        t = time.time()
        print(f"[tuner] stage {name}", flush=True)
        STAGES[name](run)
        run.metrics.setdefault("seconds", {})[name] = round(time.time() - t, 1)
    run.metrics["seconds"]["total"] = round(time.time() - start, 1)
    write_atomic(run.dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))  # with what stages filled in
    summary = {"recipe": cfg.recipe, "run_dir": str(run.dir), "outputs": run.outputs, "metrics": run.metrics}
    write_atomic(run.dir / "summary.json", json.dumps(summary, indent=2))
    print(format_summary(summary), flush=True)
    return run


def format_summary(summary: dict) -> str:
    lines = [f"\n== tuner {summary['recipe']}: done in {summary['metrics']['seconds']['total']} s =="]
    lines.append(f"run folder   {summary['run_dir']}")
    lines += [f"{name:<12} {path}" for name, path in summary["outputs"].items()]
    for name, value in summary["metrics"].items():
        if name != "seconds":
            lines.append(f"{name:<12} {json.dumps(value)}")
    return "\n".join(lines)


# ---------------------------------------------------------------- the embedded base


def digits_base_folder(run: Run) -> Path:
    """Where the base built with these ``base`` settings is cached: a new setting, a new build."""
    from tuner.models.tiny import SIZES

    settings = json.dumps(OmegaConf.to_container(run.cfg.base, resolve=True), sort_keys=True)
    architecture = repr(SIZES.get(run.cfg.base.size))
    key = hashlib.sha256(f"digits-v1|{settings}|{architecture}".encode()).hexdigest()[:12]
    return run.home / "bases" / f"digits-{key}"


def ensure_digits_base(run: Run) -> Path:
    from tuner.training import digits_base

    folder = digits_base_folder(run)
    if (folder / "model_index.json").is_file():
        print(f"[tuner] digits base: cached at {folder}", flush=True)
        return folder
    print(f"[tuner] digits base: training it once, into {folder}", flush=True)
    start = time.time()
    with atomic_dir(folder) as tmp:
        stats = digits_base.build(run.cfg.base, tmp, run.accelerator)
        run.accelerator.free_memory()  # drop the base's optimizer and EMA before anything else trains
        stats["build_seconds"] = round(time.time() - start, 1)
        write_atomic(tmp / "tuner_base.json", json.dumps(stats, indent=2))
    run.metrics["base_build"] = stats
    return folder


@stage
def base(run: Run) -> None:
    """Build or reuse the base model (the embedded digits base when model.path is null)."""
    run.outputs["base"] = str(run.model_path)


@stage
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


@stage
def subject(run: Run) -> None:
    """Quickstart: write the synthetic subject as PNG files, the way a user's photos would arrive."""
    s = run.cfg.subject
    folder = run.dir / "instance_images"
    with atomic_dir(folder) as tmp:  # a rerun with other subject settings leaves no stale images
        digits.write_subject_images(tmp, s.digit, s.transform, s.count, s.seed, s.image_size)
    run.cfg.data.instance_dir = str(folder)
    run.outputs["instance"] = str(folder)


def _prepare(run: Run, source: str, role: str, default_caption: str) -> None:
    d = run.cfg.data
    settings = PrepareSettings(
        resolution=d.resolution,
        crop=d.crop,
        default_caption=default_caption,
        min_side=d.min_side,
        background=tuple(d.background),
        max_pixels=d.max_pixels,
        seed=run.cfg.seed,
    )
    report = prepare_folder(source, run.dir / "data" / role, settings, desc=f"prepare {role}")
    print(f"[tuner] {report.summary()}", flush=True)
    for reason, files in report.rejected.items():
        print(f"[tuner]   rejected ({reason}): {', '.join(files[:5])}{' ...' if len(files) > 5 else ''}")
    if not report.kept:
        raise ConfigError(f"{source}: no usable {role} image (see {run.dir / 'data' / role / 'report.json'})")


@stage
def prepare(run: Run) -> None:
    """Validate and standardize the instance images into an Arrow dataset with a report."""
    _prepare(run, run.cfg.data.instance_dir, "instance", run.cfg.data.instance_prompt or "")
    run.outputs["dataset"] = str(run.dir / "data" / "instance")


@stage
def class_images(run: Run) -> None:
    """DreamBooth prior: generate class images from the base until the class folder holds enough.

    With ``data.class_dir`` every image in it counts as a class image and missing ones are added to it.
    Without, generated images go to ``class_images/<key>`` in the run folder, the key naming the prompt,
    base model and sampling settings, so a changed prompt never reuses another prompt's images.
    """
    from PIL import Image

    from tuner.sampling import to_uint8

    d, s = run.cfg.data, run.cfg.sample
    if not run.cfg.train.prior_preservation:
        return
    if d.class_dir:
        folder = Path(d.class_dir).expanduser()
    else:
        what = [d.class_prompt, str(run.model_path), d.resolution, s.steps, s.guidance_scale, d.class_seed]
        folder = run.dir / "class_images" / hashlib.sha256(json.dumps(what).encode()).hexdigest()[:10]
    folder.mkdir(parents=True, exist_ok=True)
    have = len([p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")])
    missing = d.num_class_images - have
    if missing > 0:
        # the next seeds whose files are not there yet: never overwrite, always make progress
        free = (seed for seed in itertools.count(d.class_seed) if not (folder / f"class_{seed:05d}.png").exists())
        seeds = list(itertools.islice(free, missing))
        prompts = [d.class_prompt] * missing
        images = run.sample(prompts, seeds, s.steps, s.guidance_scale, desc="class images")
        for seed, array in zip(seeds, to_uint8(images)):
            write_atomic(folder / f"class_{seed:05d}.png", Image.fromarray(array.numpy()))
    _prepare(run, str(folder), "class", d.class_prompt)
    run.outputs["class_images"] = str(folder)


# ---------------------------------------------------------------- training


def _pixels(dataset) -> torch.Tensor:
    """A prepared dataset's images as one float tensor (N, 3, H, W) in [-1, 1]."""
    images = [torch.from_numpy(np.asarray(img.convert("RGB"))).permute(2, 0, 1) for img in dataset["image"]]
    return torch.stack(images).float() / 127.5 - 1


@stage
def train(run: Run) -> None:
    """DreamBooth LoRA: peft LoRA on the frozen U-Net, instance plus prior batches, one accelerate loop."""
    from peft import LoraConfig

    from tuner.training.loop import LoopSettings, LossSettings, encode_latent_dist, train_denoiser

    cfg, c = run.cfg, run.components
    a, t = cfg.adapter, cfg.train
    torch.manual_seed(cfg.seed)
    c.unet.add_adapter(
        LoraConfig(
            r=a.rank,
            lora_alpha=a.alpha,
            lora_dropout=a.dropout,
            init_lora_weights=a.init,
            target_modules=list(a.target_modules),
        )
    )
    sets = [("instance", 1.0)] + ([("class", t.prior_loss_weight)] if t.prior_preservation else [])
    caches, prompt_index, weights = [], [], []
    caption_ids: dict[str, int] = {}  # each distinct caption is encoded once
    for role, weight in sets:
        if not (run.dir / "data" / role / "dataset").is_dir():
            raise ConfigError(f"train: no prepared {role} data in {run.dir / 'data'}; add the prepare stage first")
        dataset = load_prepared(run.dir / "data" / role)
        caches.append(encode_latent_dist(c.vae, _pixels(dataset), desc=f"encode {role}"))
        index = [caption_ids.setdefault(caption, len(caption_ids)) for caption in dataset["caption"]]
        prompt_index.append(torch.tensor(index))
        weights.append(weight / t.batch_size)
    embeddings = run.family.encode_prompts(c, list(caption_ids)).cpu()

    def next_batch(generator):
        latents, embeds, w = [], [], []
        for cache, index, weight in zip(caches, prompt_index, weights):
            pick = torch.randint(0, len(cache), (t.batch_size,), generator=generator)
            latents.append(cache.sample(pick, generator))
            embeds.append(embeddings[index[pick]])
            w.append(torch.full((t.batch_size,), weight))
        return torch.cat(latents), torch.cat(embeds), torch.cat(w)

    learning_rate = t.learning_rate
    if t.scale_lr:
        learning_rate *= t.batch_size * t.gradient_accumulation_steps * run.accelerator.num_processes
    settings = LoopSettings(
        steps=t.steps,
        learning_rate=learning_rate,
        lr_scheduler=t.lr_scheduler,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        log_every=t.log_every,
        optimizer=t.optimizer,
        loss=LossSettings(t.loss, t.huber_delta, t.snr_gamma, c.prediction_type, t.noise_offset),
        ema_decay=t.ema_decay,
    )
    result = train_denoiser(
        run.accelerator,
        c.unet,
        c.unet.parameters(),
        c.noise_scheduler,
        target_fn=lambda latents, noise, steps: run.family.noise_target(c, latents, noise, steps),
        next_batch=next_batch,
        settings=settings,
        seed=cfg.seed,
        desc="train LoRA",
    )
    run.metrics["train_loss"] = {"first": round(result.losses[0], 5), "last": round(result.losses[-1], 5)}
    if result.ema is not None:  # the gallery, evaluation and export use the averaged adapter
        result.ema.copy_to([p for p in c.unet.parameters() if p.requires_grad])


# ---------------------------------------------------------------- outputs


@stage
def export(run: Run) -> None:
    """Write the adapter as diffusers' ``pytorch_lora_weights.safetensors``, LoRA config in its metadata.

    Keys are diffusers' native ``unet.<module>.lora_A.weight`` / ``lora_B.weight``.
    """
    from peft.utils import get_peft_model_state_dict

    unet = run.accelerator.unwrap_model(run.components.unet)
    state = get_peft_model_state_dict(unet)
    config = unet.peft_config["default"].to_dict()
    config = json.loads(json.dumps(config, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
    if run.accelerator.is_main_process:
        with atomic_dir(run.dir / "adapter") as tmp:
            run.family.save_lora(tmp, state, config)
    run.outputs["adapter"] = str(run.dir / "adapter" / "pytorch_lora_weights.safetensors")


@stage
def load_adapter(run: Run) -> None:
    """Load an exported adapter (``checkpoint=PATH``, a folder or a .safetensors file) instead of training."""
    path = Path(run.cfg.checkpoint).expanduser()
    folder, name = (path.parent, path.name) if path.is_file() else (path, "pytorch_lora_weights.safetensors")
    run.pipe.load_lora_weights(folder, weight_name=name)
    run.outputs["adapter"] = str(folder / name)


def _with_and_without_adapter(run: Run, prompts, seeds, steps, guidance, desc):
    """Sample the same prompts and seeds from the base (adapter off) and the fine-tuned model."""
    unet = run.components.unet
    if not getattr(unet, "peft_config", None):
        raise ConfigError("gallery/evaluate need an adapter: put train or load_adapter (checkpoint=PATH) before them")
    unet.disable_adapters()
    base_images = run.sample(prompts, seeds, steps, guidance, desc=f"{desc} (base)")
    unet.enable_adapters()
    tuned_images = run.sample(prompts, seeds, steps, guidance, desc=f"{desc} (fine-tuned)")
    return base_images, tuned_images


@stage
def gallery(run: Run) -> None:
    """Base vs fine-tuned, for the instance prompt and the class prompt, at fixed seeds."""
    from tuner.export.gallery import write_gallery

    d, s = run.cfg.data, run.cfg.sample
    seeds = list(s.seeds)
    prompts = list(s.prompts) or [p for p in (d.instance_prompt, d.class_prompt) if p]
    rows = []
    for prompt in prompts:
        base_images, tuned_images = _with_and_without_adapter(
            run, [prompt] * len(seeds), seeds, s.steps, s.guidance_scale, "gallery"
        )
        rows += [(f"base: {prompt}", base_images), (f"fine-tuned: {prompt}", tuned_images)]
    run.outputs["gallery"] = str(write_gallery(run.dir / "gallery", rows, seeds, s.display_size))


def digit_in(prompt: str | None) -> int | None:
    """The digit a prompt names in words (``... digit seven`` -> 7), if any."""
    words = re.findall(r"[a-z]+", (prompt or "").lower())
    found = [digits.WORDS.index(w) for w in words if w in digits.WORDS]
    return found[-1] if found else None


@stage
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
    instance = _pixels(load_prepared(run.dir / "data" / "instance"))
    classifier = digits.DigitClassifier(d.resolution, extra_images=instance, extra_label=10)
    seeds = [e.seed + i for i in range(e.samples)]
    metrics = {}
    for name, prompt, label in (
        ("subject_fidelity", d.instance_prompt, 10),
        ("class_preservation", d.class_prompt, digit_in(d.class_prompt)),
    ):
        if prompt is None or label is None:
            continue
        base_images, tuned_images = _with_and_without_adapter(
            run, [prompt] * e.samples, seeds, e.steps, e.guidance_scale, name
        )
        metrics[name] = float(np.mean(classifier.predict(tuned_images) == label))
        metrics[f"{name}_base"] = float(np.mean(classifier.predict(base_images) == label))
    run.metrics.update(metrics)
    write_atomic(run.dir / "metrics.json", json.dumps(metrics, indent=2))
    run.outputs["metrics"] = str(run.dir / "metrics.json")
