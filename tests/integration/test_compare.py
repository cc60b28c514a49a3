"""`forgetless compare`: every strategy on the same stream, one MLflow parent run, one table."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from pipelines.tuning import write_tuned

# End to end through Ray Train and DeepSpeed, each in both task orders: the strategies that reach
# further than the learner — the replay store (replay with LwF's teacher, DER++ with its stored
# logits), a plan of another shape (joint). Replay alone, cumulative, EWC and A-GEM differ from these
# only inside one worker's plan and step (A-GEM samples the store as replay does), which
# tests/unit/pipelines/strategies/ runs through the DeepSpeed learner (EWC's collectives across
# two workers: tests/unit/pipelines/test_distributed.py); the tiny comparison below runs replay alone.
ALL = ["replay+lwf", "derpp", "joint"]
ORDERS = [["category", "first_word"], ["first_word", "category"]]


def test_every_strategy_in_two_task_orders(cli, toy_config_file, tmp_path, mlflow_store, fresh_cache):
    path = toy_config_file(max_steps=6)
    # each strategy's values from a directory of tuned YAMLs, as `forgetless tune` writes them
    tuned = {"replay+lwf": {"lr": 0.004, "lwf.alpha": 0.3}, "derpp": {"lr": 0.002, "derpp.beta": 0.7},
             "joint": {"lr": 0.003}}
    for name, values in tuned.items():
        write_tuned(tmp_path / "tuned" / f"{name}.yaml", name, values, record={"trials": 1, "tasks": ["category"]})
    result = cli("compare", str(path), "--strategies", ",".join(ALL), "--seeds", "1", "--orders", "2", "--no-progress",
                 "--tuned", str(tmp_path / "tuned"), "replay.memory_rows=40", "replay.rows_per_batch=4",
                 # from a tiny pretrain config the cache lacks: built first, in the runs' worker group
                 "model.preset=null", "model.pretrain=configs/pretrain/tiny_t5.yaml", timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    out = tmp_path / "out"
    comparison = json.loads((out / "comparison.json").read_text())
    assert list(comparison["strategies"]) == ALL and comparison["orders"] == ORDERS
    for name, entry in comparison["strategies"].items():
        assert set(entry) >= {"avg_acc", "forgetting", "bwt", "fwt", "learning_acc", "gap_to_joint"}
        assert set(entry["avg_acc"]) >= {"mean", "std", "ci95"}
        assert [(r["order"], r["seed"], r["status"]) for r in entry["runs"]] == [(o, 0, "FINISHED") for o in ORDERS]
        assert entry["avg_acc"]["n"] == 2 and entry["avg_acc"]["ci95"] is not None  # an interval over the orders
        assert np.array(entry["acc_matrix_mean"]).shape == (2, 2)
    joint = comparison["strategies"]["joint"]
    assert joint["forgetting"]["mean"] is None and joint["avg_acc"]["mean"] is not None
    assert joint["acc_matrix_mean"][0] == joint["baseline_mean"]  # nothing trained before the last task
    both = comparison["strategies"]["replay+lwf"]
    assert both["forgetting"]["mean"] is not None and both["forgetting"]["n"] == 2
    assert both["gap_to_joint"]["mean"] is not None  # against joint of the same seed and order
    assert (out / "first_task_accuracy.png").stat().st_size > 0 and (out / "heatmaps.png").stat().st_size > 0
    assert (out / "after_each_task.png").stat().st_size > 0
    assert f"{out / 'heatmaps.png'}, {out / 'after_each_task.png'}" in result.stdout  # every plot named
    assert both["curve"]["avg_acc"][-1]["mean"] == pytest.approx(both["avg_acc"]["mean"])  # after the last task
    assert [p["n"] for p in both["curve"]["forgetting"]] == [0, 2]  # nothing to forget after the first task
    table = (out / "comparison.md").read_text()
    assert "| replay+lwf |" in table and "2 task order(s) x 1 seed(s)" in table
    # pretraining and six runs, one worker group: Ray Train's start-up paid once, before the runs (by the
    # pretraining), and no Ray Train run of the pretraining's own; what each run costs beyond its work
    assert comparison["worker_group_startups"] == 1 and comparison["worker_group_startup_s"][0] > 0
    assert [p.name for p in (out / "ray").iterdir() if p.is_dir()] == ["toy-compare"]
    assert (fresh_cache / "pretrained").is_dir() and not list((fresh_cache / "pretrained").glob(".*.work/ray"))
    assert comparison["per_run_overhead_s"]["n"] == 6 and comparison["per_run_overhead_s"]["mean"] > 0
    runs = [run for entry in comparison["strategies"].values() for run in entry["runs"]]
    assert [run["startup_s"] for run in runs] == [0.0] * 6
    assert all(run["train_eval_s"] > 0 and run["wall_s"] >= run["seconds"] for run in runs)

    # the per-run reports say what each strategy did, in its order
    reports = {(name, o): json.loads((out / name / f"order-{o}" / "seed-0" / "report.json").read_text())
               for name in ALL for o in (0, 1)}
    assert all(reports[name, o]["tasks"] == ORDERS[o] for name, o in reports)
    assert both["avg_acc"]["mean"] == pytest.approx(np.mean([reports["replay+lwf", o]["metrics"]["avg_acc"]
                                                             for o in (0, 1)]))
    for name in ("replay+lwf", "derpp"):  # one budget: 40 rows of the first task, then 20 + 20
        assert reports[name, 0]["replay"]["rows_per_task"] == {"category": 20, "first_word": 20}
        assert reports[name, 0]["replay"]["rows_after_task"] == {"category": 40, "first_word": 40}
        assert comparison["strategies"][name]["replay_rows_max"] == 40
    protocol = comparison["protocol"]
    assert (protocol["replay_memory_rows"], protocol["replay_rows_per_batch"]) == (40, 4)
    assert protocol["tokenizer"]["source"] == f"loaded from {fresh_cache / 'pretrained' / 't5-tiny-2b21263fbed8'}"
    assert len(protocol["tokenizer"]["digest"]) == 16 and "end-of-task logits" in protocol["deviations"]["derpp"]["derpp"][0]
    # every run read the comparison's one tokenizer, whatever its order
    saved = {(out / name / f"order-{o}" / "seed-0" / "tokenizer" / "tokenizer.json").read_bytes() for name in ALL
             for o in (0, 1)}
    assert saved == {(out / "tokenizer" / "tokenizer.json").read_bytes()}
    # every pair, every headline metric: a paired difference with its interval and corrected p
    assert [(p["a"], p["b"]) for p in comparison["pairs"]] == [("replay+lwf", "derpp"), ("replay+lwf", "joint"),
                                                               ("derpp", "joint")]
    avg = comparison["pairs"][0]["metrics"]["avg_acc"]
    assert avg["n"] == 2 and avg["ci95"][0] <= avg["diff"] <= avg["ci95"][1] and 0 < avg["p_holm"] <= 1
    assert comparison["pairs"][1]["metrics"]["forgetting"] is None  # joint defines only avg_acc
    assert "Paired differences A - B" in table and "| replay+lwf - derpp |" in table
    scores = json.loads((out / "derpp" / "order-0" / "seed-0" / "example_scores" / "after-01.json").read_text())
    assert np.mean(scores["category"]) == pytest.approx(reports["derpp", 0]["acc_matrix"][1][0])
    assert [part["name"] for part in reports["replay+lwf", 0]["strategy_config"]] == ["replay", "lwf"]
    assert reports["replay+lwf", 1]["strategy_config"][1]["alpha"] == 0.3  # the tuned values, in every order
    assert {name: comparison["protocol"]["tuned"][name]["values"] for name in ALL} == tuned
    for name, values in tuned.items():
        saved = yaml.safe_load((out / name / "order-1" / "seed-0" / "config.yaml").read_text())
        assert saved["training"]["lr"] == values["lr"]
    assert reports["derpp", 0]["strategy_config"]["beta"] == 0.7
    assert reports["joint", 1]["train"]["category"]["steps"] == 12  # both tasks' budgets in one training, at the end
    assert reports["joint", 1]["train"]["first_word"]["steps"] == 0
    assert reports["joint", 0]["metrics"]["forgetting"] is None  # its own report agrees: only avg_acc is defined
    checkpoints = out / "replay+lwf" / "order-1" / "seed-0" / "checkpoints"
    assert (checkpoints / "task-00-first_word" / "model.safetensors").is_file()

    client = MlflowClient(mlflow_store)
    parent_id = comparison["mlflow"]["parent_run_id"]
    experiment = client.get_experiment_by_name("forgetless").experiment_id
    children = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    assert sorted(r.data.tags["forgetless.strategy"] for r in children) == sorted(ALL * 2)
    assert all(r.info.status == "FINISHED" for r in children)
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["derpp/avg_acc"] == pytest.approx(comparison["strategies"]["derpp"]["avg_acc"]["mean"])
    assert parent.data.metrics["replay_with_lwf/avg_acc"] == pytest.approx(both["avg_acc"]["mean"])  # no '+' in keys
    assert {"comparison.json", "comparison.md", "heatmaps.png"} <= {a.path for a in client.list_artifacts(parent_id)}


def test_tiny_compare_config_on_a_tracking_server(tiny_compare_on_server):
    """configs/tiny/compare.yaml, naive against replay, logged to an `mlflow server`, killed in the
    replay run and continued with resume=true: the comparison, the resumption, and the naive run end
    to end (its stream and settings are configs/tiny/naive.yaml's)."""
    result, out, server_uri, before = (tiny_compare_on_server.result, tiny_compare_on_server.out,
                                       tiny_compare_on_server.uri, tiny_compare_on_server.before)
    assert result.returncode == 0, result.stderr[-4000:]
    comparison = json.loads((out / "comparison.json").read_text())

    # the kill landed in the replay run's second task; the naive run had finished
    killed, state = before["replay"], before["state"]
    assert killed["finished_tasks"] == 1 and killed["status"] == "RUNNING", "the kill did not land in task 2"
    assert list(state["runs"]) == ["naive/seed-0"]  # its timing, recorded when it finished
    # resume=true kept the finished run as it was and continued the interrupted one from its last task
    assert comparison["resumed"] == {"kept": ["naive/seed-0"], "continued": ["replay/seed-0"]}
    assert (out / "naive" / "seed-0" / "report.json").read_bytes() == before["naive"]
    assert comparison["strategies"]["naive"]["runs"][0]["wall_s"] == state["runs"]["naive/seed-0"]["wall_s"]
    replay_report = json.loads((out / "replay" / "seed-0" / "report.json").read_text())
    assert replay_report["status"] == "FINISHED" and len(replay_report["resumes"]) == 1
    # its wall time covers the continued attempt only: marked, and left out of replay's seconds
    assert [run["continued"] for run in comparison["strategies"]["replay"]["runs"]] == [True]
    assert comparison["strategies"]["replay"]["seconds"]["n"] == 0
    assert not comparison["strategies"]["naive"]["runs"][0]["continued"]
    assert replay_report["acc_matrix"][0] == killed["acc_matrix"][0]
    assert replay_report["mlflow"]["run_id"] == killed["mlflow"]["run_id"]  # in its own MLflow run
    assert comparison["protocol"]["tokenizer"]["digest"] == state["tokenizer"]["digest"]
    assert comparison["mlflow"]["parent_run_id"] == state["parent_run_id"]  # the same parent run
    server = MlflowClient(server_uri)
    experiment_id = server.get_experiment_by_name("forgetless").experiment_id
    parents = server.search_runs([experiment_id], "tags.`forgetless.compare` = 'naive,replay'")
    assert [r.info.run_id for r in parents] == [state["parent_run_id"]]
    children = server.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{state['parent_run_id']}'")
    assert sorted(r.info.run_id for r in children) == sorted([json.loads(before["naive"])["mlflow"]["run_id"],
                                                               killed["mlflow"]["run_id"]])
    steps = [m.step for m in server.get_metric_history(killed["mlflow"]["run_id"], "train_loss")]
    assert len(steps) == len(set(steps)), sorted(steps)  # nothing the killed attempt logged is logged again
    strategies = comparison["strategies"]
    assert list(strategies) == ["naive", "replay"]
    # on disjoint labels replay keeps some of the earlier tasks; sequential fine-tuning loses them
    naive_final, replay_final = strategies["naive"]["acc_matrix_mean"][-1], strategies["replay"]["acc_matrix_mean"][-1]
    assert sum(replay_final[:-1]) > sum(naive_final[:-1])
    assert strategies["replay"]["forgetting"]["mean"] < strategies["naive"]["forgetting"]["mean"]
    assert strategies["replay"]["replay_rows_max"] == 384  # replay.memory_rows: 256 of task 1, 192 + 192, 3 x 128
    assert "Paired differences A - B" in result.stdout and "| replay - naive |" not in result.stdout
    assert comparison["pairs"][0]["a"] == "naive" and comparison["pairs"][0]["metrics"]["avg_acc"]["n"] == 1

    assert "after sentiment_movies" in result.stdout and "| naive |" in result.stdout
    report = json.loads((out / "naive" / "seed-0" / "report.json").read_text())
    tasks = ["question_type", "sms_spam", "sentiment_movies"]
    assert report["tasks"] == tasks
    acc = np.array(report["acc_matrix"], dtype=float)
    assert acc.shape == (3, 3) and np.argwhere(np.isnan(acc)).tolist() == [[0, 2]]  # the cells the metrics read
    assert len(report["baseline"]) == 3
    assert set(report["metrics"]) == {"avg_acc", "forgetting", "bwt", "fwt", "learning_acc", "forgetting/question_type",
                                      "forgetting/sms_spam"}  # each earlier task's own beside the mean
    assert report["strategy"] == "naive"
    # sequential fine-tuning on disjoint labels: the first task is learned, then forgotten
    assert acc[0, 0] > 0.1 and acc[2, 0] < acc[0, 0]
    assert report["metrics"]["forgetting"] > 0

    assert report["mlflow"]["tracking_uri"] == server_uri
    client = MlflowClient(server_uri)
    run = client.get_run(report["mlflow"]["run_id"])
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI's model-training view
    parent_id = comparison["mlflow"]["parent_run_id"]
    assert run.data.tags["mlflow.parentRunId"] == parent_id
    assert (f"{server_uri}/#/experiments/{experiment.experiment_id}/runs/{parent_id}?workflowType=machine_learning"
            in result.stdout)
    assert run.info.status == "FINISHED" and client.get_run(parent_id).info.status == "FINISHED"
    assert run.data.params["strategy.name"] == "naive"
    for name in tasks:
        history = client.get_metric_history(run.info.run_id, f"acc/{name}")
        measured = [k for k in range(3) if not np.isnan(acc[k, tasks.index(name)])]  # task 2 from row 1 on
        assert [m.step for m in history] == measured
        assert [m.value for m in history] == pytest.approx(acc[measured, tasks.index(name)].tolist())
    assert run.data.metrics["avg_acc"] == pytest.approx(report["metrics"]["avg_acc"])
    assert run.data.metrics["forgetting"] == pytest.approx(report["metrics"]["forgetting"])
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) >= 3 * 40 // 5
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"acc_matrix.json", "acc_heatmap.png", "config.yaml", "report.json"} <= artifacts

    checkpoint = Path(report["checkpoints"]["sentiment_movies"])
    model = AutoModelForSeq2SeqLM.from_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    batch = tokenizer(["sentiment: a warm, funny and moving film"], return_tensors="pt")
    # the config's stream.max_target_tokens: a tokenizer trained on the first task spells later labels in pieces
    answer = tokenizer.batch_decode(model.generate(**batch, max_new_tokens=8), skip_special_tokens=True)[0]
    assert answer.strip() in {"positive", "negative", "neutral"}


def test_unknown_strategy_in_the_list_is_refused(cli, toy_config_file):
    result = cli("compare", str(toy_config_file()), "--strategies", "naive,replya", timeout=60)
    assert result.returncode == 2
    assert "--strategies: unknown ['replya']" in result.stderr

