"""The train stage's checks of a composed config: what trains, how and on what, and the choices that do not fit
together (run before anything loads, when a recipe names the stage; each raises ``ConfigError`` naming the keys and
the fix).
"""

from __future__ import annotations

from pathlib import Path

from tuner.errors import ConfigError
from tuner.training import checkpoint_files


def check_train(cfg) -> None:
    """What trains, how, and on what: the choices that do not fit together, and resume=."""
    d, t, a, te, emb = cfg.data, cfg.train, cfg.adapter, cfg.text_encoder, cfg.embedding
    if d.video.frames:  # prepare reads clips; their latents do not reach training yet (issue #40)
        raise ConfigError(
            f"data.video.frames={d.video.frames}: training on clips is not built yet; recipe=prepare prepares and "
            "reports them. Train on images (each a one-frame clip for model=wan) with data.video.frames=0"
        )
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
