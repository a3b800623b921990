"""The denoiser training loop, shared by every recipe that trains a U-Net (full or adapter).

Frozen work is done once, before the loop: images are encoded to latent distributions and prompts
to embeddings (see ``encode_latent_dist`` and the family's ``encode_prompts``). Each step then only
samples latents, adds noise, runs the denoiser forward and backward, and steps the optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass
class LossSettings:
    # l2 | l1 | huber, per element against the family's target
    kind: str = "l2"
    huber_delta: float = 0.1
    # min-SNR-gamma weighting (Hang et al. 2023); None: uniform
    snr_gamma: float | None = None
    # epsilon | v_prediction: what the min-SNR weight divides by
    prediction_type: str = "epsilon"
    # adds noise_offset * N(0, 1) per sample and channel to the noise (brighter darks, darker lights)
    noise_offset: float = 0.0


@dataclass
class LoopSettings:
    steps: int
    learning_rate: float
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    log_every: int = 50
    ema_decay: float | None = None
    # adamw | adamw8bit (bitsandbytes) | sgd
    optimizer: str = "adamw"
    loss: LossSettings = field(default_factory=LossSettings)


@dataclass
class LatentCache:
    """Posterior mean and std of each image; a training latent is a fresh sample of it, scaled."""

    mean: torch.Tensor
    std: torch.Tensor
    scaling_factor: float

    def sample(self, index: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        mean, std = self.mean[index], self.std[index]
        eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        return (mean + std * eps) * self.scaling_factor

    def __len__(self) -> int:
        return len(self.mean)


@torch.no_grad()
def encode_latent_dist(vae, images: torch.Tensor, batch_size: int = 64, desc: str | None = None) -> LatentCache:
    """Encode images in [-1, 1] once; the VAE never runs inside the training loop."""
    means, stds = [], []
    device = next(vae.parameters()).device
    for start in tqdm(range(0, len(images), batch_size), desc=desc, disable=desc is None, leave=False):
        dist = vae.encode(images[start : start + batch_size].to(device, vae.dtype)).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    return LatentCache(torch.cat(means), torch.cat(stds), float(vae.config.scaling_factor))


def snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """min-SNR-gamma loss weights: min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v-prediction."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def diffusion_loss(
    unet, noise_scheduler, target_fn: Callable, latents, embeds, generator=None, loss: LossSettings | None = None
) -> torch.Tensor:
    """Per-sample denoising loss at uniformly drawn timesteps, against the family's target."""
    loss = loss or LossSettings()
    # drawn on the CPU from the seeded generator, then moved: the same numbers on every device
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype)
    if loss.noise_offset:
        noise += loss.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator, dtype=noise.dtype)
    noise = noise.to(latents.device)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
    timesteps = timesteps.to(latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction = unet(noisy, timesteps, encoder_hidden_states=embeds).sample.float()
    target = target_fn(latents, noise, timesteps).float()
    if loss.kind == "l1":
        per_element = (prediction - target).abs()
    elif loss.kind == "huber":
        per_element = F.huber_loss(prediction, target, delta=loss.huber_delta, reduction="none")
    else:
        per_element = F.mse_loss(prediction, target, reduction="none")
    per_sample = per_element.mean(dim=(1, 2, 3))
    if loss.snr_gamma:
        per_sample = per_sample * snr_weights(noise_scheduler, timesteps, loss.snr_gamma, loss.prediction_type)
    return per_sample


def make_optimizer(name: str, params: list, learning_rate: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW (foreach), 8-bit AdamW from bitsandbytes (runs on CPU too), or SGD with momentum."""
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=learning_rate, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=learning_rate, momentum=0.9, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    ema: object | None = None


def train_denoiser(
    accelerator,
    unet,
    params: Iterable[torch.nn.Parameter],
    noise_scheduler,
    target_fn: Callable,
    next_batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    settings: LoopSettings,
    seed: int,
    desc: str = "train",
) -> TrainResult:
    """Train ``params`` of ``unet`` for ``settings.steps`` optimizer steps.

    Args:
        next_batch: draws ``(latents, embeddings, weights)``; the loss is ``sum(weights * per_sample_loss)``,
            so the caller decides how instance and prior samples are weighed.
        target_fn: ``(latents, noise, timesteps) -> target``, from the model family.

    Returns:
        The logged losses and, when ``settings.ema_decay`` is set, the EMA of ``params``.
    """
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    params = [p for p in params if p.requires_grad]
    optimizer = make_optimizer(settings.optimizer, params, settings.learning_rate, settings.weight_decay)
    lr_scheduler = get_scheduler(
        settings.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=settings.warmup_steps,
        num_training_steps=settings.steps,
    )
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    ema = EMAModel(params, decay=settings.ema_decay) if settings.ema_decay else None
    generator = torch.Generator().manual_seed(seed)
    result = TrainResult(ema=ema)
    unet.train()
    running = 0.0
    bar = tqdm(range(settings.steps), desc=desc, disable=not accelerator.is_main_process)
    micro_steps = accelerator.gradient_accumulation_steps
    for step in bar:  # one optimizer step, made of gradient_accumulation_steps micro-batches
        for _ in range(micro_steps):
            with accelerator.accumulate(unet):
                latents, embeds, weights = next_batch(generator)
                latents, embeds, weights = (t.to(accelerator.device) for t in (latents, embeds, weights))
                with accelerator.autocast():
                    per_sample = diffusion_loss(
                        unet, noise_scheduler, target_fn, latents, embeds, generator, settings.loss
                    )
                loss = (per_sample * weights).sum()
                accelerator.backward(loss)  # accelerate divides by the accumulation steps
                if accelerator.sync_gradients and settings.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, settings.max_grad_norm)
                optimizer.step()  # a no-op until the last micro-batch
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            running += loss.detach() / micro_steps
        if ema is not None:
            ema.step(params)
        if (step + 1) % settings.log_every == 0 or step + 1 == settings.steps:
            # reading the loss syncs with the device: only at log intervals
            n = (step % settings.log_every) + 1
            value = float(running) / n
            if not math.isfinite(value):
                raise FloatingPointError(f"{desc}: loss became {value} at step {step + 1}")
            result.losses.append(value)
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.1e}")
            running = 0.0
    unet.eval()
    return result
