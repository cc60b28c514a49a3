"""Joint training: one training on every task's data at once, at the end of the stream — the
multitask upper bound. Only the final row of its matrix means anything; it gets the summed step
budget of the sequential strategies (``pipelines.plan.planned_steps``)."""

from __future__ import annotations

from typing import Literal

from pipelines.schema import Schema
from pipelines.strategies.base import Planning, PlainLoss, StrategyDef


class JointStrategyConfig(Schema):
    """One training on every task's data at once (the multitask upper bound). Only the final row
    of its matrix is meaningful: earlier rows are the untrained model."""

    name: Literal["joint"] = "joint"


STRATEGY = StrategyDef(
    config=JointStrategyConfig, planning=lambda config: Planning(data="all_at_end"), training=PlainLoss,
    claims=frozenset({"data"}),
    alone="joint trains once, on every task's data: there is no earlier model to protect",
)
