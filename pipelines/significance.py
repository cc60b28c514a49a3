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

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import numpy as np

from pipelines.metrics import summary, summary_batch

HEADLINE = ("avg_acc", "forgetting", "bwt", "fwt", "learning_acc")
_CHUNK = 2048  # resampled matrices evaluated at once (their draws: chunk x examples counts per task)


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

    def matrices(self, draws: dict[str, np.ndarray], count: int) -> tuple[np.ndarray, np.ndarray]:
        """``count`` accuracy matrices and baselines (count x T x T, count x T) over resampled eval
        examples: ``draws[task][k, e]`` is how many times the k-th resample drew task's example e
        (each row sums to the task's n), so a cell is the weighted mean of its scores. A task without
        examples, or without draws, keeps its recorded means in every one."""
        acc = np.repeat(self.acc[None], count, axis=0)
        base = np.repeat(self.base[None], count, axis=0)
        for j, task in enumerate(self.tasks):
            if task not in draws or task not in self._columns:
                continue
            rows, scores, baseline = self._columns[task]
            weights = draws[task] / scores.shape[1]  # count x n
            acc[:, rows, j] = weights @ scores.T
            if baseline is not None:
                base[:, j] = weights @ baseline
        return acc, base

    def metrics_batch(self, draws: dict[str, np.ndarray], count: int) -> dict[str, np.ndarray | None]:
        """The headline metrics of ``matrices(draws, count)``: an array of ``count`` values each
        (``summary_batch``), None where undefined."""
        acc, base = self.matrices(draws, count)
        out = summary_batch(acc, base, acc.shape[1] - 1, skip=self.skip)
        if self.final_only:
            out = {k: (v if k == "avg_acc" else None) for k, v in out.items()}
        return out

    def metrics(self) -> dict[str, float | None]:
        """The headline metrics of the matrix as recorded (``summary``)."""
        out = summary(self.acc, self.base, self.acc.shape[0] - 1, skip=self.skip)
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


def _resample_counts(rng: np.random.Generator, count: int, n: int) -> np.ndarray:
    """``count`` draws of n examples out of n with replacement, as counts: row k, column e is how
    many times draw k took example e (each row sums to n)."""
    picked = rng.integers(0, n, (count, n)) + n * np.arange(count)[:, None]
    return np.bincount(picked.ravel(), minlength=count * n).reshape(count, n)


def _hierarchical_draws(by_order: dict[int, list[tuple[int, int]]], replicates: int, rng: np.random.Generator
                        ) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The first two levels of every replicate at once: orders with replacement, then each drawn
    order's seeds with replacement. Returns each drawn (order, seed) slot's replicate and the cell
    it drew, as parallel sequences (a replicate has one slot per seed of each order it drew)."""
    orders = sorted(by_order)
    drawn = rng.integers(0, len(orders), (replicates, len(orders)))
    slot_replicate: list[np.ndarray] = []
    slot_cell: list[tuple[int, int]] = []
    for position, order in enumerate(orders):
        members = by_order[order]
        where = np.nonzero(drawn == position)[0]  # a replicate appears once per time it drew this order
        seeds = rng.integers(0, len(members), (len(where), len(members)))
        slot_replicate.append(np.repeat(where, len(members)))
        slot_cell.extend(members[int(k)] for k in seeds.ravel())
    return np.concatenate(slot_replicate), slot_cell


def paired_bootstrap(a: dict[tuple[int, int], RunCell], b: dict[tuple[int, int], RunCell], metrics: tuple[str, ...], *,
                     replicates: int, rng: np.random.Generator) -> dict[str, dict[str, Any] | None]:
    """Per metric: the paired difference (A - B) over the run cells both have it for, its
    hierarchical bootstrap interval and two-sided p-value (uncorrected); None where no cell has it.

    Every replicate's levels are drawn up front: its orders and seeds (``_hierarchical_draws``),
    then, cell by cell, a fresh draw of each task's eval examples with replacement for each slot that
    drew the cell (as multinomial counts, shared by A and B), all of a cell's slots evaluated at once
    (``RunCell.metrics_batch``). A replicate's statistic is the mean over its slots where both A and B
    define the metric."""
    observed = {key: (a[key].metrics(), b[key].metrics()) for key in sorted(a.keys() & b.keys())}
    out: dict[str, dict[str, Any] | None] = {}
    usable = {m: [k for k, (x, y) in observed.items() if x.get(m) is not None and y.get(m) is not None]
              for m in metrics}
    cells = sorted({k for keys in usable.values() for k in keys})
    by_order: dict[int, list[tuple[int, int]]] = {}
    for key in cells:
        by_order.setdefault(key[0], []).append(key)
    draws: dict[str, np.ndarray] = {m: np.empty(0) for m in metrics}
    if cells and replicates:
        slot_replicate, slot_cell = _hierarchical_draws(by_order, replicates, rng)
        slot_diff = {m: np.full(len(slot_cell), np.nan) for m in metrics}
        position = {key: index for index, key in enumerate(cells)}
        cell_of_slot = np.array([position[key] for key in slot_cell])
        for index, key in enumerate(cells):
            slots = np.nonzero(cell_of_slot == index)[0]
            sizes = {**a[key].sizes, **b[key].sizes}
            for start in range(0, len(slots), _CHUNK):
                chunk = slots[start:start + _CHUNK]
                counts = {task: _resample_counts(rng, len(chunk), n) for task, n in sorted(sizes.items())}
                x, y = a[key].metrics_batch(counts, len(chunk)), b[key].metrics_batch(counts, len(chunk))
                for m in metrics:
                    if key in usable[m]:
                        slot_diff[m][chunk] = x[m] - y[m]
        for m in metrics:
            defined = ~np.isnan(slot_diff[m])
            per_replicate = np.bincount(slot_replicate[defined], minlength=replicates)
            sums = np.bincount(slot_replicate[defined], weights=slot_diff[m][defined], minlength=replicates)
            draws[m] = sums[per_replicate > 0] / per_replicate[per_replicate > 0]
    for m in metrics:
        if not usable[m] or not len(draws[m]):
            out[m] = None
            continue
        stats = draws[m]
        low, high = np.percentile(stats, [2.5, 97.5])
        below, above = int((stats <= 0).sum()), int((stats >= 0).sum())
        diffs = {k: observed[k][0][m] - observed[k][1][m] for k in usable[m]}
        per_order = {}
        for k, d in diffs.items():
            per_order.setdefault(str(k[0]), []).append(d)
        out[m] = {"diff": float(np.mean(list(diffs.values()))), "ci95": [float(low), float(high)],
                  "p": min(1.0, 2 * (min(below, above) + 1) / (len(stats) + 1)), "replicates": len(stats),
                  "n": len(diffs),
                  "orders": len(per_order), "per_order": {o: float(np.mean(v)) for o, v in per_order.items()}}
    return out


def replicates_for(pairs: int, alpha: float = 0.05, *, least: int = 1000) -> int:
    """Replicates enough that Holm's correction over ``pairs`` comparisons can still call a gap
    significant, with room to spare: R replicates give no two-sided p below 2 / (R + 1), and Holm
    multiplies the smallest of m p-values by m, so R >= 20 m / alpha puts that floor at alpha / 10
    (at 1,000 replicates and 36 pairs, nine strategies, it would be 0.072: nothing significant)."""
    return max(least, math.ceil(20 * pairs / alpha))


def pairwise(runs: dict[str, dict[tuple[int, int], RunCell]], *, metrics: tuple[str, ...] = HEADLINE,
             replicates: int | None = None, alpha: float = 0.05, seed: int = 0,
             progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Every pair of strategies (in the order given), every metric: the paired difference, its
    interval, its p-value and the Holm-corrected one (over the pairs, per metric), and whether it is
    significant at ``alpha``. ``replicates``: None takes ``replicates_for`` the number of pairs; each
    result records its count. Seeded: the same runs give the same figures."""
    pairs = list(combinations(runs, 2))
    replicates = replicates_for(len(pairs), alpha) if replicates is None else replicates
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
