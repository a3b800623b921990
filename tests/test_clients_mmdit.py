"""SD3's and Flux.1's files in ComfyUI and InvokeAI, run there by their own loading code: the MMDiT families
whose single file is the transformer alone. Their real-width bases are built in this module, apart from
tests/test_clients.py's, so that only one family's gigabytes are on disk at a time (a module's fixtures are
torn down when it ends).

    pytest -m clients tests/test_clients_mmdit.py
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.clients.common import (
    ATOL,
    COMFYUI,
    COMFYUI_NEEDS,
    COMFYUI_PYTHON,
    INVOKEAI_NEEDS,
    INVOKEAI_PYTHON,
    TI,
    TI_AT,
    TI_PROMPT,
    assert_same,
    run_client,
    with_vectors,
)  # fmt: skip
from tests.helpers import make_photos, run_tuner

pytestmark = pytest.mark.clients


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """SD3 at the shapes ComfyUI reads an MMDiT by, a LoRA run on its transformer, the base's transformer as
    a single file, and what peft computes on fixed inputs with the base, and with the run's adapter."""
    from diffusers import SD3Transformer2DModel
    from peft import PeftModel

    from tests.clients.bases import build_sd3, sd3_inputs
    from tuner.export.tensors import write_safetensors
    from tuner.models import get_family

    if not COMFYUI_PYTHON or not Path(COMFYUI_PYTHON).exists():
        pytest.skip(COMFYUI_NEEDS)  # before training: only ComfyUI reads these files
    root = tmp_path_factory.mktemp("clients-sd3")
    base = build_sd3(root / "base")
    done = run_tuner(
        "recipe=lora", "model=sd3", f"model.path={base}", "model.max_sequence_length=32",
        f"data.instance_dir={make_photos(root / 'photos')}", "data.instance_prompt=a photo of sks ball",
        "data.resolution=32", "train.max_steps=2", "train.learning_rate=1e-2", "validation.every=0",
        "log.tensorboard=false", "export.formats=[kohya,peft,single_file]", "stages=[base,prepare,train,export]",
        f"output_dir={root / 'run'}", home=root / "home", cwd=root,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    x = sd3_inputs()
    save_file(x, root / "inputs.safetensors")
    model = SD3Transformer2DModel.from_pretrained(base / "transformer").eval()
    write_safetensors(root / "base.safetensors", get_family("sd3").single_file_state({"transformer": model}, {}))

    def denoised(m):
        with torch.no_grad():
            return m(
                x["latents"], encoder_hidden_states=x["context"], pooled_projections=x["y"], timestep=x["timestep"]
            )

    expected = {"base": denoised(model).sample}
    expected["lora"] = denoised(PeftModel.from_pretrained(model, root / "run" / "peft" / "transformer")).sample
    del model
    yield root, expected
    shutil.rmtree(root, ignore_errors=True)


def test_comfyui_reads_sd3s_single_file_as_sd3_and_its_kohya_file_whole(sd3):
    """SD3's files are the transformer alone (ComfyUI's Load Diffusion Model), the LoRA on its original names."""
    root, expected = sd3
    spec = {"comfyui": COMFYUI, "clips": None, "inputs": str(root / "inputs.safetensors")}
    spec["loras"] = {"lora": str(root / "run" / "kohya" / "run.safetensors")}
    spec["checkpoint"] = str(root / "base.safetensors")
    got, report = run_client(COMFYUI_PYTHON, "comfyui_check.py", spec, root / "base.st", COMFYUI_NEEDS)
    assert report["family"] == "SD3" and report["checkpoint"] == []  # nothing missing, nothing left over
    assert report["loras"]["lora"]["not_loaded"] == []
    assert_same(got["base.denoiser"], expected["base"], "base")
    assert_same(got["lora.denoiser"], expected["lora"], "kohya file")
    assert (expected["lora"] - expected["base"]).abs().max() > 100 * ATOL  # the adapter moves the output
    spec |= {"checkpoint": str(root / "run" / "single_file" / "run.safetensors"), "loras": {}}
    got, report = run_client(COMFYUI_PYTHON, "comfyui_check.py", spec, root / "single.st", COMFYUI_NEEDS)
    assert report["family"] == "SD3" and report["checkpoint"] == []
    assert_same(got["base.denoiser"], expected["lora"], "the trained single file")


FLUX_CLIP_L = Path("base", "text_encoder", "model.safetensors")  # the file ComfyUI's Load CLIP reads (text_model.*)


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """Flux.1-dev at the width ComfyUI requires (3072), one block of each kind: a run training LoRA on the
    transformer and CLIP-L, a textual inversion run (a vector in CLIP-L and one in the 4096-wide T5), the base's
    transformer as a single file, and what diffusers + peft compute on fixed inputs."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import PeftModel
    from transformers import CLIPTextModel

    from tests.clients.bases import build_flux, flux_inputs
    from tuner.export.tensors import write_safetensors
    from tuner.models import get_family

    if not any(python and Path(python).exists() for python in (COMFYUI_PYTHON, INVOKEAI_PYTHON)):
        pytest.skip(f"{COMFYUI_NEEDS}; {INVOKEAI_NEEDS}")  # before training: no client would read the files
    root = tmp_path_factory.mktemp("clients-flux")
    base, photos = build_flux(root / "base"), make_photos(root / "photos")
    runs = {
        "lora": ["text_encoder.train=lora", "export.formats=[kohya,peft,single_file]"],
        "ti": TI,
    }
    for run, extra in runs.items():
        done = run_tuner(
            "recipe=lora", "model=flux", f"model.path={base}", f"data.instance_dir={photos}",
            f"data.instance_prompt='{TI_PROMPT if run == 'ti' else 'a photo of sks ball'}'", "data.resolution=32",
            "train.max_steps=2", "train.learning_rate=1e-2", "validation.every=0", "log.tensorboard=false",
            "stages=[base,prepare,train,export]", f"output_dir={root / run}", *extra, home=root / "home", cwd=root,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
    x = flux_inputs()
    save_file(x, root / "inputs.safetensors")
    transformer = FluxTransformer2DModel.from_pretrained(base / "transformer").eval()
    clip = CLIPTextModel.from_pretrained(base / "text_encoder").eval()
    write_safetensors(root / "base.safetensors", get_family("flux").single_file_state({"transformer": transformer}, {}))

    def denoised(model):
        """The transformer on the fixed inputs as diffusers' pipeline calls it: 2x2-packed latents, image ids
        of each patch's row and column, zero text ids; unpacked again to compare with ComfyUI's output."""
        b, c, h, w = x["latents"].shape
        packed = x["latents"].view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
        with torch.no_grad():
            out = model(
                hidden_states=packed, timestep=x["timestep"], guidance=x["guidance"], pooled_projections=x["y"],
                encoder_hidden_states=x["context"], txt_ids=torch.zeros(x["context"].shape[1], 3),
                img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32),
            ).sample  # fmt: skip
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    def text(model):
        with torch.no_grad():
            return model(input_ids=x["ids"]).last_hidden_state

    expected = {"base": {"denoiser": denoised(transformer), "text": text(clip)}}
    embedding = load_file(root / "ti" / "kohya" / "embeddings" / "sks.safetensors")
    expected["ti"] = {"text": with_vectors(clip, embedding["clip_l"], x["ids"]).last_hidden_state}
    expected["lora"] = {
        "denoiser": denoised(PeftModel.from_pretrained(transformer, root / "lora" / "peft" / "transformer")),
        "text": text(PeftModel.from_pretrained(clip, root / "lora" / "peft" / "text_encoder")),
    }
    del transformer, clip
    yield root, expected
    shutil.rmtree(root, ignore_errors=True)


def test_comfyui_reads_fluxs_single_file_as_flux_and_its_kohya_file_whole(flux):
    """Flux's single file is the transformer alone (ComfyUI's Load Diffusion Model), its CLIP-L the base's own
    file (Load CLIP); the kohya LoRA on BFL's names and CLIP-L's loads into both with no key left over."""
    root, expected = flux
    spec = {"comfyui": COMFYUI, "clips": ["l"], "inputs": str(root / "inputs.safetensors")}
    spec |= {"checkpoint": str(root / "base.safetensors"), "clip_files": [str(root / FLUX_CLIP_L)]}
    spec["loras"] = {"lora": str(root / "lora" / "kohya" / "lora.safetensors")}
    got, report = run_client(COMFYUI_PYTHON, "comfyui_check.py", spec, root / "base.st", COMFYUI_NEEDS)
    assert report["family"] == "Flux"  # dev: with the guidance embedding (FluxSchnell without)
    # nothing missing but the head of the CLIP-L file, which diffusers' CLIPTextModel does not have
    assert report["checkpoint"] == ["clip missing: ['text_projection.weight']"]
    assert report["loras"]["lora"]["not_loaded"] == []
    for run in ("base", "lora"):
        assert_same(got[f"{run}.denoiser"], expected[run]["denoiser"], f"{run} transformer")
        assert_same(got[f"{run}.text"], expected[run]["text"], f"{run} CLIP-L")
    for key in ("denoiser", "text"):  # the adapter moves both outputs far past round-off
        assert (expected["lora"][key] - expected["base"][key]).abs().max() > 100 * ATOL, key
    spec |= {"checkpoint": str(root / "lora" / "single_file" / "lora.safetensors"), "loras": {}, "clip_files": []}
    got, report = run_client(COMFYUI_PYTHON, "comfyui_check.py", spec, root / "single.st", COMFYUI_NEEDS)
    assert report["family"] == "Flux" and report["checkpoint"] == []
    assert_same(got["base.denoiser"], expected["lora"]["denoiser"], "the trained single file")


def test_comfyui_reads_fluxs_embedding_file_for_clip_l_and_t5xxl(flux):
    """``embedding:sks``: ComfyUI's Flux tokenizer takes CLIP-L's vectors and T5-XXL's (4096 wide) from tuner's
    file, and its CLIP-L computes with them what transformers does."""
    root, expected = flux
    file = root / "ti" / "kohya" / "embeddings" / "sks.safetensors"
    spec = {"comfyui": COMFYUI, "checkpoint": None, "clips": ["l"], "clip_files": [str(root / FLUX_CLIP_L)]}
    spec |= {"loras": {}, "inputs": str(root / "inputs.safetensors")}
    spec["embedding"] = {"folder": str(file.parent), "name": "sks", "at": TI_AT}
    spec["embedding"]["tokenizer"] = "text_encoders.flux.FluxTokenizer"
    got, report = run_client(COMFYUI_PYTHON, "comfyui_check.py", spec, root / "ti.st", COMFYUI_NEEDS)
    state = load_file(file)
    assert report["embedding"]["clips"] == ["l", "t5xxl"]
    for key, clip in (("clip_l", "l"), ("t5xxl", "t5xxl")):
        assert state[key].shape == (2, 768 if clip == "l" else 4096)
        torch.testing.assert_close(got[f"embedding.{clip}"], state[key].float(), rtol=0, atol=0)
    assert_same(got["ti.text"], expected["ti"]["text"], "the embedding through ComfyUI's CLIP-L")
    assert (expected["ti"]["text"] - expected["base"]["text"]).abs().max() > 100 * ATOL


def test_invokeai_reads_fluxs_single_file_and_applies_its_kohya_file(flux):
    """InvokeAI's Flux transformer class (BFL's layout; built at the base's depth, as its loader builds it at the
    real one's) reads the single file strictly; its kohya conversion and ``LayerPatcher`` put the LoRA into it
    and into CLIP-L: the patched weights are the run's trained single file's, CLIP-L computes what peft does."""
    root, expected = flux
    lora = root / "lora" / "kohya" / "lora.safetensors"
    spec = {"inputs": str(root / "inputs.safetensors")}
    spec["flux"] = {
        "single_file": str(root / "base.safetensors"),
        "lora": str(lora),
        "clip": str(root / FLUX_CLIP_L.parent),
    }
    got, report = run_client(INVOKEAI_PYTHON, "invokeai_check.py", spec, root / "flux-i.st", INVOKEAI_NEEDS)
    assert report["probe"] == {"type": "lora", "base": "flux"}
    assert report["not_loaded"] == []
    assert report["layers"] == len({key.split(".")[0] for key in load_file(lora)})  # every module of the file
    base, trained = load_file(root / "base.safetensors"), load_file(root / "lora" / "single_file" / "lora.safetensors")
    moved = 0
    for key, weight in trained.items():
        assert_same(got[f"transformer.{key}"], weight.float(), f"patched {key}")
        moved += not torch.equal(weight, base[key])
    assert moved >= 8, f"the run changed only {moved} of the transformer's tensors"
    assert_same(got["lora.text"], expected["lora"]["text"], "CLIP-L with the LoRA")
