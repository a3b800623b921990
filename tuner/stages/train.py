"""The train stage: its setup in dependency order, the loop, then what the run keeps.

    the model and what of it trains (tuner/training/trainables.py)
    -> the frozen work, done once: latents and caption embeddings, through the shared cache (train_inputs.py)
    -> the monitor: logs and validation (tuner/training/monitor.py)
    -> the optimizer, its schedule, checkpointing, offload, sharding: a TrainingSetup (tuner/training/setup.py)
    -> the loop (tuner/training/loop.py), resuming a checkpoint if asked (tuner/training/state.py)
    -> the report, the weights kept (the last step's or the best one's), FSDP's shards gathered on rank 0

The stage's checks of the config are tuner/training/checks.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from tuner import scoring
from tuner.data.prepared import (
    subject_images,
)
from tuner.distributed import decide
from tuner.errors import ConfigError
from tuner.export.live import validation_edits
from tuner.stages.context import Adapted, Run, stage
from tuner.stages.train_inputs import sample_sets
from tuner.training import checkpoint_files, trainables
from tuner.training.batches import SampleSet, draw_batch
from tuner.training.checkpoints import Checkpointing
from tuner.training.checks import check_fsdp, check_train
from tuner.training.held_out import HeldOutLoss
from tuner.training.loop import Training, TrainResult
from tuner.training.monitor import Measures, Monitor
from tuner.training.monitor import start as start_monitor
from tuner.training.offload import BlockOffload, Parked, blocks_of, largest
from tuner.training.selection import Selection
from tuner.training.setup import SampleSets, StepModel, TrainingSetup, channels_last_pays, set_up


@stage(after=("base", "prepare"), writes=("checkpoints", "logs", "validation"), check=check_train)
def train(run: Run) -> Adapted:
    """Train what the config names (see tuner/training/trainables.py) on instance plus prior batches.

    The setup comes first, each part built from those before it (the shape of torchtune's recipes): the model and
    what of it trains; the frozen work, done once (images become latent distributions, captions embeddings, or
    token ids when the text encoder runs in the step because it or a new token trains); the monitor; then the
    optimizer, its schedule, checkpointing and the rest of the ``TrainingSetup`` (tuner/training/setup.py) that
    the loop (tuner/training/loop.py) reads. After the loop: the report, the weights kept, FSDP's shards gathered.
    """
    cfg, c = run.cfg, run.components
    if run.strategy == "fsdp":  # also when the launcher's accelerate config asked for it
        check_fsdp(cfg)
    torch.manual_seed(cfg.seed)
    what = _set_up_model(run)
    in_step = what.text_encoder_trains or cfg.data.shuffle_tags  # the text encoder runs in every step
    parked = _frozen_parts(run, in_step)
    # the VAE and the text encoders come to the device only to encode what the shared cache does not hold yet,
    # then go back to host memory: captions cached by an earlier run never bring their encoder
    data = sample_sets(run, in_step, parked.unpark if parked is not None else lambda *names: None)
    if parked is not None:
        run.metrics["offload_frozen"]["brought_to_encode"] = sorted(parked.brought)
        parked.park()
    for name, module in c.modules().items():  # what runs in the steps, on the device
        if parked is None or name not in parked.modules:
            module.to(run.accelerator.device)
    monitor = _set_up_monitor(run, data, parked, in_step)
    try:
        setup = _set_up(run, what, data, monitor, in_step)
        if setup.sharded is not None:  # the unsharded parameters are freed once nothing holds them
            what.groups = setup.groups
        training = Training(setup)
        result = training.train()
    finally:  # also when training stops: the logs so far are complete, the later stages find the model whole
        monitor.finish()
        if parked is not None:
            parked.unpark()
    _report(run, result, what, data.sets)
    _keep_chosen(run, training, result, monitor)
    if result.ema is not None:  # the gallery, evaluation and export use the averaged weights
        result.ema.copy_to(setup.params)
    if setup.sharded is not None:  # FSDP: the modules whole again, on rank 0 only
        _gather(run, setup.sharded, what)
    if cfg.train.gradient_checkpointing:
        c.denoiser.disable_gradient_checkpointing()
    run.accelerator.free_memory()  # the optimizer state goes before the gallery loads anything
    return Adapted(what, tuple(cfg.embedding.tokens), what.base_weights_train or bool(what.new_tokens))


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


def _set_up_monitor(run: Run, data: SampleSets, parked: Parked | None, in_step: bool) -> Monitor:
    """Logs and validation (tuner/training/monitor.py): the held-out loss, the metrics of samples against the
    subject's images, the validation page."""
    cfg, c, accelerator = run.cfg, run.components, run.accelerator
    encode = (lambda ids: run.family.encode_ids(c.text_encoders, ids)) if in_step else None
    held_out = None
    if data.held_out and cfg.validation.every:
        plain_t = OmegaConf.to_object(cfg.train)
        held_out = HeldOutLoss(data.held_out, data.rows, run.family.objective(c), plain_t,
                               cfg.validation.loss_timesteps, cfg.seed, cfg.train.batch_size)  # fmt: skip

    def scorer():
        subject = subject_images(run.dir)
        return scoring.scorer(cfg, subject, accelerator.device, run.feature_models, run.judge(subject))

    measure = Measures(cfg, accelerator, run.sample, c.denoiser, held_out, encode, scorer, run.judged())
    modules = [c.denoiser, *c.text_encoders.values()]
    collective = run.strategy == "fsdp" and accelerator.num_processes > 1
    edits = validation_edits(run)  # an edit family's pairs, sampled instead of prompts
    monitor = start_monitor(cfg, run.dir, accelerator, run.sample, modules, data.captions, parked, measure, collective,
                            edits)  # fmt: skip
    if monitor.gallery is not None:
        run.outputs["validation"] = str(run.dir / "validation" / "index.html")
    return monitor


def _set_up(run: Run, what: trainables.Trainables, data: SampleSets, monitor, in_step: bool) -> TrainingSetup:
    """The rest of what the loop reads, around the model, the data and the monitor: the learning rates scaled,
    the step's model, the batches, the selection of the best step, checkpointing, block offload and sharding;
    ``set_up`` builds the optimizer, its schedule, accelerate's wrapping and the EMA from them."""
    cfg, c, accelerator, family = run.cfg, run.components, run.accelerator, run.family
    t, ck, early = cfg.train, cfg.checkpoints, cfg.train.early_stop
    if t.scale_lr:
        for group in what.groups:
            group["lr"] *= t.batch_size * t.gradient_accumulation_steps * accelerator.num_processes
    selection = Selection(ck.select, ck.select_mode, ck.best, early.patience, early.min_delta, early.max_drift)
    fsdp, stop = run.strategy == "fsdp", cfg.text_encoder.stop_at
    channels_last = t.channels_last
    if channels_last is None:
        channels_last = not fsdp and channels_last_pays(cfg.adapter, accelerator, what.params)
    model = StepModel(
        c.denoiser,
        family.objective(c),
        text_encoders=c.text_encoders if in_step else None,
        encode=family.encode_ids,
        text_encoder_steps=round(stop * t.max_steps) if stop < 1 else None,
        channels_last=channels_last,
    )

    def next_batch(generator):  # train.batch_size is each process's: every rank draws the global batch
        n, rank = accelerator.num_processes, accelerator.process_index
        return draw_batch(data.sets, t.batch_size * n, generator, rank, n)

    return set_up(
        accelerator,
        model,
        what.groups,
        t,
        next_batch,
        cfg.seed,
        desc=f"train {', '.join(g['name'] for g in what.groups)}",
        checkpointing=_checkpointing(run, data.sets),
        monitor=monitor,
        selection=selection,
        offload=_block_offload(run),
        shard=_shard(run) if fsdp and accelerator.num_processes > 1 else None,
        sharded_checkpoints=fsdp,
    )


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


def _resume_from(run: Run) -> Path | None:
    """The checkpoint ``resume=`` names: a folder, or with ``auto`` the newest complete one of this run."""
    if run.cfg.resume is None:
        return None
    if run.cfg.resume != "auto":
        return Path(run.cfg.resume).expanduser()
    return checkpoint_files.newest_intact(run.dir / "checkpoints")


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


def _keep_chosen(run: Run, training: Training, result: TrainResult, monitor) -> None:
    """The weights the run keeps: the last step's, or with ``export.from=best`` the best checkpoint's by
    ``checkpoints.select``, or when drift passed ``train.early_stop.max_drift`` the last step within it. The summary,
    the model card and the validation page say which step and why."""
    sel, last = training.setup.selection, result.last_step
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
