"""Loss options of the training loop against independent computations, and the optimizer choices."""

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from peft import LoraConfig

from tuner.models import sd15
from tuner.training.loop import Batch, LoopSettings, LossSettings, diffusion_loss, snr_weights, train_denoiser


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_the_formula(tiny_pipeline_dir, prediction_type):
    c = sd15.load(tiny_pipeline_dir)
    t = torch.tensor([0, 50, 300, 700, 999])
    abar = c.noise_scheduler.alphas_cumprod[t].double()
    snr = abar / (1 - abar)
    expected = torch.minimum(snr, torch.tensor(5.0)) / (snr + 1 if prediction_type == "v_prediction" else snr)
    got = snr_weights(c.noise_scheduler, t, 5.0, prediction_type)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)
    assert got[0] < 0.1 and got.max() <= 1 + 1e-6  # low-noise steps are down-weighted, none up-weighted


@pytest.mark.parametrize(
    "loss", [LossSettings("l1"), LossSettings("huber", huber_delta=0.3), LossSettings(snr_gamma=2.0, noise_offset=0.1)]
)
def test_loss_options_match_an_independent_computation(tiny_pipeline_dir, loss):
    c = sd15.load(tiny_pipeline_dir)
    latents, embeds = torch.randn(3, 4, 8, 8), torch.randn(3, c.tokenizer.model_max_length, 16)
    got = diffusion_loss(
        c.unet, c.noise_scheduler, lambda x, n, t: n, latents, embeds, torch.Generator().manual_seed(7), loss
    )

    g = torch.Generator().manual_seed(7)
    noise = torch.randn(latents.shape, generator=g)
    if loss.noise_offset:
        noise = noise + loss.noise_offset * torch.randn(3, 4, 1, 1, generator=g)
    t = torch.randint(0, 1000, (3,), generator=g)
    abar = c.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    with torch.no_grad():
        pred = c.unet(abar.sqrt() * latents + (1 - abar).sqrt() * noise, t, encoder_hidden_states=embeds).sample
    err = pred - noise
    if loss.kind == "l1":
        expected = err.abs()
    elif loss.kind == "huber":
        d = loss.huber_delta
        expected = torch.where(err.abs() < d, 0.5 * err**2, d * (err.abs() - 0.5 * d))
    else:
        expected = err**2
    expected = expected.mean(dim=(1, 2, 3))
    if loss.snr_gamma:
        snr = (abar / (1 - abar)).flatten()
        expected = expected * torch.clamp(snr, max=loss.snr_gamma) / snr
    torch.testing.assert_close(got.detach(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("optimizer, accumulation", [("adamw8bit", 1), ("sgd", 1), ("adamw", 2)])
def test_optimizers_and_accumulation_train_the_adapter(tiny_pipeline_dir, optimizer, accumulation):
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = Accelerator(gradient_accumulation_steps=accumulation)
    c = sd15.load(tiny_pipeline_dir)
    c.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_v"]))
    before = {k: v.clone() for k, v in c.unet.state_dict().items() if "lora_B" in k}
    calls = []

    def next_batch(generator):
        calls.append(1)
        return Batch(
            torch.randn(2, 4, 8, 8, generator=generator),
            torch.randn(2, 48, 16, generator=generator),
            torch.full((2,), 0.5),
        )

    settings = LoopSettings(steps=3, learning_rate=1e-2, lr_scheduler="linear", log_every=1, optimizer=optimizer)
    result = train_denoiser(
        accelerator, c.unet, c.unet.parameters(), c.noise_scheduler, lambda x, n, t: n, next_batch, settings, seed=0
    )
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    assert len(calls) == 3 * accumulation and len(result.losses) == 3
    after = c.unet.state_dict()
    assert all(not torch.equal(after[k], v) for k, v in before.items())
