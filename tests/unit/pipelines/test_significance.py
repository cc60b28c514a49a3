"""Paired differences, the hierarchical bootstrap and Holm's correction, on hand-made runs."""

import numpy as np
import pytest

from pipelines.significance import RunCell, holm, pairwise

TASKS = ["a", "b"]


def test_holm_multiplies_the_kth_smallest_by_m_minus_k_plus_1_and_keeps_the_order():
    # sorted: 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04 -> raised to 0.06 (monotone)
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([0.02]) == [0.02]


def _cell(order, seed, scores_a, scores_b, shift=0):
    """A two-task run, rows [after a, after b], examples scored 0 or 1: after task b, only the first
    ``shift`` examples of task a are still right."""
    kept = [1.0] * shift + [0.0] * (len(scores_a) - shift)
    rows = [{"a": scores_a, "b": scores_b}, {"a": kept, "b": scores_b}]
    acc = np.array([[np.mean(r["a"]), np.mean(r["b"])] for r in rows])
    zeros = {"a": [0.0] * len(scores_a), "b": [0.0] * len(scores_b)}
    return RunCell(order, seed, TASKS, rows, zeros, acc, np.zeros(2))


def _runs(shift_a, shift_b, *, orders=2, seeds=2, n=60, seed=0):
    rng = np.random.default_rng(seed)
    out = {"A": {}, "B": {}}
    for o in range(orders):
        for s in range(seeds):
            a, b = (rng.random(n) < 0.8).astype(float).tolist(), (rng.random(n) < 0.6).astype(float).tolist()
            out["A"][o, s] = _cell(o, s, a, b, shift=shift_a)
            out["B"][o, s] = _cell(o, s, a, b, shift=shift_b)  # the same examples: a paired comparison
    return out


def test_a_gap_every_cell_shows_is_significant_and_its_interval_holds_the_mean():
    pairs = pairwise(_runs(30, 0), metrics=("avg_acc", "forgetting"), replicates=400)
    result = pairs[0]["metrics"]["avg_acc"]
    # A keeps 30 of 60 examples of task a at the end, B none: avg_acc differs by (30 / 60) / 2 = 0.25
    assert result["diff"] == pytest.approx(0.25) and result["n"] == 4 and result["orders"] == 2
    assert result["ci95"][0] > 0.15 and result["ci95"][1] < 0.35
    assert result["p"] < 0.01 and result["significant"]
    assert pairs[0]["metrics"]["forgetting"]["diff"] == pytest.approx(-0.5)  # task a: 30 of 60 fewer forgotten
    assert set(result["per_order"]) == {"0", "1"}


def test_identical_strategies_differ_by_nothing_and_nothing_is_significant():
    pairs = pairwise(_runs(5, 5), metrics=("avg_acc",), replicates=200)
    result = pairs[0]["metrics"]["avg_acc"]
    assert result["diff"] == 0 and result["ci95"] == [0.0, 0.0] and result["p"] == 1.0 and not result["significant"]


def test_a_one_example_gap_is_not_called_significant():
    pairs = pairwise(_runs(1, 0, orders=1, seeds=2), metrics=("avg_acc",), replicates=400)
    result = pairs[0]["metrics"]["avg_acc"]
    assert result["diff"] > 0 and result["ci95"][0] <= 0 and not result["significant"]


def test_holm_is_applied_over_the_pairs_of_one_metric_and_the_bootstrap_is_seeded():
    runs = _runs(30, 0)
    runs["C"] = runs["A"]
    first = pairwise(runs, metrics=("avg_acc",), replicates=200)
    assert [(p["a"], p["b"]) for p in first] == [("A", "B"), ("A", "C"), ("B", "C")]
    ps = [p["metrics"]["avg_acc"]["p"] for p in first]
    assert [p["metrics"]["avg_acc"]["p_holm"] for p in first] == pytest.approx(holm(ps))
    again = pairwise(runs, metrics=("avg_acc",), replicates=200)
    assert [p["metrics"]["avg_acc"]["ci95"] for p in again] == [p["metrics"]["avg_acc"]["ci95"] for p in first]


def test_a_cell_without_examples_keeps_its_recorded_mean():
    cell = RunCell(0, 0, TASKS, [{"a": [1.0, 0.0]}, {}], {}, np.array([[0.5, 0.25], [0.5, 0.75]]), np.zeros(2))
    acc, _ = cell.matrix({"a": np.array([0, 0])})
    assert acc.tolist() == [[1.0, 0.25], [0.5, 0.75]]  # only task a's row 0 has examples: drawn twice the first
