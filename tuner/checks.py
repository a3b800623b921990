"""Every check of a composed configuration, before anything loads: numbers by key (a rule table), closed
vocabularies, the choices that do not fit together, the model family's options, export formats, generate's
prompt file, resume, and the run folder (``run_folder.check_output_dir``).

A check raises ``ConfigError`` naming the key, the value and the fix; ``validate`` runs them all. It sits
above the stages (it asks them what they write) and below the command line.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from omegaconf import DictConfig

from tuner.config import ADAPTER_TYPES, LR_SCHEDULERS, OPTIMIZERS, SOURCE_KINDS, TARGET_PRESETS
from tuner.data.digits import TRANSFORMS
from tuner.errors import ConfigError
from tuner.export.formats import DTYPES, FORMATS, check_held
from tuner.generate import SCHEDULERS, make_jobs
from tuner.models import get_family
from tuner.models.tiny import SIZES
from tuner.numbers import check_numbers
from tuner.run_folder import check_output_dir
from tuner.stages import STAGES, entries


def _validate_logging(cfg: DictConfig) -> None:
    v = cfg.validation
    if v.every < 0 or not v.seeds or (v.steps is not None and v.steps < 1):
        raise ConfigError("validation.every must be 0 (never) or more, validation.seeds not empty, steps >= 1")
    if cfg.log.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("log.wandb=true needs the wandb package: pip install wandb (or log.wandb=false)")
    if cfg.log.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("log.tensorboard=true needs the tensorboard package: pip install tensorboard")


# seeds go to torch.Generator.manual_seed (which takes 0 .. 2**64 - 1) and numpy's default_rng (no negatives)
def validate(cfg: DictConfig) -> None:
    """Check what the schema cannot, before anything heavy loads.

    Raises:
        ConfigError: naming the key and the fix.
    """
    check_numbers(cfg)
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"stages: unknown stage(s) {unknown}; known: {', '.join(STAGES)}")
    d, t = cfg.data, cfg.train
    needs_model = any(s not in ("subject", "prepare") for s in cfg.stages)
    if needs_model and not cfg.model.path and cfg.model.builtin != "digits":
        raise ConfigError(
            "model.path is not set: pass model.path=/path/to/a/diffusers/pipeline/folder "
            "(or model=digits for the embedded base)"
        )
    if d.crop not in ("center", "random", "none"):
        raise ConfigError(f"data.crop={d.crop}: choose center, random or none")
    if t.lr_scheduler not in LR_SCHEDULERS:
        raise ConfigError(f"train.lr_scheduler={t.lr_scheduler}: choose one of {', '.join(LR_SCHEDULERS)}")
    if t.log_every < 1 or cfg.sample.batch_size < 1:
        raise ConfigError("train.log_every and sample.batch_size must be at least 1")
    _validate_logging(cfg)
    if cfg.model.prediction_type not in (None, "epsilon", "v_prediction"):
        raise ConfigError(f"model.prediction_type={cfg.model.prediction_type}: choose epsilon or v_prediction")
    if cfg.adapter.rank < 1 or cfg.adapter.init not in ("gaussian", "default"):
        # peft's pissa/olora inits rewrite the base weights, which an adapter file cannot carry
        raise ConfigError("adapter.rank must be at least 1 and adapter.init gaussian or default")
    if len(d.background) != 3 or not all(0 <= v <= 255 for v in d.background):
        raise ConfigError(f"data.background={list(d.background)}: three values 0..255, e.g. [255,255,255]")
    if t.optimizer not in OPTIMIZERS:
        raise ConfigError(f"train.optimizer={t.optimizer}: choose one of {', '.join(OPTIMIZERS)}")
    if t.loss not in ("l2", "l1", "huber"):
        raise ConfigError(f"train.loss={t.loss}: choose l2, l1 or huber")
    if t.gradient_accumulation_steps < 1:
        raise ConfigError(f"train.gradient_accumulation_steps={t.gradient_accumulation_steps}: at least 1")
    if t.mixed_precision not in ("no", "fp16", "bf16"):
        raise ConfigError(f"train.mixed_precision={t.mixed_precision}: choose no, fp16 or bf16")
    if t.vae_dtype not in ("float32", "float16", "bfloat16"):
        raise ConfigError(f"train.vae_dtype={t.vae_dtype}: choose float32, float16 or bfloat16")
    if t.timestep_bias not in ("none", "earlier", "later") or not 0 < t.timestep_bias_portion <= 1:
        raise ConfigError(
            f"train.timestep_bias={t.timestep_bias}: choose none, earlier or later, "
            "with train.timestep_bias_portion in (0, 1]"
        )
    if t.max_timestep is not None and not 0 <= t.min_timestep < t.max_timestep:
        raise ConfigError(f"train.min_timestep={t.min_timestep} must be below train.max_timestep={t.max_timestep}")
    a, te, emb = cfg.adapter, cfg.text_encoder, cfg.embedding
    if a.type not in ADAPTER_TYPES:
        raise ConfigError(f"adapter.type={a.type}: choose one of {', '.join(ADAPTER_TYPES)} (or adapter=NAME)")
    if a.targets not in TARGET_PRESETS:
        raise ConfigError(f"adapter.targets={a.targets}: choose one of {', '.join(TARGET_PRESETS)}")
    if a.type == "partial_unet" and not a.blocks:
        raise ConfigError(
            "adapter=partial_unet needs adapter.blocks, parameter-name patterns with their learning rates, "
            "e.g. 'adapter.blocks=[{pattern:up_blocks.*.attentions.*,lr:1e-4}]'"
        )
    if te.train not in ("none", "lora", "full") or not 0 < te.stop_at <= 1:
        raise ConfigError(
            f"text_encoder.train={te.train}: choose none, lora or full, with text_encoder.stop_at in (0, 1]"
        )
    if emb.init_words and len(emb.init_words) != len(emb.tokens):
        raise ConfigError("embedding.init_words needs one word per token in embedding.tokens (or leave it empty)")
    if te.train == "full" and a.type in ("lora", "loha", "lokr"):
        raise ConfigError(
            f"text_encoder.train=full with adapter={a.type}: a fully trained text encoder ships in a pipeline "
            "folder, a U-Net adapter as an adapter file; use text_encoder.train=lora, or adapter=full/partial_unet"
        )
    if te.train == "lora" and a.type in ("partial_unet", "full"):
        raise ConfigError(
            f"text_encoder.train=lora with adapter={a.type}: use text_encoder.train=full (both ship in the "
            "pipeline folder), or a U-Net adapter (adapter=lora)"
        )
    if te.stop_at < 1 and a.type == "none":
        raise ConfigError(
            "text_encoder.stop_at < 1 with adapter=none: nothing would train after the stop; set stop_at=1"
        )
    if t.lr_scheduler == "one_cycle" and t.warmup_steps >= t.max_steps:
        raise ConfigError("train.lr_scheduler=one_cycle: train.warmup_steps must be below train.max_steps")
    if emb.vectors < 1:
        raise ConfigError("embedding.vectors must be at least 1")
    if "train" in cfg.stages and a.type == "none" and te.train == "none" and not emb.tokens:
        raise ConfigError(
            "nothing to train: adapter=none, text_encoder.train=none and no embedding.tokens; "
            "choose an adapter (adapter=lora), text_encoder.train=lora or embedding.tokens=[<sks>]"
        )
    if "prepare" in cfg.stages and "subject" not in cfg.stages:
        if not d.instance_dir and not any(x.role == "instance" for x in d.sources):
            raise ConfigError("data.instance_dir is not set: pass data.instance_dir=/path/to/your/images")
        if d.instance_dir and not Path(d.instance_dir).expanduser().exists():
            raise ConfigError(f"data.instance_dir={d.instance_dir}: no such folder")
    for k, x in enumerate(d.sources):
        if not Path(x.path).expanduser().exists():
            raise ConfigError(f"data.sources[{k}].path={x.path}: no such folder or file")
        if x.kind not in SOURCE_KINDS or x.role not in ("instance", "class") or x.repeats < 1:
            raise ConfigError(
                f"data.sources[{k}]: kind one of {', '.join(SOURCE_KINDS)}, role instance or class, repeats >= 1"
            )
    if d.caption_missing not in ("default", "reject") or d.trigger_policy not in ("replace", "prefix"):
        raise ConfigError("data.caption_missing must be default or reject, data.trigger_policy replace or prefix")
    if d.buckets and (d.bucket_step % 8 or d.bucket_step > d.resolution or not 0 < d.min_ratio <= 1 <= d.max_ratio):
        raise ConfigError(
            f"data.bucket_step={d.bucket_step}: a multiple of 8 up to data.resolution={d.resolution}, "
            "with data.min_ratio <= 1 <= data.max_ratio"
        )
    if not 0 <= d.caption_dropout < 1 or d.keep_tags < 0:
        raise ConfigError(f"data.caption_dropout={d.caption_dropout}: a share in [0, 1); data.keep_tags >= 0")
    if d.buckets and d.crop == "none":
        raise ConfigError("data.crop=none squashes to a square: with data.buckets=true choose center or random")
    if "gallery" in cfg.stages and not (cfg.sample.prompts or d.instance_prompt or d.class_prompt):
        raise ConfigError('gallery: no prompt to sample; set sample.prompts=["a photo of ..."]')
    if "train" in cfg.stages:
        if cfg.prior.enabled and not d.instance_prompt:
            raise ConfigError('data.instance_prompt is not set: pass data.instance_prompt="a photo of sks dog"')
        if cfg.prior.enabled and not d.class_prompt:
            raise ConfigError(
                'prior.enabled=true needs data.class_prompt (e.g. data.class_prompt="a photo of a dog"), '
                "or set prior.enabled=false"
            )
        if t.max_steps < 1 or t.batch_size < 1:
            raise ConfigError("train.max_steps and train.batch_size must be at least 1")
    if not cfg.model.path and cfg.model.builtin == "digits":
        if cfg.base.size not in SIZES:
            raise ConfigError(f"base.size={cfg.base.size}: choose one of {', '.join(SIZES)}")
    if "subject" in cfg.stages:
        if cfg.subject.transform not in TRANSFORMS:
            raise ConfigError(f"subject.transform={cfg.subject.transform}: choose one of {', '.join(TRANSFORMS)}")
        if not 0 <= cfg.subject.digit <= 9 or not 1 <= cfg.subject.count <= 50:
            raise ConfigError("subject.digit must be 0..9 and subject.count 1..50")
    if "load_adapter" in cfg.stages:
        if not cfg.checkpoint or not Path(cfg.checkpoint).expanduser().exists():
            raise ConfigError(
                f"checkpoint={cfg.checkpoint}: pass a run folder, an export folder (diffusers/, kohya/, peft/) "
                "or an adapter file, e.g. checkpoint=runs/lora-20260101-120000"
            )
    if t.nonfinite not in ("stop", "skip"):
        raise ConfigError(f"train.nonfinite={t.nonfinite}: choose stop or skip")
    if cfg.resume is not None:
        _validate_resume(cfg)
    if os.environ.get("RANK", "0") == "0":  # several processes: rank 0's check, before it writes the folder
        check_output_dir(cfg, entries(cfg))
    if "export" in cfg.stages:
        _validate_export(cfg)
    if "generate" in cfg.stages:
        _validate_generate(cfg)
    _validate_family(cfg)


WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "sigma_sqrt", "cosmap")


def _validate_family(cfg: DictConfig) -> None:
    """The model family exists, its path is one of its folders (or a single file with a config folder),
    and what the run asks for is something this family does."""
    m, t = cfg.model, cfg.train
    family = get_family(m.family, m)
    if m.path and Path(m.path).expanduser().is_file():
        if not str(m.path).endswith(".safetensors"):
            raise ConfigError(
                f"model.path={m.path}: tuner reads single-file checkpoints only as .safetensors (a .ckpt is a "
                "pickle, which tuner never loads); convert it, or give a diffusers folder"
            )
        if not m.config:
            raise ConfigError(
                f"model.path={m.path} is a single-file checkpoint: set model.config=FOLDER, a local diffusers "
                f"folder of the same family ({family.PIPELINE}) whose configs and tokenizers describe it "
                "(its weights are not read; nothing is fetched from a hub)"
            )
        family.check_config_folder(m.config)
    elif m.path:
        family.check_folder(m.path, m.allow_pickle)
    if m.weighting_scheme not in WEIGHTING_SCHEMES:
        raise ConfigError(f"model.weighting_scheme={m.weighting_scheme}: choose one of {', '.join(WEIGHTING_SCHEMES)}")
    flow = family.TRAINING_SCHEDULER == "FlowMatchEulerDiscreteScheduler"
    if flow and (t.snr_gamma or t.timestep_bias != "none" or t.min_timestep or t.max_timestep is not None):
        raise ConfigError(
            f"model={m.family} trains by flow matching: train.snr_gamma, timestep_bias, min_timestep and "
            "max_timestep are for DDPM schedules; use model.weighting_scheme (logit_normal, mode, sigma_sqrt, cosmap)"
        )
    if not flow and (m.weighting_scheme != "none" or m.timestep_shift is not None):
        raise ConfigError(
            f"model.weighting_scheme / model.timestep_shift are for flow-matching families (flux, sd3), not {m.family}"
        )
    if m.zero_terminal_snr and m.family != "sd2":
        raise ConfigError("model.zero_terminal_snr is an sd2 (v-prediction) option")
    if cfg.embedding.tokens and len(family.TEXT_ENCODERS) > 1:
        raise ConfigError(
            f"embedding.tokens: textual inversion is implemented for one-text-encoder families (sd15, sd2), "
            f"not {m.family}; train a LoRA with a rare trigger word instead"
        )
    if "export" in cfg.stages:
        refused = [x for x in cfg.export.formats if x not in family.EXPORTS]
        if refused:
            raise ConfigError(
                f"export.formats={list(cfg.export.formats)}: model={m.family} exports {', '.join(family.EXPORTS)}; "
                f"remove {', '.join(refused)}"
            )
    if cfg.data.resolution % family.RESOLUTION_MULTIPLE:
        raise ConfigError(
            f"data.resolution={cfg.data.resolution}: model={m.family} needs a multiple of {family.RESOLUTION_MULTIPLE}"
        )


def trained_parts(cfg: DictConfig) -> set[str]:
    """What a training run adds to its base, in the terms of tuner/export/formats.py's HOLDS."""
    a, te = cfg.adapter, cfg.text_encoder
    parts = set()
    if a.type in ("lora", "loha", "lokr") or te.train == "lora":
        parts.add("dora" if a.use_dora and a.type == "lora" else a.type if a.type in ("loha", "lokr") else "lora")
    if a.type in ("partial_unet", "full") or te.train == "full":
        parts.add("base_weights")
    if cfg.embedding.tokens:
        parts.add("tokens")
    return parts


def _validate_export(cfg: DictConfig) -> None:
    e = cfg.export
    unknown = [x for x in e.formats if x not in FORMATS]
    if unknown or not e.formats:
        raise ConfigError(f"export.formats={list(e.formats)}: choose from {', '.join(FORMATS)}")
    if e.dtype not in DTYPES or e.single_file_dtype not in DTYPES or e.variant not in (None, "fp16", "bf16"):
        raise ConfigError(
            "export.dtype and export.single_file_dtype: float32, float16 or bfloat16; "
            "export.variant: fp16, bf16 or null"
        )
    if "train" in cfg.stages:
        check_held(trained_parts(cfg), e.formats)
    if e.name is not None and not re.fullmatch(r"[\w.+-]+", e.name):
        raise ConfigError(f"export.name={e.name}: letters, digits, '.', '_', '+' and '-' only (it names files)")


def _validate_generate(cfg: DictConfig) -> None:
    g = cfg.generate
    if not g.prompts and not g.prompt_file:
        raise ConfigError(
            'generate: no prompt; pass generate.prompts=["a photo of sks dog"] or generate.prompt_file=FILE'
        )
    if g.scheduler not in SCHEDULERS:
        raise ConfigError(f"generate.scheduler={g.scheduler}: choose one of {', '.join(SCHEDULERS)}")
    if g.images_per_prompt < 1 or g.batch_size < 1 or g.steps < 1:
        raise ConfigError("generate.images_per_prompt, generate.batch_size and generate.steps must be at least 1")
    for key in ("width", "height"):
        if g[key] is not None and (g[key] < 8 or g[key] % 8):
            raise ConfigError(f"generate.{key}={g[key]}: a positive multiple of 8 (or null for data.resolution)")
    if g.post.upscale < 1 or g.post.sharpen < 0:
        raise ConfigError("generate.post.upscale must be at least 1 and generate.post.sharpen at least 0")
    if g.post.color_correct and not g.init_image:
        raise ConfigError("generate.post.color_correct matches colours to generate.init_image: set one, or turn it off")
    for k, a in enumerate(g.adapters):
        if not Path(a.path).expanduser().exists():
            raise ConfigError(f"generate.adapters[{k}].path={a.path}: no such file or folder")
    for key in ("prompt_file", "init_image"):
        if g[key] and not Path(g[key]).expanduser().is_file():
            raise ConfigError(f"generate.{key}={g[key]}: no such file")
    make_jobs(g, cfg.data.resolution)  # every prompt line checked before anything loads


def _validate_resume(cfg: DictConfig) -> None:
    """resume=auto needs the run folder (output_dir); resume=PATH must be a complete checkpoint, and names it."""
    if "train" not in cfg.stages:
        raise ConfigError(f"resume={cfg.resume}: recipe {cfg.recipe} does not train")
    if cfg.resume == "auto":
        if not cfg.output_dir:
            raise ConfigError("resume=auto continues the run in output_dir: pass output_dir=RUN_FOLDER too")
        return
    path = Path(cfg.resume).expanduser()
    if not (path / "state.pt").is_file() or not (path / "trained.safetensors").is_file():
        raise ConfigError(f"resume={cfg.resume}: not a checkpoint folder (RUN/checkpoints/step-N with state.pt)")
    if not cfg.output_dir:  # the checkpoint's own run folder
        cfg.output_dir = str(path.resolve().parent.parent)
