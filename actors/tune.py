"""``forgetless tune``: each strategy's hyperparameters chosen by Ray Tune on the first tasks'
validation rows (``pipelines.tuning`` says which rows and which knobs), the same number of trials
for every strategy, and the best values written as one YAML per strategy for ``compare --tuned``.

Each trial is a Forgetless run (its own MLflow child run under one parent, its own Ray Train
worker group: Ray Train inside a Tune trial, the trial itself holding no CPU) on the tuning stream.
It reports the metric after every finished task, so an early-stopping scheduler (``--scheduler
asha``) can end a poor trial after its first task. A trial that fails (a non-finite loss, a worker
out of memory) is recorded with its reason and the others go on.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ray import tune as ray_tune

from actors.cluster import connect_ray
from actors.tracking import MlflowSink, check_tracking
from pipelines.config import RunConfig, experiment_dict, flatten, resolve_paths, validate_config
from pipelines.errors import ConfigError, ForgetlessError
from pipelines.metrics import ForgettingMatrix
from pipelines.significance import HEADLINE
from pipelines.report import RunReport
from pipelines.strategies.base import Range
from pipelines.tuning import (Knob, draw_seed, read_space, search_space, shared_rates, tuning_config, with_values,
                              write_tuned)
from storage.files import write_atomic

log = logging.getLogger("forgetless")
MAXIMIZED = ("avg_acc", "learning_acc", "bwt")  # the metrics a trial may be ranked by, higher is better
MINIMIZED = ("forgetting",)
# A trial only drives its run (the run's workers hold the CPUs and GPUs): it takes none, but a
# placement group needs a non-empty bundle, so it holds one byte of memory.
TRIAL_RESOURCES = {"cpu": 0, "memory": 1}


SEARCH = ("learning rates: the same for every strategy, one drawn in each of `trials` equal slices of its range "
          "(on a log scale), seeded by the config's seed (pipelines.tuning.shared_rates); the strategy's own knobs: "
          "random, one draw per rate (Ray Tune's basic variant generator), seeded per strategy")


def _quiet_tune() -> None:
    """Ray Tune's own tables and hints off: the command prints a line per trial instead."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


def domain(bounds: Range) -> Any:
    """The Ray Tune domain of a knob's range."""
    low, high = bounds.low, bounds.high
    if bounds.integer:
        return ray_tune.lograndint(int(low), int(high) + 1) if bounds.log else ray_tune.randint(int(low), int(high) + 1)
    return ray_tune.loguniform(low, high) if bounds.log else ray_tune.uniform(low, high)


def trial(values: dict[str, Any], *, base: dict[str, Any], strategy: str, directory: str, parent_run_id: str,
          metric: str) -> None:
    """One Tune trial: a Forgetless run of ``strategy`` with ``values`` on the tuning stream,
    reporting ``metric`` (as ``score``, higher better) after each finished task."""
    from actors.launch import run_experiment

    trial_id = ray_tune.get_context().get_trial_id()
    config = with_values(validate_config(base, origin="tune's stream"), strategy, values,
                         output_dir=str(Path(directory) / strategy / trial_id))
    config = config.model_copy(update={"mlflow": config.mlflow.model_copy(update={
        "parent_run_id": parent_run_id, "run_name": f"{strategy} {trial_id}"})})
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["report"] = run_experiment(config, progress=False)
        except BaseException as exc:  # noqa: BLE001 - raised below, in the trial's own thread
            outcome["error"] = exc

    runner = threading.Thread(target=work, name="forgetless-trial", daemon=True)
    runner.start()
    report_path, reported = Path(config.output_dir) / "report.json", 0
    sign = -1.0 if metric in MINIMIZED else 1.0
    while True:
        runner.join(timeout=1.0)
        done = not runner.is_alive()
        try:  # the report is replaced atomically at each task's commit
            report = RunReport.read(report_path)
        except Exception:  # noqa: BLE001 - not written yet
            report = None
        if report is not None and report.finished_tasks > reported:
            matrix = ForgettingMatrix.from_dict(report.model_dump())
            for row in range(reported, report.finished_tasks):
                metrics = {k: v for k, v in matrix.summary(row).items() if k in HEADLINE and v is not None}
                if metrics.get(metric) is not None:
                    ray_tune.report({"score": sign * metrics[metric], **metrics, "task": row + 1})
            reported = report.finished_tasks
        if done:
            break
    if "error" in outcome:  # Tune copies what a trial raises: a plain error with the run's one line
        raise TrialFailedError(f"{type(outcome['error']).__name__}: {outcome['error']}") from None


class TrialFailedError(ForgetlessError, RuntimeError):
    """A trial's run failed (a non-finite loss, a worker out of memory): its reason, for Tune's record."""


class TrialLines(ray_tune.Callback):
    """A line per finished (or failed) trial: its values, its score, how long it took."""

    def __init__(self, strategy: str, trials: int, metric: str):
        self.strategy, self.trials, self.metric, self.done = strategy, trials, metric, 0
        self.started: dict[str, float] = {}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.started[trial.trial_id] = time.perf_counter()

    def _line(self, trial: Any, what: str) -> None:
        self.done += 1
        values = ", ".join(f"{k} {_short(v)}" for k, v in sorted(trial.config.items()))
        seconds = time.perf_counter() - self.started.get(trial.trial_id, time.perf_counter())
        print(f"tune {self.strategy}: trial {self.done}/{self.trials} ({values}): {what} ({seconds:.0f} s)",
              flush=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        value = (trial.last_result or {}).get(self.metric)
        self._line(trial, f"{self.metric} {value:.3f}" if isinstance(value, (int, float)) else "no score")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(trial, "FAILED")


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _reason(result: Any) -> str | None:
    """A failed trial's reason: the run's own line, out of Ray's wrapping of it."""
    if result.error is None:
        return None
    lines = [line.strip() for line in str(result.error).splitlines() if line.strip()]
    marker = f"{TrialFailedError.__name__}: "
    ours = [line.split(marker, 1)[1] for line in lines if marker in line]
    return (ours[-1] if ours else lines[-1] if lines else type(result.error).__name__)[:1000]


def tune(config: RunConfig, strategies: list[str], *, trials: int, tasks: int = 2, validation: float = 0.2,
         metric: str = "avg_acc", space: str | None = None, scheduler: str | None = None, concurrent: int = 1,
         out: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Tune every strategy with ``trials`` Ray Tune trials on the first ``tasks`` tasks' validation
    rows; write ``<out>/<strategy>.yaml`` for each and ``<out>/tuning.json``. Every bad input is
    refused before Ray starts.

    Raises:
        ConfigError, DataError: naming the option or key.
    """
    if trials < 1:
        raise ConfigError(f"tune --trials {trials}: each strategy needs at least 1 trial")
    if concurrent < 1:
        raise ConfigError(f"tune --concurrent {concurrent}: at least 1 trial at a time")
    if metric not in MAXIMIZED + MINIMIZED:
        raise ConfigError(f"tune --metric {metric}: choose one of {', '.join(MAXIMIZED + MINIMIZED)}")
    if metric in ("forgetting", "bwt") and tasks < 2:
        raise ConfigError(f"tune --metric {metric} needs --tasks 2 or more: one task forgets nothing")
    if scheduler not in (None, "asha"):
        raise ConfigError(f"tune --scheduler {scheduler}: only asha (or none)")
    given = read_space(space)
    stray = sorted(set(given) - set(strategies))
    if stray:
        raise ConfigError(f"tune --space {space}: {', '.join(stray)} not among --strategies {','.join(strategies)}")
    config = resolve_paths(config)
    spaces: dict[str, list[Knob]] = {name: search_space(config, name, given.get(name)) for name in strategies}
    directory = Path(out or Path(config.output_dir) / "tuned").resolve()
    tuning, tuned_on = tuning_config(config, tasks=tasks, validation=validation, directory=directory)
    check_tracking(config.mlflow.tracking_uri)
    _quiet_tune()
    connect_ray(config)
    parent = MlflowSink.start(config.mlflow.tracking_uri, config.mlflow.experiment_name,
                              run_name=config.mlflow.run_name or f"{config.experiment}-tune",
                              tags={"forgetless.tune": ",".join(strategies)})
    parent.log_params({**flatten(experiment_dict(tuning)), "tune.strategies": ",".join(strategies),
                       "tune.trials": trials, "tune.tasks": json.dumps(tuned_on["tasks"]), "tune.metric": metric,
                       "tune.validation": validation})
    summary: dict[str, Any] = {"tuned_on": tuned_on, "metric": metric, "trials": trials, "search": SEARCH,
                               "strategies": {}}
    base = tuning.model_dump(by_alias=True)
    status = "FINISHED"
    try:
        for name in strategies:
            knobs = spaces[name]
            trainable = ray_tune.with_resources(
                ray_tune.with_parameters(trial, base=base, strategy=name, directory=str(directory / "trials"),
                                         parent_run_id=parent.run_id, metric=metric), TRIAL_RESOURCES)
            asha = None
            if scheduler == "asha":
                from ray.tune.schedulers import ASHAScheduler

                asha = ASHAScheduler(time_attr="task", max_t=tasks, grace_period=1, reduction_factor=2)
            # the learning rates as a grid, the same for every strategy; the other knobs drawn once per rate
            param_space = {knob.name: ray_tune.grid_search(shared_rates(knob.range, trials, config.seed))
                           if knob.name == "lr" else domain(knob.range) for knob in knobs}
            tuner = ray_tune.Tuner(
                trainable, param_space=param_space,
                tune_config=ray_tune.TuneConfig(
                    metric="score", mode="max", num_samples=1, scheduler=asha,
                    search_alg=_searcher(draw_seed(config.seed, name), concurrent)),
                run_config=ray_tune.RunConfig(
                    name=f"tune-{name.replace('+', '_with_')}", storage_path=str(directory / "ray_tune"), verbose=0,
                    callbacks=[TrialLines(name, trials, metric)] if progress else [],
                    failure_config=ray_tune.FailureConfig(max_failures=0)))
            grid = tuner.fit()
            records = []
            for result in grid:
                values = {k: result.config[k] for k in (knob.name for knob in knobs)}
                score = (result.metrics or {}).get(metric)
                records.append({"values": values, metric: score, "learning_acc": (result.metrics or {}).get("learning_acc"),
                                "status": "FAILED" if result.error else "FINISHED",
                                "error": _reason(result), "tasks_reported": (result.metrics or {}).get("task"),
                                "path": result.path})
            finished = [r for r in records if r["status"] == "FINISHED" and r["tasks_reported"] == len(tuned_on["tasks"])]
            entry: dict[str, Any] = {"knobs": {k.name: vars(k.range) for k in knobs}, "trials": records}
            best = best_trial(finished, metric)
            if best is not None:
                entry["best"] = {"values": best["values"], metric: best[metric]}
                write_tuned(directory / f"{name}.yaml", name, best["values"], record={
                    **tuned_on, "metric": metric, "score": best[metric], "trials": trials,
                    "finished_trials": len(finished), "search": SEARCH,
                    "scheduler": scheduler or "none"})
                parent.log_metrics({f"{name.replace('+', '_with_')}/best_{metric}": best[metric]}, step=0)
            else:
                status = "FAILED"
                entry["best"] = None
                print(f"tune {name}: no trial finished every task; nothing written for it", file=sys.stderr)
            summary["strategies"][name] = entry
    except BaseException:
        parent.end("KILLED")
        raise
    summary["mlflow"] = {"tracking_uri": parent.shown_uri, "parent_run_id": parent.run_id,
                         "experiment_id": parent.experiment_id}
    summary_path = directory / "tuning.json"
    write_atomic(summary_path, json.dumps(summary, indent=2, default=str))
    parent.log_artifact(summary_path)
    for name in strategies:
        if (directory / f"{name}.yaml").is_file():
            parent.log_artifact(directory / f"{name}.yaml")
    parent.end(status)
    summary["directory"] = str(directory)
    return summary


def best_trial(records: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """The best of the trials that scored (a finite ``metric``): the highest (``forgetting``: the
    lowest); a tie — a flat landscape, where the metric does not tell the values apart — goes to the
    trial whose tasks were learned best (``learning_acc``), then to the earliest. None: none scored."""
    scored = [r for r in records if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
    if not scored:
        return None
    sign = 1.0 if metric in MAXIMIZED else -1.0
    return max(scored, key=lambda r: (sign * r[metric], r.get("learning_acc") or 0.0))  # max keeps the first


def _searcher(seed: int, concurrent: int) -> Any:
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=seed, max_concurrent=concurrent)

