"""The shared training loop with a peft LoRA: only the adapter learns, the base stays bit-identical."""

import torch
from accelerate import Accelerator
from peft import LoraConfig

from tuner.config import TrainConfig
from tuner.models import get_family
from tuner.training.batches import Batch, LatentCache
from tuner.training.loop import Training
from tuner.training.setup import StepModel, TrainingSetup, set_up

sd15 = get_family("sd15")


def test_lora_training_changes_only_the_adapter(tiny_pipeline_dir):
    c = sd15.load(tiny_pipeline_dir)
    before = {k: v.clone() for k, v in c.unet.state_dict().items()}
    latents, embeds = torch.randn(4, 4, 8, 8), torch.randn(4, c.tokenizer.model_max_length, 16)
    with torch.no_grad():
        reference = c.unet(latents, torch.tensor([500] * 4), encoder_hidden_states=embeds).sample
    c.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_v"]))

    def next_batch(generator):
        return Batch(latents, embeds, torch.full((4,), 0.25))

    t = TrainConfig(max_steps=6, learning_rate=1e-2, log_every=3)
    setup = set_up(Accelerator(), StepModel(c.unet, sd15.objective(c)), c.unet.parameters(), t, next_batch, seed=0)
    assert isinstance(setup, TrainingSetup) and setup.params and all("lora_" in n for n in setup.names)
    result = Training(setup).train()
    assert len(result.losses) == 2 and all(loss > 0 for loss in result.losses)
    after = c.unet.state_dict()
    lora_keys = [k for k in after if "lora_" in k]
    assert lora_keys and all(not torch.equal(after[k], torch.zeros_like(after[k])) for k in lora_keys if "lora_B" in k)
    base_keys = [k for k in after if "lora_" not in k]
    for key in base_keys:
        name = key.replace(".base_layer", "")
        assert torch.equal(after[key], before[name]), key
    with torch.no_grad():
        tuned = c.unet(latents, torch.tensor([500] * 4), encoder_hidden_states=embeds).sample
        c.unet.disable_adapters()
        disabled = c.unet(latents, torch.tensor([500] * 4), encoder_hidden_states=embeds).sample
    assert (tuned - reference).abs().max() > 1e-4
    torch.testing.assert_close(disabled, reference, rtol=0, atol=0)


def test_latent_cache_samples_are_scaled_draws_of_the_posterior():
    mean, std = torch.full((2, 4, 2, 2), 3.0), torch.full((2, 4, 2, 2), 0.5)
    cache = LatentCache(mean, std, scaling_factor=0.25)
    draws = torch.stack([cache.sample(torch.tensor([0, 1]), torch.Generator().manual_seed(i)) for i in range(400)])
    assert abs(draws.mean().item() - 0.75) < 0.01
    assert abs(draws.std().item() - 0.125) < 0.01
