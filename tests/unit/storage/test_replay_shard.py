"""ReplayShard as a plain object: schema checks, removers, samplers, log and snapshot round trips."""


import numpy as np
import pyarrow as pa
import pytest
from scipy import stats

from storage.replay import (
    LOGITS_TYPE,
    REPLAY_SCHEMA,
    EmptyReplayError,
    ReplayShard,
    SchemaMismatchError,
    check_batch,
    route,
    upgrade,
    without_empty_optional_columns,
)
from storage.errors import StorageError
from storage.policy import RateLimitedError


def rows(start, n, task="a", task_id=0):
    ids = [f"{task}:{i}" for i in range(start, start + n)]
    return pa.table({"example_id": ids, "task_id": pa.array([task_id] * n, pa.int32()), "task_name": [task] * n,
                     "source": [f"text of {i}" for i in ids], "target": [task] * n})


def ids_of(shard):
    return shard.rows().column("example_id").to_pylist()


# ---------------------------------------------------------------- construction and schema
@pytest.mark.parametrize("capacity", [0, -5, 2.5, True], ids=["zero", "negative", "float", "bool"])
def test_capacity_must_be_a_positive_integer(capacity):
    with pytest.raises(ValueError, match=rf"capacity_rows \({capacity!r}\) must be a positive integer"):
        ReplayShard(capacity)


def test_unknown_policies_list_the_choices():
    with pytest.raises(ValueError, match=r"unknown remover 'lru'; choose one of \['fifo'"):
        ReplayShard(10, remover="lru")
    with pytest.raises(ValueError, match=r"unknown sampler 'prio'"):
        ReplayShard(10, sampler="prio")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: t.drop_columns(["target"]), r"missing column\(s\) \['target'\]"),
        (lambda t: t.append_column("score", pa.array([1.0] * t.num_rows)), r"unexpected column\(s\) \['score'\]"),
        (lambda t: t.set_column(1, "task_id", pa.array(["0"] * t.num_rows)),
         r"column 'task_id' has type string, expected int32"),
        (lambda t: t.set_column(3, "source", pa.array(["x", None, "z"])), r"column 'source' has 1 null"),
    ],
    ids=["missing", "extra", "mistyped", "null"],
)
def test_bad_batch_is_rejected_whole_naming_the_column(mutate, message):
    shard = ReplayShard(10)
    shard.insert(rows(0, 2))
    with pytest.raises(SchemaMismatchError, match=message):
        shard.insert(mutate(rows(10, 3)))
    assert ids_of(shard) == ["a:0", "a:1"]  # nothing of the bad batch, nothing lost


def test_schema_error_is_also_a_type_error():
    with pytest.raises(TypeError):
        ReplayShard(10).insert(rows(0, 1).drop_columns(["source"]))


def test_schema_tags_that_token_ids_are_not_cached():
    assert REPLAY_SCHEMA.metadata[b"forgetless.token_ids"].startswith(b"none")


def test_repeated_ids_are_stored_once():
    shard = ReplayShard(10)
    assert shard.insert(rows(0, 3)) == 3
    assert shard.insert(rows(1, 3)) == 1  # a:1, a:2 already held
    assert shard.insert(pa.concat_tables([rows(7, 1), rows(7, 1)])) == 1
    assert sorted(ids_of(shard)) == ["a:0", "a:1", "a:2", "a:3", "a:7"]


def test_empty_shard_sampling_is_a_clear_error():
    with pytest.raises(EmptyReplayError, match="replay shard 0 is empty"):
        ReplayShard(10).sample(4)


# ---------------------------------------------------------------- removers
def test_fifo_keeps_the_newest():
    shard = ReplayShard(5, remover="fifo")
    shard.insert(rows(0, 4))
    shard.insert(rows(4, 4))
    assert ids_of(shard) == [f"a:{i}" for i in range(3, 8)]
    assert shard.stats().evicted_rows == 3


def test_reservoir_exact_ids_under_a_seed():
    shard = ReplayShard(5, remover="reservoir", seed=1)
    for start in range(0, 20, 4):
        shard.insert(rows(start, 4))
    kept = sorted(ids_of(shard), key=lambda i: int(i.split(":")[1]))
    again = ReplayShard(5, remover="reservoir", seed=1)
    for start in range(0, 20, 4):
        again.insert(rows(start, 4))
    assert kept == sorted(ids_of(again), key=lambda i: int(i.split(":")[1]))
    assert kept == ['a:5', 'a:9', 'a:10', 'a:13', 'a:17']  # pinned: a change in the draws shows here
    assert shard.num_rows == 5 and shard.stats().evicted_rows == 15


def test_reservoir_keeps_every_example_with_equal_probability():
    # 400 seeded trials of 100 examples into capacity 10: each example kept ~ 400 * 10 / 100 = 40 times
    counts = np.zeros(100)
    for seed in range(400):
        shard = ReplayShard(10, remover="reservoir", seed=seed)
        for start in range(0, 100, 7):
            shard.insert(rows(start, min(7, 100 - start)))
        for example_id in ids_of(shard):
            counts[int(example_id.split(":")[1])] += 1
    assert counts.sum() == 4000
    assert stats.chisquare(counts).pvalue > 0.001
    assert counts[:50].sum() == pytest.approx(counts[50:].sum(), rel=0.1)  # early rows not favoured


def test_task_balanced_remover_evicts_from_the_largest_task():
    shard = ReplayShard(6, remover="task_balanced")
    shard.insert(rows(0, 6, task="a"))
    shard.insert(rows(0, 2, task="b", task_id=1))
    assert shard.stats().rows_per_task == {"a": 4, "b": 2}
    shard.insert(rows(0, 4, task="c", task_id=2))
    assert shard.stats().rows_per_task == {"a": 2, "b": 2, "c": 2}
    assert [i for i in ids_of(shard) if i.startswith("a")] == ["a:4", "a:5"]  # oldest of a went first


# ---------------------------------------------------------------- samplers
def test_uniform_sampling_is_seeded_and_proportional():
    shard = ReplayShard(100, seed=3)
    shard.insert(rows(0, 75, task="a"))
    shard.insert(rows(0, 25, task="b", task_id=1))
    again = ReplayShard(100, seed=3)
    again.insert(rows(0, 75, task="a"))
    again.insert(rows(0, 25, task="b", task_id=1))
    sample = shard.sample(4000)
    assert sample.column("example_id").to_pylist()[:20] == again.sample(20).column("example_id").to_pylist()
    share_b = sample.column("task_name").to_pylist().count("b") / 4000
    assert share_b == pytest.approx(0.25, abs=0.03)
    assert sample.schema.equals(REPLAY_SCHEMA, check_metadata=False)


def test_task_balanced_sampler_gives_each_task_an_equal_share():
    shard = ReplayShard(100, sampler="task_balanced", seed=0)
    shard.insert(rows(0, 90, task="a"))
    shard.insert(rows(0, 10, task="b", task_id=1))
    names = shard.sample(4000).column("task_name").to_pylist()
    assert names.count("b") / 4000 == pytest.approx(0.5, abs=0.03)


def test_samples_per_insert_rate_limit():
    shard = ReplayShard(100, max_samples_per_insert=2.0, min_rows_to_sample=5)
    shard.insert(rows(0, 4))
    with pytest.raises(RateLimitedError, match="min_rows_to_sample=5"):
        shard.sample(1)
    shard.insert(rows(4, 6))  # 10 inserted: up to 20 samples
    shard.sample(15)
    with pytest.raises(RateLimitedError, match="would exceed 2.0 samples per inserted row"):
        shard.sample(6)
    shard.sample(5)


# ---------------------------------------------------------------- durability
@pytest.mark.parametrize("remover", ["fifo", "reservoir", "task_balanced"])
def test_restore_from_snapshot_and_log_reproduces_the_shard(tmp_path, remover):
    shard = ReplayShard(50, remover=remover, seed=2, directory=tmp_path, snapshot_every_rows=70)
    for k in range(8):
        shard.insert(rows(k * 20, 20, task="ab"[k % 2], task_id=k % 2))
    shard.delete(["a:0", ids_of(shard)[3]])
    before = shard.rows()
    shard.close()
    restored = ReplayShard(50, remover=remover, seed=2, directory=tmp_path, snapshot_every_rows=70)
    assert restored.rows().equals(before)
    assert restored.stats().restored_rows == before.num_rows
    assert restored._evict_rng.bit_generator.state == shard._evict_rng.bit_generator.state
    # and it carries on exactly as the original would have
    restored.insert(rows(500, 20))
    shard_again = ReplayShard(50, remover=remover, seed=2)
    shard_again.set_state(shard.get_state())
    shard_again.insert(rows(500, 20))
    assert restored.rows().column("example_id").equals(shard_again.rows().column("example_id"))


def test_a_snapshot_keeps_its_predecessor_and_logs_as_the_fallback(tmp_path):
    shard = ReplayShard(10, directory=tmp_path)
    for start in (0, 3, 6):
        shard.insert(rows(start, 3))
        shard.snapshot()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["log-000002-0000.arrow", "log-000003-0000.arrow", "snapshot-000002.arrow",
                     "snapshot-000002.json", "snapshot-000003.arrow", "snapshot-000003.json"]


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "flipped-byte": _flip_a_byte,
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "garbage": lambda p: p.write_bytes(b"\x00\xffnot arrow" * 100),
    "empty": lambda p: p.write_bytes(b""),
    "no-manifest-and-truncated": lambda p: (p.with_suffix(".json").unlink(),
                                            p.write_bytes(p.read_bytes()[:100])),
    # killed between the rename and the check: a byte that Arrow's own validation would let through
    "no-manifest-and-flipped-byte": lambda p: (p.with_suffix(".json").unlink(), _flip_a_byte(p)),
    "no-manifest": lambda p: p.with_suffix(".json").unlink(),  # never verified: never used
}


@pytest.mark.parametrize("corrupt", list(CORRUPTIONS.values()), ids=list(CORRUPTIONS))
def test_a_corrupt_snapshot_falls_back_to_the_previous_one_and_its_logs(tmp_path, corrupt):
    shard = ReplayShard(30, remover="reservoir", seed=4, directory=tmp_path)
    for k in range(6):
        shard.insert(rows(k * 10, 10))
        if k in (1, 3):
            shard.snapshot()
    before = shard.rows()
    shard.close()
    corrupt(tmp_path / "snapshot-000002.arrow")
    restored = ReplayShard(30, remover="reservoir", seed=4, directory=tmp_path)
    assert restored.rows().equals(before)
    warnings = restored.stats().restore_warnings
    assert len(warnings) == 1 and "snapshot-000002.arrow" in warnings[0] and "corrupt" in warnings[0]
    assert (tmp_path / "snapshot-000002.arrow.corrupt").exists()  # kept for inspection, out of the way
    # the restored shard wrote a sound snapshot: the next restore needs no fallback
    restored.close()
    again = ReplayShard(30, remover="reservoir", seed=4, directory=tmp_path)
    assert again.rows().equals(before) and again.stats().restore_warnings == ()


def test_a_corrupt_snapshot_with_nothing_to_fall_back_on_fails_naming_the_file(tmp_path):
    shard = ReplayShard(10, directory=tmp_path)
    for start in (0, 3):
        shard.insert(rows(start, 3))
        shard.snapshot()
    shard.close()
    _flip_a_byte(tmp_path / "snapshot-000002.arrow")
    _flip_a_byte(tmp_path / "snapshot-000001.arrow")
    with pytest.raises(StorageError, match=r"snapshot-000002.arrow: CRC-32 does not match.*Move .* aside"):
        ReplayShard(10, directory=tmp_path)


def test_a_failed_log_append_starts_a_new_segment_and_restore_skips_only_the_torn_batch(tmp_path, monkeypatch):
    from storage import journal, replay

    shard = ReplayShard(100, directory=tmp_path)
    shard.insert(rows(0, 10))
    real_write = journal.LogFile.write

    def half_then_fail(self, data):  # the disk filled up halfway through the batch
        real_write(self, bytes(data)[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(journal.LogFile, "write", half_then_fail)
    with pytest.raises(replay.LogWriteError, match=r"appending to log-000000-0000.arrow failed.*was not applied"):
        shard.insert(rows(10, 10))
    assert ids_of(shard) == [f"a:{i}" for i in range(10)]  # nothing of the failed insert
    monkeypatch.setattr(journal.LogFile, "write", real_write)
    shard.insert(rows(20, 10))  # acknowledged: lands in a new segment
    assert sorted(p.name for p in tmp_path.glob("log-*")) == ["log-000000-0000.arrow", "log-000000-0001.arrow"]
    shard.close()

    restored = ReplayShard(100, directory=tmp_path)
    assert ids_of(restored) == [f"a:{i}" for i in [*range(10), *range(20, 30)]]
    report = restored.restore_report
    assert [s["file"] for s in report["skipped"]] == ["log-000000-0000.arrow"]
    assert report["skipped"][0]["offset"] > 0 and report["skipped"][0]["bytes"] > 0
    assert any("skipped" in w and "log-000000-0000.arrow" in w for w in restored.stats().restore_warnings)


def test_a_seeded_sample_depends_only_on_the_seed_and_the_rows():
    shard, other = ReplayShard(100, seed=1), ReplayShard(100, seed=2)
    for s in (shard, other):
        s.insert(rows(0, 50))
    shard.sample(7)  # an unseeded draw in between changes nothing for seeded ones
    first = shard.sample(20, seed=11).column("example_id").to_pylist()
    assert first == other.sample(20, seed=11).column("example_id").to_pylist()
    assert first != shard.sample(20, seed=12).column("example_id").to_pylist()


@pytest.mark.parametrize("on_disk", [True, False], ids=["disk", "memory"])
def test_rollback_to_a_checkpoint_drops_everything_since(tmp_path, on_disk):
    directory = tmp_path if on_disk else None
    shard = ReplayShard(15, remover="reservoir", seed=5, directory=directory)
    shard.insert(rows(0, 10, task="a"))
    shard.checkpoint("task-00")
    at_checkpoint = shard.rows()
    shard.insert(rows(0, 10, task="b", task_id=1))  # evicts some of a, then the run is killed
    shard.delete([ids_of(shard)[0]])
    assert shard.stats().rows_per_task.get("b")
    assert shard.rollback("task-00") == 10
    assert shard.rows().equals(at_checkpoint)
    shard.insert(rows(0, 10, task="b", task_id=1))  # the same task again: the same evictions
    redone = shard.rows()
    again = ReplayShard(15, remover="reservoir", seed=5)
    again.insert(rows(0, 10, task="a"))
    again.insert(rows(0, 10, task="b", task_id=1))
    assert redone.column("example_id").equals(again.rows().column("example_id"))
    if on_disk:  # and a restart restores the redone state, not the abandoned one
        shard.close()
        assert ReplayShard(15, remover="reservoir", seed=5, directory=tmp_path).rows().equals(redone)
    assert shard.checkpoints() == ["task-00"]
    assert shard.drop_checkpoints(keep=["task-01"]) == ["task-00"] and shard.checkpoints() == []
    with pytest.raises(KeyError, match="no checkpoint 'task-00'"):
        shard.rollback("task-00")


def test_torn_log_tail_and_unfinished_snapshot_are_ignored(tmp_path):
    shard = ReplayShard(100, directory=tmp_path)
    shard.insert(rows(0, 10))
    shard.insert(rows(10, 10))
    log = next(tmp_path.glob("log-*.arrow"))
    size = log.stat().st_size
    with open(log, "r+b") as handle:  # the process died in the middle of writing a third batch
        handle.seek(size)
        handle.write(b"\xff\xff\xff\xff\x40\x01\x00\x00garbage")
    (tmp_path / "snapshot-000001.arrow.tmp").write_bytes(b"half a snapshot")
    restored = ReplayShard(100, directory=tmp_path)
    assert ids_of(restored) == [f"a:{i}" for i in range(20)]
    assert not list(tmp_path.glob("*.tmp"))


def test_restore_refuses_a_smaller_capacity_and_foreign_directories(tmp_path):
    shard = ReplayShard(10, directory=tmp_path)
    shard.insert(rows(0, 10))
    shard.snapshot()
    shard.close()
    with pytest.raises(StorageError, match="would drop rows. Use capacity_rows >= 10"):
        ReplayShard(5, directory=tmp_path)
    with pytest.raises(StorageError, match="belongs to shard 0"):
        ReplayShard(10, directory=tmp_path, shard_id=3)


def test_insert_is_in_the_log_before_it_returns(tmp_path):
    shard = ReplayShard(10, directory=tmp_path)
    shard.insert(rows(0, 3))
    # no close(): a second process reading now sees the acknowledged rows
    assert ids_of(ReplayShard(10, directory=tmp_path)) == ["a:0", "a:1", "a:2"]


def test_routing_is_stable_and_spread():
    ids = [f"t:{i}" for i in range(4000)]
    shards = route(ids, 4)
    assert list(shards[:6]) == list(route(ids[:6], 4))
    assert np.bincount(shards, minlength=4).min() > 900


# ---------------------------------------------------------------- stored logits (DER++) and older shards
def _with_logits(table, rng):
    """Rows with random top-k logits: 1-3 tokens x k = 4, float32 values incl. awkward ones."""
    logits = []
    for _ in range(table.num_rows):
        tokens = int(rng.integers(1, 4))
        values = rng.standard_normal(tokens * 4).astype(np.float32)
        values[0] = np.float32(np.nextafter(np.float32(1.0), np.float32(2.0)))  # one ulp above 1
        logits.append({"tokens": tokens, "k": 4, "ids": rng.integers(0, 30_000, tokens * 4).tolist(),
                       "values": values})
    column = pa.array([{**row, "values": row["values"].tolist()} for row in logits], LOGITS_TYPE)
    return table.append_column("logits", column), logits


def test_stored_logits_come_back_bit_for_bit_through_sample_snapshot_log_and_restore(tmp_path):
    rng = np.random.default_rng(0)
    shard = ReplayShard(100, remover="fifo", seed=0, directory=tmp_path, snapshot_every_rows=30)
    table, logits = _with_logits(rows(0, 50), rng)
    shard.insert(table.slice(0, 35))  # a snapshot after it
    shard.insert(table.slice(35))  # in the log
    shard.insert(rows(100, 5))  # rows without logits: null
    by_id = dict(zip(table.column("example_id").to_pylist(), logits))
    shard.close()
    restored = ReplayShard(100, remover="fifo", seed=0, directory=tmp_path, snapshot_every_rows=30)
    for source in (restored.rows(), restored.sample(40, np.random.default_rng(1))):
        for example_id, stored in zip(source.column("example_id").to_pylist(), source.column("logits").to_pylist()):
            if example_id.startswith("a:1") and len(example_id) == 5:
                assert stored is None
                continue
            want = by_id[example_id]
            assert stored["tokens"] == want["tokens"] and stored["ids"] == want["ids"]
            got = np.asarray(stored["values"], dtype=np.float32)
            assert got.tobytes() == want["values"].tobytes()  # bit for bit


def test_a_shard_written_before_logits_existed_is_read_with_them_null():
    old_schema = pa.schema([f for f in REPLAY_SCHEMA if f.name != "logits"])
    old = pa.table({**{c: rows(0, 3).column(c) for c in rows(0, 3).column_names},
                    "seq": pa.array([0, 1, 2], pa.int64())}, schema=old_schema)
    assert upgrade(old).schema.names == REPLAY_SCHEMA.names
    shard = ReplayShard(10, seed=0)
    shard.set_state({"table": old, "counters": {"next_seq": 3, "evicted": 0, "evict_rng":
                                                 np.random.default_rng(0).bit_generator.state}})
    assert shard.rows().column("logits").null_count == 3
    shard.insert(rows(3, 2))
    assert shard.rows().num_rows == 5


def test_an_insert_with_malformed_logits_is_rejected_whole():
    shard = ReplayShard(10, seed=0)
    bad = rows(0, 2).append_column("logits", pa.array([1.5, 2.5]))
    with pytest.raises(SchemaMismatchError, match="logits"):
        shard.insert(bad)
    assert shard.rows().num_rows == 0


# ---------------------------------------------------------------- the policy is objects the shard is handed
class _KeepNewest:
    """A remover of our own: keeps the newest rows (the opposite of FIFO), to show the shard uses
    whatever remover it is handed."""

    name = "keep_newest"

    def admit(self, held, rows, *, capacity_rows, inserted_before, rng):
        table = pa.concat_tables([held, rows])
        overflow = table.num_rows - capacity_rows
        if overflow <= 0:
            return table, None
        return table.slice(0, capacity_rows), table.slice(capacity_rows)


def test_a_shard_takes_its_remover_and_sampler_as_objects():
    from storage.policy import Fifo, TaskBalancedSampler

    shard = ReplayShard(3, remover=_KeepNewest(), sampler=TaskBalancedSampler(), seed=0)
    shard.insert(rows(0, 5))
    assert shard.rows().column("example_id").to_pylist() == ["a:0", "a:1", "a:2"]
    assert shard.stats().evicted_rows == 2
    named = ReplayShard(3, remover="fifo", seed=0)
    assert isinstance(named.remover, Fifo) and named.sampler.name == "uniform"
    with pytest.raises(ValueError, match=r"unknown remover 'lifo'; choose one of \['fifo', 'reservoir', 'task_balanced'\]"):
        ReplayShard(3, remover="lifo")


def test_the_rate_limiter_alone():
    from storage.policy import RateLimiter

    limiter = RateLimiter(max_samples_per_insert=2.0, min_rows_to_sample=4)
    with pytest.raises(RateLimitedError, match="min_rows_to_sample=4"):
        limiter.check(shard_id=0, inserted=3, sampled=0, num_rows=1)
    limiter.check(shard_id=0, inserted=4, sampled=6, num_rows=2)  # 8 = 2 x 4: allowed
    with pytest.raises(RateLimitedError, match="would exceed 2.0 samples per inserted row"):
        limiter.check(shard_id=0, inserted=4, sampled=7, num_rows=2)
    with pytest.raises(ValueError, match=r"max_samples_per_insert \(0\) must be positive"):
        RateLimiter(0)


def test_a_store_manifest_naming_a_directory_outside_the_store_is_refused_by_key(tmp_path):
    import json

    from storage.errors import StorageError
    from storage.replay import read_store_manifest

    victim = tmp_path / "users-data"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    base = {"num_shards": 2, "version": 3, "routing": "jump", "checkpoints": {}}
    for directory in (str(victim), "../users-data", "retired-000001-shard-000/../../users-data", ""):
        (tmp_path / "store.json").write_text(json.dumps(
            {**base, "retired": [{"shard_id": 1, "version": 2, "directory": directory}]}))
        with pytest.raises(StorageError, match=r"store\.json: retired\.0\.directory = .* is not a retired shard"):
            read_store_manifest(tmp_path)
    (tmp_path / "store.json").write_text(json.dumps({**base, "num_shards": 10**9}))
    with pytest.raises(StorageError, match=r"num_shards = 1000000000 is not a shard count"):
        read_store_manifest(tmp_path)
    good = {**base, "retired": [{"shard_id": 1, "version": 2, "directory": "retired-000002-shard-001"}]}
    (tmp_path / "store.json").write_text(json.dumps(good))
    assert read_store_manifest(tmp_path) == good
    assert (victim / "keep.txt").read_text() == "mine"


def test_a_checkpoint_tag_that_is_a_path_is_refused(tmp_path):
    shard = ReplayShard(10, directory=tmp_path / "shard")
    with pytest.raises(ValueError, match="must match"):
        shard.rollback("../../etc/passwd")


def test_a_store_sends_no_all_null_logits_column_and_the_shard_stores_it_null(tmp_path):
    checked = check_batch(rows(0, 20))
    assert "logits" in checked.column_names  # check_batch puts the optional column in, null
    sent = without_empty_optional_columns(checked)
    assert sent.column_names == [c for c in checked.column_names if c != "logits"]
    table, _ = _with_logits(rows(20, 5), np.random.default_rng(0))
    with_values = check_batch(table)
    assert without_empty_optional_columns(with_values).column_names == with_values.column_names  # kept
    shard = ReplayShard(100, remover="fifo", directory=tmp_path)
    assert shard.insert(sent) == 20 and shard.insert(with_values) == 5
    stored = shard.rows()
    assert stored.schema.remove_metadata() == REPLAY_SCHEMA.remove_metadata()
    assert stored.column("logits").null_count == 20
