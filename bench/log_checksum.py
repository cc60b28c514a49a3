"""What the replay log's per-batch CRC-32C costs: the same 1k-row insert batches appended to a
shard's log with the checksum computed and without, trials alternating in one run. Only the log
append is timed (the cheapest path the checksum sits on, so the largest share it can take); the
whole store's inserts (bench/replay_fsync.py) do ~100x more work per row.

  append_rows_per_s[checksum]   rows/s appended, one journal (median, trials)
  checksum_vs_plain_ratio       median with / median without

  python bench/log_checksum.py --json runs/bench/log_checksum.json [--batches 300] [--trials 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow as pa
from common import add_baseline_options, baseline_report, report, spread

import storage.journal as journal

SCHEMA = pa.schema([pa.field("example_id", pa.string(), nullable=False), pa.field("source", pa.string()),
                    pa.field("target", pa.string())])
BATCH_ROWS = 1000


def append_rows_per_s(batches: int, *, checksum: bool) -> float:
    rows = pa.table({"example_id": [f"ex-{i:06d}" for i in range(BATCH_ROWS)],
                     "source": [f"question: what is replayed in example {i} of this batch?" for i in range(BATCH_ROWS)],
                     "target": [f"label {i % 7}" for i in range(BATCH_ROWS)]}, schema=SCHEMA)
    computed = journal.batch_crc32c
    if not checksum:
        journal.batch_crc32c = lambda batch: 0
    try:
        with tempfile.TemporaryDirectory() as directory:
            log = journal.ShardJournal(directory, SCHEMA)
            start = time.perf_counter()
            for _ in range(batches):
                log.append_insert(rows)
            elapsed = time.perf_counter() - start
            log.close()
    finally:
        journal.batch_crc32c = computed
    return batches * BATCH_ROWS / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--trials", type=int, default=5)
    add_baseline_options(parser)
    args = parser.parse_args()
    if args.baseline:  # the same command on this code and on REF's, side by side
        return baseline_report(__file__, args)
    trials: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.trials):
        for checksum in (False, True):
            trials[checksum].append(append_rows_per_s(args.batches, checksum=checksum))
    return report({
        "setup": {"batch_rows": BATCH_ROWS, "batches": args.batches, "trials": args.trials},
        "append_rows_per_s": {"checksum": spread(trials[True], None), "plain": spread(trials[False], None)},
        "checksum_vs_plain_ratio": round(statistics.median(trials[True]) / statistics.median(trials[False]), 3),
    }, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
