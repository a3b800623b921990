"""Golden numbers: what today's code computes, pinned, so that moving code around can show it changed nothing.

A few methods train 3 steps on the tiny pipeline (in this process) and export; the quickstart runs at its
small setting. For each, ``tests/data/golden.json`` holds the first and last training loss, and for every
exported tensor file: its keys, shapes and dtypes, exactly (a digest of them for a merged model); the
float64 absolute sum of its values, to 1e-4 relative, and their signed sum to 1e-4 of the absolute sum (the
last bits of a float may differ between CPUs, and a sum that cancels to a hundredth of the values' scale
magnifies them a hundredfold; a changed computation moves far more); and its metadata that holds no date,
hash or version.

A change that moves any of these numbers on purpose rewrites the file with
``TUNER_WRITE_GOLDEN=1 pytest tests/test_golden.py`` and says why in its commit; the test then fails
once more as a reminder that the file was written, not compared.
"""

import hashlib
import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.helpers import train_in_process

GOLDEN = Path(__file__).parent / "data" / "golden.json"
WRITE = os.environ.get("TUNER_WRITE_GOLDEN") == "1"
RTOL = 1e-4
# metadata that changes with the clock, the exact float bits, or the installed packages' versions
VOLATILE = re.compile(r"date|_at$|hash|version|comment|description|lora_adapter_metadata")

CASES = {
    "lora": ["export.formats=[diffusers,kohya,peft]"],
    "loha": ["adapter=loha", "export.formats=[kohya,peft]"],
    "partial_unet": ["adapter=partial_unet", "export.formats=[merged]"],
    "full_with_text_encoder": ["adapter=full", "text_encoder.train=full", "export.formats=[merged]"],
    "lora_and_text_encoder_lora": ["text_encoder.train=lora", "export.formats=[diffusers,kohya]"],
    "textual_inversion": [
        "adapter=none",
        "embedding.tokens=['<sks>']",
        "embedding.learning_rate=5e-2",
        "data.instance_prompt='a photo of <sks> ball'",
        "export.formats=[diffusers]",
    ],
}


def fingerprint(file: Path) -> dict:
    """What a safetensors file holds, as numbers a reader can compare."""
    with safe_open(file, "pt") as f:
        keys = sorted(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys}
        metadata = f.metadata() or {}
    layout = [[k, list(t.shape), str(t.dtype).removeprefix("torch.")] for k, t in tensors.items()]
    if len(layout) > 40:  # a merged model: its layout as one digest, the file stays readable
        layout = hashlib.sha256(json.dumps(layout).encode()).hexdigest()
    floats = [t.double() for t in tensors.values() if t.is_floating_point()]
    adapter = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    return {
        "layout": layout,
        "sum": sum(t.sum().item() for t in floats),
        "abs_sum": sum(t.abs().sum().item() for t in floats),
        "metadata": {k: v for k, v in sorted(metadata.items()) if not VOLATILE.search(k)},
        "lora_config": {k: adapter[k] for k in sorted(adapter) if k.endswith((".r", ".lora_alpha", ".target_modules"))},
    }


def observe(run_dir: Path) -> dict:
    """The numbers of one finished run folder: its training loss and every exported safetensors file."""
    summary = json.loads((run_dir / "summary.json").read_text())
    files = sorted(f for f in summary["files"] if f.endswith(".safetensors"))
    assert files, f"{run_dir} exported no safetensors file"
    return {
        "train_loss": summary["metrics"].get("train_loss"),
        "metrics": {k: v for k, v in summary["metrics"].items() if k.startswith(("subject_", "class_"))},
        "base_build": {k: v for k, v in summary["metrics"].get("base_build", {}).items() if k != "build_seconds"},
        "files": {f: fingerprint(run_dir / f) for f in files},
    }


def _sort_lists(value):
    if isinstance(value, list):  # sets written as lists (target modules) in another order mean the same
        return sorted((_sort_lists(v) for v in value), key=json.dumps)
    if isinstance(value, dict):
        return {k: _sort_lists(v) for k, v in value.items()}
    return value


def differences(expected, actual, where: str = "") -> list[str]:
    """Every place ``actual`` differs from ``expected``: floats to RTOL, everything else exactly."""
    if isinstance(expected, float) and isinstance(actual, (int, float)):
        if math.isclose(expected, actual, rel_tol=RTOL, abs_tol=1e-7):
            return []
        return [f"{where}: {actual!r}, golden {expected!r}"]
    if isinstance(expected, dict) and isinstance(actual, dict):
        if {"sum", "abs_sum"} <= expected.keys() & actual.keys():  # a signed sum, to RTOL of the values' scale
            scale = RTOL * max(expected["abs_sum"], 1e-3)
            if not math.isclose(expected["sum"], actual["sum"], rel_tol=0, abs_tol=scale):
                return [f"{where}.sum: {actual['sum']!r}, golden {expected['sum']!r} (to {scale:.2g})"]
            expected, actual = ({k: v for k, v in d.items() if k != "sum"} for d in (expected, actual))
        out = [f"{where}.{k}: missing" for k in expected if k not in actual]
        out += [f"{where}.{k}: not in the golden file" for k in actual if k not in expected]
        for k in expected.keys() & actual.keys():
            out += differences(expected[k], actual[k], f"{where}.{k}")
        return out
    if isinstance(expected, list) and isinstance(actual, list) and len(expected) == len(actual):
        if _sort_lists(expected) == _sort_lists(actual):
            return []
        return [d for i, (e, a) in enumerate(zip(expected, actual)) for d in differences(e, a, f"{where}[{i}]")]
    if _sort_lists(expected) != _sort_lists(actual):
        return [f"{where}: {json.dumps(actual)[:200]}, golden {json.dumps(expected)[:200]}"]
    return []


def check(name: str, observed: dict) -> None:
    """Compare with the golden file, or write this entry into it under TUNER_WRITE_GOLDEN=1."""
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
    if WRITE:
        golden[name] = observed
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
        pytest.fail(f"wrote {GOLDEN} [{name}]: run again without TUNER_WRITE_GOLDEN to compare")
    assert name in golden, f"{GOLDEN} has no entry {name!r}: write it with TUNER_WRITE_GOLDEN=1"
    found = differences(golden[name], observed, name)
    assert not found, "moved from the golden numbers:\n" + "\n".join(found[:40])


@pytest.mark.parametrize("case", list(CASES))
def test_methods_compute_the_golden_numbers(tmp_path, tiny_pipeline_dir, case):
    torch.manual_seed(0)
    run = train_in_process(tmp_path, tiny_pipeline_dir, "validation.every=0", "log.tensorboard=false", *CASES[case])
    check(case, observe(run.dir))


@pytest.mark.e2e
def test_quickstart_computes_the_golden_numbers(quickstart):
    root, _ = quickstart
    check("quickstart_small", observe(root / "run"))


def test_differences_sees_what_moved():
    """The comparison itself: a moved float, a changed shape, a missing key are each found."""
    golden = {"train_loss": {"first": 1.0}, "files": {"a": {"layout": [["k", [2, 3], "float32"]], "sum": 2.0}}}
    assert differences(golden, json.loads(json.dumps(golden))) == []
    assert differences(golden, {**golden, "train_loss": {"first": 1.0 + 1e-7}}) == []
    assert differences(golden, {**golden, "train_loss": {"first": 1.001}}) == [".train_loss.first: 1.001, golden 1.0"]
    moved = {"train_loss": {"first": 1.0}, "files": {"a": {"layout": [["k", [2, 4], "float32"]], "sum": 2.0}}}
    assert differences(golden, moved) == [".files.a.layout[0][1][1]: 4, golden 3"]
    assert differences(golden, {"files": golden["files"]}) == [".train_loss: missing"]
    assert differences({"m": ["a", "b"]}, {"m": ["b", "a"]}) == []  # a set written in another order
