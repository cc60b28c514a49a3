"""Several runs of one command — ``compare``, ``table1`` — as one sweep: one MLflow parent run
holding a child run per run, one set of worker groups (Ray Train's start-up paid once), each run
timed, a failed run recorded without sinking the others, the parent ended KILLED if the command
is stopped, FAILED if a run failed, and the sweep's metrics and artifacts logged at its end.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.launch import RunFailedError, RunWorkers, run_experiment
from actors.tracking import MlflowSink
from actors.trainer_group import WorkerGroups
from pipelines.config import RunConfig
from pipelines.errors import ConfigError
from pipelines.metrics import interval
from pipelines.redaction import redact
from pipelines.report import RunReport

log = logging.getLogger("forgetless")


@dataclass
class TimedRun:
    """One run of a command that runs several, and what it cost beyond its training and evaluation."""

    report: RunReport
    wall_s: float  # from the call to its report
    startup_s: float  # the worker group start-up this run waited for (0: it was handed to a running group)
    failure: RunFailedError | None = None

    @property
    def continued(self) -> bool:
        """Resumed after an interrupted attempt: ``wall_s`` timed the last attempt only (its training
        and evaluation seconds, from the report's tasks, are whole)."""
        return bool(self.report.resumes)

    @property
    def train_eval_s(self) -> float:
        return sum(t.seconds + t.eval_seconds for t in self.report.train.values())

    @property
    def seconds(self) -> float:
        """The run's own time: its wall time less the group start-up it waited for."""
        return round(self.wall_s - self.startup_s, 1)

    @property
    def overhead_s(self) -> float:
        """Everything but the start-up, training and evaluating: preparing the stream, the scheduler and
        its MLflow run, building the model and engine, the baseline, checkpoints, the report."""
        return round(self.seconds - self.train_eval_s, 1)

    def timing(self) -> dict[str, float]:
        return {"wall_s": round(self.wall_s, 1), "startup_s": round(self.startup_s, 1),
                "train_eval_s": round(self.train_eval_s, 1), "overhead_s": self.overhead_s}


def run_timed(config: RunConfig, groups: WorkerGroups, *, progress: bool) -> TimedRun:
    """``run_experiment`` on the command's worker groups, timed; a failed run is returned, not raised."""
    known, began = len(groups.started), time.perf_counter()
    try:
        report, failure = run_experiment(config, progress=progress, groups=groups), None
    except RunFailedError as exc:
        report, failure = exc.report, exc
    wall = time.perf_counter() - began
    return TimedRun(report, wall, sum(s or 0.0 for s in groups.startups_s()[known:]), failure)


def startup_summary(groups: WorkerGroups, runs: list[TimedRun]) -> dict[str, Any]:
    """What the command paid to start worker groups, and each run beyond training and evaluating."""
    overheads = [r.overhead_s for r in runs if r.report.status == "FINISHED" and not r.continued]
    return {"worker_group_startups": len(groups.started),
            "worker_group_startup_s": [None if s is None else round(s, 1) for s in groups.startups_s()],
            "per_run_overhead_s": interval(overheads)}


def command_groups(config: RunConfig, kind: str) -> WorkerGroups:
    """The worker groups of a command's runs (``kind``: ``compare``, ``table1``), in its output_dir."""
    return WorkerGroups(Path(config.output_dir) / "ray", name=f"{config.experiment}-{kind}")


@contextmanager
def preparing(config: RunConfig, groups: WorkerGroups) -> Iterator[RunWorkers]:
    """The command's work before its sweep, in the sweep's worker groups: a pretrain config the stream
    names is built in the group its runs then train in (one Ray Train start-up for all). On an
    error the groups are ended here: the sweep that would end them does not begin."""
    try:
        yield RunWorkers(config, groups)
    except Exception:
        groups.close()
        raise


def _resume_parent(tracking_uri: str, run_id: str, kind: str) -> MlflowSink:
    from mlflow.exceptions import MlflowException

    try:
        return MlflowSink.resume(tracking_uri, run_id)
    except MlflowException as exc:
        raise ConfigError(f"the {kind}'s MLflow parent run {run_id} cannot be continued in {redact(tracking_uri)} "
                          f"({str(exc).splitlines()[0][:200]}); resume with the tracking store it was started "
                          "with, or start over with overwrite=true") from None


class Sweep:
    """One command's runs. Use as a context manager around the runs; then ``finish``.

    Args:
        config: the command's config (paths resolved): its output_dir holds the worker groups'
            Ray Train directory, its mlflow block says where the parent run goes.
        kind: the command (``compare``, ``table1``): the parent run is ``<experiment>-<kind>``.
        tags, params: the parent run's.
        groups: the command's worker groups when work before the sweep used them (``preparing``);
            the sweep ends them.
    """

    def __init__(self, config: RunConfig, kind: str, *, tags: dict[str, str], params: dict[str, Any],
                 groups: WorkerGroups | None = None, parent_run_id: str | None = None):
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
        self.groups = groups if groups is not None else command_groups(config, kind)
        self.resumed = parent_run_id is not None
        try:
            if parent_run_id is None:
                self.parent = MlflowSink.start(config.mlflow.tracking_uri, config.mlflow.experiment_name,
                                               run_name=config.mlflow.run_name or f"{config.experiment}-{kind}",
                                               tags=tags)
                self.parent.log_params(params)
            else:  # an interrupted sweep, continued: its parent run and params are there already
                self.parent = _resume_parent(config.mlflow.tracking_uri, parent_run_id, kind)
        except Exception:
            self.groups.close()  # a group the work before the sweep started
            raise
        self.runs: list[TimedRun] = []
        self.status = "FINISHED"

    def __enter__(self) -> Sweep:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc is not None:  # stopped (Ctrl-C, SIGTERM) or broken: the parent must not stay RUNNING
            self.parent.end("KILLED")
            return
        self.groups.close()

    def run(self, config: RunConfig, label: str, *, progress: bool) -> TimedRun:
        """One run of the sweep, a child of its parent run; a failed run is logged and returned."""
        config = config.model_copy(update={"mlflow": config.mlflow.model_copy(
            update={"parent_run_id": self.parent.run_id})})
        if progress:
            print(f"\n== {label} ==", flush=True)
        run = run_timed(config, self.groups, progress=progress)
        if run.failure is not None:  # one bad run does not sink the sweep
            log.error("%s failed: %s", label, run.failure)
            self.status = "FAILED"
        self.runs.append(run)
        return run

    def skip(self, report: RunReport, wall_s: float, startup_s: float, label: str, *, progress: bool) -> TimedRun:
        """A run an interrupted invocation of the sweep finished: kept as it was, not run again."""
        if progress:
            print(f"\n== {label} ==\nfinished before the sweep was interrupted: kept ({report.output_dir})", flush=True)
        run = TimedRun(report, wall_s, startup_s)
        self.runs.append(run)
        return run

    def startup_summary(self) -> dict[str, Any]:
        return startup_summary(self.groups, self.runs)

    def mlflow_ref(self) -> dict[str, Any]:
        return {"tracking_uri": self.parent.shown_uri, "parent_run_id": self.parent.run_id,
                "experiment_id": self.parent.experiment_id}

    def finish(self, metrics: dict[str, float | None], *, artifacts: list[Path]) -> None:
        """Log the sweep's metrics (None: undefined, not logged) and artifacts; end the parent run.
        A resumed sweep's parent that already holds a metric at that value does not get it twice."""
        logged = self.parent.client.get_run(self.parent.run_id).data.metrics if self.resumed else {}
        self.parent.log_metrics({k: v for k, v in metrics.items() if v is not None and logged.get(k) != v}, step=0)
        for path in artifacts:
            self.parent.log_artifact(path)
        self.parent.end(self.status)
