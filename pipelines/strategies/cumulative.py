"""Cumulative training: at each task, train on every task seen so far (all of their rows) — replay
with an unbounded memory."""

from __future__ import annotations

from typing import Literal

from pipelines.schema import Schema
from pipelines.strategies.base import Planning, PlainLoss, StrategyDef


class CumulativeStrategyConfig(Schema):
    """At each task, train on all data seen so far."""

    name: Literal["cumulative"] = "cumulative"


STRATEGY = StrategyDef(
    config=CumulativeStrategyConfig, planning=lambda config: Planning(data="seen"), training=PlainLoss,
    claims=frozenset({"data"}),
    alone="cumulative already trains on every earlier task's rows: nothing is left to protect them from",
)
