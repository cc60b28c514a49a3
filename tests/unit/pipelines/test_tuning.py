"""What `forgetless tune` searches and on which rows, refused inputs named by key: no Ray."""

import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.config import validate_config
from pipelines.errors import ConfigError, DataError
from pipelines.strategies.base import Range
from pipelines.tasks import load_stream
from pipelines.tuning import read_tuned, search_space, shared_rates, tuning_config, with_values, write_tuned


@pytest.fixture
def three(toy_stream_config, toy_task, tmp_path):
    third = toy_task(tmp_path / "data" / "last.jsonl", "last_word", seed=3)
    toy_stream_config["stream"]["tasks"].append({"name": "last_word", "source": {"kind": "file", "path": str(third)}})
    return validate_config(toy_stream_config)


def test_every_strategy_searches_its_learning_rate_and_its_own_knobs(three):
    names = {name: [k.name for k in search_space(three, name)] for name in ("naive", "replay", "lwf", "ewc", "derpp",
                                                                              "agem", "replay+lwf")}
    assert names == {"naive": ["lr"], "replay": ["lr", "replay.replay_ratio"], "lwf": ["lr", "lwf.alpha", "lwf.temperature"],
                     "ewc": ["lr", "ewc.lambda", "ewc.gamma"], "derpp": ["lr", "derpp.alpha", "derpp.beta"],
                     "agem": ["lr", "agem.reference_rows"],
                     "replay+lwf": ["lr", "replay.replay_ratio", "lwf.alpha", "lwf.temperature"]}
    ewc = {k.name: k.range for k in search_space(three, "ewc")}["ewc.lambda"]
    assert (ewc.low, ewc.high, ewc.log) == (1.0, 1e6, True)  # at least 1e0 - 1e6, log-uniform


def test_knobs_the_shared_replay_rate_fixes_are_not_searched(three):
    fixed = three.model_copy(update={"replay": three.replay.model_copy(update={"rows_per_batch": 8})})
    assert [k.name for k in search_space(fixed, "replay")] == ["lr"]
    assert [k.name for k in search_space(fixed, "agem")] == ["lr"]
    assert [k.name for k in search_space(fixed, "derpp")] == ["lr", "derpp.alpha", "derpp.beta"]


@pytest.mark.parametrize(("space", "message"), [
    ({"lwf.beta": {"low": 0, "high": 1}}, r"tune --space, lwf knob lwf.beta: not a knob of lwf"),
    ({"lwf.alpha": {"low": 0.5, "high": 2.0}}, r"tune --space, lwf knob lwf.alpha: 2.0 is outside what the knob takes"),
    ({"lr": {"low": -1.0, "high": 0.1, "log": False}}, r"tune --space, lwf knob lr: -1.0 is outside"),
    ({"lr": {"low": 0.1, "high": 0.01}}, r"tune --space, lwf knob lr: needs low < high"),
    ({"lwf.alpha": {"low": 0.1}}, r"tune --space, lwf knob lwf.alpha: give \{low"),
])
def test_a_search_space_outside_a_knob_s_range_or_unknown_is_refused_by_name(three, space, message):
    with pytest.raises(ConfigError, match=message):
        search_space(three, "lwf", space)


def test_the_tuning_stream_is_the_first_tasks_training_rows_only(three, tmp_path):
    config, tuned_on = tuning_config(three, tasks=2, validation=0.25, directory=tmp_path / "tuned")
    assert [t.name for t in config.stream.tasks] == ["category", "first_word"] and tuned_on["tasks"] == [
        "category", "first_word"]
    original = load_stream(three)
    tuning = load_stream(config)
    for task, before in zip(tuning, original):
        read = set(task.sources("train")) | set(task.sources("eval"))
        assert read <= set(before.sources("train"))  # training rows only
        assert not read & set(before.sources("eval"))  # no eval row
        assert task.prefix == before.prefix and task.eval.num_rows >= 10
    files = sorted((tmp_path / "tuned" / "data").iterdir())
    assert [f.name for f in files] == ["category.parquet", "first_word.parquet"]  # nothing of task 3 written
    assert all(pq.read_table(f).num_rows == t.train.num_rows for f, t in zip(files, original))


@pytest.mark.parametrize(("tasks", "validation", "error", "message"), [
    (4, 0.2, ConfigError, r"tune --tasks 4: the stream has 3 task\(s\)"),
    (0, 0.2, ConfigError, r"tune --tasks 0"),
    (2, 1.5, ConfigError, r"tune --validation 1.5"),
    (2, 0.05, DataError, r"tune --validation 0.05: a validation split needs at least 10 rows"),
])
def test_a_tuning_stream_that_cannot_be_cut_is_refused_by_option(three, tmp_path, tasks, validation, error, message):
    with pytest.raises(error, match=message):
        tuning_config(three, tasks=tasks, validation=validation, directory=tmp_path)


def test_tuned_values_go_where_the_knobs_say_and_come_back_from_their_yaml(three, tmp_path):
    values = {"lr": 0.002, "ewc.lambda": 5000.0, "ewc.gamma": 0.9}
    config = with_values(three, "ewc", values, seed=3)
    assert (config.training.lr, config.strategy.ewc_lambda, config.strategy.gamma, config.seed) == (0.002, 5000.0, 0.9, 3)
    write_tuned(tmp_path / "ewc.yaml", "ewc", values, record={"trials": 4, "tasks": ["category", "first_word"]})
    assert read_tuned(tmp_path, "ewc", three)["values"] == values
    with pytest.raises(ConfigError, match=r"no lwf.yaml for strategy lwf"):
        read_tuned(tmp_path, "lwf", three)
    (tmp_path / "naive.yaml").write_text("strategy: naive\nvalues: {lr: .nan}\n")
    with pytest.raises(ConfigError, match=r"naive.yaml: values"):
        read_tuned(tmp_path, "naive", three)
    (tmp_path / "replay.yaml").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match=r"replay.yaml: cannot read it"):
        read_tuned(Path(tmp_path), "replay", three)


def test_every_strategy_tries_the_same_learning_rates_one_in_each_slice_of_the_range():
    rates = shared_rates(Range(1e-4, 1e-2, log=True), 5, seed=0)
    assert rates == shared_rates(Range(1e-4, 1e-2, log=True), 5, seed=0)  # no strategy in the draw: the same for all
    assert rates != shared_rates(Range(1e-4, 1e-2, log=True), 5, seed=1)
    # five slices of the log range, each 10^0.4 wide: the k-th rate lies in the k-th
    for k, rate in enumerate(rates):
        assert 10 ** (-4 + 0.4 * k) <= rate < 10 ** (-4 + 0.4 * (k + 1)), (k, rate)
    # another range (--space) takes the same quantiles of its own: a linear range, the same slice per trial
    linear = shared_rates(Range(0.0, 1.0), 5, seed=0)
    assert [int(q * 5) for q in linear] == [0, 1, 2, 3, 4]
    assert [math.log10(r) for r in rates] == pytest.approx([-4 + 2 * q for q in linear])
