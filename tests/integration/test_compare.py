"""`forgetless compare`: every strategy on the same stream, one MLflow parent run, one table."""

import json

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

ALL = ["naive", "cumulative", "replay", "lwf", "ewc", "joint"]


def test_every_strategy_on_a_two_task_stream(cli, toy_config_file, tmp_path, mlflow_store):
    path = toy_config_file(max_steps=6)
    result = cli("compare", str(path), "--strategies", ",".join(ALL), "--seeds", "1", "--no-progress",
                 "strategies.ewc.fisher_examples=16", timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    out = tmp_path / "out"
    comparison = json.loads((out / "comparison.json").read_text())
    assert list(comparison["strategies"]) == ALL
    for name, entry in comparison["strategies"].items():
        assert set(entry) >= {"avg_acc", "forgetting", "bwt", "fwt"}
        assert set(entry["avg_acc"]) >= {"mean", "std"}
        assert [r["status"] for r in entry["runs"]] == ["FINISHED"]
        assert np.array(entry["acc_matrix_mean"]).shape == (2, 2)
    joint = comparison["strategies"]["joint"]
    assert joint["forgetting"]["mean"] is None and joint["avg_acc"]["mean"] is not None
    assert joint["acc_matrix_mean"][0] == joint["baseline_mean"]  # nothing trained before the last task
    assert comparison["strategies"]["naive"]["forgetting"]["mean"] is not None
    assert (out / "first_task_accuracy.png").stat().st_size > 0 and (out / "heatmaps.png").stat().st_size > 0
    assert "| replay |" in (out / "comparison.md").read_text()

    # the per-run reports say what each strategy did
    reports = {name: json.loads((out / name / "seed-0" / "report.json").read_text()) for name in ALL}
    assert reports["replay"]["replay"]["rows_per_task"] == {"category": 51, "first_word": 51}
    assert reports["joint"]["train"]["category"]["steps"] == 0
    assert reports["joint"]["train"]["first_word"]["steps"] == 12  # both tasks' budgets in one training
    assert reports["cumulative"]["train"]["first_word"]["examples"] == 6 * 8
    assert (out / "lwf" / "seed-0" / "checkpoints" / "task-00-category" / "model.safetensors").is_file()

    client = MlflowClient(mlflow_store)
    parent_id = comparison["mlflow"]["parent_run_id"]
    experiment = client.get_experiment_by_name("forgetless").experiment_id
    children = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    assert sorted(r.data.tags["forgetless.strategy"] for r in children) == sorted(ALL)
    assert all(r.info.status == "FINISHED" for r in children)
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["replay/avg_acc"] == pytest.approx(comparison["strategies"]["replay"]["avg_acc"]["mean"])
    assert {"comparison.json", "comparison.md", "heatmaps.png"} <= {a.path for a in client.list_artifacts(parent_id)}


def test_tiny_compare_config(cli, tmp_path, mlflow_store):
    out = tmp_path / "cmp"
    result = cli("compare", "configs/tiny/compare.yaml", "--strategies", "naive,replay", "--seeds", "1",
                 f"output_dir={out}", f"mlflow.tracking_uri={mlflow_store}", "--no-progress", timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    comparison = json.loads((out / "comparison.json").read_text())
    strategies = comparison["strategies"]
    assert list(strategies) == ["naive", "replay"]
    # on disjoint labels replay keeps the first task; sequential fine-tuning loses it
    naive_final, replay_final = strategies["naive"]["acc_matrix_mean"][-1], strategies["replay"]["acc_matrix_mean"][-1]
    assert replay_final[0] > naive_final[0]
    assert strategies["replay"]["forgetting"]["mean"] < strategies["naive"]["forgetting"]["mean"]


def test_unknown_strategy_in_the_list_is_refused(cli, toy_config_file):
    result = cli("compare", str(toy_config_file()), "--strategies", "naive,replya", timeout=60)
    assert result.returncode == 2
    assert "--strategies: unknown ['replya']" in result.stderr
