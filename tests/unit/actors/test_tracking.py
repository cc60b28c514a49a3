"""MLflow as a window onto the run: the buffered writer, the reachability check, orphaned runs."""

import json
import socket
import threading
import time

import pytest
from mlflow.tracking import MlflowClient

from actors.tracking import (
    BufferedSink,
    MlflowSink,
    TrackingUnreachableError,
    check_tracking,
    mark_orphaned_runs,
    send_pending,
)
from pipelines.rundir import OutputDir


class FlakySink(MlflowSink):
    """A real SQLite-backed sink whose server 'goes away' while ``down`` is set."""

    def __init__(self, uri, run_id):
        super().__init__(uri, run_id)
        self.down = threading.Event()

    def log_metrics(self, metrics, *, step, timestamp=None):
        if self.down.is_set():
            raise ConnectionError("connection refused")
        super().log_metrics(metrics, step=step, timestamp=timestamp)


def test_an_outage_delays_records_but_never_blocks_a_caller_or_loses_one(mlflow_store):
    run_id = MlflowSink.start(mlflow_store, "buffered").run_id
    flaky = FlakySink(mlflow_store, run_id)
    sink = BufferedSink(flaky, max_backoff_s=0.2)
    sink.log_metrics({"loss": 1.0}, step=0)
    flaky.down.set()
    started = time.monotonic()
    for step in range(1, 200):
        sink.log_metrics({"loss": float(step), "undefined": None}, step=step)
    assert time.monotonic() - started < 1.0  # callers never wait for the server
    time.sleep(0.5)
    assert sink.outage is not None and "ConnectionError" in sink.outage and sink.pending > 0
    flaky.down.clear()
    assert sink.flush(timeout_s=30) == 0 and sink.outage is None
    assert sink.end("FINISHED") == 0
    history = MlflowClient(mlflow_store).get_metric_history(run_id, "loss")
    assert [m.step for m in history] == list(range(200)) and [m.value for m in history][-1] == 199.0
    assert MlflowClient(mlflow_store).get_run(run_id).info.status == "FINISHED"


def test_what_cannot_be_sent_by_the_end_waits_in_a_file_and_goes_out_later(mlflow_store, tmp_path):
    run_id = MlflowSink.start(mlflow_store, "buffered").run_id
    flaky = FlakySink(mlflow_store, run_id)
    flaky.down.set()
    pending = tmp_path / "mlflow-pending.jsonl"
    sink = BufferedSink(flaky, pending_path=pending, max_backoff_s=0.2)
    sink.log_metrics({"acc": 0.5}, step=0)
    sink.set_tags({"note": "kept"})
    assert sink.end("FINISHED", timeout_s=0.5) == 3  # metrics, tags, the end itself
    kinds = [json.loads(line)["kind"] for line in pending.read_text().splitlines()]
    assert kinds == ["metrics", "tags", "end"]
    assert MlflowClient(mlflow_store).get_run(run_id).info.status == "RUNNING"
    assert send_pending(MlflowSink(mlflow_store, run_id), pending) == 3 and not pending.exists()
    run = MlflowClient(mlflow_store).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["acc"] == 0.5 and run.data.tags["note"] == "kept"


def _during_an_outage(mlflow_store, pending, *, max_queued, records):
    """A sink whose server is down, ``records`` loss metrics given to it; returns (run id, server, sink)."""
    run_id = MlflowSink.start(mlflow_store, "bounded").run_id
    flaky = FlakySink(mlflow_store, run_id)
    flaky.down.set()
    sink = BufferedSink(flaky, pending_path=pending, max_backoff_s=0.2, max_queued=max_queued)
    for step in range(records):
        sink.log_metrics({"loss": float(step)}, step=step)
    return run_id, flaky, sink


def test_a_long_outage_keeps_a_bounded_queue_and_sends_every_record_in_order(mlflow_store, tmp_path):
    pending = tmp_path / "mlflow-pending.jsonl"
    run_id, flaky, sink = _during_an_outage(mlflow_store, pending, max_queued=5, records=50)
    assert sink.pending == 50 and len(sink._records) <= 5  # the rest wait on disk, not in memory
    assert len(pending.read_text().splitlines()) >= 45
    flaky.down.clear()
    assert sink.flush(timeout_s=60) == 0 and not pending.exists()
    assert sink.end("FINISHED") == 0
    history = MlflowClient(mlflow_store).get_metric_history(run_id, "loss")
    assert [m.step for m in sorted(history, key=lambda m: m.timestamp)] == list(range(50))
    assert [m.value for m in history] == [float(s) for s in range(50)]


def test_records_spilled_during_an_outage_that_outlasts_the_run_are_saved_in_order(mlflow_store, tmp_path):
    pending = tmp_path / "mlflow-pending.jsonl"
    _, _, sink = _during_an_outage(mlflow_store, pending, max_queued=3, records=10)
    assert sink.end("FINISHED", timeout_s=0.5) == 11
    steps = [json.loads(line).get("step") for line in pending.read_text().splitlines()]
    assert steps == [*range(10), None]  # the metrics in order, then the end


def test_a_pending_artifact_outside_the_run_is_refused_and_nothing_is_sent(mlflow_store, tmp_path):
    from pipelines.errors import DataError

    run_id = MlflowSink.start(mlflow_store, "pending").run_id
    secret = tmp_path / "elsewhere" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("not the run's")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    pending = run_dir / "mlflow-pending.jsonl"
    for path in (str(secret), "../elsewhere/secret.txt"):
        pending.write_text(json.dumps({"kind": "tags", "values": {"a": "b"}}) + "\n"
                           + json.dumps({"kind": "artifact", "path": path, "artifact_path": None}) + "\n")
        with pytest.raises(DataError, match=r"mlflow-pending\.jsonl, record 2: path = .* points outside the run"):
            send_pending(MlflowSink(mlflow_store, run_id), pending)
        assert pending.exists()  # kept for the user to look at
    client = MlflowClient(mlflow_store)
    assert client.list_artifacts(run_id) == [] and "a" not in client.get_run(run_id).data.tags
    (run_dir / "report.json").write_text("{}")  # the run's own file goes out
    pending.write_text(json.dumps({"kind": "artifact", "path": str(run_dir / "report.json"), "artifact_path": None}))
    assert send_pending(MlflowSink(mlflow_store, run_id), pending) == 1
    assert [a.path for a in client.list_artifacts(run_id)] == ["report.json"]


def test_an_unreachable_server_is_named_within_seconds():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(TrackingUnreachableError, match=rf"http://127.0.0.1:{port} is unreachable"):
        check_tracking(f"http://127.0.0.1:{port}", timeout_s=2)
    assert time.monotonic() - started < 5


def test_a_sqlite_store_that_cannot_be_created_is_named(tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    with pytest.raises(TrackingUnreachableError, match=r"sqlite:///.*a-file/mlflow.db: cannot create"):
        check_tracking(f"sqlite:///{tmp_path / 'a-file' / 'mlflow.db'}")
    check_tracking(f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}")  # a missing directory is created
    assert (tmp_path / "new").is_dir()


def test_a_run_whose_process_died_is_marked_killed_by_the_next_run(mlflow_store, tmp_path):
    dead_dir, live_dir = tmp_path / "dead", tmp_path / "live"
    ids = {}
    for directory in (dead_dir, live_dir):
        directory.mkdir()
        sink = MlflowSink.start(mlflow_store, "orphans",
                                tags={"forgetless.output_dir": str(directory), "forgetless.host": socket.gethostname()})
        ids[directory] = sink.run_id
        (directory / "report.json").write_text(json.dumps({"status": "RUNNING", "mlflow": {"run_id": sink.run_id}}))
    alive = OutputDir(live_dir)
    alive.lock()  # this one's process still runs
    try:
        assert mark_orphaned_runs(mlflow_store, "orphans") == [ids[dead_dir]]
    finally:
        alive.unlock()
    client = MlflowClient(mlflow_store)
    dead = client.get_run(ids[dead_dir])
    assert dead.info.status == "KILLED" and "forgetless resume" in dead.data.tags["forgetless.error"]
    assert client.get_run(ids[live_dir]).info.status == "RUNNING"


def test_looking_for_orphans_in_a_store_not_made_yet_leaves_it_unmade(tmp_path):
    db = tmp_path / "new" / "mlflow.db"
    assert mark_orphaned_runs(f"sqlite:///{db}", "orphans") == []
    assert not db.exists()  # the run's scheduler makes it, while the trainer workers start


def test_params_and_tags_reach_mlflow_redacted_whoever_sets_them(mlflow_store):
    sink = MlflowSink.start(mlflow_store, "redacted", tags={"forgetless.note": "from http://u:hunter2@h:1"})
    sink.log_params({"mlflow.tracking_uri": "http://u:hunter2@h:1"})
    sink.set_tags({"forgetless.error": "ConnectionError: http://u:hunter2@h:1/api refused"})
    run = MlflowClient(mlflow_store).get_run(sink.run_id)
    logged = [*run.data.params.values(), *run.data.tags.values()]
    assert not [v for v in logged if "hunter2" in v]
    assert run.data.tags["forgetless.error"] == "ConnectionError: http://u:***@h:1/api refused"
