"""The scheduler writing to a real `mlflow server` over HTTP, bound to 127.0.0.1."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from actors.scheduler import Scheduler
from pipelines.config import resolve_paths, validate_config
from pipelines.tasks import load_stream


@pytest.fixture
def mlflow_server(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
           "--artifacts-destination", str(tmp_path / "server-artifacts")]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    pytest.fail(f"mlflow server did not come up on {uri}")
                time.sleep(0.5)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_scheduler_logs_to_a_tracking_server(mlflow_server, toy_stream_config):
    toy_stream_config["mlflow"]["tracking_uri"] = mlflow_server
    config = resolve_paths(validate_config(toy_stream_config))
    scheduler = Scheduler(config, load_stream(config))
    scheduler.record_baseline({"category": 0.0, "first_word": 0.0})
    scheduler.record_eval(0, {"category": 0.9, "first_word": 0.1})
    scheduler.record_eval(1, {"category": 0.4, "first_word": 0.8})
    report = scheduler.finish()

    client = MlflowClient(mlflow_server)
    run = client.get_run(report["mlflow"]["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["forgetting"] == pytest.approx(0.5)
    assert {"acc_heatmap.png", "report.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    local = client.download_artifacts(run.info.run_id, "acc_matrix.json")
    assert Path(local).read_text().count("0.9") == 1
