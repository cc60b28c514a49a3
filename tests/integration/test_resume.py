"""Crashes through the real CLI: SIGKILL of the driver and its Ray, then `forgetless resume`;
a trainer worker killed; SIGTERM; output_dir reuse and its lock; MLflow down at the start."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipelines.rundir import OutputDir
from tests.integration.conftest import report_of, session_members, start_cli, wait_for

REPO = Path(__file__).resolve().parents[2]


def baseline_of(out: Path) -> list | None:
    try:
        baseline = json.loads((out / "acc_matrix.json").read_text())["baseline"]
    except (OSError, ValueError, KeyError):
        return None
    return baseline if all(v is not None for v in baseline) else None


def cpu_seconds(pid: int) -> float:
    """CPU time process ``pid`` has used (0 once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture
def four_task_config(tmp_path, toy_stream_config, toy_task):
    """Four toy tasks, replay: the third takes long enough to be killed in."""
    config = toy_stream_config
    for name, kind, seed in (("last_word", "last_word", 3), ("count", "count", 4)):
        path = toy_task(tmp_path / "data" / f"{name}.jsonl", kind, seed=seed)
        config["stream"]["tasks"].append({"name": name, "source": {"kind": "file", "path": str(path)}})
    config["stream"]["tasks"][2]["max_steps"] = 60  # seconds of steps: the kill lands within a poll (0.2 s)
    config["strategy"] = {"name": "replay", "replay_ratio": 0.25}
    config["replay"] = {"enabled": True, "num_shards": 2, "rows_per_task": 24}

    def write(out: Path) -> Path:
        path = tmp_path / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump({**config, "output_dir": str(out)}))
        return path

    return write


def test_sigkill_after_task_1_then_resume_of_the_moved_run_continues_in_the_same_mlflow_run(four_task_config, tmp_path,
                                                                           mlflow_store, cli):
    # That a resumed stream ends where the uninterrupted one does, to the bit, is shown in one process
    # (tests/unit/actors/test_stream_loop.py); here: a whole run's SIGKILL, its Ray included, and the resume.
    out = tmp_path / "killed"
    run = start_cli("run", str(four_task_config(out)))
    wait_for(lambda: (report_of(out) or {}).get("finished_tasks", 0) >= 2, timeout=300, process=run,
             what="task 1's row")
    os.killpg(run.pid, signal.SIGKILL)  # the driver and its Ray, mid-way through task 2
    run.wait(timeout=30)
    before = report_of(out)
    assert before["finished_tasks"] == 2 and before["status"] == "RUNNING", "the kill did not land in task 2"
    # the run's Ray goes with it, agents included
    wait_for(lambda: not session_members(run.pid), timeout=30, what="the killed run's processes to end")

    # the run's directory is moved (a copy whose original is gone): `resume DIR` continues in DIR,
    # from its own training state, and writes nothing where the run was first written
    moved = tmp_path / "moved"
    out.rename(moved)
    resumed = cli("resume", str(moved), "--no-progress", timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not out.exists()
    out = moved
    report = report_of(out)
    assert report["status"] == "FINISHED" and report["finished_tasks"] == 4
    assert report["acc_matrix"][:2] == before["acc_matrix"][:2]  # finished rows, exactly as written before
    assert json.loads((out / "acc_matrix.json").read_text())["acc_matrix"] == report["acc_matrix"]
    # every cell the metrics read is measured (evaluation.cells: needed): the seen tasks and the next
    assert [[v is not None for v in row] for row in report["acc_matrix"]] == [[j <= k + 1 for j in range(4)]
                                                                             for k in range(4)]
    assert report["replay"]["rows_per_task"] == {name: 24 for name in report["tasks"]}
    assert report["resumes"][0]["previous_status"] == "RUNNING"

    client = MlflowClient(mlflow_store)
    experiment = client.get_experiment_by_name("forgetless").experiment_id
    runs = client.search_runs([experiment], f"tags.`forgetless.output_dir` = '{out}'")
    assert [r.info.run_id for r in runs] == [before["mlflow"]["run_id"]]  # one MLflow run for the stream
    assert runs[0].info.status == "FINISHED"
    for key in ["avg_acc", *(f"acc/{t}" for t in report["tasks"]), "train_loss"]:
        steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, key)]
        assert len(steps) == len(set(steps)), f"{key} has a step logged twice: {sorted(steps)}"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "avg_acc")] == [0, 1, 2, 3]

    # the finished stream cannot be "extended" with a config that changes what it finished
    changed = yaml.safe_load(four_task_config(out).read_text())
    changed["seed"] = 5
    changed["stream"]["tasks"][0]["max_train_examples"] = 10
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(changed))
    refused = cli("resume", str(out), str(path), timeout=60)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "2 change(s)" in refused.stderr and "seed: 0 -> 5" in refused.stderr
    assert "stream.tasks.0.max_train_examples: None -> 10 (task 'category' is finished)" in refused.stderr


def test_a_worker_sigkilled_mid_task_is_healed_and_one_killed_past_max_failures_fails_the_run_naming_each(
        toy_stream_config, tmp_path, mlflow_store):
    # No person involved: the group restarts (Ray Train's FailureConfig, training.max_failures=1), the
    # task goes on from its last mid-task state and the run records what died and what was redone. A
    # second death is more than max_failures: the run fails, naming both, and does not hang. (A healed
    # run that goes on to finish with the undisturbed run's matrix: tests/integration/test_chaos.py.)
    config = toy_stream_config
    config["training"].update(max_steps=400, num_workers=2, zero_stage=2, log_every_n_steps=1, max_failures=1)
    config["stream"]["tasks"][0]["max_steps"] = 40  # the second task is the one killed in, twice
    config["checkpoint"] = {"every_n_steps": 10}
    config["strategy"] = {"name": "replay", "replay_ratio": 0.25}
    config["replay"] = {"enabled": True, "num_shards": 2, "rows_per_task": 24}
    out = tmp_path / "out"
    path = tmp_path / "heal.yaml"
    path.write_text(yaml.safe_dump({**config, "output_dir": str(out)}))
    run = start_cli("run", str(path))

    def mid_task_of_the_second() -> dict | None:
        mid = ((report_of(out) or {}).get("resume") or {}).get("mid_task")
        return mid if mid and mid["task_index"] == 1 and mid["steps_done"] >= 20 else None

    wait_for(mid_task_of_the_second, timeout=300, process=run, what="a mid-task checkpoint in the second task")
    workers = [p for p in session_members(run.pid) if "RayTrainWorker" in p]
    assert len(workers) == 2, workers
    original = {int(p.split()[0]) for p in workers}
    first = int(workers[-1].split()[0])
    os.kill(first, signal.SIGKILL)

    def restarted_group() -> list[int] | None:
        if len((report_of(out) or {}).get("restarts", [])) != 1:
            return None
        pids = [int(p.split()[0]) for p in session_members(run.pid) if "RayTrainWorker" in p]
        # both of the new group's, none of the old one's (its other worker may still be going away),
        # each past its start-up (5 s of CPU): registered with the scheduler, so a failure names it
        if len(pids) == 2 and not original & set(pids) and all(cpu_seconds(pid) > 5 for pid in pids):
            return pids
        return None

    second = wait_for(restarted_group, timeout=200, process=run, what="the worker group's restart")[0]
    (restart,) = report_of(out)["restarts"]
    assert restart["task_index"] == 1 and 0 <= restart["steps_redone"] <= 10, restart
    assert "mid-task checkpoint" in restart["restored_from"]
    assert any(f"pid {first} " in died for died in restart["died"]), restart
    os.kill(second, signal.SIGKILL)  # a second failure: more than max_failures=1, the run fails, no hang
    _, err = run.communicate(timeout=240)
    assert run.returncode == 1, err[-3000:]
    (failed_line,) = [line for line in err.splitlines() if line.startswith("run failed:")]
    assert "the trainer worker group failed 2 times, more than training.max_failures=1: 2 failure(s): (1) " in \
        failed_line, failed_line
    first_failure, second_failure = failed_line.split(" (2) ")
    assert f"(pid {first} on" in first_failure and f"(pid {second} on" in second_failure, failed_line
    report = report_of(out)
    assert report["status"] == "FAILED" and report["finished_tasks"] == 1 and report["replay"]["rows"] == 24
    client = MlflowClient(mlflow_store)
    failed = client.get_run(report["mlflow"]["run_id"])
    assert failed.info.status == "FAILED" and f"pid {second}" in failed.data.tags["forgetless.error"]
    assert failed.data.metrics["recoveries"] == 1 and "forgetless.recovery.1" in failed.data.tags
    # every step logged once, none lost: the healed attempt did not log again what it redid
    steps = [m.step for m in client.get_metric_history(report["mlflow"]["run_id"], "train_loss")]
    assert len(steps) == len(set(steps)) and set(steps) == set(range(1, max(steps) + 1)), sorted(steps)
    # a failed run resumed continues in its MLflow run: test_a_disk_that_fills_mid_run...; SIGTERM:
    # test_output_dir_holds_one_run_at_a_time


def test_output_dir_holds_one_run_at_a_time(toy_config_file, tmp_path, mlflow_store, cli):
    config = toy_config_file(max_steps=400)  # the last run is stopped while it trains
    out = tmp_path / "out"
    lock = OutputDir(out)
    lock.lock()  # a live run holds it
    try:
        busy = cli("run", str(config), timeout=60)
    finally:
        lock.unlock()
    assert busy.returncode == 2 and f"in use by process {os.getpid()} on {socket.gethostname()}" in busy.stderr

    (out / "replay" / "shard-000").mkdir(parents=True)
    (out / "replay" / "shard-000" / "log-000000-0000.arrow").write_bytes(b"rows of an older run")
    (out / "notes.txt").write_text("mine")
    again = cli("run", str(config), timeout=60)
    assert again.returncode == 2 and "already holds a run" in again.stderr and "overwrite=true" in again.stderr
    assert "Traceback" not in again.stderr

    # overwrite=true with a misspelt data path: refused before anything of the old run is deleted
    (out / "report.json").write_text("{}")
    (out / "state" / "task-00").mkdir(parents=True)
    (out / "replay" / "users-file.txt").write_text("mine too")
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    typo = cli("run", str(config), "overwrite=true", f"stream.tasks.0.source.path={tmp_path / 'data' / 'categroy.jsonl'}",
               timeout=120)
    assert typo.returncode == 2 and "categroy.jsonl" in typo.stderr and "Traceback" not in typo.stderr
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before

    # the same with the right path: the new run replaces the old one's files, and only those; it is
    # then stopped the way a job scheduler stops a job (SIGTERM), and says so, in MLflow too
    replaced = start_cli("run", str(config), "overwrite=true")
    wait_for(lambda: baseline_of(out), timeout=200, process=replaced, what="the new run's baseline")
    assert not (out / "replay" / "shard-000" / "log-000000-0000.arrow").exists()
    assert (out / "replay" / "users-file.txt").read_text() == "mine too" and (out / "notes.txt").read_text() == "mine"
    assert (out / "tokenizer").is_dir() and not (out / ".tokenizer.new").exists()
    assert not (out / "state" / "task-00").is_dir() or (out / "state" / "task-00" / "strategy.json").is_file()
    replaced.send_signal(signal.SIGTERM)
    _, err = replaced.communicate(timeout=120)
    assert replaced.returncode != 0, err[-3000:]
    report = report_of(out)
    assert report["status"] == "KILLED" and report["error"] == "interrupted by the user", report
    assert MlflowClient(mlflow_store).get_run(report["mlflow"]["run_id"]).info.status == "KILLED"
    assert (out / "replay" / "users-file.txt").read_text() == "mine too" and (out / "notes.txt").read_text() == "mine"


def test_mlflow_down_at_the_start_fails_within_seconds_naming_the_uri(toy_config_file, tmp_path, cli):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here
    uri = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    result = cli("run", str(toy_config_file()), f"mlflow.tracking_uri={uri}", timeout=60)
    assert result.returncode == 2
    assert f"MLflow tracking server {uri} is unreachable" in result.stderr and "Traceback" not in result.stderr
    assert time.monotonic() - started < 30  # interpreter start-up included
    assert not (tmp_path / "out").exists()  # nothing was prepared: no data, no tokenizer, no Ray


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of its own (64 MiB) to fill: a disk that runs out mid-run."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"a tmpfs cannot be mounted here (needs root or CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_disk_that_fills_mid_run_stops_it_naming_the_path_and_the_space_and_the_last_commit_stands(
        toy_stream_config, small_disk, tmp_path):
    config = toy_stream_config
    config["training"]["max_steps"] = 6
    config["stream"]["tasks"][1]["max_steps"] = 100  # time to fill the disk while it trains
    out = small_disk / "out"
    path = tmp_path / "full.yaml"
    path.write_text(yaml.safe_dump({**config, "output_dir": str(out)}))
    run = start_cli("run", str(path))
    wait_for(lambda: (report_of(out) or {}).get("finished_tasks") == 1, timeout=300, process=run,
             what="the first task committed")
    ballast = small_disk / "ballast"
    with open(ballast, "wb") as handle:  # everything but 32 KiB: the next commit cannot fit
        left = shutil.disk_usage(small_disk).free - 32 * 1024
        while left > 0:
            left -= handle.write(b"\0" * min(left, 1 << 20))
    _, err = run.communicate(timeout=300)
    assert run.returncode == 1, err[-3000:]
    assert "no space left on the device holding" in err and "free of" in err and "is needed" in err, err[-3000:]
    assert str(out) in err and "the last one stands" in err
    report = report_of(out)
    assert report["restarts"] == []  # not retried: it would fail again
    assert report["finished_tasks"] == 1 and report["status"] == "FAILED"
    ballast.unlink()  # space again: the run goes on from its last commit
    resumed = start_cli("resume", str(out))
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert report_of(out)["complete"] and report_of(out)["finished_tasks"] == 2
    # in the failed run's MLflow run, which ends finished
    assert report_of(out)["mlflow"]["run_id"] == report["mlflow"]["run_id"]
    assert MlflowClient(report["mlflow"]["tracking_uri"]).get_run(report["mlflow"]["run_id"]).info.status == "FINISHED"
