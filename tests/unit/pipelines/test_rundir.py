"""What a resumed or extended run may change, and the output directory's lock."""
import json
import os
from pathlib import Path

import pytest

from pipelines.config import experiment_dict, validate_config
from pipelines.errors import ConfigError
from pipelines.rundir import OutputDir, OutputDirBusyError, config_changes


def _pair(toy_stream_config, **changes):
    saved = experiment_dict(validate_config(toy_stream_config))
    given = experiment_dict(validate_config({**toy_stream_config, **changes}))
    return saved, given


def test_nothing_changed_is_nothing_refused(toy_stream_config):
    assert config_changes(*_pair(toy_stream_config), finished_tasks=2) == ([], [])


def test_changes_to_finished_tasks_the_model_or_the_seed_are_all_listed(toy_stream_config):
    tasks = [dict(t) for t in toy_stream_config["stream"]["tasks"]]
    tasks[0] = {**tasks[0], "max_train_examples": 10}
    tasks[1] = {**tasks[1], "prefix": "w: "}  # not finished yet: may change
    saved, given = _pair(toy_stream_config, seed=7, model={**toy_stream_config["model"], "arch": "bart"},
                         stream={**toy_stream_config["stream"], "tasks": tasks},
                         training={**toy_stream_config["training"], "lr": 1e-4, "zero_stage": 3})
    refused, allowed = config_changes(saved, given, finished_tasks=1)
    assert refused == ["stream.tasks.0.max_train_examples: None -> 10 (task 'category' is finished)",
                       "model.arch: 't5' -> 'bart'", "seed: 0 -> 7", "training.zero_stage: 0 -> 3"]
    assert allowed == ["training.lr: 0.003 -> 0.0001"]


def test_new_tasks_may_follow_the_finished_ones_but_a_finished_one_may_not_go(toy_stream_config):
    tasks = toy_stream_config["stream"]["tasks"]
    extra = {"name": "third", "source": dict(tasks[0]["source"])}
    saved, given = _pair(toy_stream_config, stream={**toy_stream_config["stream"], "tasks": [*tasks, extra]})
    assert config_changes(saved, given, finished_tasks=2) == ([], [])
    saved, given = _pair(toy_stream_config, stream={**toy_stream_config["stream"], "tasks": tasks[:1]})
    refused, _ = config_changes(saved, given, finished_tasks=2)
    assert refused == ["stream.tasks.1: finished task 'first_word' is missing from the new config"]


def test_a_directory_with_a_run_in_it_is_resumed_overwritten_or_refused(tmp_path):
    out = OutputDir(tmp_path / "out")
    assert out.claim(resume=False, overwrite=False) is False  # empty: a new run
    out.report.write_text("{}")
    (out.path / "checkpoints" / "task-00-a").mkdir(parents=True)
    out.unlock()
    with pytest.raises(ConfigError, match="already holds a run"):
        out.claim(resume=False, overwrite=False)
    assert out.claim(resume=True, overwrite=False) is True
    out.unlock()
    assert out.claim(resume=False, overwrite=True) is False
    assert out.replacing and out.report.exists()  # nothing goes before the new run is known to be valid
    out.replace_old_run()
    assert not out.report.exists() and not (out.path / "checkpoints").exists()
    out.unlock()


def test_overwrite_deletes_only_what_the_run_made_and_never_through_a_link(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's")
    replay = tmp_path / "replay-store"
    out = OutputDir(tmp_path / "out", replay_dir=replay)
    out.claim(resume=False, overwrite=False)
    out.report.write_text("{}")
    (out.path / "state").symlink_to(mine)  # a link where the run keeps its state: the link goes, not mine/
    (out.path / "results.csv").write_text("the user's too")
    (replay / "shard-000").mkdir()
    (replay / "store.json").write_text("{}")
    (replay / "my-file.txt").write_text("kept")
    out.unlock()
    assert out.claim(resume=False, overwrite=True) is False
    out.replace_old_run()
    assert (mine / "notes.txt").read_text() == "the user's" and not (out.path / "state").exists()
    assert (out.path / "results.csv").exists() and not out.report.exists()
    assert sorted(p.name for p in replay.iterdir()) == [".forgetless.lock", "my-file.txt"]
    out.unlock()


@pytest.mark.parametrize("where", ["root", "home", "cwd"])
def test_overwrite_refuses_a_directory_that_is_not_a_runs_own(where, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "thesis.tex").write_text("x")
    path = {"root": Path("/"), "home": tmp_path / "home", "cwd": Path(".")}[where]
    out = OutputDir(path)
    out.holds_a_run = lambda: True  # as if a report.json were there
    out.lock = out.unlock = lambda: None  # / is not writable: the refusal comes before anything is written
    with pytest.raises(ConfigError, match="overwrite=true never empties it"):
        out.claim(resume=False, overwrite=True)
    assert (tmp_path / "thesis.tex").exists()


def test_overwrite_refuses_run_like_names_with_no_record_of_a_run(tmp_path):
    out = OutputDir(tmp_path / "out")
    (out.path / "state").mkdir(parents=True)  # someone's own directory called state
    with pytest.raises(ConfigError, match="no record that Forgetless made them"):
        out.claim(resume=False, overwrite=True)
    assert (out.path / "state").is_dir()


def test_a_symlinked_lock_file_is_refused_and_its_target_untouched(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("precious")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".forgetless.lock").symlink_to(target)
    with pytest.raises(ConfigError, match=r"\.forgetless\.lock is not a plain file .*output_dir"):
        OutputDir(tmp_path / "out").lock()
    assert target.read_text() == "precious"


def test_two_runs_sharing_a_replay_directory_are_refused_naming_the_holder(tmp_path):
    shared = tmp_path / "replay"
    first = OutputDir(tmp_path / "a", replay_dir=shared)
    first.claim(resume=False, overwrite=False)
    second = OutputDir(tmp_path / "b", replay_dir=shared)
    with pytest.raises(OutputDirBusyError, match=rf"replay.directory {shared} is in use by process {os.getpid()}"):
        second.claim(resume=False, overwrite=False)
    first.unlock()
    second.claim(resume=False, overwrite=False)  # free once the first run ends
    second.unlock()


def test_the_lock_names_its_holder_and_dies_with_it(tmp_path):
    first, second = OutputDir(tmp_path), OutputDir(tmp_path)
    first.lock()
    with pytest.raises(OutputDirBusyError, match=r"in use by process \d+ on .* since"):
        second.lock()
    assert second.is_locked_elsewhere()
    first.unlock()
    assert not second.is_locked_elsewhere()
    second.lock()
    second.unlock()


def test_a_config_saved_before_keys_were_added_resumes_without_changes(toy_stream_config):
    from pipelines.config import experiment_dict, validate_config

    given = experiment_dict(validate_config(toy_stream_config))
    saved = json.loads(json.dumps(given))
    for key in ("pretrain", "encoder", "weights"):  # keys a newer version added, at their defaults
        del saved["model"][key]
    del saved["recovery"], saved["stream"]["pretraining_task"], saved["stream"]["tasks"][0]["order"]
    assert config_changes(saved, given, finished_tasks=2) == ([], [])
    given["recovery"]["enabled"] = True  # the probe runs after the stream: changing it changes no row
    assert config_changes(saved, given, finished_tasks=2)[0] == []


def test_a_run_saved_before_strategy_settings_had_one_home_resumes_without_changes(toy_stream_config):
    """Older versions saved the run's strategy block and a `strategies` block of defaults beside it;
    the block is what the run used, and resuming it with the same command changes nothing."""
    toy_stream_config["strategy"] = {"name": "ewc", "lambda": 10000.0}
    given = experiment_dict(validate_config(toy_stream_config))
    assert given["strategies"]["ewc"]["lambda"] == 10000.0
    saved = json.loads(json.dumps(given))
    saved["strategies"]["ewc"]["lambda"] = 100.0  # what the older version wrote: the default
    assert config_changes(saved, given, finished_tasks=2) == ([], [])
    given["strategies"]["ewc"]["lambda"] = 50.0
    given["strategy"]["lambda"] = 50.0
    refused, _ = config_changes(saved, given, finished_tasks=2)
    assert refused == ["strategies.ewc.lambda: 10000.0 -> 50.0", "strategy.lambda: 10000.0 -> 50.0"]


def test_a_run_saved_before_the_per_example_loss_goes_on_with_the_token_mean(toy_stream_config):
    """training.loss_mean came with a new default: a run saved without it trained with the token
    mean, and its resume keeps that (the CLI adds the override); the new default would be a change."""
    from pipelines.rundir import earlier_behaviour

    given = experiment_dict(validate_config(toy_stream_config))
    saved = json.loads(json.dumps(given))
    del saved["training"]["loss_mean"], saved["evaluation"]["cells"]
    assert earlier_behaviour(saved) == ["training.loss_mean=per_token"]
    assert earlier_behaviour(given) == []
    refused, _ = config_changes(saved, given, finished_tasks=1)
    assert refused == ["training.loss_mean: 'per_token' -> 'per_example'"]
    kept = experiment_dict(validate_config({**toy_stream_config, "training": {
        **toy_stream_config["training"], "loss_mean": "per_token"}}))
    assert config_changes(saved, kept, finished_tasks=1) == ([], [])  # cells: any value reads the same metrics


# ---------------------------------------------------------------------------- paths a run's files name
def test_paths_from_a_runs_files_stay_inside_it(tmp_path):
    from pipelines.errors import DataError
    from pipelines.rundir import inside

    run, original = tmp_path / "copy", tmp_path / "original"
    (run / "state" / "task-01").mkdir(parents=True)
    assert inside(run, "state/task-01", file="f", key="k") == run / "state" / "task-01"
    # written where the run first lived: read at the same place in this copy, never the original
    assert inside(run, str(original / "state" / "task-01"), file="f", key="k", saved_root=original) == \
        run / "state" / "task-01"
    assert inside(run, str(run / "state"), file="f", key="k") == run / "state"
    (tmp_path / "outside").mkdir()
    (run / "link").symlink_to(tmp_path / "outside")
    for value in ("/etc", str(tmp_path / "outside"), "../outside", "state/../../outside", "link", "link/x"):
        with pytest.raises(DataError, match=rf"report\.json: resume\.training_state = .* points outside the run"):
            inside(run, value, file="report.json", key="resume.training_state", saved_root=original)


def test_a_report_naming_state_outside_the_run_is_refused_and_a_copys_paths_are_its_own(tmp_path):
    from pipelines.errors import DataError
    from pipelines.report import RunReport
    from pipelines.rundir import contained_report

    original, run = tmp_path / "original", tmp_path / "copy"
    report = RunReport.model_validate({
        "tasks": ["a"], "acc_matrix": [[0.5]], "baseline": [0.1], "metrics": {}, "strategy": "naive",
        "strategy_config": {}, "experiment": "e", "seed": 0, "finished_tasks": 1, "output_dir": str(original),
        "mlflow": {"tracking_uri": "sqlite:///x.db", "experiment_id": "1", "run_id": "r"},
        "checkpoints": {"a": str(original / "checkpoints" / "task-00-a")},
        "resume": {"training_state": str(original / "state" / "task-00"), "replay_checkpoint": "after-00"}})
    copy = contained_report(report, run)
    assert copy.resume.training_state == str(run.resolve() / "state" / "task-00")
    assert copy.checkpoints == {"a": str(run.resolve() / "checkpoints" / "task-00-a")}
    for field, value in (("training_state", "/tmp/elsewhere"), ("training_state", "../x")):
        bad = report.model_copy(deep=True)
        setattr(bad.resume, field, value)
        with pytest.raises(DataError, match=rf"resume\.{field} = .* points outside"):
            contained_report(bad, run)
    bad = report.model_copy(deep=True)
    bad.resume.replay_checkpoint = "../../etc"
    with pytest.raises(DataError, match="resume.replay_checkpoint = '../../etc' is not a checkpoint tag"):
        contained_report(bad, run)
