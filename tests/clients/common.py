"""What the client checks share: where each client is (the environment variables that name it), the textual
inversion run and the tolerance their comparisons use, and running a check script in a client's interpreter.
The scripts themselves (``comfyui_check.py``, ``invokeai_check.py``) run in the clients' environments and import
nothing of this."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import ROOT

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
# a textual inversion run: a token of two vectors (in each text encoder), its kohya/A1111 embedding file
TI = ["adapter=none", "embedding.tokens=['<sks>']", "embedding.vectors=2", "export.formats=[kohya]"]
TI_PROMPT, TI_AT = "a photo of <sks> ball", 5  # where the checks put the token's vectors among the fixed ids
# the clients run the U-Net and CLIP in their own code (their attention, their layer norms): round-off only
ATOL = 2e-5  # measured: at most 2.7e-6 (ComfyUI 0.8, InvokeAI 6.14)


def invokeai_python() -> str:
    """InvokeAI's interpreter, or the test is skipped saying how to install it."""
    if not INVOKEAI_PYTHON or not Path(INVOKEAI_PYTHON).exists():
        pytest.skip(INVOKEAI_NEEDS)
    return INVOKEAI_PYTHON


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
