"""Strategies combined: a list under ``strategy:``; their plans merge, their losses nest and add,
each term is logged under its name, their state is saved per strategy; what makes no sense is
refused with the reason."""

import math

import pyarrow as pa
import pytest
import torch

from pipelines.config import validate_config
from pipelines.errors import ConfigError
from pipelines.plan import build_plan
from pipelines.strategies import Combination, planning_for
from pipelines.strategies.base import StepBatch
from pipelines.tasks import load_stream


@pytest.mark.parametrize(("strategy", "reason"), [
    (["replay", "derpp"], "replay and derpp do not combine: both use the replayed rows"),
    (["agem", "replay"], "agem and replay do not combine: both use the replayed rows"),
    (["joint", "lwf"], "joint combines with nothing"),
    (["cumulative", "ewc"], "cumulative combines with nothing"),
    (["naive", "lwf"], "naive combines with nothing"),
    (["lwf", "lwf"], "names a strategy twice"),
    ([], "strategy is an empty list"),
], ids=["replay+derpp", "agem+replay", "joint+lwf", "cumulative+ewc", "naive+lwf", "twice", "empty"])
def test_combinations_that_make_no_sense_are_refused_with_the_reason(toy_stream_config, strategy, reason):
    with pytest.raises(ConfigError, match=reason):
        validate_config({**toy_stream_config, "strategy": strategy})


def test_a_combination_plans_what_each_part_needs(toy_stream_config):
    config = validate_config({**toy_stream_config, "strategy": ["replay", "lwf"],
                              "strategies": {"replay": {"replay_ratio": 0.25}}})
    planning = planning_for(config.strategy)
    assert planning.needs_teacher and planning.replay_ratio == 0.25 and planning.uses_replay
    plan = build_plan(config, load_stream(config), 1)
    assert plan.teacher_dir is not None and plan.distill_prefixes
    assert [(p.name, p.rows, p.mix) for p in plan.replay_parts] == [("mix", 2, True)]
    derpp_lwf = build_plan(validate_config({**toy_stream_config, "strategy": ["lwf", "derpp"]}),
                           load_stream(config), 1)
    assert [(p.name, p.rows) for p in derpp_lwf.replay_parts] == [("replay_logits", 8), ("replay_ce", 8)]
    assert derpp_lwf.replay_rows_per_batch == 16 and derpp_lwf.logit_rows is not None


class _Recorder:
    """A training side that adds a known term and records what it was handed."""

    def __init__(self, name, term):
        self.name, self.term, self.metrics, self.seen = name, term, {}, []

    def loss(self, model, batch, inner):
        value = inner(model)
        self.seen.append(float(value))
        return value + self.term


def test_losses_nest_innermost_first_and_their_terms_add(toy_stream_config):
    config = validate_config({**toy_stream_config, "strategy": ["ewc", "lwf"]})
    combination = Combination(config)
    assert combination.names == ["lwf", "ewc"]  # LwF scales only the cross-entropy: it sits inside
    inner, outer = _Recorder("lwf", 1.0), _Recorder("ewc", 10.0)
    combination.parts = [inner, outer]
    model = lambda **inputs: type("Out", (), {"loss": torch.tensor(0.5)})  # noqa: E731
    assert float(combination.loss(model, StepBatch({"input_ids": torch.zeros(1)}))) == 11.5
    assert inner.seen == [0.5] and outer.seen == [1.5]


def test_replay_with_lwf_trains_on_mixed_batches_with_views_and_logs_both(make_learner, make_plan, tmp_path):
    learner, stream = make_learner(["replay", "lwf"], max_steps=4)
    assert learner.strategy.names == ["replay", "lwf"]
    learner.train_task(make_plan(learner, stream, 0))
    teacher = learner.save(tmp_path / "after-0")
    plan = make_plan(learner, stream, 1, teacher_dir=str(teacher))
    replayed = pa.table({"source": ["category: red dog"] * 2, "target": ["color"] * 2})
    batch = next(learner.batches(plan, replay=lambda: replayed))
    assert batch.inputs["input_ids"].shape[0] == 8  # 6 new rows and 2 replayed: one draw
    assert len(batch.extras["views"]) == 1 and batch.extras["views"][0]["input_ids"].shape[0] == 6
    logged = []
    stats = learner.train_task(plan, replay=lambda: replayed, on_step=lambda s, n, loss, m: logged.append(m))
    assert math.isfinite(stats["mean_loss"])
    assert logged and all({"lwf_distill", "lwf_ce"} <= set(m) for m in logged)


def test_replay_with_ewc_keeps_the_fisher_in_the_state_under_its_name(make_learner, make_plan, tmp_path):
    learner, stream = make_learner(["replay", {"name": "ewc", "lambda": 10.0, "fisher_examples": 8}], max_steps=3)
    replayed = pa.table({"source": ["category: red dog"] * 2, "target": ["color"] * 2})
    learner.train_task(make_plan(learner, stream, 0))
    logged = []
    learner.train_task(make_plan(learner, stream, 1), replay=lambda: replayed,
                       on_step=lambda s, n, loss, m: logged.append(m))
    assert logged and logged[-1]["ewc_penalty"] > 0
    state = learner.strategy.state_dict()
    assert set(state) == {"replay", "ewc"} and state["ewc"]["fisher"]
    again = Combination(learner.config)
    again.load_state_dict(state)
    assert again.parts[1].fisher.keys() == state["ewc"]["fisher"].keys()


def test_a_state_saved_before_strategies_combined_loads_into_the_one_strategy(toy_stream_config):
    config = validate_config({**toy_stream_config, "strategy": "ewc"})
    combination = Combination(config)
    combination.load_state_dict({"fisher": {"w": torch.ones(2)}, "anchor": {"w": torch.zeros(2)}})
    assert torch.equal(combination.parts[0].fisher["w"], torch.ones(2))


def test_the_per_example_mean_weighs_a_one_token_label_as_a_long_answer():
    """Two examples, token losses [2] and [4, 4, 4]: per example (2 + 4) / 2 = 3; per token
    (2 + 12) / 4 = 3.5. A padded row with no target token counts for nothing."""
    from pipelines.strategies.base import IGNORE_INDEX, example_mean_ce

    vocab = 4
    labels = torch.tensor([[0, IGNORE_INDEX, IGNORE_INDEX], [1, 2, 3], [IGNORE_INDEX] * 3])
    logits = torch.zeros(3, 3, vocab)
    # a token's cross-entropy is log(sum exp) - logit(target): with zeros but a boost of b on one wrong
    # class, it is log(3 + e^b); choose b per token so the losses are 2 and 4

    def loss_of(b):
        return math.log(3 + math.exp(b))

    b2, b4 = math.log(math.exp(2.0) - 3), math.log(math.exp(4.0) - 3)
    for (i, j), b in {(0, 0): b2, (1, 0): b4, (1, 1): b4, (1, 2): b4}.items():
        wrong = (labels[i, j].item() + 1) % vocab
        logits[i, j, wrong] = b
    assert loss_of(b2) == pytest.approx(2.0) and loss_of(b4) == pytest.approx(4.0)
    assert example_mean_ce(logits, labels).item() == pytest.approx(3.0)
    token_mean = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX)
    assert token_mean.item() == pytest.approx(3.5)


def test_strategies_state_how_they_depart_from_their_papers(toy_stream_config):
    from pipelines.strategies import deviations

    def of(strategy, **training):
        return deviations(validate_config({**toy_stream_config, "strategy": strategy,
                                           "training": {**toy_stream_config["training"], **training}}))

    assert "end-of-task logits" in of("derpp")["derpp"][0]
    assert "empirical Fisher" in of("ewc")["ewc"][0]
    assert any("averaged" in text for text in of("lwf")["lwf"])
    assert not any("averaged" in text for text in of({"name": "lwf", "old_heads": "sum"})["lwf"])
    assert of("agem")["agem"] == [] and "projected" in of("agem", grad_accum_steps=2)["agem"][0]
    assert of("naive") == {"naive": []}
