"""tools/bench.py end to end on a few steps: tuner's numbers, and a reference program's read from its progress bar."""

import re
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT

pytestmark = pytest.mark.e2e  # runs `python -m tuner` in processes: `pytest -m e2e`

# a stand-in for another trainer: it sleeps through --max_train_steps steps under a tqdm bar named "Steps"
REFERENCE = """
import sys, time
from tqdm.auto import tqdm
steps = int(next(a.split("=")[1] for a in sys.argv if a.startswith("--max_train_steps=")))
time.sleep(0.5)
for _ in tqdm(range(steps), desc="Steps", mininterval=0, miniters=1):
    time.sleep(0.2)
"""


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


def test_the_memory_plan_extrapolates_to_the_measured_third_unit_and_counts_the_weights_exactly(tmp_path):
    """tools/bench_memory.py for SD3 at 256 px: the weights equal the real SD3-medium's parameter count in bf16
    (counted here on the meta device), and the plan of 3 blocks from 1 and 2 is within 10% of 3 measured."""
    from diffusers import SD3Transformer2DModel

    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_memory.py"), "--family", "sd3", "--resolution", "256", "--check"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    row = next(line for line in out.stdout.splitlines() if line.startswith("| sd3 |"))
    weights = float(row.split("|")[3].strip().removesuffix(" GB"))
    with torch.device("meta"):
        real = SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
            joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
            pos_embed_max_size=192,
        )  # fmt: skip
    assert weights == pytest.approx(sum(p.numel() for p in real.parameters()) * 2 / 1e9, abs=0.006)
    check = re.search(r"check sd3 .*planned from 1 and 2 ([\d.]+) GB, measured ([\d.]+) GB", out.stdout)
    assert check, out.stdout
    planned, measured = float(check[1]), float(check[2])
    assert measured > 0 and abs(planned / measured - 1) <= 0.10
