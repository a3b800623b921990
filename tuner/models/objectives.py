"""Training objectives: how latents are noised, what the denoiser predicts, how samples are weighed.

    NoiseObjective  DDPM-type schedules (SD1.x, SD2.x, SDXL): integer timesteps, the target is the
                    noise (epsilon) or the velocity (v_prediction, the scheduler's ``get_velocity``)
    FlowObjective   flow matching (Flux, SD3): x_t = (1 - sigma) x + sigma noise with the scheduler's
                    (shifted) sigmas, the target is noise - x; timesteps drawn uniformly or by
                    diffusers' SD3 density (logit_normal, mode), losses weighted by its scheme (sigma_sqrt, cosmap)

Both draw a step's timesteps on the CPU from the loop's generator (``draw``), as integer indices into
the schedule, so every rank of a run draws the same global batch. ``predict`` is the family's call of
its denoiser (``Family.predict``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class LossSettings:
    # l2 | l1 | huber, per element against the family's target
    kind: str = "l2"
    huber_delta: float = 0.1
    # min-SNR-gamma weighting (Hang et al. 2023); None: uniform
    snr_gamma: float | None = None
    # adds noise_offset * N(0, 1) per sample and channel to the noise (brighter darks, darker lights)
    noise_offset: float = 0.0
    # the U-Net's input is noised with noise + input_perturbation * N(0, 1); the target keeps the noise
    input_perturbation: float = 0.0
    # timesteps drawn from [min_timestep, max_timestep) (None: the scheduler's last), uniformly unless
    # timestep_weights (one weight per timestep) is given
    min_timestep: int = 0
    max_timestep: int | None = None
    timestep_weights: torch.Tensor | None = None


def draw_noise(latents: torch.Tensor, generator, loss: LossSettings, objective):
    """A step's random draws for ``latents``, on the CPU from ``generator`` in a fixed order (noise, offset,
    perturbation, timesteps): the same draws on every device and, for a global batch, on every rank.

    Returns (noise, input_noise, timesteps): the target uses ``noise``, the U-Net's input ``input_noise``.
    """
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype)
    if loss.noise_offset:
        noise += loss.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator, dtype=noise.dtype)
    input_noise = noise
    if loss.input_perturbation:
        input_noise = noise + loss.input_perturbation * torch.randn(latents.shape, generator=generator)
    timesteps = objective.draw(len(latents), loss, generator)
    return noise, input_noise, timesteps


class NoiseObjective:
    def __init__(self, scheduler, prediction_type: str, predict: Callable):
        self.scheduler = scheduler
        self.prediction_type = prediction_type
        self.predict = predict
        self.num_timesteps = scheduler.config.num_train_timesteps

    def draw(self, n: int, loss, generator: torch.Generator) -> torch.Tensor:
        """Timesteps in [min_timestep, max_timestep), uniformly or by ``loss.timestep_weights``."""
        high = loss.max_timestep or self.num_timesteps
        if loss.timestep_weights is None:
            return torch.randint(loss.min_timestep, high, (n,), generator=generator)
        weights = loss.timestep_weights.clone()
        weights[: loss.min_timestep] = 0
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

    def weights(self, steps: torch.Tensor, loss) -> torch.Tensor | None:
        """min-SNR-gamma loss weights when ``loss.snr_gamma`` is set: min(SNR, gamma) / SNR for epsilon,
        / (SNR + 1) for v-prediction."""
        if not loss.snr_gamma:
            return None
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.scheduler, steps)
        clipped = torch.clamp(snr, max=loss.snr_gamma)
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

    def draw(self, n: int, loss, generator: torch.Generator) -> torch.Tensor:
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

    def weights(self, steps: torch.Tensor, loss) -> torch.Tensor | None:
        if self.weighting not in ("sigma_sqrt", "cosmap"):
            return None
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        return compute_loss_weighting_for_sd3(self.weighting, self.sigmas.to(steps.device)[steps]).float()
