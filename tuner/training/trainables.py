"""What trains: an adapter or chosen blocks of the U-Net, the text encoder, new token embeddings.

``setup`` starts from the fully frozen components the family loaded, adds or unfreezes exactly what
the config asks for, and returns the optimizer's parameter groups, each with its learning rate.
Every trained tensor is fp32; ``cast_frozen`` then puts the frozen weights of modules in which only
adapters train into the mixed-precision dtype.

    adapter.type        lora | loha | lokr (peft)  partial_unet (blocks by name)  full  none
    text_encoder.train  none | lora | full
    embedding.tokens    new tokens: textual inversion (adapter=none) or pivotal tuning (with an adapter)
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig

from tuner.errors import ConfigError

PEFT_TYPES = ("lora", "loha", "lokr")


@dataclass
class Trainables:
    # optimizer parameter groups: {"name", "params", "lr"[, "weight_decay"]}
    groups: list[dict] = field(default_factory=list)
    # the text encoder runs inside the training step (it or its embeddings train)
    text_encoder_trains: bool = False
    # weights of the base itself train (partial_unet, full, text_encoder.train=full): it ships as a pipeline
    base_weights_train: bool = False
    # the added embedding rows (textual inversion): text encoder -> {token: row}
    new_tokens: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.groups for p in g["params"]]


def denoiser_target_modules(denoiser: torch.nn.Module, a: DictConfig, family) -> list[str]:
    """``adapter.target_modules`` when given, else the modules of the family's ``adapter.targets`` preset."""
    if a.target_modules:
        return list(a.target_modules)
    if a.targets in family.TARGETS:
        return family.TARGETS[a.targets]
    kinds = (torch.nn.Linear,) if a.targets == "all_linear" else (torch.nn.Linear, torch.nn.Conv2d)
    return [name for name, m in denoiser.named_modules() if name.startswith(family.BLOCKS) and isinstance(m, kinds)]


def peft_config(a: DictConfig, target_modules: list[str], exclude: str | None = None):
    """The peft config of ``adapter.type`` (lora, loha or lokr); ``exclude``: a regex of full module names."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    if a.type == "lora":
        return LoraConfig(
            r=a.rank,
            lora_alpha=a.alpha,
            lora_dropout=a.dropout,
            init_lora_weights=True if a.init == "default" else a.init,
            use_dora=a.use_dora,
            use_rslora=a.use_rslora,
            target_modules=target_modules,
            exclude_modules=exclude,
        )
    kind = {"loha": LoHaConfig, "lokr": LoKrConfig}[a.type]
    return kind(
        r=a.rank, alpha=a.alpha, module_dropout=a.dropout, target_modules=target_modules, exclude_modules=exclude
    )


def _trained(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def _unfreeze_blocks(unet: torch.nn.Module, blocks, learning_rate: float, family) -> list[dict]:
    """One group per ``adapter.blocks`` pattern; a parameter joins the first pattern it matches."""
    groups = [{"name": f"{family.DENOISER} {b.pattern}", "params": [], "lr": b.lr or learning_rate} for b in blocks]
    for name, param in unet.named_parameters():
        for block, group in zip(blocks, groups):
            if fnmatch.fnmatchcase(name, block.pattern):
                param.requires_grad_(True)
                group["params"].append(param)
                break
    for block, group in zip(blocks, groups):
        if not group["params"]:
            tops = sorted(
                {".".join(n.split(".")[:4]) for n, _ in unet.named_parameters() if n.startswith(family.BLOCKS)}
            )
            raise ConfigError(
                f"adapter.blocks: pattern {block.pattern!r} matches no {family.DENOISER} parameter; "
                f"names look like {', '.join(tops[:6])} ..."
            )
    return groups


def add_tokens(tokenizer, text_encoder, emb: DictConfig) -> dict[str, int]:
    """Add ``embedding.tokens`` (with ``_1``, ``_2``... for extra vectors) and initialise their rows.

    A token starts from the mean embedding of its init word's tokens, or of the whole vocabulary. A matrix
    with spare rows past the tokenizer's vocabulary (T5's) keeps its size: the new tokens take spare rows.
    """
    names = [f"{t}_{i}" if i else t for t in emb.tokens for i in range(emb.vectors)]
    clash = [n for n in names if n in tokenizer.get_vocab()]
    if clash or tokenizer.add_tokens(names) != len(names):
        raise ConfigError(f"embedding.tokens: {clash or names} already in the tokenizer; pick a new word like <sks>")
    ids = tokenizer.convert_tokens_to_ids(names)
    rows = text_encoder.get_input_embeddings().weight.shape[0]
    text_encoder.resize_token_embeddings(max(len(tokenizer), rows))
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        vocabulary_mean = weight[: min(ids)].mean(0)
        for k in range(len(emb.tokens)):
            start = vocabulary_mean
            if emb.init_words:
                word_ids = tokenizer(emb.init_words[k], add_special_tokens=False).input_ids
                if not word_ids:
                    raise ConfigError(f"embedding.init_words: {emb.init_words[k]!r} has no tokens")
                start = weight[word_ids].mean(0)
            weight[ids[k * emb.vectors : (k + 1) * emb.vectors]] = start
    return dict(zip(names, ids))


def setup(cfg: DictConfig, c, family) -> Trainables:
    """Make exactly the configured parameters trainable on the frozen components ``c`` of ``family``."""
    from peft import LoraConfig

    a, te, emb, lr = cfg.adapter, cfg.text_encoder, cfg.embedding, cfg.train.learning_rate
    out = Trainables()
    denoiser, name = c.denoiser, c.denoiser_name
    if a.type in PEFT_TYPES:
        exclude = None if a.target_modules else family.TARGETS_EXCLUDE  # names the user gives are taken as given
        denoiser.add_adapter(peft_config(a, denoiser_target_modules(denoiser, a, family), exclude))
        out.groups.append({"name": f"{name} {a.type}", "params": _trained(denoiser), "lr": lr})
    elif a.type == "partial_unet":
        out.groups += _unfreeze_blocks(denoiser, family.partial_blocks(a), lr, family)
    elif a.type == "full":
        out.groups.append({"name": name, "params": list(denoiser.requires_grad_(True).parameters()), "lr": lr})

    for name in family.LORA_TEXT_ENCODERS if te.train != "none" else ():
        encoder = c.text_encoders[name]
        if te.train == "lora":
            encoder.add_adapter(
                LoraConfig(
                    r=a.rank,
                    lora_alpha=a.alpha,
                    lora_dropout=a.dropout,
                    init_lora_weights="gaussian",
                    target_modules=list(te.target_modules),
                )
            )
        else:
            encoder.requires_grad_(True)
        group = {"name": f"{name} {te.train}", "params": _trained(encoder), "lr": te.learning_rate or lr}
        out.groups.append(group)

    for name in family.EMBEDDINGS if emb.tokens else ():  # each new token: a vector in each of these encoders
        encoder = c.text_encoders[name]
        out.new_tokens[name] = add_tokens(c.tokenizer_of(name), encoder, emb)
        weight = encoder.get_input_embeddings().weight
        if not weight.requires_grad:  # a fully trained text encoder already trains every row
            keep = torch.zeros(len(weight), 1, dtype=weight.dtype, device=weight.device)
            keep[list(out.new_tokens[name].values())] = 1
            weight.requires_grad_(True)
            weight.register_hook(lambda grad, keep=keep: grad * keep)  # only the new rows get a gradient
            # no weight decay: with a zero gradient AdamW then leaves every other row exactly as it was
            lr_rows = emb.learning_rate or lr
            out.groups.append({"name": f"{name} embeddings", "params": [weight], "lr": lr_rows, "weight_decay": 0.0})
    out.text_encoder_trains = te.train != "none" or bool(emb.tokens)
    out.base_weights_train = a.type in ("partial_unet", "full") or te.train == "full"
    return out


# train.mixed_precision -> the dtype frozen weights are held in (cast_frozen) and quantized layers compute in
MIXED_PRECISION_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cast_frozen(c, trainables: Trainables, dtype: torch.dtype) -> None:
    """Run the U-Net and text encoder in ``dtype`` where only adapters (kept fp32) train in them.

    A module with trained weights of its own (new embeddings in the text encoder) stays fp32 and
    computes in ``dtype`` under accelerate's autocast.
    """
    if dtype == torch.float32:
        return
    trained = {id(p) for p in trainables.params}
    for module in c.trainable().values():
        named = list(module.named_parameters())
        if any(id(p) in trained and not _in_adapter(name) for name, p in named):
            continue
        for _, p in named:
            if id(p) not in trained and p.is_floating_point():  # bitsandbytes' packed weights stay packed
                p.data = p.data.to(dtype)


def _in_adapter(name: str) -> bool:
    return any(part in name for part in ("lora_", "hada_", "lokr_"))
