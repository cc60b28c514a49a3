"""The comparison's aggregation and pictures, from hand-made run reports (no training)."""

import math

import numpy as np
import pytest

from actors.compare import aggregate, comparison_matrices, format_table
from pipelines.plots import plot_comparison
from pipelines.report import RunReport

TASKS = ["a", "b"]


def _report(seed, acc, metrics, status="FINISHED"):
    return RunReport(tasks=TASKS, seed=seed, status=status, acc_matrix=acc, baseline=[0.0, 0.0], metrics=metrics,
                     mlflow={"tracking_uri": "sqlite:///x.db", "run_id": f"run-{seed}"}, strategy="naive",
                     strategy_config={}, experiment="e", output_dir="/x", finished_tasks=len(acc))


@pytest.fixture
def summary():
    naive = [_report(0, [[0.8, 0.0], [0.2, 0.9]], {"avg_acc": 0.55, "forgetting": 0.6, "bwt": -0.6, "fwt": 0.0}),
             _report(1, [[0.6, 0.0], [0.4, 0.7]], {"avg_acc": 0.55, "forgetting": 0.2, "bwt": -0.2, "fwt": 0.0}),
             _report(2, [[0.0, 0.0], [0.0, 0.0]], {}, status="FAILED")]
    joint = [_report(0, [[0.0, 0.0], [0.7, 0.8]], {"avg_acc": 0.75, "forgetting": -0.7, "bwt": 0.7, "fwt": 0.0})]
    return aggregate({"naive": naive, "joint": joint})


def test_aggregate_takes_mean_and_sample_std_over_finished_seeds(summary):
    naive = summary["naive"]
    assert naive["seeds"] == [0, 1]  # the failed seed is listed under runs, not averaged
    assert naive["forgetting"]["mean"] == pytest.approx(0.4)
    assert naive["forgetting"]["std"] == pytest.approx(math.sqrt(0.08))  # ddof=1 over 0.6 and 0.2
    assert naive["acc_matrix_mean"] == pytest.approx(np.array([[0.7, 0.0], [0.3, 0.8]]))
    assert [r["status"] for r in naive["runs"]] == ["FINISHED", "FINISHED", "FAILED"]


def test_joint_reports_only_avg_acc(summary):
    joint = summary["joint"]
    assert joint["avg_acc"]["mean"] == pytest.approx(0.75)
    assert all(joint[m]["mean"] is None for m in ("forgetting", "bwt", "fwt"))
    row = next(line for line in format_table(TASKS, summary, seeds=1).splitlines() if line.startswith("| joint"))
    assert row.count("n/a") == 4 and "0.750" in row  # forgetting, bwt, fwt, learning_acc


def test_joint_earlier_rows_are_blank_in_the_pictures_not_zero(summary, tmp_path):
    matrices = comparison_matrices(TASKS, summary)
    assert np.isnan(matrices["joint"].acc[0]).all()  # the untrained model, not forgetting
    assert matrices["joint"].acc[1] == pytest.approx([0.7, 0.8])
    assert not np.isnan(matrices["naive"].acc).any()
    paths = plot_comparison(matrices, tmp_path)
    assert [p.name for p in paths] == ["first_task_accuracy.png", "heatmaps.png"]
    assert all(p.stat().st_size > 0 for p in paths)
