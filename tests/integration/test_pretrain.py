"""`forgetless pretrain` and a stream that starts from its checkpoint, end to end (local Ray,
DeepSpeed, MLflow): built once into the cache, reused after, the pretraining task in the matrix,
the recovery probe in the report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient


@pytest.fixture
def cache(fresh_cache) -> Path:
    return fresh_cache


def test_a_stream_from_a_pretrained_checkpoint_with_its_pretraining_task(cli, tmp_path, cache, mlflow_store):
    out = tmp_path / "run"
    result = cli("run", "configs/tiny/pretrained.yaml", f"output_dir={out}", f"stream.cache_dir={cache}",
                 f"mlflow.tracking_uri={mlflow_store}", "--no-progress", timeout=420)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "building" in result.stderr + result.stdout  # built once, into the cache
    report = json.loads((out / "report.json").read_text())
    # pretrained in the worker group the stream then trained in: one Ray Train run, none of its own
    assert [p.name for p in (out / "ray").iterdir() if p.is_dir()] == [f"tiny-pretrained-{out.name}"]
    assert not list((cache / "pretrained").glob(".*.work/ray"))

    init = report["init"]
    assert init["kind"] == "pretrained" and init["source"].startswith("pretrain ")
    checkpoint = Path(init["checkpoint"])
    assert checkpoint.parent == cache / "pretrained"
    manifest = init["pretrain"]
    assert manifest["arch"] == "t5" and manifest["steps"] == 40 and manifest["tokens_seen"] > 0
    assert manifest["corpus"]["heldout_documents"] == 40 and manifest["tokenizer"]["lossless"]
    assert 0 <= manifest["heldout"]["masked_token_accuracy"] <= 1 and manifest["heldout"]["loss"] > 0

    assert report["tasks"] == ["pretraining", "question_type", "sms_spam"]
    acc = np.array(report["acc_matrix"], dtype=float)
    assert np.argwhere(np.isnan(acc)).tolist() == [[0, 2]]  # evaluation.cells needed: after task 0, not task 2
    # task 0 is not trained again: its row is the pretrained model, the same as before any training
    assert acc[0, 0] == pytest.approx(report["baseline"][0])
    assert report["train"]["pretraining"]["steps"] == 0
    assert report["metrics"]["avg_acc"] == pytest.approx(acc[2].mean())
    assert report["metrics"]["learning_acc"] == pytest.approx((acc[1, 1] + acc[2, 2]) / 2)  # task 0 left out
    # each task's fall from its best row since it was learned (task 0, the pretrained model, from row 0)
    assert report["metrics"]["forgetting"] == pytest.approx(np.mean([acc[j:2, j].max() - acc[2, j] for j in (0, 1)]))

    # general-sample replay: corpus rows in the store beside the first task's
    assert report["replay"]["rows_per_task"] == {"pretraining": 64, "question_type": 64, "sms_spam": 64}

    recovery = report["recovery"]
    assert set(recovery) == {"pretraining", "question_type"}
    for j, name in enumerate(["pretraining", "question_type"]):
        assert recovery[name]["before"] == pytest.approx(acc[j, j])
        assert recovery[name]["after_stream"] == pytest.approx(acc[2, j])
        assert 0 <= recovery[name]["after_head_retrain"] <= 1
    assert "recovery probe" in result.stdout and "started from: pretrained" in result.stdout

    client = MlflowClient(mlflow_store)
    run = client.get_run(report["mlflow"]["run_id"])
    assert run.data.metrics["learning_acc"] == pytest.approx(report["metrics"]["learning_acc"])
    assert run.data.metrics["recovery/question_type"] == pytest.approx(recovery["question_type"]["after_head_retrain"])
    assert json.loads((checkpoint / "manifest.json").read_text()) == manifest
    pretrain_run = client.get_run(manifest["mlflow"]["run_id"])
    assert pretrain_run.info.status == "FINISHED"
    history = client.get_metric_history(pretrain_run.info.run_id, "heldout_loss")
    assert [m.step for m in history] == [20, 40]
    assert len(client.get_metric_history(pretrain_run.info.run_id, "train_loss")) == 4

    # the same pretrain config again: reused from the cache, no training
    again = cli("pretrain", "configs/pretrain/tiny_t5.yaml", f"cache_dir={cache}", f"mlflow.tracking_uri={mlflow_store}",
                "--no-progress", timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already built" in again.stderr + again.stdout and str(checkpoint) in again.stdout


def test_pretrain_refuses_a_directory_holding_something_else_even_with_overwrite(cli, tmp_path, cache, mlflow_store):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    for overwrite in ([], ["overwrite=true"]):  # overwrite replaces only a checkpoint pretrain wrote
        result = cli("pretrain", "configs/pretrain/tiny_t5.yaml", f"output_dir={out}", f"cache_dir={cache}",
                     f"mlflow.tracking_uri={mlflow_store}", "--no-progress", *overwrite, timeout=120)
        assert result.returncode == 2
        assert "holds files that are not a pretrained checkpoint" in result.stderr and "Traceback" not in result.stderr
        assert (out / "notes.txt").read_text() == "keep me"
