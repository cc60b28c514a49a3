"""`forgetless table1`: the four paradigms on one model and stream, one MLflow parent run, one table."""

import json

import pytest
import yaml
from mlflow.tracking import MlflowClient

PARADIGMS = ["feature_extraction", "fine_tuning", "prompt_engineering", "prompt_tuning"]


def test_table1_measures_every_paradigm(cli, toy_config_file, tmp_path, mlflow_store, fresh_cache):
    # One training size and one worker keep this to four short runs (tests/unit/pipelines/test_table1.py
    # covers several sizes; tests/unit/pipelines/test_paradigms.py ZeRO 0, 2 and 3). The model starts
    # from a tiny pretrain config that the cache lacks: built first, in the cells' worker group.
    path = toy_config_file(max_steps=4)
    result = cli("table1", str(path), "--no-progress", "table1.train_sizes=[24]", "paradigm.shots=1",
                 "paradigm.prompt_length=4", "stream.max_source_tokens=96", "evaluation.mix_tasks=true",
                 "model.preset=null", "model.pretrain=configs/pretrain/tiny_t5.yaml", timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    out = tmp_path / "out"
    table = json.loads((out / "table1.json").read_text())
    columns = table["paradigms"]
    assert list(columns) == PARADIGMS and table["train_sizes"] == ["24"]
    assert table["model"].endswith("configs/pretrain/tiny_t5.yaml (pretrained weights)")
    # pretraining and the four runs in one worker group: one Ray Train start-up, no Ray Train run of its own
    assert table["worker_group_startups"] == 1
    assert [p.name for p in (out / "ray").iterdir() if p.is_dir()] == ["toy-table1"]
    assert (fresh_cache / "pretrained").is_dir() and not list((fresh_cache / "pretrained").glob(".*.work/ray"))
    for name, entry in columns.items():
        assert set(entry) >= {"trainable_params", "bytes_per_task", "acc_by_train_size", "forgetting", "seconds"}
        assert list(entry["acc_by_train_size"]) == ["24"] and entry["acc_by_train_size"]["24"] is not None
        assert [run["status"] for run in entry["runs"].values()] == ["FINISHED"]
    params = {name: entry["trainable_params"] for name, entry in columns.items()}
    assert params["prompt_engineering"] == 0
    assert 0 < params["feature_extraction"] < params["fine_tuning"]
    assert 0 < params["prompt_tuning"] < params["fine_tuning"]
    for frozen in ("feature_extraction", "prompt_engineering", "prompt_tuning"):  # they cannot forget
        first = columns[frozen]["first_task"]
        assert columns[frozen]["forgetting"] == 0.0 and first["after_stream"] == first["when_learned"]
    assert columns["fine_tuning"]["bytes_per_task"] == 4 * params["fine_tuning"]  # a fp32 model copy per task
    assert columns["prompt_engineering"]["bytes_per_task"] > 0  # the one in-context example's text
    report = json.loads((out / "prompt_tuning" / "size-24" / "report.json").read_text())
    assert report["paradigm"]["name"] == "prompt_tuning" and report["strategy"] == "naive"
    assert report["train"]["category"]["trainable_params"] == params["prompt_tuning"]
    mixed = {name: yaml.safe_load((out / name / "size-24" / "config.yaml").read_text())["evaluation"]["mix_tasks"]
             for name in PARADIGMS}  # the shared-model paradigms evaluate the tasks in mixed batches
    assert mixed == {"feature_extraction": False, "fine_tuning": True, "prompt_engineering": True,
                     "prompt_tuning": False}
    text = (out / "table1.md").read_text()
    assert "| | Feature extraction | Fine-tuning | Prompt engineering | Prompt tuning |" in text
    assert "Huge" in text and "Bad to OK" in text

    client = MlflowClient(mlflow_store)
    parent_id = table["mlflow"]["parent_run_id"]
    experiment = client.get_experiment_by_name("forgetless").experiment_id
    children = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children)
    assert {"table1.json", "table1.md"} <= {a.path for a in client.list_artifacts(parent_id)}
    assert client.get_run(parent_id).data.metrics["prompt_engineering/trainable_params"] == 0


@pytest.mark.parametrize("overrides, messages", [
    (["paradigm.max_labels=5"], ["table1 (feature_extraction, 32 training rows per task)",
                                 "task 'first_word' has 9 distinct targets"]),
    (["paradigm.shots=2"], ["table1 (prompt_engineering, 32 training rows per task)",
                            "the 2-shot prompt of eval example", "over stream.max_source_tokens=16"]),
])
def test_table1_refuses_what_a_paradigm_cannot_do_before_any_run(overrides, messages, cli, toy_config_file, tmp_path):
    result = cli("table1", str(toy_config_file(max_steps=2)), "--no-progress", *overrides, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    for message in messages:
        assert message in result.stderr
    assert not (tmp_path / "out").exists()
