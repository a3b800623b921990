"""The numbers of a config, checked by key before anything else: every interpolation resolves, no value
anywhere is NaN or infinite, and each key in ``NUMBER_RULES`` holds a value its rule accepts (learning
rates positive, shares in [0, 1), resolutions multiples of 8, seeds in range, ...). Each refusal names the
key, the value and the fix.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator

from omegaconf import DictConfig, OmegaConf

from tuner.config import SEED_MAX
from tuner.errors import ConfigError

SEED_FIX = f"a seed from 0 to {SEED_MAX}, e.g. 0"
LR_OR_NULL = "a positive finite learning rate, e.g. 1e-4, or null for train.learning_rate"


def _positive(v) -> bool:
    return v > 0


def _at_least(low: float) -> Callable[[float], bool]:
    return lambda v: v >= low


def _share(v) -> bool:
    return 0 <= v < 1


def _or_null(test: Callable) -> Callable:
    return lambda v: v is None or test(v)


def _multiple_of_8(v) -> bool:
    return v >= 8 and v % 8 == 0


def _seed(v) -> bool:
    return 0 <= v <= SEED_MAX


# the largest image side generate draws: 8192 px is 1024 latents a side at the VAE's factor 8, where one
# attention map of SD's first level alone would take terabytes
MAX_SIDE = 8192


def _side(v) -> bool:
    return 8 <= v <= MAX_SIDE and v % 8 == 0


# What the schema's types cannot say about a number: (keys, test, the fix the message gives). A key's
# [*] stands for every item of its list. Values are finite here (NaN and inf are refused first, by
# _check_finite, with the same fix), so a test need not repeat that.
NUMBER_RULES: tuple[tuple[tuple[str, ...], Callable, str], ...] = (
    (("model.resolution", "data.resolution"), _multiple_of_8, "a positive multiple of 8, e.g. 512"),
    (("model.guidance",), _at_least(0), "0 or more, the guidance Flux-dev is trained with, e.g. 1.0"),
    (("model.max_sequence_length",), _or_null(_positive), "a positive token count, or null for the pipeline's"),
    (("model.timestep_shift",), _or_null(_positive), "a positive shift, e.g. 3.0, or null for the scheduler's"),
    (("model.logit_std",), _at_least(0), "a standard deviation, 0 or more, e.g. 1.0"),
    (("model.logit_mean", "model.mode_scale"), math.isfinite, "a finite number"),
    (("data.bucket_step",), _positive, "a positive multiple of 8, e.g. 64"),
    (("data.near_duplicate_bits",), lambda v: 0 <= v <= 64, "bits of the 64-bit hash, 0..64 (0: exact duplicates)"),
    (("data.workers",), _at_least(0), "a process count, e.g. 4 (0 or 1: decode in this process)"),
    (("data.min_side",), _at_least(0), "a side in pixels, 0 or more, e.g. 8"),
    (("data.max_pixels",), _positive, "a positive pixel count, e.g. 178956970"),
    (("data.sources[*].weight",), _at_least(0), "a loss multiplier, 0 or more, e.g. 1.0"),
    (("data.sources[*].repeats",), _at_least(1), "at least 1, e.g. 2"),
    (("data.keep_tags",), _at_least(0), "0 or more tags kept first when tags shuffle"),
    (("subject.digit",), lambda v: 0 <= v <= 9, "a digit, 0..9"),
    (("subject.count",), lambda v: 1 <= v <= 50, "1..50 images"),
    (("subject.image_size",), _at_least(8), "a size in pixels, at least 8 (data.min_side), e.g. 64"),
    (("prior.num_class_images",), _at_least(0), "0 or more, e.g. 100 (0: only the images in data.class_dir)"),
    (("prior.loss_weight",), _at_least(0), "0 or more, e.g. 1.0"),
    (("prior.sample_batch_size",), _at_least(1), "at least 1, e.g. 16"),
    (("train.learning_rate",), _positive, "a positive finite number, e.g. 1e-4"),
    (("train.max_steps", "train.batch_size", "train.log_every"), _at_least(1), "at least 1"),
    (("train.gradient_accumulation_steps",), _at_least(1), "at least 1 (1: a step per batch)"),
    (("train.timestep_bias_portion",), lambda v: 0 < v <= 1, "a share of the timesteps in (0, 1], e.g. 0.25"),
    (("train.warmup_steps",), _at_least(0), "0 or more steps (0: no warmup)"),
    (("train.weight_decay",), _at_least(0), "0 or more, e.g. 1e-2 (0: none)"),
    # the training loop clips only when max_grad_norm > 0: 0 is its documented off
    (("train.max_grad_norm",), _at_least(0), "a positive norm to clip gradients to, e.g. 1.0, or 0 for no clipping"),
    (("train.huber_delta",), _positive, "a positive number, e.g. 0.1"),
    (("train.noise_offset",), _at_least(0), "0 (off) or a small positive number, e.g. 0.05"),
    (("train.input_perturbation",), _at_least(0), "0 (off) or a small positive number, e.g. 0.1"),
    (("train.min_timestep",), _at_least(0), "0 or more, below train.max_timestep"),
    (("train.timestep_bias_multiplier",), _positive, "a positive factor, e.g. 2.0"),
    (("train.snr_gamma",), _or_null(_positive), "a positive number, e.g. 5.0, or null for off"),
    (("train.ema_decay",), _or_null(lambda v: 0 < v < 1), "a value between 0 and 1, e.g. 0.999, or null"),
    (("adapter.rank", "embedding.vectors"), _at_least(1), "at least 1, e.g. 8"),
    (("adapter.alpha",), _positive, "a positive number, e.g. the rank (8)"),
    (("adapter.dropout",), _share, "a share in [0, 1), e.g. 0.1 (0: none)"),
    (
        ("adapter.blocks[*].lr", "text_encoder.learning_rate", "embedding.learning_rate"),
        _or_null(_positive),
        LR_OR_NULL,
    ),
    (("text_encoder.stop_at",), lambda v: 0 < v <= 1, "a share of train.max_steps in (0, 1], e.g. 1.0"),
    (("sample.steps", "eval.steps"), _at_least(1), "at least 1, e.g. 25"),
    (("eval.samples",), _at_least(1), "at least 1, e.g. 64"),
    (("validation.samples", "validation.loss_timesteps"), _at_least(1), "at least 1, e.g. 8"),
    (("data.val_split",), _share, "a share in [0, 1) of the images held out, e.g. 0.1 (0: none)"),
    (("sample.display_size",), _at_least(1), "a size in pixels, e.g. 64"),
    (("sample.batch_size",), _at_least(1), "at least 1, e.g. 8"),
    (("validation.every",), _at_least(0), "0 (never) or a step count, e.g. 100"),
    (
        ("merge.rank", "resize.rank", "extract.conv_rank"),
        _or_null(_at_least(1)),
        "a rank, at least 1, e.g. 16, or null",
    ),
    (("extract.rank",), _at_least(1), "a rank, at least 1, e.g. 32"),
    (("merge.inputs[*].weight",), math.isfinite, "a finite weight, e.g. 1.0 (negative subtracts)"),
    (("extract.energy", "resize.energy"), _or_null(lambda v: 0 < v <= 1), "a share in (0, 1], e.g. 0.9, or null"),
    (("extract.threshold",), _at_least(0), "a share of a weight's norm, 0 or more, e.g. 1e-3 (0: keep every change)"),
    (("validation.steps",), _or_null(_at_least(1)), "at least 1, or null for sample.steps"),
    (("generate.images_per_prompt", "generate.batch_size", "generate.steps"), _at_least(1), "at least 1"),
    (("generate.width", "generate.height"), _or_null(_side), f"a multiple of 8 from 8 to {MAX_SIDE}, or null"),
    (("generate.post.upscale",), _at_least(1), "a factor, at least 1 (1: none)"),
    (("generate.post.sharpen",), _at_least(0), "0 (none) or more"),
    (("generate.preview_every",), _at_least(0), "0 (no previews) or a step count, e.g. 5"),
    (("sample.guidance_scale", "eval.guidance_scale", "generate.guidance_scale"), math.isfinite, "a number, e.g. 7.5"),
    (("validation.guidance_scale",), _or_null(math.isfinite), "a number, e.g. 7.5, or null for sample.guidance_scale"),
    (("generate.adapters[*].weight",), math.isfinite, "a number, e.g. 1.0"),
    (("generate.strength",), lambda v: 0 < v <= 1, "a share in (0, 1], e.g. 0.75"),
    (
        ("generate.refiner_start", "sample.refiner_start"),
        lambda v: 0 < v < 1,
        "the share of the steps the base draws, in (0, 1), e.g. 0.8",
    ),
    (("base.vae_steps", "base.unet_steps", "base.vae_batch_size", "base.unet_batch_size"), _at_least(1), "at least 1"),
    (("base.vae_lr", "base.unet_lr"), _positive, "a positive finite number, e.g. 2e-3"),
    (("base.ema_decay",), lambda v: 0 < v < 1, "a value between 0 and 1, e.g. 0.995"),
    (("base.caption_dropout", "data.caption_dropout"), _share, "a share in [0, 1), e.g. 0.1"),
    (("checkpoints.every",), _at_least(0), "0 or more steps (0: only on a stop signal), e.g. 500"),
    (("checkpoints.keep",), _at_least(1), "at least 1 (the newest are kept), e.g. 2"),
    (("checkpoints.best",), _at_least(1), "at least 1 (the best by checkpoints.select are kept), e.g. 1"),
    (("train.early_stop.patience",), _at_least(0), "0 (never) or a count of validations, e.g. 3"),
    (("train.early_stop.min_delta",), _at_least(0), "0 or a positive improvement, e.g. 0.001"),
    (("train.early_stop.max_drift",), _or_null(math.isfinite), "a bound on drift, e.g. 0.2, or null"),
    (("cache.max_gb",), _or_null(_at_least(0)), "a size in GB, e.g. 200, or null to keep every entry"),
    (("seed", "base.seed", "subject.seed", "prior.seed", "eval.seed", "generate.seed"), _seed, SEED_FIX),
    (("sample.seeds[*]", "validation.seeds[*]"), _seed, SEED_FIX),
)


def _items(cfg: DictConfig, key: str) -> Iterator[tuple[str, object]]:
    """(dotted key, value) of ``key``, one per list item where it has a [*]."""
    head, star, rest = key.partition("[*]")
    if not star:
        yield key, OmegaConf.select(cfg, key)
        return
    for k in range(len(OmegaConf.select(cfg, head) or [])):
        yield from _items(cfg, f"{head}[{k}]{rest}")


def _as_written(cfg: DictConfig, key: str):
    """The value of a dotted key (``sample.prompts[0]``) with its ${...} unresolved."""
    value = OmegaConf.to_container(cfg, resolve=False)
    for part in re.findall(r"[^.\[\]]+", key):
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


def _resolve(cfg: DictConfig) -> dict:
    """The whole config with every ${...} resolved; one that does not resolve is refused by its key."""
    from omegaconf.errors import InterpolationKeyError, OmegaConfBaseException

    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        key = e.full_key or "config"
        raw = _as_written(cfg, e.full_key) if e.full_key else "?"
        why = str(e.msg).splitlines()[0].removeprefix("ValueError raised while resolving interpolation: ")
        if isinstance(e, InterpolationKeyError):
            why += "; to write a literal ${ in a value, escape it as \\${"
        raise ConfigError(f"{key}={raw}: {why}") from None


def _nonfinite(node, key: str = "") -> Iterator[tuple[str, float]]:
    """(dotted key, value) of every NaN or infinite float in a resolved config."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _nonfinite(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, list):
        for k, v in enumerate(node):
            yield from _nonfinite(v, f"{key}[{k}]")
    elif isinstance(node, float) and not math.isfinite(node):
        yield key, node


def _check_finite(resolved: dict) -> None:
    """No float anywhere is NaN or infinite: they would train to NaN, draw black images or switch things off."""
    fixes = {key: fix for keys, _, fix in NUMBER_RULES for key in keys}
    for key, value in _nonfinite(resolved):
        fix = fixes.get(re.sub(r"\[\d+\]", "[*]", key), "a finite number")
        raise ConfigError(f"{key}={value}: {fix} (not nan or inf)")


def check_numbers(cfg: DictConfig) -> None:
    """Every ${...} resolves, no float is NaN or infinite, and every number in NUMBER_RULES is in its range."""
    _check_finite(_resolve(cfg))
    for keys, test, fix in NUMBER_RULES:
        for key in keys:
            for name, value in _items(cfg, key):
                if not test(value):
                    raise ConfigError(f"{name}={value}: {fix}")
