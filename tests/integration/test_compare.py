"""`forgetless compare`: every strategy on the same stream, one MLflow parent run, one table."""

import json

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

# End to end through Ray Train and DeepSpeed: naive in the other tests here, and in this one the
# strategies that reach further than the learner — the replay store (replay, DER++ with its stored
# logits), a teacher model (LwF, here combined with replay), a plan of another shape (joint). Cumulative, EWC and A-GEM differ
# from these only inside one worker's plan and step (A-GEM samples the store as replay does), which
# tests/unit/pipelines/strategies/ runs through the DeepSpeed learner (EWC's collectives across
# two workers: tests/unit/pipelines/test_distributed.py).
ALL = ["replay", "replay+lwf", "derpp", "joint"]


def test_every_strategy_on_a_two_task_stream(cli, toy_config_file, tmp_path, mlflow_store):
    path = toy_config_file(max_steps=6)
    result = cli("compare", str(path), "--strategies", ",".join(ALL), "--seeds", "1", "--no-progress", timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    out = tmp_path / "out"
    comparison = json.loads((out / "comparison.json").read_text())
    assert list(comparison["strategies"]) == ALL
    for name, entry in comparison["strategies"].items():
        assert set(entry) >= {"avg_acc", "forgetting", "bwt", "fwt", "learning_acc", "intransigence"}
        assert set(entry["avg_acc"]) >= {"mean", "std", "ci95"}
        assert [r["status"] for r in entry["runs"]] == ["FINISHED"]
        assert np.array(entry["acc_matrix_mean"]).shape == (2, 2)
    joint = comparison["strategies"]["joint"]
    assert joint["forgetting"]["mean"] is None and joint["avg_acc"]["mean"] is not None
    assert joint["acc_matrix_mean"][0] == joint["baseline_mean"]  # nothing trained before the last task
    assert comparison["strategies"]["replay"]["forgetting"]["mean"] is not None
    assert (out / "first_task_accuracy.png").stat().st_size > 0 and (out / "heatmaps.png").stat().st_size > 0
    assert "| replay |" in (out / "comparison.md").read_text()
    # four runs, one worker group: Ray Train's start-up paid once; what each run costs beyond its work
    assert comparison["worker_group_startups"] == 1 and comparison["worker_group_startup_s"][0] > 0
    assert comparison["per_run_overhead_s"]["n"] == 4 and comparison["per_run_overhead_s"]["mean"] > 0
    runs = [run for entry in comparison["strategies"].values() for run in entry["runs"]]
    assert [run["startup_s"] > 0 for run in runs] == [True, False, False, False]
    assert all(run["train_eval_s"] > 0 and run["wall_s"] >= run["seconds"] for run in runs)

    # the per-run reports say what each strategy did
    reports = {name: json.loads((out / name / "seed-0" / "report.json").read_text()) for name in ALL}
    assert reports["replay"]["replay"]["rows_per_task"] == {"category": 51, "first_word": 52}
    assert reports["derpp"]["replay"]["rows_per_task"] == {"category": 51, "first_word": 52}
    assert comparison["strategies"]["replay"]["intransigence"]["mean"] is not None  # joint was compared
    assert reports["joint"]["train"]["category"]["steps"] == 0
    assert reports["joint"]["metrics"]["forgetting"] is None  # its own report agrees: only avg_acc is defined
    assert reports["joint"]["train"]["first_word"]["steps"] == 12  # both tasks' budgets in one training
    assert (out / "replay+lwf" / "seed-0" / "checkpoints" / "task-00-category" / "model.safetensors").is_file()
    assert reports["replay+lwf"]["replay"]["rows_per_task"] == {"category": 51, "first_word": 52}
    assert [part["name"] for part in reports["replay+lwf"]["strategy_config"]] == ["replay", "lwf"]

    client = MlflowClient(mlflow_store)
    parent_id = comparison["mlflow"]["parent_run_id"]
    experiment = client.get_experiment_by_name("forgetless").experiment_id
    children = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    assert sorted(r.data.tags["forgetless.strategy"] for r in children) == sorted(ALL)
    assert all(r.info.status == "FINISHED" for r in children)
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["replay/avg_acc"] == pytest.approx(comparison["strategies"]["replay"]["avg_acc"]["mean"])
    both = comparison["strategies"]["replay+lwf"]["avg_acc"]["mean"]
    assert parent.data.metrics["replay_with_lwf/avg_acc"] == pytest.approx(both)  # MLflow's keys take no '+'
    assert {"comparison.json", "comparison.md", "heatmaps.png"} <= {a.path for a in client.list_artifacts(parent_id)}


def test_task_orders_give_intervals_over_every_run(cli, toy_config_file, tmp_path):
    result = cli("compare", str(toy_config_file(max_steps=2)), "--strategies", "naive", "--seeds", "1", "--orders",
                 "2", "--no-progress", timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    out = tmp_path / "out"
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["orders"] == [["category", "first_word"], ["first_word", "category"]]
    naive = comparison["strategies"]["naive"]
    assert [(r["order"], r["seed"]) for r in naive["runs"]] == [(["category", "first_word"], 0),
                                                               (["first_word", "category"], 0)]
    for metric in ("avg_acc", "forgetting", "learning_acc"):
        assert naive[metric]["n"] == 2 and naive[metric]["ci95"] is not None
    reports = [json.loads((out / "naive" / f"order-{o}" / "seed-0" / "report.json").read_text()) for o in (0, 1)]
    assert [r["tasks"] for r in reports] == [["category", "first_word"], ["first_word", "category"]]
    assert naive["avg_acc"]["mean"] == pytest.approx(np.mean([r["metrics"]["avg_acc"] for r in reports]))
    assert "2 task order(s) x 1 seed(s)" in (out / "comparison.md").read_text()


def test_tiny_compare_config(cli, tmp_path, mlflow_store):
    out = tmp_path / "cmp"
    result = cli("compare", "configs/tiny/compare.yaml", "--strategies", "naive,replay", "--seeds", "1",
                 f"output_dir={out}", f"mlflow.tracking_uri={mlflow_store}", "--no-progress", timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    comparison = json.loads((out / "comparison.json").read_text())
    strategies = comparison["strategies"]
    assert list(strategies) == ["naive", "replay"]
    # on disjoint labels replay keeps some of the earlier tasks; sequential fine-tuning loses them
    naive_final, replay_final = strategies["naive"]["acc_matrix_mean"][-1], strategies["replay"]["acc_matrix_mean"][-1]
    assert sum(replay_final[:-1]) > sum(naive_final[:-1])
    assert strategies["replay"]["forgetting"]["mean"] < strategies["naive"]["forgetting"]["mean"]


def test_unknown_strategy_in_the_list_is_refused(cli, toy_config_file):
    result = cli("compare", str(toy_config_file()), "--strategies", "naive,replya", timeout=60)
    assert result.returncode == 2
    assert "--strategies: unknown ['replya']" in result.stderr

