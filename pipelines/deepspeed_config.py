"""The DeepSpeed JSON of a run: built from the run config, optionally merged with a user file.

Keys the run config owns (batch sizes, accumulation, clipping, precision, ZeRO stage) must be
``"auto"`` in a user file or agree with the run config; every mismatch is reported at once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from pipelines.config import TrainingConfig
from pipelines.errors import ConfigError

_RUN_OWNS = ("optimizer", "scheduler")


def resolve_precision(training: TrainingConfig, *, on_cuda: bool) -> str:
    """``auto`` -> bf16 on CUDA, fp32 on CPU. fp16 on CPU is refused (DeepSpeed has no CPU fp16)."""
    precision = training.precision
    if precision == "auto":
        return "bf16" if on_cuda else "fp32"
    if precision == "fp16" and not on_cuda:
        raise ConfigError("training.precision: fp16 needs CUDA; on CPU use fp32 (or bf16, about 2x slower)")
    return precision


def load_deepspeed_file(path: Path) -> dict[str, Any]:
    """A DeepSpeed config as JSON (``.json``) or YAML (anything else)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"training.deepspeed_config: file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"training.deepspeed_config: cannot read {path} as UTF-8 text ({exc})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"training.deepspeed_config: {path} line {exc.lineno}: not valid JSON ({exc.msg})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"training.deepspeed_config: {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"training.deepspeed_config: {path} must hold a mapping")
    return data


def _owned(training: TrainingConfig, *, world_size: int, precision: str, on_cuda: bool) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": training.micro_batch_size,
        "gradient_accumulation_steps": training.grad_accum_steps,
        "train_batch_size": training.micro_batch_size * training.grad_accum_steps * world_size,
        "gradient_clipping": training.grad_clip or 0.0,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "zero_optimization": {"stage": training.zero_stage},
    }


def _single_worker(ds: dict[str, Any], training: TrainingConfig, world_size: int) -> dict[str, Any]:
    zero = ds["zero_optimization"]
    if (world_size == 1 and training.single_worker_zero_as_stage0 and zero.get("stage") in (1, 2)
            and not any(key.startswith("offload") for key in zero)):
        ds["zero_optimization"] = {"stage": 0}
    return ds


# DeepSpeed's own defaults for the keys below, and what a CPU run sets instead where the file is silent
DEEPSPEED_ZERO_DEFAULTS = {"reduce_bucket_size": int(5e8), "allgather_bucket_size": int(5e8),
                           "stage3_max_live_parameters": int(1e9), "stage3_max_reuse_distance": int(1e9),
                           "stage3_prefetch_bucket_size": int(5e7)}
CPU_ZERO_DEFAULTS: dict[int, dict[str, Any]] = {
    # ZeRO-1/2's GPU-tuned defaults cost ~35% of a CPU step (measured): no comm overlap, small buckets
    1: {"overlap_comm": False, "contiguous_gradients": False, "reduce_bucket_size": int(5e7),
        "allgather_bucket_size": int(5e7)},
    2: {"overlap_comm": False, "contiguous_gradients": False, "reduce_bucket_size": int(5e7),
        "allgather_bucket_size": int(5e7)},
    # DeepSpeed keeps up to 1e9 gathered parameters live (and any reused within 1e9): a model under
    # that size stays whole on every worker, t5-large's 2.95 GB on each of two workers (they ran out
    # of memory); its 5e8-element reduce bucket is another 1.9 GiB in fp32
    # its optimizer steps the worker's whole fp32 partition as one tensor (sub_group_size 1e9): Adam's
    # temporaries are that big again; 1e8-element sub-groups bound them
    3: {"reduce_bucket_size": int(5e7), "stage3_max_live_parameters": int(1e8),
        "stage3_max_reuse_distance": int(1e8), "sub_group_size": int(1e8)},
}


def zero_setting(key: str, *, stage: int, on_cuda: bool) -> int:
    """What a run without a DeepSpeed file gets for ``key`` at ``stage``."""
    defaults = {} if on_cuda else CPU_ZERO_DEFAULTS.get(stage, {})
    return int(defaults.get(key, DEEPSPEED_ZERO_DEFAULTS[key]))


def _cpu_defaults(ds: dict[str, Any], *, zero_stage: int, on_cuda: bool) -> dict[str, Any]:
    """On CPU, DeepSpeed's GPU-tuned ZeRO settings cost step time (stages 1-2) or memory a worker
    needs for the model (stage 3): ``CPU_ZERO_DEFAULTS``. Defaults only: a user file that sets these
    keys wins."""
    if not on_cuda and zero_stage in CPU_ZERO_DEFAULTS:
        zero = ds["zero_optimization"]
        for key, value in CPU_ZERO_DEFAULTS[zero_stage].items():
            zero.setdefault(key, value)
    return ds


def _merge(user: dict[str, Any], owned: dict[str, Any], path: str, mismatches: list[str]) -> dict[str, Any]:
    merged = dict(user)
    for key, value in owned.items():
        dotted = f"{path}{key}"
        if key not in user or user[key] == "auto":
            merged[key] = value
        elif isinstance(value, dict) and isinstance(user[key], dict):
            merged[key] = _merge(user[key], value, dotted + ".", mismatches)
        elif user[key] != value:
            mismatches.append(f"{dotted}: file has {user[key]!r}, the run config gives {value!r}")
    return merged


def build_deepspeed_config(
    training: TrainingConfig, *, world_size: int, precision: str, on_cuda: bool
) -> dict[str, Any]:
    """The DeepSpeed config dict for ``deepspeed.initialize``.

    With one worker, ZeRO-1/2 run as stage 0 unless ``training.single_worker_zero_as_stage0`` is
    off or the stage offloads: there is nothing to partition, and the result is the same.

    Raises:
        ConfigError: the user file is missing or not JSON, sets optimizer/scheduler (the run
            config owns those), or disagrees with the run config (all mismatches listed).
    """
    owned = _owned(training, world_size=world_size, precision=precision, on_cuda=on_cuda)
    if not training.deepspeed_config:
        ds = _cpu_defaults({**owned, "steps_per_print": 10**9, "wall_clock_breakdown": False},
                           zero_stage=training.zero_stage, on_cuda=on_cuda)
        return _single_worker(ds, training, world_size)
    path = Path(training.deepspeed_config)
    user = load_deepspeed_file(path)
    problems = [f"{key}: set by the run config (training.*), remove it from {path}" for key in _RUN_OWNS if key in user]
    merged = _merge(user, owned, "", problems)
    if problems:
        raise ConfigError(
            f"training.deepspeed_config {path} disagrees with the run config ({len(problems)} problems); "
            "use \"auto\" for keys the run owns:\n  " + "\n  ".join(problems),
            problems=problems,
        )
    merged.setdefault("steps_per_print", 10**9)
    ds = _cpu_defaults(merged, zero_stage=training.zero_stage, on_cuda=on_cuda)
    return _single_worker(ds, training, world_size)
