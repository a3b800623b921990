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
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.clients.bases import build, inputs
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
from tuner.models import family_names, get_family

pytestmark = pytest.mark.clients

# each method's run: its adapter, and the formats the checks read (the lora run also writes the single file)
RUNS = {
    "lora": ["text_encoder.train=lora", "export.formats=[kohya,peft,merged,single_file]", "export.variant=null"],
    "loha": ["adapter=loha", "export.formats=[kohya,peft]"],
    "lokr": ["adapter=lokr", "export.formats=[kohya,peft]"],
}


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
