"""Every method on every family beyond SD1.5 (which tests/test_methods.py covers in depth): it trains, exports
``merged``, and the merged pipeline folder, loaded by the family's own diffusers pipeline, draws what the
trained model drew. The diffusers LoRA file (LoRA, DoRA, text-encoder LoRA) loaded onto the base draws the
same too."""

import numpy as np
import pytest
import torch

from tests.helpers import PROMPT, image_of, train_in_process

METHODS = {
    "lora": [],
    "dora": ["adapter.use_dora=true"],
    "loha": ["adapter=loha"],
    "lokr": ["adapter=lokr", "adapter.rank=4"],
    "locon": ["adapter.targets=locon"],  # the U-Net families' convolutions too
    "partial": ["adapter=partial_unet"],  # the family's default blocks
    "full": ["adapter=full"],
    "text_encoder_lora": ["text_encoder.train=lora", "adapter=none"],
}
FAMILIES = ["sd2", "sdxl", "flux", "sd3"]
CASES = [(f, m) for f in FAMILIES for m in METHODS if not (m == "locon" and f in ("flux", "sd3"))]


def draw(family, pipe) -> np.ndarray:
    from tuner.sampling import sample_images

    image = sample_images(pipe, [PROMPT], [0], 32, 3, 3.0, decode=family.decode, **family.call_kwargs())[0]
    return ((image + 1) / 2).permute(1, 2, 0).numpy()


def pipeline_of(family, folder, base):
    pipe = family.load_pipeline(folder)
    pipe.scheduler = family.sampling_scheduler(family.load(base))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.e2e
@pytest.mark.parametrize("name, method", CASES)
def test_every_method_on_every_family_exports_and_reloads_to_the_trained_image(tmp_path, tiny, name, method):
    base = tiny(name)
    extra = ["model.max_sequence_length=32"] if name in ("flux", "sd3") else []
    lora = method in ("lora", "dora", "text_encoder_lora")
    run = train_in_process(
        tmp_path, base, f"model={name}", "data.resolution=32", "train.learning_rate=5e-2", *METHODS[method], *extra,
        f"export.formats=[merged{',diffusers' if lora else ''}]", stages="[base,prepare,train,export]",
    )  # fmt: skip
    family = run.family  # with the run's model settings (the T5 prompt length of the tiny Flux and SD3)
    expected = image_of(run, PROMPT)
    assert np.abs(draw(family, pipeline_of(family, base, base)) - expected).max() > 2e-3  # it learned something
    merged = pipeline_of(family, run.dir / "merged", base)
    np.testing.assert_allclose(draw(family, merged), expected, atol=2e-3)
    if lora:  # diffusers' own LoRA file, onto the base
        pipe = pipeline_of(family, base, base)
        pipe.load_lora_weights(run.dir / "diffusers", weight_name="pytorch_lora_weights.safetensors")
        np.testing.assert_allclose(draw(family, pipe), expected, atol=2e-3)


@pytest.mark.e2e
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_gradient_checkpointing_gives_the_same_adapters_in_every_family(tmp_path, tiny, name, quantize):
    """The denoiser's and text encoders' LoRA after 2 steps with and without gradient checkpointing (on an NF4
    base too): the same tensors, to float round-off."""
    from peft.utils import get_peft_model_state_dict

    both = [
        f"model={name}", "data.resolution=32", "train.max_steps=2", "text_encoder.train=lora",
        *([f"model.quantize={quantize}"] if quantize else []),
        *(["model.max_sequence_length=32"] if name in ("flux", "sd3") else []),
    ]  # fmt: skip
    plain = train_in_process(tmp_path, tiny(name), *both, name="plain")
    ckpt = train_in_process(tmp_path, tiny(name), *both, "train.gradient_checkpointing=true", name="ckpt")
    # (diffusers refuses enable_gradient_checkpointing on a model without it: the run would fail)
    adapted = {part: m for part, m in plain.components.trainable().items() if getattr(m, "peft_config", None)}
    assert plain.family.DENOISER in adapted and len(adapted) > 1  # the denoiser and a text encoder
    for part, module in adapted.items():
        a = get_peft_model_state_dict(module)
        b = get_peft_model_state_dict(ckpt.components.trainable()[part])
        assert a, part
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=f"{part} {key}")
