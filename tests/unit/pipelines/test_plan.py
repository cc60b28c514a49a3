"""The plan: plain data, decided once, checked before any worker starts."""

import dataclasses
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.config import validate_config
from pipelines.errors import ConfigError, DataError
from pipelines.plan import (
    TaskPlan,
    balanced_shares,
    build_plan,
    check_stream,
    fingerprint,
    memory_shares,
    replay_parts,
    rows_to_drop,
    rows_to_store,
)
from pipelines.strategies import planning_for
from pipelines.tasks import load_stream

REPO = Path(__file__).resolve().parents[3]


def test_the_plan_module_needs_no_torch():
    code = "import sys, pipelines.plan, pipelines.report, pipelines.rundir; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_plan_is_plain_data_with_every_decision_in_it(toy_stream_config):
    toy_stream_config["strategy"] = {"name": "replay", "replay_ratio": 0.25}
    config = validate_config(toy_stream_config)
    stream = load_stream(config)
    first, second = build_plan(config, stream, 0), build_plan(config, stream, 1)
    assert {f.name for f in dataclasses.fields(TaskPlan)} == {
        "index", "name", "examples", "num_steps", "seed", "replay_rows_per_batch", "teacher_dir", "model_dir",
        "state_dir", "order", "denoised_tasks", "replay_parts", "prefix", "distill_prefixes", "logit_rows",
        "eval_tasks", "resume_dir"}
    assert (first.num_steps, first.replay_rows_per_batch) == (6, 0)  # nothing to replay before task 1
    assert (second.num_steps, second.replay_rows_per_batch) == (6, 2)
    assert second.state_dir.endswith("state/task-01") and second.model_dir.endswith("checkpoints/task-01-first_word")
    assert pickle.loads(pickle.dumps(second)).examples.equals(second.examples)


def test_fewer_rows_than_workers_is_refused_before_training(toy_stream_config, tmp_path):
    (tmp_path / "tiny.jsonl").write_text("".join(f'{{"source": "{s}", "target": "b"}}\n' for s in "abc"))  # 2 train, 1 eval
    toy_stream_config["stream"]["tasks"][1]["source"]["path"] = str(tmp_path / "tiny.jsonl")
    toy_stream_config["training"]["num_workers"] = 4
    config = validate_config(toy_stream_config)
    with pytest.raises(DataError, match=r"num_workers=4.*task 'first_word' trains on 2 row\(s\)"):
        check_stream(config, load_stream(config))


def test_a_fingerprint_changes_with_any_example(toy_stream_config, tmp_path):
    config = validate_config(toy_stream_config)
    stream = load_stream(config)
    path = Path(toy_stream_config["stream"]["tasks"][0]["source"]["path"])
    path.write_text(path.read_text().replace("color", "colour", 1))
    changed = load_stream(config)
    assert fingerprint(stream[0]) != fingerprint(changed[0]) and fingerprint(stream[1]) == fingerprint(changed[1])


def _with_measured_task(config, stream):
    """The stream with a pretraining-like task 0: measured, never trained."""
    from pipelines.tasks import TaskStream

    first = dataclasses.replace(stream[0], name="pretraining", trainable=False, max_steps=0)
    return TaskStream((first, *stream.tasks))


@pytest.mark.parametrize("corpus_rows", [0, 32])
def test_a_measured_only_task_is_never_trained_and_replayed_only_as_corpus(toy_stream_config, corpus_rows):
    toy_stream_config["strategy"] = {"name": "replay", "replay_ratio": 0.25}
    config = validate_config(toy_stream_config)
    config = config.model_copy(update={"replay": config.replay.model_copy(update={"pretraining_rows": corpus_rows})})
    stream = _with_measured_task(config, load_stream(config))
    plans = [build_plan(config, stream, i) for i in range(3)]
    assert plans[0].examples is None and plans[0].num_steps == 0
    assert plans[1].examples.num_rows == stream[1].train.num_rows
    # with corpus rows in the store, the first trained task already replays them (denoised)
    assert plans[1].replay_rows_per_batch == (2 if corpus_rows else 0)
    assert plans[1].denoised_tasks == ((0,) if corpus_rows else ())
    assert plans[2].replay_rows_per_batch == 2


def test_joint_and_cumulative_leave_a_measured_only_task_out(toy_stream_config):
    for name in ("joint", "cumulative"):
        toy_stream_config["strategy"] = {"name": name}
        config = validate_config(toy_stream_config)
        stream = _with_measured_task(config, load_stream(config))
        last = build_plan(config, stream, 2)
        assert last.examples.num_rows == stream[1].train.num_rows + stream[2].train.num_rows
        if name == "joint":
            assert last.num_steps == 2 * config.training.max_steps  # the two trained tasks' budgets


def test_balanced_shares_split_the_budget_evenly_as_the_caps_allow():
    # task 2 has 3 rows: it keeps them all; 17 left for two tasks: 8 (task 0) and 9 (the newest)
    assert balanced_shares({0: 10, 1: 256, 2: 3}, 20) == {0: 8, 1: 9, 2: 3}
    assert balanced_shares({0: 256}, 20) == {0: 20}
    assert balanced_shares({0: 5, 1: 5, 2: 256}, 10) == {0: 3, 1: 3, 2: 4}
    assert balanced_shares({0: 2, 1: 2}, 10) == {0: 2, 1: 2}  # fewer rows than the budget: all of them


def test_a_budget_s_plan_deletes_old_surplus_then_stores_the_new_share(toy_stream_config):
    toy_stream_config["strategy"] = {"name": "replay"}
    toy_stream_config["replay"] = {"memory_rows": 20}
    config = validate_config(toy_stream_config)
    stream = load_stream(config)
    first = rows_to_store(config, stream, 0)
    assert first.num_rows == 20 and rows_to_drop(config, stream, 0) == []
    second, dropped = rows_to_store(config, stream, 1), rows_to_drop(config, stream, 1)
    kept = set(first.column("example_id").to_pylist()) - set(dropped)
    assert second.num_rows == 10 and len(dropped) == 10 and len(kept) == 10
    assert set(dropped) <= set(first.column("example_id").to_pylist())  # only rows it holds
    assert memory_shares(config, stream, 1) == {0: 10, 1: 10}


@pytest.mark.parametrize(("strategy", "expected"), [
    ({"name": "replay"}, [("mix", 7, True)]),
    ({"name": "derpp"}, [("replay_logits", 4, False), ("replay_ce", 3, False)]),
    ({"name": "agem"}, [("reference", 7, False)]),
])
def test_one_replay_rate_is_split_over_each_strategy_s_replayed_batches(toy_stream_config, strategy, expected):
    toy_stream_config["strategy"] = strategy
    toy_stream_config["replay"] = {"memory_rows": 20, "rows_per_batch": 7}
    config = validate_config(toy_stream_config)
    parts = replay_parts(config, planning_for(config.strategy))
    assert [(p.name, p.rows, p.on_top) for p in parts] == expected
    assert build_plan(config, load_stream(config), 1).replay_rows_per_batch == 7


@pytest.mark.parametrize(("replay", "message"), [
    ({"memory_rows": 20, "rows_per_task": 5}, r"replay.rows_per_task and replay.memory_rows"),
    ({"memory_rows": 20, "capacity_rows": 5}, r"replay.capacity_rows and replay.memory_rows"),
    ({"rows_per_batch": 1}, r"replay.rows_per_batch \(1\) is split over strategy derpp's 2 replayed batches"),
])
def test_a_replay_budget_set_two_ways_is_refused_by_key(toy_stream_config, replay, message):
    toy_stream_config["strategy"] = {"name": "derpp"}
    toy_stream_config["replay"] = replay
    with pytest.raises(ConfigError, match=message):
        validate_config(toy_stream_config)
