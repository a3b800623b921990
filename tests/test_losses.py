"""Loss options of the training loop against independent computations, and the optimizer choices."""

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from peft import LoraConfig

from tuner.config import TrainConfig
from tuner.models import get_family
from tuner.models.objectives import diffusion_loss
from tuner.training.batches import Batch
from tuner.training.loop import Training

sd15 = get_family("sd15")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_the_formula(tiny_pipeline_dir, prediction_type):
    c = sd15.load(tiny_pipeline_dir, prediction_type=prediction_type)
    t = torch.tensor([0, 50, 300, 700, 999])
    abar = c.noise_scheduler.alphas_cumprod[t].double()
    snr = abar / (1 - abar)
    expected = torch.minimum(snr, torch.tensor(5.0)) / (snr + 1 if prediction_type == "v_prediction" else snr)
    got = sd15.objective(c).weights(t, TrainConfig(snr_gamma=5.0))
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)
    assert got[0] < 0.1 and got.max() <= 1 + 1e-6  # low-noise steps are down-weighted, none up-weighted


@pytest.mark.parametrize(
    "loss",
    [TrainConfig(loss="l1"), TrainConfig(loss="huber", huber_delta=0.3), TrainConfig(snr_gamma=2.0, noise_offset=0.1)],
)
def test_loss_options_match_an_independent_computation(tiny_pipeline_dir, loss):
    c = sd15.load(tiny_pipeline_dir)
    latents, embeds = torch.randn(3, 4, 8, 8), torch.randn(3, c.tokenizer.model_max_length, 16)
    got = diffusion_loss(c.unet, sd15.objective(c), latents, embeds, torch.Generator().manual_seed(7), loss)

    g = torch.Generator().manual_seed(7)
    noise = torch.randn(latents.shape, generator=g)
    if loss.noise_offset:
        noise = noise + loss.noise_offset * torch.randn(3, 4, 1, 1, generator=g)
    t = torch.randint(0, 1000, (3,), generator=g)
    abar = c.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    with torch.no_grad():
        pred = c.unet(abar.sqrt() * latents + (1 - abar).sqrt() * noise, t, encoder_hidden_states=embeds).sample
    err = pred - noise
    if loss.loss == "l1":
        expected = err.abs()
    elif loss.loss == "huber":
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

    settings = TrainConfig(max_steps=3, learning_rate=1e-2, lr_scheduler="linear", log_every=1, optimizer=optimizer)
    result = Training(accelerator, c.unet, c.unet.parameters(), sd15.objective(c), next_batch, settings, seed=0).train()
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    assert len(calls) == 3 * accumulation and len(result.losses) == 3
    after = c.unet.state_dict()
    assert all(not torch.equal(after[k], v) for k, v in before.items())


def test_v_prediction_target_is_the_velocity(tiny_pipeline_dir):
    c = sd15.load(tiny_pipeline_dir, prediction_type="v_prediction")
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([10, 400, 990])
    abar = c.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = abar.sqrt() * noise - (1 - abar).sqrt() * latents  # Salimans & Ho (2022)
    got = sd15.noise_target(c, latents, noise, t)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, c.noise_scheduler.get_velocity(latents, noise, t))


def test_masked_loss_with_input_perturbation_matches_an_independent_computation(tiny_pipeline_dir):
    """Loss only where the mask is on; the U-Net sees perturbed noise while the target stays the noise."""
    c = sd15.load(tiny_pipeline_dir)
    latents, embeds = torch.randn(2, 4, 8, 8), torch.randn(2, c.tokenizer.model_max_length, 16)
    mask = torch.zeros(2, 1, 8, 8)
    mask[0, :, :, :4] = 1  # left half of the first image
    mask[1] = 1  # all of the second
    settings = TrainConfig(input_perturbation=0.2)
    got = diffusion_loss(c.unet, sd15.objective(c), latents, embeds, torch.Generator().manual_seed(3), settings, mask)

    g = torch.Generator().manual_seed(3)
    noise = torch.randn(latents.shape, generator=g)
    perturbed = noise + 0.2 * torch.randn(latents.shape, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    abar = c.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    with torch.no_grad():
        pred = c.unet(abar.sqrt() * latents + (1 - abar).sqrt() * perturbed, t, encoder_hidden_states=embeds).sample
    err = (pred - noise) ** 2
    expected = torch.stack([err[0, :, :, :4].mean(), err[1].mean()])
    torch.testing.assert_close(got.detach(), expected, rtol=1e-4, atol=1e-6)


def test_timesteps_stay_in_range_and_follow_the_bias():
    from diffusers import DDPMScheduler

    from tuner.models.objectives import NoiseObjective

    draw_timesteps = NoiseObjective(DDPMScheduler(), "epsilon", None).draw

    g = torch.Generator().manual_seed(0)
    ranged = draw_timesteps(5000, TrainConfig(min_timestep=200, max_timestep=400), g)
    assert ranged.min() >= 200 and ranged.max() < 400 and ranged.unique().numel() > 150
    bias = {"timestep_bias_multiplier": 3.0, "timestep_bias_portion": 0.25}
    later = draw_timesteps(20000, TrainConfig(timestep_bias="later", **bias), g)
    share = (later >= 750).float().mean().item()
    assert abs(share - 0.75 / (0.75 + 0.75)) < 0.02  # 250 timesteps at weight 3 vs 750 at weight 1
    earlier = draw_timesteps(20000, TrainConfig(timestep_bias="earlier", **bias), g)
    assert abs((earlier < 250).float().mean().item() - 0.5) < 0.02


def test_prior_batches_hold_both_sets_and_the_loss_is_the_weighted_sum():
    from tuner.training.batches import LatentCache, SampleSet, draw_batch, merge_by_shape

    def cache(value, n):
        return LatentCache(torch.full((n, 4, 2, 2), value), torch.zeros(n, 4, 2, 2), scaling_factor=1.0)

    cond = torch.arange(3.0).view(3, 1, 1)  # caption k embeds as the value k
    instance = SampleSet(cache(1.0, 5), cond, caption=torch.tensor([0, 0, 0, 1, 1]), weight=1.0)
    prior = SampleSet(cache(-1.0, 7), cond, caption=torch.full((7,), 2), weight=0.5)
    generator = torch.Generator().manual_seed(0)
    for _ in range(6):  # two epochs of the instance set (batches of 3 and 2), and then some
        [batch] = merge_by_shape(draw_batch([instance, prior], batch_size=3, generator=generator))
        is_instance = batch.latents.flatten(1)[:, 0] == 1
        n = int(is_instance.sum())
        assert 1 <= n <= 3 and 1 <= len(batch.latents) - n <= 3
        assert is_instance[:n].all()  # instance samples first, then class samples
        assert set(batch.cond[:n].flatten().tolist()) <= {0.0, 1.0} and batch.cond[n:].eq(2).all()
        per_sample = torch.rand(len(batch.latents), generator=generator)
        loss = (batch.weights * per_sample).sum()
        torch.testing.assert_close(loss, per_sample[:n].mean() + 0.5 * per_sample[n:].mean())
        assert batch.mask is None


def _train_on_a_fixed_batch(tiny_pipeline_dir, steps, callback=None, **settings):
    """LoRA on one fixed batch; returns the adapter's loss at fixed noise before and after, and the result."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    c = sd15.load(tiny_pipeline_dir)
    torch.manual_seed(0)  # the adapter's init: the same whatever ran before in this process
    c.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_v"]))
    g = torch.Generator().manual_seed(0)
    latents, embeds = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 48, 16, generator=g)

    def fixed_loss():
        with torch.no_grad():
            loss = diffusion_loss(c.unet, sd15.objective(c), latents, embeds, torch.Generator())
        return loss.mean().item()

    def next_batch(generator):
        if callback:
            callback(c.unet)
        return Batch(latents, embeds, torch.full((4,), 0.25))

    before = fixed_loss()
    result = Training(
        Accelerator(),
        c.unet,
        c.unet.parameters(),
        sd15.objective(c),
        next_batch,
        TrainConfig(max_steps=steps, log_every=steps, **settings),
        seed=0,
    ).train()
    return before, fixed_loss(), result, c.unet


@pytest.mark.parametrize(
    "settings",
    [
        {"optimizer": "adamw8bit", "learning_rate": 1e-2},
        {"optimizer": "prodigy", "learning_rate": 1.0},
        {"optimizer": "adamw", "learning_rate": 1e-2, "lr_scheduler": "one_cycle"},
    ],
)
def test_optimizers_lower_the_loss(tiny_pipeline_dir, settings):
    before, after, _, _ = _train_on_a_fixed_batch(tiny_pipeline_dir, 40, **settings)
    assert after < 0.9 * before, (before, after)


def test_ema_equals_the_closed_form(tiny_pipeline_dir):
    """diffusers' EMAModel: shadow = p_1 at step 1, then decay_n = min(decay, n / (n + 9)) per step n."""
    seen = []  # the trained tensors as each step starts = after each previous optimizer step

    def record(unet):
        seen.append([p.detach().clone() for p in unet.parameters() if p.requires_grad])

    _, _, result, unet = _train_on_a_fixed_batch(
        tiny_pipeline_dir, 5, callback=record, optimizer="adamw", learning_rate=1e-2, ema_decay=0.7
    )
    after = [[p.detach().clone() for p in unet.parameters() if p.requires_grad]]
    steps = (seen + after)[1:]  # the parameters after steps 1..5
    shadow = steps[0]
    for n, params in enumerate(steps[1:], start=2):
        decay = min(0.7, n / (n + 9))
        shadow = [decay * s + (1 - decay) * p for s, p in zip(shadow, params)]
    for expected, got in zip(shadow, result.ema.shadow_params):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_caption_dropout_and_tag_shuffling():
    from tuner.training.batches import Captions

    texts = ["sks dog, grass, sun, red collar", "sks dog, snow", ""]
    rows = torch.arange(3.0).view(3, 1)
    generator = torch.Generator().manual_seed(0)
    dropped = Captions(texts, rows, dropout=0.25).lookup(torch.zeros(4000, dtype=torch.long), generator)
    assert abs((dropped == 2).float().mean().item() - 0.25) < 0.03 and set(dropped.flatten().tolist()) == {0.0, 2.0}

    seen = []
    shuffling = Captions(texts, rows, shuffle=True, keep=1, tokenize=lambda batch: seen.extend(batch) or len(batch))
    assert shuffling.lookup(torch.zeros(200, dtype=torch.long), generator) == 200
    assert all(t.startswith("sks dog, ") for t in seen)  # the first tag stays in place
    assert {frozenset(t.split(", ")) for t in seen} == {frozenset(texts[0].split(", "))}  # no tag lost
    assert len(set(seen)) == 6  # all orders of the three other tags appear
