"""Does the warm start help? Naive from the warm start against naive from random init, paired.

    .venv/bin/python docs/experiments/start_gap.py STREAM

Reads runs/results/STREAM-compare (the comparison; naive's runs in the config's order, order-0) and
runs/results/STREAM-random (``results_that_stand.sh start STREAM``: the same seeds, order, tuned
learning rate and budget, ``model.weights=random``), and writes docs/experiments/results/STREAM-start.json
in comparison.json's form, the two starts as its strategies: each metric's interval over the seeds
and the paired differences (same order, seed and eval examples) with their bootstrap intervals, so
that results_tables.py renders it as it renders a comparison.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from actors.compare import SIGNIFICANCE, aggregate, run_cells  # noqa: E402 - the repository root first
from pipelines.report import RunReport  # noqa: E402
from pipelines.significance import pairwise  # noqa: E402
from pipelines.sweep_state import finished_report  # noqa: E402

WARM, RANDOM = "naive, warm start", "naive, random init"


def runs(directory: Path) -> list[tuple[RunReport, Path]]:
    """Every seed's finished run under ``directory`` (seed-0, seed-1, ...), in seed order."""
    found = []
    for where in sorted(directory.glob("seed-*"), key=lambda p: int(p.name.split("-")[1])):
        report = finished_report(where)
        if report is not None:
            found.append((report, where))
    return found


def _shown(path: Path) -> str:
    """``path`` as the JSON records it: inside the repository, relative to it."""
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def start_gap(compared: Path, random: Path) -> dict:
    comparison = json.loads((compared / "comparison.json").read_text(encoding="utf-8"))
    order = comparison["orders"][0]
    warm_dir = compared / "naive" / ("order-0" if len(comparison["orders"]) > 1 else "")
    sides = {WARM: runs(warm_dir), RANDOM: runs(random / "naive")}
    seeds = {name: [r.seed for r, _ in found] for name, found in sides.items()}
    if seeds[WARM] != seeds[RANDOM] or not seeds[WARM]:
        raise SystemExit(f"the two starts must have finished the same seeds: {seeds}")
    if any(r.tasks != order for found in sides.values() for r, _ in found):
        raise SystemExit(f"every run must be in the comparison's first order, {order}")
    # each side as the comparison reads a strategy's runs (under its strategy's name, naive), then renamed
    summaries = {name: aggregate({"naive": [r for r, _ in found]})["naive"] for name, found in sides.items()}
    cells = {name: run_cells({"naive": [r for r, _ in found]}, {"naive": [d for _, d in found]}, [order])["naive"]
             for name, found in sides.items()}
    tuned = (comparison["protocol"].get("tuned") or {}).get("naive")
    return {"tasks": order, "seeds": len(seeds[WARM]), "orders": [order],
            "protocol": {"tuned": {WARM: tuned, RANDOM: tuned} if tuned else None,
                         "from": {WARM: _shown(warm_dir), RANDOM: _shown(random)}},
            "strategies": summaries, "pairs": pairwise(cells),
            "significance": SIGNIFICANCE}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stream", choices=["task_incremental", "domain_incremental"])
    args = parser.parse_args(argv)
    results = REPO / "runs" / "results"
    out = REPO / "docs" / "experiments" / "results" / f"{args.stream}-start.json"
    gap = start_gap(results / f"{args.stream}-compare", results / f"{args.stream}-random")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(gap, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
