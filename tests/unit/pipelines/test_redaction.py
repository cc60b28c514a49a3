"""Credentials never leave a run in the clear; names that become paths cannot leave their directory."""

import pytest
import yaml

from pipelines.config import experiment_dict, flatten, validate_config
from pipelines.errors import ConfigError
from pipelines.redaction import REDACTED, redact, redact_data, redacted_keys


@pytest.mark.parametrize("text, shown", [
    ("http://alice:s3cret@mlflow.internal:5000", "http://alice:***@mlflow.internal:5000"),
    ("https://ghp_0123456789abcdefghij@host/x.git", "https://***@host/x.git"),
    ("postgresql://bob:p%40ss@db:5432/mlflow?sslmode=require", "postgresql://bob:***@db:5432/mlflow?sslmode=require"),
    ("s3://bucket/data.parquet?X-Amz-Signature=abc123&X-Amz-Date=1", "s3://bucket/data.parquet?X-Amz-Signature=***&X-Amz-Date=1"),
    ("http://host:5000/path?token=abc&run=1", "http://host:5000/path?token=***&run=1"),
    ("uri http://u:pw@a:1 and http://v:pw2@b:2 in one message", "uri http://u:***@a:1 and http://v:***@b:2 in one message"),
    ("http://user:p@ss@mlflow:5000/x", "http://user:***@mlflow:5000/x"),  # an @ in the password: all of it goes
    ("https://abc123@host/x", "https://***@host/x"),  # a short token as the user
    ("http://alice@host:5000", "http://***@host:5000"),  # a user alone cannot be told from a token
    ("https://h/api?key=k3y&x=1", "https://h/api?key=***&x=1"),
    ("https://h/cb?code=0a1b&state=2", "https://h/cb?code=***&state=2"),
    ("https://h/x?apiKey=s3cret", "https://h/x?apiKey=***"),
])
def test_secrets_in_uris_are_redacted_and_the_rest_is_kept(text, shown):
    assert redact(text) == shown
    assert "s3cret" not in redact(text) and "pw2" not in redact(text)


@pytest.mark.parametrize("text", ["http://127.0.0.1:5000", "sqlite:////tmp/mlflow.db", "ray://head:10001",
                                  "ssh://git@github.com/o/r.git", "learning rate=1e-4", "plain text", "",
                                  "user@example.com wrote"])
def test_text_without_secrets_is_left_alone(text):
    assert redact(text) == text


def test_redact_data_walks_nested_config_and_finds_what_it_redacted():
    data = {"mlflow": {"tracking_uri": "http://a:b@h:1"}, "tasks": [{"path": "s3://x?sig=1"}], "lr": 1e-4}
    shown = redact_data(data)
    assert shown == {"mlflow": {"tracking_uri": f"http://a:{REDACTED}@h:1"}, "tasks": [{"path": f"s3://x?sig={REDACTED}"}],
                     "lr": 1e-4}
    assert redacted_keys(shown) == ["mlflow.tracking_uri", "tasks.0.path"]
    assert redacted_keys(data) == []


def test_the_config_a_run_saves_and_logs_holds_no_password(toy_stream_config):
    toy_stream_config["mlflow"]["tracking_uri"] = "http://alice:hunter2@mlflow.internal:5000"
    config = validate_config(toy_stream_config)
    assert config.mlflow.tracking_uri.endswith("hunter2@mlflow.internal:5000")  # the run itself uses it
    saved = yaml.safe_dump(experiment_dict(config))  # config.yaml, the report's config, the resume check
    params = flatten(experiment_dict(config))  # MLflow params
    assert "hunter2" not in saved and "hunter2" not in str(params)
    assert params["mlflow.tracking_uri"] == "http://alice:***@mlflow.internal:5000"


@pytest.mark.parametrize("key, value", [("experiment", "../../etc"), ("experiment", ".."), ("experiment", "a/b"),
                                        ("experiment", ""), ("experiment", "x" * 101), ("task", ".."),
                                        ("task", "../escape"), ("task", "with space"), ("task", "nul\x00")])
def test_names_that_become_paths_cannot_escape_their_directory(toy_stream_config, key, value):
    if key == "experiment":
        toy_stream_config["experiment"] = value
    else:
        toy_stream_config["stream"]["tasks"][0]["name"] = value
    where = "experiment" if key == "experiment" else r"stream\.tasks\.0\.name"
    with pytest.raises(ConfigError, match=where + r".*file name"):
        validate_config(toy_stream_config)


def test_ordinary_names_are_accepted(toy_stream_config):
    toy_stream_config["experiment"] = "table1.v2-run_3"
    toy_stream_config["stream"]["tasks"][0]["name"] = "sms_spam.v1"
    assert validate_config(toy_stream_config).experiment == "table1.v2-run_3"


def test_report_json_passes_through_the_redaction_whatever_field_holds_the_secret():
    from pipelines.report import RunReport

    report = RunReport.model_validate({
        "tasks": ["a"], "acc_matrix": [[0.5]], "baseline": [0.1], "metrics": {}, "strategy": "naive",
        "strategy_config": {}, "experiment": "e", "seed": 0, "output_dir": "/r",
        "mlflow": {"tracking_uri": "http://h:5000", "run_id": "r"},
        "error": "MlflowException: API request to http://bob:hunter2@h:5000/api failed",
        "init": {"kind": "pretrained", "source": "pretrain x.yaml",
                 "pretrain": {"mlflow": {"tracking_uri": "http://bob:hunter2@h:5000"}}}})
    text = report.to_json()
    assert "hunter2" not in text and text.count("bob:***@h:5000") == 2
    assert RunReport.model_validate_json(text).error.endswith("http://bob:***@h:5000/api failed")
