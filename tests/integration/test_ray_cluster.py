"""A run submitted as a Ray job to a real cluster started with `ray start --head` on loopback."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster():
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard = _free_port(), _free_port()
    start = [RAY, "start", "--head", f"--port={gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--disable-usage-stats"]
    subprocess.run(start, check=True, capture_output=True, env=env, timeout=120)
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, env=env, timeout=120)


def test_job_submitted_to_a_cluster_trains_the_stream(ray_cluster, toy_config_file, tmp_path):
    address, env = ray_cluster
    config = toy_config_file()
    submit = [RAY, "job", "submit", f"--address={address}", "--",
              sys.executable, "-m", "actors.cli", "run", str(config), "--no-progress"]
    deadline = time.monotonic() + 90
    while True:
        result = subprocess.run(submit, capture_output=True, text=True, env=env, timeout=300)
        # right after `ray start` the head's job agent may not be up yet: Ray says so and asks to retry
        if "No available agent to submit job" not in result.stderr + result.stdout or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "succeeded" in result.stdout
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["status"] == "FINISHED" and report["complete"]
    assert report["tasks"] == ["category", "first_word"]
