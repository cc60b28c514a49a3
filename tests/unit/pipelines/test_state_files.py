"""Training state that loads without running code (``pipelines.state_files``, ``Learner.load_state``)."""

import dataclasses
import random

import numpy as np
import pytest
import torch

from pipelines.errors import DataError
from pipelines.learner import silence_library_noise
from pipelines.plan import build_plan
from pipelines.state_files import load_tree, save_tree

silence_library_noise()


class Payload:
    """A pickle that runs a command when loaded: what a tampered state file would hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_tree_comes_back_as_it_was_saved(tmp_path):
    random.seed(3)
    np.random.seed(4)
    shared = torch.arange(6.0)
    tree = {"rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
            "global_step": 7, "fisher": {"w": torch.ones(2, 3), "view": shared[2:4], "again": shared},
            "by_task": {0: "a", (1, 2): None}, "$odd": [1.5, float("inf"), "x", True]}
    save_tree(tree, tmp_path, "state")
    back = load_tree(tmp_path, "state")
    assert back["rng"]["python"] == tree["rng"]["python"]
    random.setstate(back["rng"]["python"])  # usable as it is
    numpy_state = back["rng"]["numpy"]
    assert numpy_state[0] == "MT19937" and np.array_equal(numpy_state[1], tree["rng"]["numpy"][1])
    assert numpy_state[1].dtype == np.uint32
    np.random.set_state(numpy_state)
    assert torch.equal(back["rng"]["torch"], tree["rng"]["torch"])
    assert torch.equal(back["fisher"]["view"], torch.tensor([2.0, 3.0])) and torch.equal(back["fisher"]["again"], shared)
    assert back["by_task"] == {0: "a", (1, 2): None}
    assert back["$odd"] == [1.5, float("inf"), "x", True] and back["global_step"] == 7


def test_a_state_file_that_is_not_this_format_is_refused_by_name(tmp_path):
    save_tree({"a": torch.ones(1)}, tmp_path, "state")
    (tmp_path / "state.json").write_text('{"format": "something else"}')
    with pytest.raises(DataError, match=r"state\.json: not a Forgetless training state"):
        load_tree(tmp_path, "state")
    save_tree({"a": torch.ones(1)}, tmp_path, "state")
    (tmp_path / "state.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(DataError, match=r"state\.safetensors: unreadable"):
        load_tree(tmp_path, "state")


def test_objects_that_would_need_pickling_are_refused_when_saved(tmp_path):
    with pytest.raises(TypeError, match="fisher.*Payload cannot be saved without pickling"):
        save_tree({"fisher": Payload("x")}, tmp_path, "state")


def _trained(make_learner, config_dict, stage, tmp_path):
    config_dict["training"].update(zero_stage=stage, single_worker_zero_as_stage0=False, max_steps=3)
    if stage < 3:  # EWC keeps tensors across tasks: its state goes through the strategy file
        config_dict["strategy"] = {"name": "ewc", "fisher_examples": 4}
    learner, stream, config = make_learner(config_dict)
    plan = build_plan(config, stream, 0)
    learner.train_task(plan)
    return learner, stream, config, learner.save_state(tmp_path / "state" / "task-00"), plan


@pytest.mark.parametrize("stage", [0, 2, 3], ids=["zero0", "zero2", "zero3"])
def test_a_saved_state_restores_exactly_without_unpickling(make_learner, stage, toy_stream_config, tmp_path):
    learner, stream, config, state, plan = _trained(make_learner, toy_stream_config, stage, tmp_path)
    assert not list(state.glob("rank-*.pt")) and not (state / "strategy.pt").exists()
    assert (state / "rank-000.json").is_file() and (state / "strategy.safetensors").is_file()
    restored = type(learner)(config, tmp_path / "tokenizer")
    restored.load_state(state)
    assert restored.global_step == learner.global_step
    if stage < 3:
        fisher, again = learner.strategy.parts[0].fisher, restored.strategy.parts[0].fisher
        assert fisher and all(torch.equal(fisher[k], again[k]) for k in fisher)
    one = dataclasses.replace(plan, num_steps=1)
    losses = []
    for each in (learner, restored):
        each.strategy.after_task = lambda *a: None
        torch.manual_seed(5)
        losses.append(each.train_task(one)["mean_loss"])
    assert losses[0] == losses[1]


@pytest.mark.parametrize("victim", ["rank-000.pt", "mp_rank_00_model_states.pt"])
def test_a_pickle_payload_in_the_state_is_refused_by_name_and_never_runs(make_learner, victim, toy_stream_config,
                                                                        tmp_path):
    learner, stream, config, state, _ = _trained(make_learner, toy_stream_config, 0, tmp_path)
    marker = tmp_path / "pwned"
    if victim == "rank-000.pt":  # a state in the format before this one: rank-NNN.pt and strategy.pt
        for name in ("rank-000", "strategy"):
            (state / f"{name}.json").unlink()
            (state / f"{name}.safetensors").unlink()
        torch.save({}, state / "strategy.pt")
    torch.save({"rng": Payload(marker), "global_step": 1}, state / victim)
    fresh = type(learner)(config, tmp_path / "tokenizer")
    with pytest.raises(DataError, match=rf"{victim}: refused: it holds posix\.system"):
        fresh.load_state(state)
    assert not marker.exists()


def test_a_payload_the_scan_misses_still_cannot_run(make_learner, toy_stream_config, tmp_path, monkeypatch):
    # Loads inside the state go weights-only whatever their caller asks: with the scan switched off,
    # DeepSpeed's own torch.load(weights_only=False) of a tampered file fails instead of running it.
    learner, stream, config, state, _ = _trained(make_learner, toy_stream_config, 0, tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"module": Payload(marker)}, state / "mp_rank_00_model_states.pt")
    monkeypatch.setattr("pipelines.learner.refuse_unsafe_pickles", lambda directory: None)
    fresh = type(learner)(config, tmp_path / "tokenizer")
    with pytest.raises(DataError, match="training state refused: a file in it holds more than tensors"):
        fresh.load_state(state)
    assert not marker.exists()


def test_a_state_saved_in_the_earlier_format_still_resumes(make_learner, toy_stream_config, tmp_path):
    learner, stream, config, state, _ = _trained(make_learner, toy_stream_config, 2, tmp_path)
    from pipelines.learner import _rng_state

    for name in ("rank-000", "strategy"):
        (state / f"{name}.json").unlink()
        (state / f"{name}.safetensors").unlink()
    torch.save({"rng": _rng_state(), "global_step": learner.global_step}, state / "rank-000.pt")
    torch.save(learner.strategy.state_dict(), state / "strategy.pt")
    fresh = type(learner)(config, tmp_path / "tokenizer")
    fresh.load_state(state)
    assert fresh.global_step == learner.global_step
    fisher = learner.strategy.parts[0].fisher
    assert all(torch.equal(fisher[k], fresh.strategy.parts[0].fisher[k]) for k in fisher)
