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
    acc, _ = cell.matrices({"a": np.array([[2, 0], [0, 2]])}, 2)
    # only task a's row 0 has examples: the first resample draws example 0 twice, the second example 1
    assert acc.tolist() == [[[1.0, 0.25], [0.5, 0.75]], [[0.0, 0.25], [0.5, 0.75]]]


def test_resampled_matrices_weigh_each_example_by_its_draws_and_the_baseline_too():
    # rows [after a, after b]; task a's 4 examples scored [1, 1, 0, 0] then [1, 0, 0, 0]; baseline [0, 0, 1, 1]
    rows = [{"a": [1.0, 1.0, 0.0, 0.0], "b": [1.0, 0.0]}, {"a": [1.0, 0.0, 0.0, 0.0], "b": [1.0, 1.0]}]
    acc = np.array([[0.5, 0.5], [0.25, 1.0]])
    cell = RunCell(0, 0, TASKS, rows, {"a": [0.0, 0.0, 1.0, 1.0], "b": [0.0, 0.0]}, acc, np.array([0.5, 0.0]))
    drawn, base = cell.matrices({"a": np.array([[0, 3, 1, 0]]), "b": np.array([[1, 1]])}, 1)
    # a: example 1 three times, example 2 once -> row 0: (3 x 1 + 0) / 4, row 1: 0; baseline: 1 / 4
    assert drawn[0].tolist() == [[0.75, 0.5], [0.0, 1.0]] and base[0].tolist() == [0.25, 0.0]
    metrics = cell.metrics_batch({"a": np.array([[0, 3, 1, 0]]), "b": np.array([[1, 1]])}, 1)
    assert metrics["forgetting"][0] == pytest.approx(0.75) and metrics["avg_acc"][0] == pytest.approx(0.5)
    assert cell.metrics()["forgetting"] == pytest.approx(0.25)  # as recorded: 0.5 - 0.25


def test_the_examples_are_resampled_jointly_for_both_strategies_so_the_interval_is_the_paired_one():
    # one task, one run cell: the bootstrap interval of avg_acc(A) - avg_acc(B) is that of the mean of
    # the paired differences d_e = a_e - b_e, half-width ~ 1.96 sd(d) / sqrt(n); B is A with 20 of 400
    # examples turned wrong, so an unpaired resampling would give ~ 1.96 sqrt(2 p (1 - p) / n), 4x wider
    rng = np.random.default_rng(3)
    a = (rng.random(400) < 0.7).astype(float)
    b = a.copy()
    b[np.nonzero(a)[0][:20]] = 0.0

    def cell(scores):
        return RunCell(0, 0, ["t"], [{"t": scores.tolist()}], {"t": [0.0] * 400}, np.array([[scores.mean()]]),
                       np.zeros(1))

    result = pairwise({"A": {(0, 0): cell(a)}, "B": {(0, 0): cell(b)}}, metrics=("avg_acc",),
                      replicates=4000)[0]["metrics"]["avg_acc"]
    d = a - b
    expected = 1.96 * d.std() / np.sqrt(len(d))
    low, high = result["ci95"]
    assert result["diff"] == pytest.approx(0.05)
    assert (high - low) / 2 == pytest.approx(expected, rel=0.15)
    assert low > 0 and result["significant"]


def test_resample_counts_draw_n_of_n_with_replacement():
    from pipelines.significance import _resample_counts

    counts = _resample_counts(np.random.default_rng(0), 5000, 8)
    assert counts.shape == (5000, 8) and (counts.sum(axis=1) == 8).all() and counts.min() >= 0
    # each example's count is Binomial(8, 1/8): mean 1, variance 7/8
    assert counts.mean() == pytest.approx(1.0) and counts.var() == pytest.approx(7 / 8, rel=0.05)


def test_with_nine_strategies_a_clear_gap_survives_holms_correction_over_36_pairs():
    from pipelines.significance import replicates_for

    assert replicates_for(1) == 1000 and replicates_for(6) == 2400 and replicates_for(36) == 14400
    # A keeps 30 of 60 examples, the eight others none: at 1,000 replicates the smallest p (2 / 1,001)
    # times 36 would be 0.072 and nothing could be marked; the count follows the pairs instead
    base = _runs(30, 0)
    runs = {"A": base["A"], **{f"B{k}": base["B"] for k in range(8)}}
    pairs = pairwise(runs, metrics=("avg_acc",))
    assert len(pairs) == 36
    first = pairs[0]["metrics"]["avg_acc"]
    assert (pairs[0]["a"], pairs[0]["b"]) == ("A", "B0") and first["replicates"] == 14400
    assert first["p_holm"] < 0.05 and first["significant"]
    assert not any(p["metrics"]["avg_acc"]["significant"] for p in pairs if p["a"] != "A")  # B's among themselves
