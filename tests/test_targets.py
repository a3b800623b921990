"""The issue's targets at full size (slow: builds the real digits base, about 7 minutes on 2 cores).

Run with ``pytest -m slow``. Uses $TUNER_HOME when set, so a cached base is reused.
"""

import json
import os

import pytest

from tests.helpers import run_tuner

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return os.environ.get("TUNER_HOME") or tmp_path_factory.mktemp("home")


def test_digits_base_draws_every_digit(home, tmp_path):
    result = run_tuner("recipe=digits_base", f"output_dir={tmp_path / 'base'}", home=home, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "base" / "metrics.json").read_text())
    print(json.dumps(metrics, indent=1))
    assert metrics["min_digit_accuracy"] >= 0.9, metrics["digit_accuracy"]


def _quickstart(home, folder, *overrides):
    result = run_tuner("recipe=quickstart", f"output_dir={folder}", *overrides, home=home, cwd=folder.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((folder / "metrics.json").read_text())
    print(json.dumps(metrics, indent=1))
    return metrics


def test_quickstart_learns_the_subject_and_keeps_the_class(home, tmp_path):
    with_prior = _quickstart(home, tmp_path / "run")
    assert with_prior["subject_fidelity"] >= 0.8
    assert with_prior["class_preservation"] >= 0.8
    assert with_prior["subject_fidelity_base"] < 0.2  # the base could not draw it before

    # the same run without prior preservation learns the subject too, but the class prompt drifts more
    without = _quickstart(home, tmp_path / "no_prior", "prior.enabled=false")
    assert without["subject_fidelity"] >= 0.8
    assert without["class_preservation"] < with_prior["class_preservation"]


def test_quickstart_on_an_nf4_base_keeps_its_targets(home, tmp_path):
    """QLoRA on the digits base: its U-Net's linear layers held as NF4 while the LoRA trains; the targets hold."""
    quantized = _quickstart(home, tmp_path / "nf4", "model.quantize=nf4")
    assert quantized["subject_fidelity"] >= 0.8
    assert quantized["class_preservation"] >= 0.8
