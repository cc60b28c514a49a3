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
    from actors.preflight import ResolvedRun
    from actors.trainer_group import WorkerGroups

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
    the run goes to a running group when one fits it. Without, the run starts its own and ends it.

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
    try:
        from actors.preflight import resolve_run  # the checks above pass first: see the module's docstring

        try:
            run = resolve_run(config, output, resuming=resuming, progress=progress)
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
        return _train(config, run, progress=progress, groups=groups)
    finally:
        output.unlock()


def _train(config: RunConfig, run: ResolvedRun, *, progress: bool, groups: WorkerGroups | None) -> RunReport:
    from actors.trainer_group import WorkerGroups

    local = connect_ray(config)
    if groups is not None:
        return _train_on(groups, config, run, progress=progress, local=local)
    groups = WorkerGroups(Path(config.output_dir) / "ray", name=f"{config.experiment}-{Path(config.output_dir).name}")
    interrupted = False
    try:
        return _train_on(groups, config, run, progress=progress, local=local)
    except KeyboardInterrupt:
        interrupted = True  # the process ends, and its workers with it: nothing to wait for
        raise
    finally:
        if not interrupted:
            groups.close()


def _train_on(groups: WorkerGroups, config: RunConfig, run: ResolvedRun, *, progress: bool, local: bool) -> RunReport:
    from actors.scheduler import SchedulerActor, run_key
    from actors.trainer_group import GroupShape

    stream, previous, start = run.stream, run.previous, run.start

    use_gpu = config.training.use_gpu
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= config.training.num_workers
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
        shape = GroupShape(num_workers=config.training.num_workers, use_gpu=use_gpu, local=local,
                           cpus_per_worker=cpus_per_worker(config, use_gpu, local=local),
                           max_failures=config.training.max_failures)
        group, new = groups.get(shape)
        try:
            ray.get(scheduler.progress.remote())  # up, or why not (MLflow, the replay store's files...)
        except ray.exceptions.RayActorError as exc:
            raise SchedulerStartError(f"the run could not start its scheduler: {_innermost_error(exc)}") from None
        first = previous.finished_tasks if previous else 0
        if progress:
            what = (f"resuming after task {first}/{len(stream)}" if previous else f"{len(stream)} tasks")
            where = (f"starting {shape.num_workers} trainer worker(s) on {'GPU' if use_gpu else 'CPU'} — Ray Train "
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
