"""Starting and joining Ray: one place for every command, bench and test that needs a cluster.

A Ray this process starts serves it alone: loopback only, token auth on with a token of its own,
a watcher that ends its processes should this one die. ``ray.address`` (or ``RAY_ADDRESS``, set
inside ``ray job submit``) joins a cluster instead.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from typing import Any

import ray

from actors import reaper
from actors.signals import install_stop_signal
from pipelines.config import RunConfig

log = logging.getLogger("forgetless")

# Environment every Ray process of a run gets: deprecation floods off, tokenizer threads off
# (they fight the trainers for two cores), no usage reporting.
WORKER_ENV = {
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning,ignore::UserWarning",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


# What a Ray this process starts adds for its processes. One machine: gloo's and NCCL's bootstrap
# need no other interface.
LOCAL_RAY_ENV = {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}

# Ray Train's switches for runs on that Ray, read in the process that calls fit() (this one), which
# hands the watcher's on to Ray Train's controller. Its preemption watcher polls for nodes being
# drained: this Ray's one node is the machine itself, so it would watch for nothing at the cost of
# a process per worker group. Its metrics feed Ray's metrics agent, which this Ray does not run
# (enable_metrics_collection is off). Its controller looks at the workers every 2 s by default: a
# worker that died, and the end of the group's last run, wait for that look (a whole-stream run on
# this machine ended ~2 s sooner at 0.5 s, with the controller's CPU time unchanged; a cluster keeps
# Ray's setting). A value already in the environment is kept.
LOCAL_RAY_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_METRICS_ENABLED": "0",
                       "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def cluster_address(config: RunConfig) -> str | None:
    """The cluster a run joins: ``ray.address``, else ``RAY_ADDRESS`` (set inside `ray job submit`);
    None: the run starts a Ray of its own on this machine."""
    return config.ray.address or os.environ.get("RAY_ADDRESS") or None


def connect_ray(config: RunConfig) -> bool:
    """Join the configured cluster, or start a local Ray. True when the Ray is local to this run."""
    if ray.is_initialized():
        return len(ray.nodes()) == 1
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": WORKER_ENV}, "logging_level": logging.WARNING,
                              "configure_logging": True}
    address = cluster_address(config)
    if address:
        ray.init(address=address, **kwargs)
        install_stop_signal()
        return False
    start_local_ray(config.ray.num_cpus)
    install_stop_signal()
    return True


def start_local_ray(num_cpus: int | None = None, *, dashboard: bool = True, log_to_driver: bool = True) -> None:
    """Start a Ray that serves this process alone and dies with it: every server on loopback
    (``loopback_only_ray``), token auth on with a token made for it (``fresh_ray_token``), so that
    neither another machine nor another user of this one can attach a driver to it; its workers get
    ``WORKER_ENV`` and keep their collectives' sockets on loopback too.

    ``dashboard``: the dashboard serves the state API that Ray Train's placement-group cleaner
    polls; only a process that never trains goes without. One that trains gets
    ``LOCAL_RAY_TRAIN_ENV`` in its environment. A new Ray even if a ``ray start`` cluster
    runs on this machine (``ray.address=auto`` joins that one instead).
    """
    earlier = loopback_only_ray()
    fresh_ray_token()
    env = {**WORKER_ENV, **LOCAL_RAY_ENV}
    if dashboard:  # a process that trains
        for key, value in LOCAL_RAY_TRAIN_ENV.items():
            os.environ.setdefault(key, value)
    try:
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), dashboard_host="127.0.0.1",
                 **({} if dashboard else {"include_dashboard": False}), log_to_driver=log_to_driver,
                 runtime_env={"env_vars": env}, logging_level=logging.WARNING, configure_logging=True,
                 _system_config={"enable_metrics_collection": False})
    finally:  # its processes have it; a `ray start` this process runs later must not
        _restore_env(_SINGLE_MACHINE, earlier)
    if ray.util.get_node_ip_address() != "127.0.0.1":
        log.warning("this Ray took %s as its address (not loopback): its ports are guarded by the run's token only",
                    ray.util.get_node_ip_address())
    _watch_local_ray()


def loopback_only_ray() -> str | None:
    """Make the Ray this process is about to start bind every server to 127.0.0.1; returns the
    switch's earlier value (restored once that Ray is up).

    On Linux Ray takes the host's routable address as the node's, and its gRPC servers, agents and
    two Prometheus endpoints (dashboard and autoscaler metrics, no auth) listen on every interface;
    ``ray.init(_node_ip_address="127.0.0.1")`` is resolved back to the routable address. Ray's
    single-machine mode (what it does on macOS and Windows) uses the loopback address instead.
    Its switch is read when Ray is imported, so the constant is set here too; its processes read
    the environment.
    """
    earlier = os.environ.get(_SINGLE_MACHINE)
    os.environ[_SINGLE_MACHINE] = "0"
    try:
        ray._private.ray_constants.ENABLE_RAY_CLUSTER = False
    except AttributeError:  # a Ray without the switch: token auth still guards every port
        pass
    return earlier


_SINGLE_MACHINE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _restore_env(key: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value


def fresh_ray_token() -> None:
    """Turn Ray's token auth on, with a new random token, for the Ray this process is about to start.

    Every process of that Ray inherits it from the environment; nothing writes it to disk. Ray
    reads the mode and token once, when first imported, so both caches are refreshed here too.
    """
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # a Ray without token auth: nothing to turn on
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


_reaper = None  # the watcher of this process's local Ray; held so its pipe stays open while we live


def _watch_local_ray() -> None:
    """Have a watcher end this Ray's processes should this process die without shutting it down."""
    global _reaper
    try:
        session_dir = ray._private.worker._global_node.get_session_dir_path()
    except AttributeError:  # a Ray without that internal: no watcher, no harm
        return
    _reaper = reaper.watch(session_dir)


def end_local_ray(grace_s: float = 0.25) -> None:
    """Shut down the Ray this process started with its processes stopped together, at the end of a
    command: they and theirs (the workers and agents a raylet starts) are sent SIGTERM at once and
    given ``grace_s`` in all, then SIGKILL.

    ``ray.shutdown()`` stops them one kind after another, each given a second (~1.1 s here), and at
    the interpreter's exit first waits half a second more for late log lines; a command that has
    written and printed everything waits for neither. Stopped together, three of them did not stop
    within a second of SIGTERM here; their state is this command's alone and dies with it, so they
    are not waited for. The driver disconnects first, as Ray's own
    shutdown does, while its Ray is still there to hear it. A Ray this process joined is only left.
    Whatever outlives this is the watcher's to end (``actors.reaper``)."""
    import psutil

    node = getattr(ray._private.worker, "_global_node", None)
    if not ray.is_initialized() or node is None:
        ray.shutdown()
        return
    processes = []
    for infos in node.all_processes.values():
        for info in infos:
            try:
                top = psutil.Process(info.process.pid)
                processes += [top, *top.children(recursive=True)]
            except psutil.Error:  # already gone
                continue
    ray._private.worker._global_node = None  # ray.shutdown() disconnects, and leaves the processes to us
    ray.shutdown()
    try:
        if node.is_head():
            node.destroy_external_storage()  # objects spilled to disk: Ray's own shutdown removes them
    except Exception:  # noqa: BLE001 - nothing spilled, or already gone: nothing to remove
        pass
    for sig in ("terminate", "kill"):
        for process in processes:
            try:
                getattr(process, sig)()
            except psutil.Error:
                pass
        deadline = time.monotonic() + grace_s
        while (processes := [p for p in processes if reaper.alive(p.pid)]) and time.monotonic() < deadline:
            time.sleep(0.02)
    # one stuck in the kernel past that: the watcher tries again once this process is gone


def cpus_per_worker(config: RunConfig, use_gpu: bool, *, local: bool) -> float:
    """CPUs each trainer worker reserves: ``training.cpus_per_worker``, else a local Ray's CPUs split
    evenly between the workers (torch's threads follow), else 1 (a cluster's nodes differ in size)."""
    if config.training.cpus_per_worker:
        return config.training.cpus_per_worker
    if use_gpu or not local:
        return 1.0  # a cluster's nodes differ in size: never ask for more than the smallest has
    total = ray.cluster_resources().get("CPU", 1.0)
    return max(1.0, float(int(total // config.training.num_workers)))
