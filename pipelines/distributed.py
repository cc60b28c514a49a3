"""The process group and every collective the trainers run, in one place.

Ray Train starts an NCCL group when workers use GPUs, and NCCL refuses tensors on the host: a CPU
tensor handed to an all-reduce fails the run at its first step, but only on GPUs. So every
collective goes through ``Collectives``, which holds the engine's device, builds tensors there and
refuses a tensor from anywhere else with a message that names both devices — on a laptop too,
where the device check is the only thing that can notice.
"""

from __future__ import annotations

import os
import socket
import sys
from types import ModuleType

import torch
import torch.distributed as dist

from pipelines.errors import ForgetlessError


class DeviceMismatchError(ForgetlessError, RuntimeError):
    """A collective was handed a tensor on another device than the engine's."""


def init_distributed() -> None:
    """Join (or, alone, create) the process group DeepSpeed needs.

    Ray Train and torchrun set RANK/WORLD_SIZE/MASTER_*; a plain ``python`` process gets a
    one-process group on a free loopback port (else DeepSpeed reaches for mpi4py).
    """
    without_the_inference_comm_kernel()  # before DeepSpeed's comm starts, here or in deepspeed.initialize
    if dist.is_initialized():
        return
    deepspeed = deepspeed_module()
    if "RANK" not in os.environ:
        os.environ.update(single_process_group_env())
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def without_the_inference_comm_kernel() -> None:
    """Keep DeepSpeed's comm from compiling and loading its shared-memory all-reduce kernel.

    On CPU, DeepSpeed's torch comm backend builds that kernel (``ShareMemCommBuilder``: g++, about
    100 s on 2 cores, once per machine, so a new user's first run paid it) and maps a shared-memory
    segment per rank. Only DeepSpeed inference's tensor-parallel all-reduce uses it; training's
    collectives go through the process group (gloo, NCCL) either way. Marked incompatible, it is
    skipped. On GPUs nothing is done: the CUDA accelerator has no such kernel, and reading the
    table of compatible ops would make DeepSpeed probe every op (compiler runs) for nothing.
    """
    if torch.cuda.is_available():
        return
    deepspeed_module()
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # the dict DeepSpeed keeps and reads


def deepspeed_module() -> ModuleType:
    """``import deepspeed``, without the MLflow that DeepSpeed's autotuner imports.

    ``deepspeed/autotuning/autotuner.py`` imports mlflow at its top whenever it is installed (it
    is: the scheduler logs to it), which cost every trainer worker ~1.5 s of CPU at start-up for a
    library it never calls: workers log through the scheduler, and nothing here autotunes. While
    DeepSpeed imports, mlflow is marked absent (a ``None`` in ``sys.modules`` makes ``import
    mlflow`` raise ImportError, which the autotuner expects); the mark is gone afterwards, so an
    ``import mlflow`` later in the process loads it as usual. A process that already has MLflow
    (a driver, a test) imports DeepSpeed as it is.
    """
    if "deepspeed" in sys.modules:
        return sys.modules["deepspeed"]
    hide = "mlflow" not in sys.modules
    if hide:
        sys.modules["mlflow"] = None  # type: ignore[assignment]
    try:
        import deepspeed
    finally:
        if hide and sys.modules.get("mlflow", 0) is None:
            del sys.modules["mlflow"]
    return deepspeed


def single_process_group_env() -> dict[str, str]:
    """The environment of a one-process group on loopback, at a port free when asked."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def same_device(a: torch.device, b: torch.device) -> bool:
    """Equal devices; an index left unset (``cuda``) matches any index of the same type."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


class Collectives:
    """All-reduces and barriers over the engine's device.

    With ``world_size == 1`` nothing is communicated, but tensors are still checked: a CPU tensor
    in a GPU run fails here, with the same message, before it could reach NCCL.
    """

    def __init__(self, *, device: torch.device, world_size: int):
        self.device = torch.device(device)
        self.world_size = world_size
        # True: communicate even alone (a one-GPU check of the NCCL paths; see infra/scripts/gpu_check.py)
        self.force_communication = False

    @property
    def _communicate(self) -> bool:
        return self.world_size > 1 or (self.force_communication and dist.is_initialized())

    def tensor(self, values: list[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A tensor on the engine's device, ready for a collective."""
        return torch.tensor(values, dtype=dtype, device=self.device)

    def _check(self, tensor: torch.Tensor) -> None:
        if not same_device(tensor.device, self.device):
            raise DeviceMismatchError(
                f"a collective was handed a tensor on {tensor.device}, but the engine runs on {self.device}; "
                "NCCL refuses host tensors. Create it with Collectives.tensor() or move it with .to(device)")

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place; returns the tensor."""
        self._check(tensor)
        if self._communicate:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_min(self, tensor: torch.Tensor) -> torch.Tensor:
        self._check(tensor)
        if self._communicate:
            dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return tensor

    def all_reduce_mean(self, tensors: list[torch.Tensor]) -> None:
        """Average tensors across ranks, in place."""
        for tensor in tensors:
            self.all_reduce_sum(tensor)
            if self.world_size > 1:
                tensor /= self.world_size

    def barrier(self) -> None:
        """Wait for every rank (an all-reduce of one element on the engine's device: NCCL-safe)."""
        if self._communicate:
            self.all_reduce_sum(self.tensor([0.0]))
