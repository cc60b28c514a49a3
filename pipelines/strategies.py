"""Continual-learning strategies: what a task trains on, and the loss it trains with.

A strategy is split where the processes are: ``training_examples`` runs in the scheduler (it sees
the whole stream, returns plain data), ``loss`` runs in every trainer worker.
"""

from __future__ import annotations

from typing import Protocol

import pyarrow as pa
import torch

from pipelines.config import NaiveStrategyConfig, Schema
from pipelines.tasks import TaskStream


class Strategy(Protocol):
    name: str

    def training_examples(self, stream: TaskStream, task_index: int) -> pa.Table:
        """(source, target) rows to train on while learning task ``task_index``, prefixes applied."""
        ...

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The scalar training loss of one micro-batch."""
        ...


def task_examples(stream: TaskStream, task_index: int) -> pa.Table:
    task = stream[task_index]
    return pa.table({"source": task.sources("train"), "target": task.targets("train")})


class Naive:
    """Sequential fine-tuning: each task's own data, plain cross-entropy. Forgets; the lower bound."""

    name = "naive"

    def __init__(self, config: NaiveStrategyConfig):
        self.config = config

    def training_examples(self, stream: TaskStream, task_index: int) -> pa.Table:
        return task_examples(stream, task_index)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss


STRATEGIES: dict[str, type] = {"naive": Naive}


def build_strategy(config: Schema) -> Strategy:
    name = getattr(config, "name", None)
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}")
    return STRATEGIES[name](config)
