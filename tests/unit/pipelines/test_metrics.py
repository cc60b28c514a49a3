import math

import numpy as np
import pytest

from pipelines.metrics import (
    ForgettingMatrix,
    average_accuracy,
    backward_transfer,
    forgetting,
    forward_transfer,
    gap_to_joint,
    interval,
    summary,
    summary_batch,
    task_forgetting,
    what_fwt_measures,
)

# Hand-computed 3x3 example. acc[t, j]: accuracy on task j after training task t.
ACC = np.array(
    [
        [0.9, 0.1, 0.0],
        [0.6, 0.8, 0.2],
        [0.3, 0.7, 0.9],
    ]
)
BASELINE = np.array([0.05, 0.0, 0.1])


def test_average_accuracy_is_mean_of_seen_tasks():
    assert average_accuracy(ACC, 2) == pytest.approx((0.3 + 0.7 + 0.9) / 3)
    assert average_accuracy(ACC, 1) == pytest.approx((0.6 + 0.8) / 2)
    assert average_accuracy(ACC, 0) == pytest.approx(0.9)


def test_forgetting_is_max_based():
    # task 0: max(0.9, 0.6) - 0.3 = 0.6; task 1: max over rows 1.. of column 1 = 0.8, - 0.7 = 0.1 -> mean 0.35
    assert forgetting(ACC, 2) == pytest.approx(0.35)
    assert task_forgetting(ACC, 2) == pytest.approx([0.6, 0.1])
    assert forgetting(ACC, 1) == pytest.approx(0.9 - 0.6)


def test_forgetting_uses_the_best_row_since_the_task_was_learned_not_the_first():
    acc = np.array([[0.2, 0.0], [0.0, 0.0]])
    acc3 = np.array([[0.2, 0.0, 0.0], [0.8, 0.5, 0.0], [0.4, 0.5, 0.6]])
    assert forgetting(acc, 1) == pytest.approx(0.2)
    # max over 0 <= k < 2 of acc[k,0] is 0.8 (row 1), not acc[0,0] = 0.2: first-based would say -0.2
    assert forgetting(acc3, 2) == pytest.approx(((0.8 - 0.4) + (0.5 - 0.5)) / 2)


def test_forgetting_starts_at_the_row_where_the_task_was_trained():
    # A task that scored 0.855 before its training (row 0), 0.775 once trained (row 1) and 0.775 at
    # the end (row 2) lost nothing: the max runs over rows 1.. of its column, not row 0.
    acc = np.array([[0.9, 0.855, 0.0], [0.5, 0.775, 0.1], [0.4, 0.775, 0.8]])
    assert task_forgetting(acc, 2) == pytest.approx([0.9 - 0.4, 0.0])
    assert forgetting(acc, 2) == pytest.approx(0.25)
    # an off-by-one (rows from i + 1) would miss row 1 and say task 1 is undefined or -0.775; from 0, 0.08
    assert task_forgetting(acc, 1) == pytest.approx([0.9 - 0.5])


def test_the_batch_summary_is_the_summary_of_each_matrix_for_every_upto_and_skip():
    # the hand-made matrix (task 0: 0.6 forgotten, task 1: 0.1) stacked with random ones, one with a
    # task that scores best before its training (the max must start at its own row)
    rng = np.random.default_rng(0)
    for size in (1, 2, 3, 4):
        stack = np.concatenate([rng.random((5, size, size)), np.array([np.eye(size)[::-1] * 0.5 + 0.25])])
        if size == 3:
            stack[0] = ACC
        base = rng.random((6, size))
        for upto in range(size):
            for skip in ((), (0,)):
                batch = summary_batch(stack, base, upto, skip=skip)
                for n in range(len(stack)):
                    one = summary(stack[n], base[n], upto, skip=skip)
                    for metric, values in batch.items():
                        if one[metric] is None:
                            assert values is None, (size, upto, skip, metric)
                        else:
                            assert values[n] == pytest.approx(one[metric]), (size, upto, skip, metric, n)
    three = summary_batch(np.stack([ACC, ACC[::-1]]), np.stack([BASELINE, BASELINE]), 2)
    assert three["forgetting"][0] == pytest.approx(0.35) and three["avg_acc"][0] == pytest.approx(1.9 / 3)
    with pytest.raises(ValueError, match="N x T x T"):
        summary_batch(ACC, BASELINE, 2)


def test_backward_transfer():
    # (0.3 - 0.9) + (0.7 - 0.8) over 2
    assert backward_transfer(ACC, 2) == pytest.approx(-0.35)


def test_forward_transfer():
    # (acc[0,1] - b[1]) + (acc[1,2] - b[2]) = (0.1 - 0) + (0.2 - 0.1)  over 2
    assert forward_transfer(ACC, BASELINE, 2) == pytest.approx(0.1)
    assert forward_transfer(ACC, BASELINE, 1) == pytest.approx(0.1)


@pytest.mark.parametrize("fn", [forgetting, backward_transfer], ids=["forgetting", "bwt"])
def test_first_task_has_nothing_to_forget_undefined_not_zero(fn):
    assert fn(ACC, 0) is None


def test_one_task_stream():
    acc = np.array([[0.7]])
    result = summary(acc, np.array([0.1]), 0)
    assert result == {"avg_acc": pytest.approx(0.7), "forgetting": None, "bwt": None, "fwt": None,
                      "learning_acc": pytest.approx(0.7)}


def test_two_task_stream():
    acc = np.array([[0.8, 0.3], [0.2, 0.9]])
    result = summary(acc, np.array([0.0, 0.1]), 1)
    assert result["avg_acc"] == pytest.approx(0.55)
    assert result["forgetting"] == pytest.approx(0.6)
    assert result["bwt"] == pytest.approx(-0.6)
    assert result["fwt"] == pytest.approx(0.2)


@pytest.mark.parametrize("upto", [-1, 3], ids=["negative", "past-end"])
def test_upto_out_of_range_is_an_error(upto):
    with pytest.raises(ValueError, match="upto"):
        forgetting(ACC, upto)


def test_matrix_records_rows_in_order_and_round_trips():
    m = ForgettingMatrix(["a", "b", "c"])
    assert m.num_rows == 0
    m.record_baseline({"a": 0.05, "b": 0.0, "c": 0.1})
    for t, row in enumerate(ACC):
        m.record(t, dict(zip("abc", row)))
        assert m.num_rows == t + 1
    assert m.summary() == summary(ACC, BASELINE, 2, names=["a", "b", "c"])
    # each earlier task's own forgetting, by name, beside the mean (logged as forgetting/<task>)
    assert {k: m.summary()[k] for k in ("forgetting/a", "forgetting/b")} == pytest.approx({"forgetting/a": 0.6,
                                                                                          "forgetting/b": 0.1})
    assert "forgetting/c" not in m.summary() and "forgetting/b" not in m.summary(1)
    again = ForgettingMatrix.from_dict(m.to_dict())
    np.testing.assert_allclose(again.acc, ACC)


def test_partial_matrix_serialises_missing_rows_as_null():
    m = ForgettingMatrix(["a", "b"])
    m.record(0, [0.5, 0.0])
    data = m.to_dict()
    assert data["acc_matrix"][1] == [None, None]
    assert data["baseline"] == [None, None]
    assert math.isnan(ForgettingMatrix.from_dict(data).acc[1, 0])


def test_row_missing_a_task_is_rejected():
    m = ForgettingMatrix(["a", "b"])
    with pytest.raises(ValueError, match=r"missing for tasks \['b'\]"):
        m.record(0, {"a": 1.0})


def test_learning_accuracy_is_the_diagonal_and_skips_untrained_tasks():
    from pipelines.metrics import learning_accuracy

    acc = np.array([[0.5, 0.0, 0.0], [0.4, 0.9, 0.1], [0.2, 0.3, 0.7]])
    assert learning_accuracy(acc, 2) == pytest.approx((0.5 + 0.9 + 0.7) / 3)
    assert learning_accuracy(acc, 1) == pytest.approx(0.7)
    assert learning_accuracy(acc, 2, skip=(0,)) == pytest.approx(0.8)
    assert learning_accuracy(acc, 0, skip=(0,)) is None


def test_per_metric_averages_appear_only_when_the_seen_tasks_mix_metrics():
    acc = np.array([[0.8, 0.0, 0.0], [0.6, 0.9, 0.0], [0.4, 0.7, 0.3]])
    scored_by = ["exact_match", "exact_match", "rouge_l"]
    early = summary(acc, np.zeros(3), 1, scored_by=scored_by)
    assert not any("/" in k for k in early)  # two exact-match tasks: one scale
    final = summary(acc, np.zeros(3), 2, scored_by=scored_by)
    assert final["avg_acc/exact_match"] == pytest.approx(0.55) and final["avg_acc/rouge_l"] == pytest.approx(0.3)
    assert final["learning_acc/exact_match"] == pytest.approx(0.85)
    assert final["avg_acc"] == pytest.approx((0.4 + 0.7 + 0.3) / 3)


def test_the_gap_to_joint_against_a_reference_row_skips_untrained_tasks():
    acc = np.array([[0.5, 0.0], [0.2, 0.6]])
    assert gap_to_joint(acc, [0.7, 0.9]) == pytest.approx(((0.7 - 0.5) + (0.9 - 0.6)) / 2)
    assert gap_to_joint(acc, [0.7, 0.9], skip=(0,)) == pytest.approx(0.3)


def test_interval_is_a_student_t_half_width():
    out = interval([0.1, 0.3, 0.2, None])
    assert out["n"] == 3 and out["mean"] == pytest.approx(0.2)
    assert out["ci95"] == pytest.approx(4.303 * 0.1 / np.sqrt(3))  # t(0.975, 2) x s / sqrt(n)
    assert interval([0.4])["ci95"] is None and interval([])["mean"] is None
    assert interval([0.5] * 40)["ci95"] == pytest.approx(0.0)  # beyond the table: the normal's 1.96


def test_what_fwt_measures_follows_the_scoring_and_the_metrics():
    generated = what_fwt_measures("generate", ["exact_match", "exact_match"])
    ranked = what_fwt_measures("likelihood", ["exact_match"])
    assert "output format" in generated and "ROUGE-L" not in generated
    assert "near chance" in ranked and "output format" not in ranked
    assert "ROUGE-L" in what_fwt_measures("generate", ["exact_match", "rouge_l"])
