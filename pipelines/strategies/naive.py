"""Sequential fine-tuning (SeqFT): each task in turn, nothing against forgetting — the lower bound
the other strategies are measured against."""

from __future__ import annotations

from typing import Literal

from pipelines.schema import Schema
from pipelines.strategies.base import Planning, PlainLoss, StrategyDef


class NaiveStrategyConfig(Schema):
    """Sequential fine-tuning: train on each task in turn, nothing against forgetting."""

    name: Literal["naive"] = "naive"


STRATEGY = StrategyDef(
    config=NaiveStrategyConfig, planning=lambda config: Planning(), training=PlainLoss,
    alone="naive is fine-tuning with nothing added; name the strategies to combine without it",
)
