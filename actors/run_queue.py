"""The queue of runs handed to one trainer worker group (``actors.trainer_group``): an actor of its
own, in a module that imports nothing but Ray, so that its process starts in a second rather than
paying for torch as the group's module would.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import ray


@ray.remote(num_cpus=0)
class RunQueue:
    """The runs handed to one worker group, in order; each is done when every rank is done with it.
    Times are this actor's clock (one clock for the start-up and each run)."""

    def __init__(self, world_size: int):
        self._world_size = world_size
        self._jobs: list[dict[str, Any]] = []
        self._closed = False
        self._ready: set[int] = set()
        self._starts: dict[int, int] = {}  # rank -> times it came up (more than once: its group restarted)
        self._done: dict[int, set[int]] = {}
        self._abandoned: set[int] = set()  # runs the driver gave up on: a restarted group does not take them
        self._changed = asyncio.Condition()
        self.created_at, self.ready_at = time.time(), None

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def ready(self, rank: int) -> int:
        """A worker is up; returns its group's attempt (0 at first, 1 after Ray Train's first restart...)."""
        self._ready.add(rank)
        self._starts[rank] = self._starts.get(rank, 0) + 1
        if len(self._ready) == self._world_size and self.ready_at is None:
            self.ready_at = time.time()
        return self._starts[rank] - 1

    async def restarts(self) -> int:
        return max(self._starts.values(), default=1) - 1

    async def first_open(self) -> int:
        """The first run not yet done by every rank (nor abandoned): where a restarted worker starts."""
        seq = 0
        while seq < len(self._jobs) and (len(self._done.get(seq, ())) == self._world_size or seq in self._abandoned):
            seq += 1
        return seq

    async def abandon(self, seq: int) -> None:
        self._abandoned.add(seq)
        await self._notify()

    async def startup_s(self) -> float | None:
        return None if self.ready_at is None else self.ready_at - self.created_at

    async def put(self, job: dict[str, Any]) -> int:
        self._jobs.append(job)
        await self._notify()
        return len(self._jobs) - 1

    async def take(self, seq: int) -> dict[str, Any] | None:
        async with self._changed:
            await self._changed.wait_for(lambda: seq < len(self._jobs) or self._closed)
        return self._jobs[seq] if seq < len(self._jobs) else None

    async def done(self, seq: int, rank: int) -> None:
        self._done.setdefault(seq, set()).add(rank)
        await self._notify()

    async def wait_done(self, seq: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: len(self._done.get(seq, ())) == self._world_size
                                         or seq in self._abandoned)

    async def close(self) -> None:
        self._closed = True
        await self._notify()
