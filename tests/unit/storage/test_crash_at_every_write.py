"""Crash at every write: a replay shard's inserts, deletes, snapshots and checkpoints, each
committed by a record written after it (as a run's report.json commits a task), are stopped by a
power cut at each durable operation in turn (tests/unit/storage/powercut.py: what was not fsynced
is lost). After every one, the shard restores without an error and its rollback to the committed
tag gives exactly that tag's rows: never a mix, never a tag the record names but the disk lacks."""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import pyarrow as pa
import pytest

from storage import files
from storage.files import write_atomic
from storage.replay import ReplayShard
from tests.unit.storage.powercut import CUT, PowerCut

EXPECTED = {"start": set(), "t0": {f"a:{i}" for i in range(100)},
            "t1": {f"a:{i}" for i in range(20, 250)}}


def rows(start: int, n: int) -> pa.Table:
    ids = [f"a:{i}" for i in range(start, start + n)]
    return pa.table({"example_id": ids, "task_id": pa.array([0] * n, pa.int32()), "task_name": ["a"] * n,
                     "source": [f"text of {i}" for i in ids], "target": ["a"] * n})


def shard_scenario(root: Path) -> None:
    """Insert, delete, snapshot (every 150 rows) and checkpoint, each checkpoint then committed."""
    shard = ReplayShard(1000, directory=root / "shard", snapshot_every_rows=150, seed=0)

    def commit(tag: str) -> None:
        shard.checkpoint(tag)
        write_atomic(root / "commit.json", json.dumps({"tag": tag}))

    commit("start")
    shard.insert(rows(0, 100))
    commit("t0")
    shard.insert(rows(100, 100))  # past 150 rows since the last snapshot: a snapshot of its own
    shard.delete([f"a:{i}" for i in range(20)])
    shard.insert(rows(200, 50))
    commit("t1")
    shard.drop_checkpoints(keep=["t1"])
    shard.insert(rows(250, 10))  # after the last commit: a restore drops it
    shard.close()


def cut_at(n: int, root: Path) -> int:
    """Run the scenario in a child process, cut at operation ``n``; returns its exit status."""
    pid = os.fork()
    if pid == 0:  # the child: nothing of pytest's runs here, and it never returns
        try:
            files.set_observer(PowerCut(root, n))
            shard_scenario(root)
            os._exit(0)
        except BaseException:  # noqa: BLE001 - reported through the status
            traceback.print_exc(file=sys.stderr)
            os._exit(3)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def check_restore(root: Path) -> str | None:
    """What a resume does: read the commit record, open the shard, roll back to the tag it names."""
    committed = json.loads((root / "commit.json").read_text())["tag"] if (root / "commit.json").exists() else None
    shard = ReplayShard(1000, directory=root / "shard", snapshot_every_rows=150, seed=0)
    try:
        if committed is not None:
            shard.rollback(committed)
            assert set(shard.rows().column("example_id").to_pylist()) == EXPECTED[committed]
            assert shard.num_rows == len(EXPECTED[committed])
    finally:
        shard.close()
    return committed


def test_a_power_cut_at_any_write_of_the_shard_leaves_the_last_committed_rows_exactly(tmp_path):
    counter = PowerCut(tmp_path / "count", stop_at=None)
    (tmp_path / "count").mkdir()
    files.set_observer(counter)
    try:
        shard_scenario(tmp_path / "count")
    finally:
        files.set_observer(None)
    total = counter.count
    print(f"the scenario makes {total} durable operations; a power cut at each:")
    assert total > 40  # inserts, log segments, snapshots, manifests, links, renames, fsyncs
    seen = {}
    for n in range(1, total + 1):
        root = tmp_path / f"cut-{n:03d}"
        root.mkdir()
        status = cut_at(n, root)
        assert status == CUT, f"cut at operation {n}: the scenario ended with status {status}"
        try:
            seen[n] = check_restore(root)
        except Exception as exc:  # noqa: BLE001 - named with the operation it followed
            pytest.fail(f"after a power cut at operation {n} of {total}: {type(exc).__name__}: {exc}")
    # every commit was reached by some cut, and the commits only move forward
    order = [None, "start", "t0", "t1"]
    assert {tag for tag in seen.values()} == set(order)
    assert [order.index(seen[n]) for n in sorted(seen)] == sorted(order.index(seen[n]) for n in sorted(seen))

