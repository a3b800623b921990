"""Every export format, written from the live modules of a run (trained, or loaded with ``checkpoint=``).

What a run adds to its base comes in up to three parts: an adapter (peft LoRA / DoRA / LoHa / LoKr
layers in the U-Net and text encoder), new token embeddings, and changed base weights (partial or full
fine-tuning). Each format holds some parts (``HOLDS``); it writes those and says what it skipped:

    diffusers    diffusers/pytorch_lora_weights.safetensors (+ diffusers/embeddings/<token>.safetensors)
    kohya        kohya/<name>.safetensors, lora_unet_/lora_te_ keys with each module's alpha and ss_*/modelspec.*
                 metadata (+ kohya/embeddings/<token>.safetensors, emb_params for A1111 and ComfyUI)
    peft         peft/unet/ and peft/text_encoder/: adapter_config.json + adapter_model.safetensors
    merged       merged/: the adapter fused into the base, a diffusers pipeline folder in fp32 plus a variant
    single_file  single_file/<name>.safetensors: merged weights in the original layout A1111 and ComfyUI load

Every file and folder is written atomically.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tuner.choices import ExportFormat
from tuner.errors import ConfigError
from tuner.files import atomic_dir, atomic_path

FORMATS = tuple(ExportFormat)  # diffusers, kohya, peft, merged, single_file
HOLDS = {
    "diffusers": {"lora", "dora", "tokens"},
    "kohya": {"lora", "loha", "lokr", "tokens"},
    "peft": {"lora", "dora", "loha", "lokr"},
    "merged": {"lora", "dora", "loha", "lokr", "tokens", "base_weights"},
    "single_file": {"lora", "dora", "loha", "lokr", "base_weights"},
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Trained:
    """What sits on top of the base in the live modules: the parts each format may hold."""

    components: object  # the family's Components (unet, vae, text_encoder, tokenizer, ...)
    adapter: str | None = None  # lora | dora | loha | lokr, on the U-Net and/or the text encoder
    tokens: dict[str, torch.Tensor] = field(default_factory=dict)  # token -> (vectors, width), in order
    base_weights: bool = False  # base weights themselves changed (partial / full fine-tuning)

    @property
    def parts(self) -> set[str]:
        return {p for p in (self.adapter, "tokens" if self.tokens else None) if p} | (
            {"base_weights"} if self.base_weights else set()
        )


def check_finite(trained: Trained) -> None:
    """Refuse to export NaN or infinite weights (a diverged run), naming the first such tensor.

    Raises:
        ConfigError: naming the module and tensor; nothing has been written.
    """
    named = {f"token {token}": vectors for token, vectors in trained.tokens.items()}
    for component, module in trained.components.trainable().items():
        if trained.base_weights:
            named.update({f"{component}.{n}": p for n, p in module.named_parameters()})
        for name, layer in tuner_layers(module).items():
            named.update({f"{component}.{name}.{n}": p for n, p in layer.named_parameters() if "base_layer" not in n})
    for name, tensor in named.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ConfigError(
                f"export: {name} holds NaN or infinite values, so nothing was exported; the training diverged "
                "(lower train.learning_rate, or keep train.nonfinite=stop to stop at the first such step)"
            )


def check_held(parts: set[str], chosen) -> None:
    """Refuse a choice of formats that leaves part of what trained unsaved, naming formats that would hold it."""
    missing = parts - set().union(*(HOLDS[x] for x in chosen))
    if missing:
        fits = [x for x in FORMATS if missing <= HOLDS[x]]
        raise ConfigError(
            f"export.formats={list(chosen)} cannot hold {', '.join(sorted(missing))} (what this run trains); "
            f"add {' or '.join(fits)}, e.g. 'export.formats=[{','.join([*chosen, fits[0]])}]'"
        )


def tuner_layers(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The peft layers (LoRA, LoHa, LoKr, ...) injected into ``module``, by module name."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: m for name, m in module.named_modules() if isinstance(m, BaseTunerLayer)}


def adapter_kind(c) -> str | None:
    """lora, dora, loha or lokr: the peft adapter in the U-Net / text encoder (one kind per run)."""
    from peft.tuners.loha import LoHaLayer
    from peft.tuners.lokr import LoKrLayer
    from peft.tuners.lora import LoraLayer

    kinds = set()
    for module in c.trainable().values():
        for layer in tuner_layers(module).values():
            if isinstance(layer, LoraLayer):
                kinds.add("dora" if any(layer.use_dora.get(a) for a in layer.active_adapters) else "lora")
            elif isinstance(layer, LoHaLayer):
                kinds.add("loha")
            elif isinstance(layer, LoKrLayer):
                kinds.add("lokr")
            else:
                kinds.add(type(layer).__name__)
    if len(kinds) > 1:
        kinds.discard("lora")  # a DoRA adapter on one component, LoRA on the other: DoRA rules
    if len(kinds) > 1:
        raise ValueError(f"export: one adapter kind per run, found {sorted(kinds)}")
    return kinds.pop() if kinds else None


def _active(layer) -> str:
    names = list(layer.active_adapters)
    if len(names) != 1:
        raise ValueError(f"export: one active adapter per module, found {names}; export each adapter on its own")
    return names[0]


# ---------------------------------------------------------------- adapters


def kohya_tensors(layer) -> dict[str, torch.Tensor]:
    """One peft layer's tensors under the key suffixes kohya-format loaders (A1111, ComfyUI, diffusers) read.

    - LoRA: ``lora_down.weight``, ``lora_up.weight`` and ``alpha`` such that scale = alpha / rank, which is
      what kohya's ``.alpha`` means (for rsLoRA, scale alpha / sqrt(rank), that is scale * rank);
    - LoHa / LoKr: LyCORIS' names, which peft shares (``hada_w1_a``, ``lokr_w1``, ...), with ``alpha`` the
      same way. A LoKr layer with neither factor decomposed has no rank a loader could divide by, so
      loaders apply it at scale 1: its scale is folded into ``lokr_w2`` and no ``alpha`` is written.
    """
    from peft.tuners.lokr import LoKrLayer
    from peft.tuners.lora import LoraLayer

    adapter = _active(layer)
    scale = float(layer.scaling[adapter])
    if isinstance(layer, LoraLayer):
        rank = layer.r[adapter]
        return {
            "lora_down.weight": layer.lora_A[adapter].weight.detach(),
            "lora_up.weight": layer.lora_B[adapter].weight.detach(),
            "alpha": torch.tensor(scale * rank),
        }
    tensors = {}
    for param in layer.adapter_layer_names:
        store = getattr(layer, param)
        if adapter in store:
            tensors[param] = store[adapter].detach()
    if isinstance(layer, LoKrLayer) and "lokr_w1_b" not in tensors and "lokr_w2_b" not in tensors:
        tensors["lokr_w2"] = tensors["lokr_w2"] * scale
    else:
        tensors["alpha"] = torch.tensor(scale * layer.r[adapter])
    return tensors


def peft_state(module: torch.nn.Module) -> tuple[dict[str, torch.Tensor], object]:
    """The active adapter's tensors and config, as ``get_peft_model_state_dict`` gives them."""
    from peft.utils import get_peft_model_state_dict

    adapter = _active(next(iter(tuner_layers(module).values())))
    config = module.peft_config[adapter]
    return get_peft_model_state_dict(module, adapter_name=adapter), config


def peft_config_dict(config) -> dict:
    """A peft config as plain JSON values, without where the base was loaded from (a path of this machine)."""
    config = json.loads(json.dumps(config.to_dict(), default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
    config["base_model_name_or_path"] = None
    return config


# ---------------------------------------------------------------- merged weights


def merged_state(module: torch.nn.Module, base: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``module``'s state dict in fp32 with every peft layer fused into its base weight.

    Each peft layer is merged on a copy of itself, by peft's own ``merge`` (so DoRA, LoHa and LoKr
    merge as peft computes them), on top of ``base`` (the fp32 base weights, when the live module
    holds them in a lower precision); the live module is left as it was.
    """
    base = base or {}

    def full(key: str, value: torch.Tensor) -> torch.Tensor:  # a frozen weight stored in low precision
        return base[key].float() if value.dtype != torch.float32 and key in base else value.float()

    layers = tuner_layers(module)
    state = {}
    for key, value in module.state_dict().items():
        if not any(key.startswith(n + ".") for n in layers):
            state[key] = full(key, value)
    for name, layer in layers.items():
        if layer.merged:
            raise ValueError(f"export: {name} has its adapter merged already; unmerge it first")
        merged = copy.deepcopy(layer)
        target = merged.get_base_layer()
        for key, value in target.state_dict().items():
            getattr(target, key).data = full(f"{name}.{key}", value).clone()
        merged.float().merge(safe_merge=True, adapter_names=[_active(layer)])
        for key, value in target.state_dict().items():
            state[f"{name}.{key}"] = value.detach()
    return state


def _fresh(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A new module of ``module``'s class and config holding ``state`` (built on the meta device: no copy)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        config = module.config
        fresh = type(module).from_config(config) if hasattr(type(module), "from_config") else type(module)(config)
    fresh.load_state_dict(state, strict=True, assign=True)
    return fresh.eval()


def merged_components(trained: Trained, base_state) -> dict[str, torch.nn.Module]:
    """The denoiser, text encoders and VAE with everything trained fused in, fp32, by component name.

    Args:
        base_state: ``component -> fp32 state dict`` of the base, used where the live module holds
            frozen weights in a lower precision; empty when the live weights are fp32.
    """
    c = trained.components
    out = {}
    for name, module in c.modules().items():
        base = base_state.get(name)
        state = merged_state(module, base)
        if name == "text_encoder" and trained.tokens:  # the new rows live only in the live embedding
            key = next(k for k in state if k.endswith("token_embedding.weight"))
            state[key] = module.get_input_embeddings().weight.detach().float()
        out[name] = _fresh(module, state)
    return out


# ---------------------------------------------------------------- kohya naming and metadata


def kohya_name(prefix: str, module_name: str) -> str:
    return f"{prefix}_{module_name.replace('.', '_')}"


def kohya_state(trained: Trained, prefixes: dict[str, str], module_name, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The adapter as a kohya / LyCORIS state dict, ``<prefix>_<module>.<suffix>`` (see ``kohya_tensors``).

    Args:
        prefixes: ``component -> kohya prefix`` (``unet -> lora_unet``); module_name(component, name) gives
            the module's name as the format spells it (the family knows).
    """
    state = {}
    for component, module in trained.components.trainable().items():
        layers = tuner_layers(module)
        if layers and component not in prefixes:
            raise ValueError(f"export kohya: no kohya prefix for {component}")
        for name, layer in layers.items():
            prefix = prefixes[component]
            key = kohya_name(prefix, module_name(component, name))
            state.update({f"{key}.{suffix}": v.to(dtype) for suffix, v in kohya_tensors(layer).items()})
    return {k: v.contiguous().cpu() for k, v in state.items()}


def token_file_name(token: str) -> str:
    """A file name A1111 and ComfyUI users can type as the trigger (``<sks>`` -> ``sks``)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "", token) or "embedding"


def write_safetensors(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata=metadata)
    return path


# ---------------------------------------------------------------- the writers, one per format


def write_diffusers(trained: Trained, folder: Path, family, dtype: torch.dtype) -> None:
    """``pytorch_lora_weights.safetensors`` through the pipeline's own ``save_lora_weights`` (LoRA configs
    in its metadata, so loaders apply the trained alpha), and ``embeddings/<token>.safetensors``."""
    c = trained.components
    with atomic_dir(folder) as tmp:
        if trained.adapter in ("lora", "dora"):
            layers = {}
            for component, module in c.trainable().items():
                if tuner_layers(module):
                    state, config = peft_state(module)
                    layers[component] = ({k: v.to(dtype) for k, v in state.items()}, peft_config_dict(config))
            family.save_lora(tmp, layers)
        for token, vectors in trained.tokens.items():
            path = tmp / "embeddings" / f"{token_file_name(token)}.safetensors"
            write_safetensors(path, {token: vectors.to(dtype)}, {"token": token})


def write_kohya(trained: Trained, folder: Path, name: str, family, dtype: torch.dtype, metadata: dict) -> None:
    """``<name>.safetensors`` in kohya's keys with each module's ``alpha`` and ss_*/modelspec.* metadata, and
    ``embeddings/<token>.safetensors`` as ``{"emb_params": vectors}`` (A1111 and ComfyUI embeddings)."""
    from tuner.export.metadata import tensor_hashes

    with atomic_dir(folder) as tmp:
        if trained.adapter in ("lora", "loha", "lokr"):
            state = kohya_state(trained, family.KOHYA_PREFIXES, family.kohya_module_name, dtype)
            meta = {**metadata, **kohya_network_metadata(trained.adapter, state)}
            meta.update(tensor_hashes(state, meta))
            write_safetensors(tmp / f"{name}.safetensors", state, meta)
        for token, vectors in trained.tokens.items():
            meta = {
                "modelspec.sai_model_spec": "1.0.0",
                "modelspec.architecture": f"{family.MODELSPEC_ARCHITECTURE}/textual-inversion",
                "modelspec.trigger_phrase": token_file_name(token),
                "token": token,
            }
            path = tmp / "embeddings" / f"{token_file_name(token)}.safetensors"
            write_safetensors(path, {"emb_params": vectors.to(dtype)}, meta)


def kohya_network_metadata(adapter: str, state: dict[str, torch.Tensor]) -> dict[str, str]:
    """ss_network_* keys: module, rank (dim) and alpha as kohya's trainer writes them."""
    ranks, alphas = set(), set()
    for key, value in state.items():
        if key.endswith((".lora_down.weight", ".hada_w1_b", ".lokr_w1_b", ".lokr_w2_b")):
            ranks.add(value.shape[0])
        elif key.endswith(".alpha"):
            alphas.add(round(float(value), 6))
    module = "lycoris.kohya" if adapter in ("loha", "lokr") else "networks.lora"
    meta = {"ss_network_module": module}
    if ranks:
        meta["ss_network_dim"] = str(max(ranks))
    if alphas:
        meta["ss_network_alpha"] = str(max(alphas) if len(alphas) > 1 else alphas.pop())
    if adapter != "lora":
        meta["ss_network_args"] = json.dumps({"algo": {"loha": "loha", "lokr": "lokr"}[adapter]})
    return meta


def write_peft(trained: Trained, folder: Path, dtype: torch.dtype) -> None:
    """``<component>/adapter_config.json`` + ``adapter_model.safetensors``, as PeftModel.save_pretrained writes."""
    c = trained.components
    with atomic_dir(folder) as tmp:
        for component, module in c.trainable().items():
            if not tuner_layers(module):
                continue
            state, config = peft_state(module)
            config = copy.deepcopy(config)
            config.base_model_name_or_path = None  # never a path of this machine
            config.save_pretrained(tmp / component)
            state = {f"base_model.model.{k}": v.to(dtype) for k, v in state.items()}
            write_safetensors(tmp / component / "adapter_model.safetensors", state, {"format": "pt"})


def write_merged(merged: dict, folder: Path, family, model_path: Path, tokenizers: dict, variant: str | None) -> None:
    """A diffusers pipeline folder of the base's kind with the merged modules: fp32 plus a ``variant``."""
    with atomic_dir(folder) as tmp:
        if variant:  # first, from copies: the configs both share (transformers records a dtype) end up fp32
            dtype = DTYPES[{"fp16": "float16", "bf16": "bfloat16"}[variant]]
            half = {name: copy.deepcopy(module).to(dtype) for name, module in merged.items()}
            family.pipeline_with(model_path, **tokenizers, **half).save_pretrained(
                tmp, safe_serialization=True, variant=variant
            )
            del half
        family.pipeline_with(model_path, **tokenizers, **merged).save_pretrained(tmp, safe_serialization=True)
        for config in tmp.rglob("*.json"):  # where the base was loaded from: a path of this machine
            data = json.loads(config.read_text())
            if isinstance(data, dict) and "_name_or_path" in data:
                data.pop("_name_or_path")
                config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_single_file(
    merged: dict, folder: Path, name: str, family, vocab_sizes: dict[str, int], dtype: torch.dtype, metadata: dict
) -> None:
    """``<name>.safetensors``: the merged weights in the original single-file layout A1111 and ComfyUI load.

    New tokens stay out (each text encoder's base ``vocab_sizes`` rows only): they ship as embeddings beside it.
    """
    state = family.single_file_state(merged, vocab_sizes)
    meta = {**metadata, "modelspec.architecture": family.MODELSPEC_ARCHITECTURE}
    with atomic_dir(folder) as tmp:
        write_safetensors(tmp / f"{name}.safetensors", {k: v.to(dtype) for k, v in state.items()}, meta)
