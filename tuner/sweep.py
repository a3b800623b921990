"""``python -m tuner -m recipe=NAME adapter.rank=4,8,16 ...``: one run per combination, then a comparison page.

Hydra's own override grammar and basic sweeper expand the sweep (``a=1,2``, ``range(0,3)``, ``choice(...)``);
the runs go one after another in this process, each into ``SWEEP/N/``, and ``SWEEP/index.html`` shows
their validation samples side by side, one row per run, labelled with the values that differ.
Each run samples at least at its start and end (``validation.every`` defaults to ``train.max_steps`` here).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tuner import run_folder
from tuner.checks import validate
from tuner.compose import compose
from tuner.errors import ConfigError
from tuner.files import write_atomic


def jobs(overrides: list[str]) -> tuple[list[list[str]], list[str]]:
    """Every combination of the sweep's overrides, and the keys that vary."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    swept = [o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override()]
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch], swept


def sweep(recipe: str, overrides: list[str]) -> Path:
    """Run every job of the sweep; return the comparison page. Raises ConfigError before any run starts
    when one of the jobs' configs is invalid."""
    from tuner.distributed import launched_world_size
    from tuner.export.validation import write_sweep_gallery
    from tuner.runner import run_recipe

    if launched_world_size() > 1:
        raise ConfigError("a multirun (-m) runs its jobs one after another in one process: launch it without torchrun")
    combos, swept = jobs([o for o in overrides if not o.startswith("output_dir=")])
    given = next((o.split("=", 1)[1] for o in overrides if o.startswith("output_dir=")), None)
    folder = Path(given or Path("runs") / f"multirun-{recipe}-{time.strftime('%Y%m%d-%H%M%S')}").expanduser()
    folder = folder.resolve()
    if folder.is_dir() and any(folder.iterdir()) and run_folder.read_manifest(folder) is None:
        raise ConfigError(
            f"output_dir={folder}: a folder tuner did not write holds files already; a sweep writes only into a "
            "new or empty folder or one of its own sweeps: choose another output_dir"
        )
    configs = []
    for i, job in enumerate(combos):  # every job's config is checked before the first one runs
        extra = [] if any(o.startswith("validation.every=") for o in job) else ["validation.every=${train.max_steps}"]
        cfg = compose(recipe, [*job, *extra, f"output_dir={folder / str(i)}"])
        validate(cfg)
        label = ", ".join(o for o in job if o.split("=", 1)[0].lstrip("+~") in swept)
        configs.append((label, cfg))
    print(f"[tuner] multirun: {len(configs)} runs into {folder}", flush=True)
    before = run_folder.read_manifest(folder)
    names = ["index.html", "multirun.json", *(str(i) for i in range(len(configs))), *(before or {}).get("entries", [])]
    run_folder.write_manifest(folder, f"multirun {recipe}", names)
    runs, record = [], []
    for i, (label, cfg) in enumerate(configs):
        print(f"[tuner] multirun {i + 1}/{len(configs)}: {label}", flush=True)
        run = run_recipe(cfg)
        runs.append((label, run.dir))
        record.append({"label": label, "run_dir": str(run.dir), "metrics": run.metrics})
        page = write_sweep_gallery(folder, runs)  # after every run: the page grows as the sweep goes
        write_atomic(folder / "multirun.json", json.dumps(record, indent=2))
    print(f"[tuner] multirun comparison: {page}", flush=True)
    return page
