"""Continual-learning metrics over an accuracy matrix, as pure functions.

``acc[t, j]`` is the accuracy on task j after training task t (row t = "trained up to t");
``baseline[j]`` is the accuracy on task j before any training. Every function takes ``upto``,
the last trained task whose row counts, so the same code gives the final values
(``upto = T - 1``) and the per-step series logged after each task.

A value that is undefined (an empty mean, e.g. forgetting after the first task or on a one-task
stream) is ``None``, never 0: "no forgetting measured" and "nothing forgotten" differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def _check(acc: np.ndarray, upto: int) -> np.ndarray:
    acc = np.asarray(acc, dtype=float)
    if acc.ndim != 2 or acc.shape[0] != acc.shape[1]:
        raise ValueError(f"acc must be a square T x T matrix, got shape {acc.shape}")
    if not 0 <= upto < acc.shape[0]:
        raise ValueError(f"upto ({upto}) must be in [0, {acc.shape[0] - 1}]")
    return acc


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def average_accuracy(acc: np.ndarray, upto: int) -> float:
    """Mean over tasks j <= upto of acc[upto, j]: the accuracy on every task seen so far.

    With upto = T - 1 this is the usual final average accuracy, mean_j acc[T-1, j].
    """
    acc = _check(acc, upto)
    return float(np.mean(acc[upto, : upto + 1]))


def task_forgetting(acc: np.ndarray, upto: int) -> list[float]:
    """Per earlier task i < upto: f_i = (max over i <= k < upto of acc[k, i]) - acc[upto, i], how far
    task i has fallen from its best accuracy since it was learned (its own row i, where it was
    trained, and the rows after it). Empty when upto == 0.

    Chaudhry et al. 2018 (RWalk, sec. 4) take the max over every earlier row, k < upto. In their
    class-incremental setting a task scores nothing before it is trained, and there the two agree.
    Here a task can score before its training (a pretrained start, labels shared with an earlier
    task, a frozen body with a new head), and a max over those rows would count as forgotten what
    was never learned: the column [0.855 before its training, 0.775 trained, 0.775 at the end] has
    f = 0 here, 0.08 over every earlier row. Avalanche's forgetting is first-based,
    acc[i, i] - acc[upto, i]; this one is max-based from the task's own row on, as Chaudhry's, so a
    task learned further after its own training (a later task helping) and then lost counts from
    its best. Negative: the task is better now than ever before.
    """
    acc = _check(acc, upto)
    return [float(np.max(acc[i:upto, i]) - acc[upto, i]) for i in range(upto)]


def forgetting(acc: np.ndarray, upto: int) -> float | None:
    """Mean over i < upto of ``task_forgetting``: (max over i <= k < upto of acc[k, i]) - acc[upto, i]
    (Chaudhry et al. 2018, with the max from the task's own row: see ``task_forgetting``). ``None``
    when upto == 0: no earlier task can have been forgotten.
    """
    return _mean(task_forgetting(acc, upto))


def backward_transfer(acc: np.ndarray, upto: int) -> float | None:
    """Mean over i < upto of acc[upto, i] - acc[i, i] (Lopez-Paz & Ranzato 2017). ``None`` if upto == 0.

    Negative values are forgetting measured against the accuracy just after learning each task.
    """
    acc = _check(acc, upto)
    return _mean([float(acc[upto, i] - acc[i, i]) for i in range(upto)])


def forward_transfer(acc: np.ndarray, baseline: np.ndarray, upto: int) -> float | None:
    """Mean over 1 <= i <= upto of acc[i-1, i] - baseline[i] (Lopez-Paz & Ranzato 2017).

    How much training on earlier tasks helps a task before it is trained on. ``None`` if upto == 0.
    """
    acc = _check(acc, upto)
    baseline = np.asarray(baseline, dtype=float)
    if baseline.shape != (acc.shape[0],):
        raise ValueError(f"baseline must have {acc.shape[0]} entries, got shape {baseline.shape}")
    return _mean([float(acc[i - 1, i] - baseline[i]) for i in range(1, upto + 1)])


def what_fwt_measures(scoring: str, task_metrics: list[str]) -> str:
    """What forward transfer, acc[i-1, i] - baseline[i], reads as under a run's scoring
    (``evaluation.scoring``) and its tasks' metrics; report.json carries it beside the number."""
    if scoring == "likelihood":
        text = ("fwt: classification tasks rank their label set by likelihood, so every answer is a valid "
                "label and the baseline is the untrained model's ranking (near chance): fwt is how far "
                "earlier tasks moved task i's ranking before it was trained (transfer of the skill)")
    else:
        text = ("fwt: answers are generated and must match a target exactly, and an untrained model rarely "
                "writes any label (baseline near 0): fwt mostly measures whether earlier tasks taught the "
                "output format and task i's label words, not transfer of the skill; "
                "evaluation.scoring=likelihood measures that")
    if "rouge_l" in task_metrics:
        text += ("; ROUGE-L tasks give credit for every word shared with the target, so their fwt also "
                 "counts learning the targets' vocabulary")
    return text


def learning_accuracy(acc: np.ndarray, upto: int, *, skip: tuple[int, ...] = ()) -> float | None:
    """Mean over j <= upto (not in ``skip``) of acc[j, j]: how well each task was learned, measured
    right after training it (Riemer et al. 2019). A strategy that does not learn cannot hide behind
    low forgetting here. ``skip``: tasks the stream measures but does not train (the pretraining task)."""
    acc = _check(acc, upto)
    return _mean([float(acc[j, j]) for j in range(upto + 1) if j not in skip])


# The key prefix of each earlier task's own forgetting in a summary (``forgetting/<task>``), beside
# the per-scoring-metric averages (``avg_acc/<metric>``), which share the "/" form.
TASK_FORGETTING = "forgetting/"


def summary(acc: np.ndarray, baseline: np.ndarray, upto: int, *, skip: tuple[int, ...] = (),
            scored_by: list[str] | None = None, names: list[str] | None = None) -> dict[str, float | None]:
    """All metrics after task ``upto``: keys avg_acc, forgetting, bwt, fwt, learning_acc.

    ``scored_by``: each task's metric name. When the tasks seen so far mix metrics (exact match
    and ROUGE-L), an average over both mixes scales; ``avg_acc/<metric>`` and
    ``learning_acc/<metric>`` then give each metric's own average too. ``names``: the tasks' names;
    each earlier task's ``task_forgetting`` is then ``forgetting/<name>``.
    """
    out = {
        "avg_acc": average_accuracy(acc, upto),
        "forgetting": forgetting(acc, upto),
        "bwt": backward_transfer(acc, upto),
        "fwt": forward_transfer(acc, baseline, upto),
        "learning_acc": learning_accuracy(acc, upto, skip=skip),
    }
    if names is not None:
        out |= {f"{TASK_FORGETTING}{names[i]}": value for i, value in enumerate(task_forgetting(acc, upto))}
    if scored_by is not None and len(set(scored_by[: upto + 1])) > 1:
        acc = _check(acc, upto)
        for metric in sorted(set(scored_by[: upto + 1])):
            tasks = [j for j in range(upto + 1) if scored_by[j] == metric]
            out[f"avg_acc/{metric}"] = float(np.mean(acc[upto, tasks]))
            out[f"learning_acc/{metric}"] = _mean([float(acc[j, j]) for j in tasks if j not in skip])
    return out


def summary_batch(acc: np.ndarray, baseline: np.ndarray, upto: int, *, skip: tuple[int, ...] = ()
                  ) -> dict[str, np.ndarray | None]:
    """``summary``'s five headline metrics for a stack of N matrices at once (``acc``: N x T x T,
    ``baseline``: N x T), each an array of N values, by the same definitions: avg_acc, forgetting,
    bwt, fwt, learning_acc. A metric undefined for one matrix is undefined for all (it depends on
    ``upto`` and ``skip`` only) and is ``None``. The bootstrap evaluates thousands of resampled
    matrices through it; tests/unit/pipelines/test_metrics.py holds it equal to ``summary``."""
    acc = np.asarray(acc, dtype=float)
    baseline = np.asarray(baseline, dtype=float)
    if acc.ndim != 3 or acc.shape[1] != acc.shape[2] or baseline.shape != acc.shape[:2]:
        raise ValueError(f"acc must be N x T x T and baseline N x T, got shapes {acc.shape} and {baseline.shape}")
    if not 0 <= upto < acc.shape[1]:
        raise ValueError(f"upto ({upto}) must be in [0, {acc.shape[1] - 1}]")
    last = acc[:, upto, :]
    earlier = range(upto)
    learned = [j for j in range(upto + 1) if j not in skip]

    def mean(columns: list[np.ndarray]) -> np.ndarray | None:
        return np.mean(np.stack(columns, axis=1), axis=1) if columns else None

    return {
        "avg_acc": last[:, : upto + 1].mean(axis=1),
        "forgetting": mean([acc[:, i:upto, i].max(axis=1) - last[:, i] for i in earlier]),
        "bwt": mean([last[:, i] - acc[:, i, i] for i in earlier]),
        "fwt": mean([acc[:, i - 1, i] - baseline[:, i] for i in range(1, upto + 1)]),
        "learning_acc": mean([acc[:, j, j] for j in learned]),
    }


# Undefined for a strategy that trains once, on every task, at the end (joint): its rows before the
# last are the untrained model, so nothing was learned task by task to forget, transfer or measure.
ONLY_AT_END = ("forgetting", "bwt", "fwt", "learning_acc", "gap_to_joint")


def final_only(metrics: dict[str, float | None]) -> dict[str, float | None]:
    """``metrics`` with those in ``ONLY_AT_END`` (and their per-metric forms, ``learning_acc/rouge_l``)
    set to None: what a strategy that trains only at the end can report."""
    return {k: None if k.split("/")[0] in ONLY_AT_END else v for k, v in metrics.items()}


def gap_to_joint(acc: np.ndarray, reference: np.ndarray | list[float], *, skip: tuple[int, ...] = ()) -> float | None:
    """Mean over tasks k (not in ``skip``) of reference[k] - acc[k, k], with ``reference`` the joint
    model's final row (trained on every task together): how much less a strategy learns each task,
    just after training it, than one model trained on the whole stream scores on it.

    Not Chaudhry et al.'s (2018) intransigence, which takes for task k a model trained jointly on
    tasks 0..k only (one joint run per k); the two differ wherever training on the tasks after k
    together with k helps or hurts k."""
    acc = np.asarray(acc, dtype=float)
    reference = np.asarray(reference, dtype=float)
    return _mean([float(reference[k] - acc[k, k]) for k in range(acc.shape[0])
                  if k not in skip and not np.isnan(acc[k, k]) and not np.isnan(reference[k])])


# Two-sided 95% quantiles of Student's t by degrees of freedom (1-30), then the normal's.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def interval(values: list[float | None]) -> dict[str, float | int | None]:
    """Mean, sample std and the half-width of a 95% t interval for the mean (``ci95``: mean +- it),
    over the defined values. One value: std 0 and no interval (None); none: everything None."""
    defined = [float(v) for v in values if v is not None and not math.isnan(v)]
    n = len(defined)
    if not n:
        return {"mean": None, "std": None, "ci95": None, "n": 0}
    if n == 1:
        return {"mean": defined[0], "std": 0.0, "ci95": None, "n": 1}
    std = float(np.std(defined, ddof=1))
    t = _T975[n - 2] if n - 1 <= len(_T975) else 1.960
    return {"mean": float(np.mean(defined)), "std": std, "ci95": t * std / math.sqrt(n), "n": n}


@dataclass
class ForgettingMatrix:
    """The accuracy matrix of one run, filled a row at a time.

    Rows not yet recorded hold NaN. ``acc[t, j]``: accuracy on task j after training task t.
    """

    tasks: list[str]
    acc: np.ndarray = field(default=None)  # type: ignore[assignment]
    baseline: np.ndarray = field(default=None)  # type: ignore[assignment]
    untrained: tuple[int, ...] = ()  # tasks measured but not trained (left out of learning_acc)
    scored_by: list[str] | None = None  # each task's metric (per-metric averages when they differ)

    def __post_init__(self) -> None:
        n = len(self.tasks)
        if n == 0:
            raise ValueError("a ForgettingMatrix needs at least one task")
        self.acc = np.full((n, n), np.nan) if self.acc is None else np.asarray(self.acc, float)
        self.baseline = np.full(n, np.nan) if self.baseline is None else np.asarray(self.baseline, float)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def _row(self, values: dict[str, float] | list[float], *, needed: int | None = None) -> np.ndarray:
        """A row from a dict (every task; with ``needed``, the first ``needed`` tasks at least, the rest
        empty) or a full list."""
        if isinstance(values, dict):
            required = self.tasks if needed is None else self.tasks[:needed]
            missing = [t for t in required if t not in values]
            if missing:
                raise ValueError(f"accuracies missing for tasks {missing}")
            values = [values.get(t, np.nan) for t in self.tasks]
        row = np.asarray(values, dtype=float)
        if row.shape != (self.num_tasks,):
            raise ValueError(f"a row needs {self.num_tasks} accuracies, got {row.shape}")
        return row

    def record_baseline(self, values: dict[str, float] | list[float]) -> None:
        self.baseline = self._row(values)

    def record(self, trained_upto: int, values: dict[str, float] | list[float], *, every_task: bool = True) -> None:
        """Row ``trained_upto``. ``every_task=False``: only the cells the metrics read are required
        (the tasks seen so far and the next), the others left empty."""
        if not 0 <= trained_upto < self.num_tasks:
            raise ValueError(f"trained_upto ({trained_upto}) must be in [0, {self.num_tasks - 1}]")
        self.acc[trained_upto] = self._row(values, needed=None if every_task else min(trained_upto + 2, self.num_tasks))

    @property
    def num_rows(self) -> int:
        """Rows recorded so far (rows are recorded in order)."""
        filled = ~np.isnan(self.acc).all(axis=1)
        return int(np.argmin(filled)) if not filled.all() else self.num_tasks

    def summary(self, upto: int | None = None) -> dict[str, float | None]:
        """Metrics after task ``upto`` (default: the last recorded row)."""
        upto = self.num_rows - 1 if upto is None else upto
        if upto < 0:
            raise ValueError("no row recorded yet")
        return summary(self.acc, self.baseline, upto, skip=self.untrained, scored_by=self.scored_by,
                       names=list(self.tasks))

    def to_dict(self) -> dict[str, Any]:
        return {
            "tasks": list(self.tasks),
            "acc_matrix": _nan_to_none(self.acc.tolist()),
            "baseline": _nan_to_none(self.baseline.tolist()),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ForgettingMatrix:
        acc = np.array([[np.nan if v is None else v for v in row] for row in data["acc_matrix"]])
        baseline = np.array([np.nan if v is None else v for v in data["baseline"]])
        return cls(tasks=list(data["tasks"]), acc=acc, baseline=baseline)


def _nan_to_none(values: Any) -> Any:
    if isinstance(values, list):
        return [_nan_to_none(v) for v in values]
    return None if isinstance(values, float) and math.isnan(values) else values
