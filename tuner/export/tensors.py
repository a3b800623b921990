"""The tensors of what a run added to its base, read from the live modules: the peft layers and the kind
of adapter, each layer's tensors in peft's and kohya's keys, the adapter fused into the base weights,
and safetensors files written atomically. The formats that write them are in tuner/export/formats.py.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tuner.files import atomic_path


@dataclass
class Trained:
    """What sits on top of the base in the live modules: the parts each format may hold."""

    components: object  # the family's Components (unet, vae, text_encoder, tokenizer, ...)
    adapter: str | None = None  # lora | dora | loha | lokr, on the U-Net and/or the text encoder
    # token -> {text encoder: (vectors, width)}, in order
    tokens: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    base_weights: bool = False  # base weights themselves changed (partial / full fine-tuning)

    @property
    def parts(self) -> set[str]:
        return {p for p in (self.adapter, "tokens" if self.tokens else None) if p} | (
            {"base_weights"} if self.base_weights else set()
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
      same way. LoKr's Kronecker factors are written whole (``lokr_w2 = lokr_w2_a @ lokr_w2_b``: a few
      thousand numbers a module), as InvokeAI's probe tells a LoKr file's family only from whole factors.
      Whole factors have no rank a loader could divide by, so loaders apply them at scale 1: the scale is
      folded into ``lokr_w2`` and no ``alpha`` is written.
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
    if isinstance(layer, LoKrLayer) and "lokr_t2" not in tensors:  # (a Tucker core stays split)
        if "lokr_w1_a" in tensors:
            tensors["lokr_w1"] = tensors.pop("lokr_w1_a") @ tensors.pop("lokr_w1_b")
        if "lokr_w2_a" in tensors:  # a conv's w2_b has in/c * k * k columns: whole, the (out/a, in/c, k, k) kernel
            w2 = tensors.pop("lokr_w2_a") @ tensors.pop("lokr_w2_b")
            tensors["lokr_w2"] = w2.reshape(w2.shape[0], -1, *layer.get_base_layer().weight.shape[2:])
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
    from tuner.models.quantize import is_quantized

    base = base or {}

    def full(key: str, value: torch.Tensor) -> torch.Tensor:  # a frozen weight stored in low precision
        return base[key].float() if value.dtype != torch.float32 and key in base else value.float()

    layers = tuner_layers(module)
    quantized = is_quantized(module)
    if quantized and not base:
        raise ValueError("export: a quantized module merges onto the base's own weights; none were given")
    # a quantized module's own state holds bitsandbytes' packed weights and their quantization state: the
    # base's weights stand in for all of it
    own = base if quantized else module.state_dict()
    state = {}
    for key, value in own.items():
        if not any(key.startswith(n + ".") for n in layers):
            state[key] = full(key, value)
    for name, layer in layers.items():
        if layer.merged:
            raise ValueError(f"export: {name} has its adapter merged already; unmerge it first")
        if is_quantized(layer.get_base_layer()):
            weights = {k: base[f"{name}.{k}"] for k in ("weight", "bias") if f"{name}.{k}" in base}
            state.update({f"{name}.{k}": v for k, v in _merged_on(layer, weights).items()})
            continue
        merged = copy.deepcopy(layer)
        target = merged.get_base_layer()
        for key, value in target.state_dict().items():
            getattr(target, key).data = full(f"{name}.{key}", value).clone()
        merged.float().merge(safe_merge=True, adapter_names=[_active(layer)])
        for key, value in target.state_dict().items():
            state[f"{name}.{key}"] = value.detach()
    return state


def _merged_on(layer, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LoRA (or DoRA) layer trained over a bitsandbytes layer, merged by peft onto the base's own ``weights``:
    peft's plain layer around an fp32 ``Linear`` of them, given the trained adapter."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import Linear

    adapter = _active(layer)
    if not isinstance(layer, LoraLayer):
        raise ValueError(f"export: only a LoRA merges onto a quantized layer, not {type(layer).__name__}")
    q = layer.get_base_layer()
    linear = torch.nn.Linear(q.in_features, q.out_features, bias="bias" in weights)
    linear.load_state_dict({k: v.float() for k, v in weights.items()})
    r, alpha, dora = layer.r[adapter], layer.lora_alpha[adapter], bool(layer.use_dora[adapter])
    plain = Linear(linear, adapter, LoraConfig(r=r, lora_alpha=alpha, use_dora=dora), r=r, lora_alpha=alpha)
    plain.scaling[adapter] = layer.scaling[adapter]  # rsLoRA's scale, as trained
    trained = {k: v for k, v in layer.state_dict().items() if not k.startswith("base_layer.")}
    loaded = plain.load_state_dict({k: v.float() for k, v in trained.items()}, strict=False)
    if loaded.unexpected_keys:
        raise ValueError(f"export: {loaded.unexpected_keys} of a layer over a quantized one do not fit peft's Linear")
    plain.merge(safe_merge=True, adapter_names=[adapter])
    return {k: v.detach() for k, v in plain.get_base_layer().state_dict().items()}


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
        if any(name in vectors for vectors in trained.tokens.values()):  # the new rows: only in the live embedding
            rows = module.get_input_embeddings().weight
            for key in (k for k, v in module.state_dict(keep_vars=True).items() if v is rows):  # T5's are tied
                state[key] = rows.detach().float()
        out[name] = _fresh(module, state)
    return out


# ---------------------------------------------------------------- kohya naming and metadata


def kohya_name(prefix: str, module_name: str) -> str:
    return f"{prefix}_{module_name.replace('.', '_')}"


def kohya_state(trained: Trained, family, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The adapter as a kohya / LyCORIS state dict, ``<prefix>_<module>.<suffix>`` (see ``kohya_tensors``).

    The family names each module the way its kohya files do (``family.kohya_module_name``, under
    ``family.KOHYA_PREFIXES``). Where those fuse modules that diffusers keeps apart (Flux's q, k, v into
    ``qkv``), their LoRAs become one, exactly (``_fused_lora``).
    """
    state, fused = {}, {}
    for component, module in trained.components.trainable().items():
        layers = tuner_layers(module)
        if layers and component not in family.KOHYA_PREFIXES:
            raise ValueError(f"export kohya: no kohya prefix for {component}")
        for name, layer in layers.items():
            key = kohya_name(family.KOHYA_PREFIXES[component], family.kohya_module_name(component, name, module.config))
            siblings = family.kohya_siblings(component, name)
            if siblings:
                fused.setdefault(key, (module, siblings, {}))[2][name] = layer
                continue
            tensors = kohya_tensors(layer)
            if family.kohya_swapped(component, name, module.config):
                if "lora_up.weight" not in tensors:
                    raise ValueError(f"export kohya: {name}'s halves are swapped there; only a LoRA swaps")
                tensors["lora_up.weight"] = _swap_halves(tensors["lora_up.weight"])
            state.update({f"{key}.{suffix}": v.to(dtype) for suffix, v in tensors.items()})
    for key, (module, siblings, layers) in fused.items():
        state.update({f"{key}.{suffix}": v.to(dtype) for suffix, v in _fused_lora(module, siblings, layers).items()})
    return {k: v.contiguous().cpu() for k, v in state.items()}


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first])


def _fused_lora(module, siblings: tuple[str, ...], layers: dict) -> dict[str, torch.Tensor]:
    """LoRAs on modules the original layout fuses into one (q, k, v -> qkv) as one LoRA on the fused module,
    exactly: the downs stacked, the ups (each times its scale) block-diagonal, zero rows for a sibling
    without a LoRA, and alpha equal to the stacked rank, so the scale is 1.

    Raises:
        ValueError: a layer is not a plain LoRA (a LoHa's or LoKr's product, or DoRA's norm, does not stack).
    """
    from peft.tuners.lora import LoraLayer

    downs, ups, outs = [], [], []
    for name in siblings:
        target = module.get_submodule(name)
        outs.append(getattr(target, "base_layer", target).out_features)
        if name in layers:
            layer, adapter = layers[name], _active(layers[name])
            if not isinstance(layer, LoraLayer) or layer.use_dora.get(adapter):
                raise ValueError(f"export kohya: {name} is fused in the original layout; only a plain LoRA stacks")
            downs.append(layer.lora_A[adapter].weight.detach().float())
            ups.append(layer.lora_B[adapter].weight.detach().float() * float(layer.scaling[adapter]))
        else:
            ups.append(None)
    rank = sum(d.shape[0] for d in downs)
    up = torch.zeros(sum(outs), rank)
    row = col = 0
    for out, part in zip(outs, ups):
        if part is not None:
            up[row : row + out, col : col + part.shape[1]] = part
            col += part.shape[1]
        row += out
    return {"lora_down.weight": torch.cat(downs), "lora_up.weight": up, "alpha": torch.tensor(float(rank))}


def token_file_name(token: str) -> str:
    """A file name A1111 and ComfyUI users can type as the trigger (``<sks>`` -> ``sks``)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "", token) or "embedding"


def write_safetensors(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata=metadata)
    return path


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


# ---------------------------------------------------------------- the LoRA toolbox's live layers


def layer_factors(layer, adapter: str):
    """One adapter of a peft layer as ``lowrank.Factors`` at scale 1 (its scale folded in); None when the layer
    is not a plain LoRA (LoHa, LoKr, DoRA: their differences are ``layer.get_delta_weight``'s, not two factors)."""
    from peft.tuners.lora import LoraLayer

    from tuner.export.lowrank import scaled

    if not isinstance(layer, LoraLayer) or adapter not in layer.lora_A or layer.use_dora.get(adapter):
        return None
    return scaled(layer.lora_A[adapter].weight, layer.lora_B[adapter].weight, float(layer.scaling[adapter]))


def unwrap(module: torch.nn.Module) -> None:
    """Take every peft layer out of ``module``, putting its base layer (unchanged) back in its place."""
    layers = tuner_layers(module)
    for name, layer in layers.items():
        if layer.merged:
            raise ValueError(f"{name}: merged into its base layer; unmerge it before taking it out")
        if name.endswith(".base_layer") and name.removesuffix(".base_layer") in layers:
            continue  # inside another peft layer (a LoHa over a LoRA): that one's base layer is the module's
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, child, layer.get_base_layer())
    if hasattr(module, "peft_config"):
        del module.peft_config
    if getattr(module, "_hf_peft_config_loaded", False):  # transformers' mark of a model holding adapters
        module._hf_peft_config_loaded = False


def install_lora(module: torch.nn.Module, factors: dict, adapter_name: str = "default") -> None:
    """Put a LoRA with the given ``{module name: Factors}`` into ``module`` as a peft adapter, each module at
    its own rank with alpha = rank (scale 1, the scale being in the factors)."""
    from peft import LoraConfig

    if not factors:
        return
    # whole names only: peft takes a list's names as suffixes (Flux's proj_out would catch every single block's),
    # and a pattern's key after any prefix, which "^" rules out
    ranks = {f"^{re.escape(name)}": f.rank for name, f in factors.items()}
    first = next(iter(factors.values())).rank
    config = LoraConfig(
        r=first,
        lora_alpha=first,
        target_modules="^(?:" + "|".join(re.escape(n) for n in sorted(factors)) + ")$",
        rank_pattern=ranks,
        alpha_pattern=dict(ranks),
        init_lora_weights=False,
    )
    module.add_adapter(config, adapter_name=adapter_name)
    layers = tuner_layers(module)
    if set(layers) != set(factors):  # a LoRA on a module it was not meant for would be random noise
        raise ValueError(f"install_lora: adapters on {sorted(set(layers) ^ set(factors))[:4]}, not as asked")
    with torch.no_grad():
        for name, f in factors.items():
            layer = layers[name]
            a, b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            if a.shape != f.down.shape or b.shape != f.up.shape:
                raise ValueError(
                    f"{name}: factors {tuple(f.down.shape)} / {tuple(f.up.shape)} do not fit "
                    f"{tuple(a.shape)} / {tuple(b.shape)}"
                )
            a.copy_(f.down)
            b.copy_(f.up)
