"""What an adapter file is, read from its header alone: its format, the model family it was made for, each
module's rank and alpha, its metadata and trigger words (recipe=inspect; the LoRA toolbox checks its inputs
with it before anything loads).

Formats, by their keys: ``diffusers`` (``unet.<module>.lora_A.weight``, the LoRA settings in the
``lora_adapter_metadata`` metadata), ``kohya`` (``lora_unet_<module>.lora_down.weight`` with ``.alpha``; LoHa
and LoKr files in LyCORIS' names are ``kohya`` too), ``peft`` (a folder of ``<component>/adapter_config.json``
and ``adapter_model.safetensors``), ``embedding`` (textual inversion vectors). A run folder is read through
its export, as ``checkpoint=`` loads it.

The family comes from what each registered family says of its own modules (``Family.DENOISER``, its text
encoders, ``SIGNS``: names only it has, ``NEVER``: names it never has), then from widths (``WIDTHS``: its
cross-attention input or transformer width). A file that names none of these (a small or partial LoRA)
leaves more than one family possible, and says so.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tuner.errors import ConfigError
from tuner.export.reading import LORA_PAIRS, check_header, peft_config

# kohya's key prefixes -> the diffusers component they name
KOHYA_COMPONENTS = {
    "lora_unet": "denoiser",
    "lora_transformer": "denoiser",  # diffusers' and some trainers' Flux files
    "lora_te": "text_encoder",
    "lora_te1": "text_encoder",
    "lora_te2": "text_encoder_2",
    "lora_te3": "text_encoder_3",
}
DIFFUSERS_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
COMFYUI_PREFIX = "diffusion_model."  # ComfyUI's own LoRA files: the denoiser's modules by their original names
# LyCORIS' LoHa and LoKr tensors, by the key suffix; the first of each kind's names its rank (the inner dimension)
LYCORIS = {"loha": ("hada_w1_b", "hada_w1_a", "hada_w2_a", "hada_w2_b"), "lokr": ("lokr_w2_b", "lokr_w1", "lokr_w2")}
# how a denoiser module's name starts (the file's prefix taken off): a transformer's, a U-Net's
TRANSFORMER_NAMES = (
    r"^(transformer_blocks|single_transformer_blocks|joint_blocks|double_blocks|single_blocks|x_embedder|"
    r"context_embedder|time_text_embed|pos_embed|final_layer)"
)
# the modules whose input width tells families apart (``_widths``)
WIDTH_NAMES = r"attn2_to_[kv]$|(^|_)attn_to_q$|img_attn_qkv$|x_block_attn_qkv$|(^|_)attention_(to_q|qkv)$"
UNET_NAMES = r"^(down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block|conv_in|time_embedding)"


@dataclass
class Module:
    """One adapter module of a file."""

    name: str  # as the file names it, without the tensor suffix
    component: str  # denoiser | text_encoder | text_encoder_2 | ...
    kind: str  # lora | dora | loha | lokr
    rank: int | None  # None: a LoKr with whole factors has no rank
    alpha: float | None  # None: the file does not say (loaders take alpha = rank)
    shape: tuple[int, ...]  # the weight difference's: (out, in) or (out, in, k, k)


@dataclass
class Described:
    """An adapter file (or peft folder) as ``describe`` reads it."""

    path: Path
    format: str  # diffusers | kohya | peft | embedding
    kind: str  # lora | dora | loha | lokr | embedding
    modules: dict[str, Module] = field(default_factory=dict)
    families: tuple[str, ...] = ()  # the families it may be for (one, when its names or widths say)
    evidence: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    triggers: list[str] = field(default_factory=list)
    embeddings: dict[str, tuple[int, ...]] = field(default_factory=dict)  # key -> shape, for an embedding

    def counts(self) -> dict[str, int]:
        return dict(Counter(m.component for m in self.modules.values()))


def adapter_path(path: Path) -> Path:
    """The one adapter file or peft folder ``path`` names: itself, a run folder's export (its diffusers file,
    else peft/, else kohya/), or the one LoRA ``.safetensors`` of an export folder.

    Raises:
        ConfigError: nothing there, or a folder with several adapter files (naming them).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"{path}: no such file or folder")
    if path.is_file():
        return path
    if (path / "summary.json").is_file() and (path / "config.yaml").is_file():  # a tuner run
        for inside in (path / "diffusers" / "pytorch_lora_weights.safetensors", path / "peft", path / "kohya"):
            if inside.exists():
                return adapter_path(inside)
        raise ConfigError(f"{path}: a tuner run with no adapter export (diffusers/, peft/ or kohya/)")
    if (
        any((path / c / "adapter_config.json").is_file() for c in DIFFUSERS_COMPONENTS)
        or (path / "adapter_config.json").is_file()
    ):
        return path
    files = sorted(path.glob("*.safetensors"))
    if len(files) == 1:
        return files[0]
    if not files:
        raise ConfigError(f"{path}: no .safetensors adapter file and no peft adapter_config.json in it")
    names = ", ".join(f.name for f in files)
    raise ConfigError(f"{path}: holds several adapter files ({names}); name the one you mean")


def _header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str], dict[str, float]]:
    """Shapes by key, metadata, and every ``.alpha`` scalar (read: a few numbers) of a safetensors file."""
    from safetensors import safe_open

    check_header(path)
    with safe_open(path, "pt") as handle:
        shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
        alphas = {k: float(handle.get_tensor(k).float().reshape(-1)[0]) for k in shapes if k.endswith(".alpha")}
        return shapes, handle.metadata() or {}, alphas


def describe(path: Path) -> Described:
    """Read an adapter (a file, an export folder, a peft folder or a run folder) without loading its tensors.

    Raises:
        ConfigError: the file is missing, a pickle, damaged, or holds neither adapter nor embedding keys
            (naming a few of its keys), or its LoRA halves do not pair up.
    """
    source = Path(path).expanduser()
    path = adapter_path(source)
    if path.is_dir():
        described = _describe_peft(path)
    else:
        shapes, metadata, alphas = _header(path)
        described = _describe_file(path, shapes, metadata, alphas)
    if described.kind != "embedding":
        described.families, described.evidence = families_of(described.modules)
    described.triggers = _triggers(described, source)
    return described


def _describe_file(path: Path, shapes: dict, metadata: dict, alphas: dict) -> Described:
    keys = list(shapes)
    if all(k.startswith(tuple(f"{p}_" for p in KOHYA_COMPONENTS)) or k.endswith(".alpha") for k in keys):
        style = "kohya"
    elif all(k.startswith(COMFYUI_PREFIX) for k in keys):
        style = "comfyui"
    elif all(k.split(".")[0] in DIFFUSERS_COMPONENTS for k in keys):
        style = "diffusers"
    elif all(k.startswith("base_model.model.") for k in keys):
        style = "peft"
    else:
        style = None
    modules = _modules(path, shapes, alphas, style, _diffusers_configs(metadata))
    if not modules:
        if style is None and all(len(s) in (1, 2) for s in shapes.values()) and len(keys) <= 4:
            return Described(path, "embedding", "embedding", metadata=metadata, embeddings=dict(shapes))
        shown = ", ".join(keys[:3])
        raise ConfigError(
            f"{path}: no LoRA, LoHa or LoKr keys in it (it holds {len(keys)} tensors, e.g. {shown}); "
            "is it a whole model rather than an adapter?"
        )
    if style is None:
        known = (*(f"{p}_" for p in KOHYA_COMPONENTS), *(f"{c}." for c in DIFFUSERS_COMPONENTS), COMFYUI_PREFIX)
        stray = next((k for k in keys if not k.startswith(known)), keys[0])
        raise ConfigError(
            f"{path}: an unknown adapter format: its keys are in no one known style ({stray} is not a kohya "
            "lora_unet_/lora_te key, a diffusers unet./transformer./text_encoder. key or a ComfyUI diffusion_model. "
            "key, or the file mixes them); loaders would skip part of it"
        )
    kinds = {m.kind for m in modules.values()}
    return Described(path, style, _one_kind(path, kinds), modules, metadata=metadata)


def _one_kind(path: Path, kinds: set[str]) -> str:
    if "dora" in kinds:
        return "dora"
    if len(kinds) > 1:
        raise ConfigError(f"{path}: mixes adapter kinds {sorted(kinds)}; tuner reads one kind per file")
    return kinds.pop()


def _diffusers_configs(metadata: dict) -> dict[str, dict]:
    """diffusers' ``lora_adapter_metadata`` (``component.key`` -> value) as ``{component: LoRA config}``."""
    try:
        flat = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except ValueError:
        raise ConfigError("its lora_adapter_metadata is not JSON (diffusers writes a JSON object)") from None
    configs: dict[str, dict] = {}
    for key, value in flat.items() if isinstance(flat, dict) else ():
        component, _, name = key.partition(".")
        configs.setdefault(component, {})[name] = value
    return configs


def _pattern_value(name: str, patterns: dict, default):
    """A peft ``rank_pattern`` / ``alpha_pattern`` value for module ``name`` (peft matches keys as name suffixes)."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?({key})", name):
            return value
    return default


def _split(key: str, style: str | None) -> tuple[str, str]:
    """(component, module name inside it) of a module key."""
    if style == "kohya":
        prefix = next(p for p in sorted(KOHYA_COMPONENTS, key=len, reverse=True) if key.startswith(p + "_"))
        return KOHYA_COMPONENTS[prefix], key[len(prefix) + 1 :]
    if style == "comfyui":
        return "denoiser", key.removeprefix(COMFYUI_PREFIX)
    if style == "peft":
        return "", key.removeprefix("base_model.model.")
    component, _, name = key.partition(".")
    return ("denoiser" if component in ("unet", "transformer") else component), name


def _modules(path: Path, shapes: dict, alphas: dict, style: str | None, configs: dict) -> dict[str, Module]:
    """Every adapter module of a file's keys, with rank, alpha and the shape of its difference."""
    modules = {}
    for key, shape in shapes.items():
        for down, up in LORA_PAIRS:
            if not key.endswith(down):
                continue
            name = key[: -len(down)]
            if name + up not in shapes:
                raise ConfigError(f"{path}: {key} has no matching up weight ({name + up} is missing)")
            b = shapes[name + up]
            if len(shape) not in (2, 4) or len(b) != len(shape) or b[1] != shape[0] or shape[0] == 0:
                raise ConfigError(
                    f"{path}: {name}: down {shape} and up {b} do not form a LoRA "
                    "(down is (rank, in), up is (out, rank))"
                )
            component, inner = _split(name, style)
            config = configs.get(name.split(".")[0], {})
            rank = shape[0]
            alpha = alphas.get(f"{name}.alpha")
            if alpha is None and config:
                alpha = float(_pattern_value(inner, config.get("alpha_pattern"), config.get("lora_alpha", rank)))
            dora = any(k.startswith(name + ".lora_magnitude_vector") or k == name + ".dora_scale" for k in shapes)
            kind = "dora" if dora else "lora"
            modules[name] = Module(name, component, kind, rank, alpha, (b[0], *shape[1:]))
        for kind, names in LYCORIS.items():
            suffix = next((f".{n}" for n in (*names, "lokr_w1_a") if key.endswith(f".{n}")), None)
            if suffix is None or key[: -len(suffix)] in modules:
                continue
            name = key[: -len(suffix)]
            component, _ = _split(name, style)
            ranked = shapes.get(f"{name}.{names[0]}") or shapes.get(f"{name}.lokr_w1_b")
            modules[name] = Module(
                name, component, kind, ranked[0] if ranked else None, alphas.get(f"{name}.alpha"), ()
            )
    ups = {name + up for name in modules for _, up in LORA_PAIRS}
    for key in shapes:
        if any(key.endswith(up) for _, up in LORA_PAIRS) and key not in ups:
            raise ConfigError(f"{path}: {key} has no matching down (lora_A / lora_down) weight")
    return modules


def _describe_peft(folder: Path) -> Described:
    """A peft export folder: ``<component>/adapter_config.json`` + ``adapter_model.safetensors`` (or one of them)."""
    parts = [(folder, "")] if (folder / "adapter_config.json").is_file() else []
    parts += [(folder / c, c) for c in DIFFUSERS_COMPONENTS if (folder / c / "adapter_config.json").is_file()]
    modules, kinds = {}, set()
    for sub, component in parts:
        config = peft_config(sub)
        weights = sub / "adapter_model.safetensors"
        if not weights.is_file():
            raise ConfigError(f"{sub}: adapter_config.json without adapter_model.safetensors beside it")
        shapes, _, alphas = _header(weights)
        peft_type = str(config.get("peft_type", "LORA")).lower()
        found = _modules(weights, shapes, alphas, "peft", {})
        for name, m in found.items():
            m.component = "denoiser" if component in ("unet", "transformer") else component
            m.kind = "dora" if config.get("use_dora") else peft_type
            m.name = f"{component}.{m.name}" if component else m.name
            default_alpha = config.get("lora_alpha", config.get("alpha", m.rank))
            m.alpha = float(
                _pattern_value(name.removeprefix("base_model.model."), config.get("alpha_pattern"), default_alpha)
            )
            modules[m.name] = m
            kinds.add(m.kind)
    if not modules:
        raise ConfigError(f"{folder}: its peft adapters hold no LoRA, LoHa or LoKr tensors")
    return Described(folder, "peft", _one_kind(folder, kinds), modules)


def families_of(modules: dict[str, Module]) -> tuple[tuple[str, ...], str]:
    """The families a file's modules may be for, and why: the candidates narrowed by the kind of denoiser its
    names show (U-Net or transformer), by the text encoders it adapts, by names only one family has, then by
    widths (see the module's docstring). A file that narrows to none (contradicting names) leaves every family
    possible."""
    from tuner.models import families

    every = {f.NAME: f for f in families()}
    names = [m.name.replace(".", "_") for m in modules.values()]
    text = " ".join(names)
    candidates, why = set(every), []
    denoiser = [_inner(m) for m in modules.values() if m.component == "denoiser"]
    if any(re.search(TRANSFORMER_NAMES, n) for n in denoiser) or any(
        m.name.startswith("transformer.") for m in modules.values()
    ):
        candidates = {n for n in candidates if every[n].DENOISER == "transformer"}
        why.append("a transformer")
    elif any(re.search(UNET_NAMES, n) for n in denoiser):
        candidates = {n for n in candidates if every[n].DENOISER == "unet"}
        why.append("a U-Net")
    encoders = {m.component for m in modules.values() if m.component.startswith("text_encoder")}
    fewer = {n for n in candidates if not encoders <= set(every[n].TEXT_ENCODERS)}
    if fewer and candidates - fewer:
        candidates -= fewer
        why.append(f"its text encoders ({', '.join(sorted(encoders))})")
    signed = {n: found[0] for n in every if every[n].SIGNS and (found := re.search(every[n].SIGNS, text))}
    if signed:
        candidates &= set(signed)
        why += [f"names only {n} has ({found})" for n, found in signed.items()]
    candidates -= {n for n in candidates if every[n].NEVER and re.search(every[n].NEVER, text)}
    widths = _widths(modules)
    fitting = {n for n in candidates if every[n].WIDTHS & widths}
    if fitting:
        candidates = fitting
        why.append(f"widths {', '.join(map(str, sorted(widths)))}")
    if not candidates:
        return tuple(every), "names and widths of no one family"
    order = [n for n in every if n in candidates]
    said = "; ".join(why) or "names any family may have"
    return tuple(order), said + ("" if len(order) == 1 else "; more than one family fits")


def base_shapes(folder: Path, component: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """(weight key, shape) of one component of a diffusers folder (``unet``, ``text_encoder``, ...) by module
    name, "." and "_" alike (``down_blocks_0_attentions_0_proj_in``), from its safetensors headers alone; empty
    where it has none that read (the loaders name what is wrong with a damaged base)."""
    shapes = {}
    for file in sorted((folder / component).glob("*.safetensors")):
        try:
            with open(file, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size)) if 0 < size < 1 << 28 else {}
        except (OSError, ValueError):
            continue
        for key, info in header.items() if isinstance(header, dict) else ():
            if key.endswith(".weight") and isinstance(info, dict) and isinstance(info.get("shape"), list):
                shapes[key.removesuffix(".weight").replace(".", "_")] = (key, tuple(info["shape"]))
    return shapes


# a module name's prefixes that say its component, "." as "_" (longest first: lora_te1_ before lora_te_)
COMPONENT_PREFIXES = sorted(
    {*(f"{p}_" for p in KOHYA_COMPONENTS), *(f"{c}_" for c in DIFFUSERS_COMPONENTS), "diffusion_model_"},
    key=len,
    reverse=True,
)


def misfit(described: Described, base: Path, denoiser: str) -> str | None:
    """The first module of an adapter whose weight difference is not the shape of the base's module of that
    name (``base``: a diffusers folder, its denoiser in ``denoiser/``), said with both shapes; None when every
    module the base names fits. Names the base does not have in diffusers' layout (kohya's original-layout names,
    fused qkv) are left to the loaders, which name what they cannot place."""
    components: dict[str, dict] = {}
    for m in described.modules.values():
        component = denoiser if m.component == "denoiser" else m.component
        if len(m.shape) < 2 or not component:
            continue
        if component not in components:
            components[component] = base_shapes(base, component)
        name = m.name.replace(".", "_")
        name = name.removeprefix(next((p for p in COMPONENT_PREFIXES if name.startswith(p)), ""))
        key, shape = components[component].get(name.removeprefix("base_model_model_"), (None, None))
        if shape is not None and tuple(shape[:2]) != tuple(m.shape[:2]):
            return (
                f"its module {m.name} changes a weight of shape {tuple(m.shape[:2])} (out, in), but the base's "
                f"{component} has {key} of shape {shape}"
            )
    return None


def _inner(m: Module) -> str:
    """A denoiser module's name without its file's prefixes, "." and "_" alike."""
    name = m.name.replace(".", "_")
    for prefix in ("lora_unet_", "lora_transformer_", "unet_", "transformer_", "diffusion_model_", "base_model_model_"):
        name = name.removeprefix(prefix)
    return name


def _widths(modules: dict[str, Module]) -> set[int]:
    """The widths that tell families apart: a U-Net's cross-attention input (attn2's to_k / to_v), a
    transformer's attention input (to_q, or the fused qkv of the original layouts; Z-Image's and Lumina 2's
    ``attention`` modules by either name)."""
    out = set()
    for m in modules.values():
        name = m.name.replace(".", "_")
        if m.shape and re.search(WIDTH_NAMES, name):
            out.add(m.shape[1])
    return out


def _triggers(described: Described, source: Path) -> list[str]:
    """The words that call it up: modelspec.trigger_phrase, an embedding's token, the most frequent tags of
    kohya's ss_tag_frequency, and a tuner run's trigger or instance prompt."""
    meta = described.metadata
    out = []
    for key in ("modelspec.trigger_phrase", "token"):
        if meta.get(key):
            out.append(meta[key])
    try:
        frequency = json.loads(meta.get("ss_tag_frequency", "{}"))
    except ValueError:
        frequency = {}
    counts: Counter = Counter()
    for tags in frequency.values() if isinstance(frequency, dict) else ():
        counts.update({t: n for t, n in tags.items() if isinstance(n, int)} if isinstance(tags, dict) else {})
    out += [tag for tag, _ in counts.most_common(5)]
    run = next(
        (p for p in [source, *source.parents][:4] if (p / "config.yaml").is_file() and (p / "summary.json").is_file()),
        None,
    )
    if run is not None:
        from omegaconf import OmegaConf

        data = OmegaConf.load(run / "config.yaml").data
        out += [x for x in (data.get("trigger"), data.get("instance_prompt")) if x]
    return list(dict.fromkeys(t.strip() for t in out if t and t.strip()))
