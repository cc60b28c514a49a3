"""Online elastic weight consolidation (Schwarz et al. 2018), diagonal Fisher.

After each task: F <- gamma * F + F_task, where F_task is the empirical Fisher over
``fisher_examples`` of the task's examples (see :func:`empirical_fisher`), and the anchor w* <- the
weights then (one anchor: the latest). loss = inner + lambda / 2 * sum_i F_i (w_i - w*_i)^2. With
gamma = 1 this is the accumulated form Huszar (2018) showed the per-task penalties approximate.
The penalty and its ratio to the loss inside it are logged (``ewc_penalty``,
``ewc_penalty_ratio``). Needs full parameters on every worker (ZeRO <= 2).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ConfigDict, Field

from pipelines.schema import Schema
from pipelines.strategies.base import (
    IGNORE_INDEX,
    Batch,
    Inner,
    Planning,
    Range,
    StepBatch,
    StrategyDef,
    TrainingContext,
    accumulate,
    torch,
)

if TYPE_CHECKING:
    from pipelines.config import RunConfig
    from pipelines.plan import TaskPlan


class EwcStrategyConfig(Schema):
    """Online elastic weight consolidation (Schwarz et al. 2018): after each task, F <- gamma F +
    F_task (diagonal empirical Fisher) and the anchor w* <- the weights then; the penalty is
    lambda / 2 * sum F (w - w*)^2. gamma = 1 keeps every task's Fisher at full weight (Huszar 2018's
    correction of the per-task form)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    name: Literal["ewc"] = "ewc"
    ewc_lambda: float = Field(default=100.0, ge=0, alias="lambda")
    gamma: float = Field(default=1.0, ge=0, le=1)
    fisher_examples: int = Field(default=256, gt=0)


def empirical_fisher(module: torch.nn.Module, batches: Iterator[Batch], num_examples: int) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher: the mean over ``num_examples`` examples of the squared gradient of
    each example's log-likelihood (the sum over its target tokens), one backward pass per example.

    Per example, not per batch: the square of a batch-mean gradient is about ``1 / batch_size`` of
    the mean of the squares (the cross terms of unrelated examples cancel), which would quietly
    scale lambda down by the micro-batch size. Dropout is off while it runs: the Fisher of the
    model as it is.
    """
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in named}
    seen, was_training = 0, module.training
    module.eval()
    try:
        while seen < num_examples:
            batch = next(batches)
            for i in range(min(len(batch["labels"]), num_examples - seen)):
                one = {key: value[i : i + 1] for key, value in batch.items()}
                tokens = (one["labels"] != IGNORE_INDEX).sum()
                nll = module(**one).loss * tokens  # the model's loss is the mean over target tokens
                grads = torch.autograd.grad(nll, [p for _, p in named], allow_unused=True)
                for (n, _), g in zip(named, grads):
                    if g is not None:
                        fisher[n] += g.float().pow(2)
                seen += 1
    finally:
        module.train(was_training)
    return {n: f / seen for n, f in fisher.items()}


class EWC:
    """EWC's training side: the Fisher and anchor, kept across tasks and saved with the state."""

    def __init__(self, config: EwcStrategyConfig, run: RunConfig):
        self.config = config
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}
        self.metrics: dict[str, torch.Tensor] = {}

    def before_task(self, context: TrainingContext, plan: TaskPlan) -> None:
        pass

    def penalty(self, model: torch.nn.Module) -> torch.Tensor:
        module = getattr(model, "module", model)
        total = torch.zeros((), device=next(module.parameters()).device)
        for name, param in module.named_parameters():
            if name in self.fisher:
                total = total + (self.fisher[name] * (param.float() - self.anchor[name]).pow(2)).sum()
        return 0.5 * self.config.ewc_lambda * total

    def loss(self, model: torch.nn.Module, batch: StepBatch, inner: Inner) -> torch.Tensor:
        loss = inner(model)
        if not self.fisher:
            return loss
        penalty = self.penalty(model)
        accumulate(self.metrics, "ewc_penalty", penalty)
        accumulate(self.metrics, "ewc_penalty_ratio", penalty / loss.detach().float().clamp(min=1e-12))
        return loss + penalty

    def after_task(self, context: TrainingContext, plan: TaskPlan) -> None:
        per_rank = math.ceil(self.config.fisher_examples / context.comm.world_size)  # each rank its share
        fisher = empirical_fisher(context.module, context.batches(), per_rank)
        context.comm.all_reduce_mean(list(fisher.values()))
        gamma = self.config.gamma
        for n, value in fisher.items():
            self.fisher[n] = gamma * self.fisher[n] + value if n in self.fisher else value
        self.anchor = {n: p.detach().float().clone() for n, p in context.module.named_parameters() if n in fisher}

    def state_dict(self) -> dict[str, Any]:
        return {"fisher": self.fisher, "anchor": self.anchor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fisher, self.anchor = dict(state.get("fisher", {})), dict(state.get("anchor", {}))


STRATEGY = StrategyDef(
    config=EwcStrategyConfig, planning=lambda config: Planning(), training=EWC, nesting=30, full_parameters=True,
    search={"lambda": Range(1.0, 1e6, log=True), "gamma": Range(0.5, 1.0)},
    deviations=lambda config, run: (
        "empirical Fisher: squared gradients of each example's own target, over shuffled training examples "
        "(Kirkpatrick et al. sample the target from the model's own output distribution)",
        f"online EWC (Schwarz et al. 2018): one Fisher, decayed by gamma={config.gamma}, and one anchor, the "
        "latest weights (not one penalty per task)"),
)
