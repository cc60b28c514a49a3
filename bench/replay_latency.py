"""Sampling latency of the replay store as it grows: p50/p99 of one 256-row sample call for
stores of 1e4 .. 1e6 rows (1e7 with --sizes), zero-copy sampling on and off, in one run on a
local Ray. It should be flat: a draw costs the rows it takes, not the rows held. Beside it, the
first sample after a change, when each shard on the node publishes its table again (a copy that
does grow with the store).

  python bench/replay_latency.py --json runs/bench/replay_latency.json [--sizes 10000,100000,1000000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from common import add_baseline_options, baseline_report, quiet_environment, report

quiet_environment()

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import ray  # noqa: E402

from actors.cluster import start_local_ray  # noqa: E402
from actors.replay import ReplayStore  # noqa: E402
from pipelines.config import ReplayConfig  # noqa: E402
from replay_common import shards_send  # noqa: E402

SHARDS, BATCH, CALLS, INSERT_ROWS = 4, 256, 300, 10_000


def rows(start: int, count: int) -> pa.Table:
    """~120-byte rows: an id, a task and a short text that differs row to row."""
    ids = np.arange(start, start + count)
    return pa.table({
        "example_id": pa.array([f"r:{i}" for i in ids]),
        "task_id": pa.array(np.zeros(count, dtype=np.int32)),
        "task_name": pa.array(["latency"] * count),
        "source": pa.array([f"question {i}: what does the review of film {i % 977} say about its ending?" for i in ids]),
        "target": pa.array(["positive" if i % 2 else "negative" for i in ids]),
    })


def latencies(store: ReplayStore, calls: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    store.sample(BATCH, rng)  # warm: sizes known, tables mapped
    took = []
    for _ in range(calls):
        start = time.perf_counter()
        store.sample(BATCH, rng)
        took.append(time.perf_counter() - start)
    ms = np.array(took) * 1e3
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    add_baseline_options(parser)
    args = parser.parse_args()
    if args.baseline:  # the same command on this code and on REF's, side by side
        return baseline_report(__file__, args)
    sizes = [int(s) for s in args.sizes.split(",")]
    start_local_ray(dashboard=False, log_to_driver=False)
    results: dict[str, object] = {"shards": SHARDS, "batch_rows": BATCH, "calls": CALLS, "by_size": {}}
    try:
        for size in sizes:
            config = ReplayConfig(enabled=True, num_shards=SHARDS, capacity_rows=size, remover="fifo",
                                  snapshot_every_rows=None)
            store = ReplayStore.create(config)  # memory only: this measures sampling, not the log
            start = time.perf_counter()
            stored = store.insert_batches(rows(i, min(INSERT_ROWS, size - i)) for i in range(0, size, INSERT_ROWS))
            insert_s = time.perf_counter() - start
            assert stored == size
            start = time.perf_counter()
            store.sample(BATCH, np.random.default_rng(1))  # the first after the inserts: every shard publishes
            first_s = time.perf_counter() - start
            entry = {"insert_s": round(insert_s, 1), "first_sample_after_a_change_ms": round(first_s * 1e3, 1),
                     "zero_copy": latencies(store, CALLS), "shards_send": latencies(shards_send(store), CALLS),
                     "bytes": sum(s.bytes for s in store.stats())}
            results["by_size"][str(size)] = entry
            print(f"{size:>10,} rows: zero-copy p50 {entry['zero_copy']['p50_ms']} ms p99 {entry['zero_copy']['p99_ms']} "
                  f"ms; shards sending p50 {entry['shards_send']['p50_ms']} ms p99 {entry['shards_send']['p99_ms']} ms; "
                  f"first after a change {entry['first_sample_after_a_change_ms']} ms", file=sys.stderr, flush=True)
            store.shutdown()
    finally:
        ray.shutdown()
    return report(results, args.json)


if __name__ == "__main__":
    sys.exit(main())
