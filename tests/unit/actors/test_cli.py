"""The command line's own checks, before anything starts."""

import yaml

from actors.cli import main
from pipelines.config import experiment_dict, validate_config


def test_resume_of_a_run_whose_saved_uri_was_redacted_asks_for_it_again(tmp_path, toy_stream_config, capsys):
    toy_stream_config["mlflow"]["tracking_uri"] = "http://alice:hunter2@127.0.0.1:1"
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump(experiment_dict(validate_config(toy_stream_config))))
    assert main(["resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert "mlflow.tracking_uri had credentials in it" in err
    assert f"forgetless resume {out} mlflow.tracking_uri=..." in err
    assert "hunter2" not in err


def test_errors_are_printed_with_their_credentials_redacted(tmp_path, toy_stream_config, capsys):
    toy_stream_config["mlflow"]["tracking_uri"] = "http://alice:hunter2@127.0.0.1:1"  # nothing listens there
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(toy_stream_config))
    assert main(["run", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "MLflow tracking server http://alice:***@127.0.0.1:1 is unreachable" in err and "hunter2" not in err
