"""Dark Experience Replay++ (Buzzega et al. 2020).

Each row the replay store gets after a task carries the top ``top_k`` logits the model gave each
of its target tokens then (teacher-forced on its target), stored as Arrow in the store (this file's
``after_task``). Training loss = inner + alpha * MSE(current logits at the stored ids, stored
values) on one replayed batch + beta * CE on another; both batches come from one draw of the store
per micro-batch. Buzzega et al. record the logits while a row is being trained on; rows enter our
store at the task boundary, so theirs are the logits at the end of the row's task. Top-k instead
of the whole vocabulary keeps a row's logits to ``tokens x k x 8`` bytes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from pipelines.schema import Schema
from pipelines.strategies.base import (
    IGNORE_INDEX,
    Inner,
    Planning,
    Range,
    ReplayPart,
    StepBatch,
    StrategyDef,
    TrainingContext,
    accumulate,
    averages_per_example,
    sequence_ce,
    torch,
)

if TYPE_CHECKING:
    import pyarrow as pa

    from pipelines.config import RunConfig
    from pipelines.plan import TaskPlan

WITH_LOGITS, REPLAYED = "replay_logits", "replay_ce"  # the two replayed batches a micro-batch carries


class DerppStrategyConfig(Schema):
    """DER++ (Buzzega et al. 2020): replayed rows carry the logits the model gave them when they
    were stored (the top ``top_k`` of each target token); loss = CE on the new batch + alpha * MSE
    of the current logits to the stored ones (at the stored ids) on one replayed batch + beta * CE
    on another."""

    name: Literal["derpp"] = "derpp"
    alpha: float = Field(default=0.3, ge=0)
    beta: float = Field(default=0.5, ge=0)
    replay_rows: int = Field(default=8, gt=0)  # rows of each of the two replayed batches per micro-batch
    top_k: int = Field(default=32, gt=0, le=4096)  # logits stored per target token


def stored_logits_mse(logits: torch.Tensor, ids: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between the current logits, taken at the stored vocabulary ids, and
    the stored values: over the stored (token, k) entries of the rows that have them."""
    current = logits.float().gather(-1, ids)
    squared = (current - values).pow(2).mean(-1)  # per token, over its k stored entries
    mask = valid.to(squared.dtype)
    return (squared * mask).sum() / mask.sum().clamp(min=1)


def top_logits(context: TrainingContext, rows: pa.Table, k: int) -> pa.Table | None:
    """The top-``k`` logits of each target token of ``rows``, teacher-forced on their targets, as a
    one-column table (``logits``, the replay store's ``LOGITS_TYPE``) in the rows' order. Collective:
    every rank runs every forward pass (ZeRO-3 needs them in lockstep); rank 0 returns the table,
    the others None."""
    import pyarrow as pa

    from storage.replay import LOGITS_TYPE

    sources, targets = rows.column("source").to_pylist(), rows.column("target").to_pylist()
    size, stored = context.eval_batch_size, []
    context.engine.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(sources), size):
                batch = context.collate(sources[start : start + size], targets[start : start + size])
                logits = context.engine(**batch).logits.float()
                top = logits.topk(min(k, logits.shape[-1]), dim=-1)
                ids, values = top.indices.to(torch.int32).cpu(), top.values.cpu()
                lengths = (batch["labels"] != IGNORE_INDEX).sum(1).tolist()
                for i, tokens in enumerate(lengths):
                    stored.append({"tokens": tokens, "k": ids.shape[-1], "ids": ids[i, :tokens].flatten().tolist(),
                                   "values": values[i, :tokens].flatten().numpy()})
    finally:
        context.engine.train()
    if context.rank != 0:
        return None
    values = pa.array([row["values"] for row in stored], pa.list_(pa.float32()))  # float32, bit for bit
    return pa.table({"logits": pa.StructArray.from_arrays(
        [pa.array([r["tokens"] for r in stored], pa.int32()), pa.array([r["k"] for r in stored], pa.int32()),
         pa.array([r["ids"] for r in stored], pa.list_(pa.int32())), values],
        fields=list(LOGITS_TYPE))})


class DERpp:
    """DER++'s training side: no state (the rows and their logits are in the replay store)."""

    def __init__(self, config: DerppStrategyConfig, run: RunConfig):
        self.config = config
        self.per_example = averages_per_example(run)
        self.metrics: dict[str, torch.Tensor] = {}

    def before_task(self, context: TrainingContext, plan: TaskPlan) -> None:
        pass

    def loss(self, model: torch.nn.Module, batch: StepBatch, inner: Inner) -> torch.Tensor:
        dark, replayed = batch.extras.get(WITH_LOGITS), batch.extras.get(REPLAYED)
        loss = inner(model)
        if dark is not None and self.config.alpha:
            out = model(input_ids=dark["input_ids"], attention_mask=dark["attention_mask"], labels=dark["labels"])
            mse = stored_logits_mse(out.logits, dark["logit_ids"], dark["logit_values"], dark["logit_valid"])
            accumulate(self.metrics, "derpp_mse", mse)
            loss = loss + self.config.alpha * mse
        if replayed is not None and self.config.beta:
            ce = sequence_ce(model, replayed, per_example=self.per_example)
            accumulate(self.metrics, "derpp_replay_ce", ce)
            loss = loss + self.config.beta * ce
        return loss

    def after_task(self, context: TrainingContext, plan: TaskPlan) -> pa.Table | None:
        """The logits of the rows the store gets after this task (``plan.logit_rows``)."""
        return None if plan.logit_rows is None else top_logits(context, plan.logit_rows, self.config.top_k)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


STRATEGY = StrategyDef(
    config=DerppStrategyConfig,
    planning=lambda config: Planning(replay_parts=(ReplayPart(WITH_LOGITS, config.replay_rows, logits=True),
                                                   ReplayPart(REPLAYED, config.replay_rows)),
                                     stores_logits=True),
    training=DERpp, nesting=20, claims=frozenset({"memory"}),
    search={"alpha": Range(0.05, 1.0), "beta": Range(0.05, 1.0)}, sets_replayed_rows=("replay_rows",),
    deviations=lambda config, run: (
        "DER++ with end-of-task logits: a row's stored logits are the model's at the end of the row's task "
        "(Buzzega et al. store them while the row is trained on; rows enter our store at the task boundary)",
        f"the top {config.top_k} logits of each target token are stored and matched, not the whole vocabulary"),
)
