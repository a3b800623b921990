"""The test budget: each tier's seconds and each model family's share of them, against the budget.

    python tools/budget.py .ci-junit-fast.xml .ci-junit-e2e.xml ...    # from the JUnit files pytest wrote
    python tools/budget.py --run fast                                    # run the fast tier (pytest -q) and report

A tier's file is named ``...-<tier>.xml`` (``pytest --junitxml``; .ci/run writes one per tier). A test counts
toward a family when the family's name is one of its parameters (``test_x[sdxl]``, ``test_y[flux-lora]``): the
conformance suite and every other test that iterates the registry. The budget (issue #36): the fast tier at most
120 s with the five first families plus 8 s per family added, the whole CI at most 40 minutes plus 2 per family
added. Over budget is printed, not failed: the numbers are this machine's.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tuner.models import FAMILIES, family_names  # noqa: E402

FIRST = 5  # the families the budget was set with
FAST, PER_FAMILY_FAST = 120.0, 8.0
CI, PER_FAMILY_CI = 40 * 60.0, 2 * 60.0
TIERS = {"fast": [], "e2e": ["-m", "e2e or hostile"], "slow": ["-m", "slow", "-s"], "clients": ["-m", "clients"]}


def cases(junit: Path) -> list[tuple[str, float]]:
    """(test id, seconds) of every test case in a JUnit file."""
    root = ET.parse(junit).getroot()
    return [(f"{c.get('classname')}::{c.get('name')}", float(c.get("time") or 0)) for c in root.iter("testcase")]


def family_of(test: str, names: list[str]) -> str | None:
    """The family a test id's parameters name (``[sdxl-lora]`` -> sdxl), if any."""
    params = re.search(r"\[(.*)\]$", test)
    if not params:
        return None
    found = [p for p in re.split(r"[-,]", params[1]) if p in names]
    return found[0] if found else None


def table(tiers: dict[str, list[tuple[str, float]]], total_wall: float | None = None) -> str:
    names = family_names()
    extra = max(0, len(FAMILIES) - FIRST)
    rows = ["| tier | seconds | budget | " + " | ".join(names) + " | other |", "|" + " --- |" * (len(names) + 4)]
    for tier, found in tiers.items():
        shares = defaultdict(float)
        for test, seconds in found:
            shares[family_of(test, names)] += seconds
        total = sum(shares.values())
        budget = f"{FAST + PER_FAMILY_FAST * extra:.0f}" if tier == "fast" else ""
        cells = " | ".join(f"{shares[n]:.0f}" for n in names)
        rows.append(f"| {tier} | {total:.0f} | {budget} | {cells} | {shares[None]:.0f} |")
    if total_wall is not None:
        rows.append(f"| CI (wall) | {total_wall:.0f} | {CI + PER_FAMILY_CI * extra:.0f} |" + " |" * (len(names) + 1))
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("junit", nargs="*", type=Path, help="JUnit files, one per tier, named ...-<tier>.xml")
    parser.add_argument("--run", choices=list(TIERS), help="run this tier here and report it")
    parser.add_argument("--wall", type=float, help="the whole CI run's seconds, for the last row")
    args = parser.parse_args()
    tiers = {}
    if args.run:
        with tempfile.TemporaryDirectory() as tmp:
            junit = Path(tmp) / f"run-{args.run}.xml"
            subprocess.run([sys.executable, "-m", "pytest", "-q", *TIERS[args.run], f"--junitxml={junit}"])
            tiers[args.run] = cases(junit)
    for junit in args.junit:
        if junit.is_file():
            tiers[junit.stem.rsplit("-", 1)[-1]] = cases(junit)
    if not tiers:
        parser.error("no JUnit file found and no --run")
    print(table(tiers, args.wall))
    fast = sum(s for _, s in tiers.get("fast", []))
    limit = FAST + PER_FAMILY_FAST * max(0, len(FAMILIES) - FIRST)
    if fast > limit:
        print(f"over budget: the fast tier took {fast:.0f} s, its budget is {limit:.0f} s")
    if args.wall and args.wall > CI + PER_FAMILY_CI * max(0, len(FAMILIES) - FIRST):
        print(f"over budget: CI took {args.wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
