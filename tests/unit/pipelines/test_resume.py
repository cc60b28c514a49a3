"""The resume carry-over, a pure function: a worked example of what a resumed run keeps."""

import math

from pipelines.report import MlflowRef, ResumePoint, RunReport, TaskStats
from pipelines.resume import carry_over


def _previous():
    stats = TaskStats(steps=4, mean_loss=1.0, seconds=1.0, started_at=0.0, ended_at=1.0, examples=8)
    return RunReport(
        tasks=["a", "b", "c"], acc_matrix=[[0.9, 0.1, 0.0], [0.5, 0.8, 0.2], [None, None, None]],
        baseline=[0.0, 0.1, 0.2], metrics={}, strategy="naive", strategy_config={"name": "naive"},
        experiment="e", seed=0, status="RUNNING", finished_tasks=2, complete=False,
        train={"a": stats, "b": stats}, checkpoints={"a": "/ck/a", "b": "/ck/b"},
        metrics_per_task=[{"task_index": 0, "avg_acc": 0.9}, {"task_index": 1, "avg_acc": 0.65}],
        mlflow=MlflowRef(tracking_uri="sqlite:///x", run_id="r"), output_dir="/o",
        resume=ResumePoint(training_state="/o/state/task-01", data_fingerprints={"a": "A", "b": "B", "c": "C"}))


def test_finished_rows_are_kept_and_a_changed_or_new_tasks_column_is_measured_again():
    # the resumed stream: a and b as before, c's data changed, d new
    carried = carry_over(_previous(), tasks=["a", "b", "c", "d"], fingerprints={"a": "A", "b": "B", "c": "C2", "d": "D"},
                         untrained=(), scored_by=["exact_match"] * 4, changes=["training.lr: 0.001 -> 0.002"], now=5.0)
    assert carried.finished == 2 and carried.training_state == "/o/state/task-01"
    acc = carried.matrix.acc
    assert acc[:2, :2].tolist() == [[0.9, 0.1], [0.5, 0.8]]  # row t, column j: as written
    assert all(math.isnan(v) for v in acc[:2, 2:].flatten()) and all(math.isnan(v) for v in acc[2:].flatten())
    assert carried.matrix.baseline[:2].tolist() == [0.0, 0.1] and math.isnan(carried.matrix.baseline[2])
    assert carried.fill_tasks == (2, 3)  # the last finished row (1) lacks c and d: the restored model fills them
    assert [h["task_index"] for h in carried.history] == [0, 1]
    assert set(carried.train_stats) == set(carried.checkpoints) == {"a", "b"}
    resumption = carried.resumes[-1]
    assert (resumption.at, resumption.finished_tasks, resumption.previous_status) == (5.0, 2, "RUNNING")
    assert resumption.new_tasks == ["c", "d"] and resumption.changed == ["training.lr: 0.001 -> 0.002"]


def test_a_column_moves_with_its_task_when_the_order_changes():
    carried = carry_over(_previous(), tasks=["b", "a", "c"], fingerprints={"a": "A", "b": "B", "c": "C"},
                         untrained=(), scored_by=["exact_match"] * 3, changes=[], now=0.0)
    assert carried.matrix.acc[:2].tolist()[1] == [0.8, 0.5, 0.2] and carried.matrix.acc[0, 0] == 0.1
    assert carried.fill_tasks == () and carried.resumes[-1].new_tasks == []  # every column of row 1 was measured


def test_a_mid_task_state_is_continued_only_into_the_same_task_with_the_same_training():
    from pipelines.report import MidTaskPoint, Restart

    previous = _previous()
    previous.resume.mid_task = MidTaskPoint(task_index=2, steps_done=30, global_step=38,
                                            training_state="/o/state/task-02.step-000030")
    previous.restarts = [Restart(number=1, at=1.0, steps_redone=3)]
    same = dict(tasks=["a", "b", "c"], fingerprints={"a": "A", "b": "B", "c": "C"}, untrained=(),
                scored_by=["exact_match"] * 3, now=0.0)
    kept = carry_over(previous, **same, changes=["training.max_failures: 3 -> 5", "mlflow.run_name: x -> y"])
    assert kept.mid_task == previous.resume.mid_task and kept.restarts == previous.restarts
    assert carry_over(previous, **same, changes=["training.lr: 0.001 -> 0.002"]).mid_task is None
    assert carry_over(previous, **{**same, "fingerprints": {"a": "A", "b": "B", "c": "C2"}}, changes=[]).mid_task is None
    assert carry_over(previous, **{**same, "tasks": ["a", "b", "d"], "fingerprints": {"a": "A", "b": "B", "d": "C"}},
                      changes=[]).mid_task is None  # another task at that place


def test_a_run_whose_state_went_after_its_stream_resumes_as_it_was_but_is_not_extended():
    import pytest

    from pipelines.errors import ConfigError

    previous = _previous()
    previous.acc_matrix[2] = [0.4, 0.6, 0.7]
    previous.finished_tasks, previous.complete, previous.status = 3, True, "FINISHED"
    previous.resume.training_state, previous.resume.dropped = None, "models"
    same = dict(fingerprints={"a": "A", "b": "B", "c": "C", "d": "D"}, untrained=(), scored_by=["exact_match"] * 4,
                changes=[], now=0.0)
    carried = carry_over(previous, tasks=["a", "b", "c"], **{**same, "scored_by": ["exact_match"] * 3})
    assert carried.finished == 3 and carried.fill_tasks == ()  # nothing to train, nothing to measure
    with pytest.raises(ConfigError, match=r"cannot be extended with 'd': its training state went .*"
                                          r"checkpoint.after_stream=models"):
        carry_over(previous, tasks=["a", "b", "c", "d"], **same)
    previous.resume.dropped = "report"
    with pytest.raises(ConfigError, match="its training state and models went"):
        carry_over(previous, tasks=["a", "b", "c", "d"], **same)
