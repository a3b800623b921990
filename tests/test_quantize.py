"""A quantized frozen base (``model.quantize``, ``model.quantize_text_encoders``): bitsandbytes' NF4 / int8 layers
under peft's LoRA, on this CPU. Only the adapters train; every export is computed on the base's own weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import train_in_process
from tuner.compose import compose
from tuner.errors import ConfigError


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_lora_on_a_quantized_base_trains_only_the_adapter_and_exports_on_the_unquantized_base(
    tmp_path, tiny_pipeline_dir, kind
):
    from diffusers import UNet2DConditionModel
    from peft import PeftModel

    from tuner.export.tensors import tuner_layers
    from tuner.models.quantize import is_quantized

    run = train_in_process(
        tmp_path,
        tiny_pipeline_dir,
        f"model.quantize={kind}",
        f"model.quantize_text_encoders={kind}",
        "text_encoder.train=lora",
        "export.formats=[peft,merged]",
    )
    c = run.components
    assert is_quantized(c.unet) and is_quantized(c.text_encoder)
    layers = tuner_layers(c.unet)
    bases = [layer.get_base_layer() for layer in layers.values()]
    assert any(is_quantized(b) for b in bases)  # every linear layer under a LoRA is bitsandbytes' (convs stay)
    assert all(is_quantized(b) or isinstance(b, torch.nn.Conv2d) for b in bases)
    trained = [n for m in c.modules().values() for n, p in m.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained), [n for n in trained if "lora_" not in n]

    # merged/: the base's fp32 weights from its folder plus the adapter, as peft merges it there
    base = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir / "unet").eval()
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    expected = PeftModel.from_pretrained(base, run.dir / "peft" / "unet").merge_and_unload().state_dict()
    merged = load_file(run.dir / "merged" / "unet" / "diffusion_pytorch_model.safetensors")
    assert merged.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=0, atol=1e-6, msg=key)
    # a frozen quantized layer with no adapter is written as the base holds it, not as NF4 / int8 approximates it
    untouched = "time_embedding.linear_1.weight"
    assert type(c.unet.time_embedding.linear_1).__module__.startswith("bitsandbytes")
    assert torch.equal(merged[untouched], frozen[untouched])


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["model.quantize=fp8"], "model.quantize=fp8"),
        (["model.quantize=nf4", "adapter=full"], r"model\.quantize=nf4.*adapter=full"),
        (["model.quantize=nf4", "adapter=partial_unet"], r"model\.quantize=nf4.*adapter=partial_unet"),
        (["model.quantize=int8", "adapter=loha"], r"model\.quantize=int8.*loha"),
        (["model.quantize_text_encoders=nf4", "adapter=none", "text_encoder.train=full"], "text_encoder.train=full"),
    ],
)
def test_quantizing_what_trains_or_what_peft_cannot_wrap_is_refused_before_loading(overrides, match):
    from tuner.checks import validate

    with pytest.raises(ConfigError, match=match):
        validate(compose("quickstart", overrides))


@pytest.mark.e2e
def test_a_quantized_run_with_an_8bit_optimizer_samples_exports_and_exits(tmp_path, tiny_pipeline_dir):
    """``python -m tuner`` with an NF4 denoiser, an int8 text encoder and bitsandbytes' 8-bit AdamW: it trains,
    samples its validation images with the quantized layers in eval mode, exports, and the process exits."""
    from tests.helpers import make_photos, run_tuner

    done = run_tuner(
        "recipe=dreambooth_lora",
        "model=sd15",
        f"model.path={tiny_pipeline_dir}",
        f"data.instance_dir={make_photos(tmp_path / 'photos')}",
        "data.instance_prompt='a photo of sks ball'",
        "data.resolution=32",
        "train.max_steps=4",
        "validation.every=2",
        "model.quantize=nf4",
        "model.quantize_text_encoders=int8",
        "train.optimizer=adamw8bit",
        f"output_dir={tmp_path / 'run'}",
        home=tmp_path / "home",
        cwd=tmp_path,
        timeout=300,  # a process that hangs at exit fails here
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "unet's" in done.stdout and "held as nf4" in done.stdout
    assert (tmp_path / "run" / "kohya" / "run.safetensors").is_file()
    assert list((tmp_path / "run" / "validation").rglob("*.png")), "no validation sample was drawn"
