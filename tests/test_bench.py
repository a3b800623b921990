"""tools/bench.py end to end on a few steps: tuner's numbers, and a reference program's read from its progress bar."""

import re
import subprocess
import sys

import pytest

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
