"""A run submitted as a Ray job to a real cluster started with `ray start --head` (token auth on, the
dashboard on loopback): `forgetless submit`, `status`, `logs`, the running run's replay store
looked at and scaled out from outside with `forgetless replay`, then its driver killed and the run
resumed by its job."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from tests.integration.conftest import free_port

pytestmark = pytest.mark.cluster
RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A head node of our own. `ray start --block` in its own process group, stopped by signalling
    that group — never `ray stop`, which would kill every Ray on the machine."""
    # token auth: the test run's token; the venv's scripts on PATH, as a cluster image has them
    # Ray Train's look at its workers every 0.5 s, as on a run's own Ray (actors.cluster): an operator's
    # choice on a cluster, which a job's driver inherits from the node
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONWARNINGS": "ignore",
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # a cluster's head, not a single-machine Ray
    gcs, dashboard, agent = free_port(), free_port(), free_port()
    log = open(tmp_path_factory.mktemp("ray-head") / "head.log", "w")
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--disable-usage-stats",
         # its own job-agent port: the default one may be taken by another Ray on this machine
         f"--dashboard-agent-listen-port={agent}", "--system-config={\"enable_metrics_collection\": false}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([RAY, "job", "list", f"--address={address}"], capture_output=True, env=env,
                             timeout=60).returncode != 0:
            if time.monotonic() > deadline or head.poll() is not None:
                pytest.fail(f"ray head did not come up on {address}")
            time.sleep(2)
        yield address, env, f"127.0.0.1:{gcs}"
    finally:
        # `ray start --block` takes ~30 s to stop gracefully; nothing here needs its graceful stop
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        for process in psutil.process_iter(["cmdline"]):  # workers that left the group, by this cluster's port
            if any(f":{gcs}" in part for part in process.info["cmdline"] or ()):
                try:
                    process.kill()
                except psutil.Error:
                    pass
        log.close()
        # `ray start` records its address for later `ray.init()` calls; a killed head leaves it behind
        marker = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if marker.is_file() and marker.read_text().strip().endswith(f":{gcs}"):
            marker.unlink()


def forgetless(*args, env, timeout=120):
    return subprocess.run([sys.executable, "-m", "actors.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=Path(__file__).resolve().parents[2])


def test_a_submitted_run_is_scaled_out_while_it_runs_and_resumed_by_its_job_when_its_driver_dies(
        ray_cluster, toy_config_file, tmp_path):
    """One job, two things a cluster user relies on: its replay store grown from outside while it
    trains, and its driver SIGKILLed mid-task, after which the job resumes the run (same MLflow run,
    the store's new shards kept) with no person involved."""
    address, env, gcs = ray_cluster
    config = toy_config_file(max_steps=40)
    # the second task long enough (~30 s alone on 2 cores) for the store to be resized while the run is on
    # it, also when the machine is busy (at 400 steps, ~15 s, a loaded machine once finished the task first)
    overrides = ["replay.enabled=true", "replay.num_shards=2", "replay.rows_per_task=20", "stream.tasks.1.max_steps=800"]
    submitted = forgetless("submit", str(config), "--address", address, *overrides, env=env, timeout=300)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr[-3000:]
    job_id = submitted.stdout.split("submitted job ", 1)[1].split()[0]
    assert "packed stream.tasks.0.source.path" in submitted.stdout and f"forgetless logs {job_id}" in submitted.stdout

    out = tmp_path / "out"
    # watch the run from here (faster than a CLI call a poll), then resize it with the CLI once the
    # first task's rows are in the store and the run is on its second task
    import ray

    from actors.remote import RunNotFoundError, find_run

    ray.shutdown()  # the tests' shared local Ray, if up: this driver joins the head started here
    ray.init(address=gcs, log_to_driver=False)
    try:
        deadline, rows = time.monotonic() + 300, 0
        while time.monotonic() < deadline and not rows:
            try:
                scheduler, _ = find_run(str(out))
                rows = sum(s["rows"] for s in ray.get(scheduler.replay_status.remote()))
            except (RunNotFoundError, ray.exceptions.RayError):
                pass
            time.sleep(0.3)
    finally:
        ray.shutdown()
    assert rows == 20, "the run's first task never reached the replay store"
    resized = forgetless("replay", "add-shards", "out", "1", "--address", gcs, env=env)
    assert resized.returncode == 0, resized.stderr[-2000:]
    assert "the store has 3 shards" in resized.stdout and "category " in resized.stdout
    assert "first_word" not in resized.stdout  # it happened while the run was on its second task
    shard_lines = [line.split() for line in resized.stdout.splitlines() if line.split()[:1] in (["0"], ["1"], ["2"])]
    assert [line[0] for line in shard_lines] == ["0", "1", "2"]  # shard, node, ip, rows, capacity, bytes, ...
    assert sum(int(line[3].replace(",", "")) for line in shard_lines) == 20

    # still in the second task: the job's driver dies
    report = json.loads((out / "report.json").read_text())
    assert report["finished_tasks"] == 1 and report["status"] == "RUNNING"
    drivers = [p for p in psutil.process_iter(["cmdline"])
               if "actors.cli" in (p.info["cmdline"] or []) and "run" in p.info["cmdline"]
               and any(str(part).endswith("config.yaml") for part in p.info["cmdline"])]
    assert len(drivers) == 1, [p.info["cmdline"] for p in drivers]
    drivers[0].kill()

    # the report says when the stream is over (a file read a poll; a CLI call a poll would take a core
    # from the run), then `forgetless status` says when its job is
    def resumed_and_over() -> bool:  # the resumed run's end, however it ended
        now = json.loads((out / "report.json").read_text())
        return bool(now.get("resumes")) and now.get("status") != "RUNNING"

    deadline = time.monotonic() + 400
    while not resumed_and_over() and time.monotonic() < deadline:
        time.sleep(0.5)
    while forgetless("status", job_id, "--address", address, env=env).stdout.split(": ")[1].split()[0] in (
            "PENDING", "RUNNING"):
        assert time.monotonic() < deadline, "the job did not finish"
        time.sleep(1)
    final = forgetless("status", job_id, "--address", address, env=env)
    logs = forgetless("logs", job_id, "--address", address, env=env).stdout
    assert f"{job_id}: SUCCEEDED" in final.stdout, logs[-3000:]
    assert "the run's driver was killed (SIGKILL); resuming it (1/3, training.max_failures)" in logs
    assert "after first_word" in logs  # the run's matrix, printed by the job
    resumed = json.loads((out / "report.json").read_text())
    assert resumed["status"] == "FINISHED" and resumed["complete"] and resumed["tasks"] == ["category", "first_word"]
    assert resumed["mlflow"]["run_id"] == report["mlflow"]["run_id"]
    (resumption,) = resumed["resumes"]
    assert resumption["finished_tasks"] == 1 and resumption["previous_status"] == "RUNNING"
    # the shard added while it ran outlives its driver: the resumed run's store has it, with every row once
    assert resumed["replay"]["num_shards"] == 3 and resumed["replay"]["rows"] == 40
    assert json.loads((out / "replay" / "store.json").read_text())["num_shards"] == 3
    saved = (out / "config.yaml").read_text()
    assert "/inputs/00-category.jsonl" in saved  # the job read the packed copy of the task file, not ours
    assert "already finished" in forgetless("stop", job_id, "--address", address, env=env).stdout


def test_replay_commands_name_what_runs_when_nothing_matches(ray_cluster):
    _, env, gcs = ray_cluster
    result = forgetless("replay", "status", "no-such-run", "--address", gcs, env=env)
    assert result.returncode == 2 and "no running run matches 'no-such-run'" in result.stderr


def test_the_probe_finds_a_cluster_that_cannot_run_forgetless_before_a_job_is_queued(ray_cluster, monkeypatch):
    address, env, _ = ray_cluster
    from actors.remote import ClusterNotReadyError, job_client, package_version, probe_cluster

    monkeypatch.setenv("PATH", env["PATH"])
    client = job_client(address)
    assert probe_cluster(client, address) == package_version()  # the package, its version, its imports
    with pytest.raises(ClusterNotReadyError, match=r"not found.*install it on every node") as caught:
        probe_cluster(client, address, entrypoint="forgetless-missing version --imports")
    assert "Nothing was submitted" in str(caught.value)
    with pytest.raises(ClusterNotReadyError, match=r"has forgetless 0\.0\.0-other, this machine"):
        probe_cluster(client, address, entrypoint="echo forgetless 0.0.0-other")
