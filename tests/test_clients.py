"""tuner's files in the programs people drop them into, run there by those programs' own loading code.

ComfyUI (a checkout named by ``TUNER_COMFYUI``, run by the interpreter ``TUNER_COMFYUI_PYTHON`` of an environment
with its requirements) and InvokeAI (``TUNER_INVOKEAI_PYTHON``, an environment with ``pip install invokeai``:
it pins its own transformers, so never tuner's). Each client runs a script of ``tests/clients/`` in its own
process over a family's base at real widths (``tests/clients/bases.py``): what it computes with tuner's files
must equal what peft computes with the same run's adapter (an independent implementation), and it must leave
no key of a file unread. Tests of a client that is not installed are skipped, saying how to install it.

    pytest -m clients
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.clients.bases import build, inputs
from tests.helpers import ROOT, make_photos, run_tuner

pytestmark = pytest.mark.clients

COMFYUI, COMFYUI_PYTHON = os.environ.get("TUNER_COMFYUI"), os.environ.get("TUNER_COMFYUI_PYTHON")
INVOKEAI_PYTHON = os.environ.get("TUNER_INVOKEAI_PYTHON")
COMFYUI_NEEDS = (
    "ComfyUI is not installed: set TUNER_COMFYUI to a checkout of comfyanonymous/ComfyUI and TUNER_COMFYUI_PYTHON "
    "to the python of an environment with its requirements.txt installed"
)
INVOKEAI_NEEDS = (
    "InvokeAI is not installed: set TUNER_INVOKEAI_PYTHON to the python of an environment with "
    "`pip install invokeai` (it pins its own transformers; .ci/run makes one)"
)

# each method's run: its adapter, and the formats the checks read (the lora run also writes the single file)
RUNS = {
    "lora": ["text_encoder.train=lora", "export.formats=[kohya,peft,merged,single_file]"],
    "loha": ["adapter=loha", "export.formats=[kohya,peft]"],
    "lokr": ["adapter=lokr", "export.formats=[kohya,peft]"],
}
# the clients run the U-Net and CLIP in their own code (their attention, their layer norms): round-off only
ATOL = {"denoiser": 2e-5, "text": 2e-5}  # measured: at most 2.7e-6 (ComfyUI 0.8, InvokeAI 6.14)


@dataclass(frozen=True)
class Client:
    """What each client calls the family, and what its single-file loader may find missing."""

    comfyui: str  # ComfyUI's detected model class
    clip: str  # ComfyUI's key for the family's tokens
    invokeai: str  # InvokeAI's base model type
    runs: tuple[str, ...]  # the methods checked (LoHa and LoKr names do not depend on the family)
    # a regex of the keys it may find missing: CLIP's head, and SD2's last text layer, which diffusers drops
    # (SD2 conditions on the penultimate layer's states)
    missing: str


# CLIP's image-text head, which no conditioning reads: SD1.5 checkpoints never carry it, nor tuner's SD2 files
HEAD = r"(logit_scale|transformer\.text_projection\.weight)"
FAMILIES = {
    "sd15": Client("SD15", "l", "sd-1", ("lora", "loha", "lokr"), rf"clip_l\.{HEAD}"),
    "sd2": Client(
        "SD20", "h", "sd-2", ("lora",), rf"clip_h\.({HEAD}|transformer\.text_model\.encoder\.layers\.23\..*)"
    ),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """The family's real-width base, a run per method on it, the base as a single file, and the outputs peft
    computes for each run on fixed inputs: what every client must reproduce."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from peft import PeftModel
    from transformers import CLIPTextModel

    from tuner.export.tensors import write_safetensors
    from tuner.models import get_family

    name, client = request.param, FAMILIES[request.param]
    root = tmp_path_factory.mktemp(f"clients-{name}")
    base, photos = build(name, root / "base"), make_photos(root / "photos")
    for run in client.runs:
        done = run_tuner(
            "recipe=lora",
            f"model={name}",
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
            f"output_dir={root / run}",
            *RUNS[run],
            home=root / "home",
            cwd=root,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    x = inputs(name)
    save_file(x, root / "inputs.safetensors")
    unet = UNet2DConditionModel.from_pretrained(base / "unet").eval()
    text = CLIPTextModel.from_pretrained(base / "text_encoder").eval()
    # the base in the single-file layout, written by the code tuner's single_file export runs
    modules = {"unet": unet, "text_encoder": text, "vae": AutoencoderKL.from_pretrained(base / "vae")}
    state = get_family(name).single_file_state(modules, {"text_encoder": text.config.vocab_size})
    write_safetensors(root / "base.safetensors", state)

    def outputs(unet, text):
        with torch.no_grad():
            denoised = unet(x["latents"], x["timestep"], encoder_hidden_states=x["context"]).sample
            return {"denoiser": denoised, "text": text(input_ids=x["ids"]).last_hidden_state}

    expected = {"base": outputs(unet, text)}
    for run in client.runs:
        peft = root / run / "peft"
        adapted_text = (
            PeftModel.from_pretrained(text, peft / "text_encoder") if (peft / "text_encoder").is_dir() else text
        )
        adapted_unet = PeftModel.from_pretrained(unet, peft / "unet")
        expected[run] = outputs(adapted_unet, adapted_text)
        unet = adapted_unet.unload()  # peft's own way back to the unadapted modules
        text = adapted_text.unload() if adapted_text is not text else text
    return name, client, root, expected


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


def assert_same(computed: dict, expected: dict, run: str, key: str, what: str | None = None) -> None:
    got, want = computed[f"{what or run}.{key}"], expected[run][key]
    torch.testing.assert_close(got, want, atol=ATOL[key], rtol=1e-4, msg=lambda m: f"{run} {key}: {m}")


def kohya_files(root: Path, runs) -> dict[str, str]:
    return {run: str(next((root / run / "kohya").glob("*.safetensors"))) for run in runs}


def test_comfyui_loads_every_kohya_file_whole_and_computes_what_peft_does(family):
    name, client, root, expected = family
    spec = {"comfyui": COMFYUI, "checkpoint": str(root / "base.safetensors"), "clip": client.clip}
    spec |= {"inputs": str(root / "inputs.safetensors"), "loras": kohya_files(root, client.runs)}
    computed, report = run_client(COMFYUI_PYTHON, "comfyui_check.py", spec, root / "comfyui.safetensors", COMFYUI_NEEDS)
    assert report["family"] == client.comfyui
    for key in ("denoiser", "text"):
        assert_same(computed, expected, "base", key)
    for run in client.runs:
        assert report["loras"][run]["not_loaded"] == [], run
        for key in ("denoiser", "text") if run == "lora" else ("denoiser",):  # only lora trains the text encoder
            assert_same(computed, expected, run, key)
            moved = (expected[run][key] - expected["base"][key]).abs().max()
            assert moved > 100 * ATOL[key], f"{run} {key}: the adapter moved the output only {moved}"


def test_comfyui_reads_the_single_file_as_the_family_and_draws_the_trained_model(family):
    name, client, root, expected = family
    checkpoint = str(next((root / "lora" / "single_file").glob("*.safetensors")))
    spec = {"comfyui": COMFYUI, "checkpoint": checkpoint, "clip": client.clip, "loras": {}}
    spec["inputs"] = str(root / "inputs.safetensors")
    computed, report = run_client(COMFYUI_PYTHON, "comfyui_check.py", spec, root / "single.safetensors", COMFYUI_NEEDS)
    assert report["family"] == client.comfyui
    assert report["checkpoint"], "ComfyUI reported nothing: the check would see no missing key"
    for line in report["checkpoint"]:  # "clip missing: [...]": only keys no checkpoint of the family has
        assert line.startswith("clip missing: "), line
        for key in ast.literal_eval(line.removeprefix("clip missing: ")):
            assert re.fullmatch(client.missing, key), key
    for key in ("denoiser", "text"):
        assert_same(computed, expected, "lora", key, what="base")


def test_invokeai_identifies_and_applies_every_kohya_file_and_reads_the_merged_folder(family):
    name, client, root, expected = family
    spec = {
        "base": str(root / "base"),
        "merged": str(root / "lora" / "merged"),
        "inputs": str(root / "inputs.safetensors"),
    }
    spec["loras"] = kohya_files(root, client.runs)
    computed, report = run_client(
        INVOKEAI_PYTHON, "invokeai_check.py", spec, root / "invokeai.safetensors", INVOKEAI_NEEDS
    )
    for key in ("denoiser", "text"):
        assert_same(computed, expected, "base", key)
    for run in client.runs:
        assert report["loras"][run]["probe"] == {"type": "lora", "base": client.invokeai}, run
        assert report["loras"][run]["not_loaded"] == [], run
        for key in ("denoiser", "text") if run == "lora" else ("denoiser",):
            assert_same(computed, expected, run, key)
    # the merged folder's text encoder, read by InvokeAI's pinned transformers: every weight from the file
    assert_same(computed, expected, "lora", "text", what="merged")
