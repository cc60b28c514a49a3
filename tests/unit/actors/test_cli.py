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
    assert "mlflow.tracking_uri http://alice:***@127.0.0.1:1 carries credentials" in err and "hunter2" not in err
    assert "(http://127.0.0.1:1)" in err and "MLFLOW_TRACKING_PASSWORD" in err


def test_the_command_exits_with_its_code_after_the_exit_handlers_ran(tmp_path, toy_stream_config):
    # `entry` skips the interpreter's teardown (seconds of torch's and Ray's finalizers), not what
    # a process owes before it ends: exit handlers, the exit code, flushed output.
    import subprocess
    import sys

    toy_stream_config["mlflow"]["tracking_uri"] = "http://127.0.0.1:1"  # nothing listens there: exit 2
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(toy_stream_config))
    script = ("import atexit, sys\nfrom actors import cli\natexit.register(print, 'exit handler ran')\n"
              f"sys.argv = ['forgetless', 'run', {str(path)!r}]\ncli.entry()\nprint('not reached')\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "MLflow tracking server http://127.0.0.1:1 is unreachable" in result.stderr
    assert result.stdout.splitlines() == ["exit handler ran"]


def test_the_printed_matrix_gives_the_headline_metrics_then_each_task_s_forgetting():
    from actors.cli import format_matrix
    from pipelines.metrics import summary
    from pipelines.report import RunReport

    acc = [[0.9, 0.855, 0.0], [0.5, 0.775, 0.1], [0.4, 0.775, 0.8]]  # task b scored 0.855 before its training
    metrics = summary(acc, [0.0, 0.855, 0.0], 2, names=["a", "b", "c"])
    report = RunReport(tasks=["a", "b", "c"], seed=0, status="FINISHED", acc_matrix=acc, baseline=[0.0, 0.855, 0.0],
                       metrics=metrics, mlflow={"tracking_uri": "sqlite:///x.db", "run_id": "r"}, strategy="naive",
                       strategy_config={}, experiment="e", output_dir="/x", finished_tasks=3)
    lines = format_matrix(report).splitlines()
    assert lines[-2].startswith("naive: avg_acc 0.658, forgetting +0.250, bwt -0.250") and "forgetting/" not in lines[-2]
    assert lines[-1] == "forgetting by task: a +0.500, b +0.000"


def test_a_moved_run_takes_its_replay_directory_along_when_it_was_inside_the_run(tmp_path):
    from actors.cli import _replay_in_place

    saved = {"output_dir": "/old/run", "replay": {"directory": "/old/run/store"}}
    assert _replay_in_place(saved, tmp_path / "new") == [f"replay.directory={(tmp_path / 'new').resolve() / 'store'}"]
    assert _replay_in_place({**saved, "replay": {"directory": "/shared/store"}}, tmp_path) == []  # the user's place
    assert _replay_in_place({**saved, "replay": {"directory": None}}, tmp_path) == []


def test_a_restart_is_printed_with_what_died_where_it_went_on_from_and_the_steps_redone():
    from actors.cli import restart_line
    from pipelines.report import Restart

    known = Restart(number=1, at=0.0, died=["worker 1 (pid 4242 on node-3)"], reasons=["worker 0 of 2: a lost peer"],
                    task_index=2, steps_redone=3, restored_from="task 2, step 40 (mid-task checkpoint)")
    assert restart_line(known) == ("restart 1: worker 1 (pid 4242 on node-3) died; worker 0 of 2: a lost peer — went on "
                                   "from task 2, step 40 (mid-task checkpoint), 3 step(s) redone")
    unknown = Restart(number=2, at=0.0, died=[], reasons=["the scheduler actor"], steps_redone=None,
                      restored_from="the end of task 1")
    assert restart_line(unknown) == ("restart 2: the scheduler actor — went on from the end of task 1, an unknown number "
                                     "of step(s) redone")
