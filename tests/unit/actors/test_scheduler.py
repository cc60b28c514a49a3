"""The scheduler as a plain object, with a real SQLite MLflow store and no cluster."""

import json
import socket

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from actors.scheduler import Scheduler
from actors.tracking import MlflowSink
from pipelines.config import resolve_paths, validate_config
from pipelines.tasks import load_stream
from storage import checksums


@pytest.fixture
def scheduler(toy_stream_config):
    config = resolve_paths(validate_config(toy_stream_config))
    return Scheduler(config, load_stream(config))


def _row(value_a, value_b):
    return {"category": value_a, "first_word": value_b}


def test_hands_out_tasks_in_order_to_every_rank_then_none(scheduler):
    for rank in (0, 1):
        plans = [scheduler.next_task(rank) for _ in range(3)]
        assert [p.index for p in plans[:2]] == [0, 1]
        assert [p.name for p in plans[:2]] == ["category", "first_word"]
        assert plans[2] is None
    assert scheduler.next_task(0) is None  # and stays at the end


def test_plan_holds_prefixed_examples_of_that_task(scheduler):
    plan = scheduler.next_task(0)
    assert plan.examples.column_names == ["source", "target"]
    assert all(s.startswith("category: ") for s in plan.examples.column("source").to_pylist())


def test_records_rows_logs_metrics_and_finishes(scheduler, mlflow_store):
    scheduler.record_baseline(_row(0.1, 0.0))
    scheduler.next_task(0)
    heatmap = scheduler._heatmap
    heatmap.wait()  # the baseline row's picture, which next_task started
    scheduler.log_step(0, 0, 2, 1.5, 1)
    scheduler.log_step(0, 1, 2, 1.0, 2)
    metrics = scheduler.record_eval(0, _row(0.9, 0.0))
    # the heatmap waits for the next plan to go out: no drawing holds back the calls between two tasks
    assert heatmap._pending is not None and heatmap._thread is None
    assert metrics == {"avg_acc": pytest.approx(0.9), "forgetting": None, "bwt": None, "fwt": None,
                       "learning_acc": pytest.approx(0.9)}
    scheduler.next_task(0)
    assert heatmap._pending is None or heatmap._thread is not None  # task 0's row drawn, or being drawn
    scheduler.record_eval(1, _row(0.3, 0.8), checkpoint="/x")
    report = scheduler.finish()

    assert report.status == "FINISHED" and report.complete
    assert report.metrics["forgetting"] == pytest.approx(0.6)
    assert report.metrics["fwt"] == pytest.approx(0.0)
    client = MlflowClient(mlflow_store)
    run = client.get_run(report.mlflow.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["training.lr"] == "0.003"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "acc/category")] == [0.9, 0.3]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "acc/category")] == [0, 1]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1.5, 1.0]
    assert client.get_metric_history(run.info.run_id, "forgetting")[-1].value == pytest.approx(0.6)
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "forgetting/category")] == [
        (1, pytest.approx(0.6))]  # each earlier task's own, once it has an earlier row to fall from
    assert report.metrics["forgetting/category"] == pytest.approx(0.6) and "forgetting/first_word" not in report.metrics
    assert "output format" in report.fwt_measures  # generated answers: what fwt reads as is said beside it
    # undefined after the first task: not logged as 0
    assert [m.step for m in client.get_metric_history(run.info.run_id, "forgetting")] == [1]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"acc_matrix.json", "acc_heatmap.png", "config.yaml", "report.json"} <= artifacts
    saved = json.loads((scheduler.output_dir / "report.json").read_text())
    assert saved["acc_matrix"] == [[0.9, 0.0], [0.3, 0.8]]


def test_failure_stops_the_stream_and_ends_the_run_failed(scheduler, mlflow_store):
    scheduler.next_task(0)
    scheduler.fail("NonFiniteLossError: non-finite loss (nan) in task 'category' at step 3")
    scheduler.fail("a later, secondary error")
    assert scheduler.next_task(0) is None
    report = scheduler.finish("FAILED")
    assert report.error.startswith("NonFiniteLossError")
    assert report.complete is False
    run = MlflowClient(mlflow_store).get_run(report.mlflow.run_id)
    assert run.info.status == "FAILED"
    assert "step 3" in run.data.tags["forgetless.error"]
    assert scheduler.finish("FINISHED") is report  # idempotent: the first end wins


def test_a_run_left_active_elsewhere_in_the_process_does_not_interfere(toy_stream_config, mlflow_store):
    mlflow.set_tracking_uri(mlflow_store)
    with mlflow.start_run() as outer:
        config = resolve_paths(validate_config(toy_stream_config))
        scheduler = Scheduler(config, load_stream(config))
        report = scheduler.finish()
        assert report.mlflow.run_id != outer.info.run_id
        assert mlflow.active_run().info.run_id == outer.info.run_id
    client = MlflowClient(mlflow_store)
    assert client.get_run(report.mlflow.run_id).info.status == "FINISHED"


def test_a_new_run_ends_the_store_s_runs_whose_process_died(toy_stream_config, mlflow_store, tmp_path):
    # The scheduler looks for them as it opens its own run (the driver never imports MLflow).
    config = resolve_paths(validate_config(toy_stream_config))
    dead = tmp_path / "killed-earlier"
    dead.mkdir()
    orphan = MlflowSink.start(mlflow_store, config.mlflow.experiment_name, tags={
        "forgetless.output_dir": str(dead), "forgetless.host": socket.gethostname()})
    (dead / "report.json").write_text(json.dumps({"status": "RUNNING", "mlflow": {"run_id": orphan.run_id}}))
    scheduler = Scheduler(config, load_stream(config))
    client = MlflowClient(mlflow_store)
    assert client.get_run(orphan.run_id).info.status == "KILLED"
    assert client.get_run(scheduler.run_id).info.status == "RUNNING"
    scheduler.finish()


def test_sink_resumes_a_run_by_id(mlflow_store):
    sink = MlflowSink.start(mlflow_store, "resume-test", run_name="r")
    sink.log_metrics({"avg_acc": 0.5}, step=0)
    sink.end("FAILED")
    resumed = MlflowSink.resume(mlflow_store, sink.run_id)
    resumed.log_metrics({"avg_acc": 0.7, "forgetting": None, "bwt": float("nan")}, step=1)
    resumed.end("FINISHED")
    client = MlflowClient(mlflow_store)
    assert [m.value for m in client.get_metric_history(sink.run_id, "avg_acc")] == [0.5, 0.7]
    assert client.get_metric_history(sink.run_id, "forgetting") == []
    assert client.get_run(sink.run_id).info.status == "FINISHED"


def test_sink_resume_of_an_unknown_run_names_the_id(mlflow_store):
    with pytest.raises(Exception, match="deadbeef"):
        MlflowSink.resume(mlflow_store, "deadbeef")


def test_the_heatmap_is_drawn_off_the_commit_path_and_shows_the_last_matrix(tmp_path, monkeypatch):
    import threading

    import numpy as np

    import actors.scheduler as scheduler_module
    import pipelines.plots
    from pipelines.metrics import ForgettingMatrix
    from pipelines.plots import plot_heatmap

    release, begun, drawn = threading.Event(), threading.Event(), []

    def slow_plot(matrix, path, *, title=""):
        begun.set()
        release.wait(timeout=30)  # a drawing that takes as long as the test says
        drawn.append(float(matrix.acc[0, 0]))
        return plot_heatmap(matrix, path, title=title)

    monkeypatch.setattr(pipelines.plots, "plot_heatmap", slow_plot)
    writer = scheduler_module.HeatmapWriter(tmp_path / "acc_heatmap.png", "toy")
    matrix = ForgettingMatrix(["a", "b"])
    writer.submit(matrix)
    assert not begun.wait(timeout=0.5)  # a submitted matrix waits for start (the next plan handed out)
    for value in (0.1, 0.2, 0.3):
        matrix.acc[0, 0] = value
        writer.submit(matrix)
        writer.start()  # returns while the first drawing still waits
    assert begun.wait(timeout=30) and not (tmp_path / "acc_heatmap.png").exists()
    release.set()
    writer.wait()
    assert drawn[-1] == 0.3 and len(drawn) <= 2  # the newest matrix wins; ones overtaken are skipped
    expected = plot_heatmap(matrix, tmp_path / "direct.png", title="toy")
    assert (tmp_path / "acc_heatmap.png").read_bytes() == expected.read_bytes()
    assert writer.error is None and np.isclose(matrix.acc[0, 0], 0.3)


def test_joint_reports_only_what_training_at_the_end_defines(toy_stream_config, mlflow_store):
    # joint's rows before the last are the untrained model: no forgetting, transfer or learning
    # accuracy to report (the matrix alone would give forgetting -0.7 here), and none logged
    toy_stream_config["strategy"] = {"name": "joint"}
    config = resolve_paths(validate_config(toy_stream_config))
    scheduler = Scheduler(config, load_stream(config))
    scheduler.record_baseline(_row(0.0, 0.0))
    scheduler.next_task(0)
    assert scheduler.record_eval(0, _row(0.0, 0.0))["forgetting"] is None
    scheduler.next_task(0)
    scheduler.record_eval(1, _row(0.7, 0.8))
    report = scheduler.finish()
    assert report.metrics == {"avg_acc": pytest.approx(0.75), "forgetting": None, "bwt": None, "fwt": None,
                              "learning_acc": None, "forgetting/category": None}
    assert "learning_acc are not defined" in report.note
    logged = MlflowClient(mlflow_store).get_run(report.mlflow.run_id).data.metrics
    assert logged["avg_acc"] == pytest.approx(0.75) and not {"forgetting", "forgetting/category", "bwt", "fwt", "learning_acc"} & set(logged)


def test_a_total_replay_budget_holds_over_six_tasks(toy_stream_config, toy_task, tmp_path, local_ray):
    """replay.memory_rows is the store's most rows, checked on a real two-shard store after every
    task of a six-task stream: the old tasks' shares shrink (their surplus deleted before the new
    task's rows go in), a task short of rows leaves the rest to the others, and nothing is kept
    twice."""
    from pipelines.plan import memory_shares

    sizes, kinds = [64, 14, 64, 64, 10, 64], ["category", "first_word", "last_word", "count"]
    toy_stream_config["stream"]["tasks"] = [
        {"name": f"t{i}", "source": {"kind": "file", "path": str(toy_task(tmp_path / f"t{i}.jsonl", kinds[i % 4],
                                                                          n=n, seed=i))}}
        for i, n in enumerate(sizes)]
    toy_stream_config["strategy"] = {"name": "replay"}
    toy_stream_config["replay"] = {"memory_rows": 50, "rows_per_batch": 4, "num_shards": 2}
    config = resolve_paths(validate_config(toy_stream_config))
    stream = load_stream(config)
    scheduler = Scheduler(config, stream)
    held, shares_before = [], {}
    try:
        for t in range(len(stream)):
            scheduler.next_task(0)
            scheduler.record_eval(t, {name: 0.5 for name in stream.names})
            stats = scheduler.replay_summary()
            held.append(stats.rows)
            shares = memory_shares(config, stream, t)
            assert stats.rows_per_task == {stream[j].name: n for j, n in shares.items() if n}, t
            assert all(shares[j] <= n for j, n in shares_before.items()), t  # an old task's share never grows
            shares_before = shares
        report = scheduler.finish()
    finally:
        scheduler.replay.shutdown()
    train_rows = [len(task.sources("train")) for task in stream]
    assert train_rows[1] < 25 and train_rows[4] < 50 / 6  # two tasks short of their even share
    assert max(held) <= 50 and held[-1] == 50 and held[0] == min(50, train_rows[0])
    assert report.replay.rows_after_task == dict(zip(stream.names, held)) and report.replay.memory_rows == 50
    final = report.replay.rows_per_task
    assert final["t4"] == train_rows[4]  # all it has
    full = [final[name] for name in ("t0", "t2", "t3", "t5")]
    assert max(full) - min(full) <= 1 and final["t1"] <= max(full)  # the rest split evenly


def test_a_restarted_worker_group_continues_from_the_last_mid_task_state_and_is_recorded(toy_stream_config,
                                                                                         mlflow_store, tmp_path):
    toy_stream_config["training"]["max_failures"] = 1
    config = resolve_paths(validate_config(toy_stream_config))
    scheduler = Scheduler(config, load_stream(config))
    for rank, pid in ((0, 101), (1, 102)):
        assert scheduler.register_worker(rank, pid=pid, host="node-a", attempt=0)
    scheduler.record_baseline(_row(0.1, 0.0))
    scheduler.next_task(0)
    scheduler.record_eval(0, _row(0.9, 0.0))
    assert scheduler.next_task(0).resume_dir is None
    state = tmp_path / "out" / "state"
    (state / "task-01.step-000010").mkdir(parents=True)
    scheduler.record_checkpoint(1, 10, 16, str(state / "task-01.step-000010"))
    scheduler.log_step(1, 12, 30, 0.5, 18)
    scheduler.record_checkpoint(1, 20, 26, str(state / "task-01.step-000020"))
    assert not (state / "task-01.step-000010").exists()  # the older mid-task state goes
    scheduler.log_step(1, 26, 30, 0.4, 33)  # step 27 of 30 reached; then worker 1 dies, worker 0 reports
    scheduler.fail("worker 0 of 2: RuntimeError: Connection closed by peer")
    assert scheduler.next_task(0) is None and scheduler.stop_reason() is None

    assert scheduler.register_worker(0, pid=201, host="node-a", attempt=1)  # the group is back
    (restart,) = scheduler.report().restarts
    assert restart.died == ["worker 1 (pid 102 on node-a)"]
    assert restart.reasons == ["worker 0 of 2: RuntimeError: Connection closed by peer"]
    assert restart.task_index == 1 and restart.steps_redone == 7  # 27 reached, restored at 20
    assert restart.restored_from == "task 1, step 20 (mid-task checkpoint)"
    assert scheduler.register_worker(1, pid=202, host="node-a", attempt=1)  # its peer: the same restart
    assert len(scheduler.report().restarts) == 1
    plan = scheduler.next_task(0)
    assert plan.index == 1 and plan.resume_dir == str(state / "task-01.step-000020")
    assert scheduler.start().restore_dir == str(state / "task-00")  # the task before: loaded first
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["resume"]["mid_task"]["steps_done"] == 20 and report["restarts"][0]["steps_redone"] == 7

    # a second failure is more than max_failures=1 allows: the restarted group is told to stop
    scheduler.fail("worker 1 of 2: RuntimeError: Connection reset")
    assert not scheduler.register_worker(0, pid=301, host="node-a", attempt=2)
    assert "more than training.max_failures=1" in scheduler.stop_reason()
    failure = scheduler.failure()
    assert failure.startswith("the trainer worker group failed 2 times, more than training.max_failures=1: 2 failure(s): "
                              "(1) worker 1 (pid 102 on node-a) died; worker 0 of 2: RuntimeError"), failure
    assert "(2) worker 0 (pid 201 on node-a) died; worker 1 of 2: RuntimeError: Connection reset" in failure
    scheduler.finish("FAILED", failure)  # sends what the sink holds
    run = MlflowClient(mlflow_store).get_run(scheduler.run_id)
    assert run.data.metrics["recoveries"] == 2 and "restored from task 1, step 20" in run.data.tags[
        "forgetless.recovery.1"]


def test_an_error_of_the_run_itself_is_not_retried(scheduler):
    scheduler.register_worker(0, pid=1, host="h", attempt=0)
    scheduler.fail("worker 0 of 1: DataError: task 'x' has 0 rows", fatal=True)
    assert scheduler.stop_reason() == "worker 0 of 1: DataError: task 'x' has 0 rows"
    assert not scheduler.register_worker(0, pid=2, host="h", attempt=1)
    scheduler.finish("FAILED", scheduler.failure())


def _saved_state(directory, world_size=2):
    """A saved training state's files, with each rank's checksum list (as ``Learner.save_state`` writes)."""
    directory.mkdir(parents=True)
    for rank in range(world_size):
        (directory / f"rank-{rank:03d}.safetensors").write_bytes(bytes([rank]) * 2048)
    for rank in range(world_size):
        checksums.write_share(directory, rank, world_size)
    return directory


def test_a_damaged_state_is_named_with_the_fallback_taken_before_anything_loads_it(toy_stream_config, mlflow_store,
                                                                                  tmp_path):
    config = resolve_paths(validate_config(toy_stream_config))
    scheduler = Scheduler(config, load_stream(config))
    assert scheduler.register_worker(0, pid=101, host="node-a", attempt=0)
    scheduler.next_task(0)
    state = tmp_path / "out" / "state"
    _saved_state(state / "task-00")
    scheduler.record_eval(0, _row(0.9, 0.0))
    scheduler.next_task(0)
    mid = _saved_state(state / "task-01.step-000020")
    scheduler.record_checkpoint(1, 20, 26, str(mid))
    scheduler.log_step(1, 26, 30, 0.4, 33)
    damaged = mid / "rank-001.safetensors"
    data = bytearray(damaged.read_bytes())
    data[7] ^= 0x01
    damaged.write_bytes(bytes(data))
    scheduler.fail("worker 1 of 2: RuntimeError: Connection closed by peer")

    # the mid-task state fails its checksum: the restart goes on from the task's start instead, and says so
    assert scheduler.register_worker(0, pid=201, host="node-a", attempt=1)
    (restart,) = scheduler.report().restarts
    assert restart.restored_from == "the end of task 0" and restart.steps_redone == 27
    (fallback,) = scheduler.report().fallbacks
    assert fallback.startswith(f"{damaged}: fails its checksum (CRC-32C ")
    assert fallback.endswith("; task 1 went on from the end of task 0 instead of its step 20 (those steps are redone)")
    assert scheduler.next_task(0).resume_dir is None and scheduler.start().restore_dir == str(state / "task-00")
    assert json.loads((tmp_path / "out" / "report.json").read_text())["fallbacks"] == [fallback]

    # the state of the finished task is damaged too: nothing earlier is kept, the run stops naming it
    (state / "task-00" / "rank-000.safetensors").write_bytes(b"\x00" * 100)
    scheduler.fail("worker 0 of 2: RuntimeError: Connection reset")
    assert not scheduler.register_worker(0, pid=301, host="node-a", attempt=2)
    reason = scheduler.stop_reason()
    assert reason.startswith(f"{state / 'task-00' / 'rank-000.safetensors'}: 100 bytes, 2048 when it was saved")
    assert "no earlier one is kept, so the run cannot go on. Restore the file from a backup" in reason
    assert scheduler.failure().startswith(reason)
    scheduler.finish("FAILED", scheduler.failure())
    tags = MlflowClient(mlflow_store).get_run(scheduler.run_id).data.tags
    assert tags["forgetless.fallback.1"] == fallback and "none: the run stopped" in tags["forgetless.fallback.2"]
