"""The replay store on a real local Ray: routing, proportional sampling, scale-out, faults, load."""

import json
import os
import pickle
import signal
import threading
import time

import numpy as np
import pyarrow as pa
import pytest
import ray

from actors.replay import PrefetchingSampler, ReplayStore
from pipelines.config import ReplayConfig
from storage.replay import LOGITS_TYPE, EmptyReplayError, SchemaMismatchError, route


@pytest.fixture(scope="module", autouse=True)
def _ray(local_ray):
    return local_ray


def rows(ids, task="a"):
    n = len(ids)
    return pa.table({"example_id": list(ids), "task_id": pa.array([0] * n, pa.int32()), "task_name": [task] * n,
                     "source": [f"text {i}" for i in ids], "target": ["x"] * n})


def make_store(tmp_path=None, **overrides):
    config = ReplayConfig(enabled=True, **{"num_shards": 2, "capacity_rows": 10_000, "remover": "fifo", **overrides})
    return ReplayStore.create(config, directory=tmp_path, seed=0)


def ids_by_shard(store):
    return [set(ray.get(s.rows.remote()).column("example_id").to_pylist()) for s in store.shards]


def test_inserts_are_routed_by_example_id():
    store = make_store(num_shards=3)
    ids = [f"t:{i}" for i in range(300)]
    assert store.insert(rows(ids)) == 300
    for index, held in enumerate(ids_by_shard(store)):
        assert held == {i for i, target in zip(ids, route(ids, 3)) if target == index}
    store.shutdown()


def test_bad_batch_is_rejected_before_any_shard_sees_it():
    store = make_store()
    with pytest.raises(SchemaMismatchError, match="missing column"):
        store.insert(rows([f"t:{i}" for i in range(10)]).drop_columns(["target"]))
    assert store.num_rows() == 0
    store.shutdown()


def test_insert_batches_sends_small_batches_together_and_a_bad_one_stores_every_batch_before_it(monkeypatch):
    store = make_store(num_shards=3)
    sends = []
    real_send = store._send
    monkeypatch.setattr(store, "_send", lambda table: sends.append(table.num_rows) or real_send(table))
    batches = [rows([f"t:{b}:{i}" for i in range(10)]) for b in range(30)]
    logits = pa.array([{"tokens": 1, "k": 2, "ids": [i, i + 1], "values": [0.5, 0.25]} for i in range(10)], LOGITS_TYPE)
    batches[7] = batches[7].append_column("logits", logits)  # one batch with logits among batches without
    assert store.insert_batches(batches, send_bytes=batches[0].nbytes * 4) == 300
    assert 1 < len(sends) < 30 and sum(sends) == 300  # gathered into a few sends, every row in one of them
    ids = [f"t:{b}:{i}" for b in range(30) for i in range(10)]
    for index, held in enumerate(ids_by_shard(store)):
        assert held == {i for i, target in zip(ids, route(ids, 3)) if target == index}
    stored = store.rows()
    with_logits = stored.filter(pa.compute.is_valid(stored.column("logits")))
    assert sorted(with_logits.column("example_id").to_pylist()) == sorted(f"t:7:{i}" for i in range(10))
    assert {r["ids"][0] for r in with_logits.column("logits").to_pylist()} == set(range(10))

    more = [rows([f"u:{b}:{i}" for i in range(10)]) for b in range(8)]
    more[5] = more[5].drop_columns(["target"])
    with pytest.raises(SchemaMismatchError, match=r"batch 5 of insert_batches.*missing column"):
        store.insert_batches(more, send_bytes=10**9)
    assert store.num_rows() == 300 + 50  # the five batches before the bad one, and nothing after
    store.shutdown()


def test_sampling_an_empty_store_is_a_clear_error_not_a_hang():
    store = make_store()
    started = time.monotonic()
    with pytest.raises(EmptyReplayError, match="the replay store is empty"):
        store.sample(8)
    assert time.monotonic() - started < 10
    store.shutdown()


def test_samples_follow_shard_sizes():
    store = make_store(num_shards=2)
    candidates = [f"t:{i}" for i in range(4000)]
    targets = route(candidates, 2)
    chosen = [i for i, t in zip(candidates, targets) if t == 0][:900] + [i for i, t in zip(candidates, targets)
                                                                          if t == 1][:300]
    store.insert(rows(chosen))
    sample = store.sample(6000)
    from_first = np.mean(route(sample.column("example_id").to_pylist(), 2) == 0)
    assert from_first == pytest.approx(0.75, abs=0.03)
    store.shutdown()


def test_add_shards_moves_rows_without_loss_or_duplicates_and_old_handles_follow():
    store = make_store(num_shards=2)
    ids = [f"t:{i}" for i in range(2000)]
    store.insert(rows(ids))
    stale = pickle.loads(pickle.dumps(store))  # a copy held by a trainer, before scaling out
    moved = store.add_shards(2)
    held = ids_by_shard(store)
    assert sum(len(h) for h in held) == 2000 and set().union(*held) == set(ids)
    for index, shard_ids in enumerate(held):
        assert all(route([i], 4)[0] == index for i in shard_ids)
    assert moved == sum(len(h) for h in held[2:]) > 0
    # the stale copy learns the new topology from a reply and then samples from all four shards
    stale.sample(100)
    assert stale.num_shards == 4
    seen = route(stale.sample(4000).column("example_id").to_pylist(), 4)
    assert set(seen.tolist()) == {0, 1, 2, 3}
    store.shutdown()


def test_a_stale_copy_whose_insert_every_old_shard_refuses_routes_all_of_it_again():
    """Both old shards refuse the stale copy's parts: the copy reads the new topology once and routes
    both parts again (a second read, finding nothing newer, must not be taken for a lost topology)."""
    store = make_store(num_shards=2)
    stale = pickle.loads(pickle.dumps(store))
    store.add_shards(2)
    ids = [f"late:{i}" for i in range(400)]
    assert set(route(ids, 2).tolist()) == {0, 1}  # a part for each old shard, both refused
    started = time.monotonic()
    assert stale.insert(rows(ids)) == 400
    assert time.monotonic() - started < 5.0, "the copy waited for a topology newer than the one it had read"
    assert stale.num_shards == 4
    _placement_is_exact(store, ids)
    store.shutdown()


def _placement_is_exact(store, acknowledged):
    """Every acknowledged row held exactly once, on the shard the store's topology routes it to."""
    held = [ray.get(s.rows.remote()).column("example_id").to_pylist() for s in store.shards]
    flat = [i for shard in held for i in shard]
    assert len(flat) == len(set(flat)), "a row is on two shards"
    assert set(flat) == set(acknowledged), (len(set(acknowledged) - set(flat)), "rows lost")
    for index, shard_ids in enumerate(held):
        assert (route(shard_ids, store.num_shards) == index).all(), f"shard {index} holds rows routed elsewhere"


def test_resizing_while_two_writers_and_a_sampler_run_loses_and_doubles_nothing(tmp_path):
    store = make_store(tmp_path, num_shards=2, capacity_rows=100_000)
    store.insert(rows(["seed:0"]))
    acknowledged, sampled, errors = ["seed:0"], [0], []
    lock, done, stop = threading.Lock(), threading.Event(), threading.Event()

    def writer(w):
        handle = pickle.loads(pickle.dumps(store))  # each writer holds its own copy, as trainers do
        try:
            batch = 0
            while not stop.is_set():  # until both resizes are over, however fast the machine
                ids = [f"w{w}:{batch}:{i}" for i in range(40)]
                handle.insert(rows(ids))
                with lock:
                    acknowledged.extend(ids)
                batch += 1
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def sampler():
        handle = pickle.loads(pickle.dumps(store))
        rng = np.random.default_rng(1)
        try:
            while not done.is_set():
                sampled[0] += handle.sample(64, rng).num_rows
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(2)] + [threading.Thread(target=sampler)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    at_add = len(acknowledged)
    moved_out = store.add_shards(2)  # while they run
    time.sleep(0.5)
    moved_in = store.remove_shards(1)
    at_removed = len(acknowledged)
    time.sleep(0.5)  # the writers go on after the last resize too
    stop.set()
    for t in threads[:2]:
        t.join()
    done.set()
    threads[2].join()
    assert errors == [], errors
    assert store.num_shards == 3 and moved_out > 0 and moved_in > 0 and sampled[0] > 0
    _placement_is_exact(store, acknowledged)
    assert len(set(acknowledged)) == len(acknowledged)
    assert 1 < at_add and at_removed < len(acknowledged), (at_add, at_removed)  # both resizes met live writers
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
        "retired-000003-shard-003", "shard-000", "shard-001", "shard-002"]
    again = make_store(tmp_path, num_shards=2)  # reopened: the store's own shard count, not the config's
    assert again.num_shards == 3 and again.num_rows() == len(acknowledged)
    store.shutdown()
    again.shutdown()


def test_rollback_across_resizes_gives_back_the_checkpointed_rows_where_they_now_belong(tmp_path):
    store = make_store(tmp_path, num_shards=3)
    first = [f"a:{i}" for i in range(600)]
    store.insert(rows(first))
    store.checkpoint("t0")
    store.add_shards(1)
    store.insert(rows([f"b:{i}" for i in range(300)]))  # after the checkpoint: must go
    assert store.rollback("t0") == 600
    _placement_is_exact(store, first)
    store.checkpoint("t1")
    store.remove_shards(2)  # the rows of shards 2 and 3 move onto 0 and 1; their files retire
    store.insert(rows([f"c:{i}" for i in range(100)]))
    assert store.rollback("t1") == 600  # shard 2's and 3's t1 rows come back from their retired files
    _placement_is_exact(store, first)
    store.drop_checkpoints(keep=["t1"])
    assert len(list(tmp_path.glob("retired-*"))) == 2  # t1 still needs them
    store.checkpoint("t2")
    store.drop_checkpoints(keep=["t2"])
    assert list(tmp_path.glob("retired-*")) == []  # no kept checkpoint predates their retirement
    store.shutdown()


def test_remove_shards_keeps_at_least_one():
    store = make_store(num_shards=2)
    with pytest.raises(ValueError, match="between 1 and 1"):
        store.remove_shards(2)
    store.shutdown()


def test_add_shards_stops_at_the_configured_limit():
    store = make_store(num_shards=2, max_shards=3)
    with pytest.raises(ValueError, match=r"adding 2 shard\(s\) to 2 would pass replay.max_shards=3"):
        store.add_shards(2)
    assert store.num_shards == 2  # refused before a shard started
    store.shutdown()


def test_killed_shard_restarts_holding_exactly_the_acknowledged_rows(tmp_path):
    store = make_store(tmp_path, num_shards=2, snapshot_every_rows=300)
    acknowledged: list[str] = []
    victim = store.shards[0]
    pid = ray.get(victim.pid.remote())
    killer = threading.Timer(0.5, os.kill, args=(pid, signal.SIGKILL))  # lands mid-stream, maybe mid-call
    killer.start()
    for batch in range(120):
        ids = [f"t:{batch}:{i}" for i in range(50)]
        store.insert(rows(ids))  # returns only when every part is acknowledged (retried if needed)
        acknowledged.extend(ids)
        time.sleep(0.01)
    killer.join()
    held = ids_by_shard(store)
    assert set().union(*held) == set(acknowledged)
    assert sum(len(h) for h in held) == len(acknowledged)
    stats = store.stats()[0]
    assert ray.get(victim.pid.remote()) != pid
    assert stats.restored_rows > 0  # it came back from its snapshot and log, not empty
    store.shutdown()


def test_store_restarts_from_its_directory(tmp_path):
    store = make_store(tmp_path)
    store.insert(rows([f"t:{i}" for i in range(100)]))
    store.shutdown()
    again = make_store(tmp_path)
    assert again.num_rows() == 100
    again.shutdown()


def test_four_writers_and_two_samplers(tmp_path):
    store = make_store(tmp_path, num_shards=4, capacity_rows=100_000)
    store.insert(rows(["seed:0"]))
    acknowledged = [1]
    sampled = []
    stop = time.monotonic() + 6
    lock = threading.Lock()

    def writer(w):
        handle = pickle.loads(pickle.dumps(store))
        k = 0
        while time.monotonic() < stop:
            n = handle.insert(rows([f"w{w}:{k}:{i}" for i in range(100)]))
            with lock:
                acknowledged.append(n)
            k += 1

    def sampler():
        handle = pickle.loads(pickle.dumps(store))
        while time.monotonic() < stop:
            sampled.append(handle.sample(64).num_rows)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)] + [
        threading.Thread(target=sampler) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert store.num_rows() == sum(acknowledged) > 1000
    assert len(store.rows().column("example_id").unique()) == sum(acknowledged)
    assert sampled and set(sampled) == {64}
    store.shutdown()


def test_prefetching_sampler_hands_out_full_batches():
    store = make_store()
    store.insert(rows([f"t:{i}" for i in range(500)]))
    sampler = PrefetchingSampler(store, batch_size=32, in_flight=3, batches_per_call=2)
    batches = [sampler.next_batch() for _ in range(20)]
    assert all(b.num_rows == 32 for b in batches)
    sampler.close()
    store.shutdown()


def test_prefetching_sampler_waits_out_the_rate_limit():
    store = make_store(num_shards=1, max_samples_per_insert=1.0)
    store.insert(rows([f"t:{i}" for i in range(64)]))
    sampler = PrefetchingSampler(store, batch_size=32, in_flight=1, batches_per_call=1, timeout_s=20)
    sampler.next_batch()
    sampler.next_batch()  # 64 sampled of 64 inserted: the next call must wait for inserts

    def insert_later():
        time.sleep(1.0)
        store.insert(rows([f"u:{i}" for i in range(64)]))

    threading.Thread(target=insert_later).start()
    started = time.monotonic()
    assert sampler.next_batch().num_rows == 32
    assert time.monotonic() - started >= 0.5
    store.shutdown()


def test_sampling_goes_on_through_a_shard_killed_mid_call_and_draws_the_same_rows(tmp_path):
    store = make_store(tmp_path, num_shards=2, capacity_rows=100_000)
    store.insert(rows([f"t:{i}" for i in range(20_000)]))
    reference = [store.sample(20_000, np.random.default_rng(k)).column("example_id") for k in range(40)]
    victim = store.shards[1]
    pid = ray.get(victim.pid.remote())
    killer = threading.Timer(0.3, os.kill, args=(pid, signal.SIGKILL))
    killer.start()
    for k in range(40):  # ~40 calls of 10k rows per shard: the kill lands in one, or between two
        assert store.sample(20_000, np.random.default_rng(k)).column("example_id").equals(reference[k])
        time.sleep(0.02)
    killer.join()
    assert ray.get(victim.pid.remote()) != pid and store.stats()[1].restored_rows > 0
    store.shutdown()


def test_prefetching_samplers_with_the_same_seed_hand_out_the_same_batches():
    store = make_store()
    store.insert(rows([f"t:{i}" for i in range(500)]))
    first, second, other = (PrefetchingSampler(store, batch_size=16, seed=seed, batches_per_call=4)
                            for seed in ([0, 1, 0], [0, 1, 0], [0, 1, 1]))
    batches = [(first.next_batch(), second.next_batch(), other.next_batch()) for _ in range(10)]
    assert all(a.equals(b) for a, b, _ in batches)
    assert not all(a.equals(c) for a, _, c in batches)  # another rank (or task) draws its own rows
    for sampler in (first, second, other):
        sampler.close()
    store.shutdown()


@pytest.mark.parametrize("sampler", ["uniform", "task_balanced"])
def test_zero_copy_sampling_draws_what_the_shards_would_send_and_follows_every_insert(sampler):
    store = make_store(num_shards=3, sampler=sampler)  # zero-copy sampling is on by default
    sent = make_store(num_shards=3, sampler=sampler, zero_copy_sampling=False)
    for batch in (rows([f"a:{i}" for i in range(3_000)], "a"), rows([f"b:{i}" for i in range(500)], "b")):
        store.insert(batch)
        sent.insert(batch)
        for k in range(3):  # the same split over shards and the same rows, by seed
            mine = store.sample(4_000, np.random.default_rng(k))
            theirs = sent.sample(4_000, np.random.default_rng(k))
            assert mine.column("example_id").equals(theirs.column("example_id"))
    assert set(mine.column("task_name").to_pylist()) == {"a", "b"}  # the second insert was published again
    assert sorted(store._published) == [0, 1, 2]  # every shard is on this node: all taken from here
    assert sum(s.sampled_rows for s in store.stats()) == 0  # no shard drew a row itself
    assert sum(s.sampled_rows for s in sent.stats()) == 6 * 4_000
    rate_limited = make_store(max_samples_per_insert=10.0)  # a limit needs the shards to count: they draw
    rate_limited.insert(rows([f"c:{i}" for i in range(100)]))
    rate_limited.sample(50)
    assert sum(s.sampled_rows for s in rate_limited.stats()) == 50
    for each in (store, sent, rate_limited):
        each.shutdown()


class _Crash(BaseException):
    """The process dying at a chosen point of a removal (nothing after it runs)."""


@pytest.mark.parametrize("crash_at", ["after the intent", "after a shard's rows moved, before their delete",
                                      "after the smaller store is published, before the renames"])
def test_a_removal_stopped_at_any_point_is_finished_by_the_next_open_with_every_row_once(tmp_path, monkeypatch,
                                                                                         crash_at):
    store = make_store(tmp_path, num_shards=3)
    ids = [f"r:{i}" for i in range(600)]
    store.insert(rows(ids))
    store.checkpoint("t0")
    if crash_at == "after the intent":
        monkeypatch.setattr(ReplayStore, "_finish_removal", lambda self, keep: (_ for _ in ()).throw(_Crash()))
    elif crash_at.startswith("after a shard's rows moved"):
        call = ReplayStore._call
        monkeypatch.setattr(ReplayStore, "_call", lambda self, i, method, *a, **k: (
            (_ for _ in ()).throw(_Crash()) if method == "delete" else call(self, i, method, *a, **k)))
    else:
        monkeypatch.setattr(ReplayStore, "_stop", staticmethod(lambda shard, timeout_s: (_ for _ in ()).throw(_Crash())))
    with pytest.raises(_Crash):
        store.remove_shards(1)
    monkeypatch.undo()
    for actor in ray.util.list_named_actors(all_namespaces=True):  # the store's process is gone, its shards with it
        if actor["name"].startswith(store.name):
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)

    again = ReplayStore.create(store.config, directory=tmp_path, seed=0, name=store.name + "-again")
    assert again.num_shards == 2
    held = ids_by_shard(again)
    assert sum(len(h) for h in held) == 600 and set().union(*held) == set(ids)  # none lost, none twice
    _placement_is_exact(again, ids)
    manifest = json.loads((tmp_path / "store.json").read_text())
    assert manifest["num_shards"] == 2 and not manifest.get("removing")
    assert [p.name for p in tmp_path.glob("retired-*")] == [e["directory"] for e in manifest["retired"]]
    assert not (tmp_path / "shard-002").exists()
    assert again.rollback("t0") == 600  # the checkpoint before the removal still restores
    _placement_is_exact(again, ids)
    again.shutdown()
