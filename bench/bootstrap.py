"""What the paired bootstrap of ``forgetless compare`` costs: every pair of ``--strategies`` synthetic
strategies over 3 task orders x 3 seeds, ``--tasks`` tasks of ``--examples`` eval examples each,
``--replicates`` replicates a pair (``pipelines.significance.pairwise``), timed ``--trials`` times:
each trial's seconds, the median, and seconds per replicate per pair. The first pair's interval
and p-value are reported too, so that ``--baseline REF`` (the same command on an older ref's code,
alternating) shows the speed ratio beside intervals that must agree within the bootstrap's own noise.

The runs: strategy k keeps each of the first task's examples after the stream with probability
0.3 + 0.1 k, every other score a coin with the same bias in every strategy, drawn from a fixed seed.

  python bench/bootstrap.py --json runs/bench/bootstrap.json [--baseline REF]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from common import add_baseline_options, baseline_report, report

from pipelines.significance import RunCell, pairwise


def synthetic_runs(strategies: int, tasks: int, examples: int) -> dict[str, dict[tuple[int, int], RunCell]]:
    rng = np.random.default_rng(0)
    names = [f"t{j}" for j in range(tasks)]
    runs: dict[str, dict[tuple[int, int], RunCell]] = {}
    for k in range(strategies):
        runs[f"s{k}"] = {}
        for order in range(3):
            for seed in range(3):
                rows = []
                for t in range(tasks):
                    row = {}
                    for j, name in enumerate(names):
                        if j > t:
                            continue
                        keep = 0.3 + 0.1 * k if (j == 0 and t == tasks - 1) else 0.7
                        row[name] = (rng.random(examples) < keep).astype(float).tolist()
                    rows.append(row)
                acc = np.array([[np.mean(row[n]) if n in row else 0.0 for n in names] for row in rows])
                baseline = {n: (rng.random(examples) < 0.3).astype(float).tolist() for n in names}
                runs[f"s{k}"][order, seed] = RunCell(order, seed, names, rows, baseline, acc,
                                                     np.array([np.mean(baseline[n]) for n in names]))
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--examples", type=int, default=150)
    parser.add_argument("--replicates", type=int, default=1000)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--json", type=Path)
    add_baseline_options(parser)
    args = parser.parse_args(argv)
    if args.baseline:
        return baseline_report(__file__, args, ["median_s", "per_replicate_pair_ms", "first_pair.avg_acc.ci95_low",
                                                "first_pair.avg_acc.ci95_high", "first_pair.avg_acc.p"])
    runs = synthetic_runs(args.strategies, args.tasks, args.examples)
    pairs = args.strategies * (args.strategies - 1) // 2
    seconds, first = [], None
    for _ in range(args.trials):
        start = time.perf_counter()
        result = pairwise(runs, replicates=args.replicates)
        seconds.append(time.perf_counter() - start)
        first = result[0]["metrics"]["avg_acc"]
    median = statistics.median(seconds)
    return report({"bench": "bootstrap", "strategies": args.strategies, "pairs": pairs, "tasks": args.tasks,
                   "examples": args.examples, "replicates": args.replicates, "trials_s": seconds, "median_s": median,
                   "per_replicate_pair_ms": 1000 * median / (args.replicates * pairs),
                   "first_pair": {"avg_acc": {"diff": first["diff"], "ci95_low": first["ci95"][0],
                                              "ci95_high": first["ci95"][1], "p": first["p"]}}}, args.json)


if __name__ == "__main__":
    sys.exit(main())
