"""Helpers for tests that run the real CLI (local Ray, DeepSpeed, MLflow) in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import empty_mlflow_store

REPO = Path(__file__).resolve().parents[2]


def pytest_collection_modifyitems(config, items):
    """Every test here runs the real thing (a CLI subprocess, a local Ray, an MLflow server): `slow`,
    left out of `make check`, run by `make test`."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.slow)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_mlflow_server(directory: Path, port: int | None = None, *,
                        admin_password: str | None = None) -> tuple[subprocess.Popen, str]:
    """`mlflow server` on loopback (``port``, or a free one) with its store in ``directory`` (a copy
    of ``empty_mlflow_store`` unless one is there); returns it and its URI once it answers.
    ``admin_password``: MLflow's basic-auth app in front, user ``admin`` with that password."""
    import time
    import urllib.request

    port = port or free_port()
    if not (directory / "server.db").exists():  # a restarted server keeps its store
        shutil.copyfile(empty_mlflow_store(), directory / "server.db")
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{directory / 'server.db'}",
           "--artifacts-destination", str(directory / "server-artifacts")]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    if admin_password is not None:
        ini = directory / "basic_auth.ini"
        ini.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{directory / 'auth.db'}\n"
                       "admin_username = admin\nauthorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        cmd += ["--app-name", "basic-auth"]
        env.update(MLFLOW_AUTH_CONFIG_PATH=str(ini), MLFLOW_AUTH_ADMIN_PASSWORD=admin_password,
                   MLFLOW_FLASK_SERVER_SECRET_KEY=os.urandom(16).hex())
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
            env.pop(key, None)
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            return server, uri
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                stop_server(server)
                pytest.fail(f"mlflow server did not come up on {uri}")
            time.sleep(0.5)


def stop_server(server: subprocess.Popen) -> None:
    import signal

    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)


@pytest.fixture
def mlflow_server(tmp_path):
    server, uri = start_mlflow_server(tmp_path)
    try:
        yield uri
    finally:
        stop_server(server)


def run_cli(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    full_env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "actors.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def start_cli(*args: str) -> subprocess.Popen:
    """`forgetless` in a process session of its own, as a job scheduler would start it."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "actors.cli", *args, "--no-progress"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(condition, *, timeout: float, what: str, process: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"the run ended (exit {process.returncode}) before {what}: {err[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def report_of(out: Path) -> dict | None:
    try:
        return json.loads((out / "report.json").read_text())
    except (OSError, ValueError):
        return None


def session_members(sid: int) -> list[str]:
    """Processes still alive in process session ``sid`` (what a killed run left behind)."""
    left = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[3]) == sid and fields[0] != "Z":
                left.append(f"{entry.name} {(entry / 'cmdline').read_text().replace(chr(0), ' ')[:80]}")
        except (OSError, ValueError, IndexError):
            continue
    return left


def kill_session(process: subprocess.Popen) -> None:
    """SIGKILL every process of ``process``'s session at once (the driver, its Ray, its workers, not
    all in the driver's process group), as a reclaimed machine would; returns once none is left."""
    os.killpg(process.pid, signal.SIGKILL)
    for member in session_members(process.pid):
        try:
            os.kill(int(member.split()[0]), signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=30)
    wait_for(lambda: not session_members(process.pid), timeout=30, what="the killed command's processes to end")


@pytest.fixture
def cli():
    return run_cli


SHARED_CACHE = Path(os.path.expanduser("~/.cache/forgetless"))


@pytest.fixture
def fresh_cache(tmp_path) -> Path:
    """``tmp_path / "cache"`` (the toy config's stream.cache_dir) with the fetched data shared (no
    download per test) and no pretrained checkpoint."""
    cache = tmp_path / "cache"
    cache.mkdir()
    for name in ("wheels", "builtin"):
        (SHARED_CACHE / name).mkdir(parents=True, exist_ok=True)
        (cache / name).symlink_to(SHARED_CACHE / name)
    return cache


@pytest.fixture
def toy_config_file(tmp_path, toy_stream_config):
    def write(**training) -> Path:
        config = {**toy_stream_config, "training": {**toy_stream_config["training"], **training}}
        path = tmp_path / "toy.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    return write


# ------------------------------------------------------------------ who listens, and will they talk to strangers
def _ray_methods() -> list[str]:
    """Every gRPC method of Ray's services (plus the object manager's, which has no Python stubs)."""
    import importlib
    import pkgutil

    import ray.core.generated as generated

    methods = ["/ray.rpc.ObjectManagerService/Pull", "/ray.rpc.ObjectManagerService/Push"]
    for module in pkgutil.iter_modules(generated.__path__):
        if module.name.endswith("_pb2"):
            try:
                loaded = importlib.import_module(f"ray.core.generated.{module.name}")
            except Exception:  # noqa: BLE001 - a stub that does not import is not a service we can call
                continue
            for service in loaded.DESCRIPTOR.services_by_name.values():
                methods += [f"/{service.full_name}/{m.name}" for m in service.methods]
    return methods


def probe_without_credentials(host: str, port: int, methods: list[str]) -> str:
    """What a stranger gets from ``host:port``: ``refused`` (HTTP 401/403, or gRPC UNAUTHENTICATED for
    a method the server has), ``open`` (an answer without credentials), or ``unknown``."""
    import http.client

    import grpc

    try:
        conn = http.client.HTTPConnection(host, port, timeout=3)
        conn.request("GET", "/api/version")
        status = conn.getresponse().status
        conn.close()
        return "refused" if status in (401, 403) else f"open (HTTP {status})"
    except (http.client.HTTPException, ConnectionError, OSError):
        pass  # not HTTP/1: a gRPC server
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        for method in methods:
            try:
                channel.unary_unary(method)(b"", timeout=2)
                return f"open (gRPC {method} answered)"
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                    return "refused"
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    return "unknown (not answering)"
    return "unknown (no Ray method it serves)"


class ListenerWatch:
    """Polls the listening TCP sockets of a process tree; probes each non-loopback one as a stranger."""

    def __init__(self, root_pid: int):
        self.root_pid = root_pid
        self.seen: dict[tuple[str, int], tuple[str, str]] = {}  # (ip, port) -> (process name, verdict)
        self._methods = _ray_methods()

    def poll(self) -> None:
        import ipaddress

        import psutil

        try:
            root = psutil.Process(self.root_pid)
            tree = {p.pid: p for p in root.children(recursive=True)} | {root.pid: root}
        except psutil.NoSuchProcess:
            return
        for conn in psutil.net_connections("tcp"):
            if conn.status != psutil.CONN_LISTEN or conn.pid not in tree:
                continue
            key = (conn.laddr.ip, conn.laddr.port)
            if key in self.seen and not self.seen[key][1].startswith("unknown"):
                continue  # settled (a server still starting its services is asked again)
            try:
                name = tree[conn.pid].name()
            except psutil.NoSuchProcess:
                continue
            address = ipaddress.ip_address(conn.laddr.ip.split("%")[0])
            address = getattr(address, "ipv4_mapped", None) or address  # ::ffff:127.0.0.1 is loopback too
            if address.is_loopback:
                self.seen[key] = (name, "loopback")
                continue
            host = "127.0.0.1" if conn.laddr.ip in ("0.0.0.0", "::") else conn.laddr.ip
            self.seen[key] = (name, probe_without_credentials(host, conn.laddr.port, self._methods))

    def exposed(self) -> list[str]:
        """Non-loopback listeners that did not refuse a caller without credentials."""
        return [f"{name} on {ip}:{port}: {verdict}" for (ip, port), (name, verdict) in sorted(self.seen.items())
                if verdict not in ("loopback", "refused") and not verdict.startswith("unknown (not answering)")]


def run_cli_watching_listeners(*args: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess, ListenerWatch]:
    """``run_cli``, polling the run's listening sockets every half second while it runs."""
    import time

    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("RAY_ADDRESS", None)
    process = subprocess.Popen([sys.executable, "-m", "actors.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    watch = ListenerWatch(process.pid)
    deadline = time.monotonic() + timeout
    import threading

    output: dict[str, str] = {}
    reader = threading.Thread(target=lambda: output.update(zip(("stdout", "stderr"), process.communicate())))
    reader.start()
    while reader.is_alive() and time.monotonic() < deadline:
        watch.poll()
        time.sleep(0.5)
    if reader.is_alive():
        process.kill()
    reader.join()
    return subprocess.CompletedProcess(process.args, process.returncode, output.get("stdout", ""),
                                       output.get("stderr", "")), watch


@pytest.fixture
def cli_watching_listeners():
    return run_cli_watching_listeners



@pytest.fixture
def listener_probe():
    return probe_without_credentials


@dataclass
class TinyCompare:
    result: subprocess.CompletedProcess  # the resumed command's
    out: Path
    uri: str
    before: dict  # what the killed command left: the replay run's report, the naive run's report.json, the state


@pytest.fixture(scope="session")
def tiny_compare_on_server(tmp_path_factory):
    """``forgetless compare configs/tiny/compare.yaml --strategies naive,replay`` through the CLI against
    a real `mlflow server` on loopback, killed (SIGKILL, every process of it) in the replay run's
    second task and continued with ``resume=true``. The comparison, the kill and the resumption, its
    naive run end to end (configs/tiny/naive.yaml's stream and settings) and the UI in a browser are
    checked on this one command; the server stays up until the tests end."""
    base = tmp_path_factory.mktemp("tiny-compare")
    server, uri = start_mlflow_server(base)
    out = base / "out"
    args = ("compare", "configs/tiny/compare.yaml", "--strategies", "naive,replay", "--seeds", "1", f"output_dir={out}",
            f"mlflow.tracking_uri={uri}")
    try:
        # SIGKILLed in the second run's second task (its first committed), then continued with resume=true
        killed = start_cli(*args)
        second = out / "replay" / "seed-0"
        wait_for(lambda: (report_of(second) or {}).get("finished_tasks", 0) >= 1, timeout=600, process=killed,
                 what="the second run's first task")
        kill_session(killed)
        before = {"replay": report_of(second), "naive": (out / "naive" / "seed-0" / "report.json").read_bytes(),
                  "state": json.loads((out / "compare-state.json").read_text())}
        result = run_cli(*args, "--no-progress", "resume=true", timeout=900)
        yield TinyCompare(result, out, uri, before)
    finally:
        stop_server(server)
