"""The sharded replay store on Ray: shard actors, a picklable store handle, a prefetching sampler.

``ReplayShardActor`` is ``storage.replay.ReplayShard`` as an actor that Ray restarts when its
process dies; the restarted shard restores itself from its snapshot and log. ``ReplayStore`` is a
small handle (a list of actor handles) that routes inserts by a stable hash of the example id and
samples from every shard in proportion to its size, in one batched ``ray.get``. It pickles into
trainer workers; after ``add_shards`` the copies notice the new topology on their next call.
"""

from __future__ import annotations

import os
import time
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipelines.config import ReplayConfig
from storage.replay import (
    MAX_SHARDS,
    EmptyReplayError,
    ReplayShard,
    ShardStats,
    SchemaMismatchError,
    StaleTopologyError,
    check_batch,
    draw_index,
    insert_schema,
    read_store_manifest,
    route,
    without_empty_optional_columns,
    write_store_manifest,
)
from storage.errors import StorageError
from storage import files
from storage.files import fsync_directory
from storage.policy import RateLimitedError


class _PlacedShard(ReplayShard):
    """A shard that can say where it runs (for ``forgetless replay status``) and hand its rows to
    samplers on its node through the node's shared memory."""

    _published: tuple[pa.Table, ray.ObjectRef] | None = None

    def node(self) -> dict[str, str]:
        context = ray.get_runtime_context()
        return {"node_id": context.get_node_id(), "ip": ray.util.get_node_ip_address(), "pid": str(os.getpid())}

    def published(self) -> tuple[list[ray.ObjectRef], int, int]:
        """The shard's rows as one object in the node's object store (put again after any change),
        its row count and topology version. The shard then reads its rows from that object too, so
        they are held once. A sampler on this node maps the object without a copy and draws from it
        with ``draw_index`` and the seed it would have sent: the rows ``sample`` would have sent.
        The reference travels in a list, so Ray hands it over rather than the object."""
        table = self._ready()
        if self._published is None or self._published[0] is not table:
            ref = ray.put(table)
            self._table = ray.get(ref)  # zero-copy: the same buffers, in shared memory
            self._published = (self._table, ref)
        return [self._published[1]], self.num_rows, self._topology[0]


# max_restarts=-1: a shard whose process dies is restarted by Ray and restores itself from its files
# (one whose node is gone is started again elsewhere by the store handle: ``ReplayStore._resolve``);
# max_task_retries=0: a call in flight when the process died raises (ActorDiedError /
# ActorUnavailableError) instead of silently running twice — the caller retries, and inserts are
# idempotent by example id.
ReplayShardActor = ray.remote(max_restarts=-1, max_task_retries=0)(_PlacedShard)

_RETRYABLE = (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError,
              ray.exceptions.ActorUnschedulableError)
NAMESPACE = "forgetless"
# What insert_batches gathers into one send: 4 MiB is ~1 MiB a shard at 4 shards, where the fixed cost
# of a call (~0.3 ms of the caller's and the shard's CPU) is a few percent of moving its rows.
SEND_BYTES = 4 << 20


@dataclass
class ReplayStore:
    """Handle to a set of replay shard actors. Cheap to pickle: only actor handles and a seed.

    The shard list is versioned (its *topology*); every shard knows the newest version. A handle
    that routes under an older one has its insert refused (``StaleTopologyError``) and routes
    again; a sample reply carries the version, so samplers notice too. Resizing (``add_shards``,
    ``remove_shards``) publishes the new topology to every shard before any row moves, so rows
    written meanwhile land where the new topology routes them, and nothing is lost or doubled.
    """

    shards: list[Any]
    config: ReplayConfig
    directory: str | None = None
    version: int = 0
    seed: int = 0
    routing: str = "jump"
    name: str = ""  # shard actors are named <name>-shard-NNN (namespace "forgetless"); set by create
    _sizes: np.ndarray | None = field(default=None, repr=False)
    _rng: np.random.Generator | None = field(default=None, repr=False)
    # zero-copy sampling: ((version, shard count), the shards on this handle's node), and the shards'
    # published tables this handle has mapped (by object id)
    _local: tuple[tuple[int, int], frozenset[int]] | None = field(default=None, repr=False)
    _published: dict[int, tuple[str, pa.Table]] = field(default_factory=dict, repr=False)
    # store.json as this handle keeps it; only the handle that created the store has it (and writes it)
    _manifest: dict[str, Any] | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(cls, config: ReplayConfig, *, directory: str | Path | None = None, seed: int = 0,
               name: str | None = None) -> ReplayStore:
        """Start the store's shard actors; each keeps its log and snapshots under
        ``directory/shard-NNN`` (None: memory only, lost with the process).

        A directory that already holds a store (``store.json``) is reopened with its own shard
        count and routing — shards added to a running store stay added — whatever
        ``config.num_shards`` says.
        """
        manifest = read_store_manifest(directory) if directory else None
        if directory and manifest is None and any(Path(directory).glob("shard-*")):
            manifest = {"num_shards": len(list(Path(directory).glob("shard-*"))), "version": 0, "routing": "modulo"}
        name = name or f"replay-{uuid.uuid4().hex[:12]}"
        store = cls(shards=[], config=config, directory=str(directory) if directory else None, seed=seed, name=name,
                    version=int(manifest["version"]) if manifest else 0,
                    routing=manifest["routing"] if manifest else "jump")
        store._manifest = manifest or {"num_shards": config.num_shards, "version": 0, "routing": store.routing,
                                       "checkpoints": {}, "retired": []}
        if directory:
            store._finish_retiring()  # before a shard starts in a directory that is to be retired
        store._start_shards(range(int(store._manifest["num_shards"])))
        store._publish_topology()
        removing = store._manifest.get("removing")
        if removing:  # a removal stopped half-way: finish it
            store._finish_removal(int(removing["keep"]))
        return store

    def _alive_nodes(self) -> list[str]:
        """Alive nodes that can hold a shard (its CPUs and memory), in a stable order."""
        cfg = self.config
        return sorted(n["NodeID"] for n in ray.nodes()
                      if n["Alive"] and n["Resources"].get("CPU", 0) >= cfg.num_cpus
                      and (not cfg.memory_bytes or n["Resources"].get("memory", 0) >= cfg.memory_bytes))

    def _spread_nodes(self, count: int) -> list[str | None]:
        """A node for each of ``count`` new shards: the least used by this store's shards first.

        Ray's SPREAD is best effort (two of three zero-CPU shards were seen on one node, and a soft
        node affinity was not kept either), so shards are pinned to the nodes chosen here; a shard
        whose node is lost is started again on a live node by the first handle that finds it gone
        (``_resolve``), from the files it left on shared storage.
        """
        nodes = self._alive_nodes()
        if not nodes:
            return [None] * count
        used = {node: 0 for node in nodes}
        for where in (self._call_all("node") if self.shards else []):
            if where["node_id"] in used:
                used[where["node_id"]] += 1
        chosen = []
        for _ in range(count):
            node = min(nodes, key=lambda n: (used[n], nodes.index(n)))
            used[node] += 1
            chosen.append(node)
        return chosen

    def _shard_name(self, shard_id: int) -> str:
        return f"{self.name}-shard-{shard_id:03d}"

    def _launch(self, shard_id: int, node: str | None, *, get_if_exists: bool = False) -> Any:
        cfg = self.config
        strategy: Any = NodeAffinitySchedulingStrategy(node, soft=False) if node is not None else cfg.placement
        options: dict[str, Any] = {"num_cpus": cfg.num_cpus, "scheduling_strategy": strategy,
                                   "name": self._shard_name(shard_id), "namespace": NAMESPACE,
                                   "get_if_exists": get_if_exists}
        if cfg.memory_bytes:
            options["memory"] = cfg.memory_bytes
        return ReplayShardActor.options(**options).remote(cfg.shard_capacity, **self._shard_options(shard_id))

    def _shard_options(self, shard_id: int) -> dict[str, Any]:
        """The keyword arguments of shard ``shard_id``'s ``ReplayShard`` (its capacity aside)."""
        cfg = self.config
        return {"remover": cfg.remover, "sampler": cfg.sampler, "seed": self.seed, "shard_id": shard_id,
                "directory": str(self._shard_dir(shard_id)) if self.directory else None,
                "snapshot_every_rows": cfg.snapshot_every_rows, "max_samples_per_insert": cfg.max_samples_per_insert,
                "min_rows_to_sample": cfg.min_rows_to_sample, "fsync": cfg.fsync}

    def _start_shards(self, shard_ids: range) -> None:
        nodes = (self._spread_nodes(len(shard_ids)) if self.config.placement == "SPREAD"
                 else [None] * len(shard_ids))
        for shard_id, node in zip(shard_ids, nodes):
            self.shards.append(self._launch(shard_id, node))

    def _resolve(self, shard_index: int) -> None:
        """After a failed call: the shard's current actor. Ray restarts a crashed shard in place;
        one pinned to a node that is gone is dead for good (its name freed), and is started again
        on a live node — ``get_if_exists`` makes every handle that notices agree on one new actor."""
        name = self._shard_name(shard_index)
        try:
            current = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            nodes = self._alive_nodes() if self.config.placement == "SPREAD" else []
            node = nodes[shard_index % len(nodes)] if nodes else None
            current = self._launch(shard_index, node, get_if_exists=True)
        if current._actor_id != self.shards[shard_index]._actor_id:
            self.shards[shard_index] = current
            self._sizes = None

    def _publish_topology(self) -> None:
        """A new topology version: recorded in store.json first (a restarted shard reads it), then
        told to every shard, the ones leaving included (they refuse writers of older versions)."""
        self.version += 1
        self._save_manifest(num_shards=self.num_shards, version=self.version)
        ray.get([s.set_topology.remote(self.version, self.shards) for s in self.shards])
        self._sizes = None

    def _save_manifest(self, **changes: Any) -> None:
        manifest = self._manifest
        if manifest is None and self.directory:  # a copy resizing: start from what is on disk
            manifest = self._manifest = read_store_manifest(self.directory)
        if manifest is None:
            manifest = self._manifest = {"num_shards": self.num_shards, "version": self.version,
                                         "routing": self.routing, "checkpoints": {}, "retired": []}
        manifest.update(changes)
        if self.directory:
            write_store_manifest(self.directory, manifest)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_sizes"] = state["_rng"] = None  # each copy samples with its own generator
        state["_local"], state["_published"] = None, {}  # ... and on its own node
        state["_manifest"] = None  # the writer of the manifest is the handle that created the store
        return state

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def sync(self) -> bool:
        """Adopt the newest topology the shards know (shards added or removed elsewhere); True if it changed."""
        version, shards = self._call(0, "topology")
        if version > self.version and shards is not None:
            self.version, self.shards, self._sizes = version, list(shards), None
            return True
        return False

    # ------------------------------------------------------------------ writes
    def _call(self, shard_index: int, method: str, *args: Any, retries: int = 50) -> Any:
        """Call one shard, retrying while Ray restarts it, or while it is started again elsewhere
        (every method used this way is idempotent)."""
        for attempt in range(retries):
            try:
                return ray.get(getattr(self.shards[shard_index], method).remote(*args))
            except _RETRYABLE:
                if attempt == retries - 1:
                    raise
                time.sleep(min(0.05 * 2**attempt, 1.0))
                self._resolve(shard_index)
        raise AssertionError("unreachable")

    def _reply(self, shard_index: int, ref: ray.ObjectRef, method: str, *args: Any) -> Any:
        """The reply to a call in flight; if the shard died with it, the call again once it is back."""
        try:
            return ray.get(ref)
        except _RETRYABLE:
            return self._call(shard_index, method, *args)

    def _call_all(self, method: str, *args: Any) -> list[Any]:
        """Call every shard at once; a shard that died with the call in flight is retried alone."""
        refs = [getattr(shard, method).remote(*args) for shard in self.shards]
        return [self._reply(i, ref, method, *args) for i, ref in enumerate(refs)]

    def _send(self, table: pa.Table) -> list[tuple[int, pa.Table, ray.ObjectRef]]:
        table = without_empty_optional_columns(check_batch(table))
        targets = route(table.column("example_id"), self.num_shards, self.routing)
        order = np.argsort(targets, kind="stable")  # one take, then zero-copy slices per shard
        grouped, bounds = table.take(pa.array(order)), np.searchsorted(targets[order], np.arange(self.num_shards + 1))
        parts = [(i, grouped.slice(bounds[i], bounds[i + 1] - bounds[i])) for i in range(self.num_shards)
                 if bounds[i + 1] > bounds[i]]
        return [(i, part, self.shards[i].insert.remote(part, self.version)) for i, part in parts]

    def _acknowledge(self, sent: list[tuple[int, pa.Table, ray.ObjectRef]]) -> int:
        stored, stale, newest = 0, [], 0
        for i, part, ref in sent:
            try:
                stored += self._reply(i, ref, "insert", part, self.version)
            except StaleTopologyError as refused:
                stale.append(part)
                newest = max(newest, refused.current)
        if stale:  # the store was resized under us: learn the topology the refusals named, route again
            self._follow_topology(newest)
            stored += self._acknowledge(self._send(pa.concat_tables(stale)))
        return stored

    def _follow_topology(self, version: int) -> None:
        """Adopt a topology at least ``version`` (the one a refusing shard holds); the resizer tells
        every shard at once, so shard 0 may learn it a moment after the shard that refused."""
        for attempt in range(200):
            if self.version < version:
                self.sync()
            if self.version >= version:
                return
            time.sleep(0.01 * min(attempt + 1, 10))
        raise StorageError(f"a replay shard refused an insert as routed under topology {self.version}, older than "
                           f"its {version}, but shard 0 still holds topology {self._call(0, 'topology')[0]}")

    def insert(self, table: pa.Table) -> int:
        """Route rows by example id and insert them; returns rows newly stored.

        The batch is checked whole first (a bad column rejects all of it). Each shard's part is
        retried until acknowledged; ids already held are skipped, so retries store nothing twice.
        """
        stored = self._acknowledge(self._send(table))
        self._sizes = None
        return stored

    def insert_batches(self, batches: Iterable[pa.Table], *, max_in_flight: int = 16,
                       send_bytes: int = SEND_BYTES) -> int:
        """``insert`` for a stream of batches; returns rows newly stored.

        Consecutive batches travel together until they hold ``send_bytes``: a shard call costs
        about the same for 250 rows as for 2,500, so many small batches would be bound by calls,
        not rows (a part of 100 KiB or more also leaves Ray's inline path for the object store).
        Up to ``max_in_flight`` sends stay unacknowledged, so actor round trips overlap. Each batch
        is checked as it arrives: a bad one raises once every batch before it is stored, with
        nothing of it or after it stored. Every batch is acknowledged when this returns.
        """
        pending: deque[list[tuple[int, pa.Table, ray.ObjectRef]]] = deque()
        held: list[pa.Table] = []
        stored = held_bytes = 0
        schema = insert_schema()

        def send() -> None:
            nonlocal stored, held_bytes
            if held:
                pending.append(self._send(pa.concat_tables(held)))
                held.clear()
                held_bytes = 0
            while len(pending) > max_in_flight:
                stored += self._acknowledge(pending.popleft())

        def acknowledge_all() -> None:
            nonlocal stored
            send()
            while pending:
                stored += self._acknowledge(pending.popleft())
            self._sizes = None

        for number, batch in enumerate(batches):
            try:
                checked = check_batch(batch, where=f" (batch {number} of insert_batches)")
            except SchemaMismatchError:
                acknowledge_all()  # what came before the bad batch is stored before the error goes up
                raise
            held.append(pa.Table.from_arrays(checked.columns, schema=schema))
            held_bytes += checked.nbytes
            if held_bytes >= send_bytes:
                send()
        acknowledge_all()
        return stored

    def delete(self, example_ids: list[str]) -> int:
        """Remove rows by example id (routed as inserts are; ids not held are skipped, so a retry
        deletes nothing twice); returns rows removed."""
        if not example_ids:
            return 0
        self.sync()
        ids = pa.array(example_ids, pa.string())
        targets = route(ids, self.num_shards, self.routing)
        removed = sum(self._call(int(j), "delete", ids.filter(pa.array(targets == j)).to_pylist())
                      for j in np.unique(targets))
        self._sizes = None
        return removed

    # ------------------------------------------------------------------ resizing
    def _move(self, rows: pa.Table, *, num_shards: int | None = None) -> int:
        """Insert ``rows`` (shard rows, ``seq`` dropped) where the current topology routes them
        (among the first ``num_shards`` shards: a store shrinking to that many). They are on disk
        when this returns, whatever ``replay.fsync`` says: the caller deletes them from where they
        were, and a machine crash must not find them in neither place."""
        if not rows.num_rows:
            return 0
        rows = rows.drop_columns(["seq"]) if "seq" in rows.column_names else rows
        targets = route(rows.column("example_id"), num_shards or self.num_shards, self.routing)
        destinations = [int(j) for j in np.unique(targets)]
        for j in destinations:
            self._call(j, "insert", rows.filter(pa.array(targets == j)), self.version)
        for j in destinations:
            self._call(j, "sync_log")
        return rows.num_rows

    def _rebalance(self, shard_indices: Iterable[int]) -> int:
        """Move the rows of these shards that the current topology routes elsewhere: copied
        (acknowledged) first, then deleted, so a failure in between leaves a row in two places —
        settled by the next rebalance — never in none."""
        moved = 0
        for i in shard_indices:
            moving = self._call(i, "rows_moving", self.num_shards, self.routing)
            if moving.num_rows:
                moved += self._move(moving)
                self._call(i, "delete", moving.column("example_id").to_pylist())
        return moved

    def add_shards(self, num_new: int) -> int:
        """Add ``num_new`` shards and move the rows that now route to them; returns rows moved.

        Safe while other handles insert and sample: the new topology reaches every shard before a
        row moves. Resize from one place at a time (a run's store: ``forgetless replay add-shards``).
        """
        if not isinstance(num_new, int) or num_new <= 0:
            raise ValueError(f"num_new ({num_new!r}) must be a positive integer")
        if self.num_shards + num_new > self.config.max_shards:
            raise ValueError(f"adding {num_new} shard(s) to {self.num_shards} would pass replay.max_shards="
                             f"{self.config.max_shards}; add fewer, or raise replay.max_shards (at most {MAX_SHARDS}) "
                             "when the run is resumed")
        self.sync()
        old = self.num_shards
        self._start_shards(range(old, old + num_new))
        self._publish_topology()
        return self._rebalance(range(old))

    def remove_shards(self, num_removed: int) -> int:
        """Stop the last ``num_removed`` shards after moving every row they hold onto the others;
        returns rows moved. Their files are kept (``retired-*``) while a checkpoint may need them.

        Two phases, safe against a crash at any point: the intent is recorded in store.json
        (``removing``) before a row moves; each leaving shard's rows are inserted into the kept
        shards (acknowledged, so logged) before they are deleted from it; only then is the smaller
        shard count published. A store opened with the intent still recorded finishes the removal
        (moving again is harmless: an id already held is skipped), so a row is never in no shard
        and never in two.
        """
        self.sync()
        if not isinstance(num_removed, int) or not 0 < num_removed < self.num_shards:
            raise ValueError(f"num_removed ({num_removed!r}) must be between 1 and {self.num_shards - 1}: a store "
                             "keeps at least one shard")
        keep = self.num_shards - num_removed
        self._save_manifest(removing={"keep": keep})
        return self._finish_removal(keep)

    def _finish_removal(self, keep: int) -> int:
        """Phase 2 of ``remove_shards`` (also what opening a store with its intent recorded does)."""
        self.version += 1  # the leaving shards learn it too: late writers are sent back to route again
        self._save_manifest(version=self.version)
        ray.get([s.set_topology.remote(self.version, self.shards[:keep]) for s in self.shards])
        moved = 0
        for index in range(keep, self.num_shards):
            leaving_rows = self._call(index, "rows")
            moved += self._move(leaving_rows, num_shards=keep)
            if leaving_rows.num_rows:  # held by the kept shards now: gone from this one only then
                self._call(index, "delete", leaving_rows.column("example_id").to_pylist())
        leaving, self.shards = self.shards[keep:], self.shards[:keep]
        retiring = [{"shard_id": index, "version": self.version,
                     "directory": f"retired-{self.version:06d}-shard-{index:03d}"}
                    for index in range(keep, keep + len(leaving))] if self.directory else []
        # The smaller store, published with the names its leaving shards' files will have: an open
        # that finds a leaving shard's files still under shard-NNN moves them there (``_finish_retiring``).
        self._save_manifest(num_shards=keep, removing=None,
                            retired=[*(self._manifest or {}).get("retired", []), *retiring])
        for shard in leaving:
            self._stop(shard, timeout_s=30)
        if self.directory:
            self._finish_retiring()
        self._sizes = None
        return moved

    def _finish_retiring(self) -> None:
        """Move retired shards' files still under their shard name to their retired name (a
        removal stopped between publishing the smaller store and the renames)."""
        num_shards = int(self._manifest["num_shards"])
        for entry in self._manifest.get("retired", []):
            source, target = self._shard_dir(entry["shard_id"]), Path(self.directory) / entry["directory"]
            if entry["shard_id"] >= num_shards and source.is_dir() and not target.exists():
                files.replace(source, target)
                fsync_directory(self.directory)

    @staticmethod
    def _stop(shard: Any, *, timeout_s: float) -> None:
        """Close a shard's log (waiting up to ``timeout_s``), then end its actor for good."""
        try:
            ray.get(shard.close.remote(), timeout=timeout_s)
        except ray.exceptions.RayError:
            pass
        ray.kill(shard, no_restart=True)

    def _shard_dir(self, shard_id: int) -> Path:
        return Path(self.directory) / f"shard-{shard_id:03d}"

    # ------------------------------------------------------------------ reads
    def _refresh(self) -> None:
        self.sync()
        self._sizes = np.array([reply[1] for reply in self._call_all("sample_with_size", 0)])

    def sample_async(self, num_rows: int, rng: np.random.Generator | None = None) -> PendingSample:
        """Start sampling ``num_rows`` rows across shards in proportion to their sizes.

        ``rng`` decides the split across shards and seeds each shard's draw, so the rows depend
        only on it and on what the shards hold (None: this handle's generator, seeded from the
        store's seed — every copy of a handle then draws the same; give each consumer its own).
        """
        if rng is None:
            if self._rng is None:
                self._rng = np.random.default_rng([self.seed, 0x5EED])
            rng = self._rng
        if self._sizes is None:
            self._refresh()
        total = int(self._sizes.sum())
        if total == 0:
            raise EmptyReplayError("the replay store is empty: insert examples before sampling")
        counts = rng.multinomial(num_rows, self._sizes / total)
        seeds = rng.integers(0, 2**63, size=len(counts))
        parts = [(i, int(c), int(seed)) for i, (c, seed) in enumerate(zip(counts, seeds)) if c]
        local = self._local_shards()
        return PendingSample(parts, [self.shards[i].published.remote() if i in local
                                     else self.shards[i].sample_with_size.remote(c, seed) for i, c, seed in parts],
                             list(self.shards), [i in local for i, _, _ in parts])

    def _local_shards(self) -> frozenset[int]:
        """The shards a sampler here takes rows from itself (on this node, zero-copy sampling on, no
        rate limit); asked of the shards once per topology."""
        if not self.config.zero_copy_sampling or self.config.max_samples_per_insert is not None:
            return frozenset()
        if self._local is None or self._local[0] != (self.version, len(self.shards)):
            here = ray.get_runtime_context().get_node_id()
            where = self._call_all("node")
            local = frozenset(i for i, node in enumerate(where) if node["node_id"] == here)
            self._local = ((self.version, len(self.shards)), local)
            self._published = {i: mapped for i, mapped in self._published.items() if i in local}
        return self._local[1]

    def _take_published(self, shard_index: int, reply: tuple[list[ray.ObjectRef], int, int], count: int,
                        seed: int) -> tuple[pa.Table, int, int]:
        """What ``sample_with_size(count, seed)`` would have answered, drawn here from the shard's
        published table (mapped once per publication, without a copy; the shard's older one is let go)."""
        (ref,), size, version = reply
        mapped = self._published.get(shard_index)
        if mapped is None or mapped[0] != ref.hex():
            mapped = self._published[shard_index] = (ref.hex(), ray.get(ref))
        table = mapped[1]
        return table.take(draw_index(table, count, np.random.default_rng(seed), self.config.sampler)), size, version

    def collect(self, pending: PendingSample) -> pa.Table:
        """Finish a ``sample_async``: one table, shard sizes and topology refreshed from the replies.

        A shard that died with the call in flight is asked again once Ray has restarted it, with
        the same seed: the rows are those the first call would have returned. A shard removed
        while the call was in flight answers nothing: its part is drawn again from the others.
        """
        replies, missing = [], 0
        for (shard_index, count, seed), ref, shard, local in zip(pending.parts, pending.refs, pending.shards_at_call,
                                                                 pending.local):
            try:
                reply = ray.get(ref)
                replies.append(self._take_published(shard_index, reply, count, seed) if local else reply)
            except (*_RETRYABLE, ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError):
                self._local = None  # where the shards run is asked again
                self._published.pop(shard_index, None)
                if shard_index < self.num_shards and self.shards[shard_index] is shard:
                    replies.append(self._call(shard_index, "sample_with_size", count, seed))
                else:
                    missing += count
        if missing or any(version > self.version for _, _, version in replies):
            self._refresh()
        else:
            self._sizes = None if len(replies) != self.num_shards else np.array([r[1] for r in replies])
        tables = [table for table, _, _ in replies]
        if missing:
            tables.append(self.sample(missing))
        return pa.concat_tables(tables) if len(tables) > 1 else tables[0]  # chunks, no copy

    def sample(self, num_rows: int, rng: np.random.Generator | None = None) -> pa.Table:
        """``num_rows`` rows from all shards, each shard in proportion to its size (one ``ray.get``)."""
        return self.collect(self.sample_async(num_rows, rng))

    def stats(self) -> list[ShardStats]:
        self.sync()
        return self._call_all("stats")

    def nodes(self) -> list[dict[str, str]]:
        """Where each shard runs now: node id, IP and process id."""
        self.sync()
        return self._call_all("node")

    def num_rows(self) -> int:
        return sum(s.num_rows for s in self.stats())

    def rows(self) -> pa.Table:
        self.sync()
        return pa.concat_tables(self._call_all("rows"))

    # ------------------------------------------------------------------ durability
    def snapshot(self) -> list[str | None]:
        self.sync()
        return [None if p is None else str(p) for p in self._call_all("snapshot")]

    def checkpoint(self, tag: str) -> None:
        """Every shard keeps its rows under ``tag`` (see ``ReplayShard.checkpoint``); the store
        keeps the topology they were taken under."""
        self.sync()
        self._call_all("checkpoint", tag)
        if self._manifest is not None:
            checkpoints = {**self._manifest.get("checkpoints", {}),
                           tag: {"num_shards": self.num_shards, "version": self.version}}
            self._save_manifest(checkpoints=checkpoints)

    def rollback(self, tag: str) -> int:
        """The store back to checkpoint ``tag``; returns the rows it then holds.

        Shards that exist now and at the checkpoint go back to it; shards added since are emptied;
        rows of shards removed since come back from their retired files. Rows then sit where the
        current topology routes them.
        """
        self.sync()
        taken = (self._manifest or {}).get("checkpoints", {}).get(tag)
        then = int(taken["num_shards"]) if taken else self.num_shards
        refs = [shard.rollback.remote(tag) if i < then else shard.clear.remote() for i, shard in enumerate(self.shards)]
        for i, ref in enumerate(refs):
            try:
                self._reply(i, ref, "rollback" if i < then else "clear", *((tag,) if i < then else ()))
            except KeyError:
                if taken is None:  # no record of the store at that checkpoint: the tag is simply unknown
                    raise
                self._call(i, "clear")  # this shard was added after the checkpoint (in a slot used before)
        if taken is not None:
            for retired in self._manifest.get("retired", []):
                if retired["shard_id"] < then and retired["version"] > taken["version"]:
                    self._move(self._retired_rows(retired, tag))
            if taken["version"] != self.version:
                self._rebalance(range(self.num_shards))
        self._sizes = None
        return self.num_rows()

    def _retired_rows(self, retired: dict[str, Any], tag: str) -> pa.Table:
        """The rows a retired shard held at checkpoint ``tag``, read from its files in this process."""
        cfg = self.config
        shard = ReplayShard(cfg.shard_capacity, remover=cfg.remover, sampler=cfg.sampler, seed=self.seed,
                            shard_id=retired["shard_id"], directory=Path(self.directory) / retired["directory"])
        try:
            shard.rollback(tag)
            return shard.rows()
        finally:
            shard.close()

    def drop_checkpoints(self, keep: list[str] | tuple[str, ...] = ()) -> None:
        self.sync()
        self._call_all("drop_checkpoints", list(keep))
        if self._manifest is None:
            return
        checkpoints = {t: v for t, v in self._manifest.get("checkpoints", {}).items() if t in keep}
        oldest = min((c["version"] for c in checkpoints.values()), default=self.version)
        retired = []
        for entry in self._manifest.get("retired", []):
            if entry["version"] > oldest:  # a kept checkpoint predates its retirement
                retired.append(entry)
            elif self.directory:
                files.remove_tree(Path(self.directory) / entry["directory"])
        self._save_manifest(checkpoints=checkpoints, retired=retired)

    def shutdown(self) -> None:
        for shard in self.shards:
            self._stop(shard, timeout_s=10)


@dataclass(frozen=True)
class PendingSample:
    """A sample call in flight: per shard (index, rows, seed), the reply's object ref, and the
    shard list it was sent under."""

    parts: list[tuple[int, int, int]]
    refs: list[ray.ObjectRef]
    shards_at_call: list[Any]
    local: list[bool]  # per part: the reply is the shard's published table (taken from here), not rows


class PrefetchingSampler:
    """Keeps ``in_flight`` sample calls outstanding so a trainer never waits on replay.

    Each call fetches ``batches_per_call`` batches at once (one actor round trip per shard per
    call; default ~32k rows); ``next_batch`` hands them out one at a time. Rows are drawn with
    replacement, so a large call changes nothing about what a batch holds. A rate-limited store is retried with
    back-off until ``timeout_s``. ``seed`` (e.g. run seed, task, rank) makes the batches
    reproducible: they depend only on it and on the rows in the store.
    """

    def __init__(self, store: ReplayStore, *, batch_size: int, seed: int | list[int] = 0, in_flight: int = 2,
                 batches_per_call: int | None = None, timeout_s: float = 60.0):
        # ~32k rows a call: an actor round trip costs ~1 ms, so small calls starve the consumer
        # (8 batches of 256 a call: 0.23M rows/s; 256 batches: 1.8M rows/s, measured on 2 cores).
        batches_per_call = batches_per_call or max(1, 32768 // max(1, batch_size))
        if batch_size <= 0 or in_flight <= 0 or batches_per_call <= 0:
            raise ValueError("batch_size, in_flight and batches_per_call must be positive")
        self.store, self.batch_size = store, batch_size
        self.in_flight, self.batches_per_call, self.timeout_s = in_flight, batches_per_call, timeout_s
        self._rng = np.random.default_rng(seed)
        self._pending: deque[PendingSample] = deque()
        self._ready: deque[pa.Table] = deque()

    def _fill(self) -> None:
        while len(self._pending) < self.in_flight:
            self._pending.append(self.store.sample_async(self.batch_size * self.batches_per_call, self._rng))

    def next_batch(self) -> pa.Table:
        deadline = time.monotonic() + self.timeout_s
        delay = 0.01
        while not self._ready:
            self._fill()
            try:
                rows = self.store.collect(self._pending.popleft())
            except RateLimitedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            for start in range(0, rows.num_rows, self.batch_size):
                self._ready.append(rows.slice(start, self.batch_size))
        return self._ready.popleft()

    def close(self) -> None:
        for pending in self._pending:
            for ref in pending.refs:
                ray.cancel(ref)
        self._pending.clear()
