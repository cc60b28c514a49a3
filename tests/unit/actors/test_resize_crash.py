"""Crash at every write of the replay store's resize: shards added and removed between committed
checkpoints, stopped by a power cut (tests/unit/storage/powercut.py) at each durable operation in
turn, of store.json and of every shard alike. After every cut the store reopens without an error,
finishes a removal it finds half-done, and its rollback to the committed tag gives exactly that
tag's rows, each once and in the shard the topology routes it to. A cut inside a resize is also
checked without the rollback (a store resized by hand between runs has no commit to go back to):
the store holds the rows it held before the resize, none lost, and after a removal none twice.

A power cut stops every process of the machine at one instant. To give the cut one order of
operations to stop at, the shards run in this process: ``ReplayStore`` itself, with its
``ReplayShard``s called in place of their actors (the calls a store makes are synchronous, so this
is one of the orders a real store may take). What Ray adds — restarts, routing of stale writers —
is tested with real actors in tests/integration/test_replay_store.py.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow as pa
import pytest
import ray

import actors.replay
from actors.replay import ReplayStore
from pipelines.config import ReplayConfig
from storage import files
from storage.files import write_atomic
from storage.replay import ReplayShard, route
from tests.unit.storage.powercut import CUT, PowerCut

def replay_config(fsync: bool) -> ReplayConfig:
    return ReplayConfig(enabled=True, num_shards=3, capacity_rows=1000, snapshot_every_rows=150, placement="DEFAULT",
                        rows_per_task=None, fsync=fsync)

EXPECTED = {"start": set(), "t0": {f"a:{i}" for i in range(200)},
            "t1": {f"a:{i}" for i in range(20, 300)}, "t2": {f"a:{i}" for i in range(20, 350)}}


class _InPlace:
    """A shard behind an actor handle's call syntax: ``handle.method.remote(*args)`` runs it now."""

    def __init__(self, shard: ReplayShard):
        self._shard, self._actor_id = shard, id(shard)

    def __getattr__(self, method: str) -> Any:
        return SimpleNamespace(remote=getattr(self._shard, method))


class InPlaceStore(ReplayStore):
    def _launch(self, shard_id: int, node: str | None, *, get_if_exists: bool = False) -> Any:
        return _InPlace(ReplayShard(self.config.shard_capacity, **self._shard_options(shard_id)))


def in_place_ray() -> SimpleNamespace:
    """What ``actors.replay`` calls of ``ray`` once every call already ran: the replies themselves."""
    return SimpleNamespace(get=lambda replies, timeout=None: replies, kill=lambda *_, **__: None,
                           exceptions=ray.exceptions)


def rows(start: int, stop: int) -> pa.Table:
    ids = [f"a:{i}" for i in range(start, stop)]
    return pa.table({"example_id": ids, "task_id": pa.array([0] * len(ids), pa.int32()), "task_name": ["a"] * len(ids),
                     "source": [f"text of {i}" for i in ids], "target": ["a"] * len(ids)})


def resize_scenario(root: Path, config: ReplayConfig, mark: Any = lambda name: None) -> None:
    """3 shards, then 4, then 2, a committed checkpoint between each, as a run's tasks commit;
    ``mark(name)`` is called where each resize starts and ends."""
    store = InPlaceStore.create(config, directory=root / "store", seed=0, name="cut")

    def commit(tag: str, *, keep: tuple[str, ...] = ()) -> None:
        store.checkpoint(tag)
        write_atomic(root / "commit.json", json.dumps({"tag": tag}))
        store.drop_checkpoints(keep=[*keep, tag])

    commit("start")
    store.insert(rows(0, 200))
    commit("t0")
    mark("add")
    store.add_shards(1)
    mark("added")
    store.insert(rows(200, 300))
    store.delete([f"a:{i}" for i in range(20)])
    commit("t1", keep=("t0",))  # t0 kept past a removal: its rows then come from retired files
    mark("remove")
    store.remove_shards(2)
    mark("removed")
    store.insert(rows(300, 350))
    commit("t2")
    store.insert(rows(350, 360))  # after the last commit: a restore drops it
    store.shutdown()


def cut_at(n: int, root: Path, config: ReplayConfig) -> int:
    """Run the scenario in a child process, cut at operation ``n``; returns its exit status."""
    pid = os.fork()
    if pid == 0:  # the child: nothing of pytest's runs here, and it never returns
        try:
            actors.replay.ray = in_place_ray()
            files.set_observer(PowerCut(root, n))
            resize_scenario(root, config)
            os._exit(0)
        except BaseException:  # noqa: BLE001 - reported through the status
            traceback.print_exc(file=sys.stderr)
            os._exit(3)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def cut_and_check(n: int, total: int, root: Path, config: ReplayConfig, during: str | None) -> int:
    """In a process of its own: the cut at operation ``n``, then the restore's check; what it found
    goes to ``root/result.json`` (the tag restored, or the failure). Returns the process id."""
    pid = os.fork()
    if pid == 0:
        try:
            status = cut_at(n, root, config)
            if status != CUT:
                result = {"failure": f"cut at operation {n}: the scenario ended with status {status}"}
            else:
                actors.replay.ray = in_place_ray()
                result = {"tag": check_restore(root, config, during)}
        except BaseException as exc:  # noqa: BLE001 - named with the operation it followed
            result = {"failure": f"after a power cut at operation {n} of {total}: {type(exc).__name__}: {exc}"}
        (root / "result.json").write_text(json.dumps(result))
        os._exit(0)
    return pid


def check_held(store: ReplayStore, expected: set[str], what: str, *, once: bool = True) -> None:
    """The store holds exactly ``expected``; with ``once``, each row once and where it is routed."""
    held = [store._call(i, "rows").column("example_id").to_pylist() for i in range(store.num_shards)]
    every = [example for shard in held for example in shard]
    assert set(every) == expected, (f"{what}: {len(expected - set(every))} rows missing, "
                                    f"{len(set(every) - expected)} extra")
    if once:
        assert len(every) == len(set(every)), f"{what}: {len(every) - len(set(every))} rows held twice"
        for index, ids in enumerate(held):
            assert (route(pa.array(ids, pa.string()), store.num_shards, store.routing) == index).all(), \
                f"{what}: shard {index} holds rows the topology routes elsewhere"


def check_restore(root: Path, config: ReplayConfig, during: str | None) -> str | None:
    """What a resume does: open the store, roll it back to the tag the commit record names; then
    every expected row is held exactly once, where the store's topology routes it. ``during``: the
    resize the cut stopped ("add", "remove"), checked before the rollback."""
    committed = json.loads((root / "commit.json").read_text())["tag"] if (root / "commit.json").exists() else None
    store = InPlaceStore.create(config, directory=root / "store", seed=0, name="cut")
    try:
        assert not (store._manifest or {}).get("removing"), "a removal found half-done was not finished"
        if during == "add":  # a row copied to a new shard but not yet deleted from its old one: kept twice
            check_held(store, EXPECTED["t0"], "opened after a cut inside add_shards", once=False)
        elif during == "remove":
            check_held(store, EXPECTED["t1"], "opened after a cut inside remove_shards")
        if committed is None:
            return None
        store.rollback(committed)
        check_held(store, EXPECTED[committed], f"rolled back to {committed}")
    finally:
        store.shutdown()
    return committed


@pytest.mark.parametrize("fsync", [False, True], ids=["replay.fsync false: every operation",
                                                     "replay.fsync true: the resizes' operations"])
def test_a_power_cut_at_any_write_of_a_resize_leaves_the_last_committed_rows_exactly(tmp_path, monkeypatch, fsync):
    """With ``replay.fsync`` off (the default), a shard's appends are lost in a cut until something
    fsyncs them: the resize's own ordering then shows only where it fsyncs. With it on, every
    append is on disk at once, so the order of a resize's copies and deletes is what the cut sees
    (the rest of the scenario is the shard test's, in tests/unit/storage)."""
    config = replay_config(fsync)
    monkeypatch.setattr(actors.replay, "ray", in_place_ray())
    (tmp_path / "count").mkdir()
    counter = PowerCut(tmp_path / "count", stop_at=None)
    marks: dict[str, int] = {}
    files.set_observer(counter)
    try:
        resize_scenario(tmp_path / "count", config, lambda name: marks.setdefault(name, counter.count))
    finally:
        files.set_observer(None)
    total = counter.count
    print(f"the resize scenario makes {total} durable operations (add_shards: {marks['add'] + 1}-{marks['added']}, "
          f"remove_shards: {marks['remove'] + 1}-{marks['removed']}); a power cut at each:")
    assert total > 100  # store.json, shard logs, snapshots, checkpoint links, retired directories
    inside = [*range(marks["add"] + 1, marks["added"] + 1), *range(marks["remove"] + 1, marks["removed"] + 1)]
    cuts = inside if fsync else list(range(1, total + 1))
    running: list[int] = []
    for n in cuts:  # two at a time: each cut and its check is a process of its own, on a root of its own
        if len(running) == 2:
            os.waitpid(running.pop(0), 0)
        root = tmp_path / f"cut-{n:03d}"
        root.mkdir()
        during = ("add" if marks["add"] < n <= marks["added"] else
                  "remove" if marks["remove"] < n <= marks["removed"] else None)
        running.append(cut_and_check(n, total, root, config, during))
    for pid in running:
        os.waitpid(pid, 0)
    seen = {}
    for n in cuts:
        result = json.loads((tmp_path / f"cut-{n:03d}" / "result.json").read_text())
        if "failure" in result:
            pytest.fail(result["failure"])
        seen[n] = result["tag"]
    order = [None, "start", "t0", "t1", "t2"]
    assert set(seen.values()) == ({"t0", "t1"} if fsync else set(order))  # every commit was reached by some cut
    assert [order.index(seen[n]) for n in sorted(seen)] == sorted(order.index(seen[n]) for n in sorted(seen))
