"""``forgetless compare``: several strategies on the same stream and seeds, one comparison.

One MLflow parent run holds a child run per (strategy, seed), the aggregated metrics and the
plots; ``<output_dir>/comparison.json`` and ``comparison.md`` hold the table.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from actors.launch import RunFailedError, run_experiment
from actors.tracking import MlflowSink, check_tracking
from pipelines.config import STRATEGY_CONFIGS, RunConfig, experiment_dict, flatten, resolve_paths
from pipelines.errors import ConfigError
from pipelines.metrics import ForgettingMatrix
from pipelines.plan import planning_for
from pipelines.plots import plot_comparison
from pipelines.report import RunReport
from storage.files import write_atomic

log = logging.getLogger("forgetless")
METRICS = ("avg_acc", "forgetting", "bwt", "fwt", "learning_acc")
ONLY_AT_END = ("forgetting", "bwt", "fwt")  # undefined for a strategy that trains once, at the end


def _trains_only_at_end(name: str) -> bool:
    return planning_for(STRATEGY_CONFIGS[name]()).trains_only_at_end


def parse_strategies(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in STRATEGY_CONFIGS]
    if unknown or not names:
        raise ConfigError(f"--strategies: unknown {unknown or 'empty list'}; choose from {sorted(STRATEGY_CONFIGS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"--strategies: {names} names a strategy twice")
    return names


def _mean_std(values: list[float | None]) -> dict[str, float | None]:
    defined = [v for v in values if v is not None]
    if not defined:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(defined)), "std": float(np.std(defined, ddof=1)) if len(defined) > 1 else 0.0,
            "n": len(defined)}


def aggregate(reports: dict[str, list[RunReport]]) -> dict[str, Any]:
    """Per strategy: mean and sample std over seeds of each metric, and the mean matrix."""
    out: dict[str, Any] = {}
    for name, runs in reports.items():
        finished = [r for r in runs if r.status == "FINISHED"]
        undefined = ONLY_AT_END if _trains_only_at_end(name) else ()
        entry: dict[str, Any] = {}
        for metric in METRICS:
            values = [None if metric in undefined else r.metrics.get(metric) for r in finished]
            entry[metric] = _mean_std(values)
        if finished:
            entry["acc_matrix_mean"] = np.mean([np.array(r.acc_matrix, dtype=float) for r in finished],
                                               axis=0).tolist()
            entry["baseline_mean"] = np.mean([np.array(r.baseline, dtype=float) for r in finished], axis=0).tolist()
        entry["seeds"] = [r.seed for r in finished]
        entry["runs"] = [{"seed": r.seed, "status": r.status, "run_id": r.mlflow.run_id, "metrics": r.metrics,
                          "error": r.error} for r in runs]
        if undefined:
            entry["note"] = "trained once, on every task at the end: only avg_acc is meaningful"
        out[name] = entry
    return out


def comparison_matrices(tasks: list[str], summary: dict[str, Any]) -> dict[str, ForgettingMatrix]:
    """The mean matrix of each strategy, for the pictures. A strategy that trains only at the end
    (joint) has its earlier rows blanked: they are the untrained model, not forgetting."""
    matrices = {}
    for name, entry in summary.items():
        if "acc_matrix_mean" not in entry:
            continue
        acc = np.array(entry["acc_matrix_mean"], dtype=float)
        if _trains_only_at_end(name):
            acc[:-1] = np.nan
        matrices[name] = ForgettingMatrix(tasks, acc=acc, baseline=np.array(entry["baseline_mean"], dtype=float))
    return matrices


def format_table(tasks: list[str], summary: dict[str, Any], *, seeds: int) -> str:
    def cell(stat: dict[str, Any], signed: bool) -> str:
        if stat["mean"] is None:
            return "n/a"
        mean = f"{stat['mean']:+.3f}" if signed else f"{stat['mean']:.3f}"
        return f"{mean} ± {stat['std']:.3f}" if stat["n"] > 1 else mean

    lines = [f"Stream: {' -> '.join(tasks)}; {seeds} seed(s); mean ± sample std over seeds.", "",
             "| strategy | avg_acc | forgetting | bwt | fwt | learning_acc | final row |", "|---|---|---|---|---|---|---|"]
    for name, entry in summary.items():
        final = entry.get("acc_matrix_mean", [[]])[-1]
        row = ", ".join(f"{v:.2f}" for v in final)
        lines.append(f"| {name} | " + " | ".join(cell(entry[m], m not in ("avg_acc", "learning_acc")) for m in METRICS) + f" | [{row}] |")
    lines += ["", "forgetting = mean over earlier tasks of (best accuracy before the last task - accuracy after it);",
              "bwt = mean of acc[T-1, i] - acc[i, i]; fwt = mean of acc[i-1, i] - baseline[i]; "
              "learning_acc = mean of acc[i, i] (each task just after training it). "
              "joint: only avg_acc is defined."]
    return "\n".join(lines) + "\n"


def compare(config: RunConfig, strategies: list[str], *, seeds: int, progress: bool = True) -> dict[str, Any]:
    """Run every (strategy, seed) on the same stream; returns the comparison written to disk."""
    if seeds < 1:
        raise ConfigError(f"--seeds ({seeds}) must be at least 1")
    config = resolve_paths(config)
    check_tracking(config.mlflow.tracking_uri)
    base = Path(config.output_dir)
    base.mkdir(parents=True, exist_ok=True)
    parent = MlflowSink.start(config.mlflow.tracking_uri, config.mlflow.experiment_name,
                              run_name=config.mlflow.run_name or f"{config.experiment}-compare",
                              tags={"forgetless.compare": ",".join(strategies)})
    parent.log_params({**flatten(experiment_dict(config)), "compare.strategies": ",".join(strategies), "compare.seeds": seeds})
    reports: dict[str, list[RunReport]] = {name: [] for name in strategies}
    status = "FINISHED"
    try:
        for name in strategies:
            for k in range(seeds):
                run_config = config.with_strategy(name, seed=config.seed + k,
                                                  output_dir=str(base / name / f"seed-{config.seed + k}"),
                                                  parent_run_id=parent.run_id)
                if progress:
                    print(f"\n== {name}, seed {config.seed + k} ==", flush=True)
                try:
                    reports[name].append(run_experiment(run_config, progress=progress))
                except RunFailedError as exc:  # one bad run does not sink the comparison
                    log.error("%s seed %s failed: %s", name, config.seed + k, exc)
                    reports[name].append(exc.report)
                    status = "FAILED"
    except BaseException:
        parent.end("KILLED")
        raise
    first = next(r for runs in reports.values() for r in runs)
    tasks = first.tasks
    summary = aggregate(reports)
    comparison = {"tasks": tasks, "seeds": seeds, "strategies": summary,
                  "mlflow": {"tracking_uri": parent.tracking_uri, "parent_run_id": parent.run_id}}
    json_path = base / "comparison.json"
    write_atomic(json_path, json.dumps(comparison, indent=2))
    md_path = base / "comparison.md"
    write_atomic(md_path, format_table(tasks, summary, seeds=seeds))
    plots = plot_comparison(comparison_matrices(tasks, summary), base)
    for name, entry in summary.items():
        parent.log_metrics({f"{name}/{m}": entry[m]["mean"] for m in METRICS}, step=0)
    for path in (json_path, md_path, *plots):
        parent.log_artifact(path)
    parent.end(status)
    return comparison
