"""Replay store throughput and footprint, measured side by side in one run on a local Ray.

  insert_rows_per_s[N shards]  rows/s acknowledged (logged durably) by insert_batches fed 1k-row
                               batches, one writer (target >= 100k)
  insert_call_rows_per_s[N shards]
                               the same rows through insert(), a 1k-row batch a call, each
                               acknowledged before the next (what one call costs, all of it)
  sample_ratio_vs_local        rows/s delivered to one consumer by the PrefetchingSampler / rows/s
                               of an in-process pyarrow take of the same batch size on the same
                               rows (target >= 0.9); beside it, the sampler with every shard
                               drawing and sending its rows (zero-copy sampling off)
  snapshot_s_per_gb, restore_s_per_gb
  bytes_per_row_ratio          resident Arrow bytes per row / raw payload bytes (target <= 1.3)

  python bench/replay_store.py --json runs/bench/replay_store.json
  python bench/replay_store.py --baseline 3d3925b --inserts-only   # the inserts, this code / 3d3925b's
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import add_baseline_options, baseline_report, quiet_environment, report

quiet_environment()  # before Ray is imported: it reads its auth mode and address mode then

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import ray  # noqa: E402

from actors.replay import PrefetchingSampler, ReplayStore  # noqa: E402
from pipelines.config import ReplayConfig  # noqa: E402
from replay_common import payload_bytes, review_corpus, shards_send  # noqa: E402
from storage.replay import ReplayShard  # noqa: E402

BATCH_ROWS = 1000
SHARDS = (4, 8)


def start_ray() -> None:
    """A local Ray of the bench's own, as ``forgetless run`` starts one; on code from before
    ``actors.cluster`` (a ``--baseline`` ref), a new local instance (never a cluster that a
    ``ray start`` left an address file of)."""
    try:
        from actors.cluster import start_local_ray
    except ImportError:
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    else:
        start_local_ray(dashboard=False, log_to_driver=False)


def bench_inserts(data: pa.Table, num_shards: int, directory: Path) -> tuple[float, ReplayStore]:
    config = ReplayConfig(enabled=True, num_shards=num_shards, capacity_rows=data.num_rows, remover="fifo",
                          snapshot_every_rows=None)
    store = ReplayStore.create(config, directory=directory)
    store.insert(data.slice(0, BATCH_ROWS))  # warm the actors
    start = time.perf_counter()
    stored = store.insert_batches(data.slice(offset, BATCH_ROWS) for offset in range(BATCH_ROWS, data.num_rows,
                                                                                       BATCH_ROWS))
    assert stored == data.num_rows - BATCH_ROWS
    return stored / (time.perf_counter() - start), store


def bench_insert_calls(data: pa.Table, num_shards: int, directory: Path) -> float:
    config = ReplayConfig(enabled=True, num_shards=num_shards, capacity_rows=data.num_rows, remover="fifo",
                          snapshot_every_rows=None)
    store = ReplayStore.create(config, directory=directory)
    store.insert(data.slice(0, BATCH_ROWS))
    start = time.perf_counter()
    stored = sum(store.insert(data.slice(offset, BATCH_ROWS)) for offset in range(BATCH_ROWS, data.num_rows, BATCH_ROWS))
    rate = stored / (time.perf_counter() - start)
    store.shutdown()
    assert stored == data.num_rows - BATCH_ROWS
    return rate


def bench_sampling(store: ReplayStore, local: pa.Table, *, batch_size: int, num_batches: int,
                   trials: int = 5) -> dict:
    """Rounds of each side in turn (so background load hits all alike): the sampler as a trainer gets
    it (zero-copy sampling: shards on this node publish their tables, the sampler takes from them),
    the same sampler with every shard drawing and sending its rows, and the in-process take.
    Medians, every trial beside them."""
    local = local.combine_chunks()
    rng = np.random.default_rng(0)
    sent = shards_send(store)
    rates: dict[str, list[float]] = {"zero_copy": [], "shards_send": [], "local": []}
    for _ in range(trials):
        for mode, handle in (("zero_copy", store), ("shards_send", sent)):
            sampler = PrefetchingSampler(handle, batch_size=batch_size)  # the defaults a trainer gets
            sampler.next_batch()  # the first call maps the published tables (once per change of a shard)
            start = time.perf_counter()
            for _ in range(num_batches):
                sampler.next_batch()
            rates[mode].append(num_batches * batch_size / (time.perf_counter() - start))
            sampler.close()
            time.sleep(0.5)  # let cancelled calls drain before the next side runs
        start = time.perf_counter()
        for _ in range(num_batches):
            local.take(pa.array(rng.integers(0, local.num_rows, batch_size)))
        rates["local"].append(num_batches * batch_size / (time.perf_counter() - start))
    median = {mode: statistics.median(values) for mode, values in rates.items()}
    return {"sample_rows_per_s": round(median["zero_copy"]), "local_take_rows_per_s": round(median["local"]),
            "sample_rows_per_s_shards_send": round(median["shards_send"]),
            "sample_ratio_vs_local": round(median["zero_copy"] / median["local"], 3),
            "sample_ratio_vs_local_shards_send": round(median["shards_send"] / median["local"], 3),
            "sample_trials_rows_per_s": {mode: [round(v) for v in values] for mode, values in rates.items()},
            "sample_batch_size": batch_size}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--inserts-only", action="store_true", help="measure the inserts only (any code's store "
                        "can take them: what --baseline compares on older refs)")
    add_baseline_options(parser)
    args = parser.parse_args()
    if args.baseline:  # the figures any older store can give (--inserts-only: the inserts alone)
        keys = [f"insert{kind}_rows_per_s[{n} shards]" for n in SHARDS for kind in ("", "_call")]
        if not args.inserts_only:
            keys += ["sample_rows_per_s", "snapshot_s_per_gb", "restore_s_per_gb", "bytes_per_row"]
        return baseline_report(__file__, args, keys)
    start_ray()
    data = review_corpus(args.rows)
    results: dict = {"rows": args.rows, "batch_rows": BATCH_ROWS}
    root = Path(tempfile.mkdtemp(prefix="replay-bench-"))
    try:
        for shards in SHARDS:
            rates = []
            for trial in range(3):  # the median of 3: the machine is shared and noisy
                rate, store = bench_inserts(data, shards, root / f"s{shards}-{trial}")
                rates.append(round(rate))
                if trial < 2:
                    store.shutdown()
            results[f"insert_rows_per_s[{shards} shards]"] = statistics.median(rates)
            results[f"insert_rows_per_s_trials[{shards} shards]"] = rates
            calls = [round(bench_insert_calls(data, shards, root / f"c{shards}-{trial}")) for trial in range(3)]
            results[f"insert_call_rows_per_s[{shards} shards]"] = statistics.median(calls)
            results[f"insert_call_rows_per_s_trials[{shards} shards]"] = calls
            print(f"insert, {shards} shards: {statistics.median(rates):,.0f} rows/s (trials {rates}); a call at a "
                  f"time {statistics.median(calls):,.0f} rows/s (trials {calls})", flush=True)
            if shards == 4 and not args.inserts_only:
                results.update(bench_sampling(store, data, batch_size=256, num_batches=2000))
                print(f"sampling: {results['sample_rows_per_s']:,} rows/s zero-copy, "
                      f"{results['sample_rows_per_s_shards_send']:,} with shards sending, vs local take "
                      f"{results['local_take_rows_per_s']:,} rows/s", flush=True)
                stats = store.stats()
                resident = sum(s.bytes for s in stats)
                results["bytes_per_row"] = round(resident / args.rows, 1)
                results["payload_bytes_per_row"] = round(payload_bytes(data) / args.rows, 1)
                results["bytes_per_row_ratio"] = round(resident / payload_bytes(data), 3)
                start = time.perf_counter()
                store.snapshot()
                snapshot_s = time.perf_counter() - start
                store.shutdown()
                # restore = what a restarted shard does: read its snapshot, replay its log
                start = time.perf_counter()
                restored = sum(ReplayShard(store.config.capacity_rows, remover="fifo", shard_id=i,
                                           directory=root / "s4-2" / f"shard-{i:03d}").num_rows for i in range(4))
                restore_s = time.perf_counter() - start
                assert restored == args.rows
                start = time.perf_counter()  # and a whole store restarted: new actor processes too
                again = ReplayStore.create(store.config, directory=root / "s4-2")
                assert again.num_rows() == args.rows
                results["store_restart_s"] = round(time.perf_counter() - start, 2)
                again.shutdown()
                gigabytes = resident / 1e9
                results["snapshot_s_per_gb"] = round(snapshot_s / gigabytes, 2)
                results["restore_s_per_gb"] = round(restore_s / gigabytes, 2)
                results["snapshot_gb"] = round(gigabytes, 4)
                print(f"snapshot {snapshot_s:.2f} s, restore {restore_s:.2f} s for {gigabytes * 1e3:.0f} MB; "
                      f"whole store restart (4 new actors) {results['store_restart_s']} s", flush=True)
            else:
                store.shutdown()
    finally:
        shutil.rmtree(root, ignore_errors=True)
        ray.shutdown()
    if args.inserts_only:
        return report(results, args.json)
    results["targets"] = {"insert_rows_per_s": ">= 100000", "sample_ratio_vs_local": ">= 0.9",
                          "bytes_per_row_ratio": "<= 1.3"}
    results["meets_targets"] = {
        "insert_rows_per_s": min(results["insert_rows_per_s[4 shards]"], results["insert_rows_per_s[8 shards]"]) >= 1e5,
        "sample_ratio_vs_local": results["sample_ratio_vs_local"] >= 0.9,
        "bytes_per_row_ratio": results["bytes_per_row_ratio"] <= 1.3,
    }
    return report(results, args.json)


if __name__ == "__main__":
    sys.exit(main())
