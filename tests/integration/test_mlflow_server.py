"""The scheduler writing to a real `mlflow server` over HTTP, bound to 127.0.0.1."""

import os
import signal
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from actors.scheduler import Scheduler
from pipelines.config import resolve_paths, validate_config
from pipelines.tasks import load_stream
from tests.integration.conftest import free_port, start_mlflow_server, stop_server


def _two_tasks_logged_to(uri, toy_stream_config):
    """What a run's scheduler sends a tracking server for two tasks; returns its config and report."""
    toy_stream_config["mlflow"]["tracking_uri"] = uri
    config = resolve_paths(validate_config(toy_stream_config))
    scheduler = Scheduler(config, load_stream(config))
    scheduler.record_baseline({"category": 0.0, "first_word": 0.0})
    scheduler.record_eval(0, {"category": 0.9, "first_word": 0.1})
    scheduler.record_eval(1, {"category": 0.4, "first_word": 0.8})
    return config, scheduler.finish()


def test_scheduler_logs_to_a_tracking_server(mlflow_server, toy_stream_config):
    _, report = _two_tasks_logged_to(mlflow_server, toy_stream_config)

    client = MlflowClient(mlflow_server)
    run = client.get_run(report.mlflow.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["forgetting"] == pytest.approx(0.5)
    assert {"acc_heatmap.png", "report.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    local = client.download_artifacts(run.info.run_id, "acc_matrix.json")
    assert Path(local).read_text().count("0.9") == 1


def test_a_server_that_needs_credentials_is_reached_with_them_and_they_leak_nowhere(tmp_path, toy_stream_config,
                                                                                   monkeypatch):
    from actors.tracking import TrackingCredentialsError, check_tracking

    password = "pw-7f3a9c-never-logged"
    server, uri = start_mlflow_server(tmp_path, admin_password=password)
    try:
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
            monkeypatch.delenv(key, raising=False)
        with pytest.raises(TrackingCredentialsError, match=r"needs credentials \(401\): set MLFLOW_TRACKING_USERNAME"):
            check_tracking(uri)  # /health answers anyone: the API does not
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong-password")
        with pytest.raises(TrackingCredentialsError, match=r"refused the credentials in MLFLOW_TRACKING_USERNAME"):
            check_tracking(uri)
        with_password = uri.replace("http://", f"http://admin:{password}@")
        with pytest.raises(TrackingCredentialsError, match="carries credentials") as refused:
            check_tracking(with_password)  # never "unreachable": what to do instead
        assert password not in str(refused.value) and f"({uri})" in str(refused.value)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        check_tracking(uri)

        config, report = _two_tasks_logged_to(uri, toy_stream_config)
        client = MlflowClient(uri)
        run = client.get_run(report.mlflow.run_id)
        assert run.info.status == "FINISHED" and run.data.metrics["forgetting"] == pytest.approx(0.5)
        assert "report.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
        logged = " ".join([*run.data.params.values(), *run.data.tags.values()])
        assert uri in logged and password not in logged
        files = [p for p in Path(config.output_dir).rglob("*") if p.is_file()]
        assert files and not [p for p in files if password.encode() in p.read_bytes()]
    finally:
        stop_server(server)


class RestartableServer:
    """An `mlflow server` on a fixed loopback port and store, that a test can stop and start again."""

    def __init__(self, tmp_path):
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.tmp_path = tmp_path
        self.process = None

    def start(self):
        self.process, _ = start_mlflow_server(self.tmp_path, self.port)
        return self

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)  # an outage, not a shutdown
            self.process.wait(timeout=30)


def test_an_outage_mid_run_neither_stalls_training_nor_loses_a_record(tmp_path, toy_stream_config):
    from actors.launch import run_experiment
    from pipelines.learner import Learner
    from pipelines.loop import run_stream
    from pipelines.models import stream_tokenizer

    server = RestartableServer(tmp_path).start()
    try:
        toy_stream_config["mlflow"].update(tracking_uri=server.uri, flush_timeout_s=2)
        toy_stream_config["training"].update(max_steps=30, log_every_n_steps=1)
        config = resolve_paths(validate_config(toy_stream_config))
        stream = load_stream(config)
        stream_tokenizer(config.model, stream).save_pretrained(f"{config.output_dir}/tokenizer")
        scheduler = Scheduler(config, stream)
        record_eval = scheduler.record_eval

        def outage_after_the_first_task(index, *args, **kwargs):
            metrics = record_eval(index, *args, **kwargs)
            if index == 0:
                server.stop()
            return metrics

        scheduler.record_eval = outage_after_the_first_task
        learner = Learner(config, f"{config.output_dir}/tokenizer")
        started = time.monotonic()
        run_stream(learner, scheduler)  # task 1's 30 steps log into the void
        second_task = time.monotonic() - started
        report = scheduler.finish()
        assert report.status == "FINISHED" and report.finished_tasks == 2  # the local files are complete
        assert report.mlflow.pending_records > 30
        assert second_task < 120  # no MLflow call held a step up (each would have waited 10 s or more)
        pending = Path(config.output_dir) / "mlflow-pending.jsonl"
        assert pending.exists()

        server.start()  # back again: resuming the finished run sends what was missed, trains nothing
        resumed = run_experiment(config.model_copy(update={"resume": True}), progress=False)
        assert resumed.status == "FINISHED" and resumed.mlflow.pending_records == 0 and not pending.exists()
        client = MlflowClient(server.uri)
        run = client.get_run(report.mlflow.run_id)
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "acc/category")] == [0, 1]
        losses = client.get_metric_history(run.info.run_id, "train_loss")
        assert sorted(m.step for m in losses) == list(range(1, 61))  # every step of both tasks, once
        assert {"report.json", "acc_heatmap.png"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    finally:
        server.stop()
