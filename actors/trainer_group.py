"""The trainer worker group: Ray Train ``TorchTrainer`` workers, each running a ``Learner``.

The group starts once per stream (a ``fit()`` costs ~25 s of start-up on a small machine) and
pulls task plans from the scheduler until the stream ends.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train import FailureConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from actors.replay import PrefetchingSampler
from actors.scheduler import format_exception
from pipelines.config import RunConfig
from pipelines.learner import Learner, checkpoint_dir, replayed_per_batch, silence_library_noise


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One worker's whole stream: baseline eval, then train / evaluate / checkpoint per task."""
    if not loop_config["use_gpu"]:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed probes for CUDA and warns
    silence_library_noise()
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    config = RunConfig.model_validate(loop_config["config"])
    scheduler = loop_config["scheduler"]
    leader = rank == 0
    try:
        learner = Learner(config, loop_config["tokenizer_dir"], rank=rank, world_size=world_size)
        eval_sets = ray.get(scheduler.eval_sets.remote())
        if leader:
            scheduler.set_phase.remote("baseline")
        baseline = learner.evaluate(eval_sets)
        if leader:
            ray.get(scheduler.record_baseline.remote(baseline))
        every = config.training.log_every_n_steps
        while (plan := ray.get(scheduler.next_task.remote(rank))) is not None:

            def on_step(step: int, total: int, loss: float, index: int = plan.index) -> None:
                if leader and ((step + 1) % every == 0 or step + 1 == total):
                    scheduler.log_step.remote(index, step, total, loss, learner.global_step)

            sampler = None
            if learner.strategy.replay_ratio and plan.index > 0 and plan.examples is not None:
                store = ray.get(scheduler.replay_store.remote())
                per_batch = replayed_per_batch(config.training.micro_batch_size, learner.strategy.replay_ratio)
                sampler = PrefetchingSampler(store, batch_size=per_batch) if per_batch else None
            stats = learner.train_task(plan, on_step=on_step, replay=sampler.next_batch if sampler else None)
            if sampler is not None:
                sampler.close()
            started = time.perf_counter()
            accuracies = learner.evaluate(eval_sets)
            stats["eval_seconds"] = time.perf_counter() - started
            checkpoint = None
            if (config.checkpoint.models == "all" or plan.index == len(eval_sets) - 1
                    or learner.strategy.needs_teacher):
                checkpoint = str(learner.save(checkpoint_dir(config.output_dir, plan.index, plan.name)))
            if leader:
                ray.get(scheduler.record_eval.remote(plan.index, accuracies, train_stats=stats, checkpoint=checkpoint))
    except Exception as exc:
        if leader:
            ray.get(scheduler.fail.remote(format_exception(exc)))
        raise


def build_trainer(config: RunConfig, *, scheduler: Any, tokenizer_dir: str, use_gpu: bool,
                  cpus_per_worker: float) -> TorchTrainer:
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.model_dump(mode="json"), "scheduler": scheduler,
                           "tokenizer_dir": tokenizer_dir, "use_gpu": use_gpu},
        scaling_config=ScalingConfig(num_workers=config.training.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=f"{config.experiment}-{Path(config.output_dir).name}",
            storage_path=str(Path(config.output_dir) / "ray"),
            failure_config=FailureConfig(max_failures=0),  # a failed task fails the run, loudly
        ),
    )
