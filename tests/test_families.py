"""Every model family on a tiny pipeline of its real classes: a DreamBooth LoRA run end to end whose
exported adapter reloads through the family's own diffusers pipeline to the same image, the training
targets against the schedulers and pipelines, and single-file checkpoints as bases."""

import logging

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tests.helpers import PROMPT, image_of, train_in_process
from tuner.config import ModelConfig
from tuner.models import get_family
from tuner.models.tiny import make_tiny_pipeline

FAMILIES = ["sd2", "sdxl", "flux", "sd3"]


def draw(family, pipe):
    """The gallery's image for PROMPT at seed 0 (3 steps, guidance 3), in [0, 1] (H, W, 3)."""
    from tuner.sampling import sample_images

    image = sample_images(pipe, [PROMPT], [0], 32, 3, 3.0, decode=family.decode, **family.call_kwargs())[0]
    return ((image + 1) / 2).permute(1, 2, 0).numpy()


def fresh_pipeline(family, folder):
    """The family's diffusers pipeline from the folder, sampling with the scheduler tuner's gallery uses."""
    pipe = family.load_pipeline(folder)
    pipe.scheduler = family.sampling_scheduler(family.load(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


E2E = pytest.mark.e2e  # the rest of a family matrix: pytest -m e2e (the fast tier keeps one U-Net and one flow family)


@pytest.mark.parametrize("name", [pytest.param(f, marks=E2E) if f in ("sd2", "sd3") else f for f in FAMILIES])
def test_dreambooth_lora_exports_reload_through_the_family_pipeline(tmp_path, tiny, name, caplog):
    """Each LoRA file the family writes (diffusers', and kohya's where the family has it) loads through the
    family's own pipeline with no key left over and draws the trained model's image."""
    from tuner.export.tensors import tuner_layers

    folder = tiny(name)
    # Flux's kohya file fuses q, k, v (and a single block's MLP) as the real model's widths split them, which
    # diffusers' converter assumes: it is read back at those widths in tests/test_kohya_layouts.py; diffusers
    # reads no SD3 kohya file: ComfyUI reads it (tests/test_clients.py), its numbers in test_kohya_layouts.py
    formats = [
        f
        for f in ("diffusers", "kohya")
        if f in get_family(name).EXPORTS and (f == "diffusers" or name in ("sd2", "sdxl"))
    ]
    run = train_in_process(
        tmp_path,
        folder,
        f"model={name}",
        "data.resolution=32",
        "text_encoder.train=lora",
        "train.learning_rate=5e-2",
        f"export.formats=[{','.join(formats)}]",
        *(["model.max_sequence_length=32"] if name in ("flux", "sd3") else []),
        stages="[base,prepare,train,export]",
    )
    family = run.family
    assert type(family).__name__.lower() == name.replace("sd2", "sd2")
    expected = image_of(run, PROMPT)
    base = fresh_pipeline(family, folder)
    assert np.abs(draw(family, base) - expected).max() > 2e-3  # the adapter changes this image
    files = [run.dir / "diffusers" / "pytorch_lora_weights.safetensors"]
    files += [run.dir / "kohya" / f"{run.dir.name}.safetensors"] if "kohya" in formats else []
    for file in files:
        with safe_open(file, "pt") as f:
            keys, meta = list(f.keys()), f.metadata() or {}
        if file.parent.name == "diffusers":
            prefixes = {k.split(".")[0] for k in keys}
            assert prefixes == {family.DENOISER, *family.LORA_TEXT_ENCODERS}, prefixes  # every trained part
            modules = {k.rsplit(".lora_", 1)[0] for k in keys}
            if name == "flux":  # a single block's output trains, the transformer's last projection does not
                assert {"transformer.single_transformer_blocks.0.proj_out", "transformer.proj_out"} & modules == {
                    "transformer.single_transformer_blocks.0.proj_out"
                }
        else:  # kohya's names, and what A1111 and Forge sort the file by
            modules = {k.split(".")[0] for k in keys}
            assert {k.split("_")[1] for k in modules} == {"unet", *({"te1", "te2"} if name == "sdxl" else {"te"})}
            assert meta["ss_v2"] == str(name == "sd2") and meta["ss_base_model_version"] == family.BASE_VERSION
            assert meta["modelspec.architecture"] == f"{family.MODELSPEC_ARCHITECTURE}/lora"
        pipe = fresh_pipeline(family, folder)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            pipe.load_lora_weights(file.parent, weight_name=file.name)
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert not [w for w in warnings if "lora" in w.lower() or "key" in w.lower()], (file, warnings)
        applied = sum(len(tuner_layers(getattr(pipe, c))) for c in (family.DENOISER, *family.TEXT_ENCODERS))
        assert applied == len(modules), file  # no key left unloaded
        np.testing.assert_allclose(draw(family, pipe), expected, atol=1e-3, err_msg=str(file))


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
    zero = get_family("sd2", ModelConfig(zero_terminal_snr=True)).load(tiny("sd2"))
    assert float(zero.noise_scheduler.alphas_cumprod[-1]) < 1e-6  # the last timestep is pure noise


@pytest.mark.parametrize("name, weighting", [("flux", "logit_normal"), ("sd3", "sigma_sqrt"), ("sd3", "mode")])
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


@pytest.mark.parametrize("name", ["sd15", pytest.param("sd2", marks=E2E), pytest.param("sdxl", marks=E2E)])
def test_a_single_file_checkpoint_loads_as_the_base_and_draws_the_folders_images(tmp_path, tiny, name):
    from safetensors.torch import save_file

    from tuner.checks import validate
    from tuner.compose import compose
    from tuner.runner import BUILTINS, entries, run_stage
    from tuner.stages.context import Run

    folder = make_tiny_pipeline(tmp_path / "pipe", family=name, size="layout") if name != "sdxl" else tiny(name)
    family = get_family(name)
    c = family.load(folder)
    vocab = {n: m.config.vocab_size for n, m in c.text_encoders.items()}
    file = tmp_path / "model.safetensors"
    save_file(family.single_file_state(c.modules(), vocab), file)  # the layout A1111 and ComfyUI read

    def run_of(*overrides):
        cfg = compose(
            "generate",
            [f"model={name}", "data.resolution=32", f"home={tmp_path / 'home'}", "generate.prompts=[x]", *overrides],
        )
        validate(cfg)
        run = Run(cfg, entries(cfg), BUILTINS)
        run_stage(run, "base")
        return run

    with pytest.raises(Exception, match="model.config"):
        run_of(f"model.path={file}", f"output_dir={tmp_path / 'x'}")
    from_file = run_of(f"model.path={file}", f"model.config={folder}", f"output_dir={tmp_path / 'a'}")
    assert from_file.base.parent == tmp_path / "home" / "single_file"
    from_folder = run_of(f"model.path={folder}", f"output_dir={tmp_path / 'b'}")
    a = from_file.sample([PROMPT], [0], steps=3, guidance=3.0)
    b = from_folder.sample([PROMPT], [0], steps=3, guidance=3.0)
    assert a.std() > 0.01
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    again = run_of(f"model.path={file}", f"model.config={folder}", f"output_dir={tmp_path / 'c'}")
    assert again.base == from_file.base  # converted once
