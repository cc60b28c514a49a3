"""The trainer worker group: Ray Train ``TorchTrainer`` workers, each running ``pipelines.loop``.

The group starts once per stream (a ``fit()`` costs ~25 s of start-up on a small machine). This
module is only the adapter: the scheduler actor behind a ``Coordinator`` proxy, and replay feeds
that sample the Ray replay store. What a worker does is ``pipelines.loop.run_stream``.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train import FailureConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.torch import config as torch_config_module

from actors.replay import PrefetchingSampler
from pipelines.config import RunConfig
from pipelines.learner import Learner, silence_library_noise
from pipelines.loop import format_exception, run_stream
from pipelines.paradigms import TaskSlot
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


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One worker's whole stream (see ``pipelines.loop.run_stream``)."""
    if not loop_config["use_gpu"]:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed probes for CUDA and warns
    silence_library_noise()
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    config: RunConfig = loop_config["config"]
    scheduler = RemoteScheduler(loop_config["scheduler"])
    scheduler.register_worker(rank, pid=os.getpid(), host=socket.gethostname())
    try:
        learner = Learner(config, loop_config["tokenizer_dir"], rank=rank, world_size=world_size,
                          checkpoint=loop_config["checkpoint"], objective=loop_config["objective"],
                          slots=loop_config["slots"])
    except Exception as exc:
        scheduler.fail(f"worker {rank} of {world_size}: {format_exception(exc)}")
        raise
    store = None

    def replay_feed(plan: TaskPlan, rank: int) -> PrefetchingSampler:
        nonlocal store
        store = store or scheduler.replay_store()
        return PrefetchingSampler(store, batch_size=plan.replay_rows_per_batch, seed=[plan.seed, plan.index, rank])

    run_stream(learner, scheduler, replay=replay_feed)


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


def build_trainer(config: RunConfig, *, scheduler: Any, tokenizer_dir: str, use_gpu: bool,
                  cpus_per_worker: float, checkpoint: str | None = None,
                  objective: dict[str, Any] | None = None, slots: list[TaskSlot] | None = None,
                  local: bool = False) -> TorchTrainer:
    """``local``: the run's own Ray on this machine — the rendezvous store listens on loopback only."""
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config, "scheduler": scheduler, "tokenizer_dir": tokenizer_dir,
                           "use_gpu": use_gpu, "checkpoint": checkpoint, "objective": objective, "slots": slots},
        torch_config=LoopbackTorchConfig() if local else None,
        scaling_config=ScalingConfig(num_workers=config.training.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=f"{config.experiment}-{Path(config.output_dir).name}",
            storage_path=str(Path(config.output_dir) / "ray"),
            failure_config=FailureConfig(max_failures=0),  # a failed task fails the run, loudly
        ),
    )
