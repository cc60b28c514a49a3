"""What a resumed run keeps of the attempt before it: a pure function of the previous report and
the stream it resumes with.

A task's column is kept when its data is the same (its fingerprint matches); the rows finished
before are kept as they were written; the columns a finished row lacks (new tasks, or tasks whose
data changed) are the ones the restored model fills before training goes on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.errors import ConfigError
from pipelines.metrics import ForgettingMatrix
from pipelines.report import MidTaskPoint, Restart, Resumption, RunReport, TaskStats


# Settings a resume may change without making a mid-task state another run's
_HARMLESS = ("training.max_failures", "training.log_every_n_steps", "training.use_gpu", "training.cpus_per_worker",
             "stream.cache_dir")


@dataclass
class CarriedOver:
    finished: int  # rows committed by the earlier attempts
    matrix: ForgettingMatrix  # their rows, in the new stream's columns; the rest NaN
    history: list[dict]  # metrics after each finished task
    train_stats: dict[str, TaskStats]
    checkpoints: dict[str, str]
    recovery: dict[str, dict[str, float | None]]  # the recovery probe's scores, if the stream was through
    training_state: str | None  # the state to load (None: none finished)
    fill_tasks: tuple[int, ...]  # columns the last finished row lacks: measured before training goes on
    resumes: list[Resumption]  # every resumption, this one last
    mid_task: MidTaskPoint | None  # a checkpoint inside the next task, still valid for this resume
    restarts: list[Restart]  # the worker group's restarts in the earlier attempts


def refuse_extending_dropped(previous: RunReport, tasks: list[str]) -> None:
    """A run whose files went once its stream was through (``checkpoint.after_stream``) has no
    state for a new task to train from: resuming it with another stream is refused, saying why.

    Raises:
        ConfigError: ``tasks`` is not the finished run's stream.
    """
    if not previous.resume.dropped or tasks == previous.tasks:
        return
    new = [name for name in tasks if name not in previous.tasks]
    what = "training state" + (" and models" if previous.resume.dropped == "report" else "")
    raise ConfigError(
        f"this run cannot be extended{' with ' + ', '.join(map(repr, new)) if new else ''}: its {what} went "
        f"once its stream was through (checkpoint.after_stream={previous.resume.dropped}), and a new task trains "
        "from them. Start the longer stream as a new run (another output_dir), or rerun this one with "
        "overwrite=true and checkpoint.after_stream=keep")


def carry_over(previous: RunReport, *, tasks: list[str], fingerprints: dict[str, str], untrained: tuple[int, ...],
               scored_by: list[str], changes: list[str] | tuple[str, ...], now: float) -> CarriedOver:
    """Keep the previous attempt's finished rows; find the columns still to be measured.

    Args:
        previous: the report of the attempt being resumed.
        tasks, fingerprints, untrained, scored_by: the new stream's task names, data digests, tasks
            that are measured only, and metrics.
        changes: the config changes this resumption brings (``key: old -> new``).
        now: when it resumes (unix time).
    """
    refuse_extending_dropped(previous, tasks)
    kept = {name: j for j, name in enumerate(previous.tasks)
            if previous.resume.data_fingerprints.get(name) == fingerprints.get(name)}
    finished = previous.finished_tasks
    acc = np.full((len(tasks), len(tasks)), np.nan)
    baseline = np.full(len(tasks), np.nan)
    for j, name in enumerate(tasks):
        if name in kept:
            old = kept[name]
            acc[:finished, j] = [np.nan if previous.acc_matrix[t][old] is None else previous.acc_matrix[t][old]
                                 for t in range(finished)]
            baseline[j] = np.nan if previous.baseline[old] is None else previous.baseline[old]
    done = tasks[:finished]
    mid = previous.resume.mid_task
    # A mid-task state is continued only into the same task, with the same data and the same
    # training settings (a changed lr or step count would make its remaining steps another run's).
    mid_ok = (mid is not None and mid.task_index == finished and mid.task_index < len(tasks)
              and tasks[mid.task_index] in kept and previous.tasks[mid.task_index] == tasks[mid.task_index]
              and not any(change.startswith(("training.", "stream.")) and not change.startswith(_HARMLESS)
                          for change in changes))
    return CarriedOver(
        finished=finished,
        matrix=ForgettingMatrix(tasks, acc=acc, baseline=baseline, untrained=untrained, scored_by=scored_by),
        history=[h for h in previous.metrics_per_task if h["task_index"] < finished],
        train_stats={k: v for k, v in previous.train.items() if k in done},
        checkpoints={k: v for k, v in previous.checkpoints.items() if k in done},
        recovery=dict(previous.recovery) if finished == len(tasks) else {},
        training_state=previous.resume.training_state if finished else None,
        fill_tasks=tuple(j for j in range(len(tasks)) if np.isnan(acc[finished - 1, j])) if finished else (),
        resumes=[*previous.resumes, Resumption(at=now, finished_tasks=finished, previous_status=previous.status,
                                               new_tasks=[n for n in tasks if n not in kept], changed=list(changes))],
        mid_task=mid if mid_ok else None,
        restarts=list(previous.restarts),
    )
