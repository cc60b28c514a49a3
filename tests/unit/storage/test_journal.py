"""The shard journal alone (no remover, no sampler, no capacity): what it writes is what a restart
gets back, in order; a corrupt snapshot is fallen back from only when the logs allow it."""

import pyarrow as pa
import pytest

from storage.errors import StorageError
from storage.journal import CorruptSnapshotError, LogWriteError, ShardJournal

# Any schema will do: the journal knows nothing of replay rows.
SCHEMA = pa.schema([pa.field("example_id", pa.string(), nullable=False), pa.field("n", pa.int64(), nullable=False),
                    pa.field("note", pa.string(), nullable=True)])


def table(*ids: str) -> pa.Table:
    return pa.table({"example_id": list(ids), "n": [len(i) for i in ids], "note": [None] * len(ids)}, schema=SCHEMA)


def replay(journal: ShardJournal) -> tuple[list[str] | None, list[tuple[str, list[str]]]]:
    recovered = journal.recover()
    start = recovered.snapshot[0].column("example_id").to_pylist() if recovered.snapshot else None
    return start, [(op, rows.column("example_id").to_pylist()) for op, rows in recovered.operations()]


def test_operations_come_back_in_the_order_they_were_logged(tmp_path):
    journal = ShardJournal(tmp_path, SCHEMA)
    journal.append_insert(table("a", "b"))
    journal.append_delete(["a"])
    journal.append_insert(table("c"))
    journal.close()
    assert replay(ShardJournal(tmp_path, SCHEMA)) == (None, [("insert", ["a", "b"]), ("delete", ["a"]),
                                                              ("insert", ["c"])])


def test_a_snapshot_starts_a_generation_and_recovery_takes_it_plus_the_logs_after_it(tmp_path):
    journal = ShardJournal(tmp_path, SCHEMA)
    journal.append_insert(table("a"))
    path = journal.write_snapshot(table("a"), {"next": 1})
    journal.append_insert(table("b"))
    journal.close()
    assert path.name == "snapshot-000001.arrow" and journal.generation == 1
    again = ShardJournal(tmp_path, SCHEMA)
    recovered = again.recover()
    assert recovered.snapshot[1] == {"next": 1} and recovered.generation == 1
    assert [(op, rows.column("example_id").to_pylist()) for op, rows in recovered.operations()] == [("insert", ["b"])]
    assert recovered.report["snapshot"] == "snapshot-000001.arrow" and recovered.report["replayed_batches"] == 1


def test_a_new_snapshot_keeps_its_predecessor_and_removes_what_is_older(tmp_path):
    journal = ShardJournal(tmp_path, SCHEMA)
    journal.open_segment()
    for generation in range(3):
        journal.append_insert(table(f"r{generation}"))
        journal.write_snapshot(table(f"r{generation}"), {})
    journal.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "log-000002-0000.arrow", "log-000003-0000.arrow", "snapshot-000002.arrow", "snapshot-000002.json",
        "snapshot-000003.arrow", "snapshot-000003.json"]


def test_a_corrupt_snapshot_falls_back_to_its_predecessor_and_the_logs_since(tmp_path):
    journal = ShardJournal(tmp_path, SCHEMA)
    journal.append_insert(table("a"))
    journal.write_snapshot(table("a"), {"at": 1})
    journal.append_insert(table("b"))
    journal.write_snapshot(table("a", "b"), {"at": 2})
    journal.append_insert(table("c"))
    journal.close()
    newest = tmp_path / "snapshot-000002.arrow"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))

    again = ShardJournal(tmp_path, SCHEMA)
    recovered = again.recover()
    assert recovered.snapshot[1] == {"at": 1}
    assert [rows.column("example_id").to_pylist() for _, rows in recovered.operations()] == [["b"], ["c"]]
    assert "CRC-32" in recovered.report["corrupt"][0]["reason"]
    again.quarantine(recovered.report)
    assert (tmp_path / "snapshot-000002.arrow.corrupt").exists() and not newest.exists()


def test_a_corrupt_snapshot_without_the_logs_to_rebuild_is_refused_naming_the_way_out(tmp_path):
    journal = ShardJournal(tmp_path, SCHEMA)
    journal.write_snapshot(table("a"), {})
    journal.write_snapshot(table("a"), {})
    journal.close()
    for name in ("snapshot-000001.arrow", "snapshot-000002.arrow"):
        (tmp_path / name).write_bytes(b"not arrow")
    with pytest.raises(StorageError, match=r"cannot be restored: .*snapshot-000002.arrow.*Move .* aside"):
        ShardJournal(tmp_path, SCHEMA).recover()


def test_a_snapshot_of_another_schema_is_corrupt_by_name(tmp_path):
    other = pa.schema([pa.field("example_id", pa.string())])
    ShardJournal(tmp_path, other).write_snapshot(pa.table({"example_id": ["a"]}, schema=other), {})
    with pytest.raises(CorruptSnapshotError, match=r"snapshot-000001.arrow: schema .* is not the replay schema"):
        ShardJournal(tmp_path, SCHEMA).read_snapshot(tmp_path / "snapshot-000001.arrow")


def test_an_unfinished_snapshot_is_removed_and_nothing_else(tmp_path):
    journal = ShardJournal(tmp_path, SCHEMA)
    journal.append_insert(table("a"))
    journal.close()
    (tmp_path / "snapshot-000001.arrow.tmp").write_bytes(b"half a snapshot")
    assert replay(ShardJournal(tmp_path, SCHEMA)) == (None, [("insert", ["a"])])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log-000000-0000.arrow"]


def test_a_failed_append_closes_its_segment_and_the_next_append_opens_another(tmp_path, monkeypatch):
    from storage import journal as module

    journal = ShardJournal(tmp_path, SCHEMA)
    journal.append_insert(table("a"))
    monkeypatch.setattr(module.LogFile, "write", lambda self, data: (_ for _ in ()).throw(OSError(28, "disk full")))
    with pytest.raises(LogWriteError, match=r"shard 0: appending to log-000000-0000.arrow failed.*insert was not"):
        journal.append_insert(table("b"))
    monkeypatch.undo()
    journal.append_insert(table("c"))
    journal.close()
    assert sorted(p.name for p in tmp_path.glob("log-*")) == ["log-000000-0000.arrow", "log-000000-0001.arrow"]
    assert replay(ShardJournal(tmp_path, SCHEMA))[1] == [("insert", ["a"]), ("insert", ["c"])]


def test_a_checkpoint_is_a_link_to_its_snapshot_and_a_bad_tag_is_refused(tmp_path):
    journal = ShardJournal(tmp_path, SCHEMA)
    path = journal.write_snapshot(table("a"), {"k": 1})
    journal.link_checkpoint("task-0", path)
    assert journal.checkpoints() == ["task-0"]
    assert journal.checkpoint_path("task-0").stat().st_ino == path.stat().st_ino  # no second copy
    assert journal.read_snapshot(journal.checkpoint_path("task-0"))[1] == {"k": 1}
    with pytest.raises(ValueError, match=r"checkpoint tag '../x' must match"):
        journal.link_checkpoint("../x", path)
    journal.drop_checkpoint("task-0")
    assert journal.checkpoints() == []


def test_a_new_log_segment_is_named_durably_when_the_log_is_fsynced(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr("storage.journal.fsync_directory", lambda path: synced.append(str(path)))
    durable = ShardJournal(tmp_path / "durable", SCHEMA, fsync=True)
    durable.append_insert(table("a"))
    assert synced == [str(tmp_path / "durable")]
    ShardJournal(tmp_path / "fast", SCHEMA, fsync=False).append_insert(table("b"))
    assert synced == [str(tmp_path / "durable")]  # replay.fsync off: no fsync at all, by choice


def test_a_log_batch_changed_on_disk_fails_its_checksum_and_the_restore_stops_before_it(tmp_path):
    journal = ShardJournal(tmp_path, SCHEMA)
    journal.append_insert(table("first-1", "first-2"))
    journal.append_insert(table("second-1", "second-2"))
    journal.append_insert(table("third-1"))
    journal.close()
    (log,) = tmp_path.glob("log-*.arrow")
    data = bytearray(log.read_bytes())
    at = data.index(b"second-2")
    data[at + 7] ^= 0x01  # "second-3": still valid Arrow, only the checksum can tell
    log.write_bytes(bytes(data))
    recovered = ShardJournal(tmp_path, SCHEMA).recover()
    ops = [(op, rows.column("example_id").to_pylist()) for op, rows in recovered.operations()]
    assert ops == [("insert", ["first-1", "first-2"])]  # the last good batch; nothing after the bad one
    (skipped,) = recovered.report["skipped"]
    assert skipped["file"] == log.name and "CRC-32C" in skipped["reason"] and skipped["bytes"] > 0


def test_a_full_disk_under_the_log_is_named_with_the_space_free(tmp_path, monkeypatch):
    import errno
    import os

    from storage.files import DiskFullError

    journal = ShardJournal(tmp_path, SCHEMA)
    journal.append_insert(table("a"))
    monkeypatch.setattr(journal._file, "flush", lambda: (_ for _ in ()).throw(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    with pytest.raises(LogWriteError) as caught:
        journal.append_insert(table("b"))
    assert isinstance(caught.value, DiskFullError)
    assert "appending to log-000000-0000.arrow failed: no space left on its device" in str(caught.value)
    assert "free of" in str(caught.value) and "the insert was not applied" in str(caught.value)
