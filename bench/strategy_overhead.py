"""What replay and LwF cost in training throughput, measured side by side in one run.

  replay_vs_naive_throughput  examples/s trained with replay (micro-batches mixed from a real
                              sharded replay store on local Ray, through the PrefetchingSampler)
                              / examples/s of sequential fine-tuning, same batch size (target >= 0.9)
  lwf_vs_naive_throughput     the same for LwF (KL variant): the frozen teacher's extra forward pass

  python bench/strategy_overhead.py --json runs/bench/strategy_overhead.json
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
from pathlib import Path

from common import add_baseline_options, baseline_report, quiet_environment, report, small_learners  # noqa: E402

quiet_environment()

import pyarrow as pa  # noqa: E402
import ray  # noqa: E402

from actors.cluster import start_local_ray  # noqa: E402
from actors.replay import PrefetchingSampler, ReplayStore  # noqa: E402
from pipelines.config import ReplayConfig  # noqa: E402
from pipelines.learner import silence_library_noise  # noqa: E402
from pipelines.plan import build_plan  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny" / "compare.yaml"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    add_baseline_options(parser)
    args = parser.parse_args()
    if args.baseline:  # the same command on this code and on REF's, side by side
        return baseline_report(__file__, args)
    silence_library_noise()
    start_local_ray(2, dashboard=False, log_to_driver=False)
    work = Path(tempfile.mkdtemp(prefix="strategy-bench-"))
    base, stream, learners = small_learners(CONFIG, args.steps, ["naive", "replay", "lwf"], work)

    # Task 0 trained once; its examples fill the store and its model is LwF's teacher.
    first = learners["naive"]
    first.train_task(build_plan(base, stream, 0))
    teacher = first.save(work / "teacher")
    store = ReplayStore.create(ReplayConfig(enabled=True, num_shards=2, capacity_rows=10_000), seed=0)
    task0 = stream[0]
    store.insert(pa.table({
        "example_id": [f"{task0.name}:{i}" for i in range(task0.train.num_rows)],
        "task_id": pa.array([0] * task0.train.num_rows, pa.int32()),
        "task_name": [task0.name] * task0.train.num_rows,
        "source": task0.sources("train"), "target": task0.targets("train"),
    }))
    plans = {name: build_plan(learner.config, stream, 1) for name, learner in learners.items()}
    plans["lwf"] = dataclasses.replace(plans["lwf"], teacher_dir=str(teacher))
    size = base.training.micro_batch_size
    ratio = base.strategies.replay.replay_ratio
    rates: dict[str, list[float]] = {"naive": [], "replay": [], "lwf": []}
    for _ in range(args.repeats):  # interleaved: background load hits every strategy alike
        stats = learners["naive"].train_task(plans["naive"])
        rates["naive"].append(stats["examples"] / stats["seconds"])
        sampler = PrefetchingSampler(store, batch_size=plans["replay"].replay_rows_per_batch, seed=[0, 1, 0])
        stats = learners["replay"].train_task(plans["replay"], replay=sampler.next_batch)
        sampler.close()
        rates["replay"].append(stats["examples"] / stats["seconds"])
        stats = learners["lwf"].train_task(plans["lwf"])
        rates["lwf"].append(stats["examples"] / stats["seconds"])
    median = {name: statistics.median(values) for name, values in rates.items()}
    results = {
        "examples_per_s": {name: round(v, 1) for name, v in median.items()},
        "examples_per_s_trials": {name: [round(v, 1) for v in values] for name, values in rates.items()},
        "replay_vs_naive_throughput": round(median["replay"] / median["naive"], 3),
        "lwf_vs_naive_throughput": round(median["lwf"] / median["naive"], 3),
        "micro_batch_size": size, "replay_ratio": ratio, "steps": args.steps,
        "model_parameters": first.num_parameters,
        "targets": {"replay_vs_naive_throughput": ">= 0.9"},
    }
    results["meets_targets"] = {"replay_vs_naive_throughput": results["replay_vs_naive_throughput"] >= 0.9}
    store.shutdown()
    ray.shutdown()
    return report(results, args.json)


if __name__ == "__main__":
    sys.exit(main())
