"""A-GEM: the step never raises the memory's loss to first order; the reference batch apart."""

import dataclasses
import math
from types import SimpleNamespace

import pyarrow as pa
import pytest
import torch

from pipelines.strategies.agem import AGEM, AgemStrategyConfig, agem_coefficient
from pipelines.strategies.base import StepBatch


class _Linear(torch.nn.Module):
    """loss = mean (w . x - y)^2 over the rows of a batch, in the model(**batch).loss form."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))

    def forward(self, input_ids, labels, attention_mask=None):
        return SimpleNamespace(loss=(input_ids.float() @ self.w - labels.float()).pow(2).mean())


def _agem_step(new, reference):
    run = SimpleNamespace(training=SimpleNamespace(loss_mean="per_token"))  # the model computes its own loss
    model, agem = _Linear(), AGEM(AgemStrategyConfig(), run)
    grad = torch.autograd.grad(model(**new).loss, [model.w])[0]
    ref = torch.autograd.grad(model(**reference).loss, [model.w])[0]
    agem.loss(model, StepBatch(new, {"reference": reference}), lambda m: m(**new).loss).backward()
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


def test_agem_batches_keep_the_whole_micro_batch_new_and_hand_the_replayed_rows_apart(make_learner, make_plan):
    learner, stream = make_learner({"name": "agem", "reference_rows": 3})
    replayed = pa.table({"source": ["category: red dog"] * 3, "target": ["color"] * 3})
    plan = make_plan(learner, stream, 1)
    assert [(p.name, p.mix) for p in plan.replay_parts] == [("reference", False)] and plan.replay_rows_per_batch == 3
    batch = next(learner.batches(plan, replay=lambda: replayed))
    assert batch.inputs["input_ids"].shape[0] == 8 and batch.extras["reference"]["input_ids"].shape[0] == 3
    stats = learner.train_task(dataclasses.replace(plan, num_steps=3), replay=lambda: replayed)
    assert stats["steps"] == 3 and math.isfinite(stats["mean_loss"])
