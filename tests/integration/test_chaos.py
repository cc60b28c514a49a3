"""The chaos run, short: `bench/chaos.py` with the two kills no other test makes — the scheduler
actor, and a whole node holding a trainer worker (and whatever else of the run it holds) — in one
3-task replay run on Ray's multi-node test cluster, compared with the same run undisturbed. The run
heals by itself and finishes with the undisturbed run's matrix (no cell off by more than one eval
example), the same replay row ids, one MLflow run and no step logged twice.

The bench's other kinds are each killed by a test of their own: a trainer worker
(tests/integration/test_resume.py: healed, and past `max_failures` failing the run), a replay shard
(test_replay_store.py: restarted with every acknowledged row, sampled through), the driver
(test_resume.py, resumed by hand; test_ray_cluster.py, by its job). All five in one run, six kills of
each kind: the bench's full runs (docs/benchmarks.md), each restart ~15 s of this suite's time."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_lost_node_and_a_dead_scheduler_in_one_run_change_nothing_it_reports(tmp_path):
    out = tmp_path / "chaos.json"
    result = subprocess.run(
        [sys.executable, "bench/chaos.py", "--kinds", "scheduler,node", "--kills", "2", "--per-run", "2",
         "--tasks", "3", "--steps", "30",
         "--seed", "1", "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    data = json.loads(out.read_text())
    (trial,) = data["trials"]
    assert sorted(trial["kill"].split(",")) == ["node", "scheduler"]
    assert len(trial["killed"]) == 2 and not any(k.startswith("no ") for k in trial["killed"]), trial["killed"]
    assert trial["finished"] and trial["exit"] == 0, trial.get("error")
    assert trial["resumes"] == 0  # every kill healed inside the run
    # each kill was healed by a restart of its own: the scheduler rebuilt itself, and the node's death
    # restarted the worker group, naming its trainer as dead, or, where the node also held the
    # scheduler, as a group that restarted with the rebuilt scheduler
    assert trial["restarts"] >= 2 and "the scheduler actor" in trial["died"], trial["died"]
    assert any(death.startswith("worker ") for death in trial["died"]) or trial["died"] == ["the scheduler actor"] * 2 \
        and any("worker group restarted with it" in reason for reason in trial["reasons"]), (trial["died"],
                                                                                             trial["reasons"])
    assert trial["cells_off_by_more_than_one_example"] == 0
    assert trial["replay_rows_lost"] == 0 and trial["replay_rows_extra"] == 0
    assert trial["steps_logged_twice"] == 0 and trial["mlflow_runs"] == 1
