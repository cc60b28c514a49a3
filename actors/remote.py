"""Runs on a Ray cluster, seen from outside: submit one as a Ray job, follow it, find a running run
and look at or resize its replay store.

``forgetless submit`` packs the config and every local input file it names (task data, a model or
tokenizer directory, a pretrain config and its corpus, a DeepSpeed file) into the job's working
directory and rewrites those paths to point there; outputs (``output_dir``, the MLflow store)
must be on storage the cluster sees, so they are checked rather than packed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from pipelines.config import RunConfig, load_config
from pipelines.errors import ConfigError, ForgetlessError
from pipelines.redaction import redact, redact_data, redacted_keys

JOB_ENTRYPOINT = "forgetless job config.yaml"  # the run, resumed if its driver dies (see ``supervise``)
# What the probe runs on the cluster before a job is queued: the package, its version and its import
PROBE_ENTRYPOINT = "forgetless version --imports"
_MAX_PACKED_BYTES = 400 * 2**20  # Ray refuses working directories over 512 MiB


class RunNotFoundError(ForgetlessError, LookupError):
    """No running run on the cluster matches what the user named (the message lists those that run)."""


# ------------------------------------------------------------------ submit
def _input_size(local: Path, key: str) -> int:
    """Bytes an input adds to the job, counted before anything is copied. A link inside a packed
    directory may point only inside it (it travels as a link); one that leads out is refused."""
    if not local.is_dir():
        return local.stat().st_size
    root, size = local.resolve(), 0
    for folder, dirs, files in os.walk(local, followlinks=False):
        for name in [*dirs, *files]:
            path = Path(folder) / name
            if path.is_symlink():
                target = path.resolve()
                if not target.is_relative_to(root):
                    raise ConfigError(f"{key}: {path} is a link to {target}, outside {local}; a job packs only what is "
                                      "inside the directory it names. Copy the file in, or remove the link")
            elif name in files:
                size += path.lstat().st_size
    return size


def _pack_path(value: str, key: str, into: Path, packed: list[tuple[str, Path]], *, cwd: Path,
               directory_ok: bool) -> str:
    """Copy a local input into the job's working directory; return the path the job will use.

    Raises:
        ConfigError: a directory where a file is expected, a link out of a packed directory, or
            the inputs so far over what a Ray job takes (checked before this one is copied).
    """
    local = (cwd / Path(value).expanduser()) if not Path(value).expanduser().is_absolute() else Path(value).expanduser()
    if not local.exists():
        return value  # a path on the cluster's storage, or a hub name: used there as written
    if local.is_dir() and not directory_ok:
        raise ConfigError(f"{key}: {local} is a directory; a file is expected here")
    size = _input_size(local, key) + sum(f.lstat().st_size for f in into.rglob("*") if f.is_file())
    if size > _MAX_PACKED_BYTES:
        raise ConfigError(f"the job's inputs come to {size / 2**20:.0f} MiB with {key} ({local}); Ray takes at most "
                          "512 MiB in a job's working directory: put the large ones on storage the cluster sees and "
                          "name them by that path")
    target = Path("inputs") / f"{len(packed):02d}-{local.name}"
    if local.is_dir():
        shutil.copytree(local, into / target, symlinks=True)  # links (all inside it) stay links
    else:
        (into / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(local, into / target)
    packed.append((key, local))
    return str(target)


def _pack_pretrain_config(value: str, into: Path, packed: list[tuple[str, Path]], *, cwd: Path) -> str:
    """A pretrain config is packed with the corpus file it names (its path rewritten in the copy)."""
    local = Path(value).expanduser()
    local = local if local.is_absolute() else cwd / local
    if not local.is_file():
        return value
    data = yaml.safe_load(local.read_text(encoding="utf-8")) or {}
    source = (data.get("corpus") or {}).get("source") or {}
    if source.get("kind") == "file" and source.get("path"):
        source["path"] = _pack_path(source["path"], "model.pretrain: corpus.source.path", into, packed, cwd=cwd,
                                    directory_ok=False)  # relative paths in it are read from the working dir
    target = Path("inputs") / f"{len(packed):02d}-{local.name}"
    (into / target).parent.mkdir(parents=True, exist_ok=True)
    (into / target).write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    packed.append(("model.pretrain", local))
    return str(target)


def pack_job(config: RunConfig, into: Path, *, cwd: Path | None = None) -> tuple[dict[str, Any], list[tuple[str, Path]]]:
    """The job's config (input paths rewritten into ``into``) and what was packed, as (key, local path).

    Raises:
        ConfigError: an output path the cluster could not share (relative ``output_dir``, the
            default or a relative SQLite MLflow store), or inputs too large for a Ray job.
    """
    cwd = cwd or Path.cwd()
    problems = []
    if not Path(config.output_dir).expanduser().is_absolute():
        problems.append(f"output_dir ({config.output_dir}) is relative: a job runs in a temporary directory on the "
                        "cluster; give a path on storage every node sees, e.g. output_dir=/shared/runs/NAME")
    if config.replay.directory and not Path(config.replay.directory).expanduser().is_absolute():
        problems.append(f"replay.directory ({config.replay.directory}) is relative: give a path on shared storage")
    uri = config.mlflow.tracking_uri
    if uri is None or (uri.startswith("sqlite:///") and not uri.startswith("sqlite:////")):
        problems.append(f"mlflow.tracking_uri ({redact(uri) if uri else 'unset: a mlflow.db in the working directory'}) "
                        "would stay inside the job's temporary directory; give the cluster's MLflow server "
                        "(mlflow.tracking_uri=http://HOST:5000) or an absolute sqlite:////shared/... path")
    if problems:
        raise ConfigError("cannot submit this run:\n  " + "\n  ".join(problems), problems=problems)
    data = config.model_dump(mode="json", by_alias=True, exclude={"resume", "overwrite"})
    secrets = redacted_keys(redact_data(data))
    if secrets:  # the package sits in the cluster's directories, readable by its other users
        raise ConfigError(f"cannot submit this run: {', '.join(secrets)} carries credentials, which a job package never "
                          "holds. Give the value without them, and the credentials to the cluster's environment "
                          "(for MLflow: MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN, "
                          "from a Kubernetes secret: infra/k8s)", problems=secrets)
    packed: list[tuple[str, Path]] = []
    for i, task in enumerate(data["stream"]["tasks"]):
        source = task["source"]
        if source["kind"] in ("file", "hf"):
            source["path"] = _pack_path(source["path"], f"stream.tasks.{i}.source.path", into, packed, cwd=cwd,
                                        directory_ok=source["kind"] == "hf")
    model = data["model"]
    for key in ("name_or_path", "encoder"):
        if model.get(key):
            model[key] = _pack_path(model[key], f"model.{key}", into, packed, cwd=cwd, directory_ok=True)
    if model["tokenizer"].get("name_or_path"):
        model["tokenizer"]["name_or_path"] = _pack_path(model["tokenizer"]["name_or_path"], "model.tokenizer.name_or_path",
                                                        into, packed, cwd=cwd, directory_ok=True)
    if model.get("pretrain"):
        model["pretrain"] = _pack_pretrain_config(model["pretrain"], into, packed, cwd=cwd)
    if data["training"].get("deepspeed_config"):
        data["training"]["deepspeed_config"] = _pack_path(data["training"]["deepspeed_config"],
                                                          "training.deepspeed_config", into, packed, cwd=cwd,
                                                          directory_ok=False)
    data["overwrite"] = config.overwrite
    data["resume"] = config.resume
    (into / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return data, packed


def job_client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # noqa: BLE001 - connection, auth: one clear message
        raise ForgetlessError(f"cannot reach the Ray cluster's job API at {redact(address)}: {type(exc).__name__}: "
                              f"{redact(str(exc))[:500]}. Is the head up, and is its token in RAY_AUTH_TOKEN or "
                              "~/.ray/auth_token?") from None


class ClusterNotReadyError(ForgetlessError, RuntimeError):
    """The cluster cannot run Forgetless (found by the probe before the job is queued)."""


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("forgetless")
    except PackageNotFoundError:
        return "unknown"


def probe_cluster(client: Any, address: str, *, timeout_s: float = 120.0, agent_wait_s: float = 180.0,
                  entrypoint: str = PROBE_ENTRYPOINT) -> str:
    """Run a small job on the cluster that prints Forgetless's version after importing its packages;
    returns that version.

    Raises:
        ClusterNotReadyError: the command is missing there, an import fails, or the version is not
            this one — naming what, with the job's own words and how to provide it.
    """
    job_id = _submit_waiting(client, address, agent_wait_s, entrypoint=entrypoint,
                             metadata={"forgetless.probe": "1"})
    deadline = time.monotonic() + timeout_s
    while (status := str(client.get_job_status(job_id))) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            raise ClusterNotReadyError(f"the cluster at {redact(address)} did not run a probe job within {timeout_s:.0f} s "
                                       f"(job {job_id} is {status}): are its nodes up, with CPUs free?")
        time.sleep(0.5)
    logs = client.get_job_logs(job_id)
    mine = package_version()
    if status != "SUCCEEDED":
        said = " | ".join(line for line in logs.strip().splitlines()[-3:]) or "no output"
        missing = "not found" in logs
        how = (f"install it on every node (the image or `pip install forgetless=={mine}`), or pass the package in "
               "the job's runtime_env (pip)") if missing else "its nodes' Python lacks what the package needs"
        raise ClusterNotReadyError(f"the cluster at {redact(address)} cannot run Forgetless: the probe job `"
                                   f"{entrypoint}` failed there ({redact(said)[:600]}); {how}. Nothing was "
                                   "submitted")
    theirs = next((line.split()[-1] for line in logs.splitlines() if line.startswith("forgetless ")), "unknown")
    if theirs != mine:
        raise ClusterNotReadyError(f"the cluster at {redact(address)} has forgetless {theirs}, this machine {mine}: a "
                                   "run's config and saved state are read by the version that wrote them. Install "
                                   f"forgetless=={mine} on the cluster's nodes (or submit from a machine with "
                                   f"{theirs}). Nothing was submitted")
    return theirs


def _submit_waiting(client: Any, address: str, agent_wait_s: float, **job: Any) -> str:
    """``client.submit_job(**job)``, waiting up to ``agent_wait_s`` for a head still starting its job agent."""
    deadline = time.monotonic() + agent_wait_s
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as exc:
            # a head that has just started answers this until its job agent is up
            if "No available agent" in str(exc) and time.monotonic() < deadline:
                time.sleep(2)
                continue
            raise ForgetlessError(f"the cluster at {redact(address)} refused the job: {redact(str(exc))[:500]}") from None


def submit(config_path: str, overrides: list[str], *, address: str,
           agent_wait_s: float = 180.0, probe: bool = True) -> tuple[str, list[tuple[str, Path]], RunConfig]:
    """Submit the run as a Ray job; returns the job id, what was packed, and the validated config.
    A head still starting its job agent is waited for, up to ``agent_wait_s``. First (``probe``), a
    small job checks that the cluster has this version of Forgetless (``probe_cluster``)."""
    config = load_config(config_path, overrides)
    client = job_client(address)
    with tempfile.TemporaryDirectory(prefix="forgetless-job-") as tmp:
        _, packed = pack_job(config, Path(tmp))
        if probe:
            probe_cluster(client, address, agent_wait_s=agent_wait_s)
        job_id = _submit_waiting(client, address, agent_wait_s,
                    # the driver sets the workers' environment itself (a job's env_vars would clash with it)
                    entrypoint=JOB_ENTRYPOINT, runtime_env={"working_dir": tmp},
                    metadata={"forgetless.output_dir": config.output_dir, "forgetless.experiment": config.experiment,
                              "forgetless.config": str(config_path)})
    return job_id, packed, config


# ------------------------------------------------------------------ the job on the cluster
def supervise(config_path: str, overrides: list[str], *, command: list[str] | None = None) -> int:
    """What a submitted job runs: ``forgetless run`` in a child process and, when that process dies
    without an answer (killed: a signal, or the OOM killer), the same run resumed (``resume=true``),
    up to ``training.max_failures`` times. A run that ends by itself (finished, failed after its own
    restarts, refused its input, stopped) is not started again. Returns the last exit code."""
    import signal
    import subprocess
    import sys

    limit = load_config(config_path, overrides).training.max_failures
    command = command or [sys.executable, "-m", "actors.cli"]
    stopping, child = False, None

    def forward(signum: int, _frame: Any) -> None:  # `ray job stop`: the run ends KILLED, and stays so
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = 0
    for attempt in range(limit + 1):
        again = ["resume=true", "overwrite=false"] if attempt else []
        child = subprocess.Popen([*command, "run", config_path, *overrides, *again, "--no-progress"])
        code = child.wait()
        if code >= 0 or stopping:
            return code if code >= 0 else 128 - code
        name = signal.Signals(-code).name
        if attempt < limit:
            print(f"forgetless job: the run's driver was killed ({name}); resuming it "
                  f"({attempt + 1}/{limit}, training.max_failures)", flush=True)
        else:
            print(f"forgetless job: the run's driver was killed ({name}) {limit + 1} times; training.max_failures="
                  f"{limit} is spent. Continue it with `forgetless resume <output_dir>`", flush=True)
    return 128 - code


# ------------------------------------------------------------------ find a running run
def connect(address: str | None) -> None:
    import logging

    import ray

    if not ray.is_initialized():
        try:
            ray.init(address=address or "auto", logging_level=logging.ERROR, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ForgetlessError(f"cannot connect to the Ray cluster at {redact(address or 'auto')}: "
                                  f"{redact(str(exc)).splitlines()[0][:300]}. Give its GCS address with --address "
                                  "HOST:6379 (and its token in RAY_AUTH_TOKEN or ~/.ray/auth_token)") from None


def running_runs() -> dict[str, dict[str, Any]]:
    """Every run whose scheduler is alive on the connected cluster: actor name -> its description."""
    import ray

    from actors.replay import NAMESPACE

    found = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] == NAMESPACE and entry["name"].startswith("run-"):
            try:
                actor = ray.get_actor(entry["name"], namespace=NAMESPACE)
                found[entry["name"]] = ray.get(actor.describe.remote(), timeout=30)
            except (ValueError, ray.exceptions.RayError):
                continue  # finished between the listing and the call
    return found


def find_run(run: str) -> tuple[Any, dict[str, Any]]:
    """The scheduler actor of the running run named by ``run``: its output_dir (as given to it, or
    resolved here), the directory's name, or its MLflow run id.

    Raises:
        RunNotFoundError: none or several match; the message lists what runs.
    """
    import ray

    from actors.replay import NAMESPACE

    runs = running_runs()
    here = str(Path(run).expanduser().resolve())
    matches = [name for name, d in runs.items()
               if run in (d["output_dir"], d["mlflow_run_id"], Path(d["output_dir"]).name) or d["output_dir"] == here]
    listing = "\n  ".join(f"{d['output_dir']}  (MLflow run {d['mlflow_run_id']}, {d['finished_tasks']}/"
                          f"{len(d['tasks'])} tasks, {d['phase']})" for d in runs.values()) or "none"
    if len(matches) != 1:
        what = "no running run matches" if not matches else f"{len(matches)} running runs match"
        raise RunNotFoundError(f"{what} {run!r} (an output_dir, its name, or an MLflow run id). Running now:\n  "
                               f"{listing}")
    return ray.get_actor(matches[0], namespace=NAMESPACE), runs[matches[0]]


def format_replay_status(description: dict[str, Any], shards: list[dict[str, Any]]) -> str:
    lines = [f"run {description['output_dir']} (MLflow run {description['mlflow_run_id']}): "
             f"{description['finished_tasks']}/{len(description['tasks'])} tasks, {description['phase']}",
             f"{'shard':>5}  {'node':<10} {'ip':<15} {'rows':>9} {'capacity':>9} {'bytes':>11}  rows per task"]
    for s in shards:
        per_task = ", ".join(f"{k} {v}" for k, v in s["rows_per_task"].items()) or "-"
        lines.append(f"{s['shard']:>5}  {s['node_id'][:8]:<10} {s['ip']:<15} {s['rows']:>9,} {s['capacity_rows']:>9,} "
                     f"{s['bytes']:>11,}  {per_task}")
    lines.append(f"{'total':>5}  {len({s['node_id'] for s in shards})} node(s){'':<17} {sum(s['rows'] for s in shards):>9,} "
                 f"{sum(s['capacity_rows'] for s in shards):>9,} {sum(s['bytes'] for s in shards):>11,}")
    return "\n".join(lines)
