"""A replay shard's policy, as objects the shard is handed (as Reverb's Table takes its selectors
and rate limiter): which rows go when it is full (a ``Remover``), which rows a sample takes (a
``Sampler``), and when sampling must wait for inserts (a ``RateLimiter``). The shard keeps the
rows, their durability and the random generators; a policy only decides.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pyarrow as pa

from storage.errors import StorageError


class RateLimitedError(StorageError, RuntimeError):
    """Sampling now would exceed the samples-per-insert limit; insert more rows first."""


class Remover(Protocol):
    name: str

    def admit(self, held: pa.Table, rows: pa.Table, *, capacity_rows: int, inserted_before: int,
              rng: np.random.Generator) -> tuple[pa.Table, pa.Table | None]:
        """The shard's table once ``rows`` arrive in one holding ``held`` (at most ``capacity_rows``
        rows after), and the rows removed (None or empty: none). ``inserted_before``: rows ever
        inserted before these; ``rng``: the shard's eviction generator (saved with its state, so a
        restore replaying the log makes the same choices)."""
        ...


class Fifo:
    """The oldest rows go first."""

    name = "fifo"

    def admit(self, held: pa.Table, rows: pa.Table, *, capacity_rows: int, inserted_before: int,
              rng: np.random.Generator) -> tuple[pa.Table, pa.Table | None]:
        table = pa.concat_tables([held, rows])
        overflow = table.num_rows - capacity_rows
        if overflow <= 0:
            return table, None
        return table.slice(overflow), table.slice(0, overflow)


class Reservoir:
    """Every example ever inserted is held with equal probability (Vitter's algorithm R)."""

    name = "reservoir"

    def admit(self, held: pa.Table, rows: pa.Table, *, capacity_rows: int, inserted_before: int,
              rng: np.random.Generator) -> tuple[pa.Table, pa.Table | None]:
        # One draw per row: the k-th example ever inserted (0-based) fills a free slot, or replaces
        # slot j ~ U[0, k] when j < capacity.
        count, incoming = held.num_rows, rows.num_rows
        free = max(0, min(incoming, capacity_rows - count))
        index = np.arange(count + free)  # slot -> position in concat(held, incoming)
        k = np.arange(inserted_before + free, inserted_before + incoming)
        draws = rng.integers(0, k + 1) if len(k) else np.empty(0, dtype=np.int64)
        for offset, j in zip(range(free, incoming), draws):
            if j < capacity_rows:
                index[j] = count + offset  # a later row of the batch wins a shared slot
        combined = pa.concat_tables([held, rows])
        keep = np.zeros(count + incoming, dtype=bool)
        keep[index] = True
        removed = combined.filter(pa.array(~keep)) if not keep.all() else None
        return combined.take(pa.array(index, pa.int64())), removed


class TaskBalancedRemover:
    """The oldest row of the task holding the most rows goes, one at a time."""

    name = "task_balanced"

    def admit(self, held: pa.Table, rows: pa.Table, *, capacity_rows: int, inserted_before: int,
              rng: np.random.Generator) -> tuple[pa.Table, pa.Table | None]:
        table = pa.concat_tables([held, rows])
        overflow = table.num_rows - capacity_rows
        if overflow <= 0:
            return table, None
        tasks = table.column("task_name").to_numpy(zero_copy_only=False)
        counts = Counter(tasks.tolist())
        positions = {t: list(np.flatnonzero(tasks == t)) for t in counts}
        drop: list[int] = []
        for _ in range(overflow):
            largest = max(counts, key=lambda t: (counts[t], t))
            drop.append(positions[largest].pop(0))
            counts[largest] -= 1
        mask = np.ones(table.num_rows, dtype=bool)
        mask[drop] = False
        return table.filter(pa.array(mask)), table.take(pa.array(np.array(drop, dtype=np.int64)))


class Sampler(Protocol):
    name: str

    def draw(self, table: pa.Table, num_rows: int, rng: np.random.Generator) -> pa.Array:
        """Which rows of ``table`` a sample of ``num_rows`` takes (indices, with replacement)."""
        ...


class Uniform:
    """Every row equally likely."""

    name = "uniform"

    def draw(self, table: pa.Table, num_rows: int, rng: np.random.Generator) -> pa.Array:
        return pa.array(rng.integers(0, table.num_rows, num_rows), pa.int64())


class TaskBalancedSampler:
    """A task uniformly, then a row of it: a task's share of the sample does not follow its rows."""

    name = "task_balanced"

    def draw(self, table: pa.Table, num_rows: int, rng: np.random.Generator) -> pa.Array:
        tasks = table.column("task_name").to_numpy(zero_copy_only=False)
        names, inverse = np.unique(tasks, return_inverse=True)
        chosen = rng.integers(0, len(names), num_rows)
        index = np.empty(num_rows, dtype=np.int64)
        for t in np.unique(chosen):
            members = np.flatnonzero(inverse == t)
            picks = chosen == t
            index[picks] = members[rng.integers(0, len(members), int(picks.sum()))]
        return pa.array(index, pa.int64())


REMOVERS: dict[str, type] = {cls.name: cls for cls in (Fifo, Reservoir, TaskBalancedRemover)}
SAMPLERS: dict[str, type] = {cls.name: cls for cls in (Uniform, TaskBalancedSampler)}


def remover(name: str | Remover) -> Remover:
    """A remover by name (or the object itself)."""
    if not isinstance(name, str):
        return name
    if name not in REMOVERS:
        raise ValueError(f"unknown remover {name!r}; choose one of {list(REMOVERS)}")
    return REMOVERS[name]()


def sampler(name: str | Sampler) -> Sampler:
    """A sampler by name (or the object itself)."""
    if not isinstance(name, str):
        return name
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {list(SAMPLERS)}")
    return SAMPLERS[name]()


@dataclass(frozen=True)
class RateLimiter:
    """Reverb-style: sampled rows may not exceed ``max_samples_per_insert`` times the inserted rows,
    and sampling starts once ``min_rows_to_sample`` rows were inserted."""

    max_samples_per_insert: float
    min_rows_to_sample: int = 1

    def __post_init__(self) -> None:
        if self.max_samples_per_insert <= 0:
            raise ValueError(f"max_samples_per_insert ({self.max_samples_per_insert}) must be positive or None")

    def check(self, *, shard_id: int, inserted: int, sampled: int, num_rows: int) -> None:
        """Raises ``RateLimitedError`` when sampling ``num_rows`` more now is not allowed."""
        if inserted < self.min_rows_to_sample:
            raise RateLimitedError(
                f"replay shard {shard_id} has had {inserted} rows inserted; sampling starts at "
                f"min_rows_to_sample={self.min_rows_to_sample}")
        if sampled + num_rows > self.max_samples_per_insert * inserted:
            raise RateLimitedError(
                f"replay shard {shard_id}: sampling {num_rows} more rows would exceed "
                f"{self.max_samples_per_insert} samples per inserted row ({sampled} sampled, {inserted} inserted)")
