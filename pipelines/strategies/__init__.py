"""Continual-learning strategies: one file each, holding its config, its planning side and its
training side (see ``base``). A new strategy is a new file here that defines ``STRATEGY``; this
registry finds it, and the config's union, ``strategies:`` settings and ``--strategies`` names
follow.

A run's ``strategy:`` is one strategy or a combination (``[replay, lwf]``): their plans merge (one
data selection, one teacher, every replayed part drawn in one sample per micro-batch) and their
losses nest, innermost first by ``StrategyDef.nesting``, so their terms add. Combinations that make
no sense are refused with the reason (``check_combination``).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any, Union

import pyarrow as pa
from pydantic import Field

from pipelines.strategies.base import (
    Planning,
    StepBatch,
    StrategyDef,
    TrainingContext,
    TrainingStrategy,
    averages_per_example,
    sequence_ce,
)

if TYPE_CHECKING:
    import torch

    from pipelines.config import RunConfig
    from pipelines.plan import TaskPlan


def _discover() -> dict[str, StrategyDef]:
    found = {}
    for module in sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "base"):
        definition = getattr(importlib.import_module(f"{__name__}.{module}"), "STRATEGY", None)
        if definition is None:
            raise ImportError(f"pipelines/strategies/{module}.py defines no STRATEGY: every file here is a strategy")
        if definition.name != module:
            raise ImportError(f"pipelines/strategies/{module}.py defines strategy {definition.name!r}: a strategy's "
                              "file is named as the strategy")
        found[module] = definition
    return found


STRATEGIES: dict[str, StrategyDef] = _discover()
STRATEGY_CONFIGS: dict[str, type] = {name: s.config for name, s in STRATEGIES.items()}
StrategyConfig = Annotated[Union[tuple(STRATEGY_CONFIGS.values())], Field(discriminator="name")]
DEFAULT_STRATEGY = "naive"  # fine-tuning with nothing added: the default, and what frozen-model paradigms run


def unknown(name: str) -> str:
    return f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}"


def check_combination(names: Sequence[str]) -> None:
    """Refuse a combination that makes no sense, saying why.

    Raises:
        ValueError: a name twice, a strategy that combines with nothing, or two that claim the
            same thing (what a task trains on; the replayed rows' use).
    """
    if len(names) < 2:
        return
    if len(set(names)) != len(names):
        raise ValueError(f"strategy {list(names)} names a strategy twice")
    for name in names:
        if STRATEGIES[name].alone:
            raise ValueError(f"strategy {list(names)}: {name} combines with nothing ({STRATEGIES[name].alone})")
    claimed: dict[str, str] = {}
    for name in names:
        for claim in sorted(STRATEGIES[name].claims):
            if claim in claimed:
                what = {"memory": "both use the replayed rows, each in its own way; choose one",
                        "data": "both decide what each task trains on"}.get(claim, f"both claim {claim}")
                raise ValueError(f"strategy {list(names)}: {claimed[claim]} and {name} do not combine: {what}")
            claimed[claim] = name


def parts_of(strategy: Any) -> tuple[Any, ...]:
    """The strategy configs of a run's ``strategy`` (one config, or a combination's list)."""
    return tuple(strategy) if isinstance(strategy, (list, tuple)) else (strategy,)


def combined_name(strategy: Any) -> str:
    """``replay+lwf`` for a combination, the name for one strategy."""
    return "+".join(part.name for part in parts_of(strategy))


def planning_for(strategy: Any) -> Planning:
    """What the scheduler plans for a run's strategy (or combination)."""
    plannings = [STRATEGIES[part.name].planning(part) for part in parts_of(strategy)]
    merged = plannings[0]
    for other in plannings[1:]:
        merged = merged.merge(other)
    return merged


def deviations(run: RunConfig) -> dict[str, list[str]]:
    """How each of the run's strategies differs from its paper, as it is configured (empty: none stated)."""
    return {part.name: list(STRATEGIES[part.name].deviations(part, run)) for part in parts_of(run.strategy)}


def needs_full_parameters(strategy: Any) -> list[str]:
    """The strategies of ``strategy`` that read every parameter on every worker (not under ZeRO-3)."""
    return [part.name for part in parts_of(strategy) if STRATEGIES[part.name].full_parameters]


class Combination:
    """A run's strategies as one training side: losses nested innermost first, every hook called
    on each, metrics merged, state saved per strategy."""

    def __init__(self, run: RunConfig):
        parts = sorted(parts_of(run.strategy), key=lambda part: STRATEGIES[part.name].nesting)
        self.names = [part.name for part in parts]
        self.parts: list[TrainingStrategy] = [STRATEGIES[part.name].training(part, run) for part in parts]
        self.per_example = averages_per_example(run)

    @property
    def metrics(self) -> dict[str, torch.Tensor]:
        return {name: value for part in self.parts for name, value in part.metrics.items()}

    def clear_metrics(self) -> None:
        for part in self.parts:
            part.metrics.clear()

    def before_task(self, context: TrainingContext, plan: TaskPlan) -> None:
        for part in self.parts:
            part.before_task(context, plan)

    def loss(self, model: torch.nn.Module, batch: StepBatch) -> torch.Tensor:
        """The micro-batch's loss: the cross-entropy of its inputs, wrapped by each strategy in turn."""

        def inner(m: torch.nn.Module) -> torch.Tensor:
            return sequence_ce(m, batch.inputs, per_example=self.per_example)

        for part in self.parts:
            inner = _wrapped(part, batch, inner)
        return inner(model)

    def after_task(self, context: TrainingContext, plan: TaskPlan) -> pa.Table | None:
        """Every strategy's after-task work; the columns they add to the stored rows, side by side."""
        tables = [table for part in self.parts if (table := part.after_task(context, plan)) is not None]
        if not tables:
            return None
        columns = {name: table.column(name) for table in tables for name in table.column_names}
        return pa.table(columns)

    def state_dict(self) -> dict[str, Any]:
        return {name: part.state_dict() for name, part in zip(self.names, self.parts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(self.parts) == 1 and state and set(state) != {self.names[0]}:
            state = {self.names[0]: state}  # saved before strategies combined: the one strategy's own state
        for name, part in zip(self.names, self.parts):
            part.load_state_dict(state.get(name, {}))


def _wrapped(part: TrainingStrategy, batch: StepBatch, inner: Any) -> Any:
    return lambda model: part.loss(model, batch, inner)


def build_training_strategy(run: RunConfig) -> Combination:
    """The training side of ``run.strategy``."""
    return Combination(run)
