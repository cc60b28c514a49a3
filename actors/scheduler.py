"""The scheduler: owns the stream order, the accuracy matrix, the run's commit record and its only
MLflow writer.

``Scheduler`` is a plain class (unit-tested with no cluster, and driven by ``pipelines.loop`` in
one process); ``SchedulerActor`` is the same class as a Ray actor. Trainer workers pull task plans
from it and push results back; the driver polls ``progress`` for its progress bars.

A task is finished when its row is committed, in this order: the matrix file, the replay store
(the task's rows inserted, then a checkpoint of every shard), then ``report.json`` — the commit
record a resumed run starts from — and only then MLflow, which never holds up the run.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import ray
import yaml

from actors.replay import ReplayStore
from pipelines.config import RunConfig, experiment_dict, flatten
from pipelines.metrics import ForgettingMatrix, final_only, what_fwt_measures
from pipelines.paradigms import eval_sets as build_eval_sets
from pipelines.plan import (
    EvalSet,
    RecoveryPlan,
    StreamStart,
    TaskPlan,
    build_plan,
    checkpoint_dir,
    fingerprint,
    planning_for,
    recovery_plan,
    rows_to_drop,
    rows_to_store,
    state_dir,
)
from pipelines.report import (
    MidTaskPoint,
    MlflowRef,
    ModelInit,
    ReplaySummary,
    Restart,
    ResumePoint,
    Resumption,
    RunReport,
    TaskStats,
)
from pipelines.resume import carry_over
from pipelines.rundir import REPORT_FILES, OutputDir, contained_report
from pipelines.tasks import TaskStream
from storage import checksums, files
from storage.files import write_atomic

# MLflow (actors.tracking) and matplotlib (pipelines.plots) are imported where they are used, not
# here: Ray loads an actor's class, and so imports its module, in every process that receives a
# handle to it. The trainer workers and the run queue hold the scheduler's handle and log nothing
# themselves; at the top, each would pay ~1.5 s of CPU for libraries it never calls.
if TYPE_CHECKING:
    from actors.tracking import MlflowSink

START_TAG = "start"  # the replay store's checkpoint before any task: empty


def replay_tag(index: int) -> str:
    return f"task-{index:02d}"


class HeatmapWriter:
    """Draws acc_heatmap.png off the commit path: a task's commit (acc_matrix.json, report.json)
    returns without waiting for matplotlib (~0.3 s to import it, ~0.1 s a drawing on this machine,
    more as the stream grows). ``submit`` keeps the newest matrix; ``start`` draws it, in a thread,
    one drawing at a time; ``wait`` starts and returns once the last one is on disk.

    The scheduler starts a drawing once the next task's plan is out: a drawing under way in its
    process held back the workers' calls between two tasks (a 3-task tiny run: 0.33-0.36 s from
    one task's training to the next one's less evaluation, 0.09-0.10 s with no drawing)."""

    def __init__(self, path: Path, title: str):
        self.path, self.title = path, title
        self._lock = threading.Lock()
        self._pending: ForgettingMatrix | None = None
        self._started = False  # the pending matrix may be drawn
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def submit(self, matrix: ForgettingMatrix) -> None:
        with self._lock:
            self._pending, self._started = copy.deepcopy(matrix), False

    def start(self) -> None:
        with self._lock:
            self._started = True
            if self._pending is not None and self._thread is None:
                self._thread = threading.Thread(target=self._draw, name="acc-heatmap", daemon=True)
                self._thread.start()

    def _draw(self) -> None:
        while True:
            with self._lock:
                if self._pending is None or not self._started:  # a drawing under way does not take a newer
                    self._thread = None                         # matrix before its start
                    return
                matrix, self._pending = self._pending, None
            try:
                from pipelines.plots import plot_heatmap

                plot_heatmap(matrix, self.path, title=self.title)
            except Exception as exc:  # noqa: BLE001 - a picture must not fail the run; finish() reports it
                self.error = exc

    def wait(self) -> None:
        self.start()
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join()


class Scheduler:
    """Feeds the task stream in order and records what the trainers report.

    Args:
        config: the run's config (paths resolved).
        stream: every task of the run, loaded.
        previous: the report of the run being resumed (None: a new run). Its finished rows are
            kept; tasks that are new (or not finished and changed) get their columns measured.
        sink: where MLflow records go (None: the configured tracking store).
        changes: config changes a resume brought (``key: old -> new``), recorded with it.
    """

    def __init__(self, config: RunConfig, stream: TaskStream, *, previous: RunReport | None = None,
                 sink: MlflowSink | None = None, changes: list[str] | tuple[str, ...] = (),
                 init: ModelInit | None = None, ceilings: dict[str, float] | None = None):
        from actors.tracking import CLIENT_ENV, BufferedSink

        for key, value in CLIENT_ENV.items():
            os.environ.setdefault(key, value)
        # Ray restarted this actor after its process died (``max_restarts``): it is rebuilt from the
        # run's commit record, as a resume would be, and the death is recorded as a restart.
        self._rebuilt = _reconstructed()
        if self._rebuilt:
            previous = contained_report(RunReport.read(OutputDir(config.output_dir).report), config.output_dir)
            changes = ()
        self.config = config
        self.stream = stream
        self.planning = planning_for(config.strategy)
        self.output = OutputDir(config.output_dir, replay_dir=config.replay.directory)
        self.output_dir = self.output.path
        self.fingerprints = {t.name: fingerprint(t) for t in stream}
        self.untrained = tuple(i for i, t in enumerate(stream) if not t.trainable)
        self.matrix = ForgettingMatrix(stream.names, untrained=self.untrained, scored_by=[t.metric for t in stream])
        self.finished = 0  # tasks whose row is committed
        self._history: list[dict[str, Any]] = []
        self._train_stats: dict[str, TaskStats] = {}
        self._checkpoints: dict[str, str] = {}
        self._resumes: list[Resumption] = []
        self._fill_tasks: tuple[int, ...] = ()
        self._training_state: str | None = None
        self._logged_until = -1  # train_loss steps an interrupted attempt already logged
        self.init = init
        # each task's best reachable score through the run's tokenizer; a resume keeps the earlier ones
        self.ceilings = ceilings if ceilings is not None else (previous.ceilings if previous is not None else {})
        self._replay_rows: dict[str, int] = dict(previous.replay.rows_after_task) \
            if previous is not None and previous.replay is not None else {}
        self._recovery: dict[str, dict[str, float | None]] = {}
        self._mid_task: MidTaskPoint | None = None
        self._restarts: list[Restart] = []
        self._fallbacks: list[str] = list(previous.fallbacks) if previous is not None else []
        if previous is not None:
            carried = carry_over(previous, tasks=stream.names, fingerprints=self.fingerprints, untrained=self.untrained,
                                 scored_by=[t.metric for t in stream], changes=changes, now=time.time())
            self.finished, self.matrix, self._history = carried.finished, carried.matrix, carried.history
            self._train_stats, self._checkpoints, self._recovery = (carried.train_stats, carried.checkpoints,
                                                                    carried.recovery)
            self._training_state, self._fill_tasks, self._resumes = (carried.training_state, carried.fill_tasks,
                                                                     carried.resumes)
            self._mid_task, self._restarts = carried.mid_task, carried.restarts
            if self._rebuilt:  # not a resume: the same attempt goes on
                self._resumes.pop()
                self._restarts.append(Restart(
                    number=len(self._restarts) + 1, at=time.time(), died=["the scheduler actor"],
                    reasons=["its process died; rebuilt from report.json and the replay store's checkpoint"],
                    task_index=self.finished if self.finished < len(stream) else None,
                    restored_from=self._restore_point()))
            if config.evaluation.cells == "needed":  # a row lacks the later tasks by design: only the next is read
                self._fill_tasks = tuple(j for j in self._fill_tasks if j <= self.finished)
        self.sink = BufferedSink(self._open_run(previous, sink), pending_path=self.output.pending_mlflow)
        try:
            self._start(previous)
        except BaseException as exc:  # the MLflow run exists by now: it must not be left RUNNING
            self.sink.set_tags({"forgetless.error": f"the scheduler could not start: {type(exc).__name__}: {exc}"})
            self.sink.end("FAILED", timeout_s=10)
            raise

    def _start(self, previous: RunReport | None) -> None:
        config = self.config
        self.replay: ReplayStore | None = None
        self._replay_checkpoint = START_TAG
        if config.replay.enabled or self.planning.uses_replay:
            # a rebuilt scheduler's shards get names of their own: the dead one's may not be freed yet
            self.replay = ReplayStore.create(config.replay, seed=config.seed, directory=self.output.replay_dir,
                                             name=f"replay-{run_key(self.output_dir)}"
                                                  + (f"-r{len(self._restarts)}" if self._rebuilt else ""))
            if previous is None:
                self.replay.checkpoint(START_TAG)
            else:
                self._replay_checkpoint = previous.resume.replay_checkpoint or START_TAG
                self.replay.rollback(self._replay_checkpoint)  # what the last finished task left, nothing later
        self._cursors: dict[int, int] = {}
        self._plan: TaskPlan | None = None
        self._workers: dict[int, dict[str, Any]] = {}
        self._attempt: int | None = None  # the worker group's attempt now training this run
        self._failure: str | None = None  # the first failure reported in this attempt
        self._reports: list[str] = []  # every failure reported in this attempt
        self._failed_in: str | None = None  # the phase the attempt was in when its first failure came
        self._fatal: str | None = None  # why no restart can help (the run's own error, or max_failures spent)
        self._last_progress_at: float | None = None
        self._finished_report: RunReport | None = None
        self._heatmap: HeatmapWriter | None = None
        self._started = time.time()
        self._progress: dict[str, Any] = {"phase": "starting", "task_index": self.finished - 1, "task": None,
                                          "step": 0, "num_steps": 0, "loss": None, "global_step": 0,
                                          "mlflow_outage": None}
        write_atomic(self.output.config, yaml.safe_dump(experiment_dict(config), sort_keys=False))
        self._write_matrix()
        self._write_report()  # the commit record exists from the start: a run killed now resumes at task 0

    # ------------------------------------------------------------------ starting or resuming
    def _open_run(self, previous: RunReport | None, sink: MlflowSink | None) -> MlflowSink:
        from actors.tracking import mark_orphaned_runs, open_run, reopen_run

        config = self.config
        if sink is None:  # first, the store's runs whose process died (this run's own is locked by its driver)
            mark_orphaned_runs(config.mlflow.tracking_uri, config.mlflow.experiment_name)
        tags = {"forgetless.strategy": config.strategy_name, "forgetless.paradigm": config.paradigm.name,
                "forgetless.tasks": ",".join(self.stream.names),
                "forgetless.output_dir": str(self.output_dir), "forgetless.host": socket.gethostname()}
        params = flatten(experiment_dict(config))
        if previous is None or previous.mlflow.run_id is None:
            if sink is None:
                return open_run(config, tags=tags, params=params)
            sink.log_params(params)
            return sink
        if self._rebuilt:  # the same MLflow run, still RUNNING: what it lacks is sent, the restart tagged
            from actors.tracking import MlflowSink, send_pending

            sink = sink or MlflowSink(config.mlflow.tracking_uri, previous.mlflow.run_id, previous.mlflow.experiment_id)
            send_pending(sink, self.output.pending_mlflow)
            restart = self._restarts[-1]
            sink.set_tags({f"forgetless.recovery.{restart.number}": f"the scheduler actor died; rebuilt, restored "
                                                                   f"from {restart.restored_from}"})
            sink.log_metrics({"recoveries": float(restart.number)}, step=max(self.finished - 1, 0))
            last = sink.last_step("train_loss")
            self._logged_until = -1 if last is None else last
            return sink
        sink, self._logged_until = reopen_run(config, previous, tags=tags, params=params, sink=sink,
                                              pending=self.output.pending_mlflow, resumption=self._resumes[-1],
                                              attempt=len(self._resumes))
        return sink

    def start(self) -> StreamStart:
        """How each worker starts: the baseline still to measure, the state to load, the columns to fill."""
        missing = tuple(j for j in range(len(self.stream)) if np.isnan(self.matrix.baseline[j]))
        return StreamStart(
            eval_sets=self.eval_sets(), restore_dir=self._training_state, baseline_tasks=missing,
            fill_row=self.finished - 1 if self._fill_tasks else None, fill_tasks=self._fill_tasks)

    # ------------------------------------------------------------------ trainers call these
    @property
    def run_id(self) -> str:
        return self.sink.run_id

    def eval_sets(self) -> list[EvalSet]:
        return build_eval_sets(self.config, self.stream)  # under prompt engineering with shots: the k-shot prompts

    def register_worker(self, rank: int, *, pid: int, host: str, attempt: int = 0) -> bool:
        """A worker starts this run, in its group's ``attempt`` (0, then 1, 2... after restarts).
        The first worker of a later attempt records the restart (see ``_restarted``). Returns
        whether the worker should run the stream: False once the run cannot go on (its own error,
        or ``training.max_failures`` restarts spent), so a restarted group ends it at once."""
        if self._attempt is None:  # the first worker this scheduler sees: what came before is not this attempt's
            if self._rebuilt and self._restarts:  # the old scheduler's workers never register here: the group restarted
                self._restarts[-1].steps_redone = None
                self._restarts[-1].reasons.append("the trainer worker group restarted with it (its calls to the "
                                                  "scheduler failed); the steps it redid are not known")
                self._write_report()
            self._attempt = attempt
            self._new_attempt()
            self._check_states()
        elif attempt > self._attempt:
            self._attempt = attempt
            self._check_states()  # first: a damaged mid-task state changes where the restart goes on from
            self._restarted()
            self._workers = {}  # the earlier attempt's are gone: a failure of this one names only its own
        self._workers[rank] = {"pid": pid, "host": host}
        return self._fatal is None

    def workers(self) -> dict[int, dict[str, Any]]:
        return dict(self._workers)

    def set_phase(self, phase: str) -> None:
        self._progress["phase"] = phase
        self._last_progress_at = time.time()

    def _restarted(self) -> None:
        """The worker group came back after a failure: record what died and what is redone, and go on
        from the last committed state (or fail the run, when no restart is left)."""
        number = len(self._restarts) + 1
        died = [f"worker {rank} (pid {info['pid']} on {info['host']})" for rank, info in sorted(self._workers.items())
                if not any(r.startswith(f"worker {rank} of ") for r in self._reports)]
        p, mid = self._progress, self._mid_task
        phase = self._failed_in or p["phase"]  # what the attempt was doing when it failed
        task = p["task_index"] if phase in ("train", "eval") and p["task_index"] >= self.finished else None
        from_step = mid.steps_done if mid is not None and mid.task_index == task else 0
        reached = (p["num_steps"] if phase == "eval" else p["step"]) if task is not None else 0
        restored = self._restore_point()
        restart = Restart(number=number, at=time.time(), last_progress_at=self._last_progress_at, died=died,
                          reasons=list(self._reports), task_index=task, steps_redone=max(0, reached - from_step),
                          restored_from=restored)
        self._restarts.append(restart)
        limit = self.config.training.max_failures
        if self._fatal is None and number > limit:
            self._fatal = _spent(number, limit)
        self._new_attempt()
        self._progress.update(phase="restarting", step=from_step)
        what = _what_failed(restart)
        self.sink.set_tags({f"forgetless.recovery.{number}": f"{what}; restored from {restored}; "
                                                             f"{restart.steps_redone} step(s) redone"[:5000]})
        self.sink.log_metrics({"recoveries": float(number)}, step=max(self.finished - 1, 0))
        self._write_report()

    def _check_states(self) -> None:
        """Before an attempt loads them, the states it would go on from, against their checksums
        (``storage.checksums``). A damaged mid-task state is dropped — the task goes on from its
        start, which the report and MLflow say; a damaged state of a finished task has no earlier
        one to fall back on (they are removed once the next commits), and fails the run, naming it."""
        mid = self._mid_task
        if mid is not None and (problems := "; ".join(checksums.verify(mid.training_state))):
            self._mid_task = None
            self._fallback(f"{problems}; task {mid.task_index} went on from {self._restore_point()} instead of its "
                           f"step {mid.steps_done} (those steps are redone)")
        if self._training_state is not None and (problems := "; ".join(checksums.verify(self._training_state))):
            self._fallback(f"{problems}; none: the run stopped")
            self.fail(f"{problems}: the training state after task {self.finished - 1} is damaged, and no earlier one "
                      "is kept, so the run cannot go on. Restore the file from a backup of the run directory and "
                      "resume, or start over with overwrite=true", fatal=True)

    def _fallback(self, note: str) -> None:
        self._fallbacks.append(note)
        self.sink.set_tags({f"forgetless.fallback.{len(self._fallbacks)}": note[:5000]})
        self._write_report()

    def _restore_point(self) -> str:
        """Where a restart goes on from: the last mid-task state, else the last finished task."""
        mid = self._mid_task
        if mid is not None:
            return f"task {mid.task_index}, step {mid.steps_done} (mid-task checkpoint)"
        return f"the end of task {self.finished - 1}" if self.finished else "the start of the stream"

    def _new_attempt(self) -> None:
        """A worker group attempt begins: the failures of the one before are not its, the plans start over."""
        self._failure, self._reports, self._failed_in = None, [], None
        self._cursors, self._plan = {}, None

    def record_checkpoint(self, task_index: int, steps_done: int, global_step: int, directory: str) -> None:
        """A mid-task state is on disk (every rank saved it): it is where a restart continues this task
        from. The report names it (so does a ``forgetless resume``); the one before it goes."""
        older = self._mid_task
        self._mid_task = MidTaskPoint(task_index=task_index, steps_done=steps_done, global_step=global_step,
                                      training_state=directory)
        self._last_progress_at = time.time()
        self._write_report()
        if older is not None and older.training_state != directory:
            files.remove_tree(older.training_state)

    def next_task(self, rank: int = 0) -> TaskPlan | None:
        """The next plan for ``rank``, or None at the end of the stream. Every rank gets the same plans."""
        try:
            return self._next_task(rank)
        finally:
            if self._heatmap is not None:  # the last commit's picture: drawn while the next task trains
                self._heatmap.start()

    def _next_task(self, rank: int) -> TaskPlan | None:
        index = self._cursors.get(rank, self.finished)
        if index >= len(self.stream) or self._failure is not None:
            return None
        self._cursors[rank] = index + 1
        if self._plan is None or self._plan.index != index:
            plan = build_plan(self.config, self.stream, index)
            mid = self._mid_task
            if mid is not None and mid.task_index == index:  # a restart continues this task where it was saved
                plan = dataclasses.replace(plan, resume_dir=mid.training_state)
            self._plan = plan
            self._progress.update(phase="train", task_index=index, task=self._plan.name,
                                  step=mid.steps_done if plan.resume_dir else 0, num_steps=0, loss=None)
        return self._plan

    def log_step(self, task_index: int, step: int, num_steps: int, loss: float, global_step: int,
                 metrics: dict[str, float] | None = None) -> None:
        self._progress.update(step=step + 1, num_steps=num_steps, loss=loss, global_step=global_step,
                              mlflow_outage=self.sink.outage)
        self._last_progress_at = time.time()
        if step + 1 == num_steps:
            self._progress["phase"] = "eval"
        if global_step > self._logged_until:  # a redone task's steps were logged by the attempt that died
            self._logged_until = global_step
            self.sink.log_metrics({"train_loss": loss, f"train_loss/{self.stream[task_index].name}": loss,
                                   **{f"train/{k}": v for k, v in (metrics or {}).items()}}, step=global_step)

    def _write_examples(self, name: str, examples: dict[str, list[float]] | None) -> None:
        """Each eval example's score behind a matrix row (what the comparison's bootstrap resamples)."""
        if examples:
            write_atomic(self.output.example_scores / f"{name}.json", json.dumps(examples, separators=(",", ":")))

    def record_baseline(self, accuracies: dict[str, float], examples: dict[str, list[float]] | None = None) -> None:
        """The untrained model's accuracy on some or all tasks (and each example's score)."""
        self._write_examples("baseline", examples)
        for name, value in accuracies.items():
            self.matrix.baseline[self.stream.names.index(name)] = value
        self._write_matrix()
        self.sink.log_metrics({f"baseline/{k}": v for k, v in accuracies.items()}, step=0)

    def record_fill(self, row: int, accuracies: dict[str, float]) -> None:
        """An extended stream: the model after task ``row`` on the tasks it had not been measured on."""
        for name, value in accuracies.items():
            self.matrix.acc[row, self.stream.names.index(name)] = value
        self._fill_tasks = ()  # measured: a restart does not measure them again
        self._write_matrix()
        self._write_report()
        self.sink.log_metrics({f"acc/{k}": v for k, v in accuracies.items()}, step=row)

    def record_eval(self, task_index: int, accuracies: dict[str, float], *, train_stats: dict[str, Any] | None = None,
                    checkpoint: str | None = None, stored_columns: pa.Table | None = None,
                    examples: dict[str, list[float]] | None = None) -> dict[str, float | None]:
        """Commit task ``task_index``: row, replay rows, report; then log acc/<task> and the metrics
        after it (step = task index)."""
        name = self.stream[task_index].name
        self._write_examples(f"after-{task_index:02d}", examples)
        self.matrix.record(task_index, accuracies, every_task=self.config.evaluation.cells == "all")
        metrics = self._metrics(task_index)
        self._history.append({"task_index": task_index, "task": name, **metrics})
        if train_stats:
            self._train_stats[name] = TaskStats(**train_stats)
        if checkpoint:
            self._checkpoints[name] = checkpoint
        self._write_matrix()
        if self.replay is not None:
            self._remember(task_index, stored_columns)
            self._replay_rows[name] = self.replay.num_rows()
            self._replay_checkpoint = replay_tag(task_index)
            self.replay.checkpoint(self._replay_checkpoint)
        self.finished = task_index + 1
        self._training_state = str(state_dir(self.output_dir, task_index))
        self._mid_task = None  # the task's own mid-task states go with the older ones, below
        self._last_progress_at = time.time()
        self._write_report()  # the commit
        self._forget_older_state(task_index)
        timing = {f"time/{k}": train_stats[k] for k in ("seconds", "eval_seconds", "save_seconds")
                  if train_stats and k in train_stats}
        self.sink.log_metrics({**{f"acc/{k}": v for k, v in accuracies.items()}, **metrics, **timing},
                              step=task_index)
        if self.replay is not None:
            stats = self.replay.stats()
            self.sink.log_metrics({"replay/rows": sum(s.num_rows for s in stats),
                                   "replay/bytes": sum(s.bytes for s in stats)}, step=task_index)
        return metrics

    def _forget_older_state(self, task_index: int) -> None:
        """Once task t is committed, earlier training states and replay checkpoints are not needed."""
        keep = state_dir(self.output_dir, task_index)
        for old in keep.parent.glob("task-*"):
            if old != keep:
                files.remove_tree(old)
        if self.replay is not None:
            self.replay.drop_checkpoints(keep=[self._replay_checkpoint])

    def _remember(self, task_index: int, columns: pa.Table | None = None) -> None:
        """Insert task ``task_index``'s rows into the replay store (``rows_to_store``: its share of
        ``replay.memory_rows``, or a seeded subset of ``replay.rows_per_task`` rows, or all), with the
        columns the strategies keep beside them (DER++'s logits: ``columns`` has one row per stored
        row, in the same order). Under a total budget the earlier tasks' surplus goes first, so the
        store never holds more than the budget."""
        rows = rows_to_store(self.config, self.stream, task_index)
        if rows is None:
            return
        self.replay.delete(rows_to_drop(self.config, self.stream, task_index))
        if self.planning.stores_logits and self.stream[task_index].trainable:
            if columns is None or columns.num_rows != rows.num_rows:
                raise RuntimeError(f"task {self.stream[task_index].name!r}: the strategy stores logits with its "
                                   f"rows, but the trainers sent {0 if columns is None else columns.num_rows} "
                                   f"row(s) of them for {rows.num_rows} row(s)")
            for name in columns.column_names:
                rows = rows.append_column(name, columns.column(name))
        self.replay.insert(rows)

    def recovery_plan(self) -> RecoveryPlan | None:
        """The recovery probe to run after the stream (None: off, the stream failed, or nothing earlier)."""
        if not self.config.recovery.enabled or self._failure or len(self.stream) < 2:
            return None
        if self.finished < len(self.stream) or self._recovery:  # not through the stream, or probed already
            return None
        self._progress.update(phase="recovery", step=0, num_steps=0)
        return recovery_plan(self.config, self.stream, self.eval_sets(), self._checkpoints[self.stream.names[-1]])

    def record_recovery(self, after: dict[str, float]) -> None:
        """The probe's scores: kept beside acc[t, t] and acc[T-1, t], in the report and MLflow."""
        last = len(self.stream) - 1
        for name, value in after.items():
            t = self.stream.names.index(name)
            self._recovery[name] = {"before": _value(self.matrix.acc[t, t]),
                                    "after_stream": _value(self.matrix.acc[last, t]), "after_head_retrain": value}
            self.sink.log_metrics({f"recovery/{name}": value}, step=last)
        self._write_report()

    def replay_store(self) -> ReplayStore | None:
        """The run's replay store handle (picklable; trainers sample through it)."""
        return self.replay

    def replay_summary(self) -> ReplaySummary | None:
        if self.replay is None:
            return None
        stats = self.replay.stats()
        per_task: dict[str, int] = {}
        for shard in stats:
            for name, count in shard.rows_per_task.items():
                per_task[name] = per_task.get(name, 0) + count
        return ReplaySummary(num_shards=len(stats), rows=sum(s.num_rows for s in stats), rows_per_task=per_task,
                             rows_per_shard=[s.num_rows for s in stats], bytes=sum(s.bytes for s in stats),
                             directory=self.replay.directory,
                             restore_warnings=[w for s in stats for w in s.restore_warnings],
                             memory_rows=self.config.replay.memory_rows, rows_after_task=dict(self._replay_rows))

    # ------------------------------------------------------------------ seen from outside (`forgetless replay`)
    def describe(self) -> dict[str, Any]:
        """What a user finding this run among others needs: where it writes, its MLflow run, how far it is."""
        return {"output_dir": str(self.output_dir), "experiment": self.config.experiment,
                "mlflow_run_id": self.sink.run_id, "tasks": list(self.stream.names), "finished_tasks": self.finished,
                "phase": self._progress["phase"], "has_replay_store": self.replay is not None}

    def replay_status(self) -> list[dict[str, Any]]:
        """Per shard: rows, capacity, bytes, rows per task, and where it runs."""
        if self.replay is None:
            raise ValueError(f"the run in {self.output_dir} has no replay store (replay.enabled is false and its "
                             f"strategy {self.config.strategy_name!r} replays nothing)")
        stats, nodes = self.replay.stats(), self.replay.nodes()
        return [{"shard": s.shard_id, "rows": s.num_rows, "capacity_rows": s.capacity_rows, "bytes": s.bytes,
                 "rows_per_task": s.rows_per_task, **where} for s, where in zip(stats, nodes)]

    def resize_replay(self, change: int) -> dict[str, int]:
        """Add (``change`` > 0) or remove shards of the running store; returns the shard count and rows moved.
        Runs in this actor, between its other calls: never beside a checkpoint or a rollback."""
        if self.replay is None:
            self.replay_status()  # raises, naming why
        moved = self.replay.add_shards(change) if change > 0 else self.replay.remove_shards(-change)
        return {"num_shards": self.replay.num_shards, "moved_rows": moved}

    def fail(self, reason: str, *, fatal: bool = False) -> None:
        """A trainer hit an error: remember why and hand out no more tasks in this attempt. ``fatal``:
        an error of the run itself (its data, its numbers), which a restart would meet again."""
        self._reports.append(reason)
        if self._failure is None:
            self._failure, self._failed_in = reason, self._progress["phase"]
            self._progress["phase"] = "failed"
        if fatal and self._fatal is None:
            self._fatal = reason

    # ------------------------------------------------------------------ the driver calls these
    def progress(self) -> dict[str, Any]:
        return {**self._progress, "rows": self.finished, "num_tasks": len(self.stream),
                "mlflow_outage": self.sink.outage}

    def failure(self, gone: list[str] | None = None) -> str | None:
        """Why the run failed: each restart's failures, then the last attempt's — ``gone`` (its
        workers whose processes the driver found dead: "worker 1 (pid 4242 on node-3)") and what its
        workers reported. Prefixed with the limit when ``training.max_failures`` restarts were spent.
        None: no failure."""
        earlier = [_what_failed(r) for r in self._restarts]
        last = [*(f"{worker} died" for worker in gone or ()), *self._reports]
        failures = [*earlier, *(["; ".join(last)] if last else [])]
        spent = self._fatal if self._fatal and self._fatal not in self._reports else None
        limit = self.config.training.max_failures
        if self._fatal is None and last and len(self._restarts) >= limit:  # Ray Train restarts no more
            spent = _spent(len(failures), limit)
        if len(failures) <= 1:
            return (f"{spent}: " if spent else "") + failures[0] if failures else spent
        listed = " ".join(f"({i}) {text}" for i, text in enumerate(failures, 1))
        return f"{spent + ': ' if spent else ''}{len(failures)} failure(s): {listed}"

    def stop_reason(self) -> str | None:
        """Why the run cannot go on even with a restart (its own error, or max_failures spent); None: it can."""
        return self._fatal

    def _metrics(self, upto: int) -> dict[str, float | None]:
        """The metrics after task ``upto``; for a strategy that trains only at the end, those that need
        a model trained task by task are None (in the report, and not logged)."""
        metrics = self.matrix.summary(upto)
        return final_only(metrics) if self.planning.trains_only_at_end else metrics

    def _write_matrix(self) -> None:
        write_atomic(self.output_dir / "acc_matrix.json", _json(self.matrix.to_dict()))
        if self._heatmap is None:
            self._heatmap = HeatmapWriter(self.output_dir / "acc_heatmap.png",
                                          f"{self.config.experiment} ({self.config.strategy_name})")
        self._heatmap.submit(self.matrix)

    def report(self, status: str = "RUNNING") -> RunReport:
        rows = self.finished
        metrics = self._metrics(rows - 1) if rows else {"avg_acc": None, "forgetting": None, "bwt": None,
                                                        "fwt": None, "learning_acc": None}
        data = self.matrix.to_dict()
        return RunReport(
            tasks=data["tasks"], acc_matrix=data["acc_matrix"], baseline=data["baseline"], metrics=metrics,
            metrics_per_task=self._history, strategy=self.config.strategy_name,
            strategy_config=_dumped(self.config.strategy),
            paradigm=self.config.paradigm.model_dump(mode="json"),
            note=("trains once, at the last task, on every task's data: only the final row (and avg_acc) is "
                  "meaningful; forgetting, bwt, fwt and learning_acc are not defined for it (null)")
            if self.planning.trains_only_at_end
            else None,
            ceilings=self.ceilings,
            fwt_measures=what_fwt_measures(
                # feature extraction classifies over the label set whatever the scoring
                "likelihood" if self.config.paradigm.name == "feature_extraction" else self.config.evaluation.scoring,
                self.matrix.scored_by or []),
            experiment=self.config.experiment, seed=self.config.seed, status=status, error=self._failure,
            finished_tasks=rows, complete=rows == len(self.stream), train=self._train_stats,
            between_task_overhead_s=self.between_task_overhead(), checkpoints=self._checkpoints,
            mlflow=MlflowRef(tracking_uri=self.sink.shown_uri, run_id=self.sink.run_id,
                             experiment_id=self.sink.experiment_id),
            output_dir=str(self.output_dir), seconds=round(time.time() - self._started, 1),
            resumes=self._resumes, init=self.init, recovery=self._recovery, restarts=self._restarts,
            fallbacks=self._fallbacks,
            resume=ResumePoint(training_state=self._training_state, replay_checkpoint=self._replay_checkpoint
                               if self.replay is not None else None, data_fingerprints=self.fingerprints,
                               mid_task=self._mid_task),
        )

    def _write_report(self, report: RunReport | None = None) -> RunReport:
        report = report or self.report()
        write_atomic(self.output.report, report.to_json())
        return report

    def between_task_overhead(self) -> list[float]:
        """Seconds from the end of training task t to the start of task t+1, minus t's evaluation.

        What is left is the cost of scheduling: checkpointing, reporting, fetching the next plan.
        """
        stats = [self._train_stats[name] for name in self.stream.names if name in self._train_stats]
        return [round(nxt.started_at - cur.ended_at - cur.eval_seconds, 4) for cur, nxt in zip(stats, stats[1:])]

    def finish(self, status: str = "FINISHED", reason: str | None = None) -> RunReport:
        """Write artifacts, end the MLflow run with ``status``; idempotent. Returns the report."""
        if self._finished_report is not None:
            return self._finished_report
        if reason:  # the driver's account, which includes what the workers reported
            self._failure = reason
        report = self.report(status)
        if status == "FINISHED" and report.complete and self.config.checkpoint.after_stream != "keep":
            self._drop_after_stream(report)
        try:
            if self.replay is not None:  # the store stays on disk; the actors go
                report.replay = self.replay_summary()
                self.replay.shutdown()
            self._write_matrix()
            self._heatmap.wait()  # the picture of the final matrix is on disk before it is logged
            if self._heatmap.error is not None:
                print(f"warning: acc_heatmap.png could not be drawn ({self._heatmap.error}); acc_matrix.json "
                      "holds the matrix", flush=True)
            self._write_report(report)
            for name in REPORT_FILES:
                self.sink.log_artifact(self.output_dir / name)
            if self._failure:
                self.sink.set_tags({"forgetless.error": self._failure[:5000]})
        finally:
            pending = self.sink.end(status, timeout_s=self.config.mlflow.flush_timeout_s)  # never left RUNNING
        if pending:
            report.mlflow.pending_records = pending
            self._write_report(report)
        self._progress["phase"] = "done" if status == "FINISHED" else "failed"
        self._finished_report = report
        return report

    def _drop_after_stream(self, report: RunReport) -> None:
        """``checkpoint.after_stream``: delete the training state (and for "report" the models) of a
        run that is through its stream; the report stops pointing at them and says what went."""
        level = self.config.checkpoint.after_stream
        files.remove_tree(state_dir(self.output_dir, 0).parent)
        report.resume.training_state, report.resume.mid_task, report.resume.dropped = None, None, level
        self._training_state, self._mid_task = None, None
        if level == "report":
            files.remove_tree(checkpoint_dir(self.output_dir, 0, self.stream.names[0]).parent)
            report.checkpoints = {}
            self._checkpoints = {}


def _dumped(strategy: Any) -> dict[str, Any] | list[dict[str, Any]]:
    """A strategy's settings for the report; a combination's, in its order."""
    if isinstance(strategy, (list, tuple)):
        return [part.model_dump(mode="json", by_alias=True) for part in strategy]
    return strategy.model_dump(mode="json", by_alias=True)


def _spent(failures: int, limit: int) -> str:
    times = "once" if failures == 1 else f"{failures} times"
    return f"the trainer worker group failed {times}, more than training.max_failures={limit}"


def _what_failed(restart: Restart) -> str:
    return "; ".join([*(f"{d} died" for d in restart.died), *restart.reasons]) or "the worker group failed"


def _reconstructed() -> bool:
    """Whether this is a Ray actor restarted after its process died (False: a plain object, or a first start)."""
    try:
        return ray.is_initialized() and ray.get_runtime_context().was_current_actor_reconstructed
    except Exception:  # noqa: BLE001 - outside an actor the question has no answer
        return False


def _value(x: float) -> float | None:
    return None if np.isnan(x) else float(x)


def run_key(output_dir: str | Path) -> str:
    """A short stable key of a run's output directory: its scheduler is the Ray actor ``run-KEY``."""
    return hashlib.sha1(str(Path(output_dir).resolve()).encode()).hexdigest()[:12]


def _json(data: Any) -> str:
    return json.dumps(data, indent=2)


# Thin actor: same class, scheduled with no CPU so it never competes with the trainers. A run gives it
# ``max_restarts=training.max_failures``: restarted, it rebuilds itself from report.json (see __init__).
# Calls in flight when it dies are not retried (a commit must not run twice): their callers fail, and
# the trainer group's restart goes on from what was committed.
SchedulerActor = ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0)(Scheduler)
