"""The family kit: a model family is its module, one conf/model YAML and one registry entry.

Every registered family provides every member the kit requires (``tuner.models.KIT``) and has its YAML;
nothing in tuner outside the families' own modules names a family, and no test or tool lists family names
(they iterate the registry, tests/test_conformance.py above all). A renamed copy of a family, registered while
the tests run (tests/added_family.py), goes through the whole conformance suite with no other file changed.
"""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tuner.models import FAMILIES, KIT, family_class, family_names
from tuner.models.base import Family

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", family_names())
def test_every_family_provides_every_member_of_the_kit(name):
    cls = family_class(name)
    assert cls.NAME == name
    missing = []
    for member in KIT:
        value = getattr(cls, member, None)
        if callable(value) and not isinstance(value, type):
            if value is getattr(Family, member, None):  # the interface's own: not provided
                missing.append(member)
        elif value in (None, "", (), {}, frozenset()):
            missing.append(member)
    assert not missing, f"{cls.__name__} does not provide {missing}"
    family = cls()
    components = family.build_tiny(0)
    assert {family.DENOISER, "vae", *family.TEXT_ENCODERS} <= set(components)
    real = family.real_widths()
    assert callable(real.denoiser) and callable(real.inputs) and callable(real.text_encoders) and callable(real.vae)
    assert set(family.DEFAULT_EXPORTS) <= set(family.EXPORTS)
    assert family.DEFAULT_RESOLUTION % family.RESOLUTION_MULTIPLE == 0


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_has_its_model_yaml_with_its_own_defaults(name):
    path = ROOT / "conf" / "model" / f"{name}.yaml"
    assert path.is_file(), f"{path} is missing: a family is its module, this YAML and its registry entry"
    conf = yaml.safe_load(path.read_text())
    assert conf["family"] == name
    assert conf["resolution"] == family_class(name).DEFAULT_RESOLUTION


def _family_modules() -> set[Path]:
    """The files that may name a family: each registered family's module (and the registry itself)."""
    files = {ROOT / "tuner" / "models" / "__init__.py"}
    for name in FAMILIES:
        files.add(Path(sys.modules[family_class(name).__module__].__file__).resolve())
    return files


def _strings(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node


def test_nothing_in_tuner_outside_the_families_names_a_family():
    """A string that is a family's name, in any module but the families' own: the family's knowledge has
    leaked (a recognition rule, a name check, a default), and the next family would have to edit it."""
    names, own = set(family_names()), _family_modules()
    found = []
    for path in sorted((ROOT / "tuner").rglob("*.py")):
        if path.resolve() in own:
            continue
        for node in _strings(ast.parse(path.read_text())):
            if node.value in names:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not found, "family names outside the families' modules:\n" + "\n".join(found)


def _lists_of_families(tree: ast.AST, names: set[str]):
    """Literal lists, tuples, sets and dict keys that hold two or more family names: a hand-written family list."""
    for node in ast.walk(tree):
        items = node.keys if isinstance(node, ast.Dict) else getattr(node, "elts", None)
        if isinstance(node, (ast.List, ast.Tuple, ast.Set, ast.Dict)) and items:
            values = [i.args[0] if isinstance(i, ast.Call) and i.args else i for i in items]  # pytest.param("x")
            named = {v.value for v in values if isinstance(v, ast.Constant) and v.value in names}
            if len(named) >= 2:
                yield node.lineno, sorted(named)


def test_no_test_or_tool_lists_family_names():
    """Tests and tools iterate the registry (``family_names()``) and ask a family what it is (its kit members),
    never a hand-written list of families: a family added to the registry is then tested and benchmarked with
    no test or tool edited."""
    names = set(family_names())
    found = []
    for path in sorted([*(ROOT / "tests").rglob("*.py"), *(ROOT / "tools").rglob("*.py")]):
        if path.name == Path(__file__).name:
            continue
        for line, named in _lists_of_families(ast.parse(path.read_text()), names):
            found.append(f"{path.relative_to(ROOT)}:{line}: {named}")
    assert not found, "hand-written family lists:\n" + "\n".join(found)


def test_the_kit_checks_can_fail():
    """The scanners above find what they look for."""
    names = {"alpha", "beta"}
    assert list(_lists_of_families(ast.parse("x = ['alpha', 'beta']\ny = {'alpha': 1, 'beta': 2}"), names)) == [
        (1, ["alpha", "beta"]),
        (2, ["alpha", "beta"]),
    ]
    assert list(_lists_of_families(ast.parse("x = ['alpha', pytest.param('beta')]"), names)) == [(1, ["alpha", "beta"])]
    assert not list(_lists_of_families(ast.parse("x = ['alpha', 'gamma']"), names))
    assert [n.value for n in _strings(ast.parse("f('alpha')"))] == ["alpha"]


def test_a_family_module_that_subclasses_a_registered_family_joins_a_fresh_process():
    """``TUNER_FAMILIES`` naming a module that asks the registry for the family it builds on while it is imported
    (as tests/added_family.py does): a new process (torchrun's ranks, the bench's runs) registers it without
    importing it again half-initialised."""
    env = {**os.environ, "TUNER_FAMILIES": "tests.added_family:Added", "PYTHONPATH": str(ROOT)}
    code = "from tuner.models import family_names; print(family_names()[-1])"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "added"


@pytest.mark.e2e
def test_a_family_added_at_test_time_runs_through_the_whole_conformance_suite(tmp_path):
    """A renamed copy of the first family, registered by a pytest plugin (tests/added_family.py) with its YAML in
    a copy of conf/: the conformance suite (fast and e2e cases) and the memory plan's pin run it as one of their
    own and pass, with no file of tuner, its tests or its tools changed."""
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}  # not CI's JUnit file of this tier
    env["TUNER_ADDED_FAMILY_CONF"] = str(tmp_path / "conf")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.added_family", "tests/test_conformance.py",
         "tests/test_bench.py", "-m", "not clients", "-k", "added", "-rA", "-p", "no:cacheprovider"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-5000:]
    ran = re.findall(r"^PASSED (\S+)", out, re.M)
    assert ran and all("added" in case for case in ran), out[-3000:]
    assert any("test_bench.py" in case for case in ran), out[-3000:]  # its memory plan held to a pin
    tests = {case.split("::")[1].split("[")[0] for case in ran}
    # every conformance case of the family it copies (the first registered) ran for it too
    first = next(iter(FAMILIES))
    listed = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "--collect-only", "tests/test_conformance.py", "-m", "not clients",
         "-p", "no:cacheprovider"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    ).stdout  # fmt: skip
    ids = re.findall(r"::(test_\w+)\[([^\]]+)\]", listed)
    family_tests = {test for test, params in ids if first in params.split("-")}
    assert family_tests and family_tests <= tests, f"not run for the added family: {sorted(family_tests - tests)}"
