"""The scheduler: owns the stream order, the accuracy matrix and the run's only MLflow writer.

``Scheduler`` is a plain class (unit-tested with no cluster); ``SchedulerActor`` is the same class
as a Ray actor. Trainer workers pull task plans from it and push results back; the driver polls
``progress`` for its progress bars.
"""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import yaml

from actors.replay import ReplayStore
from actors.tracking import MlflowSink
from pipelines.config import RunConfig, flatten
from pipelines.learner import EvalSet, TaskPlan, checkpoint_dir
from pipelines.metrics import ForgettingMatrix
from pipelines.plots import plot_heatmap
from pipelines.strategies import build_strategy
from pipelines.tasks import TaskStream


class Scheduler:
    """Feeds the task stream in order and records what the trainers report.

    Per task t: ``next_task`` hands out the plan, ``log_step`` receives train losses,
    ``record_eval`` fills row t of the matrix and logs the metrics after task t.
    """

    def __init__(self, config: RunConfig, stream: TaskStream, *, sink: MlflowSink | None = None):
        self.config = config
        self.stream = stream
        self.strategy = build_strategy(config.strategy)
        self.matrix = ForgettingMatrix(stream.names)
        self.output_dir = Path(config.output_dir)
        self.sink = sink or MlflowSink.start(
            config.mlflow.tracking_uri, config.mlflow.experiment_name,
            run_name=config.mlflow.run_name or (f"{config.strategy.name}-seed{config.seed}"
                                                if config.mlflow.parent_run_id else config.experiment),
            tags={"forgetless.strategy": config.strategy.name, "forgetless.tasks": ",".join(stream.names),
                  **({"mlflow.parentRunId": config.mlflow.parent_run_id} if config.mlflow.parent_run_id else {})},
        )
        self.sink.log_params(flatten(config))
        self.sink.log_params({"stream.num_tasks": len(stream)})
        self.replay: ReplayStore | None = None
        if config.replay.enabled or self.strategy.replay_ratio > 0:
            self.replay = ReplayStore.create(config.replay, seed=config.seed,
                                             directory=config.replay.directory or self.output_dir / "replay")
        self._cursors: dict[int, int] = {}
        self._plans: dict[int, TaskPlan] = {}
        self._history: list[dict[str, Any]] = []  # metrics after each task
        self._train_stats: dict[str, dict[str, float]] = {}
        self._checkpoints: dict[str, str] = {}
        self._failure: str | None = None
        self._finished: dict[str, Any] | None = None
        self._started = time.time()
        self._progress: dict[str, Any] = {"phase": "starting", "task_index": -1, "task": None, "step": 0,
                                          "num_steps": 0, "loss": None, "global_step": 0}

    # ------------------------------------------------------------------ trainers call these
    @property
    def run_id(self) -> str:
        return self.sink.run_id

    def eval_sets(self) -> list[EvalSet]:
        return [EvalSet(t.name, t.metric, t.sources("eval"), t.targets("eval")) for t in self.stream]

    def set_phase(self, phase: str) -> None:
        self._progress["phase"] = phase

    def next_task(self, rank: int = 0) -> TaskPlan | None:
        """The next plan for ``rank``, or None at the end of the stream. Every rank gets the same plans."""
        index = self._cursors.get(rank, 0)
        if index >= len(self.stream) or self._failure is not None:
            return None
        self._cursors[rank] = index + 1
        if index not in self._plans:
            task = self.stream[index]
            teacher = None
            if self.strategy.needs_teacher and index:  # saved by the trainers before any asks for this plan
                teacher = str(checkpoint_dir(self.output_dir, index - 1, self.stream[index - 1].name))
            max_steps = self.strategy.plan_max_steps(self.stream, index, self.config.training) or task.max_steps
            self._plans = {index: TaskPlan(index=index, name=task.name,
                                           examples=self.strategy.training_examples(self.stream, index),
                                           epochs=task.epochs, max_steps=max_steps, teacher_dir=teacher)}
            self._progress.update(phase="train", task_index=index, task=task.name, step=0, num_steps=0, loss=None)
        return self._plans[index]

    def log_step(self, task_index: int, step: int, num_steps: int, loss: float, global_step: int) -> None:
        self._progress.update(step=step + 1, num_steps=num_steps, loss=loss, global_step=global_step)
        if step + 1 == num_steps:
            self._progress["phase"] = "eval"
        self.sink.log_metrics({"train_loss": loss, f"train_loss/{self.stream[task_index].name}": loss},
                              step=global_step)

    def record_baseline(self, accuracies: dict[str, float]) -> None:
        self.matrix.record_baseline(accuracies)
        self.sink.log_metrics({f"baseline/{k}": v for k, v in accuracies.items()}, step=0)

    def record_eval(self, task_index: int, accuracies: dict[str, float], *, train_stats: dict[str, float] | None = None,
                    checkpoint: str | None = None) -> dict[str, float | None]:
        """Fill row ``task_index``; log acc/<task> and the metrics after it (step = task index)."""
        self.matrix.record(task_index, accuracies)
        metrics = self.matrix.summary(task_index)
        self._history.append({"task_index": task_index, "task": self.stream[task_index].name, **metrics})
        name = self.stream[task_index].name
        if train_stats:
            self._train_stats[name] = train_stats
        if checkpoint:
            self._checkpoints[name] = checkpoint
        timing = {f"time/{k}": train_stats[k] for k in ("seconds", "eval_seconds") if train_stats and k in train_stats}
        self.sink.log_metrics({**{f"acc/{k}": v for k, v in accuracies.items()}, **metrics, **timing},
                              step=task_index)
        self._write_matrix()
        if self.replay is not None:
            self._remember(task_index)
        return metrics

    def _remember(self, task_index: int) -> None:
        """Insert task ``task_index``'s training examples into the replay store (a seeded subset
        of ``replay.rows_per_task`` rows, or all); log the store's size."""
        task = self.stream[task_index]
        sources, targets = task.sources("train"), task.targets("train")
        chosen = np.arange(len(sources))
        limit = self.config.replay.rows_per_task
        if limit and limit < len(chosen):
            chosen = np.sort(np.random.default_rng([self.config.seed, task_index]).choice(len(chosen), limit,
                                                                                          replace=False))
        rows = pa.table({
            "example_id": [f"{task.name}:{i}" for i in chosen],
            "task_id": pa.array([task_index] * len(chosen), pa.int32()),
            "task_name": [task.name] * len(chosen),
            "source": [sources[i] for i in chosen],
            "target": [targets[i] for i in chosen],
        })
        self.replay.insert(rows)
        stats = self.replay.stats()
        self.sink.log_metrics({"replay/rows": sum(s.num_rows for s in stats),
                               "replay/bytes": sum(s.bytes for s in stats)}, step=task_index)

    def replay_store(self) -> ReplayStore | None:
        """The run's replay store handle (picklable; trainers sample through it)."""
        return self.replay

    def replay_stats(self) -> dict[str, Any] | None:
        if self.replay is None:
            return None
        stats = self.replay.stats()
        per_task: dict[str, int] = {}
        for shard in stats:
            for name, count in shard.rows_per_task.items():
                per_task[name] = per_task.get(name, 0) + count
        return {"num_shards": len(stats), "rows": sum(s.num_rows for s in stats), "rows_per_task": per_task,
                "rows_per_shard": [s.num_rows for s in stats], "bytes": sum(s.bytes for s in stats),
                "directory": self.replay.directory}

    def fail(self, reason: str) -> None:
        """A trainer hit an error: remember why (the first reason wins) and hand out no more tasks."""
        if self._failure is None:
            self._failure = reason
            self._progress["phase"] = "failed"

    # ------------------------------------------------------------------ the driver calls these
    def progress(self) -> dict[str, Any]:
        return {**self._progress, "rows": self.matrix.num_rows, "num_tasks": len(self.stream)}

    def failure(self) -> str | None:
        return self._failure

    def _write_matrix(self) -> tuple[Path, Path]:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        matrix_path = self.output_dir / "acc_matrix.json"
        matrix_path.write_text(json.dumps(self.matrix.to_dict(), indent=2))
        heatmap_path = plot_heatmap(self.matrix, self.output_dir / "acc_heatmap.png",
                                    title=f"{self.config.experiment} ({self.config.strategy.name})")
        return matrix_path, heatmap_path

    def report(self) -> dict[str, Any]:
        rows = self.matrix.num_rows
        metrics = self.matrix.summary(rows - 1) if rows else {"avg_acc": None, "forgetting": None, "bwt": None,
                                                              "fwt": None}
        return {
            **self.matrix.to_dict(),
            "metrics": metrics,
            "metrics_per_task": self._history,
            "strategy": self.config.strategy.name,
            "strategy_config": self.config.strategy.model_dump(mode="json", by_alias=True),
            **({"note": "joint trains once, at the last task, on every task's data: only the final row "
                        "(and avg_acc) is meaningful; forgetting, bwt and fwt are not defined for it"}
               if self.config.strategy.name == "joint" else {}),
            "experiment": self.config.experiment,
            "seed": self.config.seed,
            "complete": rows == len(self.stream),
            "train": self._train_stats,
            "between_task_overhead_s": self.between_task_overhead(),
            "checkpoints": self._checkpoints,
            "mlflow": {"tracking_uri": self.sink.tracking_uri, "run_id": self.sink.run_id},
            "output_dir": str(self.output_dir),
            "seconds": round(time.time() - self._started, 1),
        }

    def between_task_overhead(self) -> list[float]:
        """Seconds from the end of training task t to the start of task t+1, minus t's evaluation.

        What is left is the cost of scheduling: checkpointing, reporting, fetching the next plan.
        """
        stats = [self._train_stats[name] for name in self.stream.names if name in self._train_stats]
        return [round(nxt["started_at"] - cur["ended_at"] - cur.get("eval_seconds", 0.0), 4)
                for cur, nxt in zip(stats, stats[1:])]

    def finish(self, status: str = "FINISHED", reason: str | None = None) -> dict[str, Any]:
        """Write artifacts, end the MLflow run with ``status``; idempotent. Returns the report."""
        if self._finished is not None:
            return self._finished
        if reason:
            self.fail(reason)
        report = self.report()
        report["status"] = status
        if self._failure:
            report["error"] = self._failure
        try:
            if self.replay is not None:  # snapshots stay in the output dir; the actors go
                report["replay"] = self.replay_stats()
                self.replay.snapshot()
                self.replay.shutdown()
            matrix_path, heatmap_path = self._write_matrix()
            config_path = self.output_dir / "config.yaml"
            config_path.write_text(yaml.safe_dump(self.config.model_dump(mode="json"), sort_keys=False))
            report_path = self.output_dir / "report.json"
            report_path.write_text(json.dumps(report, indent=2))
            for path in (matrix_path, heatmap_path, config_path, report_path):
                self.sink.log_artifact(path)
            if self._failure:
                self.sink.set_tags({"forgetless.error": self._failure[:5000]})
        finally:
            self.sink.end(status)  # never leave the run RUNNING
        self._progress["phase"] = "done" if status == "FINISHED" else "failed"
        self._finished = report
        return report


def format_exception(exc: BaseException) -> str:
    """One line for the user, with the innermost frame for whoever debugs it."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


# Thin actor: same class, scheduled with no CPU so it never competes with the trainers.
SchedulerActor = ray.remote(num_cpus=0, max_restarts=0)(Scheduler)
