"""The export stage (rank 0): the trained tensors, checked finite, written in every format of
``export.formats`` (tuner/export/formats.py), with the model card and each file's sha256.
"""

from __future__ import annotations

import functools
import itertools
import re
import time

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from tuner import run_folder
from tuner.compose import run_folder_of
from tuner.data.prepare import load_prepared
from tuner.errors import ConfigError
from tuner.export import formats, tensors
from tuner.export.card import write_model_card
from tuner.export.finite import check_finite
from tuner.export.formats import FORMATS, check_held, holds
from tuner.export.loading import load_configured
from tuner.export.metadata import file_hashes, folder_hash, tag_frequency, training_metadata
from tuner.models import get_family
from tuner.stages.context import Adapted, Exported, Made, Run, stage


def _live_tokens(run: Run, tokens: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    """Each new token's vectors in each text encoder that has it (the family's ``EMBEDDINGS``): ``<sks>`` plus
    diffusers' ``<sks>_1``, ... for more vectors, fp32 on the CPU."""
    c = run.components
    out = {token: {} for token in tokens}
    for name in run.family.EMBEDDINGS:
        rows = run.accelerator.unwrap_model(c.text_encoders[name]).get_input_embeddings().weight
        vocab = c.tokenizer_of(name).get_vocab()
        for token in (token for token in tokens if token in vocab):
            extra = itertools.takewhile(vocab.__contains__, (f"{token}_{i}" for i in itertools.count(1)))
            ids = [vocab[token]] + [vocab[n] for n in extra]
            out[token][name] = rows[ids].detach().float().cpu().clone()
    return out


def _fp32_base(run: Run) -> dict[str, dict[str, torch.Tensor]]:
    """The base's fp32 weights where the live modules hold frozen ones in a lower precision (mixed precision)."""
    c = run.components
    low = [name for name, m in c.modules().items() if any(p.dtype != torch.float32 for p in m.parameters())]
    if not low:
        return {}
    fresh = run.family.load(run.base, allow_pickle=run.cfg.model.allow_pickle).modules()
    return {name: fresh[name].state_dict() for name in low}


def _export_info(run: Run, trained, name: str, trained_here: bool) -> dict:
    """What the metadata and the model card say: the base, the trigger and the training settings.

    Exporting a checkpoint (recipe=export), the settings come from the run folder the checkpoint sits in.
    """
    from importlib.metadata import version

    cfg, source, source_dir = run.cfg, run.cfg, run.dir
    if not trained_here:
        source = None
        checkpoint = cfg.checkpoint
        for _ in range(4):  # an export of an export: follow the checkpoints back to the run that trained
            folder = run_folder_of(checkpoint) if checkpoint else None
            if folder is None:
                break
            config = OmegaConf.load(folder / "config.yaml")
            if "train" in config.stages:
                source, source_dir = config, folder
                break
            checkpoint = config.checkpoint
    e = cfg.export
    info = {
        "name": name,
        "base_name": str(run.base) if e.include_paths else run.base.name,
        "base_hash": folder_hash(run.base),
        "base_version": run.family.BASE_VERSION,
        "v2": run.family.KOHYA_V2,
        "architecture": f"{run.family.MODELSPEC_ARCHITECTURE}/{'lora' if trained.adapter else 'checkpoint'}",
        "prediction_type": run.components.prediction_type,
        "version": version("tuner"),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "description": f"trained with tuner {version('tuner')}" if source is not None else None,
        "adapter": trained.adapter,
        "tokens": list(trained.tokens),
    }
    if source is not None:
        t, d = source.train, source.data
        info.update(
            resolution=d.resolution,
            steps=t.max_steps,
            learning_rate=t.learning_rate,
            unet_lr=t.learning_rate,
            text_encoder_lr=(source.text_encoder.learning_rate or t.learning_rate)
            if source.text_encoder.train != "none"
            else None,
            seed=source.seed,
            batch_size=t.batch_size,
            optimizer=t.optimizer,
            lr_scheduler=t.lr_scheduler,
            mixed_precision=t.mixed_precision,
            noise_offset=t.noise_offset or None,
            snr_gamma=t.snr_gamma,
            rank=source.adapter.rank if trained.adapter else None,
            alpha=source.adapter.alpha if trained.adapter else None,
            adapter_type=source.adapter.type,
            text_encoder=source.text_encoder.train,
            trigger=", ".join(trained.tokens) or d.trigger or d.instance_prompt,
            instance_prompt=d.instance_prompt,
            selected=run.metrics.get("selected") if source is cfg else None,
            started=run.started if source is cfg else None,
            finished=time.strftime("%Y-%m-%dT%H:%M:%S%z") if source is cfg else None,
        )
        captions = {}
        for role in ("instance", "class"):
            if (source_dir / "data" / role / "dataset").is_dir():
                captions[role] = list(load_prepared(source_dir / "data" / role)["caption"])
        if captions:
            info["tag_frequency"] = tag_frequency(captions)
            info["num_images"] = len(captions.get("instance", []))
            info["num_class_images"] = len(captions.get("class", [])) or None
    return info


def _trained_parts(cfg) -> set[str]:
    """What a training run adds to its base, in the terms of each format's ``holds`` (tuner/export/formats.py)."""
    a, te = cfg.adapter, cfg.text_encoder
    parts = set()
    if a.type in ("lora", "loha", "lokr") or te.train == "lora":
        parts.add("dora" if a.use_dora and a.type == "lora" else a.type if a.type in ("loha", "lokr") else "lora")
    if a.type in ("partial_unet", "full") or te.train == "full":
        parts.add("base_weights")
    if cfg.embedding.tokens:
        parts.add("tokens")
    return parts


def chosen_formats(cfg, family, parts: set[str]) -> list[str]:
    """``export.formats``, or (null) the family's own that hold ``parts`` (``formats.default_formats``)."""
    return list(cfg.export.formats) if cfg.export.formats is not None else formats.default_formats(family, parts)


def _check_export(cfg) -> None:
    e = cfg.export
    if e.formats is not None and not e.formats:
        raise ConfigError(f"export.formats is empty: choose from {', '.join(FORMATS)} (or null for the family's)")
    if "train" in cfg.stages:
        parts = _trained_parts(cfg)
        family = get_family(cfg.model.family, cfg.model)
        check_held(parts, chosen_formats(cfg, family, parts), family)
    if e.name is not None and not re.fullmatch(r"[\w.+-]+", e.name):
        raise ConfigError(f"export.name={e.name}: letters, digits, '.', '_', '+' and '-' only (it names files)")


@stage(main_only=True, after=("base",), writes=(*FORMATS, "README.md"), check=_check_export)
def export(run: Run) -> Exported:
    """Write what trained (or what ``checkpoint=`` loaded) in every format of ``export.formats``.

    See tuner/export/formats.py for the formats and what each holds; a format that cannot hold a
    part (a kohya file cannot hold a DoRA adapter) says so and writes the rest. The run summary
    lists every file written with its sha256; ``README.md`` in the run folder is the model card.
    """

    cfg, c, e = run.cfg, run.components, run.cfg.export
    adapted = run.results.get(Adapted)
    if adapted is None and cfg.checkpoint:  # recipe=export checkpoint=PATH
        loaded = load_configured(run)
        adapted = Adapted(None, tuple(loaded.tokens), base_weights_changed=bool(loaded.tokens))
    what = adapted.trainables if adapted else None
    if what is not None:
        base_weights = what.base_weights_train
    elif adapted is not None and adapted.fused:  # recipe=lora_merge merge.into_base=true
        base_weights = True
    else:
        base_weights = not (cfg.checkpoint or "train" in cfg.stages or adapted)
    tokens = _live_tokens(run, adapted.new_tokens if adapted else ())
    trained = tensors.Trained(c, tensors.adapter_kind(c), tokens, base_weights)
    parts = trained.parts
    if not parts:
        raise ConfigError("export: nothing to export; put train (or load_adapter with checkpoint=PATH) before it")
    chosen = chosen_formats(cfg, run.family, parts)
    if e.formats is None:
        print(f"[tuner] export: {', '.join(chosen)} (model={run.family.NAME}'s; export.formats= to choose)", flush=True)
    formats.check_held(parts, chosen, run.family)
    check_finite(trained, formats.DTYPES[e.dtype])
    name = e.name or run.dir.name
    info = _export_info(run, trained, name, trained_here=what is not None)
    made = run.results.get(Made)
    if made is not None:  # a LoRA toolbox recipe: what it was made from
        # (the training settings of the run an input came from stay; its rank and alpha are no longer this one's)
        info.update(description=made.description, made=list(made.lines), gallery=made.gallery)
        info.update(rank=None, alpha=None, adapter_type=None)
        info["trigger"] = ", ".join(made.triggers) or None
    metadata = training_metadata(info)

    @functools.cache
    def fused() -> dict:
        """The adapter fused into the base, made once for the formats that hold it fused."""
        print("[tuner] export: fusing the adapter into the base weights", flush=True)
        return tensors.merged_components(trained, _fp32_base(run))

    written = []
    for fmt in tqdm(chosen, desc="export", leave=False):
        folder = run.dir / fmt
        held = parts & holds(fmt, run.family)
        if not held:
            print(f"[tuner] export {fmt}: skipped, it cannot hold {', '.join(sorted(parts))}", flush=True)
            run_folder.remove(run.dir, fmt)  # an earlier run's files in this folder must not pass for this run's
            continue
        if parts - held:
            print(f"[tuner] export {fmt}: without {', '.join(sorted(parts - held))} (another format holds it)")
        job = formats.Export(
            trained, folder, name, run.family, run.base, formats.DTYPES[e.dtype],
            formats.DTYPES[e.single_file_dtype], e.variant, metadata, fused,
        )  # fmt: skip
        formats.FORMATS[fmt].write(job)
        written.append(folder)
        run.outputs[fmt] = str(folder)
    fused.cache_clear()  # the fused modules go before the gallery loads anything
    files = {}
    for path in sorted(p for folder in written for p in folder.rglob("*") if p.is_file()):
        sha256, model_hash = file_hashes(path)
        files[str(path.relative_to(run.dir))] = {"bytes": path.stat().st_size, "sha256": sha256} | (
            {"model_hash": model_hash} if model_hash else {}
        )
    card = write_model_card(run.dir / "README.md", info, files, cfg, run.family)
    run.outputs["model_card"] = str(card)
    return Exported(files)
