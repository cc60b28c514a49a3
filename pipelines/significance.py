"""Is strategy A's metric different from B's, beyond the noise? Paired differences, a hierarchical
bootstrap interval and Holm-corrected p-values, for ``forgetless compare``.

The unit of pairing is a run cell: the same task order, seed and eval examples for both strategies.
A run's metrics come from its accuracy matrix, whose cells are means over the same eval examples
row after row; so the examples are resampled once per run cell and task, shared by every row of
both strategies' matrices (an example that is hard for A is hard for B, and hard after every task).

The bootstrap (Davison & Hinkley 1997, ch. 3.8; the nested scheme of Field & Welsh 2007) resamples
the levels in turn: the task orders with replacement; within each drawn order, its seeds with
replacement; within each drawn (order, seed), each task's eval examples with replacement. A
replicate's statistic is the mean over the drawn cells of (metric of A - metric of B). The 95%
interval is the 2.5 and 97.5 percentiles of the replicates (percentile method). The two-sided
p-value is 2 x the smaller share of replicates at or beyond zero on either side, with the +1
correction of Davison & Hinkley (eq. 4.11) so it is never 0. Holm's step-down procedure (Holm
1979) then corrects each metric's p-values over every pair of strategies: the k-th smallest of m is
multiplied by (m - k + 1), made monotone, capped at 1. A difference is marked significant when its
corrected p-value is below ``alpha`` (0.05).

Pure numpy: the driver computes it from the runs' example scores (``example_scores/`` of each run).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import numpy as np

from pipelines.metrics import summary

HEADLINE = ("avg_acc", "forgetting", "bwt", "fwt", "learning_acc")


@dataclass
class RunCell:
    """One run of one strategy, as the bootstrap reads it: per matrix row and per task, every eval
    example's score (a cell without them — a masked-token task, a row not measured — keeps its
    recorded mean)."""

    order: int
    seed: int
    tasks: list[str]
    rows: list[dict[str, list[float]]]  # rows[k][task]: the scores after task k
    baseline: dict[str, list[float]]
    acc: np.ndarray  # the matrix as recorded
    base: np.ndarray
    skip: tuple[int, ...] = ()  # tasks measured but never trained (the pretraining task)
    final_only: bool = False  # trained once at the end: only avg_acc means anything
    _columns: dict[str, tuple[list[int], np.ndarray, np.ndarray | None]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        # per task: the rows that have its examples, their scores stacked, the baseline's
        for task in self.tasks:
            sizes = {len(row[task]) for row in self.rows if task in row}
            if len(sizes) != 1:
                continue  # none, or rows that disagree on the eval set: keep the recorded means
            n = sizes.pop()
            rows = [k for k, row in enumerate(self.rows) if task in row and k < self.acc.shape[0]]
            base = self.baseline.get(task)
            self._columns[task] = (rows, np.array([self.rows[k][task] for k in rows], dtype=float),
                                   np.array(base, dtype=float) if base is not None and len(base) == n else None)

    @property
    def sizes(self) -> dict[str, int]:
        """Eval examples per task that has them."""
        return {task: scores.shape[1] for task, (_, scores, _) in self._columns.items()}

    def matrix(self, picks: dict[str, np.ndarray] | None) -> tuple[np.ndarray, np.ndarray]:
        """The accuracy matrix and baseline with each task's examples drawn as ``picks`` says
        (indices per task; None: as recorded)."""
        acc, base = self.acc.copy(), self.base.copy()
        if picks is None:
            return acc, base
        for j, task in enumerate(self.tasks):
            if task not in picks or task not in self._columns:
                continue
            rows, scores, baseline = self._columns[task]
            chosen = picks[task]
            acc[rows, j] = scores[:, chosen].mean(axis=1)
            if baseline is not None:
                base[j] = baseline[chosen].mean()
        return acc, base

    def metrics(self, picks: dict[str, np.ndarray] | None = None) -> dict[str, float | None]:
        acc, base = self.matrix(picks)
        out = summary(acc, base, acc.shape[0] - 1, skip=self.skip)
        if self.final_only:
            out = {k: (v if k == "avg_acc" else None) for k, v in out.items()}
        return out


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down correction of ``p_values`` (one family), in their order."""
    m = len(p_values)
    order = np.argsort(p_values, kind="stable")
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def paired_bootstrap(a: dict[tuple[int, int], RunCell], b: dict[tuple[int, int], RunCell], metrics: tuple[str, ...], *,
                     replicates: int, rng: np.random.Generator) -> dict[str, dict[str, Any] | None]:
    """Per metric: the paired difference (A - B) over the run cells both have it for, its
    hierarchical bootstrap interval and two-sided p-value (uncorrected); None where no cell has it."""
    observed = {key: (a[key].metrics(), b[key].metrics()) for key in sorted(a.keys() & b.keys())}
    out: dict[str, dict[str, Any] | None] = {}
    usable = {m: [k for k, (x, y) in observed.items() if x.get(m) is not None and y.get(m) is not None]
              for m in metrics}
    cells = sorted({k for keys in usable.values() for k in keys})
    by_order: dict[int, list[tuple[int, int]]] = {}
    for key in cells:
        by_order.setdefault(key[0], []).append(key)
    orders = sorted(by_order)
    draws: dict[str, list[float]] = {m: [] for m in metrics}
    for _ in range(replicates if cells else 0):
        values: dict[str, list[float]] = {m: [] for m in metrics}
        for o in rng.choice(orders, len(orders)):
            members = by_order[int(o)]
            for s in rng.choice(len(members), len(members)):
                key = members[int(s)]
                sizes = {**a[key].sizes, **b[key].sizes}
                picks = {task: rng.integers(0, n, n) for task, n in sorted(sizes.items())}  # shared by A and B
                x, y = a[key].metrics(picks), b[key].metrics(picks)
                for m in metrics:
                    if x.get(m) is not None and y.get(m) is not None:
                        values[m].append(x[m] - y[m])
        for m in metrics:
            if values[m]:
                draws[m].append(float(np.mean(values[m])))
    for m in metrics:
        if not usable[m] or not draws[m]:
            out[m] = None
            continue
        stats = np.array(draws[m])
        low, high = np.percentile(stats, [2.5, 97.5])
        below, above = int((stats <= 0).sum()), int((stats >= 0).sum())
        diffs = {k: observed[k][0][m] - observed[k][1][m] for k in usable[m]}
        per_order = {}
        for k, d in diffs.items():
            per_order.setdefault(str(k[0]), []).append(d)
        out[m] = {"diff": float(np.mean(list(diffs.values()))), "ci95": [float(low), float(high)],
                  "p": min(1.0, 2 * (min(below, above) + 1) / (len(stats) + 1)), "n": len(diffs),
                  "orders": len(per_order), "per_order": {o: float(np.mean(v)) for o, v in per_order.items()}}
    return out


def pairwise(runs: dict[str, dict[tuple[int, int], RunCell]], *, metrics: tuple[str, ...] = HEADLINE,
             replicates: int = 1000, alpha: float = 0.05, seed: int = 0,
             progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Every pair of strategies (in the order given), every metric: the paired difference, its
    interval, its p-value and the Holm-corrected one (over the pairs, per metric), and whether it is
    significant at ``alpha``. Seeded: the same runs give the same figures."""
    pairs = list(combinations(runs, 2))
    out = []
    for index, (a, b) in enumerate(pairs):
        if progress is not None:
            progress(f"{a} vs {b}")
        rng = np.random.default_rng([seed, index])
        out.append({"a": a, "b": b, "metrics": paired_bootstrap(runs[a], runs[b], metrics, replicates=replicates,
                                                                 rng=rng)})
    for metric in metrics:
        found = [entry["metrics"][metric] for entry in out if entry["metrics"][metric] is not None]
        for result, corrected in zip(found, holm([r["p"] for r in found])):
            result["p_holm"] = corrected
            result["significant"] = bool(corrected < alpha)
    return out
