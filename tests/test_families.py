"""What one family alone does, against its schedulers and pipelines: SD2's v-prediction target, the flow
families' targets and weights, Flux's shift, SDXL's time ids. What every family does is in
tests/test_conformance.py."""

import pytest
import torch

from tuner.config import ModelConfig
from tuner.models import family_names, get_family


def test_sd2_reads_v_prediction_from_its_scheduler_and_its_target_is_the_velocity(tiny):
    sd2 = get_family("sd2")
    c = sd2.load(tiny("sd2"))
    assert c.prediction_type == "v_prediction"
    latents, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 999])
    abar = c.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = abar.sqrt() * noise - (1 - abar).sqrt() * latents  # Salimans & Ho (2022)
    torch.testing.assert_close(sd2.noise_target(c, latents, noise, t), expected)
    torch.testing.assert_close(
        sd2.noise_target(c, latents, noise, t), c.noise_scheduler.get_velocity(latents, noise, t)
    )
    zero = get_family(sd2.NAME, ModelConfig(zero_terminal_snr=True)).load(tiny(sd2.NAME))
    assert float(zero.noise_scheduler.alphas_cumprod[-1]) < 1e-6  # the last timestep is pure noise


FLOW = [name for name in family_names() if get_family(name).FLOW]


@pytest.mark.parametrize("weighting", ["logit_normal", "sigma_sqrt", "mode"])
@pytest.mark.parametrize("name", FLOW)
def test_flow_target_is_noise_minus_latents_at_the_scheduler_sigmas(tiny, name, weighting):
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    from tuner.config import TrainConfig

    family = get_family(name, ModelConfig(weighting_scheme=weighting))
    c = family.load(tiny(name))
    objective = family.objective(c)
    g = torch.Generator().manual_seed(0)
    steps = objective.draw(4000, TrainConfig(), g)
    assert steps.min() >= 0 and steps.max() < 1000 and steps.unique().numel() > 300
    if weighting == "logit_normal":  # concentrated in the middle of the schedule
        assert ((steps > 250) & (steps < 750)).float().mean() > 0.6
    latents, noise, idx = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), steps[:3]
    sigma = c.noise_scheduler.sigmas[idx].view(-1, 1, 1, 1)
    torch.testing.assert_close(objective.noisy(latents, noise, idx), (1 - sigma) * latents + sigma * noise)
    # diffusers' own forward process at the same timesteps
    timesteps = objective.model_timesteps(idx)
    torch.testing.assert_close(timesteps, c.noise_scheduler.timesteps[idx].float())
    torch.testing.assert_close(
        objective.noisy(latents, noise, idx),
        c.noise_scheduler.scale_noise(latents, timesteps, noise),
        atol=1e-5,
        rtol=0,
    )
    torch.testing.assert_close(objective.target(latents, noise, idx), noise - latents)
    weights = objective.weights(idx, TrainConfig())
    if weighting == "sigma_sqrt":
        torch.testing.assert_close(weights, compute_loss_weighting_for_sd3("sigma_sqrt", sigma.flatten()))
    else:
        assert weights is None


def test_flux_shift_override_matches_the_scheduler_shift(tiny):
    from diffusers import FlowMatchEulerDiscreteScheduler

    family = get_family("flux", ModelConfig(timestep_shift=3.0))
    objective = family.objective(family.load(tiny("flux")))  # Flux's config shifts dynamically: plain sigmas
    reference = FlowMatchEulerDiscreteScheduler(shift=3.0)
    torch.testing.assert_close(objective.sigmas, reference.sigmas[:1000].float())


def test_sdxl_time_ids_are_the_pipelines(tiny):
    sdxl = get_family("sdxl")
    pipe = sdxl.load_pipeline(tiny("sdxl"))
    dataset = {"original_size": [[640, 480], [48, 40]], "crop": [[12, 0], [0, 4]], "bucket": [[512, 384], [32, 32]]}
    got = sdxl.image_cond(dataset)["time_ids"]
    for row, (size, crop, bucket) in enumerate(zip(*dataset.values())):
        expected = pipe._get_add_time_ids(
            (size[1], size[0]),  # (h, w)
            tuple(crop),  # (top, left)
            (bucket[1], bucket[0]),
            dtype=torch.float32,
            text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
        )
        torch.testing.assert_close(got[row : row + 1], expected)
