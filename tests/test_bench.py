"""The benches: tools/bench.py end to end on a few steps (tuner's numbers, and a reference program's read from its
progress bar), and tools/bench_memory.py's memory plan, for every registered family.

No silent regressions in memory: each family's planned peak (the plan is deterministic) at its target setting
(the first row of bench_memory's table) is pinned in ``tests/data/memory_plan.json``; a plan that grows or
shrinks by more than 2% fails until it is pinned again on purpose, with
``TUNER_WRITE_GOLDEN=1 pytest tests/test_bench.py -m e2e -k pin`` (the test then fails once more as a reminder
that the file was written, not compared; say why in the commit). A family is found in the file by its name,
else by its model: a pin whose model digest (what the plan measures: the real-width denoiser's and encoders'
parameter names and shapes, the real unit count, the denoiser call's input shapes, the family's LoRA targets
and offload blocks) equals the family's holds for it too, so a renamed copy of a family (tests/added_family.py)
passes with no file changed; any other family without a pin fails, saying how to pin it.
"""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._pytree import tree_map

from tests.helpers import ROOT
from tuner.models import family_names, get_family

PINS = Path(__file__).parent / "data" / "memory_plan.json"
WRITE = os.environ.get("TUNER_WRITE_GOLDEN") == "1"
DRIFT = 0.02  # how far a pinned plan may move either way
PINNED = ("train", "encode", "peak")  # the numbers compared: the steps' phase, the encode phase, the larger

# a stand-in for another trainer: it sleeps through --max_train_steps steps under a tqdm bar named "Steps"
REFERENCE = """
import sys, time
from tqdm.auto import tqdm
steps = int(next(a.split("=")[1] for a in sys.argv if a.startswith("--max_train_steps=")))
time.sleep(0.5)
for _ in tqdm(range(steps), desc="Steps", mininterval=0, miniters=1):
    time.sleep(0.2)
"""


@pytest.mark.e2e  # runs `python -m tuner` in processes: `pytest -m e2e`
def test_bench_prints_the_table_with_a_reference(tmp_path):
    reference = tmp_path / "reference.py"
    reference.write_text(REFERENCE)
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench.py"), "--steps", "10", "--batch", "2", "--images", "4",
         "--work", str(tmp_path / "work"), "--reference", str(reference)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in out.stdout.splitlines() if "|" in line}
    wall = [float(x) for x in rows["wall (s)"][:2]]
    assert all(w > 0 for w in wall)
    # the stand-in steps every 0.2 s: 5 steps/s, 10 samples/s at batch 2, as read from its bar
    assert 4.0 < float(rows["steady steps/s"][1]) < 6.0
    ratio = float(rows["steady steps/s"][2].strip().rstrip("x"))
    assert abs(ratio - float(rows["steady steps/s"][0]) / float(rows["steady steps/s"][1])) < 0.02
    shares = dict(re.findall(r"(\w+) ([\d.]+)%", out.stdout.split("share of step time:")[1].splitlines()[0]))
    assert float(shares["forward"]) > 0 and float(shares["backward"]) > 0
    assert abs(sum(float(v) for v in shares.values()) - 100) < 0.5


def _bench_memory():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_memory", ROOT / "tools" / "bench_memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_memory"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_step_counter_counts_each_storage_once_while_it_lives():
    """StepMemory against sums done by hand: new storages count, views and tensors from before do not."""
    bench = _bench_memory()
    before = torch.zeros(1000)  # 4000 bytes that existed before
    counter = bench.StepMemory([before])
    with counter:
        a = torch.zeros(250)  # 1000 bytes
        view = a.view(10, 25)  # the same storage
        b = before + 1  # 4000 new bytes
        del b
        c = torch.zeros(500, dtype=torch.float64)  # 4000 bytes
        twice = before.view(-1)  # a view of a storage from before
    assert counter.peak == 1000 + 4000  # a and b, or a and c, at once
    assert counter.live == 1000 + 4000  # a and c live
    del a, view, c, twice
    assert counter.live == 0


def _resolution(family, near: int = 256) -> int:
    return max(near - near % family.RESOLUTION_MULTIPLE, family.RESOLUTION_MULTIPLE)


@pytest.mark.e2e  # bench_memory in a process at 256 px: 10 to 30 s
def test_bench_memory_checks_its_plan_from_the_command_line():
    """tools/bench_memory.py --check for the first flow-matching family (built by units): its table's row and the
    check's line (3 units planned from 1 and 2 against 3 measured, within 10%); each family's own check runs
    in-process, with its pin (test_each_familys_planned_peak_stays_at_its_pin)."""
    name = next(n for n in family_names() if get_family(n).FLOW and get_family(n).real_widths().real is not None)
    family = get_family(name)
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_memory.py"), "--family", name,
         "--resolution", str(_resolution(family)), "--check"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert any(line.startswith(f"| {name} | {_resolution(family)} px") for line in out.stdout.splitlines())
    check = re.search(rf"check {re.escape(name)} .*planned from 1 and 2 ([\d.]+) GB, measured ([\d.]+) GB", out.stdout)
    assert check, out.stdout
    planned, measured = float(check[1]), float(check[2])
    assert measured > 0 and abs(planned / measured - 1) <= 0.10


def model_digest(family, rw, setting) -> str:
    """What the memory plan of ``family`` measures, as a digest: its real-width denoiser's parameter names and
    shapes (at 1 and 2 units, or whole), the real unit count, its text encoders' and VAE's, the shapes and dtypes
    of one denoiser call's inputs at ``setting``, and the family's LoRA target presets and offload blocks."""

    def layout(module):
        return [type(module).__name__, [[n, list(p.shape)] for n, p in module.named_parameters()]]

    with torch.device("meta"):
        units = (1,) if rw.real is None else (1, 2)
        inputs = rw.inputs(setting.resolution, setting.batch, torch.bfloat16)
        what = {
            "denoiser": [layout(rw.denoiser(n)) for n in units],
            "real": rw.real,
            "encoders": [layout(m) for m in [*rw.text_encoders(), rw.vae()]],
            "inputs": tree_map(lambda t: [str(t.dtype), *t.shape] if torch.is_tensor(t) else repr(t), inputs),
            "targets": [family.TARGETS, family.TARGETS_EXCLUDE, list(family.OFFLOAD_BLOCKS)],
        }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def find_pin(pins: dict, name: str, digest: str) -> tuple[str, dict] | tuple[None, None]:
    """The pin that holds for a family: its own (by name), else the first whose model digest is the family's."""
    if name in pins:
        return name, pins[name]
    return next(((other, pin) for other, pin in pins.items() if pin["model"] == digest), (None, None))


def drift(pin: dict, observed: dict) -> list[str]:
    """How the observed plan moved from its pin: a changed setting, or a pinned number more than 2% off."""
    if pin["setting"] != observed["setting"]:
        return [f"setting: {observed['setting']}, pinned at {pin['setting']}"]
    out = []
    for key in PINNED:
        moved = observed[key] / pin[key] - 1
        if abs(moved) > DRIFT:
            what = "grew" if moved > 0 else "shrank"
            out.append(f"{key}: {observed[key] / 1e9:.3f} GB, pinned {pin[key] / 1e9:.3f} GB ({what} {moved:+.1%})")
    return out


@pytest.fixture(scope="module")
def bench_memory():
    return _bench_memory()


@pytest.fixture(scope="module")
def rates(bench_memory):
    return {kind: bench_memory.quantized_bytes_per_value(kind) for kind in ("nf4", "int8")}


SIZED = [(n, size) for n in family_names() for size in (None, *get_family(n).REAL_SIZES)]


@pytest.mark.e2e  # planning takes 5 to 40 s a family on 2 cores (the U-Nets' fake steps the longest)
@pytest.mark.parametrize("family_name, size", SIZED, ids=[f"{n}-{s}" if s else n for n, s in SIZED])
def test_each_familys_planned_peak_stays_at_its_pin(family_name, size, bench_memory, rates):
    """The family's plan at its target setting (bench_memory's first row) against tests/data/memory_plan.json:
    the steps' phase, the encode phase and the peak each within 2% of the pin (see this module's docstring). And the
    plan itself: the weights it holds are the real model's parameters in bf16 (counted on the meta device), and for
    a model cut to units, 3 units planned on the line through 1 and 2 are within 10% of 3 measured.
    Each published size of a family (``REAL_SIZES``: Flux.2 klein's 9B) has a pin of its own, "NAME SIZE"."""
    family = get_family(family_name)
    rw = family.real_widths(size) if size else family.real_widths()
    name = f"{family_name} {size}" if size else family_name
    setting = bench_memory.settings(family, rw)[0]
    plan = bench_memory.plan(family, setting, rates, check=rw.real is not None, rw=rw)
    real = plan["at"]["real"]
    with torch.device("meta"):  # the weights: the real-width denoiser at the real depth, counted in bf16
        count = sum(p.numel() for p in rw.denoiser(rw.real).parameters())
    if setting.quantize is None:
        assert real["weights"] == count * 2
    if rw.real is not None:  # the method: 3 units planned on the line through 1 and 2 against 3 measured
        planned, measured = plan["at"]["planned 3"]["train"], plan["at"]["measured 3"]["train"]
        assert measured > 0 and abs(planned / measured - 1) <= 0.10, (planned, measured)
    observed = {
        "model": model_digest(family, rw, setting),
        "setting": bench_memory.describe(setting),
        **{key: real[key] for key in ("weights", "resident", "lora", "step", "train")},
        "encode": plan["encode"],
        "peak": plan["peak"],
    }
    pins = json.loads(PINS.read_text()) if PINS.is_file() else {}
    if WRITE:
        pins[name] = observed
        PINS.parent.mkdir(exist_ok=True)
        PINS.write_text(json.dumps(pins, indent=1, sort_keys=True) + "\n")
        pytest.fail(f"wrote {PINS} [{name}]: run again without TUNER_WRITE_GOLDEN to compare")
    source, pin = find_pin(pins, name, observed["model"])
    assert pin, (
        f"{PINS.name} has no pin for {name!r} nor for a family of the same model (digest {observed['model']}): "
        f"pin it with TUNER_WRITE_GOLDEN=1 pytest tests/test_bench.py -m e2e -k 'pin and {family_name}'"
    )
    moved = drift(pin, observed)
    via = "" if source == name else f" (the pin of {source!r}, the same model)"
    assert not moved, (
        f"{name}'s memory plan moved from its pin{via}:\n" + "\n".join(moved) + "\nif on purpose, pin it again: "
        f"TUNER_WRITE_GOLDEN=1 pytest tests/test_bench.py -m e2e -k 'pin and {family_name}', and say why in the commit"
    )


def test_the_pin_check_sees_a_plan_grow_shrink_or_change_setting_and_finds_a_pin_by_model():
    """drift and find_pin on numbers made up here (the planning itself is the e2e test above)."""
    pin = {"model": "abc", "setting": "512 px b1", "train": 4e9, "encode": 2e9, "peak": 4e9}
    assert drift(pin, {**pin, "train": 4.07e9, "peak": 4.07e9, "encode": 1.97e9}) == []
    assert drift(pin, {**pin, "train": 4.12e9, "peak": 4.12e9}) == [
        "train: 4.120 GB, pinned 4.000 GB (grew +3.0%)",
        "peak: 4.120 GB, pinned 4.000 GB (grew +3.0%)",
    ]
    assert drift(pin, {**pin, "encode": 1.8e9}) == ["encode: 1.800 GB, pinned 2.000 GB (shrank -10.0%)"]
    assert drift(pin, {**pin, "setting": "256 px b1"}) == ["setting: 256 px b1, pinned at 512 px b1"]
    pins = {"one": pin, "two": {**pin, "model": "def"}}
    assert find_pin(pins, "two", "abc") == ("two", pins["two"])  # its own name first
    assert find_pin(pins, "copy", "def") == ("two", pins["two"])  # else the same model
    assert find_pin(pins, "new", "xyz") == (None, None)


def _bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench", ROOT / "tools" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# a stand-in reference script's flags: what diffusers' Flux.2 and Qwen-Image DreamBooth scripts declare
DECLARED = """
parser.add_argument("--mixed_precision", type=str, default=None)
parser.add_argument("--cache_latents", action="store_true")
parser.add_argument("--max_sequence_length", type=int, default=512)
parser.add_argument('--text_encoder_out_layers', type=int, nargs="+", default=[10, 20, 30])
"""


@pytest.mark.parametrize("name", family_names())
def test_the_bench_gives_a_reference_the_familys_tiny_settings(name, tmp_path):
    """Each family's tiny prompt length and text-encoder layers reach a reference that declares the flags; a flag it
    does not declare is not passed, --reference-args win, and --reference-encodes drops the latent cache."""
    import argparse

    bench, family = _bench(), get_family(name)
    script = tmp_path / "reference.py"
    script.write_text(DECLARED)
    args = argparse.Namespace(family=name, reference=script, reference_args=[], reference_encodes=False)
    flags = bench.matching_flags(args)
    assert flags[:3] == ["--mixed_precision", "no", "--cache_latents"]

    def values(flag: str) -> list[str]:  # what follows the flag, up to the next flag; [] where it is not passed
        if flag not in flags:
            return []
        rest = flags[flags.index(flag) + 1 :]
        return rest[: next((i for i, a in enumerate(rest) if a.startswith("--")), len(rest))]

    length = [o.split("=")[1] for o in family.TINY_OPTIONS if o.startswith("model.max_sequence_length=")]
    assert values("--max_sequence_length") == length
    assert values("--text_encoder_out_layers") == [str(t) for t in getattr(family, "TAPS", ())]
    args.reference_args, args.reference_encodes = ["--mixed_precision=bf16"], True
    assert "--mixed_precision" not in bench.matching_flags(args) and "--cache_latents" not in bench.matching_flags(args)
    script.write_text('parser.add_argument("--rank", type=int)')  # declares none of them: nothing added
    assert bench.matching_flags(args) == []


@pytest.mark.e2e  # builds each family's tiny pipeline and runs `python -m tuner` beside a stand-in: 20 to 30 s a family
@pytest.mark.parametrize("name", family_names())
def test_the_bench_trains_each_familys_tiny_pipeline_beside_a_reference(name, tmp_path):
    reference = tmp_path / "reference.py"
    reference.write_text(REFERENCE)
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench.py"), "--family", name, "--steps", "30", "--batch", "2",
         "--images", "2", "--resolution", "64", "--work", str(tmp_path / "work"), "--reference", str(reference)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in out.stdout.splitlines() if "|" in line}
    assert float(rows["steady steps/s"][0]) > 0 and 4.0 < float(rows["steady steps/s"][1]) < 6.0
    assert f"model={name}" in out.stdout and "steady samples/s, tuner / reference" in out.stdout.splitlines()[-1]
