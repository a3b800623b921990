"""The 2026 transformer families' files in InvokeAI, run there by its own loading code (``TUNER_INVOKEAI_PYTHON``,
an environment with ``pip install invokeai``): the families InvokeAI runs as diffusers' transformer class
(``CLIENTS["invokeai"]["runs"] == "diffusers"``: FLUX.2, Qwen-Image, Z-Image; Flux.1 runs as InvokeAI's own BFL
class, in tests/test_clients.py).

Each family's base is built at the widths InvokeAI tells the family (and its variant) by, one block of each kind
(``tests/clients/bases.py``), and trained two steps by ``python -m tuner``. InvokeAI's model probe must call each
of the family's default LoRA files (``DEFAULT_EXPORTS``) that InvokeAI reads (``CLIENTS["invokeai"]["loras"]``)
and its single file the family, and no other; its ``LoRALoader``, the family's denoise node's hand-on and
``LayerPatcher`` must put every module of each LoRA file into the transformer, and its checkpoint loader must read
the single file whole; the weights they give must be peft's merge of the run's adapter into the base (an
independent implementation).

    pytest -m clients tests/test_clients_2026.py
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import save_file

from tests.clients import bases
from tests.clients.common import invokeai_python
from tests.helpers import ROOT, make_photos, run_tuner
from tuner.models import family_names, get_family

pytestmark = pytest.mark.clients

# InvokeAI patches in fp32 as peft merges (measured: equal to the bit, InvokeAI 6.14); its checkpoint loaders cast
# to bf16 on the CPU, which the comparison casts the merge to as well
ATOL = 2e-5
CHECKED = [n for n in family_names() if get_family(n).CLIENTS.get("invokeai", {}).get("runs") == "diffusers"]


def taken(name: str) -> tuple[str, ...]:
    """The LoRA formats InvokeAI reads for the family (``CLIENTS["invokeai"]["loras"]``; by default its diffusers
    and kohya files)."""
    return get_family(name).CLIENTS["invokeai"].get("loras", ("diffusers", "kohya"))


@pytest.fixture(scope="module", params=CHECKED)
def checked(request, tmp_path_factory):
    """The family's base at real widths, a run of two steps writing its default exports (and peft's adapter and the
    single file), peft's merge of the adapter, and InvokeAI's report on each file."""
    import diffusers
    from peft import PeftModel

    name = request.param
    family, python = get_family(name), invokeai_python()
    build = getattr(bases, f"build_{name}", None)
    if build is None:
        pytest.skip(f"tests/clients/bases.py builds no {name} base: {bases.UNBUILT.get(name, '')}")
    root = tmp_path_factory.mktemp(f"invokeai-{name}")
    base = build(root / "base")
    formats = list(dict.fromkeys([*family.DEFAULT_EXPORTS, "peft", "single_file"]))
    done = run_tuner(
        "recipe=lora", f"model={name}", f"model.path={base}", f"data.instance_dir={make_photos(root / 'photos')}",
        "data.instance_prompt='a photo of sks ball'", "data.resolution=32", "train.max_steps=2",
        "train.learning_rate=1e-2", "validation.every=0", "log.tensorboard=false", *family.TINY_OPTIONS,
        f"export.formats=[{','.join(formats)}]", "stages=[base,prepare,train,export]", f"output_dir={root / 'run'}",
        home=root / "home", cwd=root,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    files = {
        fmt: str(file)
        for fmt in family.DEFAULT_EXPORTS
        for file in (root / "run" / fmt).glob("*.safetensors")  # the LoRA file each LoRA format writes
    }
    loras = {fmt: file for fmt, file in files.items() if fmt in taken(name)}
    assert loras, f"{name}'s default exports {family.DEFAULT_EXPORTS} wrote no LoRA file InvokeAI takes"
    cls = getattr(diffusers, family.DENOISER_CLASS)
    transformer = cls.from_pretrained(base / "transformer").eval()
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    merged = PeftModel.from_pretrained(transformer, root / "run" / "peft" / "transformer").merge_and_unload()
    expected = {k: v.detach().contiguous() for k, v in merged.state_dict().items()}
    moved = sorted(k for k, v in expected.items() if not torch.equal(v, before[k]))
    save_file(expected, root / "expected.safetensors")
    del transformer, merged, expected, before  # the InvokeAI process needs the memory
    spec = {
        "transformer": {
            "class": family.DENOISER_CLASS, "base": str(base / "transformer"), "loras": loras,
            "not_taken": {fmt: file for fmt, file in files.items() if fmt not in loras},
            "expected": str(root / "expected.safetensors"),
            "single_file": str(next((root / "run" / "single_file").glob("*.safetensors"))),
        }
    }  # fmt: skip
    (root / "spec.json").write_text(json.dumps(spec))
    ran = subprocess.run(
        [python, str(ROOT / "tests" / "clients" / "invokeai_check.py"), str(root / "spec.json"), str(root / "i.st")],
        capture_output=True, text=True, timeout=900, cwd=root,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-4000:]
    yield name, json.loads((root / "i.st.json").read_text()), moved
    shutil.rmtree(root, ignore_errors=True)  # gigabytes of real-width weights, each family's in turn


def test_invokeai_identifies_each_default_lora_file_as_the_family(checked):
    name, report, _ = checked
    base = get_family(name).CLIENTS["invokeai"]["base"]
    assert sorted(report["loras"]) == sorted(f for f in get_family(name).DEFAULT_EXPORTS if f in taken(name))
    for fmt, lora in report["loras"].items():
        assert lora["probe"] == {"type": "lora", "base": base}, fmt


def test_invokeai_does_not_take_the_files_the_family_says_it_does_not(checked):
    """A default LoRA file the family says InvokeAI does not read (Z-Image's kohya file: ComfyUI's names, q, k, v
    fused; InvokeAI reads Z-Image LoRAs by diffusers' names) is not one its probe calls a LoRA of the family: once
    it is, the family's ``CLIENTS`` and the README are to say so."""
    name, report, _ = checked
    base = get_family(name).CLIENTS["invokeai"]["base"]
    for fmt, probe in report["not_taken"].items():
        assert probe.get("base") != base or probe.get("type") != "lora", fmt


def test_invokeai_applies_every_module_of_each_lora_file_as_peft_merges_it(checked):
    """InvokeAI's loader and the denoise node's hand-on give a layer for each module of the file (the fused q, k, v
    of Flux.2's kohya file: three), each on a module of the transformer, and the patched weights are peft's merge."""
    name, report, moved = checked
    assert len(moved) >= 8, f"the run moved only {moved}"
    for fmt, lora in report["loras"].items():
        assert lora["not_loaded"] == [], fmt
        assert lora["layers"] >= lora["modules"] > 0, fmt
        assert lora["missing"] == [] and lora["extra"] == [], fmt
        assert lora["max_diff"] <= ATOL, f"{fmt}: patched weights differ from peft's merge by {lora['max_diff']}"
        assert lora["changed"] == len(moved), fmt  # every weight the adapter moves, and nothing else


def test_invokeai_reads_the_single_file_as_the_trained_transformer(checked):
    """The single file probed as the family's main model and read whole by InvokeAI's checkpoint loader (no key
    dropped, none left unloaded): the trained transformer, at the loader's bf16."""
    name, report, moved = checked
    single = report["single_file"]
    assert single["probe"] == {"type": "main", "base": get_family(name).CLIENTS["invokeai"]["base"]}
    assert single["dropped"] == [] and single["unloaded"] == [] and single["missing"] == []
    # klein has no guidance embedding: InvokeAI's loader gives its Flux2Transformer2DModel a zero one
    assert all("guidance_embedder" in k for k in single["added"]), single["added"]
    assert single["max_diff"] <= ATOL, single
    assert single["changed"] == len(moved)
