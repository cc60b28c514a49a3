"""A replay shard's files: an append-only Arrow IPC log, snapshots, and checkpoints that link to them.

``ShardJournal`` knows nothing of removers, samplers or capacity: it writes what a shard tells it
(rows inserted, ids deleted, a whole table with its counters) and gives it back after a restart
(``recover``). ``storage.replay.ReplayShard`` holds the rows and the policy and calls it.

Files in the shard's directory:

- ``snapshot-G.arrow``: rows and counters at generation G, with ``snapshot-G.json``, its manifest
  (rows, bytes, CRC-32), written only once the snapshot was read back and checked; a snapshot
  without its manifest is never used (it was never verified);
- ``log-G-P.arrow``: segment P of the inserts and deletes made after snapshot G, one record batch
  per operation, each with the CRC-32C of its serialized form in its metadata (checked on restore:
  a batch that fails it ends the restore of its segment, like a torn one). A restarted shard, or
  one whose append failed, starts a new segment, so a torn batch can only ever end a segment;
- ``checkpoint-TAG.arrow`` / ``.json``: hard links to a snapshot, kept until dropped.

Recovery takes the newest snapshot that checks out plus every log of its generation and later
ones. A new snapshot removes only what is older than its predecessor: the predecessor and its logs
stay as the fallback should the newest one turn out corrupt.
"""

from __future__ import annotations

import errno
import json
import os
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from storage.errors import StorageError
from storage import files
from storage.files import fsync_directory, write_atomic

COUNTERS_KEY = b"forgetless.counters"
CRC_KEY = b"forgetless.crc32c"  # a log record batch's checksum (Castagnoli), in its custom metadata
TAG = re.compile(r"[A-Za-z0-9_.-]+")


class LogWriteError(StorageError, OSError):
    """Appending to the shard's log failed: the insert was not applied."""


class LogDiskFullError(LogWriteError, files.DiskFullError):
    """Appending to the shard's log failed because its device is full (names what is free)."""


class CorruptSnapshotError(StorageError, ValueError):
    """A snapshot file does not match its manifest or cannot be read; names the file."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = path


@dataclass
class Recovered:
    """What ``ShardJournal.recover`` found: the snapshot to start from (or none) and the logged
    operations after it, in order; ``report`` says what was used, fallen back from and skipped."""

    snapshot: tuple[pa.Table, dict[str, Any], Path] | None
    generation: int  # the newest generation on disk: appends continue there, in a new segment
    report: dict[str, Any]
    logs: list[Path] = field(default_factory=list)  # read by ``operations``, in order

    def operations(self) -> Iterator[tuple[str, pa.Table]]:
        """``("insert", rows)`` or ``("delete", rows whose example_id goes)``, as they were logged.
        A torn end of a segment is skipped and recorded in ``report["skipped"]``."""
        for path in self.logs:
            for batch in read_log(path, self.report["skipped"]):
                self.report["replayed_batches"] += 1
                op = "insert" if batch.column("op").null_count == batch.num_rows else "delete"
                yield op, pa.Table.from_batches([batch]).drop_columns(["op"])


class ShardJournal:
    """The durable side of one replay shard, in ``directory``.

    Args:
        directory: the shard's own directory (created).
        schema: the rows' Arrow schema; the log adds an ``op`` column (null: insert, ``delete``).
        shard_id: named in every error.
        fsync: fsync the log after every append (survives machine crashes, not just process death).
    """

    def __init__(self, directory: str | os.PathLike, schema: pa.Schema, *, shard_id: int = 0, fsync: bool = False):
        self.directory = Path(directory)
        self.schema = schema
        self.log_schema = pa.schema([*schema, pa.field("op", pa.string())])
        self.shard_id = shard_id
        self.fsync = fsync
        self.generation = 0
        self._writer: pa.RecordBatchStreamWriter | None = None
        self._file: LogFile | None = None
        files.make_dirs(self.directory)

    # ------------------------------------------------------------------ paths
    def snapshot_path(self, generation: int) -> Path:
        return self.directory / f"snapshot-{generation:06d}.arrow"

    def log_paths(self, generation: int) -> list[Path]:
        return sorted(self.directory.glob(f"log-{generation:06d}-*.arrow"))

    def checkpoint_path(self, tag: str) -> Path:
        if not TAG.fullmatch(tag):  # a tag read from a run's files names a file: never a path
            raise ValueError(f"checkpoint tag {tag!r} must match {TAG.pattern}")
        return self.directory / f"checkpoint-{tag}.arrow"

    # ------------------------------------------------------------------ the log
    def open_segment(self) -> None:
        """Start a new log segment of the current generation."""
        part = len(self.log_paths(self.generation))
        path = self.directory / f"log-{self.generation:06d}-{part:04d}.arrow"
        try:
            self._file = LogFile(path)
            self._writer = pa.ipc.new_stream(self._file, self.log_schema)
            self._file.flush()
            if self.fsync:  # the segment's name too: a durable append in a file no directory lists is lost
                files.fsync_file(self._file, path)
                fsync_directory(self.directory)
        except OSError as exc:
            self.abandon_segment()
            raise LogWriteError(f"replay shard {self.shard_id}: cannot start log segment {path}: {exc}") from exc

    def abandon_segment(self) -> None:
        """Stop writing the current segment (whatever state it is in); the next append starts a new one."""
        for closer in (self._writer, self._file):
            try:
                if closer is not None:
                    closer.close()
            except (OSError, pa.ArrowException):
                pass
        self._writer = self._file = None

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._file.close()
            self._writer = self._file = None

    def sync(self) -> None:
        """fsync the current generation's log segments and their names: every append so far
        survives a machine crash, those of a process before this one (a restarted shard) too.
        Nothing to do when every append and segment was fsynced already (``fsync``)."""
        if self.fsync:
            return
        for path in self.log_paths(self.generation):
            try:
                files.fsync_path(path)
            except OSError as exc:
                raise LogWriteError(f"replay shard {self.shard_id}: cannot fsync log segment {path}: {exc}") from exc
        fsync_directory(self.directory)

    def append_insert(self, rows: pa.Table) -> None:
        """Log inserted rows (schema ``schema``); when this returns they survive process death."""
        self._append(pa.RecordBatch.from_arrays(
            [*(c.combine_chunks() for c in rows.columns), pa.nulls(rows.num_rows, pa.string())],
            schema=self.log_schema), "insert")

    def append_delete(self, example_ids: list[str]) -> None:
        """Log that rows with these ids went (the other columns of a delete record are empty)."""
        n = len(example_ids)
        columns = [pa.array(example_ids, f.type) if f.name == "example_id" else _filler(f, n) for f in self.schema]
        self._append(pa.RecordBatch.from_arrays([*columns, pa.array(["delete"] * n)], schema=self.log_schema),
                     "delete")

    def _append(self, batch: pa.RecordBatch, what: str) -> None:
        if self._writer is None:
            self.open_segment()
        path = self._file.path
        try:
            self._writer.write_batch(batch, custom_metadata={CRC_KEY: str(batch_crc32c(batch)).encode()})
            self._file.flush()
            if self.fsync:
                files.fsync_file(self._file, path)
        except (OSError, pa.ArrowException) as exc:
            # Whatever part of the batch reached the file is a torn batch: nothing may follow it in
            # this segment, or recovery could not read past it.
            self.abandon_segment()
            if files.is_disk_full(exc):
                full = LogDiskFullError(
                    f"replay shard {self.shard_id}: appending to {path.name} failed: no space left on its device "
                    f"({files.space_note(path, batch.nbytes)}); the {what} was not applied. Free space under "
                    f"{self.directory}; the next append starts a new log segment, and a restore skips the torn end "
                    "of this one")
                full.errno = errno.ENOSPC
                raise full from exc
            raise LogWriteError(
                f"replay shard {self.shard_id}: appending to {path.name} failed ({exc}); the {what} was not "
                "applied. The next one starts a new log segment, and a restore skips the torn end of this one"
            ) from exc

    # ------------------------------------------------------------------ snapshots
    def write_snapshot(self, table: pa.Table, counters: dict[str, Any]) -> Path:
        """Write ``table`` and ``counters`` as the next generation's snapshot and start its log.

        Written to a temporary name, fsynced, renamed, then read back and checked before its
        manifest is written; only then are files older than its predecessor removed.

        Raises:
            CorruptSnapshotError: the snapshot did not read back (the older files are kept).
        """
        generation = self.generation + 1
        path = self.snapshot_path(generation)
        tmp = path.with_suffix(".arrow.tmp")
        schema = table.schema.with_metadata({**(table.schema.metadata or {}), COUNTERS_KEY: json.dumps(counters).encode()})
        files.observe("write", tmp)
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            writer.write_table(table.cast(schema))
        with open(tmp, "rb") as handle:
            files.fsync_file(handle, tmp)
        files.replace(tmp, path)
        manifest = {"generation": generation, "rows": table.num_rows, "bytes": path.stat().st_size,
                    "crc32": crc32(path)}
        # read back whole and validated; not checksummed again: the CRC was just taken from these bytes
        self.read_snapshot(path, {k: v for k, v in manifest.items() if k != "crc32"})
        write_atomic(path.with_suffix(".json"), json.dumps(manifest))
        self.close()
        self.generation = generation
        self.open_segment()
        self.remove_generations_before(generation - 1)  # the predecessor stays: the fallback
        return path

    def read_snapshot(self, path: Path, manifest: dict[str, Any] | None = None,
                      upgrade: Callable[[pa.Table], pa.Table] = lambda t: t) -> tuple[pa.Table, dict[str, Any]]:
        """A snapshot's rows (``upgrade``d to the current schema) and counters, checked against its
        manifest (size, CRC-32, rows) and the schema.

        Raises:
            CorruptSnapshotError: naming the file and what is wrong with it.
        """
        if manifest is None:
            manifest_path = path.with_suffix(".json")
            try:
                manifest = json.loads(manifest_path.read_text())
            except FileNotFoundError:
                # The write stopped between the rename and the check that writes the manifest: the
                # file was never verified, and a flipped byte would pass Arrow's own validation. Its
                # predecessor and every log since are still there (removed only after the manifest).
                raise CorruptSnapshotError(path, "no manifest: the snapshot was never verified (its write stopped "
                                                 "before the check); restored from the one before it") from None
            except (OSError, ValueError) as exc:
                raise CorruptSnapshotError(manifest_path, f"unreadable manifest ({exc})") from None
        try:
            if "bytes" in manifest and path.stat().st_size != manifest["bytes"]:
                raise CorruptSnapshotError(path, f"{path.stat().st_size} bytes, its manifest says {manifest['bytes']}")
            if "crc32" in manifest and crc32(path) != manifest["crc32"]:
                raise CorruptSnapshotError(path, "CRC-32 does not match its manifest (the file changed on disk)")
            table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
            table.validate(full=True)
            counters = json.loads(table.schema.metadata[COUNTERS_KEY])
        except CorruptSnapshotError:
            raise
        except (OSError, pa.ArrowException, KeyError, ValueError, TypeError) as exc:
            raise CorruptSnapshotError(path, f"not a readable replay snapshot ({type(exc).__name__}: {exc})") from None
        if "rows" in manifest and table.num_rows != manifest["rows"]:
            raise CorruptSnapshotError(path, f"{table.num_rows} rows, its manifest says {manifest['rows']}")
        table = upgrade(table)
        if table.schema.remove_metadata() != self.schema.remove_metadata():
            raise CorruptSnapshotError(path, f"schema {table.schema.remove_metadata()} is not the replay schema")
        return table.replace_schema_metadata(self.schema.metadata), counters

    def remove_generations_before(self, generation: int) -> None:
        """Delete snapshots (with manifests) and logs of every generation older than ``generation``."""
        for old in [*self.directory.glob("snapshot-*"), *self.directory.glob("log-*.arrow")]:
            if generation_of(old) < generation:
                files.unlink(old)

    # ------------------------------------------------------------------ recovery
    def recover(self, upgrade: Callable[[pa.Table], pa.Table] = lambda t: t) -> Recovered:
        """The newest snapshot that checks out and the logs after it (not yet read: see
        ``Recovered.operations``). Removes unfinished snapshots (``*.tmp``).

        Raises:
            StorageError: a snapshot is corrupt and no older one with every later log is left.
        """
        for tmp in self.directory.glob("*.tmp"):
            files.unlink(tmp)  # a snapshot that never finished
        report: dict[str, Any] = {"snapshot": None, "corrupt": [], "skipped": [], "replayed_batches": 0}
        generations = sorted({generation_of(p) for p in self.directory.glob("snapshot-*.arrow")}, reverse=True)
        base, snapshot = 0, None
        for generation in generations:
            path = self.snapshot_path(generation)
            try:
                table, counters = self.read_snapshot(path, upgrade=upgrade)
            except CorruptSnapshotError as exc:
                report["corrupt"].append({"file": str(path), "reason": str(exc)})
                continue
            snapshot, base = (table, counters, path), generation
            report["snapshot"] = path.name
            break
        newest = max([base, *generations, *(generation_of(p) for p in self.directory.glob("log-*.arrow"))])
        if report["corrupt"]:
            # Falling back is only sound if every generation since the base still has its log.
            gaps = [g for g in range(base, newest + 1) if not self.log_paths(g)]
            if gaps or (snapshot is None and generations and not self.log_paths(0)):
                raise StorageError(
                    f"replay shard {self.shard_id} cannot be restored: {'; '.join(c['reason'] for c in report['corrupt'])}; "
                    f"no older snapshot with its logs is left to rebuild from (missing logs of generation(s) "
                    f"{gaps or [0]}). Move {self.directory} aside to start this shard empty, or restore it "
                    "from a backup")
        self.generation = newest
        logs = [log for generation in range(base, newest + 1) for log in self.log_paths(generation)]
        return Recovered(snapshot, newest, report, logs)

    def quarantine(self, report: dict[str, Any]) -> None:
        """Move the corrupt snapshots ``recover`` fell back from out of the restore path, as evidence."""
        for corrupt in report["corrupt"]:
            bad = Path(corrupt["file"])
            files.replace(bad, bad.with_suffix(".arrow.corrupt"))
            files.unlink(bad.with_suffix(".json"))

    # ------------------------------------------------------------------ checkpoints
    def link_checkpoint(self, tag: str, snapshot: Path) -> None:
        """Keep ``snapshot`` under ``tag``: hard links, no second copy."""
        if not TAG.fullmatch(tag):
            raise ValueError(f"checkpoint tag {tag!r} must match {TAG.pattern}")
        for suffix in (".arrow", ".json"):
            target = self.directory / f"checkpoint-{tag}{suffix}"
            tmp = target.with_name(target.name + ".tmp")
            files.unlink(tmp)
            files.link(snapshot.with_suffix(suffix), tmp)
            files.replace(tmp, target)
        fsync_directory(self.directory)

    def checkpoints(self) -> list[str]:
        return sorted(p.stem.removeprefix("checkpoint-") for p in self.directory.glob("checkpoint-*.arrow"))

    def drop_checkpoint(self, tag: str) -> None:
        for suffix in (".arrow", ".json"):
            files.unlink(self.directory / f"checkpoint-{tag}{suffix}")


class LogFile:
    """The log segment being appended to: a file and its path (and one place a test can fail it)."""

    def __init__(self, path: Path):
        self.path = path
        files.observe("write", path)  # created
        self._handle = open(path, "wb")

    @property
    def closed(self) -> bool:
        return self._handle.closed

    def write(self, data: bytes) -> int:
        return self._handle.write(data)

    def flush(self) -> None:
        files.observe("write", self.path)  # what was written reaches the file now
        self._handle.flush()

    def fileno(self) -> int:
        return self._handle.fileno()

    def close(self) -> None:
        self._handle.close()


def _filler(field: pa.Field, n: int) -> pa.Array:
    """A column of ``n`` placeholders: null where the field takes nulls, else an empty string or 0."""
    if field.nullable:
        return pa.nulls(n, field.type)
    if pa.types.is_string(field.type):
        return pa.array([""] * n, field.type)
    if pa.types.is_integer(field.type):
        return pa.array([0] * n, field.type)
    raise TypeError(f"a delete record has no placeholder for the non-nullable column {field}")


def crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def batch_crc32c(batch: pa.RecordBatch) -> int:
    """CRC-32C of a record batch's IPC serialization (what a batch read back from the log
    serializes to as well, byte for byte, unless a byte of it changed on disk)."""
    import google_crc32c

    return google_crc32c.value(batch.serialize())


def generation_of(path: Path) -> int:
    return int(path.name.split("-")[1].split(".")[0])


def read_log(path: Path, skipped: list[dict[str, Any]]) -> Iterator[pa.RecordBatch]:
    """The record batches of one log segment; a torn or damaged end is recorded in ``skipped``.

    A segment can only end torn (an append that failed, or the process died mid-write: never
    acknowledged either way), because a failed append closes its segment for good.
    """
    size = path.stat().st_size
    source = pa.memory_map(str(path))
    offset = 0
    try:
        reader = pa.ipc.open_stream(source)
        offset = source.tell()
        while True:
            batch, metadata = reader.read_next_batch_with_custom_metadata()
            batch.validate(full=True)
            logged = (metadata or {}).get(CRC_KEY)  # logs written before checksums have none
            if logged is not None and int(logged) != batch_crc32c(batch):
                skipped.append({"file": path.name, "offset": offset, "bytes": size - offset,
                                "reason": f"a record batch fails its CRC-32C check (logged {int(logged)}, read "
                                          f"{batch_crc32c(batch)}): the file changed on disk; the restore stops at "
                                          "the last good batch of this segment"})
                return
            offset = source.tell()
            yield batch
    except StopIteration:
        return
    except (pa.ArrowException, OSError) as exc:
        if size > offset:
            skipped.append({"file": path.name, "offset": offset, "bytes": size - offset,
                            "reason": f"torn or damaged batch ({type(exc).__name__}: {str(exc)[:200]}); an insert "
                                      "that was never acknowledged"})
