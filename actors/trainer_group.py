"""The trainer worker group: Ray Train ``TorchTrainer`` workers, each running ``pipelines.loop``.

A group starts once (Ray Train's start-up is ~15 s on a small machine) and then runs stream
after stream: ``forgetless compare`` and ``table1`` hand every run to the same group, and each
run builds its own model, optimizer and DeepSpeed engine in it (and releases them after). This
module is only the adapter: the scheduler actor behind a ``Coordinator`` proxy, the group's queue of
runs (``actors.run_queue``), and replay feeds that sample the Ray replay store. What a worker does with a run
is ``pipelines.loop.run_stream``.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
import ray.train
from ray.train import FailureConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.torch import config as torch_config_module
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.replay import PrefetchingSampler
from actors.run_queue import RunQueue
from pipelines.config import RunConfig
from pipelines.loop import format_exception, run_stream

if TYPE_CHECKING:
    from pipelines.plan import TaskPlan

# Calls a worker does not wait for: progress reports.
_FIRE_AND_FORGET = frozenset({"log_step", "set_phase"})


class RemoteScheduler:
    """The scheduler actor as a ``pipelines.loop.Coordinator``: each call waits for the actor's
    answer, except progress reports."""

    def __init__(self, handle: Any):
        self._handle = handle

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._handle, name)
        if name in _FIRE_AND_FORGET:
            return lambda *args, **kwargs: method.remote(*args, **kwargs)
        return lambda *args, **kwargs: ray.get(method.remote(*args, **kwargs))


def run_job(job: dict[str, Any], rank: int, world_size: int, attempt: int = 0) -> None:
    """One worker's share of one run: its learner (model, optimizer, engine) built, the stream run
    (see ``pipelines.loop.run_stream``), the learner released. In a restarted group (``attempt`` > 0)
    the scheduler hands out the stream from its last committed state, or ends the run when it
    cannot go on.

    A job with a ``call`` is other work of a run given to its group (pretraining: see
    ``actors.pretrain.run_pretrain``): ``[ref]`` to a ``(function, loop_config)`` pair that every rank
    calls in Ray Train's context, as a ``TorchTrainer`` calls its function; it releases what it
    built before the next job."""
    if "call" in job:
        function, loop_config = ray.get(job["call"][0])
        function(loop_config)
        return
    config: RunConfig = job["config"]
    scheduler = RemoteScheduler(job["scheduler"])
    # registered first, before the imports below: a worker that dies while they run is named
    if not scheduler.register_worker(rank, pid=os.getpid(), host=socket.gethostname(), attempt=attempt):
        return  # the run failed for good (the driver reports why); nothing to train
    from pipelines.learner import Learner  # see serve_runs
    try:
        learner = Learner(config, job["tokenizer_dir"], rank=rank, world_size=world_size,
                          checkpoint=job["checkpoint"], objective=job["objective"], slots=job["slots"])
    except Exception as exc:
        scheduler.fail(f"worker {rank} of {world_size}: {format_exception(exc)}")
        raise
    try:
        run_stream(learner, scheduler, replay=replay_feeds(scheduler))
    finally:
        learner.close()


def replay_feeds(scheduler: Any) -> Callable[[TaskPlan, int], PrefetchingSampler]:
    """The replay feed of each plan that replays: a sampler of the run's store, seeded by (run seed,
    task, rank) so that its draws depend on nothing else. The store handle is asked for once."""
    store = None

    def replay_feed(plan: TaskPlan, rank: int) -> PrefetchingSampler:
        nonlocal store
        store = store or scheduler.replay_store()
        return PrefetchingSampler(store, batch_size=plan.replay_rows_per_batch, seed=[plan.seed, plan.index, rank])

    return replay_feed


def serve_runs(group_config: dict[str, Any]) -> None:
    """A worker's life: take the group's runs in order (every rank takes each), until it is closed."""
    # Imported here, not at the top: Ray Train's controller and the driver import this module too
    # (to unpickle and to pickle this function) and need none of the learner's imports (transformers,
    # DeepSpeed: seconds of start-up on the path to the first step).
    from pipelines.learner import silence_library_noise

    if not group_config["use_gpu"]:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed probes for CUDA and warns
    silence_library_noise()
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    jobs = group_config["jobs"]
    attempt = ray.get(jobs.ready.remote(rank))
    seq = ray.get(jobs.first_open.remote())  # after a restart: the run that was under way, not the first
    while (job := ray.get(jobs.take.remote(seq))) is not None:
        run_job(job, rank, world_size, attempt)
        ray.get(jobs.done.remote(seq, rank))
        seq += 1


@dataclass(frozen=True)
class GroupShape:
    """What a worker group is made of; a run whose shape differs needs another group."""

    num_workers: int
    use_gpu: bool
    cpus_per_worker: float
    local: bool  # the run's own Ray on this machine: the rendezvous store listens on loopback only
    max_failures: int = 0  # restarts Ray Train gives the group (training.max_failures)


class WorkerGroup:
    """A Ray Train worker group that runs stream after stream: ``fit()`` runs in a thread of the
    driver for the group's whole life, and ``run`` hands it one run and waits for every worker to
    be done with it.

    A worker that fails or dies makes Ray Train stop the others (no rank is left in a collective)
    and, up to ``shape.max_failures`` times (its ``FailureConfig``), start the group again; the new
    workers take the run that was under way, which its scheduler continues from the last committed
    state. Past that, or when ``run``'s ``stop`` says the run cannot go on, ``run`` raises.
    Ray Train's own checkpoints (``ray.train.report``) are not used for this: a run's state is
    committed by its scheduler with the matrix and the replay store, in the run's directory, and a
    copy into Ray's storage would double every checkpoint's bytes for nothing a restart reads."""

    def __init__(self, shape: GroupShape, *, storage_path: Path, name: str):
        self.shape = shape
        # On the driver's node, as Ray Train places its controller: the queue lives and dies with the
        # driver (whose death `forgetless job` heals), not with a worker node that may be lost.
        self._jobs = RunQueue.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=False)).remote(shape.num_workers)
        trainer = TorchTrainer(
            serve_runs,
            train_loop_config={"jobs": self._jobs, "use_gpu": shape.use_gpu},
            torch_config=LoopbackTorchConfig() if shape.local else None,
            scaling_config=ScalingConfig(num_workers=shape.num_workers, use_gpu=shape.use_gpu,
                                         resources_per_worker={"CPU": shape.cpus_per_worker}),
            run_config=ray.train.RunConfig(
                name=name, storage_path=str(storage_path),
                failure_config=FailureConfig(max_failures=shape.max_failures),
            ),
        )
        self.error: BaseException | None = None
        self._abandoned = False  # given up (``abandon``): no more runs, whatever its thread does
        self._startup_s: float | None = None
        self._thread = threading.Thread(target=self._fit, args=(trainer,), name=f"trainer-group-{name}", daemon=True)
        self._thread.start()

    def _fit(self, trainer: TorchTrainer) -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on a run
            self.error = exc

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._abandoned

    def restarts(self) -> int:
        """How often Ray Train has restarted this group (a group that has is not given another run:
        its failure budget is partly spent)."""
        try:
            return ray.get(self._jobs.restarts.remote(), timeout=10)
        except ray.exceptions.RayError:
            return 0

    def startup_s(self) -> float | None:
        """Seconds from the group's creation until every worker was ready (None: not yet, or never)."""
        if self._startup_s is None:
            try:
                self._startup_s = ray.get(self._jobs.startup_s.remote(), timeout=10)
            except ray.exceptions.RayError:
                pass
        return self._startup_s

    def run(self, job: dict[str, Any], stop: Callable[[], str | None] | None = None) -> None:
        """Run one stream on every worker; returns when all are done with it. ``stop`` is asked every
        second or so: a reason means the run cannot go on (a restart would fail the same way), and
        the group is given up (a later run gets a new one).

        Raises:
            RuntimeError (Ray Train's error, or one naming the group's end or ``stop``'s reason): a
                worker failed for good.
        """
        if not self.alive:
            raise self.error or RuntimeError("the trainer worker group has ended")
        seq = ray.get(self._jobs.put.remote(job))
        done = self._jobs.wait_done.remote(seq)
        asked = time.monotonic()
        while not ray.wait([done], timeout=0.5)[0]:
            if not self.alive:
                raise self.error or RuntimeError("the trainer worker group ended before its run was done")
            if stop is not None and time.monotonic() - asked >= 1.0:
                asked = time.monotonic()
                if (reason := stop()) is not None:
                    self.abandon(seq)
                    raise RuntimeError(reason)
        ray.get(done)

    def abandon(self, seq: int) -> None:
        """Give up run ``seq`` and this group: its workers (restarted or not) take no more runs."""
        self._abandoned = True
        try:
            ray.get([self._jobs.abandon.remote(seq), self._jobs.close.remote()], timeout=10)
        except ray.exceptions.RayError:
            pass

    def close(self, timeout_s: float = 60) -> None:
        """Let the workers leave (each finishes its loop, Ray Train winds the group down)."""
        try:
            ray.get(self._jobs.close.remote(), timeout=10)
        except ray.exceptions.RayError:
            pass
        self._thread.join(timeout=timeout_s)
        self.startup_s()  # kept: the queue goes
        ray.kill(self._jobs)


class WorkerGroups:
    """The worker groups of a command that runs several streams: a run gets the live group of its
    shape, and one is started when there is none (the first run, a run of another shape, or the run
    after one that failed and took its group down). Records each start-up."""

    def __init__(self, storage_path: Path, name: str):
        self._storage_path, self._name = storage_path, name
        self._group: WorkerGroup | None = None
        self.started: list[WorkerGroup] = []

    def get(self, shape: GroupShape) -> tuple[WorkerGroup, bool]:
        """The group for ``shape``, and whether it was just started."""
        group = self._group
        if group is not None and group.alive and group.shape == shape and not group.restarts():
            return group, False
        if group is not None:
            group.close()
        name = self._name if not self.started else f"{self._name}-{len(self.started) + 1}"
        self._group = WorkerGroup(shape, storage_path=self._storage_path, name=name)
        self.started.append(self._group)
        return self._group, True

    def startups_s(self) -> list[float | None]:
        return [group.startup_s() for group in self.started]

    def close(self) -> None:
        if self._group is not None:
            self._group.close()
            self._group = None


# ------------------------------------------------------------------ a rendezvous store on loopback
# torch's process-group rendezvous (a TCPStore hosted by rank 0) listens on every interface, with no
# auth. In a run's private, single-machine Ray the store is hosted on 127.0.0.1 instead: rank 0
# binds the socket itself and hands it to the store, and every rank joins it as a client (torch's
# "agent store" mode, meant for a store someone else hosts).
_loopback_store: tuple[Any, socket.socket] | None = None


def _serve_store_on_loopback() -> tuple[str, int]:
    """On rank 0: host the rendezvous store on 127.0.0.1 for as long as this worker lives."""
    global _loopback_store
    if _loopback_store is None:
        import torch.distributed as dist

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        store = dist.TCPStore("127.0.0.1", sock.getsockname()[1], is_master=True, wait_for_workers=False,
                              master_listen_fd=sock.fileno(), use_libuv=False)
        _loopback_store = (store, sock)
    return "127.0.0.1", _loopback_store[1].getsockname()[1]


def _join_hosted_store() -> None:
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "True"


class _LoopbackBackend(torch_config_module._TorchBackend):
    def on_start(self, worker_group: Any, backend_config: TorchConfig) -> None:
        worker_group.execute(_join_hosted_store)
        where = torch_config_module.get_address_and_port
        torch_config_module.get_address_and_port = _serve_store_on_loopback  # what Ray Train asks rank 0
        try:
            super().on_start(worker_group, backend_config)
        finally:
            torch_config_module.get_address_and_port = where


class LoopbackTorchConfig(TorchConfig):
    """Ray Train's torch setup, with the rendezvous store on loopback (for a single-machine Ray)."""

    @property
    def backend_cls(self):
        return _LoopbackBackend
