"""The package's imports point down only: each module of ``tuner/`` sits in a layer, and may import its own
layer or the ones below, never above, and no chain of imports comes back to where it started. Imports
inside functions count the same as those at the top of a file.

    6  tuner.__main__, tuner.sweep, tuner.checks     the command line, sweeps, the checks of a whole config
    5  tuner.runner                                   the registry of stages; runs a recipe's stages in order
    4  tuner.stages, tuner.digits                     one module per stage; the embedded digits demo's wing
    3  tuner.training, tuner.export, tuner.generation,  the loop, export formats and reports, generation,
       tuner.base_model                                the base model's folder (the base and inspect stages')
    2  tuner.data, tuner.models, tuner.distributed, tuner.sampling, tuner.run_folder, tuner.scoring
    1  tuner.errors, tuner.files, tuner.choices,      errors, atomic files, the config schema (its
       tuner.config, tuner.output_config,             vocabularies as Enums, its sections) and its
       tuner.compose, tuner.numbers,                  composition, the rule table of its numbers, the
       tuner.user_code                                user's code a run calls (generate.callback)

A new module must be placed in the table: one that is not fails the test, naming it.

Stages do not call other stages: a module of tuner/stages/ (or the digits demo's stages) imports no other stage's
module; what two stages share lives in a library module below them (``test_stages_do_not_import_other_stages``).
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tuner"

LAYERS = {
    "tuner.errors": 1,
    "tuner.files": 1,
    "tuner.choices": 1,
    "tuner.config": 1,
    "tuner.data_config": 1,
    "tuner.output_config": 1,
    "tuner.compose": 1,
    "tuner.numbers": 1,
    "tuner.user_code": 1,
    "tuner.data": 2,
    "tuner.models": 2,
    "tuner.distributed": 2,
    "tuner.sampling": 2,
    "tuner.run_folder": 2,
    "tuner.scoring": 2,
    "tuner.training": 3,
    "tuner.export": 3,
    "tuner.generation": 3,
    "tuner.base_model": 3,
    "tuner.stages": 4,
    "tuner.digits": 4,
    "tuner.runner": 5,
    "tuner.checks": 6,
    "tuner.sweep": 6,
    "tuner.__main__": 6,
    "tuner": 6,  # the package's __init__
}


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    found = {}
    for file in sorted(root.rglob("*.py")):
        parts = list(file.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = file
    return found


def imports(file: Path, known: dict[str, Path]) -> set[str]:
    """The modules of tuner that ``file`` imports, anywhere in it (``from tuner.x import y`` is tuner.x.y
    when that is a module, else tuner.x)."""
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "tuner":
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in known else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "tuner"}
    return found


def layer(module: str) -> int | None:
    """The layer of the longest prefix of ``module`` in LAYERS."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return LAYERS[".".join(parts[:n])]
    return None


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(file, known) - {name} for name, file in known.items()}


def upward(edges: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})" for a in edges for b in edges[a] if layer(b) > layer(a)
    )


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Each set of modules that import one another round a loop (Tarjan's strongly connected components)."""
    index, low, on, stack, found, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
                on.discard(group[-1])
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer():
    assert [m for m in modules() if layer(m) is None] == []


def test_imports_point_down():
    assert upward(graph()) == []


def test_no_import_cycles():
    assert cycles(graph()) == []


@pytest.mark.parametrize(
    "edges, problem",
    [
        ({"tuner.config": {"tuner.stages.train"}, "tuner.stages.train": set()}, "upward"),
        ({"tuner.data.a": {"tuner.data.b"}, "tuner.data.b": {"tuner.data.a"}}, "cycle"),
    ],
)
def test_the_checks_find_what_they_look_for(edges, problem):
    """The checks can fail: an upward import and a loop within one layer are each found."""
    if problem == "upward":
        assert upward(edges) == ["tuner.config (layer 1) imports tuner.stages.train (layer 4)"]
    else:
        assert cycles(edges) == [["tuner.data.a", "tuner.data.b"]]


def test_function_level_imports_count(tmp_path):
    file = tmp_path / "m.py"
    file.write_text("def f():\n    from tuner.runner import run_recipe\n")
    assert imports(file, {"tuner.runner": file}) == {"tuner.runner"}


def test_the_core_does_not_know_the_digits_demo():
    """The embedded digits demo is one wing: only the runner's registry imports it (its stages, its base)."""
    outside = {m: edges for m, edges in graph().items() if not m.startswith("tuner.digits")}
    knowing = sorted(m for m, edges in outside.items() if any(e.startswith("tuner.digits") for e in edges))
    assert knowing == ["tuner.runner"]


# what the stage modules may import of tuner/stages/ besides library modules: the declaration machinery, which is no
# stage. context.py holds the ``@stage`` declaration, ``Run`` (the state the stages share) and the results stages
# return (Base, Subject, Adapted, Made, Exported); every stage imports it, and it calls no stage.
# the stages' shared machinery, and the train stage's frozen work (a part of that stage, in a module of its own)
STAGE_MACHINERY = {"tuner.stages.context", "tuner.stages.train_inputs"}


def stage_calls(edges: dict[str, set[str]]) -> list[str]:
    """Each import of a stage's module by another stage's: the modules of tuner/stages/ (one module per stage) and
    the digits demo's stages, less the package itself and ``STAGE_MACHINERY``."""
    stages = {m for m in edges if m.startswith("tuner.stages.") or m == "tuner.digits.stages"} - STAGE_MACHINERY
    return sorted(f"{a} imports {b}" for a in stages for b in edges[a] if b in stages and b != a)


def test_stages_do_not_import_other_stages():
    """A stage never reaches into another stage's module (for its helpers or to run it): what stages share is a
    library module below them (tuner/data/prepared.py, tuner/export/live.py, tuner/export/fitting.py,
    tuner/export/loading.py, tuner/base_model.py, ...), and the runner alone runs stages."""
    assert stage_calls(graph()) == []


def test_the_stage_check_finds_a_stage_calling_a_stage():
    edges = {
        "tuner.stages.evaluate": {"tuner.stages.gallery", "tuner.stages.context", "tuner.export.live"},
        "tuner.stages.gallery": {"tuner.stages.context"},
        "tuner.digits.stages": {"tuner.stages.data", "tuner.stages.context"},
        "tuner.stages.data": set(),
        "tuner.stages.context": set(),
    }
    assert stage_calls(edges) == [
        "tuner.digits.stages imports tuner.stages.data",
        "tuner.stages.evaluate imports tuner.stages.gallery",
    ]
