"""What the size of the replay store costs a training step: the replay strategy trains while it
samples a store of 1e4 .. 1e7 rows (4 shards on a local Ray, through the PrefetchingSampler, as a
run's trainer does), beside sequential fine-tuning of the same task with no store, interleaved.

Per size: milliseconds per optimizer step (replay and naive, median of the repeats, every trial),
their ratio (per step, and per row: a replay step holds the replayed rows on top of the new ones),
the replay step against the smallest store's, and what the trainer waited for replay: each
``next_batch`` call's wall time, p50, p99 and the longest (the first call after the store changed
waits for every shard to publish its table: a copy that grows with the store), with the bytes held
and the insert rate.

The rows are the first task's training rows cycled with ids of their own: real text, tokenized
at every step as a run's replayed rows are.

  python bench/replay_scale.py --json runs/bench/replay_scale.json [--sizes 10000,100000,1000000,10000000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import add_baseline_options, baseline_report, quiet_environment, report, small_learners

quiet_environment()

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import ray  # noqa: E402

from actors.cluster import start_local_ray  # noqa: E402
from actors.replay import PrefetchingSampler, ReplayStore  # noqa: E402
from pipelines.config import ReplayConfig  # noqa: E402
from pipelines.learner import silence_library_noise  # noqa: E402
from pipelines.plan import build_plan  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny" / "compare.yaml"
SHARDS, CHUNK = 4, 50_000


def fill(store: ReplayStore, sources: list[str], targets: list[str], size: int) -> float:
    """``size`` rows of the task's (source, target) pairs cycled, each with an id of its own; the rows/s."""
    n = len(sources)

    def chunk(start: int) -> pa.Table:
        ids = np.arange(start, min(start + CHUNK, size))
        return pa.table({
            "example_id": pa.array([f"r:{i}" for i in ids]),
            "task_id": pa.array(np.zeros(len(ids), dtype=np.int32)),
            "task_name": pa.array(["replayed"] * len(ids)),
            "source": pa.array([sources[i % n] for i in ids]),
            "target": pa.array([targets[i % n] for i in ids]),
        })

    began = time.perf_counter()
    stored = store.insert_batches(chunk(start) for start in range(0, size, CHUNK))
    if stored != size:
        raise RuntimeError(f"the store took {stored} of {size} rows")
    return size / (time.perf_counter() - began)


class TimedFeed:
    """The sampler's ``next_batch``, each call's wall time kept."""

    def __init__(self, sampler: PrefetchingSampler):
        self.sampler, self.waits = sampler, []

    def __call__(self) -> pa.Table:
        began = time.perf_counter()
        batch = self.sampler.next_batch()
        self.waits.append(time.perf_counter() - began)
        return batch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--sizes", default="10000,100000,1000000,10000000")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps a measurement")
    parser.add_argument("--repeats", type=int, default=3)
    add_baseline_options(parser)
    args = parser.parse_args()
    if args.baseline:  # the same command on this code and on REF's, side by side
        return baseline_report(__file__, args)
    silence_library_noise()
    sizes = [int(s) for s in args.sizes.split(",")]
    start_local_ray(2, dashboard=False, log_to_driver=False)
    work = Path(tempfile.mkdtemp(prefix="replay-scale-"))
    base, stream, learners = small_learners(CONFIG, args.steps, ["naive", "replay"], work)
    plans = {name: build_plan(learner.config, stream, 1) for name, learner in learners.items()}
    task0 = stream[0]
    sources, targets = task0.sources("train"), task0.targets("train")
    results: dict = {"config": str(CONFIG.relative_to(REPO)), "model": "t5 small", "shards": SHARDS,
                     "steps": args.steps, "repeats": args.repeats, "micro_batch_size": base.training.micro_batch_size,
                     "replay_rows_per_batch": plans["replay"].replay_rows_per_batch,
                     "model_parameters": learners["naive"].num_parameters, "by_size": {}}
    try:
        learners["naive"].train_task(plans["naive"])  # warm: the first task's steps build what later ones reuse
        for size in sizes:
            store = ReplayStore.create(ReplayConfig(enabled=True, num_shards=SHARDS, capacity_rows=size, remover="fifo",
                                                    snapshot_every_rows=None))  # in memory: sampling, not the log
            rate = fill(store, sources, targets, size)
            step_ms: dict[str, list[float]] = {"naive": [], "replay": []}
            waits: list[float] = []
            for repeat in range(args.repeats):  # interleaved: background load hits both alike
                stats = learners["naive"].train_task(plans["naive"])
                step_ms["naive"].append(stats["seconds"] / stats["steps"] * 1e3)
                if repeat == 0:  # every repeat after the first sees the store unchanged
                    store.insert(pa.table({"example_id": ["r:changed"], "task_id": pa.array([0], pa.int32()),
                                           "task_name": ["replayed"], "source": [sources[0]], "target": [targets[0]]}))
                feed = TimedFeed(PrefetchingSampler(store, batch_size=plans["replay"].replay_rows_per_batch,
                                                    seed=[0, 1, repeat]))
                stats = learners["replay"].train_task(plans["replay"], replay=feed)
                feed.sampler.close()
                step_ms["replay"].append(stats["seconds"] / stats["steps"] * 1e3)
                waits += feed.waits
            ms = np.array(waits) * 1e3
            rows = {"naive": base.training.micro_batch_size,
                    "replay": base.training.micro_batch_size + plans["replay"].replay_rows_per_batch}
            median = {name: statistics.median(values) for name, values in step_ms.items()}
            entry = {"bytes": sum(s.bytes for s in store.stats()), "insert_rows_per_s": round(rate),
                     "step_ms": {name: round(v, 1) for name, v in median.items()},
                     "step_ms_trials": {name: [round(v, 1) for v in values] for name, values in step_ms.items()},
                     "replay_vs_naive_step": round(median["replay"] / median["naive"], 3),
                     # a replay step holds the replayed rows on top of the new ones: per row, what is left is
                     # the sampling and the replayed rows' tokenizing
                     "replay_vs_naive_per_row": round(median["replay"] / rows["replay"] / (median["naive"] / rows["naive"]), 3),
                     "replay_wait_ms": {"calls": len(waits), "p50": round(float(np.percentile(ms, 50)), 3),
                                        "p99": round(float(np.percentile(ms, 99)), 2), "max": round(float(ms.max()), 1),
                                        "share_of_replay_step_time": round(
                                            float(ms.sum()) / (sum(step_ms["replay"]) * args.steps), 4)}}
            smallest = results["by_size"].get(str(sizes[0]), entry)
            entry["replay_step_vs_smallest_store"] = round(entry["step_ms"]["replay"] / smallest["step_ms"]["replay"], 3)
            results["by_size"][str(size)] = entry
            print(f"{size:>10,} rows ({entry['bytes'] / 1e6:.0f} MB): step {entry['step_ms']['replay']} ms with replay, "
                  f"{entry['step_ms']['naive']} without ({entry['replay_vs_naive_step']}x); waited for replay p50 "
                  f"{entry['replay_wait_ms']['p50']} ms, p99 {entry['replay_wait_ms']['p99']}, longest "
                  f"{entry['replay_wait_ms']['max']}", file=sys.stderr, flush=True)
            store.shutdown()
    finally:
        for learner in learners.values():
            learner.close()
        ray.shutdown()
    return report(results, args.json)


if __name__ == "__main__":
    sys.exit(main())
