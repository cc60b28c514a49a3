"""`forgetless tune` on Ray Tune: the same trials for every strategy, on the first tasks' validation
rows only, one YAML per strategy (which `compare --tuned` applies: test_compare.py); a failed
trial is recorded with its reason. Refusals of bad input: tests/unit/actors/test_tune.py."""

import json

import pyarrow.parquet as pq
import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipelines.config import load_config
from pipelines.tasks import load_stream
from pipelines.tuning import LR, shared_rates

BUDGET = ["replay.memory_rows=40", "replay.rows_per_batch=4"]


@pytest.fixture
def three_task_file(toy_stream_config, toy_task, tmp_path):
    tasks = []
    for name, kind, seed in (("category", "category", 1), ("first_word", "first_word", 2), ("last_word", "last_word", 3)):
        path = toy_task(tmp_path / "data" / f"{name}.jsonl", kind, n=96, seed=seed)
        tasks.append({"name": name, "source": {"kind": "file", "path": str(path)}})
    config = {**toy_stream_config, "stream": {**toy_stream_config["stream"], "tasks": tasks},
              "training": {**toy_stream_config["training"], "max_steps": 4}}
    path = tmp_path / "three.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_tune_chooses_each_strategy_s_values_on_the_first_tasks_validation_rows(cli, three_task_file, tmp_path,
                                                                                 mlflow_store):
    """One trial each (the suite's budget; `--trials N` gives every strategy N): EWC's trial,
    searched at a learning rate that cannot train, fails with its reason recorded, and naive's,
    after it, is not stopped by it and gets its YAML."""
    out = tmp_path / "tuned"
    space = tmp_path / "space.yaml"
    space.write_text("ewc:\n  lr: {low: 1.0e+29, high: 1.0e+30}\n")
    result = cli("tune", str(three_task_file), "--strategies", "ewc,naive", "--trials", "1", "--validation",
                 "0.25", "--scheduler", "asha", "--space", str(space), "--out", str(out), "training.grad_clip=null",
                 *BUDGET, timeout=900)
    assert result.returncode == 1, result.stderr[-4000:]  # one strategy has no tuned values
    lines = [line for line in result.stdout.splitlines() if line.startswith("tune ")]
    assert [line.split(":")[0] for line in lines] == ["tune ewc", "tune naive"]  # a line per trial
    assert "FAILED" in lines[0] and "avg_acc" in lines[1]
    summary = json.loads((out / "tuning.json").read_text())
    assert summary["tuned_on"]["tasks"] == ["category", "first_word"]
    failed = summary["strategies"]["ewc"]["trials"][0]
    assert failed["status"] == "FAILED" and "non-finite loss" in failed["error"]
    assert not (out / "ewc.yaml").exists() and "ewc: no trial finished (1 trial(s) failed)" in result.stdout
    trials = summary["strategies"]["naive"]["trials"]
    assert len(trials) == 1 and trials[0]["status"] == "FINISHED" and trials[0]["tasks_reported"] == 2
    assert list(summary["strategies"]["naive"]["knobs"]) == ["lr"]
    # the learning rate every strategy tries (the shared draws), not one drawn for naive alone
    seed = load_config(three_task_file).seed
    assert trials[0]["values"]["lr"] == pytest.approx(shared_rates(LR, 1, seed)[0])
    assert summary["search"].startswith("learning rates: the same for every strategy")
    assert list(summary["strategies"]["ewc"]["knobs"]) == ["lr", "ewc.lambda", "ewc.gamma"]
    tuned = yaml.safe_load((out / "naive.yaml").read_text())
    assert tuned["strategy"] == "naive" and tuned["values"] == trials[0]["values"] and tuned["tuned"]["trials"] == 1

    # what the trials read: the first two tasks' training rows, never an eval row, nothing of task 3
    original = load_stream(load_config(three_task_file))

    def rows(table):
        return {f"{s}\0{t}" for s, t in zip(table.column("source").to_pylist(), table.column("target").to_pylist())}

    read = set().union(*(rows(pq.read_table(path)) for path in (out / "data").iterdir()))
    evals = set().union(*(rows(task.eval) for task in original))
    assert read and not read & evals and read <= rows(original[0].train) | rows(original[1].train)
    assert sorted(p.name for p in (out / "data").iterdir()) == ["category.parquet", "first_word.parquet"]
    for trial_dir in (out / "trials" / "naive").iterdir():
        saved = yaml.safe_load((trial_dir / "config.yaml").read_text())
        assert [t["source"]["path"] for t in saved["stream"]["tasks"]] == [
            str(out / "data" / "category.parquet"), str(out / "data" / "first_word.parquet")]

    client = MlflowClient(mlflow_store)
    parent = summary["mlflow"]["parent_run_id"]
    experiment = client.get_experiment_by_name("forgetless").experiment_id
    children = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.data.params["strategy.name"] for r in children) == ["ewc", "naive"]
    assert client.get_run(parent).info.status == "FAILED"  # a strategy without tuned values
