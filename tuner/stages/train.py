"""The train stage: what trains (tuner/training/trainables.py), the frozen work done once (latents,
caption embeddings), then the loop (tuner/training/loop.py), checkpoints and resume.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from tuner.data.prepare import load_prepared
from tuner.distributed import decide
from tuner.errors import ConfigError
from tuner.models.base import Cond, tree_map
from tuner.stages.context import Adapted, Run, stage
from tuner.stages.data import image_keys, images_of, latent_masks, subject_images
from tuner.training import checkpoint_files, trainables
from tuner.training.batches import Captions, LatentCache, SampleSet, draw_batch, encode_latent_dist
from tuner.training.cache import Store, cached, evict, fingerprint
from tuner.training.checkpoints import Checkpointing
from tuner.training.held_out import HeldOutLoss, HeldOutSet, split
from tuner.training.loop import Training, TrainResult
from tuner.training.monitor import start as start_monitor
from tuner.training.offload import BlockOffload, Parked, blocks_of, largest
from tuner.training.selection import Selection

# captions the text encoders encode at once: T5-XXL takes 0.33 GB a caption at 512 tokens (tools/bench_memory.py)
PROMPTS_AT_ONCE = 1


def _resume_from(run: Run) -> Path | None:
    """The checkpoint ``resume=`` names: a folder, or with ``auto`` the newest complete one of this run."""
    if run.cfg.resume is None:
        return None
    if run.cfg.resume != "auto":
        return Path(run.cfg.resume).expanduser()
    return checkpoint_files.newest_intact(run.dir / "checkpoints")


def _channels_last_pays(cfg, accelerator, trained) -> bool:
    """train.channels_last=null: on for float32 LoRA training on a CPU (faster there, see tools/bench.py)
    when no convolution weight trains; not under peft's DoRA, LoHa and LoKr, whose convolution code
    assumes the default layout."""
    a = cfg.adapter
    convs_train = any(p.dim() == 4 for p in trained)
    layout_safe = a.type == "lora" and not a.use_dora and not convs_train
    return layout_safe and accelerator.device.type == "cpu" and accelerator.mixed_precision == "no"


def _check_train(cfg) -> None:
    """What trains, how, and on what: the choices that do not fit together, and resume=."""
    d, t, a, te, emb = cfg.data, cfg.train, cfg.adapter, cfg.text_encoder, cfg.embedding
    if t.max_timestep is not None and not 0 <= t.min_timestep < t.max_timestep:
        raise ConfigError(f"train.min_timestep={t.min_timestep} must be below train.max_timestep={t.max_timestep}")
    if t.lr_scheduler == "one_cycle" and t.warmup_steps >= t.max_steps:
        raise ConfigError("train.lr_scheduler=one_cycle: train.warmup_steps must be below train.max_steps")
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
    if a.type == "none" and te.train == "none" and not emb.tokens:
        raise ConfigError(
            "nothing to train: adapter=none, text_encoder.train=none and no embedding.tokens; "
            "choose an adapter (adapter=lora), text_encoder.train=lora or embedding.tokens=[<sks>]"
        )
    if cfg.prior.enabled and not d.instance_prompt:
        raise ConfigError('data.instance_prompt is not set: pass data.instance_prompt="a photo of sks dog"')
    if cfg.prior.enabled and not d.class_prompt:
        raise ConfigError(
            'prior.enabled=true needs data.class_prompt (e.g. data.class_prompt="a photo of a dog"), '
            "or set prior.enabled=false"
        )
    if t.offload_blocks < 0:
        raise ConfigError(f"train.offload_blocks={t.offload_blocks}: a number of blocks, 0 (none) or more")
    if t.offload_blocks and a.type == "full":
        raise ConfigError(
            "train.offload_blocks moves frozen weights to host memory, and adapter=full trains every weight: "
            "use train.offload_blocks=0, or an adapter (adapter=lora)"
        )
    if t.offload_blocks and cfg.model.quantize:
        raise ConfigError(
            f"train.offload_blocks with model.quantize={cfg.model.quantize}: quantized weights stay on the device "
            "(bitsandbytes keeps their scales there); use one of the two"
        )
    if t.fused_backward:
        _check_fused_backward(t)
    if cfg.distributed.strategy == "fsdp":
        check_fsdp(cfg)
    if cfg.resume not in (None, "auto"):
        path = Path(cfg.resume).expanduser()
        trained = (path / "trained.safetensors").is_file() or (path / checkpoint_files.SHARDED).is_dir()
        if not (path / "state.pt").is_file() or not trained:
            raise ConfigError(f"resume={cfg.resume}: not a checkpoint folder (RUN/checkpoints/step-N with state.pt)")


def check_fsdp(cfg) -> None:
    """What FSDP2 sharding does not combine with (each changes how weights or their gradients are held)."""
    t, m = cfg.train, cfg.model
    clashes = {
        "train.offload_blocks (it moves whole weights to host memory; sharding already splits them)": t.offload_blocks,
        "model.quantize (bitsandbytes' quantized weights are not sharded)": m.quantize,
        "train.fused_backward (it steps each weight before the ranks reduce its gradient)": t.fused_backward,
        "train.channels_last=true (the shards are cut along the first dimension of the default layout)": (
            t.channels_last is True
        ),
        f"train.optimizer={t.optimizer} (sharded states are tested with adamw and sgd)": t.optimizer
        not in ("adamw", "sgd"),
        "embedding.tokens (new token rows train by a gradient mask on the whole embedding)": bool(cfg.embedding.tokens),
        "text_encoder.stop_at below 1 (a sharded module's trained tensors are fixed at the start)": (
            cfg.text_encoder.train != "none" and cfg.text_encoder.stop_at < 1
        ),
    }
    clash = [name for name, on in clashes.items() if on]
    if clash:
        raise ConfigError(
            f"distributed.strategy=fsdp does not combine with {'; nor with '.join(clash)}. Change those settings, "
            "or use distributed.strategy=ddp"
        )


def _check_fused_backward(t) -> None:
    """Each weight steps as its gradient arrives: nothing may need every gradient (or several) first."""
    needs = {
        "train.max_grad_norm=0 (clipping needs the norm of every gradient first)": t.max_grad_norm > 0,
        "train.gradient_accumulation_steps=1 (each step would come after the first micro-batch)": (
            t.gradient_accumulation_steps > 1
        ),
        "another train.optimizer than prodigy (it sizes its steps from every gradient)": t.optimizer == "prodigy",
        "train.mixed_precision=bf16 or no (fp16's loss scaler unscales every gradient first)": (
            t.mixed_precision == "fp16"
        ),
    }
    broken = [need for need, bad in needs.items() if bad]
    if broken:
        raise ConfigError(f"train.fused_backward=true needs {'; and '.join(broken)}")


@stage(after=("base", "prepare"), writes=("checkpoints", "logs", "validation"), check=_check_train)
def train(run: Run) -> Adapted:
    """Train what the config names (see tuner/training/trainables.py) on instance plus prior batches.

    Frozen work happens once, before the loop: images become latent distributions, captions become
    embeddings (or token ids, when the text encoder runs in the step because it or a new token trains).
    """
    cfg, c, accelerator = run.cfg, run.components, run.accelerator
    t = cfg.train
    if run.strategy == "fsdp":  # also when the launcher's accelerate config asked for it
        check_fsdp(cfg)
    torch.manual_seed(cfg.seed)
    what = _set_up_model(run)
    in_step = what.text_encoder_trains or cfg.data.shuffle_tags  # the text encoder runs in every step
    parked = _frozen_parts(run, in_step)
    if parked is not None:  # the encoders on the device while they encode, then in host memory
        parked.unpark()
    sets, texts, held_out_sets, rows = _sample_sets(run, in_step)
    if parked is not None:
        parked.park()
    for name, module in c.modules().items():  # what runs in the steps, on the device
        if parked is None or name not in parked.modules:
            module.to(accelerator.device)
    if t.scale_lr:
        for group in what.groups:
            group["lr"] *= t.batch_size * t.gradient_accumulation_steps * accelerator.num_processes
    stop = cfg.text_encoder.stop_at
    encode = (lambda ids: run.family.encode_ids(c.text_encoders, ids)) if in_step else None
    held_out = None
    if held_out_sets and cfg.validation.every:
        plain_t = OmegaConf.to_object(t)
        held_out = HeldOutLoss(held_out_sets, rows, run.family.objective(c), plain_t, cfg.validation.loss_timesteps,
                               cfg.seed, t.batch_size)  # fmt: skip
    subject = lambda: subject_images(run.dir)  # noqa: E731
    monitor = start_monitor(run, [c.denoiser, *c.text_encoders.values()], texts, parked, held_out, encode, subject)
    ck, early = cfg.checkpoints, t.early_stop
    selection = Selection(ck.select, ck.select_mode, ck.best, early.patience, early.min_delta, early.max_drift)
    fsdp = run.strategy == "fsdp"
    try:
        training = Training(
            accelerator,
            c.denoiser,
            what.groups,
            run.family.objective(c),
            # train.batch_size is each process's: every rank draws the global batch and trains on its slice
            next_batch=lambda generator: draw_batch(
                sets,
                t.batch_size * accelerator.num_processes,
                generator,
                accelerator.process_index,
                accelerator.num_processes,
            ),
            t=t,
            seed=cfg.seed,
            desc=f"train {', '.join(g['name'] for g in what.groups)}",
            text_encoders=c.text_encoders if in_step else None,
            encode=run.family.encode_ids,
            text_encoder_steps=round(stop * t.max_steps) if stop < 1 else None,
            channels_last=(not fsdp and _channels_last_pays(cfg, accelerator, what.params))
            if t.channels_last is None
            else t.channels_last,
            checkpointing=_checkpointing(run, sets),
            monitor=monitor,
            offload=_block_offload(run),
            shard=_shard(run) if fsdp and accelerator.num_processes > 1 else None,
            sharded_checkpoints=fsdp,
            selection=selection,
        )
        if training.sharded is not None:  # the unsharded parameters are freed once nothing holds them
            what.groups = training.groups
        result = training.train()
    finally:  # also when training stops: the logs so far are complete, the later stages find the model whole
        monitor.finish()
        if parked is not None:
            parked.unpark()
    _report(run, result, what, sets)
    _keep_chosen(run, training, result, monitor)
    if result.ema is not None:  # the gallery, evaluation and export use the averaged weights
        result.ema.copy_to(training.params)
    if training.sharded is not None:  # FSDP: the modules whole again, on rank 0 only
        _gather(run, training.sharded, what)
    if t.gradient_checkpointing:
        c.denoiser.disable_gradient_checkpointing()
    accelerator.free_memory()  # the optimizer state goes before the gallery loads anything
    return Adapted(what, tuple(cfg.embedding.tokens), what.base_weights_train or bool(what.new_tokens))


def _keep_chosen(run: Run, training: Training, result: TrainResult, monitor) -> None:
    """The weights the run keeps: the last step's, or with ``export.from=best`` the best checkpoint's by
    ``checkpoints.select``, or when drift passed ``train.early_stop.max_drift`` the last step within it. The summary,
    the model card and the validation page say which step and why."""
    sel, last = training.selection, result.last_step
    if run.is_main and monitor.gallery is not None:
        run.metrics["validation"] = {name: dict(points) for name, points in monitor.gallery.values().items()}
    if sel is None:
        return
    if sel.stopped is not None:
        run.metrics["early_stop"] = {"step": sel.stopped["step"], "reason": sel.stopped["reason"]}
    keep, why = sel.chosen(last, run.cfg.export.from_ == "best")
    if keep != last:
        path = run.dir / "checkpoints" / f"step-{keep:07d}"
        training.restore(path)
        if run.is_main:
            print(f"[tuner] train: keeping the weights of step {keep} ({why}), from {path}", flush=True)
    run.metrics["selected"] = {"step": keep, "of": last, "why": why}
    if sel.metric:
        run.metrics["selected"] |= {"metric": sel.metric, "mode": sel.mode, "value": sel.value(keep)}
    if run.is_main and monitor.gallery is not None:
        monitor.gallery.mark(keep, why)


def _set_up_model(run: Run) -> trainables.Trainables:
    """What trains (adapters injected, the rest frozen), checkpointing of activations, the frozen modules'
    precision."""
    t, c = run.cfg.train, run.components
    what = trainables.setup(run.cfg, c, run.family)
    if t.gradient_checkpointing:
        c.denoiser.enable_gradient_checkpointing()
        for te in c.text_encoders.values() if what.text_encoder_trains else ():  # transformers 5 renamed it
            enable = getattr(te, "activation_checkpointing_enable", None) or te.gradient_checkpointing_enable
            enable()
    if not what.base_weights_train:  # a pipeline export must hold the frozen modules at full precision
        trainables.cast_frozen(c, what, trainables.MIXED_PRECISION_DTYPES[run.accelerator.mixed_precision])
    if t.vae_dtype != "float32":
        c.vae.to(getattr(torch, t.vae_dtype))
    return what


def _shard(run: Run):
    """``distributed.strategy=fsdp``: how the modules that train are sharded (tuner/training/sharding.py): the
    denoiser's repeated blocks (the family's ``OFFLOAD_BLOCKS``) and the text encoders' layers (transformers'
    ``_no_split_modules``) as units of their own."""
    from tuner.training.sharding import Sharded

    family, c = run.family, run.components
    classes = {"denoiser": family.OFFLOAD_BLOCKS}
    classes |= {name: getattr(te, "_no_split_modules", None) or () for name, te in c.text_encoders.items()}
    mixed, reshard, main = run.accelerator.mixed_precision, run.reshard_after_forward, run.is_main
    return lambda modules: Sharded(modules, {k: classes[k] for k in modules}, mixed, reshard, main)


def _gather(run: Run, sharded, what: trainables.Trainables) -> None:
    """After FSDP training: every rank sends its shards, rank 0 puts the whole modules in the run's components
    (and the trained parameters in ``what``); the other ranks keep nothing (they leave after this stage).
    The summary gets rank 0's share of the weights (gradients and optimizer state follow suit)."""
    run.metrics["fsdp"] = {
        "processes": run.accelerator.num_processes,
        "weights_mib_rank0": round(sharded.bytes / 2**20, 3),
        "weights_mib_whole": round(sharded.whole_bytes / 2**20, 3),
    }
    started = time.perf_counter()
    whole = sharded.gather("cpu")  # the stages after training move what they run to the device
    if not run.is_main:
        return
    c = run.components
    for name, module in whole.items():
        if name == "denoiser":
            c.denoiser = module
        else:
            c.text_encoders[name] = module
    run.replaced_modules()  # validation's pipeline held the sharded ones
    what.groups = [{**g, "params": sharded.parameters(g["params"], whole)} for g in what.groups]
    seconds = time.perf_counter() - started
    print(f"[tuner] train: gathered {', '.join(whole)} from the shards on rank 0 in {seconds:.1f} s", flush=True)


def _frozen_parts(run: Run, in_step: bool) -> Parked | None:
    """``model.offload_frozen``: the VAE (and the text encoders, when their outputs are cached) in host memory
    while the loop runs."""
    if not run.offload_frozen:
        return None
    c = run.components
    parked = Parked({"vae": c.vae} | ({} if in_step else dict(c.text_encoders)), run.accelerator.device)
    run.metrics["offload_frozen"] = {"modules": list(parked.modules), "gib": round(parked.bytes / 2**30, 4)}
    if run.is_main:
        names = ", ".join(parked.modules)
        print(f"[tuner] train: {names} ({parked.bytes / 2**30:.2f} GiB) in host memory while training", flush=True)
    return parked


def _block_offload(run: Run) -> BlockOffload | None:
    """``train.offload_blocks``: the denoiser's N largest blocks' frozen weights in host memory."""
    t, c, family = run.cfg.train, run.components, run.family
    if not t.offload_blocks:
        return None
    every = blocks_of(c.denoiser, family.OFFLOAD_BLOCKS)
    if t.offload_blocks > len(every):
        raise ConfigError(
            f"train.offload_blocks={t.offload_blocks}: this {family.DENOISER} has {len(every)} blocks "
            f"({', '.join(family.OFFLOAD_BLOCKS)}); use at most {len(every)}"
        )
    offload = BlockOffload(largest(every, t.offload_blocks), run.accelerator.device, t.gradient_checkpointing)
    gib = round(offload.bytes / 2**30, 4)
    run.metrics["offload_blocks"] = {"blocks": t.offload_blocks, "of": len(every), "gib": gib}
    if run.is_main:
        print(
            f"[tuner] train: {t.offload_blocks} of the {family.DENOISER}'s {len(every)} blocks "
            f"({offload.bytes / 2**30:.2f} GiB) in host memory, fetched as they run",
            flush=True,
        )
    return offload


def _sample_sets(run: Run, in_step: bool) -> tuple[list[SampleSet], list[str], list[HeldOutSet], Cond]:
    """The instance set (and the class set, with prior preservation), their latents and captions encoded
    once into the shared cache (tuner/training/cache.py), where any run finds them again by content; and the
    held-out images (``data.val_split`` of each set, or ``data.val_dir``), encoded the same way.

    Returns the sets, the distinct captions (the empty one last, for caption dropout), the held-out sets and each
    caption's conditioning (or token ids).
    """
    cfg, c, accelerator = run.cfg, run.components, run.accelerator
    roles = [("instance", 1.0)] + ([("class", cfg.prior.loss_weight)] if cfg.prior.enabled else [])
    loaded, opened, report, started = [], [], {"entries": {}, "encoded": {}}, time.perf_counter()
    caption_ids: dict[str, int] = {}  # each distinct caption is encoded once
    vae_dtype = next(c.vae.parameters()).dtype
    latents_store = Store(run.cache_dir, f"latents-{fingerprint('latents', str(vae_dtype), modules=[c.vae])}")
    for role, weight, dataset in _parts(run, roles):
        entries, report["encoded"][f"latents-{role}"] = cached(
            latents_store,
            image_keys(dataset),
            lambda ids: encode_latent_dist(c.vae, images_of(dataset, ids)).items(),  # noqa: B023
            accelerator,
            f"{role} latents",
        )
        report["entries"][f"latents-{role}"] = len(entries)
        opened.append(entries)
        scaling, shift = c.vae.config.scaling_factor, c.vae.config.get("shift_factor") or 0.0
        latents = LatentCache(entries.column("mean"), entries.column("std"), float(scaling), float(shift))
        captions = torch.tensor([caption_ids.setdefault(text, len(caption_ids)) for text in dataset["caption"]])
        per_image = (list(dataset["repeats"]), torch.tensor(dataset["weight"]), latent_masks(dataset, latents))
        loaded.append((role, latents, captions, weight, *per_image, run.family.image_cond(dataset)))
    texts = list(caption_ids) + [""]
    if in_step:
        rows = run.family.tokenize(c, texts)
    else:
        store = Store(run.cache_dir, f"prompts-{_prompts_fingerprint(run)}")
        keys = [hashlib.sha256(text.encode()).hexdigest() for text in texts]
        encode = lambda ids: encode_captions(run.family, c, [texts[i] for i in ids], accelerator.autocast)  # noqa: E731
        entries, report["encoded"]["prompts"] = cached(store, keys, encode, accelerator, "captions")
        report["entries"]["prompts"] = len(entries)
        names = list(entries.slots[0])
        rows = entries.column("embeds") if names == ["embeds"] else {k: entries.column(k) for k in names}
        opened.append(entries)
    report["seconds"] = round(time.perf_counter() - started, 3)
    run.metrics["cache"] = report | {"dir": str(run.cache_dir)}
    if run.is_main:
        counts = ", ".join(f"{k} {report['encoded'][k]} of {n}" for k, n in report["entries"].items())
        print(f"[tuner] cache: encoded {counts} in {report['seconds']:.1f} s ({run.cache_dir})", flush=True)
        if cfg.cache.max_gb is not None:  # once every store is open: never what this run reads
            removed = evict(run.cache_dir, cfg.cache.max_gb, keep=set().union(*(e.shards for e in opened)))
            if removed:
                print(f"[tuner] cache: removed {len(removed)} least recently used shards (cache.max_gb)", flush=True)
    d = cfg.data
    cond = Captions(
        texts, rows, d.caption_dropout, d.shuffle_tags, d.keep_tags, tokenize=lambda t: run.family.tokenize(c, t)
    )
    sets = [
        SampleSet(latents, cond, captions, weight, mask, repeats, image_weight, image_cond=image_cond)
        for _, latents, captions, weight, repeats, image_weight, mask, image_cond in loaded
        if weight is not None
    ]
    held_out = [  # the held-out parts, named by the metric they give
        HeldOutSet(HELD_OUT[role], latents, captions, image_cond, mask)
        for role, latents, captions, weight, _, _, mask, image_cond in loaded
        if weight is None
    ]
    return sets, texts, held_out, rows


# a held-out part's name in the cache report -> the metric its loss is
HELD_OUT = {"held-out instance": "val_loss", "held-out class": "val_loss_class", "val": "val_loss"}


def _parts(run: Run, roles: list[tuple[str, float]]) -> list[tuple[str, float | None, object]]:
    """(name, loss weight, prepared dataset) of each part of the data: each role's images kept for training and
    (weight None) its held-out ones, ``data.val_split`` of them chosen by seed; or ``data.val_dir``'s."""
    d, parts = run.cfg.data, []
    for role, weight in roles:
        if not (run.dir / "data" / role / "dataset").is_dir():
            raise ConfigError(f"train: no prepared {role} data in {run.dir / 'data'}; add the prepare stage first")
        dataset = load_prepared(run.dir / "data" / role)
        if d.val_split > 0:
            kept, held = split(len(dataset), d.val_split, run.cfg.seed, role)
            parts += [(role, weight, dataset.select(kept)), (f"held-out {role}", None, dataset.select(held))]
        else:
            parts.append((role, weight, dataset))
    if d.val_dir:
        if not (run.dir / "data" / "val" / "dataset").is_dir():
            raise ConfigError(f"train: data.val_dir is set but {run.dir / 'data' / 'val'} is not prepared; run prepare")
        parts.append(("val", None, load_prepared(run.dir / "data" / "val")))
    return parts


def _prompts_fingerprint(run: Run) -> str:
    """What a caption's embeddings depend on besides its text: the family, its text encoders' weights and
    tokenizers, the precision they run in, the prompt length and the encoders' quantization."""
    c, m = run.components, run.cfg.model
    settings = {"max_sequence_length": m.max_sequence_length, "quantize_text_encoders": m.quantize_text_encoders}
    vocabularies = [
        hashlib.sha256(json.dumps(sorted(t.get_vocab().items())).encode()).hexdigest() for t in c.tokenizers.values()
    ]
    precision = run.accelerator.mixed_precision
    encoders = list(c.text_encoders.values())
    return fingerprint("prompts", m.family, settings, vocabularies, precision, modules=encoders)


def encode_captions(family, c, texts: list[str], autocast) -> list[dict[str, torch.Tensor]]:
    """Each caption's embeddings (a dict per caption, on the host), ``PROMPTS_AT_ONCE`` captions at a time."""
    items = []
    for start in range(0, len(texts), PROMPTS_AT_ONCE):
        part = texts[start : start + PROMPTS_AT_ONCE]
        with autocast():
            rows = tree_map(lambda x: x.cpu(), family.encode_prompts(c, part))
        if isinstance(rows, torch.Tensor):
            items += [{"embeds": row} for row in rows]
        else:
            items += [{k: v[i] for k, v in rows.items()} for i in range(len(part))]
    return items


def _checkpointing(run: Run, sets: list[SampleSet]) -> Checkpointing:
    """Checkpoints in RUN/checkpoints/ on ``checkpoints.every``, and the one ``resume=`` names (if any)."""
    cfg = run.cfg
    return Checkpointing(
        folder=run.dir / "checkpoints",
        every=cfg.checkpoints.every,
        keep=cfg.checkpoints.keep,
        resume=decide(run.accelerator, lambda: _resume_from(run)),
        data_state=lambda: [{"pending": s.sampler.pending, "epochs": s.sampler.epochs} for s in sets],
        set_data_state=lambda state: [s.sampler.__dict__.update(x) for s, x in zip(sets, state)],
        config=OmegaConf.to_yaml(cfg, resolve=True),
    )


def _report(run: Run, result: TrainResult, what: trainables.Trainables, sets: list[SampleSet]) -> None:
    """The run's training metrics: speed, the share of each phase, losses, what trained, epochs, skips."""
    if result.steps_run:
        run.metrics["step_seconds"] = round(result.step_seconds / result.steps_run, 4)
        run.metrics["samples_per_s"] = round(result.samples / result.step_seconds, 2)
    if result.phases:  # the share of the steps' time each phase took
        run.metrics["step_phases"] = {k: round(v / result.step_seconds, 3) for k, v in result.phases.items()}
    run.metrics["train_loss"] = {"first": round(result.losses[0], 5), "last": round(result.losses[-1], 5)}
    run.metrics["trained_parameters"] = sum(p.numel() for p in what.params)
    run.metrics["epochs"] = sets[0].sampler.epochs  # of the instance images (started, counting the last)
    if result.skipped:
        run.metrics["skipped_steps"] = result.skipped
        print(f"[tuner] train: skipped {result.skipped} micro-batches with a non-finite loss", flush=True)
