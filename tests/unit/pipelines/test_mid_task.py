"""Mid-task checkpoints (``checkpoint.every_n_steps``): a task restarted from one ends exactly where
the uninterrupted task ends — the same weights, the same micro-batches and replay draws, the same loss
and example counts — and logs only the steps after it."""

import dataclasses

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipelines.learner import silence_library_noise
from pipelines.plan import build_plan, mid_task_dir

silence_library_noise()


def _replay_source(seed: int, rows_per_draw: int):
    """A stand-in for the replay sampler: seeded draws from a fixed memory, the same sequence each
    time it is made (as the sampler's are, for a seed and an unchanged store)."""
    memory = pa.table({"source": [f"category: word{i} thing" for i in range(50)],
                       "target": [f"label{i % 3}" for i in range(50)],
                       "task_id": pa.array([0] * 50, pa.int32())})
    rng = np.random.default_rng(seed)
    drawn = []

    def draw() -> pa.Table:
        drawn.append(1)
        return memory.take(rng.integers(0, memory.num_rows, size=rows_per_draw))

    return draw, drawn


def _weights(learner) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in learner.model.named_parameters()}


@pytest.mark.parametrize("accum", [1, 2])
def test_a_task_restarted_from_its_mid_task_state_ends_as_the_uninterrupted_one(make_learner, toy_stream_config,
                                                                              tmp_path, accum):
    toy_stream_config["strategy"] = {"name": "replay", "replay_ratio": 0.25}
    toy_stream_config["training"].update(max_steps=10, log_every_n_steps=3, grad_accum_steps=accum, lr=1e-3)
    toy_stream_config["checkpoint"] = {"every_n_steps": 4}
    learner, stream, config = make_learner(toy_stream_config)
    plan = build_plan(config, stream, 1)
    assert plan.replay_rows_per_batch > 0 and plan.state_dir
    saved, logged = [], []

    def on_checkpoint(steps_done, progress):
        saved.append((steps_done, learner.save_state(mid_task_dir(config.output_dir, 1, steps_done), progress)))

    replay, _ = _replay_source(7, plan.replay_rows_per_batch)
    whole = learner.train_task(plan, replay=replay, on_checkpoint=on_checkpoint,
                               on_step=lambda step, total, loss, m: logged.append((step, loss)))
    expected = _weights(learner)
    assert [s for s, _ in saved] == [4, 8]  # every 4 steps, not at the task's end (that is the task's own state)
    learner.close()

    # A new process: the model as built, then the task from its step-4 state (the state of the task
    # before it is what a real restart loads first; here, as in the first run, there is none).
    learner, _, _ = make_learner(toy_stream_config)
    replay, drawn = _replay_source(7, plan.replay_rows_per_batch)
    again = []
    resumed = learner.train_task(dataclasses.replace(plan, resume_dir=str(saved[0][1])), replay=replay,
                                 on_step=lambda step, total, loss, m: again.append((step, loss)),
                                 on_checkpoint=lambda steps_done, progress: None)
    got = _weights(learner)
    assert sorted(got) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)
    assert len(drawn) == 10 * accum  # the draws before the state were drawn again, and dropped
    assert resumed["mean_loss"] == pytest.approx(whole["mean_loss"], rel=1e-6)
    assert resumed["examples"] == whole["examples"] and resumed["started_at"] == whole["started_at"]
    assert learner.global_step == 10
    # the loss curve goes on from the state: the same windows, the same losses, none before it
    assert [s for s, _ in again] == [s for s, _ in logged if s >= 4]
    assert [loss for _, loss in again] == pytest.approx([loss for s, loss in logged if s >= 4], rel=1e-6)


def test_a_checkpoint_by_the_clock_is_taken_at_a_sync_step_by_every_rank(make_learner, toy_stream_config):
    toy_stream_config["training"].update(max_steps=6, log_every_n_steps=2)
    toy_stream_config["checkpoint"] = {"every_minutes": 1e-9}  # due at every sync
    learner, stream, config = make_learner(toy_stream_config)
    steps = []
    learner.train_task(build_plan(config, stream, 0), on_checkpoint=lambda done, progress: steps.append(done))
    assert steps == [2, 4]  # the syncs before the task's end: its end is saved as the task's own state
