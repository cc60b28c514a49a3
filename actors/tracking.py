"""The one MLflow writer of a run: an explicit ``MlflowClient`` and ``run_id``, no global active run.

Using the client rather than ``mlflow.start_run`` means a run never collides with a run some other
code left active in the process, and a run can be resumed by id.

MLflow is a window onto a run, not part of it: ``BufferedSink`` writes from a background thread,
so a slow or unreachable tracking server never stalls training. Records wait in order and are
retried until the server is back; whatever is still unwritten when the run ends goes to a file
beside the report, which ``forgetless resume`` sends later. The local files (matrix, report) are
always written first.

MLflow itself (~1 s of imports) is imported where a client is made: the driver of a
``forgetless run`` checks the store (``check_tracking``) and prints links, and only the
scheduler writes; the driver does without it.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from pipelines.config import RunConfig
from pipelines.errors import ForgetlessError
from pipelines.redaction import redact
from pipelines.report import Resumption, RunReport
from pipelines.rundir import inside
from storage.files import write_atomic

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger("forgetless")
_MAX_PARAM_CHARS = 6000
# The most records a run keeps in memory for MLflow during an outage; later ones wait in its
# mlflow-pending.jsonl (about 200 bytes each) and go out in order once MLflow is back.
MAX_QUEUED = 10_000
_BATCH = 100
# A call to an unreachable server fails after one retry and 10 s, not MLflow's default of
# minutes; the buffered sink retries on its own schedule.
CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


# MLflow 3's UI opens an experiment in its GenAI view unless told it holds model training; there
# our runs would be listed as "evaluation runs" without their metric charts.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
EXPERIMENT_TAGS = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}


def ui_link(ui_address: str, experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow UI page of an experiment (or one of its runs) in the model-training view."""
    base = f"{ui_address.rstrip('/')}/#/experiments/{experiment_id}"
    return f"{base}/runs/{run_id}?workflowType=machine_learning" if run_id else f"{base}?workflowType=machine_learning"


class TrackingCredentialsError(ForgetlessError, PermissionError):
    """The tracking server wants credentials it was not given (or refused them), or a URI carries some."""


class TrackingUnreachableError(ForgetlessError, ConnectionError):
    """The MLflow tracking store cannot be reached or written; the message names its URI."""


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a SQLite store (``sqlite:////abs`` or ``sqlite:///relative``); None for
    any other scheme."""
    if urlparse(tracking_uri).scheme != "sqlite":
        return None
    return Path(tracking_uri.removeprefix("sqlite:///"))


def default_artifact_location(tracking_uri: str) -> str | None:
    """Artifacts of a SQLite store go in ``mlartifacts/`` beside the database file.

    Otherwise MLflow would use ``./mlruns`` relative to whichever process created the experiment.
    A server decides for itself (None).
    """
    db_path = sqlite_path(tracking_uri)
    return None if db_path is None else (db_path.parent.resolve() / "mlartifacts").as_uri()


def check_tracking(tracking_uri: str, *, timeout_s: float = 5.0) -> None:
    """Fail within seconds when the tracking store cannot be used, naming it.

    An HTTP server must answer its ``/health`` endpoint; a SQLite store's directory must exist (or
    be creatable) and be writable. Other schemes are left to MLflow.

    Raises:
        TrackingUnreachableError: with the URI and what went wrong.
    """
    parsed = urlparse(tracking_uri)
    shown = redact(tracking_uri)
    fix = "start it, or set mlflow.tracking_uri to a reachable server (or sqlite:///path/to/mlflow.db)"
    if parsed.scheme in ("http", "https") and "@" in parsed.netloc:
        bare = parsed._replace(netloc=parsed.netloc.rpartition("@")[2]).geturl()
        raise TrackingCredentialsError(
            f"mlflow.tracking_uri {shown} carries credentials; a run never takes them from a URI (it would copy them "
            f"into what it saves and logs). Give the URI without them ({bare}) and the credentials in the environment "
            "of the run: MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN")
    if parsed.scheme in ("http", "https"):
        url = tracking_uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                if response.status != 200:
                    raise TrackingUnreachableError(f"MLflow tracking server {shown} answered "
                                                   f"{response.status} on /health; {fix}")
        except urllib.error.HTTPError as exc:
            raise TrackingUnreachableError(f"MLflow tracking server {shown} answered {exc.code} on /health "
                                           f"({exc.reason}); {fix}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingUnreachableError(f"MLflow tracking server {shown} is unreachable ({reason}); "
                                           f"{fix}") from None
        _check_credentials(tracking_uri, shown, timeout_s)
    elif parsed.scheme == "sqlite":
        db_path = sqlite_path(tracking_uri)
        directory = db_path.parent
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingUnreachableError(f"MLflow store {shown}: cannot create {directory} ({exc}); "
                                           f"{fix}") from None
        if not os.access(directory, os.W_OK) or (db_path.exists() and not os.access(db_path, os.W_OK)):
            raise TrackingUnreachableError(f"MLflow store {shown}: {db_path} is not writable; {fix}")


def auth_headers() -> dict[str, str]:
    """The credentials MLflow's own client sends, read from the environment as it reads them:
    ``MLFLOW_TRACKING_TOKEN`` (a bearer token), else ``MLFLOW_TRACKING_USERNAME`` and
    ``MLFLOW_TRACKING_PASSWORD`` (basic). Never stored: only sent."""
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return {"Authorization": f"Bearer {token}"}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    return {}


def _check_credentials(tracking_uri: str, shown: str, timeout_s: float) -> None:
    """/health answers anyone: ask for one experiment, as a run would, with the run's credentials."""
    url = tracking_uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1"
    headers = auth_headers()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s):
            return
    except urllib.error.HTTPError as exc:
        if exc.code not in (401, 403):
            return  # an older server without this endpoint, or a proxy's own page: the run will tell
        given = ("MLFLOW_TRACKING_TOKEN" if os.environ.get("MLFLOW_TRACKING_TOKEN")
                 else "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" if headers else None)
        if exc.code == 403:
            raise TrackingCredentialsError(f"MLflow tracking server {shown} refused the user in {given} (403): it "
                                           "lacks permission to read experiments; ask the server's admin") from None
        raise TrackingCredentialsError(
            f"MLflow tracking server {shown} " + (f"refused the credentials in {given} (401); check them"
                                                  if given else "needs credentials (401)")
            + ": set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the "
              "environment of the run") from None
    except (urllib.error.URLError, OSError) as exc:
        raise TrackingUnreachableError(f"MLflow tracking server {shown} answers /health but not its API "
                                       f"({getattr(exc, 'reason', exc)})") from None


def client_of(tracking_uri: str) -> MlflowClient:
    """An ``MlflowClient`` of the store (MLflow imported here, on first use)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def now_ms() -> int:
    """A metric's timestamp: milliseconds since the epoch, as MLflow stamps them."""
    return int(time.time() * 1000)


class MlflowSink:
    """Writes one MLflow run, synchronously. Create with ``start`` (new run) or ``resume`` (by run_id)."""

    def __init__(self, tracking_uri: str, run_id: str, experiment_id: str | None = None):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.client = client_of(tracking_uri)

    @property
    def shown_uri(self) -> str:
        """The tracking URI as it may be printed or stored: its credentials redacted."""
        return redact(self.tracking_uri)

    @classmethod
    def start(
        cls, tracking_uri: str, experiment_name: str, *, run_name: str | None = None, tags: dict[str, str] | None = None
    ) -> MlflowSink:
        client = client_of(tracking_uri)
        experiment = client.get_experiment_by_name(experiment_name)
        if experiment is None:
            experiment_id = client.create_experiment(
                experiment_name, artifact_location=default_artifact_location(tracking_uri), tags=EXPERIMENT_TAGS
            )
        else:
            experiment_id = experiment.experiment_id
            if experiment.tags.get(EXPERIMENT_KIND_TAG) is None:  # made before the kind was set, or by hand
                client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        run = client.create_run(experiment_id, run_name=run_name,
                                tags={k: redact(str(v)) for k, v in (tags or {}).items()})
        return cls(tracking_uri, run.info.run_id, experiment_id)

    @classmethod
    def resume(cls, tracking_uri: str, run_id: str) -> MlflowSink:
        """Continue writing an existing run (marks it RUNNING again)."""
        client = client_of(tracking_uri)
        run = client.get_run(run_id)  # raises MlflowException naming the id if it does not exist
        client.update_run(run_id, status="RUNNING")
        return cls(tracking_uri, run_id, run.info.experiment_id)

    def status(self) -> str:
        return self.client.get_run(self.run_id).info.status

    def params(self) -> dict[str, str]:
        return dict(self.client.get_run(self.run_id).data.params)

    def last_step(self, key: str) -> int | None:
        """The highest step logged for metric ``key`` (None: never logged)."""
        history = self.client.get_metric_history(self.run_id, key)
        return max((m.step for m in history), default=None)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, redact(str(v))[:_MAX_PARAM_CHARS]) for k, v in params.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _BATCH])

    def log_metrics(self, metrics: dict[str, float | None], *, step: int, timestamp: int | None = None) -> None:
        """Log finite values; undefined (None) or NaN metrics are skipped, not logged as 0."""
        from mlflow.entities import Metric

        now = timestamp or now_ms()
        items = [
            Metric(k, float(v), now, step)
            for k, v in metrics.items()
            if v is not None and math.isfinite(float(v))
        ]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, metrics=items[i : i + _BATCH])

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():  # an error's text may quote a URI with its password
            self.client.set_tag(self.run_id, key, redact(str(value)))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        """Terminate the run: FINISHED, FAILED or KILLED."""
        from mlflow.entities import RunStatus

        RunStatus.from_string(status)  # raises on a typo
        self.client.set_terminated(self.run_id, status=status)


def mark_orphaned_runs(tracking_uri: str, experiment_name: str) -> list[str]:
    """Mark KILLED the runs of this experiment that say RUNNING but whose process is gone.

    A run killed with SIGKILL (or whose machine died) cannot end its own MLflow run. Runs started
    on this host carry their output_dir in a tag; when nothing holds that directory's lock any
    more, nothing is running there. Runs of other hosts are left alone (their lock cannot be
    seen from here). Returns the run ids marked.
    """
    from pipelines.rundir import OutputDir

    db_path = sqlite_path(tracking_uri)
    if db_path is not None and not db_path.exists():
        return []  # a store not made yet holds no run (opening it here would make it, which takes seconds)
    client = client_of(tracking_uri)
    try:
        experiment = client.get_experiment_by_name(experiment_name)
        if experiment is None:
            return []
        runs = client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'", max_results=200)
    except Exception as exc:  # noqa: BLE001 - housekeeping must never stop a run
        log.debug("could not look for orphaned MLflow runs: %s", exc)
        return []
    marked = []
    host = socket.gethostname()
    for run in runs:
        directory = run.data.tags.get("forgetless.output_dir")
        if run.data.tags.get("forgetless.host") != host or not directory or not Path(directory).is_dir():
            continue
        if OutputDir(directory).is_locked_elsewhere():
            continue  # alive
        try:
            report = json.loads((Path(directory) / "report.json").read_text())
        except (OSError, ValueError):
            continue
        if report.get("status") != "RUNNING" or report.get("mlflow", {}).get("run_id") != run.info.run_id:
            continue  # it ended, and only MLflow has not heard yet (records wait in mlflow-pending.jsonl)
        client.set_tag(run.info.run_id, "forgetless.error",
                       f"the process ended without a word (killed) while the run was in progress; noticed at "
                       f"{time.strftime('%Y-%m-%d %H:%M:%S')}. Continue it with `forgetless resume {directory}`")
        client.set_terminated(run.info.run_id, status="KILLED")
        marked.append(run.info.run_id)
    if marked:
        log.warning("marked %d MLflow run(s) KILLED whose process had died: %s", len(marked), ", ".join(marked))
    return marked


class BufferedSink:
    """An ``MlflowSink`` behind a queue and a writer thread: callers never wait on MLflow.

    Records are written in the order they were given; a failed write is retried (backing off to
    ``max_backoff_s``) until it succeeds, so an outage delays records but never drops or reorders
    them. ``end`` waits up to a deadline; records it could not write are saved to ``pending_path``.

    Memory is bounded: past ``max_queued`` records (a long outage), new records are appended to
    ``pending_path`` instead, and read back in order once the queue has drained.
    """

    def __init__(self, sink: MlflowSink, *, pending_path: str | Path | None = None, max_backoff_s: float = 15.0,
                 max_queued: int = MAX_QUEUED):
        self.sink = sink
        self.pending_path = Path(pending_path) if pending_path else None
        self.max_backoff_s = max_backoff_s
        self.max_queued = max_queued
        self._spilled = 0  # records in pending_path, after every one in memory
        self._records: deque[dict[str, Any]] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._outage: str | None = None
        self._thread = threading.Thread(target=self._write_forever, name="mlflow-writer", daemon=True)
        self._thread.start()

    @property
    def tracking_uri(self) -> str:
        return self.sink.tracking_uri

    @property
    def shown_uri(self) -> str:
        return self.sink.shown_uri

    @property
    def experiment_id(self) -> str | None:
        return self.sink.experiment_id

    @property
    def run_id(self) -> str:
        return self.sink.run_id

    @property
    def outage(self) -> str | None:
        """Since when and why writes are failing (None while MLflow is keeping up)."""
        return self._outage

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._records) + self._spilled

    # ------------------------------------------------------------------ what callers use
    def _put(self, record: dict[str, Any]) -> None:
        with self._cond:
            if self.pending_path is not None and (self._spilled or len(self._records) >= self.max_queued):
                with open(self.pending_path, "a", encoding="utf-8") as spill:  # after every queued record
                    spill.write(json.dumps(record) + "\n")
                self._spilled += 1
            else:
                self._records.append(record)
            self._cond.notify_all()

    def _take_back_spilled(self) -> None:
        """Under the lock, the queue empty: the oldest spilled records back into memory."""
        records = load_pending(self.pending_path)
        self._records.extend(records[: self.max_queued])
        rest = records[self.max_queued:]
        if rest:
            _write_pending(self.pending_path, rest)
        else:
            self.pending_path.unlink(missing_ok=True)
        self._spilled = len(rest)

    def log_params(self, params: dict[str, Any]) -> None:
        self._put({"kind": "params", "values": {k: str(v)[:_MAX_PARAM_CHARS] for k, v in params.items()}})

    def log_metrics(self, metrics: dict[str, float | None], *, step: int) -> None:
        values = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        if values:
            self._put({"kind": "metrics", "values": values, "step": step,
                       "timestamp": now_ms()})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._put({"kind": "tags", "values": dict(tags)})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._put({"kind": "artifact", "path": str(path), "artifact_path": artifact_path})

    # ------------------------------------------------------------------ the writer
    def _write_forever(self) -> None:
        backoff = 0.5
        while True:
            with self._cond:
                while not self._records and not self._spilled and not self._closing:
                    self._cond.wait()
                if not self._records and self._spilled and not self._closing:
                    self._take_back_spilled()
                if not self._records:
                    return
                record = self._records[0]
            try:
                write_record(self.sink, record)
            except Exception as exc:  # noqa: BLE001 - any failure of the server: wait and retry
                if self._outage is None:
                    self._outage = f"since {time.strftime('%H:%M:%S')}: {type(exc).__name__}: {redact(str(exc))[:300]}"
                    log.warning("MLflow at %s is not taking writes (%s); training goes on, records are kept "
                                "and retried", self.sink.shown_uri, self._outage)
                with self._cond:
                    if self._closing:
                        return
                    self._cond.wait(timeout=backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
                continue
            if self._outage is not None:
                log.warning("MLflow at %s is back after an outage %s", self.sink.shown_uri, self._outage)
                self._outage = None
            backoff = 0.5
            with self._cond:
                self._records.popleft()
                self._cond.notify_all()

    def flush(self, timeout_s: float) -> int:
        """Wait until every record is written or ``timeout_s`` passed; returns how many are left."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while (self._records or self._spilled) and time.monotonic() < deadline:
                self._cond.notify_all()
                self._cond.wait(timeout=min(0.5, max(0.01, deadline - time.monotonic())))
            return len(self._records) + self._spilled

    def end(self, status: str = "FINISHED", *, timeout_s: float = 60.0) -> int:
        """Write what is queued, then end the run with ``status``. Returns the records left unwritten
        (saved to ``pending_path``, with the status, for ``forgetless resume`` to send); 0 when all is in."""
        from mlflow.entities import RunStatus

        RunStatus.from_string(status)
        self._put({"kind": "end", "status": status})
        left = self.flush(timeout_s)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            records = list(self._records)
            self._records.clear()
        self._thread.join(timeout=15)
        if self._spilled:  # the queue holds the older records: they go first
            _write_pending(self.pending_path, [*records, *load_pending(self.pending_path)])
        elif records and self.pending_path is not None:
            save_pending(self.pending_path, records)
        return left

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout=15)


def write_record(sink: MlflowSink, record: dict[str, Any]) -> None:
    """Send one queued record (params, metrics, tags, an artifact, or the run's end)."""
    kind = record["kind"]
    if kind == "params":
        sink.log_params(record["values"])
    elif kind == "metrics":
        sink.log_metrics(record["values"], step=record["step"], timestamp=record["timestamp"])
    elif kind == "tags":
        sink.set_tags(record["values"])
    elif kind == "artifact":
        if Path(record["path"]).exists():
            sink.log_artifact(record["path"], record["artifact_path"])
    elif kind == "end":
        sink.end(record["status"])
    else:
        raise ValueError(f"unknown MLflow record kind {kind!r}")


def save_pending(path: Path, records: list[dict[str, Any]]) -> None:
    _write_pending(path, [*load_pending(path), *records])


def _write_pending(path: Path, records: list[dict[str, Any]]) -> None:
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


def load_pending(path: Path) -> list[dict[str, Any]]:
    """Records a run could not send to MLflow (a file per output_dir; unreadable lines are named)."""
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            log.warning("%s:%d is not a JSON record; skipped", path, number)
    return records


def send_pending(sink: MlflowSink, path: Path) -> int:
    """Write the records saved in ``path`` to ``sink``'s run (in order), then remove the file.
    Returns how many were sent. Raises what MLflow raises; the file stays until all went through.

    An artifact is sent only from the run's own directory (the file's): the file may sit on a
    shared volume, and a line naming any other file would upload it.

    Raises:
        DataError: an artifact record whose path leads out of the run, naming the line.
    """
    records = load_pending(path)
    for number, record in enumerate(records, start=1):
        if record.get("kind") == "artifact":
            inside(path.parent, str(record.get("path", "")), file=f"{path}, record {number}", key="path")
    for sent, record in enumerate(records):
        try:
            write_record(sink, record)
        except Exception:
            _write_pending(path, records[sent:])  # never send one twice
            raise
    path.unlink(missing_ok=True)
    return len(records)


def open_run(config: RunConfig, *, tags: dict[str, str], params: dict[str, Any]) -> MlflowSink:
    """A new run's MLflow run: named, tagged (a child of ``mlflow.parent_run_id`` when set), its
    config as params."""
    mlflow_config = config.mlflow
    parent = {"mlflow.parentRunId": mlflow_config.parent_run_id} if mlflow_config.parent_run_id else {}
    sink = MlflowSink.start(
        mlflow_config.tracking_uri, mlflow_config.experiment_name,
        run_name=mlflow_config.run_name or (f"{config.strategy_name}-seed{config.seed}"
                                            if mlflow_config.parent_run_id else config.experiment),
        tags={**tags, **parent})
    sink.log_params(params)
    return sink


def reopen_run(config: RunConfig, previous: RunReport, *, tags: dict[str, str], params: dict[str, Any],
               sink: MlflowSink | None, pending: Path, resumption: Resumption, attempt: int) -> tuple[MlflowSink, int]:
    """A resumed run's MLflow run, the one its earlier attempts wrote: what they could not send is
    sent, an attempt that died without a word is ended KILLED, the resumption is tagged, params it
    lacks are added. Returns the sink and the last ``train_loss`` step already logged (-1: none), so
    a redone task logs no step twice."""
    sink = sink or MlflowSink(config.mlflow.tracking_uri, previous.mlflow.run_id, previous.mlflow.experiment_id)
    if sink.experiment_id is None:  # a report written before it was recorded
        sink.experiment_id = sink.client.get_run(sink.run_id).info.experiment_id
    send_pending(sink, pending)  # what the last attempt could not send
    if previous.status == "RUNNING":  # the last attempt died without a word: say so before going on
        sink.end("KILLED")
    sink.set_tags({**tags, f"forgetless.resume.{attempt}": (
        f"resumed after {resumption.finished_tasks} finished task(s); the previous attempt ended "
        f"{'without a word (killed)' if previous.status == 'RUNNING' else previous.status}"
        + (f"; new tasks {resumption.new_tasks}" if resumption.new_tasks else "")
        + (f"; changed {resumption.changed}" if resumption.changed else ""))})
    sink.client.update_run(sink.run_id, status="RUNNING")
    logged = sink.params()
    sink.log_params({k: v for k, v in params.items() if k not in logged})
    last = sink.last_step("train_loss")
    return sink, -1 if last is None else last
