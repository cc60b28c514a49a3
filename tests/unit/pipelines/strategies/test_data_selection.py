"""What a task trains on: joint (everything once, at the end), cumulative (everything so far),
replay (earlier rows mixed into each micro-batch)."""

import numpy as np
import pyarrow as pa

from pipelines.config import validate_config
from pipelines.plan import build_plan, planning_for, replayed_per_batch, training_examples
from pipelines.tasks import load_stream


def test_joint_sees_every_task_in_one_training_with_the_summed_budget(toy_stream_config):
    toy_stream_config["strategy"] = {"name": "joint"}
    config = validate_config(toy_stream_config)
    stream = load_stream(config)
    assert planning_for(config.strategy).trains_only_at_end
    first, last = build_plan(config, stream, 0), build_plan(config, stream, 1)
    assert first.examples is None and first.num_steps == 0
    everything = last.examples
    assert everything.num_rows == sum(t.train.num_rows for t in stream)
    assert set(everything.column("target").to_pylist()) == set(stream[0].targets("train")) | set(
        stream[1].targets("train"))
    assert last.num_steps == 2 * config.training.max_steps


def test_cumulative_trains_on_everything_so_far(toy_stream_config):
    config = validate_config({**toy_stream_config, "strategy": {"name": "cumulative"}})
    stream = load_stream(config)
    cumulative = planning_for(config.strategy)
    assert training_examples(cumulative, stream, 0).num_rows == stream[0].train.num_rows
    assert training_examples(cumulative, stream, 1).num_rows == stream[0].train.num_rows + stream[1].train.num_rows


def test_replayed_rows_per_batch():
    assert replayed_per_batch(16, 0.3) == 5
    assert replayed_per_batch(16, 0.01) == 1
    assert replayed_per_batch(4, 0.99) == 3  # always one new example


def test_replay_mixes_replayed_rows_into_each_batch(make_learner, make_plan):
    learner, stream = make_learner({"name": "replay", "replay_ratio": 0.25})
    replayed = pa.table({"source": ["category: red dog"] * 2, "target": ["color"] * 2})
    plan = make_plan(learner, stream, 1)
    assert plan.replay_rows_per_batch == 2  # round(8 x 0.25), decided by the plan
    assert build_plan(learner.config, stream, 0).replay_parts == ()  # nothing stored before the first task
    batches = learner.batches(plan, replay=lambda: replayed)
    batch = next(batches)
    assert batch.inputs["input_ids"].shape[0] == 8 and not batch.extras  # 6 new + 2 replayed
    text = learner.tokenizer.batch_decode(batch.inputs["input_ids"], skip_special_tokens=True)
    assert text[-2:] == ["category: red dog"] * 2
    assert np.all(["first word" in t for t in text[:6]])
