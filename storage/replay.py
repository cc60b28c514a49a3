"""One shard of the replay store: replay examples as an Arrow table, durable across process death.

``ReplayShard`` is a plain class (the Ray actor in ``actors.replay`` is this class, wrapped). It
holds at most ``capacity_rows`` rows; a *remover* decides what goes when it is full, a *sampler*
what comes out (``storage.policy``). With a directory, every acknowledged insert is first appended
to the shard's log, and a restart restores the newest sound snapshot plus the log after it
(``storage.journal``: its files, their checks, and how a corrupt snapshot is fallen back from).

Token ids are not cached: rows hold text, so a snapshot outlives any tokenizer, and a fast
tokenizer encodes a sampled batch in well under a millisecond. The schema metadata says so. A row
may carry the logits a model gave it when it was stored (DER++): ``LOGITS_TYPE``, null otherwise.
Shards written before that column existed (schema version 1) are read with it null.
"""

from __future__ import annotations

import json
import logging
import os
import re
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage.errors import StorageError
from storage.files import write_atomic
# The journal's two errors are the shard's too: a caller catches them from here.
from storage.journal import TAG, CorruptSnapshotError, LogWriteError, ShardJournal, generation_of  # noqa: F401
from storage.policy import RateLimiter, Remover, Sampler
from storage.policy import remover as make_remover
from storage.policy import sampler as make_sampler

logger = logging.getLogger("forgetless.storage")

SCHEMA_VERSION = "2"
# Per row: the top ``k`` logits of each of ``tokens`` target tokens, row-major ``tokens x k``: the
# vocabulary ids and their float32 values, exactly as the model gave them.
LOGITS_TYPE = pa.struct([("tokens", pa.int32()), ("k", pa.int32()), ("ids", pa.list_(pa.int32())),
                         ("values", pa.list_(pa.float32()))])
REPLAY_SCHEMA = pa.schema(
    [
        pa.field("example_id", pa.string(), nullable=False),
        pa.field("task_id", pa.int32(), nullable=False),
        pa.field("task_name", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("target", pa.string(), nullable=False),
        pa.field("logits", LOGITS_TYPE, nullable=True),  # DER++; null: none stored
        pa.field("seq", pa.int64(), nullable=False),  # insertion sequence within the shard
    ],
    metadata={"forgetless.schema_version": SCHEMA_VERSION, "forgetless.token_ids": "none (text only)"},
)
INSERT_COLUMNS = [f.name for f in REPLAY_SCHEMA if f.name != "seq"]  # the shard assigns seq
OPTIONAL_COLUMNS = ("logits",)  # an insert may leave them out: stored as null



class SchemaMismatchError(StorageError, TypeError):
    """An insert batch does not have the replay schema; nothing of it was stored."""


class EmptyReplayError(StorageError, LookupError):
    """Sampling from a shard or store that holds no rows."""


class StaleTopologyError(StorageError, RuntimeError):
    """An insert routed under an older topology of the store (shards were added or removed since);
    nothing of it was stored. The sender re-reads the topology and routes the rows again."""

    def __init__(self, shard_id: int, sent: int, current: int):
        super().__init__(f"replay shard {shard_id}: insert routed under topology {sent}, the store is at {current}")
        self.shard_id, self.sent, self.current = shard_id, sent, current

    def __reduce__(self):  # crosses process boundaries (Ray pickles it back to the caller)
        return type(self), (self.shard_id, self.sent, self.current)


def insert_schema() -> pa.Schema:
    return pa.schema([REPLAY_SCHEMA.field(c) for c in INSERT_COLUMNS])


def check_batch(batch: pa.Table, *, where: str = "") -> pa.Table:
    """Check an insert batch against the replay schema; return it cast to the exact field order.

    Raises:
        SchemaMismatchError: naming every missing, extra or mistyped column, and any null.
    """
    problems = []
    for name in OPTIONAL_COLUMNS:
        if name not in batch.column_names:
            batch = batch.append_column(REPLAY_SCHEMA.field(name), pa.nulls(batch.num_rows, REPLAY_SCHEMA.field(name).type))
    names = batch.column_names
    missing = [c for c in INSERT_COLUMNS if c not in names]
    extra = [c for c in names if c not in INSERT_COLUMNS]
    if missing:
        problems.append(f"missing column(s) {missing}")
    if extra:
        problems.append(f"unexpected column(s) {extra}")
    for name in INSERT_COLUMNS:
        if name in names:
            expected, got = REPLAY_SCHEMA.field(name).type, batch.schema.field(name).type
            if got != expected:
                problems.append(f"column {name!r} has type {got}, expected {expected}")
            elif batch.column(name).null_count and not REPLAY_SCHEMA.field(name).nullable:
                problems.append(f"column {name!r} has {batch.column(name).null_count} null(s)")
    if problems:
        raise SchemaMismatchError(f"replay insert{where} rejected, nothing stored: " + "; ".join(problems))
    return batch.select(INSERT_COLUMNS)


def without_empty_optional_columns(batch: pa.Table) -> pa.Table:
    """A checked batch without the optional columns it holds no value of (``check_batch`` puts
    them back as null): what a store sends its shards. A null ``logits`` is a struct of lists, a
    dozen buffers that cost each insert call its serialization for nothing."""
    empty = [name for name in OPTIONAL_COLUMNS
             if name in batch.column_names and batch.column(name).null_count == batch.num_rows]
    return batch.drop_columns(empty) if empty else batch


def upgrade(table: pa.Table) -> pa.Table:
    """A table of an older replay schema (version 1: no ``logits``) with the columns added since, null."""
    if "logits" in table.column_names or "example_id" not in table.column_names:
        return table
    field = REPLAY_SCHEMA.field("logits")
    return table.add_column(table.column_names.index("target") + 1, field, pa.nulls(table.num_rows, field.type))


ROUTINGS = ("jump", "modulo")


def route(example_ids: list[str] | pa.Array, num_shards: int, routing: str = "jump") -> np.ndarray:
    """Shard index of each example id, from a stable hash of it (CRC-32, not Python's salted ``hash``).

    ``jump``: Lamping & Veach's jump consistent hash — going from n to n+1 shards moves only the
    ~1/(n+1) of the rows that now belong to the new shard, and removing the last shard moves only
    its rows. ``modulo``: CRC-32 mod n, the routing of stores written before ``jump`` (it moves
    almost every row on a resize); such stores keep it.
    """
    ids = example_ids.to_pylist() if isinstance(example_ids, (pa.Array, pa.ChunkedArray)) else example_ids
    keys = np.fromiter((zlib.crc32(i.encode()) for i in ids), dtype=np.uint64, count=len(ids))
    if routing == "modulo":
        return (keys % np.uint64(num_shards)).astype(np.int64)
    if routing != "jump":
        raise ValueError(f"unknown routing {routing!r}; choose one of {list(ROUTINGS)}")
    return _jump(keys, num_shards)


def _jump(keys: np.ndarray, num_shards: int) -> np.ndarray:
    """Jump consistent hash of 64-bit keys into [0, num_shards), all keys at once (~ln n rounds)."""
    keys = keys.astype(np.uint64, copy=True)
    bucket = np.full(len(keys), -1, dtype=np.int64)
    jump = np.zeros(len(keys), dtype=np.int64)
    live = np.arange(len(keys))
    with np.errstate(over="ignore"):
        while live.size:
            bucket[live] = jump[live]
            keys[live] = keys[live] * np.uint64(2862933555777941757) + np.uint64(1)
            jump[live] = ((bucket[live] + 1) * (float(1 << 31) / ((keys[live] >> np.uint64(33)).astype(np.float64) + 1))
                          ).astype(np.int64)
            live = live[jump[live] < num_shards]
    return bucket


STORE_MANIFEST = "store.json"
RETIRED_NAME = re.compile(r"retired-\d{6,}-shard-\d{3,}")  # a shard's directory kept after it left the store
MAX_SHARDS = 1024  # the most shards a store.json may name (and `add-shards` may grow a store to)


def read_store_manifest(directory: str | os.PathLike) -> dict[str, Any] | None:
    """A sharded store's ``store.json`` (shard count, topology version, routing, checkpoints' topologies),
    or None when the directory has none (a new store, or one written before the file existed).

    Raises:
        StorageError: the file exists but cannot be read (named).
    """
    path = Path(directory) / STORE_MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StorageError(f"{path}: unreadable replay store manifest ({exc}); restore it from a backup, or "
                           "move the store aside to start empty") from None
    if not isinstance(manifest, dict) or not {"num_shards", "version", "routing"} <= set(manifest):
        raise StorageError(f"{path}: not a replay store manifest (needs num_shards, version, routing)")
    if not isinstance(manifest["num_shards"], int) or not 1 <= manifest["num_shards"] <= MAX_SHARDS:
        raise StorageError(f"{path}: num_shards = {manifest['num_shards']!r} is not a shard count (1-{MAX_SHARDS})")
    removing = manifest.get("removing")
    if removing is not None and not (isinstance(removing, dict) and isinstance(removing.get("keep"), int)
                                     and 1 <= removing["keep"] < manifest["num_shards"]):
        raise StorageError(f"{path}: removing = {removing!r} is not a removal in progress (keep: 1 to num_shards - 1); "
                           "the file may have been edited: restore it from a backup, or move the store aside")
    for i, entry in enumerate(manifest.get("retired") or []):
        # the store deletes these directories once no checkpoint needs them: only its own names, inside it
        name = entry.get("directory") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not RETIRED_NAME.fullmatch(name):
            raise StorageError(f"{path}: retired.{i}.directory = {name!r} is not a retired shard's directory of this "
                               "store (retired-NNNNNN-shard-NNN); the file may have been edited: restore it from a "
                               "backup, or move the store aside to start empty")
    return manifest


def write_store_manifest(directory: str | os.PathLike, manifest: dict[str, Any]) -> None:
    write_atomic(Path(directory) / STORE_MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))


@dataclass(frozen=True)
class ShardStats:
    shard_id: int
    num_rows: int
    capacity_rows: int
    rows_per_task: dict[str, int]
    bytes: int
    inserted_rows: int
    evicted_rows: int
    sampled_rows: int  # drawn by the shard itself (a zero-copy sampler on its node draws its own)
    restored_rows: int
    # What the last restore could not use: corrupt snapshots it fell back from, torn log ends it skipped.
    restore_warnings: tuple[str, ...] = ()


def draw_index(table: pa.Table, num_rows: int, rng: np.random.Generator, sampler: str = "uniform") -> pa.Array:
    """Which rows of ``table`` a sample of ``num_rows`` takes (with replacement), by the named
    sampler (``storage.policy``). A shard draws with it, and so does a sampler taking rows from a
    shard's published table: the same seed gives the same rows."""
    return make_sampler(sampler).draw(table, num_rows, rng)


class ReplayShard:
    """A bounded set of replay examples with a remover, a sampler and an optional durable log.

    Args:
        capacity_rows: the most rows held; a positive integer.
        remover: what goes when full (a ``storage.policy.Remover``, or its name) — ``fifo``
            (oldest first), ``reservoir`` (every example ever inserted is kept with equal
            probability, Vitter's algorithm R) or ``task_balanced`` (oldest row of the task
            holding the most rows).
        sampler: a ``storage.policy.Sampler`` or its name: ``uniform`` over rows, or
            ``task_balanced`` (a task uniformly, then a row of it).
        seed: seeds two generators: one for eviction (so a restore replays the same decisions)
            and one for sampling.
        directory: where the log and snapshots go; None keeps the shard in memory only.
        snapshot_every_rows: write a snapshot (and start a fresh log) after this many inserted
            rows; None: only on ``snapshot()``.
        max_samples_per_insert: Reverb-style rate limit: sampled rows may not exceed this times
            the inserted rows (after ``min_rows_to_sample`` rows are in); None: no limit.
        fsync: fsync the log after every insert (survives machine crashes, not just process death).
    """

    def __init__(
        self,
        capacity_rows: int,
        *,
        remover: str | Remover = "fifo",
        sampler: str | Sampler = "uniform",
        seed: int = 0,
        shard_id: int = 0,
        directory: str | os.PathLike | None = None,
        snapshot_every_rows: int | None = None,
        max_samples_per_insert: float | None = None,
        min_rows_to_sample: int = 1,
        fsync: bool = False,
    ):
        if not isinstance(capacity_rows, (int, np.integer)) or isinstance(capacity_rows, bool) or capacity_rows <= 0:
            raise ValueError(f"capacity_rows ({capacity_rows!r}) must be a positive integer")
        if snapshot_every_rows is not None and snapshot_every_rows <= 0:
            raise ValueError(f"snapshot_every_rows ({snapshot_every_rows}) must be positive or None")
        self.capacity_rows = int(capacity_rows)
        self.remover, self.sampler = make_remover(remover), make_sampler(sampler)
        self.rate_limiter = (RateLimiter(max_samples_per_insert, min_rows_to_sample)
                             if max_samples_per_insert is not None else None)
        self.seed, self.shard_id = seed, shard_id
        self.snapshot_every_rows = snapshot_every_rows
        self._evict_rng = np.random.default_rng([seed, shard_id, 0])
        self._table = REPLAY_SCHEMA.empty_table()
        self._ids: set[str] = set()
        self._combined = True
        self._next_seq = 0  # also the number of rows ever inserted (reservoir's n)
        self._evicted = 0
        self._sampled = 0
        self._since_snapshot = 0
        self._restored = 0
        self._topology: tuple[int, Any] = (0, None)
        self._memory_checkpoints: dict[str, dict[str, Any]] = {}
        self.restore_report: dict[str, Any] | None = None  # what a restore used, fell back from and skipped
        self.directory = Path(directory) if directory is not None else None
        self.journal: ShardJournal | None = None
        if self.directory is not None:
            manifest = read_store_manifest(self.directory.parent)
            if manifest is not None:  # a restarted shard refuses writers of an older topology at once
                self._topology = (int(manifest["version"]), None)
            self.journal = ShardJournal(self.directory, REPLAY_SCHEMA, shard_id=shard_id, fsync=fsync)
            self._restore()
        # Calls without a seed of their own draw from this generator (a restarted shard draws
        # afresh); reproducible sampling passes a seed per call (see ``sample``).
        self._sample_rng = np.random.default_rng([seed, shard_id, 1, self.generation, self._restored])

    # ------------------------------------------------------------------ writes
    def insert(self, batch: pa.Table, topology: int | None = None) -> int:
        """Add rows; returns how many were new. Ids already held are skipped, so a retried insert
        (after a lost acknowledgement) stores nothing twice.

        The batch is checked whole before anything happens, then logged, then applied: when this
        returns, the rows survive the death of the process. ``topology``: the store topology the
        sender routed under; older than this shard's, the insert is refused (``StaleTopologyError``).
        """
        if topology is not None and topology < self._topology[0]:
            raise StaleTopologyError(self.shard_id, topology, self._topology[0])
        batch = check_batch(batch, where=f" into shard {self.shard_id}")
        ids = batch.column("example_id").to_pylist()
        fresh = [i for i, example_id in enumerate(ids) if example_id not in self._ids]
        if len(set(ids)) != len(ids):  # duplicates inside the batch: keep the first
            seen: set[str] = set()
            fresh = [i for i in fresh if not (ids[i] in seen or seen.add(ids[i]))]
        if not fresh:
            return 0
        if len(fresh) != batch.num_rows:
            batch = batch.take(pa.array(fresh))
        seq = pa.array(np.arange(self._next_seq, self._next_seq + batch.num_rows), pa.int64())
        rows = pa.Table.from_arrays([*batch.columns, seq], schema=REPLAY_SCHEMA)
        if self.journal is not None:
            self.journal.append_insert(rows)
        self._apply(rows)
        if self.snapshot_every_rows and self._since_snapshot >= self.snapshot_every_rows:
            self.snapshot()
        return rows.num_rows

    def _apply(self, rows: pa.Table) -> None:
        inserted_before = self._next_seq
        self._next_seq += rows.num_rows
        self._since_snapshot += rows.num_rows
        self._ids.update(rows.column("example_id").to_pylist())
        self._table, removed = self.remover.admit(self._table, rows, capacity_rows=self.capacity_rows,
                                                  inserted_before=inserted_before, rng=self._evict_rng)
        self._forget(removed)
        self._combined = False

    def _forget(self, removed: pa.Table | None) -> None:
        if removed is not None and removed.num_rows:
            self._ids.difference_update(removed.column("example_id").to_pylist())
            self._evicted += removed.num_rows

    def delete(self, example_ids: list[str]) -> int:
        """Remove rows by id (used when rows move to another shard); logged like an insert."""
        doomed = set(example_ids) & self._ids
        if not doomed:
            return 0
        if self.journal is not None:
            self.journal.append_delete(sorted(doomed))
        self._apply_delete(doomed)
        return len(doomed)

    def _apply_delete(self, doomed: set[str]) -> None:
        keep = pc.invert(pc.is_in(self._table.column("example_id"), value_set=pa.array(sorted(doomed))))
        self._table = self._table.filter(keep)
        self._ids.difference_update(doomed)
        self._combined = False

    # ------------------------------------------------------------------ reads
    @property
    def num_rows(self) -> int:
        return self._table.num_rows

    def _ready(self) -> pa.Table:
        if not self._combined:
            # one chunk: take() on a table left in hundreds of chunks is ~60x slower (measured)
            self._table = self._table.combine_chunks()
            self._combined = True
        return self._table

    def sample(self, num_rows: int, seed: int | None = None) -> pa.Table:
        """``num_rows`` rows drawn with replacement by the shard's sampler.

        With ``seed``, the draw depends only on the seed and the rows held: a retried call (after
        the shard restarted) and a rerun of the same stream draw the same rows.

        Raises:
            EmptyReplayError: the shard holds no rows.
            RateLimitedError: the samples-per-insert limit would be exceeded.
        """
        if num_rows < 0:
            raise ValueError(f"num_rows ({num_rows}) must be >= 0")
        if self.num_rows == 0:
            raise EmptyReplayError(f"replay shard {self.shard_id} is empty: insert examples before sampling")
        if self.rate_limiter is not None:
            self.rate_limiter.check(shard_id=self.shard_id, inserted=self._next_seq, sampled=self._sampled,
                                    num_rows=num_rows)
        table = self._ready()
        if num_rows == 0:
            return table.slice(0, 0)
        rng = self._sample_rng if seed is None else np.random.default_rng(seed)
        self._sampled += num_rows
        return table.take(self.sampler.draw(table, num_rows, rng))

    def sample_with_size(self, num_rows: int, seed: int | None = None) -> tuple[pa.Table, int, int]:
        """``sample`` plus this shard's row count and topology version, in one actor round trip."""
        rows = self.sample(num_rows, seed) if num_rows else self._ready().slice(0, 0)
        return rows, self.num_rows, self._topology[0]

    def rows(self) -> pa.Table:
        """Every row held, oldest insertion first (for tests, export and rebalancing)."""
        return self._ready().sort_by("seq")

    def rows_moving(self, num_shards: int, routing: str = "jump") -> pa.Table:
        """Rows whose id routes to another shard among ``num_shards`` (see ``route``)."""
        table = self._ready()
        if not table.num_rows:
            return table
        target = route(table.column("example_id"), num_shards, routing)
        return table.filter(pa.array(target != self.shard_id))

    def clear(self) -> int:
        """Delete every row (logged); returns how many went."""
        return self.delete(self._table.column("example_id").to_pylist())

    def stats(self) -> ShardStats:
        tasks = Counter(self._table.column("task_name").to_pylist())
        return ShardStats(
            shard_id=self.shard_id, num_rows=self.num_rows, capacity_rows=self.capacity_rows,
            rows_per_task=dict(sorted(tasks.items())), bytes=self._table.nbytes, inserted_rows=self._next_seq,
            evicted_rows=self._evicted, sampled_rows=self._sampled, restored_rows=self._restored,
            restore_warnings=self._restore_warnings(),
        )

    def _restore_warnings(self) -> tuple[str, ...]:
        report = self.restore_report or {}
        return (*(f"fell back from a corrupt snapshot: {c['reason']}" for c in report.get("corrupt", ())),
                *(f"skipped {s['bytes']} bytes of {s['file']} from byte {s['offset']}: {s['reason']}"
                  for s in report.get("skipped", ())))

    def pid(self) -> int:
        return os.getpid()

    # ------------------------------------------------------------------ topology (for the store)
    def set_topology(self, version: int, shards: Any) -> None:
        """The store's shard list at ``version``; never goes back to an older one."""
        if version >= self._topology[0]:
            self._topology = (version, shards)

    def topology(self) -> tuple[int, Any]:
        return self._topology

    # ------------------------------------------------------------------ state
    def _counters(self) -> dict[str, Any]:
        return {"next_seq": self._next_seq, "evicted": self._evicted, "sampled": self._sampled,
                "evict_rng": self._evict_rng.bit_generator.state, "generation": self.generation,
                "capacity_rows": self.capacity_rows, "remover": self.remover.name, "shard_id": self.shard_id}

    def get_state(self) -> dict[str, Any]:
        """Everything needed to rebuild this shard: rows (one-chunk table) and counters."""
        return {"table": self._ready(), "counters": self._counters()}

    def set_state(self, state: dict[str, Any]) -> None:
        table = upgrade(state["table"])
        if table.schema.remove_metadata() != REPLAY_SCHEMA.remove_metadata():
            raise SchemaMismatchError(f"shard state has schema {table.schema}, expected {REPLAY_SCHEMA}")
        counters = dict(state["counters"])
        self._table = table.cast(REPLAY_SCHEMA)
        self._ids = set(table.column("example_id").to_pylist())
        self._next_seq, self._evicted = counters["next_seq"], counters["evicted"]
        self._sampled = counters.get("sampled", 0)
        self._evict_rng.bit_generator.state = counters["evict_rng"]
        self._combined = False

    # ------------------------------------------------------------------ durability
    @property
    def generation(self) -> int:
        """The snapshot generation the log is appended to (0: in memory, or nothing snapshotted)."""
        return self.journal.generation if self.journal is not None else 0

    @property
    def fsync(self) -> bool:
        return self.journal is not None and self.journal.fsync

    def sync_log(self) -> None:
        """Make what the log holds so far survive a machine crash (what ``fsync`` does per append),
        for rows another shard deletes once this one holds them (a resize's moves)."""
        if self.journal is not None:
            self.journal.sync()

    def snapshot(self) -> Path | None:
        """Write rows and counters to a new snapshot and start a new log generation (see
        ``ShardJournal.write_snapshot``); None for a shard held in memory only."""
        if self.journal is None:
            return None
        path = self.journal.write_snapshot(self._ready(), self._counters())
        self._since_snapshot = 0
        return path

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()

    def _restore(self) -> None:
        recovered = self.journal.recover(upgrade=upgrade)
        if recovered.snapshot is not None:
            table, counters, path = recovered.snapshot
            self._check_counters(counters, path)
            self.set_state({"table": table, "counters": counters})
        replayed = 0
        for op, rows in recovered.operations():
            if op == "insert":
                rows = upgrade(rows).cast(REPLAY_SCHEMA)
                self._apply(rows)
                replayed += rows.num_rows
            else:
                self._apply_delete(set(rows.column("example_id").to_pylist()))
        report = recovered.report
        self._restored = self.num_rows
        self._since_snapshot = replayed
        self.restore_report = report
        for corrupt in report["corrupt"]:
            logger.warning("replay shard %s: %s; restored from %s and the logs after it instead",
                           self.shard_id, corrupt["reason"], report["snapshot"] or "its logs alone")
        for skip in report["skipped"]:
            logger.warning("replay shard %s: skipped %s bytes of %s from byte %s: %s", self.shard_id, skip["bytes"],
                           skip["file"], skip["offset"], skip["reason"])
        self.journal.open_segment()
        if report["corrupt"]:
            self.journal.quarantine(report)  # the evidence, out of the restore path
            self.snapshot()  # a sound snapshot again, so the next restore needs no fallback

    def _check_counters(self, counters: dict[str, Any], path: Path) -> None:
        if counters["shard_id"] != self.shard_id or counters["remover"] != self.remover.name:
            raise StorageError(
                f"{path} belongs to shard {counters['shard_id']} with remover {counters['remover']!r}, not shard "
                f"{self.shard_id} with {self.remover.name!r}; point the shard at its own directory")
        if counters["capacity_rows"] > self.capacity_rows:
            raise StorageError(
                f"{path} holds a shard of capacity {counters['capacity_rows']}; restoring into capacity "
                f"{self.capacity_rows} would drop rows. Use capacity_rows >= {counters['capacity_rows']}")

    # ------------------------------------------------------------------ checkpoints (task boundaries)
    def checkpoint(self, tag: str) -> str:
        """Keep the shard as it is now under ``tag`` until ``drop_checkpoints`` removes it.

        On disk this is a snapshot plus a hard link to it (no second copy); in memory, the state.
        """
        if not TAG.fullmatch(tag):
            raise ValueError(f"checkpoint tag {tag!r} must match {TAG.pattern}")
        if self.journal is None:
            self._memory_checkpoints[tag] = self.get_state()
            return tag
        self.journal.link_checkpoint(tag, self.snapshot())
        return tag

    def checkpoints(self) -> list[str]:
        if self.journal is None:
            return sorted(self._memory_checkpoints)
        return self.journal.checkpoints()

    def rollback(self, tag: str) -> int:
        """Make the shard exactly what it was at ``checkpoint(tag)``; returns the rows it then holds.

        Everything inserted or deleted since is dropped, from memory and from disk (a new snapshot
        of the checkpoint replaces every later snapshot and log).

        Raises:
            KeyError: no checkpoint ``tag``.
            CorruptSnapshotError: the checkpoint file is damaged (named).
        """
        if self.journal is None:
            if tag not in self._memory_checkpoints:
                raise KeyError(f"replay shard {self.shard_id} has no checkpoint {tag!r}; it has {self.checkpoints()}")
            self.set_state(self._memory_checkpoints[tag])
            return self.num_rows
        path = self.journal.checkpoint_path(tag)
        if not path.exists():
            raise KeyError(f"replay shard {self.shard_id} has no checkpoint {tag!r} in {self.directory}; "
                           f"it has {self.checkpoints()}")
        table, counters = self.journal.read_snapshot(path, upgrade=upgrade)
        self._check_counters(counters, path)
        self.set_state({"table": table, "counters": counters})
        path = self.snapshot()
        self.journal.remove_generations_before(generation_of(path))  # the abandoned future, and what it was built on
        return self.num_rows

    def drop_checkpoints(self, keep: list[str] | tuple[str, ...] = ()) -> list[str]:
        """Remove every checkpoint not named in ``keep``; returns the tags removed."""
        dropped = [t for t in self.checkpoints() if t not in keep]
        for tag in dropped:
            if self.journal is None:
                del self._memory_checkpoints[tag]
            else:
                self.journal.drop_checkpoint(tag)
        return dropped
