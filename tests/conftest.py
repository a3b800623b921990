import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_tuner(*args: str, home: Path, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run ``python -m tuner ...`` as a user would, in a fresh process."""
    env = {**os.environ, "TUNER_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "tuner", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    """A randomly initialised tiny SD1.x pipeline saved with save_pretrained."""
    from tuner.models.tiny import make_tiny_pipeline

    return make_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipe", size="test")
