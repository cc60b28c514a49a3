"""The per-worker stream loop in one process, with no Ray: the plain scheduler as its coordinator.

This is where resume and extension are checked for exactness; the CLI tests check that the same
holds across a real SIGKILL of the driver and its Ray.
"""

import json
import weakref

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from actors.scheduler import Scheduler
from pipelines.config import resolve_paths, validate_config
from pipelines.learner import Learner, silence_library_noise
from pipelines.loop import run_stream
from pipelines.models import stream_tokenizer
from pipelines.report import RunReport
from pipelines.tasks import load_stream

silence_library_noise()


class Killed(BaseException):
    """Stands in for SIGKILL: nothing catches it, nothing is finished or flushed."""


def _prepare(config_dict, tokenizer_from=None):
    config = resolve_paths(validate_config(config_dict))
    stream = load_stream(config)
    tokenizer_dir = tokenizer_from or f"{config.output_dir}/tokenizer"
    if tokenizer_from is None:
        stream_tokenizer(config.model, stream).save_pretrained(tokenizer_dir)
    return config, stream, tokenizer_dir


def _run(config_dict, *, previous=None, kill_before_task=None, tokenizer_from=None):
    config, stream, tokenizer_dir = _prepare(config_dict, tokenizer_from)
    scheduler = Scheduler(config, stream, previous=previous)
    if kill_before_task is not None:
        next_task = scheduler.next_task

        def dies(rank=0):
            if scheduler.finished == kill_before_task:
                scheduler.sink.close()  # the process is gone: its writer thread with it
                raise Killed
            return next_task(rank)

        scheduler.next_task = dies
    learner = Learner(config, tokenizer_dir)
    run_stream(learner, scheduler)
    return scheduler.finish()


@pytest.fixture
def three_tasks(toy_stream_config, toy_task, tmp_path):
    third = toy_task(tmp_path / "data" / "last.jsonl", "last_word", seed=3)
    toy_stream_config["stream"]["tasks"].append({"name": "last_word", "source": {"kind": "file", "path": str(third)}})
    toy_stream_config["training"].update(max_steps=8)
    return toy_stream_config


def test_the_loop_trains_a_stream_in_one_process(toy_stream_config, tmp_path):
    report = _run(toy_stream_config)
    assert report.status == "FINISHED" and report.complete and report.finished_tasks == 2
    acc = np.array(report.acc_matrix, dtype=float)
    assert acc.shape == (2, 2) and not np.isnan(acc).any()
    out = tmp_path / "out"
    # the training state of the last finished task only; every model checkpoint
    assert sorted(p.name for p in (out / "state").iterdir()) == ["task-01"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["task-00-category", "task-01-first_word"]
    assert RunReport.read(out / "report.json") == report


@pytest.mark.parametrize("strategy", [
    pytest.param({"name": "ewc", "lambda": 50.0, "fisher_examples": 8}, marks=pytest.mark.slow),
    pytest.param({"name": "lwf"}, marks=pytest.mark.slow),
    [{"name": "ewc", "lambda": 50.0, "fisher_examples": 8}, "lwf"],  # both states, in `make check` too
], ids=["ewc", "lwf", "ewc+lwf"])
def test_a_run_killed_between_tasks_resumes_to_the_uninterrupted_result(three_tasks, tmp_path, strategy,
                                                                         mlflow_store):
    three_tasks["strategy"] = strategy
    whole = _run({**three_tasks, "output_dir": str(tmp_path / "whole")})

    killed_dir = tmp_path / "killed"
    with pytest.raises(Killed):
        _run({**three_tasks, "output_dir": str(killed_dir)}, kill_before_task=2)
    before = RunReport.read(killed_dir / "report.json")
    assert before.status == "RUNNING" and before.finished_tasks == 2
    resumed = _run({**three_tasks, "output_dir": str(killed_dir), "resume": True}, previous=before,
                   tokenizer_from=str(killed_dir / "tokenizer"))

    assert resumed.acc_matrix[:2] == before.acc_matrix[:2]  # finished rows are kept as they were
    assert resumed.acc_matrix == whole.acc_matrix  # one process, same seed: exactly the same
    assert resumed.metrics == whole.metrics
    # the loss of the task trained after the resume: weights, optimizer state, RNG and the strategy's
    # state (EWC's Fisher) all came back, or this would differ
    assert resumed.train["last_word"].mean_loss == pytest.approx(whole.train["last_word"].mean_loss, rel=1e-6)
    assert [r.previous_status for r in resumed.resumes] == ["RUNNING"]
    client = MlflowClient(mlflow_store)
    run = client.get_run(resumed.mlflow.run_id)
    assert run.info.run_id == before.mlflow.run_id and run.info.status == "FINISHED"
    for key in ("avg_acc", "acc/category", "train_loss"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert len(steps) == len(set(steps)), f"{key} logged twice at some step: {steps}"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "acc/category")] == [0, 1, 2]
    assert "forgetless.resume.1" in run.data.tags


def test_a_finished_stream_extended_with_a_task_trains_only_that_task(three_tasks, tmp_path, mlflow_store):
    two = {**three_tasks, "stream": {**three_tasks["stream"], "tasks": three_tasks["stream"]["tasks"][:2]}}
    first = _run(two)
    assert first.complete and len(first.tasks) == 2
    extended = _run({**three_tasks, "resume": True}, previous=first,
                    tokenizer_from=str(tmp_path / "out" / "tokenizer"))

    assert extended.tasks == ["category", "first_word", "last_word"] and extended.complete
    assert [row[:2] for row in extended.acc_matrix[:2]] == first.acc_matrix  # old rows, old columns: untouched
    assert extended.acc_matrix[0][2] is None  # the model after task 0 is gone: never measured on the new task
    assert extended.acc_matrix[1][2] is not None  # the restored model, measured before training the new task
    assert extended.baseline[:2] == first.baseline and extended.baseline[2] is not None
    assert extended.train["category"] == first.train["category"]  # not trained again
    assert extended.train["last_word"].steps == 8
    assert extended.resumes[-1].new_tasks == ["last_word"]
    assert extended.metrics["forgetting"] is not None and extended.metrics["fwt"] is not None
    client = MlflowClient(mlflow_store)
    assert [m.step for m in client.get_metric_history(extended.mlflow.run_id, "acc/last_word")] == [1, 2]
    assert client.get_run(extended.mlflow.run_id).info.status == "FINISHED"
    assert json.loads((tmp_path / "out" / "acc_matrix.json").read_text())["tasks"][-1] == "last_word"


def test_after_stream_drops_the_training_state_or_the_models_too_and_the_run_is_not_extended(three_tasks, tmp_path):
    from pipelines.errors import ConfigError

    two = {**three_tasks, "stream": {**three_tasks["stream"], "tasks": three_tasks["stream"]["tasks"][:2]}}
    kept = _run({**two, "output_dir": str(tmp_path / "kept"), "checkpoint": {"after_stream": "keep"}})
    models = _run({**two, "output_dir": str(tmp_path / "models"), "checkpoint": {"after_stream": "models"}})
    assert kept.resume.training_state and kept.resume.dropped is None and (tmp_path / "kept" / "state").is_dir()
    assert not (tmp_path / "models" / "state").exists()
    assert sorted(p.name for p in (tmp_path / "models" / "checkpoints").iterdir()) == ["task-00-category",
                                                                                       "task-01-first_word"]
    assert models.resume.training_state is None and models.resume.dropped == "models"
    assert models.checkpoints == {k: v.replace("/kept/", "/models/") for k, v in kept.checkpoints.items()}
    assert models.acc_matrix == kept.acc_matrix  # the same run: only what stays after it differs
    assert RunReport.read(tmp_path / "models" / "report.json") == models

    report = _run({**two, "output_dir": str(tmp_path / "report"), "checkpoint": {"after_stream": "report"}})
    out = tmp_path / "report"
    assert not (out / "state").exists() and not (out / "checkpoints").exists()
    assert report.checkpoints == {} and report.resume.dropped == "report"
    assert {"report.json", "acc_matrix.json", "acc_heatmap.png", "config.yaml", "tokenizer"} <= {
        p.name for p in out.iterdir()}
    with pytest.raises(ConfigError, match="cannot be extended with 'last_word'"):
        _run({**three_tasks, "output_dir": str(out), "resume": True}, previous=report,
             tokenizer_from=str(out / "tokenizer"))


def test_a_run_killed_while_finishing_is_finished_by_resume_without_training(toy_stream_config, tmp_path,
                                                                             mlflow_store):
    from actors.launch import run_experiment

    with pytest.raises(Killed):
        _run(toy_stream_config, kill_before_task=2)  # both rows committed, then the process died
    out = tmp_path / "out"
    killed = RunReport.read(out / "report.json")
    assert killed.finished_tasks == 2 and killed.status == "RUNNING"
    config = resolve_paths(validate_config({**toy_stream_config, "resume": True}))
    report = run_experiment(config, progress=False)  # no Ray is started: there is nothing to train
    assert report.status == "FINISHED" and report.acc_matrix == killed.acc_matrix
    assert RunReport.read(out / "report.json").status == "FINISHED"
    run = MlflowClient(mlflow_store).get_run(killed.mlflow.run_id)
    assert run.info.status == "FINISHED" and "forgetless.resume.1" in run.data.tags
    assert {"report.json", "acc_heatmap.png"} <= {a.path for a in MlflowClient(mlflow_store).list_artifacts(
        run.info.run_id)}


@pytest.mark.slow  # three runs in one process (~13 s)
def test_a_run_does_not_depend_on_what_ran_before_it_in_the_same_process(toy_stream_config, tmp_path):
    # A trainer worker runs a comparison's runs one after another (actors.trainer_group.run_job):
    # naive, then LwF (a teacher model, other losses, other draws from every generator), then naive
    # again, each learner closed after its run: the second naive run matches the first to the bit.
    reports = []
    for k, name in enumerate(["naive", "lwf", "naive"]):
        config, stream, tokenizer_dir = _prepare({**toy_stream_config, "strategy": {"name": name},
                                                  "output_dir": str(tmp_path / f"{k}-{name}")})
        scheduler = Scheduler(config, stream)
        learner = Learner(config, tokenizer_dir)
        try:
            run_stream(learner, scheduler)
        finally:
            model = weakref.ref(learner.model)
            learner.close()
        assert model() is None  # released: nothing of this run's model is left for the next
        reports.append(scheduler.finish())
    first, between, again = reports
    assert between.strategy == "lwf" and between.train["first_word"].mean_loss != first.train["first_word"].mean_loss
    assert again.acc_matrix == first.acc_matrix and again.baseline == first.baseline
    for task in ("category", "first_word"):
        assert again.train[task].mean_loss == first.train[task].mean_loss  # exactly, not approximately


def test_measuring_only_the_needed_cells_gives_the_same_metrics_as_measuring_all(three_tasks, tmp_path):
    """evaluation.cells: needed leaves the cells no metric reads empty (after task 0, task 2 is not
    measured), and every metric, every measured cell and the training are what `all` gives."""
    full = _run({**three_tasks, "output_dir": str(tmp_path / "all"), "evaluation": {**three_tasks["evaluation"],
                                                                                     "cells": "all"}})
    needed = _run({**three_tasks, "output_dir": str(tmp_path / "needed")})
    assert needed.acc_matrix[0][2] is None and full.acc_matrix[0][2] is not None
    measured = [(k, j) for k in range(3) for j in range(3) if j <= k + 1]
    assert [needed.acc_matrix[k][j] for k, j in measured] == [full.acc_matrix[k][j] for k, j in measured]
    assert needed.metrics == full.metrics and needed.baseline == full.baseline
    assert needed.train["last_word"].mean_loss == full.train["last_word"].mean_loss
    scores = json.loads((tmp_path / "needed" / "example_scores" / "after-00.json").read_text())
    assert sorted(scores) == ["category", "first_word"]  # what was measured, example by example
