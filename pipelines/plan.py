"""The contract between the scheduler and the trainers: plain data, no torch.

The scheduler decides everything about task t once — what to train on, for how many optimizer
steps, how many replayed rows per micro-batch, which teacher, where to save — and hands every
worker the same ``TaskPlan``. A worker executes a plan; it never re-derives one. Plans, eval sets
and the ``StreamStart`` cross process boundaries as they are (dataclasses and Arrow tables).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipelines.config import RunConfig
from pipelines.errors import DataError
from pipelines.strategies import planning_for
from pipelines.strategies.base import Planning, ReplayPart
from pipelines.tasks import Task, TaskStream


@dataclass(frozen=True)
class EvalSet:
    name: str
    metric: str
    sources: list[str]  # prefix applied
    targets: list[str]
    labels: tuple[str, ...] = ()  # evaluation.scoring "likelihood": the label set ranked (empty: generate)


@dataclass(frozen=True)
class TaskPlan:
    """Everything a worker needs for task ``index``; every rank gets the same plan."""

    index: int
    name: str
    examples: pa.Table | None  # columns source (prefix applied), target; None: no training at this task
    num_steps: int  # optimizer steps (0 when examples is None)
    seed: int  # run seed: batch order is seeded by (seed, index, epoch), replay draws by (seed, index, rank)
    replay_rows_per_batch: int = 0  # rows drawn from the replay store per micro-batch: the parts' sum
    teacher_dir: str | None = None  # the model after the previous task, for distillation
    model_dir: str | None = None  # save a plain transformers checkpoint here after the task (None: don't)
    state_dir: str | None = None  # save the training state here (optimizer, RNG, strategy): what resume loads
    order: str = "shuffled"  # "by_class": the examples in target order, every epoch (no shuffling)
    denoised_tasks: tuple[int, ...] = ()  # replayed rows of these tasks are corpus text: corrupt them (pretraining)
    # How each draw of replayed rows is split: appended to the micro-batch, or separate batches the
    # strategies take by name (A-GEM's reference, DER++'s batch with stored logits), in this order
    replay_parts: tuple[ReplayPart, ...] = ()
    prefix: str = ""  # this task's prefix (every source in ``examples`` starts with it, for "task" data)
    distill_prefixes: tuple[str, ...] = ()  # LwF: the earlier tasks' prefixes, the old "heads"
    logit_rows: pa.Table | None = None  # DER++: the rows the store gets after this task; their logits go with them
    eval_tasks: tuple[int, ...] | None = None  # the tasks evaluated after this one (None: every task)
    resume_dir: str | None = None  # a mid-task state of this task to continue from (a restart after a failure)


@dataclass(frozen=True)
class StreamStart:
    """What a worker does before the first plan."""

    eval_sets: list[EvalSet]
    restore_dir: str | None = None  # training state to load first (a resumed or extended run)
    baseline_tasks: tuple[int, ...] = ()  # tasks whose untrained accuracy is still to be measured
    fill_row: int | None = None  # extension: the last finished row, whose missing columns the restored model fills
    fill_tasks: tuple[int, ...] = ()  # ... on these tasks (new ones)


@dataclass(frozen=True)
class RecoveryTask:
    index: int
    name: str
    examples: pa.Table  # its training rows (source with prefix, target; the pretraining task: text only)
    eval_set: EvalSet


@dataclass(frozen=True)
class RecoveryPlan:
    """The recovery probe after the stream: retrain only the output head of the final model on each
    earlier task, then evaluate that task again (the stream's model is left as it is)."""

    checkpoint: str  # the final model (a plain transformers directory)
    tasks: list[RecoveryTask]
    steps: int
    lr: float
    last_decoder_block: bool
    seed: int


# ------------------------------------------------------------------------ what a task trains on
def task_examples(stream: TaskStream, indices: range | list[int]) -> pa.Table | None:
    """(source, target) rows of the given tasks' train splits, prefixes applied; tasks that are
    measured only (the pretraining task) give none. None: no rows at all."""
    tables = [pa.table({"source": stream[i].sources("train"), "target": stream[i].targets("train")})
              for i in indices if stream[i].trainable]
    return pa.concat_tables(tables) if tables else None


def training_examples(planning: Planning, stream: TaskStream, index: int) -> pa.Table | None:
    if not stream[index].trainable:
        return None
    if planning.data == "seen":
        return task_examples(stream, range(index + 1))
    if planning.data == "all_at_end":
        return task_examples(stream, range(len(stream))) if index == len(stream) - 1 else None
    return task_examples(stream, [index])


# ------------------------------------------------------------------------ numbers a plan carries
def num_steps(num_examples: int, *, epochs: float, max_steps: int | None, global_batch: int) -> int:
    """Optimizer steps for one task: ``max_steps`` if set, else ceil(epochs * examples / global batch)."""
    if max_steps:
        return max_steps
    return max(1, math.ceil(epochs * num_examples / global_batch))


def replayed_per_batch(micro_batch_size: int, replay_ratio: float) -> int:
    """Rows of a micro-batch drawn from replay: round(size x ratio), at least 1, leaving 1 new row."""
    if micro_batch_size <= 1 or replay_ratio <= 0:
        return 0
    return min(micro_batch_size - 1, max(1, round(micro_batch_size * replay_ratio)))


def global_batch(config: RunConfig) -> int:
    training = config.training
    return training.micro_batch_size * training.grad_accum_steps * training.num_workers


def _task_steps(config: RunConfig, task: Task, num_examples: int) -> int:
    training = config.training
    return num_steps(num_examples, epochs=task.epochs or training.epochs,
                     max_steps=task.max_steps or (None if task.epochs else training.max_steps),
                     global_batch=global_batch(config))


def planned_steps(config: RunConfig, stream: TaskStream, index: int, planning: Planning,
                  examples: pa.Table | None) -> int:
    if examples is None:
        return 0
    if planning.trains_only_at_end:
        budgets = [t.max_steps or (None if t.epochs else config.training.max_steps) for t in stream if t.trainable]
        if all(budgets):
            return sum(budgets)  # the budget the sequential strategies spend over the stream
        # epoch-based: the union's size already gives the summed budget
        return num_steps(examples.num_rows, epochs=config.training.epochs, max_steps=None,
                         global_batch=global_batch(config))
    return _task_steps(config, stream[index], examples.num_rows)


# ------------------------------------------------------------------------ where things go
def checkpoint_dir(output_dir: str | Path, index: int, name: str) -> Path:
    """Where the model after task ``index`` is saved (the next task's teacher, for distillation)."""
    return Path(output_dir) / "checkpoints" / f"task-{index:02d}-{name}"


def state_dir(output_dir: str | Path, index: int) -> Path:
    """Where the training state after task ``index`` is saved (DeepSpeed checkpoint, RNG, strategy)."""
    return Path(output_dir) / "state" / f"task-{index:02d}"


def mid_task_dir(output_dir: str | Path, index: int, steps_done: int) -> Path:
    """Where the training state ``steps_done`` optimizer steps into task ``index`` is saved
    (``checkpoint.every_n_steps``); removed once a later one, or the task's end, is committed."""
    return state_dir(output_dir, index).with_name(f"task-{index:02d}.step-{steps_done:06d}")


def stores_rows(config: RunConfig, task: Task) -> bool:
    """Whether the replay store gets rows of ``task`` after it: every trained task; the pretraining
    task when ``replay.pretraining_rows`` asks for corpus rows."""
    return task.trainable or config.replay.pretraining_rows > 0


def _store_order(config: RunConfig, stream: TaskStream, index: int) -> np.ndarray:
    """Task ``index``'s candidate rows for the store, in the seeded order a total budget keeps them
    (the first ``share`` of them), and the most it can store."""
    task = stream[index]
    order = np.random.default_rng([config.seed, index]).permutation(len(task.sources("train")))
    return order if task.trainable else order[: config.replay.pretraining_rows]


def _store_capacity(config: RunConfig, stream: TaskStream, index: int) -> int:
    """How many rows task ``index`` can put in the store: ``len(_store_order(...))``, without drawing it."""
    rows = len(stream[index].train)
    return rows if stream[index].trainable else min(rows, config.replay.pretraining_rows)


def balanced_shares(caps: dict[int, int], budget: int) -> dict[int, int]:
    """Split ``budget`` rows over tasks as evenly as their ``caps`` allow (water-filling): the tasks
    in increasing cap, each taking min(cap, what is left // tasks left). The shares sum to at most
    ``budget``; a task capped below its even share leaves the rest to the others; ties go to the
    later task (the newest gets the odd row)."""
    shares, left = {}, budget
    ranked = sorted(caps, key=lambda k: (caps[k], k))
    for position, k in enumerate(ranked):
        shares[k] = min(caps[k], left // (len(ranked) - position))
        left -= shares[k]
    return dict(sorted(shares.items()))


def memory_shares(config: RunConfig, stream: TaskStream, upto: int) -> dict[int, int]:
    """Under ``replay.memory_rows``: the rows of each task the store holds once task ``upto`` added
    its own. Replayed from the first task, so it needs no state (a resumed run gets the same): at
    each task that stores rows, the budget is re-split over the tasks stored so far, an old task
    capped by what it holds (shares only shrink: a row once deleted is gone, and DER++'s stored
    logits could not be made again), the new one by its rows."""
    budget = config.replay.memory_rows
    shares: dict[int, int] = {}
    for index in range(upto + 1):
        if budget is None or not stores_rows(config, stream[index]):
            continue
        shares = balanced_shares({**shares, index: _store_capacity(config, stream, index)}, budget)
    return shares


def _table(task: Task, index: int, chosen: np.ndarray) -> pa.Table:
    sources, targets = task.sources("train"), task.targets("train")
    return pa.table({
        "example_id": [f"{task.name}:{i}" for i in chosen],
        "task_id": pa.array([index] * len(chosen), pa.int32()),
        "task_name": [task.name] * len(chosen),
        "source": [sources[i] for i in chosen],
        "target": [targets[i] for i in chosen],
    })


def rows_to_store(config: RunConfig, stream: TaskStream, index: int) -> pa.Table | None:
    """The rows task ``index`` adds to the replay store after it is trained. Under a total budget
    (``replay.memory_rows``), its share (``memory_shares``), the first of its seeded order;
    otherwise a seeded sample of ``replay.rows_per_task`` of its training rows (all, when unset),
    or ``replay.pretraining_rows`` of the pretraining corpus. None: it adds none."""
    task = stream[index]
    if not stores_rows(config, task):
        return None
    if config.replay.memory_rows is not None:
        share = memory_shares(config, stream, index)[index]
        return _table(task, index, _store_order(config, stream, index)[:share])
    chosen = np.arange(len(task.sources("train")))
    limit = config.replay.rows_per_task if task.trainable else config.replay.pretraining_rows
    if limit and limit < len(chosen):
        chosen = np.sort(np.random.default_rng([config.seed, index]).choice(len(chosen), limit, replace=False))
    return _table(task, index, chosen)


def rows_to_drop(config: RunConfig, stream: TaskStream, index: int) -> list[str]:
    """Under ``replay.memory_rows``: the ids of earlier tasks' rows that leave the store before task
    ``index``'s rows go in (each old task's surplus over its new share: the end of what it kept)."""
    if config.replay.memory_rows is None or not stores_rows(config, stream[index]):
        return []
    before, after = memory_shares(config, stream, index - 1), memory_shares(config, stream, index)
    doomed = []
    for j, held in before.items():
        order = _store_order(config, stream, j)
        doomed += [f"{stream[j].name}:{i}" for i in order[after[j]:held]]
    return doomed


def replay_parts(config: RunConfig, planning: Planning) -> tuple[ReplayPart, ...]:
    """The replayed parts of every micro-batch: the mixed-in share first, then the strategies' own.

    With ``replay.rows_per_batch`` every replay-based strategy replays that many rows per
    micro-batch, split evenly over its parts (the first parts take the odd rows), and replay's
    mixed-in rows come on top of a full micro-batch of the new task, as the strategies' separate
    batches do; otherwise each strategy's own setting, and replay's rows take ``replay_ratio`` of
    the micro-batch."""
    total = config.replay.rows_per_batch
    if total is None:
        mixed = replayed_per_batch(config.training.micro_batch_size, planning.replay_ratio)
        return ((ReplayPart("mix", mixed, mix=True),) if mixed else ()) + planning.replay_parts
    parts = ((ReplayPart("mix", 0, mix=True, on_top=True),) if planning.replay_ratio else ()) + planning.replay_parts
    if not parts:
        return ()
    each, odd = divmod(total, len(parts))
    return tuple(replace(part, rows=each + (k < odd)) for k, part in enumerate(parts))


def build_plan(config: RunConfig, stream: TaskStream, index: int) -> TaskPlan:
    """The plan of task ``index``: the one place where what happens at a task is decided."""
    planning = planning_for(config.strategy)
    task = stream[index]

    examples = training_examples(planning, stream, index) if config.paradigm.takes_steps else None
    last = index == len(stream) - 1
    teacher = None
    if planning.needs_teacher and index:
        teacher = str(checkpoint_dir(config.output_dir, index - 1, stream[index - 1].name))
    saves_model = config.checkpoint.models == "all" or last or planning.needs_teacher
    # LwF's old heads: each distinct prefix of an earlier trained task (one prefix shared by a
    # domain-incremental stream's tasks is one head)
    old_prefixes = tuple(dict.fromkeys(t.prefix for t in stream.tasks[:index] if t.trainable))
    # Replay draws from earlier tasks' rows: none before the first task that put rows in the store.
    replays = examples is not None and any(stores_rows(config, t) for t in stream.tasks[:index])
    parts = replay_parts(config, planning) if replays else ()
    return TaskPlan(
        index=index, name=task.name, examples=examples,
        num_steps=planned_steps(config, stream, index, planning, examples),
        seed=config.seed,
        replay_rows_per_batch=sum(part.rows for part in parts),
        replay_parts=parts,
        prefix=task.prefix,
        distill_prefixes=old_prefixes if planning.needs_teacher and examples is not None else (),
        logit_rows=rows_to_store(config, stream, index) if planning.stores_logits and examples is not None else None,
        teacher_dir=teacher,
        model_dir=str(checkpoint_dir(config.output_dir, index, task.name)) if saves_model else None,
        state_dir=str(state_dir(config.output_dir, index)),
        order=task.order if planning.data == "task" else "shuffled",
        denoised_tasks=tuple(i for i, t in enumerate(stream.tasks[:index]) if not t.trainable and stores_rows(config, t)),
        eval_tasks=evaluated_tasks(config, len(stream), index),
    )


def evaluated_tasks(config: RunConfig, num_tasks: int, index: int) -> tuple[int, ...] | None:
    """The tasks measured after task ``index`` (``evaluation.cells``): needed, the tasks seen so far and
    the next one; all, every task (None)."""
    return None if config.evaluation.cells == "all" else tuple(range(min(index + 2, num_tasks)))


def recovery_plan(config: RunConfig, stream: TaskStream, eval_sets: list[EvalSet], checkpoint: str) -> RecoveryPlan:
    """Every task but the last, with its training rows and eval set (capped by recovery.max_eval_examples)."""
    probe = config.recovery
    tasks = []
    for index, task in enumerate(stream.tasks[:-1]):
        rows = pa.table({"source": task.sources("train"), "target": task.targets("train")})
        eval_set = eval_sets[index]
        if probe.max_eval_examples:
            cap = probe.max_eval_examples
            eval_set = EvalSet(eval_set.name, eval_set.metric, eval_set.sources[:cap], eval_set.targets[:cap],
                               eval_set.labels)
        tasks.append(RecoveryTask(index, task.name, rows, eval_set))
    return RecoveryPlan(checkpoint=checkpoint, tasks=tasks, steps=probe.steps, lr=probe.lr,
                        last_decoder_block=probe.last_decoder_block, seed=config.seed)


def check_stream(config: RunConfig, stream: TaskStream) -> None:
    """Refuse, before any worker starts, a stream some task of which gives a worker no rows.

    Each worker trains on every ``num_workers``-th row of a plan's examples: fewer rows than
    workers would leave a worker with nothing to take a step on.

    Raises:
        DataError: naming every such task and the numbers.
    """
    workers = config.training.num_workers
    planning = planning_for(config.strategy)
    short = []
    for index, task in enumerate(stream):
        examples = training_examples(planning, stream, index)
        if examples is not None and examples.num_rows < workers:
            short.append(f"task {task.name!r} trains on {examples.num_rows} row(s)")
    if short:
        raise DataError(
            f"too few training rows for training.num_workers={workers} (each worker needs at least one): "
            + "; ".join(short) + ". Add data to the task, or lower training.num_workers")


def fingerprint(task: Task) -> str:
    """A digest of what a task is: its prefix, metric and every train and eval example."""
    digest = hashlib.sha256(f"{task.prefix}\0{task.metric}\0".encode())
    for table in (task.train, task.eval):
        for column in ("source", "target"):
            for value in table.column(column).to_pylist():
                digest.update(value.encode("utf-8", "surrogatepass"))
                digest.update(b"\0")
        digest.update(b"\1")
    return digest.hexdigest()[:16]
