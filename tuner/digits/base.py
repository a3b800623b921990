"""The embedded `digits` base: trained from scratch once, a tiny SD1.x pipeline on scikit-learn's
digits, and cached under $TUNER_HOME/bases/ by its settings (``ensure``).

The VAE is trained first (reconstruction plus a small KL term), its latent scale is measured and
written into its config (as Stable Diffusion's ``scaling_factor``), then every U-Net weight is
trained on the cached latents with 10% empty captions for classifier-free guidance and an EMA of
the weights, which is what gets saved. The text encoder stays frozen at its random init: a
character-level CLIP is enough conditioning for ten captions.

What the build's time goes to is the U-Net learning to follow the caption: the ten captions differ
only in their last word, and the U-Net draws a digit of the prompt's choice only after a few hundred
steps of drawing digits at random. Three settings bring that forward (measured on the per-digit score):
the cross-attention's key and value projections, where the caption enters, learn at
``base.cross_attention_lr`` times the rate, and the loss is min-SNR weighted (``base.snr_gamma``) and
the noisiest timesteps drawn more often (``base.timestep_bias``), which leaves more of each step to the
noise levels where the digit is decided.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from tuner import distributed
from tuner.config import BaseConfig, TrainConfig
from tuner.digits import data as digits
from tuner.errors import ConfigError
from tuner.files import atomic_dir, write_atomic
from tuner.models import get_family, tiny
from tuner.models.base import Components
from tuner.training.batches import Batch, encode_latent_dist
from tuner.training.loop import Training

KL_WEIGHT = 1e-4


def train_vae(vae, images: torch.Tensor, cfg: BaseConfig) -> float:
    """Train the VAE as an autoencoder; returns the final reconstruction MSE."""
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.vae_steps)
    vae.train()
    bar = tqdm(range(cfg.vae_steps), desc="digits base: VAE")
    for step in bar:
        batch = images[torch.randint(0, len(images), (cfg.vae_batch_size,), generator=generator)]
        dist = vae.encode(batch).latent_dist
        recon = vae.decode(dist.sample(generator)).sample
        mse = torch.nn.functional.mse_loss(recon, batch)
        loss = mse + KL_WEIGHT * dist.kl().mean() / batch[0].numel()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 50 == 0 or step + 1 == cfg.vae_steps:
            bar.set_postfix(mse=f"{mse.item():.4f}")
    vae.eval().requires_grad_(False)
    return mse.item()


def parameter_groups(unet, cfg: BaseConfig) -> list[dict]:
    """The U-Net's optimizer groups: every weight at ``unet_lr`` (the first group, whose rate the progress bar shows)
    but the cross-attention's key and value projections (the caption's way in), at ``cross_attention_lr`` times it."""
    cross, rest = [], []
    for name, p in unet.named_parameters():
        parts = name.split(".")
        (cross if "attn2" in parts and parts[-2] in ("to_k", "to_v") else rest).append(p)
    return [{"params": rest}, {"params": cross, "lr": cfg.unet_lr * cfg.cross_attention_lr}]


def build(cfg: BaseConfig, folder, accelerator, family: str) -> dict:
    """Train the base and save it as a diffusers pipeline folder (None: do not save). Returns build statistics.

    ``unet_batch_size`` is the global batch: with several processes each trains on its slice, and the
    base is the one a single process builds. ``family``: the SD1.x family whose prompts and objective it trains with.
    """
    size = tiny.SIZES[cfg.size]
    components = tiny.build_components(size, seed=cfg.seed)
    unet, vae, text_encoder = components["unet"], components["vae"], components["text_encoder"]
    tokenizer, scheduler = components["tokenizer"], components["scheduler"]
    images, labels = digits.load_images(size.image_size)

    torch.manual_seed(cfg.seed)
    vae_mse = train_vae(vae, images, cfg)
    if accelerator.num_processes > 1:  # every rank trained the same VAE; take rank 0's, bit for bit
        from accelerate.utils import broadcast

        for p in vae.parameters():
            p.data.copy_(broadcast(p.data.to(accelerator.device)).to(p.device))
    cache = encode_latent_dist(vae, images)
    scaling_factor = 1.0 / cache.mean.std().item()
    vae.register_to_config(scaling_factor=scaling_factor)
    cache.scaling_factor = scaling_factor

    # ten captions plus the empty one (index 10) used for caption dropout
    text_encoder.requires_grad_(False).eval()
    sd15 = get_family(family)  # the SD1.x family conf/model/digits.yaml names
    model = Components(unet, vae, {"text_encoder": text_encoder}, {"tokenizer": tokenizer}, scheduler, "epsilon")
    embeddings = sd15.encode_prompts(model, [digits.caption(k) for k in range(10)] + [""])

    def next_batch(generator):
        index = torch.randint(0, len(cache), (cfg.unet_batch_size,), generator=generator)
        prompt = labels[index].clone()
        prompt[torch.rand(len(index), generator=generator) < cfg.caption_dropout] = 10
        weights = torch.full((len(index),), 1.0 / len(index))
        return Batch(cache.sample(index, generator), embeddings[prompt], weights)

    # the train settings of the U-Net's training (the rest are the schema's defaults)
    t = TrainConfig(
        max_steps=cfg.unet_steps,
        learning_rate=cfg.unet_lr,
        lr_scheduler="constant_with_warmup",
        warmup_steps=min(100, cfg.unet_steps // 10),
        weight_decay=0.0,
        snr_gamma=cfg.snr_gamma,
        timestep_bias=cfg.timestep_bias,
        ema_decay=cfg.ema_decay,
    )
    unet.requires_grad_(True)
    groups = parameter_groups(unet, cfg)
    objective = sd15.objective(model)
    result = Training(accelerator, unet, groups, objective, next_batch, t, cfg.seed, "digits base: U-Net").train()
    result.ema.copy_to([p for g in groups for p in g["params"]])  # the EMA holds them in the groups' order
    unet.requires_grad_(False)
    if folder is not None:  # several processes: rank 0 saves
        tiny.save_pipeline(components, folder)
    return {"vae_mse": vae_mse, "scaling_factor": scaling_factor, "unet_loss": result.losses[-1]}


def check(cfg: DictConfig) -> None:
    """The ``base`` settings name a size tuner can build."""
    b = cfg.base
    if b.size not in tiny.SIZES:
        raise ConfigError(f"base.size={b.size}: choose one of {', '.join(tiny.SIZES)}")
    if not (isinstance(b.cross_attention_lr, (int, float)) and 0 < b.cross_attention_lr < float("inf")):
        raise ConfigError(
            f"base.cross_attention_lr={b.cross_attention_lr}: a positive multiplier of base.unet_lr, e.g. 4"
        )
    if b.snr_gamma is not None and not (isinstance(b.snr_gamma, (int, float)) and 0 < b.snr_gamma < float("inf")):
        raise ConfigError(f"base.snr_gamma={b.snr_gamma}: a positive number, e.g. 5.0, or null for off")


def folder_of(cfg: DictConfig, home: Path) -> Path:
    """Where the base built with these ``base`` settings is cached: a new setting, a new build."""
    settings = json.dumps(OmegaConf.to_container(cfg.base, resolve=True), sort_keys=True)
    architecture = repr(tiny.SIZES.get(cfg.base.size))
    key = hashlib.sha256(f"digits-v2|{settings}|{architecture}".encode()).hexdigest()[:12]
    return home / "bases" / f"digits-{key}"


def ensure(run) -> Path:
    """The cached digits base of ``run`` (a ``tuner.stages.context.Run``), built first if missing: by
    every rank together, saved by rank 0. The build's statistics go to the run's metrics."""
    folder = folder_of(run.cfg, run.home)
    if distributed.decide(run.accelerator, lambda: (folder / "model_index.json").is_file()):
        print(f"[tuner] digits base: cached at {folder}", flush=True)
        distributed.check_visible(run.accelerator, folder / "model_index.json", "the digits base")
        return folder
    print(f"[tuner] digits base: training it once, into {folder}", flush=True)
    start = time.time()
    if run.is_main:
        with atomic_dir(folder) as tmp:
            stats = build(run.cfg.base, tmp, run.accelerator, run.cfg.model.family)
            stats["build_seconds"] = round(time.time() - start, 1)
            write_atomic(tmp / "tuner_base.json", json.dumps(stats, indent=2))
    else:  # the same training, its slice of every batch; rank 0 saves
        stats = build(run.cfg.base, None, run.accelerator, run.cfg.model.family)
    run.accelerator.free_memory()  # drop the base's optimizer and EMA before anything else trains
    run.wait()
    distributed.check_visible(run.accelerator, folder / "model_index.json", "the digits base")
    run.metrics["base_build"] = stats
    return folder
