import gc
import os
from pathlib import Path

import diffusers  # noqa: F401  (imported here, before the freeze below)
import peft  # noqa: F401
import pytest
import transformers  # noqa: F401

from tests.helpers import SMALL, run_tuner

# The libraries' import-time objects (millions: modules, classes, functions) live as long as the process, and
# every full garbage collection walks them: accelerate's free_memory() at each training run's end took 0.4 s
# here. Frozen, collections walk only what the tests make.
gc.freeze()


@pytest.fixture(autouse=True, scope="session")
def _session_home(tmp_path_factory):
    """A $TUNER_HOME for the session when none is set (runs of module fixtures cache their frozen outputs
    there, not in ~/.cache/tuner)."""
    if not os.environ.get("TUNER_HOME"):
        os.environ["TUNER_HOME"] = str(tmp_path_factory.mktemp("session-home"))
    yield


@pytest.fixture(autouse=True, scope="session")
def _small_edit_references():
    """Qwen-Image-Edit-Plus's reference areas (1024² for its VAE, 384² for its text encoder: globals of the pipeline's
    module, which the pipeline and tuner read when they run) made small for the session, as the tiny models are small:
    a tiny pipeline's reference is then a few tokens, not 4,096 (3-4 s a call). tests/test_qwen_image_edit.py holds
    tuner's rule equal to the pipeline's at whatever areas the module holds."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plus, "VAE_IMAGE_SIZE", 64 * 64)
        patch.setattr(plus, "CONDITION_IMAGE_SIZE", 56 * 56)
        yield


@pytest.fixture(autouse=True)
def _own_home(request, tmp_path_factory, monkeypatch):
    """Each test its own $TUNER_HOME (so its own cache of frozen outputs: tests do not see each other's
    encodings); the slow tier keeps the caller's, which may hold a built digits base."""
    if "slow" not in request.keywords:
        monkeypatch.setenv("TUNER_HOME", str(tmp_path_factory.mktemp("home")))
    yield


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    """A randomly initialised tiny SD1.x pipeline saved with save_pretrained."""
    from tuner.models.tiny import make_tiny_pipeline

    return make_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipe", size="test")


@pytest.fixture(scope="session")
def quickstart(tmp_path_factory):
    """`python -m tuner recipe=quickstart` at the SMALL setting, once per session: (its root, the result)."""
    root = tmp_path_factory.mktemp("quickstart")
    result = run_tuner("recipe=quickstart", f"output_dir={root / 'run'}", *SMALL, home=root / "home", cwd=root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root, result


@pytest.fixture(scope="module")
def browser():
    """Chromium through playwright (the system one; never `playwright install`), or a skip saying why."""
    from tests.helpers import CHROMIUM, CHROMIUM_ARGS

    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; no `playwright install` needed)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``tiny(family)``: a tiny pipeline of that family's real classes (tuner/models/tiny.py), built once per module."""
    from tuner.models.tiny import make_tiny_pipeline

    made = {}

    def get(family: str):
        if family not in made:
            made[family] = make_tiny_pipeline(tmp_path_factory.mktemp(family) / "pipe", family=family)
        return made[family]

    return get
