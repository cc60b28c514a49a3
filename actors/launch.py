"""Run one experiment: resolve it on the driver (``actors.preflight``), start the scheduler and
the trainer group, follow the run to its end.

Everything that can be wrong with the input (tracking store, output directory, config, data,
tokenizer, model directory) fails before a single worker starts — the tracking store, the
precision and the output directory first, within a second or two: the modules that resolve and
train a run (torch, transformers, DeepSpeed, Ray Train: ~7 s to import) are imported once those
checks pass.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from tqdm.auto import tqdm

from actors import reaper
from actors.cluster import WORKER_ENV, connect_ray, cpus_per_worker
from actors.replay import NAMESPACE
from actors.tracking import MlflowSink, check_tracking, send_pending
from pipelines.config import RunConfig, check_precision, resolve_paths
from pipelines.errors import ForgetlessError
from pipelines.loop import format_exception
from pipelines.report import RunReport
from pipelines.rundir import REPORT_FILES, OutputDir
from storage.files import write_atomic

if TYPE_CHECKING:
    from collections.abc import Callable

    from actors.preflight import ResolvedRun
    from actors.trainer_group import GroupShape, WorkerGroup, WorkerGroups

log = logging.getLogger("forgetless")

class RunFailedError(ForgetlessError, RuntimeError):
    """Training failed in a worker; the message carries the worker's reason."""

    def __init__(self, message: str, report: RunReport):
        super().__init__(message)
        self.report = report


class SchedulerStartError(ForgetlessError, RuntimeError):
    """The scheduler actor failed in its constructor (the message carries why)."""


def _poll_progress(scheduler: Any, num_tasks: int, stop: threading.Event, enabled: bool) -> None:
    """Draw one progress bar per task from the scheduler's progress, until ``stop``."""
    bar, bar_task, shown, outage = None, None, None, None
    while not stop.wait(0.5):
        try:
            p = ray.get(scheduler.progress.remote(), timeout=5)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.ActorUnavailableError):
            continue  # the scheduler is busy (starting, or writing to MLflow), or restarting
        except ray.exceptions.RayError as exc:  # the actor is gone: the bars end, not the run
            log.debug("progress polling stopped: %s", exc)
            break
        if p["phase"] == "baseline" and shown is None and enabled:
            shown = ("baseline",)
            tqdm.write("trainer group up; evaluating the untrained model on every task (the baseline)")
        if p.get("mlflow_outage") and p["mlflow_outage"] != outage and enabled:
            tqdm.write(f"MLflow is not taking writes ({p['mlflow_outage']}); training goes on and the records "
                       "wait (sent when it is back, or by `forgetless resume` later)")
        outage = p.get("mlflow_outage")
        if p["phase"] in ("train", "eval") and p["task_index"] != bar_task:
            if bar is not None:
                bar.close()
            bar_task = p["task_index"]
            bar = tqdm(total=None, desc=f"task {bar_task + 1}/{num_tasks} {p['task']}", unit="step",
                       disable=not enabled, leave=True, dynamic_ncols=True)
        state = (p["task_index"], p["step"], p["phase"])
        if bar is not None and p["num_steps"] and state != shown:
            shown = state
            bar.total = p["num_steps"]
            bar.n = p["step"]
            postfix = {"loss": f"{p['loss']:.3f}"} if p["loss"] is not None else {}
            if p["phase"] == "eval":
                postfix["phase"] = "evaluating"
            bar.set_postfix(postfix, refresh=False)
            bar.refresh()
    if bar is not None:
        bar.close()


def _why_it_failed(scheduler: Any, exc: BaseException) -> str:
    """The reason a run failed: any trainer worker whose process is gone, named first (a peer of a
    dead worker only sees its connection close), then what the first worker to fail reported."""
    try:
        workers = ray.get(scheduler.workers.remote(), timeout=10)
    except ray.exceptions.RayError:
        workers = {}
    here = socket.gethostname()
    gone = [f"worker {rank} (pid {info['pid']} on {info['host']})"
            for rank, info in sorted(workers.items()) if info["host"] == here and not reaper.alive(info["pid"])]
    try:
        reported = ray.get(scheduler.failure.remote(gone), timeout=30)
    except ray.exceptions.RayError:
        reported = None
    return reported or "; ".join([*(f"trainer {worker} died" for worker in gone),
                                  format_exception(exc).splitlines()[0][:600]])


def _stop_reason(scheduler: Any) -> str | None:
    """Why the run cannot go on even after a restart (None: it can, or the scheduler is busy)."""
    try:
        return ray.get(scheduler.stop_reason.remote(), timeout=5)
    except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
        return None  # busy, or restarting (one dead for good leaves its workers failing until the group ends)


def _innermost_error(exc: BaseException) -> str:
    """The ``SomeError: message`` line a Ray error's text ends its traceback with (else the whole text)."""
    lines = [line.strip() for line in str(exc).splitlines()]
    raised = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Warning)\b.*: ", line)]
    return raised[-1] if raised else " ".join(lines)[:2000]


def _nothing_to_train(previous: RunReport, config: RunConfig, output: OutputDir) -> RunReport:
    """A stream whose every task is finished, resumed with no new one: send what MLflow still lacks
    and, if the last attempt died while it was finishing, finish it; train nothing."""
    if previous.mlflow.run_id is None:
        return previous
    sink = MlflowSink(config.mlflow.tracking_uri, previous.mlflow.run_id)
    sent = send_pending(sink, output.pending_mlflow) if output.pending_mlflow.exists() else 0
    if sent:
        log.warning("sent %d record(s) MLflow had missed to run %s", sent, previous.mlflow.run_id)
    finishing = previous.status != "FINISHED"  # killed after its last row was committed, while finishing
    previous.mlflow.pending_records = 0
    previous.status = "FINISHED"
    if sent or finishing:
        write_atomic(output.report, previous.to_json())
    if finishing:
        sink.set_tags({f"forgetless.resume.{len(previous.resumes) + 1}": (
            "every task was finished; the previous attempt ended without finishing its run; finished on resume")})
        for name in REPORT_FILES:
            if (output.path / name).exists():
                sink.log_artifact(output.path / name)
        sink.end("FINISHED")
    return previous


def run_experiment(config: RunConfig, *, progress: bool = True, groups: WorkerGroups | None = None) -> RunReport:
    """Train and evaluate the whole stream (or continue it); returns the report also in ``report.json``.

    ``groups``: the worker groups of a command that runs several streams (``compare``, ``table1``):
    the run goes to a running group when one fits it. Without, the run starts its own and ends it
    (a pretrain config the stream names and the cache lacks is built in that same group first).

    Raises:
        ConfigError, DataError: bad input, before any training.
        TrackingUnreachableError: the MLflow store cannot be used (within seconds, before anything else).
        OutputDirBusyError: another run holds output_dir.
        RunFailedError: a worker failed; the MLflow run is marked FAILED with the reason.
    """
    config = resolve_paths(config)
    check_tracking(config.mlflow.tracking_uri)
    check_precision(config.model.arch, config.training.precision)
    output = OutputDir(config.output_dir, replay_dir=config.replay.directory)
    resuming = output.claim(resume=config.resume, overwrite=config.overwrite)
    workers = RunWorkers(config, groups)
    interrupted = False
    try:
        from actors.preflight import resolve_run  # the checks above pass first: see the module's docstring

        try:
            run = resolve_run(config, output, resuming=resuming, progress=progress, workers=workers)
        except BaseException:
            output.discard_staged()  # the old run stays as it was, with nothing of the refused one beside it
            raise
        if output.replacing:  # overwrite=true: the new run is valid (config, data, model, tracking); the old goes now
            output.replace_old_run()
            run = dataclasses.replace(run, tokenizer_dir=output.tokenizer)
        if isinstance(run, RunReport):  # every task finished, none new
            if progress:
                tqdm.write(f"nothing to train: the {len(run.tasks)} tasks of {output.path} are finished")
            return _nothing_to_train(run, config, output)
        return _train_on(workers, config, run, progress=progress)
    except KeyboardInterrupt:
        interrupted = True  # the process ends, and its workers with it: nothing to wait for
        raise
    finally:
        try:
            if not interrupted:
                workers.close()
        finally:
            output.unlock()


class RunWorkers:
    """The worker groups one run trains in: the command's (``groups``), else the run's own, made on
    first use (Ray joined or started then, as the run's config says) and ended by ``close``.

    A pretrain config the stream names is built in the group the stream then trains in when both
    have the same number of workers on the same devices: Ray Train's start-up is paid once."""

    def __init__(self, config: RunConfig, groups: WorkerGroups | None):
        self.config = config
        self._groups, self._own = groups, groups is None
        self.local: bool | None = None

    def groups(self) -> WorkerGroups:
        if self.local is None:
            self.local = connect_ray(self.config)
        if self._groups is None:
            from actors.trainer_group import WorkerGroups

            self._groups = WorkerGroups(Path(self.config.output_dir) / "ray",
                                        name=f"{self.config.experiment}-{Path(self.config.output_dir).name}")
        return self._groups

    def use_gpu(self, training: Any) -> bool:
        """Whether workers of ``training`` (a stream's or a pretrain config's block) go on GPUs."""
        self.groups()
        if training.use_gpu is not None:
            return training.use_gpu
        return ray.cluster_resources().get("GPU", 0) >= training.num_workers

    def shape(self) -> GroupShape:
        """The stream's worker group."""
        from actors.trainer_group import GroupShape

        training, use_gpu = self.config.training, self.use_gpu(self.config.training)
        return GroupShape(num_workers=training.num_workers, use_gpu=use_gpu, local=bool(self.local),
                          cpus_per_worker=cpus_per_worker(self.config, use_gpu, local=bool(self.local)),
                          max_failures=training.max_failures)

    def group_for(self, training: Any, cpus: Callable[[bool, bool], float]) -> tuple[WorkerGroup, bool]:
        """A group for other work of this run (pretraining, with its own ``training`` block): the
        stream's, when the work needs as many workers on the same devices, else one of its own
        (``cpus(use_gpu, local)``: CPUs a worker of it reserves). Returns it, and whether it is new."""
        from actors.trainer_group import GroupShape

        groups, use_gpu = self.groups(), self.use_gpu(training)
        shape = self.shape()
        if (training.num_workers, use_gpu) != (shape.num_workers, shape.use_gpu):
            shape = GroupShape(num_workers=training.num_workers, use_gpu=use_gpu, local=bool(self.local),
                               cpus_per_worker=cpus(use_gpu, bool(self.local)), max_failures=0)
        return groups.get(shape)

    def close(self) -> None:
        if self._own and self._groups is not None:
            self._groups.close()


def _train_on(workers: RunWorkers, config: RunConfig, run: ResolvedRun, *, progress: bool) -> RunReport:
    from actors.scheduler import SchedulerActor, run_key

    stream, previous, start = run.stream, run.previous, run.start
    groups, shape = workers.groups(), workers.shape()  # Ray up first: the scheduler is an actor
    # Named, so `forgetless replay status|add-shards` can find the run (and its store) from outside.
    # The scheduler's arguments are held here, as object refs, for the whole run: Ray frees a creation
    # task's arguments once the actor is up, and a restarted scheduler (``max_restarts``) needs them again.
    arguments = [ray.put(value) for value in (config, stream, previous)]
    scheduler = SchedulerActor.options(runtime_env={"env_vars": WORKER_ENV}, name=f"run-{run_key(config.output_dir)}",
                                       namespace=NAMESPACE, max_restarts=config.training.max_failures).remote(
        arguments[0], arguments[1], previous=arguments[2], changes=run.changes, init=start.init,
        ceilings=run.ceilings)
    stop = threading.Event()
    poller = threading.Thread(target=_poll_progress, args=(scheduler, len(stream), stop, progress), daemon=True)
    try:  # from here on, however the run ends, the scheduler records how
        # The trainer group starts while the scheduler does (MLflow, the replay store): its workers
        # wait for a run, and a scheduler that cannot start ends them with the group.
        group, new = groups.get(shape)
        try:
            ray.get(scheduler.progress.remote())  # up, or why not (MLflow, the replay store's files...)
        except ray.exceptions.RayActorError as exc:
            raise SchedulerStartError(f"the run could not start its scheduler: {_innermost_error(exc)}") from None
        first = previous.finished_tasks if previous else 0
        if progress:
            what = (f"resuming after task {first}/{len(stream)}" if previous else f"{len(stream)} tasks")
            where = (f"starting {shape.num_workers} trainer worker(s) on {'GPU' if shape.use_gpu else 'CPU'} — Ray Train "
                     "takes ~30 s to start" if new else f"on the running group of {shape.num_workers} trainer worker(s)")
            tqdm.write(f"{what} ({', '.join(stream.names)}); {where}")
        poller.start()
        group.run({"config": config, "scheduler": scheduler, "tokenizer_dir": str(run.tokenizer_dir),
                   "checkpoint": start.checkpoint, "objective": start.objective, "slots": run.slots},
                  stop=lambda: _stop_reason(scheduler))
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM
        stop.set()
        try:
            ray.get(scheduler.finish.remote("KILLED", "interrupted by the user"))
        except ray.exceptions.RayError:
            pass  # the scheduler never came up: there is no run to mark
        raise
    except SchedulerStartError:
        raise
    except Exception as exc:  # noqa: BLE001 - any worker failure ends the run as FAILED
        stop.set()
        try:
            reason = _why_it_failed(scheduler, exc)
            report = ray.get(scheduler.finish.remote("FAILED", reason))
            ray.kill(scheduler)
        except ray.exceptions.RayError as lost:  # the scheduler went down with the cluster
            reason = f"{format_exception(exc)}; the scheduler is unreachable too ({type(lost).__name__})"
            report = RunReport.read(Path(config.output_dir) / "report.json")
            report.status, report.error = "FAILED", reason
        raise RunFailedError(f"run failed: {reason}\n  (MLflow run {report.mlflow.run_id} marked FAILED; "
                             f"partial matrix in {Path(config.output_dir) / 'acc_matrix.json'}; continue it with "
                             f"`forgetless resume {config.output_dir}`)", report) from None
    finally:
        stop.set()
        if poller.is_alive():
            poller.join(timeout=5)
    try:
        return ray.get(scheduler.finish.remote("FINISHED"))
    finally:
        ray.kill(scheduler)
