"""`forgetless submit` packs a run's inputs and checks its outputs before anything reaches a cluster."""

from pathlib import Path

import pytest
import yaml

from actors.remote import pack_job
from pipelines.config import validate_config
from pipelines.errors import ConfigError


def test_local_inputs_are_packed_and_their_paths_rewritten(tmp_path, toy_stream_config):
    ds = tmp_path / "ds.yaml"
    ds.write_text("zero_optimization: {stage: auto}\n")
    toy_stream_config["training"]["deepspeed_config"] = str(ds)
    toy_stream_config["stream"]["tasks"].append(
        {"name": "remote", "source": {"kind": "file", "path": "/shared/data/remote.jsonl"}})  # not here: the cluster's
    config = validate_config(toy_stream_config)
    job = tmp_path / "job"
    job.mkdir()
    data, packed = pack_job(config, job)
    assert [key for key, _ in packed] == ["stream.tasks.0.source.path", "stream.tasks.1.source.path",
                                          "training.deepspeed_config"]
    tasks = data["stream"]["tasks"]
    assert tasks[0]["source"]["path"] == "inputs/00-category.jsonl" and tasks[2]["source"]["path"] == "/shared/data/remote.jsonl"
    assert data["training"]["deepspeed_config"] == "inputs/02-ds.yaml"
    assert (job / "inputs/00-category.jsonl").read_bytes() == Path(toy_stream_config["stream"]["tasks"][0]["source"]["path"]).read_bytes()
    saved = yaml.safe_load((job / "config.yaml").read_text())
    assert saved["output_dir"] == config.output_dir and saved["stream"]["tasks"] == tasks
    assert validate_config(saved)  # the job's config loads as it is


@pytest.mark.parametrize("change, problem", [
    ({"output_dir": "runs/x"}, "output_dir (runs/x) is relative"),
    ({"mlflow": {"tracking_uri": None}}, "mlflow.tracking_uri (unset"),
    ({"mlflow": {"tracking_uri": "sqlite:///mlflow.db"}}, "mlflow.tracking_uri (sqlite:///mlflow.db)"),
    ({"replay": {"directory": "replay"}}, "replay.directory (replay) is relative"),
])
def test_outputs_the_cluster_could_not_share_are_refused(tmp_path, toy_stream_config, change, problem):
    toy_stream_config.update(change)
    with pytest.raises(ConfigError, match="cannot submit this run") as caught:
        pack_job(validate_config(toy_stream_config), tmp_path)
    assert problem in str(caught.value)
    assert not (tmp_path / "config.yaml").exists()


def test_a_config_carrying_credentials_is_never_packed(tmp_path, toy_stream_config):
    toy_stream_config["mlflow"]["tracking_uri"] = "http://alice:hunter2@mlflow.internal:5000"
    job = tmp_path / "job"
    job.mkdir()
    with pytest.raises(ConfigError, match="mlflow.tracking_uri carries credentials") as caught:
        pack_job(validate_config(toy_stream_config), job)
    assert "hunter2" not in str(caught.value) and not list(job.iterdir())  # nothing copied, nothing written


def test_inputs_are_measured_before_anything_is_copied_and_links_out_are_refused(tmp_path, toy_stream_config,
                                                                                monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "vocab.txt").symlink_to(model / "config.json")  # inside: travels as a link
    toy_stream_config["model"].update(name_or_path=str(model), preset=None)
    job = tmp_path / "job"
    job.mkdir()
    pack_job(validate_config(toy_stream_config), job)
    assert (job / "inputs" / "02-model" / "vocab.txt").is_symlink()

    (model / "secrets").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere").mkdir()
    job2 = tmp_path / "job2"
    job2.mkdir()
    with pytest.raises(ConfigError, match=r"model.name_or_path: .*secrets is a link to .*elsewhere, outside"):
        pack_job(validate_config(toy_stream_config), job2)
    (model / "secrets").unlink()

    monkeypatch.setattr("actors.remote._MAX_PACKED_BYTES", 100)  # smaller than the first task file
    job3 = tmp_path / "job3"
    job3.mkdir()
    with pytest.raises(ConfigError, match=r"inputs come to .* with stream.tasks.0.source.path"):
        pack_job(validate_config(toy_stream_config), job3)
    assert not list(job3.iterdir())  # refused before the copy
