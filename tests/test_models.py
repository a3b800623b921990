"""The SD1.x family over a tiny pipeline saved with save_pretrained: the real loading path."""

import json

import pytest
import torch

from tuner.errors import ConfigError
from tuner.models import get_family
from tuner.models.objectives import diffusion_loss
from tuner.models.tiny import char_tokenizer

sd15 = get_family("sd15")


def test_tiny_pipeline_loads_through_diffusers(tiny_pipeline_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, use_safetensors=True)
    image = pipe("a photo of the digit one", height=16, width=16, num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 16, 16, 3)
    assert not list(tiny_pipeline_dir.rglob("*.bin"))  # weights are safetensors only


def test_family_load_freezes_everything(tiny_pipeline_dir):
    c = sd15.load(tiny_pipeline_dir)
    assert c.prediction_type == "epsilon"
    for module in (c.unet, c.vae, c.text_encoder):
        assert not any(p.requires_grad for p in module.parameters())


def test_prompt_encoding_distinguishes_prompts(tiny_pipeline_dir):
    c = sd15.load(tiny_pipeline_dir)
    e = sd15.encode_prompts(c, ["a photo of sks digit seven", "a photo of the digit seven"])
    assert e.shape[:2] == (2, c.tokenizer.model_max_length)
    assert (e[0] - e[1]).abs().max() > 1e-3


def test_char_tokenizer_round_trips_any_lowercase_prompt():
    tok = char_tokenizer(48)
    text = "a photo of sks dog, 2 ears!"
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True).replace(" ", "") == text.replace(" ", "")


def test_v_prediction_target_is_the_velocity_formula(tiny_pipeline_dir):
    c = sd15.load(tiny_pipeline_dir, prediction_type="v_prediction")
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([10, 500, 990])
    abar = c.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = abar.sqrt() * noise - (1 - abar).sqrt() * latents
    torch.testing.assert_close(sd15.noise_target(c, latents, noise, t), expected)


def test_epsilon_loss_matches_an_independent_computation(tiny_pipeline_dir):
    c = sd15.load(tiny_pipeline_dir)
    latents, embeds = torch.randn(2, 4, 8, 8), torch.randn(2, c.tokenizer.model_max_length, 16)
    loss = diffusion_loss(c.unet, sd15.objective(c), latents, embeds, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    abar = c.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    with torch.no_grad():
        pred = c.unet(noisy, t, encoder_hidden_states=embeds).sample
    torch.testing.assert_close(loss.detach(), ((pred - noise) ** 2).mean(dim=(1, 2, 3)), rtol=1e-4, atol=1e-5)


def test_wrong_folders_are_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match="no such folder"):
        sd15.check_folder(tmp_path / "missing")
    with pytest.raises(ConfigError, match="model_index.json"):
        sd15.check_folder(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(ConfigError, match="StableDiffusionXLPipeline"):
        sd15.check_folder(tmp_path)
    with pytest.raises(ConfigError, match="model.family"):
        get_family("sd99")


def test_pickled_weights_load_only_when_allowed(tmp_path, tiny_pipeline_dir):
    """A folder with .bin weights is refused by name; model.allow_pickle=true reads them (weights_only)."""
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_pipeline_dir, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), folder / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(ConfigError, match=r"unet/ has no \.safetensors weights.*model\.allow_pickle=true"):
        sd15.load(folder)
    loaded = sd15.load(folder, allow_pickle=True)
    reference = sd15.load(tiny_pipeline_dir)
    for name, value in reference.unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[name], value), name
