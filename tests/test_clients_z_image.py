"""Z-Image's files in InvokeAI 6.14, run there by its own loading code (``TUNER_INVOKEAI_PYTHON``, an environment
with ``pip install invokeai``; tests/clients/z_image_invokeai_check.py), as tests/test_clients_2026.py does for the
other 2026 families.

The base has Z-Image's real widths (3840 wide, Qwen3-4B's 2560-wide prompt states) with one main layer and one of
each refiner, trained two steps by ``python -m tuner``. InvokeAI's probe must call the diffusers file a Z-Image LoRA
and its loader and ``LayerPatcher`` must put every module into the transformer, to peft's merge of the run's
adapter; its probe must call the single file a Z-Image main model and its checkpoint loader read it whole (built at
the base's depth: InvokeAI writes Z-Image's 30 layers in) to the trained transformer. The kohya file (ComfyUI's
names, q, k, v fused) is not one InvokeAI takes: it reads Z-Image LoRAs by diffusers' names only, as the check
says.

    pytest -m clients tests/test_clients_z_image.py
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import ROOT, make_photos, run_tuner
from tests.test_clients_2026 import ATOL, invokeai_python
from tuner.models.z_image import ZImage

pytestmark = pytest.mark.clients
NAME = ZImage.NAME


def build_base(folder):
    """Z-Image's transformer at its real widths with one main layer and one refiner of each kind; a two-layer Qwen3
    at the 2560 width with a tiny MLP; the tiny VAE and tokenizer of its tiny pipeline. 0.55 B parameters."""
    from diffusers import ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from tuner.models.tiny import save_pipeline

    components = ZImage().build_tiny(0)
    torch.manual_seed(0)
    components["transformer"] = ZImageTransformer2DModel(n_layers=1, n_refiner_layers=1)  # else Z-Image's config
    tokenizer = components["tokenizer"]
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=2560, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    components["text_encoder"] = Qwen3Model(config)
    save_pipeline(components, folder, NAME)
    return folder


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    from diffusers import ZImageTransformer2DModel
    from peft import PeftModel

    from tuner.models import family_names, register, unregister

    python = invokeai_python()
    added = NAME not in family_names()
    if added:  # the registry does not list it yet: here, and in the run's process
        register(ZImage)
        os.environ["TUNER_FAMILIES"] = f"{ZImage.__module__}:{ZImage.__name__}"
    root = tmp_path_factory.mktemp("invokeai-z_image")
    base = build_base(root / "base")
    done = run_tuner(
        "recipe=lora", f"model={NAME}", f"model.path={base}", f"data.instance_dir={make_photos(root / 'photos')}",
        "data.instance_prompt='a photo of sks ball'", "data.resolution=32", "train.max_steps=2",
        "train.learning_rate=1e-2", "validation.every=0", "log.tensorboard=false", *ZImage.TINY_OPTIONS,
        "adapter.targets=attn_ff", "export.formats=[diffusers,kohya,peft,single_file]",
        "stages=[base,prepare,train,export]", f"output_dir={root / 'run'}", home=root / "home", cwd=root,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    transformer = ZImageTransformer2DModel.from_pretrained(base / "transformer").eval()
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    merged = PeftModel.from_pretrained(transformer, root / "run" / "peft" / "transformer").merge_and_unload()
    expected = {k: v.detach().contiguous() for k, v in merged.state_dict().items()}
    moved = sorted(k for k, v in expected.items() if not torch.equal(v, before[k]))
    save_file(expected, root / "expected.safetensors")
    del transformer, merged, expected, before
    spec = {
        "base": str(base / "transformer"), "expected": str(root / "expected.safetensors"),
        "loras": {fmt: str(next((root / "run" / fmt).glob("*.safetensors"))) for fmt in ("diffusers", "kohya")},
        "single_file": str(next((root / "run" / "single_file").glob("*.safetensors"))),
    }  # fmt: skip
    (root / "spec.json").write_text(json.dumps(spec))
    ran = subprocess.run(
        [python, str(ROOT / "tests" / "clients" / "z_image_invokeai_check.py"), str(root / "spec.json"),
         str(root / "i")], capture_output=True, text=True, timeout=900, cwd=root,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-4000:]
    yield json.loads((root / "i.json").read_text()), moved
    if added:
        unregister(NAME)
        os.environ.pop("TUNER_FAMILIES", None)


def test_invokeai_applies_the_diffusers_file_as_peft_merges_it(checked):
    report, moved = checked
    lora = report["loras"]["diffusers"]
    assert lora["probe"] == {"type": "lora", "base": ZImage.CLIENTS["invokeai"]["base"]}
    assert lora["not_loaded"] == [] and lora["missing"] == []
    assert lora["layers"] == lora["modules"] > 0 and len(moved) >= 8
    assert lora["max_diff"] <= ATOL, lora
    assert lora["changed"] == len(moved)  # every weight the adapter moves, and nothing else


def test_invokeai_does_not_take_the_kohya_file(checked):
    """ComfyUI's names (``lora_unet_layers_0_attention_qkv``): InvokeAI reads Z-Image LoRAs by diffusers' module
    names only (and kohya-style ones as ``lora_unet__layers_0_attention_to_q``); give it the diffusers file."""
    report, _ = checked
    assert report["loras"]["kohya"]["probe"]["base"] != ZImage.CLIENTS["invokeai"]["base"]


def test_invokeai_reads_the_single_file_as_the_trained_transformer(checked):
    report, moved = checked
    single = report["single_file"]
    assert single["probe"] == {"type": "main", "base": ZImage.CLIENTS["invokeai"]["base"]}
    assert single["dropped"] == [] and single["unloaded"] == [] and single["missing"] == [] and single["added"] == []
    assert single["max_diff"] <= ATOL and single["changed"] == len(moved), single
