"""Every export format, one ``Format`` object each: what it can hold, how it writes, who loads it, and the
model card's lines on how to load it. Adding a format is one entry in ``FORMATS`` (and its name in
``tuner.choices.ExportFormat``, and in the ``EXPORTS`` of the families that write it).

What a run adds to its base comes in up to three parts: an adapter (peft LoRA / DoRA / LoHa / LoKr
layers in the U-Net and text encoder), new token embeddings, and changed base weights (partial or full
fine-tuning). Each format holds some of them; the export stage writes those and says what it skipped:

    diffusers    diffusers/pytorch_lora_weights.safetensors (+ diffusers/embeddings/<token>.safetensors)
    kohya        kohya/<name>.safetensors, lora_unet_/lora_te_ keys with each module's alpha and ss_*/modelspec.*
                 metadata (+ kohya/embeddings/<token>.safetensors, emb_params for A1111 and ComfyUI)
    peft         peft/unet/ and peft/text_encoder/: adapter_config.json + adapter_model.safetensors
    merged       merged/: the adapter fused into the base, a diffusers pipeline folder in fp32 plus a variant
    single_file  single_file/<name>.safetensors: merged weights in the original layout A1111 and ComfyUI load

Every file and folder is written atomically. The tensors come from tuner/export/tensors.py.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from tuner.errors import ConfigError
from tuner.export.finite import finite_as
from tuner.export.metadata import tensor_hashes
from tuner.export.tensors import (
    Trained,
    kohya_network_metadata,
    kohya_state,
    peft_config_dict,
    peft_state,
    token_file_name,
    tuner_layers,
    write_safetensors,
)
from tuner.files import atomic_dir

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Export:
    """One export's inputs, the same for every format: what trained, where, and with what settings."""

    trained: Trained
    folder: Path  # RUN/<format>
    name: str  # of the single files (export.name or the run folder's name)
    family: object  # tuner.models.base.Family
    base: Path  # the base model's diffusers folder
    dtype: torch.dtype  # export.dtype, of adapter files
    single_file_dtype: torch.dtype
    variant: str | None  # export.variant: a reduced-precision copy beside the merged fp32 weights
    metadata: dict[str, str]  # ss_* and modelspec.* (tuner.export.metadata.training_metadata)
    merged: Callable[[], dict]  # the adapter fused into the base modules, made once on first use


@dataclass(frozen=True)
class Format:
    """An export format: its name (the run subfolder), the parts it can hold (lora, dora, loha, lokr, tokens,
    base_weights), its writer, who loads it, and the model card's usage lines for the files it wrote."""

    name: str
    holds: frozenset[str]
    write: Callable[[Export], None]
    loaded_by: str
    usage: Callable[[list[str], str, object, str], list[str]]  # (its files, base, family, prompt)


# transformers 5 names a CLIPTextModel's weights without the ``text_model.`` prefix (and saves them so when they
# did not come from a prefixed file: a single-file base, a base built from scratch); it and diffusers read both,
# but transformers 4.x (and the 5.x releases programs such as InvokeAI pin), diffusers with those, and ComfyUI
# read only the prefixed names, silently skipping or re-initialising the rest. tuner writes the prefix.
LEGACY_PREFIXES = {"CLIPTextModel": "text_model."}

# ---------------------------------------------------------------- diffusers


def _write_diffusers(x: Export) -> None:
    """``pytorch_lora_weights.safetensors`` through the pipeline's own ``save_lora_weights`` (LoRA configs
    in its metadata, so loaders apply the trained alpha), and ``embeddings/<token>.safetensors``."""
    c = x.trained.components
    with atomic_dir(x.folder) as tmp:
        if x.trained.adapter in ("lora", "dora"):
            layers = {}
            for component, module in c.trainable().items():
                if tuner_layers(module):
                    state, config = peft_state(module)
                    prefix = LEGACY_PREFIXES.get(type(module).__name__, "")  # as every diffusers version reads
                    state = {(k if k.startswith(prefix) else prefix + k): v.to(x.dtype) for k, v in state.items()}
                    layers[component] = (finite_as(state, "export.dtype", "diffusers"), peft_config_dict(config))
            x.family.save_lora(tmp, layers)
        for token, by_encoder in x.trained.tokens.items():
            path = tmp / "embeddings" / f"{token_file_name(token)}.safetensors"
            write_safetensors(path, embedding_tensors(x, by_encoder, one=token), {"token": token})


def _diffusers_usage(files: list[str], base: str, family, prompt: str) -> list[str]:
    pipeline = family.PIPELINE
    lines = ["```python", f"from diffusers import {pipeline}", "", f'pipe = {pipeline}.from_pretrained("{base}")']
    if "diffusers/pytorch_lora_weights.safetensors" in files:
        lines.append('pipe.load_lora_weights("diffusers", weight_name="pytorch_lora_weights.safetensors")')
    embeddings = _embedding_usage([n for n in files if n.startswith("diffusers/embeddings/")], family, prompt)
    if any("load_file" in line for line in embeddings):
        lines.insert(2, "from safetensors.torch import load_file")
    lines += embeddings
    note = []
    if "diffusers/pytorch_lora_weights.safetensors" in files:  # ComfyUI skips its attention and text-encoder keys
        note = [DIFFUSERS_ONLY, ""]
    return ["### diffusers", "", *note, *lines, f'image = pipe(prompt="{prompt}").images[0]', "```", ""]


def _embedding_usage(files: list[str], family, prompt: str) -> list[str]:
    """Loading each embedding file: whole (one encoder), or each encoder's vectors into it (the token is the
    trigger, ``prompt``, whose file name the file has)."""
    if not files:
        return []
    keys = family.EMBEDDINGS
    if len(keys) == 1:
        return [f'pipe.load_textual_inversion("{n}")' for n in files]
    tokens = {token_file_name(t): t for t in prompt.split(", ")}
    out = []
    for n in files:
        out.append(f'state = load_file("{n}")')
        token = tokens.get(Path(n).stem, Path(n).stem)
        for encoder, key in keys.items():  # text_encoder_2's tokenizer is tokenizer_2
            tokenizer = encoder.replace("text_encoder", "tokenizer")
            out.append(
                f'pipe.load_textual_inversion(state["{key}"], token="{token}", '
                f"text_encoder=pipe.{encoder}, tokenizer=pipe.{tokenizer})"
            )
    return out


DIFFUSERS_ONLY = (
    "`diffusers/pytorch_lora_weights.safetensors` is for diffusers: ComfyUI reads it only in part. For ComfyUI,\n"
    "A1111, Forge and InvokeAI use the `kohya` format's file (`export.formats=[...,kohya]`)."
)


# ---------------------------------------------------------------- kohya (A1111, Forge, ComfyUI)


def _write_kohya(x: Export) -> None:
    """``<name>.safetensors`` in kohya's keys with each module's ``alpha`` and ss_*/modelspec.* metadata, and
    ``embeddings/<token>.safetensors`` as ``{"emb_params": vectors}`` (A1111 and ComfyUI embeddings)."""
    family = x.family
    with atomic_dir(x.folder) as tmp:
        if x.trained.adapter in ("lora", "loha", "lokr"):
            state = finite_as(kohya_state(x.trained, family, x.dtype), "export.dtype", "kohya")
            meta = {**x.metadata, **kohya_network_metadata(x.trained.adapter, state)}
            meta.update(tensor_hashes(state, meta))
            write_safetensors(tmp / f"{x.name}.safetensors", state, meta)
        for token, by_encoder in x.trained.tokens.items():
            meta = {
                "modelspec.sai_model_spec": "1.0.0",
                "modelspec.architecture": f"{family.MODELSPEC_ARCHITECTURE}/textual-inversion",
                "modelspec.trigger_phrase": token_file_name(token),
                "token": token,
            }
            path = tmp / "embeddings" / f"{token_file_name(token)}.safetensors"
            write_safetensors(path, embedding_tensors(x, by_encoder, one="emb_params"), meta)


def embedding_tensors(x: Export, by_encoder: dict[str, torch.Tensor], one: str) -> dict[str, torch.Tensor]:
    """A token's embedding file: a one-encoder family's vectors under ``one``; a two-encoder family's under each
    encoder's key (SDXL's ``clip_l`` and ``clip_g``, Flux's ``clip_l`` and ``t5xxl``), as A1111 and ComfyUI read
    them and diffusers' ``load_textual_inversion`` takes them one encoder at a time."""
    keys = x.family.EMBEDDINGS
    if len(keys) == 1:
        return finite_as({one: by_encoder[next(iter(keys))].to(x.dtype)}, "export.dtype", "embedding")
    return finite_as({keys[e]: v.to(x.dtype) for e, v in by_encoder.items()}, "export.dtype", "embedding")


def _kohya_usage(files: list[str], base: str, family, prompt: str) -> list[str]:
    clients = family.KOHYA_READERS
    out = [f"### {clients}", ""]
    for n in (n for n in files if n.count("/") == 1):
        if "Forge" in clients:
            webui = "A1111, Forge" if "A1111" in clients else "Forge"
            out.append(f"Copy `{n}` into `models/Lora` and add `<lora:{Path(n).stem}:1>` to the prompt ({webui}), or")
        else:
            out.append(f"Copy `{n}` into ComfyUI's `models/loras` and")
        out.append(
            "load it with a LoraLoader node (ComfyUI)"
            + (", or add it to InvokeAI's models." if "Invoke" in clients else ".")
        )
    for n in (n for n in files if n.startswith("kohya/embeddings/")):
        stem = Path(n).stem
        if "A1111" in clients:
            out.append(f"Copy `{n}` into A1111's `embeddings/` and write `{stem}` in the prompt, or into")
        else:
            out.append(f"Copy `{n}` into")
        out.append(f"ComfyUI's `models/embeddings` and write `embedding:{stem}` in the prompt.")
    return [*out, ""]


# ---------------------------------------------------------------- peft


def _write_peft(x: Export) -> None:
    """``<component>/adapter_config.json`` + ``adapter_model.safetensors``, as PeftModel.save_pretrained writes."""
    with atomic_dir(x.folder) as tmp:
        for component, module in x.trained.components.trainable().items():
            if not tuner_layers(module):
                continue
            state, config = peft_state(module)
            config = copy.deepcopy(config)
            config.base_model_name_or_path = None  # never a path of this machine
            config.save_pretrained(tmp / component)
            state = finite_as(
                {f"base_model.model.{k}": v.to(x.dtype) for k, v in state.items()}, "export.dtype", "peft"
            )
            write_safetensors(tmp / component / "adapter_model.safetensors", state, {"format": "pt"})


def _peft_usage(files: list[str], base: str, family, prompt: str) -> list[str]:
    pipeline = family.PIPELINE
    components = sorted({n.split("/")[1] for n in files})
    lines = [f'pipe.{c} = PeftModel.from_pretrained(pipe.{c}, "peft/{c}")' for c in components]
    out = ["### PEFT", "", "```python", f"from diffusers import {pipeline}", "from peft import PeftModel", ""]
    return [*out, f'pipe = {pipeline}.from_pretrained("{base}")', *lines, "```", ""]


# ---------------------------------------------------------------- merged (a diffusers pipeline folder)


def _write_merged(x: Export) -> None:
    """A diffusers pipeline folder of the base's kind with the merged modules: fp32 plus a ``variant``."""
    merged, tokenizers = x.merged(), x.trained.components.tokenizers
    with atomic_dir(x.folder) as tmp:
        if x.variant:  # first, from copies: the configs both share (transformers records a dtype) end up fp32
            dtype = DTYPES[{"fp16": "float16", "bf16": "bfloat16"}[x.variant]]
            half = {name: copy.deepcopy(module).to(dtype) for name, module in merged.items()}
            params = {f"{name}.{n}": p.detach() for name, m in half.items() for n, p in m.named_parameters()}
            finite_as(params, "export.variant", "merged")
            x.family.pipeline_with(x.base, **tokenizers, **half).save_pretrained(
                tmp, safe_serialization=True, variant=x.variant
            )
            del half
        x.family.pipeline_with(x.base, **tokenizers, **merged).save_pretrained(tmp, safe_serialization=True)
        for config in tmp.rglob("*.json"):  # where the base was loaded from: a path of this machine
            data = json.loads(config.read_text())
            if isinstance(data, dict) and "_name_or_path" in data:
                data.pop("_name_or_path")
                config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        for config in tmp.glob("*/config.json"):
            legacy_text_encoder_keys(config.parent)


def legacy_text_encoder_keys(component: Path) -> None:
    """Give a saved transformers component's weight files the key prefix every transformers version reads."""
    architectures = json.loads((component / "config.json").read_text()).get("architectures") or []
    prefix = next((LEGACY_PREFIXES[a] for a in architectures if a in LEGACY_PREFIXES), None)
    if prefix is None:
        return
    for path in component.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            metadata, keys = f.metadata(), list(f.keys())
            if all(k.startswith(prefix) for k in keys):
                continue
            state = {k if k.startswith(prefix) else prefix + k: f.get_tensor(k) for k in keys}
        write_safetensors(path, state, metadata)


def _merged_usage(files: list[str], base: str, family, prompt: str) -> list[str]:
    load = f'pipe = {family.PIPELINE}.from_pretrained("merged")  # or variant="fp16", torch_dtype=torch.float16'
    return ["### Merged pipeline", "", "```python", load, "```", ""]


# ---------------------------------------------------------------- single_file (the original layout)


def _vocab_size(config: Path) -> int | None:
    """A text encoder's base vocabulary from its config (a vision-language model's under ``text_config``, as
    transformers 5 saves Qwen2.5-VL and Mistral 3); None where it names none (a family that ships no encoder)."""
    found = json.loads(config.read_text())
    return found.get("vocab_size") or found.get("text_config", {}).get("vocab_size")


def _write_single_file(x: Export) -> None:
    """``<name>.safetensors``: the merged weights in the original single-file layout A1111 and ComfyUI load.

    New tokens stay out (each text encoder's base vocabulary rows only): they ship as embeddings beside it.
    """
    vocab = {te: _vocab_size(x.base / te / "config.json") for te in x.trained.components.text_encoders}
    state = x.family.single_file_state(x.merged(), vocab)
    meta = {**x.metadata, "modelspec.architecture": x.family.MODELSPEC_ARCHITECTURE}
    with atomic_dir(x.folder) as tmp:
        state = finite_as(
            {k: v.to(x.single_file_dtype) for k, v in state.items()}, "export.single_file_dtype", "single_file"
        )
        write_safetensors(tmp / f"{x.name}.safetensors", state, meta)


def _single_file_usage(files: list[str], base: str, family, prompt: str) -> list[str]:
    """A family whose single file is the denoiser alone, as the original ships it (``SINGLE_FILE_TEXT`` false):
    loaded into its diffusers class; else the whole checkpoint."""
    out, pipeline = [], family.PIPELINE
    for n in (n for n in files if not family.SINGLE_FILE_TEXT):
        cls, sub = family.DENOISER_CLASS, family.DENOISER
        out += [
            "### Single-file transformer",
            "",
            f"`{n}` is the {sub} in the original layout: ComfyUI's `models/diffusion_models` (Load Diffusion Model),",
            "Forge's `models/Stable-diffusion`; the text encoders and VAE are the base's. In diffusers:",
            "",
            "```python",
            f'{sub} = {cls}.from_single_file("{n}", config="{base}", subfolder="{sub}", local_files_only=True)',
            f'pipe = {pipeline}.from_pretrained("{base}", {sub}={sub})',
            "```",
            "",
        ]
    for n in (n for n in files if family.SINGLE_FILE_TEXT):
        out += [
            "### Single-file checkpoint",
            "",
            f"`{n}` goes into A1111's `models/Stable-diffusion` or ComfyUI's `models/checkpoints`; in diffusers:",
            "",
            "```python",
            f'pipe = {pipeline}.from_single_file("{n}", config="{base}", local_files_only=True)',
            "```",
            "",
        ]
    return out


ADAPTERS = frozenset({"lora", "dora", "loha", "lokr"})
FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format(
            "diffusers",
            frozenset({"lora", "dora", "tokens"}),
            _write_diffusers,
            "diffusers' load_lora_weights and load_textual_inversion",
            _diffusers_usage,
        ),
        Format(
            "kohya",
            frozenset({"lora", "loha", "lokr", "tokens"}),
            _write_kohya,
            "A1111, Forge, ComfyUI (LoraLoader), InvokeAI, kohya-ss sd-scripts, LyCORIS",
            _kohya_usage,
        ),
        Format("peft", ADAPTERS, _write_peft, "peft's PeftModel.from_pretrained", _peft_usage),
        Format(
            "merged",
            ADAPTERS | {"tokens", "base_weights"},
            _write_merged,
            "diffusers' from_pretrained",
            _merged_usage,
        ),
        Format(
            "single_file",
            ADAPTERS | {"base_weights"},
            _write_single_file,
            "A1111, ComfyUI (checkpoint loader), diffusers' from_single_file",
            _single_file_usage,
        ),
    )
}


def holds(fmt: str, family) -> frozenset[str]:
    """What ``fmt`` can hold for ``family`` (its ``FORMAT_LIMITS`` taken out)."""
    return FORMATS[fmt].holds - family.FORMAT_LIMITS.get(fmt, set())


def default_formats(family, parts: set[str]) -> list[str]:
    """What unset ``export.formats`` writes: the family's own formats (``DEFAULT_EXPORTS``) that hold part of
    ``parts`` (what trained), plus the first of its formats that holds what those leave out (merged, for a
    partial or full fine-tune)."""
    chosen = [f for f in family.DEFAULT_EXPORTS if holds(f, family) & parts]
    left = parts - set().union(*(holds(f, family) for f in chosen))
    chosen += next(([f] for f in family.EXPORTS if left and left <= holds(f, family)), [])
    return chosen or list(family.DEFAULT_EXPORTS)  # nothing holds it: check_held says what would


def check_held(parts: set[str], chosen, family) -> None:
    """Refuse a choice of formats that leaves part of what trained unsaved, naming formats that would hold it."""
    missing = parts - set().union(*(holds(x, family) for x in chosen))
    if missing:
        fits = [name for name in family.EXPORTS if missing <= holds(name, family)]
        raise ConfigError(
            f"export.formats={list(chosen)} cannot hold {', '.join(sorted(missing))} (what this run trains); "
            f"add {' or '.join(fits)}, e.g. 'export.formats=[{','.join([*chosen, fits[0]])}]'"
        )


def usage(files: dict, base: str, family, prompt: str) -> str:
    """The model card's "How to use": each format's lines for the files it wrote, in ``FORMATS``' order."""
    out = []
    for name, f in FORMATS.items():
        mine = sorted(n for n in files if n.startswith(f"{name}/"))
        if mine:
            out += f.usage(mine, base, family, prompt)
    return "\n".join(out)
