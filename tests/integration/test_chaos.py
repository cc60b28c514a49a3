"""The chaos run, short: `bench/chaos.py` with one kill of each kind — a trainer worker, a replay
shard, the scheduler actor, a whole node, the driver — in one 3-task replay run on Ray's multi-node
test cluster, compared with the same run undisturbed. The run finishes by itself (the driver's death
by a `forgetless resume`, as `forgetless job` runs it), with the undisturbed run's matrix (no cell
off by more than one eval example), the same replay row ids, one MLflow run and no step logged twice."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_one_kill_of_each_kind_in_one_run_changes_nothing_it_reports(tmp_path):
    out = tmp_path / "chaos.json"
    result = subprocess.run(
        [sys.executable, "bench/chaos.py", "--kills", "5", "--per-run", "5", "--tasks", "3", "--steps", "30",
         "--seed", "1", "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    data = json.loads(out.read_text())
    (trial,) = data["trials"]
    assert sorted(trial["kill"].split(",")) == sorted(["worker", "shard", "scheduler", "node", "driver"])
    assert len(trial["killed"]) == 5 and not any(k.startswith("no ") for k in trial["killed"]), trial["killed"]
    assert trial["finished"] and trial["exit"] == 0, trial.get("error")
    assert trial["resumes"] == 1  # the driver's death; the other four healed inside the run
    # the scheduler rebuilt itself, and a worker group restart followed the worker's and the node's deaths
    assert "the scheduler actor" in trial["died"] and trial["restarts"] >= 2, trial["died"]
    assert trial["cells_off_by_more_than_one_example"] == 0
    assert trial["replay_rows_lost"] == 0 and trial["replay_rows_extra"] == 0
    assert trial["steps_logged_twice"] == 0 and trial["mlflow_runs"] == 1
