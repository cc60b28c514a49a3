"""Soak: 4 writers and 2 samplers against a 4-shard replay store while shard processes are killed.

A killer sends SIGKILL to a random shard's process every ``--kill-every`` seconds until ``--kills``
kills (or ``--max-seconds``); writers insert batches of fresh ids and count a row as acknowledged
only when ``insert`` returned; samplers draw all the while. At the end, every acknowledged row must
be in the store exactly once — and again after the whole store is restarted from its directory.

  python bench/replay_soak.py --json runs/bench/replay_soak.json

Prints {"kills", "acked_rows", "lost_rows", "duplicated_rows", ...} and exits 1 if a row was lost
or duplicated.
"""

from __future__ import annotations

import argparse
import os
import pickle
import random
import signal
import tempfile
import threading
import time
from pathlib import Path

from common import add_baseline_options, baseline_report, quiet_environment, report

quiet_environment()

import pyarrow as pa  # noqa: E402
import ray  # noqa: E402

from actors.cluster import start_local_ray  # noqa: E402
from actors.replay import PrefetchingSampler, ReplayStore  # noqa: E402
from pipelines.config import ReplayConfig  # noqa: E402


def rows(ids: list[str]) -> pa.Table:
    n = len(ids)
    return pa.table({"example_id": ids, "task_id": pa.array([0] * n, pa.int32()), "task_name": ["soak"] * n,
                     "source": [f"text of {i} " * 8 for i in ids], "target": ["x"] * n})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the result here too")
    parser.add_argument("--kills", type=int, default=60)
    parser.add_argument("--kill-every", type=float, default=0.5, help="seconds between kills (jittered)")
    parser.add_argument("--max-seconds", type=float, default=240)
    parser.add_argument("--batch-rows", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    add_baseline_options(parser)
    args = parser.parse_args()
    if args.baseline:  # the same command on this code and on REF's, side by side
        return baseline_report(__file__, args)

    start_local_ray(2, dashboard=False, log_to_driver=False)
    directory = Path(tempfile.mkdtemp(prefix="replay-soak-"))
    config = ReplayConfig(enabled=True, num_shards=4, capacity_rows=10_000_000, remover="fifo",
                          snapshot_every_rows=20_000)
    store = ReplayStore.create(config, directory=directory, seed=args.seed)
    store.insert(rows(["seed:0"]))
    acked: list[str] = ["seed:0"]
    lock = threading.Lock()
    stop = threading.Event()
    counts = {"insert_calls": 0, "insert_failures": 0, "sample_batches": 0, "sample_failures": 0}
    failures: list[str] = []

    def writer(w: int) -> None:
        handle = pickle.loads(pickle.dumps(store))  # each writer its own handle, as trainers have
        k = 0
        while not stop.is_set():
            ids = [f"w{w}:{k}:{i}" for i in range(args.batch_rows)]
            try:
                handle.insert(rows(ids))
            except Exception as exc:  # noqa: BLE001 - counted: the batch was not acknowledged
                with lock:
                    counts["insert_failures"] += 1
                    failures.append(f"insert: {type(exc).__name__}: {str(exc)[:200]}")
            else:
                with lock:
                    acked.extend(ids)
                    counts["insert_calls"] += 1
            k += 1

    def sampler(s: int) -> None:
        feed = PrefetchingSampler(store, batch_size=64, seed=[args.seed, 99, s], batches_per_call=16)
        while not stop.is_set():
            try:
                batch = feed.next_batch()
                assert batch.num_rows == 64
                with lock:
                    counts["sample_batches"] += 1
            except Exception as exc:  # noqa: BLE001
                with lock:
                    counts["sample_failures"] += 1
                    failures.append(f"sample: {type(exc).__name__}: {str(exc)[:200]}")
                feed.close()
                feed = PrefetchingSampler(store, batch_size=64, seed=[args.seed, 99, s, counts["sample_failures"]],
                                          batches_per_call=16)
        feed.close()

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    threads += [threading.Thread(target=sampler, args=(s,)) for s in range(2)]
    started = time.monotonic()
    for thread in threads:
        thread.start()

    rng = random.Random(args.seed)
    kills, skipped = 0, 0
    while kills < args.kills and time.monotonic() - started < args.max_seconds:
        time.sleep(args.kill_every * rng.uniform(0.5, 1.5))
        shard = rng.randrange(store.num_shards)
        try:
            pid = ray.get(store.shards[shard].pid.remote(), timeout=30)
            os.kill(pid, signal.SIGKILL)
            kills += 1
        except ray.exceptions.ActorUnavailableError:
            skipped += 1  # still restarting from the last kill: pick again next time
        except (ray.exceptions.RayError, ProcessLookupError) as exc:
            failures.append(f"kill: {type(exc).__name__}: {str(exc)[:200]}")
    stop.set()
    for thread in threads:
        thread.join(timeout=120)
    seconds = time.monotonic() - started

    held = store.rows().column("example_id").to_pylist()
    acked_set = set(acked)
    lost = len(acked_set - set(held))
    duplicated = len(held) - len(set(held))
    store.shutdown()
    restarted = ReplayStore.create(config, directory=directory, seed=args.seed)
    after_restart = restarted.rows().column("example_id").to_pylist()
    lost_after_restart = len(acked_set - set(after_restart))
    restarted.shutdown()
    restarted_rows = [s for s in after_restart if s not in acked_set]

    result = {
        "kills": kills, "kills_skipped_shard_restarting": skipped, "seconds": round(seconds, 1), "acked_rows": len(acked_set), "lost_rows": lost,
        "duplicated_rows": duplicated, "stored_rows": len(held),
        "stored_but_unacknowledged_rows": len(set(held) - acked_set),
        "lost_rows_after_store_restart": lost_after_restart,
        "duplicated_rows_after_store_restart": len(after_restart) - len(set(after_restart)),
        "unacknowledged_rows_after_store_restart": len(restarted_rows),
        **counts,
        "rows_per_second": round(len(acked_set) / seconds),
        "first_failures": failures[:5],
    }
    report(result, Path(args.json) if args.json else None)
    ray.shutdown()
    if lost or duplicated or lost_after_restart:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
