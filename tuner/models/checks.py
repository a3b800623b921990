"""The model family's checks of a composed config, before anything loads: the path is one of the
family's folders (or a single file with a config folder), and what the run asks for is something this
family does (its training objective's options, textual inversion, export formats, resolution).
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

from omegaconf import DictConfig

from tuner.errors import ConfigError
from tuner.models import families, get_family


def check(cfg: DictConfig) -> None:
    """Raises ``ConfigError`` naming the key and the fix."""
    m, t = cfg.model, cfg.train
    family = get_family(m.family, m)
    if m.path:
        refuse_a_part("model.path", m.path, family)
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
        if "train" in cfg.stages:
            family.check_trainable(Path(m.path))
    flow = family.FLOW
    if flow and (t.snr_gamma or t.timestep_bias != "none" or t.min_timestep or t.max_timestep is not None):
        raise ConfigError(
            f"model={m.family} trains by flow matching: train.snr_gamma, timestep_bias, min_timestep and "
            "max_timestep are for DDPM schedules; use model.weighting_scheme (logit_normal, mode, sigma_sqrt, cosmap)"
        )
    if not flow and (m.weighting_scheme != "none" or m.timestep_shift is not None):
        raise ConfigError(
            "model.weighting_scheme / model.timestep_shift are for flow-matching families "
            f"({', '.join(f.NAME for f in families() if f.FLOW)}), not {m.family}"
        )
    if m.zero_terminal_snr and not family.ZERO_TERMINAL_SNR:
        having = ", ".join(f.NAME for f in families() if f.ZERO_TERMINAL_SNR)
        raise ConfigError(f"model.zero_terminal_snr is an option of v-prediction families ({having}), not {m.family}")
    if cfg.embedding.tokens and not family.EMBEDDINGS:
        raise ConfigError(
            f"embedding.tokens: no textual inversion for model={m.family} ({family.EMBEDDING_REFUSAL}); "
            "train a LoRA with a rare trigger word instead"
        )
    if "train" in cfg.stages and cfg.text_encoder.train != "none" and not family.LORA_TEXT_ENCODERS:
        raise ConfigError(
            f"text_encoder.train={cfg.text_encoder.train}: model={m.family} keeps its text encoders frozen (its "
            f"pipeline loads adapters into its {family.DENOISER} only); use text_encoder.train=none"
        )
    if "export" in cfg.stages and cfg.export.formats is not None:
        refused = [x for x in cfg.export.formats if x not in family.EXPORTS]
        if refused:
            raise ConfigError(
                f"export.formats={list(cfg.export.formats)}: model={m.family} exports {', '.join(family.EXPORTS)}; "
                f"remove {', '.join(refused)}"
            )
        only = set(cfg.export.formats) == {"single_file"}
        if only and not family.SINGLE_FILE_TEXT and "train" in cfg.stages and cfg.text_encoder.train != "none":
            raise ConfigError(
                f"export.formats=[single_file]: model={m.family}'s single file holds the {family.DENOISER} only, so "
                f"text_encoder.train={cfg.text_encoder.train} would be lost; add a format that holds it, e.g. "
                "'export.formats=[single_file,merged]'"
            )
    _check_quantize(cfg, family)
    if cfg.adapter.type == "partial_unet" and m.path and "train" in cfg.stages:
        _check_blocks(cfg, family)
    if cfg.data.resolution % family.RESOLUTION_MULTIPLE:
        raise ConfigError(
            f"data.resolution={cfg.data.resolution}: model={m.family} needs a multiple of {family.RESOLUTION_MULTIPLE}"
        )


def _check_quantize(cfg: DictConfig, family) -> None:
    """A quantized part must stay frozen under a LoRA peft can wrap around bitsandbytes' layers."""
    from tuner.models import quantize

    m, a = cfg.model, cfg.adapter
    if not (m.quantize or m.quantize_text_encoders):
        return
    missing = quantize.available()
    if missing:
        raise ConfigError(f"model.quantize / model.quantize_text_encoders: {missing}")
    if m.quantize and a.type in ("full", "partial_unet"):
        raise ConfigError(
            f"model.quantize={m.quantize} holds the {family.DENOISER}'s frozen weights quantized, and adapter={a.type} "
            "trains them: use adapter=lora (QLoRA), or model.quantize=null"
        )
    if m.quantize and a.type in ("loha", "lokr"):
        raise ConfigError(
            f"model.quantize={m.quantize}: peft's {a.type} layers cannot wrap bitsandbytes' quantized layers; "
            "use adapter=lora (DoRA too: adapter.use_dora=true), or model.quantize=null"
        )
    if m.quantize_text_encoders and cfg.text_encoder.train == "full":
        raise ConfigError(
            f"model.quantize_text_encoders={m.quantize_text_encoders} holds the text encoders' frozen weights "
            "quantized, and text_encoder.train=full trains them: use text_encoder.train=lora, or "
            "model.quantize_text_encoders=null"
        )


def _check_blocks(cfg: DictConfig, family) -> None:
    """Every ``adapter.blocks`` glob (or the family's default) matches a parameter of the base's denoiser,
    checked on its skeleton (built from its config on the meta device) before any weight loads."""
    folder = Path(cfg.model.path).expanduser()
    folder = Path(cfg.model.config).expanduser() if folder.is_file() else folder
    names = [name for name, _ in family.denoiser_skeleton(folder).named_parameters()]
    patterns = [b.pattern for b in family.partial_blocks(cfg.adapter)]
    missing = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if missing:
        tops = sorted({".".join(n.split(".")[:4]) for n in names if n.startswith(family.BLOCKS)})
        raise ConfigError(
            f"adapter.blocks: {', '.join(repr(p) for p in missing)} match no {family.DENOISER} parameter of "
            f"{folder}; names look like {', '.join(tops[:6])} ... (model={family.NAME}'s default: "
            f"{', '.join(family.PARTIAL_BLOCKS)})"
        )


# the top-level names of a diffusers denoiser's or VAE's own weights file (its diffusion_pytorch_model.safetensors)
_UNET = {"conv_in", "conv_norm_out", "conv_out", "down_blocks", "mid_block", "up_blocks", "time_embedding",
         "add_embedding", "class_embedding", "encoder_hid_proj"}  # fmt: skip
_TRANSFORMER = {"transformer_blocks", "single_transformer_blocks", "x_embedder", "context_embedder", "time_text_embed",
                "norm_out", "proj_out", "pos_embed", "time_embed"}  # fmt: skip
_VAE = {"encoder", "decoder", "quant_conv", "post_quant_conv"}
_ADAPTER_KEYS = ("lora_", ".lora.", "_lora.", "hada_", "lokr_")


def what_part(path: str | Path, family) -> str | None:
    """What ``path`` is when it is a part of a model or an adapter rather than a whole model (a LoRA, an embedding,
    one component's folder or weights), read from names and safetensors headers only; None when it may be whole."""
    path = Path(path).expanduser()
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return None
        if (path / "summary.json").is_file() and (path / "config.yaml").is_file():
            return "a tuner run folder (its base is the model.path of its config.yaml)"
        if (path / "adapter_config.json").is_file() or any(path.glob("*/adapter_config.json")):
            return "a peft adapter folder (adapter_config.json)"
        if (path / "pytorch_lora_weights.safetensors").is_file():
            return "a LoRA folder (pytorch_lora_weights.safetensors)"
        try:
            name = json.loads((path / "config.json").read_text()).get("_class_name")
        except (OSError, ValueError, AttributeError):
            return None
        if not name:
            return None
        whole = " that holds it" + (f", {path.parent}" if (path.parent / "model_index.json").is_file() else "")
        return f"a diffusers {name} folder, one component of a pipeline (give the pipeline folder{whole})"
    if not path.is_file() or path.suffix != ".safetensors":
        return None
    try:
        from safetensors import safe_open

        with safe_open(path, "pt") as handle:
            shapes = {k: handle.get_slice(k).get_shape() for k in handle.keys()}
    except Exception:  # a damaged file: the header checks name what is wrong
        return None
    tops = {k.split(".")[0] for k in shapes}
    if any(a in k for k in shapes for a in _ADAPTER_KEYS):
        return "a LoRA (adapter) file"
    if shapes and len(shapes) <= 8 and all(len(s) <= 2 for s in shapes.values()):
        return "a textual-inversion embedding"
    if tops and tops <= _UNET and "down_blocks" in tops:
        return "a diffusers U-Net's weights alone (a pipeline's unet/diffusion_pytorch_model.safetensors)"
    if tops and tops <= _TRANSFORMER and "transformer_blocks" in tops:
        return "a diffusers transformer's weights alone (a pipeline's transformer/ weights)"
    if tops and tops <= _VAE and "decoder" in tops:
        return "a VAE's weights alone"
    if family.SINGLE_FILE_TEXT and shapes and all(k.startswith("model.diffusion_model.") for k in shapes):
        return "the U-Net's weights alone (model.diffusion_model.*: no VAE, no text encoder)"
    return None


def refuse_a_part(key: str, path: str | Path, family) -> None:
    """Refuse, naming ``key``, a path that is a part of a model or an adapter (``what_part``) where a whole model
    goes: a diffusers pipeline folder or a single-file checkpoint.

    Raises:
        ConfigError: ``KEY=PATH is WHAT; KEY takes ...``.
    """
    what = what_part(path, family)
    if what is None:
        return
    whole = "the whole fine-tuned model" if key == "extract.tuned" else "a whole base model"
    hint = ""
    if any(word in what for word in ("adapter", "LoRA", "embedding", "run folder")):
        hint = (
            "; a LoRA needs no extracting (recipe=lora_resize changes its rank)" if key == "extract.tuned" else
            "; an adapter goes in checkpoint= (recipe=evaluate, inspect), generate.adapters or merge.inputs"
        )  # fmt: skip
    raise ConfigError(
        f"{key}={path} is {what}; {key} takes {whole}: a diffusers {family.PIPELINE} folder (with model_index.json) "
        f"or a single-file .safetensors checkpoint{' (with model.config)' if key == 'model.path' else ''}{hint}"
    )
