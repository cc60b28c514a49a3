"""A run submitted as a Ray job to a real cluster started with `ray start --head` on loopback."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
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
def ray_cluster(tmp_path_factory):
    """A head node of our own. `ray start --block` in its own process group, stopped by signalling
    that group — never `ray stop`, which would kill every Ray on the machine."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}  # token auth: the session's token
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard = _free_port(), _free_port()
    log = open(tmp_path_factory.mktemp("ray-head") / "head.log", "w")
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([RAY, "job", "list", f"--address={address}"], capture_output=True, env=env,
                             timeout=60).returncode != 0:
            if time.monotonic() > deadline or head.poll() is not None:
                pytest.fail(f"ray head did not come up on {address}")
            time.sleep(2)
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        log.close()
        # `ray start` records its address for later `ray.init()` calls; a killed head leaves it behind
        marker = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if marker.is_file() and marker.read_text().strip().endswith(f":{gcs}"):
            marker.unlink()


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
