"""The one MLflow writer of a run: an explicit ``MlflowClient`` and ``run_id``, no global active run.

Using the client rather than ``mlflow.start_run`` means a run never collides with a run some other
code left active in the process, and a run can be resumed by id.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient

_MAX_PARAM_CHARS = 6000
_BATCH = 100


def default_artifact_location(tracking_uri: str) -> str | None:
    """Artifacts of a SQLite store go in ``mlartifacts/`` beside the database file.

    Otherwise MLflow would use ``./mlruns`` relative to whichever process created the experiment.
    A server decides for itself (None).
    """
    parsed = urlparse(tracking_uri)
    if parsed.scheme == "sqlite":
        db_path = Path(tracking_uri.removeprefix("sqlite:///"))  # sqlite:////abs or sqlite:///relative
        return (db_path.parent.resolve() / "mlartifacts").as_uri()
    return None


class MlflowSink:
    """Writes one MLflow run. Create with ``start`` (new run) or ``resume`` (existing run_id)."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri=tracking_uri)

    @classmethod
    def start(
        cls, tracking_uri: str, experiment_name: str, *, run_name: str | None = None, tags: dict[str, str] | None = None
    ) -> MlflowSink:
        client = MlflowClient(tracking_uri=tracking_uri)
        experiment = client.get_experiment_by_name(experiment_name)
        if experiment is None:
            experiment_id = client.create_experiment(
                experiment_name, artifact_location=default_artifact_location(tracking_uri)
            )
        else:
            experiment_id = experiment.experiment_id
        run = client.create_run(experiment_id, run_name=run_name, tags=tags or {})
        return cls(tracking_uri, run.info.run_id)

    @classmethod
    def resume(cls, tracking_uri: str, run_id: str) -> MlflowSink:
        """Continue writing an existing run (marks it RUNNING again)."""
        client = MlflowClient(tracking_uri=tracking_uri)
        client.get_run(run_id)  # raises MlflowException naming the id if it does not exist
        client.update_run(run_id, status="RUNNING")
        return cls(tracking_uri, run_id)

    def log_params(self, params: dict[str, Any]) -> None:
        items = [Param(k, str(v)[:_MAX_PARAM_CHARS]) for k, v in params.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _BATCH])

    def log_metrics(self, metrics: dict[str, float | None], *, step: int) -> None:
        """Log finite values; undefined (None) or NaN metrics are skipped, not logged as 0."""
        now = mlflow.utils.time.get_current_time_millis()
        items = [
            Metric(k, float(v), now, step)
            for k, v in metrics.items()
            if v is not None and math.isfinite(float(v))
        ]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, metrics=items[i : i + _BATCH])

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        """Terminate the run: FINISHED, FAILED or KILLED."""
        RunStatus.from_string(status)  # raises on a typo
        self.client.set_terminated(self.run_id, status=status)
