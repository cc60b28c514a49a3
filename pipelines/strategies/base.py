"""What every strategy file fills in: its planning side (plain data the scheduler reads) and its
training side (a ``TrainingStrategy``, run in every trainer worker).

The training side's hooks get the few things they need — a ``TrainingContext`` around a task, a
``StepBatch`` and the loss of the strategies inside it at each micro-batch — never the learner. A
run's strategies are nested (see ``Combination`` in the package): each one's ``loss`` wraps the loss
of those inside it, the innermost wrapping the plain cross-entropy, so their terms add up.

Torch is imported the first time a training side runs: the scheduler, which only plans, and the
config loader, which builds the strategies' union, never pay for it.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    import pyarrow as pa

    from pipelines.config import RunConfig
    from pipelines.distributed import Collectives
    from pipelines.plan import TaskPlan
    from pipelines.schema import Schema


class _Lazy:
    """A module imported on first attribute access."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)


if TYPE_CHECKING:
    import torch
    import torch.nn.functional as F
else:
    torch = _Lazy("torch")
    F = _Lazy("torch.nn.functional")

IGNORE_INDEX = -100  # label positions that count for nothing (padding), as transformers' losses take them


# ------------------------------------------------------------------------ the planning side
@dataclass(frozen=True)
class ReplayPart:
    """Replayed rows a micro-batch carries: ``rows`` of each draw from the store, either mixed into
    the micro-batch itself (``mix``: in place of as many new rows, or ``on_top`` of them) or handed
    to the strategy as a separate batch under ``name`` (with the rows' stored logits beside the
    labels when ``logits``)."""

    name: str
    rows: int
    mix: bool = False
    logits: bool = False
    on_top: bool = False  # mix: appended to a full micro-batch of the new task (else it takes their place)


@dataclass(frozen=True)
class Planning:
    """What a strategy trains on at each task, as the scheduler sees it.

    ``data``: ``task`` (the task's own examples), ``seen`` (every task so far) or ``all_at_end``
    (nothing until the last task, then every task with the summed step budget).
    """

    data: Literal["task", "seen", "all_at_end"] = "task"
    needs_teacher: bool = False  # the model after the previous task, saved and named in the plan (LwF)
    replay_ratio: float = 0.0  # the share of each micro-batch drawn from the store and mixed in
    replay_parts: tuple[ReplayPart, ...] = ()  # separate replayed batches per micro-batch
    stores_logits: bool = False  # the store's rows carry the model's logits (DER++)

    @property
    def uses_replay(self) -> bool:
        return self.replay_ratio > 0 or any(part.rows for part in self.replay_parts)

    @property
    def trains_only_at_end(self) -> bool:
        """Only the final row of such a run's matrix means anything (earlier rows: the untrained model)."""
        return self.data == "all_at_end"

    def merge(self, other: Planning) -> Planning:
        """Two combined strategies' needs: one data selection, one teacher, every replayed part."""
        return Planning(data=other.data if other.data != "task" else self.data,
                        needs_teacher=self.needs_teacher or other.needs_teacher,
                        replay_ratio=self.replay_ratio or other.replay_ratio,
                        replay_parts=self.replay_parts + other.replay_parts,
                        stores_logits=self.stores_logits or other.stores_logits)


@dataclass(frozen=True)
class Range:
    """A knob's search range for ``forgetless tune``: uniform in [low, high], or log-uniform
    (``log``); whole numbers when ``integer``."""

    low: float
    high: float
    log: bool = False
    integer: bool = False


@dataclass(frozen=True)
class StrategyDef:
    """One strategy, as its file declares it.

    Args:
        config: its config class (``name`` is a literal: the strategy's one spelling).
        planning: its config -> what the scheduler plans for it.
        training: its config and the run's -> its training side.
        nesting: where its loss sits in a combination, innermost first (a strategy that scales the
            cross-entropy sits inside those that add terms; one that projects the whole gradient,
            outermost).
        claims: what it takes for itself: two strategies that claim the same thing do not combine
            (``data``: what a task trains on; ``memory``: the replayed rows' use).
        alone: why it combines with nothing (None: it combines).
        full_parameters: it reads every parameter on every worker (refused under ZeRO-3).
        deviations: its config and the run's -> how it differs from its paper here, each stated
            (recorded in comparison.json beside its results).
        search: its own knobs (config field names, aliases as written in a config) and the ranges
            ``forgetless tune`` searches them in (the learning rate is searched for every strategy).
        sets_replayed_rows: those of its knobs that ``replay.rows_per_batch`` overrides (not searched
            when a comparison fixes the replayed rows).
    """

    config: type[Schema]
    planning: Callable[[Any], Planning]
    training: Callable[[Any, RunConfig], TrainingStrategy]
    nesting: int = 0
    claims: frozenset[str] = frozenset()
    alone: str | None = None
    full_parameters: bool = False
    deviations: Callable[[Any, RunConfig], tuple[str, ...]] = lambda config, run: ()
    search: dict[str, Range] = field(default_factory=dict)
    sets_replayed_rows: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.config.model_fields["name"].default


# ------------------------------------------------------------------------ the training side
Batch = dict[str, "torch.Tensor"]


@dataclass(frozen=True)
class StepBatch:
    """One micro-batch: what the model is called with (``inputs``), and what strategies asked for
    beside it (``extras``: replayed batches by part name, ``views`` under old prefixes)."""

    inputs: Batch
    extras: dict[str, Any] = field(default_factory=dict)


Inner = Callable[["torch.nn.Module"], "torch.Tensor"]  # the loss of the strategies inside, for a model


@dataclass(frozen=True)
class TrainingContext:
    """What a strategy's training side may use around a task."""

    module: torch.nn.Module  # the model itself (full parameters under ZeRO <= 2)
    engine: torch.nn.Module  # the DeepSpeed engine: a collective forward (every rank, ZeRO-3's gathers)
    device: torch.device
    dtype: torch.dtype
    comm: Collectives
    # a fresh iterator over this rank's micro-batches of the task (inputs only), shuffled even when
    # the task trains by class: an estimate over its first batches sees every class
    batches: Callable[[], Iterator[Batch]]
    collate: Callable[[list[str], list[str]], Batch]  # (sources, targets) -> a batch on the device
    eval_batch_size: int
    rank: int


class TrainingStrategy(Protocol):
    """A strategy's training side. ``metrics`` (device tensors, summed over micro-batches) are
    averaged over the logging window and ranks by the learner and logged as ``train/<name>``."""

    metrics: dict[str, torch.Tensor]

    def before_task(self, context: TrainingContext, plan: TaskPlan) -> None: ...

    def loss(self, model: torch.nn.Module, batch: StepBatch, inner: Inner) -> torch.Tensor:
        """This micro-batch's loss: ``inner(model)`` (the loss of the strategies inside this one) with
        this strategy's terms. ``model`` is the engine: call it to run forward."""
        ...

    def after_task(self, context: TrainingContext, plan: TaskPlan) -> pa.Table | None:
        """What it keeps of the task (a Fisher, nothing); a table of columns for the rows the store
        gets after the task, in their order (rank 0; None: nothing to add). Collective."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """State kept across tasks, saved with the training state (empty: none)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class PlainLoss:
    """The training side of a strategy that differs only in what it trains on (its plan): the loss
    of the strategies inside it, unchanged; nothing kept across tasks."""

    def __init__(self, config: Schema, run: RunConfig):
        self.config = config
        self.metrics: dict[str, torch.Tensor] = {}

    def before_task(self, context: TrainingContext, plan: TaskPlan) -> None:
        pass

    def loss(self, model: torch.nn.Module, batch: StepBatch, inner: Inner) -> torch.Tensor:
        return inner(model)

    def after_task(self, context: TrainingContext, plan: TaskPlan) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


_QUIET = contextvars.ContextVar("forgetless_quiet_metrics", default=False)


@contextlib.contextmanager
def quiet_metrics() -> Iterator[None]:
    """Inside it, ``accumulate`` records nothing: a pass that only measures (A-GEM's gradient of the
    loss inside it) must not count its terms a second time."""
    token = _QUIET.set(True)
    try:
        yield
    finally:
        _QUIET.reset(token)


def accumulate(metrics: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    """Add a micro-batch's value to a strategy's window of metrics (on the device: no host sync)."""
    if _QUIET.get():
        return
    value = value.detach().float()
    metrics[name] = metrics[name] + value if name in metrics else value


def example_mean_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged per example: each example's mean over its target tokens, then the
    mean over the examples that have any (padding, ``IGNORE_INDEX``, counts for nothing). A batch's
    token mean instead weighs an example by its target's length: a one-token label counts a tenth
    of a ten-token answer beside it."""
    tokens = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    valid = labels != IGNORE_INDEX
    counts = valid.sum(1)
    means = (tokens * valid).sum(1) / counts.clamp(min=1)
    has = (counts > 0).to(means.dtype)
    return (means * has).sum() / has.sum().clamp(min=1)


def sequence_ce(model: torch.nn.Module, batch: Batch, *, per_example: bool) -> torch.Tensor:
    """The model's cross-entropy on ``batch`` (its ``labels``): averaged per example
    (``example_mean_ce``), or the token mean the model computes itself. A model whose logits are
    one class per example (feature extraction's heads) has one label per example: the two agree."""
    out = model(**batch)
    labels = batch.get("labels")
    if not per_example or labels is None or out.logits.dim() != 3:
        return out.loss
    return example_mean_ce(out.logits, labels)


def averages_per_example(run: RunConfig) -> bool:
    """Whether the run averages its cross-entropy per example (``training.loss_mean``)."""
    return run.training.loss_mean == "per_example"


def load_frozen(directory: str, *, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A saved checkpoint as a frozen teacher: eval mode, no gradients, never stepped."""
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(str(directory)).to(device=device, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model
