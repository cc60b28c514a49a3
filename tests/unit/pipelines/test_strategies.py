"""Strategies: data selection (scheduler side), losses and state (worker side)."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import dataclasses

from pipelines.config import STRATEGY_CONFIGS, ReplayStrategyConfig, validate_config
from pipelines.errors import ConfigError
from pipelines.learner import Learner, silence_library_noise
from pipelines.models import build_tokenizer
from pipelines.plan import PLANNING, build_plan, planning_for, replayed_per_batch, training_examples
from pipelines.strategies import EWC, TRAINERS, distillation_loss, empirical_fisher
from pipelines.tasks import load_stream

silence_library_noise()


def test_kl_distillation_hand_computed_with_temperature_squared_and_padding_mask():
    # one sequence, two positions, vocabulary of 2; the second position is padding (-100)
    student = torch.tensor([[[0.0, 0.0], [5.0, -5.0]]])
    teacher = torch.tensor([[[2.0, 0.0], [-5.0, 5.0]]])
    labels = torch.tensor([[1, -100]])
    t = 2.0
    p = torch.softmax(torch.tensor([2.0, 0.0]) / t, dim=0)  # teacher softened: [0.731, 0.269]
    q = torch.tensor([0.5, 0.5])  # student softened
    # KL = 0.7311 ln(0.7311 / 0.5) + 0.2689 ln(0.2689 / 0.5) = 0.2777 - 0.1667 = 0.1110; x T^2 = 0.4438
    expected = float((p * (p / q).log()).sum()) * t**2
    got = distillation_loss(student, teacher, labels, variant="kl", temperature=t)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(0.4438, abs=1e-3)


def test_mse_distillation_masks_padding():
    student = torch.tensor([[[1.0, 3.0], [100.0, 100.0]]])
    teacher = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])
    labels = torch.tensor([[4, -100]])
    assert distillation_loss(student, teacher, labels, variant="mse", temperature=1.0).item() == pytest.approx(2.5)


def test_distillation_of_identical_logits_is_zero():
    logits = torch.randn(2, 3, 7)
    labels = torch.tensor([[1, 2, -100], [3, -100, -100]])
    assert distillation_loss(logits, logits, labels, variant="kl", temperature=2.0).item() == pytest.approx(0, abs=1e-6)


def test_every_strategy_has_a_planning_and_a_training_side_keyed_by_its_config():
    assert set(TRAINERS) == set(PLANNING) == set(STRATEGY_CONFIGS.values())


def test_each_strategy_name_is_written_once_in_the_code():
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[3]
    lines = [line for d in ("pipelines", "actors", "storage") for p in sorted((repo / d).glob("*.py"))
             for line in p.read_text().splitlines()]
    # "replay" also names the replay store's directory and config block; those lines are not the strategy
    store = ("replay_dir", '"replay": replay', '"state", "replay"')
    for name in STRATEGY_CONFIGS:
        found = [line.strip() for line in lines if re.search(rf"""["']{name}["']""", line)
                 and not any(s in line for s in store)]
        assert found == [f'name: Literal["{name}"] = "{name}"'], found


def test_bad_strategy_settings_are_all_reported_before_training(toy_stream_config):
    toy_stream_config["strategies"] = {"replay": {"replay_ratio": 1.0}, "lwf": {"temperature": 0, "alpha": 1.5},
                                       "ewc": {"lambda": -1}}
    with pytest.raises(ConfigError) as info:
        validate_config(toy_stream_config)
    problems = "\n".join(info.value.problems)
    assert len(info.value.problems) == 4
    for path in ("strategies.replay.replay_ratio", "strategies.lwf.temperature", "strategies.lwf.alpha",
                 "strategies.ewc.lambda"):
        assert path in problems
    toy_stream_config.pop("strategies")
    toy_stream_config["strategy"] = {"name": "replay", "replay_ratio": 0}
    with pytest.raises(ConfigError, match="strategy.replay_ratio: Input should be greater than 0"):
        validate_config(toy_stream_config)


def test_ewc_refuses_zero3(toy_stream_config):
    toy_stream_config["strategy"] = {"name": "ewc"}
    toy_stream_config["training"]["zero_stage"] = 3
    with pytest.raises(ConfigError, match="ewc needs full parameters"):
        validate_config(toy_stream_config)


def test_with_strategy_takes_the_settings_from_strategies(toy_stream_config):
    toy_stream_config["strategies"] = {"replay": {"replay_ratio": 0.25}, "ewc": {"lambda": 7}}
    config = validate_config(toy_stream_config)
    assert config.with_strategy("replay", seed=3).strategy == ReplayStrategyConfig(replay_ratio=0.25)
    assert config.with_strategy("replay", seed=3).seed == 3
    assert config.with_strategy("ewc").strategy.ewc_lambda == 7
    with pytest.raises(ConfigError, match="unknown strategy 'nope'"):
        config.with_strategy("nope")


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


def _learner(config_dict, tmp_path, strategy):
    config = validate_config({**config_dict, "strategy": strategy})
    stream = load_stream(config)
    tokenizer_dir = tmp_path / "tokenizer"
    build_tokenizer(config.model, stream.training_text()).save_pretrained(tokenizer_dir)
    learner = Learner(config, tokenizer_dir)
    return learner, stream


def _plan(learner, stream, index, **kwargs):
    return dataclasses.replace(build_plan(learner.config, stream, index), **{"teacher_dir": None, **kwargs})


def test_lwf_teacher_is_frozen_and_never_changes(toy_stream_config, tmp_path):
    toy_stream_config["training"]["max_steps"] = 10
    learner, stream = _learner(toy_stream_config, tmp_path, {"name": "lwf", "alpha": 0.5})
    learner.train_task(_plan(learner, stream, 0))
    teacher_dir = learner.save(tmp_path / "after-0")
    plan = _plan(learner, stream, 1, teacher_dir=str(teacher_dir))
    learner.strategy.before_task(learner.context(plan), plan)
    teacher = learner.strategy.teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    learner.strategy.after_task = lambda *a: None  # keep the teacher to inspect it afterwards
    learner.strategy.before_task = lambda *a: None
    losses = []
    learner.train_task(plan, on_step=lambda s, n, loss: losses.append(loss))
    assert losses
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    student = learner.model.state_dict()
    assert any(not torch.equal(student[k], before[k]) for k in before)  # the student did move
    assert all(math.isfinite(v) for v in losses)


@pytest.mark.parametrize("variant", ["mse", "pseudo_labels"])
def test_lwf_variants_train(variant, toy_stream_config, tmp_path):
    toy_stream_config["training"]["max_steps"] = 4
    learner, stream = _learner(toy_stream_config, tmp_path, {"name": "lwf", "variant": variant})
    learner.train_task(_plan(learner, stream, 0))
    teacher_dir = learner.save(tmp_path / "after-0")
    stats = learner.train_task(_plan(learner, stream, 1, teacher_dir=str(teacher_dir)))
    assert stats["steps"] == 4 and math.isfinite(stats["mean_loss"])


def test_ewc_penalty_zero_at_the_anchor_positive_away(toy_stream_config, tmp_path):
    toy_stream_config["training"]["max_steps"] = 5
    learner, stream = _learner(toy_stream_config, tmp_path, {"name": "ewc", "lambda": 10.0, "fisher_examples": 12})
    ewc: EWC = learner.strategy
    learner.train_task(_plan(learner, stream, 0))  # after_task estimates the Fisher
    assert ewc.fisher and all(f.min() >= 0 for f in ewc.fisher.values())
    assert sum(f.sum().item() for f in ewc.fisher.values()) > 0
    assert ewc.penalty(learner.model).item() == pytest.approx(0.0, abs=1e-12)
    with torch.no_grad():
        for p in learner.model.parameters():
            p.add_(0.01)
    assert ewc.penalty(learner.model).item() > 0
    fisher_after_one = {k: v.clone() for k, v in ewc.fisher.items()}
    learner.train_task(_plan(learner, stream, 1))
    grown = [bool((ewc.fisher[k] >= fisher_after_one[k]).all()) for k in fisher_after_one]
    assert all(grown)  # Fisher information accumulates over tasks


class _TwoWeights(torch.nn.Module):
    """loss = mean over target tokens of (w * x - y)^2 / 2: per-example gradients are easy by hand."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))

    def forward(self, input_ids, attention_mask, labels):
        mask = (labels != -100).float()
        residual = (self.w * input_ids.float() - labels.float()) * mask
        return SimpleNamespace(loss=(residual.pow(2) / 2).sum() / mask.sum())


def test_empirical_fisher_is_the_mean_of_squared_per_example_log_likelihood_gradients():
    model = _TwoWeights()
    # example 0: x = [1, 1], y = [3, 0]  -> both tokens count; example 1: x = [2, 5], y = [1, pad]
    batch = {"input_ids": torch.tensor([[1, 1], [2, 5]]), "attention_mask": torch.ones(2, 2, dtype=torch.bool),
             "labels": torch.tensor([[3, 0], [1, -100]])}
    # gradient of the summed (not averaged) per-token loss, per example:
    #   ex 0: d/dw (w x - y)^2 / 2 = (w x - y) x -> [(1 - 3) 1, (2 - 0) 1] = [-2, 2]
    #   ex 1: [(2 - 1) 2, 0 (padding)]                                = [2, 0]
    expected = (torch.tensor([-2.0, 2.0]).pow(2) + torch.tensor([2.0, 0.0]).pow(2)) / 2  # [4, 2]
    fisher = empirical_fisher(model, iter([batch]), num_examples=2)
    assert torch.allclose(fisher["w"], expected)
    # the square of the batch gradient would be far smaller: ((-2 + 2) / 2)^2 = 0 for w[0]
    assert model.training  # the mode is restored


def test_empirical_fisher_reads_more_batches_until_it_has_enough_examples():
    model = _TwoWeights()
    one = {"input_ids": torch.tensor([[1, 1]]), "attention_mask": torch.ones(1, 2, dtype=torch.bool),
           "labels": torch.tensor([[3, 0]])}
    two = {"input_ids": torch.tensor([[2, 5], [9, 9]]), "attention_mask": torch.ones(2, 2, dtype=torch.bool),
           "labels": torch.tensor([[1, -100], [0, 0]])}
    fisher = empirical_fisher(model, iter([one, two]), num_examples=2)  # the [9, 9] example is not read
    assert torch.allclose(fisher["w"], torch.tensor([4.0, 2.0]))


def test_replay_mixes_replayed_rows_into_each_batch(toy_stream_config, tmp_path):
    learner, stream = _learner(toy_stream_config, tmp_path, {"name": "replay", "replay_ratio": 0.25})
    import pyarrow as pa

    replayed = pa.table({"source": ["category: red dog"] * 2, "target": ["color"] * 2})
    plan = _plan(learner, stream, 1)
    assert plan.replay_rows_per_batch == 2  # round(8 x 0.25), decided by the plan
    batches = learner.batches(plan, replay=lambda: replayed)
    batch = next(batches)
    assert batch["input_ids"].shape[0] == 8  # 6 new + 2 replayed
    text = learner.tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    assert text[-2:] == ["category: red dog"] * 2
    assert np.all(["first word" in t for t in text[:6]])
