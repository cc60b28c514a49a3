"""EWC: the empirical Fisher by hand, the penalty at and away from its anchor, online decay."""

from types import SimpleNamespace

import pytest
import torch

from pipelines.strategies.ewc import EWC, empirical_fisher


def test_ewc_penalty_zero_at_the_anchor_positive_away(make_learner, make_plan):
    learner, stream = make_learner({"name": "ewc", "lambda": 10.0, "fisher_examples": 12}, max_steps=5)
    ewc: EWC = learner.strategy.parts[0]
    learner.train_task(make_plan(learner, stream, 0))  # after_task estimates the Fisher
    assert ewc.fisher and all(f.min() >= 0 for f in ewc.fisher.values())
    assert sum(f.sum().item() for f in ewc.fisher.values()) > 0
    assert ewc.penalty(learner.model).item() == pytest.approx(0.0, abs=1e-12)
    with torch.no_grad():
        for p in learner.model.parameters():
            p.add_(0.01)
    assert ewc.penalty(learner.model).item() > 0
    fisher_after_one = {k: v.clone() for k, v in ewc.fisher.items()}
    learner.train_task(make_plan(learner, stream, 1))
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


def test_online_ewc_decays_the_old_fisher_by_gamma_and_logs_the_penalty(make_learner, make_plan):
    learner, stream = make_learner({"name": "ewc", "lambda": 10.0, "gamma": 0.5, "fisher_examples": 8}, max_steps=4)
    ewc: EWC = learner.strategy.parts[0]
    learner.train_task(make_plan(learner, stream, 0))
    first = {k: v.clone() for k, v in ewc.fisher.items()}
    logged = []
    plan = make_plan(learner, stream, 1)
    learner.train_task(plan, on_step=lambda s, n, loss, metrics: logged.append(metrics))
    second = empirical_fisher(learner.model, learner.context(plan).batches(), 8)
    for k in first:
        torch.testing.assert_close(ewc.fisher[k], 0.5 * first[k] + second[k])
    assert logged and all(m["ewc_penalty"] >= 0 and "ewc_penalty_ratio" in m for m in logged)
    assert logged[-1]["ewc_penalty"] > 0  # the weights moved away from the anchor


def test_what_a_strategy_estimates_from_is_shuffled_even_when_the_task_trains_by_class(make_learner, make_plan):
    """A task fed by class gives its first micro-batches one class; the context's batches (EWC's
    Fisher reads its first fisher_examples from them) are shuffled, so they see several."""
    learner, stream = make_learner({"name": "ewc", "fisher_examples": 8})
    try:
        plan = make_plan(learner, stream, 0, order="by_class")
        trained = next(learner.batches(plan, extras=False)).inputs["labels"]
        estimated = next(learner.context(plan).batches())["labels"]
        assert len({tuple(row.tolist()) for row in trained}) == 1  # one class: the task's order
        assert len({tuple(row.tolist()) for row in estimated}) > 1
    finally:
        learner.close()
