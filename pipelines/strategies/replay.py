"""Experience replay: rows of earlier tasks, sampled from the replay store, mixed into every
micro-batch of a new task (the share ``replay_ratio``). Everything is in the plan: the worker's
loss is the cross-entropy of the mixed batch."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipelines.schema import Schema
from pipelines.strategies.base import (
    PlainLoss,
    Planning,
    Range,
    StrategyDef,
)


class ReplayStrategyConfig(Schema):
    """Mix examples of earlier tasks, sampled from the replay store, into each new task's batches."""

    name: Literal["replay"] = "replay"
    replay_ratio: float = Field(default=0.3, gt=0, lt=1)  # share of each micro-batch drawn from replay


STRATEGY = StrategyDef(
    config=ReplayStrategyConfig, planning=lambda config: Planning(replay_ratio=config.replay_ratio),
    training=PlainLoss, claims=frozenset({"memory"}),
    search={"replay_ratio": Range(0.1, 0.5)}, sets_replayed_rows=("replay_ratio",),
)
