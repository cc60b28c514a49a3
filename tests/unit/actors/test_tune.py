"""`forgetless tune` refuses bad input before Ray starts, each with one line naming the option."""

import pytest
import ray

from actors.tune import tune
from pipelines.config import validate_config
from pipelines.errors import ConfigError, DataError


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"trials": 0}, ConfigError, r"^tune --trials 0: each strategy needs at least 1 trial$"),
    ({"trials": 2, "tasks": 3}, ConfigError, r"^tune --tasks 3: the stream has 2 task\(s\)"),
    ({"trials": 2, "validation": 0.01}, DataError, r"^tune --validation 0.01: a validation split needs at least 10"),
    ({"trials": 2, "metric": "loss"}, ConfigError, r"^tune --metric loss: choose one of"),
    ({"trials": 2, "tasks": 1, "metric": "forgetting"}, ConfigError, r"needs --tasks 2 or more"),
    ({"trials": 2, "scheduler": "pbt"}, ConfigError, r"^tune --scheduler pbt"),
    ({"trials": 2, "space": "SPACE"}, ConfigError, r"tune --space, naive knob lr: needs low < high"),
])
def test_bad_tuning_input_is_refused_before_ray_starts(toy_stream_config, tmp_path, kwargs, error, message):
    if kwargs.get("space") == "SPACE":
        (tmp_path / "space.yaml").write_text("naive:\n  lr: {low: 0.1, high: 0.01}\n")
        kwargs = {**kwargs, "space": str(tmp_path / "space.yaml")}
    config = validate_config(toy_stream_config)
    assert not ray.is_initialized()
    with pytest.raises(error, match=message) as info:
        tune(config, ["naive"], out=str(tmp_path / "tuned"), progress=False, **kwargs)
    assert "\n" not in str(info.value) and not ray.is_initialized()


def test_a_space_for_a_strategy_not_tuned_is_refused(toy_stream_config, tmp_path):
    (tmp_path / "space.yaml").write_text("lwf:\n  lwf.alpha: {low: 0.1, high: 0.5}\n")
    with pytest.raises(ConfigError, match=r"tune --space .*space.yaml: lwf not among --strategies naive"):
        tune(validate_config(toy_stream_config), ["naive"], trials=1, space=str(tmp_path / "space.yaml"),
             progress=False)


def test_the_best_trial_breaks_a_tie_by_how_well_its_tasks_were_learned():
    from actors.tune import best_trial

    trials = [{"values": {"lr": 1}, "avg_acc": 0.41, "learning_acc": 0.5},
              {"values": {"lr": 2}, "avg_acc": 0.41, "learning_acc": 0.8},
              {"values": {"lr": 3}, "avg_acc": 0.41, "learning_acc": 0.8},
              {"values": {"lr": 4}, "avg_acc": float("nan"), "learning_acc": 0.9},
              {"values": {"lr": 5}, "avg_acc": None}]
    assert best_trial(trials, "avg_acc")["values"] == {"lr": 2}  # the tie, then the earliest
    assert best_trial([*trials, {"values": {"lr": 6}, "avg_acc": 0.5, "learning_acc": 0.1}], "avg_acc")["values"] == {
        "lr": 6}
    assert best_trial([{"values": {}, "forgetting": 0.3}, {"values": {"lr": 7}, "forgetting": 0.1}],
                      "forgetting")["values"] == {"lr": 7}  # lower is better
    assert best_trial(trials[3:], "avg_acc") is None
