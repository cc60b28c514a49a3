"""What ``replay.fsync`` costs on inserts: the same rows into the same store, with every append
fsynced (a machine crash loses no acknowledged row) and without (a process's death loses none, a
machine crash may lose the last appends), trials alternating in one run on one local Ray.

  insert_rows_per_s[fsync]     rows/s acknowledged in 1k-row batches, one writer, 4 shards (median, trials)
  fsync_vs_plain_ratio         median with fsync / median without

  python bench/replay_fsync.py --json runs/bench/replay_fsync.json [--rows 50000] [--trials 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import add_baseline_options, baseline_report, quiet_environment, report

quiet_environment()  # before Ray is imported

import pyarrow as pa  # noqa: E402

from actors.cluster import start_local_ray  # noqa: E402
from actors.replay import ReplayStore  # noqa: E402
from pipelines.config import ReplayConfig  # noqa: E402
from replay_common import review_corpus  # noqa: E402

BATCH_ROWS = 1000


def inserts_per_s(data: pa.Table, directory: Path, *, fsync: bool, shards: int) -> float:
    config = ReplayConfig(enabled=True, num_shards=shards, capacity_rows=data.num_rows, remover="fifo",
                          snapshot_every_rows=None, fsync=fsync)
    store = ReplayStore.create(config, directory=directory)
    try:
        store.insert(data.slice(0, BATCH_ROWS))  # warm the actors
        start = time.perf_counter()
        stored = store.insert_batches(data.slice(offset, BATCH_ROWS)
                                      for offset in range(BATCH_ROWS, data.num_rows, BATCH_ROWS))
        assert stored == data.num_rows - BATCH_ROWS
        return stored / (time.perf_counter() - start)
    finally:
        store.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--shards", type=int, default=4)
    add_baseline_options(parser)
    args = parser.parse_args()
    if args.baseline:  # the same command on this code and on REF's, side by side
        return baseline_report(__file__, args)
    start_local_ray(dashboard=False, log_to_driver=False)
    data = review_corpus(args.rows)
    rates: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="replay-fsync-") as tmp:
        for trial in range(args.trials):
            for fsync in (False, True) if trial % 2 == 0 else (True, False):  # alternate who goes first
                rate = inserts_per_s(data, Path(tmp) / f"{trial}-{fsync}", fsync=fsync, shards=args.shards)
                rates[fsync].append(rate)
                print(f"trial {trial + 1}, fsync={fsync}: {rate:,.0f} rows/s", file=sys.stderr, flush=True)
    median = {k: statistics.median(v) for k, v in rates.items()}
    return report({
        "rows": args.rows, "batch_rows": BATCH_ROWS, "shards": args.shards,
        "insert_rows_per_s[fsync]": round(median[True]), "insert_rows_per_s[no fsync]": round(median[False]),
        "trials_rows_per_s": {"fsync": [round(r) for r in rates[True]], "no fsync": [round(r) for r in rates[False]]},
        "fsync_vs_plain_ratio": round(median[True] / median[False], 3),
    }, args.json)


if __name__ == "__main__":
    sys.exit(main())
