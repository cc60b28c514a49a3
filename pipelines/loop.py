"""One trainer worker's whole stream, as a plain function over a ``Learner`` and a coordinator.

The coordinator is the scheduler: in a run, the Ray actor behind a thin proxy; in a test, the
same class as a plain object in the same process. The loop asks it how to start and for plan after
plan, executes each (train, evaluate, save) and reports back. It decides nothing itself.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pipelines.errors import ForgetlessError
from pipelines.plan import RecoveryPlan, StreamStart, TaskPlan, mid_task_dir
from storage import files

if TYPE_CHECKING:  # the learner's imports (torch, transformers, DeepSpeed) are its own
    from pipelines.learner import Learner


class Coordinator(Protocol):
    """What the loop needs of the scheduler."""

    def start(self) -> StreamStart: ...

    def next_task(self, rank: int) -> TaskPlan | None: ...

    def set_phase(self, phase: str) -> None: ...

    def log_step(self, task_index: int, step: int, num_steps: int, loss: float, global_step: int,
                 metrics: dict[str, float] | None = None) -> None: ...

    def record_baseline(self, accuracies: dict[str, float], examples: dict[str, list[float]] | None = None) -> None: ...

    def record_fill(self, row: int, accuracies: dict[str, float]) -> None: ...

    def record_eval(self, task_index: int, accuracies: dict[str, float], *, train_stats: dict[str, Any],
                    checkpoint: str | None, stored_columns: Any = None,
                    examples: dict[str, list[float]] | None = None) -> Any: ...

    def recovery_plan(self) -> RecoveryPlan | None: ...

    def record_recovery(self, after: dict[str, float]) -> None: ...

    def record_checkpoint(self, task_index: int, steps_done: int, global_step: int, directory: str) -> None: ...

    def fail(self, reason: str, *, fatal: bool = False) -> None: ...


class ReplayFeed(Protocol):
    """Replayed rows for one task: ``next_batch`` per micro-batch, ``close`` at the task's end."""

    def next_batch(self): ...

    def close(self) -> None: ...


# (plan, rank) -> the replay feed for that plan, when it replays
ReplayFactory = Callable[[TaskPlan, int], ReplayFeed]


def format_exception(exc: BaseException) -> str:
    """One line for the user, with the innermost frame for whoever debugs it."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def run_stream(learner: Learner, coordinator: Coordinator, *, replay: ReplayFactory | None = None) -> None:
    """Baseline (or restore), then train / evaluate / save per plan until the stream ends.

    Any error is reported to the coordinator (the first report wins), naming this worker, then
    raised.
    """
    rank, leader = learner.rank, learner.rank == 0
    try:
        start = coordinator.start()
        eval_sets = start.eval_sets
        if start.baseline_tasks:
            if leader:
                coordinator.set_phase("baseline")
            baseline = learner.evaluate([eval_sets[i] for i in start.baseline_tasks])
            if leader:
                coordinator.record_baseline(baseline, learner.example_scores)
        if start.restore_dir:
            learner.load_state(start.restore_dir)
        if start.fill_row is not None:  # an extended stream: the restored model on the new tasks
            accuracies = learner.evaluate([eval_sets[i] for i in start.fill_tasks])
            if leader:
                coordinator.record_fill(start.fill_row, accuracies)
        while (plan := coordinator.next_task(rank)) is not None:
            feed = replay(plan, rank) if replay is not None and plan.replay_rows_per_batch else None

            def on_step(step: int, total: int, loss: float, metrics: dict[str, float],
                        index: int = plan.index) -> None:
                if leader:
                    coordinator.log_step(index, step, total, loss, learner.global_step, metrics)

            def on_checkpoint(steps_done: int, progress: dict[str, float], index: int = plan.index) -> None:
                directory = learner.save_state(mid_task_dir(learner.config.output_dir, index, steps_done), progress)
                if leader:  # every rank has saved: the scheduler may name it
                    coordinator.record_checkpoint(index, steps_done, learner.global_step, str(directory))

            try:
                stats = learner.train_task(plan, on_step=on_step, replay=feed.next_batch if feed else None,
                                           on_checkpoint=on_checkpoint if plan.state_dir else None)
            finally:
                if feed is not None:
                    feed.close()
            stored_columns = learner.stored_columns()  # what the strategies keep with this task's replay rows
            started = time.perf_counter()
            measured = eval_sets if plan.eval_tasks is None else [eval_sets[i] for i in plan.eval_tasks]
            accuracies = learner.evaluate(measured)  # every rank: a collective
            stats["eval_seconds"] = time.perf_counter() - started
            started = time.perf_counter()
            if plan.model_dir:
                learner.save(plan.model_dir)
            if plan.state_dir:
                learner.save_state(plan.state_dir)
            stats["save_seconds"] = time.perf_counter() - started
            if leader:
                coordinator.record_eval(plan.index, accuracies, train_stats=stats, checkpoint=plan.model_dir,
                                        stored_columns=stored_columns, examples=learner.example_scores)
            # No rank asks for the next plan before this task is committed (its replay rows stored).
            learner.comm.barrier()
        # The recovery probe runs on rank 0 alone, from the saved final model: no collective, so the
        # other ranks are done (and no rank waits on one that failed).
        probe = coordinator.recovery_plan() if leader else None
        if probe is not None:
            coordinator.record_recovery(learner.recovery_probe(probe))
    except Exception as exc:
        try:
            coordinator.fail(f"worker {rank} of {learner.world_size}: {format_exception(exc)}", fatal=is_fatal(exc))
        except Exception:  # noqa: BLE001 - the scheduler may be gone too; the original error matters
            pass
        raise


def is_fatal(exc: BaseException) -> bool:
    """Whether an error would come back after a restart: one the run's own input or numbers raise
    (bad data, a non-finite loss, a config the model cannot take), or a full disk. A lost peer, a
    broken collective, a killed process or an out-of-memory device are not: a restarted group may
    get past them."""
    return isinstance(exc, (ForgetlessError, ValueError, TypeError, KeyError)) or files.is_disk_full(exc)

