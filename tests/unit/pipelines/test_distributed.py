"""Every tensor handed to a collective lives on the engine's device (NCCL refuses host tensors)."""

import ast
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from pipelines.config import validate_config
from pipelines.distributed import Collectives, DeviceMismatchError
from pipelines.learner import Learner, silence_library_noise
from pipelines.models import stream_tokenizer
from pipelines.plan import EvalSet, build_plan
from pipelines.tasks import load_stream

silence_library_noise()
REPO = Path(__file__).resolve().parents[3]
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "barrier", "all_to_all", "gather", "scatter"}


def test_a_tensor_on_another_device_is_refused_naming_both():
    on_gpu_in_spirit = Collectives(device=torch.device("meta"), world_size=1)
    with pytest.raises(DeviceMismatchError, match=r"tensor on cpu, but the engine runs on meta"):
        on_gpu_in_spirit.all_reduce_sum(torch.zeros(2))  # a host tensor in a GPU run
    on_gpu_in_spirit.all_reduce_sum(on_gpu_in_spirit.tensor([1.0, 2.0]))  # built by it: fine


def test_no_collective_in_pipelines_bypasses_the_device_check():
    offenders = []
    for path in sorted((REPO / "pipelines").glob("*.py")):
        if path.name == "distributed.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES and isinstance(node.value, ast.Name) \
                    and node.value.id in ("dist", "distributed"):
                offenders.append(f"{path.name}:{node.lineno} dist.{node.attr}")
    assert offenders == []


def test_training_evaluation_and_ewc_hand_collectives_only_engine_tensors_once_per_window(
        toy_stream_config, tmp_path, monkeypatch):
    toy_stream_config["training"].update(max_steps=6, log_every_n_steps=3)
    toy_stream_config["strategy"] = {"name": "ewc", "fisher_examples": 4}
    config = validate_config(toy_stream_config)
    stream = load_stream(config)
    stream_tokenizer(config.model, stream).save_pretrained(tmp_path / "tok")
    learner = Learner(config, tmp_path / "tok")
    learner.comm.world_size = 2  # take every multi-worker code path; the spy below stands in for the group
    seen = []

    def spy(tensor, op=None, group=None, async_op=False):
        seen.append((tensor.device, tensor.dtype, tuple(tensor.shape)))

    monkeypatch.setattr(dist, "all_reduce", spy)
    learner.train_task(build_plan(config, stream, 0))  # EWC's Fisher is all-reduced at the end
    training = list(seen)
    # 6 steps, a window of 3: two syncs, not six (each: loss sum, non-finite count, checkpoint due)
    assert len([s for s in training if s[2] == (3,)]) == 2
    learner.evaluate([EvalSet(t.name, t.metric, t.sources("eval"), t.targets("eval")) for t in stream])
    learner.comm.barrier()
    assert len(seen) > len(training) + 1
    assert all(device == learner.device for device, _, _ in seen), seen


def test_training_starts_deepspeed_without_its_inference_all_reduce_kernel(toy_stream_config, tmp_path):
    # DeepSpeed's CPU comm compiles that kernel with g++ (~100 s the first time on a machine) for
    # an all-reduce only its inference uses: a learner's comm starts without it.
    from deepspeed.comm import comm as ds_comm

    config = validate_config(toy_stream_config)
    stream = load_stream(config)
    stream_tokenizer(config.model, stream).save_pretrained(tmp_path / "tok")
    learner = Learner(config, tmp_path / "tok")
    assert learner.engine is not None and ds_comm.cdb is not None
    assert ds_comm.cdb.shm_comm_op is None

