"""A pytest plugin (``pytest -p tests.added_family``) that adds a family the way one outside tuner joins: a renamed
copy of the first registered family, named ``added``, registered through ``TUNER_FAMILIES`` (so the
``python -m tuner`` processes the tests start know it too), with its YAML in a copy of conf/ that
``TUNER_CONF_DIR`` points at. Nothing in the repository changes. tests/test_kit.py runs the conformance
suite with it.
"""

import os
import shutil
import tempfile
from pathlib import Path

import yaml

from tuner.models import FAMILIES, family_class

ROOT = Path(__file__).resolve().parent.parent
FIRST = next(iter(FAMILIES))


class Added(family_class(FIRST)):
    NAME = "added"


def _install() -> None:
    """The copy of conf/ with added.yaml, and the environment that registers the family (set as the plugin is
    imported, before tuner reads TUNER_CONF_DIR)."""
    conf = Path(os.environ.get("TUNER_ADDED_FAMILY_CONF") or Path(tempfile.mkdtemp()) / "conf")
    if not conf.exists():
        shutil.copytree(ROOT / "conf", conf)
    model = yaml.safe_load((ROOT / "conf" / "model" / f"{FIRST}.yaml").read_text())
    (conf / "model" / "added.yaml").write_text(yaml.safe_dump({**model, "family": "added"}))
    os.environ["TUNER_CONF_DIR"] = str(conf)
    os.environ["TUNER_FAMILIES"] = "tests.added_family:Added"
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


if os.environ.get("TUNER_FAMILIES") != "tests.added_family:Added":
    _install()
