"""Training objectives: how latents are noised, what the denoiser predicts, how samples are weighed.

    NoiseObjective  DDPM-type schedules (SD1.x, SD2.x, SDXL): integer timesteps, the target is the
                    noise (epsilon) or the velocity (v_prediction, the scheduler's ``get_velocity``)
    FlowObjective   flow matching (Flux, SD3): x_t = (1 - sigma) x + sigma noise with the scheduler's
                    (shifted) sigmas, the target is noise - x; timesteps drawn uniformly or by
                    diffusers' SD3 density (logit_normal, mode), losses weighted by its scheme (sigma_sqrt, cosmap)

``diffusion_loss`` is a batch's per-sample loss against the objective's target (train.loss, snr_gamma,
a mask). Both objectives draw a step's timesteps on the CPU from the loop's generator (``draw``), as
integer indices into the schedule, so every rank of a run draws the same global batch. ``predict`` is
the family's call of its denoiser (``Family.predict``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from tuner.config import TrainConfig


def timestep_weights(num_timesteps: int, bias: str, multiplier: float, portion: float) -> torch.Tensor | None:
    """Sampling weights that draw the earliest or latest ``portion`` of timesteps ``multiplier`` times as often
    (``train.timestep_bias``); None: uniform."""
    if bias == "none":
        return None
    weights = torch.ones(num_timesteps)
    n = max(1, round(portion * num_timesteps))
    if bias == "earlier":
        weights[:n] *= multiplier
    else:
        weights[-n:] *= multiplier
    return weights


def draw_noise(latents: torch.Tensor, generator, t: TrainConfig, objective):
    """A step's random draws for ``latents``, on the CPU from ``generator`` in a fixed order (noise, offset,
    perturbation, timesteps): the same draws on every device and, for a global batch, on every rank.

    ``t``: the ``train`` settings (``noise_offset``: noise_offset * N(0, 1) per sample and channel added to
    the noise; ``input_perturbation``: the denoiser's input is noised with noise + input_perturbation *
    N(0, 1) while the target keeps the noise; the timestep range and bias).

    Returns (noise, input_noise, timesteps): the target uses ``noise``, the U-Net's input ``input_noise``.
    """
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype)
    if t.noise_offset:
        noise += t.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator, dtype=noise.dtype)
    input_noise = noise
    if t.input_perturbation:
        input_noise = noise + t.input_perturbation * torch.randn(latents.shape, generator=generator)
    timesteps = objective.draw(len(latents), t, generator)
    return noise, input_noise, timesteps


class NoiseObjective:
    def __init__(self, scheduler, prediction_type: str, predict: Callable):
        self.scheduler = scheduler
        self.prediction_type = prediction_type
        self.predict = predict
        self.num_timesteps = scheduler.config.num_train_timesteps

    def draw(self, n: int, t: TrainConfig, generator: torch.Generator) -> torch.Tensor:
        """Timesteps in [train.min_timestep, train.max_timestep), uniformly or as ``train.timestep_bias`` says."""
        high = t.max_timestep or self.num_timesteps
        weights = timestep_weights(
            self.num_timesteps, t.timestep_bias, t.timestep_bias_multiplier, t.timestep_bias_portion
        )
        if weights is None:
            return torch.randint(t.min_timestep, high, (n,), generator=generator)
        weights[: t.min_timestep] = 0
        weights[high:] = 0
        return torch.multinomial(weights, n, replacement=True, generator=generator)

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(latents, noise, steps)

    def model_timesteps(self, steps: torch.Tensor) -> torch.Tensor:
        return steps

    def target(self, latents: torch.Tensor, noise: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, steps)
        return noise

    def weights(self, steps: torch.Tensor, t: TrainConfig) -> torch.Tensor | None:
        """min-SNR-gamma loss weights (Hang et al. 2023) when ``train.snr_gamma`` is set: min(SNR, gamma) / SNR
        for epsilon, / (SNR + 1) for v-prediction."""
        if not t.snr_gamma:
            return None
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.scheduler, steps)
        clipped = torch.clamp(snr, max=t.snr_gamma)
        return clipped / (snr + 1) if self.prediction_type == "v_prediction" else clipped / snr


class FlowObjective:
    def __init__(
        self,
        scheduler,
        predict: Callable,
        weighting: str = "none",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        shift: float | None = None,
    ):
        self.scheduler = scheduler
        self.predict = predict
        self.prediction_type = "flow"
        self.weighting, self.logit_mean, self.logit_std, self.mode_scale = weighting, logit_mean, logit_std, mode_scale
        self.num_timesteps = scheduler.config.num_train_timesteps
        # the training schedule: num_train_timesteps sigmas, shifted as the scheduler config says
        self.sigmas = scheduler.sigmas[: self.num_timesteps].float()
        if shift is not None:  # model.timestep_shift: the same shift the scheduler applies, from the plain schedule
            plain = torch.arange(self.num_timesteps, 0, -1, dtype=torch.float32) / self.num_timesteps
            self.sigmas = shift * plain / (1 + (shift - 1) * plain)
        self.timesteps = self.sigmas * self.num_timesteps

    def draw(self, n: int, t: TrainConfig, generator: torch.Generator) -> torch.Tensor:
        """Timesteps by ``model.weighting_scheme``'s density (the family's setting, not ``t``'s)."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(
            self.weighting if self.weighting in ("logit_normal", "mode") else "uniform",
            n,
            logit_mean=self.logit_mean,
            logit_std=self.logit_std,
            mode_scale=self.mode_scale,
            generator=generator,
        )
        return (u * self.num_timesteps).long().clamp(0, self.num_timesteps - 1)

    def sigma(self, steps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        sigma = self.sigmas.to(like.device)[steps.to(like.device)]
        return sigma.reshape(-1, *[1] * (like.ndim - 1)).to(like.dtype)

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        sigma = self.sigma(steps, latents)
        return (1.0 - sigma) * latents + sigma * noise

    def model_timesteps(self, steps: torch.Tensor) -> torch.Tensor:
        return self.timesteps.to(steps.device)[steps]

    def target(self, latents: torch.Tensor, noise: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        return noise - latents

    def weights(self, steps: torch.Tensor, t: TrainConfig) -> torch.Tensor | None:
        if self.weighting not in ("sigma_sqrt", "cosmap"):
            return None
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        return compute_loss_weighting_for_sd3(self.weighting, self.sigmas.to(steps.device)[steps]).float()


def diffusion_loss(
    denoiser,
    objective,
    latents,
    cond,
    generator=None,
    t: TrainConfig | None = None,
    mask: torch.Tensor | None = None,
    draws: tuple | None = None,
) -> torch.Tensor:
    """Per-sample denoising loss at drawn timesteps, against the objective's target
    (``tuner.models.objectives``; ``objective.predict`` calls the family's denoiser).

    Args:
        t: the ``train`` settings: ``loss`` (l2, l1, huber with ``huber_delta``), ``snr_gamma`` and the
            draws' settings (``draw_noise``); the defaults when None.
        mask: (B, 1, h, w) in [0, 1]: the loss is the mean over the masked area only.
        draws: (noise, input_noise, timesteps) from ``draw_noise``; drawn here from ``generator`` when None.
    """
    t = t or TrainConfig()
    if draws is None:
        draws = draw_noise(latents, generator, t, objective)
    noise, input_noise, timesteps = (x.to(latents.device) for x in draws)
    noisy = objective.noisy(latents, input_noise, timesteps)
    prediction = objective.predict(denoiser, noisy, objective.model_timesteps(timesteps), cond).float()
    target = objective.target(latents, noise, timesteps).float()
    if t.loss == "l1":
        per_element = (prediction - target).abs()
    elif t.loss == "huber":
        per_element = F.huber_loss(prediction, target, delta=t.huber_delta, reduction="none")
    else:
        per_element = F.mse_loss(prediction, target, reduction="none")
    if mask is None:
        per_sample = per_element.mean(dim=(1, 2, 3))
    else:
        covered = (mask.sum(dim=(1, 2, 3)) * per_element.shape[1]).clamp_min(1e-6)
        per_sample = (per_element * mask).sum(dim=(1, 2, 3)) / covered
    weights = objective.weights(timesteps, t)
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample.device)
    return per_sample
