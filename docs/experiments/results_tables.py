"""The headline tables of docs/results.md, regenerated from the comparisons committed beside this file.

    .venv/bin/python docs/experiments/results_tables.py           # rewrite every table in docs/results.md
    .venv/bin/python docs/experiments/results_tables.py --check   # exit 1 naming each table that differs

A table sits in docs/results.md between ``<!-- table: docs/experiments/results/NAME.json -->`` and
``<!-- /table -->`` (the headline: ``headline``) or between ``<!-- curve: ... -->`` and
``<!-- /curve -->`` (average accuracy and forgetting after each task: ``curve``), NAME.json being a
``forgetless compare`` comparison.json copied there; or between ``<!-- tuning: ... -->`` and
``<!-- /tuning -->`` (every trial of ``forgetless tune``: ``trials``), from the tuning.json of each
strategy merged into one (``results_that_stand.sh tune`` writes it). What is between the two markers is this script's
output and nothing else; tests/unit/test_results_tables.py checks that every table matches its JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from actors.compare import format_pairs  # noqa: E402 - the repository root first, for a plain `python` run

RESULTS = REPO / "docs" / "results.md"
BLOCK = re.compile(r"<!-- (?P<kind>table|curve|tuning): (?P<path>[^ ]+) -->\n(?P<body>.*?)<!-- /(?P=kind) -->", re.S)
COLUMNS = ("avg_acc", "forgetting", "bwt", "learning_acc")
UNSIGNED = ("avg_acc", "learning_acc")


def _stat(stat: dict[str, Any], signed: bool) -> str:
    if stat is None or stat.get("mean") is None:
        return "n/a"
    mean = f"{stat['mean']:+.3f}" if signed else f"{stat['mean']:.3f}"
    return mean if stat.get("ci95") is None else f"{mean} ± {stat['ci95']:.3f}"


def _tuned(comparison: dict[str, Any], name: str) -> str:
    tuned = (comparison["protocol"].get("tuned") or {}).get(name)
    if not tuned:
        return "defaults"
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in tuned["values"].items())


def headline(comparison: dict[str, Any]) -> str:
    """One stream's table: each strategy's tuned values, each headline metric's mean and 95% interval
    over its runs, its runs' mean seconds; then every pair's paired difference (``*``: significant
    after Holm's correction, ``actors.compare.format_pairs``)."""
    orders, seeds = len(comparison["orders"]), comparison["seeds"]
    counts = {name: sum(r["status"] == "FINISHED" for r in entry["runs"])
              for name, entry in comparison["strategies"].items()}
    lines = [f"{' -> '.join(comparison['tasks'])} (the config's order; {orders} order(s) x {seeds} seed(s)); mean ± "
             "half-width of the 95% t interval over each strategy's finished runs (n); seconds: a run's mean, "
             "start-up apart (a run continued after an interruption, which timed its last attempt only, left "
             "out).", "",
             "| strategy | n | tuned values | " + " | ".join(COLUMNS) + " | seconds |",
             "|---" * (len(COLUMNS) + 4) + "|"]
    for name, entry in comparison["strategies"].items():
        seconds = (entry.get("seconds") or {}).get("mean")
        lines.append(f"| {name} | {counts[name]} | {_tuned(comparison, name)} | "
                     + " | ".join(_stat(entry.get(m), m not in UNSIGNED) for m in COLUMNS)
                     + f" | {'n/a' if seconds is None else f'{seconds:,.0f}'} |")
    return "\n".join(lines + format_pairs(comparison["pairs"])) + "\n"


def curve(comparison: dict[str, Any]) -> str:
    """Average accuracy and forgetting after each task, one row per number of tasks seen, one column
    pair per strategy: the mean and 95% interval over its runs (``entry["curve"]``, each run in its
    own order). ``n/a`` where a metric is undefined: joint before its one training, at the end; any
    strategy's forgetting after its first task (nothing earlier to forget)."""
    names = [name for name, entry in comparison["strategies"].items() if entry.get("curve")]
    if not names:
        raise ValueError("no strategy has a curve after each task: a comparison.json written before compare "
                         "kept them; run the comparison again (resume=true keeps its finished runs)")
    length = max(len(comparison["strategies"][name]["curve"]["avg_acc"]) for name in names)
    lines = ["avg_acc / forgetting after each task (mean ± half-width of the 95% t interval over the runs); "
             "tasks seen: the first k of each run's order.", "",
             "| tasks seen | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for t in range(length):
        cells = []
        for name in names:
            points = comparison["strategies"][name]["curve"]
            acc, forgetting = (points[m][t] if t < len(points[m]) else None for m in ("avg_acc", "forgetting"))
            cells.append(f"{_stat(acc, False)} / {_stat(forgetting, True)}")
        lines.append(f"| {t + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _short(value: Any) -> str:
    return f"{value:.2g}" if isinstance(value, float) else str(value)


def trials(tuning: dict[str, Any]) -> str:
    """Every trial of every strategy: a column per learning rate (the same rates for every strategy),
    each cell the trial's score on the validation rows and the strategy's own knobs in it; the
    chosen trial in bold. A strategy whose rates differ from the first's (another range) is refused:
    its trials would not line up."""
    metric = tuning["metric"]
    names = list(tuning["strategies"])
    rates = [t["values"]["lr"] for t in tuning["strategies"][names[0]]["trials"]]
    lines = [f"{metric} on the validation rows of {' and '.join(tuning['tuned_on']['tasks'])} after the last of them, "
             f"each trial at a learning rate (the same for every strategy), with the strategy's own knobs; "
             "bold: the trial chosen.", "",
             "| strategy | " + " | ".join(f"lr {rate:.2g}" for rate in rates) + " |", "|---" * (len(rates) + 1) + "|"]
    for name in names:
        entry = tuning["strategies"][name]
        got = [t["values"]["lr"] for t in entry["trials"]]
        if got != rates:
            raise ValueError(f"{name}'s learning rates {got} are not the first strategy's {rates}")
        best = (entry.get("best") or {}).get("values")
        cells = []
        for t in entry["trials"]:
            score = t.get(metric)
            text = "failed" if t["status"] != "FINISHED" or score is None else f"{score:.3f}"
            own = ", ".join(f"{k.split('.', 1)[1]} {_short(v)}" for k, v in t["values"].items() if k != "lr")
            text += f" ({own})" if own else ""
            cells.append(f"**{text}**" if t["values"] == best else text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render(text: str, root: Path = REPO) -> tuple[str, list[str]]:
    """``text`` with every block regenerated, and each block that differed ("table PATH", "curve PATH",
    "tuning PATH")."""
    changed: list[str] = []

    def table(match: re.Match[str]) -> str:
        path, kind = match["path"], match["kind"]
        comparison = json.loads((root / path).read_text(encoding="utf-8"))
        body = {"table": headline, "curve": curve, "tuning": trials}[kind](comparison)
        if body != match["body"]:
            changed.append(f"{kind} {path}")
        return f"<!-- {kind}: {path} -->\n{body}<!-- /{kind} -->"

    return BLOCK.sub(table, text), changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table differs")
    args = parser.parse_args(argv)
    text = RESULTS.read_text(encoding="utf-8")
    new, changed = render(text)
    if args.check:
        for path in changed:
            print(f"{RESULTS.relative_to(REPO)}: the {path} differs from what its JSON gives; "
                  "run docs/experiments/results_tables.py", file=sys.stderr)
        return 1 if changed else 0
    if changed:
        RESULTS.write_text(new, encoding="utf-8")
    print(f"{len(changed)} table(s) rewritten" + (f": {', '.join(changed)}" if changed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
