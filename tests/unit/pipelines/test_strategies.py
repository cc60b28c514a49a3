"""Strategies: data selection (scheduler side), losses and state (worker side)."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import dataclasses

from pipelines.config import (
    STRATEGY_CONFIGS,
    AgemStrategyConfig,
    LwfStrategyConfig,
    ReplayStrategyConfig,
    validate_config,
)
from pipelines.errors import ConfigError
from pipelines.learner import Learner, silence_library_noise
from pipelines.models import stream_tokenizer
from pipelines.plan import PLANNING, build_plan, planning_for, replayed_per_batch, training_examples
from pipelines.strategies import (
    AGEM,
    EWC,
    TRAINERS,
    LwF,
    agem_coefficient,
    answer_labels,
    distillation_loss,
    empirical_fisher,
    load_frozen,
    stored_logits_mse,
)
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


def test_mse_distillation_sums_over_the_vocabulary_and_masks_padding():
    student = torch.tensor([[[1.0, 3.0], [100.0, 100.0]]])
    teacher = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])
    labels = torch.tensor([[4, -100]])
    # (1 - 0)^2 + (3 - 1)^2 = 5, summed over the vocabulary (a mean would give 2.5); the padded token counts nothing
    assert distillation_loss(student, teacher, labels, variant="mse", temperature=1.0).item() == pytest.approx(5.0)


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
    # "replay" also names the replay store's directory, config block and command; those lines are not the strategy
    store = ("replay_dir", '"replay": replay', '"state", "replay"', 'data["replay"]', 'add_parser("replay"')
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
    stream_tokenizer(config.model, stream).save_pretrained(tokenizer_dir)
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
    learner.train_task(plan, on_step=lambda s, n, loss, metrics: losses.append(loss))
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


# ---------------------------------------------------------------- LwF: the old heads are the earlier prefixes
def test_lwf_views_put_the_new_inputs_under_each_earlier_prefix(toy_stream_config, tmp_path):
    toy_stream_config["stream"]["max_source_tokens"] = 64  # no truncation: prefixes of other lengths
    learner, stream = _learner(toy_stream_config, tmp_path, {"name": "lwf"})
    plan = _plan(learner, stream, 1)
    assert plan.distill_prefixes == (stream[0].prefix,) and plan.prefix == stream[1].prefix
    batch = next(learner.batches(plan))
    new = learner.tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    old = learner.tokenizer.batch_decode(batch["views"][0]["input_ids"], skip_special_tokens=True)
    assert [o.removeprefix(stream[0].prefix.strip()).strip() for o in old] == \
           [n.removeprefix(stream[1].prefix.strip()).strip() for n in new]
    assert all(o.startswith(stream[0].prefix.strip()) for o in old)
    assert build_plan(learner.config, stream, 0).distill_prefixes == ()  # nothing to keep on the first task


def test_answer_labels_keep_the_end_token_and_mask_what_follows():
    sequences = torch.tensor([[0, 5, 6, 1, 0, 0], [0, 7, 1, 9, 1, 0], [0, 3, 4, 5, 6, 7]])  # start, ..., eos = 1
    assert answer_labels(sequences, eos_id=1).tolist() == [[5, 6, 1, -100, -100], [7, 1, -100, -100, -100],
                                                           [3, 4, 5, 6, 7]]


def _old_head_divergence(learner, teacher, sources):
    """Mean KL(teacher || student) per answer token on ``sources`` (already under the old prefix),
    teacher-forced on the teacher's own greedy answers: how far the old head has moved."""
    lwf = LwF(LwfStrategyConfig(), learner.config)
    lwf.teacher = teacher
    view = learner._collate_inputs(learner.tokenizer(sources)["input_ids"])
    labels, teacher_logits = lwf.teacher_answers(view)
    learner.model.eval()
    with torch.no_grad():
        student = learner.model(**view, labels=labels).logits
    learner.model.train()
    return distillation_loss(student, teacher_logits, labels, variant="kl", temperature=1.0).item()


def test_lwf_keeps_the_old_heads_answers_close_to_the_teachers_where_naive_does_not(toy_stream_config, tmp_path):
    """Two tasks on a tiny T5: after the second, the first task's prefix on the second task's
    inputs must still give (nearly) the teacher's distribution under LwF, and much less so under
    plain fine-tuning from the same start."""
    toy_stream_config["training"].update(max_steps=40, lr=3e-3)
    results = {}
    for name in ("naive", "lwf"):
        learner, stream = _learner(toy_stream_config, tmp_path / name, {"name": name, "alpha": 0.8}
                                   if name == "lwf" else {"name": name})
        learner.train_task(_plan(learner, stream, 0))
        teacher_dir = learner.save(tmp_path / name / "after-0")
        learner.train_task(_plan(learner, stream, 1, teacher_dir=str(teacher_dir)))
        teacher = load_frozen(teacher_dir, device=learner.device, dtype=torch.float32)
        bare = [s.removeprefix(stream[1].prefix) for s in stream[1].sources("eval")]
        results[name] = _old_head_divergence(learner, teacher, [stream[0].prefix + s for s in bare])
    assert results["lwf"] < 0.5 * results["naive"], results


# ---------------------------------------------------------------- A-GEM: the step never raises the memory's loss
class _Linear(torch.nn.Module):
    """loss = mean (w . x - y)^2 over the rows of a batch, in the model(**batch).loss form."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))

    def forward(self, input_ids, labels, attention_mask=None):
        return SimpleNamespace(loss=(input_ids.float() @ self.w - labels.float()).pow(2).mean())


def _agem_step(new, reference):
    model, agem = _Linear(), AGEM(AgemStrategyConfig(), None)
    grad = torch.autograd.grad(model(**new).loss, [model.w])[0]
    ref = torch.autograd.grad(model(**reference).loss, [model.w])[0]
    agem.loss(model, {**new, "reference": reference}).backward()
    return grad, ref, model.w.grad


@pytest.mark.parametrize("seed", range(20))
def test_agem_projected_gradient_never_points_against_the_reference_gradient(seed):
    rng = torch.Generator().manual_seed(seed)
    new = {"input_ids": torch.randn(4, 3, generator=rng), "labels": torch.randn(4, generator=rng) * 3}
    reference = {"input_ids": torch.randn(4, 3, generator=rng), "labels": torch.randn(4, generator=rng) * 3}
    grad, ref, projected = _agem_step(new, reference)
    assert projected @ ref >= -1e-5 * ref.norm() * grad.norm()
    if grad @ ref >= 0:
        torch.testing.assert_close(projected, grad)  # no conflict: the gradient is left alone
    else:
        torch.testing.assert_close(projected, grad - (grad @ ref) / (ref @ ref) * ref)
        assert abs(projected @ ref) <= 1e-5 * ref.norm() * grad.norm()


def test_agem_coefficient_is_zero_without_conflict():
    c, dot = agem_coefficient([torch.tensor([1.0, 0.0])], [torch.tensor([1.0, 1.0])])
    assert c.item() == 0 and dot.item() == 1
    c, dot = agem_coefficient([torch.tensor([-1.0, 0.0])], [torch.tensor([2.0, 0.0])])
    assert c.item() == pytest.approx(-0.5) and dot.item() == -2  # -2 / |(2, 0)|^2


def test_agem_batches_keep_the_whole_micro_batch_new_and_hand_the_replayed_rows_apart(toy_stream_config, tmp_path):
    learner, stream = _learner(toy_stream_config, tmp_path, {"name": "agem", "reference_rows": 3})
    import pyarrow as pa

    replayed = pa.table({"source": ["category: red dog"] * 3, "target": ["color"] * 3})
    plan = _plan(learner, stream, 1)
    assert plan.replay_mode == "reference" and plan.replay_rows_per_batch == 3
    batch = next(learner.batches(plan, replay=lambda: replayed))
    assert batch["input_ids"].shape[0] == 8 and batch["reference"]["input_ids"].shape[0] == 3
    stats = learner.train_task(dataclasses.replace(plan, num_steps=3), replay=lambda: replayed)
    assert stats["steps"] == 3 and math.isfinite(stats["mean_loss"])


# ---------------------------------------------------------------- DER++: logits stored with the rows
def test_derpp_stored_logits_match_the_model_that_stored_them_and_drift_after_training(toy_stream_config, tmp_path):
    from storage.replay import ReplayShard

    toy_stream_config["training"]["max_steps"] = 5
    learner, stream = _learner(toy_stream_config, tmp_path, {"name": "derpp", "top_k": 8, "replay_rows": 4})
    plan = _plan(learner, stream, 0)
    assert plan.logit_rows is not None and plan.logit_rows.num_rows == len(stream[0].sources("train"))
    learner.train_task(plan)
    logits = learner.replay_logits(plan)
    assert logits.num_rows == plan.logit_rows.num_rows
    shard = ReplayShard(1000, seed=0, directory=tmp_path / "shard")
    shard.insert(plan.logit_rows.append_column("logits", logits.column("logits")))
    shard.close()
    rows = ReplayShard(1000, seed=0, directory=tmp_path / "shard").sample(8, np.random.default_rng(0))
    dark = learner._with_logits(rows)
    assert dark["logit_valid"].any(dim=1).all() and dark["logit_ids"].shape[-1] == 8

    def mse():
        learner.model.eval()
        with torch.no_grad():
            out = learner.model(input_ids=dark["input_ids"], attention_mask=dark["attention_mask"], labels=dark["labels"])
        learner.model.train()
        return stored_logits_mse(out.logits, dark["logit_ids"], dark["logit_values"], dark["logit_valid"]).item()

    assert mse() == pytest.approx(0.0, abs=1e-8)  # the same model: its logits come back exactly
    learner.train_task(_plan(learner, stream, 1))
    assert mse() > 1e-3  # after another task they have moved: the term DER++ trains against


def test_derpp_loss_adds_both_replay_terms(toy_stream_config, tmp_path):
    learner, stream = _learner(toy_stream_config, tmp_path, {"name": "derpp", "top_k": 4, "replay_rows": 2})
    import pyarrow as pa

    plan = _plan(learner, stream, 1)
    assert plan.replay_mode == "with_logits" and plan.replay_rows_per_batch == 4
    replayed = pa.table({"source": ["category: red dog"] * 4, "target": ["color"] * 4})
    seen: dict = {}
    stats = learner.train_task(dataclasses.replace(plan, num_steps=2), replay=lambda: replayed,
                               on_step=lambda s, n, loss, metrics: seen.update(metrics))
    assert math.isfinite(stats["mean_loss"])
    assert "derpp_replay_ce" in seen and seen["derpp_mse"] == 0  # no stored logits: nothing to match


# ---------------------------------------------------------------- EWC: online, with a decay; its size is logged
def test_online_ewc_decays_the_old_fisher_by_gamma_and_logs_the_penalty(toy_stream_config, tmp_path):
    toy_stream_config["training"]["max_steps"] = 4
    learner, stream = _learner(toy_stream_config, tmp_path, {"name": "ewc", "lambda": 10.0, "gamma": 0.5,
                                                              "fisher_examples": 8})
    ewc: EWC = learner.strategy
    learner.train_task(_plan(learner, stream, 0))
    first = {k: v.clone() for k, v in ewc.fisher.items()}
    logged = []
    plan = _plan(learner, stream, 1)
    learner.train_task(plan, on_step=lambda s, n, loss, metrics: logged.append(metrics))
    second = empirical_fisher(learner.model, learner.batches(plan), 8)
    for k in first:
        torch.testing.assert_close(ewc.fisher[k], 0.5 * first[k] + second[k])
    assert logged and all(m["ewc_penalty"] >= 0 and "ewc_penalty_ratio" in m for m in logged)
    assert logged[-1]["ewc_penalty"] > 0  # the weights moved away from the anchor
