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
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.clients.bases import build, inputs
from tests.helpers import ROOT, make_photos, run_tuner
from tuner.models import family_names, get_family

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
    "lora": ["text_encoder.train=lora", "export.formats=[kohya,peft,merged,single_file]", "export.variant=null"],
    "loha": ["adapter=loha", "export.formats=[kohya,peft]"],
    "lokr": ["adapter=lokr", "export.formats=[kohya,peft]"],
}
# a textual inversion run: a token of two vectors (in each text encoder), its kohya/A1111 embedding file
TI = ["adapter=none", "embedding.tokens=['<sks>']", "embedding.vectors=2", "export.formats=[kohya]"]
TI_PROMPT, TI_AT = "a photo of <sks> ball", 5  # where the checks put the token's vectors among the fixed ids
# the clients run the U-Net and CLIP in their own code (their attention, their layer norms): round-off only
ATOL = 2e-5  # measured: at most 2.7e-6 (ComfyUI 0.8, InvokeAI 6.14)


@dataclass(frozen=True)
class Client:
    """What each client calls the family, and what its single-file loader may find missing."""

    comfyui: str  # ComfyUI's model class for the family (the one detected, or a parent of it)
    clips: tuple[str, ...]  # ComfyUI's key for each text encoder's tokens
    comfyui_tokenizer: str  # ComfyUI's tokenizer class of the family (the one that reads embeddings), under comfy.
    invokeai: str  # InvokeAI's base model type
    runs: tuple[str, ...]  # the methods checked (LoHa and LoKr names do not depend on the family)
    # a regex of the keys ComfyUI may find missing in a single file: CLIP's head, and SD2's last text layer,
    # which diffusers drops (SD2 conditions on the penultimate layer's states)
    missing: str
    # each text encoder's folder, its transformers class, and the prefix of its keys in kohya's files
    text_encoders: tuple[tuple[str, str, str], ...] = ()
    embedding_keys: tuple[str, ...] = ("emb_params",)  # each text encoder's vectors in an embedding file
    # the states ComfyUI's conditioning takes from each text encoder, side by side: the last layer's, or (SDXL)
    # the penultimate layer's before the final layer norm, as diffusers' SDXL pipeline takes them
    penultimate: bool = False

    def comfyui_text(self, outputs: dict) -> torch.Tensor:
        """What ComfyUI's text conditioning must equal, from one run's transformers/peft outputs."""
        layer = ".penultimate" if self.penultimate else ""
        return torch.cat([outputs[f"{folder}{layer}"] for folder, _, _ in self.text_encoders], dim=-1)


def client_of(name: str) -> Client:
    """What the clients call the family and its parts (its ``CLIENTS``), and what the checks read of it: each text
    encoder's folder, transformers class (its real-width one's) and kohya key prefix, its embedding file's keys."""
    from accelerate import init_empty_weights

    family = get_family(name)
    comfyui, invokeai = family.CLIENTS["comfyui"], family.CLIENTS["invokeai"]
    with init_empty_weights():
        classes = [type(m).__name__ for m in family.real_widths().text_encoders()]
    encoders = tuple(
        (folder, cls, f"{family.KOHYA_PREFIXES[folder]}_") for folder, cls in zip(family.TEXT_ENCODERS, classes)
    )
    keys = tuple(family.EMBEDDINGS.values()) if len(family.EMBEDDINGS) > 1 else ("emb_params",)
    runs = ("lora", "loha", "lokr") if name == family_names()[0] else ("lora",)  # LoHa/LoKr names: any family's
    return Client(
        comfyui["model"], comfyui["clips"], comfyui["tokenizer"], invokeai["base"], runs, comfyui["missing"],
        encoders, keys, comfyui.get("penultimate", False),
    )  # fmt: skip


# the families the generic checks below take: a single file with the text encoders, read by both clients (the
# transformer families' single file is the transformer alone: their checks are their own, further down)
CHECKED = [
    n
    for n in family_names()
    if get_family(n).SINGLE_FILE_TEXT and {"comfyui", "invokeai"} <= set(get_family(n).CLIENTS)
]


@pytest.fixture(scope="module", params=CHECKED)
def family(request, tmp_path_factory):
    """The family's real-width base, a run per method on it, the base as a single file, and the outputs peft
    computes for each run on fixed inputs: what every client must reproduce."""
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from peft import PeftModel

    from tuner.export.tensors import write_safetensors
    from tuner.models import get_family

    name, client = request.param, client_of(request.param)
    comfyui, invokeai = (bool(python and Path(python).exists()) for python in (COMFYUI_PYTHON, INVOKEAI_PYTHON))
    if not (comfyui or invokeai):
        pytest.skip(f"{COMFYUI_NEEDS}; {INVOKEAI_NEEDS}")  # before training: no client would read the files
    root = tmp_path_factory.mktemp(f"clients-{name}")
    # ComfyUI builds the text encoders from its own configs (their real depth); InvokeAI reads the folder's
    base, photos = build(name, root / "base", text_layers=None if comfyui else 2), make_photos(root / "photos")
    for run in (*client.runs, "ti"):
        done = run_tuner(
            "recipe=lora",
            f"model={name}",
            f"model.path={base}",
            f"data.instance_dir={photos}",
            f"data.instance_prompt='{TI_PROMPT if run == 'ti' else 'a photo of sks ball'}'",
            "data.resolution=64",
            "train.max_steps=2",
            "train.batch_size=1",
            "train.learning_rate=1e-2",  # two large steps: the adapter moves every output far past round-off
            "validation.every=0",
            "log.tensorboard=false",
            "stages=[base,prepare,train,export]",
            f"output_dir={root / run}",
            *(TI if run == "ti" else RUNS[run]),
            home=root / "home",
            cwd=root,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    x = inputs(name)
    save_file(x, root / "inputs.safetensors")
    modules = {"unet": UNet2DConditionModel.from_pretrained(base / "unet").eval()}
    for folder, cls, _ in client.text_encoders:
        modules[folder] = getattr(transformers, cls).from_pretrained(base / folder).eval()
    # the base in the single-file layout, written by the code tuner's single_file export runs
    vocab = {folder: modules[folder].config.vocab_size for folder, _, _ in client.text_encoders}
    vae = AutoencoderKL.from_pretrained(base / "vae")
    write_safetensors(root / "base.safetensors", get_family(name).single_file_state({**modules, "vae": vae}, vocab))
    added = {k: x[k] for k in ("text_embeds", "time_ids") if k in x}  # SDXL's added conditioning

    def outputs(modules):
        with torch.no_grad():
            out = {
                "denoiser": modules["unet"](x["latents"], x["timestep"], x["context"], added_cond_kwargs=added).sample
            }
            for folder, _, _ in client.text_encoders:
                out |= text_states(folder, modules[folder](input_ids=x["ids"], output_hidden_states=True))
        return out

    expected = {"base": outputs(modules)}
    for run in client.runs:
        adapted = dict(modules)
        for folder in modules:  # peft's adapter on each module the run trained
            if (root / run / "peft" / folder).is_dir():
                adapted[folder] = PeftModel.from_pretrained(modules[folder], root / run / "peft" / folder)
        expected[run] = outputs(adapted)
        for folder in modules:  # peft's own way back to the unadapted modules
            if adapted[folder] is not modules[folder]:
                modules[folder] = adapted[folder].unload()
    embedding = load_file(root / "ti" / "kohya" / "embeddings" / "sks.safetensors")
    expected["ti"] = {}
    for (folder, _, _), key in zip(client.text_encoders, client.embedding_keys):
        expected["ti"] |= text_states(folder, with_vectors(modules[folder], embedding[key], x["ids"]))
    del modules, adapted, vae  # the real-width weights: the clients' processes need the memory
    yield name, client, root, expected
    shutil.rmtree(root, ignore_errors=True)  # gigabytes of real-width weights, each family's in turn


def text_states(folder: str, output) -> dict[str, torch.Tensor]:
    """A text encoder's last hidden states, and its penultimate layer's (SDXL's conditioning)."""
    return {folder: output.last_hidden_state, f"{folder}.penultimate": output.hidden_states[-2]}


def with_vectors(encoder, vectors: torch.Tensor, ids: torch.Tensor):
    """The encoder's output for ``ids`` with a new token's vectors at ``TI_AT`` (as rows appended to its
    embedding matrix), computed with transformers alone: what a client must compute with the embedding file."""
    import copy

    encoder = copy.deepcopy(encoder)
    rows = encoder.get_input_embeddings().weight.shape[0]
    encoder.resize_token_embeddings(rows + len(vectors))
    with torch.no_grad():
        encoder.get_input_embeddings().weight[rows:] = vectors
        ids = ids.clone()
        ids[0, TI_AT : TI_AT + len(vectors)] = torch.arange(rows, rows + len(vectors))
        return encoder(input_ids=ids, output_hidden_states=True)


def run_client(python: str | None, script: str, spec: dict, out: Path, needs: str) -> tuple[dict, dict]:
    """Run ``tests/clients/<script>`` with the client's interpreter; what it computed, and its report."""
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


def assert_same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4, msg=lambda m: f"{what}: {m}")


def kohya_files(root: Path, runs) -> dict[str, str]:
    return {run: str(next((root / run / "kohya").glob("*.safetensors"))) for run in runs}


def trained(run: str, client: Client) -> list[str]:
    """What a run changed: the denoiser, and the text encoders where it trained them (the lora run)."""
    return ["denoiser", *(folder for folder, _, _ in client.text_encoders)] if run == "lora" else ["denoiser"]


def run_comfyui(family, checkpoint: str, loras: dict, out: str):
    name, client, root, _ = family
    spec = {"comfyui": COMFYUI, "checkpoint": checkpoint, "clips": client.clips, "loras": loras}
    spec["inputs"] = str(root / "inputs.safetensors")
    return run_client(COMFYUI_PYTHON, "comfyui_check.py", spec, root / out, COMFYUI_NEEDS)


def test_comfyui_loads_every_kohya_file_whole_and_computes_what_peft_does(family):
    name, client, root, expected = family
    computed, report = run_comfyui(family, str(root / "base.safetensors"), kohya_files(root, client.runs), "c.st")
    assert client.comfyui in report["lineage"], report["family"]
    for run in ("base", *client.runs):
        assert run == "base" or report["loras"][run]["not_loaded"] == [], run
        assert_same(computed[f"{run}.denoiser"], expected[run]["denoiser"], f"{run} denoiser")
        assert_same(computed[f"{run}.text"], client.comfyui_text(expected[run]), f"{run} text conditioning")
        for key in trained(run, client) if run != "base" else ():  # the run moved what it trained, far
            moved = (expected[run][key] - expected["base"][key]).abs().max()
            assert moved > 100 * ATOL, f"{run} {key}: the adapter moved the output only {moved}"


def test_comfyui_reads_the_single_file_as_the_family_and_draws_the_trained_model(family):
    name, client, root, expected = family
    checkpoint = str(next((root / "lora" / "single_file").glob("*.safetensors")))
    computed, report = run_comfyui(family, checkpoint, {}, "single.st")
    assert client.comfyui in report["lineage"], report["family"]
    assert report["checkpoint"], "ComfyUI reported nothing: the check would see no missing key"
    for line in report["checkpoint"]:  # "clip missing: [...]": only keys no checkpoint of the family has
        assert line.startswith("clip missing: "), line
        for key in ast.literal_eval(line.removeprefix("clip missing: ")):
            assert re.fullmatch(client.missing, key), key
    assert_same(computed["base.denoiser"], expected["lora"]["denoiser"], "single file's denoiser")
    assert_same(computed["base.text"], client.comfyui_text(expected["lora"]), "single file's text encoders")


def test_invokeai_identifies_and_applies_every_kohya_file_and_reads_the_merged_folder(family):
    name, client, root, expected = family
    spec = {
        "base": str(root / "base"),
        "merged": str(root / "lora" / "merged"),
        "loras": kohya_files(root, client.runs),
    }
    spec["text_encoders"] = {folder: [cls, prefix] for folder, cls, prefix in client.text_encoders}
    spec["inputs"] = str(root / "inputs.safetensors")
    computed, report = run_client(INVOKEAI_PYTHON, "invokeai_check.py", spec, root / "i.st", INVOKEAI_NEEDS)
    for run in ("base", *client.runs):
        if run != "base":
            assert report["loras"][run]["probe"] == {"type": "lora", "base": client.invokeai}, run
            assert report["loras"][run]["not_loaded"] == [], run
        for key in trained(run, client):
            assert_same(computed[f"{run}.{key}"], expected[run][key], f"{run} {key}")
    # the merged folder's text encoders, read by InvokeAI's pinned transformers: every weight from the file
    for folder, _, _ in client.text_encoders:
        assert_same(computed[f"merged.{folder}"], expected["lora"][folder], f"merged {folder}")


def test_invokeai_reads_the_embedding_file_into_each_text_encoder(family):
    """The textual inversion run's A1111 file (SDXL: clip_l and clip_g), probed and applied by InvokeAI."""
    name, client, root, expected = family
    spec = {"base": str(root / "base"), "loras": {}, "inputs": str(root / "inputs.safetensors")}
    spec["text_encoders"] = {folder: [cls, prefix] for folder, cls, prefix in client.text_encoders}
    spec["embedding"] = {"file": str(root / "ti" / "kohya" / "embeddings" / "sks.safetensors"), "at": TI_AT}
    computed, report = run_client(INVOKEAI_PYTHON, "invokeai_check.py", spec, root / "ti-i.st", INVOKEAI_NEEDS)
    assert report["embedding"]["probe"] == {"type": "embedding", "base": client.invokeai}
    for folder, _, _ in client.text_encoders:
        assert report["embedding"]["vectors"][folder] == 2, folder  # the token and its one pad token
        assert_same(computed[f"ti.{folder}"], expected["ti"][folder], f"embedding in {folder}")
        assert (expected["ti"][folder] - expected["base"][folder]).abs().max() > 100 * ATOL


def test_comfyui_reads_the_embedding_file_for_each_of_its_clips(family):
    """``embedding:sks`` in a prompt: ComfyUI's tokenizer takes each CLIP's vectors from tuner's file (SDXL's
    clip_l for its L, clip_g for its G) and its CLIPs read them."""
    name, client, root, expected = family
    file = root / "ti" / "kohya" / "embeddings" / "sks.safetensors"
    spec = {"comfyui": COMFYUI, "clips": client.clips, "loras": {}, "inputs": str(root / "inputs.safetensors")}
    spec["checkpoint"] = str(root / "base.safetensors")
    spec["embedding"] = {"folder": str(file.parent), "name": "sks", "tokenizer": client.comfyui_tokenizer, "at": TI_AT}
    computed, report = run_client(COMFYUI_PYTHON, "comfyui_check.py", spec, root / "ti-c.st", COMFYUI_NEEDS)
    state = load_file(file)
    assert report["embedding"]["clips"] == sorted(client.clips)
    for key, clip in zip(client.embedding_keys, client.clips):
        torch.testing.assert_close(computed[f"embedding.{clip}"], state[key].float(), rtol=0, atol=0)
    assert_same(computed["ti.text"], client.comfyui_text(expected["ti"]), "the embedding through ComfyUI's CLIPs")


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
    return root, expected


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
