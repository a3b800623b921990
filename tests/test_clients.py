"""tuner's files in the programs people drop them into, run there by those programs' own loading code.

ComfyUI (a checkout named by ``TUNER_COMFYUI``, run by the interpreter ``TUNER_COMFYUI_PYTHON`` of an environment
with its requirements) and InvokeAI (``TUNER_INVOKEAI_PYTHON``, an environment with ``pip install invokeai``:
it pins its own transformers, so never tuner's). Each client runs a script of ``tests/clients/`` in its own
process over SD1.5 at real widths (``tests/clients/bases.py``): what it computes with tuner's files must equal
what peft computes with the same run's adapter (an independent implementation), and it must leave no key of
a file unread. Tests of a client that is not installed are skipped, saying how to install it.

    pytest -m clients
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.clients.bases import build_sd15, inputs
from tests.helpers import ROOT, make_photos, run_tuner

pytestmark = pytest.mark.clients

COMFYUI, COMFYUI_PYTHON = os.environ.get("TUNER_COMFYUI"), os.environ.get("TUNER_COMFYUI_PYTHON")
INVOKEAI_PYTHON = os.environ.get("TUNER_INVOKEAI_PYTHON")

# each method's run: its adapter, and the formats the checks read (the lora run also writes the single file)
RUNS = {
    "lora": ["text_encoder.train=lora", "export.formats=[diffusers,kohya,peft,merged,single_file]"],
    "loha": ["adapter=loha", "export.formats=[kohya,peft]"],
    "lokr": ["adapter=lokr", "export.formats=[kohya,peft]"],
}
# ComfyUI runs CLIP and the U-Net in its own code (its attention, its layer norms): float32 round-off only
ATOL = {"denoiser": 2e-5, "text": 2e-5}  # measured: at most 2.7e-6 (ComfyUI 0.8, InvokeAI 6.14)


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    """The real-width SD1.5 base, a run per method on it, the base as a single file, and the outputs peft
    computes for each run (fixed inputs): what every client must reproduce."""
    from diffusers import UNet2DConditionModel
    from peft import PeftModel
    from transformers import CLIPTextModel

    from tuner.export.tensors import write_safetensors
    from tuner.models.sd15 import SD15

    root = tmp_path_factory.mktemp("clients")
    base, photos = build_sd15(root / "base"), make_photos(root / "photos")
    for name, overrides in RUNS.items():
        done = run_tuner(
            "recipe=lora",
            f"model.path={base}",
            f"data.instance_dir={photos}",
            "data.instance_prompt=a photo of sks ball",
            "data.resolution=64",
            "train.max_steps=2",
            "train.batch_size=1",
            "train.learning_rate=1e-2",  # two large steps: the adapter moves every output far past round-off
            "validation.every=0",
            "log.tensorboard=false",
            "stages=[base,prepare,train,export]",
            f"output_dir={root / name}",
            *overrides,
            home=root / "home",
            cwd=root,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    x = inputs()
    save_file(x, root / "inputs.safetensors")
    unet = UNet2DConditionModel.from_pretrained(base / "unet").eval()
    text = CLIPTextModel.from_pretrained(base / "text_encoder").eval()
    # the base in the single-file layout, written by the same code as tuner's single_file export
    vocab = {"text_encoder": text.config.vocab_size}
    modules = {"unet": unet, "text_encoder": text, "vae": _vae(base)}
    write_safetensors(root / "base.safetensors", SD15().single_file_state(modules, vocab))

    def outputs(unet, text):
        with torch.no_grad():
            denoised = unet(x["latents"], x["timestep"], encoder_hidden_states=x["context"]).sample
            return {"denoiser": denoised, "text": text(input_ids=x["ids"]).last_hidden_state}

    expected = {"base": outputs(unet, text)}
    for name in RUNS:
        peft = root / name / "peft"
        adapted_text = (
            PeftModel.from_pretrained(text, peft / "text_encoder") if (peft / "text_encoder").is_dir() else text
        )
        adapted_unet = PeftModel.from_pretrained(unet, peft / "unet")
        expected[name] = outputs(adapted_unet, adapted_text)
        unet = adapted_unet.unload()  # peft's own way back to the unadapted modules
        text = adapted_text.unload() if adapted_text is not text else text
    return root, expected


def _vae(base: Path):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(base / "vae")


def run_client(python: str | None, script: str, spec: dict, out: Path, needs: str) -> tuple[dict, dict]:
    if not python or not Path(python).exists():
        pytest.skip(needs)
    (out.parent / f"{out.stem}.spec.json").write_text(json.dumps(spec))
    done = subprocess.run(
        [python, str(ROOT / "tests" / "clients" / script), str(out.parent / f"{out.stem}.spec.json"), str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=out.parent,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return load_file(out), json.loads(Path(f"{out}.json").read_text())


def assert_same_as_peft(computed: dict, expected: dict, name: str, key: str) -> None:
    got, want = computed[f"{name}.{key}"], expected[name][key]
    torch.testing.assert_close(got, want, atol=ATOL[key], rtol=1e-4, msg=lambda m: f"{name} {key}: {m}")


COMFYUI_NEEDS = (
    "ComfyUI is not installed: set TUNER_COMFYUI to a checkout of comfyanonymous/ComfyUI and TUNER_COMFYUI_PYTHON "
    "to the python of an environment with its requirements.txt installed"
)
INVOKEAI_NEEDS = (
    "InvokeAI is not installed: set TUNER_INVOKEAI_PYTHON to the python of an environment with "
    "`pip install invokeai` (it pins its own transformers; .ci/run makes one)"
)


@pytest.fixture(scope="module")
def comfyui(sd15):
    root, _ = sd15
    files = {name: str(next((root / name / "kohya").glob("*.safetensors"))) for name in RUNS}
    spec = {
        "comfyui": COMFYUI,
        "checkpoint": str(root / "base.safetensors"),
        "inputs": str(root / "inputs.safetensors"),
    }
    return run_client(
        COMFYUI_PYTHON, "comfyui_check.py", {**spec, "loras": files}, root / "comfyui.safetensors", COMFYUI_NEEDS
    )


def test_comfyui_loads_every_kohya_file_whole_and_computes_what_peft_does(sd15, comfyui):
    _, expected = sd15
    computed, report = comfyui
    assert report["family"] == "SD15"
    for key in ("denoiser", "text"):
        assert_same_as_peft(computed, expected, "base", key)
    for name in RUNS:
        assert report["loras"][name]["not_loaded"] == [], name
        for key in ("denoiser", "text"):
            if name != "lora" and key == "text":
                continue  # only the lora run trains the text encoder
            assert_same_as_peft(computed, expected, name, key)
            moved = (expected[name][key] - expected["base"][key]).abs().max()
            assert moved > 100 * ATOL[key], f"{name} {key}: the adapter moved the output only {moved}"


def test_comfyui_reads_the_single_file_as_sd15_and_draws_the_trained_model(sd15):
    root, expected = sd15
    checkpoint = next((root / "lora" / "single_file").glob("*.safetensors"))
    spec = {"comfyui": COMFYUI, "checkpoint": str(checkpoint), "inputs": str(root / "inputs.safetensors"), "loras": {}}
    computed, report = run_client(COMFYUI_PYTHON, "comfyui_check.py", spec, root / "single.safetensors", COMFYUI_NEEDS)
    assert report["family"] == "SD15"
    # every SD1.5 checkpoint lacks these two (CLIP's image-text head); nothing else may be missing
    assert report["checkpoint"] == ["clip missing: ['clip_l.logit_scale', 'clip_l.transformer.text_projection.weight']"]
    for key in ("denoiser", "text"):
        torch.testing.assert_close(computed[f"base.{key}"], expected["lora"][key], atol=ATOL[key], rtol=1e-4)


def test_invokeai_identifies_and_applies_every_kohya_file_and_reads_the_merged_folder(sd15):
    root, expected = sd15
    files = {name: str(next((root / name / "kohya").glob("*.safetensors"))) for name in RUNS}
    spec = {
        "base": str(root / "base"),
        "merged": str(root / "lora" / "merged"),
        "inputs": str(root / "inputs.safetensors"),
    }
    spec["loras"] = files
    computed, report = run_client(
        INVOKEAI_PYTHON, "invokeai_check.py", spec, root / "invokeai.safetensors", INVOKEAI_NEEDS
    )
    for key in ("denoiser", "text"):
        assert_same_as_peft(computed, expected, "base", key)
    for name in RUNS:
        assert report["loras"][name]["probe"] == {"type": "lora", "base": "sd-1"}, name
        assert report["loras"][name]["not_loaded"] == [], name
        for key in ("denoiser", "text"):
            if name != "lora" and key == "text":
                continue
            assert_same_as_peft(computed, expected, name, key)
    # the merged folder's text encoder, read by InvokeAI's pinned transformers: every weight from the file
    torch.testing.assert_close(computed["merged.text"], expected["lora"]["text"], atol=ATOL["text"], rtol=1e-4)
