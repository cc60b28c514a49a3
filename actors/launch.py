"""Run one experiment: prepare the stream on the driver, start the scheduler and the trainer group.

Everything that can be wrong with the input (config, data, tokenizer, model directory) fails here,
before a single worker starts.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import ray
from tqdm.auto import tqdm

from actors.scheduler import SchedulerActor, format_exception
from actors.trainer_group import build_trainer
from pipelines.config import RunConfig, resolve_paths
from pipelines.errors import ForgetlessError
from pipelines.models import build_model, build_tokenizer, check_precision
from pipelines.tasks import load_stream

log = logging.getLogger("forgetless")

# Environment every Ray process of a run gets: deprecation floods off, tokenizer threads off
# (they fight the trainers for two cores), no usage reporting.
WORKER_ENV = {
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning,ignore::UserWarning",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


class RunFailedError(ForgetlessError, RuntimeError):
    """Training failed in a worker; the message carries the worker's reason."""

    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report


def connect_ray(config: RunConfig) -> bool:
    """Join the configured cluster, or start a local Ray. True when the Ray is local to this run."""
    if ray.is_initialized():
        return len(ray.nodes()) == 1
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": WORKER_ENV}, "logging_level": logging.WARNING,
                              "configure_logging": True}
    address = config.ray.address or os.environ.get("RAY_ADDRESS")  # set inside `ray job submit`
    if address:
        ray.init(address=address, **kwargs)
        return False
    # A Ray started here serves this run alone and dies with it (dashboard on loopback): Ray 2.60's
    # token auth would only stand in the way. A cluster keeps whatever auth it was started with.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # The dashboard serves the state API that Ray Train's placement-group cleaner polls.
    # address="local": a new Ray for this run even if a `ray start` cluster runs on this machine
    # (ray.address=auto joins that one instead).
    ray.init(address="local", num_cpus=config.ray.num_cpus or os.cpu_count(), dashboard_host="127.0.0.1",
             **kwargs)
    return True


def _cpus_per_worker(config: RunConfig, use_gpu: bool, *, local: bool) -> float:
    if config.training.cpus_per_worker:
        return config.training.cpus_per_worker
    if use_gpu or not local:
        return 1.0  # a cluster's nodes differ in size: never ask for more than the smallest has
    total = ray.cluster_resources().get("CPU", 1.0)
    return max(1.0, float(int(total // config.training.num_workers)))


def _poll_progress(scheduler: Any, num_tasks: int, stop: threading.Event, enabled: bool) -> None:
    """Draw one progress bar per task from the scheduler's progress, until ``stop``."""
    bar, bar_task, shown = None, None, None
    while not stop.wait(0.5):
        try:
            p = ray.get(scheduler.progress.remote(), timeout=5)
        except ray.exceptions.GetTimeoutError:
            continue  # the scheduler is busy (starting, or writing to MLflow)
        except ray.exceptions.RayError as exc:  # the actor is gone: the bars end, not the run
            log.debug("progress polling stopped: %s", exc)
            break
        if p["phase"] == "baseline" and shown is None and enabled:
            shown = ("baseline",)
            tqdm.write("trainer group up; evaluating the untrained model on every task (the baseline)")
        if p["task_index"] >= 0 and p["task_index"] != bar_task:
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


def run_experiment(config: RunConfig, *, progress: bool = True) -> dict[str, Any]:
    """Train and evaluate the whole stream; returns the report also written to ``report.json``.

    Raises:
        ConfigError, DataError: bad input, before any training.
        RunFailedError: a worker failed; the MLflow run is marked FAILED with the reason.
    """
    config = resolve_paths(config)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    check_precision(config.model.arch, config.training.precision)
    stream = load_stream(config)
    tokenizer = build_tokenizer(config.model, stream.training_text())
    tokenizer_dir = output_dir / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    if config.model.name_or_path:
        build_model(config.model, tokenizer)  # a bad directory fails here, not in every worker

    local = connect_ray(config)
    use_gpu = config.training.use_gpu
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= config.training.num_workers
    scheduler = SchedulerActor.options(runtime_env={"env_vars": WORKER_ENV}).remote(config, stream)
    trainer = build_trainer(config, scheduler=scheduler, tokenizer_dir=str(tokenizer_dir), use_gpu=use_gpu,
                            cpus_per_worker=_cpus_per_worker(config, use_gpu, local=local))
    if progress:
        tqdm.write(f"{len(stream)} tasks ({', '.join(stream.names)}); starting {config.training.num_workers} "
                   f"trainer worker(s) on {'GPU' if use_gpu else 'CPU'} — Ray Train takes ~30 s to start")
    stop = threading.Event()
    poller = threading.Thread(target=_poll_progress, args=(scheduler, len(stream), stop, progress), daemon=True)
    poller.start()
    try:
        trainer.fit()
    except KeyboardInterrupt:
        stop.set()
        ray.get(scheduler.finish.remote("KILLED", "interrupted by the user"))
        raise
    except Exception as exc:  # noqa: BLE001 - any worker failure ends the run as FAILED
        stop.set()
        try:
            reason = ray.get(scheduler.failure.remote()) or format_exception(exc)
            report = ray.get(scheduler.finish.remote("FAILED", reason))
            ray.kill(scheduler)
        except ray.exceptions.RayError as lost:  # the scheduler went down with the cluster
            reason = f"{format_exception(exc)}; the scheduler is unreachable too ({type(lost).__name__})"
            report = {"status": "FAILED", "error": reason, "tasks": stream.names, "acc_matrix": [],
                      "mlflow": {"tracking_uri": config.mlflow.tracking_uri, "run_id": None}, "seed": config.seed,
                      "output_dir": str(output_dir)}
        raise RunFailedError(f"run failed: {reason}\n  (MLflow run {report['mlflow']['run_id']} marked FAILED; "
                             f"partial matrix in {output_dir / 'acc_matrix.json'})", report) from None
    finally:
        stop.set()
        poller.join(timeout=5)
    try:
        return ray.get(scheduler.finish.remote("FINISHED"))
    finally:
        ray.kill(scheduler)
