"""Two questions a comparison leaves open, answered by paired runs beside its own.

    .venv/bin/python docs/experiments/paired_gap.py start STREAM   # does the warm start help?
    .venv/bin/python docs/experiments/paired_gap.py rate STREAM    # how much of replay's gain over naive is its rate?

``start``: naive from the warm start (runs/results/STREAM-compare, the config's order) against naive from
random init (runs/results/STREAM-random, ``results_that_stand.sh start STREAM``: the same seeds, order,
tuned learning rate and budget, ``model.weights=random``).

``rate``: naive at its own tuned learning rate and replay at its own (both from STREAM-compare) against
naive at replay's rate (runs/results/STREAM-rate, ``results_that_stand.sh rate STREAM``: every order and
seed of the comparison). Where the tuning gave replay a higher rate than naive, replay's gap to naive
mixes replaying with learning faster; naive at replay's rate splits the two.

Each writes docs/experiments/results/STREAM-start.json or STREAM-rate.json in comparison.json's form, its
sides as the strategies: each metric's interval over the runs, and the paired differences (same order,
seed and eval examples) with their bootstrap intervals and Holm-corrected p-values over its pairs, so
that results_tables.py renders it as it renders a comparison.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from actors.compare import SIGNIFICANCE, aggregate, run_cells  # noqa: E402 - the repository root first
from pipelines.report import RunReport  # noqa: E402
from pipelines.significance import pairwise  # noqa: E402
from pipelines.sweep_state import finished_report  # noqa: E402


class Side(NamedTuple):
    """One column of the answer: ``strategy``'s runs in the comparison written to ``comparison``."""

    label: str
    comparison: Path
    strategy: str


def sides(question: str, results: Path, stream: str) -> list[Side]:
    compared = results / f"{stream}-compare"
    if question == "start":
        return [Side("naive, warm start", compared, "naive"),
                Side("naive, random init", results / f"{stream}-random", "naive")]
    return [Side("naive", compared, "naive"),
            Side("naive at replay's rate", results / f"{stream}-rate", "naive"),
            Side("replay", compared, "replay")]


def _comparison(directory: Path) -> dict:
    path = directory / "comparison.json"
    if not path.is_file():
        raise SystemExit(f"{path}: not there; run that block of docs/experiments/results_that_stand.sh first")
    return json.loads(path.read_text(encoding="utf-8"))


def runs(side: Side, own: list[list[str]], orders: list[list[str]]) -> tuple[list[RunReport], list[Path]]:
    """The side's finished runs in ``orders``, order by order and seed by seed (``own``: its comparison's
    orders): a comparison of several orders keeps order k's runs under order-k/, one of a single order
    directly under its strategy."""
    reports, dirs = [], []
    for order in orders:
        if order not in own:
            raise SystemExit(f"{side.comparison}: has no run in the order {order} (its orders: {own})")
        base = side.comparison / side.strategy / (f"order-{own.index(order)}" if len(own) > 1 else "")
        for where in sorted(base.glob("seed-*"), key=lambda p: int(p.name.split("-")[1])):
            report = finished_report(where)
            if report is None:
                continue
            if [t for t in report.tasks if t in order] != order:
                raise SystemExit(f"{where}: its tasks {report.tasks} are not in the order {order} it is kept under")
            reports.append(report)
            dirs.append(where)
    return reports, dirs


def timings(comparison: dict, strategy: str, reports: list[RunReport]) -> list[dict[str, float]]:
    """Each report's timing as its comparison measured it (wall time and worker start-up, per (order, seed)),
    so that a side's seconds are the comparison table's: a report's own seconds count from inside the run."""
    kept = comparison.get("strategies", {}).get(strategy, {}).get("runs", [])
    measured = {(tuple(run["order"]), run["seed"]): run for run in kept}
    return [{k: v for k, v in measured.get((tuple(r.tasks), r.seed), {}).items() if k in ("wall_s", "startup_s")}
            for r in reports]


def _shown(path: Path) -> str:
    """``path`` as the JSON records it: inside the repository, relative to it."""
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def paired_gap(question: str, results: Path, stream: str) -> dict:
    chosen = sides(question, results, stream)
    read = {side.comparison: _comparison(side.comparison) for side in chosen}  # each comparison.json once
    orders = read[chosen[0].comparison]["orders"]
    orders = orders[:1] if question == "start" else orders  # the random-init runs are in the config's order only
    found = {side.label: runs(side, read[side.comparison]["orders"], orders) for side in chosen}
    cells_of = {label: {(tuple(r.tasks), r.seed) for r in reports} for label, (reports, _) in found.items()}
    first = cells_of[chosen[0].label]
    if not first or any(cells != first for cells in cells_of.values()):
        raise SystemExit("every side must have finished the same (order, seed) runs: "
                         + "; ".join(f"{label}: {sorted(cells)}" for label, cells in cells_of.items()))
    summaries, cells, tuned = {}, {}, {}
    for side in chosen:  # each side as a comparison reads its strategy's runs (under the strategy's name), renamed
        reports, dirs = found[side.label]
        timed = timings(read[side.comparison], side.strategy, reports)
        summaries[side.label] = aggregate({side.strategy: reports}, {side.strategy: timed})[side.strategy]
        cells[side.label] = run_cells({side.strategy: reports}, {side.strategy: dirs}, orders)[side.strategy]
        tuned[side.label] = (read[side.comparison]["protocol"].get("tuned") or {}).get(side.strategy)
    return {"tasks": orders[0], "seeds": len({seed for _, seed in first}), "orders": orders,
            "protocol": {"tuned": tuned if any(tuned.values()) else None,
                         "from": {side.label: _shown(side.comparison / side.strategy) for side in chosen}},
            "strategies": summaries, "pairs": pairwise(cells), "significance": SIGNIFICANCE}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question", choices=["start", "rate"])
    parser.add_argument("stream", choices=["task_incremental", "domain_incremental"])
    parser.add_argument("--results", type=Path, default=REPO / "runs" / "results",
                        help="where results_that_stand.sh wrote its blocks")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "experiments" / "results")
    args = parser.parse_args(argv)
    gap = paired_gap(args.question, args.results, args.stream)
    out = args.out / f"{args.stream}-{args.question}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(gap, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {_shown(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
